"""16-bit gradient numerics: why fp16 gradients underflow, and the paper's per-resblock cure.

float16 has 5 exponent bits: its smallest subnormal is 2^-24, its smallest normal 2^-14, its
largest value 65504. A gradient entry of 2^-25 or less rounds to 0 ("flushed", underflow); one of
65520 or more becomes inf (overflow). bfloat16 keeps float32's 8 exponent bits (2^-133 up to ~2^128), so
gradients do not underflow, but it has 8 significant bits where float16 has 11: it rounds 8x coarser.

The paper (§2.4, appendix D) found activation-gradient norms shrinking by orders of magnitude from
early to late resblocks: more than fp16's range holds, so one global loss scale (what
`torch.amp.GradScaler` does) flushes late blocks to zero or overflows early ones. Its cure, which
`ResblockScaler` implements with hooks on each block, gives resblock i a gradient scale s_i:

    gradient entering block i      g -> g * s_i                        (hook on the block's output)
    gradient leaving block i       g -> g / s_i, inf and nan set to 0  (hook on the block's input)
    parameter grads of block i     g -> g.float() / s_i                (`unscale_`, in fp32)
    after every step               s_i *= 2^(1/1000) if block i's grads were finite, else s_i /= sqrt(2)
                                   and the whole update is skipped

Scales start at M * 2^13 (M = data-parallel replicas, 1 here), as in the paper. Two bounds are
minidalle's own, so a demo cannot run away: scales stay in [M * 2^7, M * 2^24], and a scale is not
divided again within 125 updates of its last division. Zeroing non-finite values on the way out
keeps one block's overflow from shrinking the scales of the blocks before it. Hooks on a black-box
block scale all of its gradient; scaling only the residual branch would be the same arithmetic in
exact numbers.

`ToyResNet` is a CPU lab for all this: `simulate="fp16"` or `"bf16"` rounds every gradient it
computes to that format, and `compare_gradient_schemes` reports, per block and per scheme (plain
fp16, one global scale, per-resblock scales, bf16), the gradient entries flushed to zero and the
relative error against float32.

Example: scaler = ResblockScaler(model.blocks); loss.backward(); stepped = scaler.step(optimizer)
Example: compare_gradient_schemes(seed=0)["fp16"]["flushed"]  -> one fraction per block
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, MinidalleError

GROWTH, BACKOFF, WINDOW = 2.0 ** (1 / 1000), 2.0 ** -0.5, 125  # growth and backoff: the paper; the window: ours
SIMULATE = {None: None, "fp16": torch.float16, "bf16": torch.bfloat16}


def format_range(dtype: torch.dtype = torch.float16) -> dict[str, float]:
    """log2 of a float format's smallest subnormal, smallest normal and largest value, for plot lines.

    Example: format_range(torch.float16) -> {"min_subnormal": -24.0, "min_normal": -14.0, "max": 15.99...}"""
    fi = torch.finfo(dtype)
    return {"min_subnormal": math.log2(fi.tiny * fi.eps), "min_normal": math.log2(fi.tiny), "max": math.log2(fi.max)}


def underflow_fraction(t: torch.Tensor, dtype: torch.dtype = torch.float16) -> float:
    """Fraction of t's nonzero finite values that become 0 when cast to dtype. Example: underflow_fraction(g)"""
    t = t.detach().float()
    live = (t != 0) & torch.isfinite(t)
    return float(((t.to(dtype) == 0) & live).sum() / live.sum().clamp(min=1))


def overflow_fraction(t: torch.Tensor, dtype: torch.dtype = torch.float16) -> float:
    """Fraction of t's finite values that become inf when cast to dtype. Example: overflow_fraction(g * 2**20)"""
    t = t.detach().float()
    return float((torch.isinf(t.to(dtype)) & torch.isfinite(t)).sum() / torch.isfinite(t).sum().clamp(min=1))


def grad_histogram_data(model: nn.Module) -> dict[str, np.ndarray]:
    """{parameter name: log2 |g| of its nonzero gradient entries}, to histogram against `format_range`.

    Example: for name, v in grad_histogram_data(model).items(): plt.hist(v, bins=60, label=name)"""
    mags = {name: p.grad.detach().float().abs().flatten() for name, p in model.named_parameters() if p.grad is not None}
    return {name: torch.log2(g[g > 0]).numpy() for name, g in mags.items()}


