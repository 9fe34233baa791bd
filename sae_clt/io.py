"""Atomic, deterministic file output, and removal of saeclt's own folders only.

Every artefact is written to a temporary file in the same folder and renamed into place, so a
killed stage leaves the old complete file or none, never a partial one that looks complete.
Files get the permissions the umask allows (as ``open`` would give them), not the temporary
file's 0600. JSON is written with sorted keys so the same numbers give the same bytes.

A folder saeclt replaces (an activation store, a worker part, a converted dictionary) is
deleted only when every entry in it is one saeclt writes there (``remove_own_folder``); a
folder holding anything else, or a symbolic link, is refused with a message naming it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import DataError


def _umask() -> int:
    """The process's umask (read without changing it where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask



@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[str]:
    """A temporary file beside ``path`` for the caller to write; once the block ends, it is
    flushed to disk and renamed onto ``path`` (removed instead if the block raised)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; the result gets what open() would give
    finally:
        os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null (JSON has no such numbers), tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Written by safetensors straight into the temporary file (no in-memory copy of the whole
    file: a 50 MB shard went 0.2 -> 0.12 s), then flushed and renamed into place."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")  # atomic_path's temporary files


def foreign_entries(folder: Path, owned: Callable[[Path], bool]) -> list[Path]:
    """Entries under ``folder`` (relative paths) that ``owned`` does not recognise as saeclt's,
    symbolic links included; links are never followed."""
    foreign = []
    for here, dirs, files in os.walk(folder, followlinks=False):
        rel = Path(here).relative_to(folder)
        for name in sorted(dirs + files):
            entry = rel / name
            if os.path.islink(Path(here) / name) or not (owned(entry) or TEMP_FILE.match(name)):
                foreign.append(entry)
        dirs[:] = [d for d in dirs if (rel / d) not in foreign]
    return foreign


def check_own_folder(folder: Path, owned: Callable[[Path], bool], what: str, way_out: str = "") -> None:
    """Raise a DataError unless ``folder`` is absent, or a real folder (not a link) holding only
    entries ``owned`` accepts; ``what`` names the folder's role in the message."""
    folder = Path(folder)
    hint = f"; {way_out}" if way_out else ""
    if folder.is_symlink():
        raise DataError(f"{folder}: is a symbolic link (to {os.readlink(folder)}); saeclt never deletes or replaces through a link "
                        f"where it writes {what}: remove the link{hint}")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise DataError(f"{folder}: exists and is not a folder; saeclt writes {what} there: move it away{hint}")
    foreign = foreign_entries(folder, owned)
    if foreign:
        shown = ", ".join(str(p) for p in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise DataError(f"{folder}: holds files saeclt did not write ({shown}); saeclt replaces this folder with {what} "
                        f"and deletes only its own files: move them elsewhere{hint}")


def remove_own_folder(folder: Path, owned: Callable[[Path], bool], what: str, way_out: str = "") -> None:
    """Delete ``folder`` after ``check_own_folder`` found nothing but saeclt's own files in it."""
    check_own_folder(folder, owned, what, way_out)
    if Path(folder).exists():
        shutil.rmtree(folder)
