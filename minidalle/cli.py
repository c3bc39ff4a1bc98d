"""`python -m minidalle ...`: the command line.

    python -m minidalle demo  [--preset toy] [--out runs/demo-toy] [--seed S] [--device cuda]
                                   the main job (README's first command): every stage, then reranked samples
    python -m minidalle eval --preset toy [--run runs/demo-toy] [--n 256] [--json]   the whole pipeline, judged
    python -m minidalle data  --preset toy --split heldout --n 500 --out DIR
    python -m minidalle judge DIR [--json]
    python -m minidalle bench judge [--n 1000] [--json]
    python -m minidalle train dvae --preset toy [--resume | --start-over]   stage 1: the image tokenizer
    python -m minidalle bench dvae --preset toy [--out DIR]       train stage 1 from scratch and measure it
    python -m minidalle train bpe --preset toy                    the text tokenizer, on the training captions
    python -m minidalle bench bpe [--mib 10] [--json]             BPE vs HF tokenizers, tiktoken, a naive trainer
    python -m minidalle train transformer --preset toy [--resume | --start-over]   stage 2 (tokenizers reused)
    python -m minidalle eval transformer --preset toy [--n 256] [--out DIR]        the judge on sampled images
    python -m minidalle train clip --preset toy [--resume | --start-over]   the reranker (reads the transformer's BPE)
    python -m minidalle eval clip --preset toy [--n 512] [--json]      its recall@1/@5 on val and heldout pairs
    python -m minidalle bench attention [--json]                  the masks' two paths against dense causal
    python -m minidalle bench sampling [--no-compile] [--json]    the cached sampler against the reference
    python -m minidalle bench all [--skip dvae,sampling] [--out runs/bench]   every benchmark, one summary
    python -m minidalle info --preset paper [--json]              parameters, lengths, FLOPs (meta device)
    python -m minidalle export CHECKPOINT --trust-sharded [--out DIR]   a sharded (FSDP) checkpoint as one safetensors folder
    torchrun --standalone --nproc_per_node=N -m minidalle train transformer --train.parallel=ddp|fsdp
                                   any `train` on N processes (README, "Training on many GPUs")
    python -m minidalle plan --preset paper --gpus 1024 --gpu-mem 16 [--batch B] [--steps S] [--json]
                                   memory per GPU (DDP / FSDP, checkpointing or not) and days of training

Every command accepts config overrides as `--section.key=value` (e.g. `--data.seed=3`); they are
type-checked against minidalle/config.py. Errors the user can fix print one line and exit 2.
What each command may write or replace, and what is safe to load from others: README, "Command line".
Commands that measure something end with one JSON line, so scripts can read the last line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from . import config as cfglib
from .data import SPLITS
from .errors import ConfigError, DataError, MinidalleError


def cmd_data(args, cfg: cfglib.Config) -> dict:
    from .data import write_split

    size = cfg.data.image_size
    out = write_split(check_out_folder(args.out, "--out"), args.split, args.n, size, cfg.data.seed)
    print(f"wrote {args.n} {args.split} samples ({size}x{size}) to {out}/ (PNG + .txt per sample, captions.jsonl)")
    return {"out": str(out), "split": args.split, "n": args.n, "image_size": size}


def cmd_judge(args, cfg: cfglib.Config) -> dict:
    from .captions import CaptionError
    from .data import read_split
    from .judge import evaluate, to_spec
    from .realdata import IMAGE_EXTENSIONS, load_image

    folder = Path(args.dir)
    rows = read_split(folder, numbered=True)
    specs = []
    for r in rows:  # every caption is read before any image: a bad line is named with its file and line
        try:
            specs.append(to_spec(r["caption"]))
        except CaptionError as e:
            raise DataError(f"{folder / 'captions.jsonl'}, line {r['line']} ({r['file'][:60]}): the judge cannot read "
                            f"its caption: {e}") from None
    images = [load_image(folder / r["file"], None) for r in rows]  # judged at their own size
    result = evaluate(images, specs)
    listed = {Path(r["file"]).as_posix() for r in rows}
    unlisted = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                      and not p.name.startswith(".") and p.name not in listed)
    result["unlisted"] = len(unlisted)
    _print_accuracy(f"judge on {len(rows)} images in {folder}", result)
    if unlisted:
        print(f"[judge] note: {len(unlisted)} image(s) in {folder} have no line in captions.jsonl and were not judged "
              f"({', '.join(unlisted[:3])}{', ...' if len(unlisted) > 3 else ''})")
    return result


def _print_accuracy(title: str, result: dict) -> None:
    """Print one `judge.evaluate()` result: accuracy per attribute, over captions that state it."""
    from .judge import CHECKS

    print(title)
    for attr in CHECKS:
        acc, n = result[attr], result["stated"][attr]
        print(f"  {attr:<9} {acc * 100:6.2f}%  (n={n})" if acc is not None else f"  {attr:<9}    n/a  (not stated)")
    print(f"  {'overall':<9} {result['overall'] * 100:6.2f}%  (n={result['n']})")


def cmd_bench(args, cfg: cfglib.Config) -> dict:
    if args.what == "all":  # every benchmark in turn, one summary (minidalle/bench_all.py)
        from .bench_all import bench_all

        return bench_all(args, cfg)
    if args.skip or args.run:
        raise ConfigError(f"--skip and --run are flags of `bench all`, not of `bench {args.what}`")
    if args.what == "bpe":
        from .bpe_bench import benchmark_bpe, format_bpe_benchmark

        res = benchmark_bpe(mib=args.mib, n_captions=args.n or 20_000, progress=not args.json)  # the paper's 16,384
        print(format_bpe_benchmark(res))
        return res
    if args.what == "attention":
        from .attention_bench import benchmark_attention, format_attention_benchmark

        res = benchmark_attention(progress=not args.json)
        print(format_attention_benchmark(res))
        return res
    if args.what == "sampling":
        from .sampling_bench import benchmark_sampling, format_sampling_benchmark

        res = benchmark_sampling(compile=not args.no_compile, progress=not args.json)
        print(format_sampling_benchmark(res))
        return res
    if args.what == "dvae":
        import tempfile

        from .image_tokenizer import benchmark_dvae, format_dvae_benchmark

        out = check_out_folder(args.out, "--out") if args.out else tempfile.mkdtemp(prefix="minidalle-bench-dvae-")
        res = benchmark_dvae(cfg, out, n_eval=args.n or 500)
        print(format_dvae_benchmark(res))
        return res
    from .judge import benchmark, format_benchmark

    res = benchmark(n=args.n or 1000, image_size=cfg.data.image_size, seed=cfg.data.seed)
    print(format_benchmark(res))
    return res


def _dvae_reconstructions(model, cfg: cfglib.Config, out: Path, tag: str) -> dict:
    """Judge and PSNR on `val` reconstructions, and a grid of 8 val images over their reconstructions."""
    from .data import ShapesWorld
    from .image_tokenizer import reconstruction_report, to_uint8
    from .viz import save_grid

    size = cfg.data.image_size
    report = reconstruction_report(model, "val", size, min(cfg.data.n_val, 256), cfg.data.seed)
    images, _ = ShapesWorld("val", size, cfg.data.seed).batch(0, 8)
    recon = to_uint8(model.reconstruct(images.to(next(model.parameters()).device)).cpu())
    grid = save_grid(list(images) + list(recon), out / "reconstructions.png", ncols=8,
                     title="val images (top) and their dVAE reconstructions (bottom)")
    print(f"{tag} judge on val: originals {report['original']['overall']:.3f}, reconstructions "
          f"{report['reconstruction']['overall']:.3f}; PSNR {report['psnr']:.1f} dB -> {grid}")
    return {"judge_original": report["original"]["overall"], "judge_reconstruction": report["reconstruction"]["overall"],
            "psnr": report["psnr"], "perplexity": report["perplexity"]}


def cmd_train(args, cfg: cfglib.Config) -> dict:
    """Train one stage; checkpoints and metrics.jsonl go to that stage's out_dir."""
    from .image_tokenizer import train_dvae
    from .text_to_image import train_text_tokenizer

    if args.what == "bpe":
        flag = "--resume" if args.resume else "--start-over" if args.start_over else None
        if flag:  # the tokenizer trains in seconds from the captions: there is nothing to resume
            raise ConfigError(f"{flag} applies to `train dvae`, `train transformer` and `train clip`; `train bpe` "
                              "always trains from the captions, and sets an earlier, different tokenizer in "
                              "--text.out_dir aside (in its set-aside-<time>/) before writing the new one")
        check_out_folder(cfg.text.out_dir, "--text.out_dir")
        return train_text_tokenizer(cfg)
    if args.what == "transformer":
        return _train_transformer(args, cfg)
    if args.what == "clip":
        return _train_clip(args, cfg)

    out = check_out_folder(cfg.dvae_train.out_dir, "--dvae_train.out_dir")
    model, trainer = train_dvae(cfg, resume=args.resume, start_over=args.start_over, trust_sharded=args.trust_sharded)
    if not trainer.history["train"]:  # resumed at max_steps: nothing left to train
        print(f"[train dvae] the run in {out} already finished at step {trainer.step}; nothing was trained "
              f"(raise --dvae_train.max_steps to train longer)")
    summary = {"stage": "dvae", "steps": trainer.step, "final_loss": trainer.loss,
               "checkpoint": str(trainer.last_checkpoint), "out": str(out)}
    if cfg.data.dataset == "shapes":
        summary.update(_dvae_reconstructions(model, cfg, out, "[train dvae]"))
    return summary


