"""Text to image end to end: load the trained runs, draw N candidates per prompt, rank them, keep the best.

    pipe  = load_pipeline(get_config("toy"))                      # transformer + its dVAE and BPE, the reranker
    cands = candidates(pipe, ["a red circle above a blue square"], n=32, top_k=64)
    score = rank(pipe, cands, by="clip")                          # (P, n): higher is better
    generate(pipe, prompts, n=32, keep=4, out="samples/")          # PNGs + captions.jsonl + grid.png
    curve = rerank_curve(pipe, n_prompts=64)                       # best-of-N judge accuracy by each ranking

The paper draws 512 candidates per caption and keeps the ones its contrastive model (CLIP) scores
highest; quality rises with the number of candidates up to about 32 (its Fig. 9c). `rerank_curve`
measures that on ShapesWorld, where the judge can say whether each image is right: for each N it
takes disjoint groups of N candidates of a prompt and asks how often the candidate a ranking picks
from a group is right, for three rankings -- the reranker, the transformer's own likelihood
log p(image | caption), and the judge itself (the ceiling: right whenever any of the N is).

The output folder of `generate` has the layout `python -m minidalle data` writes (one PNG and one
.txt per image, and captions.jsonl), so `python -m minidalle judge DIR` scores generated images as it
scores data.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import Config
from .errors import CheckpointError, ConfigError, DataError

RANKINGS = ("clip", "likelihood")
CURVE_SIZES = (1, 2, 4, 8, 16, 32, 64)
MARKER = "generate.json"  # what generate leaves in its folder (so a second run may replace its files)


@dataclass
class Pipeline:
    """Everything text-to-image needs, loaded from trained runs."""

    cfg: Config  # the transformer's own config (its data, tokenizers and model sections)
    model: torch.nn.Module  # DALLE, eval mode
    dvae: torch.nn.Module  # the image tokenizer it was trained with
    tok: object  # the BPE it was trained with
    clip: torch.nn.Module | None = None  # the reranker (None: rank by likelihood only)
    clip_tok: object = None  # the BPE the reranker reads (its own checkpoint's)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sources: dict = field(default_factory=dict)  # which checkpoint each part came from


def run_config(cfg: Config, run: str | Path | None) -> Config:
    """The config whose out_dirs point into run folder DIR (DIR/dvae, DIR/bpe, DIR/transformer, DIR/clip),
    the layout the `train` commands write. None: the preset's own folders."""
    if run is None:
        return cfg
    run = Path(run)
    if not run.is_dir():
        raise DataError(f"--run {run} is not a folder; give the folder the train commands "
                        f"wrote (e.g. runs/{cfg.preset})")
    cfg = replace(cfg, dvae_train=replace(cfg.dvae_train, out_dir=str(run / "dvae")),
                  text=replace(cfg.text, out_dir=str(run / "bpe")),
                  train=replace(cfg.train, out_dir=str(run / "transformer")))
    if hasattr(cfg, "clip_train"):
        cfg = replace(cfg, clip_train=replace(cfg.clip_train, out_dir=str(run / "clip")))
    return cfg


def load_pipeline(cfg: Config, run: str | Path | None = None, device: str = "auto", need_clip: bool = True,
                  checkpoint: str | Path | None = None) -> Pipeline:
    """The trained transformer (the newest checkpoint in train.out_dir, or `checkpoint`), the dVAE and
    BPE it was trained with, and (need_clip) the reranker in clip_train.out_dir.

    A missing run is a CheckpointError that says which command trains it.
    """
    from .clip import finished_clip, load_clip
    from .text_to_image import _tokenizers_for, finished_transformer, load_transformer
    from .train import pick_device

    cfg = run_config(cfg, run)
    path = Path(checkpoint) if checkpoint else finished_transformer(cfg)
    if path is None:
        demo = Path(f"runs/demo-{cfg.preset}")
        hint = "" if run else f", or point --run at a run folder (`make demo` writes {demo})" if not \
            (demo / "transformer").is_dir() else f"; `make demo` trained one: add --run {demo}"
        raise CheckpointError(f"no trained transformer in {cfg.train.out_dir}: train one with "
                              f"`python -m minidalle train transformer --preset {cfg.preset}`{hint}")
    model, mcfg, ids = load_transformer(path)
    dvae, tok = _tokenizers_for(ids, mcfg, cfg)
    dev = pick_device(device, "--device")
    pipe = Pipeline(mcfg, model.to(dev).eval(), dvae.to(dev).eval(), tok, device=dev,
                    sources={"transformer": str(path), "dvae": ids.get("dvae_checkpoint", ""), "bpe": ids["bpe"][:12]})
    clip_path = finished_clip(cfg)
    if clip_path is not None:
        pipe.clip, _, pipe.clip_tok = load_clip(clip_path)
        pipe.clip = pipe.clip.to(dev).eval()
        pipe.sources["clip"] = str(clip_path)
    elif need_clip:
        raise CheckpointError(f"no trained reranker in {cfg.clip_train.out_dir}: run `python -m minidalle train clip "
                              f"--preset {cfg.preset}`, or rank by the transformer's likelihood (--rank likelihood)")
    return pipe


