"""The cached sampler against the reference: logits at every step for every layer kind and a whole
model, identical codes under the same seed (filters, guidance, priming), determinism, chunking, the
filters themselves, prompts from people, the likelihood score, and bad settings."""

import pytest
import torch

from minidalle.config import TransformerConfig
from minidalle.errors import ConfigError, DataError
from minidalle.model import DALLE, Layout
from minidalle.sampling import KVCache, _static_step, decode_step, encode_prompts, filter_logits, guide, log_likelihood, pick, prefill, rows_per_chunk, sample, sample_reference, warn_unguided

LAYOUT = Layout(text_len=6, text_vocab=20, grid=4, image_vocab=12)


def _model(seed=0, n_layer=3, kind=None, layout=LAYOUT, **overrides) -> DALLE:
    torch.manual_seed(seed)
    cfg = TransformerConfig(n_layer=n_layer, n_head=2, head_dim=8, conv_kernel=3, **overrides)
    model = DALLE(cfg, layout).eval()
    if kind is not None:  # every block of one kind, to test each mask's cache reads on its own
        for block in model.blocks:
            block.kind = kind
    return model


def _text(B=3, seed=0, layout=LAYOUT):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, layout.text_vocab, (B, layout.text_len), generator=g)
    text[:, 4:] = layout.pad_ids()[4:]
    return text


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", ["row", "column", "conv", None])
def test_cached_logits_equal_the_full_forward_at_every_step(kind):
    """None = the model's own schedule (row, column, conv). A 5x5 grid so the conv window wraps."""
    layout = Layout(text_len=6, text_vocab=20, grid=5, image_vocab=12)
    model = _model(kind=kind, layout=layout, n_layer=2 if kind else 3)
    text = _text(2, layout=layout)
    image = torch.randint(0, 12, (2, layout.image_len), generator=_gen(5))
    cache = KVCache(model, 2, "cpu", torch.float32)
    with torch.no_grad():
        worst = (prefill(model, cache, text, image[:, :0]) - model.next_image_logits(text, image[:, :0])).abs().max()
        for cell in range(layout.image_len - 1):
            got = decode_step(model, cache, image[:, cell:cell + 1], cell)
            worst = max(worst, (got - model.next_image_logits(text, image[:, :cell + 1])).abs().max())
    assert worst < 1e-4


def test_each_kind_reads_only_what_its_mask_allows():
    model = _model()
    T, G = LAYOUT.text_len, LAYOUT.grid
    p = T + 9  # image cell 9 = row 2, column 1
    row = KVCache.keys(model, "row", p, "cpu").tolist()
    col = KVCache.keys(model, "column", p, "cpu").tolist()
    assert row == list(range(T)) + [T + c for c in range(9 - G, 10)]  # text, then the G + 1 latest cells
    assert col == list(range(T)) + [T + 1, T + 5, T + 8, T + 9]  # text, the column above, the cell on the left
    assert len(KVCache.keys(model, "conv", p, "cpu")) < p + 1  # fewer than the whole prefix


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.0), dict(top_k=3), dict(top_p=0.6),
                                      dict(temperature=0.7, top_k=5, top_p=0.9), dict(guidance=3.0),
                                      dict(guidance=2.0, guidance_batched=False), dict(guidance=0.0)])
def test_cached_sampler_draws_the_reference_codes_under_the_same_seed(settings):
    model = _model()
    text = _text(4)
    batched = settings.pop("guidance_batched", True)
    got = sample(model, text, generator=_gen(), guidance_batched=batched, **settings)
    want = sample_reference(model, text, generator=_gen(), **settings)
    assert got.shape == (4, LAYOUT.image_len) and torch.equal(got, want)
    assert int(got.min()) >= 0 and int(got.max()) < LAYOUT.image_vocab


def test_priming_keeps_the_given_rows_and_completes_the_rest_as_the_reference_does():
    model = _model()
    text = _text(2)
    prime = torch.randint(0, 12, (2, 2 * LAYOUT.grid), generator=_gen(7))  # the first two rows of the image
    got = sample(model, text, prime=prime, generator=_gen())
    assert torch.equal(got[:, :8], prime)
    assert torch.equal(got, sample_reference(model, text, prime=prime, generator=_gen()))
    with pytest.raises(DataError, match="prime"):
        sample(model, text, prime=torch.zeros(2, LAYOUT.image_len, dtype=torch.long))
    with pytest.raises(DataError, match="prime codes"):
        sample(model, text, prime=torch.full((2, 3), 99))


