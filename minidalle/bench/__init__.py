"""Benchmarks: measured figures against their targets, printed and written as JSON (`python -m minidalle bench ...`).

    tools.py      timing A against B, alternating, on a busy machine; judging figures against targets
    attention.py  sparse attention: naive, SDPA with a mask, FlexAttention (speed and agreement)
    sampling.py   recomputing against the key/value cache, chunking, the compiled step
    sampling_limits.py   what limits the sampler: bandwidth and the roofline, the reranker, the GPU
    bpe.py        the tokenizer's training and encoding speed
    judge.py      how well the judge reads renders, blurred and degraded
    dvae.py       the trained dVAE's reconstructions, read by the judge
    suite.py      `bench all`: every benchmark in one summary, with its date and machine
    gpu_check.py  `check-gpu`: what a GPU changes (throughput, MFU, exact resume, CUDA graphs, host syncs)
"""
