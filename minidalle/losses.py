"""Reconstruction losses for the image tokenizer: the paper's logit-Laplace likelihood, and MSE.

DALL·E's dVAE (Ramesh et al. 2021, Section 2.1 and Appendix A.3, "The Logit-Laplace
Distribution") models each pixel with a density on the open interval (0, 1), because pixels are
bounded and the usual L1/L2 losses (Laplace/Gaussian likelihoods) put mass outside [0, 1]:

    f(x | mu, b) = 1 / (2 b x (1 - x)) * exp(-|logit(x) - mu| / b)        for x in (0, 1)

i.e. logit(x) is Laplace(mu, b) and 1 / (x (1 - x)) is the Jacobian of the logit. The decoder
emits 6 channels per pixel: mu for R, G, B, then ln b for R, G, B. Pixels are first squeezed into
[eps, 1 - eps] with eps = 0.1 (`map_pixels`), so that logit(x) stays finite; a reconstruction is
viewed as unmap(sigmoid(mu)) (`logit_laplace_mean`). The released openai/DALL-E code uses the
same eps and the same 6-channel layout.

Shapes: images are float (B, 3, H, W); the decoder output is (B, 6, H, W).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import DataError

LOGIT_LAPLACE_EPS = 0.1  # paper, Appendix A.3: x -> (1 - 2 eps) x + eps with eps = 0.1
LOG_B_MIN, LOG_B_MAX = -10.0, 10.0  # clamp range for ln b; see `logit_laplace_nll`
_TOL = 1e-3  # how far outside [0, 1] a pixel may stray (resize overshoot, float error) before we refuse
_REDUCTIONS = ("none", "mean", "sum")


def _check_eps(eps: float) -> None:
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must lie in (0, 0.5) so that [eps, 1 - eps] is a proper interval; got {eps!r}")


def check_unit_pixels(x: torch.Tensor, name: str = "x") -> None:
    """Refuse anything but float pixels in [0, 1] (with a small tolerance), with a message that says the fix.

    It reads min/max back from the device (a GPU sync), so a training step should pay it once, at the
    input: the dVAE checks its batch here and then calls `map_pixels`/`logit_laplace_nll` with check=False."""
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{name} must be a torch tensor of float pixels in [0, 1]; got {type(x).__name__}")
    if not x.is_floating_point():
        raise DataError(f"{name} has dtype {x.dtype}; expected float pixels in [0, 1]. For uint8 images use "
                        f"minidalle.losses.to_unit(images) (or images.float() / 255)")
    if x.numel() == 0:
        return
    if not torch.isfinite(x).all():
        raise DataError(f"{name} contains NaN or inf; expected float pixels in [0, 1]")
    lo, hi = x.min().item(), x.max().item()
    if lo < -_TOL or hi > 1 + _TOL:
        hint = " It looks like 0..255 floats: divide by 255." if hi > 1 + _TOL and lo >= -_TOL else ""
        if lo < -_TOL and lo >= -1 - _TOL and hi <= 1 + _TOL:
            hint = " It looks like [-1, 1] normalised pixels: use (x + 1) / 2."
        raise DataError(f"{name} has values in [{lo:.4g}, {hi:.4g}]; expected pixels in [0, 1].{hint}")


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as datasets yield them, channels last -> float pixels in [0, 1], channels first.

    Accepts a batch (B, H, W, 3) or one image (H, W, 3), as a torch tensor or numpy array.
    Example: torch.full((2, 32, 32, 3), 255, dtype=torch.uint8) -> torch.ones(2, 3, 32, 32)
    """
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8:
        raise DataError(f"to_unit expects uint8 images (H, W, 3) or (B, H, W, 3); got dtype {images.dtype}. "
                        f"Float pixels in [0, 1] need no conversion")
    if images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise DataError(f"to_unit expects uint8 images (H, W, 3) or (B, H, W, 3); got shape {tuple(images.shape)}")
    return images.movedim(-1, -3).float() / 255.0  # (..., H, W, 3) -> (..., 3, H, W)


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS, check: bool = True) -> torch.Tensor:
    """Float pixels in [0, 1] -> (1 - 2 eps) x + eps, which lies in [eps, 1 - eps].

    The logit-Laplace density lives on the open interval (0, 1); black (0) and white (1) pixels
    would sit at logit = -inf / +inf, so the paper squeezes them in by eps first.
    Example: torch.tensor([0.0, 0.5, 1.0]) -> tensor([0.1000, 0.5000, 0.9000])
    """
    _check_eps(eps)
    if check:
        check_unit_pixels(x)
    return (1 - 2 * eps) * x.clamp(0.0, 1.0) + eps  # same shape as x, in [eps, 1 - eps]


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Inverse of `map_pixels`: (x - eps) / (1 - 2 eps), clamped to [0, 1] for viewing.

    No range check: this takes model outputs, which may land anywhere in (0, 1).
    Example: torch.tensor([0.1, 0.5, 0.9, 0.99]) -> tensor([0.0000, 0.5000, 1.0000, 1.0000])
    """
    _check_eps(eps)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise DataError(f"unmap_pixels expects a float tensor; got {getattr(x, 'dtype', type(x).__name__)}")
    return ((x - eps) / (1 - 2 * eps)).clamp(0.0, 1.0)


def split_decoder_output(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's 6 channels -> (mu, log_b): the first 3 are mu (RGB), the last 3 are ln b (RGB).

    Example: tensor of shape (B, 6, H, W) -> (mu (B, 3, H, W), log_b (B, 3, H, W))
    """
    if out.ndim < 3 or out.shape[-3] != 6:
        raise DataError(f"expected decoder output (B, 6, H, W) (mu RGB then ln b RGB); got shape {tuple(out.shape)}")
    mu, log_b = out.chunk(2, dim=-3)  # (B, 3, H, W) each
    return mu, log_b


