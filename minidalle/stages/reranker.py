"""Training the reranker: its pairs and rivals (reranker_data.py), training, loading, measuring.

    model, trainer, info = train_clip(get_config("toy"))      # `python -m minidalle train clip --preset toy`
    model, cfg, tok = load_clip("runs/toy/clip")               # the newest checkpoint (its BPE checked)
    evaluate_clip(get_config("toy"))                           # recall@k and one-fact accuracy on val and heldout

The model itself, its loss and ranking with it are in clip.py; what it trains on is in reranker_data.py.

Measured (the toy preset, `python -m minidalle train clip --preset toy` on 2 CPU threads of a shared machine):
10,000 pairs and their 28,225 rivals rendered in 15 s, 2,000 updates in 185 s (final loss 0.21). Recall over
512 pairs, image->text @1 / @5: val 0.756 / 1.000, heldout 0.488 / 0.902 (text->image 0.738 / 0.994 and
0.459 / 0.867); ShapesWorld repeats captions, so @1 cannot reach 1. Against one-fact-changed rivals
(`fact_accuracy`) the true image wins 0.999 (val) and 0.998 (heldout) of the time, relations the weakest
(0.99, 0.98); after a trip through the toy dVAE 0.995 and 0.984. With 1,000 updates, relations and swapped
colours stayed near chance on one seed of two. Reranking 16 samples per prompt of the toy transformer
(temperature 1, 256 prompts per split): all facts right in 0.53 of single samples on val, 0.75 of the
reranker's picks, 0.87 when the judge itself picks (the ceiling); heldout 0.37, 0.47, 0.57. Nearly all of
its remaining misses are shapes: blobs between a circle and a diamond that the judge reads one way.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..infra import checkpoint as ckpt
from .. import data
from ..scale import distributed
from ..bpe import Tokenizer
from ..config import Config
from ..errors import CheckpointError, ConfigError, DataError
from ..train import Trainer
from ..infra.devices import pick_device, seed_everything
from ..clip import CLIP, clip_loss, embed_images, embed_texts, recall_at_k
from .reranker_data import FACTS, ShapesPairs, build_clip_pairs, morphs, one_fact_changed, render_morphed


# --- training and loading --------------------------------------------------------------------------------
def _recorded_bpe(root: Path) -> str | None:
    for _, path in reversed(ckpt.list_checkpoints(root)):
        try:
            return (ckpt.read_config(path).get("tokenizers") or {}).get("bpe")
        except CheckpointError:
            continue
    return None


def train_clip(cfg: Config, resume: bool | str = False, start_over: bool = False, progress: bool = True,
               log: Callable[[str], None] = print, out_flag: str | None = None,
               callbacks: dict | None = None, trust_sharded: bool = False) -> tuple[CLIP, Trainer, dict]:
    """Train the reranker with cfg.clip and cfg.clip_train; checkpoints go to clip_train.out_dir.

    The text tokenizer is the transformer's (text.out_dir; trained first when missing). Its checksum is
    stored with every checkpoint, and resuming with another one is refused.
    Example: train_clip(get_config("smoke")) -> (CLIP, Trainer, {"pairs": 512, "train_seconds": 3.1, ...})
    """
    from .text_tokenizer import prepare_bpe

    tc = cfg.clip_train
    seed_everything(tc.seed)
    model = CLIP.from_config(cfg)  # a bad shape is refused before any tokenizer is trained
    ctx = distributed.setup(tc.parallel, pick_device(tc.device, "clip_train.device"), tc.dist_timeout, "clip_train")
    with distributed.main_first(ctx, "preparing the text tokenizer"):  # rank 0 trains it if missing
        tok, bpe = prepare_bpe(cfg, log if ctx.main else (lambda _: None), "[train clip]")
    root = Path(tc.out_dir) / "checkpoints"
    recorded = None if start_over or resume is False else \
        _recorded_bpe(root) if resume is True else (ckpt.read_config(resume).get("tokenizers") or {}).get("bpe")
    if recorded is not None and recorded != bpe:
        raise CheckpointError(f"the checkpoints in {root} were trained with another text tokenizer (bpe.model "
                              f"{recorded[:12]}) than the one in {cfg.text.out_dir} ({bpe[:12]}); its ids would mean "
                              "something else to the model. Start over with --start-over, or point --text.out_dir "
                              "at the tokenizer it was trained with")
    t0 = time.perf_counter()
    train, val = build_clip_pairs(cfg, tok, progress, log)
    render_seconds = time.perf_counter() - t0
    config = {**cfg.to_dict(), "tokenizers": {"bpe": bpe}}
    trainer = Trainer(model, tc, train, clip_loss, eval_data=val, config=config, progress=progress, log=log,
                      out_flag=out_flag or "--clip_train.out_dir", section="clip_train")
    for event, fns in (callbacks or {}).items():
        for fn in fns if isinstance(fns, (list, tuple)) else [fns]:
            trainer.add_callback(event, fn)
    t0 = time.perf_counter()
    trainer.fit(resume=resume, start_over=start_over, trust_sharded=trust_sharded)
    info = {"pairs": len(train) if isinstance(train, ShapesPairs) else None,
            "hard_negatives": int((train.kind >= 0).sum()) - len(train) if isinstance(train, ShapesPairs) else 0,
            "render_seconds": round(render_seconds, 1), "train_seconds": round(time.perf_counter() - t0, 1),
            "params": sum(p.numel() for p in model.parameters()), "bpe": bpe}
    return model, trainer, info


def _checkpoint_folder(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or the newest valid one in a run folder (its checkpoints/) or a checkpoints/ folder."""
    path = Path(path)
    if (path / ckpt.MANIFEST_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        if root.is_dir() and ckpt.list_checkpoints(root):
            found = ckpt.latest_valid_checkpoint(root)
            if found is None:
                raise CheckpointError(f"none of the checkpoints in {root} can be read")
            return found
    raise CheckpointError(f"no reranker checkpoint at {path}; train one with `python -m minidalle train clip`")


def load_clip(path: str | os.PathLike, bpe: str | os.PathLike | None = None,
              ema: bool = True, trust_sharded: bool = False) -> tuple[CLIP, Config, Tokenizer]:
    """Rebuild a trained reranker: (model in eval mode, its Config, the BPE tokenizer it was trained with).

    `path` is a checkpoint folder or a run folder (its newest valid checkpoint). The BPE is read from `bpe`
    (a bpe.model file or its folder), else from the run's text.out_dir, and refused unless its checksum is
    the one recorded in the checkpoint. ema=True uses the EMA of the weights when the run kept one.
    A sharded checkpoint is read only with trust_sharded=True (checkpoint.sharded_refusal says why).
    Example: model, cfg, tok = load_clip("runs/toy/clip")
    """
    from .text_tokenizer import BPE_FILE, _file_sha256

    folder = _checkpoint_folder(path)
    kind = ckpt.stage_of(ckpt.read_config(folder))  # before the weights: a transformer's is named as one
    if kind != "reranker":
        raise ckpt.wrong_stage(folder, kind, "reranker")
    loaded = ckpt.read_checkpoint(folder, trust_sharded=trust_sharded)
    config = copy.deepcopy(loaded.config)
    ids = config.pop("tokenizers")
    if not isinstance(ids.get("bpe"), str):
        raise CheckpointError(f"{folder}/config.json records no text tokenizer checksum (tokenizers.bpe)")
    cfg = Config.from_dict(config)
    model = CLIP.from_config(cfg)
    tensors = loaded.tensors
    if ema and isinstance(loaded.state.get("ema"), dict):
        tensors = {**tensors, **loaded.state["ema"]}
    ckpt.apply_weights(model, tensors, folder / ckpt.MODEL_FILE)
    # Where the BPE may be: as asked; else where the run's config put it, or beside the run folder
    # (RUN/bpe next to RUN/clip, the layout `make demo` writes), whichever holds the recorded one.
    places = [Path(bpe)] if bpe is not None else [Path(cfg.text.out_dir), folder.parent.parent.parent / "bpe"]
    files = [p / BPE_FILE if p.is_dir() else p for p in places]
    found = [f for f in files if f.is_file()]
    match = next((f for f in found if _file_sha256(f) == ids["bpe"]), None)
    if match is None:
        if found:
            raise CheckpointError(f"{found[0]} is another text tokenizer (sha256 {_file_sha256(found[0])[:12]}) than "
                                  f"the one the reranker in {folder} was trained with ({ids['bpe'][:12]}); its ids "
                                  "would mean something else to the model. Pass bpe=<the bpe.model it was trained with>")
        raise CheckpointError(f"the reranker in {folder} reads captions with the text tokenizer it was trained with; "
                              f"there is no {' or '.join(str(f) for f in files)}. Pass bpe=<its bpe.model>")
    return model.eval(), cfg, Tokenizer.load(match)


def finished_clip(cfg: Config) -> Path | None:
    """The newest valid reranker checkpoint in clip_train.out_dir that finished clip_train.max_steps, if any."""
    path = ckpt.latest_valid_checkpoint(Path(cfg.clip_train.out_dir) / "checkpoints")
    if path is None or ckpt.verify_checkpoint(path)["step"] < cfg.clip_train.max_steps:
        return None
    return path


def heldout_recall(model: CLIP, tok: Tokenizer, data_cfg, n: int | None = None, ks=(1, 5)) -> dict:
    """`recall_at_k` over the first n held-out emoji (default data.n_heldout; there are 214): images and
    captions training never saw. Captions longer than text.text_len are cut, as in training.

    Example: heldout_recall(model, tok, get_config("small").data) -> {"i2t@1": 0.3, "t2i@1": 0.3, ..., "n": 214}
    """
    from ..data import build_dataset

    if data_cfg.dataset != "emoji":
        raise DataError(f"heldout_recall reads the held-out emoji; data.dataset is {data_cfg.dataset!r} "
                        "(ShapesWorld: evaluate_clip)")
    ds = build_dataset(data_cfg, "heldout")
    k = min(n or data_cfg.n_heldout, len(ds))
    return recall_at_k(model, tok, ds.images[:k], list(ds.captions[:k]), ks, truncate=True)


def fact_accuracy(model: CLIP, tok: Tokenizer, split: str, n: int, image_size: int, seed: int = 0,
                  batch_size: int = 256) -> dict:
    """How often the reranker prefers the truth to a one-fact-changed rival, per fact, on n ShapesWorld samples
    of `split` (each with every fact one_fact_changed can change):

    - "image": for the caption, its own image scores above the changed scene's image (what reranking needs:
      one prompt, candidate images);
    - "text": for the image, its own caption scores above the changed scene's caption ("count" has none);
    - "morph" (image only): its own image above one with a circle, square or diamond pushed past halfway to
      another shape (`morphs`), the rival the reranker meets most among sampled images.
    "overall" averages over the facts of FACTS (not "morph").

    Example: fact_accuracy(model, tok, "val", 512, 32) -> {"image": {"color": 0.99, ...}, "text": {...}, "n": {...}}
    """
    ds = data.ShapesWorld(split, image_size, seed, n)
    truth_images, truth_text, rival_images, rival_text, facts = [], [], [], [], []
    for j in range(n):
        scene, text = ds.example(j)
        rng = np.random.default_rng([seed, 11, data._SPLIT_IDS[split], j])
        for neg in one_fact_changed(scene, text, rng, k=len(FACTS), avoid_heldout=False):
            truth_images.append(j)
            truth_text.append(text)
            rival_images.append(data.render(neg.scene, image_size))
            rival_text.append(neg.caption)
            facts.append(neg.fact)
        ps = morphs(scene, rng, past=True)
        if ps is not None:
            truth_images.append(j), truth_text.append(text), facts.append("morph"), rival_text.append(None)
            rival_images.append(render_morphed(scene, image_size, ps))
    if not facts:
        raise DataError(f"no one-fact-changed rivals for {n} {split} samples")
    images = [data.render(ds.example(j)[0], image_size) for j in range(n)]
    own_img = embed_images(model, np.stack(images), batch_size)[torch.tensor(truth_images)]  # (m, E)
    rival_img = embed_images(model, np.stack(rival_images), batch_size)
    captions = embed_texts(model, tok, truth_text, batch_size)
    image_wins = ((own_img * captions).sum(-1) > (rival_img * captions).sum(-1)).tolist()
    has_text = [k for k, t in enumerate(rival_text) if t is not None]
    rival_caps = embed_texts(model, tok, [rival_text[k] for k in has_text], batch_size)
    text_wins = dict(zip(has_text, ((own_img[has_text] * captions[has_text]).sum(-1)
                                    > (own_img[has_text] * rival_caps).sum(-1)).tolist()))
    out = {"image": {}, "text": {}, "n": {}}
    for fact in FACTS + ("morph",):
        ks = [k for k, f in enumerate(facts) if f == fact]
        out["n"][fact] = len(ks)
        out["image"][fact] = float(np.mean([image_wins[k] for k in ks])) if ks else None
        tk = [k for k in ks if k in text_wins]
        out["text"][fact] = float(np.mean([text_wins[k] for k in tk])) if tk else None
    scored = [k for k, f in enumerate(facts) if f != "morph"]
    out["image"]["overall"] = float(np.mean([image_wins[k] for k in scored])) if scored else None
    out["text"]["overall"] = float(np.mean(list(text_wins.values()))) if text_wins else None
    return out


def evaluate_clip(cfg: Config, n: int = 512, checkpoint: str | os.PathLike | None = None,
                  model: CLIP | None = None, tok: Tokenizer | None = None, facts: bool = True,
                  trust_sharded: bool = False) -> dict:
    """Recall@1/@5 both ways over the first n `val` and `heldout` ShapesWorld pairs, and (facts=True) the
    one-fact-changed accuracy of `fact_accuracy` on them; for the emoji, recall over the first n held-out
    emoji (`heldout_recall`; key "heldout" only). Uses `model` and `tok` when given, else loads
    `checkpoint` (default: the newest in clip_train.out_dir).

    Example: evaluate_clip(get_config("toy")) -> {"val": {"i2t@1": 0.5, ...}, "heldout": {...}, "facts": {...}}
             evaluate_clip(get_config("small")) -> {"heldout": {"i2t@1": 0.3, ..., "n": 214}, ...}
    """
    if cfg.data.dataset not in ("shapes", "emoji"):
        raise DataError(f"eval clip measures retrieval on ShapesWorld's val and heldout splits or the held-out "
                        f"emoji; data.dataset is {cfg.data.dataset!r}, which has no evaluation split")
    path = None
    if model is None:
        path = checkpoint or cfg.clip_train.out_dir
        model, mcfg, tok = load_clip(path, trust_sharded=trust_sharded)
        model = model.to(pick_device(cfg.clip_train.device, "clip_train.device"))
    elif tok is None:
        raise ConfigError("evaluate_clip(model=...) needs the tokenizer too (tok=...)")
    out = {"n": n, "checkpoint": str(_checkpoint_folder(path)) if path is not None else None}
    if cfg.data.dataset == "emoji":
        out["heldout"] = heldout_recall(model, tok, replace(cfg.data, image_size=model.image_size), n)
        out["n"] = out["heldout"]["n"]
        return out
    for split in ("val", "heldout"):
        images, captions = data.ShapesWorld(split, model.image_size, cfg.data.seed, n).batch(0, n)
        out[split] = recall_at_k(model, tok, images, captions)
        if facts:
            out[f"facts_{split}"] = fact_accuracy(model, tok, split, n, model.image_size, cfg.data.seed)
    return out
