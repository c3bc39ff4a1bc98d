"""Tests for minidalle.losses: the pixel map, the logit-Laplace NLL (against an independent
evaluation of the density, and its normalisation), the viewing map, and MSE."""

import math

import numpy as np
import pytest
import torch

from minidalle import data
from minidalle.errors import DataError, MinidalleError
from minidalle.losses import LOG_B_MAX, LOG_B_MIN, LOGIT_LAPLACE_EPS, binned_logit_laplace_nll, logit_laplace_mean, logit_laplace_nll, map_pixels, mse_loss, split_decoder_output, to_unit, unmap_pixels


def reference_log_density(x, mu, b):
    """log f(x | mu, b), written independently: logit(x) ~ Laplace(mu, b), plus the log-Jacobian
    of the logit, d logit(x) / dx = 1 / (x (1 - x))."""
    t = torch.log(x) - torch.log(1 - x)  # logit(x)
    return torch.distributions.Laplace(mu, b).log_prob(t) - torch.log(x * (1 - x))


# --- the pixel map ------------------------------------------------------------------------------

def test_map_unmap_round_trip_and_range():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 1.0  # both ends present
    m = map_pixels(x)  # (2, 3, 8, 8)
    assert m.shape == x.shape
    assert m.min().item() == pytest.approx(LOGIT_LAPLACE_EPS) and m.max().item() == pytest.approx(1 - LOGIT_LAPLACE_EPS)
    torch.testing.assert_close(unmap_pixels(m), x)
    assert map_pixels(torch.tensor([0.0, 0.5, 1.0])).tolist() == pytest.approx([0.1, 0.5, 0.9])
    assert map_pixels(torch.tensor([0.0, 1.0]), eps=0.25).tolist() == pytest.approx([0.25, 0.75])


def test_unmap_clamps_and_tolerance_is_clamped():
    assert unmap_pixels(torch.tensor([0.0, 0.1, 0.5, 0.9, 0.99])).tolist() == pytest.approx([0, 0, 0.5, 1, 1])
    # A hair outside [0, 1] (a resize overshoot) is accepted and clamped, not extrapolated.
    assert map_pixels(torch.tensor([-1e-4, 1 + 1e-4])).tolist() == pytest.approx([0.1, 0.9])


def test_to_unit_takes_what_datasets_yield():
    images, _ = data.ShapesWorld("train", image_size=16, seed=0).batch(0, 2)  # uint8 (2, 16, 16, 3)
    x = to_unit(images)  # (2, 3, 16, 16)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    torch.testing.assert_close(x * 255, images.permute(0, 3, 1, 2).float())
    assert to_unit(np.full((4, 5, 3), 255, np.uint8)).shape == (3, 4, 5)
    assert to_unit(np.full((4, 5, 3), 255, np.uint8)).eq(1).all()
    assert map_pixels(x).shape == x.shape


@pytest.mark.parametrize("bad, words", [
    (torch.zeros(1, 3, 2, 2, dtype=torch.uint8), "255"),  # forgot to convert
    (torch.full((1, 3, 2, 2), 200.0), "divide by 255"),  # 0..255 floats
    (torch.full((1, 3, 2, 2), -0.5), "(x + 1) / 2"),  # [-1, 1] normalised
    (torch.tensor([0.5, float("nan")]), "NaN"),
    (torch.tensor([0.5, 1.01]), "[0, 1]"),
])
def test_map_pixels_refuses_bad_input_with_the_fix(bad, words):
    with pytest.raises(DataError) as info:
        map_pixels(bad)
    assert words in str(info.value)
    assert isinstance(info.value, MinidalleError)


