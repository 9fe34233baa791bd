"""A dictionary acting on raw activations: saeclt keeps weights in the store's normalised space
(per-dim mean and scale, saved beside them); this folds the normalisation into them, in float64,
once for every reader (the SAELens / sparsify files, the exported attribution edges)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DataError
from .dictionary import Dictionary


@dataclass
class RawWeights:
    """A dictionary acting on raw activations:
    pre = (x - b_dec·[centered]) @ W_enc + b_enc;  ŷ = σ(pre) @ W_dec + b_dec (+ x @ W_skip)."""

    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_out]
    b_dec: torch.Tensor  # [d_out]
    centered: bool  # b_dec subtracted from the input before the encoder (SAEs)
    W_skip: torch.Tensor | None = None  # [d_in, d_out]
    threshold: torch.Tensor | None = None  # [d_sae], JumpReLU (and BatchTopK's inference form)

    def to(self, dtype: torch.dtype) -> "RawWeights":
        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dtype).contiguous()

        return RawWeights(cast(self.W_enc), cast(self.b_enc), cast(self.W_dec), cast(self.b_dec), self.centered,
                          cast(self.W_skip), cast(self.threshold))


def raw_weights(model: Dictionary, centered: bool) -> RawWeights:
    """``model``'s weights with its normalisation folded in, in float64 (``.to(torch.float32)``
    for the files). ``centered`` asks for the form that subtracts b_dec from the input (possible when
    source and target share one normalisation, as an SAE's do); otherwise the encoder bias absorbs
    the centring."""
    cfg = model.cfg
    f64 = torch.float64
    s_src, m_src = model.source_scale.to(f64), model.source_mean.to(f64)
    s_tgt, m_tgt = model.target_scale.to(f64), model.target_mean.to(f64)
    W_enc, b_enc = model.W_enc.detach().to(f64), model.b_enc.detach().to(f64)
    W_dec, b_dec = model.W_dec.detach().to(f64), model.b_dec.detach().to(f64)
    # x_n = (x - m_src) / s_src;  ŷ = (z W_dec + b_dec [+ x_n W_skip]) * s_tgt + m_tgt
    enc = W_enc / s_src[:, None]
    dec = W_dec * s_tgt[None, :]
    out_bias = b_dec * s_tgt + m_tgt
    skip = None
    if cfg.layout.skip_path:
        W_skip = model.W_skip.detach().to(f64)
        skip = W_skip / s_src[:, None] * s_tgt[None, :]
        out_bias = out_bias - ((m_src / s_src) @ W_skip) * s_tgt
    # the encoder's input: x_n - b_dec·[sae]
    shift = m_src / s_src + (b_dec if cfg.apply_b_dec_to_input else 0.0)
    if centered:
        same = cfg.apply_b_dec_to_input and torch.allclose(s_src, s_tgt) and torch.allclose(m_src, m_tgt)
        if not same:
            raise DataError("the centred form needs an SAE whose source and target share one normalisation")
        bias = b_enc  # x - out_bias = s (x_n - b_dec): the shift is exactly the decoder bias
    else:
        bias = b_enc - shift @ W_enc
    threshold = cfg.act.inference_threshold(model, f64)
    return RawWeights(enc, bias, dec, out_bias, centered, skip, threshold)