# --- candidates and their scores -------------------------------------------------------------------
@dataclass
class Candidates:
    """n sampled images for each of P prompts."""

    prompts: list[str]
    notes: list[dict]  # per prompt: what encoding changed (sampling.encode_prompts)
    codes: torch.Tensor  # (P, n, N) image codes
    images: torch.Tensor  # (P, n, H, W, 3) uint8
    logp: torch.Tensor  # (P, n) log p(codes | caption)
    seconds: dict  # sampling, decoding


def candidates(pipe: Pipeline, prompts: list[str], n: int, seed: int = 0, truncate: bool = False,
               progress: bool = True, chunk_size: int | None = None, **settings) -> Candidates:
    """Draw n candidates per prompt (one batch, chunked) and decode them.

    settings: temperature, top_k, top_p, guidance, precision, compile (as sampling.sample takes them).
    """
    from .sampling import decode_images, encode_prompts, sample, warn_unguided

    if int(n) != n or n < 1:
        raise ConfigError(f"n={n} is invalid: draw at least 1 candidate per prompt")
    text, notes = encode_prompts(pipe.tok, prompts, pipe.model.layout, truncate=truncate)
    warn_unguided(pipe.model, settings.get("guidance", 1.0))
    P, N = len(text), pipe.model.layout.image_len
    gen = torch.Generator(device=pipe.device).manual_seed(seed)
    t0 = time.perf_counter()
    codes, logp = sample(pipe.model, text.to(pipe.device).repeat_interleave(n, 0), generator=gen,
                         chunk_size=chunk_size, progress=progress, return_logp=True, **settings)
    t1 = time.perf_counter()
    images = decode_images(pipe.dvae, codes, pipe.model.layout.grid)
    t2 = time.perf_counter()
    return Candidates(list(prompts), notes, codes.cpu().view(P, n, N), images.view(P, n, *images.shape[1:]),
                      logp.cpu().view(P, n), {"sampling": t1 - t0, "decoding": t2 - t1})


def rank(pipe: Pipeline, cands: Candidates, by: str = "clip") -> torch.Tensor:
    """Scores (P, n) of the candidates, higher = better: the reranker's image-caption similarity
    ("clip") or the transformer's log-likelihood of the image ("likelihood")."""
    if by == "likelihood":
        return cands.logp
    if by != "clip":
        raise ConfigError(f"rank by {by!r}? choose one of {', '.join(RANKINGS)}")
    if pipe.clip is None:
        raise CheckpointError("no reranker is loaded: train one with `python -m minidalle train clip`, or rank by "
                              "likelihood")
    from .clip import rerank

    P, n = cands.logp.shape
    prompts = [p for p in cands.prompts for _ in range(n)]
    cut = any(note["cut"] for note in cands.notes)  # prompts the user let the sampler cut: the reranker cuts them too
    return rerank(pipe.clip, pipe.clip_tok, prompts, cands.images.flatten(0, 1), truncate=cut).cpu().view(P, n)


