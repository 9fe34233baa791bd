"""The fast TopK step's operations one by one on a device, each beside an alternative way to
compute the same thing, at one shape: what the GPU-speed work would choose between. Times are the
best of three groups of back-to-back calls, synchronised around each group.

  encoder      mm into a buffer (bias added in the top-k)    | addmm (bias in the matmul's epilogue)
  topk         torch.topk on the bf16 pre-activations        | on a float32 copy (with the bias added)
  decode       embedding_bag over the k active rows          | gather [B, k, d] and a batched matmul
  decode_back  sampled dense-dense product (CSR)             | gather [B, k, d] and a batched matmul
  W_enc grad   sparse CSR product over the active entries    | dense: scatter into [B, n], one matmul (bf16)
  W_dec grad   sparse CSR product                            | index_add of the k rows' outer products
  adam         torch's fused Adam on the four parameters     | saeclt's row update (projection, Adam, renormalisation)

    python benchmarks/gpu_ops.py --device cuda [--shape 768,24576,32,4096]
    python benchmarks/gpu_ops.py --device cpu --shape 64,512,8,256     # a check of the script
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_clt.kernels.ops import LatentRows, adam_update_torch, sampled_rows  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_ms(fn, device: torch.device, repeats: int) -> float:
    fn()
    _sync(device)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 1000 * best


def op_timings(shape: tuple[int, int, int, int], device: torch.device, repeats: int = 10) -> list[dict]:
    """[{op, ours_ms, alternative_ms}] at ``shape`` = (d_in, d_sae, k, batch)."""
    d, n, k, b = shape
    g = torch.Generator(device=device).manual_seed(0)
    bf = torch.bfloat16
    x = torch.randn(b, d, generator=g, device=device)
    w_enc = torch.randn(d, n, generator=g, device=device) / d**0.5
    w_dec = F.normalize(torch.randn(n, d, generator=g, device=device), dim=1)
    b_enc = torch.randn(n, generator=g, device=device) * 0.1
    x_low, w_low, b_low = x.to(bf), w_enc.to(bf), b_enc.to(bf)
    pre_buf = torch.empty(b, n, dtype=bf, device=device)
    pre = torch.addmm(b_low, x_low, w_low)
    acts, idx = pre.topk(k, dim=1, sorted=False)
    acts = acts.float().relu()
    y = torch.randn(b, d, generator=g, device=device)
    g_y = torch.randn(b, d, generator=g, device=device)
    g_pre = torch.randn(b, k, generator=g, device=device)
    rows = []

    def row(op, ours, alternative):
        rows.append({"op": op, "ours_ms": best_ms(ours, device, repeats), "alternative_ms": best_ms(alternative, device, repeats)})

    row("encoder", lambda: torch.mm(x_low, w_low, out=pre_buf), lambda: torch.addmm(b_low, x_low, w_low, out=pre_buf))
    row("topk", lambda: pre.topk(k, dim=1, sorted=False), lambda: (pre.float() + b_enc).topk(k, dim=1, sorted=False))
    row("decode", lambda: F.embedding_bag(idx, w_dec, per_sample_weights=acts, mode="sum"),
        lambda: torch.bmm(acts.unsqueeze(1), w_dec[idx]).squeeze(1))
    row("decode_back", lambda: sampled_rows(g_y, w_dec, idx), lambda: torch.bmm(w_dec[idx], g_y.unsqueeze(2)).squeeze(2))

    def enc_grad_sparse():
        return LatentRows(idx, n).matmul(g_pre, x).t()

    def enc_grad_dense():
        dense = torch.zeros(b, n, dtype=bf, device=device).scatter_(1, idx, g_pre.to(bf))
        return x_low.t() @ dense

    row("W_enc grad", enc_grad_sparse, enc_grad_dense)

    def dec_grad_index_add():
        out = torch.zeros(n, d, device=device)
        return out.index_add_(0, idx.reshape(-1), (acts.unsqueeze(2) * g_y.unsqueeze(1)).reshape(-1, d))

    row("W_dec grad", lambda: LatentRows(idx, n).matmul(acts, g_y), dec_grad_index_add)

    params = [torch.nn.Parameter(t.clone()) for t in (w_enc, b_enc, w_dec, y.mean(0))]
    for p in params:
        p.grad = torch.randn_like(p)
    fused = torch.optim.Adam(params, lr=1e-3, fused=device.type == "cuda")
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]

    def saeclt_rows():
        for p, (m, v) in zip(params, moments):
            rows_of = (lambda t: t.view(1, -1)) if p.dim() == 1 else (lambda t: t)
            adam_update_torch(rows_of(p.data), rows_of(p.grad), rows_of(m), rows_of(v), 1e-3, 0.9, 0.999, 1e-8, 1.0,
                              project=p.shape == w_dec.shape, normalize=p.shape == w_dec.shape)

    row("adam", fused.step, saeclt_rows)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'op':<12}{'ours ms':>10}{'alt. ms':>10}  faster", "-" * 42]
    for r in rows:
        lines.append(f"{r['op']:<12}{r['ours_ms']:>10.3f}{r['alternative_ms']:>10.3f}  "
                     f"{'ours' if r['ours_ms'] <= r['alternative_ms'] else 'alternative'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="768,24576,32,4096", help="d_in,d_sae,k,batch")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    device = torch.device(args.device)
    print(f"{device} at {shape[0]} -> {shape[1]} latents, k {shape[2]}, batch {shape[3]}")
    print(table(op_timings(shape, device, args.repeats)))


if __name__ == "__main__":
    main()
