"""Stage 2 end to end: the tokenizers it reads, pairs of (caption ids, image codes), training, loading.

    dvae, bpe, ids = prepare_tokenizers(cfg)             # reuse finished ones in the run folder, else train
    train, val = build_pairs(cfg, dvae, bpe, ids)         # Pairs: batch_at(i) -> (text (B, T), codes (B, N))
    model, trainer, info = train_transformer(cfg)         # `python -m minidalle train transformer`
    model, cfg, ids = load_transformer(checkpoint)         # weights (the EMA when there is one) + config
    guided = train_guided(cfg, caption_dropout=0.2)        # a trained run, taught p(image) too, for guidance

The transformer never sees pixels. Each training image is encoded once by the dVAE (argmax codes,
cached on disk by `image_tokenizer.encode_dataset`, keyed by the tokenizer's weight checksum), and
its caption is turned into `text.text_len` ids with BPE dropout (`text.dropout`, drawn afresh every
time a sample is read, from a seed fixed by the sample's place in the run, so a resume is exact).

A transformer's checkpoints record the checksums of the dVAE weights and the BPE model they were
trained with; resuming or sampling with other tokenizers is refused, since their codes or ids would
mean something else to the model.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..infra import checkpoint as ckpt
from ..scale import distributed
from ..attention import choose_impl
from ..bpe import Tokenizer
from ..config import Config, validate
from ..data import ShapesWorld, build_dataset, eval_split
from ..errors import CheckpointError, ConfigError, DataError
from .image_tokenizer import encode_dataset, load_dvae, tokenizer_id, train_dvae
from ..model import DALLE, Layout, dalle_loss
from ..train import Trainer
from ..infra.devices import pick_device, seed_everything
from ..model import caption_ids
from ..sampling import draw
from .text_tokenizer import BPE_FILE, _file_sha256, prepare_bpe


# --- the tokenizers stage 2 reads ---------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizerIds:
    """Which tokenizers a transformer was trained with: their checksums (and where they were)."""

    dvae: str  # sha256 of the dVAE checkpoint's model.safetensors
    bpe: str  # sha256 of bpe.model
    dvae_checkpoint: str = ""  # the folder it came from (information only; the checksum decides)

    def to_dict(self) -> dict:
        return {"dvae": self.dvae, "bpe": self.bpe, "dvae_checkpoint": self.dvae_checkpoint}


def finished_dvae(cfg: Config) -> Path | None:
    """The dVAE checkpoint in dvae_train.out_dir that finished dvae_train.max_steps, if any."""
    path = ckpt.latest_valid_checkpoint(Path(cfg.dvae_train.out_dir) / "checkpoints")
    if path is None or ckpt.verify_checkpoint(path)["step"] < cfg.dvae_train.max_steps:
        return None
    return path


def prepare_tokenizers(cfg: Config, progress: bool = True, log: Callable[[str], None] = print,
                       out_flag: str | None = None, trust_sharded: bool = False) -> tuple:
    """(dVAE in eval mode, BPE tokenizer, TokenizerIds): finished ones in the run folder are reused;
    a missing or unfinished dVAE is trained (or continued), a missing BPE model trained. A dVAE
    trained under fsdp (a sharded checkpoint) is read only with trust_sharded=True."""
    done = finished_dvae(cfg)
    if done is None and distributed.launched_world() > 1:
        raise ConfigError(f"no finished image tokenizer in {cfg.dvae_train.out_dir}, and under torchrun the stages run "
                          "one at a time: train it first with `python -m minidalle train dvae --preset "
                          f"{cfg.preset}` (or under torchrun with --dvae_train.parallel=ddp), then this command")
    if done is None:
        log(f"[train transformer] no finished image tokenizer in {cfg.dvae_train.out_dir}: training it first "
            f"({cfg.dvae_train.max_steps} updates; an unfinished run there is continued)")
        train_dvae(cfg, resume=True, progress=progress, out_flag=out_flag, trust_sharded=trust_sharded)
        done = finished_dvae(cfg)
    dvae, dvae_cfg = load_dvae(done, trust_sharded=trust_sharded)
    if (dvae_cfg.dvae.vocab_size, dvae_cfg.dvae.n_groups) != (cfg.dvae.vocab_size, cfg.dvae.n_groups):
        raise CheckpointError(f"the image tokenizer in {done} has K={dvae_cfg.dvae.vocab_size}, n_groups="
                              f"{dvae_cfg.dvae.n_groups}; this config asks for K={cfg.dvae.vocab_size}, n_groups="
                              f"{cfg.dvae.n_groups}. Point --dvae_train.out_dir at a matching tokenizer")
    log(f"[train transformer] image tokenizer: {done} (K={cfg.dvae.vocab_size})")
    tok, bpe_sha = prepare_bpe(cfg, log, "[train transformer]")
    ids = TokenizerIds(tokenizer_id(done), bpe_sha, str(done))
    return dvae, tok, ids


@dataclass
class Pairs:
    """Caption ids and image codes for one split, read by index: `pairs(i)` is batch i.

    Batches walk a fresh permutation of the n pairs each epoch (seeded by seed + epoch), and each
    caption is BPE-encoded with dropout seeded by its sample number: batch i is a pure function of i.
    """

    codes: torch.Tensor  # (n, N) long, raster order
    captions: list[str]
    tok: Tokenizer
    layout: Layout
    batch_size: int
    seed: int = 0
    dropout: float = 0.0  # BPE dropout (training only)
    shuffle: bool = True
    plain: torch.Tensor = field(init=False)  # (n, T) the captions encoded without dropout
    cut: int = field(init=False)  # how many captions were longer than text_len and cut
    _perms: dict = field(init=False, default_factory=dict)

    def __post_init__(self):
        if len(self.codes) != len(self.captions) or len(self.codes) == 0:
            raise DataError(f"pairs need as many captions as images (and at least one): {len(self.codes)} images, "
                            f"{len(self.captions)} captions")
        rows, self.cut = [], 0
        for c in self.captions:
            ids, was_cut = caption_ids(self.tok, c, self.layout, truncate=True)
            rows.append(ids)
            self.cut += was_cut
        self.plain = torch.tensor(rows, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.codes)

    def _index(self, sample: int) -> int:
        epoch, j = divmod(sample, len(self))
        if not self.shuffle:
            return j
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(len(self), generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self._perms[epoch][j])

    def __call__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        samples = range(i * self.batch_size, (i + 1) * self.batch_size)
        idx = [self._index(s) for s in samples]
        if self.dropout > 0:
            text = torch.tensor([caption_ids(self.tok, self.captions[j], self.layout, self.dropout,
                                             seed=self.seed * 1_000_003 + s, truncate=True)[0]
                                 for j, s in zip(idx, samples)], dtype=torch.long)
        else:
            text = self.plain[idx]
        return text, self.codes[idx]  # (B, T), (B, N)


def build_pairs(cfg: Config, dvae, tok: Tokenizer, ids: TokenizerIds, progress: bool = True) -> tuple[Pairs, Pairs | None]:
    """Training pairs (BPE dropout on) and evaluation pairs (`eval_pairs`: ShapesWorld's val, the held-out
    emoji; None for folders and shards). The evaluation pairs hold what train.eval_batches batches read.

    Example: build_pairs(get_config("small"), dvae, tok, ids) -> (3,730 emoji pairs, 214 held-out ones)
    """
    bs, tc = cfg.train.batch_size, cfg.train
    train = _split_pairs(cfg, dvae, tok, ids.dvae, "train", cfg.data.n_train, bs, cfg.text.dropout, True, progress)
    if cfg.data.dataset == "shapes" and train.cut:
        raise DataError(f"{train.cut} ShapesWorld captions are longer than text.text_len={cfg.text.text_len}")
    if cfg.data.dataset == "shapes":  # an endless split: the pairs of eval_batches batches, no more
        return train, eval_pairs(cfg, dvae, tok, ids.dvae, min(cfg.data.n_val, bs * tc.eval_batches), progress=progress)
    val = eval_pairs(cfg, dvae, tok, ids.dvae, progress=progress)
    if val is not None:  # a finite split: eval_batches batches cover it about once
        val.batch_size = max(1, min(bs, math.ceil(len(val) / tc.eval_batches)))
    return train, val


def eval_pairs(cfg: Config, dvae, tok: Tokenizer, dvae_id: str, n: int | None = None,
               batch_size: int | None = None, progress: bool = True) -> Pairs | None:
    """Pairs of the split evaluations read (`data.eval_split`), in order and without BPE dropout: the
    first n of ShapesWorld's val (default data.n_val) or of the held-out emoji (default data.n_heldout,
    at most all 214 of them); None for the folder and tar datasets, which have no such split.
    dvae_id: the dVAE's weight checksum (`TokenizerIds.dvae`), the key of its cached codes.

    Example: eval_pairs(get_config("small"), dvae, tok, ids.dvae) -> Pairs of 214 held-out emoji
    """
    split = eval_split(cfg.data)
    if split is None:
        return None
    n = n or (cfg.data.n_val if split == "val" else cfg.data.n_heldout)
    return _split_pairs(cfg, dvae, tok, dvae_id, split, n, batch_size or cfg.train.batch_size, 0.0, False, progress)


def _split_pairs(cfg: Config, dvae, tok: Tokenizer, dvae_id: str, split: str, n: int, batch_size: int,
                 dropout: float, shuffle: bool, progress: bool) -> Pairs:
    """The first n (image codes, caption) pairs of a split, the codes read from or written to the dVAE's cache."""
    cache = Path(cfg.dvae_train.out_dir) / "codes"
    ds = build_dataset(cfg.data, split)
    if isinstance(ds, ShapesWorld):
        codes = encode_dataset(dvae, ds, n, cache, dvae_id, progress=progress)
        captions = [ds.example(i)[1] for i in range(n)]
    else:
        n = min(n, len(ds)) if hasattr(ds, "__len__") else n
        codes, captions = encode_dataset(dvae, ds, n, cache, dvae_id, progress=progress, with_captions=True)
    return Pairs(codes.flatten(1), captions, tok, Layout.from_config(cfg), batch_size, cfg.train.seed, dropout, shuffle)