class _ScaleGrad(torch.autograd.Function):
    """Identity forward. Backward: g -> g * factor, then inf/nan -> 0 if zero_nonfinite, then rounded to
    `dtype` and back if given (how the toy simulates 16-bit gradients on a float32 CPU)."""

    @staticmethod
    def forward(ctx, x, factor=1.0, dtype=None, zero_nonfinite=False):
        ctx.factor, ctx.dtype, ctx.zero_nonfinite = factor, dtype, zero_nonfinite
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g * ctx.factor if ctx.factor != 1.0 else g
        if ctx.zero_nonfinite:
            g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
        return (g if ctx.dtype is None else g.to(ctx.dtype).to(g.dtype)), None, None, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x unchanged; its gradient multiplied by factor. Example: y = scale_grad(x, 2**13)"""
    return _ScaleGrad.apply(x, float(factor))


def round_grad(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """x unchanged; its gradient rounded to dtype (None: untouched). Example: y = round_grad(x, torch.float16)"""
    return x if dtype is None else _ScaleGrad.apply(x, 1.0, dtype)


def _positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a finite number > 0; got {value!r}")
    return float(value)


class ResblockScaler:
    """One gradient scale per residual block (the paper's §2.4 / appendix D scheme; see the module docstring).

    `blocks` are nn.Modules called as block(x) with a tensor x; the scaler hooks them in place, so the
    model's code is unchanged, and `remove()` unhooks them. Parameters outside the blocks (embeddings,
    head) get the plain, unscaled gradient; `step` skips the update if any of theirs is non-finite too.
    Example: scaler = ResblockScaler(model.blocks); loss.backward(); scaler.step(opt); opt.zero_grad()
    """

    def __init__(self, blocks: Sequence[nn.Module], world_size: int = 1, growth: float = GROWTH,
                 backoff: float = BACKOFF, window: int = WINDOW):
        blocks = list(blocks) if isinstance(blocks, (list, tuple, nn.ModuleList)) else []
        if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
            raise ConfigError("blocks must be a non-empty list or nn.ModuleList of nn.Modules: the residual blocks, "
                              "e.g. ResblockScaler(model.blocks)")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(window, int) and window >= 0
                and _positive("growth", growth) >= 1 > _positive("backoff", backoff)):
            raise ConfigError(f"ResblockScaler needs an int world_size >= 1, growth >= 1, 0 < backoff < 1 and an int "
                              f"window >= 0 (defaults: 1, 2 ** (1 / 1000), 2 ** -0.5, 125); got world_size="
                              f"{world_size!r}, growth={growth!r}, backoff={backoff!r}, window={window!r}")
        self.blocks, self.growth, self.backoff, self.window = blocks, float(growth), float(backoff), window
        self.min_scale, self.max_scale = world_size * 2.0 ** 7, world_size * 2.0 ** 24
        self.scales = [world_size * 2.0 ** 13] * len(blocks)
        self._last_backoff = [-window] * len(blocks)  # update index of each scale's last division
        self._updates, self._unscaled, self._finite = 0, False, []
        self._handles = [h for i, b in enumerate(blocks) for h in (
            b.register_forward_pre_hook(lambda m, args, i=i: self._enter(i, args)),  # gradient leaves block i
            b.register_forward_hook(lambda m, args, out, i=i: self._exit(i, out)))]  # gradient enters block i

    def _enter(self, i, args):  # unscale the gradient leaving block i, and zero its inf/nan
        if not (args and isinstance(args[0], torch.Tensor)):
            raise MinidalleError(f"block {i} was called without a tensor x; ResblockScaler needs block(x, ...)")
        return (_ScaleGrad.apply(args[0], 1.0 / self.scales[i], None, True),) + tuple(args[1:])

    def _exit(self, i, out):  # scale the gradient entering block i
        if not isinstance(out, torch.Tensor):
            raise MinidalleError(f"block {i} returned {type(out).__name__}; ResblockScaler needs one tensor out")
        return _ScaleGrad.apply(out, self.scales[i])

    def unscale_(self) -> list[bool]:
        """Divide each block's parameter grads by its scale (in fp32); return, per block, whether all are finite."""
        if self._unscaled:
            raise MinidalleError("unscale_() was called twice for one backward pass; call update() (or step()) "
                                 "before unscaling again")
        self._unscaled, self._finite = True, []
        for b, s in zip(self.blocks, self.scales):
            grads = [p.grad for p in b.parameters() if p.grad is not None]
            for g in grads:
                g.copy_(g.float() / s)  # written back in the grad's own dtype
            self._finite.append(all(bool(torch.isfinite(g).all()) for g in grads))
        return list(self._finite)

    def update(self, finite: Sequence[bool]) -> bool:
        """Grow each finite block's scale by `growth`, divide each other one by sqrt(2) (at most once per
        `window` updates), clamp to [M * 2^7, M * 2^24]; return True when the update may be applied."""
        if len(finite) != len(self.scales):
            raise ConfigError(f"update() needs one finite flag per block ({len(self.scales)}); got {len(finite)}")
        for i, ok in enumerate(finite):
            if ok:
                self.scales[i] *= self.growth
            elif self._updates - self._last_backoff[i] >= self.window:
                self.scales[i] *= self.backoff
                self._last_backoff[i] = self._updates
            self.scales[i] = min(max(self.scales[i], self.min_scale), self.max_scale)
        self._updates, self._unscaled = self._updates + 1, False
        return all(finite)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """unscale_, optimizer.step() unless some gradient is non-finite, update; return whether it stepped."""
        finite = self._finite if self._unscaled else self.unscale_()
        inside = {id(p) for b in self.blocks for p in b.parameters()}
        outside_ok = all(bool(torch.isfinite(p.grad).all()) for g in optimizer.param_groups for p in g["params"]
                         if p.grad is not None and id(p) not in inside)
        stepped = self.update(finite) and outside_ok
        if stepped:
            optimizer.step()
        return stepped

    def remove(self) -> None:
        """Unhook the blocks (the scales are kept). Example: scaler.remove()"""
        for h in self._handles:
            h.remove()

    def state_dict(self) -> dict:
        return {"scales": list(self.scales), "last_backoff": list(self._last_backoff), "updates": self._updates}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or len(state.get("scales", ())) != len(self.scales):
            raise ConfigError(f"ResblockScaler.load_state_dict needs the state_dict() of a scaler over "
                              f"{len(self.scales)} blocks; got {type(state).__name__} {str(state)[:80]}")
        self.scales = [float(s) for s in state["scales"]]
        self._last_backoff = [int(u) for u in state["last_backoff"]]
        self._updates = int(state["updates"])


