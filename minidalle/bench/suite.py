"""`python -m minidalle bench all`: every stage benchmark in turn, and one summary of what they measured.

    python -m minidalle bench all --preset toy                      # runs/bench/summary.md and summary.json
    python -m minidalle bench all --skip dvae,sampling --out DIR    # leave the slow ones out

The benchmarks run in BENCHMARKS order (judge, dvae, bpe, attention, sampling), each with its own
defaults, then the whole-pipeline quality figures of a finished `make demo` run (`--run DIR`, default
runs/demo-<preset>; "not measured" when there is none). After each step the summary so far is written
again (atomically: a .tmp file, then a rename), so a crash or Ctrl-C part way loses nothing already
measured. A benchmark that raises is recorded as FAILED with its error, and the others still run.

Per benchmark the summary lists its headline figures (with the target and met / MISSED where the
benchmark defines one) and the seconds it took; then the quality table and the machine it ran on
(no hostname).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import traceback
from pathlib import Path

from .. import config as cfglib
from ..infra.machine import describe_machine, machine
from .tools import judge_targets
from ..infra.machine import utc_now as _utc
from ..errors import CheckpointError, ConfigError, DataError
from ..infra.files import write_atomic

BENCHMARKS = ("judge", "dvae", "bpe", "attention", "sampling")
STEPS = BENCHMARKS + ("quality",)  # what --skip accepts
DEFAULT_OUT = "runs/bench"

# What a finished toy pipeline should reach (evaluate_run's keys); judged on the toy preset only.
QUALITY_TARGETS = (
    ("val_all_best16", ">=", 0.95),
    ("val_all_single", ">=", 0.65),
    ("heldout_all_best16", ">=", 0.75),
    ("heldout_all_single", ">=", 0.40),
    ("val_gain", ">=", 0.20),
)
QUALITY_NAMES = {"val_all_best16": "val, every attribute right, reranker's best of 16",
                 "val_all_single": "val, every attribute right, one sample",
                 "heldout_all_best16": "heldout, every attribute right, reranker's best of 16",
                 "heldout_all_single": "heldout, every attribute right, one sample",
                 "val_gain": "val gain of best of 16 over one sample"}


def bpe_targets() -> tuple:
    from .bpe import TARGETS  # imported late: bench/bpe.py pulls in the stdlib corpus code

    return TARGETS


# --- the flags ------------------------------------------------------------------------------------------
def parse_skip(text: str | None) -> list[str]:
    """The step names of `--skip`, checked against STEPS.

    Example: parse_skip("dvae, sampling") -> ["dvae", "sampling"]; parse_skip("dave") -> ConfigError
    """
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    unknown = [name for name in names if name not in STEPS]
    if unknown:
        raise ConfigError(f"--skip {text}: unknown benchmark {', '.join(map(repr, unknown))}; "
                          f"choose from {', '.join(STEPS)} (comma-separated)")
    return names


def command_line(args, cfg: cfglib.Config) -> str:
    """The command that reproduces this run: the flags given, and every config value that differs from
    the preset's.

    Example: command_line(args, cfg) -> "python -m minidalle bench all --preset smoke --skip dvae --data.seed=3"
    """
    parts = ["python -m minidalle bench all", f"--preset {cfg.preset}"]
    if getattr(args, "skip", None):
        parts.append(f"--skip {args.skip}")
    if getattr(args, "no_compile", False):
        parts.append("--no-compile")
    if getattr(args, "mib", 10.0) != 10.0:
        parts.append(f"--mib {args.mib}")
    for flag in ("run", "out"):
        if getattr(args, flag, None):
            parts.append(f"--{flag} {getattr(args, flag)}")
    if getattr(args, "json", False):
        parts.append("--json")
    preset = _flat(cfglib.get_config(cfg.preset).to_dict())
    parts += [f"--{key}={value}" for key, value in _flat(cfg.to_dict()).items() if preset.get(key) != value]
    return " ".join(parts)


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested config dict -> {"section.key": value}. Example: _flat({"data": {"seed": 0}}) -> {"data.seed": 0}"""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --- running one benchmark ------------------------------------------------------------------------------
def _run_judge(cfg, opts):
    from .judge import benchmark, format_benchmark

    return benchmark(image_size=cfg.data.image_size, seed=cfg.data.seed, progress=opts["progress"]), format_benchmark


