"""Where an artifact is written: checked before the work starts, written atomically, cleaned up after.

- `check_output` (before prefill): the output path is not a directory, its folder exists or can be made and is
  writable (a probe file is created and removed), the free space holds the estimated size, and an existing file
  is either refused (no clobber) or reported as about to be overwritten.
- `atomic_target`: the file is written as `.<name>.tmp-<pid>` in the same folder, fsynced, renamed over the final
  name (and the folder fsynced); any failure or interrupt removes the temporary file. Temporary files of writers
  that died without cleaning up (SIGKILL, power loss: their pid no longer runs) are removed first.
- `cleanup_on_sigterm`: while writing, SIGTERM raises like Ctrl-C does, so the same cleanup runs.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import threading
from pathlib import Path

from ..errors import ArtifactError

_TEMP = re.compile(r"^\..+\.tmp-(\d+)$")
SIZE_MARGIN = 1 << 20  # free space kept beyond the estimate (HDF5 structure, metadata)


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # exists (another user's), or cannot be asked: leave its file alone
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove `.<name>.tmp-<pid>` files in `folder` whose writer (pid) no longer runs; returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m and entry.is_file(follow_symlinks=False) and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def check_output(path: str | Path, estimate_bytes: int = 0, clobber: bool = True) -> bool:
    """Check before any work that `path` can receive an artifact of about `estimate_bytes`. Returns whether a
    file exists there (it will be replaced); raises ArtifactError (one line) when it cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"output {path} is a directory; give a file name ending in .h5 or a folder with -o")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot create output folder {folder}: {e.strerror or e}") from None
    exists = path.exists()
    if exists and not clobber:
        raise ArtifactError(f"{path} exists; refusing to overwrite it (--no-clobber)")
    probe = temp_path(path)
    try:
        with open(probe, "wb"):
            pass
    except OSError as e:
        raise ArtifactError(f"cannot write into {folder}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    free = shutil.disk_usage(folder).free
    if estimate_bytes and free < estimate_bytes + SIZE_MARGIN:
        raise ArtifactError(f"not enough free space in {folder} for {path.name}: about {estimate_bytes:,} bytes "
                            f"needed, {free:,} free")
    return exists


def check_outputs(paths: list[Path], estimates: list[int], clobber: bool = True) -> set[Path]:
    """`check_output` for several artifacts (the free space must hold all of those going to one folder); returns
    the paths that exist and will be overwritten."""
    existing, per_folder = set(), {}
    for path, estimate in zip(map(Path, paths), estimates):
        folder = path.parent.resolve()
        per_folder[folder] = per_folder.get(folder, 0) + int(estimate)
        if check_output(path, per_folder[folder], clobber):
            existing.add(path)
    return existing


@contextlib.contextmanager
def atomic_target(path: Path):
    """Yield a temporary path next to `path`; on success it replaces `path`, on any failure it is removed."""
    folder = path.parent
    if path.is_dir():
        raise ArtifactError(f"output {path} is a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot create output folder {folder}: {e.strerror or e}") from None
    remove_stale_temps(folder)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise ArtifactError(f"cannot write {path}: {e.strerror or e}") from None
        raise


class Terminated(KeyboardInterrupt):
    """SIGTERM received while writing (subclass of KeyboardInterrupt so callers treat it like Ctrl-C)."""


@contextlib.contextmanager
def cleanup_on_sigterm():
    """While inside, SIGTERM raises `Terminated` (so `finally`/`except` cleanups run) instead of killing the process
    at once; the previous handler is restored after. No-op outside the main thread (signals go there only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
