"""A collection killed with SIGKILL resumes after its last complete shard: the finished store
equals an uninterrupted one byte for byte, with no row lost or duplicated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from torch_subject_helpers import write_torch_project

N_INPUTS, POSITIONS = 200, 8


def _project(root: Path, delay: float) -> Path:
    root.mkdir()
    write_torch_project(root, n_instances=N_INPUTS, delay=delay)
    return root


def _collect(root: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    return subprocess.Popen([sys.executable, "-m", "sae_clt", "stage", "collect", "specs/datasets/mlp_acts.yaml"],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _shards(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.glob("shard_*.safetensors"))}


def _manifest(store: Path) -> dict:
    m = json.loads((store / "manifest.json").read_text())
    return m


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted collection of the same spec (the subject's delay does not change its weights)."""
    root = _project(tmp_path_factory.mktemp("ref") / "proj", delay=0.0)
    proc = _collect(root)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    return root / "runs/datasets/mlp_acts/store"


@pytest.mark.parametrize("kill_after_shards", [1, 3])
def test_killed_collection_resumes_without_lost_or_duplicated_rows(tmp_path, reference, kill_after_shards):
    root = _project(tmp_path / "proj", delay=0.05)
    store = root / "runs/datasets/mlp_acts/store"
    proc = _collect(root)
    deadline = time.time() + 120
    # Kill once the wanted number of shards is recorded as complete, plus a random-ish delay so
    # the kill can land mid-batch or mid-write.
    while time.time() < deadline and proc.poll() is None:
        if len(list(store.glob("shard_*.safetensors"))) >= kill_after_shards + 1:
            break
        time.sleep(0.01)
    time.sleep(0.013 * kill_after_shards)
    assert proc.poll() is None, "the collection finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (store / "manifest.json").exists()  # an unfinished store never looks complete

    proc = _collect(root)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "resuming after" in out

    manifest = _manifest(store)
    assert manifest == _manifest(reference)
    assert _shards(store) == _shards(reference)
    assert not (store / "collect_progress.safetensors").exists()
    # Every (input, position) exactly once.
    seen = []
    for name in _shards(store):
        shard = load_file(str(store / name))
        seen += list(zip(shard["instance_id"].tolist(), shard["position"].tolist()))
    assert len(seen) == len(set(seen)) == N_INPUTS * POSITIONS == manifest["n_rows"]


def test_changed_spec_discards_a_partial_collection(tmp_path):
    """A partial store from another spec is not resumed: it is collected afresh."""
    root = _project(tmp_path / "proj", delay=0.05)
    store = root / "runs/datasets/mlp_acts/store"
    proc = _collect(root)
    while proc.poll() is None and not (store / "collect_progress.safetensors").exists():
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    spec = root / "specs/datasets/mlp_acts.yaml"
    spec.write_text(spec.read_text().replace("seed: 1", "seed: 2"))
    proc = _collect(root)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "resuming" not in out
    assert _manifest(store)["n_rows"] == N_INPUTS * POSITIONS


def test_sharded_collection_merges_into_one_complete_store(tmp_path, reference):
    """Workers --shard 0/3, 1/3, 2/3 each collect their run of inputs; the plain collect stage
    then merges them: every row once, the same rows and statistics as one process collects."""
    root = _project(tmp_path / "proj", delay=0.0)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    run = [sys.executable, "-m", "sae_clt", "stage", "collect", "specs/datasets/mlp_acts.yaml"]
    for i in (2, 0):
        assert subprocess.run(run + ["--shard", f"{i}/3"], cwd=root, env=env, capture_output=True).returncode == 0
    waiting = subprocess.run(run, cwd=root, env=env, capture_output=True, text=True)
    assert waiting.returncode != 0 and "2 of 3 worker parts are complete" in waiting.stderr  # nothing merged or wiped early
    assert subprocess.run(run + ["--shard", "1/3"], cwd=root, env=env, capture_output=True).returncode == 0
    merged = subprocess.run(run, cwd=root, env=env, capture_output=True, text=True)
    assert merged.returncode == 0 and "merged 3 worker parts" in merged.stderr
    store = root / "runs/datasets/mlp_acts/store"
    manifest = _manifest(store)
    ref = _manifest(reference)
    assert manifest["n_rows"] == ref["n_rows"] and not list(store.glob("part-*"))
    for hook, stats in ref["stats"].items():
        for name, value in stats.items():
            assert manifest["stats"][hook][name] == pytest.approx(value, rel=1e-9)
    from sae_clt.data.store import ActivationStore

    ActivationStore.open(store).verify()
    seen = []
    for name in _shards(store):
        shard = load_file(str(store / name))
        seen += list(zip(shard["instance_id"].tolist(), shard["position"].tolist()))
    assert len(seen) == len(set(seen)) == N_INPUTS * POSITIONS
