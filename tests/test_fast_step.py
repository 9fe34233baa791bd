"""The fast TopK step (hand-written backward over the active latents) against the plain
autograd step: the same weights after several steps, exactly in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICES

from sae_clt.dictionaries.dictionary import Dictionary, DictionaryConfig
from sae_clt.kernels import ops as kernels
from sae_clt.kernels.ops import topk_rows
from sae_clt.spec.models import TrainSection
from sae_clt.training.fast_step import FastTopKStep
from sae_clt.training.step import train_step


def _pair(architecture: str, d_in: int, d_out: int, activation: str = "topk"):
    cfg = DictionaryConfig(architecture=architecture, d_in=d_in, d_out=d_out, d_sae=48, activation=activation, k=4,
                           source="a", target="a" if architecture == "sae" else "b")
    model = Dictionary(cfg, seed=0).double()
    torch.manual_seed(0)  # the biases below: independent of the tests run before
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_(0, 0.1)
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("architecture, d_in, d_out", [("sae", 10, 10), ("transcoder", 6, 12)])
@pytest.mark.parametrize("aux_k", [0, 2, 8])  # 2: some rows have more dead latents active than aux_k (a top-k)
@pytest.mark.parametrize("aux_path", ["sparse", "dense"])  # AuxK through the gather/scatter kernels or dense matmuls
@pytest.mark.parametrize("device", [*DEVICES, "cpu-torch"])  # a GPU, and cpu-torch, take the torch versions of the kernels
def test_fast_step_matches_plain_autograd_step_in_float64(architecture, d_in, d_out, aux_k, activation, aux_path, device, monkeypatch):
    if aux_path == "dense" and not aux_k:
        pytest.skip("no AuxK")
    from sae_clt.training import fast_step as fast_step_module

    if device == "cpu-torch":  # the operations a GPU runs, on the CPU
        monkeypatch.setattr(kernels, "_use_kernel", lambda *t: False)
        device = "cpu"

    monkeypatch.setattr(fast_step_module, "DENSE_AUX_RATIO", 0.0 if aux_path == "sparse" else float("inf"))
    plain, fast = (m.to(device) for m in _pair(architecture, d_in, d_out, activation))
    # dead_after_rows small so AuxK has dead latents to work with from the second step.
    cfg = TrainSection(aux_k=aux_k, dead_after_rows=1, grad_clip=0.5)  # silent in a step = dead: AuxK always has work
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2, fused=True) for m in (plain, fast)]
    fast_step = FastTopKStep(fast, opts[1], cfg)
    clocks = [torch.zeros(48, dtype=torch.long, device=device) for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    aux_seen = False
    for _ in range(6):
        x = torch.randn(64, d_in, generator=gen, dtype=torch.float64)
        y = x[:, :d_out] if architecture == "sae" else torch.randn(64, d_out, generator=gen, dtype=torch.float64) + x.sum(1, keepdim=True)
        x, y = x.to(device), y.to(device)
        m_plain = train_step(plain, opts[0], x, y, clocks[0], cfg, True, 1e-2)
        m_fast = fast_step(x, y, clocks[1], 1e-2)
        assert m_fast["loss"] == pytest.approx(m_plain["loss"], rel=1e-10, abs=1e-12)
        assert m_fast["aux_loss"] == pytest.approx(m_plain["aux_loss"], rel=1e-10, abs=1e-12)
        aux_seen |= m_plain["aux_loss"] > 0
    assert torch.equal(clocks[0], clocks[1])
    if activation == "batchtopk":  # rows kept more than k (and, in some, more than the first 4k candidates)
        assert m_fast["l0"] == pytest.approx(4.0) and m_plain["l0"] == pytest.approx(m_fast["l0"])
    if aux_k:
        assert aux_seen, "the test should exercise AuxK"
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape, k", [((37, 3072), 32), ((5, 100), 7), ((3, 20), 20), ((8, 33), 1), ((4, 3072), 300)])  # k 300: the generic kernel
@pytest.mark.parametrize("with_bias", [False, True])
def test_topk_rows_selects_the_same_entries_as_torch_topk_and_copies_out_asked_columns(dtype, shape, k, with_bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).to(dtype)
    bias = torch.randn(shape[1], generator=gen) if with_bias and dtype != torch.float64 else None
    columns = torch.tensor([shape[1] - 1, 0, shape[1] // 2])  # e.g. AuxK's dead latents, copied out in the same pass
    values, indices, picked = topk_rows(x, k, bias, columns=columns)
    scores = x.double() if dtype == torch.float64 else x.float()  # what the kernel ranks: float32 sums
    if bias is not None:
        scores = scores + bias
    assert torch.equal(picked, scores.index_select(1, columns))
    ref_values, ref_indices = scores.topk(k, dim=-1)
    # The same values (bf16 has ties, where either tied entry is a correct choice) ...
    assert torch.equal(values.sort(-1).values, ref_values.sort(-1).values)
    assert torch.equal(scores.gather(1, indices), values)
    assert all(len(set(row)) == k for row in indices.tolist())  # ... at k distinct positions
    if dtype != torch.bfloat16:  # no ties: the very same entries
        assert torch.equal(indices.sort(-1).values, ref_indices.sort(-1).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_rows_finds_the_largest_entries_when_all_of_them_sit_in_the_row_s_second_half(dtype):
    """The compiled top-k bounds the k-th value from the first half of each row only: rows whose
    largest entries all lie in the second half (or all in the first) still get exactly them."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(24, 3072, generator=gen)
    x[:12, 1536:] += 8.0  # every large entry in the second half
    x[12:, :1536] += 8.0  # ... or in the first
    x = x.to(dtype)
    values, indices = topk_rows(x, 32)
    want = x.float().topk(32, dim=-1)
    assert torch.equal(values.sort(-1).values, want.values.sort(-1).values)
    assert bool((indices[:12] >= 1536).all()) and bool((indices[12:] < 1536).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [40, 3072, 20000])  # 20000: more entries per group than 16
