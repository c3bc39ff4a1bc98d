"""Solutions to the exercises of 01_toy_dataset.ipynb. Try each one yourself first.

Each block below replaces the exercise cell of the same name; it runs in the notebook's namespace,
after the cells above the exercise (so `np`, `COLORS`, `data` and the notebook's own names exist).
"""

# %% Exercise 1.1
def square_coverage(cx, cy, side, size, supersample=4):
    out = np.zeros((size, size), dtype=np.float32)
    h = side / 2
    for py in range(size):
        for px in range(size):
            inside = 0
            for sy in range(supersample):
                for sx in range(supersample):
                    x = px + (sx + 0.5) / supersample  # sub-pixel centre, in pixel units
                    y = py + (sy + 0.5) / supersample
                    inside += abs(x - cx) <= h and abs(y - cy) <= h
            out[py, px] = inside / supersample**2
    return out


# %% Wrong 1.1: sub-pixel samples at the corners, not the centres
def square_coverage(cx, cy, side, size, supersample=4):
    out = np.zeros((size, size), dtype=np.float32)
    h = side / 2
    for py in range(size):
        for px in range(size):
            inside = 0
            for sy in range(supersample):
                for sx in range(supersample):
                    x = px + sx / supersample  # mistake: no + 0.5, so the samples sit at sub-pixel corners
                    y = py + sy / supersample
                    inside += abs(x - cx) <= h and abs(y - cy) <= h
            out[py, px] = inside / supersample**2
    return out


# %% Exercise 1.2
def colour_of(image):
    pixels = image.reshape(-1, 3).astype(np.int64)
    brightest = pixels[pixels.sum(axis=1).argmax()]
    return min(COLORS, key=lambda name: ((brightest - np.array(COLORS[name])) ** 2).sum())


# %% Wrong 1.2: the argmax is taken over the wrong axis
def colour_of(image):
    pixels = image.reshape(-1, 3).astype(np.int64)
    brightest = pixels[pixels.sum(axis=0).argmax()]  # mistake: sums the channels' columns, picks pixel 0, 1 or 2
    return min(COLORS, key=lambda name: ((brightest - np.array(COLORS[name])) ** 2).sum())


# %% Exercise 1.3
def position_of(image):
    height, width, _ = image.shape
    weight = image.astype(np.float64).sum(axis=2)  # (H, W) brightness
    ys, xs = np.mgrid[0:height, 0:width]
    x = ((xs + 0.5) * weight).sum() / weight.sum() / width
    y = ((ys + 0.5) * weight).sum() / weight.sum() / height
    return min(data.POSITIONS, key=lambda name: (data.POSITIONS[name][0] - x) ** 2 + (data.POSITIONS[name][1] - y) ** 2)


# %% Wrong 1.3: x and y swapped when unpacking the grid
def position_of(image):
    height, width, _ = image.shape
    weight = image.astype(np.float64).sum(axis=2)
    xs, ys = np.mgrid[0:height, 0:width]  # mistake: np.mgrid gives rows (y) first
    x = ((xs + 0.5) * weight).sum() / weight.sum() / width
    y = ((ys + 0.5) * weight).sum() / weight.sum() / height
    return min(data.POSITIONS, key=lambda name: (data.POSITIONS[name][0] - x) ** 2 + (data.POSITIONS[name][1] - y) ** 2)