@torch.no_grad()
def pairs_loss(model: DALLE, pairs: Pairs, batch_size: int = 64) -> dict:
    """The mean `dalle_loss` over every pair once (eval mode: no caption dropout; no BPE dropout), weighted
    by batch size, so each pair counts the same. Runs on the model's device.

    Example: pairs_loss(model, eval_pairs(cfg, dvae, tok, ids.dvae)) -> {"loss": 3.9, "text_loss": 1.2,
             "image_loss": 4.3, "n": 214}
    """
    device, was = next(model.parameters()).device, model.training
    model.eval()
    sums, n = {}, len(pairs)
    try:
        for s in range(0, n, batch_size):
            text, codes = pairs.plain[s:s + batch_size].to(device), pairs.codes[s:s + batch_size].to(device)
            loss, parts = dalle_loss(model, (text, codes))
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(text)
    finally:
        model.train(was)
    return {**{k: v / n for k, v in sums.items()}, "n": n}


# --- training -----------------------------------------------------------------------------------------
def _recorded_ids(root: Path) -> dict | None:
    """The tokenizer checksums stored with the newest readable checkpoint under root, if any."""
    for _, path in reversed(ckpt.list_checkpoints(root)):
        try:
            return ckpt.read_config(path).get("tokenizers")
        except CheckpointError:
            continue
    return None


