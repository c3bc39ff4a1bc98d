"""The stages of the paper, glued end to end: each one trains, saves, reloads and measures one part.

The root modules say *what* each part computes (dvae.py, bpe.py, model.py, clip.py, sampling.py);
the files here say how a run trains and reuses it, in the pipeline's order:

    image_tokenizer.py   stage 1: train the dVAE, encode a dataset to codes once (cached), load it back
    text_tokenizer.py    the BPE model a run's captions are read with (trained once, shared)
    transformer.py       stage 2: (caption ids, image codes) pairs, training, loading, evaluating
    reranker_data.py     what the reranker trains on: pairs with rivals one fact away, morphed shapes, augmentation
    reranker.py          the reranker's training, loading and measuring
    generate.py          a trained run folder -> candidates per caption -> ranked and judged
    report.py            the accuracy tables, report.md / eval.md, several seeds side by side
    pipeline.py          `python -m minidalle demo`: every stage trained or reused in one run folder
"""