def cmd_demo(args, cfg: cfglib.Config) -> dict:
    """The main job: train (or reuse) every stage into --out, then sample, rerank, judge and report."""
    from .pipeline import run_demo

    out = check_out_folder(args.out or f"runs/demo-{cfg.preset}", "--out")
    report = run_demo(cfg, out, seed=args.seed, device=args.device, n_prompts=args.n_prompts, n=args.n,
                      progress=not args.json, start_over=args.start_over, trust_sharded=args.trust_sharded)
    return {k: v for k, v in report.items() if k != "configs"}  # the configs are in OUT/report.json


def _train_transformer(args, cfg: cfglib.Config) -> dict:
    """Stage 2: reuse (or first train) the tokenizers in the run folder, then train the transformer."""
    from .text_to_image import train_transformer

    for key in ("dvae_train.out_dir", "text.out_dir", "train.out_dir"):
        sec, name = key.split(".")
        check_out_folder(getattr(getattr(cfg, sec), name), f"--{key}")
    model, trainer, info = train_transformer(cfg, resume=args.resume, start_over=args.start_over,
                                             trust_sharded=args.trust_sharded)
    if not trainer.history["train"]:
        print(f"[train transformer] the run in {cfg.train.out_dir} already finished at step {trainer.step}; nothing "
              "was trained (raise --train.max_steps to train longer)")
    last = trainer.history["train"][-1] if trainer.history["train"] else {}
    summary = {"stage": "transformer", "steps": trainer.step, "final_loss": trainer.loss,
               "text_loss": last.get("text_loss"), "image_loss": last.get("image_loss"),
               "eval_loss": (trainer.last_eval or {}).get("loss"), "checkpoint": str(trainer.last_checkpoint),
               "out": cfg.train.out_dir, **{k: v for k, v in info.items() if k != "tokenizers"}}
    print(f"[train transformer] step {trainer.step}: loss {trainer.loss:.4f} (text {summary['text_loss']}, image "
          f"{summary['image_loss']}); {info['train_seconds']} s -> {trainer.last_checkpoint}")
    return summary


