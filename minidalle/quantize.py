"""The discrete bottleneck of the image tokenizer: the paper's Gumbel-softmax quantizer beside a VQ-VAE.

DALL·E's stage 1 (Ramesh et al. 2021, section 2.1 and Appendix A; numbers in docs/paper.md, Stage 1)
squeezes every image through a grid of discrete codes. This file holds the two ways of doing it,
with one signature so a notebook swaps them in one line:

    z_q, loss, codes, stats = quantizer(z)

- `GumbelQuantizer` (the paper's dVAE): the encoder emits K logits per cell; training feeds the
  decoder a *relaxed* one-hot (Gumbel-softmax at temperature tau), evaluation the exact one-hot of
  the argmax. The quantizer holds no vectors: the decoder's first 1x1 conv over z_q is the codebook.
  Its loss is beta * KL(q || uniform prior).
- `VectorQuantizer` (van den Oord et al. 2017, EMA variant): the encoder emits D-dim vectors; each is
  replaced by its nearest codebook vector, gradients pass straight through, the codebook follows an
  EMA of the vectors assigned to it, and codes unused for `dead_after` steps are restarted.

The loss contract, shared by both: `loss` is **per image** -- summed over the h*w code positions
(and over D for VQ), averaged over the batch. The dVAE adds it to the per-image reconstruction NLL
and divides the total by 3*H*W, the paper's normalisation (so the paper's effective KL weight is
beta / 192 at 256x256). The quantizer itself never divides by pixels.

Both track codebook health (`CodebookHealth`): usage counts, steps since each code was last used,
perplexity of the batch's code frequencies and the number of dead codes. Distances, softmaxes and
the KL are computed in float32 even under bf16 autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DVAEConfig
from .errors import ConfigError

# --- schedules -----------------------------------------------------------------------------------


def cos_anneal(step: int, start_value: float, end_value: float, steps: int) -> float:
    """Half a cosine from `start_value` (step 0) to `end_value` (step `steps`), then flat.

    Example: cos_anneal(0, 1.0, 0.0, 10) -> 1.0; cos_anneal(5, 1.0, 0.0, 10) -> 0.5; cos_anneal(99, 1.0, 0.0, 10) -> 0.0
    """
    if steps <= 0 or step >= steps:
        return float(end_value)
    t = max(step, 0) / steps  # fraction of the schedule done, in [0, 1)
    return float(end_value + (start_value - end_value) * 0.5 * (1.0 + math.cos(math.pi * t)))


def _scaled(steps: int, scale: float) -> int:
    """Schedule length after `schedule_scale`. Example: (150_000, 0.01) -> 1500"""
    return int(round(steps * scale))


# "The relaxation temperature τ is annealed from 1 to 1/16 over the first 150,000 updates. Using a
#  linear annealing schedule for this typically led to divergence."  (Ramesh et al. 2021, App. A.2)
def temperature_at(step: int, cfg: DVAEConfig) -> float:
    """Gumbel-softmax temperature tau at `step`: cosine tau_start -> tau_end over tau_steps * schedule_scale.

    Example: temperature_at(0, DVAEConfig()) -> 1.0; temperature_at(10**6, DVAEConfig()) -> 0.0625
    """
    return cos_anneal(step, cfg.tau_start, cfg.tau_end, _scaled(cfg.tau_steps, cfg.schedule_scale))


# "The KL weight β is increased from 0 to 6.6 over the first 5000 updates."  (Ramesh et al. 2021,
#  App. A.2; footnote 4 of section 2.1: a larger β gives better codebook usage)
def kl_weight_at(step: int, cfg: DVAEConfig) -> float:
    """KL weight beta at `step`: cosine 0 -> kl_max over kl_steps * schedule_scale, then fixed.

    Example: kl_weight_at(0, DVAEConfig()) -> 0.0; kl_weight_at(2500, DVAEConfig()) -> 3.3
    """
    return cos_anneal(step, 0.0, cfg.kl_max, _scaled(cfg.kl_steps, cfg.schedule_scale))


# --- codebook health -----------------------------------------------------------------------------


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code frequencies in `counts` (K,): the number of codes "effectively" used.

    Example: [5, 5, 5, 5] -> 4.0; [7, 0, 0, 0] -> 1.0; [0, 0] -> 1.0 (nothing used)
    """
    p = counts.float() / counts.sum().clamp_min(1)  # (K,) frequencies
    return torch.exp(-torch.special.xlogy(p, p).sum())  # xlogy makes 0 * log 0 = 0


