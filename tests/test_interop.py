"""`saeclt convert`: dictionaries written for SAELens and sparsify reproduce saeclt's raw
reconstruction when run the way those tools run them (their forward passes are written out
below from the files alone, independently of sae_clt.interop's own fold)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from sae_clt.dictionaries.dictionary import Dictionary, DictionaryConfig
from sae_clt.errors import DataError
from sae_clt.interop.formats import convert, convert_experiment


def _dictionary(architecture: str, activation: str, d_in: int = 12, d_out: int = 12, seed: int = 0) -> Dictionary:
    """Random weights, a non-trivial per-dim normalisation, thresholds that let some latents fire."""
    cfg = DictionaryConfig(architecture=architecture, d_in=d_in, d_out=d_out, d_sae=40, activation=activation, k=5,
                           source="a", target="a" if architecture == "sae" else "b")
    model = Dictionary(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        if activation == "jumprelu":
            model.log_threshold.fill_(math.log(0.3))
        if activation == "batchtopk":
            model.threshold.fill_(0.4)
        src_mean, src_scale = torch.randn(d_in, generator=gen) * 3, torch.rand(d_in, generator=gen) * 4 + 0.5
        if architecture == "sae":
            tgt_mean, tgt_scale = src_mean, src_scale
        else:
            tgt_mean, tgt_scale = torch.randn(d_out, generator=gen) * 3, torch.rand(d_out, generator=gen) * 4 + 0.5
        model.set_normalization(src_mean, src_scale, tgt_mean, tgt_scale)
    return model.eval()


def _raw_rows(model: Dictionary, n: int = 300) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(n, model.cfg.d_in, generator=gen) * model.source_scale + model.source_mean


def saelens_forward(folder, x: torch.Tensor) -> torch.Tensor:
    """SAELens 6's inference forward for the architectures saeclt writes, read from the files."""
    cfg = json.loads((folder / "cfg.json").read_text())
    t = load_file(folder / "sae_weights.safetensors")
    sae_in = x - t["b_dec"] if cfg["apply_b_dec_to_input"] else x
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    arch = cfg["architecture"]
    if arch == "topk":
        values, idx = pre.topk(cfg["k"], dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, idx, values.relu())
    elif arch.startswith("jumprelu"):
        acts = pre.relu() * (pre > t["threshold"])
    else:  # standard, transcoder, skip_transcoder: ReLU
        acts = pre.relu()
    out = acts @ t["W_dec"] + t["b_dec"]
    return out + x @ t["W_skip"].T if "skip" in arch else out


