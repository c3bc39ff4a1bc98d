"""Solutions to the exercises of 00_setup_check.ipynb. Try each one yourself first.

Each block below replaces the exercise cell of the same name; it runs in the notebook's namespace,
after the cells above the exercise (so `math`, `np`, `torch` and the notebook's own names exist).
"""

# %% Exercise 0.1
import math


def lr_schedule(step, lr, min_lr, warmup, max_steps):
    if step <= warmup:
        return lr * step / warmup
    if step >= max_steps:
        return min_lr
    progress = (step - warmup) / (max_steps - warmup)  # 0 at the end of warm-up, 1 at max_steps
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


# %% Wrong 0.1: the cosine decays to 0, not to min_lr
import math


def lr_schedule(step, lr, min_lr, warmup, max_steps):
    if step <= warmup:
        return lr * step / warmup
    if step >= max_steps:
        return min_lr
    progress = (step - warmup) / (max_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * lr  # mistake: forgets the min_lr floor
