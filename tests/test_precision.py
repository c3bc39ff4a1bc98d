"""Tests for minidalle.scale.precision: the gradient-scaling autograd function, format helpers, the
per-resblock scaler's arithmetic and schedule, and the fp16/bf16 comparison on the toy model."""

import math

import pytest
import torch
import torch.nn.functional as F

from minidalle.errors import ConfigError, MinidalleError
from minidalle.scale.precision import GROWTH, ResblockScaler, ToyResNet, _ScaleGrad, compare_gradient_schemes, format_range, grad_histogram_data, overflow_fraction, round_grad, scale_grad, underflow_fraction

INIT = 2.0 ** 13


def toy_backward(model, loss_weight=1.0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, model.head.in_features, generator=gen), torch.randn(8, 1, generator=gen)
    model.zero_grad(set_to_none=True)
    (F.mse_loss(model(x), y) * loss_weight).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# --- the autograd function and the format helpers ------------------------------------------------

def test_scale_grad_is_identity_forward_and_exact_factor_backward():
    x = torch.randn(6, requires_grad=True)
    g = torch.randn(6)
    y = scale_grad(x, 3 * 2.0 ** 13)
    assert torch.equal(y, x)
    y.backward(g)
    assert torch.equal(x.grad, g * (3 * 2.0 ** 13))


def test_round_grad_rounds_to_fp16_and_zero_nonfinite_filters():
    x = torch.zeros(4, requires_grad=True)
    round_grad(x, torch.float16).backward(torch.tensor([1.0 + 2 ** -12, 2.0 ** -26, 2.0 ** -20, 1e5]))
    assert x.grad.tolist() == [1.0, 0.0, 2.0 ** -20, math.inf]  # 11 significant bits; flush; subnormal; overflow
    x.grad = None
    _ScaleGrad.apply(x, 0.5, None, True).backward(torch.tensor([2.0, math.inf, -math.inf, math.nan]))
    assert x.grad.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_underflow_and_overflow_fractions_and_ranges():
    t = torch.tensor([1.0, 2.0 ** -26, 2.0 ** -20, 0.0])  # 3 nonzero, one of them below fp16's half-subnormal
    assert underflow_fraction(t) == pytest.approx(1 / 3)
    assert underflow_fraction(t, torch.bfloat16) == 0.0
    assert overflow_fraction(torch.tensor([1e5, 1.0])) == 0.5
    assert overflow_fraction(torch.tensor([1e5]), torch.bfloat16) == 0.0
    r = format_range(torch.float16)
    assert (r["min_subnormal"], r["min_normal"]) == (-24.0, -14.0) and 15.9 < r["max"] < 16
    assert format_range(torch.bfloat16)["min_normal"] == -126.0


def test_grad_histogram_data_is_log2_of_nonzero_grads():
    m = ToyResNet(2, 4)
    toy_backward(m)
    m.head.weight.grad[0, 0] = 0.0
    h = grad_histogram_data(m)
    assert set(h) == {n for n, _ in m.named_parameters()}
    assert len(h["head.weight"]) == 3
    torch.testing.assert_close(torch.from_numpy(h["blocks.0.fc1.weight"]),
                               torch.log2(m.blocks[0].fc1.weight.grad.abs().flatten()))


# --- ResblockScaler ------------------------------------------------------------------------------

def test_scaling_then_unscaling_gives_the_fp32_grads():
    m = ToyResNet(4, 8, spread=1.0)  # fp32, nothing under- or overflows
    ref = toy_backward(m)
    scaler = ResblockScaler(m.blocks)
    scaled = toy_backward(m)
    for n in ref:  # inside the blocks the gradient really carries the scale; outside it does not
        factor = INIT if n.startswith("blocks.") else 1.0
        torch.testing.assert_close(scaled[n], ref[n] * factor, rtol=1e-5, atol=0)
    assert scaler.unscale_() == [True] * 4
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=0)
    scaler.remove()
    for n, g in toy_backward(m).items():  # unhooked: plain fp32 again
        torch.testing.assert_close(g, ref[n], rtol=1e-6, atol=0)


