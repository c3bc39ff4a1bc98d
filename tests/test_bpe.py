"""The BPE text tokenizer: a hand-worked example, round trips, the incremental trainer against a naive
one, files, dropout, padding to the model's length, special tokens, and ids identical to tiktoken."""

import builtins
import hashlib
import io
from collections import Counter
from contextlib import contextmanager
from functools import lru_cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidalle.bpe import GPT4_SPLIT_PATTERN, BasicTokenizer, RegexTokenizer, Tokenizer, merge_pair, sanitize, train_merges
from minidalle.bench.bpe import naive_merges
from minidalle.data import ShapesWorld
from minidalle.errors import ConfigError, DataError

CLASSES = [BasicTokenizer, RegexTokenizer]


@lru_cache(maxsize=None)
def corpus() -> str:
    """Captions, prose, code, numbers and several scripts: the text the tokenizers train on here."""
    captions = [c for _, c in (ShapesWorld("train", 16, 0)[i] for i in range(300))]
    prose = ("The quick brown fox jumps over the lazy dog. It's 2026; we'll train 16,384 merges, "
             "don't we? Ünïcödé, naïve café, straße. 東京は晴れ。 مرحبا بالعالم. Привет, мир! ")
    code = "def f(x):\n    return x ** 2  # square\n\nfor i in range(10):\n\tprint(f(i), end=' ')\n"
    return "\n".join(captions) + "\n" + prose * 5 + code * 5


@pytest.fixture(scope="module")
def trained():
    text = corpus()
    return {cls: cls().train(text, 512, progress=False) for cls in CLASSES}


# --- a hand-worked example -----------------------------------------------------------------------

def test_hand_worked_example():
    # "aaabdaaabac": "aa" occurs 4 times (overlapping) -> 256; then "ab" and "<aa>a" tie at 2 and the
    # smaller pair (97, 98) wins -> 257; then "<aa><ab>" occurs twice -> 258.
    tok = BasicTokenizer().train("aaabdaaabac", 256 + 3, progress=False)
    assert tok.merges == {(97, 97): 256, (97, 98): 257, (256, 257): 258}
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.vocab[258] == b"aaab" and tok.decode([258, 100]) == "aaabd"
    assert merge_pair([1, 2, 2, 2, 3], (2, 2), 9) == [1, 9, 2, 3]
    # The naive reference trainer (bpe_bench.naive_merges) agrees with the hand-worked merges too.
    assert naive_merges(Counter({"aaabdaaabac": 1}), 3) == tok.merges


# --- round trips -----------------------------------------------------------------------------------

STRINGS = ["", "a", "\U0001F642", "\U0001F469\u200d\U0001F469\u200d\U0001F467 family", "東京は晴れ", "مرحبا بالعالم",
           "\x00\x01\x7f\t\r\n", "def f(x):\n\treturn x**2  # sq", "  leading and trailing  ", "a" * 5000,
           corpus()[:3000], "Ünïcödé naïve café 16,384 1234567"]


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("text", STRINGS, ids=range(len(STRINGS)))
def test_decode_encode_is_identity(trained, cls, text):
    tok = trained[cls]
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_lone_surrogates_follow_the_documented_rule(trained):
    tok = trained[RegexTokenizer]
    assert sanitize("a\ud800b") == "a\ufffdb" and sanitize("plain") == "plain"
    assert tok.decode(tok.encode("a\ud800b\udfff")) == "a\ufffdb\ufffd"


def test_lowercasing_tokenizer_folds_case_before_encoding():
    tok = RegexTokenizer(lowercase=True).train(corpus(), 300, progress=False)
    assert tok.encode("A Red CIRCLE") == tok.encode("a red circle")
    assert tok.decode(tok.encode("A Red CIRCLE")) == "a red circle"


def test_regex_split_keeps_words_apart():
    assert RegexTokenizer().split("A red  circle!") == ["A", " red", " ", " circle", "!"]
    assert RegexTokenizer().split("it's 12345") == ["it", "'s", " ", "123", "45"]


# --- the trainer -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", CLASSES)
def test_incremental_trainer_matches_the_naive_one(cls):
    text = corpus()[:6000]
    tok = cls()
    chunk_counts = Counter(tok.split(text))
    assert train_merges(chunk_counts, 150, progress=False) == naive_merges(chunk_counts, 150)


