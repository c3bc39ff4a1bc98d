"""Sampling image codes from the transformer: the plain reference loop, and the fast cached sampler.

    text  = encode_prompts(tok, ["a red circle."], layout)            # (P, T) ids, refused when bad
    codes = sample(model, text.repeat_interleave(32, 0), top_k=64)     # (P * 32, N) with a key/value cache
    codes = sample_reference(model, text)                              # (P, N) recomputing everything
    score = log_likelihood(model, text, codes)                         # (B,) log p(codes | caption)
    images = dvae.decode(codes.view(B, G, G))                          # float (B, 3, H, W)

`sample_reference` recomputes the whole sequence for every new code: N full forward passes, slow
but plainly right. `sample` runs the caption once through the model (the prefill), keeps every
layer's keys and values in a cache allocated once, and then feeds one new code per step. Each step
reads, for each layer, only the cached positions that layer's mask allows the new position to see
(`KVCache.keys`: all the caption, and the grid + 1 previous codes for a row layer, the column above
and the left neighbour for a column layer, the past half of the kernel window for the conv layer),
so the two samplers give the same logits (within float rounding) and the same codes under the same
random numbers. Both pick codes with `pick`, so they consume the generator the same way.

What `sample` adds on top:
- filters: temperature (0 = the most likely code), top-k (keep the k most likely codes), top-p
  (keep the smallest set of codes whose probability reaches p), applied in that order;
- classifier-free guidance: logits = uncond + s * (cond - uncond), where "uncond" is the model's
  prediction for the all-padding caption (the caption dropout of training teaches it). The
  conditional and unconditional rows run in one batch (guidance_batched=False: two passes, for
  comparison). s = 1 is plain sampling and costs nothing extra;
- priming: given the first n codes of an image (its top rows), complete the rest (image-to-image);
- batching in chunks sized from the memory a row needs (`rows_per_chunk`), bf16 autocast on CUDA,
  and an optional compiled decode step (`compile=True`, or "auto" for CUDA only): static shapes, one
  CUDA graph per step on a GPU, replayed on a cache whose address never changes (`_cache`).

Everything runs on the model's device, whatever device the caption comes from, and the decode loop
reads nothing back from it (no `.item()`, no data-dependent shapes): on a GPU, the host queues N
steps without waiting for one of them (`infra/syncs.py` counts this in the tests).
"""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .bpe import TextTooLong
from .errors import ConfigError, DataError
from .infra.devices import resolve_precision
from .model import caption_ids
from .viz import to_uint8