def train_transformer(cfg: Config, resume: bool | str = False, start_over: bool = False, progress: bool = True,
                      out_flag: str | None = None, log: Callable[[str], None] = print,
                      callbacks: dict | None = None, trust_sharded: bool = False) -> tuple[DALLE, Trainer, dict]:
    """Train stage 2 with cfg.model and cfg.train; checkpoints go to train.out_dir.

    trust_sharded: read a dVAE trained under fsdp, and resume a sharded checkpoint outside an fsdp run
    (their index is a pickle: checkpoint.sharded_refusal); an fsdp run resumes its own without it.

    Returns the model, the trainer and a summary: pairs, captions cut, the tokenizers' checksums.
    Example: train_transformer(get_config("smoke")) -> (DALLE, Trainer, {"pairs": 512, ...})
    """
    seed_everything(cfg.train.seed)
    layout = Layout.from_config(cfg)
    # Under fsdp the model is built on the meta device (no memory) and each process materialises
    # only its own slices (distributed.materialize): the 12B config never exists whole in one place.
    with torch.device("meta") if cfg.train.parallel == "fsdp" else nullcontext():
        model = DALLE(cfg.model, layout)  # a bad shape is refused before any tokenizer is trained
    ctx = distributed.setup(cfg.train.parallel, pick_device(cfg.train.device), cfg.train.dist_timeout)
    # Rank 0 trains or finds the tokenizers and caches the codes; the other processes then read them.
    with distributed.main_first(ctx, "preparing the tokenizers"):
        dvae, tok, ids = _prepare_all(cfg, progress and ctx.main, log if ctx.main else _quiet, out_flag, resume,
                                      start_over, trust_sharded)
        # the code cache is encoded where training runs (on a GPU: seconds, not the minutes a CPU takes
        # for 50k images); the dVAE then goes back to the host, leaving the GPU to the transformer
        train, val = build_pairs(cfg, dvae.to(ctx.device), tok, ids, progress and ctx.main)
        dvae.to(torch.device("cpu"))
    if train.cut and ctx.main:
        log(f"[train transformer] {train.cut} of {len(train)} training captions were longer than "
            f"text.text_len={cfg.text.text_len} tokens and were cut")
    config = {**cfg.to_dict(), "tokenizers": ids.to_dict()}
    trainer = Trainer(model, cfg.train, train, dalle_loss, eval_data=val, config=config, progress=progress, log=log,
                      out_flag=out_flag or "--train.out_dir", section="train")
    for event, fns in (callbacks or {}).items():
        for fn in fns if isinstance(fns, (list, tuple)) else [fns]:
            trainer.add_callback(event, fn)
    impl, why = choose_impl(cfg.model.attn_impl, trainer.device, True, layout.length)
    if ctx.main:
        log(f"[train transformer] {len(train)} training pairs; attention: {impl} ({why}); precision "
            f"{trainer.precision}; {cfg.train.parallel} on {ctx.world} process(es), global batch "
            f"{cfg.train.batch_size * cfg.train.grad_accum * ctx.world}")
    t0 = time.perf_counter()
    trainer.fit(resume=resume, start_over=start_over, trust_sharded=trust_sharded)
    info = {"pairs": len(train), "captions_cut": train.cut, "train_seconds": round(time.perf_counter() - t0, 1),
            "attention": f"{impl} ({why})", "tokenizers": ids.to_dict()}
    return model, trainer, info


