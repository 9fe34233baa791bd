"""`saeclt run`: a spec's whole chain through DVC, so every stage is incremental.

DVC is run as a subprocess (``python -m dvc``), never imported here: it is slow to import and
its lock, cache and lock file do the bookkeeping we want (a second run with nothing changed
reruns nothing; a changed spec section reruns only what depends on it).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import DataError, PipelineError, SpecError
from ..io import atomic_write_text
from ..spec.project import Paths, read_index, resolve_experiment, write_index
from ..spec.validation import check_devices, validate_files
from .table import refuse_linked_outputs, run_targets


def dvc_env() -> dict:
    env = dict(os.environ)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    # Stage commands call `saeclt`: make sure this interpreter's scripts are found first.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


# ----------------------------------------------------------------------------- running DVC

# The DVC process saeclt starts. Two additions to `python -m dvc`:
# * DVC rewrites dvc.lock in place after every stage (open "w", then dump), so a kill during
#   the write leaves it empty or truncated. Here every YAML/JSON file DVC writes goes to a
#   temporary file in the same folder, renamed over the target once complete.
# * It leads its own process group (the stage commands it runs belong to it). A SIGTERM or
#   SIGHUP, including the one the kernel sends when the `saeclt run` that started it dies
#   (PR_SET_PDEATHSIG, set before exec), is passed to the whole group, so no stage is left
#   running without the DVC that would record its outputs.
_DVC_MAIN = r"""
import os, signal, sys, tempfile

