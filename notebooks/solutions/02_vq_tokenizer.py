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


# %% Wrong 2.1: flattens without moving D last
def nearest_code_matmul(z, codebook):
    B, D, h, w = z.shape
    flat = z.reshape(-1, D)  # mistake: no permute, so each row mixes channels of different cells
    d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)
    return d.argmin(dim=1).view(B, h, w)


# %% Exercise 2.2
def kl_via_entropy(logits):
    K = logits.shape[1]
    log_q = F.log_softmax(logits, dim=1)                                             # (B, K, h, w)
    entropy = -(log_q.exp() * log_q).sum(dim=1)                                      # (B, h, w)
    return (math.log(K) - entropy).sum(dim=(1, 2)).mean()


# %% Wrong 2.2: averages over the cells instead of summing
def kl_via_entropy(logits):
    K = logits.shape[1]
    log_q = F.log_softmax(logits, dim=1)
    entropy = -(log_q.exp() * log_q).sum(dim=1)
    return (math.log(K) - entropy).mean(dim=(1, 2)).mean()  # mistake: mean over the h*w cells, not the sum


# %% Exercise 2.3
def code_perplexity(codes, K):
    counts = torch.bincount(codes.flatten(), minlength=K).double()
    p = counts[counts > 0] / counts.sum()
    return torch.exp(-(p * p.log()).sum())


# %% Wrong 2.3: returns the entropy, forgetting the exp
def code_perplexity(codes, K):
    counts = torch.bincount(codes.flatten(), minlength=K).double()
    p = counts[counts > 0] / counts.sum()
    return -(p * p.log()).sum()  # mistake: the entropy in nats, not exp(entropy)


# %% Exercise 2.4
def black_nll(mu, log_b):
    eps = losses.LOGIT_LAPLACE_EPS
    t0 = math.log((eps + (1 - 2 * eps) * 0.5 / 255) / (1 - eps - (1 - 2 * eps) * 0.5 / 255))  # logit of the edge
    b = log_b.exp()
    cdf = torch.where(t0 < mu, 0.5 * torch.exp((t0 - mu) / b), 1 - 0.5 * torch.exp(-(t0 - mu) / b))
    return -torch.log(cdf)


# %% Wrong 2.4: the bin edge without the eps squeeze
def black_nll(mu, log_b):
    t0 = math.log((0.5 / 255) / (1 - 0.5 / 255))  # mistake: logit(0.5 / 255), forgetting map_pixels' eps
    b = log_b.exp()
    cdf = torch.where(t0 < mu, 0.5 * torch.exp((t0 - mu) / b), 1 - 0.5 * torch.exp(-(t0 - mu) / b))
    return -torch.log(cdf)
