"""The main job: the whole DALL·E in miniature from one call, and the figures that say whether it works.

    report = run_demo(get_config("toy"), "runs/demo-toy")   # dVAE -> BPE -> transformer -> reranker -> samples
    result = evaluate_run(get_config("toy"), "runs/demo-toy", n_prompts=256)   # `python -m minidalle eval`

`run_demo` trains each stage into its own folder of the run (OUT/dvae, OUT/bpe, OUT/transformer,
OUT/clip: the layout `generate --run` and `eval --run` read), then draws 16 candidates for a fixed
list of ShapesWorld prompts -- the first prompts of the `val` split (combinations seen in training)
and of `heldout` (colour-shape pairs never seen) --, reranks them and writes:

    OUT/samples.png    each caption above its reranked images, the judge's verdict on each
    OUT/report.md      judge accuracy per split and per attribute, the reranking gain, timings, machine
    OUT/report.json    the same figures, the configs; keys val_all_best16, val_all_single, ... minutes
    OUT/stages.json    what each stage took when this demo trained it (kept across runs)

A stage that finished before is reused, an interrupted one continues from its newest checkpoint,
so a second run only samples. Stage 1 is checked before anything is built on it: an image tokenizer
whose reconstructions the judge no longer reads (a seed that merged two colours into one code) is
trained again with the next seed, so the pipeline does not depend on a lucky seed.

Datasets without a judge (emoji, folders) run the same stages; their report has the reranker's
retrieval and the transformer's validation loss in place of judge accuracy.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .benchtools import describe_machine, machine, utc_now
from .config import Config
from .errors import CheckpointError, ConfigError, DataError
from .files import write_atomic

STAGES = ("dvae", "bpe", "transformer", "clip")
CANDIDATES = 16  # candidates per prompt: the best of 16 is the figure the report leads with
KEEP = 4  # images per prompt in samples.png
SHOWN = 6  # prompts per split in samples.png
DVAE_MIN_JUDGE = 0.9  # stage 1 must keep this much of the val images' meaning (judge on reconstructions)
DVAE_TRIES = 3  # seeds tried for stage 1 before going on with the best one (and saying so)
STAGES_FILE = "stages.json"
TRAIN_SECTION = {"dvae": "dvae_train", "transformer": "train", "clip": "clip_train"}  # each trained stage's settings
DEMO_PROMPTS = 64  # val and heldout prompts each that the demo judges (`eval` takes 256)


# --- where each stage lives -------------------------------------------------------------------------
def stage_config(cfg: Config, out: str | Path, seed: int | None = None) -> Config:
    """cfg with every stage's folder inside `out` and, when given, one training seed for every stage.

    Example: stage_config(get_config("toy"), "runs/demo-toy", seed=1).train.out_dir -> "runs/demo-toy/transformer"
    """
    from .generate import run_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = run_config(cfg, out)
    if seed is not None:
        cfg = replace(cfg, dvae_train=replace(cfg.dvae_train, seed=seed), train=replace(cfg.train, seed=seed),
                      clip_train=replace(cfg.clip_train, seed=seed))
    return cfg


def _read_stages(out: Path) -> dict:
    """OUT/stages.json as {stage: entry dict}; {} when it is missing, and (with a warning) when it is not that."""
    path = out / STAGES_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        record = None
    if not (isinstance(record, dict) and all(isinstance(v, dict) for v in record.values())):
        warnings.warn(f"{path} is not the record a demo writes (edited or damaged); ignoring it: every stage is "
                      "checked and timed afresh", stacklevel=2)
        return {}
    return record


def _write_json(path: Path, value) -> None:
    write_atomic(path, json.dumps(value, indent=1, default=str, allow_nan=False) + "\n")


def _smoke(cfg: Config) -> bool:
    """The smoke preset, or smoke caps: a handful of updates, checked for running, not for quality."""
    from .config import smoke_mode

    return cfg.preset == "smoke" or smoke_mode()


def default_prompts(cfg: Config) -> int:
    """Prompts per split the demo samples and judges: 64, or 8 under smoke (a seconds-long check)."""
    return 8 if _smoke(cfg) else DEMO_PROMPTS


# --- the stages -------------------------------------------------------------------------------------
class _Stages:
    """Runs each stage once, records what it took in OUT/stages.json; a stage finished before is reused."""

    def __init__(self, cfg: Config, out: Path, progress: bool, log: Callable[[str], None],
                 trust_sharded: bool = False):
        self.cfg, self.out, self.progress, self.log = cfg, out, progress, log
        self.trust_sharded = trust_sharded  # read stages trained under fsdp (sharded checkpoints: pickled index)
        self.record = _read_stages(out)

    def save(self, name: str, entry: dict) -> None:
        self.record[name] = entry
        _write_json(self.out / STAGES_FILE, self.record)

    def summary_line(self, i: int, name: str, entry: dict) -> None:
        took = "reused" if entry["reused"] else f"{entry['seconds']:.0f} s"
        facts = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry["facts"].items())
        self.log(f"[demo] stage {i}/{len(STAGES)} {name}: {took}; {facts}")


def _dvae_stage(st: _Stages) -> dict:
    """Stage 1, checked: retrain with the next seed while the judge cannot read its reconstructions."""
    from .image_tokenizer import load_dvae, reconstruction_report, train_dvae
    from .text_to_image import finished_dvae

    cfg, before = st.cfg, st.record.get("dvae")
    done = finished_dvae(cfg)
    if before and done is not None and before.get("checkpoint") == str(done):
        return {**before, "reused": True}
    trained_before = done is not None  # finished outside the demo (e.g. by `train dvae`): checked, not timed
    t0, tries, seed = time.perf_counter(), [], cfg.dvae_train.seed
    for attempt in range(DVAE_TRIES):
        if attempt:
            seed = cfg.dvae_train.seed + attempt
            st.log(f"[demo] the judge read only {tries[-1]['judge']:.3f} of the val reconstructions (< "
                   f"{DVAE_MIN_JUDGE}): this seed's codes lost part of the images' meaning (e.g. two colours given "
                   f"one code). Training stage 1 again with dvae_train.seed={seed} (the old run is set aside in {cfg.dvae_train.out_dir})")
        run_cfg = replace(cfg, dvae_train=replace(cfg.dvae_train, seed=seed))
        _, trainer = train_dvae(run_cfg, resume=not attempt, start_over=bool(attempt), progress=st.progress,
                                out_flag="--out", trust_sharded=st.trust_sharded, log=lambda m: None)
        if not attempt:  # the first try may continue an interrupted run (not one finished outside the demo)
            resumed, earlier_seconds = (0, 0.0) if trained_before else (trainer.started_at, trainer.seconds_before)
        model, _ = load_dvae(finished_dvae(run_cfg), st.trust_sharded)
        if cfg.data.dataset != "shapes" or _smoke(cfg):  # no judge, or too few updates to have learned anything
            tries.append({"seed": seed, "judge": None})
            break
        rep = reconstruction_report(model, "val", cfg.data.image_size, min(cfg.data.n_val, 256), cfg.data.seed)
        tries.append({"seed": seed, "judge": rep["reconstruction"]["overall"], "psnr": rep["psnr"]})
        if tries[-1]["judge"] >= DVAE_MIN_JUDGE:
            break
    else:
        st.log(f"[demo] warning: no seed of {DVAE_TRIES} gave reconstructions the judge reads >= {DVAE_MIN_JUDGE}; "
               "going on with the last one")
    if len(tries) > 1:  # a transformer trained on the rejected tokenizer's codes would read the new ones wrongly
        moved = set_aside(st.out, ["transformer"])
        st.record.pop("transformer", None)
        if moved:
            st.log(f"[demo] the transformer trained on the rejected image tokenizer's codes is set aside in {moved}")
    facts = {k: v for k, v in tries[-1].items() if v is not None}
    if trainer.threads:
        facts["threads"] = trainer.threads["threads"]
    seconds = None if trained_before and len(tries) == 1 else round(time.perf_counter() - t0 + earlier_seconds, 1)
    entry = {"seconds": seconds, "checkpoint": str(finished_dvae(cfg)), "tries": tries,
             "steps": cfg.dvae_train.max_steps, "facts": {"updates": cfg.dvae_train.max_steps, **facts}}
    if resumed and seconds is not None:  # continued after an interruption: its earlier training time is counted
        entry["resumed_from"] = resumed  # from its checkpoint, the earlier attempt's setup time is not
    st.save("dvae", entry)
    return {**entry, "reused": seconds is None}


def _bpe_stage(st: _Stages) -> dict:
    from .text_to_image import BPE_FILE, _file_sha256, prepare_bpe

    path = Path(st.cfg.text.out_dir) / BPE_FILE
    before, existed = st.record.get("bpe"), path.is_file()
    if before and existed and before.get("sha256") == _file_sha256(path):
        if "settings" not in before:  # recorded before the settings were: check_reuse retrained and matched it
            st.save("bpe", {**before, "settings": bpe_settings(st.cfg)})
        return {**before, "reused": True}
    t0 = time.perf_counter()
    tok, sha = prepare_bpe(st.cfg, lambda m: None, "[demo]")
    # check_reuse has compared an existing one with this demo's settings: recorded, so the next run need not
    entry = {"seconds": None if existed else round(time.perf_counter() - t0, 1), "sha256": sha,
             "facts": {"tokens": tok.vocab_size, "merges": len(tok.merges)}, "settings": bpe_settings(st.cfg)}
    st.save("bpe", entry)  # seconds None: trained outside the demo (`train bpe`), reused, not timed
    return {**entry, "reused": existed}


def _finished(cfg: Config, name: str) -> Path | None:
    """The checkpoint of stage `name` (transformer or clip) that reached its max_steps, if any."""
    from . import checkpoint as ckpt

    tc = getattr(cfg, TRAIN_SECTION[name])
    path = ckpt.latest_valid_checkpoint(Path(tc.out_dir) / "checkpoints")
    return path if path is not None and ckpt.verify_checkpoint(path)["step"] >= tc.max_steps else None


def _trained_stage(st: _Stages, name: str) -> dict:
    """The transformer or the reranker: reuse a finished run in its folder, else continue or start it.
    A run trained with other tokenizers than the ones the demo has now is set aside first and trained again."""
    from .clip import train_clip
    from .text_to_image import train_transformer

    _set_aside_if_stale(st, name)
    before, done = st.record.get(name), _finished(st.cfg, name)
    if done is not None:  # finished (by this demo, or by `train` into this folder: then not timed)
        from . import checkpoint as ckpt

        step = ckpt.verify_checkpoint(done)["step"]
        if before and before.get("checkpoint") == str(done):
            return {**before, "reused": True}
        return {"seconds": None, "steps": step, "checkpoint": str(done), "facts": {"updates": step}, "reused": True}
    quiet = lambda m: None  # noqa: E731 -- the demo prints one line per stage, the bars show progress
    t0 = time.perf_counter()
    if name == "transformer":
        _, trainer, info = train_transformer(st.cfg, resume=True, progress=st.progress, out_flag="--out", log=quiet,
                                             trust_sharded=st.trust_sharded)
    else:
        _, trainer, info = train_clip(st.cfg, resume=True, progress=st.progress, out_flag="--out", log=quiet,
                                      trust_sharded=st.trust_sharded)
    facts = {"updates": trainer.step, "loss": trainer.loss}
    if trainer.threads:  # the CPU threads it trained on (Trainer._pick_threads)
        facts["threads"] = trainer.threads["threads"]
    if trainer.last_eval:
        facts["eval_loss"] = trainer.last_eval.get("loss")
    # A run interrupted before and continued now: its earlier training time comes from its checkpoint
    # (Trainer.seconds_before); the earlier attempt's setup time is not known, so the report says so.
    entry = {"seconds": round(time.perf_counter() - t0 + trainer.seconds_before, 1), "steps": trainer.step,
             "facts": facts, "train_seconds": round(trainer.train_seconds, 1),
             "checkpoint": str(trainer.last_checkpoint)}
    if trainer.started_at:
        entry["resumed_from"] = trainer.started_at
    st.save(name, entry)
    return {**entry, "reused": False}


def _set_aside_if_stale(st: _Stages, name: str) -> None:
    """Set the transformer or reranker aside when its checkpoints were trained with another dVAE or BPE
    than the ones in the run now (stage 1 trained again, a tokenizer replaced): their codes and ids
    would mean something else to it, so it is trained again, and the log says why."""
    from . import checkpoint as ckpt
    from .image_tokenizer import tokenizer_id
    from .text_to_image import BPE_FILE, _file_sha256, finished_dvae

    tc = getattr(st.cfg, TRAIN_SECTION[name])
    path = ckpt.latest_valid_checkpoint(Path(tc.out_dir) / "checkpoints")
    if path is None:
        return
    recorded = ckpt.read_config(path).get("tokenizers") or {}
    now = {"bpe": _file_sha256(Path(st.cfg.text.out_dir) / BPE_FILE)}
    if name == "transformer":
        now["dvae"] = tokenizer_id(finished_dvae(st.cfg))
    changed = [k for k in now if recorded.get(k) != now[k]]
    if not changed:
        return
    moved = set_aside(st.out, [name])
    st.record.pop(name, None)
    what = " and ".join({"dvae": "image tokenizer", "bpe": "text tokenizer"}[k] for k in changed)
    st.log(f"[demo] the {name} in {st.out / name} was trained with another {what} than the one in the run now "
           f"({', '.join(f'{k} {str(recorded.get(k))[:12]} -> {now[k][:12]}' for k in changed)}); its codes would "
           f"mean something else to it. It is set aside in {moved} and trained again")


# --- judging the candidates -------------------------------------------------------------------------
def split_prompts(cfg: Config, n: int) -> dict[str, list[str]]:
    """The first n captions of the `val` and `heldout` ShapesWorld splits: the demo's fixed prompt list.

    Example: split_prompts(get_config("toy"), 2) -> {"val": ["a small red circle", ...], "heldout": [...]}
    """
    from .data import ShapesWorld

    return {split: [ShapesWorld(split, cfg.data.image_size, cfg.data.seed).example(i)[1] for i in range(n)]
            for split in ("val", "heldout")}


def judge_candidates(pipe, prompts: list[str], n: int, seed: int = 0, progress: bool = True, **settings) -> dict:
    """Draw n candidates per prompt, rank them by the reranker, judge every one.

    Returns the candidates, the reranker's scores (P, n), and the judge's verdicts: `ok` (P, n) bool
    and per check (P, n) floats, nan where the caption does not state it.
    """
    from .generate import _judge_all, candidates, rank

    cands = candidates(pipe, prompts, n, seed, progress=progress, **settings)
    t0 = time.perf_counter()
    scores = rank(pipe, cands, "clip").numpy()
    cands.seconds["ranking"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    verdicts = _judge_all(cands.images, prompts, progress)
    cands.seconds["judging"] = time.perf_counter() - t0
    return {"cands": cands, "scores": scores, "verdicts": verdicts}


def accuracy_table(verdicts: dict, scores: np.ndarray) -> dict:
    """Judge accuracy of one sample and of the reranker's best of all n, overall and per attribute.

    "single" averages over every candidate (each is a single sample); "best" judges the top-scored
    candidate of each prompt. Each attribute counts only prompts whose caption states it. With the
    verdicts' `objects` and `swap` (generate._judge_all), also "one" and "two": all facts right over
    the one-object and the two-object captions; and "binding_swaps": how often the two objects' shapes
    came out exchanged, over the two-object captions that can show it (judge.binding_swap).
    Example: -> {"all": {"single": 0.59, "best": 0.80, "prompts": 64}, "one": {...}, "two": {...},
                 "shape": {...}, ..., "binding_swaps": {...}, "samples": 1024}
    """
    from .judge import CHECKS

    ok, checks = verdicts["ok"], verdicts["checks"]
    P, n = ok.shape
    top = scores.argmax(axis=1)

    def row(values: np.ndarray, rows: np.ndarray) -> dict:  # values (P, n); rows: the prompts it counts
        vals = values[rows].astype(float)
        return {"single": float(vals.mean()), "best": float(vals[np.arange(len(vals)), top[rows]].mean()),
                "prompts": int(rows.sum())}

    rows = {"all": row(ok, np.ones(P, bool))}
    if "objects" in verdicts:
        for name, k in (("one", 1), ("two", 2)):
            if (verdicts["objects"] == k).any():
                rows[name] = row(ok, verdicts["objects"] == k)
    for c in [c for c in CHECKS if c in checks]:
        stated = np.isfinite(checks[c][:, 0])
        if stated.any():
            rows[c] = row(checks[c], stated)
    if "swap" in verdicts and np.isfinite(verdicts["swap"][:, 0]).any():
        rows["binding_swaps"] = row(verdicts["swap"], np.isfinite(verdicts["swap"][:, 0]))
    return {**rows, "samples": P * n, "candidates": n}


# The table's rows that are not one attribute, as report.md names them.
ROW_NAMES = {"all": "all facts", "one": "all facts, one-object captions", "two": "all facts, two-object captions",
             "binding_swaps": "binding swaps (shapes exchanged; lower is better)"}


def _headline(tables: dict, n: int) -> dict:
    """The report's top-level keys: {split}_all_single, {split}_all_best16, {split}_gain, and where the
    table has them {split}_one_*, {split}_two_* and {split}_binding_swaps_* (single and best16)."""
    out = {}
    for split, t in tables.items():
        for name in ("all", "one", "two", "binding_swaps"):
            if name in t:
                out[f"{split}_{name}_single"] = t[name]["single"]
                out[f"{split}_{name}_best{n}"] = t[name]["best"]
        out[f"{split}_gain"] = t["all"]["best"] - t["all"]["single"]
    return out


# --- the demo ---------------------------------------------------------------------------------------
def run_demo(cfg: Config, out: str | Path, seed: int | None = None, device: str = "auto", n_prompts: int | None = None,
             n: int = CANDIDATES, progress: bool = True, log: Callable[[str], None] = print, start_over: bool = False,
             trust_sharded: bool = False) -> dict:
    """Train (or reuse) every stage in `out`, then sample, rerank, judge and write the report.

    n_prompts: prompts per split (val and heldout) that are sampled and judged (default_prompts);
    n: candidates each. The run folder is locked for the whole call (a second demo on it is refused).
    start_over: first set the earlier run aside (`set_aside`). A stage already in `out` is reused or
    continued only when it was trained with the settings this call asks for (`check_reuse`: refused
    before anything is trained otherwise); one trained on other tokenizers than the run has now is
    trained again. trust_sharded: read stages trained under fsdp. Returns report.json's content.
    """
    from . import checkpoint as ckpt
    from .generate import load_pipeline
    from .train import pick_device

    n_prompts = n_prompts or default_prompts(cfg)
    if n_prompts < 1 or n < 1:
        raise ConfigError(f"n_prompts={n_prompts} and n={n} must both be at least 1")
    t_start = time.perf_counter()
    pick_device(device, "--device")  # a device this machine lacks is refused before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = ckpt.RunLock(out, "--out", "demo", "two demos would train the same stages at once").acquire()
    try:
        if start_over:
            moved = set_aside(out)
            if moved:
                log(f"[demo] --start-over: the earlier run's stages are set aside in {moved}")
        cfg = stage_config(cfg, out, seed)
        if device != "auto":  # every stage trains on the device asked for
            cfg = replace(cfg, dvae_train=replace(cfg.dvae_train, device=device),
                          train=replace(cfg.train, device=device), clip_train=replace(cfg.clip_train, device=device))
        check_reuse(cfg, out)
        speed = machine_speed(cfg, pick_device(device, "--device"))
        log(f"[demo] {speed['line']}")
        st = _Stages(cfg, out, progress, log, trust_sharded)
        stages = {}
        for i, name in enumerate(STAGES, 1):
            log(f"[demo] stage {i}/{len(STAGES)} {name} -> {out / name}")
            entry = _dvae_stage(st) if name == "dvae" else _bpe_stage(st) if name == "bpe" else _trained_stage(st, name)
            st.summary_line(i, name, entry)
            stages[name] = entry
        pipe = load_pipeline(cfg, device=device, trust_sharded=trust_sharded)
        log(f"[demo] sampling {n} candidates for {n_prompts} val and {n_prompts} heldout prompts, reranking, judging"
            if cfg.data.dataset == "shapes" else f"[demo] sampling {n} candidates per prompt, reranking; held-out recall")
        t0 = time.perf_counter()
        if cfg.data.dataset == "shapes":
            result = _judged_samples(pipe, out, n_prompts, n, progress)
        else:
            result = _unjudged_samples(pipe, cfg, out, n, progress)
        sample_seconds = time.perf_counter() - t0
        trained = [s["seconds"] for s in stages.values() if s.get("seconds") is not None]
        resumed = {k: s["resumed_from"] for k, s in stages.items() if s.get("resumed_from")}  # reused ones too
        report = {
            "preset": cfg.preset, "out": str(out), "seed": cfg.train.seed, "seeds": _stage_seeds(pipe),
            "device": str(pipe.device),
            **result,
            "stages": stages,
            "minutes": round((sum(trained) + sample_seconds) / 60, 2),
            "machine_gflops": speed["gflops"], "threads": speed.get("threads"),
            # complete: every stage trained in one go by a demo; a stage continued after an interruption
            # counts its earlier training time (from its checkpoint) but not that attempt's setup
            "minutes_complete": all(s.get("seconds") is not None for s in stages.values()) and not resumed,
            "resumed": resumed,
            "this_run_minutes": round((time.perf_counter() - t_start) / 60, 2),
            "sampling_seconds": round(sample_seconds, 1),
            "machine": machine(), "date": utc_now(),
            "configs": {"preset": cfg.preset, **cfg.to_dict()}, "sources": pipe.sources,
        }
        _write_json(out / "report.json", report)
        write_atomic(out / "report.md", report_markdown(report))
    finally:
        lock.release()
    log(f"[demo] {summary_line(report)}")
    log(f"[demo] samples -> {out / 'samples.png'}; report -> {out / 'report.md'} and {out / 'report.json'}")
    return report


def machine_speed(cfg: Config, device) -> dict:
    """The fp32 matmul rate the stages will run at (GFLOP/s), measured in about a second: on a CPU with the
    thread count benchtools.choose_threads picks now (each stage's Trainer picks again when it starts), on a
    GPU that GPU's. report.json keeps it as machine_gflops, so minutes on two machines can be compared.
    Example: -> {"gflops": 61.0, "threads": 2, "line": "2 CPU threads of 2 (matmul 61 GFLOP/s; 1 thread: 32)"}
    """
    from .benchtools import choose_threads, matmul_gflops

    if device.type != "cpu":
        g = round(matmul_gflops(seconds=0.5, device=device), 1)
        return {"gflops": g, "threads": None, "line": f"{device}: fp32 matmul {g:.0f} GFLOP/s"}
    threads = cfg.train.threads
    if threads or _smoke(cfg) or os.environ.get("OMP_NUM_THREADS"):  # the thread count is already chosen
        if threads:
            torch.set_num_threads(threads)
        g = round(matmul_gflops(seconds=0.1 if _smoke(cfg) else 0.5), 1)
        n = torch.get_num_threads()
        return {"gflops": g, "threads": n, "line": f"{n} CPU thread{'s' if n > 1 else ''}: fp32 matmul {g:.0f} GFLOP/s"}
    info = choose_threads(0.5)
    return {"gflops": info["gflops"], "threads": info["threads"], "line": info["line"]}


def _stage_seeds(pipe) -> dict:
    """The training seed each checkpoint the samples came from records (what report.json calls `seeds`)."""
    from . import checkpoint as ckpt

    return {k: ckpt.read_config(pipe.sources[k], verify=False).get(TRAIN_SECTION[k], {}).get("seed")
            for k in TRAIN_SECTION if pipe.sources.get(k)}  # the loaders verified these very folders


# --- may a stage in the run folder be reused? ----------------------------------------------------------
STAGE_SECTIONS = {"dvae": ("data", "dvae", "dvae_train"), "transformer": ("data", "text", "model", "train"),
                  "clip": ("data", "text", "clip", "clip_train")}
# Settings that say where and how a stage runs, or how long, not what it learns: a stage trained with
# other values of these is still the stage asked for (a longer max_steps continues it).
RUN_SETTINGS = frozenset({"out_dir", "device", "precision", "parallel", "dist_timeout", "max_steps", "eval_every",
                          "eval_batches", "ckpt_every", "keep_last", "log_every", "activation_checkpointing",
                          "nonfinite", "threads", "n_val", "n_heldout", "max_skip_rate", "attn_impl"})


def check_reuse(cfg: Config, out: Path) -> None:
    """Refuse, before anything is trained, a run folder whose stages were trained with other settings
    than `cfg` asks for (a seed, a learning rate, a model size; every key of the stage's sections but
    RUN_SETTINGS), naming each difference. A setting the checkpoint does not record (added to
    minidalle since) counts as its default. A dVAE this demo retrained with a later seed (DVAE_TRIES,
    as OUT/stages.json records) matches, and so does a BPE model with the settings asked for
    (`_bpe_mismatch`).
    Example: a run trained with seed 1337, cfg with seed 8 -> ConfigError("... train.seed 1337, now 8 ...")
    """
    from . import checkpoint as ckpt

    wanted, problems, record = cfg.to_dict(), [], _read_stages(out)
    defaults = Config().to_dict()  # what a setting meant before it existed: its default
    tries = record.get("dvae", {}).get("tries")
    retried = [t.get("seed") for t in tries if isinstance(t, dict)] if isinstance(tries, list) else []
    for name, sections in STAGE_SECTIONS.items():
        tc = getattr(cfg, TRAIN_SECTION[name])
        path = ckpt.latest_valid_checkpoint(Path(tc.out_dir) / "checkpoints")
        if path is None:
            continue
        recorded = ckpt.read_config(path)
        diffs = []
        for sec in sections:
            new = _flat(wanted[sec])
            old = {k: v for k, v in {**_flat(defaults[sec]), **_flat(recorded.get(sec))}.items() if k in new}
            for key in sorted(new):
                if key in RUN_SETTINGS or old.get(key) == new[key]:
                    continue
                if (name, sec, key) == ("dvae", "dvae_train", "seed") and retried[:1] == [new[key]] \
                        and old.get(key) in retried:
                    continue  # the demo's own retry of stage 1 with the next seed
                diffs.append(f"{sec}.{key} {old.get(key)!r}, now {new[key]!r}")
        if diffs:
            problems.append(f"{name} ({', '.join(diffs[:5])}{', ...' if len(diffs) > 5 else ''})")
    bpe = _bpe_mismatch(cfg, record.get("bpe"))
    if bpe:
        problems.append(bpe)
    if problems:
        raise ConfigError(f"{out} holds stages trained with other settings than this demo asks for: "
                          f"{'; '.join(problems)}. A stage is reused only with the settings it was trained with. "
                          f"Nothing was changed: run the demo with those settings, choose another --out, or add "
                          f"--start-over to set the earlier run aside in {out}/set-aside-<time>/")


def _flat(d, prefix: str = "") -> dict:
    """Example: {"a": 1, "b": {"c": 2}} -> {"a": 1, "b.c": 2} (lists compared as lists, JSON-normalised)"""
    if not isinstance(d, dict):
        return {}
    out = {}
    for k, v in json.loads(json.dumps(d)).items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def bpe_settings(cfg: Config) -> dict:
    """What decides the BPE model trained on a run's captions: the text tokenizer's size and case, and the data."""
    return {"text.vocab_size": cfg.text.vocab_size, "text.lowercase": cfg.text.lowercase,
            **{f"data.{k}": v for k, v in _flat(cfg.to_dict()["data"]).items() if k not in RUN_SETTINGS}}


def _bpe_mismatch(cfg: Config, record: dict | None) -> str | None:
    """None when text.out_dir holds no bpe.model, or the one cfg's settings train; else what differs.

    A model the demo trained (its stages.json entry has the file's checksum and `bpe_settings`) is
    compared by those settings. Another one is trained again in memory from cfg's captions (seconds,
    for ShapesWorld and the emoji) and compared byte for byte; for folder and tar data, whose captions
    would have to be read whole, only its size and case are compared.
    """
    import tempfile

    from .bpe import RegexTokenizer, Tokenizer
    from .text_to_image import BPE_FILE, _file_sha256, training_captions

    path = Path(cfg.text.out_dir) / BPE_FILE
    if not path.is_file():
        return None
    sha, want = _file_sha256(path), bpe_settings(cfg)
    if record and record.get("sha256") == sha and isinstance(record.get("settings"), dict):
        diffs = [f"{k} {record['settings'].get(k)!r}, now {v!r}" for k, v in want.items()
                 if record["settings"].get(k) != v]
        return f"bpe ({', '.join(diffs[:5])})" if diffs else None
    old = Tokenizer.load(path)
    if cfg.data.dataset in ("shapes", "emoji"):
        tok = RegexTokenizer(lowercase=cfg.text.lowercase).train(training_captions(cfg.data), cfg.text.vocab_size,
                                                                 progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            same = _file_sha256(tok.save(Path(tmp) / "bpe")[0]) == sha
    else:
        same = (old.vocab_size, old.lowercase) == (cfg.text.vocab_size, cfg.text.lowercase)
    if same:
        return None
    return (f"bpe ({path} holds {old.vocab_size} tokens, lowercase {old.lowercase}; this demo's text.vocab_size "
            f"{cfg.text.vocab_size}, text.lowercase {cfg.text.lowercase} and data.* train another one)")


def judge_splits(pipe, n_prompts: int, n: int, seed: int = 0, progress: bool = True, **settings) -> dict:
    """`judge_candidates` on the first n_prompts `val` and `heldout` prompts (seeds seed, seed + 1).

    Returns the headline keys (`_headline`), `per_attribute` (split -> `accuracy_table`), the seconds
    summed over both splits, and `results` (split -> judge_candidates' dict, not for JSON).
    """
    tables, seconds, results = {}, {}, {}
    for k, (split, ps) in enumerate(split_prompts(pipe.cfg, n_prompts).items()):
        results[split] = res = judge_candidates(pipe, ps, n, seed=seed + k, progress=progress, **settings)
        tables[split] = accuracy_table(res["verdicts"], res["scores"])
        for key, v in res["cands"].seconds.items():
            seconds[key] = seconds.get(key, 0.0) + v
    return {**_headline(tables, n), "per_attribute": tables, "n_prompts": n_prompts, "candidates": n,
            "seconds": {k: round(v, 1) for k, v in seconds.items()}, "results": results}


def _judged_samples(pipe, out: Path, n_prompts: int, n: int, progress: bool) -> dict:
    judged = judge_splits(pipe, n_prompts, n, progress=progress)
    shown = []
    for split, res in judged.pop("results").items():
        order = np.argsort(-res["scores"], axis=1)[:, :KEEP]
        shown.append([(f"[{split}] {res['cands'].prompts[p]}", res["cands"].images[p, order[p]],
                       res["scores"][p, order[p]], res["verdicts"]["ok"][p, order[p]])
                      for p in range(min(SHOWN, n_prompts))])
    rows = [row for pair in zip(*shown) for row in pair]  # val on the left, heldout on the right
    save_judged_grid(rows, out / "samples.png", ncols=2,
                     title=f"best {KEEP} of {n} by the reranker (score = its similarity); "
                           "✓ = the judge finds every fact the caption states")
    return {"dataset": "shapes", **judged, "samples": str(out / "samples.png")}


NEW_PHRASES = ("a blue heart with a star", "a cat wearing glasses", "a red apple", "a smiling sun")


def _unjudged_samples(pipe, cfg: Config, out: Path, n: int, progress: bool) -> dict:
    """Datasets with no judge: samples for a few training captions and new phrases, reranked; for the
    emoji also the held-out figures (`_heldout_figures`: reranker recall@1, transformer loss)."""
    from .data import build_dataset
    from .generate import candidates, rank

    ds = build_dataset(cfg.data, "train")
    names = [ds[i][1] for i in range(0, len(ds), max(1, len(ds) // SHOWN))][:SHOWN]
    prompts = names + list(NEW_PHRASES)
    cands = candidates(pipe, prompts, n, 0, truncate=True, progress=progress)
    scores = rank(pipe, cands, "clip").numpy()
    order = np.argsort(-scores, axis=1)[:, :KEEP]
    shown = [(p, cands.images[i, order[i]], scores[i, order[i]], None) for i, p in enumerate(prompts)]
    save_judged_grid(shown, out / "samples.png", title=f"best {KEEP} of {n} by the reranker", ncols=2)
    heldout = _heldout_figures(pipe, cfg, progress) if cfg.data.dataset == "emoji" else {}
    return {"dataset": cfg.data.dataset, "prompts": prompts, "candidates": n, "samples": str(out / "samples.png"),
            **heldout, "seconds": {k: round(v, 1) for k, v in cands.seconds.items()}}


def _heldout_figures(pipe, cfg: Config, progress: bool) -> dict:
    """On the held-out emoji (the first data.n_heldout; 214 in all), which no stage trained on: the
    reranker's recall@1 both ways, and the transformer's loss over every one of them (a fresh eval of
    the final weights), with the last eval loss its training logged.

    Example: -> {"heldout_recall": {"i2t@1": 0.31, "t2i@1": 0.28, "i2t@5": ..., "n": 214},
                 "transformer_val_loss": {"loss": 3.9, "text_loss": ..., "image_loss": ..., "n": 214},
                 "transformer_val_loss_logged": {"loss": 3.95, "step": 20000}}
    """
    from . import checkpoint as ckpt
    from .clip import heldout_recall
    from .text_to_image import eval_pairs, pairs_loss

    recall = heldout_recall(pipe.clip, pipe.clip_tok, cfg.data)
    dvae_id = ckpt.read_config(pipe.sources["transformer"])["tokenizers"]["dvae"]  # the key of its cached codes
    loss = pairs_loss(pipe.model, eval_pairs(cfg, pipe.dvae, pipe.tok, dvae_id, progress=progress))
    return {"heldout_recall": recall, "transformer_val_loss": loss,
            "transformer_val_loss_logged": _last_logged_eval(Path(cfg.train.out_dir) / "metrics.jsonl")}


def _last_logged_eval(metrics: Path) -> dict | None:
    """The last evaluation line of a metrics.jsonl, as {"loss", "step"} (None: no evaluation was logged)."""
    from .train import read_metrics

    evals = [r for r in read_metrics(metrics) if r.get("split") == "eval" and "loss" in r]  # [] when missing
    return {"loss": evals[-1]["loss"], "step": evals[-1].get("step")} if evals else None


def _heldout_markdown(report: dict) -> list[str]:
    """The held-out emoji lines of report.md (none when the run has no held-out figures)."""
    r, loss = report.get("heldout_recall"), report.get("transformer_val_loss")
    logged = report.get("transformer_val_loss_logged")
    if not r:
        return []
    lines = [f"Reranker recall@1 on {r['n']} held-out emoji: image->text {r['i2t@1']:.3f}, text->image "
             f"{r['t2i@1']:.3f} (@5: {r['i2t@5']:.3f}, {r['t2i@5']:.3f}; chance @1: {1 / r['n']:.3f}).", ""]
    if loss:
        seen = f"; last logged in training: {logged['loss']:.3f} at step {logged['step']}" if logged else ""
        lines += [f"Transformer validation loss on {loss['n']} held-out emoji: {loss['loss']:.3f} (text "
                  f"{loss['text_loss']:.3f}, image {loss['image_loss']:.3f}{seen}).", ""]
    return lines


def save_judged_grid(rows, path: str | Path, title: str | None = None, ncols: int = 1) -> Path:
    """Each (caption, images, scores, verdicts) row as a caption above its images; a verdict marks the
    image's score with a green ✓ (the judge finds every stated fact) or a red ✗; verdicts None: no mark."""
    from .viz import save_ranked_grid

    prompts = [r[0] for r in rows]
    colours = [None if r[3] is None else [("✓", "tab:green") if v else ("✗", "tab:red") for v in r[3]] for r in rows]
    return save_ranked_grid(prompts, [r[1] for r in rows], [list(map(float, r[2])) for r in rows], path,
                            title=title, colours=colours, ncols=ncols)


# --- evaluation -------------------------------------------------------------------------------------
def evaluate_run(cfg: Config, run: str | Path | None = None, n_prompts: int = 256, n: int = CANDIDATES,
                 seed: int = 0, device: str = "auto", progress: bool = True, trust_sharded: bool = False,
                 **settings) -> dict:
    """The whole pipeline's judge accuracy on n_prompts `val` and `heldout` prompts, n candidates each.

    run: a folder with dvae/, bpe/, transformer/ and clip/ (default runs/demo-<preset>, what the demo writes).
    Keys: val_all_best16, val_all_single, heldout_all_best16, heldout_all_single, val_gain, heldout_gain,
    per_attribute (split -> attribute -> single, best, prompts), n_prompts, candidates, seconds.
    """
    from .generate import load_pipeline

    run = Path(run) if run is not None else Path(f"runs/demo-{cfg.preset}")
    if not run.is_dir():
        raise CheckpointError(f"no run folder {run}: make one with `make demo` (or `python -m minidalle demo "
                              f"--preset {cfg.preset}`), or point --run at a folder the train commands wrote")
    if cfg.data.dataset != "shapes":
        raise DataError(f"the judge reads ShapesWorld images only; data.dataset is {cfg.data.dataset!r}")
    if n_prompts < 1 or n < 1:
        raise ConfigError(f"n_prompts={n_prompts} and n={n} must both be at least 1")
    pipe = load_pipeline(cfg, run=run, device=device, trust_sharded=trust_sharded)
    judged = judge_splits(pipe, n_prompts, n, seed, progress, **settings)
    judged.pop("results")
    return {"run": str(run), **judged, "seed": seed, "settings": settings, "sources": pipe.sources,
            "machine": machine(), "date": utc_now()}


def write_eval(result: dict) -> tuple[Path, Path]:
    """`evaluate_run`'s result as RUN/eval.json and RUN/eval.md (written atomically)."""
    run = Path(result["run"])
    _write_json(run / "eval.json", result)
    md = run / "eval.md"
    write_atomic(md, f"# minidalle eval: {run}\n\n{result['date']}; {describe_machine(result['machine'])}.\n\n"
                    f"{summary_line(result)}.\n\n{accuracy_markdown(result)}")
    return run / "eval.json", md


# --- several seeds side by side ------------------------------------------------------------------------
SEED_COLUMNS = (("val_all_single", "val one sample"), ("val_all_best16", "val best of 16"),
                ("heldout_all_single", "heldout one sample"), ("heldout_all_best16", "heldout best of 16"),
                ("val_two_best16", "val two objects, best of 16"), ("heldout_two_best16", "heldout two objects, best of 16"),
                ("val_binding_swaps_best16", "val swaps among picks"),
                ("heldout_binding_swaps_best16", "heldout swaps among picks"))


def _read_json(path: Path) -> dict | None:
    """A JSON object from a file a run wrote, or None when it is missing or not one (never trusted further)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def seeds_summary(runs: list[str | Path]) -> dict:
    """One row per run folder: the seeds its stages hold, its minutes and machine_gflops (report.json), and the
    headline figures of its eval.json (256 prompts per split) where `eval` has judged it, else of report.json
    (the demo's 64). Example: seeds_summary(["runs/s1337", "runs/s1"]) -> {"rows": [...], "date": ..., ...}
    """
    rows = []
    for run in map(Path, runs):
        report, ev = _read_json(run / "report.json"), _read_json(run / "eval.json")
        if report is None and ev is None:
            raise CheckpointError(f"{run} has neither report.json nor eval.json: run `demo --out {run}` first")
        src = ev if ev is not None else report
        row = {"run": str(run), "from": "eval.json" if ev is not None else "report.json",
               "prompts": src.get("n_prompts"), "seed": (report or {}).get("seed"),
               "minutes": (report or {}).get("minutes"), "machine_gflops": (report or {}).get("machine_gflops")}
        row.update({k: src.get(k) for k, _ in SEED_COLUMNS})
        rows.append(row)
    return {"rows": rows, "date": utc_now(), "machine": machine()}


def seeds_markdown(summary: dict) -> str:
    """`seeds_summary` as a markdown table (a dash where a run has no such figure)."""
    def cell(v, fmt=".2f"):
        return "–" if v is None else f"{v:{fmt}}" if isinstance(v, (int, float)) and fmt else str(v)

    head = ["seed", "prompts per split", *[name for _, name in SEED_COLUMNS], "minutes", "GFLOP/s"]
    lines = [f"Generated {summary['date']} by `python -m minidalle eval seeds`; {describe_machine(summary['machine'])}.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rows"]:
        vals = [cell(r["seed"], ""), cell(r["prompts"], ""), *[cell(r[k]) for k, _ in SEED_COLUMNS],
                cell(r["minutes"], ".1f"), cell(r["machine_gflops"], ".0f")]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def write_seeds(summary: dict, out: str | Path) -> tuple[Path, Path]:
    """`seeds_summary`'s result as OUT/seeds.json and OUT/seeds.md (written atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "seeds.json", summary)
    write_atomic(out / "seeds.md", seeds_markdown(summary))
    return out / "seeds.json", out / "seeds.md"


def set_aside(out: str | Path, names: list[str] | None = None) -> Path | None:
    """Move `names` (default: every stage folder and the reports) of the run in `out` into
    out/set-aside-<time>/ (kept, not deleted), so the next demo trains them from scratch.
    A stage folder a trainer is writing to right now (its `.lock` held) is refused, and nothing moves.
    Returns that folder, or None when there was nothing to move."""
    from . import checkpoint as ckpt
    from .files import set_aside_folder

    out = Path(out)
    names = names or [*STAGES, STAGES_FILE, *REPORTS]
    present = [out / name for name in names if (out / name).exists()]
    if not present:
        return None
    locks = []
    try:
        for path in present:  # every stage folder is locked before the first one moves
            if path.is_dir():
                locks.append(ckpt.RunLock(path, "--out", "training run", "moving it aside would pull the folder from "
                                          "under it").acquire())
        aside = set_aside_folder(out)
        for path in present:
            path.rename(aside / path.name)
        ckpt.fsync_dir(out)
    finally:
        for lock in locks:
            lock.release()
    return aside


REPORTS = ("report.json", "report.md", "samples.png", "eval.json", "eval.md", "rerank_curve.png")  # what set_aside moves


# --- the report -------------------------------------------------------------------------------------
def summary_line(report: dict) -> str:
    """One line: the headline figures and the minutes. Example: "val: 0.59 single, 0.80 best of 16 ..."""
    n = report.get("candidates", CANDIDATES)
    if "val_all_single" not in report:
        return f"{report.get('dataset')} samples drawn; {report.get('minutes')} min"
    line = (f"all attributes right -- val: {report['val_all_single']:.2f} single, {report[f'val_all_best{n}']:.2f} "
            f"reranked best of {n} ({report['val_gain'] * 100:+.0f} points); heldout: "
            f"{report['heldout_all_single']:.2f} single, {report[f'heldout_all_best{n}']:.2f} best of {n} "
            f"({report['n_prompts']} prompts per split)")
    two = [f"{split} {report[f'{split}_two_best{n}']:.2f}" for split in ("val", "heldout")
           if f"{split}_two_best{n}" in report]
    swaps = [f"{split} {report[f'{split}_binding_swaps_best{n}']:.2f}" for split in ("val", "heldout")
             if f"{split}_binding_swaps_best{n}" in report]
    if two:
        line += f"; two-object captions, best of {n}: {', '.join(two)}"
    if swaps:
        line += f"; binding swaps among those picks: {', '.join(swaps)}"
    return line + (f"; {report['minutes']} min" if "minutes" in report else "")


def accuracy_markdown(result: dict) -> str:
    """The per-split, per-attribute table of `accuracy_table` results, as markdown."""
    lines = []
    for split, t in result["per_attribute"].items():
        n = t["candidates"]
        lines += [f"**{split}** ({t['all']['prompts']} prompts, {t['samples']} samples, {n} per prompt)", "",
                  f"| attribute | prompts | single sample | reranked best of {n} |", "|---|---|---|---|"]
        for attr, row in t.items():
            if isinstance(row, dict):
                lines.append(f"| {ROW_NAMES.get(attr, attr)} | {row['prompts']} | {row['single']:.3f} | "
                             f"{row['best']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def _incomplete(report: dict) -> str:
    """Why the minutes leave something out ("" when they do not)."""
    if report["minutes_complete"]:
        return ""
    why = []
    if any(s.get("seconds") is None for s in report["stages"].values()):
        why.append("stages trained outside the demo are not counted")
    for name, step in report.get("resumed", {}).items():
        why.append(f"{name} was continued from step {step} after an interruption: its earlier training time comes "
                   "from its checkpoint, the earlier attempt's setup time is not counted")
    return f" ({'; '.join(why)})"


def report_markdown(report: dict) -> str:
    lines = [f"# minidalle demo: preset `{report['preset']}`", "",
             f"{report['date']}; {describe_machine(report['machine'])}; device {report['device']}.", "",
             f"![samples]({Path(report['samples']).name})", ""]
    if "per_attribute" in report:
        lines += [summary_line(report) + ".", "", accuracy_markdown(report)]
    else:
        lines += [f"Prompts: {', '.join(repr(p) for p in report['prompts'])}.", "", *_heldout_markdown(report)]
    lines += ["## Stages", "", "| stage | minutes | what it ended with |", "|---|---|---|"]
    for name, s in report["stages"].items():
        took = "reused, not timed here" if s.get("seconds") is None else f"{s['seconds'] / 60:.1f}"
        facts = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in s["facts"].items())
        lines.append(f"| {name} | {took} | {facts} |")
    lines += ["", f"Sampling, reranking and judging: {report['sampling_seconds'] / 60:.1f} min. "
              f"Whole pipeline: {report['minutes']} min" + _incomplete(report) + "."
              + (f" The machine's fp32 matmul rate at the start: {report['machine_gflops']:.0f} GFLOP/s"
                 + (f" on {report['threads']} CPU thread(s)" if report.get("threads") else "") + "."
                 if report.get("machine_gflops") else ""), ""]
    return "\n".join(lines)