def logit_laplace_nll(x: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor,
                      reduction: str = "mean", check: bool = True) -> torch.Tensor:
    """Negative log-likelihood of mapped pixels x under the logit-Laplace density, per element:

        nll = log(2 b) + log(x) + log(1 - x) + |logit(x) - mu| / b

    x: mapped pixels (B, 3, H, W) strictly inside (0, 1) (use `map_pixels`); mu, log_b: the same
    shape, from `split_decoder_output`. reduction "mean" averages over every element, which is the
    paper's normalisation (divide by 256·256·3) averaged over the batch; "sum" adds; "none" returns
    the per-element map.

    ln b is clamped to [LOG_B_MIN, LOG_B_MAX] = [-10, 10]. Why: pixels are 8-bit, so a continuous
    density can grow without bound by putting ever-narrower spikes on the exact values seen, and
    the decoder learns to do this: ln b runs off to -inf, |logit(x) - mu| / b overflows (first in
    half precision) and the loss goes to NaN. b = e^-10 ≈ 4.5e-5 in logit units is far below one
    8-bit step (>= 0.013 in logit units after the map), so the clamp costs no real fit; beyond it the
    gradient of ln b is zero, which is what stops the runaway. e^10 is an effectively flat density.
    Example: x = map_pixels(torch.full((1, 3, 2, 2), 0.5)), mu = 0, log_b = 0 -> tensor(-0.6931)
             (log 2 + 2 log 0.5 + 0 = -log 2)
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")
    if not (x.shape == mu.shape == log_b.shape):
        raise DataError(f"x, mu and log_b must have one shape (B, 3, H, W); got {tuple(x.shape)}, "
                        f"{tuple(mu.shape)}, {tuple(log_b.shape)}")
    if not x.is_floating_point():
        raise DataError(f"x has dtype {x.dtype}; expected mapped float pixels: map_pixels(to_unit(images))")
    if check and x.numel() and not ((x > 0) & (x < 1)).all():  # a GPU sync: callers that built x with
        # map_pixels themselves (the dVAE) pass check=False
        raise DataError("x must lie strictly inside (0, 1): pass map_pixels(x), not raw [0, 1] pixels "
                        "(logit(0) and logit(1) are infinite)")
    log_b = log_b.clamp(LOG_B_MIN, LOG_B_MAX)                 # (B, 3, H, W)
    log_x, log_1mx = torch.log(x), torch.log1p(-x)            # (B, 3, H, W); log1p keeps precision near x = 0
    logit_x = log_x - log_1mx                                 # (B, 3, H, W)
    # exp(-log_b) rather than dividing by exp(log_b): one exp, and no 0 in a denominator.
    nll = math.log(2.0) + log_b + log_x + log_1mx + (logit_x - mu).abs() * torch.exp(-log_b)  # (B, 3, H, W)
    if reduction == "mean":
        return nll.mean()
    if reduction == "sum":
        return nll.sum()
    return nll


def logit_laplace_mean(mu: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """The viewable reconstruction x̂ = unmap(sigmoid(mu)), float pixels in [0, 1] (paper, A.3).

    Strictly this is the median, not the mean: logit(x) has median mu, and sigmoid is monotone.
    It ignores b, as the paper and openai/DALL-E do.
    Example: torch.tensor([0.0, -10.0, 10.0]) -> tensor([0.5000, 0.0000, 1.0000])
    """
    return unmap_pixels(torch.sigmoid(mu), eps)  # same shape as mu


def mse_loss(x: torch.Tensor, x_hat: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean squared error between pixels in [0, 1] (unmapped), for comparison with the paper's loss.

    This is what lucidrains/DALLE-pytorch trains its DiscreteVAE with (`F.mse_loss`, there on pixels
    normalised to [-1, 1], i.e. 4 times this value), with the KL weight left at 0.
    Example: (torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)) -> tensor(0.2500)
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")
    if x.shape != x_hat.shape:
        raise DataError(f"x and x_hat must have one shape; got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    return F.mse_loss(x_hat, x, reduction=reduction)
