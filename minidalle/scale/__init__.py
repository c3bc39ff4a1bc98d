"""Going past one device: the same training loop under torchrun, 16-bit numbers, and what a config costs.

    distributed.py   DDP and FSDP2 under torchrun (process groups, wrapping, collectives, PowerSGD)
    precision.py     the 16-bit lab: gradient underflow, loss scales per resblock, bf16 (notebook 10)
    plan.py          parameters, FLOPs, memory and days of training for a config and a GPU count
"""