def _quiet(_: str) -> None:
    """The log of processes other than rank 0: rank 0 says it once."""


def _prepare_all(cfg: Config, progress: bool, log, out_flag, resume, start_over, trust_sharded: bool) -> tuple:
    """The tokenizers, checked against the ones the run's checkpoints were trained with."""
    dvae, tok, ids = prepare_tokenizers(cfg, progress, log, out_flag, trust_sharded)
    root = Path(cfg.train.out_dir) / "checkpoints"
    recorded = None if start_over or resume is False else \
        _recorded_ids(root) if resume is True else ckpt.read_config(resume).get("tokenizers")
    if recorded is not None and {k: recorded.get(k) for k in ("dvae", "bpe")} != {"dvae": ids.dvae, "bpe": ids.bpe}:
        raise CheckpointError(f"the checkpoints in {root} were trained with other tokenizers (dVAE "
                              f"{str(recorded.get('dvae'))[:12]}, BPE {str(recorded.get('bpe'))[:12]}) than the ones "
                              f"found now (dVAE {ids.dvae[:12]}, BPE {ids.bpe[:12]}); their codes would mean something "
                              "else to the model. Start over with --start-over, or point --dvae_train.out_dir and "
                              "--text.out_dir at the tokenizers it was trained with")
    return dvae, tok, ids


