"""`saeclt run` through the real DVC on a tiny project: incremental, shared upstream stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(subprocess.run([sys.executable, "-m", "dvc", "--version"], capture_output=True).returncode != 0,
                                reason="dvc not installed")


def saeclt(root, *args):
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    return subprocess.run([sys.executable, "-m", "sae_clt", *args], cwd=root, env=env, capture_output=True, text=True)


def _ran(proc) -> set[str]:
    """Stages DVC says it ran ("Running stage 'x':")."""
    out = proc.stdout + proc.stderr
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


def test_run_is_incremental_and_shares_subject_and_dataset(dvc_project):
    root = dvc_project
    first = saeclt(root, "run", "specs/tiny_sae.yaml")
    assert first.returncode == 0, first.stderr[-3000:]
    assert {"subject@tiny", "collect@tiny_acts", "normalize@tiny_acts", "train@tiny_sae", "evaluate@tiny_sae",
            "analyze@tiny_sae", "report@tiny_sae", "export@tiny_sae"} <= _ran(first)
    assert (root / "reports/tiny_sae/report.html").exists()
    assert "tiny_sae" in (root / "params.yaml").read_text()

    # A second experiment on the same dataset: neither retrains the subject nor recollects.
    second = saeclt(root, "run", "specs/tiny_tc.yaml")
    assert second.returncode == 0, second.stderr[-3000:]
    assert not _ran(second) & {"subject@tiny", "collect@tiny_acts", "normalize@tiny_acts"}
    assert "train@tiny_tc" in _ran(second)

    # Nothing changed: nothing reruns.
    again = saeclt(root, "run", "specs/tiny_sae.yaml")
    assert again.returncode == 0 and _ran(again) == set()

    # A changed learning rate reruns train and what follows, nothing upstream.
    spec = root / "specs/tiny_sae.yaml"
    spec.write_text(spec.read_text().replace("lr: 3.0e-3", "lr: 2.0e-3"))
    changed = saeclt(root, "run", "specs/tiny_sae.yaml")
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert _ran(changed) == {"train@tiny_sae", "evaluate@tiny_sae", "analyze@tiny_sae", "report@tiny_sae", "export@tiny_sae"}
    metrics = json.loads((root / "metrics/tiny_sae/eval.json").read_text())
    assert "fvu" in metrics["reconstruction"]

    # An intervention added to the spec reruns the analysis and the report only.
    spec.write_text(spec.read_text() + "interventions:\n  - {name: zero_f1, edits: [{feature: 1, op: set, value: 0}]}\n")
    edited = saeclt(root, "run", "specs/tiny_sae.yaml")
    assert edited.returncode == 0, edited.stderr[-3000:]
    assert _ran(edited) == {"analyze@tiny_sae", "report@tiny_sae"}
    analysis = json.loads((root / "metrics/tiny_sae/analysis.json").read_text())
    assert [i["name"] for i in analysis["interventions"]] == ["zero_f1"]


def test_run_with_bad_spec_fails_fast_without_traceback(dvc_project):
    spec = dvc_project / "specs/tiny_sae.yaml"
    spec.write_text(spec.read_text().replace("model: {", "modle: {"))
    proc = saeclt(dvc_project, "run", "specs/tiny_sae.yaml")
    assert proc.returncode == 2
    assert "tiny_sae.yaml:" in proc.stderr and "unknown key 'modle'" in proc.stderr and "did you mean 'model'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_second_run_while_one_is_running_refuses_with_a_clear_message(dvc_project):
    import time

    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    first = subprocess.Popen([sys.executable, "-m", "sae_clt", "run", "specs/tiny_sae.yaml"], cwd=dvc_project, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (dvc_project / "runs" / "subjects").exists() and time.time() < deadline:
            time.sleep(0.05)  # the first run is inside its subject stage, holding DVC's lock
        second = saeclt(dvc_project, "run", "specs/tiny_sae.yaml")
        assert second.returncode == 4
        assert "another saeclt run is in progress in this project (pid" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.communicate(timeout=300)
    assert first.returncode == 0
    # The lock goes with the process: a later run proceeds (nothing left to do).
    assert saeclt(dvc_project, "run", "specs/tiny_sae.yaml").returncode == 0


def test_run_killed_mid_stage_is_recovered_by_the_next_run(dvc_project):
    import signal
    import time

    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    first = subprocess.Popen([sys.executable, "-m", "sae_clt", "run", "specs/tiny_sae.yaml"], cwd=dvc_project, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not (dvc_project / "runs" / "datasets" / "tiny_acts" / "store").exists() and time.time() < deadline:
        time.sleep(0.02)  # inside the collect stage
    os.killpg(first.pid, signal.SIGKILL)  # saeclt, dvc and the stage, all at once
    first.wait(timeout=30)

    second = saeclt(dvc_project, "run", "specs/tiny_sae.yaml")
    assert second.returncode == 0, second.stderr[-3000:]
    assert (dvc_project / "reports" / "tiny_sae" / "report.md").exists()
    manifest = json.loads((dvc_project / "runs" / "datasets" / "tiny_acts" / "store" / "manifest.json").read_text())
    assert manifest["n_rows"] == 300 * 10  # recollected whole: nothing lost, nothing duplicated


def test_committed_dvc_lock_matches_the_code_and_specs_it_was_produced_with():
    """A fresh clone's `dvc repro` reruns only what its outputs' absence asks for: every source
    file, spec and param recorded in dvc.lock is the one in the tree (a code change committed
    without `dvc repro` would make every user's first repro recollect and retrain)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=repo, capture_output=True, text=True,
                          env=dict(os.environ, DVC_NO_ANALYTICS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    stale = {}
    for stage, entries in json.loads(done.stdout or "{}").items():
        for entry in entries:
            if not isinstance(entry, dict):
                continue  # "always changed"
            deps = {p: why for p, why in entry.get("changed deps", {}).items() if not p.startswith("runs/")}
            if deps or entry.get("changed params"):
                stale[stage] = {**deps, **entry.get("changed params", {})}
    assert not stale, f"dvc.lock is stale for {stale}: run `dvc repro` and commit dvc.lock"
