"""Sampling image codes from the transformer, and reading the samples back with the judge.

    codes  = sample_reference(model, text, temperature=1.0)      # (B, N): one code at a time
    images = dvae.decode(codes.view(B, G, G))                     # float (B, 3, H, W)
    report = evaluate_prompts(model, dvae, tok, captions)         # judge accuracy of one sample per prompt

`sample_reference` recomputes the whole sequence for every new code: slow (N full forward passes),
but plainly right, so it is the reference that a faster sampler with a key/value cache must equal
token for token under the same random numbers.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .errors import ConfigError


@torch.no_grad()
def sample_reference(model, text: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None,
                     progress: bool = False) -> torch.Tensor:
    """Draw grid**2 image codes for each caption in `text` (B, T), in raster order.

    temperature scales the logits before the softmax (1 = the model's own distribution; 0 = always the
    most likely code). The draws come from `generator` (or torch's global RNG), one multinomial per code.
    Example: sample_reference(model, text (4, 32)) -> long (4, 64) for the toy 8x8 grid
    """
    if not temperature >= 0:
        raise ConfigError(f"temperature={temperature} is invalid: it must be >= 0 (0 = most likely code)")
    was_training = model.training
    model.eval()
    B, N = text.shape[0], model.layout.image_len
    image = torch.zeros(B, 0, dtype=torch.long, device=text.device)
    try:
        for _ in tqdm(range(N), desc="sampling", disable=not progress, leave=False):
            logits = model.next_image_logits(text, image).float()  # (B, K)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            image = torch.cat([image, nxt], dim=1)
    finally:
        model.train(was_training)
    return image  # (B, N)


@torch.no_grad()
def draw(model, dvae, tok, captions: list[str], temperature: float = 1.0, batch_size: int = 64,
         seed: int = 0, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample per caption: (codes (n, N), images uint8 (n, H, W, 3)), sampled in batches.

    Example: draw(model, dvae, tok, ["a red circle."]) -> (long (1, 64), uint8 (1, 32, 32, 3))
    """
    from .image_tokenizer import to_uint8
    from .text_to_image import caption_ids

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    text = torch.tensor([caption_ids(tok, c, model.layout)[0] for c in captions], dtype=torch.long, device=device)
    codes, images = [], []
    G = model.layout.grid
    bar = tqdm(total=len(captions), desc="sampling", disable=not progress)
    for start in range(0, len(captions), batch_size):
        part = sample_reference(model, text[start:start + batch_size], temperature, gen)  # (b, N)
        codes.append(part.cpu())
        images.append(to_uint8(dvae.decode(part.view(-1, G, G).to(next(dvae.parameters()).device)).cpu()))
        bar.update(len(part))
    bar.close()
    return torch.cat(codes), torch.cat(images)


def evaluate_prompts(model, dvae, tok, captions: list[str], temperature: float = 1.0, batch_size: int = 64,
                     seed: int = 0, progress: bool = True) -> tuple[dict, torch.Tensor]:
    """The judge's accuracy (per attribute, and "overall" = every stated attribute right) of one
    sample per caption, and the images. Example: -> ({"overall": 0.6, "color": 0.9, ...}, uint8 (n, H, W, 3))"""
    from .judge import evaluate

    _, images = draw(model, dvae, tok, captions, temperature, batch_size, seed, progress)
    return evaluate(list(images), captions, progress=progress), images
