"""The dictionary zoo: every architecture and activation trains from a spec, evaluates, and
reloads to the same outputs; the math each one relies on is pinned."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import DEVICES

from sae_clt.data.loader import PairLoader
from sae_clt.data.normalize import Normalization
from sae_clt.data.store import ActivationStore
from sae_clt.dictionaries.dictionary import Dictionary, DictionaryConfig
from sae_clt.stages.table import run_stage
from sae_clt.training.init import geometric_median, resample_dead

SPEC = """\
id: {id}
dataset: tiny_acts
source: encoder.layers.{src}
target: encoder.layers.1
model: {{architecture: {arch}, d_sae: 64, activation: {act}, k: 4{extra}}}
train: {{batch_size: 256, epochs: 3, lr: 3.0e-3, log_every: 2, dead_after_rows: 1000, decoder_refit_frac: 0.0{train}}}
evaluate: {{batch_size: 500, causal: false}}
export: {{}}
"""

CASES = {
    "z_sae_batchtopk": dict(arch="sae", act="batchtopk", src=1, extra="", train=""),
    "z_sae_jumprelu": dict(arch="sae", act="jumprelu", src=1, extra=", jumprelu_init_threshold: 0.05", train=", l0_coeff: 0.01"),
    "z_sae_relu_clipped": dict(arch="sae", act="relu_clipped", src=1, extra=", relu_ceiling: 6.0", train=", l1_coeff: 0.001"),
    "z_skip_topk": dict(arch="skip_transcoder", act="topk", src=0, extra="", train=""),
    "z_tc_matryoshka": dict(arch="transcoder", act="topk", src=0, extra=", matryoshka_prefixes: [8, 32]", train=""),
    "z_sae_topk_resample": dict(arch="sae", act="topk", src=1, extra="", train=", resample_at: [0.3, 0.6], b_dec_init: geometric_median"),
    "z_sae_tied_tanh": dict(arch="sae", act="relu", src=1, extra=", tied_decoder: true",
                            train=", l1_coeff: 0.001, sparsity_penalty: tanh, tanh_scale: 2.0, unit_norm_decoder: false"),
    "z_sae_usage_groups": dict(arch="sae", act="relu", src=1, extra="",
                               train=", l1_coeff: 0.001, usage_kl_coeff: 0.1, group_lasso_coeff: 0.001, group_size: 8"),
    "z_tc_free_decoder": dict(arch="transcoder", act="relu", src=0, extra="",
                              train=", l1_coeff: 0.001, unit_norm_decoder: false, decoder_l1_coeff: 1.0e-5, decoder_l2_coeff: 1.0e-4"),
}


# A cross-layer transcoder over two layers: layer-0 features read encoder.layers.0 and write
# both targets; layer-1 features read encoder.layers.1 and write only the second target.
CLT_SOURCES = ["encoder.layers.0", "encoder.layers.1"]
CLT_TARGETS = ["encoder.layers.1:input", "encoder.layers.1"]
CLT_SPEC = f"""\
id: z_clt_topk
dataset: tiny_acts
source: {json.dumps(CLT_SOURCES)}
target: {json.dumps(CLT_TARGETS)}
model: {{architecture: clt, d_sae: 32, activation: topk, k: 6}}
train: {{batch_size: 256, epochs: 3, lr: 3.0e-3, log_every: 2, dead_after_rows: 1000, decoder_refit_frac: 0.0}}
evaluate: {{batch_size: 500, causal: true}}
export: {{}}
"""


@pytest.fixture(scope="module")
def zoo(built_project, tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo") / "proj"
    shutil.copytree(built_project, root)
    specs = {eid: SPEC.format(id=eid, **case) for eid, case in CASES.items()}
    specs["z_clt_topk"] = CLT_SPEC
    for eid, text in specs.items():
        (root / "specs" / f"{eid}.yaml").write_text(text)
        for stage in ("train", "evaluate", "analyze", "report", "export"):
            run_stage(stage, root / "specs" / f"{eid}.yaml")
    return root


def _val_rows(root, source="encoder.layers.1", target="encoder.layers.1", both=False):
    store = ActivationStore.open(root / "runs/datasets/tiny_acts/store")
    norm = Normalization.load(root / "runs/datasets/tiny_acts/normalize")
    x, y = next(PairLoader(store, norm, source, target, "val", 10_000, seed=0, shuffle=False).epoch(0))
    return (x, y) if both else x


def test_clt_trains_evaluates_and_reloads_with_per_layer_decoders(zoo, tmp_path):
    from safetensors.torch import load_file

    folder = zoo / "runs/experiments/z_clt_topk/dictionary"
    tensors = load_file(folder / "dictionary.safetensors")
    # Stored per source layer: encoder [d_in_l, d_sae_l], decoder [d_sae_l, n_targets, d_out_l]
    d = tensors["W_enc.0"].shape[0]
    assert tensors["W_enc.0"].shape == tensors["W_enc.1"].shape == (d, 32)
    assert tensors["W_dec.0"].shape == (32, 2, d) and tensors["W_dec.1"].shape == (32, 1, d)
    model = Dictionary.load(folder)
    x, y = _val_rows(zoo, "+".join(CLT_SOURCES), "+".join(CLT_TARGETS), both=True)
    y_hat, z = model(x)
    # The same outputs from the stored per-layer pieces: layer-l features see only source l and
    # write target l and later ones.
    pre = torch.cat([(x[:, i * d:(i + 1) * d]) @ tensors[f"W_enc.{i}"] for i in range(2)], dim=1) + tensors["b_enc"]
    codes = torch.cat([torch.zeros(len(x), 32).scatter(-1, p.topk(6, dim=-1).indices, torch.relu(p.topk(6, dim=-1).values))
                       for p in pre.split(32, dim=1)], dim=1)  # k = 6 per layer
    manual = tensors["b_dec"].clone().expand(len(x), -1).clone()
    manual[:, :d] += codes[:, :32] @ tensors["W_dec.0"][:, 0]
    manual[:, d:] += codes[:, :32] @ tensors["W_dec.0"][:, 1] + codes[:, 32:] @ tensors["W_dec.1"][:, 0]
    torch.testing.assert_close(y_hat, manual, rtol=1e-4, atol=1e-4)
    metrics = json.loads((zoo / "metrics/z_clt_topk/eval.json").read_text())
    per_layer = metrics["reconstruction"]["per_target_layer"]
    assert set(per_layer) == set(CLT_TARGETS) and all(0 <= v < 1 for v in per_layer.values())
    causal = metrics["causal"]["mean_tour_length"]
    assert causal["targets_replaced"] == CLT_TARGETS
    assert set(causal["values"]) == {"clean", "dictionary", "linear_baseline", "zero_ablation", "mean_ablation"}
    # the replacement model stays closer to the clean policy than zeroing both layers does
    assert abs(causal["pct_change_vs_clean"]["dictionary"]) < abs(causal["pct_change_vs_clean"]["zero_ablation"])
    edges = json.loads((zoo / "runs/experiments/z_clt_topk/export/edges.json").read_text())["edges"]
    # Edges name the layer each dimension belongs to; layer-1 features never write the first target.
    assert {e["source"].split("[")[0] for e in edges if e["kind"] == "encoder"} == set(CLT_SOURCES)
    layer1 = {f"z_clt_topk.feature[{f}]" for f in range(32, 64)}
    assert not [e for e in edges if e["kind"] == "decoder" and e["source"] in layer1 and e["target"].startswith(CLT_TARGETS[0] + "[")]


@pytest.mark.parametrize("eid", [*CASES, "z_clt_topk"])
def test_every_kind_trains_evaluates_and_reloads_to_the_same_outputs(zoo, eid, tmp_path):
    metrics = json.loads((zoo / f"metrics/{eid}/eval.json").read_text())
    assert 0 <= metrics["reconstruction"]["fvu"] < 1.0  # better than predicting the mean
    model = Dictionary.load(zoo / f"runs/experiments/{eid}/dictionary")
    if eid == "z_clt_topk":
        x = _val_rows(zoo, "+".join(CLT_SOURCES))
    else:
        x = _val_rows(zoo, "encoder.layers.0" if CASES[eid]["src"] == 0 else "encoder.layers.1")
    y1, z1 = model(x)
    model.save(tmp_path / "again", meta={})
    y2, z2 = Dictionary.load(tmp_path / "again")(x)
    assert torch.equal(y1, y2) and torch.equal(z1, z2)
    # Decoder rows stay unit norm whatever the activation (unless the spec turns that off).
    norms = model.W_dec.norm(dim=1)
    if "unit_norm_decoder: false" in CASES.get(eid, {}).get("train", ""):
        assert (norms - 1).abs().max() > 1e-3
    else:
        torch.testing.assert_close(norms, torch.ones(model.cfg.d_sae), rtol=0, atol=1e-5)


def test_tied_decoder_saves_one_matrix_and_encodes_with_its_transpose(zoo):
    from safetensors.torch import load_file

    folder = zoo / "runs/experiments/z_sae_tied_tanh/dictionary"
    assert "W_enc" not in load_file(folder / "dictionary.safetensors")
    model = Dictionary.load(folder)
    assert torch.equal(model.W_enc, model.W_dec.t())
    x = _val_rows(zoo)
    expected = torch.relu((x - model.b_dec) @ model.W_dec.t() + model.b_enc)
    torch.testing.assert_close(model.encode(x), expected)


def test_batchtopk_calibrated_threshold_reproduces_training_l0(zoo):
    """Saved as JumpReLU, the dictionary keeps k latents per row on average over the training
    rows (what BatchTopK kept while training), within 5 %."""
    train = json.loads((zoo / "metrics/z_sae_batchtopk/train.json").read_text())
    assert train["batchtopk_threshold"] > 0
    model = Dictionary.load(zoo / "runs/experiments/z_sae_batchtopk/dictionary")
    store = ActivationStore.open(zoo / "runs/datasets/tiny_acts/store")
    norm = Normalization.load(zoo / "runs/datasets/tiny_acts/normalize")
    l0s = [float((model.encode(x) > 0).sum(-1).float().mean())
           for x, _ in PairLoader(store, norm, "encoder.layers.1", "encoder.layers.1", "train", 256, seed=5).epoch(3)]
    assert sum(l0s) / len(l0s) == pytest.approx(4.0, rel=0.05)


def test_jumprelu_thresholds_are_learned_and_saved(zoo):
    model = Dictionary.load(zoo / "runs/experiments/z_sae_jumprelu/dictionary")
    theta = model.log_threshold.exp()
    assert not torch.allclose(theta, torch.full_like(theta, 0.05))  # moved by the straight-through gradient
    x = _val_rows(zoo)
    pre = model.pre_acts(x)
    _, z = model(x)
    assert torch.equal(z > 0, pre > theta)  # inference is exactly pre · H(pre - θ)


def test_skip_transcoder_learns_its_linear_path(zoo):
    model = Dictionary.load(zoo / "runs/experiments/z_skip_topk/dictionary")
    assert model.W_skip.abs().sum() > 0


def test_matryoshka_prefix_alone_reconstructs_better_than_without_training_it(zoo):
    """The first 8 latents of a Matryoshka transcoder reconstruct on their own better than the
    first 8 of a plain one trained alike."""
    root = zoo
    (root / "specs/z_tc_plain.yaml").write_text(SPEC.format(id="z_tc_plain", **{**CASES["z_tc_matryoshka"], "extra": ""}))
    run_stage("train", root / "specs/z_tc_plain.yaml")
    store = ActivationStore.open(root / "runs/datasets/tiny_acts/store")
    norm = Normalization.load(root / "runs/datasets/tiny_acts/normalize")
    x, y = next(PairLoader(store, norm, "encoder.layers.0", "encoder.layers.1", "val", 10_000, seed=0, shuffle=False).epoch(0))

    def prefix_fvu(eid):
        model = Dictionary.load(root / f"runs/experiments/{eid}/dictionary")
        z = model.encode(x)
        y_hat = z[:, :8] @ model.W_dec[:8] + model.b_dec
        return float(((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())

    assert prefix_fvu("z_tc_matryoshka") < prefix_fvu("z_tc_plain")


def test_resampled_latents_fire_again():
    torch.manual_seed(0)
    cfg = DictionaryConfig("sae", 12, 12, 40, "topk", 4, "a", "a")
    model = Dictionary(cfg, seed=0)
    x = torch.randn(512, 12)
    with torch.no_grad():
        model.b_enc[:10] = -100.0  # latents 0-9 can never win a top-k slot
    assert not (model.encode(x)[:, :10] > 0).any()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[:10] = True
    clock = torch.full((40,), 10**6)
    assert resample_dead(model, opt, x, x, dead, clock, seed=0) == 10
    fires = (model.encode(x)[:, :10] > 0).any(0)
    assert fires.float().mean() >= 0.8  # (nearly) all fire again on the rows they were aimed at
    assert (clock[:10] == 0).all()
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(40))


def test_geometric_median_resists_outliers_where_the_mean_does_not():
    points = torch.cat([torch.randn(200, 3) * 0.1 + torch.tensor([1.0, 2.0, 3.0]), torch.full((20, 3), 1000.0)])
    median = geometric_median(points)
    assert (median - torch.tensor([1.0, 2.0, 3.0])).norm() < 0.2
    assert (points.mean(0) - torch.tensor([1.0, 2.0, 3.0])).norm() > 50


def test_resampling_does_not_make_the_reconstruction_worse_from_a_transposed_start():
    """New latents start no louder than the live ones: with the transposed-decoder start
    (train.init: auto for top-k), resampling once took FVU from 0.8 to 8.9 on the spot."""
    torch.manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(30, 12), dim=1)
    x = (torch.rand(512, 30) * (torch.rand(512, 30) < 0.15)) @ atoms
    model = Dictionary(DictionaryConfig("sae", 12, 12, 40, "topk", 4, "a", "a"), seed=0)  # encoder = decoder transpose

    def fvu() -> float:
        with torch.no_grad():
            return float(((model(x)[0] - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())

    before = fvu()
    dead = torch.zeros(40, dtype=torch.bool)
    dead[:15] = True
    resample_dead(model, torch.optim.Adam(model.parameters(), lr=1e-3), x, x, dead, torch.zeros(40, dtype=torch.long), seed=0)
    assert fvu() <= before


@pytest.mark.parametrize("eid", [*CASES, "z_clt_topk"])
@pytest.mark.parametrize("device", [p for p in DEVICES if p.id != "cpu"])  # the zoo above is the CPU's
def test_every_kind_trains_and_evaluates_on_a_gpu_to_the_cpu_s_fit(zoo, eid, device):
    """Every architecture and activation on the GPU (the fast step's torch operations, or the
    autograd step): the held-out FVU within 5 % of the CPU's, the dictionary saved on the CPU."""
    text = (zoo / f"specs/{eid}.yaml").read_text().replace(f"id: {eid}", f"id: {eid}_gpu")
    text = text.replace("train: {", f"train: {{device: {device}, ")
    spec = zoo / "specs" / f"{eid}_gpu.yaml"
    spec.write_text(text)
    for stage in ("train", "evaluate"):
        run_stage(stage, spec)
    got = json.loads((zoo / f"metrics/{eid}_gpu/eval.json").read_text())
    ref = json.loads((zoo / f"metrics/{eid}/eval.json").read_text())
    assert got["meta"]["device"].startswith("cuda") and ref["meta"]["device"] == "cpu"
    assert got["reconstruction"]["fvu"] == pytest.approx(ref["reconstruction"]["fvu"], rel=0.05)
    Dictionary.load(zoo / f"runs/experiments/{eid}_gpu/dictionary")  # loads on the CPU
