"""Sparse dictionaries: an SAE (reads and writes one hook point), a transcoder (reads one,
writes another; sizes may differ) or a skip-transcoder (plus a linear path x @ W_skip).

    pre  = (x - b_dec·[sae]) @ W_enc + b_enc        [B, d_sae]
    z    = σ(pre)                                    [B, d_sae]
    ŷ    = z @ W_dec + b_dec (+ x @ W_skip)          [B, d_out]

σ (``activation``) comes from the registry in ``activations.py`` (topk, batchtopk, jumprelu,
relu, relu_clipped, and any registered there or by the user), which also adds the parameters
an activation needs (JumpReLU's thresholds, BatchTopK's calibrated one).

W_dec rows are kept at unit norm. Weights live in the normalised space of the activation
store; the normalisation (mean, scale per hook) is saved beside them so a saved dictionary maps
raw activations to raw activations on its own (``predict_raw``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import DataError
from ..io import read_json, save_safetensors, write_json
from ..spec.models import ModelSection
from .activations import Activation, activation
from .architectures import Architecture, architecture

WEIGHTS = "dictionary.safetensors"
CONFIG = "cfg.json"


@dataclass(frozen=True)
class DictionaryConfig:
    architecture: str  # a key of architectures.ARCHITECTURES
    d_in: int
    d_out: int
    d_sae: int
    activation: str  # a key of activations.ACTIVATIONS
    k: int
    source: str
    target: str
    relu_ceiling: float = ModelSection.model_fields["relu_ceiling"].default  # defaults: the spec's, declared once
    jumprelu_bandwidth: float = ModelSection.model_fields["jumprelu_bandwidth"].default
    tied: bool = False  # W_enc is W_decᵀ (no encoder parameter)
    n_layers: int = 1  # clt: source/target layers; d_in, d_out, d_sae are totals over the layers

    @property
    def act(self) -> Activation:
        return activation(self.activation)

    @property
    def layout(self) -> Architecture:
        return architecture(self.architecture)

    @property
    def apply_b_dec_to_input(self) -> bool:
        return self.layout.reconstructs_input


class Dictionary(nn.Module):
    def __init__(self, cfg: DictionaryConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(cfg.d_sae, cfg.d_out, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        if cfg.tied and cfg.d_in != cfg.d_out:
            raise DataError(f"a tied decoder needs equal source and target sizes; got d_in {cfg.d_in}, d_out {cfg.d_out}")
        if cfg.d_in == cfg.d_out:  # encoder starts as the decoder's transpose
            w_enc = w_dec.t().clone()
        else:
            w_enc = torch.randn(cfg.d_in, cfg.d_sae, generator=gen) / cfg.d_in**0.5
        if not cfg.tied:
            self.W_enc = nn.Parameter(w_enc.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out))
        if cfg.layout.layered:
            if cfg.d_in % cfg.n_layers or cfg.d_out % cfg.n_layers or cfg.d_sae % cfg.n_layers:
                raise DataError(f"a clt needs equally wide layers: d_in {cfg.d_in}, d_out {cfg.d_out}, d_sae {cfg.d_sae} "
                                f"over {cfg.n_layers} layers")
            with torch.no_grad():
                self.W_enc.mul_(self.encoder_mask())
                self.W_dec.mul_(self.decoder_mask())
                self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        for name, dim in (("source_mean", cfg.d_in), ("target_mean", cfg.d_out)):
            self.register_buffer(name, torch.zeros(dim))
        for name, dim in (("source_scale", cfg.d_in), ("target_scale", cfg.d_out)):
            self.register_buffer(name, torch.ones(dim))
        if cfg.layout.skip_path:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_out))
        cfg.act.add_parameters(self)

    # ------------------------------------------------------------------ cross-layer structure

    def _layer_of(self, size: int) -> torch.Tensor:
        """Layer index of each of ``size`` units split evenly over the layers."""
        return torch.arange(size, device=self.W_enc.device) // (size // self.cfg.n_layers)

    def encoder_mask(self) -> torch.Tensor:
        """clt: [d_in, d_sae], 1 where a latent reads its own layer's source."""
        return (self._layer_of(self.cfg.d_in)[:, None] == self._layer_of(self.cfg.d_sae)[None, :]).float()

    def decoder_mask(self) -> torch.Tensor:
        """clt: [d_sae, d_out], 1 where a latent writes its own or a later layer's target."""
        return (self._layer_of(self.cfg.d_sae)[:, None] <= self._layer_of(self.cfg.d_out)[None, :]).float()

    @torch.no_grad()
    def enforce_structure(self, grads: bool = False) -> None:
        """clt: zero the encoder and decoder entries outside the layer structure (of the
        gradients too, when ``grads``, so Adam never moves them). No-op for other kinds."""
        if not self.cfg.layout.layered:
            return
        for param, mask in ((self.W_enc, self.encoder_mask()), (self.W_dec, self.decoder_mask())):
            target = param.grad if grads else param
            if target is not None:
                target.mul_(mask.to(target.dtype))

    def layer_decoders(self) -> list[torch.Tensor]:
        """clt: per source layer l, its features' decoders to targets l..L-1 as [d_sae_l, n_targets, d_out_l]."""
        n = self.cfg.n_layers
        f, o = self.cfg.d_sae // n, self.cfg.d_out // n
        w = self.W_dec.detach()
        return [w[i * f:(i + 1) * f, i * o:].reshape(f, n - i, o) for i in range(n)]

    def __getattr__(self, name: str):
        # Tied: the encoder is a view of the decoder, so every reader of W_enc sees the same weights.
        if name == "W_enc" and self.cfg.tied:
            return self.W_dec.t()
        return super().__getattr__(name)

    # ------------------------------------------------------------------ forward pieces

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def sparse_code(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the active latents, [B, k] each; topk only. A clt takes k per
        layer ([B, n_layers·k]): a global top-k would let later layers' features compete with
        earlier ones, so a target layer's reconstruction would depend on later sources."""
        if self.cfg.layout.layered:
            n, f = self.cfg.n_layers, self.cfg.d_sae // self.cfg.n_layers
            values, indices = pre.reshape(pre.shape[0], n, f).topk(self.cfg.k, dim=-1, sorted=False)
            indices = indices + (torch.arange(n, device=pre.device) * f)[None, :, None]
            return F.relu(values).reshape(pre.shape[0], -1), indices.reshape(pre.shape[0], -1)
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return F.relu(values), indices

    def activate(self, pre: torch.Tensor, training: bool = False) -> torch.Tensor:
        """Dense latent activations [B, d_sae] from pre-activations (differentiable)."""
        return self.cfg.act.activate(self, pre, training)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latent activations [B, d_sae] (inference form)."""
        return self.activate(self.pre_acts(x))

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        y = z @ self.W_dec + self.b_dec
        if self.cfg.layout.skip_path and x is not None:
            y = y + x @ self.W_skip
        return y

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Decoder as a weighted gather of the k active rows (no [B, d_sae] intermediate)."""
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z, x), z

    @torch.no_grad()
    def predict_raw(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Raw source activations -> raw target reconstruction (normalisation applied and undone)."""
        x = (x_raw.float() - self.source_mean) / self.source_scale
        y, _ = self(x)
        return y * self.target_scale + self.target_mean

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Data initialisation: latent i starts as the pair (x_i, y_i) of a sampled row: its
        encoder column is x_i's direction and its decoder row y_i's. Every latent then fires
        somewhere on the data from the first step, even on a low-dimensional manifold."""
        x_dir = F.normalize(x, dim=1)
        y_dir = F.normalize(y - self.b_dec, dim=1)
        # Scaled so the k active latents together start near the target's norm, not k times it.
        if self.cfg.tied:  # one matrix plays both parts: split the 1/k between them
            self.W_dec.copy_(y_dir / self.cfg.k**0.5)
        else:
            self.W_enc.copy_(x_dir.t() / self.cfg.k)
            self.W_dec.copy_(y_dir)
        if self.cfg.layout.layered:  # each latent keeps its own layer's part of the row
            self.enforce_structure()
            self.normalize_decoder()

    # ------------------------------------------------------------------ decoder constraint

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the gradient component along each decoder row (it only changes the norm)."""
        if self.W_dec.grad is not None:
            w = self.W_dec
            self.W_dec.grad -= (self.W_dec.grad * w).sum(dim=1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    # ------------------------------------------------------------------ persistence

    def set_normalization(self, src_mean, src_scale, tgt_mean, tgt_scale) -> None:
        for name, value in zip(("source_mean", "source_scale", "target_mean", "target_scale"), (src_mean, src_scale, tgt_mean, tgt_scale)):
            getattr(self, name).copy_(value)

    def save(self, folder: Path, meta: dict, extra_cfg: dict | None = None) -> None:
        folder = Path(folder)
        tensors = {k: v.detach().cpu().float() for k, v in self.state_dict().items()}  # saved from the CPU, whatever the device
        if self.cfg.layout.layered:  # per-layer encoders [d_in_l, d_sae_l], decoders [d_sae_l, n_targets, d_out_l]
            n = self.cfg.n_layers
            i, f = self.cfg.d_in // n, self.cfg.d_sae // n
            del tensors["W_enc"], tensors["W_dec"]
            for layer, dec in enumerate(self.layer_decoders()):
                tensors[f"W_enc.{layer}"] = self.W_enc.detach()[layer * i:(layer + 1) * i, layer * f:(layer + 1) * f].cpu().float().contiguous()
                tensors[f"W_dec.{layer}"] = dec.cpu().float().contiguous()
        save_safetensors(folder / WEIGHTS, tensors, metadata={"spec_hash": meta.get("spec_hash", "")})
        write_json(folder / CONFIG, {**asdict(self.cfg), "apply_b_dec_to_input": self.cfg.apply_b_dec_to_input,
                                     "space": "normalized; *_mean / *_scale map to raw activations", **(extra_cfg or {}), "meta": meta})

    @classmethod
    def load(cls, folder: Path) -> "Dictionary":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG).exists() or not (folder / WEIGHTS).exists():
            raise DataError(f"{folder}: no saved dictionary ({CONFIG} and {WEIGHTS} expected; run the train stage)")
        cfg_json = read_json(folder / CONFIG)
        fields = DictionaryConfig.__dataclass_fields__
        model = cls(DictionaryConfig(**{k: cfg_json[k] for k in fields if k in cfg_json}))
        tensors = load_file(folder / WEIGHTS)
        if model.cfg.layout.layered:  # reassemble the block-structured matrices
            n = model.cfg.n_layers
            i, f, o = model.cfg.d_in // n, model.cfg.d_sae // n, model.cfg.d_out // n
            w_enc, w_dec = torch.zeros_like(model.W_enc), torch.zeros_like(model.W_dec)
            for layer in range(n):
                w_enc[layer * i:(layer + 1) * i, layer * f:(layer + 1) * f] = tensors.pop(f"W_enc.{layer}")
                w_dec[layer * f:(layer + 1) * f, layer * o:] = tensors.pop(f"W_dec.{layer}").reshape(f, (n - layer) * o)
            tensors["W_enc"], tensors["W_dec"] = w_enc, w_dec
        model.load_state_dict(tensors)
        return model.eval()