def test_other_validation_errors():
    with pytest.raises(ValueError):
        map_pixels(torch.zeros(3), eps=0.5)
    with pytest.raises(ValueError):
        unmap_pixels(torch.zeros(3), eps=0.0)
    with pytest.raises(DataError):
        unmap_pixels(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(DataError, match="uint8"):
        to_unit(torch.zeros(4, 4, 3))  # float: no conversion needed
    with pytest.raises(DataError, match="shape"):
        to_unit(torch.zeros(4, 4, 4, dtype=torch.uint8))  # RGBA
    with pytest.raises(DataError, match="6"):
        split_decoder_output(torch.zeros(1, 3, 4, 4))
    x, z = torch.full((1, 3, 2, 2), 0.5), torch.zeros(1, 3, 2, 2)
    with pytest.raises(DataError, match="map_pixels"):
        logit_laplace_nll(torch.zeros(1, 3, 2, 2), z, z)  # raw pixels: logit(0) = -inf
    with pytest.raises(DataError, match="shape"):
        logit_laplace_nll(x, torch.zeros(1, 6, 2, 2), z)
    with pytest.raises(ValueError, match="reduction"):
        logit_laplace_nll(x, z, z, reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        mse_loss(x, x, reduction="avg")


# --- the logit-Laplace likelihood ---------------------------------------------------------------

def test_split_decoder_output_takes_mu_then_log_b():
    out = torch.arange(2 * 6 * 2 * 2, dtype=torch.float32).reshape(2, 6, 2, 2)  # (B, 6, H, W)
    mu, log_b = split_decoder_output(out)  # (B, 3, H, W) each
    assert mu.shape == log_b.shape == (2, 3, 2, 2)
    assert torch.equal(mu, out[:, :3]) and torch.equal(log_b, out[:, 3:])


def test_nll_equals_the_density_evaluated_directly():
    g = torch.Generator().manual_seed(1)
    x = map_pixels(torch.rand(4, 3, 5, 5, generator=g, dtype=torch.float64))  # (B, 3, H, W)
    mu = 3 * torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    log_b = 2 * torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)  # well inside the clamp
    expected = -reference_log_density(x, mu, log_b.exp())
    torch.testing.assert_close(logit_laplace_nll(x, mu, log_b, reduction="none"), expected)
    # float32 agrees with the float64 reference too.
    got32 = logit_laplace_nll(x.float(), mu.float(), log_b.float(), reduction="none")
    torch.testing.assert_close(got32.double(), expected, rtol=1e-4, atol=1e-4)
    # The docstring's worked example: log 2 + 2 log 0.5 = -log 2.
    z = torch.zeros(1, 3, 2, 2)
    assert logit_laplace_nll(map_pixels(torch.full((1, 3, 2, 2), 0.5)), z, z).item() == pytest.approx(-math.log(2))


@pytest.mark.parametrize("mu", [-2.0, 0.0, 1.5])
@pytest.mark.parametrize("b", [0.1, 0.3, 1.0])
def test_density_integrates_to_one_over_the_unit_interval(mu, b):
    # b <= 1 keeps f bounded at both ends of (0, 1), so a plain trapezoid on a fine grid converges.
    x = torch.linspace(0, 1, 400_001, dtype=torch.float64)[1:-1]  # open interval, step 2.5e-6
    f = torch.exp(-logit_laplace_nll(x, torch.full_like(x, mu), torch.full_like(x, math.log(b)), reduction="none"))
    assert torch.trapezoid(f, x).item() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("mu, b", [(0.5, 2.0), (-1.0, 4.0)])
def test_density_integrates_to_one_when_b_exceeds_one(mu, b):
    # For b > 1, f has integrable x**(1/b - 1) spikes at 0 and 1; integrate in logit space instead:
    # x = sigmoid(t), dx = x (1 - x) dt. A density missing its Jacobian would fail this.
    t = torch.linspace(-30, 30, 200_001, dtype=torch.float64)
    x = torch.sigmoid(t)
    f = torch.exp(-logit_laplace_nll(x, torch.full_like(x, mu), torch.full_like(x, math.log(b)), reduction="none"))
    assert torch.trapezoid(f * x * (1 - x), t).item() == pytest.approx(1.0, abs=1e-3)


def test_nll_is_minimised_at_mu_equal_logit_x():
    x = map_pixels(torch.tensor([0.0, 0.2, 0.5, 0.77, 1.0], dtype=torch.float64))  # (5,)
    target = torch.log(x / (1 - x))  # logit(x)
    offsets = torch.linspace(-1, 1, 201, dtype=torch.float64)  # offsets[100] == 0
    mu = target[None, :] + offsets[:, None]  # (201, 5)
    nll = logit_laplace_nll(x.expand_as(mu), mu, torch.full_like(mu, -1.0), reduction="none")  # (201, 5)
    assert nll.argmin(dim=0).tolist() == [100] * 5
    # The gradient points towards logit(x) from either side.
    mu = (target + torch.tensor([0.3, -0.3, 0.3, -0.3, 0.3], dtype=torch.float64)).requires_grad_()
    logit_laplace_nll(x, mu, torch.zeros_like(x), reduction="sum").backward()
    assert torch.equal(mu.grad.sign(), torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64))