def _print_recall(tag: str, result: dict) -> None:
    """Print `clip.evaluate_clip`'s recall, and its one-fact-changed accuracy when measured, per split."""
    for split in [s for s in ("val", "heldout") if s in result]:  # the emoji have heldout only
        r = result[split]
        print(f"{tag} {split:<8} recall over {r['n']} pairs: image->text @1 {r['i2t@1']:.3f} @5 {r['i2t@5']:.3f}; "
              f"text->image @1 {r['t2i@1']:.3f} @5 {r['t2i@5']:.3f}")
        facts = result.get(f"facts_{split}")
        if facts:
            per = ", ".join(f"{f} {v:.3f}" for f, v in facts["image"].items() if v is not None and f != "overall")
            print(f"{tag} {split:<8} own image over a one-fact-changed one: {facts['image']['overall']:.3f} ({per})")


def _train_clip(args, cfg: cfglib.Config) -> dict:
    """The reranker: reuse (or first train) the transformer's BPE, train, then measure retrieval."""
    from .bpe import Tokenizer
    from .clip import evaluate_clip, train_clip
    from .text_to_image import BPE_FILE

    for key in ("text.out_dir", "clip_train.out_dir"):
        sec, name = key.split(".")
        check_out_folder(getattr(getattr(cfg, sec), name), f"--{key}")
    model, trainer, info = train_clip(cfg, resume=args.resume, start_over=args.start_over, progress=not args.json,
                                      trust_sharded=args.trust_sharded)
    if not trainer.history["train"]:
        print(f"[train clip] the run in {cfg.clip_train.out_dir} already finished at step {trainer.step}; nothing "
              "was trained (raise --clip_train.max_steps to train longer)")
    summary = {"stage": "clip", "steps": trainer.step, "final_loss": trainer.loss,
               "eval_loss": (trainer.last_eval or {}).get("loss"), "checkpoint": str(trainer.last_checkpoint),
               "out": cfg.clip_train.out_dir, **{k: v for k, v in info.items() if k != "bpe"}}
    print(f"[train clip] step {trainer.step}: loss {trainer.loss:.4f}; {info['train_seconds']} s training, "
          f"{info['render_seconds']} s rendering -> {trainer.last_checkpoint}")
    if cfg.data.dataset == "shapes":
        tok = Tokenizer.load(Path(cfg.text.out_dir) / BPE_FILE)
        result = evaluate_clip(cfg, n=min(512, cfg.data.n_val, cfg.data.n_heldout), model=model, tok=tok)
        _print_recall("[train clip]", result)
        for split in ("val", "heldout"):
            summary[split], summary[f"facts_{split}"] = result[split], result[f"facts_{split}"]["image"]
    return summary


