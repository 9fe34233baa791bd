"""saeclt's hot operations (the fast TopK step, the loader, the store's writer): compiled CPU
kernels where they could be built, pure-torch reference implementations otherwise.

- ``topk_rows``: row-wise top-k (with an optional bias fused in). ``torch.topk`` over
  [4096, 3072] costs about twice a bf16 encoder matmul on a 2-core CPU.
- ``decode_backward``: ŷ = b + Σ_j a_j·W[idx_j], the scaled error g = s·(ŷ - y), the squared
  error per row, and the gradient of the k selected activations g·W[idx_j] (zero where a_j = 0).
- ``latent_grads``: the two weight gradients (and the bias gradient) as scatters of the k
  active entries of each row into their latents' rows.
- ``adam_update``: Adam on a weight matrix with the decoder's gradient projection, row
  renormalisation and bf16 copy fused into the same pass.
- ``positive_entries``: each row's positive entries, compacted (AuxK's selection when its k
  keeps them all).
- ``gather_normalize``: a minibatch's rows from several shards' stored tensors, as normalised
  float32 (the data loader).
- ``store_rows``: a shard's rows shuffled and converted to the store's dtype, with the running
  statistics and the NaN/inf check in the same pass (the collection's writer).

The kernels (C++ with OpenMP in ``cpp/kernels.cpp`` (built by ``kernels_build.py``)) are built on first use through torch's
extension tooling when a C++ compiler and ninja are present (one build per source, flags, torch,
Python and CPU features; later processes import it directly, its path recorded under
``~/.cache/saeclt/kernels/``); any failure to build falls back to the torch versions, which are
also the reference the tests compare against.
``SAECLT_KERNELS=torch`` (or the older ``SAECLT_TOPK=torch``) forces the fallback.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import NamedTuple

import torch
from torch.nn import functional as F

from .build import build

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

_KERNEL = None  # None: not tried yet; False: unavailable


def _use_kernel(*tensors: torch.Tensor):
    # Parameters updated under no_grad (the fast step) are fine; a graph being recorded is not.
    if any(t.device.type != "cpu" or (t.requires_grad and torch.is_grad_enabled()) for t in tensors):
        return False
    return _load_kernel()


def kernels_run_on(*tensors: torch.Tensor) -> bool:
    """Whether the compiled kernels take these tensors (CPU tensors, kernels built and not turned
    off); where not, every operation here runs its torch version (on a GPU, always)."""
    return bool(_use_kernel(*tensors))


def topk_rows(x: torch.Tensor, k: int, bias: torch.Tensor | None = None, columns: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, ...]:
    """(values, indices) of the k largest entries of each row of ``x (+ bias)``, unsorted.
    Values are float32 (float64 for float64 input); the compiled kernel breaks ties towards the
    lower index (torch.topk leaves that unspecified). With ``columns`` (1-D indices), a third
    result: those columns of ``x (+ bias)``, [rows, len(columns)], read in the same pass."""
    kernel = _use_kernel(x)
    if kernel and x.dim() == 2 and x.dtype in (torch.float32, torch.float64, torch.bfloat16) and x.is_contiguous() \
            and not (bias is not None and x.dtype == torch.float64):
        return tuple(kernel.topk_rows(x, k, bias.detach() if bias is not None else None, columns))
    return topk_rows_torch(x, k, bias, columns)


def topk_rows_torch(x: torch.Tensor, k: int, bias: torch.Tensor | None = None, columns: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, ...]:
    if bias is None and x.dtype in (torch.bfloat16, torch.float16):
        # selected in the stored dtype, only what is returned converted: the same result (the
        # conversion to float32 is exact and keeps the order), without a float32 copy of x
        values, indices = x.topk(k, dim=-1, sorted=False)
        out = (values.float(), indices)
        return out if columns is None else (*out, x.index_select(1, columns).float())
    scores = x.double() if x.dtype == torch.float64 else x.float()
    if bias is not None:
        scores = scores + bias
    values, indices = scores.topk(k, dim=-1, sorted=False)
    return (values, indices) if columns is None else (values, indices, scores.index_select(1, columns))


def center_bf16(x: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` (bfloat16, x's shape) = x - b, rounded to nearest even as torch rounds; returned."""
    kernel = _use_kernel(x, b)
    if kernel and x.dtype == b.dtype == torch.float32 and out.dtype == torch.bfloat16 and x.dim() == 2 \
            and x.is_contiguous() and out.is_contiguous():
        kernel.center_bf16(x, b.detach().contiguous(), out)
        return out
    return torch.sub(x, b, out=out)