# --- generate: the kept images on disk ------------------------------------------------------------
def generate(pipe: Pipeline, prompts: list[str], out: str | Path, n: int = 32, keep: int = 4, by: str = "clip",
             seed: int = 0, truncate: bool = False, progress: bool = True, **settings) -> dict:
    """Draw n candidates per prompt, keep the `keep` best by `by`, write them to `out`.

    out/: 00000.png + 00000.txt per kept image (best first, prompt by prompt), captions.jsonl with each
    file's caption, rank and scores, grid.png (each prompt above its kept images and their scores)
    and generate.json (the settings and where each model came from). `out` must be empty, new, or a
    folder generate wrote before (then its old files are replaced).
    """
    from PIL import Image

    from .viz import save_ranked_grid

    if int(keep) != keep or not 1 <= keep <= n:
        raise ConfigError(f"keep={keep} is invalid: keep between 1 and n={n} images per prompt")
    folder = _prepare_folder(Path(out))
    cands = candidates(pipe, prompts, n, seed, truncate, progress, **settings)
    t0 = time.perf_counter()
    scores = rank(pipe, cands, by)
    rank_seconds = time.perf_counter() - t0
    order = scores.argsort(dim=1, descending=True)[:, :keep]  # (P, keep)
    rows, kept, kept_scores = [], [], []
    width = max(5, len(str(len(prompts) * keep - 1)))
    for p, prompt in enumerate(cands.prompts):
        for r, j in enumerate(order[p].tolist()):
            stem = f"{len(rows):0{width}d}"
            Image.fromarray(cands.images[p, j].numpy()).save(folder / f"{stem}.png")
            (folder / f"{stem}.txt").write_text(prompt + "\n", encoding="utf-8")
            rows.append({"file": f"{stem}.png", "caption": prompt, "prompt": p, "rank": r + 1, "candidate": j,
                         "score": float(scores[p, j]), "log_likelihood": float(cands.logp[p, j])})
        kept.append(cands.images[p, order[p]])
        kept_scores.append(scores[p, order[p]].tolist())
    _write_lines(folder / "captions.jsonl", rows)
    grid = save_ranked_grid(cands.prompts, kept, kept_scores, folder / "grid.png",
                            title=f"best {keep} of {n} by {by}")
    total = sum(cands.seconds.values()) + rank_seconds
    summary = {"out": str(folder), "files": len(rows), "grid": str(grid), "n": n, "keep": keep, "rank": by,
               "seed": seed, "settings": settings, "sources": pipe.sources, "notes": cands.notes,
               "seconds": {**{k: round(v, 3) for k, v in cands.seconds.items()}, "ranking": round(rank_seconds, 3)},
               "rank_time_fraction": rank_seconds / total if total > 0 else 0.0}
    (folder / MARKER).write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    return summary


