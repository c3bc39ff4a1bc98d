"""Solutions to the exercises of 09_the_whole_pipeline.ipynb. Try each one yourself first.

Each block below replaces the exercise cell of the same name; it runs in the notebook's namespace,
after the cells above the exercise (so `np`, `torch`, `caption_ids`, `sample`, `decode_images` and
`rerank` exist). Each `Wrong` block is a plausible mistake that the exercise's check must reject.
"""

# %% Exercise 9.1
def best_pick_accuracy(ok, scores):
    top = scores.argmax(axis=1)                                        # (P,) the reranker's pick per prompt
    return float(ok[np.arange(len(ok)), top].mean())


# %% Wrong 9.1: the share of all candidates that are right (what one sample gives), not of the picks
def best_pick_accuracy(ok, scores):
    return float(ok.mean())


# %% Exercise 9.2
def stated_accuracy(checks):
    stated = np.isfinite(checks[:, 0])                                 # prompts whose caption states it
    return float(checks[stated].mean())


# %% Wrong 9.2: counts the candidates of captions that do not state the attribute as wrong
def stated_accuracy(checks):
    return float(np.nan_to_num(checks, nan=0.0).mean())


# %% Exercise 9.3
def sequence_position(layout, row, col):
    return layout.text_len + row * layout.grid + col                   # the caption first, then row by row


# %% Wrong 9.3: row and column exchanged (the codes column by column)
def sequence_position(layout, row, col):
    return layout.text_len + col * layout.grid + row


# %% Exercise 9.4
def text_to_best_image(pipe, prompts, n, seed=0):
    layout = pipe.model.layout
    rows = []
    for prompt in prompts:                                             # the text tokenizer: text_len ids a prompt
        ids, _ = caption_ids(pipe.tok, prompt, layout)
        rows.append(ids)
    text = torch.tensor(rows, dtype=torch.long, device=pipe.device)   # (P, text_len)
    text = text.repeat_interleave(n, dim=0)                            # (P * n, text_len): prompt 0's n rows first
    gen = torch.Generator(device=pipe.device).manual_seed(seed)        # one stream of random numbers for every row
    codes = sample(pipe.model, text, generator=gen)                    # (P * n, grid * grid), in one call
    images = decode_images(pipe.dvae, codes, layout.grid)              # (P * n, H, W, 3) uint8
    captions = [p for p in prompts for _ in range(n)]                  # each image's own caption
    scores = rerank(pipe.clip, pipe.clip_tok, captions, images).view(len(prompts), n)
    best = scores.argmax(dim=1)                                        # (P,) the reranker's pick of each prompt
    keep = torch.arange(len(prompts)) * n + best                       # its row among the P * n
    return images[keep], codes.cpu()[keep]


# %% Wrong 9.4: samples each prompt in a call of its own, so the seed's numbers are drawn in another order
def text_to_best_image(pipe, prompts, n, seed=0):
    layout = pipe.model.layout
    gen = torch.Generator(device=pipe.device).manual_seed(seed)
    images, codes = [], []
    for prompt in prompts:
        ids, _ = caption_ids(pipe.tok, prompt, layout)
        text = torch.tensor([ids] * n, dtype=torch.long, device=pipe.device)     # (n, text_len)
        drawn = sample(pipe.model, text, generator=gen)                            # (n, grid * grid)
        pictures = decode_images(pipe.dvae, drawn, layout.grid)
        best = int(rerank(pipe.clip, pipe.clip_tok, [prompt] * n, pictures).argmax())
        images.append(pictures[best])
        codes.append(drawn[best].cpu())
    return torch.stack(images), torch.stack(codes)
