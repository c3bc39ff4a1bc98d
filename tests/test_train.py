"""The generic training loop: schedule, optimizer groups, clipping, logging, eval, exact resume, errors."""

import json
import math
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from minidalle.config import TrainConfig, get_config
from minidalle.errors import CheckpointError, ConfigError, MinidalleError
from minidalle.infra.devices import set_fused, use_fused
from minidalle.infra.resume import read_metrics
from minidalle.train import Trainer, configure_optimizer, lr_at
from minidalle.infra.devices import pick_device, rng_isolated, seed_everything



pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in tests/conftest.py


class Net(torch.nn.Module):
    """Dropout makes every update depend on the torch RNG, so resume must restore it exactly."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm = torch.nn.Linear(4, 16), torch.nn.LayerNorm(16)
        self.drop, self.fc2 = torch.nn.Dropout(0.5), torch.nn.Linear(16, 1)

    def forward(self, x):  # (B, 4) -> (B, 1)
        return self.fc2(self.drop(torch.tanh(self.norm(self.fc1(x)))))


def make_model(seed=0):
    torch.manual_seed(seed)
    return Net()


def batch_at(i):
    g = torch.Generator().manual_seed(i)
    x = torch.randn(8, 4, generator=g)
    return x, x.sum(1, keepdim=True)


def loss_fn(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def cfg_for(tmp_path, **kw):
    base = dict(max_steps=10, warmup_steps=2, eval_every=0, ckpt_every=0, log_every=1, lr=1e-2, min_lr=1e-3,
                out_dir=str(tmp_path))
    return TrainConfig(**{**base, **kw})


def fit(tmp_path, data=batch_at, model=None, resume=False, callbacks=(), eval_data=None, **kw):
    trainer = Trainer(model or make_model(), cfg_for(tmp_path, **kw), data, loss_fn, eval_data=eval_data,
                      progress=False)
    for event, fn in callbacks:
        trainer.add_callback(event, fn)
    return trainer, trainer.fit(resume=resume)


def losses(history):
    return [r["loss"] for r in history["train"]]


# --- small pure pieces ------------------------------------------------------------------------------

def test_lr_schedule_shape():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    lrs = [lr_at(s, cfg) for s in range(1, 111)]
    warm, decay = lrs[:10], lrs[9:]
    assert all(a < b for a, b in zip(warm, warm[1:])), "warm-up must rise"
    assert all(b - a == pytest.approx(warm[0]) for a, b in zip(warm, warm[1:])), "warm-up must be linear"
    assert lr_at(10, cfg) == pytest.approx(cfg.lr) and lr_at(110, cfg) == pytest.approx(cfg.min_lr)
    assert all(a >= b for a, b in zip(decay, decay[1:])), "decay must never rise"
    assert lr_at(60, cfg) == pytest.approx((cfg.lr + cfg.min_lr) / 2)  # cosine is half-way at the middle
    assert lr_at(35, cfg) > (lr_at(10, cfg) + lr_at(60, cfg)) / 2  # concave start: cosine, not linear
    assert min(lrs) >= cfg.min_lr and lr_at(500, cfg) == cfg.min_lr
    assert lr_at(5, TrainConfig(warmup_steps=0, max_steps=10, lr=1.0, min_lr=0.0)) < 1.0  # no warm-up is fine


def test_trainer_uses_the_schedule(tmp_path):
    trainer, hist = fit(tmp_path, max_steps=7, warmup_steps=3)
    assert [r["lr"] for r in hist["train"]] == [lr_at(s, trainer.cfg) for s in range(1, 8)]


def test_pick_device():
    assert pick_device() == torch.device("cuda" if torch.cuda.is_available() else
                                         "mps" if torch.backends.mps.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="banana"):
        pick_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="not available"):
            pick_device("cuda")


def test_seed_everything_and_rng_isolated():
    draw = lambda: (random.random(), np.random.rand(), torch.rand(1).item())  # noqa: E731
    seed_everything(3)
    a = draw()
    seed_everything(3)
    assert draw() == a
    seed_everything(4)
    expected_next = draw()
    seed_everything(4)
    with rng_isolated(123):
        inside = draw()
    assert draw() == expected_next and inside != expected_next  # the block left the outer stream alone


def test_weight_decay_skips_biases_and_norms():
    model = Net()
    opt = configure_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed == {id(model.fc1.weight), id(model.fc2.weight)}
    assert plain == {id(model.fc1.bias), id(model.fc2.bias), id(model.norm.weight), id(model.norm.bias)}


def test_the_optimizer_is_fused_on_a_cpu_and_a_resume_sets_it_again(tmp_path):
    trainer, _ = fit(tmp_path, max_steps=3, ckpt_every=3)
    assert all(g["fused"] is True for g in trainer.optimizer.param_groups)
    assert use_fused(list(Net().parameters()), TrainConfig(parallel="fsdp")) is None  # sharded: torch's default
    net = Net()
    fused = configure_optimizer(net, TrainConfig())
    plain = torch.optim.AdamW([{"params": g["params"]} for g in fused.param_groups])  # a state without the flag
    fused.load_state_dict(plain.state_dict())
    assert fused.param_groups[0]["fused"] is None  # what torch does on its own: the flag follows the state
    set_fused(fused, True)
    assert all(g["fused"] is True and g["foreach"] is None for g in fused.param_groups)
    resumed, _ = fit(tmp_path, max_steps=5, resume=True)
    assert resumed.started_at == 3 and all(g["fused"] is True for g in resumed.optimizer.param_groups)


# --- the loop ----------------------------------------------------------------------------------------

def test_loss_goes_down(tmp_path):
    _, hist = fit(tmp_path, max_steps=60, lr=3e-2)
    assert np.mean(losses(hist)[-10:]) < 0.5 * np.mean(losses(hist)[:10])


def test_grad_clipping_clips(tmp_path):
    def grad_norm(trainer):
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model.parameters()])).item()

    for clip in (0.5, 0.0):
        seen = []
        _, hist = fit(tmp_path / str(clip), grad_clip=clip, max_steps=5,
                      callbacks=[("on_before_optimizer_step", lambda t: seen.append(grad_norm(t)))])
        logged = [r["grad_norm"] for r in hist["train"]]
        assert min(logged) > 0.5, "the test needs gradients bigger than the clip to mean anything"
        if clip:
            assert max(seen) <= clip * (1 + 1e-4)  # applied gradients are clipped...
        else:
            assert seen == pytest.approx(logged)  # ...and untouched when clipping is off


def test_metrics_jsonl_and_eval_steps(tmp_path):
    fired = []
    trainer, hist = fit(tmp_path, max_steps=10, log_every=3, eval_every=4, eval_batches=2,
                        eval_data=lambda i: batch_at(1000 + i), callbacks=[("on_eval", lambda t: fired.append(
                            (t.step, t.last_eval["loss"], _eval_loss(t.model))))])
    assert [f[0] for f in fired] == [4, 8]
    for _, reported, independent in fired:  # eval = mean loss over eval_batches batches, dropout off
        assert reported == pytest.approx(independent)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [(r["step"], r["split"]) for r in rows] == [(3, "train"), (4, "eval"), (6, "train"), (8, "eval"),
                                                       (9, "train"), (10, "train")]
    by_step = {r["step"]: r for r in hist["train"]}
    for r in rows:
        if r["split"] == "train":
            assert r["loss"] == by_step[r["step"]]["loss"] and {"lr", "grad_norm"} <= set(r)
    assert read_metrics(tmp_path) == rows


def _eval_loss(model):
    was, dev = model.training, next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        out = np.mean([loss_fn(model, [t.to(dev) for t in batch_at(1000 + i)]).item() for i in range(2)])
    model.train(was)
    return out


def test_extras_are_logged(tmp_path):
    def loss_with_extras(model, batch):
        loss = loss_fn(model, batch)
        return loss, {"double": 2 * loss.item()}
    trainer = Trainer(make_model(), cfg_for(tmp_path, max_steps=3), batch_at, loss_with_extras, progress=False)
    hist = trainer.fit()
    assert all(r["double"] == pytest.approx(2 * r["loss"]) for r in hist["train"])


def test_request_stop_saves_a_checkpoint(tmp_path):
    stop_at_4 = ("on_step_end", lambda t: t.step == 4 and t.request_stop())
    trainer, hist = fit(tmp_path, callbacks=[stop_at_4])
    assert len(hist["train"]) == 4 and trainer.last_checkpoint.name == "step_0000004"


def test_train_seconds_carry_over_a_resume_and_stop_with_fit(tmp_path):
    import time

    stop_at_4 = ("on_step_end", lambda t: t.step == 4 and t.request_stop())
    first, _ = fit(tmp_path, callbacks=[stop_at_4])
    spent = first.train_seconds
    time.sleep(0.05)
    assert first.train_seconds == spent > 0  # not a clock that keeps running after fit returned
    second, _ = fit(tmp_path, resume=True)
    assert second.started_at == 4 and 0 < second.seconds_before <= spent  # saved a moment before fit returned
    assert second.train_seconds > second.seconds_before


# --- exact resume ------------------------------------------------------------------------------------

def _split_run(tmp_path, data, k, **kw):
    """Train to step k, stop, then resume in a fresh Trainer (fresh model object) to max_steps."""
    _, first = fit(tmp_path, data, callbacks=[("on_step_end", lambda t: t.step == k and t.request_stop())], **kw)
    _, second = fit(tmp_path, data, model=make_model(seed=99), resume=True, **kw)
    return losses(first) + losses(second), [r["step"] for r in second["train"]]


def test_resume_reproduces_uninterrupted_run(tmp_path):
    _, straight = fit(tmp_path / "a", max_steps=12, eval_every=5, eval_data=batch_at)
    split, resumed_steps = _split_run(tmp_path / "b", batch_at, k=5, max_steps=12, eval_every=5, eval_data=batch_at)
    assert resumed_steps == list(range(6, 13))
    assert split == losses(straight)  # bit-identical, dropout masks included
    _, other_seed = fit(tmp_path / "c", max_steps=12, seed=7)
    assert losses(other_seed) != losses(straight), "dropout must make the losses RNG-dependent"
    rows = [r for r in read_metrics(tmp_path / "b") if r["split"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 13)) and [r["loss"] for r in rows] == split


def test_resume_with_shuffled_dataloader_across_epochs(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 4, generator=g)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4, shuffle=True)  # 6 per epoch
    _, straight = fit(tmp_path / "a", loader, max_steps=14)
    split, _ = _split_run(tmp_path / "b", loader, k=8, max_steps=14)  # resume mid-epoch 2, finish in epoch 3
    assert split == losses(straight)


def test_metrics_after_crash_are_rewritten_once(tmp_path):
    fit(tmp_path, max_steps=8, ckpt_every=4)
    newest = tmp_path / "checkpoints" / "step_0000008"
    for f in newest.iterdir():  # pretend the run died after logging step 8 but before checkpointing it
        f.unlink()
    newest.rmdir()
    _, hist = fit(tmp_path, max_steps=8, ckpt_every=4, resume=True)
    assert [r["step"] for r in hist["train"]] == [5, 6, 7, 8]
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 9))  # no duplicated steps 5..8


def test_resume_warns_about_a_changed_config_naming_each_key(tmp_path):
    stop_at_2 = ("on_step_end", lambda t: t.step == 2 and t.request_stop())
    fit(tmp_path, max_steps=4, callbacks=[stop_at_2])  # one checkpoint, at step 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the very same config: not a single warning
        fit(tmp_path, max_steps=4, resume=True)  # finishes, checkpoint at step 4
    with pytest.warns(UserWarning, match="differs") as caught:  # train longer, with a longer warm-up
        trainer, hist = fit(tmp_path, max_steps=8, warmup_steps=3, resume=True)
    assert len(caught) == 1
    assert str(caught[0].message).splitlines()[1:] == ["  train.max_steps: 4 -> 8", "  train.warmup_steps: 2 -> 3"]
    assert [r["step"] for r in hist["train"]] == [5, 6, 7, 8]
    assert [r["lr"] for r in hist["train"]] == [lr_at(s, cfg_for(tmp_path, max_steps=8, warmup_steps=3))
                                                for s in range(5, 9)]  # the run follows the new values


def test_fresh_fit_refuses_a_used_out_dir_and_resume_true_starts_fresh(tmp_path):
    _, hist = fit(tmp_path, max_steps=3, resume=True)  # nothing to resume: starts at step 1
    assert hist["train"][0]["step"] == 1
    with pytest.raises(CheckpointError, match="resume=True"):
        fit(tmp_path, max_steps=3)


def test_a_whole_config_is_refused_with_what_to_pass(tmp_path):
    config = get_config("smoke", {"train.out_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"TrainConfig of one stage.*not a Config.*config="):
        Trainer(make_model(), config, batch_at, loss_fn)


def test_messages_name_the_section_the_trainer_was_given(tmp_path):
    cfg = get_config("smoke", {"dvae_train.out_dir": str(tmp_path), "dvae_train.eval_every": 5}).dvae_train
    with pytest.warns(UserWarning, match=r"dvae_train\.eval_every=5"):
        Trainer(make_model(), cfg, batch_at, loss_fn, section="dvae_train", progress=False)


def test_full_config_is_saved(tmp_path):
    config = get_config("smoke", {"train.out_dir": str(tmp_path), "train.max_steps": 2, "train.eval_every": 0})
    trainer = Trainer(make_model(), config.train, batch_at, loss_fn, config=config)  # progress bar on, as by default
    trainer.fit()
    saved = json.loads((trainer.last_checkpoint / "config.json").read_text())
    assert saved == json.loads(config.to_json())


# --- clear errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("keep_last", 1), ("max_steps", 0), ("min_lr", 1.0), ("grad_clip", -1.0),
                                         ("log_every", 0)])
def test_bad_config_is_refused_up_front(tmp_path, field, value):
    with pytest.raises(ConfigError, match=f"train.{field}"):
        Trainer(make_model(), cfg_for(tmp_path, **{field: value}), batch_at, loss_fn)


@pytest.mark.parametrize("bad_loss,message", [
    (lambda m, b, s: F.mse_loss(m(b[0]), b[1], reduction="none"), r"step 1: .*shape \(8, 1\).*scalar"),
    (lambda m, b, s: loss_fn(m, b[:2]) * (math.nan if s == 3 else 1.0), r"step 3: loss is nan"),
    (lambda m, b, s: loss_fn(m, b[:2]).detach(), r"step 1: .*does not require grad"),
    (lambda m, b, s: 0.5, r"step 1: loss_fn returned float"),
])
def test_bad_loss_names_the_step(tmp_path, bad_loss, message):
    def loss(model, batch):
        return bad_loss(model, batch, batch[2])
    trainer = Trainer(make_model(), cfg_for(tmp_path, max_steps=5), lambda i: (*batch_at(i), i + 1), loss,
                      progress=False)
    with pytest.raises(MinidalleError, match=message):
        trainer.fit()
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_unknown_callback_event(tmp_path):
    trainer = Trainer(make_model(), cfg_for(tmp_path), batch_at, loss_fn, progress=False)
    with pytest.raises(MinidalleError, match="on_step_end"):
        trainer.add_callback("on_step_ending", print)


# --- real-data epochs: a new order each epoch, exact on resume ----------------------------------------

def _numbered_folder(root, n=10):
    """n 4x4 images whose pixels all equal 20 * index, each with a caption: a FolderDataset."""
    from PIL import Image
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (4, 4), (20 * i,) * 3).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"image {i}\n")
    return root


def test_folder_dataset_epochs_reshuffle_and_resume_exactly(tmp_path):
    from minidalle.stages.image_tokenizer import image_batches
    from minidalle.realdata.folders import FolderDataset

    data = image_batches(FolderDataset(_numbered_folder(tmp_path / "imgs"), 4, seed=3), 4)  # 2 batches an epoch
    seen = []

    def record(model, batch):  # which images each update saw, and a loss that depends on them
        seen.append([int(v) // 20 for v in batch[:, 0, 0, 0]])
        return F.mse_loss(model(batch.float().mean((1, 2))[:, :1] / 255), torch.ones(len(batch), 1))

    def train(out, resume=False, stop_at=None):
        torch.manual_seed(0)
        trainer = Trainer(torch.nn.Linear(1, 1), cfg_for(out, max_steps=8), data, record, progress=False)
        if stop_at:
            trainer.add_callback("on_step_end", lambda t: t.step == stop_at and t.request_stop())
        return trainer.fit(resume=resume)

    straight = train(tmp_path / "a")
    epochs = [sorted(sum(seen[i:i + 2], [])) for i in range(0, 8, 2)]  # the 8 images of each of 4 epochs
    assert len({tuple(e) for e in epochs}) > 1, f"every epoch trained on the same 8 images: {epochs}"
    assert len(set(sum(seen, []))) == 10, "with drop_last, two images were never trained on"
    order = list(seen)
    seen.clear()
    first = train(tmp_path / "b", stop_at=5)  # stop in epoch 2 (0-based), resume from its middle
    second = train(tmp_path / "b", resume=True)
    assert [r["step"] for r in second["train"]] == [6, 7, 8]
    assert seen[:5] + seen[-3:] == order  # the resumed run read the same batches in the same order...
    assert losses(first) + losses(second) == losses(straight)  # ...and trained bit for bit the same


# --- precision and the EMA of the weights ---------------------------------------------------------
def test_ema_follows_its_formula_and_resumes_exactly(tmp_path):
    seen = []
    trainer, _ = fit(tmp_path / "a", max_steps=6, ema_decay=0.5,
                     callbacks=[("on_fit_start", lambda t: seen.append({k: v.clone() for k, v in t.ema.items()})),
                                ("on_step_end", lambda t: seen.append(
                                    {k: v.detach().clone() for k, v in t.model.state_dict().items()}))])
    ema = seen[0]  # the EMA starts at the initial weights, then ema = 0.5 ema + 0.5 w after each update
    for weights in seen[1:]:
        ema = {k: 0.5 * ema[k] + 0.5 * weights[k] for k in ema}
    assert all(torch.allclose(trainer.ema[k], ema[k], atol=1e-6) for k in ema)
    straight = trainer.ema
    _split_run(tmp_path / "b", batch_at, k=3, max_steps=6, ema_decay=0.5)
    from minidalle.infra import checkpoint as ckpt

    saved = ckpt.read_checkpoint(ckpt.latest_valid_checkpoint(tmp_path / "b" / "checkpoints")).state["ema"]
    assert all(torch.equal(saved[k], straight[k]) for k in straight)  # stopped and resumed = uninterrupted


def test_bf16_precision_runs_the_loss_under_autocast(tmp_path):
    dtypes = []

    def loss_bf16(model, batch):
        out = model(batch[0])
        dtypes.append(out.dtype)
        return F.mse_loss(out.float(), batch[1])

    trainer = Trainer(make_model(), cfg_for(tmp_path, max_steps=2, precision="bf16"), batch_at, loss_bf16,
                      progress=False)
    trainer.fit()
    assert trainer.precision == "bf16" and dtypes == [torch.bfloat16, torch.bfloat16]
    assert Trainer(make_model(), cfg_for(tmp_path / "b"), batch_at, loss_fn, progress=False).precision == "fp32"


def test_a_set_thread_count_is_used_and_said(tmp_path):
    lines = []
    before = torch.get_num_threads()
    try:
        trainer = Trainer(make_model(), cfg_for(tmp_path, max_steps=2, threads=1), batch_at, loss_fn, progress=False,
                          log=lines.append)
        torch.set_num_threads(2)
        trainer.fit()
        assert torch.get_num_threads() == 1 and trainer.threads["threads"] == 1
        assert lines == ["[train] 1 CPU thread (train.threads)"]
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="threads"):
        get_config("smoke", {"train.threads": -1})
