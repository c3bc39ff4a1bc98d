"""Stage 2's text tokenizer: byte-level BPE, trained from scratch (Ramesh et al. 2021, section 2.2).

The paper lowercases captions and encodes them with a 16,384-token BPE vocabulary (Sennrich et al.
2016), with BPE dropout of 10% during training (Provilkov et al. 2020). The shape of this file
follows the teaching order of karpathy/minbpe: a `Tokenizer` base that knows merges and files, a
`BasicTokenizer` that merges raw bytes, and a `RegexTokenizer` that first splits text into chunks
with a GPT-style pattern so that merges never cross a word / number / punctuation boundary.

    ids 0..255        the 256 bytes (every string is representable, nothing is "unknown")
    ids 256..V-1      merges, in the order training found them (the order is the rank)
    ids V..           special tokens such as "<|pad|>", never produced by merging

Training is incremental: a pre-split corpus is reduced to its *unique* chunks with their counts;
pair counts are kept up to date by subtracting the pairs a merge destroys and adding the ones it
creates, only in the chunks that contain the merged pair, and a heap with lazy deletion finds the
most frequent pair. That is the difference between minutes and hours on megabytes of text.
Ties between equally frequent pairs go to the smaller (left id, right id): deterministic.

Encoding applies merges by rank (lowest first) inside each chunk, with a cache of chunk -> ids.
`decode(encode(s)) == s` for every valid Unicode string; lone surrogates (not valid Unicode, but
Python strings can hold them) are replaced by U+FFFD before encoding -- the documented rule.

`save` writes a `.model` file that `load` reads back, one item a line (UTF-8, "\\n" line ends):

    minidalle-bpe v2              the format
    RegexTokenizer                the class
    "'(?i:[sdmt]|ll|ve|re)|..."   the pre-split pattern, as a Python string literal ('' for Basic)
    lowercase 1                   1 if the tokenizer lowercases, else 0
    merges 128                    how many merge lines follow the special tokens
    special 1                     how many special token lines follow
    '<|pad|>' 384                 each special token: name (string literal) and id, ids after the merges
    97 97                         each merge: left id, right id; merge line k (from 0) makes id 256 + k
    sha256 3f1c...                the sha256 of every byte above this line

The file is written to a temporary file beside it and renamed, so it is whole or absent. `load`
checks the checksum, the counts and every id (a merge uses only bytes and earlier merges; special
tokens take exactly the ids after the merges), so a cut, damaged or hand-edited file is refused
with a message that names it -- it never loads as a slightly different tokenizer.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections import Counter
from pathlib import Path

import regex
from tqdm.auto import tqdm

from .errors import ConfigError, DataError
from .infra.files import write_atomic
from .infra.bpe_files import RETRAIN, parse_model, split_checksum, why_unsummed

# The pre-split pattern of GPT-4's cl100k tokenizer (tiktoken): contractions, letter runs with one
# leading non-letter, numbers of at most 3 digits, punctuation runs, newlines, other whitespace.
GPT4_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                      r"""\s*[\r\n]|\s+(?!\S)|\s+""")
FORMAT = "minidalle-bpe v2"  # first line of a .model file; bump when the layout changes
CHARS_PER_TOKEN_CAP = 64  # encode_to_length refuses (or cuts) text beyond this many characters per token


def sanitize(text: str) -> str:
    """Replace lone surrogates (invalid Unicode that Python strings can still hold) with U+FFFD.

    Example: "a\\ud800b" -> "a\\ufffdb"; every valid string is returned unchanged.
    """
    return _SURROGATE.sub("\ufffd", text)


_SURROGATE = regex.compile("[\ud800-\udfff]")


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair`, left to right, by `new_id`.

    Example: merge_pair([1, 2, 2, 2, 3], (2, 2), 9) -> [1, 9, 2, 3]
    """
    out, i, n = [], 0, len(ids)
    a, b = pair
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _pairs(ids: list[int]) -> Counter:
    """Counts of adjacent pairs. Example: [1, 2, 1, 2] -> {(1, 2): 2, (2, 1): 1}"""
    return Counter(zip(ids, ids[1:]))


