"""The reranker's model: a contrastive image-text model (CLIP, Radford et al. 2021), its loss, and ranking with it.

DALL·E draws many samples per caption and keeps the ones a contrastive model ranks highest (Ramesh et
al. 2021, section 2.6; docs/paper.md). The paper used OpenAI's CLIP; here a small one is trained on the
same pairs the transformer reads, with the same BPE ids:

    model = CLIP(cfg.clip, image_size, text_vocab, text_len)   # (stages/reranker.py trains and loads one)
    loss, parts = clip_loss(model, (images, ids))               # the symmetric InfoNCE loss of one batch
    scores = rerank(model, tok, [prompt] * 16, images)         # cosine similarity of each image to its prompt
    best = images[scores.argmax()]
    recall_at_k(model, tok, images, captions)                  # {"i2t@1": .., "i2t@5": .., "t2i@1": .., ...}

The model: a small CNN over pixels (with two coordinate channels, and a flattened final map, so where
things are survives) and a small bidirectional transformer over the caption's real BPE tokens (the
per-position pad ids are read but masked out), each projected to a unit vector; a learned logit scale
(log-parameterised, at most 100, as CLIP) turns cosine similarities into logits for a symmetric InfoNCE
loss: each image must pick its caption among the batch's captions, and each caption its image.

What it is trained on (scenes with one fact changed, shapes between two shapes, augmentation), its training,
loading and measured figures: stages/reranker.py.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .bpe import Tokenizer
from .config import ClipConfig, Config
from .errors import ConfigError, DataError
from .model import Layout

MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(log_scale) here, so the softmax never gets sharper than T = 0.01


# --- the model -------------------------------------------------------------------------------------------
class ImageEncoder(nn.Module):
    """Pixels -> a vector: stride-2 convs over the image and two coordinate channels, then an MLP over
    the flattened final map (not a global pool, which would forget where each thing is)."""

    def __init__(self, cfg: ClipConfig, image_size: int):
        super().__init__()
        factor = 2 ** cfg.image_downsamples
        if image_size % factor or image_size // factor < 1:
            raise ConfigError(f"clip.image_downsamples={cfg.image_downsamples} is invalid for {image_size}x"
                              f"{image_size} images: the side must divide by 2**{cfg.image_downsamples} = {factor}")
        layers, ch = [], 5  # RGB + the x and y coordinate of each pixel
        for k in range(cfg.image_downsamples):
            out = cfg.image_channels * 2 ** k
            layers += [nn.Conv2d(ch, out, 3, stride=2, padding=1), nn.GELU()]
            for _ in range(cfg.image_extra_convs if k else 0):
                layers += [nn.Conv2d(out, out, 3, padding=1), nn.GELU()]
            ch = out
        self.convs = nn.Sequential(*layers)
        side = image_size // factor
        self.head = nn.Sequential(nn.Flatten(), nn.LayerNorm(ch * side * side), nn.Linear(ch * side * side, 2 * cfg.embed_dim),
                                  nn.GELU(), nn.Linear(2 * cfg.embed_dim, cfg.embed_dim))
        ramp = torch.linspace(-1, 1, image_size)
        yy, xx = torch.meshgrid(ramp, ramp, indexing="ij")
        self.register_buffer("coords", torch.stack([xx, yy])[None], persistent=False)  # (1, 2, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([2 * x - 1, self.coords.expand(len(x), -1, -1, -1)], dim=1)  # (B, 5, H, W) in [-1, 1]
        return self.head(self.convs(x))  # (B, E)


class TextBlock(nn.Module):
    """Pre-LN transformer block with bidirectional attention over the real tokens only."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3x (B, h, L, d)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # (B, h, L, d); pads unseen
        x = x + self.out(y.transpose(1, 2).reshape(B, L, C))
        return x + self.mlp(self.ln2(x))


