"""The text tokenizer's stage: train the run's BPE model once on the training captions, and read it back.

    summary = train_text_tokenizer(cfg)          # `python -m minidalle train bpe`: writes text.out_dir/bpe.model
    tok, sha = prepare_bpe(cfg)                  # the run's tokenizer (trained first if missing) and its checksum

The transformer and the reranker read captions with the same BPE model, so their ids mean the same;
a transformer's checkpoints record the model's sha256, and sampling with another one is refused.
Captions longer than `text.text_len` tokens are counted and cut, never silently dropped.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable


from ..bpe import RegexTokenizer, Tokenizer
from ..config import Config
from ..data import ShapesWorld, build_dataset, longest_caption
from ..errors import DataError

BPE_FILE = "bpe.model"


# --- the text tokenizer's stage ----------------------------------------------------------------------
def training_captions(data, n: int | None = None) -> list[str]:
    """The captions of the first n training samples (all of data.n_train for ShapesWorld by default).

    ShapesWorld captions are drawn without rendering images; other datasets are read item by item.
    """
    ds = build_dataset(data, "train")
    if isinstance(ds, ShapesWorld):
        return [ds.example(i)[1] for i in range(n or len(ds))]
    captions = []
    for _, text in ds:
        captions.append(text)
        if n and len(captions) >= n:
            break
    return captions


def train_text_tokenizer(cfg: Config, log: Callable[[str], None] = print) -> dict:
    """The text tokenizer on the training captions: bpe.model, bpe.vocab and tokenizer.json in text.out_dir.

    Refuses (DataError, nothing written) when a ShapesWorld caption would not fit `text.text_len`: the
    transformer reads exactly that many text positions, so such a caption would be cut in training
    (real captions are cut and counted), and when the captions run out of pairs to merge before
    `text.vocab_size` (the tokenizer would not have the size the transformer is built for).
    """
    tc = cfg.text
    captions = training_captions(cfg.data)
    t0 = time.time()
    tok = RegexTokenizer(lowercase=tc.lowercase).train(captions, tc.vocab_size)
    seconds = time.time() - t0
    if tok.vocab_size < tc.vocab_size:  # the corpus ran out of pairs to merge (the trainer warned)
        raise DataError(f"the {len(captions)} training captions allow only {tok.vocab_size} tokens ({len(tok.merges)} "
                        f"merges, then no pair is left to merge); text.vocab_size is {tc.vocab_size}. Set "
                        f"--text.vocab_size={tok.vocab_size} or lower")
    lengths = [len(tok.encode(c)) for c in captions]
    over = [i for i, n in enumerate(lengths) if n > tc.text_len]
    if over:
        worst = max(over, key=lengths.__getitem__)
        what = (f"{len(over)} of {len(captions)} training captions are longer than text.text_len={tc.text_len} "
                f"tokens with this tokenizer ({len(tok.merges)} merges), e.g. {captions[worst][:80]!r} "
                f"({lengths[worst]} tokens)")
        if cfg.data.dataset == "shapes":  # every ShapesWorld caption must fit: a cut one is a config mistake
            raise DataError(f"{what}; they would be cut in training. Raise --text.text_len, or --text.vocab_size "
                            "so that words merge into fewer tokens")
        # Real captions have a long tail; refusing the run for a few would block it. They are cut,
        # counted here and again with the transformer's figures.
        log(f"[train bpe] warning: {what}; they will be cut to {tc.text_len} tokens")
    out = Path(tc.out_dir)
    model, vocab, hf, aside = _save_bpe(tok, out, log)
    summary = {"stage": "bpe", "captions": len(captions), "captions_cut": len(over),
               "vocab_size": tok.vocab_size, "merges": len(tok.merges),
               "seconds": round(seconds, 2), "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths),
               "model": str(model), "out": str(out), "set_aside": str(aside) if aside else None}
    log(f"[train bpe] {len(captions)} captions, {len(tok.merges)} merges in {seconds:.1f} s -> {model}, {vocab}, {hf}")
    log(f"[train bpe] tokens per caption: mean {summary['mean_tokens']:.1f}, max {max(lengths)} "
        f"(text.text_len={tc.text_len}): " + (f"{len(over)} will be cut" if over else "every training caption fits"))
    if cfg.data.dataset == "shapes":  # ShapesWorld's captions are finite: the longest any split can hold
        longest = longest_caption(lambda text: len(tok.encode(text)))
        summary["longest_possible_tokens"] = len(tok.encode(longest))
        fits = "fits" if summary["longest_possible_tokens"] <= tc.text_len else "DOES NOT FIT: prompts may be cut"
        log(f"[train bpe] the longest caption ShapesWorld can write takes {summary['longest_possible_tokens']} "
            f"tokens ({fits}): {longest!r}")
    return summary


BPE_FILES = (BPE_FILE, "bpe.vocab", "tokenizer.json")  # what train_text_tokenizer writes into text.out_dir


def _save_bpe(tok, out: Path, log) -> tuple[Path, Path, Path, Path | None]:
    """Write the tokenizer's files into `out`. An earlier, different bpe.model there is not overwritten:
    its files move into out/set-aside-<time>/ first (models trained with it record its checksum and still
    need it), and `log` says so. The same tokenizer again changes nothing on disk.
    Returns (bpe.model, bpe.vocab, tokenizer.json, the set-aside folder or None)."""
    import shutil

    from ..infra.files import set_aside_folder

    out.mkdir(parents=True, exist_ok=True)
    stage = out / f".tmp-bpe-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        model, vocab = tok.save(stage / "bpe")
        hf = tok.export_hf(stage / "tokenizer.json")
        old, aside = out / BPE_FILE, None
        if old.is_file() and _file_sha256(old) == _file_sha256(model) and all((out / f).is_file() for f in BPE_FILES):
            log(f"[train bpe] {out} already holds this very tokenizer (bpe.model {_file_sha256(old)[:12]}); kept")
            return old, out / "bpe.vocab", out / "tokenizer.json", None
        present = [out / f for f in BPE_FILES if (out / f).exists()]
        if old.is_file():
            aside = set_aside_folder(out)
            for f in present:
                os.replace(f, aside / f.name)
            log(f"[train bpe] the earlier text tokenizer in {out} (bpe.model {_file_sha256(aside / BPE_FILE)[:12]}) "
                f"is set aside in {aside}: a transformer or reranker trained with it records that checksum and needs "
                "it back (move the files back, or point --text.out_dir there)")
        for f in (model, vocab, hf):
            os.replace(f, out / f.name)
        return out / model.name, out / vocab.name, out / hf.name, aside
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_bpe(cfg: Config, log: Callable[[str], None] = print, tag: str = "[train]") -> tuple[Tokenizer, str]:
    """(BPE tokenizer, sha256 of its bpe.model): the one in text.out_dir is reused, a missing one trained.

    The stages that read captions (the transformer, the reranker) share it, so their ids mean the same.
    Example: prepare_bpe(get_config("toy")) -> (RegexTokenizer with 446 tokens, "3f9a...")
    """
    bpe_path = Path(cfg.text.out_dir) / BPE_FILE
    if not bpe_path.is_file():
        log(f"{tag} no text tokenizer at {bpe_path}: training it first")
        train_text_tokenizer(cfg, log=log)
    tok = Tokenizer.load(bpe_path)
    if tok.vocab_size != cfg.text.vocab_size:
        raise DataError(f"the text tokenizer {bpe_path} has {tok.vocab_size} tokens; text.vocab_size is "
                        f"{cfg.text.vocab_size}. Retrain it (`python -m minidalle train bpe`) or set --text.vocab_size")
    log(f"{tag} text tokenizer: {bpe_path} ({tok.vocab_size} tokens)")
    return tok, _file_sha256(bpe_path)