def test_same_seed_same_codes_other_seed_other_codes_and_the_mode_is_put_back():
    model = _model()
    model.train()
    text = _text(4)
    a, b = sample(model, text, generator=_gen(3)), sample(model, text, generator=_gen(3))
    assert torch.equal(a, b) and model.training
    assert not torch.equal(a, sample(model, text, generator=_gen(4)))


def test_chunks_change_nothing_when_no_random_numbers_are_drawn():
    model = _model()
    text = _text(5)
    whole = sample(model, text, temperature=0.0)
    assert torch.equal(whole, sample(model, text, temperature=0.0, chunk_size=2))
    assert torch.equal(whole, sample(model, text, temperature=0.0, chunk_size=1, guidance=1.0))


def test_the_static_decode_step_for_compile_gives_the_same_logits():
    model = _model()
    text, image = _text(2), torch.randint(0, 12, (2, LAYOUT.image_len), generator=_gen(2))
    a, b = KVCache(model, 2, "cpu", torch.float32), KVCache(model, 2, "cpu", torch.float32)
    with torch.no_grad():
        prefill(model, a, text, image[:, :0]), prefill(model, b, text, image[:, :0])
        for cell in range(LAYOUT.image_len - 1):
            x = decode_step(model, a, image[:, cell:cell + 1], cell)
            y = _static_step(model, b.kv, image[:, cell:cell + 1], torch.tensor(cell))
            assert (x - y).abs().max() < 1e-5


def test_bf16_autocast_samples_valid_codes_on_cpu():
    model = _model()
    codes = sample(model, _text(2), precision="bf16", generator=_gen())
    assert codes.shape == (2, 16) and int(codes.max()) < 12


def test_top_k_and_top_p_keep_what_they_say():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    kept_k = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept_k.tolist() == [[True, True, False, False], [False, False, True, True]]
    kept_p = torch.isfinite(filter_logits(logits, top_p=0.75))  # 0.5 + 0.3 reaches 0.75
    assert kept_p.tolist() == [[True, True, False, False], [False, False, True, True]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).sum(1).tolist() == [1, 1]  # the top code always stays
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=1.0)).all()
    draws = torch.cat([pick(logits, 1.0, top_k=1, generator=_gen(s)) for s in range(20)], 1)
    assert (draws[0] == 0).all() and (draws[1] == 3).all()
    assert pick(logits, 0.0).squeeze(1).tolist() == [0, 3]


def test_guidance_moves_away_from_the_unconditional_prediction():
    cond, uncond = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert torch.equal(guide(cond, uncond, 1.0), cond)
    assert torch.equal(guide(cond, uncond, 0.0), uncond)
    assert guide(cond, uncond, 3.0).tolist() == [[4.0, -2.0]]


