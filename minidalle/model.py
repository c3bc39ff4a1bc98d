"""The DALL·E transformer: one decoder over [caption tokens ; image tokens] (docs/paper.md, Stage 2).

    layout = Layout.from_config(cfg)                      # text_len, text vocab, grid, image vocab
    ids, cut = caption_ids(tok, "a red circle.", layout)  # text_len ids: the BPE tokens, then one pad id per position
    model  = DALLE(cfg.model, layout)
    text_logits, image_logits = model(text, image)        # (B, T-1, V_text), (B, N, K)
    loss, parts = dalle_loss(model, (text, image))        # 1/8 text + 7/8 image cross-entropy

Input embedding (the paper's Fig. 10):
- text: token embedding + learned position embedding. Unused text positions hold a padding token of
  their own, id `text_vocab + position` (`caption_ids` writes them), learned like any other token,
  not masked with -inf: the paper found this better for captions unlike the training ones.
- image: token embedding + a row embedding + a column embedding, broadcast over the grid.

Position p's output predicts token p + 1 of the sequence (no start token: the caption's first
token is given, and the last caption position predicts the first image token). So the text head
scores text_len - 1 text tokens and the image head the grid**2 image tokens; each head covers only
its own vocabulary, so a text position can never emit an image code or the other way round.

Blocks are pre-LN (LayerNorm, attention, residual; LayerNorm, MLP, residual), written once in
`Block.step` for training, the sampler's cache and its compiled step alike. Block i uses the mask
kind `attention.layer_kinds(n_layer)[i]`. Weights start as GPT-2's (`DALLE.init_parameter`, the one
rule): N(0, 0.02), and the projections into the residual stream scaled by 1/sqrt(2 n_layer) so the
stream's variance does not grow with depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import MaskBank, attend, check_kernel, choose_impl, layer_kinds
from .config import Config, TransformerConfig, image_grid
from .errors import ConfigError, DataError


@dataclass(frozen=True)
class Layout:
    """The shape of the joint sequence, taken from the tokenizers' sections of the config.

    Example: Layout.from_config(get_config("toy")) -> Layout(text_len=32, text_vocab=446, grid=8, image_vocab=256)
    """

    text_len: int  # caption positions (text.text_len)
    text_vocab: int  # BPE tokens (text.vocab_size); padding ids follow them, one per position
    grid: int  # side of the image token grid (data.image_size over the dVAE's downsampling)
    image_vocab: int  # dVAE codes (dvae.vocab_size)

    @classmethod
    def from_config(cls, cfg: Config) -> "Layout":
        grid = image_grid(cfg)
        if grid is None:
            raise ConfigError(f"data.image_size={cfg.data.image_size} does not divide into the dVAE's grid "
                              f"(x{2 ** (cfg.dvae.n_groups - 1)} downsampling)")
        return cls(cfg.text.text_len, cfg.text.vocab_size, grid, cfg.dvae.vocab_size)

    @property
    def image_len(self) -> int:
        return self.grid * self.grid

    @property
    def length(self) -> int:
        return self.text_len + self.image_len

    @property
    def text_classes(self) -> int:
        """Text ids the model reads and predicts: the BPE tokens, then one padding id per position."""
        return self.text_vocab + self.text_len

    def pad_ids(self, device=None) -> torch.Tensor:
        """The all-padding caption (the "no caption" of caption dropout). Example: toy -> [446, 447, ..., 477]"""
        return self.text_vocab + torch.arange(self.text_len, device=device)


# --- pairs ---------------------------------------------------------------------------------------------
def caption_ids(tok, caption: str, layout: Layout, dropout: float = 0.0, seed: int | None = None,
                truncate: bool = False) -> tuple[list[int], bool]:
    """`layout.text_len` ids for a caption, padded with one padding id per position, and whether it was cut.

    With dropout, the BPE dropout encoding is used when it fits and the plain one otherwise (dropout
    splits words into more tokens; a caption is never cut because of it).
    Example: toy: "a red circle." -> ([ids of the 4 tokens..., 450, 451, ..., 477], False)
    """
    T = layout.text_len
    ids = tok.encode(caption, dropout=dropout, seed=seed) if dropout > 0 else []
    cut = False
    if not ids or len(ids) > T:  # the plain encoding: bpe's own refusal (or counted cut) of what does not fit
        ids, cut = tok.encode_to_length(caption, T, pad_id=-1, truncate=truncate)
        ids = [i for i in ids if i >= 0]
    return ids + [layout.text_vocab + p for p in range(len(ids), T)], cut


class Block(nn.Module):
    """Pre-LN transformer block whose attention uses one mask kind (row, column or conv).

    `step` is the block's maths, written once: LayerNorm, q/k/v, attention, projection and residual,
    then LayerNorm, MLP and residual. Only how the queries reach the keys differs between its callers,
    so each passes its own `attend(qkv) -> y`: training and the likelihood (`forward`: the whole
    sequence under the mask), the sampler's prefill and decode (`forward_cached`: through the
    key/value cache) and the compiled decode step (sampling._static_step).
    """

    def __init__(self, cfg: TransformerConfig, kind: str):
        super().__init__()
        d = cfg.n_head * cfg.head_dim
        self.kind, self.n_head = kind, cfg.n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * d, d))
        self.drop = nn.Dropout(cfg.dropout)

    def step(self, x: torch.Tensor, attend_fn) -> torch.Tensor:
        """x (B, n, C) -> (B, n, C), with attend_fn(qkv (3, B, nh, n, hd)) -> y (B, nh, n, hd).

        Written with the functional ops on the block's own weights (the same kernels the modules call):
        a toy decode step is ~40 small calls, and nn.Module's per-call overhead was a fifth of its time.
        """
        B, n, C = x.shape
        p = self.drop.p if self.training else 0.0  # dropout in training only (nn.Dropout's rule)
        h = F.layer_norm(x, (C,), self.ln1.weight, self.ln1.bias, self.ln1.eps)
        qkv = F.linear(h, self.qkv.weight, self.qkv.bias).view(B, n, 3, self.n_head, C // self.n_head)
        y = attend_fn(qkv.permute(2, 0, 3, 1, 4))  # (B, nh, n, hd)
        h = F.linear(y.transpose(1, 2).reshape(B, n, C), self.proj.weight, self.proj.bias)
        x = x + (F.dropout(h, p) if p > 0 else h)
        fc, _, out = self.mlp
        h = F.layer_norm(x, (C,), self.ln2.weight, self.ln2.bias, self.ln2.eps)
        h = F.linear(F.gelu(F.linear(h, fc.weight, fc.bias)), out.weight, out.bias)
        return x + (F.dropout(h, p) if p > 0 else h)

    def forward(self, x: torch.Tensor, bank: MaskBank, impl: str) -> torch.Tensor:
        """The whole sequence x (B, L, C) under this layer's mask (training, the likelihood)."""
        return self.step(x, lambda qkv: attend(qkv[0], qkv[1], qkv[2], self.kind, bank, impl))

    def forward_cached(self, x: torch.Tensor, kv: torch.Tensor, pos: int, keys: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
        """The block on n new positions pos..pos+n-1 (x (B, n, C)), reading and filling a key/value cache.

        Their keys and values are written into kv (2, B, nh, L, hd) at pos..pos+n-1. The queries then
        attend either to the cached positions `keys` (index tensor: the positions this layer's mask
        allows for one new position, gathered) or to every position up to pos+n-1 under `mask`
        (n, pos+n) (the prefill of the caption). Either way: the same numbers as `forward` on the
        whole prefix. For sampling only (eval mode, no dropout). See sampling.KVCache.
        """
        if self.training:
            raise ConfigError("forward_cached is for sampling: call model.eval() first (it applies no dropout)")

        def through_cache(qkv: torch.Tensor) -> torch.Tensor:
            n = qkv.shape[3]
            kv[:, :, :, pos:pos + n] = qkv[1:]
            seen = kv.index_select(3, keys) if keys is not None else kv[:, :, :, :pos + n]  # (2, B, nh, |keys|, hd)
            return F.scaled_dot_product_attention(qkv[0], seen[0], seen[1], attn_mask=mask)

        return self.step(x, through_cache)


class DALLE(nn.Module):
    """The transformer of stage 2. See the module docstring for the sequence and the embeddings."""

    def __init__(self, cfg: TransformerConfig, layout: Layout, compile_flex: bool = True):
        super().__init__()
        check_kernel(cfg.conv_kernel, layout.grid)
        self.cfg, self.layout = cfg, layout
        d = cfg.n_head * cfg.head_dim
        self.text_emb = nn.Embedding(layout.text_classes, d)
        self.text_pos = nn.Embedding(layout.text_len, d)
        self.image_emb = nn.Embedding(layout.image_vocab, d)
        self.row_emb = nn.Embedding(layout.grid, d)
        self.col_emb = nn.Embedding(layout.grid, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.kinds = layer_kinds(cfg.n_layer)
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in self.kinds)
        self.ln_f = nn.LayerNorm(d)
        self.text_head = nn.Linear(d, layout.text_classes, bias=False)
        self.image_head = nn.Linear(d, layout.image_vocab, bias=False)
        self.bank = MaskBank(layout.text_len, layout.grid, cfg.conv_kernel, compile_flex=compile_flex)
        self.attn_impl, self.attn_reason = "sdpa", "not run yet"  # what the last forward used, and why
        with torch.no_grad():
            for name, p in self.named_parameters():
                self.init_parameter(name, p)
            # The residual projections are drawn a second time, as the first version of this file did
            # (GPT-2's depth scaling applied after a plain init): their first values are overwritten,
            # but the draw keeps the random stream, so a seed still gives the model earlier runs trained.
            for name, p in self.named_parameters():
                if self._residual(name):
                    self.init_parameter(name, p)

    @staticmethod
    def _residual(name: str) -> bool:
        """The projections that write into the residual stream: each block's attention output and MLP output."""
        return name.startswith("blocks.") and name.endswith((".proj.weight", ".mlp.2.weight"))

    def init_parameter(self, name: str, t: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Fill parameter `name` (the full tensor t) by the model's one init rule, GPT-2's: weights
        N(0, 0.02), the residual projections N(0, 0.02 / sqrt(2 n_layer)), biases 0, LayerNorms 1 and 0.

        __init__ calls it on every parameter (from the global generator); distributed.materialize calls
        it for a model built on the meta device and sharded (the 12B config), from `generator`.
        Example: model.init_parameter("blocks.0.proj.weight", torch.empty(d, d), torch.Generator().manual_seed(0))
        """
        owner, _, attr = name.rpartition(".")
        if isinstance(self.get_submodule(owner), nn.LayerNorm):
            t.fill_(1.0 if attr == "weight" else 0.0)
        elif attr == "bias":
            t.zero_()
        else:
            std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if self._residual(name) else 0.02
            t.normal_(0.0, std, generator=generator)

    @classmethod
    def from_config(cls, cfg: Config, **kwargs) -> "DALLE":
        return cls(cfg.model, Layout.from_config(cfg), **kwargs)

    # --- the forward pass ----------------------------------------------------------------------------
    def check_inputs(self, text: torch.Tensor, image: torch.Tensor, values: bool | None = None) -> None:
        """Refuse ids outside each vocabulary or sequences of the wrong length, naming what is wrong.

        Shapes are checked everywhere. The ids' range is checked where they live on the CPU (values=None;
        True: on any device): there it costs nothing, while on a GPU reading min/max makes the host wait
        for the device on every forward. GPU batches come from data checked on the CPU (the code cache, `caption_ids`), and
        `sample` checks a caption before moving it; an id out of range on the GPU still fails in the
        embedding, with CUDA's device-side assert.
        """
        lay = self.layout
        if text.ndim != 2 or text.shape[1] != lay.text_len:
            raise DataError(f"text must be ids of shape (batch, {lay.text_len}); got {tuple(text.shape)}")
        if image.ndim != 2 or image.shape[1] > lay.image_len or image.shape[0] != text.shape[0]:
            raise DataError(f"image must be codes of shape ({text.shape[0]}, n) with n <= {lay.image_len}; "
                            f"got {tuple(image.shape)}")
        for name, ids, top in (("text", text, lay.text_classes), ("image", image, lay.image_vocab)):
            if (values or (values is None and ids.device.type == "cpu")) and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= top):
                raise DataError(f"{name} ids must lie in [0, {top}); got {int(ids.min())}..{int(ids.max())}")

    def embed(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """(B, T) text ids and (B, n) image codes (n <= grid**2, raster order) -> (B, T + n, C)."""
        pos = torch.arange(self.layout.text_len, device=text.device)
        x_text = self.text_emb(text) + self.text_pos(pos)  # (B, T, C)
        return self.drop(torch.cat([x_text, self.embed_image(image)], dim=1))  # (B, T + n, C)

    def embed_image(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Image codes (B, n) that sit at grid cells start..start+n-1 (raster order) -> (B, n, C)."""
        G = self.layout.grid
        cells = torch.arange(start, start + codes.shape[1], device=codes.device)
        return self.image_emb(codes) + self.row_emb(cells // G) + self.col_emb(cells % G)  # (B, n, C)

    def trunk(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Embeddings through every block and the final LayerNorm: (B, T + n, C)."""
        x = self.embed(text, image)
        impl, self.attn_reason = choose_impl(self.cfg.attn_impl, x.device, torch.is_grad_enabled(), x.shape[1])
        self.attn_impl = impl
        for block in self.blocks:
            x = block(x, self.bank, impl)
        return self.ln_f(x)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits for every token the sequence lets the model predict.

        text (B, T) ids, image (B, n) codes with 0 <= n <= grid**2 ->
        text_logits (B, T - 1, text_classes) for text[:, 1:], and
        image_logits (B, min(n + 1, N), image_vocab) for image[:, :n + 1] (the first n + 1 codes).
        """
        self.check_inputs(text, image)
        h = self.trunk(text, image)  # (B, T + n, C)
        T, N = self.layout.text_len, self.layout.image_len
        text_logits = self.text_head(h[:, : T - 1])  # (B, T - 1, V_text)
        image_logits = self.image_head(h[:, T - 1 : T - 1 + min(image.shape[1] + 1, N)])  # (B, <= N, K)
        return text_logits, image_logits

    def next_image_logits(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) of image code n given the caption and the first n codes (n < grid**2)."""
        self.check_inputs(text, image)
        if image.shape[1] >= self.layout.image_len:
            raise DataError(f"all {self.layout.image_len} image codes are given; there is no next one")
        return self.image_head(self.trunk(text, image)[:, -1])  # (B, K)

    def caption_dropout(self, text: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each caption by the all-padding caption with probability p (so the model also
        learns p(image) alone, which classifier-free guidance needs at sampling time)."""
        if p == 0:
            return text
        drop = torch.rand(text.shape[0], device=text.device, generator=generator) < p  # (B,)
        return torch.where(drop[:, None], self.layout.pad_ids(text.device)[None, :], text)


def weighted_loss(text_logits, text_targets, image_logits, image_targets,
                  text_weight: float = 0.125, image_weight: float = 0.875) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """text_weight * mean text cross-entropy + image_weight * mean image cross-entropy, and the two parts.

    Each mean is over its own tokens, so the 1/8 : 7/8 split holds however many of each there are.
    The parts are detached 0-d tensors, not floats: reading a float waits for the GPU, and the Trainer
    reads every logged number of an update in one go (`float(parts["text_loss"])` where you need one).
    Example: text CE 2.0 over 31 tokens, image CE 1.0 over 64 -> 0.125 * 2.0 + 0.875 * 1.0 = 1.125
    """
    text_ce = F.cross_entropy(text_logits.flatten(0, 1).float(), text_targets.flatten())
    image_ce = F.cross_entropy(image_logits.flatten(0, 1).float(), image_targets.flatten())
    loss = text_weight * text_ce + image_weight * image_ce
    return loss, {"text_loss": text_ce.detach(), "image_loss": image_ce.detach()}


def dalle_loss(model: DALLE, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Trainer's loss_fn: batch = (text ids (B, T), image codes (B, N)); caption dropout in training.

    All N codes go in, though the last one's output predicts nothing: the whole sequence is what
    FlexAttention's block masks and the transposed column layout are built for (1 wasted position of 1,280).
    """
    text, image = batch
    if model.training:
        text = model.caption_dropout(text, model.cfg.caption_dropout)
    text_logits, image_logits = model(text, image)
    return weighted_loss(text_logits, text[:, 1:], image_logits, image,
                         model.cfg.text_loss_weight, model.cfg.image_loss_weight)


def flops_per_token(cfg: TransformerConfig, layout: Layout, density: float | None = None) -> dict:
    """Training FLOPs per token by nanoGPT's estimate: 6 N (weights, forward and backward) plus
    12 n_layer d L for attention's scores and weighted sum, here scaled by the masks' density
    (the fraction of the L x L pairs each query may attend to; dense causal would be ~1/2).

    Example: flops_per_token(paper cfg, paper layout)["total"] -> ~7.4e10
    """
    from .attention import build_mask

    d, L = cfg.n_head * cfg.head_dim, layout.length
    n_weights = cfg.n_layer * (4 * d * d + 2 * cfg.mlp_ratio * d * d) + d * (layout.text_classes + layout.image_vocab)
    if density is None:
        kinds = layer_kinds(cfg.n_layer)
        per_kind = {k: float(build_mask(k, layout.text_len, layout.grid, cfg.conv_kernel).float().mean())
                    for k in set(kinds)}
        density = sum(per_kind[k] for k in kinds) / len(kinds)
    attention = 12 * cfg.n_layer * d * L * density
    return {"weights": 6 * n_weights, "attention": attention, "total": 6 * n_weights + attention,
            "mask_density": density}
