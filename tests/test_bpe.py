"""The BPE text tokenizer: a hand-worked example, round trips, the incremental trainer against a naive
one, files, dropout, padding to the model's length, special tokens, and ids identical to tiktoken."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidalle.bpe import (GPT4_SPLIT_PATTERN, BasicTokenizer, RegexTokenizer, Tokenizer, merge_pair, sanitize,
                           train_merges)
from minidalle.bpe_bench import naive_merges
from minidalle.data import ShapesWorld
from minidalle.errors import ConfigError, DataError

CLASSES = [BasicTokenizer, RegexTokenizer]


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
    bad.write_text("minidalle-bpe v1\nRegexTokenizer\n'x'\nlowercase 0\nspecial 0\n1 two\n")
    with pytest.raises(DataError, match="damaged"):
        Tokenizer.load(bad)
    with pytest.raises(DataError, match="cannot read"):
        Tokenizer.load(tmp_path / "missing.model")


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
    from minidalle.bpe_bench import benchmark_bpe, source_corpus

    assert len(source_corpus(0.25).encode("utf-8")) <= 2**18
    r = benchmark_bpe(mib=0.25, vocab_size=600, n_captions=300, naive_kib=8, naive_merges_n=40, progress=False)
    assert r["naive_merges"] == 40 and r["speedup_vs_naive"] > 0 and r["train_ratio_vs_hf"] > 0
    assert r["captions"] == 300 and r["encode_captions_per_s"] > 0 and r["tiktoken_captions_per_s"] > 0
