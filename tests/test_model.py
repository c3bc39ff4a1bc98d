"""The DALL·E transformer: embeddings and per-position pads, restricted heads, the 1/8-7/8 loss,
caption dropout, causality of the whole model, the paper's size on the meta device, the sampler."""

import math

import pytest
import torch

from minidalle.config import TransformerConfig, get_config
from minidalle.dvae import count_parameters
from minidalle.errors import ConfigError, DataError
from minidalle.model import DALLE, Layout, dalle_loss, flops_per_token, weighted_loss
from minidalle.sampling import sample_reference

LAYOUT = Layout(text_len=6, text_vocab=20, grid=4, image_vocab=12)


def _model(seed=0, **overrides) -> DALLE:
    torch.manual_seed(seed)
    cfg = TransformerConfig(n_layer=3, n_head=2, head_dim=8, conv_kernel=3, **overrides)
    return DALLE(cfg, LAYOUT)


def _batch(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, LAYOUT.text_vocab, (B, LAYOUT.text_len), generator=g)
    text[:, 4:] = LAYOUT.pad_ids()[4:]  # two padding positions, as caption_ids writes them
    image = torch.randint(0, LAYOUT.image_vocab, (B, LAYOUT.image_len), generator=g)
    return text, image


def test_layout_of_the_presets():
    toy = Layout.from_config(get_config("toy"))
    assert (toy.text_len, toy.text_vocab, toy.grid, toy.image_vocab, toy.length) == (16, 446, 8, 256, 80)
    assert toy.pad_ids().tolist() == list(range(446, 462))  # one padding id per position
    assert Layout.from_config(get_config("paper")).length == 1280


def test_heads_cover_only_their_own_vocabulary():
    model = _model()
    text, image = _batch()
    text_logits, image_logits = model(text, image)
    # position p predicts token p + 1: T - 1 text tokens, then all N image tokens
    assert text_logits.shape == (3, 5, LAYOUT.text_vocab + LAYOUT.text_len)
    assert image_logits.shape == (3, 16, LAYOUT.image_vocab)
    _, partial = model(text, image[:, :7])  # a prefix predicts the codes up to one past it
    assert partial.shape == (3, 8, 12)
    assert torch.allclose(partial, image_logits[:, :8], atol=1e-5)  # and agrees with the whole sequence


def test_each_padding_position_has_its_own_learned_token():
    model = _model()
    pads = LAYOUT.pad_ids()
    assert model.text_emb.num_embeddings == LAYOUT.text_vocab + LAYOUT.text_len
    rows = model.text_emb.weight[pads]  # (T, C): distinct vectors, not one shared pad
    assert torch.cdist(rows, rows).fill_diagonal_(1.0).min() > 0
    text, image = _batch()
    loss, _ = dalle_loss(model, (text, image))
    loss.backward()
    assert model.text_emb.weight.grad[pads[4:]].abs().sum() > 0  # pads are inputs that learn, not -inf masks


def test_weighted_loss_on_a_hand_made_batch():
    # Logits that score the target c and every other class 0: cross-entropy = log(V - 1 + e^c) - c.
    def logits_for(targets, V, c):
        out = torch.zeros(*targets.shape, V)
        out.scatter_(-1, targets.unsqueeze(-1), c)
        return out

    text_t = torch.tensor([[1, 2, 3]])  # 3 text tokens, CE a each
    image_t = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])[:1]  # 5 image tokens, CE b each
    a = math.log(9 + math.exp(1.0)) - 1.0  # V_text = 10, c = 1
    b = math.log(11 + math.exp(3.0)) - 3.0  # K = 12, c = 3
    loss, parts = weighted_loss(logits_for(text_t, 10, 1.0), text_t, logits_for(image_t, 12, 3.0), image_t)
    assert float(parts["text_loss"]) == pytest.approx(a, rel=1e-6)
    assert float(parts["image_loss"]) == pytest.approx(b, rel=1e-6)
    assert loss.item() == pytest.approx(a / 8 + 7 * b / 8, rel=1e-6)
    # each mean is over its own count: ten times the image tokens leaves the loss where it was
    many = image_t.repeat(1, 10)
    loss10, _ = weighted_loss(logits_for(text_t, 10, 1.0), text_t, logits_for(many, 12, 3.0), many)
    assert loss10.item() == pytest.approx(loss.item(), rel=1e-6)
    loss_w, _ = weighted_loss(logits_for(text_t, 10, 1.0), text_t, logits_for(image_t, 12, 3.0), image_t, 0.5, 0.5)
    assert loss_w.item() == pytest.approx((a + b) / 2, rel=1e-6)


def test_dalle_loss_uses_the_configured_weights():
    model = _model(text_loss_weight=0.0, image_loss_weight=1.0).eval()
    loss, parts = dalle_loss(model, _batch())
    assert loss.item() == pytest.approx(float(parts["image_loss"]), rel=1e-5)
    assert parts["text_loss"] > 0