def _grad_dtype(simulate):
    if simulate not in SIMULATE:
        raise ConfigError(f"ToyResNet's simulate must be one of {list(SIMULATE)}; got {simulate!r}")
    return SIMULATE[simulate]


class _ToyBlock(nn.Module):
    """x -> x + W2 gelu(W1 norm(x)); with grad_dtype set, every gradient it computes is rounded to it."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width, bias=False), nn.Linear(2 * width, width, bias=False)
        self.grad_dtype = None

    def forward(self, x):
        q, x = (lambda t: round_grad(t, self.grad_dtype)), round_grad(x, self.grad_dtype)
        h = q(F.gelu(q(self.fc1(q(F.layer_norm(x, x.shape[-1:]))))))
        return q(x + self.fc2(h))


class ToyResNet(nn.Module):
    """`depth` pre-norm MLP resblocks on (B, width) inputs, a final norm and a linear head: the CPU lab.

    A model this shallow has no orders-of-magnitude gradient spread of its own, so the backward pass
    multiplies the gradient by spread ** (1 / (depth - 1)) at each block boundary (the forward is
    unchanged): block 0's gradients come out `spread` times block depth-1's, early large and late small
    as the paper reports (spread < 1 flips it). `simulate` ("fp16", "bf16" or None; an attribute, so one
    model serves every scheme) rounds every activation and parameter gradient to that format, standing
    in for 16-bit hardware; the forward pass itself stays fp32.
    Example: m = ToyResNet(8, 32, simulate="fp16"); m(torch.randn(4, 32)).sum().backward()
    """

    def __init__(self, depth: int = 8, width: int = 32, spread: float = 2.0 ** 36, simulate: str | None = None,
                 seed: int = 0):
        super().__init__()
        if not (isinstance(depth, int) and depth >= 2 and isinstance(width, int) and width >= 1):
            raise ConfigError(f"ToyResNet needs int depth >= 2 and width >= 1; got depth={depth!r}, width={width!r}")
        self._gain = _positive("spread", spread) ** (1 / (depth - 1))
        self.blocks = nn.ModuleList(_ToyBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, 1, bias=False)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
                p.register_hook(lambda g: g if self._dtype is None else g.to(self._dtype).to(g.dtype))
        self.simulate, self._dtype = simulate, _grad_dtype(simulate)  # simulate may change between passes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._dtype = _grad_dtype(self.simulate)
        for i, block in enumerate(self.blocks):
            block.grad_dtype = self._dtype
            x = block(scale_grad(x, self._gain) if i else x)
        return self.head(F.layer_norm(x, x.shape[-1:]))


def _report(grads, ref, overflow, skipped, scales):
    live = [r != 0 for r in ref]
    return {"flushed": [float(((g == 0) & m).sum() / m.sum().clamp(min=1)) for g, m in zip(grads, live)],
            "rel_err": [float((g - r).norm() / r.norm()) if torch.isfinite(g).all() else math.inf
                        for g, r in zip(grads, ref)],
            "overflow": [float(o) for o in overflow], "skipped": float(skipped), "scales": list(scales)}


def compare_gradient_schemes(seed: int = 0, depth: int = 8, width: int = 32, steps: int = 120, batch: int = 32,
                             spread: float = 2.0 ** 36, loss_weight: float = 2.0 ** -31,
                             growth: float = 2.0 ** (1 / 8)) -> dict[str, dict]:
    """Backpropagate one ToyResNet batch under each gradient scheme; report each block's damage vs fp32.

    Schemes: "fp32" (the reference), "fp16" and "bf16" (unscaled), "fp16_global" (one loss scale from
    2^16, halved and the step skipped on overflow: GradScaler's rule; its x2 growth after 2000 clean
    steps never comes this soon) and "fp16_resblock" (a ResblockScaler). The scaled schemes run
    `steps` passes to settle and are measured on the last pass that would have updated the weights;
    `growth` replaces the paper's 2^(1/1000) (and the window is off) so that a few hundred passes
    suffice, at the price of more skipped steps. Per scheme, lists per block: "flushed" (parameter-
    grad entries nonzero in fp32 but 0 here), "rel_err" (|g - g32| / |g32|, inf if non-finite),
    "overflow" (passes with a non-finite grad); and "skipped" (passes skipped), "scales" (final).
    With the defaults plain fp16 loses every block (the loss gradient underflows before reaching
    any), the largest global scale that does not overflow (2^11) still flushes most of the last block,
    per-resblock scales keep every block within ~1e-3 of fp32, and bf16 within ~1e-2.
    Example: r = compare_gradient_schemes(); r["fp16"]["flushed"][-1] > r["fp16_resblock"]["flushed"][-1]
    """
    if not (isinstance(steps, int) and steps >= 1 and isinstance(batch, int) and batch >= 1):
        raise ConfigError(f"steps and batch must be ints >= 1; got steps={steps!r}, batch={batch!r}")
    loss_weight = _positive("loss_weight", loss_weight)
    model = ToyResNet(depth, width, spread, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(batch, width, generator=gen), torch.randn(batch, 1, generator=gen)

    def backward(simulate, scale=1.0):  # one pass; each block's grads in fp32, divided by `scale`
        model.zero_grad(set_to_none=True)
        model.simulate = simulate
        (F.mse_loss(model(x), y) * (loss_weight * scale)).backward()
        return block_grads(scale)

    def block_grads(scale=1.0):
        return [torch.cat([p.grad.float().flatten() / scale for p in b.parameters()]) for b in model.blocks]

    def finite(grads):
        return [bool(torch.isfinite(g).all()) for g in grads]

    ref = backward(None)
    out = {"fp32": _report(ref, ref, [0] * depth, 0, [])}
    for name in ("fp16", "bf16"):
        grads = backward(name)
        out[name] = _report(grads, ref, [not f for f in finite(grads)], 0, [])

    loss_scale = 2.0 ** 16
    for name in ("fp16_global", "fp16_resblock"):  # `steps` passes each, so that the scales settle
        scaler = ResblockScaler(model.blocks, growth=growth, window=0) if name == "fp16_resblock" else None
        kept, skipped, overflow = None, 0, np.zeros(depth)
        for _ in range(steps):
            if scaler is None:  # GradScaler's rule
                grads = backward("fp16", loss_scale)
                ok = finite(grads)
                loss_scale /= 1 if all(ok) else 2
            else:
                backward("fp16")
                ok = scaler.unscale_()  # unscales the grads in place
                scaler.update(ok)
                grads = block_grads()
            overflow += np.logical_not(ok)
            kept, skipped = (grads if all(ok) else kept), skipped + (not all(ok))
        out[name] = _report(grads if kept is None else kept, ref, overflow / steps, skipped / steps,
                            [loss_scale] if scaler is None else scaler.scales)
    return out