def test_inf_gradient_divides_that_scale_by_sqrt2_and_skips_the_step():
    m = ToyResNet(3, 8, spread=1.0)
    scaler, opt = ResblockScaler(m.blocks), torch.optim.SGD(m.parameters(), lr=0.1)
    toy_backward(m)
    m.blocks[1].fc2.weight.grad[0, 0] = math.inf
    before = [p.detach().clone() for p in m.parameters()]
    assert scaler.step(opt) is False
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert scaler.scales == pytest.approx([INIT * GROWTH, INIT / math.sqrt(2), INIT * GROWTH], rel=1e-12)
    toy_backward(m)  # overflowing again within 125 updates: skipped, but not divided twice
    m.blocks[1].fc1.weight.grad[0, 0] = math.nan
    assert scaler.step(opt) is False and scaler.scales[1] == pytest.approx(INIT / math.sqrt(2), rel=1e-12)
    toy_backward(m)
    assert scaler.step(opt) is True
    assert not torch.equal(before[0], next(m.parameters()))
    toy_backward(m)
    m.head.weight.grad[0, 0] = math.inf  # a non-finite grad outside the blocks skips too, scales untouched
    assert scaler.step(opt) is False and scaler.scales[0] == pytest.approx(INIT * GROWTH ** 4)


def test_scale_grows_by_2_pow_1_over_1000_per_finite_step_and_is_clamped():
    scaler = ResblockScaler([torch.nn.Linear(2, 2)] * 2, world_size=2)
    for _ in range(10):
        scaler.update([True, True])
    assert scaler.scales[0] == pytest.approx(2 * INIT * 2.0 ** (10 / 1000), rel=1e-12)
    fast = ResblockScaler([torch.nn.Linear(2, 2)], growth=2.0, window=0)
    for _ in range(20):
        fast.update([True])
    assert fast.scales == [2.0 ** 24]
    for _ in range(40):
        fast.update([False])
    assert fast.scales == [2.0 ** 7]


def test_an_overflowing_block_does_not_poison_the_blocks_before_it():
    m = ToyResNet(4, 8, spread=1.0, simulate="fp16")
    scaler = ResblockScaler(m.blocks)
    scaler.scales[2] = 2.0 ** 40  # block 2's fp16 gradient overflows
    toy_backward(m)
    assert scaler.unscale_() == [True, True, False, True]


def test_state_dict_round_trip_and_bad_state():
    blocks = [torch.nn.Linear(2, 2) for _ in range(3)]
    a = ResblockScaler(blocks)
    for finite in ([True, False, True], [True, True, True]):
        a.update(finite)
    a.remove()
    b = ResblockScaler(blocks)
    b.load_state_dict(a.state_dict())
    assert b.scales == a.scales and b.state_dict() == a.state_dict()
    a.update([False, False, True]), b.update([False, False, True])  # block 1 is still inside its window
    assert b.scales == a.scales and a.scales[1] == pytest.approx(INIT / math.sqrt(2) * GROWTH, rel=1e-12)
    with pytest.raises(ConfigError, match="3 blocks"):
        b.load_state_dict({"scales": [1.0]})


def test_bad_input_raises_with_a_fix():
    m = ToyResNet(2, 4)
    with pytest.raises(ConfigError, match="model.blocks"):
        ResblockScaler([])
    with pytest.raises(ConfigError, match="backoff"):
        ResblockScaler(m.blocks, backoff=2.0)
    with pytest.raises(ConfigError, match="simulate"):
        ToyResNet(2, 4, simulate="fp8")
    scaler = ResblockScaler(m.blocks)
    with pytest.raises(ConfigError, match="one finite flag per block"):
        scaler.update([True])
    toy_backward(m)
    scaler.unscale_()
    with pytest.raises(MinidalleError, match="twice"):
        scaler.unscale_()
    with pytest.raises(ConfigError, match="steps"):
        compare_gradient_schemes(steps=0)


# --- the fp16 / bf16 lab -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def schemes():
    return compare_gradient_schemes(seed=0, depth=8, steps=80)


def test_per_resblock_scaling_keeps_every_block_in_range(schemes):
    fp16, glob, res, bf16 = (schemes[k] for k in ("fp16", "fp16_global", "fp16_resblock", "bf16"))
    assert schemes["fp32"]["rel_err"] == [0.0] * 8
    # plain fp16: the late blocks' gradients are flushed to zero
    assert min(fp16["flushed"][-3:]) > 0.9 and min(fp16["rel_err"]) > 0.5
    # one global scale: it had to back off (2^16 overflowed the early blocks) and the last block still underflows
    assert glob["scales"][0] < 2.0 ** 16 and glob["overflow"][0] > 0 and glob["flushed"][-1] > 0.5
    assert max(glob["rel_err"]) > 0.5
    # per-resblock scales: late blocks get far larger scales, nothing flushed, fp16-level error everywhere
    assert res["scales"][-1] > 2.0 ** 6 * res["scales"][0]
    assert max(res["flushed"]) < 0.01 and res["flushed"][-1] < fp16["flushed"][-1] - 0.9
    assert max(res["rel_err"]) < 5e-3
    # bf16: nothing flushed, but 8 significant bits instead of 11: a larger error than scaled fp16
    assert max(bf16["flushed"]) == 0.0 and min(bf16["rel_err"]) > max(res["rel_err"])
