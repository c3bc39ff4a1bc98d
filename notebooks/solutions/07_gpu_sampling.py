"""Solutions to the exercises of 07_gpu_sampling.ipynb. Try each one yourself first.

Each block below replaces the exercise cell of the same name; it runs in the notebook's namespace,
after the cells above the exercise (so `torch` exists).
"""

# %% Exercise 7.1
def kv_cache_bytes(model_cfg, layout, rows, bytes_per_number):
    per_layer = 2 * model_cfg.n_head * model_cfg.head_dim * layout.length   # a key and a value per head and position
    return rows * model_cfg.n_layer * per_layer * bytes_per_number


# %% Wrong 7.1: only the keys are counted (a cache holds a key and a value per head and position)
def kv_cache_bytes(model_cfg, layout, rows, bytes_per_number):
    return rows * model_cfg.n_layer * model_cfg.n_head * model_cfg.head_dim * layout.length * bytes_per_number


# %% Exercise 7.2
def row_layer_keys(text_len, grid, cell):
    image = range(max(0, cell - grid), cell + 1)                # back to the cell straight above, and itself
    return list(range(text_len)) + [text_len + c for c in image]

# %% Wrong 7.2: one cell too few (cell - grid is left out, the cell straight above)
def row_layer_keys(text_len, grid, cell):
    image = range(max(0, cell - grid + 1), cell + 1)
    return list(range(text_len)) + [text_len + c for c in image]


# %% Exercise 7.3
def my_decode_step(model, cache, code, cell):
    p = model.layout.text_len + cell                                    # the new position in the sequence
    x = model.image_emb(code) + cache.cell_emb[cell]                    # (B, 1, C)
    for block, kv in zip(model.blocks, cache.layers):                   # kv (2, B, nh, L, hd)
        B, _, C = x.shape
        nh = block.n_head
        hd = C // nh
        q, k, v = block.qkv(block.ln1(x)).view(B, 1, 3, nh, hd).permute(2, 0, 3, 1, 4)   # each (B, nh, 1, hd)
        kv[0, :, :, p], kv[1, :, :, p] = k[:, :, 0], v[:, :, 0]         # write this position into the cache
        keys = KVCache.keys(model, block.kind, p, x.device)             # the positions this layer may read
        seen_k, seen_v = kv[0][:, :, keys], kv[1][:, :, keys]           # (B, nh, |keys|, hd)
        w = torch.softmax(q @ seen_k.transpose(-1, -2) / hd ** 0.5, dim=-1)   # (B, nh, 1, |keys|)
        y = (w @ seen_v).transpose(1, 2).reshape(B, 1, C)               # the heads side by side again
        x = x + block.proj(y)
        x = x + block.mlp(block.ln2(x))
    return model.image_head(model.ln_f(x[:, -1]))                       # (B, K)


# %% Wrong 7.3: every cached position up to p is read, not only the ones the layer's mask allows
def my_decode_step(model, cache, code, cell):
    p = model.layout.text_len + cell
    x = model.image_emb(code) + cache.cell_emb[cell]
    for block, kv in zip(model.blocks, cache.layers):
        B, _, C = x.shape
        nh = block.n_head
        q, k, v = block.qkv(block.ln1(x)).view(B, 1, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
        kv[0, :, :, p], kv[1, :, :, p] = k[:, :, 0], v[:, :, 0]
        seen_k, seen_v = kv[0][:, :, :p + 1], kv[1][:, :, :p + 1]      # the whole prefix: dense causal
        w = torch.softmax(q @ seen_k.transpose(-1, -2) / (C // nh) ** 0.5, dim=-1)
        x = x + block.proj((w @ seen_v).transpose(1, 2).reshape(B, 1, C))
        x = x + block.mlp(block.ln2(x))
    return model.image_head(model.ln_f(x[:, -1]))


# %% Exercise 7.4
def top_k_filter(logits, k):
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]          # (B, 1): the k-th largest of each row
    return logits.masked_fill(logits < kth, float("-inf"))


# %% Wrong 7.4: "< kth" written "<= kth": the k-th largest itself is dropped too
def top_k_filter(logits, k):
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits <= kth, float("-inf"))


# %% Exercise 7.5
def top_p_filter(logits, p):
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    above = probs.cumsum(dim=-1) - probs                        # probability of the codes ranked above each one
    drop = torch.zeros_like(above, dtype=torch.bool).scatter(-1, order, above >= p)   # back to the original order
    return logits.masked_fill(drop, float("-inf"))


# %% Wrong 7.5: the cumulative probability includes the code itself, so the code that crosses p is dropped
def top_p_filter(logits, p):
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop = torch.zeros_like(cum, dtype=torch.bool).scatter(-1, order, cum > p)
    return logits.masked_fill(drop, float("-inf"))
