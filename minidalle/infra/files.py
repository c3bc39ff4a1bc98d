"""Files that survive a crash, and output folders a command may replace later, but only what it wrote.

    write_atomic(Path("runs/demo-toy/report.json"), text)   # str (UTF-8) or bytes
    with RunLock("runs/x"): ...                               # one writer per folder (a second is refused)

    out = OwnedFolder("samples", "generate", index="captions.jsonl").check()   # refused before any change
    out.write("00000.png", png_bytes)                            # into a hidden staging folder inside it
    out.commit()   # the earlier run's files out, the new ones in; a crash before this changes nothing

`OwnedFolder` is how `data --out` and `generate --out` treat their folder. The folder keeps a ledger,
`.minidalle-written.json`, of every file the command wrote there, with its size and sha256. A second
run into the same folder may remove exactly those files, and only while each is unchanged; a folder
with anything else in it (a notes.txt, an edited image, a hand-written captions.jsonl, another
command's output) is refused before a single file is touched. The ledger is read as untrusted input:
a name in it that is not a plain file name of this folder makes the folder refused, never a path
followed. New files are written into `.tmp-<command>-<pid>/` inside the folder and moved in at the
end, so a run that fails or is killed half-way leaves the earlier results as they were.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import time
import warnings
from pathlib import Path

from ..errors import CheckpointError, DataError
from ..errors import ConfigError
import math

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

logger = logging.getLogger(__name__)

LEDGER = ".minidalle-written.json"
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # what the commands name their files: no folders, no dots first


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


def file_digest(path: Path) -> dict:
    """{"sha256", "bytes"} of a file, read 1 MiB at a time. Example: -> {"sha256": "3f9a...", "bytes": 812}"""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return {"sha256": h.hexdigest(), "bytes": size}


def set_aside_folder(parent: Path) -> Path:
    """A new, empty `parent/set-aside-<time>/` (a suffix -1, -2 ... when that second is taken): where
    every command moves earlier results it replaces, as `--start-over` does. Example: -> runs/x/bpe/set-aside-20261206-101500"""
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
    while True:  # mkdir, not exists() then mkdir: two in one second get two folders
        aside = Path(parent) / (f"set-aside-{stamp}" + (f"-{n}" if n else ""))
        try:
            aside.mkdir(parents=True)
            return aside
        except FileExistsError:
            n += 1


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (on POSIX; elsewhere False). Example: pid_alive(os.getpid()) -> True"""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks "does it exist?"
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


LOCK_FILE = ".lock"