class TextEncoder(nn.Module):
    """Caption ids as the transformer reads them (text_len ids, pads one id per position) -> a vector:
    the mean of the real tokens' outputs."""

    def __init__(self, cfg: ClipConfig, text_vocab: int, text_len: int):
        super().__init__()
        self.text_vocab, self.text_len = text_vocab, text_len
        self.tok = nn.Embedding(text_vocab + text_len, cfg.text_width)  # the transformer's text classes
        self.pos = nn.Parameter(torch.randn(text_len, cfg.text_width) * 0.02)
        # Both at the same scale: with torch's default N(0, 1) token vectors the positions were drowned, the
        # encoder read a bag of words, and "a red circle above a blue square" meant "a blue circle above a red
        # square" to it (one-fact accuracy on relations and swapped colours stayed at chance).
        nn.init.normal_(self.tok.weight, std=0.02)
        self.blocks = nn.ModuleList(TextBlock(cfg.text_width, cfg.text_heads) for _ in range(cfg.text_layers))
        self.ln = nn.LayerNorm(cfg.text_width)
        self.proj = nn.Linear(cfg.text_width, cfg.embed_dim)

    def forward(self, ids: torch.Tensor, trim: bool | None = None) -> torch.Tensor:
        """ids (B, T) -> (B, E). trim: drop the trailing columns that are padding in every caption (they
        change nothing); default on the CPU only, since finding them on a GPU makes the host wait for it."""
        real = ids < self.text_vocab  # (B, T) BPE tokens; the rest are pads
        real[:, 0] |= ~real.any(dim=1)  # an empty caption reads its first pad, so attention has a key
        if ids.device.type == "cpu" if trim is None else trim:
            L = int(real.any(dim=0).nonzero().max()) + 1
            ids, real = ids[:, :L], real[:, :L]
        L = ids.shape[1]
        x = self.tok(ids) + self.pos[:L]  # (B, L, C)
        for block in self.blocks:
            x = block(x, real)
        w = real.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        return self.proj((self.ln(x) * w).sum(1) / w.sum(1))  # (B, E)


