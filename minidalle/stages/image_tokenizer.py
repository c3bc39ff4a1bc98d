"""Stage 1 end to end: train the dVAE on a dataset, encode a dataset to codes once, reload it, read its reconstructions.

    model, trainer = train_dvae(get_config("toy"))           # the Trainer + the paper's schedules
    codes = encode_dataset(model, dataset, n, cache_dir)      # (n, h, w) ints, cached on disk
    report = reconstruction_report(model, "val", 32, n=500)   # the judge on reconstructions (bench/dvae.py: `bench dvae`)

The transformer (stage 2) never sees pixels: it reads the cached codes, so images are encoded once
per (dataset, tokenizer checkpoint). The cache key includes the checkpoint's weight checksum, so a
retrained tokenizer can never be paired with stale codes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..infra import checkpoint as ckpt
from ..config import Config
from ..data import TWO_OBJECTS, ShapesWorld, build_dataset, eval_split
from ..dvae import DVAE, dvae_loss_fn, schedule_callback
from ..errors import DataError
from ..losses import to_unit
from ..quantize import perplexity
from ..train import Trainer
from ..infra.devices import pick_device, seed_everything
from ..viz import to_uint8


def image_batches(dataset, batch_size: int, train: bool = True):
    """What the Trainer should read: `batch_at(i)` for ShapesWorld (exact resume), else a
    DataLoader whose batches are uint8 image stacks (B, H, W, 3).

    A map-style dataset that does not shuffle itself (the emoji, sorted by caption) is shuffled by
    the DataLoader when training (the Trainer seeds each epoch, so a resume stays exact). For
    evaluation (train=False) the order is kept and the last, smaller batch too.
    Example: image_batches(ShapesWorld("train", 16), 4)(0) -> uint8 (4, 16, 16, 3)
    """
    if isinstance(dataset, ShapesWorld):
        return lambda i: dataset.batch(i * batch_size, batch_size)[0]
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, drop_last=train,
                                       shuffle=train and needs_shuffle(dataset),
                                       collate_fn=lambda items: torch.stack([im for im, _ in items]))


def needs_shuffle(dataset) -> bool:
    """True for a map-style dataset with no order of its own per epoch (no `set_epoch`), e.g. EmojiDataset.

    Example: needs_shuffle(EmojiDataset(16)) -> True; needs_shuffle(FolderDataset(...)) -> False
    """
    return hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and not hasattr(dataset, "set_epoch")


def train_dvae(cfg: Config, resume: bool | str = False, progress: bool = True,
               start_over: bool = False, out_flag: str | None = None,
               trust_sharded: bool = False, log: Callable[[str], None] = print) -> tuple[DVAE, Trainer]:
    """Train stage 1 with `cfg.dvae` and `cfg.dvae_train`; checkpoints go to cfg.dvae_train.out_dir.
    trust_sharded: a run that is not fsdp may resume a sharded checkpoint (Trainer.fit). log: gets the
    line saying how many CPU threads it trains on.

    The Gumbel temperature and KL weight follow the paper's cosine schedules (quantize.py), set
    before every update by `schedule_callback`. Example: train_dvae(get_config("smoke")) -> (DVAE, Trainer)
    """
    tc = cfg.dvae_train
    seed_everything(tc.seed)
    model = DVAE(cfg.dvae)
    model.grid_size(cfg.data.image_size)  # a size the encoder cannot divide is refused before any data is read
    if pick_device(tc.device, "dvae_train.device").type in ("cpu", "cuda") and tc.parallel != "fsdp":  # fsdp: contiguous only
        # Channels-last weights let oneDNN skip layout reorders around every conv, and nearest
        # upsampling of channels-last maps is ~10x faster on CPU: a toy update costs ~13% less
        # (measured interleaved, 2 cores). On CUDA, cuDNN's tensor-core convolutions work in this
        # layout (NHWC) too, so it saves the transposes around each of them. Checkpoints are
        # unaffected (saved contiguous).
        model = model.to(memory_format=torch.channels_last)
    train = image_batches(build_dataset(cfg.data, "train"), tc.batch_size)
    split = eval_split(cfg.data)  # ShapesWorld's val, the held-out emoji; none for folders and shards
    val = image_batches(build_dataset(cfg.data, split), tc.batch_size, train=False) if split else None
    trainer = Trainer(model, tc, train, dvae_loss_fn, eval_data=val, config=cfg, progress=progress, out_flag=out_flag, section="dvae_train",
                      log=log)
    callback = schedule_callback(cfg.dvae)
    trainer.add_callback("on_fit_start", callback)
    trainer.add_callback("on_step_end", callback)
    trainer.fit(resume=resume, start_over=start_over, trust_sharded=trust_sharded)
    return model, trainer


def load_dvae(path: str | os.PathLike, trust_sharded: bool = False) -> tuple[DVAE, Config]:
    """Rebuild a trained tokenizer from a checkpoint folder (weights verified, no pickle; a sharded
    checkpoint only with trust_sharded=True, see checkpoint.sharded_refusal)."""
    kind = ckpt.stage_of(ckpt.read_config(path))
    if kind != "dvae":
        raise ckpt.wrong_stage(path, kind, "dvae")
    loaded = ckpt.read_checkpoint(path, trust_sharded=trust_sharded)
    cfg = Config.from_dict(loaded.config)
    model = DVAE(cfg.dvae)
    ckpt.apply_weights(model, loaded.tensors, Path(path) / ckpt.MODEL_FILE)
    return model.eval(), cfg


def tokenizer_id(checkpoint: str | os.PathLike) -> str:
    """The checksum of a checkpoint's weights, from its manifest: names the tokenizer in cache keys."""
    return ckpt.weights_id(checkpoint)


