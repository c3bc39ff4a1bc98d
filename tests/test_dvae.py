"""Stage 1 model: encoder/decoder shapes, the paper's loss normalisation, encode/decode, learning, sizes.

All models here are the `smoke` preset's (hidden 16, K 64, 16x16 images, x4 downsampling), so the
whole file runs in a few seconds on a CPU. The paper-size check builds on the meta device.
"""

import dataclasses
import math

import pytest
import torch

from minidalle import losses
from minidalle.infra.checkpoint import load_checkpoint, save_checkpoint
from minidalle.config import TrainConfig, get_config
from minidalle.data import ShapesWorld
from minidalle.dvae import DVAE, Bottleneck, Decoder, Encoder, count_parameters, downsample_factor, dvae_loss_fn, grid_size, paper_parameter_counts, schedule_callback
from minidalle.errors import ConfigError, DataError
from minidalle.quantize import GumbelQuantizer, VectorQuantizer, temperature_at
from minidalle.train import Trainer

COMBOS = [(q, lik) for q in ("gumbel", "vq") for lik in ("logit_laplace", "logit_laplace_binned", "mse")]


def smoke_cfg(**overrides):
    cfg = get_config("smoke", smoke=True).dvae
    return dataclasses.replace(cfg, **overrides)


@pytest.fixture(scope="module")
def images():
    """A fixed batch of 8 ShapesWorld images, uint8 (8, 16, 16, 3)."""
    return ShapesWorld("train", image_size=16, seed=0).batch(0, 8)[0]


@pytest.mark.parametrize("quantizer,likelihood", COMBOS)
def test_shapes_through_encoder_decoder_and_forward(quantizer, likelihood, images, one_thread):
    torch.manual_seed(0)
    cfg = smoke_cfg(quantizer=quantizer, likelihood=likelihood)
    model = DVAE(cfg)
    width = cfg.vocab_size if quantizer == "gumbel" else cfg.code_dim
    assert isinstance(model.quantizer, GumbelQuantizer if quantizer == "gumbel" else VectorQuantizer)
    x = losses.to_unit(images)  # (8, 3, 16, 16)
    z = model.encoder(x)
    assert z.shape == (8, width, 4, 4)
    out = model.decoder(torch.randn(8, width, 4, 4))
    assert out.shape == (8, 3 if likelihood == "mse" else 6, 16, 16)

    for inp in (images, x):  # uint8 channels-last and float channels-first give the same thing
        res = model.eval()(inp)
        assert res["codes"].shape == (8, 4, 4) and res["codes"].dtype == torch.long
        assert res["x_hat"].shape == (8, 3, 16, 16)
        assert 0 <= res["x_hat"].min() and res["x_hat"].max() <= 1
        for k in ("loss", "recon", "q_loss"):
            assert res[k].ndim == 0 and math.isfinite(res[k].item())
    assert torch.allclose(model(images)["loss"], model(x)["loss"])