def positive_entries(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, indices) [rows, m] of each row's positive entries, m the most any row has (at least
    1), and each row's count of them [rows] (int64); shorter rows are padded with non-positive
    values (0 from the compiled kernel). The same set as ``topk_rows(x, m)`` after a ReLU, in
    another order. Values float32 (float64 for float64)."""
    kernel = _use_kernel(x)
    if kernel and x.dim() == 2 and x.dtype in (torch.float32, torch.float64, torch.bfloat16):
        return tuple(kernel.positive_entries(x.contiguous()))
    return positive_entries_torch(x)


def positive_entries_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scores = x.double() if x.dtype == torch.float64 else x.float()
    counts = (scores > 0).sum(1)
    most = int(counts.max()) if scores.shape[0] else 0
    values, indices = scores.topk(max(1, min(most, scores.shape[1])), dim=-1, sorted=False)
    return values, indices, counts


def gather_normalize(parts: list[torch.Tensor], idx: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``idx`` of the row-wise concatenation of ``parts`` (2-D, one dtype and width; not
    concatenated), as float32 ``(x - mean) / scale`` — bit for bit what converting and then
    subtracting and dividing in torch gives. Written into ``out`` (float32, [len(idx), width])
    when given."""
    kernel = _use_kernel(*parts)
    if kernel and parts[0].dtype in (torch.float16, torch.bfloat16, torch.float32):
        return kernel.gather_normalize(list(parts), idx, mean, scale, out)
    result = gather_normalize_torch(parts, idx, mean, scale)
    return result if out is None else out.copy_(result)


def gather_normalize_torch(parts, idx, mean, scale):
    return take_rows(parts, idx).to(torch.float32).sub_(mean).div_(scale)


class StoredRows(NamedTuple):
    """``store_rows``' result: the converted rows and their statistics (float64 sums)."""

    out: torch.Tensor | None  # [rows, d] in the store's dtype; None when only statistics were asked for
    col_sum: torch.Tensor  # [d]
    col_sumsq: torch.Tensor  # [d]
    norm_sum: float  # sum over rows of each row's L2 norm
    zeros: int  # entries exactly 0
    nonfinite_rows: int  # rows holding NaN or inf: when not 0, the rest is not to be used


def store_rows(parts: list[torch.Tensor], idx: torch.Tensor | None, dtype: torch.dtype | None) -> StoredRows:
    """Rows ``idx`` (all rows, in order, when None) of the row-wise concatenation of float32
    ``parts``, converted to ``dtype`` (no conversion when None), with their per-column sums and
    sums of squares, the sum of their norms and their count of zeros — one pass (the store's writer)."""
    kernel = _use_kernel(*parts)
    if kernel and all(p.dtype == torch.float32 and p.dim() == 2 and p.is_contiguous() for p in parts) \
            and dtype in (None, torch.float16, torch.bfloat16, torch.float32):
        rows = idx.numel() if idx is not None else sum(p.shape[0] for p in parts)
        out = torch.empty((rows, parts[0].shape[1]), dtype=dtype) if dtype is not None else None
        col_sum, col_sumsq, scalars = kernel.store_rows(list(parts), idx, out)
        norm_sum, zeros, bad = scalars.tolist()
        return StoredRows(out, col_sum, col_sumsq, norm_sum, int(zeros), int(bad))
    return store_rows_torch(parts, idx, dtype)


def store_rows_torch(parts, idx, dtype):
    x = take_rows(parts, idx) if idx is not None else torch.cat(list(parts))
    x64 = x.double()  # the reference: every product and sum in float64, as the kernel computes them
    squares = x64 * x64
    return StoredRows(x.to(dtype) if dtype is not None else None, x64.sum(0), squares.sum(0),
                      float(squares.sum(1).sqrt().sum()), int((x == 0).sum()), int((~torch.isfinite(x).all(1)).sum()))


