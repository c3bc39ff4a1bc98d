"""What each `python -m minidalle` command does, once main.py has parsed it: one `cmd_*` function per command.

Each takes the parsed arguments and the run's Config and returns the dict its JSON line prints;
errors a user can fix are raised as MinidalleError and printed as one line by main.py.
"""

from __future__ import annotations

from pathlib import Path

from .. import config as cfglib
from ..errors import ConfigError, DataError
from ..infra.files import check_out_folder


def cmd_data(args, cfg: cfglib.Config) -> dict:
    from ..data import write_split

    size = cfg.data.image_size
    out = write_split(check_out_folder(args.out, "--out"), args.split, args.n, size, cfg.data.seed)
    print(f"wrote {args.n} {args.split} samples ({size}x{size}) to {out}/ (PNG + .txt per sample, captions.jsonl)")
    return {"out": str(out), "split": args.split, "n": args.n, "image_size": size}


def cmd_judge(args, cfg: cfglib.Config) -> dict:
    from ..captions import CaptionError
    from ..data import read_split
    from ..judge import evaluate, to_spec
    from ..realdata.images import IMAGE_EXTENSIONS, load_image

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
    from ..judge import CHECKS

    print(title)
    for attr in CHECKS:
        acc, n = result[attr], result["stated"][attr]
        print(f"  {attr:<9} {acc * 100:6.2f}%  (n={n})" if acc is not None else f"  {attr:<9}    n/a  (not stated)")
    print(f"  {'overall':<9} {result['overall'] * 100:6.2f}%  (n={result['n']})")


def cmd_bench(args, cfg: cfglib.Config) -> dict:
    if args.what == "all":  # every benchmark in turn, one summary (minidalle/bench/suite.py)
        from ..bench.suite import bench_all

        return bench_all(args, cfg)
    if args.skip or args.run:
        raise ConfigError(f"--skip and --run are flags of `bench all`, not of `bench {args.what}`")
    if args.what == "bpe":
        from ..bench.bpe import benchmark_bpe, format_bpe_benchmark

        res = benchmark_bpe(mib=args.mib, n_captions=args.n or 20_000, progress=not args.json)  # the paper's 16,384
        print(format_bpe_benchmark(res))
        return res
    if args.what == "attention":
        from ..bench.attention import benchmark_attention, format_attention_benchmark

        res = benchmark_attention(progress=not args.json)
        print(format_attention_benchmark(res))
        return res
    if args.what == "sampling":
        from ..bench.sampling import benchmark_sampling, format_sampling_benchmark

        res = benchmark_sampling(compile=not args.no_compile, progress=not args.json)
        print(format_sampling_benchmark(res))
        return res
    if args.what == "dvae":
        import tempfile

        from ..bench.dvae import benchmark_dvae, format_dvae_benchmark

        out = check_out_folder(args.out, "--out") if args.out else tempfile.mkdtemp(prefix="minidalle-bench-dvae-")
        res = benchmark_dvae(cfg, out, n_eval=args.n or 500)
        print(format_dvae_benchmark(res))
        return res
    from ..bench.judge import benchmark, format_benchmark

    res = benchmark(n=args.n or 1000, image_size=cfg.data.image_size, seed=cfg.data.seed)
    print(format_benchmark(res))
    return res


def cmd_check_gpu(args, cfg: cfglib.Config) -> dict:
    """Every GPU figure in one report (minidalle/bench/gpu_check.py); --dry-run runs its phases on the CPU."""
    from ..bench.gpu_check import check_gpu

    if cfg.to_dict() != cfglib.get_config(cfg.preset).to_dict():
        raise ConfigError("check-gpu takes no --section.key=value overrides: its phases run fixed sizes, which "
                          "its report records")
    report = check_gpu(args.out, dry_run=args.dry_run, budget_s=args.budget_s)
    return {"out": str(args.out), "dry_run": report["dry_run"], "complete": report["complete"],
            "phases": {name: e["status"] for name, e in report["phases"].items()}}


def _dvae_reconstructions(model, cfg: cfglib.Config, out: Path, tag: str) -> dict:
    """Judge and PSNR on `val` reconstructions, and a grid of 8 val images over their reconstructions."""
    from ..data import ShapesWorld
    from ..stages.image_tokenizer import reconstruction_report
    from ..viz import to_uint8
    from ..viz import save_grid

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
    from ..stages.image_tokenizer import train_dvae
    from ..stages.text_tokenizer import train_text_tokenizer

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
    from ..stages.pipeline import run_demo

    out = check_out_folder(args.out or f"runs/demo-{cfg.preset}", "--out")
    report = run_demo(cfg, out, seed=args.seed, device=args.device, n_prompts=args.n_prompts, n=args.n,
                      progress=not args.json, start_over=args.start_over, trust_sharded=args.trust_sharded)
    return {k: v for k, v in report.items() if k != "configs"}  # the configs are in OUT/report.json


def _train_transformer(args, cfg: cfglib.Config) -> dict:
    """Stage 2: reuse (or first train) the tokenizers in the run folder, then train the transformer."""
    from ..stages.transformer import train_transformer

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
    """Print `reranker.evaluate_clip`'s recall, and its one-fact-changed accuracy when measured, per split."""
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
    from ..bpe import Tokenizer
    from ..stages.reranker import evaluate_clip, train_clip
    from ..stages.text_tokenizer import BPE_FILE

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
    from ..stages.generate import generate, load_pipeline, read_prompts

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
    from ..stages.transformer import evaluate_transformer

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
        from ..stages.reranker import evaluate_clip

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
    from ..stages.report import seeds_markdown, seeds_summary, write_seeds

    if not args.runs or not args.out:
        raise ConfigError("eval seeds needs --runs DIR [DIR ...] (run folders `demo --out` wrote) and --out DIR")
    summary = seeds_summary(args.runs)
    paths = write_seeds(summary, args.out)
    print(seeds_markdown(summary))
    print(f"[eval seeds] -> {paths[1]} and {paths[0]}")
    return summary


def _eval_pipeline(args, cfg: cfglib.Config) -> dict:
    """The whole pipeline's judge accuracy (single sample and reranked best of 16), written to RUN/eval.*."""
    from ..stages.report import accuracy_markdown, evaluate_run, summary_line, write_eval

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
    from ..stages.generate import load_pipeline, rerank_curve, run_config
    from ..stages.transformer import eval_folder

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
    from ..infra import checkpoint as ckpt

    out = ckpt.export_checkpoint(args.checkpoint, args.out, trust_sharded=args.trust_sharded)
    n = len(ckpt.read_checkpoint(out).tensors)
    print(f"[export] {args.checkpoint} -> {out} ({n} tensors, safetensors: safe to share); `generate --checkpoint "
          f"{out}` (a transformer) and every loader read it")
    return {"checkpoint": str(args.checkpoint), "out": str(out), "tensors": n}


def cmd_info(args, cfg: cfglib.Config) -> dict:
    """Parameters of every stage, sequence lengths and the transformer's FLOPs per token (meta device)."""
    from ..scale.plan import describe

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
    """Memory per GPU under DDP and FSDP, with and without activation checkpointing, and days (minidalle/scale/plan.py)."""
    from ..scale.plan import format_plan, plan

    res = plan(cfg, args.gpus, args.gpu_mem, mfu=args.mfu, gpu_tflops=args.gpu_tflops, batch=args.batch,
               steps=args.steps, scores=not args.no_scores)
    print(format_plan(res))
    return res




