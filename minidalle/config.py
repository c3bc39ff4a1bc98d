"""Typed configs, the smoke switch, and building a run's config from a preset (presets.py holds the ladder).

One code path serves every scale: a preset only changes numbers. Presets are plain data (dicts of
field overrides on top of the dataclass defaults), never code that rewrites globals. Command-line
overrides look like `--train.lr=3e-4` (or `--lr=3e-4` when the key is unambiguous) and are
type-checked against the dataclass field.

The smoke switch: `MINIDALLE_SMOKE=1` (set by the repo-root `conftest.py` for tests and notebook
kernels) caps the *compute* knobs of every preset -- steps, batch size, eval batches, dataset sizes
-- so any notebook runs in seconds on a CPU. Architecture numbers are left alone, so `paper` still
means the paper's shapes (instantiated on the meta device) under smoke.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field

from .errors import ConfigError
from .presets import PRESETS, SMOKE_CAPS

SMOKE_ENV = "MINIDALLE_SMOKE"
# The choices of the string fields (dvae.py, data.py and the datasets read them from here).
DATASETS = ("shapes", "emoji", "folder", "tar")
QUANTIZERS = ("gumbel", "vq")
# logit_laplace: the paper's density; logit_laplace_binned: the same density scored per 8-bit level
# (losses.binned_logit_laplace_nll; the toy presets use it, see why there); mse: for comparison.
LIKELIHOODS = ("logit_laplace", "logit_laplace_binned", "mse")
MAX_IMAGE_SIZE = 2048  # the paper trains at 256; 2048x2048x3 is already 12 MB a sample
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PARALLEL = ("none", "ddp", "fsdp")
NONFINITE = ("stop", "skip")
ATTN_IMPLS = ("auto", "sdpa", "flex")  # attention.py's execution paths


def smoke_mode() -> bool:
    """True when `MINIDALLE_SMOKE` is set to a true value ("1", "true", "yes").

    Example: MINIDALLE_SMOKE=1 -> True; unset -> False
    """
    return os.environ.get(SMOKE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass
class DataConfig:
    dataset: str = "shapes"  # which dataset: shapes | emoji | folder | tar
    image_size: int = 32  # side of the square RGB images fed to the tokenizer
    path: str = ""  # root folder (folder) or shard glob/folder (tar); unused for shapes/emoji
    seed: int = 0  # seed of the ShapesWorld stream and of caption picking
    n_train: int = 50_000  # training samples per epoch for finite views (ShapesWorld streams forever)
    n_val: int = 1_000  # validation samples (same combinations as train, new draws)
    n_heldout: int = 1_000  # zero-shot samples (combinations never seen in training)
    max_skip_rate: float = 0.05  # abort a real-data run when more than this fraction of files is bad
    two_objects: float = 0.5  # ShapesWorld: share of training scenes with two objects (val and heldout keep 0.5)


@dataclass
class TrainConfig:
    max_steps: int = 2_000  # optimizer updates
    batch_size: int = 64  # samples per update (per process under torchrun)
    lr: float = 3e-4  # peak learning rate, reached after warm-up
    min_lr: float = 3e-5  # floor of the cosine decay
    warmup_steps: int = 100  # linear warm-up length in updates
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.999  # AdamW second-moment decay
    grad_clip: float = 1.0  # clip the global grad norm to this (0 = off)
    eval_every: int = 250  # run evaluation every this many updates (0 = never)
    eval_batches: int = 8  # batches per evaluation
    ckpt_every: int = 500  # write a checkpoint every this many updates (0 = only at the end)
    keep_last: int = 2  # checkpoints kept on disk (at least 2, so a crash mid-write loses nothing)
    log_every: int = 10  # write a metrics line every this many updates
    seed: int = 1337  # seed of torch, numpy and python RNGs
    device: str = "auto"  # auto (cuda -> mps -> cpu) or an explicit torch device string
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | fp32 | bf16 | fp16 (with a loss scaler)
    ema_decay: float = 0.0  # keep an exponential moving average of the weights with this decay (0 = off)
    parallel: str = "none"  # none | ddp (a copy per GPU) | fsdp (parameters sharded); launch with torchrun
    grad_accum: int = 1  # micro-batches per update; global batch = batch_size x grad_accum x processes
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    nonfinite: str = "stop"  # a non-finite loss or gradient: stop (raise) | skip the update and count it
    dist_timeout: float = 600.0  # seconds a collective may wait for the other processes before it errors
    powersgd_rank: int = 0  # ddp only: compress gradients with PowerSGD of this rank (0 = off)
    threads: int = 0  # CPU only: torch threads; 0 = measure at the start of each fit and pick (infra.machine.choose_threads)
    out_dir: str = "runs/default"  # where metrics.jsonl and checkpoints go


@dataclass
class DVAEConfig:
    """Stage 1, the image tokenizer (docs/paper.md, Stage 1). Paper values in comments where we differ."""

    quantizer: str = "gumbel"  # gumbel (the paper's dVAE) | vq (VQ-VAE, for comparison)
    likelihood: str = "logit_laplace"  # logit_laplace (paper) | logit_laplace_binned (per 8-bit level) | mse
    vocab_size: int = 512  # K codes (paper 8192)
    hidden: int = 64  # channels of the first encoder group, doubled per group (paper 256)
    blocks_per_group: int = 1  # bottleneck residual blocks per resolution (paper 2)
    n_groups: int = 3  # resolutions; downsampling factor 2**(n_groups-1): 3 -> x4, 4 -> x8 (paper 4)
    code_dim: int = 64  # VQ only: dimension of a codebook vector
    tau_start: float = 1.0  # Gumbel temperature at step 0 (paper 1)
    tau_end: float = 1 / 16  # Gumbel temperature after tau_steps (paper 1/16)
    tau_steps: int = 150_000  # cosine anneal length in updates (paper 150k), times schedule_scale
    kl_max: float = 6.6  # KL weight beta after kl_steps (paper 6.6)
    kl_steps: int = 5_000  # cosine ramp of beta from 0 in updates (paper 5k), times schedule_scale
    schedule_scale: float = 1.0  # multiplies tau_steps and kl_steps so the recipe fits a short run
    commitment: float = 0.25  # VQ only: weight of the commitment loss (van den Oord et al.)
    ema_decay: float = 0.99  # VQ only: EMA decay of codebook updates
    dead_after: int = 200  # steps a code may go unused before it counts as dead (and VQ restarts it)


@dataclass
class TextConfig:
    """The text tokenizer (docs/paper.md, "The text tokenizer"): a byte-level BPE trained on the captions."""

    vocab_size: int = 16_384  # BPE vocabulary, the 256 bytes included (paper 16,384)
    lowercase: bool = True  # the paper lowercases captions
    dropout: float = 0.1  # BPE dropout while training the transformer (paper 10%); 0 at inference
    text_len: int = 256  # caption tokens per sample (paper 256)
    out_dir: str = "runs/default/bpe"  # where bpe.model, bpe.vocab and tokenizer.json go


@dataclass
class TransformerConfig:
    """Stage 2, the DALL·E transformer (docs/paper.md, "The transformer"). Paper values in comments.

    The sequence shape comes from the other sections: text.text_len caption positions over
    text.vocab_size BPE tokens (plus one padding token per position), then the dVAE's grid of
    image tokens over dvae.vocab_size codes.
    """

    n_layer: int = 4  # transformer blocks (paper 64); the last is convolutional, see attention.layer_kinds
    n_head: int = 4  # attention heads (paper 62)
    head_dim: int = 32  # width of one head; d_model = n_head * head_dim (paper 64, so d_model 3968)
    mlp_ratio: int = 4  # hidden width of each block's MLP, in multiples of d_model (paper 4)
    conv_kernel: int = 5  # side of the convolutional mask's window, odd (paper 11 on its 32x32 grid)
    dropout: float = 0.0  # dropout on embeddings and residual branches (paper: not stated)
    caption_dropout: float = 0.1  # chance a training caption is replaced by the all-padding caption (for guidance)
    text_loss_weight: float = 0.125  # weight of the text cross-entropy (paper 1/8)
    image_loss_weight: float = 0.875  # weight of the image cross-entropy (paper 7/8)
    attn_impl: str = "auto"  # auto | sdpa (boolean mask) | flex (FlexAttention, block-sparse); see attention.py


@dataclass
class ClipConfig:
    """The contrastive reranker (paper section 2.5: CLIP picks the best of N samples), trained from scratch
    on our captions. Images go through a small CNN, captions (the transformer's BPE ids) through a small
    transformer; both land on the unit sphere of embed_dim dimensions, compared by cosine similarity."""

    image_channels: int = 32  # channels of the CNN's first stride-2 conv, doubled by each one after it
    image_downsamples: int = 3  # stride-2 convs: 32x32 pixels -> a 4x4 map with 3 (flattened, so it keeps where)
    image_extra_convs: int = 0  # stride-1 convs after each stride-2 conv but the first (more depth, same map)
    text_width: int = 128  # width of the text transformer
    text_layers: int = 2  # its blocks (bidirectional attention over the caption's real tokens)
    text_heads: int = 4  # its attention heads; text_width must divide by it
    embed_dim: int = 128  # the shared embedding both encoders project to
    temperature: float = 0.07  # initial softmax temperature (CLIP's 0.07); learned, as log(1/T), up to 1/100
    hard_negatives: int = 2  # ShapesWorld: scenes with one fact changed per training pair (0 = in-batch only)
    morph_negatives: int = 1  # ShapesWorld: images per pair with one circle/square/diamond morphed past halfway to another
    morph_jitter: float = 0.5  # ShapesWorld: chance a training image draws those shapes a little off the exact one
    train_pairs: int = 20_000  # ShapesWorld: training pairs rendered once and held in memory (with their negatives)
    augment: float = 1.0  # strength of the blur, noise and colour-cast augmentation of training images (0 = off)


@dataclass
class Config:
    """Everything one run needs. Each stage has its own section (and its own training section)."""

    preset: str = "toy"  # name of the preset these numbers came from
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dvae: DVAEConfig = field(default_factory=DVAEConfig)
    dvae_train: TrainConfig = field(default_factory=TrainConfig)  # how stage 1 is trained
    text: TextConfig = field(default_factory=TextConfig)
    model: TransformerConfig = field(default_factory=TransformerConfig)  # stage 2, trained with `train`
    clip: ClipConfig = field(default_factory=ClipConfig)  # the reranker of stage 2's samples
    clip_train: TrainConfig = field(default_factory=TrainConfig)  # how the reranker is trained

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Rebuild a config written by `to_dict` (unknown keys are an error, not ignored)."""
        cfg = cls()
        for key, value in d.items():
            if key == "preset":
                cfg.preset = str(value)
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"config section {key!r} should be a mapping, got {value!r}")
            for sub, v in value.items():
                _set(cfg, f"{key}.{sub}", v)
        return validate(cfg)



