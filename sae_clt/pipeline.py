"""`saeclt run`: a spec's whole chain through DVC, so every stage is incremental.

DVC is run as a subprocess (``python -m dvc``), never imported here: it is slow to import and
its lock, cache and lock file do the bookkeeping we want (a second run with nothing changed
reruns nothing; a changed spec section reruns only what depends on it).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from .errors import PipelineError
from .project import Paths, read_index, resolve_experiment, write_index


def dvc_env() -> dict:
    env = dict(os.environ)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    # Stage commands call `saeclt`: make sure this interpreter's scripts are found first.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def dvc(root: Path, *args: str, check: bool = True) -> int:
    """Run DVC, streaming its output (and the stages') to our stderr as it comes."""
    cmd = [sys.executable, "-m", "dvc", *args]
    tail: list[str] = []
    with subprocess.Popen(cmd, cwd=root, env=dvc_env(), stdout=None, stderr=subprocess.PIPE, text=True) as proc:
        for line in proc.stderr:
            sys.stderr.write(line)
            tail = (tail + [line])[-50:]
    if check and proc.returncode != 0:
        err = "".join(tail)
        if "Unable to acquire lock" in err or "is locked" in err or "is busy, it is being blocked by" in err:
            raise PipelineError("another saeclt/dvc run holds this project's lock; wait for it to finish "
                                "(if none is running, remove the stale .dvc/tmp/lock)")
        raise PipelineError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}); the stage's own error is above")
    return proc.returncode


def ensure_indexed(paths: Paths, experiment_id: str) -> bool:
    """Add the experiment to params.yaml (rewriting the index from the specs); True if changed."""
    current = read_index(paths)
    ids = sorted(set(current["experiments"]) | {experiment_id})
    before = (paths.root / "params.yaml").read_text() if (paths.root / "params.yaml").exists() else ""
    write_index(paths, ids)
    return (paths.root / "params.yaml").read_text() != before


@contextlib.contextmanager
def project_lock(root: Path, what: str):
    """One `saeclt run` per project at a time. An OS-level lock (flock) on a file in .dvc/tmp:
    it dies with its process, so a killed run never leaves a stale lock behind."""
    import fcntl

    path = root / ".dvc" / "tmp" / "saeclt-run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise PipelineError(f"another saeclt run is in progress in this project ({holder}); "
                                "wait for it to finish, or stop it, then run again") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, {what}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed process nobody has reaped yet (a zombie: common in containers whose init does
    # not reap) still answers signal 0, but holds nothing.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def clear_stale_dvc_locks(root: Path) -> int:
    """Drop the entries of DVC's output read/write lock left by processes that no longer exist
    (a killed run); DVC would otherwise refuse those outputs until someone edits the file.
    Returns how many entries were dropped."""
    import json

    from .io import atomic_write_text

    path = root / ".dvc" / "tmp" / "rwlock"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    dropped = 0
    reads = {}
    for target, holders in info.get("read", {}).items():
        alive = [h for h in holders if _alive(int(h.get("pid", 0)))]
        dropped += len(holders) - len(alive)
        if alive:
            reads[target] = alive
    writes = {}
    for target, holder in info.get("write", {}).items():
        if _alive(int(holder.get("pid", 0))):
            writes[target] = holder
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, json.dumps({"read": reads, "write": writes}))
    return dropped


def run_experiment(spec_path: Path) -> None:
    from .errors import SpecError
    from .validation import validate_files

    problems = validate_files([spec_path], check_index=False)  # fail fast, before DVC starts
    if problems:
        raise SpecError(str(spec_path), problems)
    resolved = resolve_experiment(spec_path)
    paths = resolved.paths
    if not (paths.root / "dvc.yaml").exists():
        raise PipelineError(f"{paths.root}: no dvc.yaml; run saeclt from a saeclt project")
    if not (paths.root / ".dvc").is_dir():
        dvc(paths.root, "init", "--quiet")
    eid = resolved.experiment.id
    with project_lock(paths.root, f"saeclt run {spec_path}"):
        if clear_stale_dvc_locks(paths.root):
            print("recovered DVC output locks left by a run that was killed", file=sys.stderr)
        if ensure_indexed(paths, eid):
            print(f"params.yaml: indexed experiment '{eid}'", file=sys.stderr)
        dvc(paths.root, "repro", f"report@{eid}", f"export@{eid}")

