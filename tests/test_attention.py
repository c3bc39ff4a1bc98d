"""The sparse masks (the paper's Fig. 11 drawn by hand), their schedule, the two execution paths,
and causality proven by gradients."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from minidalle import attention as A
from minidalle.config import get_config
from minidalle.errors import ConfigError

# The paper's Fig. 11 setting: 6 text tokens, then a 4x4 grid of image tokens (22 positions).
T, G = 6, 4

# The image -> image part of each mask, written out by hand: row q = query image token, column k =
# key image token (raster order), "1" = may attend. Read the docstring of attention.py for the rules.
ROW = """
1...............
11..............
111.............
1111............
11111...........
.11111..........
..11111.........
...11111........
....11111.......
.....11111......
......11111.....
.......11111....
........11111...
.........11111..
..........11111.
...........11111
"""
# The tokens above in the same column, itself, and the one on its left in the same row.
COLUMN = """
1...............
11..............
.11.............
..11............
1...1...........
.1..11..........
..1..11.........
...1..11........
1...1...1.......
.1...1..11......
..1...1..11.....
...1...1..11....
1...1...1...1...
.1...1...1..11..
..1...1...1..11.
...1...1...1..11
"""
# A 3x3 window centred on the query, cut to the past; offsets in raster order, so the cell right of
# the last column is the first cell of the next row: query (1, 0) sees (0, 0), (0, 1) and (0, 3).
CONV = """
1...............
11..............
.11.............
1.11............
11.11...........
111.11..........
.111.11.........
..111.11........
...111.11.......
....111.11......
.....111.11.....
......111.11....
.......111.11...
........111.11..
.........111.11.
..........111.11
"""


def _parse(art: str) -> torch.Tensor:
    rows = [line for line in art.strip().splitlines()]
    return torch.tensor([[c == "1" for c in line] for line in rows])


@pytest.mark.parametrize("kind,art", [("row", ROW), ("column", COLUMN), ("conv", CONV)])
def test_masks_match_the_papers_4x4_example_drawn_by_hand(kind, art):
    mask = A.build_mask(kind, T, G, kernel=3)
    assert mask.shape == (22, 22)
    assert torch.equal(mask[:T, :T], torch.ones(T, T, dtype=torch.bool).tril())  # text -> text causal
    assert not mask[:T, T:].any()  # text never sees the image
    assert mask[T:, :T].all()  # every image token sees every text token
    assert torch.equal(mask[T:, T:], _parse(art))


def test_the_row_mask_reaches_back_to_the_token_above():
    # W + 1 = 5 image tokens in the paper's 4x4 example, 33 on its 32x32 grid
    for grid, reach in ((4, 5), (32, 33)):
        mask = A.build_mask("row", 2, grid, kernel=3)
        counts = mask[2:, 2:].sum(dim=1)
        assert int(counts.max()) == reach
        assert counts.tolist() == [min(i + 1, reach) for i in range(grid * grid)]


def _row_rule_in_column_major(text_len, grid):
    """The column mask from its definition, by brute force: the row mask's window (the grid + 1
    most recent tokens) counted in column-major order, cut to the past in raster order."""
    n = grid * grid
    mask = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            (qr, qc), (kr, kc) = divmod(q, grid), divmod(k, grid)
            jq, jk = qc * grid + qr, kc * grid + kr  # column-major indices
            mask[q, k] = 0 <= jq - jk <= grid and k <= q
    return mask


@pytest.mark.parametrize("grid", [2, 3, 4, 5, 8])
def test_the_column_mask_is_the_row_mask_of_the_transposed_image_cut_to_raster_causality(grid):
    mask = A.build_mask("column", 3, grid, kernel=1)
    assert torch.equal(mask[3:, 3:], _row_rule_in_column_major(3, grid))


def _conv_by_window(grid, kernel):
    """The convolutional mask by brute force: every cell of the kernel x kernel window, at raster offset
    dr * grid + dc, that is in the past."""
    n, s = grid * grid, kernel // 2
    mask = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for dr in range(-s, s + 1):
            for dc in range(-s, s + 1):
                k = q + dr * grid + dc
                if 0 <= k <= q:
                    mask[q, k] = True
    return mask


@pytest.mark.parametrize("grid,kernel", [(4, 3), (5, 5), (8, 5), (8, 7), (11, 11), (32, 11)])
def test_the_conv_mask_is_its_window_clipped_to_the_past(grid, kernel):
    mask = A.build_mask("conv", 2, grid, kernel)
    assert torch.equal(mask[2:, 2:], _conv_by_window(grid, kernel))


def test_every_mask_is_causal_and_lets_each_token_see_itself():
    for kind in A.KINDS:
        for transposed in (False, True):
            mask = A.build_mask(kind, 5, 6, kernel=5, transposed=transposed)
            if not transposed:
                assert not mask.triu(1).any(), kind
            assert mask.diagonal().all(), kind


@pytest.mark.parametrize("kind", A.KINDS)
def test_the_transposed_layout_is_the_same_mask_reordered(kind):
    order = A.transpose_order(T, G)
    assert sorted(order.tolist()) == list(range(T + G * G))
    raster = A.build_mask(kind, T, G, 3)
    assert torch.equal(A.build_mask(kind, T, G, 3, transposed=True), raster[order][:, order])


def test_layer_schedule_follows_the_paper():
    assert A.layer_kinds(8) == ["row", "column", "row", "row", "row", "column", "row", "conv"]
    kinds = A.layer_kinds(64)
    assert kinds[-1] == "conv" and kinds.count("column") == 16 and kinds.count("row") == 47
    assert [i + 1 for i, k in enumerate(kinds) if k == "column"] == list(range(2, 63, 4))
    assert A.layer_kinds(1) == ["conv"]
    with pytest.raises(ConfigError, match="n_layer"):
        A.layer_kinds(0)


def test_the_column_mask_needs_transposing_to_skip_blocks():
    raster = A.block_counts("column", 256, 32, 11, block=128)
    transposed = A.block_counts("column", 256, 32, 11, block=128, transposed=True)
    row = A.block_counts("row", 256, 32, 11, block=128)
    assert raster["touched"] == raster["causal"] == 55  # a column reaches back a whole image height
    assert transposed["touched"] == row["touched"] < 55


def test_kernels_that_do_not_fit_the_grid_are_refused():
    for kernel in (0, 2, 9):
        with pytest.raises(ConfigError, match="conv_kernel"):
            A.check_kernel(kernel, 8)
    from minidalle.model import DALLE

    with pytest.raises(ConfigError, match="conv_kernel=11 is invalid for a 8x8 image grid"):
        DALLE.from_config(get_config("toy", {"model.conv_kernel": 11}))
    with pytest.raises(ConfigError, match="odd"):
        get_config("toy", {"model.conv_kernel": 4})


# --- the execution paths -------------------------------------------------------------------------
def _qkv(L, seed=0, heads=2, dim=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, L, dim, generator=g) for _ in range(3)]


@pytest.mark.parametrize("kind", A.KINDS)
@pytest.mark.parametrize("text_len,grid,kernel", [(6, 4, 3), (8, 8, 5)])
def test_naive_sdpa_and_flex_agree(kind, text_len, grid, kernel):
    bank = A.MaskBank(text_len, grid, kernel, compile_flex=False)  # eager FlexAttention: no compiler needed
    # the whole sequence, and a prefix (as while sampling; flex hands prefixes to the boolean mask)
    for L in (bank.length, bank.length - 5):
        q, k, v = _qkv(L)
        naive = A.naive_attention(q, k, v, bank.dense(kind, L, q.device))
        sdpa = A.attend(q, k, v, kind, bank, "sdpa")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a silent fallback to sdpa would make this test pass vacuously
            flex = A.attend(q, k, v, kind, bank, "flex")
        assert torch.allclose(sdpa, naive, atol=1e-5), kind
        assert torch.allclose(flex, naive, atol=1e-5), kind


def test_masks_are_built_once_and_reused():
    bank = A.MaskBank(6, 4, 3, compile_flex=False)
    assert bank.dense("row", 22, "cpu").data_ptr() == bank.dense("row", 9, "cpu").data_ptr()  # one mask, viewed
    assert bank.block("column", 22, "cpu") is bank.block("column", 22, "cpu")


def test_attend_refuses_queries_and_keys_of_different_lengths():
    bank = A.MaskBank(6, 4, 3)
    q, k, v = _qkv(22)
    with pytest.raises(ConfigError, match="same first L"):
        A.attend(q[:, :, -1:], k, v, "row", bank)  # one query against the whole cache: not this function's job


def test_flex_failure_falls_back_to_sdpa_with_one_warning(monkeypatch):
    def broken(compiled, kind):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(A, "_flex_fn", broken)
    bank = A.MaskBank(6, 4, 3)
    q, k, v = _qkv(22)
    with pytest.warns(UserWarning, match="FlexAttention failed here.*no C\\+\\+ compiler"):
        out = A.attend(q, k, v, "row", bank, "flex")
    assert torch.allclose(out, A.attend(q, k, v, "row", bank, "sdpa"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every layer
        A.attend(q, k, v, "row", bank, "flex")


class _ForwardOnly(torch.autograd.Function):
    """Stands in for a FlexAttention whose forward runs and whose backward kernel cannot be built (on a
    GPU: no Triton config fits its shared memory), which shows only at loss.backward()."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("No valid triton configs for the backward")