def get_config(preset: str = "toy", overrides: dict[str, object] | None = None,
               smoke: bool | None = None) -> Config:
    """Build the config for `preset`, apply the smoke caps (if on) and then `overrides`.

    Example: get_config("toy", {"train.lr": 1e-3}).train.lr -> 0.001
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = Config(preset=preset)
    for key, value in PRESETS[preset].items():
        _set(cfg, key, value)
    if smoke_mode() if smoke is None else smoke:
        for key, cap in SMOKE_CAPS.items():
            current = _get(cfg, key)
            if current > cap:
                _set(cfg, key, cap)
    for key, value in (overrides or {}).items():
        _set(cfg, resolve_key(key), value)
    validate(cfg)
    return cfg


# --- the values a run can be built from --------------------------------------------------------
# One rule per field that can be out of range: (test, what it must be). A bad value is refused
# when the config is built, naming the key as the user types it (`dvae_train.batch_size`), so no
# run dies later in a torch call that has never heard of the config.
def _at_least(n):
    return (lambda v: v >= n), f">= {n}"


_TRAIN_RULES = {
    "max_steps": _at_least(1), "batch_size": _at_least(1), "warmup_steps": _at_least(0),
    "lr": ((lambda v: v > 0), "> 0"), "min_lr": (None, "between 0 and the section's lr"),
    "weight_decay": _at_least(0), "beta1": ((lambda v: 0 <= v < 1), "in [0, 1)"),
    "beta2": ((lambda v: 0 <= v < 1), "in [0, 1)"), "grad_clip": ((lambda v: v >= 0), ">= 0 (0 = off)"),
    "eval_every": ((lambda v: v >= 0), ">= 0 (0 = never)"), "eval_batches": _at_least(1),
    "ckpt_every": ((lambda v: v >= 0), ">= 0 (0 = only at the end)"),
    "keep_last": ((lambda v: v >= 2), ">= 2, so a crash while writing the newest checkpoint still leaves a good one"),
    "log_every": _at_least(1), "seed": _at_least(0), "device": ((lambda v: bool(v.strip())), "a device name or auto"),
    "precision": ((lambda v: v in PRECISIONS), f"one of {', '.join(PRECISIONS)}"),
    "ema_decay": ((lambda v: 0 <= v < 1), "in [0, 1) (0 = off)"),
    "parallel": ((lambda v: v in PARALLEL), f"one of {', '.join(PARALLEL)}"),
    "grad_accum": _at_least(1),
    "nonfinite": ((lambda v: v in NONFINITE), f"one of {', '.join(NONFINITE)}"),
    "dist_timeout": ((lambda v: v > 0), "> 0 seconds"),
    "powersgd_rank": _at_least(0),
    "threads": ((lambda v: v >= 0), ">= 0 (0 = measure and pick)"),
    "out_dir": ((lambda v: bool(v.strip())), "a folder name"),
}
RULES: dict[str, dict[str, tuple]] = {
    "data": {"dataset": ((lambda v: v in DATASETS), f"one of {', '.join(DATASETS)}"),
             "image_size": ((lambda v: 1 <= v <= MAX_IMAGE_SIZE), f"between 1 and {MAX_IMAGE_SIZE}"),
             "seed": _at_least(0), "n_train": _at_least(1), "n_val": _at_least(1), "n_heldout": _at_least(1),
             "max_skip_rate": ((lambda v: 0 <= v <= 1), "between 0 and 1 (0 = abort on the first bad file, 1 = never)"),
             "two_objects": ((lambda v: 0 <= v <= 1), "between 0 and 1")},
    "train": _TRAIN_RULES,
    "dvae_train": _TRAIN_RULES,
    "dvae": {"quantizer": ((lambda v: v in QUANTIZERS), f"one of {', '.join(QUANTIZERS)}"),
             "likelihood": ((lambda v: v in LIKELIHOODS), f"one of {', '.join(LIKELIHOODS)}"),
             "vocab_size": _at_least(2), "hidden": ((lambda v: v >= 4 and v % 4 == 0), "a positive multiple of 4"),
             "blocks_per_group": _at_least(1), "n_groups": ((lambda v: 1 <= v <= 8), "between 1 and 8"),
             "code_dim": _at_least(1), "tau_start": ((lambda v: v > 0), "> 0"), "tau_end": ((lambda v: v > 0), "> 0"),
             "tau_steps": _at_least(0), "kl_max": _at_least(0), "kl_steps": _at_least(0),
             "schedule_scale": _at_least(0), "commitment": _at_least(0),
             "ema_decay": ((lambda v: 0 <= v < 1), "in [0, 1)"), "dead_after": _at_least(1)},
    "model": {"n_layer": _at_least(1), "n_head": _at_least(1), "head_dim": _at_least(1), "mlp_ratio": _at_least(1),
              "conv_kernel": ((lambda v: v >= 1 and v % 2 == 1), "odd and >= 1"),
              "dropout": ((lambda v: 0 <= v < 1), "in [0, 1)"), "caption_dropout": ((lambda v: 0 <= v < 1), "in [0, 1)"),
              "text_loss_weight": _at_least(0), "image_loss_weight": ((lambda v: v > 0), "> 0"),
              "attn_impl": ((lambda v: v in ATTN_IMPLS), f"one of {', '.join(ATTN_IMPLS)}")},
    "text": {"vocab_size": _at_least(256), "dropout": ((lambda v: 0 <= v < 1), "in [0, 1)"),
             "text_len": _at_least(1), "out_dir": ((lambda v: bool(v.strip())), "a folder name")},
    "clip": {"image_channels": _at_least(1), "image_downsamples": ((lambda v: 1 <= v <= 8), "between 1 and 8"),
             "image_extra_convs": _at_least(0), "text_width": _at_least(1), "text_layers": _at_least(1),
             "text_heads": _at_least(1), "embed_dim": _at_least(1),
             "temperature": ((lambda v: 0.01 <= v <= 10), "between 0.01 (the largest logit scale, 100) and 10"),
             "hard_negatives": ((lambda v: 0 <= v <= 8), "between 0 and 8"), "train_pairs": _at_least(2),
             "morph_negatives": ((lambda v: 0 <= v <= 4), "between 0 and 4"),
             "morph_jitter": ((lambda v: 0 <= v <= 1), "between 0 and 1"),
             "augment": ((lambda v: 0 <= v <= 4), "between 0 (off) and 4")},
    "clip_train": _TRAIN_RULES,
}


def validate(cfg: "Config") -> "Config":
    """Refuse any field outside its range (every section), naming the key and what it must be.

    Example: validate(get_config("toy", {"dvae_train.batch_size": 0}))
             -> ConfigError("dvae_train.batch_size=0 is invalid: it must be >= 1")
    """
    for section in RULES:
        check_section(getattr(cfg, section), section)
    if cfg.dvae.quantizer == "vq" and cfg.dvae_train.parallel != "none":
        raise ConfigError(f"dvae.quantizer=vq with dvae_train.parallel={cfg.dvae_train.parallel}: the VQ codebook "
                          "is updated from each process's own batch (an EMA and dead-code restarts), so the processes' "
                          "codebooks would drift apart; train the VQ-VAE on one process, or use dvae.quantizer=gumbel")
    if cfg.clip.text_width % cfg.clip.text_heads:
        raise ConfigError(f"clip.text_width={cfg.clip.text_width} is invalid: it must be a multiple of "
                          f"clip.text_heads={cfg.clip.text_heads}")
    return cfg


def image_grid(cfg: "Config") -> int | None:
    """Side of the dVAE's code grid for this config (None when the image size does not divide).

    Example: image_grid(get_config("toy")) -> 8   (32x32 images, downsampled x4)
    """
    factor = 2 ** (cfg.dvae.n_groups - 1)
    return cfg.data.image_size // factor if cfg.data.image_size % factor == 0 else None


def check_section(values, section: str) -> None:
    """`validate` for one section (a TrainConfig is checked under the name it has in the run config).

    Example: check_section(TrainConfig(batch_size=0), "dvae_train") -> ConfigError("dvae_train.batch_size=0 ...")
    """
    for name, (test, need) in RULES[section].items():
        value = getattr(values, name)
        ok = (0 <= value <= values.lr) if name == "min_lr" else test(value)
        if not ok:
            need = f"between 0 and {section}.lr={values.lr!r}" if name == "min_lr" else need
            raise ConfigError(f"{section}.{name}={value!r} is invalid: it must be {need}")
    if isinstance(values, TrainConfig):
        if values.parallel == "fsdp" and values.precision == "fp16":
            raise ConfigError(f"{section}.precision=fp16 needs a loss scaler whose overflow check every shard "
                              f"agrees on; with {section}.parallel=fsdp use bf16 (the default on GPU)")
        if values.powersgd_rank and (values.precision == "fp16" or values.nonfinite == "skip"):
            raise ConfigError(f"{section}.powersgd_rank={values.powersgd_rank} with "
                              f"{'precision=fp16' if values.precision == 'fp16' else 'nonfinite=skip'}: a skipped "
                              "update's inf/nan gradients would stay in PowerSGD's error-feedback memory and spoil "
                              f"every later update; use bf16 and --{section}.nonfinite=stop, or "
                              f"--{section}.powersgd_rank=0")
        if values.powersgd_rank and values.parallel != "ddp":
            raise ConfigError(f"{section}.powersgd_rank={values.powersgd_rank} is a DDP communication hook (FSDP "
                              f"reduce-scatters its gradients instead): add --{section}.parallel=ddp or set "
                              f"--{section}.powersgd_rank=0")


def parse_overrides(args: list[str]) -> dict[str, str]:
    """Turn `["--train.lr=3e-4", "--batch_size=8"]` into `{"train.lr": "3e-4", "batch_size": "8"}`.

    Values stay strings here; `get_config` converts and type-checks them per field.
    Example: ["--train.lr=3e-4"] -> {"train.lr": "3e-4"}
    """
    out: dict[str, str] = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"override {arg!r} should look like --key=value (e.g. --train.lr=3e-4)")
        key, value = arg[2:].split("=", 1)
        out[key] = value
    return out


def resolve_key(key: str) -> str:
    """Map a bare field name to its "section.field" form when exactly one section has it.

    Example: "lr" -> "train.lr"; "data.seed" -> "data.seed"
    """
    sections = {f.name: f for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory)}  # type: ignore[arg-type]
    if "." in key:
        sec, name = key.split(".", 1)
        if sec not in sections:
            raise ConfigError(f"unknown config section {sec!r} in {key!r}; sections: {', '.join(sections)}")
        names = [f.name for f in dataclasses.fields(sections[sec].default_factory)]  # type: ignore[arg-type]
        if name not in names:
            raise ConfigError(f"unknown config key {key!r}; {sec} has: {', '.join(names)}")
        return key
    hits = [f"{sec}.{key}" for sec, f in sections.items()
            if key in {g.name for g in dataclasses.fields(f.default_factory)}]  # type: ignore[arg-type]
    if not hits:
        raise ConfigError(f"unknown config key {key!r}; write it as section.key, e.g. train.lr")
    if len(hits) > 1:
        raise ConfigError(f"config key {key!r} is ambiguous ({', '.join(hits)}); write the section too")
    return hits[0]


def _get(cfg: Config, key: str):
    sec, name = key.split(".", 1)
    return getattr(getattr(cfg, sec), name)


def _set(cfg: Config, key: str, value) -> None:
    key = resolve_key(key)
    sec, name = key.split(".", 1)
    section = getattr(cfg, sec)
    hints = typing.get_type_hints(type(section))
    setattr(section, name, _coerce(key, value, hints[name]))


def _coerce(key: str, value, typ):
    """Convert `value` (often a CLI string) to the field type `typ`, or raise a ConfigError."""
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
                return value.lower() in {"1", "true", "yes", "on"}
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str):
                f = float(value.replace("_", ""))
                if not f.is_integer():
                    raise ValueError
                return int(f)
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):  # nan passes no comparison and inf breaks every schedule
                raise ValueError
            return number
        if typ is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"config key {key!r} expects {typ.__name__}"
                          f"{' (a finite number)' if typ is float else ''}, got {value!r}") from None
    raise ConfigError(f"config key {key!r} has unsupported type {typ!r}")
