"""The main job: the whole DALL·E in miniature from one call, and the figures that say whether it works.

    report = run_demo(get_config("toy"), "runs/demo-toy")   # dVAE -> BPE -> transformer -> reranker -> samples
    result = evaluate_run(get_config("toy"), "runs/demo-toy", n_prompts=256)   # report.py: `python -m minidalle eval`

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

import torch

from ..infra.machine import machine, utc_now
from ..config import Config
from ..errors import ConfigError
from ..infra.files import write_atomic
from .report import CANDIDATES, DEMO_PROMPTS, _judged_samples, _unjudged_samples, _write_json, report_markdown, summary_line

STAGES = ("dvae", "bpe", "transformer", "clip")
DVAE_MIN_JUDGE = 0.9  # stage 1 must keep this much of the val images' meaning (judge on reconstructions)
DVAE_TRIES = 3  # seeds tried for stage 1 before going on with the best one (and saying so)
STAGES_FILE = "stages.json"
TRAIN_SECTION = {"dvae": "dvae_train", "transformer": "train", "clip": "clip_train"}  # each trained stage's settings


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


def _smoke(cfg: Config) -> bool:
    """The smoke preset, or smoke caps: a handful of updates, checked for running, not for quality."""
    from ..config import smoke_mode

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
    from .transformer import finished_dvae

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
    from .text_tokenizer import BPE_FILE, _file_sha256, prepare_bpe

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
    from ..infra import checkpoint as ckpt

    tc = getattr(cfg, TRAIN_SECTION[name])
    path = ckpt.latest_valid_checkpoint(Path(tc.out_dir) / "checkpoints")
    return path if path is not None and ckpt.verify_checkpoint(path)["step"] >= tc.max_steps else None


def _trained_stage(st: _Stages, name: str) -> dict:
    """The transformer or the reranker: reuse a finished run in its folder, else continue or start it.
    A run trained with other tokenizers than the ones the demo has now is set aside first and trained again."""
    from .reranker import train_clip
    from .transformer import train_transformer

    _set_aside_if_stale(st, name)
    before, done = st.record.get(name), _finished(st.cfg, name)
    if done is not None:  # finished (by this demo, or by `train` into this folder: then not timed)
        from ..infra import checkpoint as ckpt

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
    from ..infra import checkpoint as ckpt
    from .image_tokenizer import tokenizer_id
    from .text_tokenizer import BPE_FILE, _file_sha256
    from .transformer import finished_dvae

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
    from ..infra import checkpoint as ckpt
    from .generate import load_pipeline
    from ..infra.devices import pick_device

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
    thread count infra.machine.choose_threads picks now (each stage's Trainer picks again when it starts), on a
    GPU that GPU's. report.json keeps it as machine_gflops, so minutes on two machines can be compared.
    Example: -> {"gflops": 61.0, "threads": 2, "line": "2 CPU threads of 2 (matmul 61 GFLOP/s; 1 thread: 32)"}
    """
    from ..infra.machine import choose_threads, matmul_gflops

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
    from ..infra import checkpoint as ckpt

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
    from ..infra import checkpoint as ckpt

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

    from ..bpe import RegexTokenizer, Tokenizer
    from .text_tokenizer import BPE_FILE, _file_sha256, training_captions

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


def set_aside(out: str | Path, names: list[str] | None = None) -> Path | None:
    """Move `names` (default: every stage folder and the reports) of the run in `out` into
    out/set-aside-<time>/ (kept, not deleted), so the next demo trains them from scratch.
    A stage folder a trainer is writing to right now (its `.lock` held) is refused, and nothing moves.
    Returns that folder, or None when there was nothing to move."""
    from ..infra import checkpoint as ckpt
    from ..infra.files import set_aside_folder

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