def _prepare_folder(out: Path) -> Path:
    """Create `out`, or clear a previous generate run's files from it; refuse any other non-empty folder."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder for the images")
    out.mkdir(parents=True, exist_ok=True)
    if (out / MARKER).is_file():
        from .data import read_split

        old = read_split(out) if (out / "captions.jsonl").is_file() else []
        for row in old:
            for f in (out / row["file"], (out / row["file"]).with_suffix(".txt")):
                f.unlink(missing_ok=True)
        for name in ("captions.jsonl", "grid.png", MARKER):
            (out / name).unlink(missing_ok=True)
    left = sorted(p.name for p in out.iterdir())
    if left:
        raise DataError(f"--out {out} already holds files that generate did not write ({', '.join(left[:3])}, ...); "
                        "choose an empty or new folder")
    return out


def _write_lines(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def read_prompts(path: str | Path) -> list[str]:
    """One caption a line (blank lines skipped). Example: "a red circle\\n\\na blue square\\n" -> 2 prompts"""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"--prompts {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"--prompts {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"--prompts {path} holds no captions (one caption a line)")
    return prompts


# --- the reranking curve ---------------------------------------------------------------------------
def _judge_all(images: torch.Tensor, prompts: list[str], progress: bool) -> dict:
    """Per candidate: all right (P, n) bool, and for each check (P, n) float with nan where not stated."""
    from .judge import CHECKS, judge

    P, n = images.shape[:2]
    ok = np.zeros((P, n), bool)
    checks = {c: np.full((P, n), np.nan) for c in CHECKS}
    bar = tqdm(total=P * n, desc="judging", disable=not progress)
    for p in range(P):
        for j in range(n):
            v = judge(images[p, j].numpy(), prompts[p])
            ok[p, j] = v.ok
            for c in CHECKS:
                if v.checks[c] is not None:
                    checks[c][p, j] = float(v.checks[c])
        bar.update(n)
    bar.close()
    return {"ok": ok, "checks": checks}


def best_of(scores: np.ndarray, size: int) -> np.ndarray:
    """Indices (P, n // size) of the best-scored candidate in each disjoint group of `size`.

    Example: scores [[0.1, 0.9, 0.5, 0.2]], size 2 -> [[1, 2]]
    """
    P, n = scores.shape
    groups = n // size
    s = scores[:, : groups * size].reshape(P, groups, size)
    return s.argmax(axis=2) + np.arange(groups)[None, :] * size


def curve_from_scores(verdicts: dict, rankings: dict[str, np.ndarray], sizes=CURVE_SIZES) -> dict:
    """For each ranking and group size N: judge accuracy of the picked candidates ("all" and each check).

    rankings: name -> scores (P, n). Each prompt's n candidates are cut into n // N disjoint groups
    and each group's best-scored one is judged; the accuracy averages over prompts and groups.
    """
    ok, checks = verdicts["ok"], verdicts["checks"]
    out = {}
    for name, scores in rankings.items():
        out[name] = {}
        for size in sizes:
            idx = best_of(scores, size)
            picked = np.take_along_axis(ok, idx, 1)
            row = {"all": float(picked.mean())}
            for c, vals in checks.items():
                v = np.take_along_axis(vals, idx, 1)
                row[c] = float(np.nanmean(v)) if np.isfinite(v).any() else None
            out[name][size] = row
    return out


def rerank_curve(pipe: Pipeline, n_prompts: int = 64, sizes=CURVE_SIZES, seed: int = 0, progress: bool = True,
                 plot: str | Path | None = None, **settings) -> dict:
    """Best-of-N judge accuracy on `val` and `heldout` ShapesWorld prompts, by reranker, likelihood and judge.

    Keys: `{split}_all_single` (one sample), `{split}_all_best{N}_{ranking}`, `curve` (split -> ranking ->
    N -> accuracy per check), `rank_time_fraction` (reranking ÷ sampling + decoding + reranking, at N
    = the largest size), and the plot's path.
    Example: -> {"val_all_single": 0.56, "val_all_best16_clip": 0.9, "heldout_all_best16_clip": 0.7, ...}
    """
    from .data import ShapesWorld
    from .judge import CHECKS

    if pipe.cfg.data.dataset != "shapes":
        raise DataError(f"the reranking curve needs the ShapesWorld judge; this model's data.dataset is "
                        f"{pipe.cfg.data.dataset!r}")
    n = max(sizes)
    out = {"n_prompts": n_prompts, "candidates": n, "sizes": list(sizes), "settings": settings, "curve": {},
           "sources": pipe.sources}
    times = {"sampling": 0.0, "decoding": 0.0, "clip": 0.0}
    for split in ("val", "heldout"):
        ds = ShapesWorld(split, pipe.cfg.data.image_size, pipe.cfg.data.seed)
        prompts = [ds.example(i)[1] for i in range(n_prompts)]
        cands = candidates(pipe, prompts, n, seed + (split == "heldout"), progress=progress, **settings)
        for k in ("sampling", "decoding"):
            times[k] += cands.seconds[k]
        rankings = {"likelihood": cands.logp.numpy()}
        if pipe.clip is not None:
            t0 = time.perf_counter()
            rankings["clip"] = rank(pipe, cands, "clip").numpy()
            times["clip"] += time.perf_counter() - t0
        verdicts = _judge_all(cands.images, prompts, progress)
        # the ceiling: the judge's own pick -- all right first, then the most stated facts right
        facts = sum(np.nan_to_num(verdicts["checks"][c]) for c in CHECKS)
        rankings["judge"] = verdicts["ok"] * 100.0 + facts
        curve = curve_from_scores(verdicts, rankings, sizes)
        out["curve"][split] = curve
        out[f"{split}_all_single"] = curve["likelihood"][1]["all"]  # N = 1: every ranking picks the one sample
        for name in curve:
            for size in sizes:
                out[f"{split}_all_best{size}_{name}"] = curve[name][size]["all"]
    total = sum(times.values())
    out["seconds"] = {k: round(v, 2) for k, v in times.items()}
    out["rank_time_fraction"] = times["clip"] / total if pipe.clip is not None and total > 0 else None
    if plot is not None:
        out["plot"] = str(plot_curve(out, plot))
    return out


def plot_curve(result: dict, path: str | Path) -> Path:
    """Accuracy ("all attributes right") against N, one line per ranking, val solid and heldout dashed.
    (The backend is left alone: in a notebook the inline one keeps working after this.)"""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"clip": "tab:blue", "likelihood": "tab:orange", "judge": "tab:green"}
    labels = {"clip": "reranker (CLIP)", "likelihood": "transformer likelihood", "judge": "judge (ceiling)"}
    sizes = result["sizes"]
    for split, style in (("val", "-"), ("heldout", "--")):
        for name, curve in result["curve"][split].items():
            ax.plot(sizes, [curve[s]["all"] for s in sizes], style, marker="o", color=colors.get(name),
                    label=f"{labels.get(name, name)}, {split}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("candidates per prompt (N)")
    ax.set_ylabel("best of N: all attributes right")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"reranking on ShapesWorld ({result['n_prompts']} prompts per split)")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
