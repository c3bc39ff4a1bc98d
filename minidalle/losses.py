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


# --- the same density, scored per 8-bit level ----------------------------------------------------
#
# A deviation from the paper, used by the toy presets (config: dvae.likelihood = "logit_laplace_binned").
# Pixels are 8-bit, so a continuous density can be made arbitrarily tall on any region whose pixels
# all share one value. ShapesWorld is mostly exact black background: the decoder keeps narrowing b
# there (measured ln b ~ -4.7 on background against ~ +0.3 on objects; only the clamp at -10 stops it,
# where a black pixel scores -11.7 nats), and those pixels' gradient (sign / b: ~100 at -4.7) drowns
# the object pixels in Adam's normalisation. Measured: reconstructions with every object in one
# colour, judge accuracy 0.00 on toy runs. The paper trained on photos, where flat runs of
# one value are rare. Scoring the *probability of the pixel's 8-bit level* -- the density integrated
# over that level's bin, as PixelCNN++ does for its logistic mixture -- bounds the loss below by 0
# and lets the gradient vanish once a pixel is predicted inside its bin. Where b is wide against a
# bin (photos) it equals the continuous NLL minus log(bin width): the same objective.

PIXEL_LEVELS = 256  # 8-bit pixels: level v covers [v - 1/2, v + 1/2] / 255 before the map
_LN2 = math.log(2.0)
_EDGE = 1e4  # an end level's open side: this many b past its other edge and past mu (exp(-1e4) == 0)


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-d)) for d > 0, accurate for small and large d (Maechler's two branches).

    Each branch's input is clamped to its own range so the branch torch.where drops stays finite
    (a NaN there would still poison the gradient). Example: tensor([1e-6, 1.0, 50.0]) -> [-13.8155, -0.4587, 0.]
    """
    small = torch.log(-torch.expm1(-d.clamp(1e-30, _LN2)))  # d <= ln 2
    large = torch.log1p(-torch.exp(-d.clamp_min(_LN2)))  # d > ln 2
    return torch.where(d > _LN2, large, small)


def binned_logit_laplace_nll(x: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS,
                             reduction: str = "mean") -> torch.Tensor:
    """-log P(the 8-bit level of x) under the logit-Laplace(mu, b) density on map_pixels(x).

    x: *unmapped* pixels in [0, 1] (B, 3, H, W), as 8-bit levels v / 255; mu, log_b as for
    `logit_laplace_nll`. Level v's bin is [v - 1/2, v + 1/2] / 255 pushed through the eps map; the
    two end levels take the tails, so the 256 probabilities sum to 1 and the NLL is >= 0. In logit
    units the bin is [a, c] (standardised by b), and the Laplace CDF F gives P = F(c) - F(a),
    computed in log space: with both ends left of mu, P = e^c (1 - e^-(c-a)) / 2; the right side by
    symmetry; straddling mu, P = 1 - (e^a + e^-c) / 2. ln b is clamped to [LOG_B_MIN, LOG_B_MAX] as
    in `logit_laplace_nll` (here only to keep exp finite: the loss cannot run away).
    Example: x = torch.zeros(1), mu = torch.full((1,), -20.0), log_b = torch.zeros(1) -> ~0 (black, predicted black)
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")
    if not (x.shape == mu.shape == log_b.shape):
        raise DataError(f"x, mu and log_b must have one shape (B, 3, H, W); got {tuple(x.shape)}, "
                        f"{tuple(mu.shape)}, {tuple(log_b.shape)}")
    _check_eps(eps)
    half = 0.5 / (PIXEL_LEVELS - 1)  # half a level, in [0, 1] units
    dtype = torch.promote_types(torch.promote_types(x.dtype, mu.dtype), torch.float32)  # fp32 at least, fp64 kept
    with torch.autocast(device_type=x.device.type, enabled=False):  # exp/log of standardised logits: no bf16
        x, mu, log_b = x.to(dtype), mu.to(dtype), log_b.to(dtype)
        inv_b = torch.exp(-log_b.clamp(LOG_B_MIN, LOG_B_MAX))                  # (B, 3, H, W)
        lo = (1 - 2 * eps) * (x - half).clamp(min=0.0) + eps                    # bin edges, mapped
        hi = (1 - 2 * eps) * (x + half).clamp(max=1.0) + eps
        a = (torch.log(lo) - torch.log1p(-lo) - mu) * inv_b                     # standardised logit edges
        c = (torch.log(hi) - torch.log1p(-hi) - mu) * inv_b
        a = torch.where(x <= half, c.clamp(max=0.0) - _EDGE, a)  # level 0 takes the left tail (0, bin]
        c = torch.where(x >= 1 - half, a.clamp(min=0.0) + _EDGE, c)  # level 255 the right tail [bin, 1)
        # Reflect bins right of mu (a > 0) to the left: F(c) - F(a) = F(-a) - F(-c) for the Laplace.
        right = a > 0
        a, c = torch.where(right, -c, a), torch.where(right, -a, c)  # now a <= 0
        tail = -_LN2 + c + _log1mexp(c - a)  # both ends left of mu (c <= 0)
        inside = (-0.5 * (torch.expm1(a) + torch.expm1(-c.clamp(min=0.0)))).clamp_min(1e-30)  # a <= 0 < c
        nll = -torch.where(c <= 0, tail, torch.log(inside))                   # (B, 3, H, W), >= 0
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