# --- choosing a code from logits ---------------------------------------------------------------------
def check_filters(temperature: float, top_k: int = 0, top_p: float = 1.0, guidance: float = 1.0) -> None:
    """Refuse sampling settings that mean nothing, naming the one that is wrong."""
    if not temperature >= 0:  # also catches nan
        raise ConfigError(f"temperature={temperature} is invalid: it must be >= 0 (0 = most likely code)")
    if int(top_k) != top_k or top_k < 0:
        raise ConfigError(f"top_k={top_k} is invalid: it must be a whole number >= 0 (0 = no top-k filter)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} is invalid: it must be in (0, 1] (1 = no top-p filter)")
    if not guidance >= 0:
        raise ConfigError(f"guidance={guidance} is invalid: it must be >= 0 (1 = no guidance, 0 = ignore the caption)")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every code that top-k or top-p removes. logits (B, K) -> (B, K).

    top_k keeps the k largest logits of each row (0 = all). top_p keeps the most likely codes until
    their probability reaches top_p (at least one is always kept). Ties at the cut are all kept.
    Example: softmax [0.5, 0.3, 0.15, 0.05], top_p=0.75 -> keeps the first two
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the codes ranked above each one
        drop_sorted = before >= top_p  # the first code always stays (before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """One code per row of logits (B, K) -> (B, 1): argmax at temperature 0, else one multinomial draw
    from softmax(filtered logits / temperature)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)  # (B, 1)


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond). scale 1 -> cond."""
    return uncond + scale * (cond - uncond)


# --- the reference sampler ---------------------------------------------------------------------------
def _check_prime(model, text: torch.Tensor, prime: torch.Tensor | None) -> torch.Tensor:
    N = model.layout.image_len
    if prime is None:
        return torch.zeros(text.shape[0], 0, dtype=torch.long, device=text.device)
    if prime.ndim != 2 or prime.shape[0] != text.shape[0] or prime.shape[1] >= N:
        raise DataError(f"prime must hold the first n < {N} codes of each image, shape ({text.shape[0]}, n); "
                        f"got {tuple(prime.shape)}")
    if prime.numel() and (int(prime.min()) < 0 or int(prime.max()) >= model.layout.image_vocab):
        raise DataError(f"prime codes must lie in [0, {model.layout.image_vocab}); "
                        f"got {int(prime.min())}..{int(prime.max())}")
    return prime.to(text.device, torch.long)


@torch.no_grad()
def sample_reference(model, text: torch.Tensor, temperature: float = 1.0, *, top_k: int = 0, top_p: float = 1.0,
                     guidance: float = 1.0, prime: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """Draw the image codes after each caption in `text` (B, T), in raster order, by recomputing.

    Every code costs a full forward pass over the caption and the codes so far (two with guidance).
    prime (B, n): the first n codes are given and kept. Same settings as `sample`.
    Example: sample_reference(model, text (4, 32)) -> long (4, 64) for the toy 8x8 grid
    """
    check_filters(temperature, top_k, top_p, guidance)
    device = next(model.parameters()).device
    check_generator(generator, device)
    image = _check_prime(model, text, prime).to(device)
    text = text.to(device)
    was_training = model.training
    model.eval()
    uncond = model.layout.pad_ids(text.device).expand_as(text) if guidance != 1 else None
    try:
        for _ in tqdm(range(image.shape[1], model.layout.image_len), desc="sampling", disable=not progress,
                      leave=False):
            logits = model.next_image_logits(text, image).float()  # (B, K)
            if uncond is not None:
                logits = guide(logits, model.next_image_logits(uncond, image).float(), guidance)
            image = torch.cat([image, pick(logits, temperature, top_k, top_p, generator)], dim=1)
    finally:
        model.train(was_training)
    return image  # (B, N)


# --- the key/value cache -----------------------------------------------------------------------------
class KVCache:
    """Keys and values of every layer for `rows` sequences, allocated once: kv (n_layer, 2, rows, nh, L, hd).

    `keys(kind, p)` is the index tensor of the positions the `kind` mask lets position p attend to
    (built once per model and device from the same masks training uses).
    Example: toy row layer, p = 32 + 20 (image cell 20) -> the 32 caption positions and cells 11..20
    """

    def __init__(self, model, rows: int, device, dtype: torch.dtype):
        cfg, lay = model.cfg, model.layout
        shape = (cfg.n_layer, 2, rows, cfg.n_head, lay.length, cfg.head_dim)
        self.kv = torch.zeros(shape, device=device, dtype=dtype)  # zeros: masked slots must not be NaN
        self.layers = self.kv.unbind(0)  # one (2, rows, nh, L, hd) view per layer
        self.layer_keys = [KVCache.table(model, block.kind, device) for block in model.blocks]
        self.rows = rows
        cells = torch.arange(lay.image_len, device=device)
        with torch.no_grad():  # each grid cell's row + column embedding, looked up once per step
            self.cell_emb = model.row_emb(cells // lay.grid) + model.col_emb(cells % lay.grid)  # (N, C)

    @staticmethod
    def table(model, kind: str, device) -> list[torch.Tensor]:
        """For every position p, the index tensor of the positions the `kind` mask lets p attend to."""
        tables = model.__dict__.setdefault("_kv_keys", {})  # a plain attribute: not a buffer, not saved
        key = (kind, str(device))
        if key not in tables:  # found on the CPU (nonzero on a GPU waits for it), then moved once
            mask = model.bank.dense(kind, model.layout.length, "cpu")
            tables[key] = [row.nonzero().squeeze(1).to(device) for row in mask]
        return tables[key]

    @staticmethod
    def keys(model, kind: str, p: int, device) -> torch.Tensor:
        return KVCache.table(model, kind, device)[p]

    @staticmethod
    def bytes_per_row(model, dtype: torch.dtype) -> int:
        cfg = model.cfg
        return 2 * cfg.n_layer * cfg.n_head * cfg.head_dim * model.layout.length * _itemsize(dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def rows_per_chunk(model, device, dtype: torch.dtype, budget_bytes: int | None = None, limit: int = 1024) -> int:
    """How many sequences to sample at once so that their cache and activations fit `budget_bytes`.

    A row needs its key/value cache (2 n_layer L d numbers) plus the activations of the caption's
    prefill (about 16 T d numbers: the MLP's 4d hidden, q, k, v, the residual, the scores) and the
    logits. Default budget: half the free GPU memory on CUDA, a quarter of the free RAM elsewhere.
    Example: toy on a laptop -> 1024 (the limit); paper 12B in bf16 with 40 GiB to spare -> 32 (1.24 GiB a row)
    """
    if budget_bytes is None:
        budget_bytes = _free_memory(torch.device(device)) // (2 if torch.device(device).type == "cuda" else 4)
    return max(1, min(limit, budget_bytes // row_bytes(model, dtype)))  # at least 1: a row over budget still runs


def row_bytes(model, dtype: torch.dtype) -> int:
    """The memory one sampled row needs (rows_per_chunk's unit): its cache, the prefill's activations, the logits.
    Example: paper 12B in bf16 -> about 1.24 GiB"""
    lay, cfg = model.layout, model.cfg
    d, size = cfg.n_head * cfg.head_dim, _itemsize(dtype)
    return KVCache.bytes_per_row(model, dtype) + 16 * lay.text_len * d * size + 8 * lay.image_vocab


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: assume a modest machine
        return 4 << 30


# --- the cached sampler ------------------------------------------------------------------------------
def prefill(model, cache: KVCache, text: torch.Tensor, prime: torch.Tensor) -> torch.Tensor:
    """Run the caption and the primed codes (B, n) through every layer, filling the cache.

    Returns the logits (B, K) of the next code (code n). The mask rows are the training masks'
    first T + n rows, so this is the reference forward pass on the same prefix.
    """
    T, n = model.layout.text_len, prime.shape[1]
    x = model.embed(text, prime)  # (B, T + n, C)
    for i, block in enumerate(model.blocks):
        mask = model.bank.dense(block.kind, T + n, x.device)
        x = block.forward_cached(x, cache.layers[i], 0, mask=mask)
    return model.image_head(model.ln_f(x[:, -1]))  # (B, K)


def decode_step(model, cache: KVCache, code: torch.Tensor, cell: int) -> torch.Tensor:
    """Feed image code `code` (B, 1) at grid cell `cell`; return the logits (B, K) of the code at cell + 1.

    Each layer writes the new key and value at position T + cell and attends to the cached positions
    its own mask allows (KVCache.keys): no work over the positions the mask excludes.
    """
    p = model.layout.text_len + cell
    x = F.embedding(code, model.image_emb.weight) + cache.cell_emb[cell]  # (B, 1, C): embed_image(code, cell)
    for block, kv, keys in zip(model.blocks, cache.layers, cache.layer_keys):
        x = block.forward_cached(x, kv, p, keys=keys[p])
    ln = model.ln_f
    return F.linear(F.layer_norm(x[:, -1], ln.normalized_shape, ln.weight, ln.bias, ln.eps), model.image_head.weight)


def _static_step(model, kv: torch.Tensor, code: torch.Tensor, cell: torch.Tensor):
    """decode_step with static shapes (for torch.compile and CUDA graphs): the cell is a 0-d tensor,
    every layer attends over the whole cache under its mask row. Same numbers as decode_step."""
    lay = model.layout
    p = lay.text_len + cell
    G = lay.grid
    x = model.image_emb(code) + model.row_emb(cell // G) + model.col_emb(cell % G)  # (B, 1, C)
    for i, block in enumerate(model.blocks):
        row = model.bank.dense(block.kind, lay.length, x.device).index_select(0, p.view(1))  # (1, L)

        def whole_cache(qkv, kv=kv[i], row=row):
            kv.index_copy_(3, p.view(1), qkv[1:])
            return F.scaled_dot_product_attention(qkv[0], kv[0], kv[1], attn_mask=row)

        x = block.step(x, whole_cache)
    return model.image_head(model.ln_f(x[:, -1]))


def _compiled_step(model):
    """The static decode step under torch.compile, built once per model. On CUDA, mode="reduce-overhead"
    records it as a CUDA graph: one launch per step instead of ~40 kernels. A graph replays fixed
    addresses, so the cache it writes into is marked static and reused (`_cache`), and the logits it
    returns live in the graph's own buffer until the next replay: the caller copies them."""
    fn = model.__dict__.get("_compiled_step")
    if fn is None:
        device = next(model.parameters()).device
        mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs on GPU
        fn = torch.compile(lambda kv, code, cell: _static_step(model, kv, code, cell), mode=mode, dynamic=False)
        model.__dict__["_compiled_step"] = fn
    return fn


# The compiled step against the eager one on the CPU (toy model, one thread, interleaved medians of 5,
# torch 2.13): 1.01x the speed at B = 1 and 0.41x at B = 8, after 5-6 s of compiling (more on a cold
# compile cache). Without CUDA graphs there is no launch overhead to remove: it pays on CUDA only.
_CPU_COMPILE = ("sample(compile=True) on the CPU: the compiled decode step measured no faster than eager here "
                "(1.01x at B = 1, 0.41x at B = 8 on the toy model) and costs a compile; it pays on CUDA, where "
                "it runs as a CUDA graph. compile='auto' compiles on CUDA only")


def use_compile(compile, device: torch.device) -> bool:
    """sample's `compile` setting for a model on `device`: True / False as given, "auto" = on CUDA only.
    True on the CPU is honoured, with a warning (it is slower there). Example: use_compile("auto", cpu) -> False"""
    if compile == "auto":
        return device.type == "cuda"
    if compile not in (True, False):
        raise ConfigError(f"compile={compile!r} is invalid: use True, False or 'auto' (compile on CUDA only)")
    if compile and device.type == "cpu":
        warnings.warn(_CPU_COMPILE, stacklevel=3)
    return bool(compile)


def _cache(model, rows: int, device, dtype: torch.dtype, slot: int, keep: bool) -> "KVCache":
    """A KVCache for `rows` sequences. keep=True (the compiled step): one per (rows, dtype, slot) kept on
    the model and reused by every chunk and call, its address marked static for CUDA graphs;
    `release_caches(model)` frees them. keep=False: a new one (freed when sampling ends)."""
    if not keep:
        return KVCache(model, rows, device, dtype)
    pool = model.__dict__.setdefault("_kv_caches", {})
    key = (rows, dtype, str(device), slot)
    if key not in pool:
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor: it outlives this inference call
            cache = KVCache(model, rows, device, dtype)
        torch._dynamo.mark_static_address(cache.kv)  # mutated in place by the graph: same address every call
        pool[key] = cache
    return pool[key]


def release_caches(model) -> None:
    """Free what the compiled sampler keeps on `model`: its key/value caches and its compiled step (with
    its CUDA graphs' memory). The next sample(compile=True) compiles again."""
    model.__dict__.pop("_kv_caches", None)
    model.__dict__.pop("_compiled_step", None)


def sample(model, text: torch.Tensor, temperature: float = 1.0, *, top_k: int = 0, top_p: float = 1.0,
           guidance: float = 1.0, prime: torch.Tensor | None = None, generator: torch.Generator | None = None,
           chunk_size: int | None = None, precision: str = "auto", guidance_batched: bool = True,
           compile: bool | str = False, progress: bool = False, return_logp: bool = False, bar=None):
    """Draw the image codes after each caption in `text` (B, T) with a key/value cache: (B, N) long.

    One row per caption row: to draw n candidates of a prompt, repeat its row n times. Rows are run
    `chunk_size` at a time (default: as many as fit, `rows_per_chunk`); with batched guidance each
    chunk also holds the unconditional twin of every row. precision: "auto" (bf16 autocast on CUDA),
    "fp32" or "bf16". Everything runs on the model's device: the caption and prime are moved there
    (checked first, where they are), and a generator must be on that device too. compile: True runs
    the compiled decode step (a CUDA graph on CUDA; slower on the CPU, which warns), "auto" compiles
    on CUDA only, False (default) runs it eagerly. Under the same generator, settings and chunk size this draws exactly the codes
    `sample_reference` draws. return_logp=True also returns log p(codes | caption) (B,), summed over
    the drawn codes from the model's own conditional logits (before guidance and filters): what
    `log_likelihood` computes, for free. bar: an open tqdm bar (in codes) to advance instead of a new
    one, for callers that sample in several calls (`generate` streams its candidates chunk by chunk).
    Example: sample(model, text (64, 32), temperature=1.0, top_k=32, guidance=2.0) -> long (64, 64)
    """

    check_filters(temperature, top_k, top_p, guidance)
    model.check_inputs(text, torch.zeros(text.shape[0], 0, dtype=torch.long), values=True)  # where the caption is
    prime = _check_prime(model, text, prime)
    device = next(model.parameters()).device
    check_generator(generator, device)
    text, prime = text.to(device), prime.to(device)
    compile = use_compile(compile, device)
    precision = resolve_precision(precision, device)
    dtype = torch.bfloat16 if precision == "bf16" else next(model.parameters()).dtype
    guided = guidance != 1
    twins = 2 if guided and guidance_batched else 1
    if chunk_size is None:
        chunk_size = default_chunk(model, device, precision, guidance)
    elif int(chunk_size) != chunk_size or chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size} is invalid: it must be a whole number >= 1")
    was_training = model.training
    model.eval()
    for kind in set(model.kinds):  # masks and key tables built outside inference mode, so training can reuse them
        KVCache.table(model, kind, device)
    out, logps = [], []
    N, n0 = model.layout.image_len, prime.shape[1]
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=text.shape[0] * (N - n0), desc="sampling codes", disable=not progress, unit="code")
    try:
        # inference_mode, not no_grad: no autograd bookkeeping at all (~12% of a toy step); the results
        # are cloned out of it below, so they can feed a training step later
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        with torch.inference_mode(), autocast:
            for start in range(0, text.shape[0], chunk_size):
                rows = text[start:start + chunk_size]
                codes, logp = _sample_chunk(model, rows, prime[start:start + chunk_size], dtype, temperature,
                                            top_k, top_p, guidance, twins, generator, compile, bar, return_logp)
                out.append(codes)
                logps.append(logp)
    finally:
        model.train(was_training)
        if own_bar:
            bar.close()
    codes = torch.cat(out).clone()
    return (codes, torch.cat(logps).clone()) if return_logp else codes


