"""A trained dictionary written in other tools' formats, so it can be loaded where they are used:

- ``saelens``: a folder with ``cfg.json`` and ``sae_weights.safetensors`` as SAELens 6 saves them
  (``SAE.load_from_disk(folder)``); architectures ``topk``, ``jumprelu``, ``standard`` (ReLU) for
  SAEs, ``transcoder`` / ``jumprelu_transcoder`` and their ``skip_`` forms for transcoders.
- ``sparsify``: a folder with ``cfg.json`` and ``sae.safetensors`` as EleutherAI sparsify saves a
  ``SparseCoder`` (``SparseCoder.load_from_disk(folder)``); TopK only, transcoders with equal
  input and output widths.

saeclt keeps a dictionary's weights in the activation store's normalised space (per-dim mean and
scale, saved beside them); the other tools take raw activations. The normalisation is folded
into the weights, in float64, so the written dictionary maps raw activations to the same raw
reconstruction as ``Dictionary.predict_raw`` (up to float32 rounding), with its decoder rows no
longer of unit norm. ``convert`` checks that on sample rows before anything is written.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from ..dictionaries.activations import ACTIVATIONS
from ..dictionaries.dictionary import Dictionary, DictionaryConfig
from ..dictionaries.raw import RawWeights, raw_weights
from ..errors import DataError
from ..io import check_own_folder, read_json, remove_own_folder
from ..provenance import versions
from ..spec.project import resolve_experiment

FORMATS = ("saelens", "sparsify")
SAELENS_FORMAT_VERSION = "6.0.0"  # the cfg.json layout written here: SAELens 6's (metadata block, architecture names)


def predict(w: RawWeights, x: torch.Tensor, activation: str, k: int) -> torch.Tensor:
    """The raw reconstruction of the folded weights, computed as the target tools compute it
    (top-k of the pre-activations then ReLU; JumpReLU as ReLU(pre)·[pre > θ])."""
    pre = (x - w.b_dec if w.centered else x) @ w.W_enc + w.b_enc
    if ACTIVATIONS[activation].exact_k:
        values, idx = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, values.relu())
    elif w.threshold is not None:
        z = pre.relu() * (pre > w.threshold)
    else:
        z = pre.relu()
    y = z @ w.W_dec + w.b_dec
    return y if w.W_skip is None else y + x @ w.W_skip


def _unsupported(fmt: str, cfg, why: str) -> DataError:
    return DataError(f"cannot write a {cfg.architecture} with activation '{cfg.activation}' as {fmt}: {why}")


def saelens_files(model: Dictionary, w: RawWeights, meta: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg.json contents, tensors) in SAELens 6's layout, from the folded weights ``w``."""
    cfg = model.cfg
    act, layout = cfg.act, cfg.layout
    if layout.layered:
        raise _unsupported("saelens", cfg, "SAELens holds one dictionary per hook point (cross-layer transcoders: not yet)")
    if layout.reconstructs_input:
        if act.saelens_sae is None:
            raise _unsupported("saelens", cfg, f"SAELens has no '{act.name}' activation")
        name = act.saelens_sae
    elif act.saelens_transcoder_prefix is None or layout.saelens_transcoder is None:
        raise _unsupported("saelens", cfg, f"SAELens has no {act.name!r} transcoder" + (
            "; write it for sparsify (--to sparsify), which has one, or train the transcoder with batchtopk or jumprelu"
            if act.sparsify else ""))
    else:
        name = act.saelens_transcoder_prefix + layout.saelens_transcoder
    tensors = {"W_enc": w.W_enc, "b_enc": w.b_enc, "W_dec": w.W_dec, "b_dec": w.b_dec}
    if w.threshold is not None:
        tensors["threshold"] = w.threshold
    if w.W_skip is not None:
        tensors["W_skip"] = w.W_skip.t().contiguous()  # SAELens: [d_out, d_in], applied as x @ W_skipᵀ
    config = {
        "architecture": name, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": layout.reconstructs_input, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": SAELENS_FORMAT_VERSION,
                     "model_name": meta.get("subject"), "hook_name": cfg.source,
                     **({"hook_name_out": cfg.target} if not layout.reconstructs_input else {}), "saeclt": meta},
    }
    if not layout.reconstructs_input:
        config["d_out"] = cfg.d_out
    if act.exact_k:  # (written out: SAELens's training loader would default the rescaling to true)
        config["k"], config["rescale_acts_by_decoder_norm"] = cfg.k, False
    return config, tensors


