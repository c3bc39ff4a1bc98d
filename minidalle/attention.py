"""Stage 2's attention: the paper's sparse masks over the joint [text ; image] sequence, and two ways
to run them that give the same numbers (docs/paper.md, "The transformer").

The sequence is `text_len` caption tokens followed by the `grid x grid` image tokens in raster
order (row by row). Position p of the input holds token p; the model's output at p predicts token
p + 1, so "causal" means: the output at p depends on inputs 0..p only.

    text -> text    causal (a text token sees the text tokens up to itself)
    image -> text   every image token sees every text token, in every layer
    image -> image  one of three sparse masks, always causal in raster order:
        row     the grid + 1 most recent image tokens, itself included: back to the token above it
        column  the row mask of the transposed (column-major) image: the tokens above it in its column,
                and the token on its left
        conv    a kernel x kernel window centred on it, clipped to the past

    mask  = build_mask("row", text_len=6, grid=4)          # bool (22, 22), True = may attend
    bank  = MaskBank(text_len, grid, kernel)                # masks and BlockMasks, built once per shape
    out   = attend(q, k, v, "column", bank, impl="sdpa")    # (B, nh, L, hd)

Readings of the paper this file had to choose (its Fig. 11 draws a 4x4 grid after 6 text tokens):
- Offsets are counted in raster order for every kind, as the row mask counts them: the row mask's
  window of grid + 1 tokens runs from the end of the previous row, and the convolutional window
  "wraps around" the same way -- a window cell one column right of the last column is the first
  cell of the next row (offset +1 in raster order), not the first cell of the same row.
- The column mask is the row mask computed in column-major order *and* causal in raster order,
  because generation is raster order whatever the layer. In column-major order the row mask would
  also reach the tokens below-left of the query (the rest of the previous column), but those are
  generated later, so only the token on the left survives. Without the raster cut, a column layer
  would read the future -- the bug that a convolutional mask in another codebase once had.
- The convolutional kernel must fit the grid (odd, at most the grid side), so each raster offset
  names one window cell.

Two execution paths (`impl`):
- "sdpa": `scaled_dot_product_attention` with the boolean mask (CPU and GPU, training and inference).
- "flex": FlexAttention with a `BlockMask` built once per (kind, length, device) and reused by every
  layer of that kind; blocks the mask leaves empty are skipped. Column layers run in the transposed
  (column-major) layout: in raster order a column reaches back a whole image height, touching every
  earlier block, while column-major keeps it inside one block and the one before.
  FlexAttention needs torch.compile to be fast (a C++ compiler on CPU), and has no CPU backward.
`choose_impl` picks one for "auto" and says why; `attend` falls back to "sdpa" with one warning when
FlexAttention cannot run here, never a crash.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F

from .errors import ConfigError

KINDS = ("row", "column", "conv")
IMPLS = ("auto", "sdpa", "flex")
# FlexAttention's block side. 128 suits GPUs (the kernels' tile); on one CPU thread at 256 + 32x32
# tokens, compiled flex took 1.00x / 0.76x / 0.65x the time of dense causal SDPA with blocks of
# 128 / 64 / 32 on the row mask (measured side by side), so CPU uses 32.
BLOCK_CUDA, BLOCK_CPU = 128, 32


def layer_kinds(n_layer: int) -> list[str]:
    """The paper's schedule: the last layer convolutional; layer i (1-based) column when
    (i - 2) mod 4 == 0, else row.

    Example: layer_kinds(6) -> ["row", "column", "row", "row", "row", "conv"]
    """
    if n_layer < 1:
        raise ConfigError(f"model.n_layer={n_layer} is invalid: it must be >= 1")
    return ["conv" if i == n_layer else "column" if (i - 2) % 4 == 0 else "row" for i in range(1, n_layer + 1)]


def check_kernel(kernel: int, grid: int) -> None:
    """The convolutional kernel must be odd and fit the image grid (see the module docstring)."""
    if kernel < 1 or kernel % 2 == 0 or kernel > grid:
        raise ConfigError(f"model.conv_kernel={kernel} is invalid for a {grid}x{grid} image grid: it must be odd "
                          f"and between 1 and {grid}")


def image_allowed(kind: str, qi, ki, grid: int, kernel: int):
    """May image token qi attend to image token ki (raster indices, tensors of any matching shape)?

    The causal cut (ki <= qi) is included. Works elementwise, so the same function builds the dense
    mask (on broadcast aranges) and FlexAttention's mask_mod (on scalars).
    Example: image_allowed("row", tensor(5), tensor(0), grid=4, kernel=3) -> tensor(True)   (5 - 0 <= 4)
    """
    d = qi - ki  # raster offset back from the query
    past = d >= 0
    if kind == "row":
        return past & (d <= grid)
    if kind == "column":
        same_column = (d % grid) == 0
        left = (d == 1) & ((qi % grid) != 0)  # the token on its left, in the same row
        return past & (same_column | left)
    if kind == "conv":
        s = kernel // 2
        dc = (d + s) % grid - s  # the window column offset in [-s, grid - s - 1] ...
        dr = (d - dc) // grid  # ... and the row offset, so that d == dr * grid + dc
        return past & (dc <= s) & (dr <= s)
    raise ConfigError(f"unknown attention kind {kind!r}; choose one of {', '.join(KINDS)}")


def allowed(kind: str, q, k, text_len: int, grid: int, kernel: int, transposed: bool = False):
    """May position q attend to position k of the joint sequence? (tensors, elementwise)

    transposed=True: the image positions are in column-major order (how column layers run under
    FlexAttention); they are mapped back to raster order before the rule is applied.
    Example: allowed("row", tensor(6), tensor(0), 6, 4, 3) -> tensor(True)  (an image token sees all text)
    """
    qi, ki = q - text_len, k - text_len
    text_q, text_k = q < text_len, k < text_len
    if transposed and kind == "column":
        # The same rule written in column-major indices, so FlexAttention's mask_mod needs no index
        # mapping (it runs on every pair of a partly masked block: this made the layer ~25% faster).
        # d = qi - ki here counts back in column-major order: d <= the query's row is the column above,
        # d == grid is the token on its left.
        d = qi - ki
        image_rule = (d >= 0) & ((d <= qi % grid) | (d == grid))
    else:
        if transposed:
            qi, ki = _raster(qi, grid), _raster(ki, grid)
        image_rule = image_allowed(kind, qi, ki, grid, kernel)
    return torch.where(text_q, text_k & (k <= q), text_k | image_rule)


def _raster(j, grid: int):
    """Column-major image index -> raster index. Example: grid 4: 1 (row 1, column 0) -> 4"""
    return (j % grid) * grid + j // grid


def build_mask(kind: str, text_len: int, grid: int, kernel: int = 3, transposed: bool = False,
               device=None) -> torch.Tensor:
    """The whole (L, L) boolean mask, L = text_len + grid**2; True where attention is allowed.

    Example: build_mask("row", 6, 4).sum(1)[6:11] -> [7, 8, 9, 10, 11]  (6 text + up to 5 image tokens)
    """
    if kind == "conv":
        check_kernel(kernel, grid)
    L = text_len + grid * grid
    pos = torch.arange(L, device=device)
    return allowed(kind, pos[:, None], pos[None, :], text_len, grid, kernel, transposed)


def transpose_order(text_len: int, grid: int, device=None) -> torch.Tensor:
    """The raster position shown at each position of the transposed layout (text first, unchanged).

    `x[:, order]` puts a raster-order sequence (B, L, ...) into column-major order; `argsort(order)`
    undoes it. Example: transpose_order(1, 2) -> [0, 1, 3, 2, 4]
    """
    j = torch.arange(grid * grid, device=device)
    return torch.cat([torch.arange(text_len, device=device), text_len + _raster(j, grid)])


def naive_attention(q, k, v, mask) -> torch.Tensor:
    """Attention written out for teaching: scores, -inf where masked, one softmax, weighted sum.

    Example: with mask = torch.ones(L, L).tril().bool() this equals causal attention.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, nh, L, L)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (B, nh, L, hd)