def load_transformer(path: str | Path, ema: bool = True, trust_sharded: bool = False) -> tuple[DALLE, Config, dict]:
    """Rebuild a trained transformer from a checkpoint folder: (model in eval mode, its Config, tokenizer ids).

    ema=True uses the EMA of the weights when the run kept one (train.ema_decay > 0). A sharded
    checkpoint is read only with trust_sharded=True (checkpoint.sharded_refusal says why).
    """
    kind = ckpt.stage_of(ckpt.read_config(path))  # before the weights: a reranker's is named as one
    if kind != "transformer":
        raise ckpt.wrong_stage(path, kind, "transformer")
    loaded = ckpt.read_checkpoint(path, trust_sharded=trust_sharded)
    config = copy.deepcopy(loaded.config)
    ids = config.pop("tokenizers")
    cfg = Config.from_dict(config)
    model = DALLE.from_config(cfg)
    tensors = loaded.tensors
    if ema and isinstance(loaded.state.get("ema"), dict):
        tensors = {**tensors, **loaded.state["ema"]}
    ckpt.apply_weights(model, tensors, Path(path) / ckpt.MODEL_FILE)
    return model.eval(), cfg, ids


def train_guided(cfg: Config, caption_dropout: float = 0.2, steps: int = 600, lr: float = 1e-3,
                 out_dir: str | Path | None = None, progress: bool = True,
                 log: Callable[[str], None] = print) -> tuple[DALLE, Path]:
    """A trained transformer, trained on for `steps` updates with caption dropout: guidance needs it.

    Classifier-free guidance pushes the logits away from the model's answer for the all-padding
    caption, which a run with model.caption_dropout = 0 (the toy's) never learned. This starts from
    the finished run in cfg.train.out_dir (its tokenizers, checked by checksum) and replaces each
    training caption by the all-padding one with probability `caption_dropout`, at a constant
    learning rate `lr` after 20 warm-up updates. The run goes to out_dir (default: a `guided`
    folder beside train.out_dir); a finished one there is loaded, not trained again.
    Measured in notebook 07 (toy, seed 1337, 600 updates at p = 0.2, about a minute on 2 quiet CPU
    cores): the judge's share of all-right samples at guidance scales 1, 1.5, 2, 3 was 0.72, 0.85,
    0.78, 0.70 on 128 `val` captions and 0.61, 0.68, 0.63, 0.53 on 128 `heldout` ones.

    Returns (the model in eval mode, with model.cfg.caption_dropout = caption_dropout; its checkpoint).
    Example: model, path = train_guided(get_config("toy"))   # runs/toy/guided/checkpoints/step_0000600
    """
    base = finished_transformer(cfg)
    if base is None:
        raise CheckpointError(f"no finished transformer in {cfg.train.out_dir} to train on with caption dropout: "
                              "train one first (python -m minidalle train transformer), or point "
                              "--train.out_dir at one")
    model, mcfg, ids = load_transformer(base)
    mcfg = copy.deepcopy(mcfg)
    mcfg.model.caption_dropout = caption_dropout
    mcfg.train.max_steps, mcfg.train.lr, mcfg.train.min_lr, mcfg.train.warmup_steps = steps, lr, lr, min(20, steps)
    mcfg.train.eval_every, mcfg.train.ckpt_every, mcfg.train.ema_decay = 0, 0, 0.0
    mcfg.train.out_dir = str(out_dir if out_dir is not None else Path(cfg.train.out_dir).parent / "guided")
    mcfg.data, mcfg.text.out_dir, mcfg.dvae_train.out_dir = cfg.data, cfg.text.out_dir, cfg.dvae_train.out_dir
    validate(mcfg)
    done = finished_transformer(mcfg)
    if done is not None:
        had = ckpt.read_config(done)["model"]["caption_dropout"]
        if had != caption_dropout:
            raise ConfigError(f"{mcfg.train.out_dir} holds a run trained with caption dropout {had}, not "
                              f"{caption_dropout}: pass another out_dir (nothing was changed)")
        if done.name == ckpt.step_dir_name(steps):  # finished: load it; an interrupted run resumes below
            guided, _, _ = load_transformer(done)
            return guided, done
    model.cfg = mcfg.model
    dvae, tok, tok_ids = prepare_tokenizers(mcfg, progress=False, log=lambda line: None)
    if (ids["dvae"], ids["bpe"]) != (tok_ids.dvae, tok_ids.bpe):
        raise CheckpointError(f"{base} was trained with other tokenizers than the ones in {cfg.dvae_train.out_dir} "
                              f"and {cfg.text.out_dir}")
    train, _ = build_pairs(mcfg, dvae, tok, tok_ids, progress=progress)
    trainer = Trainer(model.train(), mcfg.train, train, dalle_loss, config={**mcfg.to_dict(), "tokenizers": ids},
                      progress=progress, log=log, section="train")
    log(f"[train guided] {steps} updates from {base} with caption dropout {caption_dropout}, into {mcfg.train.out_dir}")
    trainer.fit(resume=True)
    return model.eval(), finished_transformer(mcfg)