def test_topk_rows_ranks_nan_lowest_and_handles_infinities(dtype, cols):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, cols, generator=gen)
    x[1, 3] = float("nan")
    x[2, :] = float("nan")  # every entry NaN: any k positions will do
    x[3, 5] = float("inf")
    x[4, :] = float("-inf")
    x[5, : cols - 3] = float("nan")  # fewer non-NaN entries than k
    x = x.to(dtype)
    values, indices = topk_rows(x, 5)
    def nan_lowest(t):
        return torch.where(t.isnan(), -float("inf"), t)

    want = nan_lowest(x.float()).topk(5, dim=-1).values
    got = nan_lowest(values)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    assert all(len(set(row)) == 5 for row in indices.tolist())
    assert 5 in indices[3].tolist()


def test_compiled_topk_breaks_ties_towards_the_lower_index():
    if not kernels.kernel_available():
        pytest.skip("no compiled kernels on this machine (torch.topk's tie order is unspecified)")
    x = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    _, indices = topk_rows(x, 2)
    assert indices.sort(-1).values.tolist() == [[1, 2], [0, 1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d_out", [9, 48])  # 48: the AVX-512 row loops (multiples of 16), 9: the generic ones
@pytest.mark.parametrize("d_in", [12, 40])  # 40: the 16-latent transposed writes of the encoder gradient and their tails
def test_compiled_decode_and_latent_gradients_match_the_torch_reference(dtype, d_out, d_in):
    if not kernels.kernel_available():
        pytest.skip("no compiled kernels on this machine (the torch reference is what runs)")
    gen = torch.Generator().manual_seed(1)
    n_rows, k, n = 300, 6, 50
    idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(n_rows)])
    acts = torch.relu(torch.randn(n_rows, k, generator=gen, dtype=dtype))  # about half inactive
    W = torch.randn(n, d_out, generator=gen, dtype=dtype)
    bias, y = torch.randn(d_out, generator=gen, dtype=dtype), torch.randn(n_rows, d_out, generator=gen, dtype=dtype)
    x = torch.randn(n_rows, d_in, generator=gen, dtype=dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    got = kernels.decode_backward(idx, acts, W, bias, y, 0.25, want_y_hat=True)
    want = kernels.decode_backward_torch(idx, acts, W, bias, y, 0.25)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)
    g_pre, g_y = want[2], want[1]
    for a, b in zip(kernels.latent_grads(idx, g_pre, x, acts, g_y, n), kernels.latent_grads_torch(idx, g_pre, x, acts, g_y, n)):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("use_kernel", [True, False], ids=["compiled", "torch"])