def test_training_stops_cleanly_when_the_corpus_runs_out():
    with pytest.warns(UserWarning, match="allows only 3 merges"):
        tok = BasicTokenizer().train("abcd", 1000, progress=False)
    assert len(tok.merges) == 3 and tok.encode("abcd") == [258]
    with pytest.raises(ConfigError, match="at least 256"):
        BasicTokenizer().train("abc", 10)


# --- files --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", CLASSES)
def test_save_load_round_trip(trained, cls, tmp_path):
    tok = trained[cls]
    tok.add_special_tokens(["<|pad|>"])
    model, vocab = tok.save(tmp_path / "tok")
    back = Tokenizer.load(model)
    assert type(back) is cls and back.merges == tok.merges and back.special_tokens == tok.special_tokens
    text = corpus()[:2000]
    assert back.encode(text) == tok.encode(text)
    lines = vocab.read_text(encoding="utf-8").splitlines()
    assert len(lines) == tok.vocab_size and lines[0] == "[\\u0000] 0"
    assert any(" -> " in line for line in lines)  # merged tokens show their two parents


def test_damaged_or_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "x.model"
    bad.write_text("something else\n")
    with pytest.raises(DataError, match="not a minidalle BPE model"):
        Tokenizer.load(bad)
    with pytest.raises(DataError, match="cannot read"):
        Tokenizer.load(tmp_path / "missing.model")


@pytest.fixture(scope="module")
def tok128():
    """A lowercasing RegexTokenizer with 128 merges and two special tokens (ids 384 and 385)."""
    tok = RegexTokenizer(lowercase=True).train(corpus(), 256 + 128, progress=False)
    tok.add_special_tokens(["<|pad|>", "<|endoftext|>"])
    return tok


@contextmanager
def refused(path, match):
    """pytest.raises(DataError, match=...) whose message must also name `path`."""
    with pytest.raises(DataError, match=match) as info:
        yield info
    assert str(path) in str(info.value), str(info.value)


def merges_start(lines: list[bytes]) -> int:
    """Index of the first merge line: right after the special token lines (in every format so far)."""
    k = next(i for i, line in enumerate(lines) if line.startswith(b"special "))
    return k + 1 + int(lines[k].split()[1])


def rewrite(model, edit) -> None:
    """Edit the lines of a saved .model by hand and store them back, with the sha256 line recomputed
    when the file has one: damage that a checksum alone cannot catch."""
    lines = model.read_bytes().split(b"\n")[:-1]
    summed = lines[-1].startswith(b"sha256 ")
    lines = edit(lines[:-1] if summed else lines)
    body = b"".join(line + b"\n" for line in lines)
    if summed:
        body += b"sha256 " + hashlib.sha256(body).hexdigest().encode() + b"\n"
    model.write_bytes(body)


def test_model_file_layout_has_counts_and_a_checksum(tok128, tmp_path):
    model, _ = tok128.save(tmp_path / "bpe")
    data = model.read_bytes()
    lines = data.decode("utf-8").split("\n")
    assert lines[:8] == ["minidalle-bpe v2", "RegexTokenizer", repr(GPT4_SPLIT_PATTERN), "lowercase 1",
                         "merges 128", "special 2", "'<|pad|>' 384", "'<|endoftext|>' 385"]
    assert lines[8:136] == [f"{a} {b}" for a, b in tok128.merges] and lines[137:] == [""]
    body = data[:data.rindex(b"sha256 ")]
    assert lines[136] == "sha256 " + hashlib.sha256(body).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpe.model", "bpe.vocab"]  # no temp file left


@pytest.mark.parametrize("where", ["at a line end", "inside a line"])
def test_truncated_model_file_is_refused(tok128, tmp_path, where):
    model, _ = tok128.save(tmp_path / "bpe")
    data = model.read_bytes()
    lines = data.split(b"\n")
    cut = len(b"\n".join(lines[:merges_start(lines) + 53])) + 1  # just after the 53rd merge line
    model.write_bytes(data[:cut + (len(lines[merges_start(lines) + 53]) - 1 if where == "inside a line" else 0)])
    with refused(model, "truncated: 53 of 128 merges"):
        Tokenizer.load(model)


def test_changed_byte_fails_the_checksum(tok128, tmp_path):
    model, _ = tok128.save(tmp_path / "bpe")
    data = model.read_bytes()
    lines = data.split(b"\n")
    i = merges_start(lines) + 40
    a, b = lines[i].split()
    lines[i] = a + b" " + (b"32" if b != b"32" else b"33")  # still two valid ids: parses fine
    model.write_bytes(b"\n".join(lines))
    with refused(model, "fails its checksum"):
        Tokenizer.load(model)
    model.write_bytes(data.replace(b"\n", b"\r\n"))  # what a line-ending conversion does
    with refused(model, "fails its checksum.*CRLF"):
        Tokenizer.load(model)