def _run_dvae(cfg, opts):
    from .dvae import benchmark_dvae, format_dvae_benchmark

    with tempfile.TemporaryDirectory(prefix="minidalle-bench-all-dvae-") as out:  # it trains from scratch
        return benchmark_dvae(cfg, out, progress=opts["progress"]), format_dvae_benchmark


def _run_bpe(cfg, opts):
    from .bpe import benchmark_bpe, format_bpe_benchmark

    return benchmark_bpe(mib=opts["mib"], progress=opts["progress"]), format_bpe_benchmark


def _run_attention(cfg, opts):
    from .attention import benchmark_attention, format_attention_benchmark

    return benchmark_attention(progress=opts["progress"]), format_attention_benchmark


def _run_sampling(cfg, opts):
    from .sampling import benchmark_sampling, format_sampling_benchmark

    return benchmark_sampling(compile=opts["compile"], progress=opts["progress"]), format_sampling_benchmark


RUNNERS = {"judge": _run_judge, "dvae": _run_dvae, "bpe": _run_bpe, "attention": _run_attention,
           "sampling": _run_sampling}


def one_line(e: BaseException) -> str:
    """An exception as one line. Example: one_line(ValueError("bad\\nmore")) -> "ValueError: bad" """
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def run_step(name: str, cfg: cfglib.Config, opts: dict) -> dict:
    """Run one benchmark; whatever it raises (but an interrupt) is caught and recorded as failed.

    Example: run_step("bpe", cfg, opts) -> {"status": "ok", "seconds": 41.2, "figures": [...], "result": {...}}
             (a raise: {"status": "failed", "error": "RuntimeError: ...", "traceback": "...", ...})
    """
    t0 = time.perf_counter()
    try:
        result, fmt = RUNNERS[name](cfg, opts)
    except Exception as e:
        return {"status": "failed", "error": one_line(e), "traceback": traceback.format_exc(),
                "seconds": round(time.perf_counter() - t0, 1)}
    entry = {"status": "ok", "result": result, "seconds": round(time.perf_counter() - t0, 1)}
    try:
        entry["figures"] = FIGURES[name](result)
    except Exception as e:  # the result is kept in the JSON; only its table is missing
        entry.update(status="failed", error=f"reading its figures: {one_line(e)}", traceback=traceback.format_exc())
    try:
        entry["report"] = fmt(result)
    except Exception as e:  # a text report that cannot be written costs only itself
        entry["report"] = f"(its text report failed: {one_line(e)})"
    return entry


# --- headline figures: rows of {"figure", "key", "value", "target", "met", "note"} -------------------
def row(figure: str, value, key: str | None = None, target: dict | None = None) -> dict:
    """One figure of a table. target: a judge_targets entry ({"target", "value", "met", "note"?}) or None.

    Example: row("x", 1.3, "x", {"target": ">= 1.2", "met": True}) -> {"figure": "x", "key": "x", "value": 1.3,
             "target": ">= 1.2", "met": True, "note": None}
    """
    target = target or {}
    return {"figure": figure, "key": key, "value": value, "target": target.get("target"),
            "met": target.get("met"), "note": target.get("note")}


def target_rows(res: dict, targets: dict) -> list[dict]:
    """A row for each judged target (the benchmark's own `targets`, or judge_targets' output)."""
    return [row(key, t["value"], key, t) for key, t in targets.items()]


def judge_figures(res: dict) -> list[dict]:
    """bench judge: accuracy on true captions and rejection of wrong ones, per condition and split."""
    from .judge import CONDITIONS

    rows = [row(f"accuracy, {kind} {split}", r["overall"], f"{kind}.{split}.overall")
            for kind in CONDITIONS for split, r in res[kind].items()]
    rows += [row(f"wrong captions rejected, {kind} {split}", r["overall"], f"rejects.{kind}.{split}.overall")
             for kind in CONDITIONS for split, r in res["rejects"][kind].items()]
    return rows + [row("ms per image", res["ms_per_image"], "ms_per_image")]