def finished_transformer(cfg: Config) -> Path | None:
    """The newest valid transformer checkpoint in train.out_dir (None when there is none)."""
    return ckpt.latest_valid_checkpoint(Path(cfg.train.out_dir) / "checkpoints")


# --- measuring ------------------------------------------------------------------------------------------
def _tokenizers_for(ids: dict, mcfg: Config, cfg: Config, trust_sharded: bool = False) -> tuple:
    """(dVAE, BPE, the dVAE checkpoint loaded): the tokenizers a transformer was trained with, found by
    checksum among every checkpoint in the folders of its own config and of `cfg` (the run the user
    named), a damaged one skipped; a tokenizer set aside since (`train bpe`, `demo`) is named in the
    error, with how to use it."""
    roots = list(dict.fromkeys(Path(c.dvae_train.out_dir) / "checkpoints" for c in (mcfg, cfg)))
    candidates = [p for root in roots for _, p in reversed(ckpt.list_checkpoints(root))]  # newest first
    dvae, match, damaged = None, None, []
    for p in (p for p in candidates if _weights_match(p, ids["dvae"])):  # the manifest says so; loading checks
        try:
            dvae, match = load_dvae(p, trust_sharded)[0], p
            break
        except ckpt.UntrustedCheckpoint:
            raise
        except CheckpointError as e:  # damaged since its manifest was written: the next candidate
            damaged.append(str(e))
    if dvae is None and damaged:
        raise CheckpointError(f"the image tokenizer this transformer was trained with (weights {ids['dvae'][:12]}) "
                              f"is only in damaged checkpoints ({'; '.join(damaged[:2])})")
    if dvae is None:
        aside = _set_aside_match([Path(c.dvae_train.out_dir) for c in (mcfg, cfg)], "checkpoints/step_*",
                                 lambda p: _weights_match(p, ids["dvae"]))
        where = ", ".join(str(r) for r in roots)
        raise CheckpointError(f"the image tokenizer this transformer was trained with (weights {ids['dvae'][:12]}) "
                              f"is not in {where}" + (f"; it was set aside in {aside}: move its checkpoints/ back, "
                                                      f"or point --dvae_train.out_dir at that folder" if aside else
                                                      "; point --dvae_train.out_dir at the run folder that holds it"))
    for c in (mcfg, cfg):
        path = Path(c.text.out_dir) / BPE_FILE
        if path.is_file() and _file_sha256(path) == ids["bpe"]:
            return dvae, Tokenizer.load(path), match
    aside = _set_aside_match([Path(c.text.out_dir) for c in (mcfg, cfg)], BPE_FILE,
                             lambda p: _file_sha256(p) == ids["bpe"])
    raise CheckpointError(f"the text tokenizer this transformer was trained with (bpe.model {ids['bpe'][:12]}) is not "
                          f"in {mcfg.text.out_dir} or {cfg.text.out_dir}" +
                          (f"; it was set aside in {aside}: move its files back, or pass --text.out_dir={aside}"
                           if aside else "; point --text.out_dir at the folder that holds it"))


def _weights_match(path: Path, wanted: str) -> bool:
    """Whether a checkpoint's manifest names weights `wanted` (False for one that cannot be read)."""
    try:
        return ckpt.weights_id(path, verify=False) == wanted
    except CheckpointError:
        return False