def sparsify_files(model: Dictionary, w: RawWeights, meta: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg.json contents, tensors) as sparsify's ``SparseCoder.save_to_disk`` writes them, from ``w``."""
    cfg = model.cfg
    if not cfg.layout.sparsify:
        raise _unsupported("sparsify", cfg, "sparsify's cross-layer coders are not written yet (one SparseCoder per hook point only)")
    if not cfg.act.sparsify:
        raise _unsupported("sparsify", cfg, "sparsify's SparseCoder is a TopK SAE or transcoder")
    if not cfg.layout.reconstructs_input and cfg.d_in != cfg.d_out:
        raise _unsupported("sparsify", cfg, f"sparsify's transcoders write as many dims as they read (here {cfg.d_in} -> {cfg.d_out})")
    tensors = {"encoder.weight": w.W_enc.t().contiguous(), "encoder.bias": w.b_enc, "W_dec": w.W_dec, "b_dec": w.b_dec}
    if w.W_skip is not None:
        tensors["W_skip"] = w.W_skip.t().contiguous()  # sparsify: [d_out, d_in], applied as x @ W_skipᵀ
    config = {
        "activation": "topk", "expansion_factor": max(1, cfg.d_sae // cfg.d_in), "num_latents": cfg.d_sae, "k": cfg.k,
        "normalize_decoder": False,  # the folded scale leaves the decoder rows off unit norm
        "multi_topk": False, "skip_connection": cfg.layout.skip_path, "transcode": not cfg.layout.reconstructs_input,
        "d_in": cfg.d_in,  # (saeclt's provenance goes in the weights file's metadata: sparsify reports unknown fields)
    }
    return config, tensors


WEIGHT_FILES = {"saelens": "sae_weights.safetensors", "sparsify": "sae.safetensors"}


def check_rows(model: Dictionary, n: int = 1024, seed: int = 0) -> torch.Tensor:
    """Sample raw source rows around the dictionary's own normalisation (mean ± 2 scales)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, model.cfg.d_in, generator=gen) * 2
    return z * model.source_scale + model.source_mean


def folding_error(model: Dictionary, w: RawWeights, x: torch.Tensor) -> float:
    """Largest |ŷ_folded - ŷ_saeclt| over the rows, both in float64 (``w`` as raw_weights returns
    it; a float32 comparison would count pre-activations rounded across a JumpReLU threshold), in
    units of each target dim's scale: a check of the algebra, not of float32 rounding."""

    reference = copy.deepcopy(model).double()
    x = x.double()
    with torch.no_grad():
        y_n, _ = reference((x - reference.source_mean) / reference.source_scale)
        expected = y_n * reference.target_scale + reference.target_mean
    got = predict(w, x, model.cfg.activation, model.cfg.k)
    return float(((got - expected).abs() / reference.target_scale).max())


# What an output folder may hold for convert to replace it: a dictionary in one of the formats.
REPLACEABLE = {"cfg.json", *WEIGHT_FILES.values(), "sparsity.safetensors"}


def _converted_file(rel: Path) -> bool:
    """A file convert writes (or SAELens / sparsify keep beside it): a folder of only these is replaceable."""
    return len(rel.parts) == 1 and rel.name in REPLACEABLE


def convert(model: Dictionary, fmt: str, out_dir: Path, meta: dict, tolerance: float = 1e-9) -> dict:
    """Write ``model`` in format ``fmt`` into ``out_dir`` (through a staging folder beside it; an
    existing ``out_dir`` is replaced only if it holds a dictionary and nothing else). Returns a
    summary with the fold's error on sample rows (float64, in target scales); raises if it
    exceeds ``tolerance``, writing nothing."""

    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise DataError(f"unknown format '{fmt}'; expected one of: {', '.join(FORMATS)}")
    w = raw_weights(model, centered=model.cfg.layout.reconstructs_input)  # both tools subtract b_dec from an SAE's input
    config, tensors = (saelens_files if fmt == "saelens" else sparsify_files)(model, w.to(torch.float32), meta)
    error = folding_error(model, w, check_rows(model))
    if not error <= tolerance:
        raise DataError(f"the folded weights do not reproduce saeclt's reconstruction (error {error:.2e} target scales > {tolerance:g}); "
                        "nothing was written")
    out_dir = Path(out_dir)
    check_own_folder(out_dir, _converted_file, "a converted dictionary", "or choose a new or empty folder (convert replaces the folder it writes)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:12]}"
    os.mkdir(staging)  # (made with the umask's permissions; mkdtemp's 0700 would stay on the result)
    try:
        save_file(tensors, str(staging / WEIGHT_FILES[fmt]),
                  metadata={"format": fmt, "written_by": "saeclt", "saeclt": json.dumps(meta, sort_keys=True)})
        (staging / "cfg.json").write_text(json.dumps(config, indent=2) + "\n")
        remove_own_folder(out_dir, _converted_file, "a converted dictionary")
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"format": fmt, "folder": str(out_dir), "files": ["cfg.json", WEIGHT_FILES[fmt]],
            "architecture": config.get("architecture") or f"SparseCoder (transcode: {str(config['transcode']).lower()})",
            "max_error": error}


def convert_experiment(spec_path: Path, fmt: str, out_dir: Path | None = None) -> dict:
    """``saeclt convert``: an experiment's trained dictionary written as ``fmt`` (default folder
    ``runs/experiments/<id>/<fmt>/``), with where it came from in the written config."""

    if fmt not in FORMATS:
        raise DataError(f"--to: unknown format '{fmt}'; expected one of: {', '.join(FORMATS)}")
    resolved = resolve_experiment(spec_path)
    eid = resolved.experiment.id
    folder = resolved.paths.dictionary_dir(eid)
    model = Dictionary.load(folder)  # (a clear error when the experiment has not been trained)
    trained = read_json(folder / "cfg.json").get("meta", {})
    meta = {"experiment": eid, "subject": resolved.subject.id, "dataset": resolved.dataset.id,
            "source": model.cfg.source, "target": model.cfg.target, "activation": model.cfg.activation, "k": model.cfg.k,
            "trained": trained, "converted_with": versions()}
    return convert(model, fmt, out_dir or folder.parent / fmt, meta)


# --------------------------------------------------------------------------- reading them back


def _read_folder(folder: Path) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(format, cfg.json, tensors) of a SAELens or sparsify dictionary folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "cfg.json").exists():
        raise DataError(f"{folder}: no cfg.json (expected a SAELens or sparsify dictionary folder)")
    for fmt, name in WEIGHT_FILES.items():
        if (folder / name).exists():
            try:
                config = json.loads((folder / "cfg.json").read_text())
            except json.JSONDecodeError as exc:
                raise DataError(f"{folder / 'cfg.json'}: not valid JSON ({exc})") from exc
            return fmt, config, load_file(folder / name)
    raise DataError(f"{folder}: neither {WEIGHT_FILES['saelens']} (SAELens) nor {WEIGHT_FILES['sparsify']} (sparsify) found")