def sparsify_forward(folder, x: torch.Tensor) -> torch.Tensor:
    """sparsify's SparseCoder forward (encoder on x - b_dec unless transcoding, ReLU, top-k)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    t = load_file(folder / "sae.safetensors")
    sae_in = x if cfg.get("transcode") else x - t["b_dec"]  # (sparsify's defaults: false)
    pre = (sae_in @ t["encoder.weight"].T + t["encoder.bias"]).relu()
    values, idx = pre.topk(cfg["k"], dim=-1)
    out = torch.zeros_like(pre).scatter(-1, idx, values) @ t["W_dec"] + t["b_dec"]
    return out + x @ t["W_skip"].T if cfg.get("skip_connection") else out


SAELENS_CASES = [("sae", "topk", "topk"), ("sae", "relu", "standard"), ("sae", "jumprelu", "jumprelu"),
                 ("sae", "batchtopk", "jumprelu"), ("transcoder", "relu", "transcoder"),
                 ("transcoder", "jumprelu", "jumprelu_transcoder"), ("skip_transcoder", "relu", "skip_transcoder"),
                 ("skip_transcoder", "batchtopk", "jumprelu_skip_transcoder")]


@pytest.mark.parametrize("architecture,activation,expected_name", SAELENS_CASES)
def test_saelens_files_reproduce_saeclts_raw_reconstruction(tmp_path, architecture, activation, expected_name):
    d_out = 12 if architecture == "sae" else 9  # transcoders may change width in SAELens
    model = _dictionary(architecture, activation, d_out=d_out)
    summary = convert(model, "saelens", tmp_path / "out", meta={"experiment": "x"})
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["architecture"] == expected_name and summary["architecture"] == expected_name
    assert cfg["metadata"]["hook_name"] == "a" and cfg["metadata"]["saeclt"]["experiment"] == "x"
    assert float(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6  # read as SAELens 6's layout, not converted from 5's
    x = _raw_rows(model)
    torch.testing.assert_close(saelens_forward(tmp_path / "out", x), model.predict_raw(x), rtol=1e-4, atol=1e-4)
    assert summary["max_error"] < 1e-9


@pytest.mark.parametrize("architecture", ["sae", "transcoder", "skip_transcoder"])
def test_sparsify_files_reproduce_saeclts_raw_reconstruction(tmp_path, architecture):
    model = _dictionary(architecture, "topk")
    convert(model, "sparsify", tmp_path / "out", meta={})
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert (cfg["num_latents"], cfg["k"], cfg["d_in"], cfg["transcode"]) == (40, 5, 12, architecture != "sae")
    x = _raw_rows(model)
    torch.testing.assert_close(sparsify_forward(tmp_path / "out", x), model.predict_raw(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt,architecture,activation,d_out,message", [
    ("saelens", "transcoder", "topk", 12, "no 'topk' transcoder"),
    ("saelens", "sae", "relu_clipped", 12, "no 'relu_clipped' activation"),
    ("sparsify", "sae", "jumprelu", 12, "TopK"),
    ("sparsify", "transcoder", "topk", 9, "as many dims as they read"),
])
def test_unsupported_combinations_are_refused_and_write_nothing(tmp_path, fmt, architecture, activation, d_out, message):
    model = _dictionary(architecture, activation, d_out=d_out)
    with pytest.raises(DataError, match=message):
        convert(model, fmt, tmp_path / "out", meta={})
    assert not (tmp_path / "out").exists()


def test_a_failed_conversion_keeps_the_previous_output(tmp_path):
    good = _dictionary("sae", "topk")
    convert(good, "saelens", tmp_path / "out", meta={})
    before = (tmp_path / "out" / "sae_weights.safetensors").read_bytes()
    with pytest.raises(DataError):
        convert(_dictionary("transcoder", "topk", d_out=9), "saelens", tmp_path / "out", meta={})
    assert (tmp_path / "out" / "sae_weights.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


def test_convert_command_writes_a_trained_experiment_with_its_provenance(built_project, tmp_path):
    from safetensors import safe_open

    result = convert_experiment(built_project / "specs/tiny_sae.yaml", "sparsify", tmp_path / "sp")
    with safe_open(str(tmp_path / "sp" / "sae.safetensors"), "pt") as f:  # sparsify's cfg.json takes no extra fields
        provenance = json.loads(f.metadata()["saeclt"])
    assert provenance["experiment"] == "tiny_sae" and provenance["trained"]["spec_hash"]
    convert_experiment(built_project / "specs/tiny_sae.yaml", "saelens", tmp_path / "lens")
    assert json.loads((tmp_path / "lens" / "cfg.json").read_text())["metadata"]["saeclt"]["experiment"] == "tiny_sae"
    assert result["max_error"] < 1e-9
    with pytest.raises(DataError, match="unknown format 'onnx'"):
        convert_experiment(built_project / "specs/tiny_sae.yaml", "onnx", tmp_path / "x")


def test_convert_cli_reports_what_it_wrote_and_names_bad_input(built_project, tmp_path):
    from typer.testing import CliRunner

    from sae_clt.cli import app

    spec = str(built_project / "specs/tiny_tc.yaml")  # a ReLU transcoder
    ok = CliRunner().invoke(app, ["convert", spec, "--to", "saelens", "--out", str(tmp_path / "tc")])
    assert ok.exit_code == 0, ok.output
    assert "architecture transcoder" in ok.output and (tmp_path / "tc" / "sae_weights.safetensors").exists()
    refused = CliRunner().invoke(app, ["convert", spec, "--to", "sparsify", "--out", str(tmp_path / "tc_sp")])
    assert refused.exit_code == 3 and "sparsify's SparseCoder is a TopK" in refused.output
    assert not (tmp_path / "tc_sp").exists()


# ------------------------------------------------------------------ reading them back: saeclt compare


@pytest.mark.parametrize("fmt,architecture,activation", [(f, a, act) for a, act, _ in SAELENS_CASES for f in ["saelens"]]
                         + [("sparsify", a, "topk") for a in ("sae", "transcoder", "skip_transcoder")])
def test_written_dictionaries_read_back_give_the_same_reconstruction(tmp_path, fmt, architecture, activation):
    from sae_clt.interop.formats import load_external

    d_out = 9 if fmt == "saelens" and architecture != "sae" else 12
    model = _dictionary(architecture, activation, d_out=d_out)
    convert(model, fmt, tmp_path / "out", meta={})
    back, description = load_external(tmp_path / "out")
    assert (description["format"], description["d_sae"]) == (fmt, 40)
    x = _raw_rows(model)
    torch.testing.assert_close(back.predict_raw(x), model.predict_raw(x), rtol=1e-4, atol=1e-4)


def test_compare_reports_the_evaluate_stages_metrics_for_every_copy_of_a_dictionary(built_project, tmp_path):
    from sae_clt.interop.compare import compare_experiment, comparison_table

    spec = built_project / "specs/tiny_sae.yaml"
    convert_experiment(spec, "saelens", tmp_path / "lens")
    convert_experiment(spec, "sparsify", tmp_path / "sp")
    summary = compare_experiment(spec, [tmp_path / "lens", tmp_path / "sp"], tmp_path / "compare.json")
    evaluated = json.loads((built_project / "metrics/tiny_sae/eval.json").read_text())
    fvus = [r["reconstruction"]["fvu"] for r in summary["dictionaries"].values()]
    assert len(fvus) == 3 and all(abs(f - evaluated["reconstruction"]["fvu"]) < 1e-5 for f in fvus)
    l0s = [r["sparsity"]["l0"] for r in summary["dictionaries"].values()]
    assert all(abs(v - evaluated["sparsity"]["l0"]) < 1e-6 for v in l0s)
    assert json.loads((tmp_path / "compare.json").read_text())["rows"] == summary["rows"] > 0
    assert "saelens:lens" in comparison_table(summary)


def test_compare_refuses_folders_that_do_not_fit_naming_what_is_wrong(built_project, tmp_path):
    from sae_clt.interop.compare import compare_experiment

    spec = built_project / "specs/tiny_sae.yaml"
    with pytest.raises(DataError, match="no cfg.json"):
        compare_experiment(spec, [tmp_path], tmp_path / "c.json")
    narrow = _dictionary("sae", "topk", d_in=5, d_out=5)
    convert(narrow, "sparsify", tmp_path / "narrow", meta={})
    with pytest.raises(DataError, match="reads 5 and writes 5 dims"):
        compare_experiment(spec, [tmp_path / "narrow"], tmp_path / "c.json")
    convert(_dictionary("sae", "topk"), "saelens", tmp_path / "odd", meta={})
    cfg = json.loads((tmp_path / "odd" / "cfg.json").read_text())
    (tmp_path / "odd" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(DataError, match="architecture: 'gated' is not supported"):
        compare_experiment(spec, [tmp_path / "odd"], tmp_path / "c.json")
    assert not (tmp_path / "c.json").exists()


def test_jumprelu_transcoder_with_large_means_converts_without_a_false_refusal(tmp_path):
    """Pre-activations rounded across θ in float32 must not fail the fold's check (it runs in float64)."""
    cfg = DictionaryConfig(architecture="transcoder", d_in=64, d_out=64, d_sae=2048, activation="jumprelu", k=0, source="a", target="b")
    model = Dictionary(cfg, seed=3)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        model.W_enc.copy_(torch.randn(64, 2048, generator=gen) * 0.2)
        model.log_threshold.fill_(0.0)  # θ = 1, where many pre-activations lie
        model.set_normalization(torch.full((64,), 20.0), torch.full((64,), 0.05), torch.zeros(64), torch.ones(64))
    summary = convert(model, "saelens", tmp_path / "out", meta={})
    assert summary["max_error"] < 1e-9