def test_caption_dropout_replaces_whole_captions_by_the_padding_caption():
    model = _model()
    text = _batch(B=2000)[0]
    assert torch.equal(model.caption_dropout(text, 0.0), text)
    assert torch.equal(model.caption_dropout(text, 1.0), LAYOUT.pad_ids().expand_as(text))
    out = model.caption_dropout(text, 0.25, torch.Generator().manual_seed(0))
    dropped = (out == LAYOUT.pad_ids()).all(dim=1)
    kept = (out == text).all(dim=1)
    assert torch.all(dropped | kept)  # a caption goes whole or not at all
    assert 0.2 < dropped.float().mean() < 0.3


def test_bad_ids_and_lengths_are_refused_with_the_reason():
    model = _model()
    text, image = _batch()
    with pytest.raises(DataError, match=r"text ids must lie in \[0, 26\)"):
        model(text + 100, image)
    with pytest.raises(DataError, match=r"image ids must lie in \[0, 12\)"):
        model(text, image + 12)
    with pytest.raises(DataError, match="shape \\(batch, 6\\)"):
        model(text[:, :5], image)
    with pytest.raises(DataError, match="no next one"):
        model.next_image_logits(text, image)


def test_the_whole_model_is_causal():
    """The gradient of the logits at position t with respect to the embedded inputs after t is
    exactly zero, through every layer kind; inputs up to t do reach it."""
    model = _model(seed=1).eval()
    text, image = _batch(B=1)
    seen = {}
    hook = model.drop.register_forward_hook(lambda m, i, out: seen.update(x=out.retain_grad() or out))
    text_logits, image_logits = model(text, image)
    hook.remove()
    # output p predicts token p + 1: text logits at 0..T-2, image logits at T-1..L-2
    outputs = list(text_logits[0]) + list(image_logits[0])  # L - 1 vectors
    x = seen["x"]  # (1, L, C), the embeddings the blocks read
    for t, out in enumerate(outputs):
        x.grad = None
        out.sum().backward(retain_graph=True)
        reached = x.grad[0].abs().sum(dim=1) != 0
        assert not reached[t + 1:].any(), f"logits at {t} depend on a later input"
        assert reached[: t + 1].any()


def test_paper_preset_has_about_12_billion_parameters_on_the_meta_device():
    cfg = get_config("paper")
    with torch.device("meta"):
        model = DALLE.from_config(cfg)
    n = count_parameters(model)
    assert abs(n - 12e9) / 12e9 < 0.03, n
    assert model.layout.length == 1280 and model.kinds[-1] == "conv"
    assert cfg.model.n_head * cfg.model.head_dim == 3968


def test_flops_per_token_by_hand():
    cfg = TransformerConfig(n_layer=2, n_head=2, head_dim=4, mlp_ratio=4, conv_kernel=3)
    lay = Layout(text_len=4, text_vocab=10, grid=4, image_vocab=8)
    d = 8
    weights = 2 * (4 * d * d + 8 * d * d) + d * (14 + 8)
    f = flops_per_token(cfg, lay, density=0.5)
    assert f["weights"] == 6 * weights
    assert f["attention"] == 12 * 2 * d * 20 * 0.5


def test_sampler_draws_codes_in_range_reproducibly_and_greedy_is_the_argmax():
    model = _model()
    text = _batch(B=2)[0]
    a = sample_reference(model, text, 1.0, generator=torch.Generator().manual_seed(3))
    b = sample_reference(model, text, 1.0, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 16) and torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < 12
    greedy = sample_reference(model, text, 0.0)
    with torch.no_grad():
        first = model.next_image_logits(text, greedy[:, :5]).argmax(-1)
    assert torch.equal(first, greedy[:, 5])
    assert model.training  # the sampler puts the mode back
    with pytest.raises(ConfigError, match="temperature"):
        sample_reference(model, text, -1.0)


def test_a_small_model_fits_one_batch():
    """Loss falls on a fixed batch: the model, the loss and the optimizer are wired together."""
    model = _model(caption_dropout=0.0)
    batch = _batch(B=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss, _ = dalle_loss(model, batch)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


def test_init_goes_through_the_one_rule_for_every_parameter(monkeypatch):
    """__init__ fills each parameter with init_parameter, the rule the meta-device (FSDP) path uses too."""
    seen, real = [], DALLE.init_parameter
    monkeypatch.setattr(DALLE, "init_parameter", lambda self, name, t, generator=None: seen.append(name) or
                        real(self, name, t, generator))
    cfg = TransformerConfig(n_layer=8, n_head=4, head_dim=16, conv_kernel=3)
    model = DALLE(cfg, Layout(text_len=8, text_vocab=50, grid=4, image_vocab=64), compile_flex=False)
    names = [n for n, _ in model.named_parameters()]
    assert set(seen) == set(names) and len(seen) == len(names) + 2 * cfg.n_layer  # residual ones drawn twice
    params = dict(model.named_parameters())
    residual = torch.cat([params[f"blocks.{i}.{w}.weight"].flatten() for i in range(8) for w in ("proj", "mlp.2")])
    plain = torch.cat([params[f"blocks.{i}.qkv.weight"].flatten() for i in range(8)])
    assert abs(residual.std().item() - 0.02 / math.sqrt(16)) < 5e-4 and abs(plain.std().item() - 0.02) < 1e-3
    assert all(torch.all(params[f"blocks.{i}.ln1.weight"] == 1) for i in range(8))
