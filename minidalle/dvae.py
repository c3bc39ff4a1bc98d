"""Stage 1, the image tokenizer: the discrete VAE's encoder, decoder and the model that joins them.

Follows DALL·E (Ramesh et al., 2021), Appendix A ("Details for Discrete VAE"): A.1 the architecture,
A.2 the training objective, A.3 the logit-Laplace likelihood (numbers in docs/paper.md, Stage 1),
and the shapes of OpenAI's released dVAE (openai/DALL-E, `encoder.py` / `decoder.py`):

    image (B, 3, H, W) --Encoder--> logits (B, K, h, w) --GumbelQuantizer--> relaxed one-hot (B, K, h, w)
                                                          --Decoder--> (mu, ln b) (B, 6, H, W)

with h = H / 2**(n_groups-1). There is no codebook tensor in the paper's dVAE: the decoder's first
1x1 conv over the (relaxed) one-hot *is* the codebook. Swap `cfg.quantizer` to "vq" and the same
encoder emits code_dim channels, a VectorQuantizer snaps them to its codebook, and the decoder reads
code_dim channels instead of K: one config value, one code path.

The loss is the paper's normalisation: everything is divided by the number of pixel-channels, so
    total = recon (mean NLL per pixel-channel) + q_loss / (3 * H * W)
where q_loss is the quantizer's per-image loss (beta * KL for Gumbel, commitment for VQ).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
import torch.nn as nn

from . import losses
from .config import LIKELIHOODS, QUANTIZERS, DVAEConfig, get_config
from .errors import ConfigError
from .quantize import make_quantizer, nearest_code, scalar_stats

# QUANTIZERS ("gumbel", "vq") and LIKELIHOODS ("logit_laplace", "logit_laplace_binned", "mse") are
# the config's choices (config.py says what each is); imported here so dvae.QUANTIZERS still reads.
# The released dVAE's sizes as published (about 54M encoder, 44M decoder parameters). Our `paper`
# preset counts 53,786,240 and 43,829,766, which is also what counting the layers of the released
# encoder.py / decoder.py gives; the rounded published figures are what we check against.
RELEASED_PARAMS = {"encoder": 54_000_000, "decoder": 44_000_000}


def _check_cfg(cfg: DVAEConfig) -> None:
    """Refuse a config the model cannot be built from, naming the field and the choices."""
    if cfg.quantizer not in QUANTIZERS:
        raise ConfigError(f"dvae.quantizer={cfg.quantizer!r} is unknown; choose one of {', '.join(QUANTIZERS)}")
    if cfg.likelihood not in LIKELIHOODS:
        raise ConfigError(f"dvae.likelihood={cfg.likelihood!r} is unknown; choose one of {', '.join(LIKELIHOODS)}")
    for name in ("vocab_size", "hidden", "blocks_per_group", "n_groups", "code_dim"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"dvae.{name}={getattr(cfg, name)} must be at least 1")
    if cfg.hidden % 4:
        raise ConfigError(f"dvae.hidden={cfg.hidden} must be a multiple of 4 (bottlenecks use hidden/4 channels)")


def downsample_factor(cfg: DVAEConfig) -> int:
    """Pixels per code along each side. Example: n_groups=4 -> 8 (256x256 -> 32x32)"""
    return 2 ** (cfg.n_groups - 1)


def grid_size(image_size: int, cfg: DVAEConfig) -> int:
    """Side of the code grid for square images of side `image_size`.

    Example: grid_size(256, paper cfg) -> 32; grid_size(32, toy cfg) -> 8; grid_size(30, toy) -> ConfigError
    """
    f = downsample_factor(cfg)
    if image_size < f or image_size % f:
        raise ConfigError(f"image size {image_size} is not divisible by the dVAE's downsampling factor {f} "
                          f"(2**(n_groups-1) with n_groups={cfg.n_groups}); use a multiple of {f}")
    return image_size // f


class Bottleneck(nn.Module):
    """x + post_gain * res(x): ReLU-conv four times, through n_out/4 channels (Appendix A.1).

    The residual branch is scaled by 1/n_layers**2, so at init every block is close to the identity
    and a deep stack starts out as a shallow one (the paper's stated reason for this gain).
    `kernels` follows the released code: (3, 3, 3, 1) in the encoder, (1, 3, 3, 3) in the decoder.
    Example: Bottleneck(64, 128, n_layers=8)(x (B, 64, 8, 8)) -> (B, 128, 8, 8)
    """

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, ...] = (3, 3, 3, 1)):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1.0 / n_layers ** 2
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        chans = [n_in, n_hid, n_hid, n_hid, n_out]
        layers = []
        for i, k in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", nn.Conv2d(chans[i], chans[i + 1], k, padding=k // 2))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)  # (B, n_out, H, W)


def _groups(widths: list[int], n_in: int, cfg: DVAEConfig, kernels, between: Callable[[], nn.Module]) -> nn.Sequential:
    """One nn.Sequential per resolution: blocks_per_group bottlenecks, then `between()` except after the last."""
    n_layers = cfg.n_groups * cfg.blocks_per_group
    groups = []
    for g, width in enumerate(widths):
        blocks = []
        for b in range(cfg.blocks_per_group):
            blocks.append((f"block_{b + 1}", Bottleneck(n_in, width, n_layers, kernels)))
            n_in = width
        if g < len(widths) - 1:
            blocks.append(("resample", between()))
        groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(blocks))))
    return nn.Sequential(OrderedDict(groups))


class Encoder(nn.Module):
    """7x7 conv, groups of widths hidden*(1, 2, 4, 8, ...) with max-pool x2 between, ReLU, 1x1 conv.

    Example: Encoder(toy cfg, out_channels=512)(x (B, 3, 32, 32)) -> logits (B, 512, 8, 8)
    """

    def __init__(self, cfg: DVAEConfig, out_channels: int):
        super().__init__()
        _check_cfg(cfg)
        widths = [cfg.hidden * 2 ** g for g in range(cfg.n_groups)]
        self.input = nn.Conv2d(3, widths[0], 7, padding=3)
        self.groups = _groups(widths, widths[0], cfg, (3, 3, 3, 1), lambda: nn.MaxPool2d(2))
        self.output = nn.Sequential(nn.ReLU(), nn.Conv2d(widths[-1], out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ConfigError(f"Encoder expects images (B, 3, H, W), got shape {tuple(x.shape)}")
        h = self.input(x)  # (B, hidden, H, W)
        h = self.groups(h)  # (B, hidden * 2**(n_groups-1), h, w)
        return self.output(h)  # (B, out_channels, h, w)


class Decoder(nn.Module):
    """1x1 conv (the codebook, for Gumbel), groups of widths hidden*(..., 4, 2, 1) with nearest x2
    upsampling between, ReLU, 1x1 conv to 6 maps (mu, ln b) for logit-Laplace or 3 for MSE.

    `n_init` is the width after the first conv; the released decoder uses 128 with hidden 256, so the
    default is hidden // 2 (it sets the size of the implicit codebook: K x n_init weights).
    Example: Decoder(toy cfg, in_channels=512)(z (B, 512, 8, 8)) -> (B, 6, 32, 32)
    """

    def __init__(self, cfg: DVAEConfig, in_channels: int, n_init: int | None = None):
        super().__init__()
        _check_cfg(cfg)
        self.in_channels = in_channels
        n_init = cfg.hidden // 2 if n_init is None else n_init
        widths = [cfg.hidden * 2 ** g for g in reversed(range(cfg.n_groups))]
        self.input = nn.Conv2d(in_channels, n_init, 1)
        self.groups = _groups(widths, n_init, cfg, (1, 3, 3, 3), lambda: nn.Upsample(scale_factor=2, mode="nearest"))
        out = 3 if cfg.likelihood == "mse" else 6
        self.output = nn.Sequential(nn.ReLU(), nn.Conv2d(widths[-1], out, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.in_channels:
            raise ConfigError(f"Decoder expects (B, {self.in_channels}, h, w), got shape {tuple(z.shape)}")
        h = self.input(z)  # (B, n_init, h, w)
        h = self.groups(h)  # (B, hidden, H, W)
        return self.output(h)  # (B, 6 or 3, H, W)


class DVAE(nn.Module):
    """Encoder -> quantizer (cfg.quantizer: gumbel | vq) -> decoder, with the paper's loss.

    Example: out = DVAE(cfg)(images uint8 (B, 32, 32, 3)); out["loss"] -> scalar; out["codes"] -> (B, 8, 8)
    """

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        _check_cfg(cfg)
        self.cfg = cfg
        # Gumbel: K logits per cell in, K one-hot channels out (the decoder's input conv is the codebook).
        # VQ: code_dim channels both sides, and the codebook lives in the quantizer.
        self.quantizer = make_quantizer(cfg)  # tau and beta at step 0, until schedule_callback moves them
        width = self.quantizer.in_channels  # K for gumbel, code_dim for vq
        self.encoder = Encoder(cfg, width)
        self.decoder = Decoder(cfg, width)

    def grid_size(self, image_size: int) -> int:
        """Side of the code grid for this model. Example: toy model, 32 -> 8"""
        return grid_size(image_size, self.cfg)

    # --- inputs ------------------------------------------------------------------------------------
    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1] -> float (B, 3, H, W) in [0, 1], checked."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ConfigError(f"DVAE expects a batch of images, uint8 (B, H, W, 3) or float (B, 3, H, W); got {shape}")
        if images.dtype == torch.uint8:
            if images.shape[-1] != 3:
                raise ConfigError(f"uint8 images must be (B, H, W, 3) RGB; got shape {tuple(images.shape)} "
                                  f"({images.shape[-1]} channels last)")
            x = losses.to_unit(images)  # (B, 3, H, W)
        elif images.is_floating_point():
            if images.shape[1] != 3:
                raise ConfigError(f"float images must be (B, 3, H, W) RGB in [0, 1]; got shape {tuple(images.shape)} "
                                  f"({images.shape[1]} channels)")
            x = images.float()
            losses.check_unit_pixels(x, "images")  # once per batch: uint8 input needs no range check
        else:
            raise ConfigError(f"images must be uint8 (B, H, W, 3) or float (B, 3, H, W); got dtype {images.dtype}")
        H, W = x.shape[-2:]
        grid_size(H, self.cfg), grid_size(W, self.cfg)  # raises a ConfigError naming the factor
        return x

    # --- training ----------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> dict:
        """Loss and codes for a batch.

        Returns {"loss", "recon", "q_loss", "codes" (B, h, w), "x_hat" (B, 3, H, W) in [0, 1], "stats"}:
        loss = recon + q_loss / (3*H*W), the paper's "whole loss divided by 256*256*3".
        """
        x = self._prepare(images)  # (B, 3, H, W) in [0, 1]
        B, _, H, W = x.shape
        x_in = losses.map_pixels(x, check=False)  # (B, 3, H, W) in [eps, 1-eps]; _prepare checked x once
        z = self.encoder(x_in)  # (B, K, h, w) logits, or (B, D, h, w) for VQ
        z_q, q_loss, codes, stats = self.quantizer(z)  # (B, K|D, h, w), scalar per image, (B, h, w)
        out = self.decoder(z_q)  # (B, 6|3, H, W)
        recon, x_hat = self._likelihood(x, x_in, out)
        loss = recon + q_loss / (3 * H * W)
        return {"loss": loss, "recon": recon, "q_loss": q_loss, "codes": codes, "x_hat": x_hat, "stats": stats}

    def _likelihood(self, x: torch.Tensor, x_mapped: torch.Tensor, out: torch.Tensor):
        """(mean NLL per pixel-channel, viewable x_hat in [0, 1]) for the decoder output `out`."""
        if self.cfg.likelihood != "mse":
            mu, log_b = losses.split_decoder_output(out)  # (B, 3, H, W) each
            if self.cfg.likelihood == "logit_laplace_binned":
                recon = losses.binned_logit_laplace_nll(x, mu, log_b, reduction="mean")  # per 8-bit level
            else:
                recon = losses.logit_laplace_nll(x_mapped, mu, log_b, reduction="mean", check=False)  # built by map_pixels
            return recon, losses.logit_laplace_mean(mu.detach())  # (B, 3, H, W) in [0, 1]
        recon = losses.mse_loss(x, out)
        return recon, out.detach().clamp(0, 1)

    # --- tokenizer use -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Images -> codes (B, h, w) long in [0, K), deterministically (paper: argmax, no Gumbel noise).

        Runs in eval mode under no_grad, `batch_size` images at a time, and restores the mode after.
        Example: encode(uint8 (10, 32, 32, 3)) -> long (10, 8, 8)
        """
        x = self._prepare(images)  # (B, 3, H, W)
        was_training = self.training
        self.eval()
        try:
            chunks = []
            for i in range(0, x.shape[0], batch_size):
                z = self.encoder(losses.map_pixels(x[i:i + batch_size], check=False))  # (b, K|D, h, w)
                if self.cfg.quantizer == "gumbel":
                    chunks.append(z.argmax(dim=1))  # (b, h, w)
                else:
                    chunks.append(nearest_code(z, self.quantizer.codebook))  # (b, h, w), no EMA update
            return torch.cat(chunks).long()  # (B, h, w)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> images float (B, 3, H, W) in [0, 1] (the logit-Laplace mean for viewing).

        Example: decode(long (10, 8, 8)) -> float (10, 3, 32, 32)
        """
        K = self.cfg.vocab_size
        if codes.ndim != 3 or codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ConfigError(f"decode expects integer codes (B, h, w); got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= K):
            raise ConfigError(f"codes must lie in [0, {K}); got min {codes.min().item()}, max {codes.max().item()}")
        was_training = self.training
        self.eval()
        try:
            z = self.quantizer.embed_codes(codes)  # (B, K, h, w) one-hot, or (B, D, h, w) codebook rows
            out = self.decoder(z)  # (B, 6|3, H, W)
            if self.cfg.likelihood != "mse":
                return losses.logit_laplace_mean(losses.split_decoder_output(out)[0])  # (B, 3, H, W)
            return out.clamp(0, 1)  # (B, 3, H, W)
        finally:
            self.train(was_training)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """decode(encode(images)): what the transformer's tokens can show. Example: -> float (B, 3, H, W)"""
        return self.decode(self.encode(images))


# --- training glue ------------------------------------------------------------------------------------
def dvae_loss_fn(model: DVAE, batch) -> tuple[torch.Tensor, dict]:
    """The Trainer's loss_fn: batch = images, or (images, captions) as ShapesWorld.batch gives.

    Example: dvae_loss_fn(model, (uint8 (8, 16, 16, 3), captions)) -> (loss, {"recon": tensor(-0.6), "kl": tensor(3.1), ...})
    """
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    out = model(images)
    # scalar_stats drops what does not apply: Gumbel logs kl, temperature, kl_weight; VQ commitment.
    # The numbers stay 0-d tensors: the Trainer reads them with the loss in one host sync.
    return out["loss"], {"recon": out["recon"].detach(), **scalar_stats(out["stats"])}


def schedule_callback(cfg: DVAEConfig) -> Callable:
    """fn(trainer) that sets the Gumbel quantizer's temperature and KL weight for the next update.

    Register it for BOTH "on_fit_start" and "on_step_end": after the update that completed step k the
    trainer fires on_step_end, and we set the values for update k+1 (the Trainer's convention: update
    k+1 also uses lr_at(k+1)); on_fit_start covers the first update, including after a resume. A no-op
    for VQ. Example: trainer.add_callback("on_fit_start", cb); trainer.add_callback("on_step_end", cb)
    """

    def apply(trainer) -> None:
        trainer.model.quantizer.set_step(trainer.step + 1, cfg)  # trainer.step = updates completed

    return apply


# --- sizes ------------------------------------------------------------------------------------------
def count_parameters(module: nn.Module) -> int:
    """Number of parameters (works on the meta device). Example: nn.Conv2d(3, 8, 1) -> 32"""
    return sum(p.numel() for p in module.parameters())


def paper_parameter_counts() -> dict[str, int]:
    """Build the `paper` preset's encoder and decoder on the meta device (no memory) and count.

    Example: paper_parameter_counts() -> {"encoder": 53786240, "decoder": 43829766,
             "released_encoder": 54000000, "released_decoder": 44000000}
    """
    cfg = get_config("paper", smoke=False).dvae
    with torch.device("meta"):
        enc, dec = Encoder(cfg, cfg.vocab_size), Decoder(cfg, cfg.vocab_size)
    return {"encoder": count_parameters(enc), "decoder": count_parameters(dec),
            "released_encoder": RELEASED_PARAMS["encoder"], "released_decoder": RELEASED_PARAMS["decoder"]}