class TextTooLong(DataError):
    """A text longer than the ids it must fit, refused: `what` says by how much (e.g. "encodes to 40
    tokens, more than the model's 32"), so a caller can name its own way of cutting it (a flag)."""

    def __init__(self, what: str, text: str):
        super().__init__(f"text {what}; pass truncate=True to cut it: {text[:60]!r}")
        self.what = what


class Tokenizer:
    """Merges, vocabulary, special tokens, files. Subclasses say how text becomes chunks."""

    pattern: str = ""

    def __init__(self, lowercase: bool = False, special_tokens: dict[str, int] | None = None):
        self.lowercase = lowercase
        self.merges: dict[tuple[int, int], int] = {}  # (left, right) -> new id; id order is the rank
        self.special_tokens: dict[str, int] = dict(special_tokens or {})
        self._cache: dict[str, list[int]] = {}
        self.vocab = self._build_vocab()

    # --- vocabulary ---------------------------------------------------------------------------------
    def _build_vocab(self) -> dict[int, bytes]:
        vocab = {i: bytes([i]) for i in range(256)}
        for (a, b), new in self.merges.items():  # dicts keep insertion order: rank order
            vocab[new] = vocab[a] + vocab[b]
        for text, i in self.special_tokens.items():
            vocab[i] = text.encode("utf-8")
        return vocab

    @property
    def vocab_size(self) -> int:
        """256 bytes + merges + special tokens. Example: an untrained tokenizer -> 256"""
        return 256 + len(self.merges) + len(self.special_tokens)

    def add_special_tokens(self, names: list[str]) -> dict[str, int]:
        """Give each new name the next free id (after the merges). Example: ["<|pad|>"] -> {"<|pad|>": V}"""
        for name in names:
            if name not in self.special_tokens:
                self.special_tokens[name] = 256 + len(self.merges) + len(self.special_tokens)
        self.vocab = self._build_vocab()
        return dict(self.special_tokens)

    # --- chunks -------------------------------------------------------------------------------------
    def _prepare(self, text: str, fold: bool = True) -> str:
        """Type check, the surrogate rule, and lowercasing when the tokenizer lowercases (and `fold`)."""
        if not isinstance(text, str):
            raise DataError(f"expected text (str), got {type(text).__name__}")
        text = sanitize(text)
        return text.lower() if self.lowercase and fold else text

    def split(self, text: str) -> list[str]:
        """Text -> the chunks merges stay inside. The base class keeps the text whole."""
        return [text] if text else []

    # --- training -----------------------------------------------------------------------------------
    def train(self, text: str | list[str], vocab_size: int, progress: bool = True) -> "Tokenizer":
        """Learn `vocab_size - 256` merges (fewer, with a warning, if the corpus runs out of pairs).

        Example: RegexTokenizer().train("aaab aaab", 258).merges -> {(97, 97): 256, (97, 98): 257}
        """
        if vocab_size < 256:
            raise ConfigError(f"vocab_size must be at least 256 (the bytes); got {vocab_size}")
        if self.special_tokens:
            raise ConfigError("train before adding special tokens: their ids follow the merges")
        texts = [text] if isinstance(text, str) else list(text)
        chunk_counts = Counter()
        for t in texts:
            chunk_counts.update(self.split(self._prepare(t)))
        self.merges = train_merges(chunk_counts, vocab_size - 256, progress=progress)
        self._cache.clear()
        self.vocab = self._build_vocab()
        return self

    # --- encoding -----------------------------------------------------------------------------------
    def _encode_chunk(self, chunk: str, dropout: float = 0.0, rng: random.Random | None = None) -> list[int]:
        """One chunk -> ids: apply the lowest-rank merge present, until none applies.

        With dropout > 0 (BPE dropout) each candidate merge is skipped with that probability at every
        step, so the same word is segmented differently from one call to the next.
        """
        if dropout == 0.0 and chunk in self._cache:
            return self._cache[chunk]
        ids = list(chunk.encode("utf-8"))
        merges = self.merges
        while len(ids) >= 2:
            candidates = {p for p in zip(ids, ids[1:]) if p in merges}
            if dropout > 0.0:
                candidates = {p for p in candidates if rng.random() >= dropout}
            if not candidates:
                break
            pair = min(candidates, key=merges.__getitem__)
            ids = merge_pair(ids, pair, merges[pair])
        if dropout == 0.0:
            self._cache[chunk] = ids
        return ids

    def encode(self, text: str, allowed_special: bool = False, dropout: float = 0.0,
               seed: int | None = None) -> list[int]:
        """Text -> token ids. `allowed_special`: turn special-token strings in the text into their ids
        (otherwise they are encoded as plain text). `dropout`: BPE dropout probability (0 at inference),
        reproducible from `seed`.

        Example: after training, encode("a red circle") -> e.g. [264, 1023, 311]
        """
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1); got {dropout}")
        text = self._prepare(text, fold=False)  # special tokens are matched before lowercasing
        rng = random.Random(seed) if dropout > 0.0 else None
        ids: list[int] = []
        for part, special in self._split_special(text, allowed_special):
            if special:
                ids.append(self.special_tokens[part])
                continue
            for chunk in self.split(part.lower() if self.lowercase else part):
                ids.extend(self._encode_chunk(chunk, dropout, rng))
        return ids

    def _split_special(self, text: str, allowed: bool):
        """Yield (piece, is_special) with special-token strings cut out (only when allowed)."""
        if not (allowed and self.special_tokens):
            yield text, False
            return
        names = sorted(self.special_tokens, key=len, reverse=True)  # longest first
        pattern = "(" + "|".join(regex.escape(n) for n in names) + ")"
        for i, piece in enumerate(regex.split(pattern, text)):
            if piece:
                yield piece, i % 2 == 1

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text. Example: decode(encode("hello")) -> "hello" (lowercased if the tokenizer lowercases)"""
        try:
            data = b"".join(self.vocab[i] for i in ids)
        except KeyError as e:
            raise DataError(f"token id {e.args[0]} is not in this tokenizer's vocabulary "
                            f"(size {self.vocab_size})") from None
        return data.decode("utf-8", errors="replace")

    def encode_to_length(self, text: str, length: int, pad_id: int, truncate: bool = False,
                         max_chars: int | None = None) -> tuple[list[int], bool]:
        """Ids padded with `pad_id` to exactly `length`, and whether the text was cut.

        A caption longer than `length` tokens, or than `max_chars` characters (default: 64 per
        token of `length`, so a runaway input is refused before it is encoded), is an error unless
        `truncate=True`; then it is cut and the flag says so (never a silent cut).
        Example: ("a red circle", 8, pad) -> ([.., pad, pad], False)
        """
        if length < 1:
            raise ConfigError(f"length must be at least 1 token; got {length}")
        cap = CHARS_PER_TOKEN_CAP * length if max_chars is None else max_chars
        too_long = len(text) > cap
        if too_long and not truncate:
            raise TextTooLong(f"has {len(text):,} characters, more than the cap of {cap:,}", text)
        ids = self.encode(text[:cap])
        cut = too_long or len(ids) > length
        if len(ids) > length and not truncate:
            raise TextTooLong(f"encodes to {len(ids)} tokens, more than the model's {length}", text)
        ids = ids[:length]
        return ids + [pad_id] * (length - len(ids)), cut

    # --- files --------------------------------------------------------------------------------------
    def save(self, prefix: str | Path) -> tuple[Path, Path]:
        """Write `prefix.model` (what `load` reads) and `prefix.vocab` (for people: one token a line).

        Each file goes to a temporary file beside it and is renamed into place: a crash or a full disk
        leaves the previous files (or none), never half of one, and no temporary file behind.
        Example: tok.save("runs/toy/bpe/bpe") -> (Path(".../bpe.model"), Path(".../bpe.vocab"))
        """
        self._check_ids()
        prefix = Path(prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        model = prefix.with_name(prefix.name + ".model")
        lines = [FORMAT, type(self).__name__, repr(self.pattern), f"lowercase {int(self.lowercase)}",
                 f"merges {len(self.merges)}", f"special {len(self.special_tokens)}"]
        lines += [f"{name!r} {i}" for name, i in self.special_tokens.items()]
        lines += [f"{a} {b}" for a, b in self.merges]
        body = "".join(line + "\n" for line in lines).encode("utf-8")
        vocab_file = prefix.with_name(prefix.name + ".vocab")
        parents = {new: pair for pair, new in self.merges.items()}
        rows = []
        for i, token in self.vocab.items():
            shown = _printable(token)
            if i in parents:
                a, b = parents[i]
                rows.append(f"[{_printable(self.vocab[a])}][{_printable(self.vocab[b])}] -> [{shown}] {i}")
            else:
                rows.append(f"[{shown}] {i}")
        write_atomic(model, body + f"sha256 {hashlib.sha256(body).hexdigest()}\n".encode("ascii"))
        write_atomic(vocab_file, ("\n".join(rows) + "\n").encode("utf-8"))
        return model, vocab_file

    def _check_ids(self) -> None:
        """Refuse to save what `load` would refuse: merge ids 256.. in order, special ids right after."""
        if list(self.merges.values()) != list(range(256, 256 + len(self.merges))):
            raise ConfigError("merge ids must be 256, 257, ... in rank order; this tokenizer's are not")
        for j, (name, i) in enumerate(self.special_tokens.items()):
            if not isinstance(name, str) or not name:
                raise ConfigError(f"special token names must be non-empty strings; got {name!r}")
            if i != 256 + len(self.merges) + j:
                raise ConfigError(f"special token {name!r} has id {i}, but special tokens take the ids after "
                                  f"the merges: it must be {256 + len(self.merges) + j}; add them with "
                                  f"add_special_tokens")

    def export_hf(self, path: str | Path) -> Path:
        """Write a Hugging Face `tokenizer.json` (byte-level BPE) that gives the same ids.

        `tokenizers.Tokenizer.from_file(path).encode(text).ids == self.encode(text)`: the same pre-split
        pattern, the bytes shown as GPT-2's printable stand-in characters, the merges in rank order,
        and the special tokens as added tokens. A lowercasing tokenizer gets a Lowercase normaliser.
        """
        path = Path(path)
        show = byte_to_char()
        names = {i: "".join(show[b] for b in token) for i, token in self.vocab.items() if i < 256 + len(self.merges)}
        if len(set(names.values())) != len(names):
            raise DataError("two merges produced the same byte string; a tokenizer.json vocabulary cannot hold both")
        pre = [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]
        if self.pattern:
            pre.insert(0, {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False})
        spec = {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for name, i in self.special_tokens.items()],
            "normalizer": {"type": "Lowercase"} if self.lowercase else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {name: i for i, name in names.items()},
                      "merges": [[names[a], names[b]] for a, b in self.merges]},
        }
        import json

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(spec, ensure_ascii=False, indent=1), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Read a `.model` file written by `save` (the class is taken from the file).

        Refuses (DataError naming the file and the fix) anything but a whole, unchanged file: a
        missing file or a folder, another format, a cut file, a failed checksum, ids that do not fit.
        Example: Tokenizer.load(tok.save("runs/toy/bpe/bpe")[0]).merges == tok.merges -> True
        """
        path = Path(path)
        try:
            if path.is_dir():
                raise DataError(f"cannot read tokenizer file {path}: it is a folder; pass the .model file in "
                                f"it (e.g. {path / 'bpe.model'})")
            data = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"cannot read tokenizer file {path}: no such file; train one with "
                            f"`python -m minidalle train bpe`") from None
        except (OSError, ValueError) as e:  # ValueError: a path with a NUL character in it
            raise DataError(f"cannot read tokenizer file {path}: {e}") from None
        first = data.split(b"\n", 1)[0].removesuffix(b"\r")  # CRLF: the checksum says what happened
        if first != FORMAT.encode("ascii"):
            if first == b"minidalle-bpe v1":
                raise DataError(f"{path} is a minidalle-bpe v1 file, an old format without a merge count or "
                                f"checksum, which this version no longer reads; {RETRAIN}")
            if first.startswith(b"minidalle-bpe "):
                raise DataError(f"{path} has format {first[:40].decode('utf-8', 'replace')!r}, this minidalle "
                                f"reads {FORMAT!r}; it was written by a different version: {RETRAIN}")
            raise DataError(f"{path} is not a minidalle BPE model (first line "
                            f"{first[:40].decode('utf-8', 'replace')!r})")
        body, digest = split_checksum(data)
        if digest is None:
            raise DataError(f"{path} {why_unsummed(data)}; {RETRAIN}")
        if hashlib.sha256(body).hexdigest() != digest:
            crlf = " (its line ends were changed to CRLF, e.g. by a text-mode copy or git on Windows)" \
                if b"\r\n" in body else ""
            raise DataError(f"{path} fails its checksum: its bytes changed after it was written{crlf}; {RETRAIN}")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is damaged: byte {e.start} is not UTF-8 text; {RETRAIN}") from None
        return parse_model(text.split("\n")[:-1], path, {"BasicTokenizer": BasicTokenizer, "RegexTokenizer": RegexTokenizer})


