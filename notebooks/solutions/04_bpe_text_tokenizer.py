"""Solutions to the exercises of 04_bpe_text_tokenizer.ipynb. Try each one yourself first.

Each block below replaces the exercise cell of the same name; it runs in the notebook's namespace,
after the cells above the exercise (so `Counter`, `RegexTokenizer` and `merge_pair` exist).
"""

# %% Exercise 4.1
def encode_by_rank(text, merges):
    ids = list(text.encode("utf-8"))
    while len(ids) >= 2:
        learned = [p for p in zip(ids, ids[1:]) if p in merges]
        if not learned:
            break
        pair = min(learned, key=merges.get)          # the earliest merge: the smallest new id
        out, i = [], 0
        while i < len(ids):
            if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
                out.append(merges[pair]); i += 2
            else:
                out.append(ids[i]); i += 1
        ids = out
    return ids


# %% Wrong 4.1: merges the leftmost learned pair first, not the one learned earliest (smallest new id)
def encode_by_rank(text, merges):
    ids = list(text.encode("utf-8"))
    while len(ids) >= 2:
        pairs = [p for p in zip(ids, ids[1:]) if p in merges]
        if not pairs:
            break
        pair = pairs[0]  # mistake: the first pair found, whatever its rank
        out, i = [], 0
        while i < len(ids):
            if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
                out.append(merges[pair]); i += 2
            else:
                out.append(ids[i]); i += 1
        ids = out
    return ids


# %% Exercise 4.2
def decode_ids(ids, merges):
    vocab = {i: bytes([i]) for i in range(256)}
    for (left, right), new in sorted(merges.items(), key=lambda item: item[1]):  # parents first
        vocab[new] = vocab[left] + vocab[right]
    return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


# %% Wrong 4.2: decodes each token on its own
def decode_ids(ids, merges):
    vocab = {i: bytes([i]) for i in range(256)}
    for (left, right), new in sorted(merges.items(), key=lambda item: item[1]):
        vocab[new] = vocab[left] + vocab[right]
    return "".join(vocab[i].decode("utf-8", errors="replace") for i in ids)  # mistake: splits multi-byte characters


# %% Exercise 4.3
def train_in_chunks(text, n_merges):
    chunks = {tuple(chunk.encode("utf-8")): n for chunk, n in Counter(RegexTokenizer().split(text)).items()}
    merges = {}
    for k in range(n_merges):
        pairs = Counter()
        for ids, n in chunks.items():
            for pair in zip(ids, ids[1:]):
                pairs[pair] += n
        if not pairs:
            break
        top = max(pairs.values())
        best = min(p for p, c in pairs.items() if c == top)
        merges[best] = 256 + k
        chunks = {tuple(merge_pair(list(ids), best, 256 + k)): n for ids, n in chunks.items()}
    return merges


# %% Wrong 4.3: counts each distinct chunk once, ignoring how often it occurs
def train_in_chunks(text, n_merges):
    chunks = {tuple(chunk.encode("utf-8")): n for chunk, n in Counter(RegexTokenizer().split(text)).items()}
    merges = {}
    for k in range(n_merges):
        pairs = Counter()
        for ids, n in chunks.items():
            for pair in zip(ids, ids[1:]):
                pairs[pair] += 1  # mistake: should add n, the chunk's count
        if not pairs:
            break
        top = max(pairs.values())
        best = min(p for p, c in pairs.items() if c == top)
        merges[best] = 256 + k
        chunks = {tuple(merge_pair(list(ids), best, 256 + k)): n for ids, n in chunks.items()}
    return merges