def test_a_flex_backward_that_fails_falls_back_at_the_forward_with_one_warning(monkeypatch):
    bank = A.MaskBank(6, 4, 3)

    def forward_only(compiled, kind):
        return lambda q, k, v, block_mask: _ForwardOnly.apply(q, k, v, bank.dense(kind, q.shape[-2], q.device))

    monkeypatch.setattr(A, "_flex_fn", forward_only)
    q, k, v = (t.requires_grad_() for t in _qkv(22))
    with pytest.warns(UserWarning, match="FlexAttention failed here.*No valid triton configs"):
        out = A.attend(q, k, v, "row", bank, "flex")
    out.square().sum().backward()  # the training step goes on, on sdpa: no crash at backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    A.attend(q2, k2, v2, "row", bank, "sdpa").square().sum().backward()
    for g, t in zip(grads, (q2, k2, v2)):
        assert torch.allclose(g, t.grad, atol=1e-6)  # the probe's backward added nothing to the gradients
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        A.attend(q, k, v, "row", bank, "flex")


def test_a_working_flex_backward_is_checked_once_per_kind_and_adds_no_gradient(monkeypatch):
    bank = A.MaskBank(6, 4, 3)
    calls = []

    def counted(compiled, kind):
        def run(q, k, v, block_mask):
            calls.append(kind)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bank.dense(kind, q.shape[-2], q.device))
        return run

    monkeypatch.setattr(A, "_flex_fn", counted)
    q, k, v = (t.requires_grad_() for t in _qkv(22))
    for _ in range(2):
        A.attend(q, k, v, "row", bank, "flex").sum().backward()
    assert bank.flex_failed is None and bank.flex_backward_ok == {("row", torch.float32, "cpu")}
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    for _ in range(2):
        A.attend(q2, k2, v2, "row", bank, "sdpa").sum().backward()
    assert torch.allclose(q.grad, q2.grad, atol=1e-6)