@pytest.mark.parametrize("d", [24, 32])  # 32: the AVX-512 row loops (multiples of 16), 24: the generic ones
def test_bf16_copies_of_decoder_and_rows_give_the_float32_sums_of_the_rounded_values(use_kernel, d, monkeypatch):
    """The bf16 step gathers from a bf16 copy of W_dec and scatters bf16 copies of x and the error
    gradient (whose rounded values the decoder's backward dot products read too): the result must
    equal float32 arithmetic on those rounded values."""
    if use_kernel and not kernels.kernel_available():
        pytest.skip("no compiled kernels on this machine")
    if not use_kernel:
        monkeypatch.setattr(kernels, "_use_kernel", lambda *t: False)
    gen = torch.Generator().manual_seed(2)
    n_rows, k, n = 200, 5, 40
    idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(n_rows)])
    acts = torch.relu(torch.randn(n_rows, k, generator=gen))
    W, bias = torch.randn(n, d, generator=gen), torch.randn(d, generator=gen)
    y, x = torch.randn(n_rows, d, generator=gen), torch.randn(n_rows, d, generator=gen)
    W_low, x_low = W.to(torch.bfloat16), x.to(torch.bfloat16)
    y_hat, g, g_acts, sq, g_low = kernels.decode_backward(idx, acts, W_low, bias, y, 0.5, low_g=True, want_y_hat=True)
    want = list(kernels.decode_backward_torch(idx, acts, W_low.float(), bias, y, 0.5))
    want[2] = (W_low.float()[idx] * want[1].to(torch.bfloat16).float().unsqueeze(1)).sum(-1) * (acts > 0)
    for a, b in zip((y_hat, g, g_acts, sq), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert g_low.dtype == torch.bfloat16 and torch.equal(g_low, g.to(torch.bfloat16))
    got = kernels.latent_grads(idx, g_acts, x_low, acts, g_low, n)
    assert all(t.dtype == torch.float32 for t in got[:3]) and got[3].dtype == torch.int64
    for a, b in zip(got, kernels.latent_grads_torch(idx, g_acts, x_low.float(), acts, g_low.float(), n)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_decoder_refit_recovers_the_least_squares_decoder_and_keeps_the_codes():
    from sae_clt.training.refit import DecoderRefit

    cfg = DictionaryConfig("sae", 12, 12, 40, "topk", 4, "a", "a")
    model = Dictionary(cfg, seed=0).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 12, generator=gen, dtype=torch.float64)
    true_w = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    true_b = torch.randn(12, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        model.b_dec.normal_(generator=gen)
        values, idx = model.sparse_code(model.pre_acts(x))
        z_before = model.encode(x)
    y = torch.zeros(2000, 40, dtype=torch.float64).scatter(1, idx, values) @ true_w + true_b  # exactly linear in the codes
    refit = DecoderRefit(40, 12)
    for part in range(4):
        rows = slice(500 * part, 500 * (part + 1))
        refit.add(idx[rows], values[rows], y[rows])
    refit.apply(model, ridge=1e-12)
    used = torch.zeros(40, dtype=torch.bool)
    used[idx.reshape(-1)] = True
    torch.testing.assert_close(model.W_dec[used], true_w[used], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.b_dec.detach(), true_b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.encode(x), z_before)  # b_enc absorbed the new b_dec: the codes did not move


@pytest.mark.parametrize("use_kernel", [True, False])
def test_refit_accumulates_the_exact_gram_and_cross_products_of_the_codes(use_kernel, monkeypatch):
    from sae_clt.training.refit import DecoderRefit

    if use_kernel and not kernels.kernel_available():
        pytest.skip("no compiled kernels on this machine")
    if not use_kernel:
        monkeypatch.setattr(kernels, "_KERNEL", False)
    gen = torch.Generator().manual_seed(3)
    n_rows, k, n, d = 300, 5, 30, 7
    idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(n_rows)])
    acts = torch.relu(torch.randn(n_rows, k, generator=gen))
    y = torch.randn(n_rows, d, generator=gen)
    refit = DecoderRefit(n, d)
    refit.add(idx[:100], acts[:100], y[:100], weight=2.0)
    refit.add(idx[100:], acts[100:], y[100:], weight=1.0)
    z = torch.cat([torch.zeros(n_rows, n).scatter(1, idx, acts), torch.ones(n_rows, 1)], dim=1).double()
    w = torch.cat([torch.full((100,), 2.0), torch.ones(200)]).double()
    torch.testing.assert_close(refit.gram.view(n + 1, n + 1), z.t() @ (z * w[:, None]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(refit.cross, z.t() @ (y.double() * w[:, None]), rtol=1e-5, atol=1e-5)


def test_batch_topk_keeps_the_batch_s_k_times_b_largest_even_when_one_row_holds_most_of_them():
    gen = torch.Generator().manual_seed(3)
    pre = torch.randn(16, 200, generator=gen, dtype=torch.float64)
    pre[0] += 10.0  # row 0 holds far more than its 4k first candidates of the batch's top k·B
    k = 5
    values, idx = topk_rows(pre, 4 * k)
    idx, acts = FastTopKStep._batch_topk(pre, None, idx, torch.relu(values), k)
    dense = torch.zeros_like(pre).scatter(1, idx, acts)
    cfg = DictionaryConfig("sae", 4, 4, 200, "batchtopk", k, "a", "a")
    want = Dictionary(cfg, seed=0).double().activate(pre, training=True)
    assert (dense > 0).sum(1)[0] > 4 * k  # the candidates widened
    torch.testing.assert_close(dense, want)


@pytest.mark.parametrize("use_kernel", [True, False], ids=["compiled", "torch"])
def test_fused_weight_update_equals_projection_adam_and_renormalisation(use_kernel, monkeypatch):
    """kernels.adam_update (one pass) against what the plain step does: remove the decoder gradient's
    component along each row, torch.optim.Adam, renormalise the rows; over several steps."""
    if use_kernel and not kernels.kernel_available():
        pytest.skip("no compiled kernels on this machine")
    if not use_kernel:
        monkeypatch.setattr(kernels, "_use_kernel", lambda *t: False)
    gen = torch.Generator().manual_seed(3)
    w0 = torch.nn.functional.normalize(torch.randn(30, 17, generator=gen), dim=1)
    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.Adam([ref], lr=3e-2, betas=(0.8, 0.95), eps=1e-6, fused=True)
    mine, exp_avg, exp_avg_sq = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    low = torch.empty(w0.shape, dtype=torch.bfloat16)
    for step in range(1, 6):
        grad = torch.randn(w0.shape, generator=gen)
        with torch.no_grad():
            ref.grad = grad - (grad * ref).sum(1, keepdim=True) * ref
            opt.step()
            ref /= ref.norm(dim=1, keepdim=True)
        kernels.adam_update(mine, grad, exp_avg, exp_avg_sq, 3e-2, 0.8, 0.95, 1e-6, step, project=True, normalize=True, low=low)
        torch.testing.assert_close(mine, ref.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(low, mine.to(torch.bfloat16))
    torch.testing.assert_close(exp_avg_sq, opt.state[ref]["exp_avg_sq"], rtol=1e-5, atol=1e-8)
    assert mine.norm(dim=1).sub(1).abs().max() < 1e-5


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("device", [*DEVICES, "cpu-torch"])
def test_fast_step_with_fused_update_tracks_the_plain_step_in_float32(precision, device, monkeypatch):
    """Without clipping the fast step updates W_enc and W_dec in one fused pass (and keeps their
    bf16 copies between steps): the weights follow the plain autograd step's."""
    if device == "cpu-torch":  # the operations a GPU runs (the bias in the matmul, top-k in bf16), on the CPU
        monkeypatch.setattr(kernels, "_use_kernel", lambda *t: False)
        device = "cpu"
    plain, fast = (m.float().to(device) for m in _pair("sae", 10, 10))
    cfg = TrainSection(aux_k=8, dead_after_rows=1, precision=precision)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2, fused=True) for m in (plain, fast)]
    step = FastTopKStep(fast, opts[1], cfg)
    if device == "cpu":  # (a GPU takes torch's fused Adam)
        assert step._adam_group is not None, "plain Adam without clipping should take the fused update"
    clocks = [torch.zeros(48, dtype=torch.long, device=device) for _ in range(2)]
    gen = torch.Generator().manual_seed(4)
    # bf16: Adam's first steps are about lr whatever the gradient's size, so bf16 rounding moves
    # weights by ~lr·steps here (the unfused bf16 step differs from the plain one as much)
    tol = {"rtol": 1e-4, "atol": 1e-5} if precision == "fp32" else {"rtol": 0, "atol": 0.05}
    for i in range(5):
        x = torch.randn(64, 10, generator=gen).to(device)
        if precision == "bf16" and i == 2:  # an outside write (as dead-latent resampling does) refreshes the copy
            with torch.no_grad():
                fast.W_dec[0] = plain.W_dec[0] = torch.nn.functional.normalize(torch.randn(10, generator=gen), dim=0).to(device)
        train_step(plain, opts[0], x, x, clocks[0], cfg, True, 1e-2)
        step(x, x, clocks[1], 1e-2)
        if precision == "bf16":
            assert torch.equal(step._bf16("W_dec", fast.W_dec), fast.W_dec.detach().to(torch.bfloat16))
            assert torch.equal(step._bf16("W_enc", fast.W_enc), fast.W_enc.detach().to(torch.bfloat16))
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q, p, msg=name, **tol)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):  # the optimizer state as torch's Adam keeps it (checkpoints)
        assert opts[1].state[getattr(fast, name)]["step"] == opts[0].state[getattr(plain, name)]["step"] == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_positive_entries_are_each_row_s_positive_values_padded_to_the_longest_row(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(40, 57, generator=gen) - 1.0).to(dtype)  # ~16 % positive: rows of different lengths
    x[3] = -1.0  # a row with none
    for compute in (kernels.positive_entries, kernels.positive_entries_torch):
        values, idx, counts = compute(x)
        assert values.shape == idx.shape == (40, int((x > 0).sum(1).max()))
        assert torch.equal(counts, (x > 0).sum(1))
        for r in range(40):
            keep = values[r] > 0
            want = (x[r] > 0).nonzero().squeeze(1)
            assert sorted(idx[r][keep].tolist()) == want.tolist()
            torch.testing.assert_close(values[r][keep], x[r][idx[r][keep]].to(values.dtype), rtol=0, atol=0)
    tiny = torch.full((3, 4), -1.0, dtype=torch.float64)
    tiny[1, :3] = 1e-50  # positive in float64, zero once cast to float32: counted and kept alike
    values, idx, counts = kernels.positive_entries(tiny)
    assert counts.tolist() == [0, 3, 0] and values.shape == (3, 3) and sorted(idx[1].tolist()) == [0, 1, 2]
    values, idx, _ = kernels.positive_entries(torch.full((5, 9), -1.0))  # nothing positive: one padded column
    assert values.shape == (5, 1) and not bool((values > 0).any())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sizes, d", [([30], 16), ([30, 7, 12], 16), ([5, 9], 21)])  # 21: not a multiple of 16
