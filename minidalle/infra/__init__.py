"""What every stage leans on and nobody needs to read first: files, checkpoints, devices, the machine.

    files.py       atomic writes, the run lock, owned output folders, setting a stale folder aside
    checkpoint.py  checkpoint folders with a manifest of checksums; full and sharded (FSDP)
    sharded.py     FSDP's slices on disk (torch.distributed.checkpoint), each process its own
    resume.py      continuing a run exactly: the checkpoint to resume, the data order, the metrics log
    devices.py     picking the device and precision, seeding every generator, saving and restoring RNG state
    machine.py     the machine a figure was measured on, and the CPU thread count that trains fastest
    bpe_files.py   reading a BPE `.model` file back and refusing any that is not whole
"""
