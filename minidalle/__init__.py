"""minidalle: DALL·E (Ramesh et al. 2021) rebuilt small enough to read, real enough to train.

The files at the top of the package are the course, one concept each, read in the order of the
notebooks (READING_ORDER below; minidalle/README.md draws the same map). Everything else sits in a
folder: stages/ (each stage trained, saved, reloaded and measured, and the demo that runs them all),
scale/ (torchrun, 16-bit numbers, the planner), infra/ (files, checkpoints, devices, the machine),
realdata/ (folders, tar shards, emoji), bench/ (every benchmark) and cli/ (`python -m minidalle`).
A top-level file imports no stage, benchmark or command-line module.
"""

__version__ = "0.1.0"

# (notebook, what it builds, the top-level modules it reads, in order)
READING_ORDER = (
    ("00", "settings and the training loop", ("config", "presets", "train", "exercises", "errors")),
    ("01", "the toy dataset and the judge", ("data", "captions", "judge")),
    ("02", "discrete codes", ("losses", "quantize")),
    ("03", "the discrete VAE", ("dvae",)),
    ("04", "the BPE text tokenizer", ("bpe",)),
    ("05", "sparse attention", ("attention",)),
    ("06", "the transformer", ("model",)),
    ("07", "sampling with a key/value cache", ("sampling",)),
    ("08", "reranking with a contrastive model", ("clip",)),
    ("all", "figures", ("viz",)),
)