def take_rows(parts: list[torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of the row-wise concatenation of ``parts``, without concatenating them."""
    if len(parts) == 1:
        return parts[0].index_select(0, idx)
    starts = torch.tensor([0] + [p.shape[0] for p in parts[:-1]]).cumsum(0)
    part_of = torch.searchsorted(starts, idx, right=True) - 1
    out = torch.empty((idx.numel(), *parts[0].shape[1:]), dtype=parts[0].dtype)
    for i, part in enumerate(parts):
        where = (part_of == i).nonzero().squeeze(1)
        if where.numel():
            out[where] = part.index_select(0, idx[where] - starts[i])
    return out


def decode_backward(idx: torch.Tensor, acts: torch.Tensor, W: torch.Tensor, bias: torch.Tensor, y: torch.Tensor,
                    scale: float, sign: float = 1.0, low_g: bool = False, want_y_hat: bool = False) -> tuple[torch.Tensor, ...]:
    """(ŷ, g = scale·(ŷ - sign·y), g_acts [B, k] = g·W[idx] masked to acts > 0, |ŷ - sign·y|² per row),
    plus g as bfloat16 when ``low_g``. ŷ is only guaranteed when ``want_y_hat`` (the compiled kernel
    builds it inside g's rows and otherwise returns an empty tensor first). ``W`` may be a bfloat16
    copy of the decoder (float32 acts, bias and y): the gathers then move half the bytes, the
    arithmetic stays float32; with ``low_g`` too, g_acts are the dot products of the rounded g
    (bf16 by bf16, float32 sums: one hardware instruction per 32 products where the CPU has them)."""
    kernel = _use_kernel(acts, W, y)
    low_w = W.dtype == torch.bfloat16 and acts.dtype == torch.float32
    if kernel and acts.dtype == y.dtype == bias.dtype and (W.dtype == acts.dtype or low_w) \
            and acts.dtype in (torch.float32, torch.float64):
        return tuple(kernel.decode_backward(idx.contiguous(), acts.contiguous(), W.detach().contiguous(),
                                            bias.detach().contiguous(), y.contiguous(), float(scale), float(sign), low_g,
                                            want_y_hat))
    out = decode_backward_torch(idx, acts, W.to(acts.dtype), bias, y, scale, sign)
    if not low_g:
        return out
    g_low = out[1].to(torch.bfloat16)
    if low_w:  # as the kernel: the backward dots read g rounded to bf16
        out = (*out[:2], sampled_rows(g_low.to(acts.dtype), W.to(acts.dtype), idx) * (acts > 0), out[3])
    return (*out, g_low)


def decode_backward_torch(idx, acts, W, bias, y, scale, sign=1.0):
    y_hat = F.embedding_bag(idx, W, per_sample_weights=acts, mode="sum") + bias
    err = y_hat - sign * y
    g = err * scale
    return y_hat, g, sampled_rows(g, W, idx) * (acts > 0), (err * err).sum(-1)


def latent_grads(idx: torch.Tensor, wa: torch.Tensor, xa: torch.Tensor, wb: torch.Tensor, xb: torch.Tensor,
                 n_latents: int, out: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the active entries (b, j) of latent l = idx[b, j]: (Σ wa·xa[b] as [d_a, n] (transposed),
    Σ wb·xb[b] as [n, d_b], Σ wa as [n], the count of entries with wb ≠ 0 as [n] int64; with wb the
    activations, how often each latent fired). ``xa`` and ``xb`` may be bfloat16 copies (float32
    weights; sums in float32). ``out``: buffers of the right shapes to write the two weight
    gradients into (the compiled kernel reuses them; others may ignore them)."""
    kernel = _use_kernel(wa, xa, wb, xb)
    low_x = xa.dtype == xb.dtype == torch.bfloat16 and wa.dtype == torch.float32  # bf16 copies of the rows
    if kernel and wa.dtype == wb.dtype and (wa.dtype == xa.dtype == xb.dtype or low_x) and wa.dtype in (torch.float32, torch.float64):
        ga_out, gb_out = out if out is not None else (None, None)
        return tuple(kernel.latent_grads(idx.contiguous(), wa.contiguous(), xa.contiguous(), wb.contiguous(),
                                         xb.contiguous(), n_latents, 1 << 20, ga_out, gb_out))
    return latent_grads_torch(idx, wa, xa.to(wa.dtype), wb, xb.to(wb.dtype), n_latents)


def latent_grads_torch(idx, wa, xa, wb, xb, n_latents):
    pattern = LatentRows(idx, n_latents)
    bias_grad = torch.zeros(n_latents, dtype=wa.dtype, device=wa.device).index_add_(0, idx.reshape(-1), wa.reshape(-1))
    fired = torch.bincount(idx[wb != 0], minlength=n_latents)
    return pattern.matmul(wa, xa).t().contiguous(), pattern.matmul(wb, xb), bias_grad, fired


def adam_update(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, lr: float,
                beta1: float, beta2: float, eps: float, step: float, project: bool = False, normalize: bool = False,
                low: torch.Tensor | None = None) -> None:
    """One step of torch.optim.Adam (no weight decay, no amsgrad; ``step`` counts this one) on the
    matrix ``p``, in place, with ``exp_avg``/``exp_avg_sq`` its moments. ``project``: the gradient's
    component along each (unit) row of ``p`` is dropped first; ``normalize``: rows rescaled to unit
    norm after; ``low``: a bfloat16 tensor of p's shape that receives a copy of the new weights."""
    kernel = _use_kernel(grad)
    tensors = (p, grad, exp_avg, exp_avg_sq)
    if kernel and all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors) and p.dim() == 2:
        kernel.adam_rows(p.detach(), grad, exp_avg, exp_avg_sq, float(lr), float(beta1), float(beta2), float(eps),
                         float(step), project, normalize, low)
        return
    adam_update_torch(p, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, step, project, normalize, low)


@torch.no_grad()
def adam_update_torch(p, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, step, project=False, normalize=False, low=None):
    if project:
        grad = grad - (grad * p).sum(dim=1, keepdim=True) * p
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
    if normalize:
        p /= p.norm(dim=1, keepdim=True).clamp_min(1e-8)
    if low is not None:
        low.copy_(p)


def gram_accumulate(idx: torch.Tensor, acts: torch.Tensor, gram: torch.Tensor, weight: float) -> None:
    """gram[l, m] += weight · Σ_rows a_l a_m over the pairs of latents active in the same row
    (``gram`` float64 [n, ≥ n], updated in place; the decoder refit's ZᵀZ)."""
    kernel = _use_kernel(acts)
    if kernel and acts.dtype == torch.float32 and gram.dtype == torch.float64 and gram.is_contiguous():
        kernel.gram_accumulate(idx.contiguous(), acts.contiguous(), gram, float(weight))
        return
    gram_accumulate_torch(idx, acts, gram, weight)


def gram_accumulate_torch(idx, acts, gram, weight):
    k = idx.shape[1]
    rows = idx.unsqueeze(2).expand(-1, k, k).reshape(-1)
    cols = idx.unsqueeze(1).expand(-1, k, k).reshape(-1)
    values = (acts.double().unsqueeze(2) * acts.double().unsqueeze(1)).reshape(-1) * weight
    gram.index_put_((rows, cols), values.to(gram.dtype), accumulate=True)


class LatentRows:
    """The sparsity pattern of a batch grouped by latent: a [n, B] CSR layout (torch fallback)."""

    def __init__(self, idx: torch.Tensor, n_latents: int):
        n_rows, k = idx.shape
        flat = idx.reshape(-1)
        self.order = flat.argsort(stable=True)
        self.rows = self.order // k
        self.crow = torch.zeros(n_latents + 1, dtype=torch.long, device=idx.device)
        self.crow[1:] = torch.bincount(flat, minlength=n_latents).cumsum(0)
        self.shape = (n_latents, n_rows)

    def matmul(self, weights: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Σ_b weights[b, j] · dense[b] into row idx[b, j]: [n, d]."""
        sparse = torch.sparse_csr_tensor(self.crow, self.rows, weights.reshape(-1)[self.order], self.shape)
        return torch.sparse.mm(sparse, dense)


def sampled_rows(g: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[B, k]: g[b] · rows[idx[b, j]] (a sampled dense-dense product, no [B, n] intermediate). The
    mask's columns are sorted within each row (cuSPARSE expects sorted CSR columns; top-k leaves
    them unsorted) and the products put back in ``idx``'s order."""
    n_rows, k = idx.shape
    columns, order = idx.sort(dim=1)
    crow = torch.arange(0, n_rows * k + 1, k, device=idx.device)
    mask = torch.sparse_csr_tensor(crow, columns.reshape(-1), torch.zeros(n_rows * k, dtype=g.dtype, device=g.device),
                                   (n_rows, rows.shape[0]))
    products = torch.sparse.sampled_addmm(mask, g, rows.t()).values().reshape(n_rows, k)
    return torch.empty_like(products).scatter_(1, order, products)


def _load_kernel():
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = False
        if "torch" not in (os.environ.get("SAECLT_KERNELS", "auto"), os.environ.get("SAECLT_TOPK", "auto")):
            try:
                _KERNEL = build()
            except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a build error: use the torch versions

                reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                print(f"saeclt: the compiled CPU kernels could not be built ({reason}); using the slower torch "
                      "versions (set SAECLT_KERNELS=torch to skip the attempt)", file=sys.stderr, flush=True)
                _KERNEL = False
    return _KERNEL


def kernel_available() -> bool:
    return bool(_load_kernel())