def test_gather_normalize_gives_the_bits_of_torch_normalising_the_concatenated_rows(dtype, sizes, d):
    gen = torch.Generator().manual_seed(1)
    parts = [torch.randn(n, d, generator=gen).mul(3).to(dtype) for n in sizes]
    mean, scale = torch.randn(d, generator=gen), torch.rand(d, generator=gen) + 0.3
    idx = torch.randint(0, sum(sizes), (50,), generator=gen)
    expected = (torch.cat(parts)[idx].to(torch.float32) - mean) / scale
    assert torch.equal(kernels.gather_normalize(parts, idx, mean, scale), expected)
    assert torch.equal(kernels.gather_normalize_torch(parts, idx, mean, scale), expected)
    out = torch.full((50, d), float("nan"))
    assert kernels.gather_normalize(parts, idx, mean, scale, out=out) is out and torch.equal(out, expected)  # into a reused buffer
    if kernels.kernel_available():
        with pytest.raises(RuntimeError, match="out of range"):
            kernels.gather_normalize(parts, torch.tensor([sum(sizes)]), mean, scale)


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sizes, d", [([300], 16), ([100, 7, 250], 21)])  # 21: not a multiple of 16
def test_store_rows_converts_shuffled_rows_as_torch_does_and_sums_them_in_float64(dtype, sizes, d):
    gen = torch.Generator().manual_seed(3)
    parts = [torch.randn(n, d, generator=gen).mul(40) for n in sizes]
    parts[0][2, :5] = 0.0
    parts[0][3, :3] = torch.tensor([7e4, 1e-6, -3e-8])  # float16 overflow and denormals
    idx = torch.randperm(sum(sizes), generator=gen)[: sum(sizes) - 11]
    x = torch.cat(parts)[idx]
    got = kernels.store_rows(parts, idx, dtype)
    if dtype is None:
        assert got.out is None
    else:  # the bits torch's conversion gives
        assert torch.equal(got.out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           x.to(dtype).view(torch.int16 if dtype != torch.float32 else torch.int32))
    x64 = x.double()
    assert torch.allclose(got.col_sum, x64.sum(0), rtol=1e-12, atol=1e-9)
    assert torch.allclose(got.col_sumsq, (x64 * x64).sum(0), rtol=1e-12)
    assert got.norm_sum == pytest.approx(float(x64.norm(dim=1).sum()), rel=1e-12)
    assert got.zeros == int((x == 0).sum()) >= 5 and got.nonfinite_rows == 0
    whole = kernels.store_rows(parts, None, None)  # no index: every row in order
    assert torch.allclose(whole.col_sum, torch.cat(parts).double().sum(0), rtol=1e-12, atol=1e-9)


