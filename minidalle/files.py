"""Writing a file so that a crash leaves the old one or the new one, never half of either.

    write_atomic(Path("runs/demo-toy/report.json"), text)   # str (UTF-8) or bytes
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` to a temporary file beside `path`, push it to the disk, then rename it to `path`.

    Example: write_atomic(Path("bpe.model"), b"...") leaves bpe.model whole (old or new), nothing else
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
