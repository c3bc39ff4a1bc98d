"""Solutions to the exercises of 09_the_whole_pipeline.ipynb. Try each one yourself first.

Each block below replaces the exercise cell of the same name; it runs in the notebook's namespace,
after the cells above the exercise (so `np` and `torch` exist).
"""

# %% Exercise 9.1
def best_pick_accuracy(ok, scores):
    top = scores.argmax(axis=1)                                        # (P,) the reranker's pick per prompt
    return float(ok[np.arange(len(ok)), top].mean())


# %% Exercise 9.2
def stated_accuracy(checks):
    stated = np.isfinite(checks[:, 0])                                 # prompts whose caption states it
    return float(checks[stated].mean())


# %% Exercise 9.3
def sequence_position(layout, row, col):
    return layout.text_len + row * layout.grid + col                   # the caption first, then row by row