def cmd_generate(args, cfg: cfglib.Config) -> dict:
    """Sample --n candidates per prompt, keep the --keep best by the reranker, write them to --out."""
    from .generate import generate, load_pipeline, read_prompts

    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise cfglib.ConfigError('give a prompt, e.g. `python -m minidalle generate "a red circle above a blue '
                                 'square"`, or --prompts FILE with one caption a line')
    pipe = load_pipeline(cfg, run=args.run, device=args.device, need_clip=args.rank == "clip",
                         checkpoint=args.checkpoint, trust_sharded=args.trust_sharded,
                         no_clip_hint="or rank by the transformer's own likelihood (--rank likelihood)")
    res = generate(pipe, prompts, args.out, n=args.n, keep=args.keep, by=args.rank, seed=args.seed,
                   truncate=args.truncate, progress=not args.json, **_sampling_settings(args))
    for note in res["notes"]:
        flags = [k for k in ("cut", "lowercased") if note[k]]
        if note["unusual_characters"]:
            flags.append(f"characters outside printable ASCII: {note['unusual_characters']!r}")
        if flags:
            print(f"[generate] note on {note['prompt'][:60]!r}: {'; '.join(flags)}")
    shown = "" if res["grid_prompts"] == len(prompts) else f" of the first {res['grid_prompts']} prompts"
    print(f"[generate] {len(prompts)} prompt(s) x {args.n} candidates, kept {args.keep} each by {args.rank} -> "
          f"{res['out']}/ ({res['files']} PNGs, captions.jsonl, grid.png{shown}); sampling "
          f"{res['seconds']['sampling']} s, ranking {res['seconds']['ranking']} s")
    print(f"[generate] score them: python -m minidalle judge {res['out']}")
    # the per-prompt notes are in OUT/generate.json: one JSON line stays short however many prompts there are
    noted = sum(bool(n["cut"] or n["lowercased"] or n["unusual_characters"]) for n in res["notes"])
    return {**{k: v for k, v in res.items() if k != "notes"}, "prompts_noted": noted}


def _sampling_settings(args) -> dict:
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "guidance": args.guidance}


def cmd_eval(args, cfg: cfglib.Config) -> dict:
    """Judge one sample per prompt of the val and heldout splits, or the reranking curve."""
    from .text_to_image import evaluate_transformer

    if args.what == "seeds":
        return _eval_seeds(args)
    if args.runs:
        raise ConfigError("--runs is read by `eval seeds` only; name one run folder with --run")
    if args.what == "pipeline":
        return _eval_pipeline(args, cfg)
    if args.what == "rerank-curve":
        return _rerank_curve(args, cfg)
    if args.out and args.what == "clip":
        raise ConfigError("--out is not used by `eval clip`: it writes no figures, only the printed recall")
    if args.what == "clip":
        from .clip import evaluate_clip

        result = evaluate_clip(cfg, n=args.n or 512, checkpoint=args.checkpoint, trust_sharded=args.trust_sharded)
        _print_recall(f"[eval clip] {result['checkpoint']}:", result)
        return result

    result = evaluate_transformer(cfg, n=args.n or 256, checkpoint=args.checkpoint, temperature=args.temperature,
                                  progress=not args.json, out=args.out, trust_sharded=args.trust_sharded)
    for split in ("val", "heldout"):
        _print_accuracy(f"[eval transformer] one sample per {split} prompt (temperature {args.temperature})",
                        result[split])
    print(f"[eval transformer] samples -> {result['grid']}")
    return result


def _eval_seeds(args) -> dict:
    """Several run folders side by side in one generated table (what the README's status table quotes)."""
    from .pipeline import seeds_markdown, seeds_summary, write_seeds

    if not args.runs or not args.out:
        raise ConfigError("eval seeds needs --runs DIR [DIR ...] (run folders `demo --out` wrote) and --out DIR")
    summary = seeds_summary(args.runs)
    paths = write_seeds(summary, args.out)
    print(seeds_markdown(summary))
    print(f"[eval seeds] -> {paths[1]} and {paths[0]}")
    return summary


