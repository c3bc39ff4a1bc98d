"""The BPE tokenizer's `.model` file: reading it back line by line, and refusing any file that is not whole.

    body, digest = split_checksum(data)           # the bytes above the last line, and its sha256 hex
    tok = parse_model(lines, path, kinds)         # kinds: {"BasicTokenizer": cls, "RegexTokenizer": cls}

bpe.py's `Tokenizer.save` writes the file and `Tokenizer.load` calls these; the format (one item a
line, a sha256 over every byte above its last line) is described in bpe.py's docstring. This file is
the defensive part: a cut, damaged or hand-edited file is refused with a message that names it and
the line at fault, so it never loads as a slightly different tokenizer. The teaching code (merges,
encoding, training) stays in bpe.py; this file imports no tokenizer class, it is handed them.
"""

from __future__ import annotations

from pathlib import Path

import regex

from ..errors import DataError

RETRAIN = "retrain it with `python -m minidalle train bpe` (or save the tokenizer again)"
_CHECKSUM_LINE = regex.compile(rb"sha256 ([0-9a-f]{64})\r?\n?")  # a CRLF copy gets the checksum message
# Numbers of at most 12 digits: int() refuses very long digit strings with a ValueError of its own.
_COUNT_LINE = {key: regex.compile(key + r" (0|[1-9][0-9]{0,11})", regex.ASCII) for key in ("merges", "special")}
_MERGE_LINE = regex.compile(r"(-?[0-9]{1,12}) (-?[0-9]{1,12})", regex.ASCII)
_SPECIAL_LINE = regex.compile(r"(.+) (-?[0-9]{1,12})", regex.ASCII | regex.DOTALL)
_HEADER_LINES = 6  # format, class, pattern, lowercase, merges N, special N


def split_checksum(data: bytes) -> tuple[bytes, str | None]:
    """The bytes before the last line, and the hex digest that line holds (None: not a checksum line).

    Example: b"a\\nsha256 <64 hex>\\n" -> (b"a\\n", "<64 hex>")
    """
    end = len(data) - 1 if data.endswith(b"\n") else len(data)
    start = data.rfind(b"\n", 0, end) + 1
    m = _CHECKSUM_LINE.fullmatch(data, start)
    return data[:start], (m.group(1).decode("ascii") if m else None)


def why_unsummed(data: bytes) -> str:
    """Say why a file has no checksum line: cut short (and how far it got) or damaged at the end.

    Example: a 128-merge file cut after 53 merge lines -> "is truncated: 53 of 128 merges (...)"
    """
    complete = data.decode("utf-8", errors="replace").split("\n")[:-1]  # lines that ended with "\n"
    if len(complete) < _HEADER_LINES:
        return "is truncated: it ends inside its header, and the final sha256 line is missing"
    merges, special = (_COUNT_LINE[key].fullmatch(line) for key, line in zip(("merges", "special"), complete[4:6]))
    if not (merges and special):
        return "is damaged: its header is not readable and the final sha256 line is missing"
    n, m = int(merges.group(1)), int(special.group(1))
    got = len(complete) - _HEADER_LINES - m
    if got < n:
        return f"is truncated: {max(got, 0)} of {n} merges, and the final sha256 line is missing"
    return "is truncated or damaged at its end: the last line is not the `sha256 <hex>` checksum"


