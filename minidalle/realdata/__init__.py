"""Real captioned images, from the `small` preset on: robust loading, a folder of files, tar shards, emoji.

    images.py    bytes -> a checked (H, W, 3) uint8 square; caption files; skip counting per reason
    folders.py   FolderDataset (root/**/cat.jpg + cat.txt) and splitting files across ranks and workers
    shards.py    TarShardDataset (WebDataset-style shards, streamed, with damage accounted for)
    emoji.py     the OpenMoji emoji dataset (an optional extra)
"""