def dvae_figures(res: dict) -> list[dict]:
    """bench dvae: reconstructions the judge accepts (over originals), PSNR, the codebook's use, training time."""
    rows = []
    for split in ("val", "heldout"):
        s = res[split]
        rows += [row(f"{split}: judge on reconstructions / on originals", s["ratio"], f"{split}.ratio"),
                 row(f"{split}: judge on reconstructions", s["reconstruction"]["overall"],
                     f"{split}.reconstruction.overall"),
                 row(f"{split}: PSNR (dB)", s["psnr"], f"{split}.psnr")]
    return rows + [row("codebook perplexity / K", res["perplexity_fraction"], "perplexity_fraction"),
                   row("dead codes", res["dead_codes"], "dead_codes"),
                   row("training updates", res["steps"], "steps"),
                   row("training seconds", res["train_seconds"], "train_seconds"),
                   row("encoding, images per second", res["encode_images_per_s"], "encode_images_per_s")]


def bpe_figures(res: dict) -> list[dict]:
    """bench bpe: the three ratios against their targets, and the absolute times for information."""
    return target_rows(res, judge_targets(res, bpe_targets())) + [
        row("training seconds (ours)", res["train_seconds"], "train_seconds"),
        row("captions encoded per second (ours)", res["encode_captions_per_s"], "encode_captions_per_s")]


def targets_figures(res: dict) -> list[dict]:
    """bench attention and bench sampling: every target they judge, as they judged it."""
    return target_rows(res, res["targets"])


FIGURES = {"judge": judge_figures, "dvae": dvae_figures, "bpe": bpe_figures, "attention": targets_figures,
           "sampling": targets_figures}


# --- the quality of a finished run ----------------------------------------------------------------------
def make_command(cfg: cfglib.Config, run: Path) -> str:
    """The command that makes the run folder bench all reads.

    Example: make_command(toy, Path("runs/demo-toy")) -> "make demo"
             make_command(toy, Path("elsewhere")) -> "python -m minidalle demo --preset toy --out elsewhere"
    """
    if run == Path(f"runs/demo-{cfg.preset}"):
        return "make demo" if cfg.preset == "toy" else f"make demo PRESET={cfg.preset}"
    return f"python -m minidalle demo --preset {cfg.preset} --out {run}"


def quality_step(cfg: cfglib.Config, run: Path, progress: bool) -> dict:
    """The whole pipeline's figures from `report.evaluate_run` on the run folder, judged against
    QUALITY_TARGETS (toy preset only). No finished run: status "not measured", with the error and the
    command that makes one (a DataError, data the judge cannot read: "not measured", no command). Another
    error: status "failed", as for a benchmark.

    Example: quality_step(cfg, Path("runs/demo-toy"), False)
             -> {"status": "ok", "figures": [{"figure": "val, ... best of 16", "value": 0.97, ...}, ...], ...}
    """
    t0 = time.perf_counter()
    entry: dict = {"run": str(run), "make": make_command(cfg, run)}
    try:
        if not run.is_dir():
            raise CheckpointError(f"no run folder {run}, so no finished pipeline to measure")
        from ..stages.report import evaluate_run

        result = evaluate_run(cfg, run, progress=progress)
        entry.update(status="ok", figures=quality_figures(result, cfg.preset), result=result)
    except CheckpointError as e:
        entry.update(status="not measured", error=str(e))
    except DataError as e:  # a preset whose images the judge cannot read: no run would help
        entry.update(status="not measured", error=str(e), make=None)
    except Exception as e:
        entry.update(status="failed", error=one_line(e), traceback=traceback.format_exc())
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    return entry


def quality_figures(result: dict, preset: str) -> list[dict]:
    """evaluate_run's figures with their targets; on another preset than toy the targets are shown, not judged.

    Example: quality_figures({"val_all_best16": 0.97, ...}, "toy")[0]
             -> {"figure": "val, every attribute right, reranker's best of 16", "value": 0.97, "met": True, ...}
    """
    judged = judge_targets(result, QUALITY_TARGETS)
    if preset != "toy":
        for t in judged.values():
            t["met"], t["note"] = None, f"a toy target; not judged on preset {preset}"
    rows = [row(QUALITY_NAMES[key], t["value"], key, t) for key, t in judged.items()]
    return rows + [row("prompts per split", result.get("n_prompts"), "n_prompts")]


