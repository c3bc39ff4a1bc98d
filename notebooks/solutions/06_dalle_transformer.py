"""Solutions to the exercises of 06_dalle_transformer.ipynb. Try each one yourself first.

Each block below replaces the exercise cell of the same name; it runs in the notebook's namespace,
after the cells above the exercise (so `torch`, `fresh`, `layout` and `tok` exist).
"""

# %% Exercise 6.1
def image_position_embedding(model, n):
    G = model.layout.grid
    cells = torch.arange(n)                                            # (n,) raster indices
    return model.row_emb.weight[cells // G] + model.col_emb.weight[cells % G]   # (n, C)


# %% Exercise 6.2
def padded_caption(tok, caption, layout):
    ids = tok.encode(caption)
    return ids + [layout.text_vocab + p for p in range(len(ids), layout.text_len)]


# %% Exercise 6.3
def weighted_loss_by_hand(text_logits, text_targets, image_logits, image_targets):
    def mean_nll(logits, targets):                                     # (B, n, classes), (B, n)
        logp = torch.log_softmax(logits.float(), dim=-1)
        picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)    # (B, n) log p(target)
        return -picked.mean()
    return 0.125 * mean_nll(text_logits, text_targets) + 0.875 * mean_nll(image_logits, image_targets)


# %% Exercise 6.4
def next_code_probs(logits, temperature):
    z = logits / temperature
    z = z - z.max(dim=-1, keepdim=True).values                         # the largest becomes 0: exp(z) <= 1
    e = torch.exp(z)
    return e / e.sum(dim=-1, keepdim=True)                             # (B, K), each row sums to 1