def test_format_v1_file_is_refused_with_a_retrain_hint(tmp_path):
    model = tmp_path / "bpe.model"
    model.write_text("minidalle-bpe v1\nRegexTokenizer\n'\\\\w+'\nlowercase 0\nspecial 0\n97 98\n")
    with refused(model, r"v1.*python -m minidalle train bpe"):
        Tokenizer.load(model)


def set_line(where, value: bytes):
    """An edit for `rewrite`: the line at `where(lines)` becomes `value` (bytes, or a function of the lines)."""
    def edit(lines):
        lines[where(lines)] = value(lines) if callable(value) else value
        return lines
    return edit


def merge(k):
    return lambda lines: merges_start(lines) + k


def special(j):  # the file has two special tokens, right before the merges
    return lambda lines: merges_start(lines) - 2 + j


def pattern_line(lines):
    return 2

HAND_EDITS = {  # name -> (edit, what the refusal says); without the checks each loads, or fails with a bare error
    "merge pointing ahead": (set_line(merge(3), b"300 97"), "refers to id 300"),
    "merge pointing at itself": (set_line(merge(3), b"259 97"), "refers to id 259"),
    "negative merge id": (set_line(merge(3), b"-1 97"), "refers to id -1"),
    "repeated merge": (set_line(merge(5), lambda lines: lines[merge(2)(lines)]), "repeats the pair"),
    "special id on a merge": (set_line(special(0), b"'<|pad|>' 300"), "must be 384"),
    "special id gap": (set_line(special(0), b"'<|pad|>' 390"), "must be 384"),
    "special id repeated": (set_line(special(1), b"'<|endoftext|>' 384"), "must be 385"),
    "special name repeated": (set_line(special(1), b"'<|pad|>' 385"), "appears twice"),
    "empty special name": (set_line(special(0), b"'' 384"), "non-empty string"),
    "special name not a string": (set_line(special(0), b"5 384"), "non-empty string"),
    "pattern not UTF-8": (set_line(pattern_line, b"'a\xffb'"), "not UTF-8"),
    "pattern not a valid regex": (set_line(pattern_line, b"'(unclosed'"), "not a valid regex"),
    "pattern a list": (set_line(pattern_line, b"['a']"), "string literal"),
    "pattern a number": (set_line(pattern_line, b"12"), "string literal"),
}


@pytest.mark.parametrize("name", HAND_EDITS)
def test_hand_edited_model_with_a_valid_checksum_is_refused(tok128, tmp_path, name):
    edit, match = HAND_EDITS[name]
    model, _ = tok128.save(tmp_path / "bpe")
    rewrite(model, edit)
    with refused(model, match):
        Tokenizer.load(model)


def test_special_token_on_a_merge_id_would_decode_wrongly(tok128, tmp_path):
    # Why the ids are checked: loaded anyway, "<|pad|>" would replace a merge in the vocabulary and
    # " circle" would decode with "<|pad|>" inside it.
    merge_id = tok128.encode(" circle")[-1]
    assert merge_id < 384
    model, _ = tok128.save(tmp_path / "bpe")
    rewrite(model, set_line(special(0), f"'<|pad|>' {merge_id}".encode()))
    with refused(model, f"has id {merge_id}"):
        Tokenizer.load(model)


def test_missing_file_or_a_folder_is_refused_naming_it(tmp_path):
    with refused(tmp_path / "nope.model", "no such file.*python -m minidalle train bpe"):
        Tokenizer.load(tmp_path / "nope.model")
    with refused(tmp_path, "is a folder"):
        Tokenizer.load(tmp_path)


def test_save_is_atomic_when_a_write_fails(tok128, tmp_path, monkeypatch):
    model, vocab = tok128.save(tmp_path / "bpe")
    before = model.read_bytes(), vocab.read_bytes()
    real_open = builtins.open

    class HalfWriter:  # writes half of what it is given, then the disk is "full"
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def failing_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        writing = any(c in mode for c in "wxa") and str(file).startswith(str(tmp_path))
        return HalfWriter(f) if writing else f

    other = RegexTokenizer().train("a different corpus, a different model", 270, progress=False)
    with monkeypatch.context() as m:
        m.setattr(builtins, "open", failing_open)
        m.setattr(io, "open", failing_open)
        with pytest.raises(OSError, match="No space"):
            other.save(tmp_path / "bpe")
    assert (model.read_bytes(), vocab.read_bytes()) == before  # the old files, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpe.model", "bpe.vocab"]  # no temp file left
    assert Tokenizer.load(model).merges == tok128.merges