def parse_model(lines: list[str], path: Path, kinds: dict[str, type]):
    """Checksummed `.model` lines -> a tokenizer of kinds[class line], checking every line and every id on the way.

    Even a file whose checksum was recomputed after editing cannot load as something inconsistent.
    Example: the lines `save` wrote -> a tokenizer equal to the one saved
    """
    import ast

    def damaged(line_no: int, what: str) -> DataError:
        return DataError(f"{path} is damaged: line {line_no}: {what}; {RETRAIN}")

    def literal(line_no: int, line: str, what: str):
        try:
            return ast.literal_eval(line)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise damaged(line_no, f"{what} is not a string literal: {line[:60]!r}") from None

    if len(lines) < _HEADER_LINES:
        raise DataError(f"{path} is damaged: its header has {len(lines)} of {_HEADER_LINES} lines; {RETRAIN}")
    if lines[1] not in kinds:
        raise damaged(2, f"unknown tokenizer class {lines[1][:40]!r} (expected one of {', '.join(kinds)})")
    kind = kinds[lines[1]]
    pattern = literal(3, lines[2], "the pattern")
    if not isinstance(pattern, str):
        raise damaged(3, f"the pattern is not a string literal: {lines[2][:60]!r}")
    if lines[1] == "BasicTokenizer" and pattern:
        raise damaged(3, f"a BasicTokenizer has no pattern, but the file gives {pattern[:40]!r}")
    if lines[1] == "RegexTokenizer":
        try:
            regex.compile(pattern)
        except (regex.error, ValueError, TypeError, OverflowError, MemoryError, RecursionError) as e:
            raise damaged(3, f"the pattern is not a valid regex ({e})") from None
    if lines[3] not in ("lowercase 0", "lowercase 1"):
        raise damaged(4, f"expected 'lowercase 0' or 'lowercase 1', got {lines[3][:40]!r}")
    counts = {}
    for line_no, key in ((5, "merges"), (6, "special")):
        m = _COUNT_LINE[key].fullmatch(lines[line_no - 1])
        if not m:
            raise damaged(line_no, f"expected '{key} <count>', got {lines[line_no - 1][:40]!r}")
        counts[key] = int(m.group(1))
    n_merges, n_special = counts["merges"], counts["special"]
    expected = _HEADER_LINES + n_special + n_merges
    if len(lines) != expected:
        got = max(len(lines) - _HEADER_LINES - n_special, 0)
        raise DataError(f"{path} is damaged: its header promises {n_special} special tokens and {n_merges} "
                        f"merges ({expected} lines before the checksum), but it has {len(lines)} lines "
                        f"({got} of {n_merges} merges); {RETRAIN}")
    special: dict[str, int] = {}
    for j, line in enumerate(lines[_HEADER_LINES:_HEADER_LINES + n_special]):
        line_no = _HEADER_LINES + j + 1
        m = _SPECIAL_LINE.fullmatch(line)
        if not m:
            raise damaged(line_no, f"expected a special token as '<name literal> <id>', got {line[:60]!r}")
        name, i = literal(line_no, m.group(1), "the special token name"), int(m.group(2))
        if not isinstance(name, str) or not name:
            raise damaged(line_no, f"a special token name must be a non-empty string, got {name!r:.60}")
        if name in special:
            raise damaged(line_no, f"special token {name!r:.60} appears twice")
        if i != 256 + n_merges + j:
            raise damaged(line_no, f"special token {name!r:.60} has id {i}, but special tokens take the ids "
                                   f"after the {n_merges} merges: it must be {256 + n_merges + j}")
        special[name] = i
    merges: dict[tuple[int, int], int] = {}
    for k, line in enumerate(lines[_HEADER_LINES + n_special:]):
        line_no = _HEADER_LINES + n_special + k + 1
        m = _MERGE_LINE.fullmatch(line)
        if not m:
            raise damaged(line_no, f"merge {k} is {line[:40]!r}, not two ids 'left right'")
        pair = int(m.group(1)), int(m.group(2))
        for i in pair:
            if not 0 <= i < 256 + k:
                raise damaged(line_no, f"merge {k} ({line}) refers to id {i}, but it may only use the bytes and "
                                       f"earlier merges, ids 0..{256 + k - 1}")
        if pair in merges:
            raise damaged(line_no, f"merge {k} repeats the pair {pair} of merge {merges[pair] - 256}")
        merges[pair] = 256 + k
    lowercase = lines[3] == "lowercase 1"
    tok = kind(pattern=pattern, lowercase=lowercase) if lines[1] == "RegexTokenizer" else kind(lowercase=lowercase)
    tok.merges = merges
    tok.special_tokens = special
    tok.vocab = tok._build_vocab()
    return tok