@pytest.mark.parametrize("n_groups,factor", [(2, 2), (3, 4), (4, 8)])
def test_downsample_factor(n_groups, factor, one_thread):
    cfg = smoke_cfg(n_groups=n_groups)
    assert downsample_factor(cfg) == factor
    assert grid_size(16, cfg) == 16 // factor == DVAE(cfg).grid_size(16)
    assert Encoder(cfg, 5)(torch.rand(2, 3, 16, 16)).shape == (2, 5, 16 // factor, 16 // factor)
    assert Decoder(cfg, 5)(torch.rand(2, 5, 16 // factor, 16 // factor)).shape == (2, 6, 16, 16)
    assert grid_size(256, get_config("paper").dvae) == 32  # the paper's 256 -> 32
    assert grid_size(32, get_config("toy").dvae) == 8


def test_residual_branch_is_scaled_by_one_over_n_layers_squared(one_thread):
    """Paper, App. A.1: each block is id(x) + res(x) / n_layers**2 (paper: 4 groups x 2 blocks -> 1/64)."""
    torch.manual_seed(0)
    block = Bottleneck(8, 16, n_layers=8)
    x = torch.randn(2, 8, 4, 4)
    assert torch.allclose(block(x), block.id_path(x) + block.res_path(x) / 64)
    enc = Encoder(smoke_cfg(n_groups=4, blocks_per_group=2), 5)
    assert {m.post_gain for m in enc.modules() if isinstance(m, Bottleneck)} == {1 / 64}
    assert [m.kernel_size[0] for m in block.res_path if isinstance(m, torch.nn.Conv2d)] == [3, 3, 3, 1]


@pytest.mark.parametrize("quantizer", ["gumbel", "vq"])
def test_encode_is_deterministic_argmax_and_batched(quantizer, images, one_thread):
    torch.manual_seed(0)
    model = DVAE(smoke_cfg(quantizer=quantizer)).train()
    codes = model.encode(images)
    assert codes.shape == (8, 4, 4) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < model.cfg.vocab_size
    assert torch.equal(codes, model.encode(images))  # no Gumbel noise, no EMA drift
    assert torch.equal(codes, model.encode(images, batch_size=3))  # chunking changes nothing
    assert model.training  # the mode is restored
    if quantizer == "gumbel":  # the paper: argmax of the encoder logits
        logits = model.encoder(losses.map_pixels(losses.to_unit(images)))
        assert torch.equal(codes, logits.argmax(1))


@pytest.mark.parametrize("quantizer,likelihood", COMBOS)
def test_decode_encode_round_trip_shape_and_range(quantizer, likelihood, images, one_thread):
    torch.manual_seed(0)
    model = DVAE(smoke_cfg(quantizer=quantizer, likelihood=likelihood))
    x_hat = model.decode(model.encode(images))
    assert x_hat.shape == (8, 3, 16, 16) and x_hat.dtype == torch.float32
    assert 0 <= x_hat.min() and x_hat.max() <= 1
    assert not x_hat.requires_grad


@pytest.mark.parametrize("quantizer,likelihood", COMBOS)
def test_loss_decreases_on_a_fixed_batch(quantizer, likelihood, images, one_thread):
    """A real learning check: 30 Adam steps on 8 fixed images must cut the loss and the pixel error."""
    torch.manual_seed(0)
    model = DVAE(smoke_cfg(quantizer=quantizer, likelihood=likelihood))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = losses.to_unit(images)
    losses_, errs = [], []
    for _ in range(30):
        out = model(images)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        assert math.isfinite(out["loss"].item())
        losses_.append(out["loss"].item())
        errs.append((out["x_hat"] - x).pow(2).mean().item())
    first, last = losses_[0], sum(losses_[-3:]) / 3
    if likelihood == "mse":
        assert last < 0.8 * first, losses_
    else:  # a log-likelihood (the continuous one goes negative, so a ratio means nothing): a drop of 0.5 nat/subpixel
        assert last < first - 0.5, losses_
        assert sum(errs[-3:]) / 3 < 0.5 * errs[0], errs  # and the viewable reconstruction got closer


def test_gradient_reaches_encoder_through_gumbel_relaxation(images, one_thread):
    torch.manual_seed(0)
    model = DVAE(smoke_cfg(quantizer="gumbel"))
    model.quantizer.kl_weight = 0.0  # only the reconstruction can reach the encoder now
    model.train()(images)["loss"].backward()
    g = model.encoder.input.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0

    model.zero_grad()
    model.eval()(images)["loss"].backward()  # eval: the exact one-hot of the argmax, no relaxation
    g = model.encoder.input.weight.grad
    assert g is None or g.abs().sum() == 0  # so the relaxation is what carried the gradient above


@pytest.mark.parametrize("quantizer", ["gumbel", "vq"])
def test_loss_is_recon_plus_per_image_q_loss_over_pixel_channels(quantizer, images, one_thread):
    """total = mean NLL per pixel-channel + (quantizer loss per image) / (3*H*W), recomputed by hand."""
    torch.manual_seed(0)
    model = DVAE(smoke_cfg(quantizer=quantizer, likelihood="logit_laplace")).eval()  # eval: deterministic quantizer
    if quantizer == "gumbel":
        model.quantizer.kl_weight = 2.0
    out = model(images)
    x = losses.map_pixels(losses.to_unit(images))  # (B, 3, 16, 16)
    B, _, H, W = x.shape
    z = model.encoder(x)
    if quantizer == "gumbel":
        log_q = torch.log_softmax(z, dim=1)  # (B, K, h, w)
        kl = (log_q.exp() * (log_q + math.log(model.cfg.vocab_size))).sum()  # over K, positions and batch
        q_total, z_q = 2.0 * kl, torch.nn.functional.one_hot(z.argmax(1), model.cfg.vocab_size).permute(0, 3, 1, 2).float()
    else:
        e = model.quantizer.codebook  # (K, D)
        d = ((z.permute(0, 2, 3, 1)[..., None, :] - e) ** 2).sum(-1)  # (B, h, w, K)
        z_q = e[d.argmin(-1)].permute(0, 3, 1, 2)  # (B, D, h, w)
        q_total = model.cfg.commitment * ((z - z_q) ** 2).sum()
    mu, log_b = model.decoder(z_q).chunk(2, dim=1)
    # the density by hand: log(2b) + log x + log(1-x) + |logit x - mu| / b, summed over everything
    nll_total = (math.log(2) + log_b + x.log() + (1 - x).log() + ((x / (1 - x)).log() - mu).abs() / log_b.exp()).sum()
    expected = (nll_total + q_total) / (B * 3 * H * W)  # the paper: whole loss / (256*256*3), mean over batch
    assert torch.allclose(out["loss"], expected, rtol=1e-4, atol=1e-6)
    assert torch.allclose(out["recon"], nll_total / (B * 3 * H * W), rtol=1e-4, atol=1e-6)
    assert torch.allclose(out["q_loss"], q_total / B, rtol=1e-4, atol=1e-6)  # per image


def test_paper_preset_parameter_counts_match_the_released_dvae():
    """openai/DALL-E's released encoder has ~54M parameters and its decoder ~44M."""
    counts = paper_parameter_counts()
    assert abs(counts["encoder"] - 54e6) <= 0.01 * 54e6, counts
    assert abs(counts["decoder"] - 44e6) <= 0.01 * 44e6, counts
    assert count_parameters(torch.nn.Conv2d(3, 8, 1)) == 32


def test_bad_inputs_give_clear_errors(images):
    model = DVAE(smoke_cfg())
    with pytest.raises(ConfigError, match="divisible"):
        model(images[:, :14, :14])  # 14 is not a multiple of 4
    with pytest.raises(ConfigError, match="divisible"):
        grid_size(30, get_config("toy").dvae)
    with pytest.raises(ConfigError, match="channels"):
        model(torch.zeros(2, 16, 16, 4, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="channels"):
        model(torch.rand(2, 1, 16, 16))
    with pytest.raises(ConfigError, match="batch"):
        model(torch.rand(3, 16, 16))
    with pytest.raises(DataError, match="255"):
        model(torch.rand(2, 3, 16, 16) * 255)  # 0..255 floats: the pixel map says what to do
    with pytest.raises(ConfigError, match="quantizer"):
        DVAE(smoke_cfg(quantizer="kmeans"))
    with pytest.raises(ConfigError, match="likelihood"):
        DVAE(smoke_cfg(likelihood="l1"))
    with pytest.raises(ConfigError, match=r"\[0, 64\)"):
        model.decode(torch.full((1, 4, 4), 64))
    with pytest.raises(ConfigError, match="integer codes"):
        model.decode(torch.zeros(1, 4, 4))


@pytest.mark.parametrize("quantizer", ["gumbel", "vq"])
def test_state_dict_round_trip_through_safetensors(quantizer, images, tmp_path, one_thread):
    torch.manual_seed(0)
    cfg = smoke_cfg(quantizer=quantizer)
    model = DVAE(cfg)
    model(images)["loss"].backward()  # one training forward: VQ initialises its codebook, health counts
    path = save_checkpoint(tmp_path, 1, model, {"step": 1}, {"dvae": dataclasses.asdict(cfg)})
    torch.manual_seed(1)
    fresh = DVAE(cfg)
    assert not torch.equal(fresh.encoder.input.weight, model.encoder.input.weight)
    state, config = load_checkpoint(path, fresh)
    assert state["step"] == 1 and config["dvae"]["quantizer"] == quantizer
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    assert torch.equal(fresh.encode(images), model.encode(images))
    assert torch.equal(fresh.reconstruct(images), model.reconstruct(images))


@pytest.mark.parametrize("quantizer", ["gumbel", "vq"])
def test_trainer_runs_with_loss_fn_and_schedule_callback(quantizer, tmp_path, one_thread):
    """Update k sees temperature_at(k), the Trainer's convention (update k also uses lr_at(k))."""
    cfg = smoke_cfg(quantizer=quantizer, tau_steps=6, kl_steps=6, schedule_scale=1.0)
    model = DVAE(cfg)
    world = ShapesWorld("train", image_size=16, seed=0)
    seen = []

    def loss_fn(m, batch):
        seen.append((m.quantizer.temperature, m.quantizer.kl_weight) if quantizer == "gumbel" else None)
        return dvae_loss_fn(m, batch)

    tcfg = TrainConfig(max_steps=4, batch_size=4, warmup_steps=1, eval_every=0, ckpt_every=0, log_every=1,
                       device="cpu", out_dir=str(tmp_path))
    trainer = Trainer(model, tcfg, lambda i: world.batch(4 * i, 4), loss_fn, progress=False)
    cb = schedule_callback(cfg)
    trainer.add_callback("on_fit_start", cb)
    trainer.add_callback("on_step_end", cb)
    history = trainer.fit()["train"]
    assert len(history) == 4
    q_key = "kl" if quantizer == "gumbel" else "commitment"
    for rec in history:
        assert {"recon", q_key, "perplexity", "dead"} <= rec.keys()
        assert math.isfinite(rec["loss"]) and rec["perplexity"] >= 1
    if quantizer == "gumbel":
        assert [t for t, _ in seen] == [temperature_at(k, cfg) for k in range(1, 5)]
        assert seen[0][0] < 1.0 and seen[-1][1] > seen[0][1]  # tau falls, beta rises