def test_store_rows_counts_rows_with_nan_or_inf_and_sums_the_same_bits_for_any_thread_count():
    gen = torch.Generator().manual_seed(4)
    parts = [torch.randn(2000, 32, generator=gen), torch.randn(900, 32, generator=gen)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.store_rows(parts, None, torch.float16)
        torch.set_num_threads(max(2, threads))
        many = kernels.store_rows(parts, None, torch.float16)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.col_sum, many.col_sum) and torch.equal(one.col_sumsq, many.col_sumsq)
    assert one.norm_sum == many.norm_sum
    parts[0][10, 3], parts[1][5, 0], parts[1][5, 1] = float("nan"), float("inf"), -float("inf")
    assert kernels.store_rows(parts, torch.arange(2900).flip(0), torch.bfloat16).nonfinite_rows == 2
    assert kernels.store_rows_torch(parts, None, None).nonfinite_rows == 2


def test_center_bf16_rounds_exactly_as_torch_subtracting_into_bf16():
    gen = torch.Generator().manual_seed(2)
    x, b = torch.randn(70, 40, generator=gen) * 10, torch.randn(40, generator=gen)
    x[0, :4] = torch.tensor([float("inf"), -float("inf"), 1e-40, 3.0e38])  # infinities, a denormal, overflow to inf
    x[1, 0] = float("nan")
    got = kernels.center_bf16(x, b, torch.empty(70, 40, dtype=torch.bfloat16))
    want = torch.sub(x, b, out=torch.empty(70, 40, dtype=torch.bfloat16))
    assert bool(got[1, 0].isnan()) and bool(want[1, 0].isnan())
    got[1, 0] = want[1, 0] = 0
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dense_auxk_matches_the_sparse_auxk_kernels(precision, monkeypatch):
    """Where many dead latents are active per row, AuxK runs as four dense matmuls (bf16 ones in
    bf16): its loss and gradients match the gather/scatter kernels' (float32) to float32 / bf16
    precision, and the step takes the dense path only when it is the cheaper one."""
    from sae_clt.training import fast_step

    gen = torch.Generator().manual_seed(3)
    n_rows, n_dead, d = 256, 24, 32
    pre_dead = torch.randn(n_rows, n_dead, generator=gen) + 0.3  # ~60 % positive: dense is cheaper
    w_dead = torch.nn.functional.normalize(torch.randn(n_dead, d, generator=gen), dim=1)
    g_main = torch.randn(n_rows, d, generator=gen) * 1e-2
    x_in = torch.randn(n_rows, d, generator=gen)
    with monkeypatch.context() as patch:
        patch.setattr(fast_step, "DENSE_AUX_RATIO", 0.0)  # never dense: the sparse kernels
        want = fast_step._aux_k(w_dead, pre_dead, g_main, 1e-2, x_in, 64, 2.0)
    low = torch.bfloat16 if precision == "bf16" else torch.float32
    got = fast_step._aux_k_dense(w_dead.to(low), pre_dead, g_main, 1e-2, x_in.to(low), 2.0)
    for name, a, b in zip(("loss", "g_enc", "g_bias", "g_dec"), got, want):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        assert float((a - b).norm() / b.norm()) < (2e-2 if precision == "bf16" else 1e-5), name
    calls = []
    dense = fast_step._aux_k_dense
    monkeypatch.setattr(fast_step, "_aux_k_dense", lambda *args: calls.append(1) or dense(*args))
    fast_step._aux_k(w_dead.to(low), pre_dead, g_main, 1e-2, x_in.to(low), 64, 2.0)
    assert calls, "many positives per row: the dense path"
    calls.clear()
    fast_step._aux_k(w_dead.to(low), pre_dead - 3.0, g_main, 1e-2, x_in.to(low), 64, 2.0)
    assert not calls, "a few positives per row: the sparse kernels"
    fast_step._aux_k(w_dead.to(low), pre_dead, g_main, 1e-2, x_in.to(low), 4, 2.0)
    assert not calls, "rows with more positives than aux_k need the top-k selection"


