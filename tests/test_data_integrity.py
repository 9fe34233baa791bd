"""Damaged or foreign data is refused, never trained on, and never deleted.

Every case here ends in a DataError (exit code 3) naming the file, and leaves what the user
had on disk as it was."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from sae_clt.data.store import CHECKSUM, ActivationStore, shard_checksum
from sae_clt.errors import DataError
from sae_clt.spec.project import Paths
from sae_clt.stages.table import run_stage

DATASET = "specs/datasets/tiny_acts.yaml"


@pytest.fixture
def project(built_project, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "proj"
    shutil.copytree(built_project, root)
    monkeypatch.chdir(root)
    return root


def _store(root: Path) -> Path:
    return Paths(root).store_dir("tiny_acts")


def _rewrite_shard(store: Path, index: int, change) -> None:
    """Apply ``change`` to a shard's tensors and record the new checksum in the manifest (a
    damage that a checksum alone cannot catch)."""
    manifest = json.loads((store / "manifest.json").read_text())
    entry = manifest["shards"][index]
    tensors = load_file(store / entry["file"])
    change(tensors)
    save_file(tensors, str(store / entry["file"]))
    entry[CHECKSUM] = shard_checksum(store / entry["file"])
    (store / "manifest.json").write_text(json.dumps(manifest))


# --------------------------------------------------------------------------- never delete what saeclt did not write


def test_collect_under_activations_root_refuses_a_folder_holding_user_files(project, tmp_path, monkeypatch):
    root = tmp_path / "big_disk"
    (root / "tiny_acts").mkdir(parents=True)
    notes = root / "tiny_acts" / "notes.txt"
    notes.write_text("mine")
    monkeypatch.setenv("ACTIVATIONS_ROOT", str(root))
    with pytest.raises(DataError, match=r"tiny_acts: holds files saeclt did not write \(notes.txt\)"):
        run_stage("collect", DATASET)
    assert notes.read_text() == "mine"


def test_collect_under_activations_root_replaces_its_own_old_store(project, tmp_path, monkeypatch):
    root = tmp_path / "big_disk"
    shutil.copytree(_store(project), root / "tiny_acts")  # a store saeclt wrote: shards and a manifest
    monkeypatch.setenv("ACTIVATIONS_ROOT", str(root))
    run_stage("collect", DATASET)
    store = ActivationStore.open(_store(project))
    assert store.folder == root / "tiny_acts" and store.n_shards > 0


@pytest.mark.parametrize("kind", ["file", "proc"])
def test_an_activations_root_that_cannot_hold_files_is_a_clear_data_error(project, tmp_path, monkeypatch, kind):
    if kind == "file":
        target = tmp_path / "a_file"
        target.write_text("x")
        match = "is a file, not a folder"
    else:
        if not Path("/proc/self").exists():
            pytest.skip("no /proc")
        target = Path("/proc")
        match = "cannot create files there"
    monkeypatch.setenv("ACTIVATIONS_ROOT", str(target))
    with pytest.raises(DataError, match=match):
        run_stage("collect", DATASET)


def test_a_store_folder_that_is_a_symlink_is_refused_and_its_target_left_alone(project, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    mode = elsewhere.stat().st_mode
    store = _store(project)
    shutil.rmtree(store)
    store.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(DataError, match="is a symbolic link"):
        run_stage("collect", DATASET)
    assert (elsewhere / "keep.txt").read_text() == "mine" and elsewhere.stat().st_mode == mode
    assert store.is_symlink()


def test_files_written_atomically_follow_the_umask(tmp_path):
    from sae_clt.io import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644


# --------------------------------------------------------------------------- never train on damaged data


def test_training_refuses_a_shard_whose_bytes_changed_after_collection(project):
    store = _store(project)
    shard = store / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # one flipped bit in the last row; size and manifest unchanged
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard_00001.safetensors: checksum does not match .*shards\[1\].xxh3_128"):
        run_stage("train", "specs/tiny_sae.yaml")


def test_a_store_written_with_sha256_checksums_still_trains_and_a_changed_shard_is_refused(project):
    from sae_clt.data.store import sha256_file

    store = _store(project)
    manifest = json.loads((store / "manifest.json").read_text())
    for entry in manifest["shards"]:  # the manifest as stores were written before xxh3_128
        del entry[CHECKSUM]
        entry["sha256"] = sha256_file(store / entry["file"])
    (store / "manifest.json").write_text(json.dumps(manifest))
    run_stage("train", "specs/tiny_sae.yaml")
    shard = store / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard_00001.safetensors: checksum does not match .*shards\[1\].sha256"):
        run_stage("train", "specs/tiny_sae.yaml")


def test_training_refuses_two_swapped_shards(project):
    store = _store(project)
    a, b = store / "shard_00000.safetensors", store / "shard_00001.safetensors"
    a.rename(store / "tmp")
    b.rename(a)
    (store / "tmp").rename(b)
    with pytest.raises(DataError, match="checksum does not match"):
        run_stage("evaluate", "specs/tiny_sae.yaml")


def test_nan_in_a_stored_shard_is_a_data_error_naming_the_shard(project):
    def poison(tensors):
        tensors["encoder.layers.1"][3, 2] = float("nan")

    _rewrite_shard(_store(project), 2, poison)
    with pytest.raises(DataError, match=r"shard_00002.safetensors: hook point 'encoder.layers.1' has NaN or inf in row 3"):
        run_stage("train", "specs/tiny_sae.yaml")


def test_a_manifest_whose_dim_disagrees_with_the_shards_fails_when_the_store_is_opened(project):
    path = _store(project) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["hook_points"]["encoder.layers.1"] = 17
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"tensor 'encoder.layers.1' is F32 \[\d+, 16\]; the manifest says F32 \[\d+, 17\]"):
        ActivationStore.open(_store(project))


def test_a_shard_of_another_shape_fails_when_the_store_is_opened(project):
    def narrower(tensors):
        tensors["encoder.layers.0"] = tensors["encoder.layers.0"][:, :8].contiguous()

    _rewrite_shard(_store(project), 1, narrower)
    with pytest.raises(DataError, match=r"shard_00001.safetensors \(shard 1 of .*\): tensor 'encoder.layers.0'"):
        run_stage("train", "specs/tiny_sae.yaml")


def test_instance_ids_out_of_range_fail_when_the_store_is_opened(project):
    def shifted(tensors):
        tensors["instance_id"] = tensors["instance_id"] + 10_000

    _rewrite_shard(_store(project), 0, shifted)
    with pytest.raises(DataError, match=r"instance_id runs from \d+ to \d+; the manifest's n_instances is 300"):
        run_stage("train", "specs/tiny_sae.yaml")


# --------------------------------------------------------------------------- checkpoints belong to their exact inputs


def test_a_checkpoint_is_not_resumed_after_the_dataset_split_changes(project, monkeypatch, capsys):
    """normalize.seed 0 -> 5 moves instances between the splits: rows the checkpoint trained on
    are now validation rows, so it must not be resumed (while an unchanged one is)."""
    import sae_clt.training.checkpoint as train_module

    spec = project / "specs" / "tiny_sae.yaml"
    spec.write_text(spec.read_text().replace("epochs: 2,", "epochs: 2, checkpoint_every: 3,"))
    monkeypatch.setattr(train_module.TrainState, "clear", lambda self: None)  # keep the last checkpoint
    run_stage("train", spec)
    capsys.readouterr()
    run_stage("train", spec)
    assert "resuming from the checkpoint" in capsys.readouterr().err  # the control: same inputs resume

    dataset = project / DATASET
    dataset.write_text(dataset.read_text().replace("normalize: {val_fraction: 0.2}", "normalize: {val_fraction: 0.2, seed: 5}"))
    run_stage("normalize", DATASET)
    capsys.readouterr()
    run_stage("train", spec)
    assert "resuming" not in capsys.readouterr().err


def test_a_dictionary_too_large_for_memory_is_refused_before_anything_is_allocated(project, monkeypatch):
    import sae_clt.stages.inputs as inputs
    from sae_clt.errors import SpecError

    spec = project / "specs" / "tiny_sae.yaml"
    spec.write_text(spec.read_text().replace("d_sae: 64", "d_sae: 2000000"))
    monkeypatch.setattr(inputs, "available_memory", lambda: 10**9)
    with pytest.raises(SpecError, match=r"model.d_sae: 2000000 latents on 16 -> 16 dims with train.batch_size 256 need about [\d.]+ GB"):
        run_stage("train", spec)


def test_run_refuses_a_linked_stage_output_before_dvc_touches_what_it_points_to(dvc_project, tmp_path):
    """DVC removes a stage's outputs before running it and, on a symbolic link, chmods the
    folder the link points to (0777 on the folder outside the project): refused up front."""
    import subprocess
    import sys

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    elsewhere.chmod(0o750)
    link = Paths(dvc_project).dictionary_dir("tiny_sae")
    link.parent.mkdir(parents=True)
    link.symlink_to(elsewhere, target_is_directory=True)
    done = subprocess.run([sys.executable, "-m", "sae_clt", "run", "specs/tiny_sae.yaml"], cwd=dvc_project, capture_output=True, text=True)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "dictionary: is a symbolic link" in done.stderr and "Traceback" not in done.stderr
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o750 and (elsewhere / "keep.txt").read_text() == "mine"