# --- the summary ----------------------------------------------------------------------------------------
def bench_all(args, cfg: cfglib.Config) -> dict:
    """`bench all`: run the benchmarks not skipped, then the quality step, writing the summary after each.

    Returns the summary (what summary.json holds). Bad flags raise ConfigError before anything runs.
    Example: bench_all(parse(["bench", "all", "--skip", "dvae"]), cfg) -> {"benchmarks": {"judge": {...}, ...}, ...}
    """
    from ..infra.files import check_out_folder

    skip = parse_skip(getattr(args, "skip", None))
    if getattr(args, "n", None) is not None:
        raise ConfigError("--n is not used by bench all: each benchmark runs with its own defaults "
                          "(run `bench judge --n N` and the others one by one to change them)")
    out = check_out_folder(getattr(args, "out", None) or DEFAULT_OUT, "--out")
    run = Path(check_out_folder(getattr(args, "run", None) or f"runs/demo-{cfg.preset}", "--run"))
    quiet = getattr(args, "json", False)
    opts = {"progress": not quiet, "compile": not getattr(args, "no_compile", False),
            "mib": getattr(args, "mib", 10.0)}
    todo = [name for name in STEPS if name not in skip]
    summary = new_summary(args, cfg, skip, out)
    say = (lambda text: None) if quiet else (lambda text: print(text, flush=True))
    write_summary(summary, out)  # an --out that cannot be written fails now, not after the first benchmark
    for i, name in enumerate(todo, 1):
        say(f"[bench all] {i}/{len(todo)} {name} ...")
        entry = summary["quality"] if name == "quality" else summary["benchmarks"][name]
        entry["status"] = "running"
        write_summary(summary, out)  # a process killed outright leaves "running" on the step it died in
        try:
            done = quality_step(cfg, run, opts["progress"]) if name == "quality" else run_step(name, cfg, opts)
        except BaseException:  # Ctrl-C, or a SystemExit from deep inside: keep what is measured, then stop
            entry["status"] = "interrupted"
            write_summary(summary, out)
            raise
        entry.update(done)
        if entry.get("report"):
            say(entry["report"])
        how = "done" if entry["status"] == "ok" else f"{entry['status'].replace('failed', 'FAILED')} ({entry['error']})"
        say(f"[bench all] {i}/{len(todo)} {name} {how} in {entry['seconds']:.0f} s")
        write_summary(summary, out)
    summary["finished_utc"], summary["complete"] = _utc(), True
    paths = write_summary(summary, out)
    say(f"[bench all] wrote {paths[0]} and {paths[1]}")
    return summary


def new_summary(args, cfg: cfglib.Config, skip: list[str], out: Path) -> dict:
    """The summary before anything has run: every step pending (or skipped), the machine, the command."""
    def status(name):
        return {"status": "skipped"} if name in skip else {"status": "pending"}
    return {"title": "minidalle bench all", "preset": cfg.preset, "command": command_line(args, cfg),
            "started_utc": _utc(), "finished_utc": None, "complete": False, "machine": machine(),
            "benchmarks": {name: status(name) for name in BENCHMARKS}, "quality": status("quality"),
            "files": {"markdown": str(out / "summary.md"), "json": str(out / "summary.json")}}


def write_summary(summary: dict, out: Path) -> tuple[Path, Path]:
    """summary.md and summary.json in `out`, each written to a .tmp file and then renamed over the old one.

    Example: write_summary(summary, Path("runs/bench")) -> (Path("runs/bench/summary.md"), Path(".../summary.json"))
    """
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "summary.md", out / "summary.json"
    from ..infra.files import strict_json  # late: cli imports this module only when `bench all` runs

    write_atomic(js, json.dumps(strict_json(summary), indent=1, sort_keys=True, default=str, allow_nan=False) + "\n")
    write_atomic(md, to_markdown(summary))
    return md, js


# --- markdown -------------------------------------------------------------------------------------------
def fmt_value(value) -> str:
    """A figure for a table cell.

    Example: fmt_value(0.98765) -> "0.988"; fmt_value(12.34) -> "12.3"; fmt_value(1234.5) -> "1,234"; None -> "—"
    """
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"