def block_counts(kind: str, text_len: int, grid: int, kernel: int, block: int = 128,
                 transposed: bool = False) -> dict:
    """How many (block x block) tiles of the mask hold any allowed pair, against dense causal.

    Example: block_counts("row", 256, 32, 11) -> {"touched": 34, "causal": 55, "total": 100, ...}
    """
    mask = build_mask(kind, text_len, grid, kernel, transposed)
    L = mask.shape[0]
    n = -(-L // block)
    padded = torch.zeros(n * block, n * block, dtype=torch.bool)
    padded[:L, :L] = mask
    tiles = padded.reshape(n, block, n, block).any(dim=3).any(dim=1)  # (n, n)
    full = padded.reshape(n, block, n, block).all(dim=3).all(dim=1)
    return {"touched": int(tiles.sum()), "full": int(full.sum()), "causal": n * (n + 1) // 2, "total": n * n,
            "density": float(mask.float().mean()), "tiles": tiles}


# --- running the masks ------------------------------------------------------------------------------
def flex_available() -> tuple[bool, str]:
    """Whether FlexAttention can be imported here, and if not why."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError as e:  # older torch
        return False, f"FlexAttention is not in this torch ({torch.__version__}): {e}"
    return True, "available"


def choose_impl(pref: str, device: torch.device, training: bool, seq_len: int) -> tuple[str, str]:
    """Resolve model.attn_impl to "sdpa" or "flex", with the reason in words.

    auto: flex on CUDA; on CPU, sdpa for training (FlexAttention has no CPU backward) and for short
    sequences, where compiling flex (~20 s) buys nothing; flex for CPU inference at 1024+ tokens.
    Example: choose_impl("auto", torch.device("cpu"), training=True, seq_len=96)
             -> ("sdpa", "auto on cpu: training (FlexAttention has no CPU backward)")
    """
    if pref not in IMPLS:
        raise ConfigError(f"model.attn_impl={pref!r} is invalid: it must be one of {', '.join(IMPLS)}")
    ok, why = flex_available()
    if pref == "sdpa":
        return "sdpa", "model.attn_impl=sdpa"
    if pref == "flex":
        if not ok:
            return "sdpa", f"model.attn_impl=flex, but {why}: using sdpa"
        if device.type == "cpu" and training:
            return "sdpa", "model.attn_impl=flex, but FlexAttention has no CPU backward: sdpa while training"
        return "flex", "model.attn_impl=flex"
    if not ok:
        return "sdpa", f"auto: {why}"
    if device.type == "cuda":
        return "flex", "auto on cuda: FlexAttention (block-sparse)"
    if training:
        return "sdpa", f"auto on {device.type}: training (FlexAttention has no CPU backward)"
    if device.type == "cpu" and seq_len >= 1024:
        return "flex", f"auto on cpu: inference at {seq_len} tokens (block-sparse pays for its compile)"
    return "sdpa", f"auto on {device.type}: {seq_len} tokens is too short for block sparsity to pay"


# One function, and so one code object, per mask kind. torch.compile keeps at most 8 graphs per code
# object (dynamo's recompile limit) and then runs it eagerly, without a word and many times slower.
# Every mask kind, grad mode and dtype needs a graph of its own: one compiled flex_attention serving them
# all used 6 of the 8 in the toy demo, and one more call (an fp32 likelihood pass) would have dropped it.
# Per kind, with the batch size left to dynamo's automatic dynamic shapes (one graph for every batch
# size after the second), a kind needs at most 2 grad modes x 2 dtypes x 2 = 8, and the demo uses 3.
def _flex_row(q, k, v, block_mask):
    return _flex_attention()(q, k, v, block_mask=block_mask)


def _flex_column(q, k, v, block_mask):
    return _flex_attention()(q, k, v, block_mask=block_mask)


def _flex_conv(q, k, v, block_mask):
    return _flex_attention()(q, k, v, block_mask=block_mask)


_FLEX_BY_KIND = {"row": _flex_row, "column": _flex_column, "conv": _flex_conv}


def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


@functools.lru_cache(maxsize=None)
def _flex_fn(compiled: bool, kind: str = "row"):
    """FlexAttention for one mask kind, compiled (fast; needs a C++ compiler on CPU) or eager (the
    notebooks and tests: it materialises the scores, which is fine at their sizes, and needs no compiler)."""
    if compiled:
        return torch.compile(_FLEX_BY_KIND[kind], dynamic=None)  # None: the batch turns dynamic when it changes

    def eager(*args, **kwargs):
        with warnings.catch_warnings():  # eager is chosen on purpose here: no "use torch.compile" warning
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return _flex_attention()(*args, **kwargs)

    return eager


class MaskBank:
    """Every mask a model needs, built once per (kind, length, layout, device) and then reused.

    Example: bank = MaskBank(32, 8, 5); bank.dense("row", 96, cpu) -> bool (96, 96), the same object each call
    """

    def __init__(self, text_len: int, grid: int, kernel: int, compile_flex: bool = True):
        check_kernel(kernel, grid)
        self.text_len, self.grid, self.kernel, self.compile_flex = text_len, grid, kernel, compile_flex
        self.length = text_len + grid * grid
        self._cache: dict = {}
        self.flex_failed: str | None = None  # why flex was given up on, once it failed here
        self.flex_backward_ok: set = set()  # the (kind, dtype, device) whose backward ran once (_check_flex_backward)

    def dense(self, kind: str, L: int, device) -> torch.Tensor:
        """The raster-order mask for the first L positions: a view of the whole mask, which is built
        once (a prefix of a causal mask is its own mask, so every length shares it)."""
        key = ("dense", kind, str(device))
        if key not in self._cache:
            self._cache[key] = build_mask(kind, self.text_len, self.grid, self.kernel, device=device)
        full = self._cache[key]
        return full if L == full.shape[0] else full[:L, :L]

    def transposed(self, kind: str, L: int) -> bool:
        """Column layers run column-major under flex (which runs only whole sequences)."""
        return kind == "column" and L == self.length

    def order(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("order", str(device))
        if key not in self._cache:
            order = transpose_order(self.text_len, self.grid, device)
            self._cache[key] = (order, torch.argsort(order))
        return self._cache[key]

    def block(self, kind: str, L: int, device):
        """FlexAttention's BlockMask for this kind and length (column-major for a whole column layer)."""
        from torch.nn.attention.flex_attention import create_block_mask

        transposed = self.transposed(kind, L)
        key = ("block", kind, L, transposed, str(device))
        if key not in self._cache:
            T, G, K = self.text_len, self.grid, self.kernel

            def mask_mod(b, h, q, k):
                return allowed(kind, q, k, T, G, K, transposed)

            size = BLOCK_CUDA if torch.device(device).type == "cuda" else BLOCK_CPU
            self._cache[key] = create_block_mask(mask_mod, None, None, L, L, device=device, BLOCK_SIZE=size)
        return self._cache[key]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, bank: MaskBank,
           impl: str = "sdpa") -> torch.Tensor:
    """Masked attention of q, k, v (B, nh, L, hd) with the `kind` mask, by `impl` ("sdpa" | "flex").

    Example: attend(q, k, v, "row", bank, "sdpa") == naive_attention(q, k, v, bank.dense("row", L, cpu))
    """
    L = q.shape[-2]
    if k.shape[-2] != L or L > bank.length:
        raise ConfigError(f"attend needs queries and keys for the same first L <= {bank.length} positions; got "
                          f"{L} queries and {k.shape[-2]} keys")
    # FlexAttention runs whole sequences only: a BlockMask (and a compiled kernel) per prefix length
    # would be rebuilt for every code while sampling. Prefixes take the boolean mask instead.
    if impl == "flex" and bank.flex_failed is None and L == bank.length:
        try:
            out = _attend_flex(q, k, v, kind, bank)
            if out.requires_grad:
                _check_flex_backward(out, q, k, v, kind, bank)
            return out
        except Exception as e:  # noqa: BLE001 -- no compiler, an unsupported shape: fall back, say so once
            bank.flex_failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"FlexAttention failed here ({bank.flex_failed}); using scaled_dot_product_attention "
                          "with the boolean mask instead (same results, no block skipping)", stacklevel=2)
    elif impl not in ("sdpa", "flex"):
        raise ConfigError(f"attention impl {impl!r} is invalid: use sdpa or flex (or auto on the model)")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bank.dense(kind, L, q.device))


