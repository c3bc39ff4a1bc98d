"""How good a trained dVAE is: its reconstructions read by the judge, PSNR, codebook use, parameter counts.

    result = benchmark_dvae(get_config("toy"), out_dir)      # `python -m minidalle bench dvae`
    print(format_dvae_benchmark(result))

It trains the tokenizer (or reuses the finished one in dvae_train.out_dir), reconstructs `val` and
`heldout` images and reports what stages/image_tokenizer.reconstruction_report measures, with the
paper's encoder and decoder sizes beside this preset's.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path


from ..infra import checkpoint as ckpt
from ..config import Config
from ..data import ShapesWorld
from ..dvae import paper_parameter_counts
from ..errors import CheckpointError
from ..stages.image_tokenizer import reconstruction_report, train_dvae


def benchmark_dvae(cfg: Config, out_dir: str | os.PathLike, n_eval: int = 500, progress: bool = True) -> dict:
    """Train stage 1 from scratch with `cfg`, then measure the tokenizer.

    Reports wall time of training, judge accuracy on originals vs reconstructions of `val` and
    `heldout` (per attribute), PSNR, perplexity and dead codes at the end of training, encoding
    throughput, and the paper preset's parameter counts beside the released model's.
    """
    out = Path(out_dir)
    if ckpt.list_checkpoints(out / "checkpoints"):
        raise CheckpointError(f"{out} already holds a run; the benchmark trains from scratch, choose a new --out")
    cfg = copy.deepcopy(cfg)  # the caller's config keeps its own out_dir
    cfg.dvae_train.out_dir = str(out)
    t0 = time.perf_counter()
    model, trainer = train_dvae(cfg, progress=progress, out_flag="--out")
    train_seconds = time.perf_counter() - t0
    model.eval()
    size, K = cfg.data.image_size, cfg.dvae.vocab_size
    result = {"preset": cfg.preset, "quantizer": cfg.dvae.quantizer, "likelihood": cfg.dvae.likelihood,
              "vocab_size": K, "image_size": size, "steps": trainer.step, "train_seconds": round(train_seconds, 1),
              "final_loss": trainer.loss, "dead_codes": int(model.quantizer.health.dead())}
    for split in ("val", "heldout"):
        result[split] = reconstruction_report(model, split, size, n_eval, cfg.data.seed)
    result["perplexity_fraction"] = result["val"]["perplexity"] / K
    ds = ShapesWorld("val", size, cfg.data.seed)
    images = ds.batch(0, 1024)[0]
    t0 = time.perf_counter()
    model.encode(images.to(next(model.parameters()).device))
    result["encode_images_per_s"] = round(len(images) / (time.perf_counter() - t0), 1)
    result["paper_params"] = paper_parameter_counts()
    return result


def format_dvae_benchmark(r: dict) -> str:
    """`benchmark_dvae`'s result as a short text report."""
    lines = [f"dVAE ({r['quantizer']}, {r['likelihood']}, K={r['vocab_size']}, {r['image_size']}x{r['image_size']}, "
             f"preset {r['preset']}): {r['steps']} updates in {r['train_seconds']} s, final loss {r['final_loss']:.4f}"]
    for split in ("val", "heldout"):
        s = r[split]
        per = ", ".join(f"{a} {s['original'][a]:.3f}->{s['reconstruction'][a]:.3f}"
                        for a in ("count", "color", "shape", "size", "position", "relation")
                        if s["original"][a] is not None)
        lines.append(f"  {split:<8} judge original {s['original']['overall']:.3f} -> reconstruction "
                     f"{s['reconstruction']['overall']:.3f} (ratio {s['ratio']:.3f}); PSNR {s['psnr']:.2f} dB")
        lines.append(f"           per attribute: {per}")
    lines.append(f"  codebook: perplexity {r['val']['perplexity']:.1f} of K={r['vocab_size']} "
                 f"({r['perplexity_fraction']:.1%}), {r['val']['codes_used']} codes used on val, "
                 f"{r['dead_codes']} dead at the end of training")
    lines.append(f"            over the {r['val']['object_cells']:.0%} of cells holding part of an object: "
                 f"perplexity {r['val']['perplexity_objects']:.1f}")
    lines.append(f"  encoding: {r['encode_images_per_s']:.0f} images/s")
    p = r["paper_params"]
    lines.append(f"  paper preset: encoder {p['encoder'] / 1e6:.1f}M (released {p['released_encoder'] / 1e6:.1f}M), "
                 f"decoder {p['decoder'] / 1e6:.1f}M (released {p['released_decoder'] / 1e6:.1f}M)")
    return "\n".join(lines)