@pytest.mark.parametrize("settings,match", [(dict(temperature=-1.0), "temperature"),
                                            (dict(temperature=float("nan")), "temperature"),
                                            (dict(top_k=-2), "top_k"), (dict(top_k=1.5), "top_k"),
                                            (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                                            (dict(guidance=-1.0), "guidance"), (dict(chunk_size=0), "chunk_size")])
def test_bad_settings_are_refused_by_name(settings, match):
    with pytest.raises(ConfigError, match=match):
        sample(_model(), _text(1), **settings)


def test_bad_caption_ids_are_refused_before_sampling():
    with pytest.raises(DataError, match="text ids"):
        sample(_model(), torch.full((1, LAYOUT.text_len), 999))


def test_log_likelihood_is_the_sum_of_each_codes_log_probability():
    model = _model()
    text = _text(2)
    codes, drawn_logp = sample(model, text, generator=_gen(), return_logp=True, guidance=2.0)
    want = torch.zeros(2)
    with torch.no_grad():
        for cell in range(LAYOUT.image_len):
            logp = torch.log_softmax(model.next_image_logits(text, codes[:, :cell]), -1)
            want += logp.gather(1, codes[:, cell:cell + 1]).squeeze(1)
    assert torch.allclose(log_likelihood(model, text, codes, batch_size=1), want, atol=1e-4)
    assert torch.allclose(drawn_logp, want, atol=1e-4)  # the sampler's running sum: the caption's model, not the guided one


def test_rows_per_chunk_follows_the_budget():
    model = _model()
    per_row = KVCache.bytes_per_row(model, torch.float32)
    assert per_row == 2 * 3 * 16 * LAYOUT.length * 4  # k and v, 3 layers, d 16, L positions, fp32
    small, large = rows_per_chunk(model, "cpu", torch.float32, 40 * per_row), rows_per_chunk(model, "cpu", torch.float32, 400 * per_row)
    assert 1 <= small < large <= 400
    assert rows_per_chunk(model, "cpu", torch.float32, 1) == 1
    assert rows_per_chunk(model, "cpu", torch.float32, 10 ** 15, limit=64) == 64


def test_guidance_on_a_model_without_caption_dropout_warns():
    with pytest.warns(UserWarning, match="caption dropout"):
        warn_unguided(_model(caption_dropout=0.0), 3.0)


class _Tok:  # a stand-in BPE: one id per character, lowercasing like the real one
    lowercase = True

    def encode(self, text, dropout=0.0, seed=None):
        return [ord(c) % 20 for c in text.lower()]

    def encode_to_length(self, text, length, pad_id, truncate=False):
        ids = self.encode(text)
        if len(ids) > length and not truncate:
            raise DataError(f"text encodes to {len(ids)} tokens, more than the model's {length}")
        return ids[:length] + [pad_id] * (length - len(ids[:length])), len(ids) > length


def test_prompts_from_people_are_refused_or_flagged():
    text, notes = encode_prompts(_Tok(), ["A b", "ab\u00e9"], LAYOUT)
    assert text.shape == (2, 6) and text[0, 3:].tolist() == LAYOUT.pad_ids()[3:].tolist()
    assert notes[0]["lowercased"] and not notes[1]["lowercased"]
    assert notes[1]["unusual_characters"] == "\u00e9" and notes[0]["unusual_characters"] == ""
    for bad, match in (([], "no prompts"), ([""], "prompt 1 is empty"), (["ok", "  "], "prompt 2 is empty"),
                       (["much too long"], "does not fit")):
        with pytest.raises(DataError, match=match):
            encode_prompts(_Tok(), bad, LAYOUT)
    cut, notes = encode_prompts(_Tok(), ["much too long"], LAYOUT, truncate=True)
    assert notes[0]["cut"] and cut.shape == (1, 6)


def test_every_path_runs_the_one_block_step(monkeypatch):
    """Training, prefill, the cached decode step and the static (compiled) step all go through Block.step,
    so the block's maths exists once; and a model whose step is changed changes on every path."""
    from minidalle.model import Block

    model, text = _model(), _text(B=2)
    calls, real = [], Block.step

    def counted(self, x, attend_fn):
        calls.append(x.shape[1])
        return real(self, x, attend_fn)

    monkeypatch.setattr(Block, "step", counted)
    image = torch.randint(0, LAYOUT.image_vocab, (2, 5), generator=_gen())
    model.train()
    model(text, image)
    model.eval()
    with torch.no_grad():
        cache = KVCache(model, 2, "cpu", torch.float32)
        prefill(model, cache, text, image[:, :3])
        decode_step(model, cache, image[:, 3:4], 3)
        _static_step(model, cache.kv, image[:, 4:5], torch.tensor(4))
    n = model.cfg.n_layer
    assert calls == [LAYOUT.text_len + 5] * n + [LAYOUT.text_len + 3] * n + [1] * n + [1] * n

    monkeypatch.setattr(Block, "step", lambda self, x, attend_fn: real(self, x, attend_fn) * 0)
    with torch.no_grad():
        cache = KVCache(model, 2, "cpu", torch.float32)
        zeroed = prefill(model, cache, text, image[:, :3])
    assert torch.allclose(zeroed, model.image_head(model.ln_f(torch.zeros_like(model.embed(text, image[:, :3]))[:, -1])))
