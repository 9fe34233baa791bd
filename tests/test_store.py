"""The activation store: storage dtypes, and clear errors for damaged stores."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from sae_clt.data.store import ActivationStore, StoreWriter
from sae_clt.errors import DataError


def _write(folder, dtype="float32", rows=50):
    writer = StoreWriter(folder, {"h": 4}, dtype, {"n_instances": rows})
    x = torch.randn(rows, 4)
    prov = {"instance_id": torch.arange(rows), "position": torch.zeros(rows, dtype=torch.int32)}
    writer.write_shard({"h": x}, prov, torch.arange(rows))
    writer.finish()
    return x


@pytest.mark.parametrize("dtype,torch_dtype,tol", [("float32", torch.float32, 0), ("float16", torch.float16, 1e-2), ("bfloat16", torch.bfloat16, 5e-2)])
def test_store_keeps_the_requested_dtype_and_reads_back_float32(tmp_path, dtype, torch_dtype, tol):
    x = _write(tmp_path, dtype)
    with safe_open(str(tmp_path / "shard_00000.safetensors"), framework="pt") as f:
        assert f.get_tensor("h").dtype == torch_dtype
    back = ActivationStore.open(tmp_path).read_shard(0, ["h"])["h"]
    assert back.dtype == torch.float32
    assert torch.allclose(back, x, atol=tol, rtol=tol)


def test_manifest_statistics_are_those_of_the_rows_written_across_shards(tmp_path):
    gen = torch.Generator().manual_seed(0)
    writer = StoreWriter(tmp_path, {"h": 6}, "float16", {"n_instances": 90})
    xs = [torch.randn(40, 6, generator=gen) * 5 + 2, torch.randn(50, 6, generator=gen)]
    xs[1][0] = 0.0
    for i, x in enumerate(xs):  # the second shard handed over as two parts, not concatenated
        prov = {"instance_id": torch.arange(len(x)) + 40 * i, "position": torch.zeros(len(x), dtype=torch.int32)}
        writer.write_shard({"h": x if i == 0 else [x[:20], x[20:]]}, prov, torch.randperm(len(x), generator=gen))
    stats = writer.finish()["stats"]["h"]
    x = torch.cat(xs).double()
    assert stats["rows"] == 90
    assert stats["mean_norm"] == pytest.approx(float(x.norm(dim=1).mean()), rel=1e-12)
    assert stats["centered_rms_norm"] == pytest.approx(float(x.var(0, correction=0).sum().sqrt()), rel=1e-9)
    assert stats["frac_zeros"] == pytest.approx(6 / (90 * 6))
    store = ActivationStore.open(tmp_path)
    back = torch.cat([store.read_shard(i, ["h"])["h"] for i in range(2)])
    assert torch.equal(back.sort(0).values, torch.cat(xs).half().float().sort(0).values)


def test_a_shard_that_cannot_be_written_is_reported_and_no_progress_is_recorded_after_it(tmp_path, monkeypatch):
    import sae_clt.data.store as store_module

    writer = StoreWriter(tmp_path, {"h": 4}, "float32", {"n_instances": 20})
    prov = {"instance_id": torch.arange(10), "position": torch.zeros(10, dtype=torch.int32)}
    writer.write_shard({"h": torch.randn(10, 4)}, prov, torch.arange(10))
    writer.save_progress({"done": 1}, {})
    writer.wait()
    real_save = store_module.save_safetensors

    def full_disk(path, tensors, metadata=None):
        if "shard_00001" in str(path):
            raise OSError(28, "No space left on device")
        real_save(path, tensors, metadata)

    monkeypatch.setattr(store_module, "save_safetensors", full_disk)
    writer.write_shard({"h": torch.randn(10, 4)}, prov, torch.arange(10))  # handed to the writer's thread
    writer.save_progress({"done": 2}, {})  # must not record the shard that failed
    with pytest.raises(DataError, match="shard_00001.safetensors: cannot write shard \\(No space left"):
        writer.finish()
    state, _ = store_module.read_progress(tmp_path)
    assert state["caller"] == {"done": 1} and [s["file"] for s in state["shards"]] == ["shard_00000.safetensors"]
    assert not (tmp_path / "manifest.json").exists()


def test_corrupted_shard_fails_checksum_naming_the_file(tmp_path):
    _write(tmp_path)
    shard = tmp_path / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard_00000.safetensors: checksum does not match"):
        ActivationStore.open(tmp_path).verify()


def test_truncated_shard_read_names_the_file(tmp_path):
    _write(tmp_path)
    shard = tmp_path / "shard_00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match="shard_00000.safetensors"):
        ActivationStore.open(tmp_path).read_shard(0, ["h"])


def test_store_without_manifest_is_incomplete(tmp_path):
    _write(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json missing"):
        ActivationStore.open(tmp_path)


def test_nan_activation_is_refused_naming_hook_and_row(tmp_path):
    writer = StoreWriter(tmp_path, {"h": 4}, "float32", {"n_instances": 3})
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    prov = {"instance_id": torch.tensor([7, 8, 9]), "position": torch.zeros(3, dtype=torch.int32)}
    with pytest.raises(DataError, match="hook .h. has NaN or inf in row 1 \\(instance 8, position 0\\).*drop_nonfinite"):
        writer.write_shard({"h": x}, prov, torch.arange(3))


def test_drop_nonfinite_keeps_finite_rows_and_counts_the_rest(tmp_path):
    writer = StoreWriter(tmp_path, {"h": 4, "g": 2}, "float32", {"n_instances": 5}, drop_nonfinite=True)
    x, g = torch.randn(5, 4), torch.randn(5, 2)
    x[1, 0] = float("inf")
    g[3, 1] = float("nan")
    prov = {"instance_id": torch.arange(5), "position": torch.zeros(5, dtype=torch.int32)}
    writer.write_shard({"h": x, "g": g}, prov, torch.arange(5))
    manifest = writer.finish()
    assert manifest["n_rows"] == 3 and manifest["dropped_nonfinite_rows"] == 2
    shard = ActivationStore.open(tmp_path).read_shard(0, ["h", "instance_id"])
    assert shard["instance_id"].tolist() == [0, 2, 4]
    assert torch.equal(shard["h"], x[[0, 2, 4]])


def test_store_collected_under_another_spec_fails_before_training(tmp_path):
    _write(tmp_path)
    store = ActivationStore.open(tmp_path)
    store.check_matches(["h"], "float32", 50, "specs/datasets/d.yaml")  # agrees: no error
    with pytest.raises(DataError, match="dtype float32 differs from specs/datasets/d.yaml collect.dtype bfloat16"):
        store.check_matches(["h"], "bfloat16", 50, "specs/datasets/d.yaml")
    with pytest.raises(DataError, match="hook points \\['h'\\] differ"):
        store.check_matches(["h", "k"], "float32", 50, "specs/datasets/d.yaml")


def test_collection_refuses_to_start_without_enough_disk(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from sae_clt.data.collect import check_free_disk

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(DataError, match="need about 0.03 GB .* only 0.00 GB are free"):
        check_free_disk(tmp_path / "store", 100_000, {"a": 64, "b": 64}, "float16")


def test_out_of_memory_gives_a_clear_message_not_a_traceback(monkeypatch):
    from typer.testing import CliRunner

    import sae_clt.stages.table as stages
    from sae_clt.cli import app

    def boom(*args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1")

    monkeypatch.setattr(stages, "run_stage", boom)
    result = CliRunner().invoke(app, ["stage", "train", "specs/x.yaml"])
    assert result.exit_code == 3
    assert "out of memory" in result.output and "resumes" in result.output and "Traceback" not in result.output
