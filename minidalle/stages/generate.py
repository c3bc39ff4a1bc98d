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
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import Config
from ..errors import CheckpointError, ConfigError, DataError

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
                  checkpoint: str | Path | None = None, trust_sharded: bool = False,
                  no_clip_hint: str = "") -> Pipeline:
    """The trained transformer (the newest checkpoint in train.out_dir, or `checkpoint`), the dVAE and
    BPE it was trained with, and the reranker: the newest checkpoint in clip_train.out_dir (a run
    stopped before its own clip_train.max_steps is used as it is, with a warning).

    A missing run is a CheckpointError that says which command trains it; a missing reranker is one
    only with need_clip (no_clip_hint: what else the caller can do, added to that message). Only
    full checkpoints (safetensors) are read, unless trust_sharded: a sharded one's index is a pickle.
    """
    from ..infra import checkpoint as ckpt
    from .reranker import load_clip
    from .transformer import _tokenizers_for, finished_transformer, load_transformer
    from ..infra.devices import pick_device

    cfg = run_config(cfg, run)
    path = Path(checkpoint) if checkpoint else finished_transformer(cfg)
    if path is None:
        demo = Path(f"runs/demo-{cfg.preset}")
        hint = "" if run else f", or point --run at a run folder (`make demo` writes {demo})" if not \
            (demo / "transformer").is_dir() else f"; `make demo` trained one: add --run {demo}"
        raise CheckpointError(f"no trained transformer in {cfg.train.out_dir}: train one with "
                              f"`python -m minidalle train transformer --preset {cfg.preset}`{hint}")
    model, mcfg, ids = load_transformer(path, trust_sharded=trust_sharded)
    dvae, tok, dvae_path = _tokenizers_for(ids, mcfg, cfg, trust_sharded=trust_sharded)
    dev = pick_device(device, "--device")
    pipe = Pipeline(mcfg, model.to(dev).eval(), dvae.to(dev).eval(), tok, device=dev,
                    sources={"transformer": str(path), "dvae": str(dvae_path), "bpe": ids["bpe"][:12]})
    clip_path = ckpt.latest_valid_checkpoint(Path(cfg.clip_train.out_dir) / "checkpoints")
    if clip_path is not None:
        pipe.clip, ccfg, pipe.clip_tok = load_clip(clip_path, trust_sharded=trust_sharded)
        pipe.clip = pipe.clip.to(dev).eval()
        pipe.sources["clip"] = str(clip_path)
        step = ckpt.verify_checkpoint(clip_path)["step"]
        if step < ccfg.clip_train.max_steps:
            warnings.warn(f"the reranker in {clip_path} stopped at step {step} of the {ccfg.clip_train.max_steps} its "
                          f"run was set to (interrupted?); ranking with it as it is (finish it with `python -m "
                          f"minidalle train clip --resume --clip_train.out_dir={cfg.clip_train.out_dir}`)", stacklevel=2)
    elif need_clip:
        raise CheckpointError(f"no reranker checkpoint in {Path(cfg.clip_train.out_dir) / 'checkpoints'}: train one "
                              f"with `python -m minidalle train clip --preset {cfg.preset}`" +
                              (f", {no_clip_hint}" if no_clip_hint else ""))
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
    from ..sampling import decode_images, encode_prompts, sample, warn_unguided

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
    P, n = cands.logp.shape
    prompts = [p for p in cands.prompts for _ in range(n)]
    cut = any(note["cut"] for note in cands.notes)  # prompts the user let the sampler cut: the reranker cuts them too
    return _clip_scores(pipe, prompts, cands.images.flatten(0, 1), cut).view(P, n)


# --- generate: the kept images on disk ------------------------------------------------------------
GRID_PROMPTS = 32  # prompts grid.png shows (the first ones): an overview costs seconds whatever the job's size
GRID_CAPTION = 160  # characters of a prompt the grid writes above its images


