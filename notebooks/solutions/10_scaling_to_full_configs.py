"""Solutions to the exercises of 10_scaling_to_full_configs.ipynb. Try each one yourself first.

Each block below replaces the exercise cell of the same name; it runs in the notebook's namespace,
after the cells above the exercise (so `math`, `np` and `GIB` = 2**30 exist).
"""

# %% Exercise 10.1
def adam_fp32_memory(n_params):
    per_param = 4 + 4 + 2 * 4                     # fp32 weight, fp32 gradient, Adam's two fp32 moments
    return [per_param, per_param * n_params / 2 ** 30]


# %% Exercise 10.2
def micro_batch_index(s, m, rank, accum, world):
    k = (s - 1) * accum + m                        # this rank's k-th micro-batch overall (counted from 0)
    return k * world + rank                        # the processes take turns through the global stream


# %% Exercise 10.3
def powersgd_saving(m, n, r):
    return 1.0 - min(1.0, r * (m + n) / (m * n))   # send the factors only when they are smaller


# %% Exercise 10.4
def fewest_fsdp_gpus(one):
    row = one["memory"]["fsdp_ckpt"]
    sharded = sum(one["bytes_per_param"]["fsdp"].values()) * one["params"] / GIB   # GiB on one GPU, / g on g GPUs
    fixed = row["total"] - sharded                                                # the gathered unit + activations
    return math.ceil(sharded / (one["usable_gb"] - fixed))
