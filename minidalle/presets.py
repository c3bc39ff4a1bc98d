"""The config ladder as data: each preset is a dict of "section.field" -> value over the dataclass defaults.

    from minidalle.presets import PRESETS
    PRESETS["toy"]["model.n_layer"]        # -> the toy transformer's depth
    get_config("toy")                      # (config.py) builds a Config from one of these

`smoke` is what CI and every notebook run (seconds on a CPU, every code path); `toy` trains the whole
DALL·E on a laptop CPU in about ten minutes; `small` takes real captions at 64x64 on one GPU; `paper` keeps
the paper's numbers (docs/paper.md lists them with their sections). SMOKE_CAPS are the compute knobs
that MINIDALLE_SMOKE=1 caps for any preset; architecture numbers are never touched.
"""

from __future__ import annotations


# Compute knobs capped under MINIDALLE_SMOKE=1 (architecture numbers are never touched),
# for the data and for every training section.
_TRAIN_CAPS = {"max_steps": 20, "batch_size": 8, "warmup_steps": 2, "eval_every": 10, "eval_batches": 2,
               "ckpt_every": 10}
SMOKE_CAPS: dict[str, int] = {
    "data.n_train": 512,
    "data.n_val": 64,
    "data.n_heldout": 64,
    **{f"{section}.{k}": v for section in ("train", "dvae_train", "clip_train") for k, v in _TRAIN_CAPS.items()},
}


# The paper's stage-2 optimiser (AdamW betas 0.9 / 0.96, weight decay 4.5e-2, clip the grad norm at 4),
# shared by every preset's `train` section (the transformer's).
STAGE2_TRAIN: dict[str, object] = {"train.beta2": 0.96, "train.weight_decay": 4.5e-2, "train.grad_clip": 4.0}

