"""The figures that say whether a run works: judged candidates per split, the accuracy tables, report.md and eval.md.

    table = accuracy_table(judged)                          # per split: all facts, one / two objects, each attribute, swaps
    result = evaluate_run(get_config("toy"), "runs/demo-toy", n_prompts=256)   # `python -m minidalle eval`
    summary = seeds_summary(["runs/a", "runs/b"])           # `eval seeds`: several run folders side by side

Every figure is counted from the judge's verdicts on the candidates (stages/generate.py draws and
ranks them): the first candidate is "one sample", the reranker's pick "best of 16". pipeline.py
writes these into the run folder at the end of the demo; `eval` recomputes them on more prompts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..infra.machine import describe_machine, machine, utc_now
from ..config import Config
from ..errors import CheckpointError, ConfigError, DataError
from ..infra.files import write_atomic

CANDIDATES = 16  # candidates per prompt: the best of 16 is the figure the report leads with
KEEP = 4  # images per prompt in samples.png
SHOWN = 6  # prompts per split in samples.png
DEMO_PROMPTS = 64  # val and heldout prompts each that the demo judges (`eval` takes 256)


def _write_json(path: Path, value) -> None:
    write_atomic(path, json.dumps(value, indent=1, default=str, allow_nan=False) + "\n")


# --- judging the candidates -------------------------------------------------------------------------
def split_prompts(cfg: Config, n: int) -> dict[str, list[str]]:
    """The first n captions of the `val` and `heldout` ShapesWorld splits: the demo's fixed prompt list.

    Example: split_prompts(get_config("toy"), 2) -> {"val": ["a small red circle", ...], "heldout": [...]}
    """
    from ..data import ShapesWorld

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
    from ..judge import CHECKS

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
    from ..data import build_dataset
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
    from ..infra import checkpoint as ckpt
    from .reranker import heldout_recall
    from .transformer import eval_pairs, pairs_loss

    recall = heldout_recall(pipe.clip, pipe.clip_tok, cfg.data)
    dvae_id = ckpt.read_config(pipe.sources["transformer"])["tokenizers"]["dvae"]  # the key of its cached codes
    loss = pairs_loss(pipe.model, eval_pairs(cfg, pipe.dvae, pipe.tok, dvae_id, progress=progress))
    return {"heldout_recall": recall, "transformer_val_loss": loss,
            "transformer_val_loss_logged": _last_logged_eval(Path(cfg.train.out_dir) / "metrics.jsonl")}


def _last_logged_eval(metrics: Path) -> dict | None:
    """The last evaluation line of a metrics.jsonl, as {"loss", "step"} (None: no evaluation was logged)."""
    from ..infra.resume import read_metrics

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
    from ..viz import save_ranked_grid

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