def _atomic_dump_data(original):
    umask = os.umask(0o022); os.umask(umask)

    def dump_data(path, data, dumper, fs=None, **dumper_args):
        if fs is not None and getattr(fs, "protocol", None) not in ("local", "file"):
            return original(path, data, dumper, fs=fs, **dumper_args)
        target = os.path.abspath(os.fspath(path))
        folder, name = os.path.split(target)
        try:
            mode = os.stat(target).st_mode & 0o7777
        except OSError:
            mode = 0o666 & ~umask
        fd, tmp = tempfile.mkstemp(prefix="." + name + ".", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as stream:
                dumper(data, stream, **dumper_args)
                stream.flush()
                os.fsync(stream.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    return dump_data

try:
    from dvc.utils.serialize import _common
    _dump_data = _atomic_dump_data(_common._dump_data)
    for _name in ("_common", "_yaml", "_json", "_toml", "_py"):
        _module = sys.modules.get("dvc.utils.serialize." + _name)
        if _module is not None and hasattr(_module, "_dump_data"):
            _module._dump_data = _dump_data
except (ImportError, AttributeError):  # another DVC layout: its own (non-atomic) writes
    pass

def _end_group(signum, frame):
    signal.signal(signum, signal.SIG_DFL)
    os.killpg(0, signum)

if os.getpgrp() == os.getpid():
    for _sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(_sig, _end_group)

from dvc.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _die_with_parent(parent: int):
    """preexec_fn for the DVC child on Linux: SIGTERM when the parent dies (even by SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return None

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None

    def preexec() -> None:
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the call above
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


# "ERROR: failed to reproduce 'train@x': failed to run: saeclt stage train specs/x.yaml, exited with 3"
_STAGE_FAILED = re.compile(r"failed to run: (?P<cmd>.*?), exited with (?P<code>-?\d+)")


def _stage_failure(output: str) -> Exception | None:
    """The error a failed stage command maps to: its own exit code (2 spec, 3 data) passes through."""

    found = list(_STAGE_FAILED.finditer(output))
    if not found:
        return None
    cmd, code = found[-1].group("cmd"), int(found[-1].group("code"))
    if code == SpecError.exit_code:
        words = cmd.split()
        return SpecError(words[-1] if words else cmd, [f"stage `{cmd}` failed: a spec problem (exit 2), described above"])
    if code == DataError.exit_code:
        return DataError(f"stage `{cmd}` failed: a data problem (exit 3), described above")
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = " (the system may have run out of memory)" if code == -9 else ""
        return PipelineError(f"stage `{cmd}` was killed by {name}{why}; rerun to resume")
    if code == 130:
        return KeyboardInterrupt()
    return PipelineError(f"stage `{cmd}` failed (exit {code}); its error is above")


def dvc(root: Path, *args: str, check: bool = True) -> int:
    """Run DVC, streaming its output (and the stages') to our stderr as it comes.

    SIGTERM, SIGINT and SIGHUP received meanwhile are passed on to DVC's process group (DVC
    and the stage it runs), and end in KeyboardInterrupt once DVC has exited."""

    cmd = [sys.executable, "-c", _DVC_MAIN, *args]
    tail: list[str] = []
    received: list[int] = []
    timers: list = []
    with subprocess.Popen(cmd, cwd=root, env=dvc_env(), stdin=subprocess.DEVNULL, stdout=None, stderr=subprocess.PIPE,
                          text=True, process_group=0, preexec_fn=_die_with_parent(os.getpid())) as proc:

        def forward(signum, frame) -> None:
            received.append(signum)
            with contextlib.suppress(ProcessLookupError):
                # a second signal, or a group still running 30 s after the first, is killed outright
                os.killpg(proc.pid, signal.SIGKILL if len(received) > 1 else signum)
            if len(received) == 1:
                timers.append(threading.Timer(30, _killpg_quietly, (proc.pid,)))
                timers[0].daemon = True
                timers[0].start()

        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                previous[sig] = signal.signal(sig, forward)
        try:
            for line in proc.stderr:
                with contextlib.suppress(OSError):
                    sys.stderr.write(line)
                tail = (tail + [line])[-50:]
            proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for timer in timers:
                timer.cancel()
    if received:
        raise KeyboardInterrupt
    if check and proc.returncode != 0:
        err = "".join(tail)
        if "Unable to acquire lock" in err or "is locked" in err or "is busy, it is being blocked by" in err:
            raise PipelineError("another saeclt or dvc run is using this project (DVC names its process above); wait "
                                "for it to finish. No lock file needs removing by hand: `saeclt run` clears the locks "
                                "of a run whose process has ended")
        failure = _stage_failure(err)
        if failure is not None:
            raise failure
        if proc.returncode < 0:
            raise PipelineError(f"`dvc {' '.join(args)}` was killed by signal {-proc.returncode}; rerun to resume")
        raise PipelineError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}); the stage's own error is above")
    return proc.returncode


def _killpg_quietly(pgid: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pgid, signal.SIGKILL)


def ensure_indexed(paths: Paths, experiment_id: str) -> tuple[bool, str | None]:
    """List the experiment in params.yaml (rewriting the index from the specs). Returns whether
    it is newly listed, and params.yaml's text before (None if there was none)."""
    path = paths.root / "params.yaml"
    before = path.read_text() if path.exists() else None
    current = read_index(paths)
    write_index(paths, sorted(set(current["experiments"]) | {experiment_id}), previous=current)
    return experiment_id not in current["experiments"], before


def unindex(paths: Paths, experiment_id: str, before: str | None) -> None:
    """Take an experiment ensure_indexed added back out of params.yaml (its first run failed):
    `dvc repro` then does not run a spec that has never completed."""
    path = paths.root / "params.yaml"
    try:
        current = read_index(paths)
        remaining = sorted(set(current["experiments"]) - {experiment_id})
        if before is None and not remaining:
            path.unlink(missing_ok=True)
        else:
            write_index(paths, remaining, previous=current)
    except Exception:  # noqa: BLE001 - fall back to the exact previous text

        if before is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write_text(path, before)


@contextlib.contextmanager
def project_lock(root: Path, what: str):
    """One `saeclt run` per project at a time. An OS-level lock (flock) on a file in .dvc/tmp:
    it dies with its process, so a killed run never leaves a stale lock behind."""

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


# ----------------------------------------------------------------------------- dvc.lock recovery

GOOD_LOCK = Path(".dvc") / "tmp" / "saeclt-dvc.lock.good"


def _parse_lock(text: str) -> tuple[dict | None, str]:
    """(stages, "") for a lock file DVC accepts at the top level, else (None, why not)."""
    from dvc.utils.serialize import parse_yaml

    if not text.strip():
        return None, "it is empty"
    try:
        data = parse_yaml(text, "dvc.lock")
    except Exception as exc:  # noqa: BLE001 - any parse failure means the same: unreadable
        return None, f"it is not valid YAML ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    if not isinstance(data, dict) or data.get("schema") != "2.0":
        return None, "it has no `schema: '2.0'` line"
    stages = data.get("stages", {})
    if not isinstance(stages, dict):
        return None, "its `stages` is not a mapping"
    return dict(stages), ""


def _entry_ok(entry) -> bool:
    """A stage entry DVC's lock file schema accepts (a truncated one usually does not)."""
    from dvc.schema import COMPILED_LOCK_FILE_STAGE_SCHEMA

    try:
        COMPILED_LOCK_FILE_STAGE_SCHEMA(entry)
    except Exception:  # noqa: BLE001 - voluptuous' Invalid, or a type error on odd input
        return False
    return True


def _stage_names(root: Path):
    """A test of whether dvc.yaml (its foreach stages expanded over params.yaml) still defines a
    stage name; a form not read here counts as defined (DVC checks such entries itself)."""
    import yaml

    try:
        stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
        params_path = root / "params.yaml"
        params = (yaml.safe_load(params_path.read_text()) or {}) if params_path.exists() else {}
    except (OSError, yaml.YAMLError, AttributeError):
        return lambda name: True

    def defined(name: str) -> bool:
        base, at, key = name.partition("@")
        stage = stages.get(base) if isinstance(stages, dict) else None
        if not isinstance(stage, dict):
            return False
        if "matrix" in stage:
            return True
        if "foreach" not in stage:
            return not at
        m = re.fullmatch(r"\$\{\s*([\w.-]+)\s*\}", str(stage["foreach"]))
        items = params.get(m.group(1)) if m and isinstance(params, dict) else None
        return key in {str(k) for k in items} if isinstance(items, dict) else True

    return defined


def _committed_lock(root: Path) -> tuple[dict | None, str]:
    try:
        shown = subprocess.run(["git", "show", "HEAD:./dvc.lock"], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None, ""
    if shown.returncode != 0:
        return None, ""
    return _parse_lock(shown.stdout)


def _write_lock(root: Path, stages: dict) -> None:
    from dvc.utils.serialize import dumps_yaml

    atomic_write_text(root / "dvc.lock", dumps_yaml({"schema": "2.0", "stages": stages}))


def _remove_partial_writes(root: Path) -> None:
    """Temporary files of DVC writes that a kill interrupted (see _DVC_MAIN); call with no DVC running."""
    for leftover in root.glob(".dvc.lock.*.tmp"):
        leftover.unlink(missing_ok=True)


def recover_dvc_lock(root: Path) -> str | None:
    """Repair a dvc.lock left damaged by a process killed while writing it, from the last good
    copy (saved by the previous `saeclt run`) or else the committed one; returns what was done.

    DVC rewrites dvc.lock in place after every stage, so a kill at that moment leaves it
    empty (DVC then refuses every run), unparseable, or cut short: entries of other stages
    lost (they would rerun) and the last one possibly partial. Entries of stages that still
    exist are taken back from the good copy; that is safe whatever their age, because DVC
    compares each entry with the hashes of the files on disk and reruns the stage on any
    difference. Leftover temporary files of an interrupted atomic write are removed."""
    try:
        import dvc.schema  # noqa: F401 - DVC's own lock schema judges each entry
        import dvc.utils.serialize  # noqa: F401
    except ImportError:
        return None  # running DVC fails next, with its own message
    _remove_partial_writes(root)
    lock, good_path = root / "dvc.lock", root / GOOD_LOCK
    if not lock.exists():
        return None
    try:
        text = lock.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        text = ""
    current, why = _parse_lock(text)
    good, source = None, ""
    if good_path.exists():
        good, _ = _parse_lock(good_path.read_text(encoding="utf-8", errors="replace"))
        source = "the copy saved by the last saeclt run"
    if good is None:
        good, _ = _committed_lock(root)
        source = "the committed dvc.lock (git HEAD)"
    if current is None:
        if good is None:
            aside = root / f"dvc.lock.damaged-{int(time.time())}"
            lock.replace(aside)
            return f"dvc.lock was damaged ({why}) and no good copy exists: moved it to {aside.name}; stages rerun as needed"
        _write_lock(root, {k: v for k, v in good.items() if _entry_ok(v)})
        return f"dvc.lock was damaged ({why}): restored from {source} ({len(good)} stages)"
    broken = [name for name, entry in current.items() if not _entry_ok(entry)]
    defined = _stage_names(root)
    missing = [name for name in good or {} if name not in current and defined(name)]
    if not broken and not missing:
        return None
    stages = {name: entry for name, entry in current.items() if name not in broken}
    for name in broken + missing:
        if good and name in good and _entry_ok(good[name]):
            stages[name] = good[name]
    _write_lock(root, stages)
    parts = []
    if broken:
        parts.append(f"{len(broken)} damaged entr{'y' if len(broken) == 1 else 'ies'} ({', '.join(broken[:5])})")
    if missing:
        parts.append(f"{len(missing)} lost entr{'y' if len(missing) == 1 else 'ies'} ({', '.join(missing[:5])}"
                     f"{', ...' if len(missing) > 5 else ''})")
    return f"dvc.lock was cut short by a killed write: {' and '.join(parts)} taken from {source} where it had them"


def save_good_dvc_lock(root: Path) -> None:
    """Keep a copy of dvc.lock when DVC accepts it whole: what recover_dvc_lock restores from."""

    try:
        import dvc.schema  # noqa: F401
        import dvc.utils.serialize  # noqa: F401

        text = (root / "dvc.lock").read_text(encoding="utf-8")
    except (ImportError, OSError, UnicodeDecodeError):
        return
    stages, _ = _parse_lock(text)
    if stages is not None and all(_entry_ok(entry) for entry in stages.values()):
        atomic_write_text(root / GOOD_LOCK, text)


def run_experiment(spec_path: Path) -> None:
    problems = validate_files([spec_path], check_index=False)  # fail fast, before DVC starts
    if problems:
        raise SpecError(str(spec_path), problems)
    resolved = resolve_experiment(spec_path)
    paths = resolved.paths
    check_devices(resolved, collect=True)
    if not (paths.root / "dvc.yaml").exists():
        raise PipelineError(f"{paths.root}: no dvc.yaml; run saeclt from a saeclt project")
    if not (paths.root / ".dvc").is_dir():
        dvc(paths.root, "init", "--quiet")
    eid = resolved.experiment.id
    root = paths.root
    with project_lock(root, f"saeclt run {spec_path}"):
        if clear_stale_dvc_locks(root):
            print("recovered DVC output locks left by a run that was killed", file=sys.stderr)
        repaired = recover_dvc_lock(root)
        if repaired:
            print(repaired, file=sys.stderr)
        save_good_dvc_lock(root)
        added, before = ensure_indexed(paths, eid)
        if added:
            print(f"params.yaml: indexed experiment '{eid}'", file=sys.stderr)
        try:
            refuse_linked_outputs(root, read_index(paths))
            dvc(root, "repro", *run_targets(eid))
        except BaseException:
            if added:  # listed only once its chain has run through
                unindex(paths, eid, before)
                print(f"params.yaml: experiment '{eid}' is listed once its run succeeds; left out for now",
                      file=sys.stderr)
            raise
        finally:
            _remove_partial_writes(root)
            save_good_dvc_lock(root)