# --- the ladder --------------------------------------------------------------------------------
# Each preset is a dict of "section.field" -> value on top of the dataclass defaults.
PRESETS: dict[str, dict[str, object]] = {
    "smoke": {  # CI and every notebook: seconds on a CPU, exercises every code path
        **SMOKE_CAPS,
        "data.image_size": 16,
        "train.log_every": 1,
        "train.out_dir": "runs/smoke",
        "dvae.vocab_size": 64,
        "dvae.hidden": 16,
        "dvae.code_dim": 16,
        "dvae.schedule_scale": 0.0001,
        "dvae.likelihood": "logit_laplace_binned",  # as in toy
        "dvae_train.log_every": 1,
        "dvae_train.out_dir": "runs/smoke/dvae",
        "text.vocab_size": 446,  # as in toy
        "text.text_len": 32,
        "text.out_dir": "runs/smoke/bpe",
        **STAGE2_TRAIN,
        "train.out_dir": "runs/smoke/transformer",
        "model.n_layer": 3,  # row, column, conv: one layer of each kind
        "model.n_head": 2,
        "model.head_dim": 16,
        "model.conv_kernel": 3,  # the 4x4 grid of 16x16 images
        "clip.image_channels": 8,
        "clip.image_downsamples": 2,  # 16x16 -> 4x4
        "clip.text_width": 32,
        "clip.text_layers": 1,
        "clip.text_heads": 2,
        "clip.embed_dim": 32,
        "clip.hard_negatives": 1,
        "clip_train.lr": 3e-3,
        "clip_train.min_lr": 3e-4,
        "clip_train.log_every": 1,
        "clip_train.out_dir": "runs/smoke/clip",
    },
    "toy": {  # ShapesWorld 32x32: minutes on a laptop CPU
        "data.image_size": 32,
        # Two objects in 2 of 3 training scenes (ShapesWorld's own mix, and val's and heldout's, is 1 in 2): binding
        # two objects is what the toy learns last (docs/paper.md, "Composition"); with it, one-object captions were
        # still right for 0.86-0.92 of single val samples over 3 seeds.
        "data.two_objects": 0.67,
        "train.out_dir": "runs/toy",
        "dvae.vocab_size": 256,  # K (paper 8192): ShapesWorld's 4x4-pixel cells need far fewer codes
        "dvae.hidden": 32,  # paper 256
        "dvae.schedule_scale": 0.0067,  # tau over 1k updates, beta over 34 (paper: 150k and 5k)
        # Deviations from the paper, each measured on toy runs (notebook 03 lists them):
        # - the likelihood is scored per 8-bit level: ShapesWorld's exact-black background makes the
        #   continuous density unbounded (losses.py says how); with it, every reconstruction came out in one colour.
        # - beta keeps the paper's KL weight per pixel-channel: a paper code covers 8x8x3 = 192 pixel-channels,
        #   a toy code 4x4x3 = 48, so 6.6 * 48 / 192 = 1.65 (with 6.6 the judge read 0.16-0.73 over 5 runs).
        "dvae.likelihood": "logit_laplace_binned",
        "dvae.kl_max": 1.65,
        "dvae_train.max_steps": 1_200,
        "dvae_train.batch_size": 32,
        # - the optimiser: the paper's AdamW runs lr 1e-4 with betas (0.9, 0.999) over 1.2M updates. Over
        #   1,200, beta2 = 0.999 averages squared gradients over ~1,000 updates, i.e. the whole run; 0.99
        #   follows them over ~100. Measured over seeds (judge on val reconstructions): lr 1e-3 <= 0.17;
        #   5e-3 with 0.999 from 0.54 to 0.99 (8 seeds, GPU); 8e-3 with 0.99 >= 0.98 on 8 of 9 seeds, 0.76 on one (CPU).
        "dvae_train.lr": 8e-3,
        "dvae_train.min_lr": 8e-4,
        "dvae_train.beta2": 0.99,
        "dvae_train.out_dir": "runs/toy/dvae",
        # The text tokenizer (paper: 16,384 tokens, 256 positions). ShapesWorld's captions use 55 words;
        # 190 merges make each of them one token, and the training captions run out of pairs there (seed 0
        # allows 191, seeds 1 and 2 allow 190). Then the longest caption ShapesWorld can write (data.longest_caption)
        # is 15 tokens. With 384 (128 merges) rare words stayed in pieces and a training caption took 33.
        "text.vocab_size": 446,  # 256 bytes + 190 merges
        # 16 positions: the longest caption and one pad. With 32, three positions in four were pads and an update
        # took 1.2x as long (8.5 against 10.2 updates a second, 2 cores); a longer prompt is cut, with a warning.
        "text.text_len": 16,
        "text.out_dir": "runs/toy/bpe",
        # Stage 2 on the 8x8 grid: 32 text + 64 image tokens, d_model 128 over 4 layers (~1M parameters).
        # On 2 CPU cores the toy is compute-bound and the number of updates decides the judge's score
        # (docs/paper.md, "Sizing the toy transformer", has the runs behind these numbers):
        # - no BPE dropout and no caption dropout (paper: 10% BPE dropout; caption dropout is for guidance).
        #   With both at 0.1, 1,500 updates drew the caption's colour 0.73 of the time, 0.93 without.
        # - 3,000 updates at lr 3e-3: all attributes right on 0.56 of val samples (shape 0.71); 1,500 at 2e-3
        #   left it at 0.39 (shape 0.51). With 16 text positions 3,500 updates take what 3,000 took with 32
        #   (about 6.5 minutes on 2 quiet cores), and the whole demo stays inside 10 minutes.
        **STAGE2_TRAIN,
        "text.dropout": 0.0,
        "model.caption_dropout": 0.0,
        "train.max_steps": 3_500,
        "train.batch_size": 32,
        "train.lr": 3e-3,  # the paper's 4.5e-4 is for batch 1024 over 430k updates
        "train.min_lr": 3e-4,
        "train.warmup_steps": 100,
        "train.out_dir": "runs/toy/transformer",
        "model.n_layer": 4,  # row, column, row, conv
        "model.n_head": 4,
        "model.head_dim": 32,  # d_model 128
        "model.conv_kernel": 5,
        # The reranker (~0.5M parameters): a 16-32-64-channel CNN to a 4x4 map, a 2-layer text transformer of width 64,
        # a 128-d embedding. Each of 10,000 training pairs (rendered once, ~15 s) brings 2 one-fact-changed scenes and
        # 1 shape pushed past halfway to another (clip.py), so a batch of 64 pairs holds ~250 images. Measured on
        # 2 CPU threads (figures in clip.py), with 1,000 updates colour, shape, size, position and count
        # were right >= 0.97 of the time against one-fact-changed rivals, but relations and swapped colours were
        # learned on one seed of two (0.93 vs 0.65); 2,000 learned them (0.97-0.99 on val and heldout), in 185 s.
        "clip.image_channels": 16,
        "clip.text_width": 64,
        "clip.text_heads": 2,
        "clip.train_pairs": 10_000,
        "clip_train.max_steps": 2_000,
        "clip_train.batch_size": 64,
        "clip_train.lr": 2e-3,
        "clip_train.min_lr": 2e-4,
        "clip_train.warmup_steps": 50,
        "clip_train.weight_decay": 0.05,
        "clip_train.eval_every": 250,
        "clip_train.eval_batches": 4,
        "clip_train.out_dir": "runs/toy/clip",
    },
    "small": {  # real captions (emoji or a folder) at 64x64: one GPU, under an hour
        "data.dataset": "emoji",
        "data.image_size": 64,
        "train.max_steps": 20_000,
        "train.batch_size": 128,
        "train.out_dir": "runs/small",
        "dvae.vocab_size": 1024,
        "dvae.hidden": 128,
        "dvae.blocks_per_group": 2,
        "dvae.schedule_scale": 0.1,
        "dvae.likelihood": "logit_laplace_binned",  # emoji sit on flat white: same reason as toy
        "dvae.kl_max": 1.65,  # x4 downsampling as in toy: 6.6 * 48 / 192
        "dvae_train.max_steps": 20_000,
        "dvae_train.out_dir": "runs/small/dvae",
        # The training emoji's 3,730 captions use 1,703 distinct words and run out of pairs to merge at 4,063
        # tokens (3,807 merges). 2,048 makes most words one token (mean 5.2 tokens a caption, max 17; the
        # held-out ones 5.4, max 20) and keeps subwords for the words of new phrases.
        "text.vocab_size": 2_048,
        "text.text_len": 64,
        "text.out_dir": "runs/small/bpe",
        **STAGE2_TRAIN,
        "train.lr": 1e-3,
        "train.min_lr": 1e-4,
        "train.warmup_steps": 500,
        "train.out_dir": "runs/small/transformer",
        "model.n_layer": 8,
        "model.n_head": 8,
        "model.head_dim": 32,  # d_model 256
        "model.conv_kernel": 7,  # the 16x16 grid
        "clip.image_channels": 32,
        "clip.image_downsamples": 4,  # 64x64 -> 4x4
        "clip.image_extra_convs": 1,
        "clip.text_width": 256,
        "clip.text_layers": 4,
        "clip.text_heads": 4,
        "clip.embed_dim": 256,
        "clip.hard_negatives": 0,  # real captions: in-batch negatives only
        "clip.morph_negatives": 0,
        "clip.morph_jitter": 0.0,
        "clip_train.max_steps": 10_000,
        "clip_train.batch_size": 256,
        "clip_train.lr": 1e-3,
        "clip_train.min_lr": 1e-4,
        "clip_train.warmup_steps": 500,
        "clip_train.out_dir": "runs/small/clip",
    },
    "paper": {  # the paper's 256x256 images from user shards; many GPUs
        "data.dataset": "tar",
        "data.image_size": 256,
        "train.max_steps": 430_000,
        "train.batch_size": 1024,
        "train.out_dir": "runs/paper",
        "dvae.vocab_size": 8192,
        "dvae.hidden": 256,
        "dvae.blocks_per_group": 2,
        "dvae.n_groups": 4,
        "dvae_train.max_steps": 1_200_000,
        "dvae_train.lr": 1e-4,
        "dvae_train.min_lr": 1.25e-6,
        "dvae_train.weight_decay": 1e-4,
        "dvae_train.batch_size": 512,
        "dvae_train.out_dir": "runs/paper/dvae",
        "text.out_dir": "runs/paper/bpe",
        **STAGE2_TRAIN,
        "train.lr": 4.5e-4,
        "train.min_lr": 4.5e-6,  # the paper halves on plateau (5 times); a cosine floor stands in for it
        "train.warmup_steps": 5_000,
        "train.ema_decay": 0.99,
        "train.out_dir": "runs/paper/transformer",
        "model.n_layer": 64,
        "model.n_head": 62,
        "model.head_dim": 64,  # d_model 3968
        "model.conv_kernel": 11,
        # The paper reranks with OpenAI's CLIP (ViT, 400M pairs); this stands in for it at 256x256.
        "clip.image_channels": 64,
        "clip.image_downsamples": 6,  # 256x256 -> 4x4
        "clip.image_extra_convs": 1,
        "clip.text_width": 512,
        "clip.text_layers": 12,
        "clip.text_heads": 8,
        "clip.embed_dim": 512,
        "clip.hard_negatives": 0,
        "clip.morph_negatives": 0,
        "clip.morph_jitter": 0.0,
        "clip_train.max_steps": 100_000,
        "clip_train.batch_size": 4096,  # contrastive learning wants big batches (CLIP: 32,768)
        "clip_train.lr": 5e-4,
        "clip_train.min_lr": 5e-6,
        "clip_train.warmup_steps": 2_000,
        "clip_train.weight_decay": 0.2,  # CLIP's
        "clip_train.beta2": 0.98,  # CLIP's
        "clip_train.out_dir": "runs/paper/clip",
    },
}