class CLIP(nn.Module):
    """Image and caption encoders onto one unit sphere, and the learned logit scale.

    Example: CLIP(get_config("toy").clip, 32, 446, 32)(images (8, 3, 32, 32), ids (8, 32)) -> logits (8, 8)
    """

    def __init__(self, cfg: ClipConfig, image_size: int, text_vocab: int, text_len: int):
        super().__init__()
        self.cfg, self.image_size, self.text_vocab, self.text_len = cfg, image_size, text_vocab, text_len
        self.image = ImageEncoder(cfg, image_size)
        self.text = TextEncoder(cfg, text_vocab, text_len)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.temperature)))  # a 0-d tensor: no weight decay

    @classmethod
    def from_config(cls, cfg: Config) -> "CLIP":
        return cls(cfg.clip, cfg.data.image_size, cfg.text.vocab_size, cfg.text.text_len)

    @property
    def layout(self) -> Layout:
        """The text half of the transformer's layout, for `caption_ids` (the grid is unused here)."""
        return Layout(self.text_len, self.text_vocab, grid=1, image_vocab=1)

    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """float (B, 3, H, W) in [0, 1] -> unit vectors (B, E)."""
        if images.ndim != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise DataError(f"the reranker reads float images (B, 3, {self.image_size}, {self.image_size}); "
                            f"got {tuple(images.shape)}")
        return F.normalize(self.image(images), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """caption ids (B, text_len), as `caption_ids` writes them -> unit vectors (B, E)."""
        if ids.ndim != 2 or ids.shape[1] != self.text_len or ids.dtype != torch.long:
            raise DataError(f"the reranker reads caption ids as long (B, {self.text_len}); got {ids.dtype} "
                            f"{tuple(ids.shape)}")
        # the range is read where it is free, on the CPU (on a GPU the read waits for the device; training
        # batches come from caption_ids, and an id out of range still fails in the embedding there)
        if ids.device.type == "cpu" and len(ids) and (ids.min() < 0 or ids.max() >= self.text_vocab + self.text_len):
            raise DataError(f"caption ids must lie in [0, {self.text_vocab + self.text_len}): the BPE's "
                            f"{self.text_vocab} tokens, then one pad id per position")
        return F.normalize(self.text(ids), dim=-1)

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits (Ni, Nt): the scaled cosine similarity of every image with every caption."""
        return self.logit_scale() * self.encode_image(images) @ self.encode_text(ids).T


def clip_loss(model: CLIP, batch) -> tuple[torch.Tensor, dict]:
    """Symmetric InfoNCE for the Trainer. batch = (images float (Ni, 3, H, W), ids long (P, T)): image j
    and caption j are a pair for j < P; images past P are competitors for the captions only.

    loss = (CE over captions for each paired image + CE over all images for each caption) / 2.
    Example: clip_loss(model, (images (24, 3, 32, 32), ids (20, 32))) -> (tensor(2.3), {"i2t": 2.1, ...})
    """
    images, ids = batch
    P = len(ids)
    if P < 1 or len(images) < P:
        raise DataError(f"a reranker batch needs at least one pair and an image for every caption; got "
                        f"{len(images)} images and {P} captions")
    logits = model(images, ids).float()  # (Ni, P)
    target = torch.arange(P, device=logits.device)
    i2t = F.cross_entropy(logits[:P], target)  # each paired image picks its caption
    t2i = F.cross_entropy(logits.T, target)  # each caption picks its image among all of them
    with torch.no_grad():
        acc = ((logits[:P].argmax(1) == target).float().mean() + (logits.argmax(0) == target).float().mean()) / 2
        # detached 0-d tensors: the Trainer reads them with the loss in one host sync
        parts = {"i2t": i2t.detach(), "t2i": t2i.detach(), "acc": acc, "scale": model.logit_scale().detach()}
    return (i2t + t2i) / 2, parts


# --- using it --------------------------------------------------------------------------------------------

# --- pairs for the Trainer -------------------------------------------------------------------------------
def to_float_images(images, image_size: int | None = None) -> torch.Tensor:
    """Images as the judge takes them (uint8 (n, H, W, 3), numpy or torch, or a list of single images) or
    float (n, 3, H, W) in [0, 1] -> float (n, 3, H, W) in [0, 1]. A wrong size or layout is a DataError.

    Example: to_float_images(np.zeros((4, 32, 32, 3), np.uint8)) -> zeros (4, 3, 32, 32)
    """
    from .viz import as_uint8_hwc

    if isinstance(images, (list, tuple)):
        if not images:
            raise DataError("no images given")
        images = torch.from_numpy(np.stack([as_uint8_hwc(im) for im in images]))
    x = torch.as_tensor(images) if not isinstance(images, torch.Tensor) else images.detach()
    if x.ndim != 4 or 3 not in (x.shape[1], x.shape[-1]):
        raise DataError(f"expected a batch of RGB images, (n, H, W, 3) uint8 or (n, 3, H, W) float; got shape "
                        f"{tuple(x.shape)}")
    if x.shape[-1] == 3 and (x.shape[1] != 3 or x.dtype == torch.uint8):  # uint8 is channels-last, as the judge's
        x = x.permute(0, 3, 1, 2)  # (n, H, W, 3) -> (n, 3, H, W)
    if x.dtype == torch.uint8:
        x = x.float() / 255
    elif not x.is_floating_point():
        raise DataError(f"images must be uint8 (0..255) or float (0..1); got {x.dtype}")
    else:
        x = x.float()
        if len(x) and (x.min() < 0 or x.max() > 1):
            raise DataError(f"float images must lie in [0, 1] (got {x.min().item():.3g}..{x.max().item():.3g}); "
                            "pass uint8 for 0..255")
    if image_size is not None and x.shape[-2:] != (image_size, image_size):
        raise DataError(f"the reranker was trained on {image_size}x{image_size} images; got "
                        f"{x.shape[-2]}x{x.shape[-1]}")
    return x.contiguous()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _prompts(prompts) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise DataError(f"prompts must be a list of strings; got {type(prompts).__name__}")
    if not prompts:
        raise DataError("no prompts given: rerank and embed_texts need at least one")
    for k, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise DataError(f"prompt {k} is {p!r}: each prompt must be a non-empty string")
    return list(prompts)


@torch.no_grad()
def embed_texts(model: CLIP, tok: Tokenizer, prompts: list[str], batch_size: int = 256,
                truncate: bool = False) -> torch.Tensor:
    """Unit vectors (n, E) of captions, on the CPU. A caption longer than text.text_len tokens is a DataError,
    or (truncate=True) cut to that length, as the transformer's prompts are with `--truncate`.

    Example: embed_texts(model, tok, ["a red circle", "a blue square"]) -> (2, 128)
    """
    from .model import caption_ids

    prompts = _prompts(prompts)
    ids = torch.tensor([caption_ids(tok, p, model.layout, truncate=truncate)[0] for p in prompts], dtype=torch.long)
    return _in_batches(model, model.encode_text, ids, batch_size)


@torch.no_grad()
def embed_images(model: CLIP, images, batch_size: int = 256) -> torch.Tensor:
    """Unit vectors (n, E) of images (uint8 (n, H, W, 3) or float (n, 3, H, W), see to_float_images), on the CPU."""
    x = to_float_images(images, model.image_size)
    if len(x) == 0:
        raise DataError("no images given")
    return _in_batches(model, model.encode_image, x, batch_size)


def _in_batches(model: CLIP, encode, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """encode(x) batch by batch on the model's device, in eval mode (then the mode is put back); on the CPU."""
    was = model.training
    model.eval()
    try:
        return torch.cat([encode(x[s:s + batch_size].to(_device(model))).float().cpu()
                          for s in range(0, len(x), batch_size)])
    finally:
        model.train(was)


def rerank(model: CLIP, tok: Tokenizer, prompts: list[str], images, batch_size: int = 256,
           truncate: bool = False) -> torch.Tensor:
    """Scores (n,): the cosine similarity of image i to prompt i (higher = a better match), on the CPU.

    images: uint8 (n, H, W, 3) (numpy or torch, or a list of images) as the judge takes them, or float
    (n, 3, H, W) in [0, 1]. To keep the best of N samples of one prompt:
    `images[rerank(model, tok, [prompt] * N, images).argmax()]`. Each distinct prompt is encoded once;
    truncate: as in embed_texts. Example: rerank(model, tok, ["a red circle"] * 16, samples) -> (16,)
    """
    prompts = _prompts(prompts)
    if len(images) != len(prompts):
        raise DataError(f"rerank needs one prompt per image: got {len(prompts)} prompts and {len(images)} images")
    unique = list(dict.fromkeys(prompts))
    text = embed_texts(model, tok, unique, batch_size, truncate)  # (u, E)
    row = {p: i for i, p in enumerate(unique)}
    where = torch.tensor([row[p] for p in prompts], dtype=torch.long)
    return (embed_images(model, images, batch_size) * text[where]).sum(-1)  # (n,)


# --- measuring -------------------------------------------------------------------------------------------
def recall_at_k(model: CLIP, tok: Tokenizer, images, captions: list[str], ks=(1, 5), truncate: bool = False) -> dict:
    """Retrieval among n pairs: "i2t@k", the fraction of images whose own caption is among the k captions
    they score highest, and "t2i@k", the same for captions finding their image. A caption that fits two
    images (ShapesWorld repeats itself) still counts only its own, so 1.0 is not always reachable.
    truncate: as in embed_texts (a caption longer than text.text_len is cut, not refused).

    Example: recall_at_k(model, tok, images (512, 32, 32, 3), captions) -> {"i2t@1": 0.4, "i2t@5": 0.8, ..., "n": 512}
    """
    captions = _prompts(captions)
    if len(images) != len(captions):
        raise DataError(f"recall_at_k needs one caption per image: got {len(captions)} captions and {len(images)} images")
    sims = embed_images(model, images) @ embed_texts(model, tok, captions, truncate=truncate).T  # (n, n)
    n = len(captions)
    own = sims.diagonal()
    rank_i2t = (sims > own[:, None]).sum(1)  # captions that beat each image's own
    rank_t2i = (sims > own[None, :]).sum(0)  # images that beat each caption's own
    out = {}
    for k in ks:
        out[f"i2t@{k}"] = float((rank_i2t < k).float().mean())
        out[f"t2i@{k}"] = float((rank_t2i < k).float().mean())
    return {**out, "n": n}