def _field(folder: Path, config: dict, key: str, kinds=(int,)):
    if key not in config or not isinstance(config[key], kinds):
        raise DataError(f"{Path(folder) / 'cfg.json'}: {key}: expected {' or '.join(k.__name__ for k in kinds)}, "
                        f"got {config.get(key)!r}")
    return config[key]


def _tensor(folder: Path, tensors: dict, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key not in tensors:
        raise DataError(f"{folder}: tensor '{key}' missing (found {', '.join(sorted(tensors))})")
    t = tensors[key].float()
    if tuple(t.shape) != shape:
        raise DataError(f"{folder}: tensor '{key}' has shape {list(t.shape)}, expected {list(shape)}")
    return t


def load_external(folder: Path) -> tuple[Dictionary, dict]:
    """A dictionary saved by SAELens or sparsify as a saeclt ``Dictionary`` acting on raw
    activations (identity normalisation: ``predict_raw`` and ``encode`` take raw rows), and a
    description (format, architecture, width, k). Kinds saeclt has no counterpart for are refused."""

    fmt, config, tensors = _read_folder(folder)
    hooks = None  # (source, target) as the file names them, where it does
    if fmt == "saelens":
        version = config.get("sae_lens_version") or (config.get("metadata") or {}).get("sae_lens_version")
        if not version or not str(version).split(".")[0].isdigit() or int(str(version).split(".")[0]) < 6:
            raise DataError(f"{Path(folder) / 'cfg.json'}: written by SAELens {version or 'before 6'}, whose layout differs "
                            "(activation in activation_fn_str, ...); load it with SAELens 6 and save it again "
                            "(sae.save_inference_model(folder)) to compare it")
        arch = _field(folder, config, "architecture", (str,))
        if config.get("normalize_activations", "none") not in ("none", None):
            raise DataError(f"{Path(folder) / 'cfg.json'}: normalize_activations: '{config['normalize_activations']}' is not "
                            "supported (only 'none': the dictionary must take raw activations)")
        base = arch.removeprefix("jumprelu_")
        kinds = {"topk": ("sae", "topk"), "standard": ("sae", "relu"), "jumprelu": ("sae", "jumprelu"),
                 "transcoder": ("transcoder", "relu"), "skip_transcoder": ("skip_transcoder", "relu")}
        if arch not in kinds and base not in ("transcoder", "skip_transcoder"):
            raise DataError(f"{Path(folder) / 'cfg.json'}: architecture: '{arch}' is not supported; expected one of "
                            "topk, standard, jumprelu, transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder")
        architecture, activation = kinds.get(arch, (base, "jumprelu"))
        centered = bool(config.get("apply_b_dec_to_input", True)) and architecture == "sae"
        d_in, d_sae = _field(folder, config, "d_in"), _field(folder, config, "d_sae")
        d_out = _field(folder, config, "d_out") if architecture != "sae" else d_in
        k = _field(folder, config, "k") if activation == "topk" else 0
        w_enc, w_dec = _tensor(folder, tensors, "W_enc", (d_in, d_sae)), _tensor(folder, tensors, "W_dec", (d_sae, d_out))
        w_skip = _tensor(folder, tensors, "W_skip", (d_out, d_in)).t() if architecture == "skip_transcoder" else None
        b_enc = _tensor(folder, tensors, "b_enc", (d_sae,))
        if activation == "topk" and config.get("rescale_acts_by_decoder_norm"):
            # TopK on pre·|W_dec row|, decoded as (acts / |row|) @ W_dec: the same map with the
            # norms folded into the encoder (as SAELens's fold_W_dec_norm does)
            norms = w_dec.norm(dim=1).clamp_min(1e-12)
            w_enc, b_enc, w_dec = w_enc * norms, b_enc * norms, w_dec / norms[:, None]
        threshold = None
        if activation == "jumprelu":
            threshold = (_tensor(folder, tensors, "threshold", (d_sae,)) if "threshold" in tensors or "log_threshold" not in tensors
                         else _tensor(folder, tensors, "log_threshold", (d_sae,)).exp())
        meta = config.get("metadata") or {}
        source, target = meta.get("hook_name") or "in", meta.get("hook_name_out") or meta.get("hook_name") or "out"
        if meta.get("hook_name"):
            hooks = (meta["hook_name"], meta.get("hook_name_out") or meta["hook_name"])
        file_kind = "sae" if architecture == "sae" else "transcoder"
    else:
        if config.get("activation", "topk") != "topk":  # (older EleutherAI configs have no activation field: topk)
            raise DataError(f"{Path(folder) / 'cfg.json'}: activation: '{config['activation']}' is not supported (only topk)")
        d_in, k = _field(folder, config, "d_in"), _field(folder, config, "k")
        # num_latents 0 (sparsify's default) means d_in x expansion_factor (default 32)
        d_sae = config.get("num_latents") or d_in * config.get("expansion_factor", 32)
        if not isinstance(d_sae, int) or d_sae < 1:
            raise DataError(f"{Path(folder) / 'cfg.json'}: num_latents / expansion_factor: expected a positive width, got {d_sae!r}")
        transcode, skip = bool(config.get("transcode")), bool(config.get("skip_connection"))
        architecture, activation, d_out, centered = ("skip_transcoder" if skip else "transcoder" if transcode else "sae"), "topk", d_in, not transcode
        w_enc = _tensor(folder, tensors, "encoder.weight", (d_sae, d_in)).t()
        w_dec = _tensor(folder, tensors, "W_dec", (d_sae, d_in))
        w_skip = _tensor(folder, tensors, "W_skip", (d_in, d_in)).t() if skip else None
        b_enc, threshold = _tensor(folder, tensors, "encoder.bias", (d_sae,)), None
        source = target = "in"
        file_kind = "transcoder" if transcode else "sae"
    if architecture == "sae" and not centered:
        architecture = "transcoder"  # an SAE that does not subtract b_dec from its input: the transcoder's form
    cfg = DictionaryConfig(architecture=architecture, d_in=d_in, d_out=d_out, d_sae=d_sae, activation=activation, k=k,
                           source=source, target=target)
    model = Dictionary(cfg)
    with torch.no_grad():
        model.W_enc.copy_(w_enc)
        model.b_enc.copy_(b_enc)
        model.W_dec.copy_(w_dec)
        model.b_dec.copy_(_tensor(folder, tensors, "b_dec", (d_out,)))
        if w_skip is not None:
            model.W_skip.copy_(w_skip)
        if threshold is not None:  # θ ≥ 0; log of a tiny floor where it is 0 (then the same as ReLU)
            model.log_threshold.copy_(threshold.clamp_min(1e-30).log())
    description = {"format": fmt, "folder": str(folder), "architecture": architecture, "activation": activation,
                   "d_in": d_in, "d_out": d_out, "d_sae": d_sae, "k": k, "kind": file_kind, "hook_points": hooks}
    return model.eval(), description