def test_gradients_are_finite_at_the_eps_edges_and_beyond_the_clamp():
    pixels = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5, 0.5], requires_grad=True)
    x = map_pixels(pixels)  # 0.1 and 0.9: the edges of the mapped range
    mu = torch.tensor([torch.logit(torch.tensor(0.1)).item(), 0.0, 8.0, -8.0, 0.0, 0.0], requires_grad=True)
    log_b = torch.tensor([0.0, 0.0, LOG_B_MIN, LOG_B_MAX, -50.0, 50.0], requires_grad=True)  # last two clamped
    nll = logit_laplace_nll(x, mu, log_b, reduction="none")
    assert torch.isfinite(nll).all()
    nll.sum().backward()
    for t in (pixels, mu, log_b):
        assert torch.isfinite(t.grad).all()
    assert log_b.grad[4:].tolist() == [0.0, 0.0]  # the clamp stops the runaway to ln b -> -inf
    # A clamped ln b = -50 scores like ln b = -10: the loss cannot run off to -inf.
    assert nll[4].item() == pytest.approx(logit_laplace_nll(x[4:5], mu[4:5], torch.tensor([LOG_B_MIN])).item())


def test_reductions_agree():
    g = torch.Generator().manual_seed(2)
    x = map_pixels(torch.rand(2, 3, 4, 4, generator=g))
    mu, log_b = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    none = logit_laplace_nll(x, mu, log_b, reduction="none")  # (B, 3, H, W)
    assert none.shape == x.shape
    torch.testing.assert_close(logit_laplace_nll(x, mu, log_b, reduction="sum"), none.sum())
    torch.testing.assert_close(logit_laplace_nll(x, mu, log_b), none.mean())  # default: "mean"
    torch.testing.assert_close(logit_laplace_nll(x, mu, log_b), none.sum() / (2 * 3 * 4 * 4))
    a, b = torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 3, 4, 4, generator=g)
    torch.testing.assert_close(mse_loss(a, b, reduction="sum") / a.numel(), mse_loss(a, b))
    assert mse_loss(a, b, reduction="none").shape == a.shape


# --- viewing and MSE ----------------------------------------------------------------------------

def test_logit_laplace_mean_is_the_viewable_reconstruction():
    assert logit_laplace_mean(torch.tensor([0.0, -10.0, 10.0])).tolist() == pytest.approx([0.5, 0.0, 1.0])
    # mu = logit(map(x)) reconstructs x exactly: the decoder's ideal output views as the input.
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logit_laplace_mean(torch.logit(map_pixels(x))), x)


def test_mse_loss_on_unit_pixels():
    assert mse_loss(torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)).item() == pytest.approx(0.25)
    x = torch.rand(2, 3, 4, 4)
    assert mse_loss(x, x).item() == 0.0
    with pytest.raises(DataError, match="shape"):
        mse_loss(x, x[:1])


# --- the same density per 8-bit level (the toy presets' likelihood) ------------------------------

LEVELS = torch.arange(256, dtype=torch.float64) / 255  # every 8-bit value, as [0, 1] pixels


