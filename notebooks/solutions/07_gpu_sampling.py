"""Solutions to the exercises of 07_gpu_sampling.ipynb. Try each one yourself first.

Each block below replaces the exercise cell of the same name; it runs in the notebook's namespace,
after the cells above the exercise (so `torch` exists).
"""

# %% Exercise 7.1
def kv_cache_bytes(model_cfg, layout, rows, bytes_per_number):
    per_layer = 2 * model_cfg.n_head * model_cfg.head_dim * layout.length   # a key and a value per head and position
    return rows * model_cfg.n_layer * per_layer * bytes_per_number


# %% Exercise 7.2
def row_layer_keys(text_len, grid, cell):
    image = range(max(0, cell - grid), cell + 1)                # back to the cell straight above, and itself
    return list(range(text_len)) + [text_len + c for c in image]


# %% Exercise 7.3
def top_k_filter(logits, k):
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]          # (B, 1): the k-th largest of each row
    return logits.masked_fill(logits < kth, float("-inf"))


# %% Exercise 7.4
def top_p_filter(logits, p):
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    above = probs.cumsum(dim=-1) - probs                        # probability of the codes ranked above each one
    drop = torch.zeros_like(above, dtype=torch.bool).scatter(-1, order, above >= p)   # back to the original order
    return logits.masked_fill(drop, float("-inf"))