def _eval_pipeline(args, cfg: cfglib.Config) -> dict:
    """The whole pipeline's judge accuracy (single sample and reranked best of 16), written to RUN/eval.*."""
    from .pipeline import accuracy_markdown, evaluate_run, summary_line, write_eval

    if args.out:
        raise ConfigError("eval (pipeline) writes eval.json and eval.md into the run folder it judges: name it with "
                          "--run, not --out")
    res = evaluate_run(cfg, run=args.run, n_prompts=args.n or 256, seed=args.seed, device=args.device,
                       progress=not args.json, trust_sharded=args.trust_sharded, **_sampling_settings(args))
    paths = write_eval(res)
    print(accuracy_markdown(res))
    print(f"[eval] {summary_line(res)}")
    print(f"[eval] -> {paths[0]} and {paths[1]}")
    return res


def _rerank_curve(args, cfg: cfglib.Config) -> dict:
    from .generate import load_pipeline, rerank_curve, run_config
    from .text_to_image import eval_folder

    pipe = load_pipeline(cfg, run=args.run, device=args.device, checkpoint=args.checkpoint, need_clip=False,
                         trust_sharded=args.trust_sharded)
    if pipe.clip is None:
        print(f"[eval rerank-curve] no reranker in {run_config(cfg, args.run).clip_train.out_dir}: the curve shows "
              "the transformer's likelihood and the judge only (train one with `python -m minidalle train clip`)")
    # beside what the user named: --out, else the run folder (--run), else the checkpoint's run, else the preset's
    where = Path(args.out) if args.out else Path(args.run) if args.run else \
        eval_folder(args.checkpoint).parent if args.checkpoint else Path(run_config(cfg, None).train.out_dir).parent
    plot = where / "rerank_curve.png"
    res = rerank_curve(pipe, n_prompts=args.n or 64, seed=args.seed, progress=not args.json, plot=plot,
                       **_sampling_settings(args))
    for split in ("val", "heldout"):
        print(f"[eval rerank-curve] {split}: all attributes right, best of N ({res['n_prompts']} prompts)")
        names = list(res["curve"][split])
        print("  N     " + "".join(f"{name:>12}" for name in names))
        for size in res["sizes"]:
            print(f"  {size:<5} " + "".join(f"{res['curve'][split][name][size]['all'] * 100:11.1f}%" for name in names))
    if res["rank_time_fraction"] is not None:
        print(f"[eval rerank-curve] reranking took {res['rank_time_fraction'] * 100:.1f}% of the time "
              f"(sampling {res['seconds']['sampling']} s, decoding {res['seconds']['decoding']} s, "
              f"reranking {res['seconds']['clip']} s)")
    print(f"[eval rerank-curve] plot -> {res['plot']}")
    return res


def cmd_export(args, cfg: cfglib.Config) -> dict:
    """A sharded checkpoint, read whole on this one process, written as model.safetensors + config + state."""
    from . import checkpoint as ckpt

    out = ckpt.export_checkpoint(args.checkpoint, args.out, trust_sharded=args.trust_sharded)
    n = len(ckpt.read_checkpoint(out).tensors)
    print(f"[export] {args.checkpoint} -> {out} ({n} tensors, safetensors: safe to share); `generate --checkpoint "
          f"{out}` (a transformer) and every loader read it")
    return {"checkpoint": str(args.checkpoint), "out": str(out), "tensors": n}


def cmd_info(args, cfg: cfglib.Config) -> dict:
    """Parameters of every stage, sequence lengths and the transformer's FLOPs per token (meta device)."""
    from .text_to_image import describe

    res = describe(cfg)
    print(f"preset {cfg.preset}: {cfg.data.image_size}x{cfg.data.image_size} images -> {res['grid']}x{res['grid']} "
          f"image tokens over K={res['image_vocab']}; {res['text_len']} text tokens over {res['text_vocab']} BPE ids "
          f"(+{res['text_len']} padding ids); sequence {res['sequence_len']}")
    print(f"  dVAE: encoder {res['dvae_encoder_params']:,}, decoder {res['dvae_decoder_params']:,} parameters")
    print(f"  transformer: {res['transformer_params']:,} parameters ({cfg.model.n_layer} layers, d_model "
          f"{res['d_model']}, {cfg.model.n_head} heads x {cfg.model.head_dim}); layers {res['layer_schedule']}")
    print(f"  training FLOPs per token: {res['flops_per_token']:.3g} (weights {res['flops_weights']:.3g}, attention "
          f"{res['flops_attention']:.3g} at mask density {res['mask_density']:.3f})")
    return res


def cmd_plan(args, cfg: cfglib.Config) -> dict:
    """Memory per GPU under DDP and FSDP, with and without activation checkpointing, and days (minidalle/plan.py)."""
    from .plan import format_plan, plan

    res = plan(cfg, args.gpus, args.gpu_mem, mfu=args.mfu, gpu_tflops=args.gpu_tflops, batch=args.batch,
               steps=args.steps, scores=not args.no_scores)
    print(format_plan(res))
    return res