def byte_to_char() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE files store tokens as text).

    Bytes that are already visible Latin-1 characters stand for themselves; the other 68 (controls,
    space, ...) take the characters from U+0100 upwards, in byte order.
    Example: byte_to_char()[ord("a")] -> "a"; byte_to_char()[ord(" ")] -> "Ġ" (U+0120)
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in visible}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _printable(token: bytes) -> str:
    """Bytes shown for people: decoded where possible, control characters escaped."""
    text = token.decode("utf-8", errors="replace")
    return "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in text)


class BasicTokenizer(Tokenizer):
    """BPE on raw bytes: the whole text is one chunk, so merges may cross word boundaries.

    Example: BasicTokenizer().train("aaabdaaabac", 259).encode("aaabdaaabac") -> [258, 100, 258, 97, 99]
    """


class RegexTokenizer(Tokenizer):
    """BPE inside regex chunks (GPT-style pre-split), optional lowercasing (the paper lowercases).

    Example: RegexTokenizer().split("A red  circle!") -> ["A", " red", " ", " circle", "!"]
    """

    def __init__(self, pattern: str = GPT4_SPLIT_PATTERN, lowercase: bool = False,
                 special_tokens: dict[str, int] | None = None):
        self.pattern = pattern
        self._compiled = regex.compile(pattern)
        super().__init__(lowercase=lowercase, special_tokens=special_tokens)

    def split(self, text: str) -> list[str]:
        return self._compiled.findall(text)


