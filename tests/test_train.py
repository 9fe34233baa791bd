"""Training recovers known structure, and the recipe's constraints hold."""

from __future__ import annotations

import torch

from sae_clt.data.loader import PairLoader
from sae_clt.data.normalize import Normalization, fit_normalization
from sae_clt.data.store import ActivationStore, StoreWriter
from sae_clt.dictionaries.dictionary import Dictionary
from sae_clt.evaluation.metrics import ReconstructionMeter
from sae_clt.spec.models import DatasetSpec, ExperimentSpec
from sae_clt.training.loop import train
from sae_clt.training.losses import aux_k_loss


def _synthetic_store(folder, n_rows=12_000, dim=16, n_features=24, active=2, seed=0):
    """Rows = sums of `active` ground-truth unit directions with positive magnitudes;
    the target is a fixed linear map of the source (a transcoder's easiest case)."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(n_features, dim, generator=gen), dim=1)
    mix = torch.randn(dim, dim, generator=gen) / dim**0.5
    writer = StoreWriter(folder, {"a": dim, "b": dim}, "float32", {"n_instances": n_rows // 10, "subject": {}})
    per_shard = 2000
    for start in range(0, n_rows, per_shard):
        idx = torch.stack([torch.randperm(n_features, generator=gen)[:active] for _ in range(per_shard)])
        mags = torch.rand(per_shard, active, generator=gen) + 0.5
        x = (mags.unsqueeze(-1) * features[idx]).sum(1)
        rows = torch.arange(start, start + per_shard)
        writer.write_shard({"a": x, "b": x @ mix}, {"instance_id": rows // 10, "position": (rows % 10).int()}, torch.arange(per_shard))
    writer.finish()
    return ActivationStore.open(folder)


def _specs(architecture="sae", target="a", **train):
    dataset = DatasetSpec(id="syn", subject="none", collect={"n_instances": 1200, "hook_points": ["a", "b"]})
    exp = ExperimentSpec(id="syn_exp", dataset="syn", source="a", target=target,
                         model={"architecture": architecture, "d_sae": 64, "activation": "topk", "k": 4},
                         train={"batch_size": 256, "epochs": 6, "lr": 1e-2, "log_every": 5, "dead_after_rows": 2000, **train},
                         evaluate={"causal": False})
    return dataset, exp


def _val_fvu(store, norm, exp, model):
    meter = ReconstructionMeter(16)
    loader = PairLoader(store, norm, exp.source, exp.target, "val", 1000, seed=0, shuffle=False)
    with torch.no_grad():
        for x, y in loader.epoch(0):
            meter.update(y, model(x)[0])
    return meter.summary()["fvu"]


def _fit(tmp_path, architecture="sae", target="a", **train_kw):
    store = _synthetic_store(tmp_path / "store")
    dataset, exp = _specs(architecture, target, **train_kw)
    fit_normalization(dataset, store, tmp_path / "norm", tmp_path / "norm.json")
    norm = Normalization.load(tmp_path / "norm")
    train(exp, store, norm, tmp_path / "dict", tmp_path / "curves", tmp_path / "train.json", log=lambda m: None)
    return store, norm, exp, Dictionary.load(tmp_path / "dict")


def test_topk_sae_recovers_sparse_synthetic_data(tmp_path):
    store, norm, exp, model = _fit(tmp_path)
    assert _val_fvu(store, norm, exp, model) < 0.08


def test_transcoder_learns_a_map_between_hook_points(tmp_path):
    store, norm, exp, model = _fit(tmp_path, "transcoder", "b")
    assert _val_fvu(store, norm, exp, model) < 0.15


def test_training_curves_are_tsv_per_metric(tmp_path):
    _fit(tmp_path, epochs=1)
    lines = (tmp_path / "curves" / "fvu.tsv").read_text().splitlines()
    assert lines[0] == "step\tfvu" and len(lines) > 3
    assert [int(line.split("\t")[0]) for line in lines[1:4]] == [0, 5, 10]


def test_aux_k_gives_gradient_to_dead_latents_only():
    from sae_clt.dictionaries.dictionary import DictionaryConfig

    model = Dictionary(DictionaryConfig("sae", 8, 8, 16, "topk", 2, "a", "a"))
    x = torch.randn(32, 8)
    pre = model.pre_acts(x)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[3, 7]] = True
    loss = aux_k_loss(model, pre, torch.randn(32, 8), dead, aux_k=4)
    loss.backward()
    touched = model.W_dec.grad.abs().sum(1) > 0
    assert set(touched.nonzero().squeeze(1).tolist()) <= {3, 7}


def test_data_echoing_serves_every_row_echo_times_reshuffled(tmp_path):
    store = _synthetic_store(tmp_path / "store", n_rows=6000)
    dataset, exp = _specs("sae", "a")
    fit_normalization(dataset, store, tmp_path / "norm", tmp_path / "norm.json")
    norm = Normalization.load(tmp_path / "norm")
    plain = PairLoader(store, norm, "a", "a", "train", 500, seed=3, drop_last=True)
    echo = PairLoader(store, norm, "a", "a", "train", 500, seed=3, drop_last=True, echo=3)
    read = torch.cat([x for x, _ in plain.epoch(0)])
    batches = list(echo.epoch(0))
    assert echo.steps_per_epoch() == 3 * plain.steps_per_epoch() == len(batches)
    assert all(x.shape == (500, 16) and y is x for x, y in batches)  # an SAE's target stays its input
    served = torch.cat([x for x, _ in batches])
    counts = {}
    for row in served:
        counts[tuple(row.tolist())] = counts.get(tuple(row.tolist()), 0) + 1
    assert sorted(counts) == sorted(tuple(r.tolist()) for r in read) and set(counts.values()) == {3}
    for x, _ in batches[:9]:  # full windows: no row twice in one batch
        assert torch.unique(x, dim=0).shape[0] == 500
    assert not torch.equal(batches[0][0], batches[3][0])  # each pass over the window in a new order
    again = list(echo.epoch(0))  # deterministic (a resumed run skips into the same stream)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_building_and_checkpointing_the_optimizer_does_not_import_torch_dynamo():
    # torch.optim's wrappers import torch._dynamo (1-3 s here) on first use; saeclt skips that.
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from sae_clt.dictionaries.dictionary import Dictionary, DictionaryConfig\n"
            "from sae_clt.spec.models import TrainSection\n"
            "from sae_clt.training.optim import make_optimizer\n"
            "model = Dictionary(DictionaryConfig('sae', 8, 8, 16, 'topk', 2, 'x', 'x'), seed=0)\n"
            "opt = make_optimizer(model, TrainSection())\n"
            "opt.load_state_dict(opt.state_dict()); opt.zero_grad()\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_loader_reuses_a_batch_s_memory_only_after_the_batch_and_its_views_are_dropped(tmp_path):
    store = _synthetic_store(tmp_path / "store", n_rows=6000)
    dataset, _ = _specs("transcoder", "b")
    fit_normalization(dataset, store, tmp_path / "norm", tmp_path / "norm.json")
    norm = Normalization.load(tmp_path / "norm")
    fresh = PairLoader(store, norm, "a", "b", "train", 300, seed=5)
    fresh.buffers._use_count = None  # never reuse: the reference
    want = list(fresh.epoch(0))
    held = list(PairLoader(store, norm, "a", "b", "train", 300, seed=5).epoch(0))  # every batch kept
    assert len(held) == len(want) and all(torch.equal(a, b) for h, w in zip(held, want) for a, b in zip(h, w))
    views, pointers = [], set()
    for i, (x, y) in enumerate(PairLoader(store, norm, "a", "b", "train", 300, seed=5).epoch(0)):
        if i % 4 == 0:
            views.append((i, x[:7], y[-3:]))  # views outlive their batch: their memory must not be reused
        pointers.add(x.data_ptr())
        del x, y
    for i, vx, vy in views:
        assert torch.equal(vx, want[i][0][:7]) and torch.equal(vy, want[i][1][-3:])
    assert len(pointers) < len(want)  # dropped batches' memory was reused


def test_precision_auto_and_the_collective_backend_follow_the_training_device_not_the_gpu_in_the_machine(monkeypatch):
    """On a CUDA host, training on the CPU must neither pick bf16 because the GPU has it nor
    ask nccl to move CPU tensors."""
    import torch

    from sae_clt.training import precision
    from sae_clt.training.distributed import backend_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    precision.native_bf16.cache_clear()
    monkeypatch.setattr(precision, "NATIVE_BF16_CPU_FLAGS", set())  # a CPU without native bf16
    try:
        assert precision.resolve_precision("auto", "cpu") == "fp32"
        assert precision.resolve_precision("auto", "cuda") == "bf16"
        assert precision.resolve_precision("fp32", "cuda") == "fp32"
    finally:
        precision.native_bf16.cache_clear()
    assert backend_for("cpu") == "gloo" and backend_for("cuda") == "nccl"
