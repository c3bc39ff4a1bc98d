"""Solutions to the exercises of 08_reranking.ipynb. Try each one yourself first.

Each block below replaces the exercise cell of the same name; it runs in the notebook's namespace,
after the cells above the exercise (so `torch`, `F` and `np` exist).
"""

# %% Exercise 8.1
def contrastive_loss(img, txt, scale):
    logits = scale * img @ txt.T                                       # (Ni, P): every image against every caption
    P = len(txt)
    target = torch.arange(P)
    i2t = F.cross_entropy(logits[:P], target)                          # each paired image picks its caption
    t2i = F.cross_entropy(logits.T, target)                            # each caption picks its image among all Ni
    return (i2t + t2i) / 2


# %% Exercise 8.2
def recall_from_similarities(sims, k):
    own = sims.diagonal()                                              # (n,) each pair's own similarity
    beaten_i2t = (sims > own[:, None]).sum(1)                          # captions above each image's own caption
    beaten_t2i = (sims > own[None, :]).sum(0)                          # images above each caption's own image
    return float((beaten_i2t < k).float().mean()), float((beaten_t2i < k).float().mean())


# %% Exercise 8.3
def cosine_scores(image_features, text_features):
    return (F.normalize(image_features, dim=-1) * F.normalize(text_features, dim=-1)).sum(-1)   # (n,)


# %% Exercise 8.4
def best_in_groups(scores, size):
    P, n = scores.shape
    groups = n // size
    within = scores[:, :groups * size].reshape(P, groups, size).argmax(axis=2)   # (P, groups): index inside each group
    return within + size * np.arange(groups)[None, :]                            # back to indices into the row