@pytest.mark.parametrize("given_row_errors", [False, True])
def test_sparse_auxk_on_the_rows_where_a_dead_latent_is_active_equals_the_whole_batch_in_float64(given_row_errors):
    """Rows where no dead latent is active go round the AuxK kernels (their loss is the residual's
    squared norm, their gradients zero): loss and gradients equal the dense computation over every
    row, in float64."""
    from sae_clt.training import fast_step

    gen = torch.Generator().manual_seed(5)
    n_rows, n_dead, d = 300, 12, 24
    pre_dead = torch.randn(n_rows, n_dead, generator=gen, dtype=torch.float64) - 2.5  # ~7 % of rows live
    w_dead = torch.nn.functional.normalize(torch.randn(n_dead, d, generator=gen, dtype=torch.float64), dim=1)
    g_main = torch.randn(n_rows, d, generator=gen, dtype=torch.float64) * 1e-2
    x_in = torch.randn(n_rows, d, generator=gen, dtype=torch.float64)
    live = int((pre_dead > 0).any(1).sum())
    assert 0 < live < 0.75 * n_rows
    row_sq_err = (g_main / 1e-2).square().sum(1) if given_row_errors else None
    got = fast_step._aux_k(w_dead, pre_dead, g_main, 1e-2, x_in, 64, 2.0, row_sq_err=row_sq_err)
    want = fast_step._aux_k_dense(w_dead, pre_dead, g_main, 1e-2, x_in, 2.0)
    for name, a, b in zip(("loss", "g_enc", "g_bias", "g_dec"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)


def test_a_later_process_loads_the_built_kernels_without_torch_s_build_tooling():
    """Once built, the kernels' library is imported directly (torch.utils.cpp_extension and
    setuptools cost ~0.15 s to import at every stage's start otherwise)."""
    import subprocess
    import sys

    if not kernels.kernel_available():  # builds them in this process if need be
        pytest.skip("no compiled kernels on this machine")
    code = ("import sys, torch\n"
            "from sae_clt.kernels import ops as kernels\n"
            "assert kernels.kernel_available()\n"
            "print('torch.utils.cpp_extension' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
