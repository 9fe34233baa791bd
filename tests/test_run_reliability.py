"""`saeclt run` through the real DVC when things go wrong: a kill while DVC writes dvc.lock, a
damaged dvc.lock, a deleted spec, a failing stage, and a killed `saeclt run`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_project

pytestmark = pytest.mark.skipif(subprocess.run([sys.executable, "-m", "dvc", "--version"], capture_output=True).returncode != 0,
                                reason="dvc not installed")

ENV = dict(os.environ, DVC_NO_ANALYTICS="1")


def saeclt(root, *args, env=None):
    return subprocess.run([sys.executable, "-m", "sae_clt", *args], cwd=root, env=env or ENV, capture_output=True, text=True)


def _ran(proc) -> set[str]:
    """Stages DVC says it ran ("Running stage 'x':")."""
    return {line.split("'")[1] for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Running stage '")}


def _new_dvc_project(root: Path) -> Path:
    write_project(root)
    shutil.copytree(REPO / "sae_clt", root / "sae_clt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True, env=ENV)
    return root


@pytest.fixture(scope="module")
def finished_project(tmp_path_factory) -> Path:
    """A DVC project where `saeclt run specs/tiny_sae.yaml` has completed (copied per test)."""
    root = _new_dvc_project(tmp_path_factory.mktemp("finished") / "proj")
    done = saeclt(root, "run", "specs/tiny_sae.yaml")
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.fixture
def project(finished_project, tmp_path) -> Path:
    root = tmp_path / "proj"
    shutil.copytree(finished_project, root, symlinks=True)
    return root


# --------------------------------------------------------------------------- dvc.lock

# Loaded into the DVC process through PYTHONPATH: the n-th time DVC serialises dvc.lock, half
# of the text is written to the file being written and the process SIGKILLs itself.
KILL_AT_LOCK_WRITE = textwrap.dedent('''
    import os, signal, sys
    from importlib.machinery import PathFinder

    class _KillAtLockWrite:
        def find_spec(self, name, path=None, target=None):
            if name != "dvc.utils.serialize._yaml":
                return None
            spec = PathFinder.find_spec(name, path)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                dump, count = module._dump, [0]

                def _dump(data, stream):
                    if isinstance(data, dict) and "schema" in data and "stages" in data:
                        count[0] += 1
                        if count[0] == int(os.environ["KILL_AT_LOCK_WRITE"]):
                            import io
                            text = io.StringIO()
                            dump(data, text)
                            stream.write(text.getvalue()[: len(text.getvalue()) // 2])
                            stream.flush()
                            os.kill(os.getpid(), signal.SIGKILL)
                    return dump(data, stream)

                module._dump = _dump

            spec.loader.exec_module = exec_module
            return spec

    if os.environ.get("KILL_AT_LOCK_WRITE"):
        sys.meta_path.insert(0, _KillAtLockWrite())
''')


def test_kill_while_dvc_writes_dvc_lock_keeps_every_recorded_stage(project, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_AT_LOCK_WRITE)
    spec = project / "specs/tiny_sae.yaml"
    spec.write_text(spec.read_text().replace("lr: 3.0e-3", "lr: 2.0e-3"))
    lock_before = yaml.safe_load((project / "dvc.lock").read_text())

    # train reruns and is recorded (write 1); killed while recording evaluate (write 2)
    killed = saeclt(project, "run", "specs/tiny_sae.yaml", env=dict(ENV, PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
                                                                  KILL_AT_LOCK_WRITE="2"))
    assert killed.returncode == 4, killed.stderr[-3000:]
    assert "killed by signal 9" in killed.stderr
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(lock_before["stages"])  # nothing lost, nothing half-written
    assert lock["stages"]["train@tiny_sae"] != lock_before["stages"]["train@tiny_sae"]
    assert not list(project.glob(".dvc.lock.*"))  # no temporary file left behind

    resumed = saeclt(project, "run", "specs/tiny_sae.yaml")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # evaluate ran before the kill: DVC's run cache may restore it instead of running it again
    assert {"report@tiny_sae", "export@tiny_sae"} <= _ran(resumed) <= {"evaluate@tiny_sae", "analyze@tiny_sae", "report@tiny_sae",
                                                                    "export@tiny_sae"}
    assert not list(project.glob(".dvc.lock.*"))


def _lock_stages(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def test_empty_or_truncated_dvc_lock_is_restored_at_the_next_run(project):
    lock = project / "dvc.lock"
    good = lock.read_text()
    good_stages = _lock_stages(project)
    cut_at_entry = good[: good.index("  train@tiny_sae:")]  # still parses: the later entries are gone
    for damaged, says in [("", "it is empty"), (good[: len(good) // 2], "dvc.lock was"),
                          (good[: len(good) // 3 + 7], "dvc.lock was"), (cut_at_entry, "lost entr")]:
        lock.write_text(damaged)
        proc = saeclt(project, "run", "specs/tiny_sae.yaml")
        assert proc.returncode == 0, (damaged[-200:], proc.stderr[-3000:])
        assert says in proc.stderr
        assert _ran(proc) == set(), damaged[-200:]  # no finished stage reruns
        assert _lock_stages(project) == good_stages

    # Without saeclt's copy, the committed dvc.lock is the fallback.
    subprocess.run(["git", "add", "dvc.lock"], cwd=project, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock"], cwd=project, check=True)
    (project / ".dvc/tmp/saeclt-dvc.lock.good").unlink()
    lock.write_text("")
    proc = saeclt(project, "run", "specs/tiny_sae.yaml")
    assert proc.returncode == 0 and "committed dvc.lock" in proc.stderr, proc.stderr[-3000:]
    assert _ran(proc) == set()


def test_recovery_takes_back_only_lost_entries_of_stages_that_still_exist(tmp_path):
    from sae_clt.stages.run import recover_dvc_lock, save_good_dvc_lock

    root = tmp_path
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text("experiments: {a: {dataset: d, subject: s}}\ndatasets: {d: {subject: s}}\n")
    entry = {"cmd": "saeclt stage train specs/a.yaml", "outs": [{"path": "runs/x", "hash": "md5", "md5": "0123abcd"}]}
    full = {"schema": "2.0", "stages": {"collect@d": entry, "train@a": entry, "train@gone": entry}}
    (root / "dvc.lock").write_text(yaml.safe_dump(full))
    save_good_dvc_lock(root)
    assert recover_dvc_lock(root) is None  # whole: left as it is

    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"collect@d": entry}}))
    assert "train@a" in recover_dvc_lock(root)
    assert set(_lock_stages(root)) == {"collect@d", "train@a"}  # train@gone is in no stage of dvc.yaml

    # A partial last entry (a value cut short that DVC's schema refuses) is replaced too.
    text = yaml.safe_dump({"schema": "2.0", "stages": {"collect@d": entry, "train@a": entry}})
    (root / "dvc.lock").write_text(text[: text.rindex("md5: 0123abcd") + len("md5: 01")])
    assert "damaged" in recover_dvc_lock(root)
    assert _lock_stages(root)["train@a"] == entry


# --------------------------------------------------------------------------- the index


def test_deleted_experiment_spec_is_dropped_from_the_index_with_a_warning(project):
    listed = saeclt(project, "index", "specs/tiny_sae.yaml", "specs/tiny_tc.yaml")
    assert listed.returncode == 0, listed.stderr
    (project / "specs/tiny_tc.yaml").unlink()

    proc = saeclt(project, "run", "specs/tiny_sae.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "experiment 'tiny_tc' dropped from the index" in proc.stderr
    assert list(yaml.safe_load((project / "params.yaml").read_text())["experiments"]) == ["tiny_sae"]

    saeclt(project, "index", "specs/tiny_sae.yaml")
    (project / "specs/tiny_sae.yaml").unlink()
    proc = saeclt(project, "index")
    assert proc.returncode == 0, proc.stderr
    assert "experiment 'tiny_sae' dropped from the index" in proc.stderr and "Traceback" not in proc.stderr
    assert not yaml.safe_load((project / "params.yaml").read_text())["experiments"]


def test_a_broken_spec_listed_in_the_index_does_not_stop_other_runs(project):
    assert saeclt(project, "index", "specs/tiny_sae.yaml", "specs/tiny_tc.yaml").returncode == 0
    (project / "specs/tiny_tc.yaml").write_text("id: tiny_tc\ndataset: no_such_dataset\n")
    proc = saeclt(project, "run", "specs/tiny_sae.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'tiny_tc' keeps its previous index entry" in proc.stderr
    assert set(yaml.safe_load((project / "params.yaml").read_text())["experiments"]) == {"tiny_sae", "tiny_tc"}


# --------------------------------------------------------------------------- exit codes


def test_stage_exit_codes_map_to_the_documented_ones():
    from sae_clt.errors import DataError, PipelineError, SpecError
    from sae_clt.stages.run import _stage_failure

    def failed(code):
        return _stage_failure(f"ERROR: failed to reproduce 'train@x': failed to run: saeclt stage train specs/x.yaml, exited with {code}\n")

    assert isinstance(failed(2), SpecError) and failed(2).exit_code == 2
    assert isinstance(failed(3), DataError) and failed(3).exit_code == 3
    assert type(failed(1)) is PipelineError and "exit 1" in str(failed(1))
    assert "killed by SIGKILL" in str(failed(-9))
    assert _stage_failure("ERROR: unexpected error\n") is None


def _files_experiment(root: Path) -> None:
    """A dataset imported from an activation file, and an experiment on it (not yet run)."""
    import numpy as np

    np.save(root / "acts.npy", np.random.default_rng(0).standard_normal((400, 8)).astype("float32"))
    made = saeclt(root, "import-acts", "acts.npy", "--id", "ext", "--experiment", "ext_sae")
    assert made.returncode == 0, made.stderr


def test_stage_data_error_exits_3_and_leaves_the_new_experiment_out_of_params_yaml(project):
    _files_experiment(project)
    before = (project / "params.yaml").read_text()
    # More inputs than the file holds: the spec validates, the collect stage finds out (DataError).
    dataset = project / "specs/datasets/ext.yaml"
    dataset.write_text(dataset.read_text().replace("n_instances: 400", "n_instances: 500"))
    proc = saeclt(project, "run", "specs/ext_sae.yaml")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "collect.n_instances asks for 500" in proc.stderr and "Traceback" not in proc.stderr
    assert (project / "params.yaml").read_text() == before



# --------------------------------------------------------------------------- killing saeclt run


def _session(sid: int) -> list[tuple[int, str]]:
    """Live (not zombie) processes of session ``sid``, with their command lines."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append((int(entry.name), cmdline))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killing_saeclt_run_ends_its_dvc_and_stage_and_the_rerun_matches(project, sig):
    uninterrupted = {name: (project / "metrics/tiny_sae" / name).read_bytes() for name in ("train.json", "eval.json")}
    # Forget the experiment's stages (outputs, metrics, checkpoint, lock entries, run cache): train runs again.
    shutil.rmtree(project / "runs/experiments/tiny_sae")
    shutil.rmtree(project / "metrics/tiny_sae")
    shutil.rmtree(project / ".dvc/cache/runs")
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    lock["stages"] = {name: entry for name, entry in lock["stages"].items() if not name.endswith("@tiny_sae")}
    (project / "dvc.lock").write_text(yaml.safe_dump(lock))
    (project / ".dvc/tmp/saeclt-dvc.lock.good").unlink()

    run = subprocess.Popen([sys.executable, "-m", "sae_clt", "run", "specs/tiny_sae.yaml"], cwd=project, env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not any("stage train" in cmd for _, cmd in _session(run.pid)) and time.time() < deadline:
            assert run.poll() is None, "saeclt run ended before its train stage"
            time.sleep(0.05)
        time.sleep(0.5)  # inside the train stage
        os.kill(run.pid, sig)  # the top `saeclt run` only, as a user or a scheduler would
        run.wait(timeout=60)
        deadline = time.time() + 10
        while _session(run.pid) and time.time() < deadline:
            time.sleep(0.05)
        assert _session(run.pid) == []  # neither DVC nor the stage keeps running
        # The stage ended with it, rather than training on to outputs no DVC would record.
        assert not (project / "metrics/tiny_sae/train.json").exists()
    finally:
        for pid, _ in _session(run.pid):
            os.kill(pid, signal.SIGKILL)
    assert run.returncode == (130 if sig == signal.SIGTERM else -signal.SIGKILL)

    resumed = saeclt(project, "run", "specs/tiny_sae.yaml")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "train@tiny_sae" in _ran(resumed)
    for name, data in uninterrupted.items():
        assert (project / "metrics/tiny_sae" / name).read_bytes() == data, name
    assert json.loads(uninterrupted["eval.json"])["reconstruction"]["fvu"] is not None