def test_compiled_flex_keeps_every_kind_dtype_and_batch_size_inside_dynamos_recompile_limit(monkeypatch):
    """Each mask kind has its own compiled function, whose batch size turns dynamic on its second size:
    3 kinds x 2 dtypes x 4 batch sizes (24 calls) take 12 graphs, none past dynamo's limit of 8 per code
    object. (One compiled flex_attention for everything hit the limit at its 9th graph and fell back.)
    Dynamo traces with its eager backend here: the graphs and guards are the real ones, without inductor."""
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    monkeypatch.setattr(A.torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "eager"}))
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)  # a hit raises: the fallback says it
    A._flex_fn.cache_clear()
    torch._dynamo.reset()
    counters.clear()
    bank = A.MaskBank(8, 4, 3, compile_flex=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # a fallback warning fails the test
            warnings.filterwarnings("ignore", message=".*jit.*")
            for dtype in (torch.float32, torch.bfloat16):
                for B in (1, 2, 4, 8):
                    for kind in A.KINDS:
                        q = torch.randn(B, 2, bank.length, 8, dtype=dtype)
                        with torch.no_grad():
                            out = A.attend(q, q, q, kind, bank, "flex")
                        ref = F.scaled_dot_product_attention(q, q, q, attn_mask=bank.dense(kind, bank.length, "cpu"))
                        assert torch.allclose(out.float(), ref.float(), atol=2e-2)
        assert bank.flex_failed is None
        assert counters["stats"]["unique_graphs"] <= 3 * 8 and counters["frames"]["ok"] >= 3
    finally:
        A._flex_fn.cache_clear()
        torch._dynamo.reset()


def test_choose_impl_says_what_runs_and_why(monkeypatch):
    cpu = torch.device("cpu")
    assert A.choose_impl("auto", cpu, training=True, seq_len=1280)[0] == "sdpa"
    assert A.choose_impl("auto", cpu, training=False, seq_len=1280)[0] == "flex"
    assert A.choose_impl("auto", cpu, training=False, seq_len=96)[0] == "sdpa"
    assert A.choose_impl("auto", torch.device("cuda"), training=True, seq_len=96)[0] == "flex"
    impl, why = A.choose_impl("flex", cpu, training=True, seq_len=96)
    assert impl == "sdpa" and "no CPU backward" in why
    monkeypatch.setattr(A, "flex_available", lambda: (False, "FlexAttention is not in this torch"))
    impl, why = A.choose_impl("flex", torch.device("cuda"), training=False, seq_len=96)
    assert impl == "sdpa" and "not in this torch" in why
    with pytest.raises(ConfigError, match="attn_impl"):
        A.choose_impl("fast", cpu, True, 96)


# --- causality, proven by gradients ----------------------------------------------------------------
@pytest.mark.parametrize("kind", A.KINDS)
def test_no_output_depends_on_a_later_input(kind):
    """d out[t] / d x[s] is exactly zero for every s > t, through q, k and v alike, and the allowed
    inputs do reach the output (so the test could fail)."""
    torch.manual_seed(0)
    bank = A.MaskBank(T, G, 3)
    L, C = bank.length, 8
    proj = torch.nn.Linear(C, 3 * C)
    x = torch.randn(1, L, C, requires_grad=True)
    q, k, v = (t.view(1, L, 2, C // 2).transpose(1, 2) for t in proj(x).split(C, dim=2))
    out = A.attend(q, k, v, kind, bank, "sdpa")  # (1, 2, L, 4)
    mask = bank.dense(kind, L, "cpu")
    for t in range(L):
        (grad,) = torch.autograd.grad(out[:, :, t].sum(), x, retain_graph=True)  # (1, L, C)
        reached = grad[0].abs().sum(dim=1) != 0  # (L,)
        assert not reached[t + 1:].any(), f"{kind}: output {t} depends on a later input"
        assert torch.equal(reached, mask[t]), f"{kind}: output {t} reaches exactly what its mask row allows"