def check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    """A generator must live where the model samples (torch.multinomial draws on the probabilities' device)."""
    if generator is None:
        return
    have = torch.device(generator.device)
    if have.type != device.type or (device.type != "cpu" and (have.index or 0) != (device.index or 0)):
        raise ConfigError(f"the generator is on {have} but the model samples on {device}: make it there, "
                          f"torch.Generator(device={str(device)!r}).manual_seed(seed)")


def default_chunk(model, device, precision: str = "auto", guidance: float = 1.0) -> int:
    """Rows `sample` runs at once when not told (`rows_per_chunk` for its dtype, halved under guidance,
    whose unconditional twins share the chunk). Example: toy model on the CPU -> 1024"""

    dtype = torch.bfloat16 if resolve_precision(precision, device) == "bf16" else next(model.parameters()).dtype
    return max(1, rows_per_chunk(model, device, dtype) // (2 if guidance != 1 else 1))


def _sample_chunk(model, text, prime, dtype, temperature, top_k, top_p, guidance, twins, generator, compile, bar,
                  return_logp):
    B, N, n0 = text.shape[0], model.layout.image_len, prime.shape[1]
    guided = guidance != 1
    uncond = model.layout.pad_ids(text.device).expand_as(text)
    # the rows each cache holds: [cond ; uncond] in one (batched guidance), or one cache per half
    batches = ([torch.cat([text, uncond])] if twins == 2 else [text, uncond] if guided else [text])
    primes = [prime.repeat(len(b) // B, 1) for b in batches]
    caches = [_cache(model, len(b), text.device, dtype, slot, keep=compile) for slot, b in enumerate(batches)]
    logits = [prefill(model, c, b, p).float() for c, b, p in zip(caches, batches, primes)]
    codes = torch.empty(B, N, dtype=torch.long, device=text.device)
    codes[:, :n0] = prime
    logp = torch.zeros(B, device=text.device)  # log p(drawn codes | caption), from the conditional rows
    step = _compiled_step(model) if compile else None
    cells = torch.arange(N, device=text.device) if compile else None  # the compiled step's cell, as 0-d tensors
    for cell in range(n0, N):
        cond, unc = _split(logits, B, twins, guided)
        nxt = pick(guide(cond, unc, guidance) if guided else cond, temperature, top_k, top_p, generator)  # (B, 1)
        if return_logp:
            logp += torch.log_softmax(cond, dim=-1).gather(1, nxt).squeeze(1)
        codes[:, cell] = nxt[:, 0]
        bar.update(B)
        if cell == N - 1:
            break
        logits = []
        for cache, b in zip(caches, batches):
            fed = nxt if len(b) == B else nxt.repeat(2, 1)  # the same code for a row and its unconditional twin
            if step is not None:
                torch.compiler.cudagraph_mark_step_begin()  # a new replay: the last one's outputs are read
                out = step(cache.kv, fed, cells[cell])
                # copied: a CUDA graph's output is overwritten by its next replay, and two-pass guidance
                # replays it twice per cell (the bf16 -> fp32 cast copies already; fp32 needs a clone)
                logits.append(out.float() if out.dtype != torch.float32 else out.clone())
            else:
                logits.append(decode_step(model, cache, fed, cell).float())
    return codes, logp


def _split(logits: list[torch.Tensor], B: int, twins: int, guided: bool):
    if twins == 2:
        return logits[0][:B], logits[0][B:]
    return logits[0], (logits[1] if guided else None)


# --- prompts, likelihood, and the judge --------------------------------------------------------------
def encode_prompts(tok, prompts: list[str], layout, truncate: bool = False,
                   truncate_flag: str = "--truncate (truncate=True in Python)") -> tuple[torch.Tensor, list[dict]]:
    """Caption ids (P, T) for prompts typed by a person, and a note per prompt of what was changed.

    Refuses (DataError) an empty prompt, and one longer than text.text_len tokens unless truncate=True
    (then it is cut and flagged); the refusal names `truncate_flag`, the way to cut it. Flags, without refusing: letters lowercased by the tokenizer,
    characters outside printable ASCII (encoded byte by byte, pieces a ShapesWorld model never saw).
    Example: encode_prompts(tok, ["A red circle"], layout) -> (ids (1, 32), [{"lowercased": True, ...}])
    """

    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise DataError("no prompts given: pass at least one caption")
    rows, notes = [], []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"prompt {i + 1} is empty: give a caption such as 'a red circle above a blue square'")
        try:
            ids, cut = caption_ids(tok, prompt, layout, truncate=truncate)
        except TextTooLong as e:
            raise DataError(f"prompt {i + 1} ({prompt[:60]!r}) does not fit: it {e.what}; shorten "
                            f"it, or pass {truncate_flag} to cut it") from None
        except DataError as e:
            raise DataError(f"prompt {i + 1} ({prompt[:60]!r}) does not fit: {e}") from None
        odd = sorted({c for c in prompt if not (" " <= c <= "~")})
        notes.append({"prompt": prompt, "cut": cut, "lowercased": bool(getattr(tok, "lowercase", False))
                      and prompt != prompt.lower(), "unusual_characters": "".join(odd)})
        rows.append(ids)
    return torch.tensor(rows, dtype=torch.long), notes


@torch.no_grad()
def log_likelihood(model, text: torch.Tensor, codes: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """log p(codes | caption) under the model, summed over the N codes: (B,) float, in batches.

    The transformer's own score of its samples: the second way `rerank` orders candidates.
    """
    was_training = model.training
    model.eval()
    out = []
    try:
        for s in range(0, len(text), batch_size):
            t, c = text[s:s + batch_size], codes[s:s + batch_size]
            _, logits = model(t, c)  # (b, N, K)
            out.append(torch.log_softmax(logits.float(), -1).gather(-1, c[..., None]).squeeze(-1).sum(1))
    finally:
        model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def draw(model, dvae, tok, captions: list[str], temperature: float = 1.0, batch_size: int = 256,
         seed: int = 0, progress: bool = True, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample per caption with the cached sampler: (codes (n, N), images uint8 (n, H, W, 3)).

    settings: top_k, top_p, guidance, precision... as `sample` takes them.
    Example: draw(model, dvae, tok, ["a red circle."]) -> (long (1, 64), uint8 (1, 32, 32, 3))
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    text, _ = encode_prompts(tok, captions, model.layout)
    codes = sample(model, text.to(device), temperature, generator=gen, chunk_size=batch_size, progress=progress,
                   **settings)
    return codes.cpu(), decode_images(dvae, codes, model.layout.grid)


@torch.no_grad()
def decode_images(dvae, codes: torch.Tensor, grid: int, batch_size: int = 512) -> torch.Tensor:
    """Image codes (n, N) -> uint8 images (n, H, W, 3) through the dVAE's decoder, in batches."""

    dev = next(dvae.parameters()).device
    out = [to_uint8(dvae.decode(codes[s:s + batch_size].view(-1, grid, grid).to(dev)).cpu())
           for s in range(0, len(codes), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


def warn_unguided(model, guidance: float) -> None:
    """Guidance needs a model that learned p(image) alone (model.caption_dropout > 0): say so once."""
    if guidance != 1 and model.cfg.caption_dropout == 0:
        warnings.warn(f"guidance={guidance} with a model trained without caption dropout (model.caption_dropout=0): "
                      "its 'no caption' prediction was never trained, so guidance pushes towards noise",
                      stacklevel=2)