def check_out_folder(path: str | Path, flag: str) -> Path:
    """Refuse an output folder that cannot be one (it, or a folder above it, is a file), naming the flag.

    Example: check_out_folder("notes.txt/run", "--out") -> ConfigError("--out=notes.txt/run: notes.txt is a file ...")
    """
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            raise ConfigError(f"{flag}={path}: {part} is a file, not a folder; choose another folder")
    return path


def strict_json(value):
    """NaN and infinity are not JSON (strict parsers refuse them): they are written as null.

    Example: strict_json({"x": [float("nan"), 1]}) -> {"x": [None, 1]}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _positive(convert, what: str):
    """An argparse type: `convert(text)`, refused with one line unless it is a finite number > 0.

    Example: _positive(int, "a whole number")("0") -> ArgumentTypeError("0 is not a positive number")
    """
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{text} is not a positive number")
        return value
    return parse


_positive_int, _positive_float = _positive(int, "a whole number"), _positive(float, "a number")


def _nonnegative_float(text: str) -> float:
    """An argparse type: a finite number >= 0. Example: "0" -> 0.0; "-1" -> ArgumentTypeError"""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
    return value


def _nonnegative_int(text: str) -> int:
    """An argparse type: a whole number >= 0. Example: "0" -> 0; "1.5" -> ArgumentTypeError"""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number >= 0")
    return value


def _unit_interval(text: str) -> float:
    """An argparse type: a number in (0, 1]. Example: "0.9" -> 0.9; "0" -> ArgumentTypeError"""
    value = _nonnegative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one `error:` line naming the input (not usage + error)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _collective_errors() -> tuple:
    """The exceptions a failed collective raises (gloo: RuntimeError; nccl: DistBackendError)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ()
    return (dist.DistError, RuntimeError)


