"""Source and build of the compiled row-wise top-k kernel (see kernels.py)."""

from __future__ import annotations

import sys

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

// Per row: (1) the max of each block of 16 (branch-free, vectorisable); (2) t0 = the k-th
// largest block max, a lower bound on the row's k-th largest value, since the k largest block
// maxima are k distinct entries; (3) the entries >= t0, found only in blocks whose max >= t0
// (typically k to 2k of them); (4) a partial selection of the k largest among those.
std::vector<torch::Tensor> topk_rows(torch::Tensor x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "topk_rows: expected a contiguous 2-D tensor");
  const int64_t rows = x.size(0), cols = x.size(1);
  TORCH_CHECK(k >= 1 && k <= cols, "topk_rows: k out of range");
  constexpr int64_t BS = 16;
  const int64_t n_blocks = (cols + BS - 1) / BS;
  auto values = torch::empty({rows, k}, x.options());
  auto indices = torch::empty({rows, k}, x.options().dtype(torch::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "topk_rows", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* vp = values.data_ptr<scalar_t>();
    int64_t* ip = indices.data_ptr<int64_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> block_max(n_blocks), scratch(n_blocks);
      std::vector<std::pair<float, int64_t>> cand;
      cand.reserve(4 * k + BS);
      const auto before = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
      };
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * cols;
        for (int64_t b = 0; b < n_blocks; ++b) {
          const int64_t lo = b * BS, hi = std::min(cols, lo + BS);
          float m = static_cast<float>(row[lo]);
          for (int64_t j = lo + 1; j < hi; ++j) { const float v = static_cast<float>(row[j]); m = v > m ? v : m; }
          block_max[b] = m;
        }
        float t0 = -std::numeric_limits<float>::infinity();
        if (n_blocks >= k) {
          scratch = block_max;
          std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
          t0 = scratch[k - 1];
        }
        cand.clear();
        for (int64_t b = 0; b < n_blocks; ++b) {
          if (!(block_max[b] >= t0)) continue;
          const int64_t lo = b * BS, hi = std::min(cols, lo + BS);
          for (int64_t j = lo; j < hi; ++j) {
            const float v = static_cast<float>(row[j]);
            if (v >= t0) cand.emplace_back(v, j);
          }
        }
        if (static_cast<int64_t>(cand.size()) < k) {  // NaNs defeat the bound: take every entry
          cand.clear();
          for (int64_t j = 0; j < cols; ++j) cand.emplace_back(static_cast<float>(row[j]), j);
        }
        std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), before);
        for (int64_t j = 0; j < k; ++j) {
          vp[r * k + j] = row[cand[j].second];  // the stored value itself: exact in every dtype
          ip[r * k + j] = cand[j].second;
        }
      }
    });
  });
  return {values, indices};
}
"""


def build():
    """Compile (once per machine and torch version; cached by torch) and load the kernel."""
    from pathlib import Path

    from torch.utils.cpp_extension import _get_build_directory, load_inline

    name = "saeclt_topk_v3"
    if not list(Path(_get_build_directory(name, verbose=False)).glob("*.so")):
        print("saeclt: building the compiled top-k kernel (once, ~40 s; SAECLT_TOPK=torch skips it)", file=sys.stderr, flush=True)
    module = load_inline(name=name, cpp_sources=[SOURCE], functions=["topk_rows"],
                         extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)

    class Kernel:
        @staticmethod
        def topk_rows(x, k):
            values, indices = module.topk_rows(x, k)
            return values, indices

    return Kernel()