def _check_flex_backward(out, q, k, v, kind: str, bank: MaskBank) -> None:
    """Run FlexAttention's backward once, right away, for each (kind, dtype, device) a model trains with.

    Its backward kernel is compiled at the first `loss.backward()`, long after `attend` returned, where a
    failure (no kernel config fits this GPU's shared memory, say) would crash the training step instead
    of falling back. Running it here, on the real shapes, turns that failure into the forward's fallback.
    It costs one extra backward per kind, once; the gradients are thrown away (nothing accumulates).
    """
    key = (kind, q.dtype, str(q.device))
    if key in bank.flex_backward_ok:
        return
    torch.autograd.grad(out, [t for t in (q, k, v) if t.requires_grad], torch.zeros_like(out), retain_graph=True)
    bank.flex_backward_ok.add(key)


def _attend_flex(q, k, v, kind: str, bank: MaskBank) -> torch.Tensor:
    L = q.shape[-2]
    flex = _flex_fn(bank.compile_flex, kind)
    block_mask = bank.block(kind, L, q.device)
    if not bank.transposed(kind, L):
        return flex(q, k, v, block_mask=block_mask)
    order, undo = bank.order(q.device)
    q, k, v = (t.index_select(2, order) for t in (q, k, v))  # column-major (index_select: ~2x faster than [:, :, order])
    return flex(q, k, v, block_mask=block_mask).index_select(2, undo)  # back to raster order
