"""Solutions to the exercises of 05_sparse_attention.ipynb. Try each one yourself first.

Each block below replaces the exercise cell of the same name; it runs in the notebook's namespace,
after the cells above the exercise (so `torch`, `build_mask` and `transpose_order` exist).
"""

# %% Exercise 5.1
def row_image_mask(grid):
    i = torch.arange(grid * grid)
    d = i[:, None] - i[None, :]              # (grid**2, grid**2): how far back the key is
    return (d >= 0) & (d <= grid)            # the past, at most grid tokens back


# %% Exercise 5.2
def column_from_row(text_len, grid):
    row = build_mask("row", text_len, grid)                    # read as a mask over the transposed layout
    where = torch.argsort(transpose_order(text_len, grid))     # raster position -> transposed place
    in_raster = row[where][:, where]                           # [p, k] = row[where[p], where[k]]
    return in_raster & torch.ones_like(in_raster).tril()       # cut to raster causality


# %% Exercise 5.3
def conv_image_mask(grid, kernel):
    s = kernel // 2
    window = torch.tensor([r * grid + c for r in range(s + 1) for c in range(-s, s + 1) if r * grid + c >= 0])
    i = torch.arange(grid * grid)
    return torch.isin(i[:, None] - i[None, :], window)         # (grid**2, grid**2)


# %% Exercise 5.4
def tiles_touched(mask, block):
    L = mask.shape[0]
    n = -(-L // block)                                         # tiles per side, rounded up
    padded = torch.zeros(n * block, n * block, dtype=torch.bool)
    padded[:L, :L] = mask
    return padded.view(n, block, n, block).any(dim=3).any(dim=1)   # (n, n)