def test_convert_replaces_only_a_folder_that_holds_a_dictionary(tmp_path):
    model = _dictionary("sae", "topk")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"holds files saeclt did not write \(notes.txt\)"):
        convert(model, "saelens", tmp_path / "busy", meta={})
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    (tmp_path / "link").symlink_to(tmp_path / "busy", target_is_directory=True)
    with pytest.raises(DataError, match="is a symbolic link"):
        convert(model, "saelens", tmp_path / "link", meta={})
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    convert(model, "saelens", tmp_path / "lens", meta={})
    convert(model, "sparsify", tmp_path / "lens", meta={})  # a dictionary folder is replaced whole
    assert sorted(p.name for p in (tmp_path / "lens").iterdir()) == ["cfg.json", "sae.safetensors"]
    assert (tmp_path / "lens").stat().st_mode & 0o055 == 0o055  # readable by others, as the umask allows (not mkdtemp's 0700)


def test_reading_sparsify_default_width_and_saelens_decoder_norm_rescaling(tmp_path):
    from safetensors.torch import save_file

    from sae_clt.interop.formats import load_external

    gen = torch.Generator().manual_seed(5)
    d, n, k = 8, 32, 3
    x = torch.randn(50, d, generator=gen)
    # sparsify with num_latents 0: the width is d_in x expansion_factor
    (tmp_path / "sp").mkdir()
    enc, bias, dec, b_dec = torch.randn(n, d, generator=gen), torch.randn(n, generator=gen), torch.randn(n, d, generator=gen), torch.randn(d, generator=gen)
    save_file({"encoder.weight": enc, "encoder.bias": bias, "W_dec": dec, "b_dec": b_dec}, str(tmp_path / "sp" / "sae.safetensors"))
    (tmp_path / "sp" / "cfg.json").write_text(json.dumps({"expansion_factor": 4, "num_latents": 0, "k": k, "d_in": d}))
    model, description = load_external(tmp_path / "sp")
    assert description["d_sae"] == n
    torch.testing.assert_close(model.predict_raw(x), sparsify_forward(tmp_path / "sp", x))
    # SAELens TopK with rescale_acts_by_decoder_norm: top-k of pre·|row|, decoded as (acts / |row|) @ W_dec
    (tmp_path / "lens").mkdir()
    w_enc, b_enc = torch.randn(d, n, generator=gen), torch.randn(n, generator=gen)
    save_file({"W_enc": w_enc, "b_enc": b_enc, "W_dec": dec, "b_dec": b_dec}, str(tmp_path / "lens" / "sae_weights.safetensors"))
    (tmp_path / "lens" / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": d, "d_sae": n, "k": k,
                                                            "apply_b_dec_to_input": True, "rescale_acts_by_decoder_norm": True,
                                                            "metadata": {"sae_lens_version": "6.5.0"}}))
    norms = dec.norm(dim=1)
    pre = ((x - b_dec) @ w_enc + b_enc) * norms
    values, idx = pre.topk(k, dim=-1)
    expected = (torch.zeros_like(pre).scatter(-1, idx, values.relu()) / norms) @ dec + b_dec
    model, _ = load_external(tmp_path / "lens")
    torch.testing.assert_close(model.predict_raw(x), expected, rtol=1e-4, atol=1e-4)
    # a pre-6 layout (TopK spelled in activation_fn_str) is refused rather than misread
    old = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    del old["metadata"]
    (tmp_path / "lens" / "cfg.json").write_text(json.dumps({**old, "architecture": "standard", "activation_fn_str": "topk"}))
    with pytest.raises(DataError, match="written by SAELens before 6"):
        load_external(tmp_path / "lens")


def test_compare_trims_to_max_rows_and_checks_the_dictionary_kind(built_project, tmp_path):
    from sae_clt.interop.compare import compare_experiment

    sae_spec, tc_spec = built_project / "specs/tiny_sae.yaml", built_project / "specs/tiny_tc.yaml"
    assert compare_experiment(sae_spec, [], tmp_path / "c.json", max_rows=7)["rows"] == 7
    with pytest.raises(DataError, match="expected at least 1"):
        compare_experiment(sae_spec, [], tmp_path / "c.json", max_rows=0)
    convert_experiment(sae_spec, "saelens", tmp_path / "sae_lens")
    with pytest.raises(DataError, match="an SAE"):
        compare_experiment(tc_spec, [tmp_path / "sae_lens"], tmp_path / "c.json")
    renamed = json.loads((tmp_path / "sae_lens" / "cfg.json").read_text())
    renamed["metadata"]["hook_name"] = "blocks.1.hook_resid_post"
    (tmp_path / "sae_lens" / "cfg.json").write_text(json.dumps(renamed))
    summary = compare_experiment(sae_spec, [tmp_path / "sae_lens"], tmp_path / "c.json", max_rows=50)
    assert any("blocks.1.hook_resid_post" in w for w in summary["warnings"])
