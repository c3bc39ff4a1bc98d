"""Solutions to the exercises of 06_dalle_transformer.ipynb. Try each one yourself first.

Each block below replaces the exercise cell of the same name; it runs in the notebook's namespace,
after the cells above the exercise (so `torch`, `math`, `fresh`, `layout` and `tok` exist).
"""

# %% Exercise 6.1
def image_position_embedding(model, n):
    G = model.layout.grid
    cells = torch.arange(n)                                            # (n,) raster indices
    return model.row_emb.weight[cells // G] + model.col_emb.weight[cells % G]   # (n, C)


# %% Wrong 6.1: row and column swapped (cell j read as row j % G, column j // G)
def image_position_embedding(model, n):
    G = model.layout.grid
    cells = torch.arange(n)
    return model.row_emb.weight[cells % G] + model.col_emb.weight[cells // G]


# %% Exercise 6.2
def block_forward(block, x, mask):
    B, L, C = x.shape
    nh = block.n_head
    hd = C // nh
    h = block.ln1(x)                                                   # pre-LN: normalise what the attention reads
    q, k, v = block.qkv(h).view(B, L, 3, nh, hd).permute(2, 0, 3, 1, 4)   # each (B, nh, L, hd)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)                   # (B, nh, L, L)
    scores = scores.masked_fill(~mask, float("-inf"))                  # what this layer's mask forbids
    y = torch.softmax(scores, dim=-1) @ v                              # (B, nh, L, hd)
    y = y.transpose(1, 2).reshape(B, L, C)                             # the heads side by side again
    x = x + block.proj(y)                                              # residual around the attention
    return x + block.mlp(block.ln2(x))                                 # residual around the MLP


# %% Wrong 6.2: the scores are not divided by sqrt(head_dim)
def block_forward(block, x, mask):
    B, L, C = x.shape
    nh = block.n_head
    q, k, v = block.qkv(block.ln1(x)).view(B, L, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf"))   # forgot / sqrt(head_dim)
    y = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, L, C)
    x = x + block.proj(y)
    return x + block.mlp(block.ln2(x))


# %% Exercise 6.3
def padded_caption(tok, caption, layout):
    ids = tok.encode(caption)
    return ids + [layout.text_vocab + p for p in range(len(ids), layout.text_len)]


# %% Wrong 6.3: the pads numbered from the first pad (0, 1, ...) instead of by their position
def padded_caption(tok, caption, layout):
    ids = tok.encode(caption)
    return ids + [layout.text_vocab + k for k in range(layout.text_len - len(ids))]


# %% Exercise 6.4
def joint_loss(text_logits, image_logits, text, image):
    def mean_nll(logits, targets):                                     # (B, n, classes), (B, n)
        logp = torch.log_softmax(logits.float(), dim=-1)
        picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)    # (B, n) log p(target)
        return -picked.mean()
    text_targets = text[:, 1:]          # position p predicts p + 1: the first text token is never a target
    image_targets = image               # the last text position predicts code 0, image position j code j + 1
    return 0.125 * mean_nll(text_logits, text_targets) + 0.875 * mean_nll(image_logits, image_targets)


# %% Wrong 6.4: the text targets not shifted (each position "predicts" its own token)
def joint_loss(text_logits, image_logits, text, image):
    def mean_nll(logits, targets):
        return -torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).mean()
    return 0.125 * mean_nll(text_logits, text[:, :-1]) + 0.875 * mean_nll(image_logits, image)


# %% Exercise 6.5
def next_code_probs(logits, temperature):
    z = logits / temperature
    z = z - z.max(dim=-1, keepdim=True).values                         # the largest becomes 0: exp(z) <= 1
    e = torch.exp(z)
    return e / e.sum(dim=-1, keepdim=True)                             # (B, K), each row sums to 1


# %% Wrong 6.5: no maximum taken off first (exp(500) overflows to inf, and inf / inf is NaN)
def next_code_probs(logits, temperature):
    e = torch.exp(logits / temperature)
    return e / e.sum(dim=-1, keepdim=True)
