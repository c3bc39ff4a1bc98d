"""Solutions to the exercises of 03_train_vq_tokenizer.ipynb. Try each one yourself first.

Each block below replaces the exercise cell of the same name; it runs in the notebook's namespace,
after the cells above the exercise (so `math`, `torch` and the notebook's own names exist).
"""

# %% Exercise 3.1
def psnr_uint8(a, b):
    mse = ((a.double() / 255 - b.double() / 255) ** 2).mean().item()
    return 10 * math.log10(1 / mse)


# %% Wrong 3.1: forgets to scale the pixels to [0, 1]
def psnr_uint8(a, b):
    mse = ((a.double() - b.double()) ** 2).mean().item()  # mistake: the squared error of 0..255 values, not of 0..1
    return 10 * math.log10(1 / mse)


# %% Exercise 3.2
def cells_with_objects(images, grid):
    n, H, W, _ = images.shape
    lit = images.amax(dim=-1) > 0                                     # (n, H, W): any channel above 0
    blocks = lit.reshape(n, grid, H // grid, grid, W // grid)          # (n, row, y in cell, col, x in cell)
    return blocks.any(dim=4).any(dim=2)                               # (n, grid, grid)


# %% Wrong 3.2: splits H and W in the wrong order
def cells_with_objects(images, grid):
    n, H, W, _ = images.shape
    lit = images.amax(dim=-1) > 0
    blocks = lit.reshape(n, grid, grid, H // grid, W // grid)  # mistake: (n, row, col, y, x) is not how the H and W axes split
    return blocks.any(dim=4).any(dim=3)


# %% Exercise 3.3
import torch.nn.functional as F

from minidalle import losses


def reconstruct_by_hand(dvae, images):
    with torch.no_grad():
        x = losses.map_pixels(losses.to_unit(images))                 # (B, 3, H, W) in [eps, 1 - eps]
        codes = dvae.encoder(x).argmax(dim=1)                         # (B, h, w)
        one_hot = F.one_hot(codes, dvae.cfg.vocab_size).permute(0, 3, 1, 2).float()  # (B, K, h, w)
        mu = dvae.decoder(one_hot)[:, :3]                             # (B, 3, H, W)
        return losses.logit_laplace_mean(mu)


# %% Wrong 3.3: returns sigmoid(mu), forgetting to undo the eps squeeze
import torch.nn.functional as F

from minidalle import losses


def reconstruct_by_hand(dvae, images):
    with torch.no_grad():
        x = losses.map_pixels(losses.to_unit(images))
        codes = dvae.encoder(x).argmax(dim=1)
        one_hot = F.one_hot(codes, dvae.cfg.vocab_size).permute(0, 3, 1, 2).float()
        mu = dvae.decoder(one_hot)[:, :3]
        return torch.sigmoid(mu)  # mistake: skips unmap, so the picture lies in [eps, 1 - eps], not [0, 1]