def _looks_collective(e: BaseException) -> bool:
    import torch.distributed as dist

    text = str(e).lower()
    return isinstance(e, dist.DistError) or any(w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout"))


TRUST_SHARDED_HELP = ("also read sharded (FSDP) checkpoints: their sharded/.metadata index is a pickle, which "
                      "can run any code when read, whatever the checksums say. Pass it only for folders your own "
                      "runs wrote; share and accept exported (safetensors) checkpoints instead")


def _trust_flag(d) -> None:
    d.add_argument("--trust-sharded", action="store_true", dest="trust_sharded", help=TRUST_SHARDED_HELP)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m minidalle", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--preset", default="toy", help="smoke | toy | small | paper (default toy)")
        sp.add_argument("--json", action="store_true", help="print only the final JSON line")

    d = sub.add_parser("demo", help="the main job: train every stage, then sample, rerank, judge and report")
    common(d)
    d.add_argument("--out", default=None, help="run folder (default runs/demo-<preset>); finished stages in it are reused")
    d.add_argument("--start-over", action="store_true", dest="start_over",
                   help="set every stage of the earlier run in OUT aside (OUT/set-aside-<time>/) and train again")
    d.add_argument("--seed", type=_nonnegative_int, default=None,
                   help="training seed of every stage (default: the preset's, 1337)")
    d.add_argument("--device", default="auto", help="auto | cpu | cuda | mps: where every stage trains and samples")
    d.add_argument("--n-prompts", type=_positive_int, default=None, dest="n_prompts",
                   help="val and heldout prompts each that are sampled and judged (default 64; smoke 8)")
    d.add_argument("--n", type=_positive_int, default=16, help="candidates per prompt, reranked (default 16)")
    _trust_flag(d)
    d.set_defaults(func=cmd_demo)

    d = sub.add_parser("data", help="write ShapesWorld samples to a folder")
    common(d)
    d.add_argument("--split", default="train", choices=SPLITS)
    d.add_argument("--n", type=_positive_int, default=100, help="number of samples")
    d.add_argument("--out", required=True, help="output folder: new, empty, or one `data` wrote before (its files "
                                                "are then replaced, only those, and only if unchanged)")
    d.set_defaults(func=cmd_data)

    d = sub.add_parser("judge", help="score how well images in DIR match their captions")
    common(d)
    d.add_argument("dir", help="folder with captions.jsonl (as written by `data`)")
    d.set_defaults(func=cmd_judge)

    d = sub.add_parser("bench", help="benchmarks that print measured figures")
    common(d)
    d.add_argument("what", choices=["judge", "dvae", "bpe", "attention", "sampling", "all"],
                   help="all: each of the others in turn, with their defaults, then the quality of the --run "
                        "folder; one summary in --out (default runs/bench/summary.md and summary.json)")
    d.add_argument("--n", type=_positive_int, default=None,
                   help="samples per split (judge: 1000, dvae: 500); bpe: captions to encode (20000)")
    d.add_argument("--mib", type=_positive_float, default=10.0, help="bpe: MiB of text to train the 16,384 vocabulary on")
    d.add_argument("--out", default=None, help="dvae: folder for the benchmark's training run (default: a temp "
                                               "folder); all: folder for the summary (default runs/bench)")
    d.add_argument("--no-compile", action="store_true", dest="no_compile",
                   help="sampling: skip the torch.compile'd decode step (its compile takes ~50 s on 2 CPU cores)")
    d.add_argument("--skip", default=None, metavar="NAME[,NAME]",
                   help="all: steps to leave out, of judge, dvae, bpe, attention, sampling, quality")
    d.add_argument("--run", default=None, metavar="DIR",
                   help="all: the finished run whose quality is measured (default runs/demo-<preset>, what `demo` writes)")
    d.set_defaults(func=cmd_bench)

    d = sub.add_parser("train", help="train a stage of the pipeline")
    common(d)
    d.add_argument("what", choices=["dvae", "bpe", "transformer", "clip"],
                   help="dvae: the image tokenizer (stage 1); bpe: the text tokenizer; transformer: stage 2; "
                        "clip: the contrastive reranker of stage 2's samples")
    either = d.add_mutually_exclusive_group()
    either.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    either.add_argument("--start-over", action="store_true", dest="start_over",
                        help="move the folder's checkpoints and metrics into set-aside-<time>/, train from step 0")
    _trust_flag(d)
    d.set_defaults(func=cmd_train)

    d = sub.add_parser("generate", help="images for captions: sample candidates, rerank, keep the best")
    common(d)
    d.add_argument("prompt", nargs="*", help="captions, e.g. \"a red circle above a blue square\"")
    d.add_argument("--prompts", default=None, metavar="FILE", help="a text file with one caption a line")
    d.add_argument("--n", type=_positive_int, default=32, help="candidates per prompt (default 32)")
    d.add_argument("--keep", type=_positive_int, default=4, help="images kept per prompt, best first (default 4)")
    d.add_argument("--out", required=True, help="output folder: new, empty, or one generate wrote before (its files "
                                                "are then replaced, only those, and only if unchanged)")
    d.add_argument("--rank", choices=["clip", "likelihood"], default="clip",
                   help="clip: the trained reranker (default); likelihood: the transformer's own log p(image | caption)")
    d.add_argument("--run", default=None, metavar="DIR",
                   help="a run folder with dvae/, bpe/, transformer/ and clip/ (default: the preset's runs/<preset>)")
    d.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="a transformer checkpoint folder to sample from (default: the newest in the run's transformer/)")
    d.add_argument("--truncate", action="store_true", help="cut a prompt longer than text.text_len tokens (flagged)")
    _sampling_flags(d)
    _trust_flag(d)
    d.set_defaults(func=cmd_generate)

    d = sub.add_parser("eval", help="measure a trained stage")
    common(d)
    d.add_argument("what", nargs="?", default="pipeline",
                   choices=["pipeline", "transformer", "rerank-curve", "clip", "seeds"],
                   help="pipeline (default): judge accuracy of one sample and of the reranked best of 16 per "
                        "val/heldout prompt, per attribute, for the run in --run (default runs/demo-<preset>); "
                        "transformer: the judge on one sample per val/heldout prompt; rerank-curve: best-of-N accuracy "
                        "by the reranker, the likelihood and the judge, N = 1..64; clip: the reranker's recall@1/@5 "
                        "and one-fact-changed accuracy on val and heldout pairs; seeds: one table of the run folders "
                        "in --runs (their eval.json, else report.json), written to --out DIR as seeds.md and seeds.json")
    d.add_argument("--n", type=_positive_int, default=None,
                   help="prompts per split (pipeline and transformer 256, rerank-curve 64); clip: pairs per split (512)")
    d.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: the newest in --train.out_dir; "
                                                      "clip: in --clip_train.out_dir)")
    d.add_argument("--run", default=None, metavar="DIR",
                   help="pipeline, rerank-curve: a run folder with dvae/, bpe/, transformer/, clip/ (pipeline: default "
                        "runs/demo-<preset>, what `demo` writes; rerank-curve: default the preset's runs/<preset>)")
    d.add_argument("--runs", nargs="+", default=None, metavar="DIR", help="seeds: the run folders, one per seed")
    d.add_argument("--out", default=None, metavar="DIR",
                   help="transformer, rerank-curve, seeds: the folder for the figures (default: the run folder of --checkpoint "
                        "or --run, as named on this command line; never a folder read from a checkpoint)")
    _sampling_flags(d)
    _trust_flag(d)
    d.set_defaults(func=cmd_eval)

    d = sub.add_parser("export", help="write a sharded checkpoint (from an fsdp run) as one full checkpoint folder")
    d.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/x/checkpoints/step_0000500")
    d.add_argument("--out", default=None, help="the folder to write (default: CHECKPOINT-full beside it)")
    d.add_argument("--trust-sharded", action="store_true", dest="trust_sharded",
                   help="required: reading the sharded checkpoint unpickles its sharded/.metadata index, which can run "
                        "any code; pass it only for a checkpoint your own run wrote (the exported folder is pickle-free)")
    d.set_defaults(func=cmd_export, preset="smoke")

    d = sub.add_parser("info", help="parameters, sequence lengths and FLOPs of a preset (nothing is trained)")
    common(d)
    d.set_defaults(func=cmd_info)

    d = sub.add_parser("plan", help="memory per GPU (DDP / FSDP, with and without activation checkpointing) and "
                                    "days of training for a preset on many GPUs (nothing is trained)")
    common(d)
    d.add_argument("--gpus", type=_positive_int, required=True, help="number of GPUs (data parallel)")
    d.add_argument("--gpu-mem", type=_positive_float, required=True, dest="gpu_mem",
                   help="memory of one GPU in GiB (a 16 GB V100: 16); 10%% of it is kept free")
    d.add_argument("--mfu", type=_unit_interval, default=0.3,
                   help="model FLOPs utilisation, the fraction of the peak reached, in (0, 1] (default 0.3)")
    d.add_argument("--gpu-tflops", type=_positive_float, default=125.0, dest="gpu_tflops",
                   help="peak TFLOP/s of one GPU (default 125: a V100's 16-bit tensor-core peak)")
    d.add_argument("--batch", type=_positive_int, default=None,
                   help="global batch (default: the preset's train.batch_size, per process, times --gpus)")
    d.add_argument("--steps", type=_positive_int, default=None, help="optimizer updates (default train.max_steps)")
    d.add_argument("--no-scores", action="store_true", dest="no_scores",
                   help="count no attention scores in the activations, as FlexAttention (minidalle on CUDA) "
                        "and flash attention keep none (default: scores at the masks' density)")
    d.set_defaults(func=cmd_plan)
    return p


