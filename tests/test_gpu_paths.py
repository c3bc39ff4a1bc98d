"""The CUDA paths, checked on a CPU: which device each tensor lands on, host syncs, the compiled
sampler's CUDA-graph contract, the prefetching data stream, and the fp32 / EMA / optimizer settings.

No GPU here, so each test makes the GPU's behaviour visible another way: a model on the `meta` device
with a dispatch mode that logs every op whose tensors sit on two devices; a count of the calls that
would make the host wait for a GPU (infra/syncs.py); a stand-in compiled step that, like a CUDA graph,
returns the same output buffer at every replay.
"""

from __future__ import annotations

import math
import threading
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from minidalle import sampling
from minidalle.config import TrainConfig, get_config
from minidalle.errors import ConfigError, DataError
from minidalle.infra.devices import fast_fp32_matmuls
from minidalle.infra.resume import _BatchStream
from minidalle.infra.syncs import count_host_syncs
from minidalle.model import DALLE, Layout, dalle_loss
from minidalle.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in tests/conftest.py


def _smoke():
    cfg = get_config("smoke")
    return cfg, Layout.from_config(cfg)


def _captions(layout: Layout, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, layout.text_vocab, (n, layout.text_len), generator=torch.Generator().manual_seed(seed))


class _DeviceMixing(TorchDispatchMode):
    """Logs every op that receives tensors (of one or more dimensions) from more than one device."""

    def __init__(self):
        super().__init__()
        self.mixed: list[tuple[str, set]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat, _ = tree_flatten((args, kwargs or {}))
        devices = {t.device.type for t in flat if isinstance(t, torch.Tensor) and t.dim() > 0}
        if len(devices) > 1:
            self.mixed.append((str(func), devices))
        return func(*args, **(kwargs or {}))


# --- 1. sample() runs on the model's device -------------------------------------------------------------
@pytest.mark.parametrize("settings", [dict(), dict(guidance=2.0, top_k=4), dict(guidance=2.0, guidance_batched=False),
                                      dict(prime=True)])
def test_sample_moves_a_cpu_caption_to_the_models_device(settings):
    """A caption straight from encode_prompts is on the CPU; the model here is on `meta` (as it would be
    on CUDA). Every op must see one device: before, the embedding mixed cpu ids with meta weights."""
    cfg, lay = _smoke()
    with torch.device("meta"):
        model = DALLE(cfg.model, lay)
    text = _captions(lay, 3)
    if settings.pop("prime", False):
        settings["prime"] = torch.zeros(3, 2, dtype=torch.long)  # on the CPU too
    watch = _DeviceMixing()
    with watch:
        codes = sampling.sample(model, text, top_k=settings.pop("top_k", 0), **settings)
    assert watch.mixed == []
    assert codes.device.type == "meta" and codes.shape == (3, lay.image_len)


def test_sample_reference_also_runs_on_the_models_device():
    cfg, lay = _smoke()
    with torch.device("meta"):
        model = DALLE(cfg.model, lay)
    watch = _DeviceMixing()
    with watch:
        sampling.sample_reference(model, _captions(lay, 2), temperature=1.0)
    assert watch.mixed == []


def test_a_generator_on_another_device_is_refused_naming_both():
    cfg, lay = _smoke()
    with torch.device("meta"):
        model = DALLE(cfg.model, lay)
    with pytest.raises(ConfigError, match=r"generator is on cpu but the model samples on meta.*torch.Generator\(device='meta'\)"):
        sampling.sample(model, _captions(lay, 1), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="generator is on cpu but the model samples on meta"):
        sampling.sample_reference(model, _captions(lay, 1), generator=torch.Generator().manual_seed(0))


def test_bad_caption_ids_are_refused_before_they_move():
    cfg, lay = _smoke()
    with torch.device("meta"):
        model = DALLE(cfg.model, lay)
    text = _captions(lay, 1)
    text[0, 3] = lay.text_classes  # one past the vocabulary
    with pytest.raises(DataError, match="text ids must lie in"):
        sampling.sample(model, text)


# --- 3. the compiled step's CUDA-graph contract -----------------------------------------------------------
def _graph_like_step(model):
    """A compiled step as CUDA graphs run it: the real static step, its output copied into one buffer
    that every replay overwrites (what `mode="reduce-overhead"` hands back)."""
    buffer, seen = {}, []

    def step(kv, code, cell):
        seen.append(kv.data_ptr())
        out = sampling._static_step(model, kv, code, cell)
        if "out" not in buffer or buffer["out"].shape != out.shape:
            buffer["out"] = torch.empty_like(out)
        return buffer["out"].copy_(out)

    return step, seen


@pytest.mark.parametrize("settings", [dict(), dict(guidance=3.0), dict(guidance=3.0, guidance_batched=False)])
def test_the_compiled_path_copies_each_replays_output_and_reuses_one_static_cache(settings):
    """Two-pass guidance runs the step twice per cell: without a copy, the second replay overwrote the
    first's logits and the conditional and unconditional rows became the same."""
    torch.manual_seed(0)
    cfg, lay = _smoke()
    model = DALLE(cfg.model, lay)
    with torch.no_grad():  # peaked logits that depend on the caption, so a lost guidance pass changes codes
        model.image_head.weight.mul_(30)
        model.text_emb.weight.mul_(30)
    text = _captions(lay, 5)
    if settings:
        assert not torch.equal(sampling.sample(model, text, 1.0, generator=torch.Generator().manual_seed(1), **settings),
                               sampling.sample(model, text, 1.0, generator=torch.Generator().manual_seed(1)))
    step, seen = _graph_like_step(model)
    model.__dict__["_compiled_step"] = step
    eager = sampling.sample(model, text, 1.0, generator=torch.Generator().manual_seed(1), chunk_size=2, **settings)
    with pytest.warns(UserWarning, match="on the CPU: the compiled decode step measured no faster than eager"):
        graphed = sampling.sample(model, text, 1.0, generator=torch.Generator().manual_seed(1), chunk_size=2,
                                  compile=True, **settings)
    assert torch.equal(graphed, eager)
    caches = model.__dict__["_kv_caches"]
    # chunks of 2, 2 and 1 rows: one cache per chunk size (and per pass), each reused by every chunk of its size
    slots = 1 if settings.get("guidance_batched", True) else 2
    assert len(caches) == 2 * slots
    assert set(seen) == {c.kv.data_ptr() for c in caches.values()}
    assert all(getattr(c.kv, "_dynamo_static_input_type", None) for c in caches.values())  # marked static
    before = {k: c.kv.data_ptr() for k, c in caches.items()}
    with pytest.warns(UserWarning):
        sampling.sample(model, text, 1.0, compile=True, chunk_size=2, **settings)
    assert {k: c.kv.data_ptr() for k, c in model.__dict__["_kv_caches"].items()} == before  # reused across calls
    sampling.release_caches(model)
    assert "_kv_caches" not in model.__dict__ and "_compiled_step" not in model.__dict__


def test_compile_auto_compiles_on_cuda_only_and_refuses_other_values():
    cpu = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sampling.use_compile("auto", cpu) is False and sampling.use_compile(False, cpu) is False
    assert sampling.use_compile("auto", torch.device("cuda")) is True
    with pytest.warns(UserWarning, match="no faster than eager"):
        assert sampling.use_compile(True, cpu) is True
    with pytest.raises(ConfigError, match="compile='yes' is invalid"):
        sampling.use_compile("yes", cpu)


def test_the_real_compiled_step_reuses_its_graph_across_calls_and_passes():
    """torch.compile of the static step, for real (inductor on the CPU, ~8 s at smoke size): the same codes
    as eager, and one graph for both calls and both guidance passes (the cache's address is static)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    cfg, lay = _smoke()
    model = DALLE(cfg.model, lay)
    text = _captions(lay, 3)
    torch._dynamo.reset()
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            a = sampling.sample(model, text, 0.0, compile=True)
        except Exception as e:  # noqa: BLE001 -- no C++ compiler on this machine
            pytest.skip(f"torch.compile cannot build here: {type(e).__name__}")
        b = sampling.sample(model, text, 0.0, compile=True, guidance=2.0, guidance_batched=False)
    assert torch.equal(a, sampling.sample(model, text, 0.0))
    assert torch.equal(b, sampling.sample(model, text, 0.0, guidance=2.0, guidance_batched=False))
    assert counters["stats"]["unique_graphs"] == 1


# --- 5. host syncs -----------------------------------------------------------------------------------------
def _batches(lay: Layout, B: int = 4):
    def batch_at(i):
        g = torch.Generator().manual_seed(i)
        return (torch.randint(0, lay.text_vocab, (B, lay.text_len), generator=g),
                torch.randint(0, lay.image_vocab, (B, lay.image_len), generator=g))
    return batch_at


def test_a_training_update_reads_the_device_once(tmp_path):
    """The loss, its parts and the grad norm come back in one read per update (eight separate reads
    each made the host wait for the GPU). The ids' range check reads min/max only of CPU tensors."""
    torch.manual_seed(0)
    cfg, lay = _smoke()
    steps = 6
    trainer = Trainer(DALLE(cfg.model, lay), TrainConfig(max_steps=steps, out_dir=str(tmp_path), log_every=100,
                                                         eval_every=0, ema_decay=0.99), _batches(lay), dalle_loss,
                      progress=False)
    with count_host_syncs() as syncs:
        history = trainer.fit()
    places = dict(syncs.by_place)
    on_cpu_only = places.pop("model.py:check_inputs", 0)  # free on the CPU, skipped for GPU tensors (below)
    assert places == {"train.py:_read": steps}, syncs
    assert on_cpu_only == 4 * steps  # text and image, min and max, per forward
    assert all(math.isfinite(r["loss"]) and set(r) >= {"text_loss", "image_loss", "grad_norm"} for r in history["train"])


def test_check_inputs_reads_no_value_from_a_device_tensor():
    cfg, lay = _smoke()
    model = DALLE(cfg.model, lay)
    text = torch.zeros(2, lay.text_len, dtype=torch.long, device="meta")
    with count_host_syncs() as syncs:
        model.check_inputs(text, torch.zeros(2, 3, dtype=torch.long, device="meta"))  # meta: a read would raise
    assert syncs.total == 0
    with pytest.raises(DataError, match="text ids must lie in"):
        model.check_inputs(torch.full((2, lay.text_len), -1), torch.zeros(2, 3, dtype=torch.long))


def test_the_decode_loop_reads_nothing_from_the_device():
    """Only the entry checks of the caption read values; the N steps of the loop read none."""
    torch.manual_seed(0)
    cfg, lay = _smoke()
    model = DALLE(cfg.model, lay)
    sampling.sample(model, _captions(lay, 1))  # key tables and masks built
    with count_host_syncs() as syncs:
        sampling.sample(model, _captions(lay, 4), guidance=2.0, top_k=8, top_p=0.9, return_logp=True)
    assert set(syncs.by_place) <= {"model.py:check_inputs"}, syncs
    assert syncs.total == 2  # min and max of the caption: once per call, not once per code


def test_host_syncs_are_counted_by_kind_and_place():
    with count_host_syncs() as syncs:
        x = torch.arange(4.0)
        x.sum().item()
        bool(x[1] > 0)
        x.tolist()
        x.nonzero()
    assert syncs.total == 4 and syncs.by_kind["read a number"] == 2
    assert syncs.by_kind["read numbers (tolist)"] == 1 and syncs.by_kind["data-shaped op (nonzero)"] == 1
    assert set(syncs.by_place) == {"outside minidalle"}
    assert torch.Tensor.tolist(torch.ones(1)) == [1.0]  # put back as it was


# --- 6. the data stream ---------------------------------------------------------------------------------------
def test_prefetching_gives_the_same_batches_in_the_same_order_from_another_thread():
    made_on = []

    def batch_at(j):
        made_on.append(threading.current_thread().name)
        return torch.full((2,), j)

    plain = _BatchStream(batch_at, seed=0, start=3, rank=1, world=2)
    ahead = _BatchStream(batch_at, seed=0, start=3, rank=1, world=2, prefetch=True, prepare=lambda b: b + 100)
    try:
        for _ in range(5):
            assert torch.equal(ahead.next(), plain.next() + 100)
    finally:
        ahead.close()
    assert any(name.startswith("minidalle-batches") for name in made_on)  # built while the caller worked


def test_an_error_in_the_prefetch_thread_reaches_the_training_loop():
    def batch_at(j):
        if j == 2:
            raise DataError("batch 2 is damaged")
        return torch.zeros(1)

    stream = _BatchStream(batch_at, seed=0, prefetch=True)
    try:
        stream.next(), stream.next()
        with pytest.raises(DataError, match="batch 2 is damaged"):
            stream.next()
    finally:
        stream.close()


def test_a_prefetching_run_trains_exactly_what_a_plain_one_does(tmp_path):
    cfg, lay = _smoke()
    runs = []
    for prefetch in (False, True):
        torch.manual_seed(0)
        trainer = Trainer(DALLE(cfg.model, lay), TrainConfig(max_steps=4, out_dir=str(tmp_path / str(prefetch)),
                                                             eval_every=0), _batches(lay), dalle_loss,
                          progress=False, prefetch=prefetch)
        runs.append([r["loss"] for r in trainer.fit()["train"]])
        assert trainer.prefetch is prefetch
    assert runs[0] == runs[1]
    default = Trainer(DALLE(cfg.model, lay), TrainConfig(max_steps=1, out_dir=str(tmp_path / "d"), eval_every=0),
                      _batches(lay), dalle_loss, progress=False)
    assert default.prefetch is False and default._pin is False  # CPU: no thread, no pinned memory


# --- 8. the smaller settings -----------------------------------------------------------------------------------
def test_tf32_is_turned_on_for_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
    assert fast_fp32_matmuls(torch.device("cpu")) is False and calls == []
    assert fast_fp32_matmuls(torch.device("cuda")) is True and calls == ["high"]


def test_the_ema_is_one_foreach_lerp_equal_to_its_formula(tmp_path, monkeypatch):
    cfg, lay = _smoke()
    torch.manual_seed(0)
    trainer = Trainer(DALLE(cfg.model, lay), TrainConfig(max_steps=1, out_dir=str(tmp_path), eval_every=0,
                                                         ema_decay=0.9), _batches(lay), dalle_loss, progress=False)
    before = {k: v.clone() for k, v in trainer.ema.items()}
    with torch.no_grad():
        for p in trainer.module.parameters():
            p.add_(1.0)
    calls = []
    real = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a: (calls.append(1), real(*a))[1])
    trainer._update_ema()
    state = trainer.module.state_dict()
    assert len(calls) == 1
    for k, old in before.items():
        assert torch.allclose(trainer.ema[k], 0.9 * old + 0.1 * state[k].float(), atol=1e-6)


def test_adamw_is_fused_on_the_cpu(tmp_path):
    cfg, lay = _smoke()
    trainer = Trainer(DALLE(cfg.model, lay), TrainConfig(max_steps=1, out_dir=str(tmp_path), eval_every=0),
                      _batches(lay), dalle_loss, progress=False)
    assert all(g["fused"] for g in trainer.optimizer.param_groups)
