"""Solutions to the exercises of 05_sparse_attention.ipynb. Try each one yourself first.

Each block below replaces the exercise cell of the same name; it runs in the notebook's namespace,
after the cells above the exercise (so `torch`, `math`, `build_mask` and `transpose_order` exist).
"""

# %% Exercise 5.1
def row_image_mask(grid):
    i = torch.arange(grid * grid)
    d = i[:, None] - i[None, :]              # (grid**2, grid**2): how far back the key is
    return (d >= 0) & (d <= grid)            # the past, at most grid tokens back


# %% Wrong 5.1: the band one token too narrow (d < grid: the cell straight above is left out)
def row_image_mask(grid):
    i = torch.arange(grid * grid)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < grid)


# %% Exercise 5.2
def column_from_row(text_len, grid):
    row = build_mask("row", text_len, grid)                    # read as a mask over the transposed layout
    where = torch.argsort(transpose_order(text_len, grid))     # raster position -> transposed place
    in_raster = row[where][:, where]                           # [p, k] = row[where[p], where[k]]
    return in_raster & torch.ones_like(in_raster).tril()       # cut to raster causality


# %% Wrong 5.2: the row mask taken as it is, in raster order, with no transposition
def column_from_row(text_len, grid):
    row = build_mask("row", text_len, grid)
    return row & torch.ones_like(row).tril()


# %% Exercise 5.3
def conv_image_mask(grid, kernel):
    s = kernel // 2
    window = torch.tensor([r * grid + c for r in range(s + 1) for c in range(-s, s + 1) if r * grid + c >= 0])
    i = torch.arange(grid * grid)
    return torch.isin(i[:, None] - i[None, :], window)         # (grid**2, grid**2)


# %% Wrong 5.3: the window's offsets without the d >= 0 cut: cells after the query are let in
def conv_image_mask(grid, kernel):
    s = kernel // 2
    window = torch.tensor([r * grid + c for r in range(s + 1) for c in range(-s, s + 1)])
    i = torch.arange(grid * grid)
    return torch.isin(i[:, None] - i[None, :], window)


# %% Exercise 5.4
def tiles_touched(mask, block):
    L = mask.shape[0]
    n = -(-L // block)                                         # tiles per side, rounded up
    padded = torch.zeros(n * block, n * block, dtype=torch.bool)
    padded[:L, :L] = mask
    return padded.view(n, block, n, block).any(dim=3).any(dim=1)   # (n, n)


# %% Wrong 5.4: the number of tiles rounded down (L // block): the last, partial tile is lost
def tiles_touched(mask, block):
    n = mask.shape[0] // block
    return mask[:n * block, :n * block].reshape(n, block, n, block).any(dim=3).any(dim=1)


# %% Exercise 5.5
def tiled_attention(q, k, v, mask, block):
    L, hd = q.shape[-2], q.shape[-1]
    out = torch.zeros_like(q)
    computed = 0
    for start in range(0, L, block):
        rows = slice(start, min(start + block, L))                  # this tile of queries
        m = mask[rows]                                              # (b, L): their mask rows
        tiles = [t for t in range(0, L, block) if m[:, t:t + block].any()]   # key tiles with an allowed pair
        cols = torch.cat([torch.arange(t, min(t + block, L)) for t in tiles])
        computed += len(tiles)
        scores = q[..., rows, :] @ k[..., cols, :].transpose(-1, -2) / math.sqrt(hd)   # (B, nh, b, |cols|)
        scores = scores.masked_fill(~m[:, cols], float("-inf"))    # the mask still applies inside a tile
        out[..., rows, :] = torch.softmax(scores, dim=-1) @ v[..., cols, :]
    return out, computed


# %% Wrong 5.5: the empty tiles are skipped but the mask is not applied inside the touched ones
def tiled_attention(q, k, v, mask, block):
    L, hd = q.shape[-2], q.shape[-1]
    out, computed = torch.zeros_like(q), 0
    for start in range(0, L, block):
        rows = slice(start, min(start + block, L))
        tiles = [t for t in range(0, L, block) if mask[rows, t:t + block].any()]
        cols = torch.cat([torch.arange(t, min(t + block, L)) for t in tiles])
        computed += len(tiles)
        scores = q[..., rows, :] @ k[..., cols, :].transpose(-1, -2) / math.sqrt(hd)
        out[..., rows, :] = torch.softmax(scores, dim=-1) @ v[..., cols, :]
    return out, computed