def fsync_file(path: Path) -> None:
    """Push a file's bytes to the disk; otherwise a power cut after a rename can leave zeros."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_synced(path: Path, text: str) -> None:
    """Write text to `path` and push it to the disk (into a folder that is renamed into place after)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Persist a folder's entries (new files, renames). POSIX only: Windows cannot open folders."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunLock:
    """An exclusive lock on `{out_dir}/.lock`, so two trainers never write one run's checkpoints at once.

    The lock is the operating system's (`fcntl.flock`): it is released when its holder exits, even
    by SIGKILL, so a lock left by a dead process is never an obstacle. (A forked child, such as a
    DataLoader worker, would share the lock and keep it after its parent dies; children close their
    copy at fork, see `_close_in_child`.) The file also says who holds it (pid, host, since when) for
    the error message; a stale one is logged and rewritten. The file stays after release (deleting it
    would let a third process lock a new file while a second still waits on the old one). Where
    locks cannot be taken (no `fcntl` on Windows; a network filesystem without locking) the run goes
    on unlocked, with a warning. `flag` names the setting that chooses the folder, for the message.
    Example: with RunLock("runs/x", "--train.out_dir"): ...  # a second holder -> CheckpointError
    """

    def __init__(self, out_dir: str | Path, flag: str = "--train.out_dir", holder: str = "training run",
                 clash: str = "two writers would interleave their checkpoints"):
        self.path, self.flag, self._fd = Path(out_dir) / LOCK_FILE, flag, None
        self.holder, self.clash = holder, clash  # for the refusal: "in use by another <holder> ...; <clash>"

    def acquire(self) -> "RunLock":
        if fcntl is None:
            return self._unlocked("this platform has no fcntl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a `.lock` that is a link (in a folder from someone else) is refused, never followed
        # to truncate and rewrite whatever file it points at; a folder or device there is refused too.
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                         0o644)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise
            fd = None
        st = os.fstat(fd) if fd is not None else None
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:  # a hard link is another file's name too
            if fd is not None:
                os.close(fd)
            raise CheckpointError(f"{self.path} is not a lock file minidalle made (a link, a folder, a device); "
                                  f"nothing was changed. Remove it, or choose another folder ({self.flag})")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # ENOLCK, EOPNOTSUPP, ...
                os.close(fd)
                return self._unlocked(f"its filesystem cannot lock files ({e.strerror})")
            holder = os.pread(fd, 4096, 0)
            if not holder.strip():  # the winner has the lock but has not written its name yet
                time.sleep(0.2)
                holder = os.pread(fd, 4096, 0)
            os.close(fd)
            raise CheckpointError(f"{self.path.parent} is in use by another {self.holder} ({_holder(holder)}); "
                                  f"{self.clash}. Wait for it to finish, stop it, or choose another folder "
                                  f"({self.flag})") from None
        previous = os.pread(fd, 4096, 0)
        if previous.strip():  # a holder that died without releasing (a crash or SIGKILL)
            logger.info("%s: replacing the stale lock of %s (it no longer holds it)", self.path, _holder(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        _HELD.add(fd)
        return self

    def _unlocked(self, why: str) -> "RunLock":
        warnings.warn(f"{self.path.parent} is not locked against a second trainer: {why}; do not run two "
                      "on one folder", stacklevel=3)
        return self

    @property
    def held(self) -> bool:
        """True while this object holds the operating system's lock (False when unlocked, see `_unlocked`)."""
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD.discard(fd)
        os.ftruncate(fd, 0)  # an empty file says "nobody holds this"
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: set[int] = set()  # file descriptors of the RunLocks this process holds


def _close_in_child() -> None:
    """In a forked child: close (never unlock: that would free the parent's lock) every held lock fd."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def _holder(data: bytes) -> str:
    """Example: b'{"pid": 42, "host": "gpu1", "since": "2026-12-01 10:00:00"}' -> "pid 42 on gpu1 since 2026-12-01 10:00:00" """
    try:
        who = json.loads(data.decode("utf-8"))
        return f"pid {who['pid']} on {who['host']} since {who['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


class OwnedFolder:
    """An output folder that `command` fills, and may later refill, touching only the files it wrote.

    check(): accept the folder (new, empty, or holding only unchanged files this command's ledger
    lists) or raise DataError naming what is in the way, with nothing changed; then create it, lock
    it and make the staging folder (so an unwritable folder fails here, before any work).
    write(name, data): one new file, staged. commit(): check the earlier run's files once more,
    remove them, move the new ones in (`index`, the file that lists the others, first removed and
    last written), write the ledger; final=False stays claimed for more files and another commit().
    abandon(): drop the staging folder (the earlier results stay). commit() returns how many of
    the earlier run's files it replaced.
    Example: OwnedFolder("samples", "generate", "--out", index="captions.jsonl").check()
    """

    def __init__(self, path: str | os.PathLike, command: str, flag: str = "--out", index: str | None = None):
        self.path, self.command, self.flag, self.index = Path(path), command, flag, index
        self.stage: Path | None = None
        self.previous: dict[str, list[dict]] = {}  # name -> the digests the ledger allows for it
        self.written: dict[str, dict] = {}  # name -> digest, of the new files staged
        self.committed: dict[str, dict] = {}  # name -> digest, of the new files already moved in
        self._lock = None  # held from check() to the last commit() or abandon(): one writer per folder

    # --- before anything is written -------------------------------------------------------------------
    def check(self) -> "OwnedFolder":
        where = f"{self.flag} {self.path}"
        for part in (self.path, *self.path.parents):  # a file where a folder belongs, at any level
            if part.exists() and not part.is_dir():
                raise DataError(f"{where}: {part} is a file, not a folder; choose another folder")
        try:
            if self.path.is_dir():
                self._claim(self._entries())  # read only: a refused folder gets not even a lock file
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = RunLock(self.path, self.flag, f"`{self.command}`", "two of them would mix their files")
            self._lock.acquire()
            try:
                self._clean_dead_stages()
                self.previous = self._claim(self._entries())  # again, now that no other writer can change it
                self.stage = self.path / f".tmp-{self.command}-{os.getpid()}-{os.urandom(3).hex()}"
                self.stage.mkdir()
            except BaseException:
                self._release()
                raise
        except PermissionError as e:
            raise DataError(f"{where}: cannot write there ({e.strerror}); choose a folder you can write to") from None
        return self

    def _entries(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir()
                      if p.name not in (LEDGER, LOCK_FILE) and not self._is_stage(p.name))

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _claim(self, entries: list[str]) -> dict[str, list[dict]]:
        """The earlier run's files (name -> allowed digests), once every entry is one of them, unchanged."""
        if not entries:
            return {}
        ledger = self._read_ledger()
        what = f"{self.flag} {self.path}"
        if ledger is None:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            older = (f" (its {self.index} comes without minidalle's ledger {LEDGER}: written by hand, or by an "
                     "older minidalle, which kept no record of its files)") if self.index in entries else ""
            raise DataError(f"{what} already holds files that `{self.command}` did not write ({shown}){older}; "
                            "nothing was changed. Choose an empty or new folder, or remove those files yourself")
        if ledger["command"] != self.command:
            raise DataError(f"{what} holds the output of `{ledger['command']}`; `{self.command}` writes only into an "
                            f"empty folder or one `{self.command}` wrote. Nothing was changed; choose another folder")
        files = ledger["files"]
        foreign = [n for n in entries if n not in files]
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise DataError(f"{what} holds files that the earlier `{self.command}` there did not write ({shown}); "
                            "nothing was changed. Move them out, or choose an empty or new folder")
        for name in entries:
            self._unchanged(name, files[name], "nothing was changed")
        return {n: files[n] for n in entries}

    def _unchanged(self, name: str, digests: list[dict], then: str) -> None:
        """Refuse (DataError ending in `then`) a file that is no longer one the ledger records."""
        path, what = self.path / name, f"{self.flag} {self.path}"
        if not path.is_file() or path.is_symlink():
            raise DataError(f"{what}: {name} is no longer the file `{self.command}` wrote there (now a folder or a "
                            f"link); {then}. Move it out, or choose another folder")
        if file_digest(path) not in digests:
            raise DataError(f"{what}: {name} changed since `{self.command}` wrote it; {then}. Move it out (or back), "
                            "or choose another folder")

    def _read_ledger(self) -> dict | None:
        """The ledger, checked entry by entry; None when there is none. Anything odd refuses the folder."""
        path = self.path / LEDGER
        if not path.is_file():
            return None
        bad = DataError(f"{self.flag} {self.path}: its {LEDGER} is not a ledger minidalle wrote (edited or damaged); "
                        "nothing was changed. Choose an empty or new folder")
        try:
            ledger = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, ValueError):
            raise bad from None
        if not (isinstance(ledger, dict) and isinstance(ledger.get("command"), str)
                and isinstance(ledger.get("files"), dict)):
            raise bad
        files = {}
        for name, digests in ledger["files"].items():
            digests = digests if isinstance(digests, list) else [digests]
            if not (isinstance(name, str) and _PLAIN_NAME.fullmatch(name) and name != LEDGER and digests
                    and all(isinstance(d, dict) and set(d) == {"sha256", "bytes"} for d in digests)):
                raise bad  # "../victim/keep.png", "/etc/x", ".hidden": never a path to follow
            files[name] = digests
        return {"command": ledger["command"], "files": files}

    def _is_stage(self, name: str) -> bool:
        return name.startswith(f".tmp-{self.command}-")

    def _clean_dead_stages(self) -> None:
        """Remove the staging folders this command left when it was killed. Under the folder's lock no
        other run of it is alive here, so every one goes (a process id may repeat: in a container every
        run can be pid 1); unlocked (no fcntl), only those whose process is gone."""
        locked = self._lock is not None and self._lock.held
        for p in self.path.iterdir():
            if self._is_stage(p.name) and p.is_dir() and not p.is_symlink():
                pid = p.name[len(f".tmp-{self.command}-"):].split("-")[0]
                if locked or (pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid))):
                    shutil.rmtree(p, ignore_errors=True)

    # --- writing --------------------------------------------------------------------------------------
    def write(self, name: str, data: bytes | str) -> None:
        """Stage one new file `name` (a plain file name) with `data`; recorded for the ledger."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        with open(self.staged(name), "wb") as f:
            f.write(data)
        self.written[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    def staged(self, name: str) -> Path:
        """Where to write new file `name` oneself (a plotting library's savefig, say); then `adopt(name)`."""
        if self.stage is None:
            raise DataError("OwnedFolder.staged before check(): nothing is staged yet")
        if not _PLAIN_NAME.fullmatch(name) or name == LEDGER:
            raise DataError(f"{name!r} is not a plain file name for {self.path}")
        return self.stage / name

    def adopt(self, name: str) -> None:
        """Record a file written at `staged(name)` for the ledger."""
        self.written[name] = file_digest(self.staged(name))

    def commit(self, final: bool = True) -> int:
        """Replace the earlier run's files by the new ones; returns how many earlier files were removed.

        Each earlier file is checked once more first, and so is every name about to be written (the
        user may have edited or added a file while the command ran): then nothing is replaced, and the
        new files move into a visible DIR/set-aside-<time>/ named in the error (the next run refuses
        the folder until they are moved out). Else the ledger lists old and new files together (so a
        crash in the middle leaves a folder whose every file is still recorded, which the next run
        cleans up), the old index goes, the other files move in, the new index last. The files are
        not pushed to the disk one by one (a generated folder can be regenerated): after a power
        cut the next run may refuse a file as changed, never delete one it did not write."""
        try:
            for name, digests in self.previous.items():
                self._unchanged(name, digests, "nothing was replaced")
            for name in self.written:
                if name not in self.previous and name not in self.committed and os.path.lexists(self.path / name):
                    raise DataError(f"{self.flag} {self.path}: {name} appeared while `{self.command}` ran (it did "
                                    "not write it); nothing was replaced")
        except DataError as e:
            kept = self._keep()
            raise DataError(f"{e}. The new files are in {kept}: move them out before `{self.command}` writes "
                            "into this folder again") from None
        ledger = {n: list(d) for n, d in self.previous.items()}
        for n, d in {**self.committed, **self.written}.items():
            ledger[n] = [*ledger.get(n, []), d]
        self._write_ledger(ledger)
        if self.index in self.previous:
            (self.path / self.index).unlink(missing_ok=True)  # no index ever lists a mix of old and new files
        for name in self.previous:
            if name not in self.written:
                (self.path / name).unlink(missing_ok=True)
        for name in sorted(self.written, key=lambda n: n == self.index):  # the index last
            os.replace(self.stage / name, self.path / name)
        self.committed.update(self.written)
        self.written, replaced, self.previous = {}, len(self.previous), {}
        self._write_ledger({n: [d] for n, d in self.committed.items()})
        fsync_dir(self.path)  # the renames themselves survive a power cut
        if final:
            shutil.rmtree(self.stage, ignore_errors=True)
            self.stage = None
            self._release()
        return replaced

    def _keep(self) -> Path:
        """Move the staged files into a new, visible DIR/set-aside-<time>/ (a refused commit's rescue)."""
        kept = set_aside_folder(self.path)
        for name in self.written:
            os.replace(self.stage / name, kept / name)
        shutil.rmtree(self.stage, ignore_errors=True)
        self.stage, self.written = None, {}
        return kept

    def abandon(self) -> None:
        """Drop the staged files and let the folder go; what was committed stays, and so do the earlier
        results when nothing was."""
        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            self.stage = None
        self._release()

    def _write_ledger(self, files: dict) -> None:
        write_atomic(self.path / LEDGER, json.dumps({"command": self.command, "files": files}, indent=0) + "\n")


def check_out_folder(path: str | Path, flag: str) -> Path:
    """Refuse an output folder that cannot be one (it, or a folder above it, is a file), naming the flag.

    Example: check_out_folder("notes.txt/run", "--out") -> ConfigError("--out=notes.txt/run: notes.txt is a file ...")
    """
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            raise ConfigError(f"{flag}={path}: {part} is a file, not a folder; choose another folder")
    return path


def strict_json(value):
    """NaN and infinity are not JSON (strict parsers refuse them): they are written as null.

    Example: strict_json({"x": [float("nan"), 1]}) -> {"x": [None, 1]}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value