def dataset_id(dataset) -> dict:
    """What identifies a dataset's images for the code cache."""
    if isinstance(dataset, ShapesWorld):
        ident = {"dataset": "shapes", "split": dataset.split, "seed": dataset.seed, "image_size": dataset.image_size}
        if dataset.two_objects != TWO_OBJECTS:  # another stream of scenes (keys made before it stay valid)
            ident["two_objects"] = dataset.two_objects
        return ident
    ident = {"dataset": type(dataset).__name__, "source": str(getattr(dataset, "root", getattr(dataset, "shards", ""))),
             "image_size": getattr(dataset, "image_size", None)}
    if getattr(dataset, "split", None) is not None:  # the emoji: train and heldout are other images
        ident["split"] = dataset.split
    return ident


def encode_dataset(model: DVAE, dataset, n: int, cache_dir: str | os.PathLike, tokenizer: str,
                   batch_size: int = 256, progress: bool = True, with_captions: bool = False):
    """Codes (n, h, w) of the first n images of `dataset`, read from or written to `cache_dir`.

    The file `codes-<key>.safetensors` is keyed by (dataset identity, n, tokenizer id); it is written
    atomically, so an interrupted encode leaves no half file. Codes are stored as int16 when K fits.
    The captions read beside the images are kept in the file too: with_captions=True returns
    (codes, captions), so a dataset read in a shuffled order still pairs each image with its caption.
    Example: encode_dataset(model, ShapesWorld("train", 32), 1000, "runs/cache", tokenizer_id(ckpt))
             -> long (1000, 8, 8)
    """
    ident = {**dataset_id(dataset), "n": n, "tokenizer": tokenizer}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"codes-{key}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                codes, meta = f.get_tensor("codes").long(), f.metadata() or {}
            captions = json.loads(meta["captions"]) if "captions" in meta else None
            if not with_captions:
                return codes
            if isinstance(captions, list) and len(captions) == len(codes):
                return codes, captions
        except Exception as e:  # noqa: BLE001 -- a damaged cache is rebuilt, never trusted
            warnings.warn(f"code cache {path} is unreadable ({e}); encoding again", stacklevel=2)
    device = next(model.parameters()).device
    chunks, captions, done = [], [], 0
    items = iter(dataset.stream() if isinstance(dataset, ShapesWorld) else dataset)
    with tqdm(total=n, desc="encoding", disable=not progress) as bar:
        while done < n:
            # range first: zip stops on it without drawing (and losing) one more item
            batch = [item for _, item in zip(range(min(batch_size, n - done)), items)]
            if not batch:
                raise DataError(f"the dataset ran out after {done} images; asked to encode n={n}")
            chunks.append(model.encode(torch.stack([im for im, _ in batch]).to(device)).cpu())  # (b, h, w)
            captions.extend(str(text) for _, text in batch)
            done += len(batch)
            bar.update(len(batch))
    codes = torch.cat(chunks)  # (n, h, w)
    dtype = torch.int16 if model.cfg.vocab_size <= 2**15 else torch.int32
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file({"codes": codes.to(dtype)}, str(tmp),
              metadata={"id": json.dumps(ident, sort_keys=True), "captions": json.dumps(captions)})
    os.replace(tmp, path)
    return (codes, captions) if with_captions else codes


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]. Example: psnr(x, x + 0.1) -> 20.0"""
    mse = torch.mean((x.float() - y.float()) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def object_cells(images: torch.Tensor, grid: int) -> torch.Tensor:
    """Which cells of a grid x grid code grid hold any non-black pixel: uint8 (n, H, W, 3) -> bool (n, grid, grid).

    Example: a 32x32 image black but for pixel (5, 9), grid 8 -> True only at cell (1, 2)
    """
    n, H, W, _ = images.shape
    if H % grid or W % grid:
        raise DataError(f"images of {H}x{W} pixels do not split into a {grid}x{grid} grid of cells")
    lit = images.amax(dim=-1) > 0  # (n, H, W) object pixels
    return lit.reshape(n, grid, H // grid, grid, W // grid).any(dim=4).any(dim=2)  # (n, grid, grid)


def reconstruction_report(model: DVAE, split: str, image_size: int, n: int, seed: int = 0) -> dict:
    """Judge accuracy on n originals and on their reconstructions, per attribute, plus PSNR and the
    code perplexity over those images, over all cells and over the cells that hold part of an object.
    Example: -> {"original": {...}, "reconstruction": {...}, "psnr": 24.1, "perplexity": 21.0, ...}"""
    from ..judge import evaluate

    ds = ShapesWorld(split, image_size, seed, n)
    images, captions = ds.batch(0, n)  # uint8 (n, H, W, 3)
    device = next(model.parameters()).device
    codes = model.encode(images.to(device))  # (n, h, w)
    recon = model.decode(codes).cpu()  # (n, 3, H, W) in [0, 1]
    original = evaluate(list(images), captions)
    rebuilt = evaluate(list(to_uint8(recon)), captions)
    codes = codes.cpu()
    counts = torch.bincount(codes.flatten(), minlength=model.cfg.vocab_size)
    # ShapesWorld's background is exactly black, and most cells are only background: their codes
    # say little about the codebook. Also measure over the cells holding any object pixel.
    lit_cells = object_cells(images, codes.shape[-1])  # (n, h, w)
    object_counts = torch.bincount(codes[lit_cells], minlength=model.cfg.vocab_size)
    return {"original": original, "reconstruction": rebuilt,
            "ratio": rebuilt["overall"] / max(original["overall"], 1e-9),
            "psnr": psnr(recon, to_unit(images)),
            "perplexity": float(perplexity(counts)), "codes_used": int((counts > 0).sum()),
            "object_cells": float(lit_cells.float().mean()),
            "perplexity_objects": float(perplexity(object_counts))}