def reference_level_probability(v, mu, b, eps=LOGIT_LAPLACE_EPS):
    """P(level v) written independently, in float64: the Laplace CDF of logit(mapped bin edge),
    with the end levels open to 0 and 1."""
    lap = torch.distributions.Laplace(torch.tensor(mu, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    half = 0.5 / 255
    lo = (1 - 2 * eps) * (v - half) + eps
    hi = (1 - 2 * eps) * (v + half) + eps
    cdf_lo = torch.where(v == 0, 0.0, lap.cdf(torch.logit(lo.clamp(1e-12, 1 - 1e-12))))
    cdf_hi = torch.where(v == 1, 1.0, lap.cdf(torch.logit(hi.clamp(1e-12, 1 - 1e-12))))
    return cdf_hi - cdf_lo


@pytest.mark.parametrize("mu, log_b", [(0.0, 0.0), (-2.0, -3.0), (1.3, -8.0), (-9.0, LOG_B_MIN), (0.3, 5.0), (2.2, -1.0)])
def test_binned_levels_are_a_distribution_matching_the_cdf(mu, log_b):
    full = lambda value, dtype: torch.full((256,), value, dtype=dtype)  # noqa: E731
    nll = binned_logit_laplace_nll(LEVELS, full(mu, torch.float64), full(log_b, torch.float64), reduction="none")
    assert nll.dtype == torch.float64 and (nll >= 0).all()  # -log P >= 0: the loss cannot run off to -inf
    assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=1e-9)
    ref = reference_level_probability(LEVELS, mu, math.exp(log_b))
    ok = ref > 1e-9  # where float64 CDF differences are still meaningful
    torch.testing.assert_close(nll[ok], -torch.log(ref[ok]), rtol=1e-7, atol=1e-7)
    # float32, what training runs in: b = e^-8 spans 3e-4 logit units, so edge rounding shows at ~1e-3.
    nll32 = binned_logit_laplace_nll(LEVELS.float(), full(mu, torch.float32), full(log_b, torch.float32), reduction="none")
    assert torch.exp(-nll32.double()).sum().item() == pytest.approx(1.0, abs=2e-5)
    torch.testing.assert_close(nll32.double()[ok], nll[ok], rtol=1e-3, atol=1e-3)


def test_binned_is_the_continuous_nll_minus_log_bin_width_when_b_is_wide():
    g = torch.Generator().manual_seed(3)
    v = torch.randint(20, 236, (500,), generator=g).double() / 255  # interior levels
    mu, log_b = torch.randn(500, generator=g, dtype=torch.float64), torch.full((500,), 0.5, dtype=torch.float64)
    width = (1 - 2 * LOGIT_LAPLACE_EPS) / 255  # a level's bin after the map
    binned = binned_logit_laplace_nll(v, mu, log_b, reduction="none").double()
    cont = logit_laplace_nll(map_pixels(v), mu, log_b, reduction="none")
    torch.testing.assert_close(binned, cont - math.log(width), rtol=0, atol=1e-3)


def test_binned_nll_saturates_where_the_continuous_one_runs_away():
    # Black pixels predicted black with a narrow b: the binned loss reaches 0 and stops pushing, the
    # continuous one pays out -11.7 nats per pixel for sharpening (the failure toy runs showed).
    x = torch.zeros(4)
    mu = torch.full((4,), -6.0, requires_grad=True)  # logit(eps) = -2.2; -6 is well inside level 0's tail
    log_b = torch.full((4,), -3.0, requires_grad=True)
    nll = binned_logit_laplace_nll(x, mu, log_b)
    nll.backward()
    assert nll.item() == pytest.approx(0.0, abs=1e-6)
    assert mu.grad.abs().max().item() < 1e-6 and log_b.grad.abs().max().item() < 1e-6
    at_black = torch.logit(map_pixels(x))  # mu exactly on the black level, ln b at its clamp
    assert logit_laplace_nll(map_pixels(x), at_black, torch.full((4,), LOG_B_MIN)).item() < -11


def test_binned_gradients_are_finite_at_the_extremes():
    x = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5, 0.5, 3 / 255, 252 / 255])
    mu = torch.tensor([30.0, -30.0, -30.0, 30.0, 0.0, 25.0, -25.0, 0.0], requires_grad=True)
    log_b = torch.tensor([LOG_B_MIN, LOG_B_MIN, LOG_B_MAX, -50.0, LOG_B_MIN, LOG_B_MIN, 0.0, 50.0], requires_grad=True)
    nll = binned_logit_laplace_nll(x, mu, log_b, reduction="none")
    assert torch.isfinite(nll).all() and (nll >= 0).all()
    assert nll[0].item() > 1e4  # black predicted far white with a narrow b: a huge but finite loss
    nll.sum().backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(log_b.grad).all()


def test_binned_validation_and_reductions():
    x, z = torch.full((1, 3, 2, 2), 0.5), torch.zeros(1, 3, 2, 2)
    with pytest.raises(DataError, match="one shape"):
        binned_logit_laplace_nll(x, torch.zeros(1, 6, 2, 2), z)
    with pytest.raises(ValueError, match="reduction"):
        binned_logit_laplace_nll(x, z, z, reduction="avg")
    none = binned_logit_laplace_nll(x, z, z, reduction="none")
    torch.testing.assert_close(binned_logit_laplace_nll(x, z, z, reduction="sum"), none.sum())
    torch.testing.assert_close(binned_logit_laplace_nll(x, z, z), none.mean())
