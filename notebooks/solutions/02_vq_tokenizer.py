"""Solutions to the exercises of 02_vq_tokenizer.ipynb. Try each one yourself first.

Each block below replaces the exercise cell of the same name; it runs in the notebook's namespace,
after the cells above the exercise (so `math`, `torch`, `F` and `losses` exist).
"""

# %% Exercise 2.1
def nearest_code_matmul(z, codebook):
    B, D, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, D)                                     # (N, D)
    d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)  # (N, K)
    return d.argmin(dim=1).view(B, h, w)


# %% Exercise 2.2
def kl_via_entropy(logits):
    K = logits.shape[1]
    log_q = F.log_softmax(logits, dim=1)                                             # (B, K, h, w)
    entropy = -(log_q.exp() * log_q).sum(dim=1)                                      # (B, h, w)
    return (math.log(K) - entropy).sum(dim=(1, 2)).mean()


# %% Exercise 2.3
def code_perplexity(codes, K):
    counts = torch.bincount(codes.flatten(), minlength=K).double()
    p = counts[counts > 0] / counts.sum()
    return torch.exp(-(p * p.log()).sum())


# %% Exercise 2.4
def black_nll(mu, log_b):
    eps = losses.LOGIT_LAPLACE_EPS
    t0 = math.log((eps + (1 - 2 * eps) * 0.5 / 255) / (1 - eps - (1 - 2 * eps) * 0.5 / 255))  # logit of the edge
    b = log_b.exp()
    cdf = torch.where(t0 < mu, 0.5 * torch.exp((t0 - mu) / b), 1 - 0.5 * torch.exp(-(t0 - mu) / b))
    return -torch.log(cdf)
