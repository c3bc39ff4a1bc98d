"""A back-of-the-envelope planner for training a preset's transformer on many GPUs (nothing is built).

    res = plan(get_config("paper"), gpus=1024, gpu_mem_gb=16, batch=1024, steps=430_000)
    print(plan_table(res))                   # memory per GPU: DDP / FSDP, with and without checkpointing
    res["days"]                              # wall-clock days at res["mfu"] of res["gpu_tflops"]

`python -m minidalle plan --preset paper --gpus 1024 --gpu-mem 16 --batch 1024 --steps 430000`.

Parameters and training FLOPs per token come from `describe` (below) (counted on the meta
device). Everything else is arithmetic, under these assumptions, which are minidalle's own:

- Precision: bf16 autocast over fp32 weights. Per parameter that is 4 bytes of fp32 master weights
  plus 2 bytes of bf16 copy (autocast keeps the cast weights alive through forward and backward),
  4 bytes of fp32 gradient (the all-reduce or reduce-scatter runs in fp32), and 8 bytes of AdamW
  moments (two fp32 tensors), plus 4 bytes more when `train.ema_decay` > 0 (an fp32 EMA, counted
  with the optimizer state).
- DDP replicates all of it on every GPU. FSDP shards the fp32 weights, gradients and optimizer
  state over the N GPUs, and at any moment holds one unit unsharded: its bf16 weights (the only
  bf16 copy FSDP's mixed precision keeps) and its fp32 gradient before the reduce-scatter. The unit
  is the larger of one block and the rest (embeddings, heads). Prefetching the next unit, which
  FSDP does by default, would add one more.
- Activations, without checkpointing, per layer: s·b·d·(34 + 5·a·s/d) bytes in 16 bits (Korthikanti
  et al. 2022, "Reducing activation recomputation"; 34 is 18 + 4·mlp_ratio at mlp_ratio 4), for s
  positions, micro-batch b per GPU, width d and a heads. The 5·a·s² term is the attention scores,
  softmax and dropout mask: it is scaled here by the masks' density (the fraction of query-key
  pairs DALL·E's row, column and conv masks allow), as if a sparse kernel kept only the allowed
  pairs. FlexAttention (what minidalle runs on CUDA) and flash or memory-efficient SDPA keep no
  scores at all: pass scores=False (`--no-scores`) for them. The estimate also counts dropout masks
  that a model with dropout 0 does not keep, so it errs on the large side.
- With activation checkpointing: each layer's input (2·s·b·d bytes per layer) plus one layer's full
  activations, recomputed in the backward pass. Either way, plus the logits in fp32
  (4 bytes × b × (the text head's outputs + the image head's outputs) per sample).
- It fits when the total is at most 90% of the GPU's memory: the rest is left for the CUDA context,
  the allocator's fragmentation and temporary buffers. Memory is in GiB (2^30 bytes); a "16 GB"
  V100 has 16 GiB.
- Time: FLOPs per step = FLOPs per token × sequence length × global batch; days = FLOPs per step ×
  steps / (GPUs × peak FLOP/s × MFU) / 86,400. Checkpointing repeats the forward pass (a third
  more compute at the same utilisation): `days_checkpointed`.
"""

from __future__ import annotations

import math

import torch

from ..config import Config
from ..dvae import count_parameters
from ..errors import ConfigError
from ..dvae import DVAE
from ..model import DALLE, Layout, flops_per_token

GIB = 2 ** 30
HEADROOM = 0.10  # of the GPU's memory, kept free for the CUDA context and fragmentation
V100_TFLOPS = 125.0  # V100 16-bit tensor-core peak, the paper's GPU
STRATEGIES = {"ddp": ("DDP", False, False), "ddp_ckpt": ("DDP + checkpointing", False, True),
              "fsdp": ("FSDP", True, False), "fsdp_ckpt": ("FSDP + checkpointing", True, True)}