def test_save_refuses_special_ids_that_load_would_refuse(tmp_path):
    tok = RegexTokenizer(special_tokens={"<|pad|>": 5})
    with pytest.raises(ConfigError, match="special token"):
        tok.save(tmp_path / "bpe")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def fuzz_model(tmp_path_factory):
    """A small saved tokenizer (64 merges, two special tokens, lowercasing) to damage, trained once."""
    tok = RegexTokenizer(lowercase=True).train(corpus()[:4000], 320, progress=False)
    tok.add_special_tokens(["<|pad|>", "<|endoftext|>"])
    folder = tmp_path_factory.mktemp("fuzz")
    model, _ = tok.save(folder / "bpe")
    return tok, model.read_bytes(), folder / "damaged.model"


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_fuzz_damaged_model_is_refused_or_loads_identical(fuzz_model, data):
    tok, original, path = fuzz_model
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 3), label="damages")):
        kind = data.draw(st.sampled_from(["flip", "replace", "truncate", "insert", "delete"]), label="kind")
        if not damaged and kind != "insert":
            continue
        at = data.draw(st.integers(0, max(len(damaged) - 1, 0)), label="offset")
        if kind == "flip":
            damaged[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif kind == "replace":
            damaged[at] = data.draw(st.integers(0, 255), label="byte")
        elif kind == "truncate":
            del damaged[at:]
        elif kind == "insert":
            damaged.insert(data.draw(st.integers(0, len(damaged)), label="at"), data.draw(st.integers(0, 255)))
        else:
            del damaged[at]
    path.write_bytes(bytes(damaged))
    try:
        back = Tokenizer.load(path)
    except DataError as e:
        assert str(path) in str(e)
        return
    # Loaded: then it must be the very same tokenizer, never one with different contents.
    assert type(back) is type(tok) and back.pattern == tok.pattern and back.lowercase == tok.lowercase
    assert list(back.merges.items()) == list(tok.merges.items())
    assert list(back.special_tokens.items()) == list(tok.special_tokens.items())


# --- dropout, padding, special tokens -------------------------------------------------------------------

def test_bpe_dropout_is_reproducible_and_off_by_default(trained):
    tok = trained[RegexTokenizer]
    text = "a big red circle to the left of a small blue square"
    plain = tok.encode(text)
    a, b = tok.encode(text, dropout=0.3, seed=1), tok.encode(text, dropout=0.3, seed=1)
    assert a == b and tok.decode(a) == text
    assert len(a) > len(plain)  # dropped merges leave more, shorter tokens
    assert {tuple(tok.encode(text, dropout=0.3, seed=s)) for s in range(10)} != {tuple(a)}
    assert tok.encode(text) == plain  # the dropout calls did not pollute the cache
    with pytest.raises(ConfigError, match="dropout"):
        tok.encode(text, dropout=1.0)


def test_encode_to_length_pads_and_never_cuts_silently(trained):
    tok = trained[RegexTokenizer]
    pad = tok.add_special_tokens(["<|pad|>"])["<|pad|>"]
    ids, cut = tok.encode_to_length("a red circle", 16, pad)
    assert len(ids) == 16 and not cut and ids[len(tok.encode("a red circle")):] == [pad] * (16 - len(tok.encode("a red circle")))
    long = "a red circle " * 20
    with pytest.raises(DataError, match="truncate=True"):
        tok.encode_to_length(long, 8, pad)
    ids, cut = tok.encode_to_length(long, 8, pad, truncate=True)
    assert cut and ids == tok.encode(long)[:8]
    # The character cap: a runaway input is refused before encoding, or cut with the flag set.
    with pytest.raises(DataError, match="characters"):
        tok.encode_to_length("x" * 100_000, 8, pad)
    with pytest.raises(DataError, match="characters"):
        tok.encode_to_length("a red circle", 16, pad, max_chars=5)
    ids, cut = tok.encode_to_length("a red circle", 16, pad, truncate=True, max_chars=5)
    assert cut and [i for i in ids if i != pad] == tok.encode("a red")


def test_special_tokens_only_when_allowed(trained, tmp_path):
    tok = RegexTokenizer().train(corpus(), 300, progress=False)
    ids = tok.add_special_tokens(["<|endoftext|>"])
    eot = ids["<|endoftext|>"]
    assert eot == 300
    assert tok.encode("red<|endoftext|>blue", allowed_special=True).count(eot) == 1
    assert eot not in tok.encode("red<|endoftext|>blue")  # plain text unless allowed
    assert tok.decode(tok.encode("red<|endoftext|>blue", allowed_special=True)) == "red<|endoftext|>blue"
    lower = RegexTokenizer(lowercase=True).train(corpus(), 300, progress=False)
    pad = lower.add_special_tokens(["<|PAD|>"])["<|PAD|>"]
    assert lower.encode("Red<|PAD|>", allowed_special=True) == lower.encode("red") + [pad]  # matched before folding
    with pytest.raises(ConfigError, match="before adding special tokens"):
        tok.train("more text", 400, progress=False)
    with pytest.raises(DataError, match="not in this tokenizer"):
        tok.decode([tok.vocab_size + 5])


# --- interoperability ------------------------------------------------------------------------------------

def test_ids_match_tiktoken_built_from_our_ranks(trained):
    tiktoken = pytest.importorskip("tiktoken")
    tok = trained[RegexTokenizer]
    enc = tiktoken.Encoding(name="minidalle-test", pat_str=GPT4_SPLIT_PATTERN,
                            mergeable_ranks={tok.vocab[i]: i for i in range(256 + len(tok.merges))},
                            special_tokens={})
    # tiktoken's ranks are byte strings; ours are merges. The same ids means the same algorithm.
    for text in STRINGS + [corpus(), "brand new words: zygomorphic quixotry"]:
        text = sanitize(text)
        assert tok.encode(text) == enc.encode_ordinary(text), text[:40]


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("lowercase", [False, True])
def test_exported_tokenizer_json_gives_the_same_ids_in_hugging_face(cls, lowercase, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = cls(lowercase=lowercase).train(corpus(), 400, progress=False)
    tok.add_special_tokens(["<|pad|>"])
    hf = tokenizers.Tokenizer.from_file(str(tok.export_hf(tmp_path / "tokenizer.json")))
    assert hf.get_vocab_size() == tok.vocab_size
    for text in STRINGS + ["A Big RED Circle", "brand new words: zygomorphic quixotry"]:
        ids = tok.encode(text)
        assert hf.encode(text).ids == ids, text[:40]
        assert hf.decode(ids) == tok.decode(ids)
    assert hf.token_to_id("<|pad|>") == tok.special_tokens["<|pad|>"]


def test_byte_to_char_is_a_printable_bijection():
    from minidalle.bpe import byte_to_char
    table = byte_to_char()
    assert len(set(table.values())) == 256 and all(ch.isprintable() and not ch.isspace() for ch in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] == "\u0120"


# --- properties --------------------------------------------------------------------------------------------

_SMALL = {}


def small(cls):
    """A 320-token tokenizer of each class, trained once per session (hypothesis calls tests many times)."""
    if cls not in _SMALL:
        _SMALL[cls] = cls().train(corpus()[:4000], 320, progress=False)
    return _SMALL[cls]


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=80), cls=st.sampled_from(CLASSES))
def test_property_round_trip(text, cls):
    tok = small(cls)
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=60), length=st.integers(1, 40))
def test_property_padding_and_truncation(text, length):
    tok = small(RegexTokenizer)
    pad = 10_000  # any id: padding never reaches the vocabulary
    full = tok.encode(text)
    if len(full) > length:
        with pytest.raises(DataError):
            tok.encode_to_length(text, length, pad)
    ids, cut = tok.encode_to_length(text, length, pad, truncate=True)
    assert len(ids) == length and cut == (len(full) > length)
    kept = [i for i in ids if i != pad]
    assert kept == full[:length]


def test_bench_bpe_runs_small_and_reports_every_figure(capsys):
    pytest.importorskip("tiktoken")
    pytest.importorskip("tokenizers")
    from minidalle.bench.bpe import benchmark_bpe, source_corpus

    assert len(source_corpus(0.25).encode("utf-8")) <= 2**18
    r = benchmark_bpe(mib=0.25, vocab_size=600, n_captions=300, naive_kib=8, naive_merges_n=40, progress=False)
    assert r["naive_merges"] == 40 and r["speedup_vs_naive"] > 0 and r["train_ratio_vs_hf"] > 0
    assert r["captions"] == 300 and r["encode_captions_per_s"] > 0 and r["tiktoken_captions_per_s"] > 0
