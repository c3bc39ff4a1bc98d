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
    python -m minidalle check-gpu [--out runs/check-gpu] [--budget-s 480] [--dry-run]
                                   what a GPU changes, measured in one report (--dry-run: on the CPU, smoke sizes)
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

from .. import config as cfglib
from ..data import SPLITS
from ..errors import MinidalleError
from .commands import cmd_bench, cmd_check_gpu, cmd_data, cmd_demo, cmd_eval, cmd_export, cmd_generate, cmd_info, cmd_judge, cmd_plan, cmd_train
from ..infra.files import strict_json


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

    d = sub.add_parser("check-gpu", help="measure what a GPU changes, in one report of under 8 minutes: versions, "
                                         "train-step MFU, exact resume, sampler, attention, host syncs, the toy demo")
    d.add_argument("--out", default="runs/check-gpu",
                   help="folder for report.md, report.json and each phase's log (default runs/check-gpu): new, empty, "
                        "or one check-gpu wrote (its files are then replaced, only those, and only if unchanged)")
    d.add_argument("--budget-s", type=_positive_float, default=480.0, dest="budget_s",
                   help="seconds for all the phases together, shared out among them (default 480)")
    d.add_argument("--dry-run", action="store_true", dest="dry_run",
                   help="run every phase on the CPU at smoke sizes, in under a minute (CI); no GPU needed")
    d.set_defaults(func=cmd_check_gpu, preset="smoke")

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