class CodebookHealth(nn.Module):
    """Usage bookkeeping shared by both quantizers, kept in buffers so it travels with state_dict.

    Buffers: `usage` (K,) assignments per code summed over all training steps; `steps_unused` (K,)
    training steps since each code was last chosen; `steps` () training steps observed. A code is
    *dead* once it has gone `dead_after` training steps unchosen (dead_after <= 0: never).
    Only training-mode calls update the buffers; evaluation batches are measured but not recorded.
    """

    def __init__(self, vocab_size: int, dead_after: int = 200):
        super().__init__()
        self.vocab_size = vocab_size
        self.dead_after = dead_after
        self.register_buffer("usage", torch.zeros(vocab_size, dtype=torch.long))
        self.register_buffer("steps_unused", torch.zeros(vocab_size, dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def observe(self, codes: torch.Tensor, record: bool) -> torch.Tensor:
        """Count each code in `codes` (any shape) and, if `record`, add them to the running buffers.

        Example: codes [[0, 2, 2]] with K=4 -> tensor([1, 0, 2, 0])
        """
        counts = torch.bincount(codes.reshape(-1), minlength=self.vocab_size)  # (K,)
        if record:
            self.usage += counts
            self.steps_unused.copy_(torch.where(counts > 0, 0, self.steps_unused + 1))
            self.steps += 1
        return counts

    def dead_mask(self) -> torch.Tensor:
        """(K,) bool: codes unused for at least `dead_after` training steps."""
        if self.dead_after <= 0:
            return torch.zeros_like(self.steps_unused, dtype=torch.bool)
        return self.steps_unused >= self.dead_after

    def dead(self) -> torch.Tensor:
        """Number of dead codes, a 0-dim long tensor. Example: fresh module -> tensor(0)"""
        return self.dead_mask().sum()

    def usage_histogram(self, sort: bool = False) -> torch.Tensor:
        """(K,) float CPU tensor: fraction of all recorded assignments that went to each code.

        With `sort=True` the fractions are sorted high to low (the usual "long tail" plot).
        Example: after codes [0, 0, 1] with K=3 -> tensor([0.667, 0.333, 0.0])
        """
        h = self.usage.detach().float().cpu()
        h = h / h.sum().clamp_min(1)
        return h.sort(descending=True).values if sort else h


def _stats(counts: torch.Tensor, dead: torch.Tensor, **extra) -> dict:
    """The stats dict both quantizers return: the same keys, None where a key does not apply."""
    out = {"kl": None, "commitment": None, "temperature": None, "kl_weight": None}
    out.update(extra)
    out.update({"perplexity": perplexity(counts), "usage": counts.detach(), "dead": dead})
    return out


def scalar_stats(stats: dict) -> dict:
    """The scalar entries of a quantizer's stats, for a metrics line: 0-d tensors stay tensors (detached),
    so the Trainer reads them with the loss in one host sync; Python numbers stay numbers.

    Drops None values and the (K,) "usage" tensor. Example: {"kl": tensor(2.), "usage": ...} -> {"kl": tensor(2.)}
    """
    out = {}
    for k, v in stats.items():
        if v is None or (torch.is_tensor(v) and v.numel() != 1):
            continue
        out[k] = v.detach().reshape(()) if torch.is_tensor(v) else float(v)
    return out


# --- the paper's quantizer: Gumbel-softmax relaxation --------------------------------------------


class GumbelQuantizer(nn.Module):
    """The dVAE bottleneck: logits (B, K, h, w) -> relaxed one-hot z_q (B, K, h, w).

    `temperature` and `kl_weight` are plain floats that the training loop sets each step from
    `temperature_at` / `kl_weight_at` (or with `set_step`). Holds no codebook vectors: the decoder's
    first 1x1 conv over z_q plays that role, so in_channels == out_channels == K.
    Example: GumbelQuantizer(512)(torch.randn(2, 512, 8, 8))[0].shape -> (2, 512, 8, 8)
    """

    def __init__(self, vocab_size: int, dead_after: int = 200, temperature: float = 1.0,
                 kl_weight: float = 0.0):
        super().__init__()
        self.vocab_size = self.in_channels = self.out_channels = vocab_size
        self.temperature = temperature
        self.kl_weight = kl_weight
        self.health = CodebookHealth(vocab_size, dead_after)

    @classmethod
    def from_config(cls, cfg: DVAEConfig) -> "GumbelQuantizer":
        q = cls(cfg.vocab_size, dead_after=cfg.dead_after)
        q.set_step(0, cfg)
        return q

    def set_step(self, step: int, cfg: DVAEConfig) -> None:
        """Set tau and beta from the paper's schedules at training step `step`."""
        self.temperature = temperature_at(step, cfg)
        self.kl_weight = kl_weight_at(step, cfg)

    def forward(self, logits: torch.Tensor):
        B, K, h, w = logits.shape
        if K != self.vocab_size:
            raise ValueError(f"GumbelQuantizer expects (B, {self.vocab_size}, h, w) logits, got {tuple(logits.shape)}")
        if self.temperature <= 0:
            raise ValueError(f"Gumbel temperature must be > 0, got {self.temperature}")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits32 = logits.float()  # (B, K, h, w); tau = 1/16 multiplies logits by 16: keep fp32
            codes = logits32.argmax(dim=1)  # (B, h, w): the paper encodes for stage 2 with the argmax
            if self.training:
                # Gumbel-softmax: add Gumbel(0, 1) noise g = -log(E), E = -log(U) ~ Exp(1), and soften
                # the argmax with a softmax at temperature tau. The paper keeps this relaxed sample in
                # both passes (no straight-through hard one-hot), so the decoder learns on soft
                # mixtures of codes. (Drawn from uniforms: Tensor.exponential_ is ~5x slower on CPU.)
                e = -torch.rand_like(logits32).clamp_min(1e-30).log()  # (B, K, h, w), Exp(1)
                g = -e.clamp_min(1e-30).log()  # (B, K, h, w), Gumbel(0, 1)
                z_q = F.softmax((logits32 + g) / self.temperature, dim=1)  # (B, K, h, w), sums to 1 over K
            else:
                z_q = self.embed_codes(codes)  # (B, K, h, w), exact one-hot, no noise
            # KL(q || uniform) = sum_k q_k (log q_k - log(1/K)), with q = softmax(logits): the
            # categorical the encoder predicts, not the noisy sample.
            log_q = F.log_softmax(logits32, dim=1)  # (B, K, h, w)
            kl = (log_q.exp() * (log_q + math.log(K))).sum(dim=1)  # (B, h, w), >= 0
            kl = kl.sum(dim=(1, 2)).mean()  # () per image: summed over positions, mean over batch
            loss = self.kl_weight * kl
        counts = self.health.observe(codes, record=self.training)
        stats = _stats(counts, self.health.dead(), kl=kl.detach(),
                       temperature=float(self.temperature), kl_weight=float(self.kl_weight))
        return z_q.to(logits.dtype), loss, codes, stats

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> the decoder's input (B, K, h, w): the exact one-hot (as in eval)."""
        return F.one_hot(codes.long(), self.vocab_size).permute(0, 3, 1, 2).float()


# --- the comparison: VQ-VAE with an EMA codebook -------------------------------------------------


def nearest_code_naive(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The nearest codebook row to each vector of z, by Python loops: slow, obvious, for teaching.

    z (B, D, h, w), codebook (K, D) -> codes (B, h, w) long; ties go to the lower index.
    Example: z = [[[[0.9]]]], codebook = [[0.], [1.]] -> [[[1]]]
    """
    B, D, h, w = z.shape
    zs, cb = z.detach().double().cpu().tolist(), codebook.detach().double().cpu().tolist()
    codes = torch.zeros(B, h, w, dtype=torch.long)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                best, best_d = 0, float("inf")
                for k, e in enumerate(cb):
                    d = sum((zs[b][c][i][j] - e[c]) ** 2 for c in range(D))
                    if d < best_d:
                        best, best_d = k, d
                codes[b, i, j] = best
    return codes.to(z.device)


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Vectorised `nearest_code_naive`: z (B, D, h, w), codebook (K, D) -> codes (B, h, w) long.

    Uses ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, so the work is one (N, D) x (D, K) matmul, in fp32.
    Example: z = [[[[0.9]]]], codebook = [[0.], [1.]] -> [[[1]]]
    """
    B, D, h, w = z.shape
    with torch.autocast(device_type=z.device.type, enabled=False):
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, D)  # (N, D), N = B*h*w
        cb = codebook.float()  # (K, D)
        d = (flat.pow(2).sum(1, keepdim=True)  # (N, 1)
             - 2 * flat @ cb.t()  # (N, K)
             + cb.pow(2).sum(1)[None, :])  # (1, K) -> (N, K) squared distances
    return d.argmin(dim=1).view(B, h, w)  # (B, h, w)


class VectorQuantizer(nn.Module):
    """VQ-VAE bottleneck: z (B, D, h, w) -> nearest codebook vectors z_q (B, D, h, w).

    Codebook update (no gradient to the codebook; van den Oord et al. 2017, App. A.1): per training
    step, with n_k vectors assigned to code k summing to s_k,
        N_k <- decay * N_k + (1 - decay) * n_k      m_k <- decay * m_k + (1 - decay) * s_k
        e_k  = m_k / N~_k,   N~_k = (N_k + eps) / (sum N + K eps) * sum N   (Laplace smoothing)
    The smoothing keeps a code with N_k -> 0 from dividing by zero. N starts at 1 and m at e, i.e.
    one pseudo-observation at the initial vector, so the first update is a plain weighted mean.

    Dead-code restart: a code not chosen for `dead_after` training steps is re-initialised to a
    random encoder output of the current batch (with N_k = 1, m_k = that vector), so it lands where
    the data is. The first training batch initialises every code the same way (no k-means needed).
    Example: VectorQuantizer(512, 64)(torch.randn(2, 64, 8, 8))[0].shape -> (2, 64, 8, 8)
    """

    def __init__(self, vocab_size: int, code_dim: int, commitment: float = 0.25, ema_decay: float = 0.99,
                 dead_after: int = 200, eps: float = 1e-5):
        super().__init__()
        self.vocab_size, self.code_dim = vocab_size, code_dim
        self.in_channels = self.out_channels = code_dim
        self.commitment, self.ema_decay, self.eps = commitment, ema_decay, eps
        codebook = torch.randn(vocab_size, code_dim)  # (K, D), replaced by data on the first training step
        self.register_buffer("codebook", codebook)
        self.register_buffer("ema_cluster_size", torch.ones(vocab_size))  # (K,) N_k
        self.register_buffer("ema_embed_sum", codebook.clone())  # (K, D) m_k
        self.register_buffer("initialised", torch.zeros((), dtype=torch.long))  # 1 after data init
        self.health = CodebookHealth(vocab_size, dead_after)

    @classmethod
    def from_config(cls, cfg: DVAEConfig) -> "VectorQuantizer":
        return cls(cfg.vocab_size, cfg.code_dim, commitment=cfg.commitment, ema_decay=cfg.ema_decay,
                   dead_after=cfg.dead_after)

    def set_step(self, step: int, cfg: DVAEConfig) -> None:
        """No schedules for VQ; present so the training loop treats both quantizers alike."""

    def forward(self, z: torch.Tensor):
        B, D, h, w = z.shape
        if D != self.code_dim:
            raise ValueError(f"VectorQuantizer expects (B, {self.code_dim}, h, w) inputs, got {tuple(z.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            z32 = z.float()  # (B, D, h, w)
            flat = z32.detach().permute(0, 2, 3, 1).reshape(-1, D)  # (N, D) for the codebook updates
            if self.training and not bool(self.initialised):
                self._restart(flat, torch.ones(self.vocab_size, dtype=torch.bool, device=z.device))
                self.initialised.fill_(1)
            codes = nearest_code(z32, self.codebook)  # (B, h, w)
            z_q = self.embed_codes(codes)  # (B, D, h, w), no grad
            # commitment: pull the encoder towards its chosen code (the code itself moves by EMA)
            commit = (z32 - z_q).pow(2).sum(dim=(1, 2, 3)).mean()  # () per image
            loss = self.commitment * commit
            # straight-through: the forward pass sees z_q, the backward pass copies dL/dz_q to z
            z_q = z32 + (z_q - z32).detach()  # (B, D, h, w)
        counts = self.health.observe(codes, record=self.training)
        dead = self.health.dead()  # before the restart below, so the log shows what was revived
        if self.training:
            self._ema_update(flat, codes.reshape(-1), counts)
            self._restart(flat, self.health.dead_mask())
        stats = _stats(counts, dead, commitment=commit.detach())
        return z_q.to(z.dtype), loss, codes, stats

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        decay, K = self.ema_decay, self.vocab_size
        sums = torch.zeros(K, self.code_dim, device=flat.device).index_add_(0, codes, flat)  # (K, D) s_k
        size = self.ema_cluster_size.float() * decay + counts.float() * (1 - decay)  # (K,)
        embed_sum = self.ema_embed_sum.float() * decay + sums * (1 - decay)  # (K, D)
        n = size.sum()
        smoothed = (size + self.eps) / (n + K * self.eps) * n  # (K,) Laplace-smoothed N_k
        self.ema_cluster_size.copy_(size)
        self.ema_embed_sum.copy_(embed_sum)
        self.codebook.copy_(embed_sum / smoothed[:, None])

    @torch.no_grad()
    def _restart(self, flat: torch.Tensor, mask: torch.Tensor) -> None:
        """Move the codes in `mask` (K,) onto random rows of `flat` (N, D) and reset their EMA state."""
        idx = mask.nonzero().squeeze(1)  # (n,) codes to restart
        n, N = idx.numel(), flat.shape[0]
        if n == 0:
            return
        # distinct encoder outputs when the batch has enough, else sample with replacement
        pick = torch.randperm(N, device=flat.device)[:n] if N >= n else torch.randint(N, (n,), device=flat.device)
        new = flat[pick]  # (n, D)
        self.codebook[idx] = new.to(self.codebook.dtype)
        self.ema_embed_sum[idx] = new.to(self.ema_embed_sum.dtype)
        self.ema_cluster_size[idx] = 1.0
        self.health.steps_unused[idx] = 0

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> the decoder's input (B, D, h, w): the codebook vectors."""
        return F.embedding(codes.long(), self.codebook.float()).permute(0, 3, 1, 2)


def make_quantizer(cfg: DVAEConfig) -> GumbelQuantizer | VectorQuantizer:
    """The quantizer `cfg.quantizer` names. Example: make_quantizer(DVAEConfig(quantizer="vq")) -> VectorQuantizer"""
    if cfg.quantizer == "gumbel":
        return GumbelQuantizer.from_config(cfg)
    if cfg.quantizer == "vq":
        return VectorQuantizer.from_config(cfg)
    raise ConfigError(f"unknown dvae.quantizer {cfg.quantizer!r}; choose gumbel or vq")
