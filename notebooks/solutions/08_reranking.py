"""Solutions to the exercises of 08_reranking.ipynb. Try each one yourself first.

Each block below replaces the exercise cell of the same name; it runs in the notebook's namespace,
after the cells above the exercise (so `torch`, `F`, `np` and `MAX_LOGIT_SCALE` exist). After each
solution, a block `Wrong N.M` holds a plausible mistake, which the exercise's check must reject (the
notebook tests run both).
"""

# %% Exercise 8.1
def contrastive_loss(image_features, text_features, log_scale):
    img = F.normalize(image_features, dim=-1)                          # (Ni, E) unit vectors
    txt = F.normalize(text_features, dim=-1)                           # (P, E)
    scale = log_scale.exp().clamp(max=MAX_LOGIT_SCALE)                 # positive, and never sharper than the cap
    logits = scale * img @ txt.T                                       # (Ni, P): every image against every caption
    P = len(txt)
    target = torch.arange(P)
    i2t = F.cross_entropy(logits[:P], target)                          # each paired image picks its caption
    t2i = F.cross_entropy(logits.T, target)                            # each caption picks its image among all Ni
    with torch.no_grad():
        acc = ((logits[:P].argmax(1) == target).float().mean()         # paired images whose caption wins their row
               + (logits.argmax(0) == target).float().mean()) / 2      # captions whose image wins among all Ni
    parts = {"i2t": i2t.item(), "t2i": t2i.item(), "acc": acc.item(), "scale": scale.item()}
    return (i2t + t2i) / 2, parts


# %% Wrong 8.1: the logit scale not capped: exp(log_scale) is used as it is, past MAX_LOGIT_SCALE too
def contrastive_loss(image_features, text_features, log_scale):
    img = F.normalize(image_features, dim=-1)
    txt = F.normalize(text_features, dim=-1)
    scale = log_scale.exp()
    logits = scale * img @ txt.T
    P = len(txt)
    target = torch.arange(P)
    i2t = F.cross_entropy(logits[:P], target)
    t2i = F.cross_entropy(logits.T, target)
    with torch.no_grad():
        acc = ((logits[:P].argmax(1) == target).float().mean() + (logits.argmax(0) == target).float().mean()) / 2
    parts = {"i2t": i2t.item(), "t2i": t2i.item(), "acc": acc.item(), "scale": scale.item()}
    return (i2t + t2i) / 2, parts


# %% Exercise 8.2
def recall_from_similarities(sims, k):
    own = sims.diagonal()                                              # (n,) each pair's own similarity
    beaten_i2t = (sims > own[:, None]).sum(1)                          # captions above each image's own caption
    beaten_t2i = (sims > own[None, :]).sum(0)                          # images above each caption's own image
    return float((beaten_i2t < k).float().mean()), float((beaten_t2i < k).float().mean())


# %% Wrong 8.2: a tie counts against the pair (>=, the pair itself taken off), not in its favour
def recall_from_similarities(sims, k):
    own = sims.diagonal()
    beaten_i2t = (sims >= own[:, None]).sum(1) - 1
    beaten_t2i = (sims >= own[None, :]).sum(0) - 1
    return float((beaten_i2t < k).float().mean()), float((beaten_t2i < k).float().mean())


# %% Exercise 8.3
def cosine_scores(image_features, text_features):
    return (F.normalize(image_features, dim=-1) * F.normalize(text_features, dim=-1)).sum(-1)   # (n,)


# %% Wrong 8.3: the raw dot product, the features never scaled to unit length
def cosine_scores(image_features, text_features):
    return (image_features * text_features).sum(-1)


# %% Exercise 8.4
def best_in_groups(scores, size):
    P, n = scores.shape
    groups = n // size
    within = scores[:, :groups * size].reshape(P, groups, size).argmax(axis=2)   # (P, groups): index inside each group
    return within + size * np.arange(groups)[None, :]                            # back to indices into the row


# %% Wrong 8.4: the index inside each group, not into the row of n
def best_in_groups(scores, size):
    P, n = scores.shape
    groups = n // size
    return scores[:, :groups * size].reshape(P, groups, size).argmax(axis=2)