def _check(gpus, gpu_mem_gb, mfu, gpu_tflops, batch, steps) -> None:
    """Refuse inputs no plan can be made for, naming the flag (ConfigError)."""
    def whole(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def finite(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not whole(gpus) or gpus < 1:
        raise ConfigError(f"--gpus={gpus!r} is invalid: it must be a whole number >= 1")
    if not finite(gpu_mem_gb) or gpu_mem_gb <= 0:
        raise ConfigError(f"--gpu-mem={gpu_mem_gb!r} is invalid: it must be a number of GiB > 0")
    if not finite(mfu) or not 0 < mfu <= 1:
        raise ConfigError(f"--mfu={mfu!r} is invalid: it must be in (0, 1] (a fraction of the peak)")
    if not finite(gpu_tflops) or gpu_tflops <= 0:
        raise ConfigError(f"--gpu-tflops={gpu_tflops!r} is invalid: it must be a number > 0")
    for flag, v in (("--batch", batch), ("--steps", steps)):
        if v is not None and (not whole(v) or v < 1):
            raise ConfigError(f"{flag}={v!r} is invalid: it must be a whole number >= 1")
    if batch is not None and batch % gpus:
        raise ConfigError(f"--batch={batch} does not split evenly over {gpus} GPUs: give a multiple of {gpus}")


def unit_params(cfg: Config, total: int) -> dict:
    """Parameters of one transformer block and of the rest (embeddings, final LayerNorm, heads).

    Example: unit_params(get_config("toy"), 987392) -> {"block": 198272, "rest": 194304}
    """
    from ..model import Block

    with torch.device("meta"):
        block = count_parameters(Block(cfg.model, "row"))
    return {"block": block, "rest": total - cfg.model.n_layer * block}


def activation_bytes(cfg: Config, res: dict, micro_batch: int, checkpointing: bool, scores: bool = True) -> dict:
    """Activation bytes per GPU for one micro-batch, split into the layers' part and the logits.

    res is `describe(cfg)`. See the module docstring for the formula and what it assumes.
    Example: activation_bytes(toy, describe(toy), 1, checkpointing=False)["layers"] -> ~1.92e6 (4 layers)
    """
    s, b, d = res["sequence_len"], micro_batch, res["d_model"]
    a, n_layer = cfg.model.n_head, cfg.model.n_layer
    attention = 5 * a * s * s * b * res["mask_density"] if scores else 0.0
    layer = s * b * d * (18 + 4 * cfg.model.mlp_ratio) + attention
    layers = n_layer * 2 * s * b * d + layer if checkpointing else n_layer * layer
    logits = 4 * b * ((res["text_len"] - 1) * (res["text_vocab"] + res["text_len"]) + res["image_len"] * res["image_vocab"])
    return {"layers": layers, "logits": logits, "scores_per_layer": attention, "total": layers + logits}


def plan(cfg: Config, gpus: int, gpu_mem_gb: float, mfu: float = 0.3, gpu_tflops: float = V100_TFLOPS,
         batch: int | None = None, steps: int | None = None, scores: bool = True) -> dict:
    """Parameters, FLOPs, days and per-GPU memory (DDP / FSDP, with and without activation checkpointing).

    batch is the global batch (default: the preset's per-process `train.batch_size` × gpus); steps
    default to `train.max_steps`. Memory figures are GiB; `fits` keeps 10% of gpu_mem_gb free.
    Example: plan(get_config("paper"), 1024, 16, batch=1024, steps=430_000)["memory"]["fsdp_ckpt"]["fits"] -> True
    """
    from .plan import describe

    _check(gpus, gpu_mem_gb, mfu, gpu_tflops, batch, steps)
    res = describe(cfg)
    params = res["transformer_params"]
    batch = cfg.train.batch_size * gpus if batch is None else batch
    steps = cfg.train.max_steps if steps is None else steps
    micro = batch // gpus
    units = unit_params(cfg, params)
    unit = max(units.values())
    ddp = {"weights": 4 + 2, "gradients": 4, "optimizer": 8 + (4 if cfg.train.ema_decay > 0 else 0)}
    fsdp = {**ddp, "weights": 4}  # the bf16 copy is only the gathered unit's, added below
    usable = gpu_mem_gb * (1 - HEADROOM)

    memory = {}
    for key, (_, sharded, ckpt) in STRATEGIES.items():
        acts = activation_bytes(cfg, res, micro, ckpt, scores)
        row = {name: n * params / (gpus if sharded else 1) / GIB for name, n in (fsdp if sharded else ddp).items()}
        if sharded:  # the gathered unit: its bf16 weights and its unsharded fp32 gradient
            row["weights"] += 2 * unit / GIB
            row["gradients"] += 4 * unit / GIB
        row["activations"] = acts["total"] / GIB
        row["total"] = sum(row.values())
        row["fits"] = row["total"] <= usable
        memory[key] = row

    flops_step = res["flops_per_token"] * res["sequence_len"] * batch
    seconds = flops_step * steps / (gpus * gpu_tflops * 1e12 * mfu)
    return {"preset": cfg.preset, "params": params, "block_params": units["block"], "rest_params": units["rest"],
            "n_layer": cfg.model.n_layer, "d_model": res["d_model"], "n_head": cfg.model.n_head,
            "sequence_len": res["sequence_len"], "mask_density": res["mask_density"],
            "gpus": gpus, "gpu_mem_gb": gpu_mem_gb, "usable_gb": usable, "headroom": HEADROOM,
            "global_batch": batch, "micro_batch": micro, "steps": steps,
            "flops_per_token": res["flops_per_token"], "flops_per_step": flops_step, "total_flops": flops_step * steps,
            "gpu_tflops": gpu_tflops, "mfu": mfu, "days": seconds / 86400, "days_checkpointed": seconds / 86400 * 4 / 3,
            "bytes_per_param": {"ddp": ddp, "fsdp": fsdp}, "attention_scores": scores, "memory": memory}


def plan_table(res: dict) -> str:
    """The per-GPU memory of `plan(...)` as a markdown table, one row per strategy.

    Example: print(plan_table(plan(get_config("toy"), 1, 16)))  -> ... | DDP | 0.00552 | ... | yes | ...
    """
    lines = [f"| strategy | weights | gradients | optimizer | activations | total GiB | fits {res['gpu_mem_gb']:g} GiB |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for key, (name, _, _) in STRATEGIES.items():
        m = res["memory"][key]
        cells = " | ".join(_gib(m[k]) for k in ("weights", "gradients", "optimizer", "activations", "total"))
        lines.append(f"| {name} | {cells} | {'yes' if m['fits'] else 'no'} |")
    return "\n".join(lines)


def _gib(x: float) -> str:
    """Three significant figures. Example: 0.0055175 -> "0.00552"; 16.342 -> "16.3"; 1234.5 -> "1,234" """
    return f"{x:,.0f}" if x >= 1000 else f"{x:.3g}" if x >= 1e-4 else f"{x:.1e}"


def _duration(days: float) -> str:
    """Example: 12.56 -> "12.6 days"; 0.25 -> "6 hours"; 1.56e-5 -> "1.35 s" """
    if days >= 1:
        return f"{days:.3g} days"
    return f"{days * 24:.3g} hours" if days * 24 >= 1 else f"{days * 86400:.3g} s"


def _n(count: int, word: str) -> str:
    """Example: _n(1, "GPU") -> "1 GPU"; _n(1024, "GPU") -> "1,024 GPUs" """
    return f"{count:,} {word}" + ("" if count == 1 else "s")


def format_plan(res: dict) -> str:
    """The text `python -m minidalle plan` prints: the run, its FLOPs and time, then `plan_table`.

    Example: print(format_plan(plan(get_config("toy"), 1, 16)))  -> "preset toy: 987,392 parameters ..."
    """
    bpp, fsdp = res["bytes_per_param"]["ddp"], res["bytes_per_param"]["fsdp"]
    opt = "AdamW's two fp32 moments" + (" + an fp32 EMA" if bpp["optimizer"] > 8 else "")
    scores = (f"attention scores at mask density {res['mask_density']:.3f}" if res["attention_scores"]
              else "no attention scores (a memory-efficient kernel)")
    return "\n".join([
        f"preset {res['preset']}: {res['params']:,} parameters ({res['n_layer']} layers, d_model {res['d_model']}, "
        f"{res['n_head']} heads), sequence {res['sequence_len']}",
        f"  batch {res['global_batch']:,} = {res['micro_batch']:,} per GPU x {_n(res['gpus'], 'GPU')}; "
        f"{_n(res['steps'], 'step')}",
        f"  training FLOPs: {res['flops_per_token']:.3g} per token, {res['flops_per_step']:.3g} per step, "
        f"{res['total_flops']:.3g} in all",
        f"  time: {_duration(res['days'])} at {res['mfu']:.0%} MFU of {res['gpu_tflops']:g} TFLOP/s per GPU "
        f"({_duration(res['days_checkpointed'])} with checkpointing's recomputed forward)",
        f"  bytes per parameter: weights {bpp['weights']} (fp32 master + bf16 copy; FSDP {fsdp['weights']}, sharded, "
        f"and bf16 only for the unit gathered), gradients {bpp['gradients']} (fp32), optimizer {bpp['optimizer']} ({opt})",
        f"  memory per GPU in GiB, activations with {scores}; fits = total <= {res['usable_gb']:.3g} GiB "
        f"({1 - res['headroom']:.0%} of {res['gpu_mem_gb']:g})",
        "", plan_table(res)])


def describe(cfg: Config) -> dict:
    """Parameters of every stage, the sequence and the transformer's training FLOPs per token, all
    counted on the meta device (the paper preset's 12B parameters take no memory).

    Example: describe(get_config("paper"))["transformer_params"] -> 12293824256
    """
    layout = Layout.from_config(cfg)
    with torch.device("meta"):
        dvae = DVAE(cfg.dvae)
        model = DALLE(cfg.model, layout)
    flops = flops_per_token(cfg.model, layout)
    return {"preset": cfg.preset, "image_size": cfg.data.image_size, "grid": layout.grid,
            "image_vocab": layout.image_vocab, "text_len": layout.text_len, "text_vocab": layout.text_vocab,
            "sequence_len": layout.length, "image_len": layout.image_len,
            "dvae_encoder_params": count_parameters(dvae.encoder), "dvae_decoder_params": count_parameters(dvae.decoder),
            "transformer_params": count_parameters(model), "d_model": cfg.model.n_head * cfg.model.head_dim,
            "layer_schedule": _schedule(model.kinds), "flops_per_token": flops["total"],
            "flops_weights": flops["weights"], "flops_attention": flops["attention"],
            "mask_density": flops["mask_density"]}


def _schedule(kinds: list[str]) -> str:
    """Example: ["row", "column", "row", "conv"] -> "row, column, row, conv" (long lists shortened)"""
    if len(kinds) <= 8:
        return ", ".join(kinds)
    return ", ".join(kinds[:6]) + f", ... ({kinds.count('row')} row, {kinds.count('column')} column), {kinds[-1]}"