# --- the trainer --------------------------------------------------------------------------------------


def train_merges(chunk_counts: Counter, n_merges: int, progress: bool = True) -> dict[tuple[int, int], int]:
    """Learn up to `n_merges` merges from chunks weighted by their counts, incrementally.

    Stops early (with a warning) when no pair is left to merge: the corpus allows no more.
    Example: train_merges(Counter({"aaab": 2}), 2) -> {(97, 97): 256, (97, 98): 257}
    ("aa" is counted twice in "aaab", as overlapping pairs are; after it, "ab" and "<aa>a" tie at 2
    and the smaller pair wins.)
    """
    import warnings

    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    weights = list(chunk_counts.values())
    counts: Counter = Counter()
    where: dict[tuple[int, int], set[int]] = {}  # pair -> chunks that (may) contain it
    for w, (ids, weight) in enumerate(zip(words, weights)):
        for pair, k in _pairs(ids).items():
            counts[pair] += k * weight
            where.setdefault(pair, set()).add(w)
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)
    merges: dict[tuple[int, int], int] = {}
    bar = tqdm(total=n_merges, desc="BPE merges", disable=not progress)
    while len(merges) < n_merges:
        best = None
        while heap:
            neg, pair = heapq.heappop(heap)
            if counts.get(pair, 0) == -neg and -neg > 0:  # a current entry, not a stale one
                best = pair
                break
        if best is None:
            warnings.warn(f"the corpus allows only {len(merges)} merges (asked for {n_merges}): "
                          f"every chunk is a single token; stopping at vocabulary size {256 + len(merges)}",
                          stacklevel=3)
            break
        new_id = 256 + len(merges)
        merges[best] = new_id
        changed: set[tuple[int, int]] = set()
        for w in where.pop(best, ()):
            ids = words[w]
            if len(ids) < 2:
                continue
            old = _pairs(ids)
            if best not in old:
                continue
            new_ids = merge_pair(ids, best, new_id)
            words[w] = new_ids
            new = _pairs(new_ids)
            weight = weights[w]
            for pair in old.keys() | new.keys():
                delta = new.get(pair, 0) - old.get(pair, 0)
                if delta:
                    counts[pair] += delta * weight
                    changed.add(pair)
                    if delta > 0:
                        where.setdefault(pair, set()).add(w)
        counts.pop(best, None)
        changed.discard(best)
        for pair in changed:  # push fresh entries; the old ones turn stale and are skipped on pop
            c = counts[pair]
            if c > 0:
                heapq.heappush(heap, (-c, pair))
            else:
                del counts[pair]
        bar.update(1)
    bar.close()
    return merges
