"""Solutions to the exercises of 10_scaling_to_full_configs.ipynb. Try each one yourself first.

Each block below replaces the exercise cell of the same name; it runs in the notebook's namespace,
after the cells above the exercise (so `math`, `np`, `GIB` = 2**30, `Layout`, `layer_kinds` and
`build_mask` exist). Each solution is followed by a plausible wrong answer, which its check must
reject (the notebook tests run both).
"""

# %% Exercise 10.1
def adam_fp32_memory(n_params):
    per_param = 4 + 4 + 2 * 4                     # fp32 weight, fp32 gradient, Adam's two fp32 moments
    return [per_param, per_param * n_params / 2 ** 30]


# %% Wrong 10.1: GB (10^9 bytes) instead of GiB (2^30 bytes)
def adam_fp32_memory(n_params):
    per_param = 4 + 4 + 2 * 4
    return [per_param, per_param * n_params / 1e9]


# %% Exercise 10.2
def micro_batch_index(s, m, rank, accum, world):
    k = (s - 1) * accum + m                        # this rank's k-th micro-batch overall (counted from 0)
    return k * world + rank                        # the processes take turns through the global stream


# %% Wrong 10.2: each rank reads a contiguous run of its accum micro-batches (rank-major, not interleaved)
def micro_batch_index(s, m, rank, accum, world):
    return ((s - 1) * world + rank) * accum + m


# %% Exercise 10.3
def powersgd_saving(m, n, r):
    return 1.0 - min(1.0, r * (m + n) / (m * n))   # send the factors only when they are smaller


# %% Wrong 10.3: no clamp, so factors larger than the matrix give a negative saving
def powersgd_saving(m, n, r):
    return 1.0 - r * (m + n) / (m * n)


# %% Exercise 10.4
def fsdp_memory(cfg, gpus, micro_batch):
    mc, lay = cfg.model, Layout.from_config(cfg)
    d, s, b, r = mc.n_head * mc.head_dim, lay.length, micro_batch, mc.mlp_ratio
    # one block: 2 LayerNorms (weight + bias), qkv and proj with biases, the MLP's two matrices with biases
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (r * d * d + r * d) + (r * d * d + d)
    # the rest: text embedding and head (text_classes rows each), text positions, image embedding and head,
    # row and column embeddings, the final LayerNorm; the heads have no bias
    rest = d * (2 * lay.text_classes + lay.text_len + 2 * lay.image_vocab + 2 * lay.grid + 2)
    P = mc.n_layer * block + rest
    unit = max(block, rest)                        # FSDP holds one unit whole: the larger of the two
    weights = (4 * P / gpus + 2 * unit) / GIB      # sharded fp32 masters + the unit's bf16 copy
    gradients = (4 * P / gpus + 4 * unit) / GIB    # sharded fp32 gradients + the unit's before reduce-scatter
    optimizer = (8 + (4 if cfg.train.ema_decay > 0 else 0)) * P / gpus / GIB   # two moments (+ EMA)
    kinds = layer_kinds(mc.n_layer)
    per_kind = {k: build_mask(k, lay.text_len, lay.grid, mc.conv_kernel).float().mean().item() for k in set(kinds)}
    density = sum(per_kind[k] for k in kinds) / len(kinds)
    one_layer = s * b * d * (18 + 4 * r) + 5 * mc.n_head * s * s * b * density      # recomputed in full
    logits = 4 * b * ((lay.text_len - 1) * lay.text_classes + lay.image_len * lay.image_vocab)   # fp32
    activations = (mc.n_layer * 2 * s * b * d + one_layer + logits) / GIB          # + each layer's input
    return [weights, gradients, optimizer, activations, weights + gradients + optimizer + activations]


# %% Wrong 10.4: the gathered unit taken to be one block, though the paper's embeddings and heads are larger
def fsdp_memory(cfg, gpus, micro_batch):
    mc, lay = cfg.model, Layout.from_config(cfg)
    d, s, b, r = mc.n_head * mc.head_dim, lay.length, micro_batch, mc.mlp_ratio
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (r * d * d + r * d) + (r * d * d + d)
    rest = d * (2 * lay.text_classes + lay.text_len + 2 * lay.image_vocab + 2 * lay.grid + 2)
    P = mc.n_layer * block + rest
    unit = block
    weights = (4 * P / gpus + 2 * unit) / GIB
    gradients = (4 * P / gpus + 4 * unit) / GIB
    optimizer = (8 + (4 if cfg.train.ema_decay > 0 else 0)) * P / gpus / GIB
    kinds = layer_kinds(mc.n_layer)
    per_kind = {k: build_mask(k, lay.text_len, lay.grid, mc.conv_kernel).float().mean().item() for k in set(kinds)}
    density = sum(per_kind[k] for k in kinds) / len(kinds)
    one_layer = s * b * d * (18 + 4 * r) + 5 * mc.n_head * s * s * b * density
    logits = 4 * b * ((lay.text_len - 1) * lay.text_classes + lay.image_len * lay.image_vocab)
    activations = (mc.n_layer * 2 * s * b * d + one_layer + logits) / GIB
    return [weights, gradients, optimizer, activations, weights + gradients + optimizer + activations]


# %% Exercise 10.5
def fewest_fsdp_gpus(one):
    row = one["memory"]["fsdp_ckpt"]
    sharded = sum(one["bytes_per_param"]["fsdp"].values()) * one["params"] / GIB   # GiB on one GPU, / g on g GPUs
    fixed = row["total"] - sharded                                                # the gathered unit + activations
    return math.ceil(sharded / (one["usable_gb"] - fixed))


# %% Wrong 10.5: rounds the number of GPUs down instead of up
def fewest_fsdp_gpus(one):
    row = one["memory"]["fsdp_ckpt"]
    sharded = sum(one["bytes_per_param"]["fsdp"].values()) * one["params"] / GIB
    fixed = row["total"] - sharded
    return int(sharded / (one["usable_gb"] - fixed))