def _set_aside_match(folders: list[Path], pattern: str, matches) -> Path | None:
    """The newest `set-aside-*` folder inside one of `folders` holding a `pattern` entry that `matches`."""
    for folder in folders:
        for aside in sorted(folder.glob("set-aside-*"), reverse=True):
            for entry in sorted(aside.glob(pattern), reverse=True):
                try:
                    if matches(entry):
                        return aside
                except CheckpointError:
                    continue
    return None


def evaluate_transformer(cfg: Config, n: int = 256, checkpoint: str | Path | None = None, temperature: float = 1.0,
                         batch_size: int = 64, progress: bool = True, out: str | Path | None = None,
                         trust_sharded: bool = False) -> dict:
    """One sample per prompt for the first n `val` and `heldout` ShapesWorld captions, read by the judge.

    `val_all_single` / `heldout_all_single`: the fraction of samples with every stated attribute right.
    The sample grids (samples_val.png, samples_heldout.png) go to `out`, by default the run folder of
    the checkpoint as the user named it (`eval_folder`), never to a folder its config.json names.
    Example: evaluate_transformer(get_config("toy")) -> {"val_all_single": 0.6, "val": {...}, "heldout": {...}}
    """
    from .transformer import evaluate_prompts
    from ..viz import save_grid

    if cfg.data.dataset != "shapes":
        raise DataError(f"eval transformer reads samples with the ShapesWorld judge; data.dataset is "
                        f"{cfg.data.dataset!r}")
    path = Path(checkpoint) if checkpoint else finished_transformer(cfg)
    if path is None:
        raise CheckpointError(f"no transformer checkpoint in {cfg.train.out_dir}; train one with "
                              f"`python -m minidalle train transformer --preset {cfg.preset}` or pass --checkpoint")
    model, mcfg, ids = load_transformer(path, trust_sharded=trust_sharded)
    dvae, tok, _ = _tokenizers_for(ids, mcfg, cfg, trust_sharded=trust_sharded)
    folder = Path(out) if out is not None else eval_folder(path)
    device = pick_device(cfg.train.device)
    model, dvae = model.to(device), dvae.to(device)
    out = {"checkpoint": str(path), "step": ckpt.verify_checkpoint(path)["step"], "n": n, "temperature": temperature}
    t0 = time.perf_counter()
    for split in ("val", "heldout"):
        ds = ShapesWorld(split, mcfg.data.image_size, mcfg.data.seed)
        captions = [ds.example(i)[1] for i in range(n)]
        acc, images = evaluate_prompts(model, dvae, tok, captions, temperature, batch_size,
                                       seed=mcfg.data.seed + (split == "heldout"), progress=progress)
        out[split], out[f"{split}_all_single"] = acc, acc["overall"]
        k = min(16, n)
        out[f"grid_{split}"] = str(save_grid(list(images[:k]), folder / f"samples_{split}.png",
                                             captions[:k], ncols=4, title=f"one sample per {split} prompt"))
    out["grid"] = out["grid_val"]
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["attention"] = f"{model.attn_impl} ({model.attn_reason})"
    return out


def eval_folder(checkpoint: str | Path) -> Path:
    """Where an evaluation of `checkpoint` writes its figures when no --out is given: the run folder the
    path itself names (RUN for RUN/checkpoints/step_N, as the trainer lays it out), else the folder
    holding it. Derived from the path the user typed, never from a file, so a copied run writes into
    the copy. Example: eval_folder("runs/x/transformer/checkpoints/step_0000500") -> Path("runs/x/transformer")
    """
    path = Path(checkpoint)
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent




def evaluate_prompts(model, dvae, tok, captions: list[str], temperature: float = 1.0, batch_size: int = 256,
                     seed: int = 0, progress: bool = True, **settings) -> tuple[dict, torch.Tensor]:
    """The judge's accuracy (per attribute, and "overall" = every stated attribute right) of one
    sample per caption, and the images. Example: -> ({"overall": 0.6, "color": 0.9, ...}, uint8 (n, H, W, 3))"""
    from ..judge import evaluate

    _, images = draw(model, dvae, tok, captions, temperature, batch_size, seed, progress, **settings)
    return evaluate(list(images), captions, progress=progress), images