def _sampling_flags(d) -> None:
    d.add_argument("--temperature", type=_nonnegative_float, default=1.0, help="sampling temperature (default 1; 0 = argmax)")
    d.add_argument("--top-k", type=_nonnegative_int, default=0, dest="top_k", help="keep the k likeliest codes (0 = all)")
    d.add_argument("--top-p", type=_unit_interval, default=1.0, dest="top_p",
                   help="keep the likeliest codes up to this probability (1 = all)")
    d.add_argument("--guidance", type=_nonnegative_float, default=1.0,
                   help="classifier-free guidance scale (1 = off; needs a model trained with caption dropout)")
    d.add_argument("--seed", type=_nonnegative_int, default=0, help="random seed of the draws (default 0)")
    d.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one `warning: ...` line on stderr, not Python's file:line plus a source line."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    import warnings

    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return _main(argv)
    finally:
        warnings.showwarning = shown  # main() called from Python (tests, notebooks) leaves no trace


def _main(argv: list[str] | None) -> int:
    if os.environ.get("RANK", "0") not in ("", "0"):  # under torchrun, rank 0 alone prints (errors still show)
        import contextlib

        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            return _run(argv)
    return _run(argv)


def _run(argv: list[str] | None) -> int:
    # A process group a command joined is left up: `python -m minidalle` then ends with os._exit
    # (distributed.exit_now_if_distributed), and tearing the group down first, while the wrapped model
    # may still exist, is what made workers hang on the way out.
    return _command(argv)


def _command(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:  # a usage error (one line already printed) or --help: a status, not an exit
        return e.code if isinstance(e.code, int) else 2
    try:
        # Overrides are checked for every command, so a typo never passes silently.
        cfg = cfglib.get_config(args.preset, cfglib.parse_overrides(extra))
        if getattr(args, "json", False):
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):
                result = args.func(args, cfg)
        else:
            result = args.func(args, cfg)
    except MinidalleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except _collective_errors() as e:  # another process died or called a different collective
        if not _looks_collective(e):
            raise
        rank = os.environ.get("RANK", "0")
        print(f"error: rank {rank}: a collective with the other processes failed ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:300]}). Another process probably failed first: read its error above; a hang "
              "would have ended after --train.dist_timeout seconds", file=sys.stderr)
        return 3
    except OSError as e:  # a folder we cannot write, a full disk: say which path
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}" + (f" -> {e.filename2}" if e.filename2 else ""), file=sys.stderr)
        return 2
    print(json.dumps(strict_json(result), sort_keys=True, default=str, allow_nan=False))
    return 0
