"""Quantizers: the paper's schedules, the Gumbel-softmax dVAE bottleneck, the EMA VQ-VAE, codebook health."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model

from minidalle.config import DVAEConfig
from minidalle.errors import ConfigError
from minidalle.quantize import CodebookHealth, GumbelQuantizer, VectorQuantizer, cos_anneal, kl_weight_at, make_quantizer, nearest_code, nearest_code_naive, perplexity, scalar_stats, temperature_at

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in tests/conftest.py

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
STATS_KEYS = {"kl", "commitment", "perplexity", "usage", "dead", "temperature", "kl_weight"}


# --- schedules -----------------------------------------------------------------------------------

def test_cos_anneal_endpoints_midpoint_and_flat_tail():
    assert cos_anneal(0, 1.0, 0.0, 100) == 1.0
    assert cos_anneal(100, 1.0, 0.0, 100) == 0.0
    assert cos_anneal(10_000, 1.0, 0.0, 100) == 0.0  # flat after the schedule
    assert cos_anneal(50, 1.0, 0.0, 100) == pytest.approx(0.5)
    assert cos_anneal(25, 1.0, 0.0, 100) == pytest.approx(0.8535533905932737)  # (1 + sqrt(2)/2) / 2
    assert cos_anneal(25, 2.0, 4.0, 100) == pytest.approx(2.0 + 2.0 * (1 - 0.8535533905932737))
    assert cos_anneal(0, 1.0, 0.25, 0) == 0.25 and cos_anneal(5, 1.0, 0.25, -3) == 0.25  # no schedule


def test_temperature_schedule_paper_numbers():
    cfg = DVAEConfig()
    assert temperature_at(0, cfg) == 1.0
    assert temperature_at(75_000, cfg) == pytest.approx((1 + 1 / 16) / 2)
    assert temperature_at(150_000, cfg) == 1 / 16 and temperature_at(10**7, cfg) == 1 / 16
    taus = [temperature_at(s, cfg) for s in range(0, 160_000, 1000)]
    assert all(a >= b for a, b in zip(taus, taus[1:]))  # never rises
    toy = DVAEConfig(schedule_scale=0.01)  # 150k -> 1.5k updates
    assert temperature_at(750, toy) == pytest.approx(0.53125) and temperature_at(1500, toy) == 1 / 16


def test_kl_weight_schedule_paper_numbers():
    cfg = DVAEConfig()
    assert kl_weight_at(0, cfg) == 0.0
    assert kl_weight_at(2500, cfg) == pytest.approx(3.3)
    assert kl_weight_at(5000, cfg) == pytest.approx(6.6) and kl_weight_at(10**6, cfg) == pytest.approx(6.6)
    betas = [kl_weight_at(s, cfg) for s in range(0, 6000, 100)]
    assert all(a <= b for a, b in zip(betas, betas[1:]))  # never falls
    assert kl_weight_at(25, DVAEConfig(schedule_scale=0.01)) == pytest.approx(3.3)  # 5k -> 50 updates
    assert kl_weight_at(0, DVAEConfig(schedule_scale=1e-5)) == pytest.approx(6.6)  # rounds to 0 steps


# --- Gumbel --------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_gumbel_shapes_and_relaxed_one_hot(device):
    torch.manual_seed(0)
    q = GumbelQuantizer(16, temperature=0.5, kl_weight=1.0).to(device).train()
    logits = torch.randn(2, 16, 3, 4, device=device)
    z_q, loss, codes, stats = q(logits)
    assert z_q.shape == (2, 16, 3, 4) and codes.shape == (2, 3, 4) and codes.dtype == torch.long
    assert loss.shape == () and set(stats) == STATS_KEYS
    assert torch.allclose(z_q.sum(1), torch.ones(2, 3, 4, device=device), atol=1e-5)
    assert (z_q > 0).all() and (z_q.max(1).values < 1).any()  # soft, not a hard one-hot
    assert torch.equal(codes, logits.argmax(1))  # codes are the clean argmax, no noise
    assert stats["usage"].shape == (16,) and int(stats["usage"].sum()) == 2 * 3 * 4
    assert stats["temperature"] == 0.5 and stats["kl_weight"] == 1.0 and stats["commitment"] is None


def test_gumbel_eval_is_exact_one_hot_argmax():
    torch.manual_seed(0)
    q = GumbelQuantizer(8, temperature=0.1).eval()
    logits = torch.randn(3, 8, 2, 2)
    a, _, codes, _ = q(logits)
    b, _, _, _ = q(logits)
    assert torch.equal(a, b)
    assert torch.equal(a, F.one_hot(logits.argmax(1), 8).permute(0, 3, 1, 2).float())
    assert torch.equal(q.embed_codes(codes), a)


def test_gumbel_kl_values():
    K, h, w = 32, 3, 2
    q = GumbelQuantizer(K, kl_weight=1.0).eval()
    _, loss, _, stats = q(torch.full((4, K, h, w), 3.7))  # uniform q
    assert abs(float(stats["kl"])) < 1e-5 and abs(float(loss)) < 1e-5
    certain = torch.zeros(4, K, h, w)
    certain[:, 5] = 1e4  # q is (numerically) one-hot on code 5
    _, _, _, stats = q(certain)
    assert float(stats["kl"]) == pytest.approx(h * w * math.log(K), rel=1e-5)  # per image: sum over positions
    torch.manual_seed(1)
    logits = torch.randn(4, K, h, w)
    cat = torch.distributions.Categorical(logits=logits.permute(0, 2, 3, 1))  # batch (4, h, w), K events
    uniform = torch.distributions.Categorical(logits=torch.zeros(4, h, w, K))
    expected = torch.distributions.kl_divergence(cat, uniform).sum((1, 2)).mean()
    assert torch.allclose(q(logits)[3]["kl"], expected, atol=1e-5)


def test_gumbel_loss_scales_with_kl_weight_and_gradients_flow():
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 2, 2)
    q = GumbelQuantizer(8).eval()
    q.kl_weight = 1.0
    l1 = q(logits)[1]
    q.kl_weight = 2.5
    assert torch.allclose(q(logits)[1], 2.5 * l1)
    q.kl_weight = 0.0
    assert float(q(logits)[1]) == 0.0

    q.train()
    q.kl_weight = 1.0
    x = logits.clone().requires_grad_(True)
    z_q, loss, _, _ = q(x)
    (z_q * torch.randn_like(z_q)).sum().backward()  # through the relaxed sample
    assert x.grad is not None and x.grad.abs().sum() > 0
    x.grad = None
    loss.backward()  # through the KL
    assert x.grad.abs().sum() > 0


def test_gumbel_schedule_hooks():
    cfg = DVAEConfig(vocab_size=16, schedule_scale=0.01)
    q = make_quantizer(cfg)
    assert isinstance(q, GumbelQuantizer) and q.temperature == 1.0 and q.kl_weight == 0.0
    q.set_step(25, cfg)
    assert q.temperature == temperature_at(25, cfg) and q.kl_weight == pytest.approx(3.3)
    q.temperature = 0.0
    with pytest.raises(ValueError):
        q(torch.randn(1, 16, 2, 2))
    with pytest.raises(ValueError):
        GumbelQuantizer(16)(torch.randn(1, 15, 2, 2))
    with pytest.raises(ConfigError):
        make_quantizer(DVAEConfig(quantizer="kmeans"))


# --- VQ ------------------------------------------------------------------------------------------

def _vq(K=6, D=3, **kw):
    """A VQ whose codebook is already initialised (no data init on the first training step)."""
    torch.manual_seed(0)
    vq = VectorQuantizer(K, D, **kw)
    vq.initialised.fill_(1)
    return vq


def test_nearest_code_parity_with_naive():
    torch.manual_seed(0)
    z, cb = torch.randn(2, 3, 4, 5), torch.randn(7, 3)
    naive = nearest_code_naive(z, cb)
    assert naive.shape == (2, 4, 5) and torch.equal(naive, nearest_code(z, cb))
    vq = _vq(7, 3).eval()
    vq.codebook.copy_(cb)
    assert torch.equal(vq(z)[2], naive)
    assert nearest_code_naive(torch.tensor([[[[0.9]]]]), torch.tensor([[0.0], [1.0]])).item() == 1


def test_vq_straight_through_and_commitment_formula():
    vq = _vq(5, 4, commitment=0.25).train()
    z = torch.randn(3, 4, 2, 2, requires_grad=True)
    cb = vq.codebook.clone()
    z_q, loss, codes, stats = vq(z)
    assert set(stats) == STATS_KEYS and stats["kl"] is None and stats["temperature"] is None
    assert torch.allclose(z_q, cb[codes].permute(0, 3, 1, 2), atol=1e-6)  # forward: the code vectors
    w = torch.randn_like(z_q)
    (z_q * w).sum().backward(retain_graph=True)
    assert torch.equal(z.grad, w)  # backward: gradient copied straight through
    # commitment: 0.25 * sum over D and positions of (z - e)^2, mean over batch, with naive codes
    naive = nearest_code_naive(z, cb)
    expected = sum(((z[b] - cb[naive[b]].permute(2, 0, 1)) ** 2).sum() for b in range(3)) / 3
    assert torch.allclose(loss, 0.25 * expected, rtol=1e-5) and torch.allclose(stats["commitment"], expected)
    z.grad = None
    loss.backward()
    assert torch.allclose(z.grad, 0.25 * 2 * (z - cb[naive].permute(0, 3, 1, 2)).detach() / 3, atol=1e-6)


def test_vq_ema_moves_codes_towards_assigned_vectors():
    vq = _vq(2, 2, ema_decay=0.9).train()
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    vq.ema_embed_sum.copy_(vq.codebook)
    target = torch.tensor([1.0, -1.0])
    z = target.view(1, 2, 1, 1).expand(4, 2, 3, 3).contiguous()  # 36 vectors, all nearest to code 0
    before = (vq.codebook[0] - target).norm()
    vq(z)
    # the update by hand: N0 = 0.9 * 1 + 0.1 * 36, m0 = 0.9 * e0 + 0.1 * 36 * target, Laplace smoothing
    N = torch.tensor([0.9 + 3.6, 0.9])
    n, eps = N.sum(), vq.eps
    e0 = (0.1 * 36 * target) / ((N[0] + eps) / (n + 2 * eps) * n)
    assert torch.allclose(vq.codebook[0], e0, atol=1e-5)
    assert (vq.codebook[0] - target).norm() < before
    for _ in range(100):
        vq(z)
    assert torch.allclose(vq.codebook[0], target, atol=1e-3)  # the code converges onto its data


def test_vq_no_update_in_eval():
    vq = _vq().eval()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(2, 3, 4, 4))
    assert all(torch.equal(state[k], v) for k, v in vq.state_dict().items())
    fresh = VectorQuantizer(6, 3).eval()
    fresh(torch.randn(2, 3, 4, 4))
    assert int(fresh.initialised) == 0  # the data init also waits for training


def test_vq_first_training_step_initialises_codebook_from_data():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 3).train()
    z = torch.randn(2, 3, 4, 4) * 5 + 100  # far from the N(0, 1) initial codebook
    vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    assert int(vq.initialised) == 1
    assert all((flat - e).norm(dim=1).min() < 50 for e in vq.codebook)  # every code moved onto the data


def test_vq_dead_code_restart():
    vq = _vq(4, 2, dead_after=3).train()
    centres = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [50.0, 50.0]])  # code 3 is never nearest
    vq.codebook.copy_(centres)
    vq.ema_embed_sum.copy_(centres)
    g = torch.Generator().manual_seed(0)
    z = (centres[torch.arange(12) % 3] + 0.01 * torch.randn(12, 2, generator=g)).T.reshape(1, 2, 3, 4)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for step in (1, 2):
        _, _, _, stats = vq(z)
        assert int(stats["dead"]) == 0 and torch.allclose(vq.codebook[3], centres[3], atol=1e-2)  # smoothing only
        assert int(vq.health.steps_unused[3]) == step
    _, _, _, stats = vq(z)  # third unused step: dead, reported, then restarted onto a batch vector
    assert int(stats["dead"]) == 1
    assert (flat - vq.codebook[3]).norm(dim=1).min() < 1e-6
    assert int(vq.health.steps_unused[3]) == 0 and int(vq.health.dead()) == 0
    assert float(vq.ema_cluster_size[3]) == 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_both_quantizers_under_bf16_autocast(device):
    torch.manual_seed(0)
    for q, C in ((GumbelQuantizer(16, kl_weight=1.0), 16), (VectorQuantizer(16, 8), 8)):
        q = q.to(device).train()
        conv = torch.nn.Conv2d(3, C, 1).to(device)
        x = torch.randn(2, 3, 4, 4, device=device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            z = conv(x)  # bf16 under autocast, like an encoder's output
            z_q, loss, codes, stats = q(z)
        assert z.dtype == torch.bfloat16 and z_q.dtype == torch.bfloat16 and loss.dtype == torch.float32
        assert torch.isfinite(loss) and torch.isfinite(z_q.float()).all() and codes.shape == (2, 4, 4)
        (z_q.float().sum() + loss).backward()
        assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


# --- health and state ----------------------------------------------------------------------------

def test_perplexity_and_health_bookkeeping():
    assert float(perplexity(torch.full((10,), 7))) == pytest.approx(10.0)
    assert float(perplexity(torch.tensor([0, 9, 0, 0]))) == pytest.approx(1.0)
    assert float(perplexity(torch.zeros(4, dtype=torch.long))) == pytest.approx(1.0)
    assert float(perplexity(torch.tensor([1, 1, 2]))) == pytest.approx(math.exp(1.5 * math.log(2)))
    h = CodebookHealth(4, dead_after=2)
    assert torch.equal(h.observe(torch.tensor([[0, 2, 2]]), record=False), torch.tensor([1, 0, 2, 0]))
    assert int(h.usage.sum()) == 0 and int(h.steps) == 0  # not recorded
    for _ in range(2):
        h.observe(torch.tensor([1, 1, 0]), record=True)
    assert torch.equal(h.steps_unused, torch.tensor([0, 0, 2, 2])) and int(h.dead()) == 2
    assert torch.allclose(h.usage_histogram(), torch.tensor([2 / 6, 4 / 6, 0, 0]))
    assert torch.allclose(h.usage_histogram(sort=True), torch.tensor([4 / 6, 2 / 6, 0, 0]))
    assert int(CodebookHealth(4, dead_after=0).dead()) == 0


def test_state_dict_round_trip_through_safetensors(tmp_path):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, dead_after=2).train()
    gq = GumbelQuantizer(8).train()
    for _ in range(3):
        vq(torch.randn(2, 4, 3, 3))
        gq(torch.randn(2, 8, 3, 3))
    assert {"codebook", "ema_cluster_size", "ema_embed_sum", "initialised", "health.usage",
            "health.steps_unused", "health.steps"} <= set(vq.state_dict())
    for q, fresh in ((vq, VectorQuantizer(8, 4, dead_after=2)), (gq, GumbelQuantizer(8))):
        save_model(q, str(tmp_path / "q.safetensors"))
        load_model(fresh, str(tmp_path / "q.safetensors"))
        for k, v in q.state_dict().items():
            assert torch.equal(fresh.state_dict()[k], v), k
    reloaded = VectorQuantizer(8, 4)
    reloaded.load_state_dict(vq.state_dict())
    z = torch.randn(2, 4, 3, 3)
    assert torch.equal(reloaded.eval()(z)[0], vq.eval()(z)[0])


def test_scalar_stats_and_matching_keys():
    torch.manual_seed(0)
    _, _, _, gs = GumbelQuantizer(8, temperature=0.5)(torch.randn(2, 8, 2, 2))
    _, _, _, vs = _vq(8, 3)(torch.randn(2, 3, 2, 2))
    assert set(gs) == set(vs) == STATS_KEYS
    f = scalar_stats(gs)
    assert set(f) == {"kl", "perplexity", "dead", "temperature", "kl_weight"}
    # numbers stay 0-d tensors (read in the Trainer's one sync), detached from the graph, or Python floats
    assert all((torch.is_tensor(v) and v.ndim == 0 and not v.requires_grad) or type(v) is float for v in f.values())
    assert float(f["kl"]) == pytest.approx(float(gs["kl"]))
    assert set(scalar_stats(vs)) == {"commitment", "perplexity", "dead"}
    vq = make_quantizer(DVAEConfig(quantizer="vq", vocab_size=8, code_dim=3, dead_after=7))
    assert isinstance(vq, VectorQuantizer) and vq.health.dead_after == 7 and vq.in_channels == vq.out_channels == 3


def test_gumbel_samples_pick_codes_in_softmax_proportions():
    # The Gumbel-max trick: argmax(logits + g) is a draw from softmax(logits) exactly when g is
    # Gumbel(0, 1). At tau = 1/16 the relaxed sample's argmax is that draw. 40,000 cells: the
    # standard error of each frequency is <= 0.0025, so 0.01 is four of them.
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    q = GumbelQuantizer(5, temperature=1 / 16).train()
    torch.manual_seed(0)
    z_q, _, _, _ = q(logits.view(1, 5, 1, 1).expand(1, 5, 200, 200).contiguous())  # (1, 5, 200, 200)
    freq = torch.bincount(z_q.argmax(1).flatten(), minlength=5).float() / 40_000
    torch.testing.assert_close(freq, torch.softmax(logits, 0), atol=0.01, rtol=0)