def generate(pipe: Pipeline, prompts: list[str], out: str | Path, n: int = 32, keep: int = 4, by: str = "clip",
             seed: int = 0, truncate: bool = False, progress: bool = True, chunk_size: int | None = None,
             log=print, **settings) -> dict:
    """Draw n candidates per prompt, keep the `keep` best by `by`, write them to `out`.

    out/: 00000.png + 00000.txt per kept image (best first, prompt by prompt), captions.jsonl with each
    file's caption, rank and scores, grid.png (the first GRID_PROMPTS prompts above their kept images
    and scores) and generate.json (the settings and where each model came from).

    The candidates are streamed: `chunk_size` rows at a time (default: what the sampler fits in
    memory, at most 1024) are sampled, decoded and scored, and each prompt keeps only its best `keep`
    images, which go to disk as soon as its last candidate is scored. Memory stays bounded whatever
    n and the number of prompts; a job of more than one chunk logs its estimated time after the first.
    Before any sampling the prompts are checked and `out` is claimed (files.OwnedFolder): it must be
    new, empty, or a folder generate wrote before with nothing else in it and nothing changed, whose
    files are then replaced (said through `log`); a folder it cannot write to is refused there too.
    The new files are staged inside `out` and moved in at the end, so a run that fails half-way
    leaves the earlier results as they were.
    Example: generate(pipe, ["a red circle"], "samples", n=32, keep=4) -> {"files": 4, "out": "samples", ...}
    """
    from ..infra.files import OwnedFolder
    from ..sampling import encode_prompts, warn_unguided
    from ..viz import save_ranked_grid

    if int(n) != n or n < 1:
        raise ConfigError(f"n={n} is invalid: draw at least 1 candidate per prompt")
    if int(keep) != keep or not 1 <= keep <= n:
        raise ConfigError(f"keep={keep} is invalid: keep between 1 and n={n} images per prompt")
    if by not in RANKINGS:
        raise ConfigError(f"rank by {by!r}? choose one of {', '.join(RANKINGS)}")
    if by == "clip":
        _need_clip(pipe)
    text, notes = encode_prompts(pipe.tok, prompts, pipe.model.layout, truncate=truncate)  # refused before any work
    warn_unguided(pipe.model, settings.get("guidance", 1.0))
    folder = OwnedFolder(out, "generate", "--out", index="captions.jsonl").check()  # decided before sampling
    try:
        summary, grid_rows = _stream(pipe, folder, list(prompts), text, notes, n, keep, by, seed, progress,
                                     chunk_size, log, settings)
        summary["replaced"] = folder.commit(final=False)  # every image and captions.jsonl in place first
        if summary["replaced"]:
            log(f"[generate] replaced the {summary['replaced']} files an earlier generate wrote in {out}")
        shown = len(grid_rows)
        title = f"best {keep} of {n} by {by}" + (f" (the first {shown} of {len(prompts)} prompts)"
                                                  if shown < len(prompts) else "")
        ncols = 1 if shown <= 4 else max(1, 12 // max(keep, 3))  # about 12 images across, like a contact sheet
        save_ranked_grid([g[0] for g in grid_rows], [g[1] for g in grid_rows], [g[2] for g in grid_rows],
                         folder.staged("grid.png"), title=title, ncols=ncols)
        folder.adopt("grid.png")
        folder.write(MARKER, json.dumps(summary, indent=1, default=str) + "\n")
        folder.commit()
    finally:
        folder.abandon()  # after a failure: the staged files go, the earlier results (or the images) stay
    return summary


def _stream(pipe: Pipeline, folder, prompts: list[str], text: torch.Tensor, notes: list[dict], n: int, keep: int,
            by: str, seed: int, progress: bool, chunk_size: int | None, log, settings: dict) -> dict:
    """generate's work: sample, decode and score chunk by chunk, stage each prompt's best as it completes.
    Returns the summary and the overview's rows (the first GRID_PROMPTS prompts' kept images)."""
    from io import BytesIO

    from PIL import Image

    from ..sampling import decode_images, default_chunk, sample

    P, layout = len(prompts), pipe.model.layout
    total = P * n
    if chunk_size is None:  # what sample() itself would run at once, so a seed draws what candidates() draws
        chunk_size = default_chunk(pipe.model, pipe.device, settings.get("precision", "auto"),
                                   settings.get("guidance", 1.0))
    chunk = max(1, min(int(chunk_size), total))
    chunks = -(-total // chunk)
    gen = torch.Generator(device=pipe.device).manual_seed(seed)
    cut = any(note["cut"] for note in notes)  # prompts the user let the sampler cut: the reranker cuts them too
    width = max(5, len(str(P * keep - 1)))
    best: dict[int, list] = {}  # prompt -> up to `keep` (score, candidate, image, log p), best first
    grid_rows, files = [], 0
    seconds = {"sampling": 0.0, "decoding": 0.0, "ranking": 0.0}
    index = open(folder.staged("captions.jsonl"), "w", encoding="utf-8")
    bar = tqdm(total=total * layout.image_len, desc="sampling codes", unit="code", disable=not progress)
    t_start = time.perf_counter()
    try:
        for c, r0 in enumerate(range(0, total, chunk)):
            rows = torch.arange(r0, min(total, r0 + chunk))
            owner = (rows // n).tolist()  # the prompt of each row
            t0 = time.perf_counter()
            codes, logp = sample(pipe.model, text[rows // n].to(pipe.device), generator=gen, chunk_size=chunk,
                                 bar=bar, return_logp=True, **settings)
            t1 = time.perf_counter()
            images = decode_images(pipe.dvae, codes, layout.grid)  # (C, H, W, 3) uint8, CPU
            t2 = time.perf_counter()
            logp = logp.float().cpu()
            scores = logp if by == "likelihood" else _clip_scores(pipe, [prompts[p] for p in owner], images, cut)
            seconds["sampling"] += t1 - t0
            seconds["decoding"] += t2 - t1
            seconds["ranking"] += time.perf_counter() - t2
            start = 0
            while start < len(rows):  # each prompt's rows in this chunk in turn (they are contiguous)
                p = owner[start]
                end = min(len(rows), (p + 1) * n - r0)
                top = torch.sort(scores[start:end], descending=True, stable=True).indices[:keep].tolist()
                kept = best.pop(p, []) + [(float(scores[start + i]), (r0 + start + i) % n, images[start + i].clone(),
                                           float(logp[start + i])) for i in top]
                kept.sort(key=lambda e: -e[0])  # stable: of equal scores the earlier candidate stays first
                best[p] = kept[:keep]
                start = end
                if r0 + end == (p + 1) * n:  # the prompt's last candidate: its best go to disk now
                    for r, (score, j, image, lp) in enumerate(best.pop(p)):
                        stem, png = f"{files:0{width}d}", BytesIO()
                        Image.fromarray(image.numpy()).save(png, format="PNG")
                        folder.write(f"{stem}.png", png.getvalue())
                        folder.write(f"{stem}.txt", prompts[p] + "\n")
                        index.write(json.dumps({"file": f"{stem}.png", "caption": prompts[p], "prompt": p,
                                                "rank": r + 1, "candidate": j, "score": score,
                                                "log_likelihood": lp}) + "\n")
                        files += 1
                        if p < GRID_PROMPTS:
                            if r == 0:
                                grid_rows.append((_shown(pipe, text[p], prompts[p], notes[p]), [], []))
                            grid_rows[-1][1].append(image)
                            grid_rows[-1][2].append(score)
            if c == 0 and chunks > 1:
                per_row = (time.perf_counter() - t_start) / len(rows)
                log(f"[generate] {total:,} candidates ({P} prompt(s) x {n}) in {chunks} chunks of {chunk}: about "
                    f"{_duration(per_row * total)} in all, from the first chunk's {_duration(per_row * len(rows))}")
    finally:
        bar.close()
        index.close()
    folder.adopt("captions.jsonl")
    total_s = sum(seconds.values())
    summary = {"out": str(folder.path), "files": files, "grid": str(folder.path / "grid.png"),
               "grid_prompts": len(grid_rows),
               "prompts": P, "n": n, "keep": keep, "rank": by, "seed": seed, "chunk_size": chunk,
               "settings": settings, "sources": pipe.sources, "notes": notes,
               "seconds": {k: round(v, 3) for k, v in seconds.items()},
               "rank_time_fraction": seconds["ranking"] / total_s if total_s > 0 else 0.0}
    return summary, grid_rows


def _need_clip(pipe: Pipeline) -> None:
    if pipe.clip is None:
        raise CheckpointError("no reranker is loaded: train one with `python -m minidalle train clip`, or rank by "
                              "likelihood")


def _clip_scores(pipe: Pipeline, prompts: list[str], images: torch.Tensor, cut: bool) -> torch.Tensor:
    """The reranker's similarity of each image (B, H, W, 3) to its prompt: (B,) on the CPU."""
    from ..clip import rerank

    _need_clip(pipe)

    return rerank(pipe.clip, pipe.clip_tok, prompts, images, truncate=cut).float().cpu()


def _shown(pipe: Pipeline, ids: torch.Tensor, prompt: str, note: dict) -> str:
    """The prompt as grid.png writes it: what the model read (a cut prompt ends in "..."), at most
    GRID_CAPTION characters. Example: a 10,000-character prompt cut to 32 tokens -> its first words + " ..." """
    if note["cut"]:
        prompt = pipe.tok.decode([i for i in ids.tolist() if i < pipe.model.layout.text_vocab]) + " ..."
    return prompt if len(prompt) <= GRID_CAPTION else prompt[:GRID_CAPTION - 4] + " ..."


def _duration(seconds: float) -> str:
    """Example: 42 -> "42 s"; 600 -> "10.0 min"; 7200 -> "2.0 h" """
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def read_prompts(path: str | Path) -> list[str]:
    """One caption a line (blank lines skipped). Example: "a red circle\\n\\na blue square\\n" -> 2 prompts"""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark some editors write is not a character
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
    """Per candidate: all right (P, n) bool, for each check (P, n) float with nan where not stated, and
    `swap` (P, n) float, 1 where the two objects' shapes came out exchanged (judge.binding_swap), nan where
    the caption cannot show a swap; per prompt, `objects` (P,) int, how many objects its caption names."""
    from ..judge import CHECKS, binding_swap, judge, to_spec

    P, n = images.shape[:2]
    ok = np.zeros((P, n), bool)
    checks = {c: np.full((P, n), np.nan) for c in CHECKS}
    swap = np.full((P, n), np.nan)
    objects = np.array([len(to_spec(p).objects) for p in prompts], int)
    bar = tqdm(total=P * n, desc="judging", disable=not progress)
    for p in range(P):
        for j in range(n):
            v = judge(images[p, j].numpy(), prompts[p])
            ok[p, j] = v.ok
            for c in CHECKS:
                if v.checks[c] is not None:
                    checks[c][p, j] = float(v.checks[c])
            swapped = binding_swap(v)
            if swapped is not None:
                swap[p, j] = float(swapped)
        bar.update(n)
    bar.close()
    return {"ok": ok, "checks": checks, "swap": swap, "objects": objects}


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
    from ..data import ShapesWorld
    from ..judge import CHECKS

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