def fmt_met(r: dict) -> str:
    """The met column. Example: fmt_met({"met": False, "target": ">= 5"}) -> "**MISSED**" """
    if r["target"] is None:
        return ""
    text = {True: "met", False: "**MISSED**", None: "not judged"}[r["met"]]
    return f"{text} ({r['note']})" if r.get("note") else text


def figures_table(rows: list[dict]) -> list[str]:
    """Rows as a markdown table: figure | value | target | met."""
    lines = ["| figure | value | target | met |", "|---|---:|---|---|"]
    cells = [(r["figure"], fmt_value(r["value"]), r["target"] or "", fmt_met(r)) for r in rows]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row_cells) + " |" for row_cells in cells]
    return lines


def status_text(entry: dict) -> str:
    """A step's status for a heading.

    Example: status_text({"status": "failed", "seconds": 3.0}) -> "FAILED after 3 s"
    """
    s, secs = entry["status"], entry.get("seconds")
    took = "" if secs is None else f" {secs:.0f} s" if s == "ok" else f" after {secs:.0f} s"
    return {"ok": f"ok,{took}", "failed": f"FAILED{took}"}.get(s, s)


def targets_count(entry: dict) -> str:
    """"3 of 4 targets met" for a finished step with targets, else "". """
    judged = [r for r in entry.get("figures", []) if r["target"] is not None and r["met"] is not None]
    if not judged:
        return ""
    missed = sum(not r["met"] for r in judged)
    return f"{len(judged) - missed} of {len(judged)} targets met" + (f", **{missed} MISSED**" if missed else "")


def to_markdown(s: dict) -> str:
    """The summary as markdown: title, an overview, a table per benchmark, quality, machine, command."""
    m = s["machine"]
    steps = {**s["benchmarks"], "quality": s["quality"]}
    failed = [name for name, e in steps.items() if e["status"] == "failed"]
    lines = [f"# minidalle benchmarks, {s['started_utc']}, preset {s['preset']}", "",
             f"{describe_machine(m)}.", ""]
    if not s["complete"]:
        lines += [f"**Partial summary**: written while running (started {s['started_utc']}); "
                  "steps still pending or interrupted are marked so.", ""]
    if failed:
        lines += [f"**FAILED: {', '.join(failed)}** (errors below).", ""]
    lines += ["| step | status | targets |", "|---|---|---|"]
    lines += [f"| {name} | {status_text(e)} | {targets_count(e)} |" for name, e in steps.items()]
    for name, e in s["benchmarks"].items():
        if e["status"] in ("skipped", "pending"):
            continue
        lines += ["", f"## {name} ({status_text(e)})", ""] + step_body(e)
    lines += ["", f"## quality of the whole pipeline ({status_text(s['quality'])})", ""] + quality_body(s["quality"])
    lines += ["", "## machine", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {fmt_value(value)} |" for key, value in
              (("date", m["utc"]), ("platform", m["platform"]), ("python", m["python"]), ("torch", m["torch"]),
               ("CPUs", m["cpus"]), ("torch threads", m["torch_threads"]), ("GPU", m["gpu"] or "none"),
               ("smoke caps", "on" if m["smoke_caps"] else "off"))]
    lines += ["", f"Made by `{s['command']}`" + (f", finished {s['finished_utc']}." if s["finished_utc"] else "."), ""]
    return "\n".join(lines)


def step_body(e: dict) -> list[str]:
    """The lines under a step's heading: its table, or what went wrong."""
    if e["status"] == "ok":
        return figures_table(e["figures"])
    if e["status"] == "failed":
        return [f"**FAILED**: `{e['error']}`"]
    return [f"{e['status']}."]


def quality_body(e: dict) -> list[str]:
    """The quality section: the figures against the toy targets, or why they were not measured."""
    if e["status"] == "skipped":
        return ["skipped (--skip quality)."]
    if e["status"] == "not measured":
        make = ["", f"Make a finished run with `{e['make']}`, then run this command again."] if e.get("make") else []
        return [f"Not measured: {e['error']}"] + make
    if e["status"] == "ok":
        return [f"From `{e['run']}` (targets: the toy preset's).", ""] + figures_table(e["figures"])
    return step_body(e)
