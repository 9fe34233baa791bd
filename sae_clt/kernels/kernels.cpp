
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

// bf16 -> float by a shift (what the hardware conversion does); vectorises.
inline float load_float(const c10::BFloat16* p, int64_t j) {
  uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[j]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float load_float(const float* p, int64_t j) { return p[j]; }
inline double load_float(const double* p, int64_t j) { return p[j]; }

// float -> bf16 bits, rounded to nearest even as c10::BFloat16 (and so torch) rounds, NaN as its
// 0x7FC0; in a form the compiler vectorises (c10::BFloat16's constructor goes one value at a time:
// converting the weights' bf16 copies that way was ~1 ms of each step's Adam).
inline uint16_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return v != v ? uint16_t(0x7FC0) : rounded;
}
inline void store_bf16_row(c10::BFloat16* out, const float* in, int64_t d) {
  uint16_t* o = reinterpret_cast<uint16_t*>(out);
_Pragma("omp simd")
  for (int64_t i = 0; i < d; ++i) o[i] = bf16_bits(in[i]);
}

// Row primitives of the gathers, over m decoder rows wr[q] (float32/float64 or a bf16 copy), d
// entries each:  h += Σ_q a[q]·wr[q]  and  out[q] = g·wr[q].  The generic versions go row by row
// and leave vectorisation to the compiler. With AVX-512 (d a multiple of 16) the loops run the
// other way round: for each 16-entry chunk of h or g, the products of all m rows, with several
// vector accumulators. The loads of different rows are then independent (the row-by-row order
// chained them through h, and the gathers waited on memory one row after another), and each dot
// product is reduced once at the end.
template <typename T, typename TW>
void gather_rows(T* h, const T* a, const TW* const* wr, int64_t m, int64_t d) {
  for (int64_t q = 0; q < m; ++q) {
    const TW* w = wr[q];
    const T aq = a[q];
_Pragma("omp simd")
    for (int64_t i = 0; i < d; ++i) h[i] += aq * static_cast<T>(load_float(w, i));
  }
}
template <typename T, typename TW>
void dot_rows(const T* g, const TW* const* wr, int64_t m, int64_t d, T* out) {
  for (int64_t q = 0; q < m; ++q) {
    const TW* w = wr[q];
    T dot = 0;
_Pragma("omp simd reduction(+ : dot)")
    for (int64_t i = 0; i < d; ++i) dot += g[i] * static_cast<T>(load_float(w, i));
    out[q] = dot;
  }
}
#ifdef __AVX512F__
inline __m512 load16_ps(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16_ps(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
template <typename TW>
void gather_rows_avx512(float* h, const float* a, const TW* const* wr, int64_t m, int64_t d) {
  for (int64_t i = 0; i < d; i += 16) {
    __m512 s0 = _mm512_loadu_ps(h + i), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    int64_t q = 0;
    for (; q + 4 <= m; q += 4) {
      s0 = _mm512_fmadd_ps(_mm512_set1_ps(a[q]), load16_ps(wr[q] + i), s0);
      s1 = _mm512_fmadd_ps(_mm512_set1_ps(a[q + 1]), load16_ps(wr[q + 1] + i), s1);
      s2 = _mm512_fmadd_ps(_mm512_set1_ps(a[q + 2]), load16_ps(wr[q + 2] + i), s2);
      s3 = _mm512_fmadd_ps(_mm512_set1_ps(a[q + 3]), load16_ps(wr[q + 3] + i), s3);
    }
    for (; q < m; ++q) s0 = _mm512_fmadd_ps(_mm512_set1_ps(a[q]), load16_ps(wr[q] + i), s0);
    _mm512_storeu_ps(h + i, _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
  }
}
template <typename TW>
void dot_rows_avx512(const float* g, const TW* const* wr, int64_t m, int64_t d, float* out) {
  constexpr int64_t U = 8;  // rows at a time: 8 independent accumulators keep both FMA units busy
  int64_t q = 0;
  for (; q + U <= m; q += U) {
    __m512 acc[U];
    for (int64_t u = 0; u < U; ++u) acc[u] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
      const __m512 gv = _mm512_loadu_ps(g + i);
      for (int64_t u = 0; u < U; ++u) acc[u] = _mm512_fmadd_ps(gv, load16_ps(wr[q + u] + i), acc[u]);
    }
    for (int64_t u = 0; u < U; ++u) out[q + u] = _mm512_reduce_add_ps(acc[u]);
  }
  for (; q < m; ++q) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(g + i), load16_ps(wr[q] + i), acc);
    out[q] = _mm512_reduce_add_ps(acc);
  }
}
#ifdef __AVX512BF16__
// dot_rows for a bf16 g against bf16 rows: the hardware's bf16 dot product (32 products, exact
// in float32, per instruction; float32 sums) instead of converting 16 at a time.
inline void dot_rows_bf16(const c10::BFloat16* g, const c10::BFloat16* const* wr, int64_t m, int64_t d, float* out) {
  constexpr int64_t U = 8;
  const auto load = [](const c10::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(p)); };
  int64_t q = 0;
  for (; q + U <= m; q += U) {
    __m512 acc[U];
    for (int64_t u = 0; u < U; ++u) acc[u] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 32) {
      const __m512bh gv = load(g + i);
      for (int64_t u = 0; u < U; ++u) acc[u] = _mm512_dpbf16_ps(acc[u], gv, load(wr[q + u] + i));
    }
    for (int64_t u = 0; u < U; ++u) out[q + u] = _mm512_reduce_add_ps(acc[u]);
  }
  for (; q < m; ++q) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 32) acc = _mm512_dpbf16_ps(acc, load(g + i), load(wr[q] + i));
    out[q] = _mm512_reduce_add_ps(acc);
  }
}
#endif
#define SAECLT_ROWS_AVX512(TW)                                                                                  \
  template <> void gather_rows<float, TW>(float* h, const float* a, const TW* const* wr, int64_t m, int64_t d) { \
    if (d % 16 == 0) { gather_rows_avx512(h, a, wr, m, d); return; }                                           \
    for (int64_t q = 0; q < m; ++q)                                                                            \
      for (int64_t i = 0; i < d; ++i) h[i] += a[q] * load_float(wr[q], i);                                     \
  }                                                                                                            \
  template <> void dot_rows<float, TW>(const float* g, const TW* const* wr, int64_t m, int64_t d, float* out) {  \
    if (d % 16 == 0) { dot_rows_avx512(g, wr, m, d, out); return; }                                            \
    for (int64_t q = 0; q < m; ++q) {                                                                          \
      float dot = 0;                                                                                           \
      for (int64_t i = 0; i < d; ++i) dot += g[i] * load_float(wr[q], i);                                     \
      out[q] = dot;                                                                                            \
    }                                                                                                          \
  }
SAECLT_ROWS_AVX512(float)
SAECLT_ROWS_AVX512(c10::BFloat16)
#undef SAECLT_ROWS_AVX512
#endif

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// The entries of v >= t (values and positions, in order); returns how many.
template <typename A>
int64_t gather_ge(const A* v, int64_t cols, A t, A* cv, int64_t* ci) {
  int64_t n = 0;
  for (int64_t j = 0; j < cols; ++j) { cv[n] = v[j]; ci[n] = j; n += v[j] >= t; }
  return n;
}
#ifdef __AVX512F__
template <>
int64_t gather_ge<float>(const float* v, int64_t cols, float t, float* cv, int64_t* ci) {
  int64_t n = 0, j = 0;
  const __m512 tv = _mm512_set1_ps(t);
  for (; j + 16 <= cols; j += 16) {
    uint32_t mask = _mm512_cmp_ps_mask(_mm512_loadu_ps(v + j), tv, _CMP_GE_OQ);
    while (mask) {
      const int b = __builtin_ctz(mask);
      cv[n] = v[j + b];
      ci[n++] = j + b;
      mask &= mask - 1;
    }
  }
  for (; j < cols; ++j) { cv[n] = v[j]; ci[n] = j; n += v[j] >= t; }
  return n;
}
#endif

// Row-wise top-k. The row is viewed as G strided groups {g, g + G, g + 2G, ...}: (1) the max of
// every group by vertical (SIMD) maxima over contiguous chunks of G; (2) a threshold t0 such that
// at least k group maxima are >= t0 (bisection on the group maxima; at most a few more than k),
// a lower bound on the row's k-th largest value since those maxima are distinct entries; (3) the
// entries >= t0 (one SIMD compare per 16 entries, typically k to 1.2k of them); (4) the k largest
// of those: by bisection on the candidates' values, or a partial sort where ties make that
// ambiguous (ties go to the lower index, as torch.topk).
// ``sel`` (n_sel column indices, may be null): those columns' scores are copied out too, into
// ``sp`` [rows, n_sel], while the row is in cache (AuxK's dead latents, without a second pass).
template <typename T>
void topk_impl(const T* xp, const float* bias, int64_t rows, int64_t cols, int64_t k,
               typename Acc<T>::type* vp, int64_t* ip, const int64_t* sel = nullptr, int64_t n_sel = 0,
               typename Acc<T>::type* sp = nullptr) {
  using A = typename Acc<T>::type;
  constexpr int64_t PER_GROUP = 16;
  const int64_t G = std::max<int64_t>(k, (cols + PER_GROUP - 1) / PER_GROUP);
  const int64_t full = cols / G;  // chunks of G entries that are complete
  // (Lambdas capture by value throughout: captured by reference, the scalars could alias the
  // rows written through the pointers, and the compiler reloads them in every inner loop.)
  at::parallel_for(0, rows, 16, [=](int64_t begin, int64_t end) {
    std::vector<A> row(cols), gmax(G), cv(cols + 16);
    std::vector<int64_t> ci(cols + 16);
    std::vector<std::pair<A, int64_t>> cand;
    const auto before = [](const std::pair<A, int64_t>& a, const std::pair<A, int64_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    const A neg_inf = -std::numeric_limits<A>::infinity();
    for (int64_t r = begin; r < end; ++r) {
      const T* src = xp + r * cols;
      A* v = row.data();
      if (bias) {
        for (int64_t j = 0; j < cols; ++j) v[j] = static_cast<A>(load_float(src, j)) + static_cast<A>(bias[j]);
      } else {
        for (int64_t j = 0; j < cols; ++j) v[j] = static_cast<A>(load_float(src, j));
      }
      for (int64_t q = 0; q < n_sel; ++q) sp[r * n_sel + q] = v[sel[q]];
      A* m = gmax.data();
      for (int64_t g = 0; g < G; ++g) m[g] = v[g];
      for (int64_t c = 1; c < full; ++c) {
        const A* chunk = v + c * G;
        for (int64_t g = 0; g < G; ++g) m[g] = chunk[g] > m[g] ? chunk[g] : m[g];
      }
      for (int64_t j = full * G; j < cols; ++j) m[j - full * G] = v[j] > m[j - full * G] ? v[j] : m[j - full * G];
      // (2) bisection for t0 on the group maxima: count(m >= lo) >= k holds throughout.
      A lo = m[0], hi = m[0];
      for (int64_t g = 1; g < G; ++g) { lo = m[g] < lo ? m[g] : lo; hi = m[g] > hi ? m[g] : hi; }
      const bool finite = std::isfinite(lo) && std::isfinite(hi);
      if (finite) {
        for (int it = 0; it < 30; ++it) {
          const A mid = lo + (hi - lo) / 2;
          if (!(mid > lo && mid < hi)) break;
          int64_t c = 0;
          for (int64_t g = 0; g < G; ++g) c += m[g] >= mid;
          if (c >= k) { lo = mid; if (c <= k + 4) break; } else { hi = mid; }
        }
      }
      const A t0 = finite ? lo : neg_inf;
      // (3) the candidates: entries >= t0
      int64_t n = gather_ge(v, cols, t0, cv.data(), ci.data());
      if (n < k) {  // NaNs defeat the bound: take every entry (NaN ranks lowest)
        for (int64_t j = 0; j < cols; ++j) { cv[j] = std::isnan(v[j]) ? neg_inf : v[j]; ci[j] = j; }
        n = cols;
      }
      // (4) exactly the k largest: bisection on the candidates' values, else a partial sort
      if (n > k) {
        A l2 = t0, h2 = t0;
        for (int64_t q = 0; q < n; ++q) h2 = cv[q] > h2 ? cv[q] : h2;
        int64_t c = n;
        if (std::isfinite(l2) && std::isfinite(h2)) {
          for (int it = 0; it < 64 && c != k; ++it) {
            const A mid = l2 + (h2 - l2) / 2;
            if (!(mid > l2 && mid < h2)) break;
            int64_t cm = 0;
            for (int64_t q = 0; q < n; ++q) cm += cv[q] >= mid;
            if (cm >= k) { l2 = mid; c = cm; } else { h2 = mid; }
          }
        }
        if (c == k) {
          int64_t w = 0;
          for (int64_t q = 0; q < n; ++q) { cv[w] = cv[q]; ci[w] = ci[q]; w += cv[q] >= l2; }
          n = w;
        }
        if (n != k) {  // ties at the boundary
          cand.resize(n);
          for (int64_t q = 0; q < n; ++q) cand[q] = {cv[q], ci[q]};
          std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), before);
          for (int64_t q = 0; q < k; ++q) { cv[q] = cand[q].first; ci[q] = cand[q].second; }
        }
      }
      for (int64_t j = 0; j < k; ++j) {
        vp[r * k + j] = cv[j];
        ip[r * k + j] = ci[j];
      }
    }
  });
}

#ifdef __AVX512F__
// 16 scores as float32 from float32 or bf16 (a bf16 is the top half of a float32); masked tail.
inline __m512 load16_masked(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16_masked(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, reinterpret_cast<const void*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : left > 0 ? __mmask16((1u << left) - 1) : __mmask16(0); }

// topk_impl's selection for float32 scores with AVX-512, with 16·NG groups (NG <= 16). The scores are
// never written out: pass 1 converts (and adds the bias to) 16 entries at a time and keeps the
// NG·16 group maxima of the row's first half in registers; the bisection for t0 counts by mask
// popcounts and starts from the previous row's threshold (rows are alike: a few iterations);
// pass 2 converts the whole row and compress-stores the candidates >= t0. NaN entries rank lowest, as in topk_impl.
template <typename T, int NG>
void topk_avx512(const T* xp, const float* bias, int64_t rows, int64_t cols, int64_t k, float* vp, int64_t* ip,
                 const int64_t* sel, int64_t n_sel, float* sp) {
  constexpr int64_t G = 16 * NG;
  const int64_t full = cols / G, body = cols / 16 * 16;
  // The group maxima come from the first half of the row only (where it holds at least 4 chunks):
  // any k distinct entries give a valid bound; from half the row it keeps more candidates, and
  // the first pass costs half: the kernel 0.82-0.85x (a quarter of the row: no faster).
  const int64_t scanned = full >= 4 ? full / 2 : full;
  const int64_t live = std::min<int64_t>(G, cols);  // groups holding an entry
  at::parallel_for(0, rows, 16, [=](int64_t begin, int64_t end) {
    std::vector<float> cv(cols + 16);
    std::vector<int32_t> ci(cols + 16);
    std::vector<std::pair<float, int64_t>> cand;
    const auto before = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    const float neg_inf = -std::numeric_limits<float>::infinity();
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const auto scores = [=](const T* src, int64_t j, __mmask16 mk) {
      __m512 s = load16_masked(src + j, mk);
      return bias ? _mm512_add_ps(s, _mm512_maskz_loadu_ps(mk, bias + j)) : s;
    };
    float guess = std::numeric_limits<float>::quiet_NaN();
    for (int64_t r = begin; r < end; ++r) {
      const T* src = xp + r * cols;
      __m512 m[NG];
      for (int g = 0; g < NG; ++g) m[g] = _mm512_set1_ps(neg_inf);
      for (int64_t c = 0; c < scanned; ++c)  // max(s, m): a NaN score leaves m as it was
        for (int g = 0; g < NG; ++g) m[g] = _mm512_max_ps(scores(src, c * G + 16 * g, 0xFFFF), m[g]);
      for (int g = 0; scanned == full && g < NG; ++g) {
        const int64_t j = full * G + 16 * g;
        const __mmask16 mk = tail_mask(cols - j);
        if (mk) m[g] = _mm512_mask_max_ps(m[g], mk, scores(src, j, mk), m[g]);
      }
      __m512 vlo = _mm512_set1_ps(std::numeric_limits<float>::infinity()), vhi = _mm512_set1_ps(neg_inf);
      for (int g = 0; g < NG; ++g) {
        const __mmask16 mk = tail_mask(live - 16 * g);
        vlo = _mm512_mask_min_ps(vlo, mk, m[g], vlo);
        vhi = _mm512_mask_max_ps(vhi, mk, m[g], vhi);
      }
      float lo = _mm512_reduce_min_ps(vlo), hi = _mm512_reduce_max_ps(vhi);
      const bool finite = std::isfinite(lo) && std::isfinite(hi);
      if (finite) {  // count(maxima >= lo) >= k throughout
        float mid = (guess > lo && guess < hi) ? guess : lo + (hi - lo) / 2;
        for (int it = 0; it < 40 && mid > lo && mid < hi; ++it) {
          const __m512 t = _mm512_set1_ps(mid);
          int64_t c = 0;
          for (int g = 0; g < NG; ++g) c += __builtin_popcount(_mm512_cmp_ps_mask(m[g], t, _CMP_GE_OQ));
          if (c >= k) { lo = mid; if (c <= k + 4) break; } else { hi = mid; }
          mid = lo + (hi - lo) / 2;
        }
        guess = lo;
      }
      const float t0 = finite ? lo : neg_inf;
      int64_t n = 0;
      const __m512 tv = _mm512_set1_ps(t0);
      const auto keep = [&](int64_t j, __mmask16 mk, bool all) {  // compress-store entries >= t0 (all: every entry)
        __m512 s = scores(src, j, mk);
        __mmask16 hit = mk;
        if (all) s = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q), s, _mm512_set1_ps(neg_inf));
        else hit = _mm512_mask_cmp_ps_mask(mk, s, tv, _CMP_GE_OQ);
        // compress in a register, then a full 16-lane store (cv, ci have 16 entries of slack): the
        // memory-destination compress-store is microcoded on AMD Zen 4 (~100+ cycles each), and
        // was most of this kernel's time there. No branch on an empty mask: which chunks hold
        // candidates is unpredictable, and the mispredictions cost more than the stores.
        _mm512_storeu_ps(cv.data() + n, _mm512_maskz_compress_ps(hit, s));
        _mm512_storeu_si512(ci.data() + n, _mm512_maskz_compress_epi32(hit, _mm512_add_epi32(lane, _mm512_set1_epi32(int32_t(j)))));
        n += __builtin_popcount(hit);
      };
      for (int64_t j = 0; j < body; j += 16) keep(j, 0xFFFF, false);
      if (body < cols) keep(body, tail_mask(cols - body), false);
      // the selected columns' scores, read now that the row is in L1 (read first, each one missed
      // the cache: 0.6 ms of the kernel's 2.7 with 100 columns)
      for (int64_t q = 0; q < n_sel; ++q)
        sp[r * n_sel + q] = load_float(src, sel[q]) + (bias ? bias[sel[q]] : 0.0f);
      if (n < k) {  // NaNs defeat the bound: take every entry (NaN ranks lowest)
        n = 0;
        for (int64_t j = 0; j < body; j += 16) keep(j, 0xFFFF, true);
        if (body < cols) keep(body, tail_mask(cols - body), true);
      }
      if (n > k && std::isfinite(cv[0])) {  // a threshold keeping exactly k candidates, by bisection on
        // their values with SIMD counts (the scalar loops below stay for ties that make exactly k impossible)
        const int64_t chunks = (n + 15) / 16;
        const auto count_ge = [&](float t) {
          const __m512 tv2 = _mm512_set1_ps(t);
          int64_t c = 0;
          for (int64_t q = 0; q < chunks; ++q)
            c += __builtin_popcount(_mm512_mask_cmp_ps_mask(tail_mask(n - 16 * q), _mm512_loadu_ps(cv.data() + 16 * q), tv2, _CMP_GE_OQ));
          return c;
        };
        __m512 vmin = _mm512_set1_ps(std::numeric_limits<float>::infinity()), vmax = _mm512_set1_ps(neg_inf);
        for (int64_t q = 0; q < chunks; ++q) {
          const __mmask16 mk = tail_mask(n - 16 * q);
          vmin = _mm512_mask_min_ps(vmin, mk, _mm512_loadu_ps(cv.data() + 16 * q), vmin);
          vmax = _mm512_mask_max_ps(vmax, mk, _mm512_loadu_ps(cv.data() + 16 * q), vmax);
        }
        float blo = _mm512_reduce_min_ps(vmin), bhi = _mm512_reduce_max_ps(vmax);  // count(>= blo) = n > k
        bool found = false;
        if (std::isfinite(blo) && std::isfinite(bhi)) {
          for (int it = 0; it < 64; ++it) {
            const float mid = blo + (bhi - blo) / 2;
            if (!(mid > blo && mid < bhi)) break;
            const int64_t c = count_ge(mid);
            if (c == k) { blo = mid; found = true; break; }
            if (c > k) blo = mid; else bhi = mid;
          }
          if (!found && count_ge(bhi) == k) { blo = bhi; found = true; }
        }
        if (found) {  // compact the k entries >= blo in place (each store lands on entries already read)
          const __m512 tv2 = _mm512_set1_ps(blo);
          int64_t w = 0;
          for (int64_t q = 0; q < chunks; ++q) {
            const __m512 v = _mm512_loadu_ps(cv.data() + 16 * q);
            const __m512i ix = _mm512_loadu_si512(ci.data() + 16 * q);
            const __mmask16 hit = _mm512_mask_cmp_ps_mask(tail_mask(n - 16 * q), v, tv2, _CMP_GE_OQ);
            _mm512_storeu_ps(cv.data() + w, _mm512_maskz_compress_ps(hit, v));
            _mm512_storeu_si512(ci.data() + w, _mm512_maskz_compress_epi32(hit, ix));
            w += __builtin_popcount(hit);
          }
          n = w;
        }
      }
      if (n > k && n - k <= 16) {  // drop the smallest (the highest index among equals), one at a time
        for (; n > k; --n) {
          int64_t w = 0;
          for (int64_t q = 1; q < n; ++q)
            if (cv[q] < cv[w] || (cv[q] == cv[w] && ci[q] > ci[w])) w = q;
          cv[w] = cv[n - 1];
          ci[w] = ci[n - 1];
        }
      } else if (n > k) {
        cand.resize(n);
        for (int64_t q = 0; q < n; ++q) cand[q] = {cv[q], ci[q]};
        std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), before);
        for (int64_t q = 0; q < k; ++q) { cv[q] = cand[q].first; ci[q] = int32_t(cand[q].second); }
      }
      for (int64_t j = 0; j < k; ++j) {
        vp[r * k + j] = cv[j];
        ip[r * k + j] = ci[j];
      }
    }
  });
}
#endif

}  // namespace

// (values, indices) of the k largest entries of each row of x (+ bias, when bias is defined).
// Values are float32 (float64 for float64 input); order within a row is unspecified. With
// ``columns``, a third result holds those columns of x (+ bias) as [rows, len(columns)].
std::vector<torch::Tensor> topk_rows(torch::Tensor x, int64_t k, c10::optional<torch::Tensor> bias,
                                     c10::optional<torch::Tensor> columns) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "topk_rows: expected a contiguous 2-D tensor");
  const int64_t rows = x.size(0), cols = x.size(1);
  TORCH_CHECK(k >= 1 && k <= cols, "topk_rows: k out of range");
  const bool dbl = x.scalar_type() == at::kDouble;
  auto values = torch::empty({rows, k}, x.options().dtype(dbl ? at::kDouble : at::kFloat));
  auto indices = torch::empty({rows, k}, x.options().dtype(at::kLong));
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == cols, "topk_rows: bias must have one entry per column");
  }
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  int64_t* ip = indices.data_ptr<int64_t>();
  torch::Tensor sel, picked;
  const int64_t* selp = nullptr;
  if (columns.has_value() && columns->defined()) {
    sel = columns->to(at::kLong).contiguous();
    TORCH_CHECK(sel.dim() == 1, "topk_rows: columns must be 1-D");
    TORCH_CHECK(sel.numel() == 0 || (sel.min().item<int64_t>() >= 0 && sel.max().item<int64_t>() < cols),
                "topk_rows: column index out of range");
    selp = sel.data_ptr<int64_t>();
    picked = torch::empty({rows, sel.numel()}, values.options());
  }
  const int64_t n_sel = sel.defined() ? sel.numel() : 0;
  float* spf = picked.defined() && x.scalar_type() != at::kDouble ? picked.data_ptr<float>() : nullptr;
#ifdef __AVX512F__
  // groups: as many as topk_impl would use (16 entries each, at least k), at most 256
  const int64_t NG = (std::max<int64_t>(k, std::min<int64_t>(256, (cols + 15) / 16)) + 15) / 16;
  if (NG <= 16 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat)) {
    const bool low = x.scalar_type() == at::kBFloat16;
    float* vpf = values.data_ptr<float>();
    switch (NG) {
#define SAECLT_TOPK_CASE(N)                                                                                          \
      case N:                                                                                                        \
        if (low) topk_avx512<c10::BFloat16, N>(x.data_ptr<c10::BFloat16>(), bp, rows, cols, k, vpf, ip, selp, n_sel, spf); \
        else topk_avx512<float, N>(x.data_ptr<float>(), bp, rows, cols, k, vpf, ip, selp, n_sel, spf);                \
        break;
      SAECLT_TOPK_CASE(1) SAECLT_TOPK_CASE(2) SAECLT_TOPK_CASE(3) SAECLT_TOPK_CASE(4) SAECLT_TOPK_CASE(5)
      SAECLT_TOPK_CASE(6) SAECLT_TOPK_CASE(7) SAECLT_TOPK_CASE(8) SAECLT_TOPK_CASE(9) SAECLT_TOPK_CASE(10)
      SAECLT_TOPK_CASE(11) SAECLT_TOPK_CASE(12) SAECLT_TOPK_CASE(13) SAECLT_TOPK_CASE(14) SAECLT_TOPK_CASE(15)
      SAECLT_TOPK_CASE(16)
#undef SAECLT_TOPK_CASE
    }
    if (picked.defined()) return {values, indices, picked};
    return {values, indices};
  }
#endif
  switch (x.scalar_type()) {
    case at::kBFloat16:
      topk_impl(x.data_ptr<c10::BFloat16>(), bp, rows, cols, k, values.data_ptr<float>(), ip, selp, n_sel, spf); break;
    case at::kFloat:
      topk_impl(x.data_ptr<float>(), bp, rows, cols, k, values.data_ptr<float>(), ip, selp, n_sel, spf); break;
    case at::kDouble:
      TORCH_CHECK(bp == nullptr, "topk_rows: no fused bias for float64");
      topk_impl(x.data_ptr<double>(), nullptr, rows, cols, k, values.data_ptr<double>(), ip, selp, n_sel,
                picked.defined() ? picked.data_ptr<double>() : nullptr); break;
    default: TORCH_CHECK(false, "topk_rows: unsupported dtype");
  }
  if (picked.defined()) return {values, indices, picked};
  return {values, indices};
}

// For each row b:  y_hat[b] = bias + sum_j acts[b,j] W[idx[b,j]];  g[b] = scale (y_hat[b] - sign y[b]);
// g_acts[b,j] = g[b] . W[idx[b,j]] where acts[b,j] > 0, else 0;  sq_err[b] = |y_hat[b] - sign y[b]|^2.
// (sign lets AuxK fit the residual y - y_hat given the main loss's scaled error, without a pass to negate it.)
// Inactive entries (acts <= 0) are skipped. One pass per row: the k decoder rows it gathers stay
// in L1 from the forward sum to the backward dot products. (Cutting W into L2-sized ranges of
// rows, one pass each, was measured slower here once the gathers ran chunk-major.)
template <typename T, typename TW>
void decode_backward_impl(const int64_t* ip, const T* ap, const TW* wp, const T* bp, const T* yp, int64_t rows, int64_t k,
                          int64_t d, T s, T ys, T* hp, T* gp, c10::BFloat16* glp, T* gap, T* sp) {
  at::parallel_for(0, rows, 32, [=](int64_t begin, int64_t end) {
    std::vector<const TW*> wr(k);
    std::vector<int64_t> pos(k);
    std::vector<T> av(k), dots(k), grounded(glp ? d : 0);
    for (int64_t r = begin; r < end; ++r) {
      int64_t m = 0;  // the row's active entries
      for (int64_t j = 0; j < k; ++j) {
        const T a = ap[r * k + j];
        gap[r * k + j] = 0;
        if (!(a > 0)) continue;
        wr[m] = wp + ip[r * k + j] * d;
        av[m] = a;
        pos[m++] = j;
      }
      T* h = gp + r * d;  // ŷ is built in g's row, then turned into the error gradient in place
      std::copy(bp, bp + d, h);
      gather_rows(h, av.data(), wr.data(), m, d);
      if (hp) std::copy(h, h + d, hp + r * d);
      const T* yr = yp + r * d;
      T sq = 0;
_Pragma("omp simd reduction(+ : sq)")
      for (int64_t i = 0; i < d; ++i) {
        const T e = h[i] - ys * yr[i];
        sq += e * e;
        h[i] = s * e;
      }
      if (glp) {  // the bf16 copy of g the weight-gradient scatter reads
        c10::BFloat16* gl = glp + r * d;
        if constexpr (std::is_same_v<T, float>) {
          store_bf16_row(gl, h, d);
        } else {
          for (int64_t i = 0; i < d; ++i) gl[i] = c10::BFloat16(static_cast<float>(h[i]));
        }
      }
      sp[r] = sq;
      // bf16 decoder with low_g: the backward reads g rounded to bf16 (every path alike)
      if constexpr (std::is_same_v<T, float> && std::is_same_v<TW, c10::BFloat16>) {
        if (glp) {
#ifdef __AVX512BF16__
          if (d % 32 == 0) {
            dot_rows_bf16(glp + r * d, wr.data(), m, d, dots.data());
          } else
#endif
          {
            for (int64_t i = 0; i < d; ++i) grounded[i] = static_cast<float>(glp[r * d + i]);
            dot_rows(grounded.data(), wr.data(), m, d, dots.data());
          }
        } else {
          dot_rows(h, wr.data(), m, d, dots.data());
        }
      } else {
        dot_rows(h, wr.data(), m, d, dots.data());
      }
      for (int64_t q = 0; q < m; ++q) gap[r * k + pos[q]] = dots[q];
    }
  });
}

// Returns (y_hat (empty unless want_y_hat), g, g_acts, sq_err[, g as bf16 when low_g]). W may be bfloat16 with float32 acts,
// bias and y (a bf16 copy of the decoder halves the memory traffic of the gathers).
std::vector<torch::Tensor> decode_backward(torch::Tensor idx, torch::Tensor acts, torch::Tensor W, torch::Tensor bias,
                                           torch::Tensor y, double scale, double sign, bool low_g, bool want_y_hat) {
  TORCH_CHECK(idx.is_contiguous() && acts.is_contiguous() && W.is_contiguous() && y.is_contiguous() && bias.is_contiguous(),
              "decode_backward: expected contiguous tensors");
  const int64_t rows = idx.size(0), k = idx.size(1), d = W.size(1), n = W.size(0);
  TORCH_CHECK(idx.numel() == 0 || (idx.min().item<int64_t>() >= 0 && idx.max().item<int64_t>() < n),
              "decode_backward: index out of range");
  auto y_hat = torch::empty({want_y_hat ? rows : 0, d}, y.options());
  auto g = torch::empty({rows, d}, y.options());
  auto g_acts = torch::empty({rows, k}, y.options());
  auto sq_err = torch::empty({rows}, y.options());
  torch::Tensor g_low;
  if (low_g) g_low = torch::empty({rows, d}, y.options().dtype(at::kBFloat16));
  c10::BFloat16* glp = low_g ? g_low.data_ptr<c10::BFloat16>() : nullptr;
  const int64_t* ip = idx.data_ptr<int64_t>();
  if (W.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(y.scalar_type() == at::kFloat, "decode_backward: a bf16 decoder needs float32 acts and targets");
    decode_backward_impl<float, c10::BFloat16>(ip, acts.data_ptr<float>(), W.data_ptr<c10::BFloat16>(), bias.data_ptr<float>(),
                                               y.data_ptr<float>(), rows, k, d, float(scale), float(sign), want_y_hat ? y_hat.data_ptr<float>() : nullptr,
                                               g.data_ptr<float>(), glp, g_acts.data_ptr<float>(), sq_err.data_ptr<float>());
  } else {
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "decode_backward", [&] {
      decode_backward_impl<scalar_t, scalar_t>(ip, acts.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                                               y.data_ptr<scalar_t>(), rows, k, d, scalar_t(scale), scalar_t(sign),
                                               want_y_hat ? y_hat.data_ptr<scalar_t>() : nullptr, g.data_ptr<scalar_t>(), glp, g_acts.data_ptr<scalar_t>(),
                                               sq_err.data_ptr<scalar_t>());
    });
  }
  if (low_g) return {y_hat, g, g_acts, sq_err, g_low};
  return {y_hat, g, g_acts, sq_err};
}

// Both weight gradients as scatters of the active entries, without atomics. The latents are cut
// into ranges (balanced by entry count, accumulators of about range_bytes each); each range is
// owned by one thread. A thread first lists, in one scan, the entries of each of its ranges in row
// order (a stable bucketing: each range then walks only its own entries, and the input rows
// stream, each staying in L1 for its entries), then accumulates each range and writes its rows
// once. (Measured at 4096 x 32 entries into 3072 x (384 + 384): bucketing the entries by latent
// was ~1.7x slower, every input row then coming from L3 once per entry; ranges of 1 MB and of one
// per thread ran alike, 256 KB ones slower; every range scanning all entries cost ~20 %.)
//   ga_t[:, l] = sum over entries (b, j) with idx[b,j] = l of wa[b,j] xa[b]   (written transposed: [da, n])
//   gb[l]      = sum of wb[b,j] xb[b]                                         ([n, db])
//   gbias[l]   = sum of wa[b,j]
//   fired[l]   = number of entries with wb[b,j] != 0 (with wb the activations: how often l fired)
template <typename T, typename TX>
void latent_grads_impl(const int64_t* ip, const T* wap, const TX* xap, const T* wbp, const TX* xbp, int64_t rows,
                       int64_t k, int64_t da, int64_t db, int64_t n, T* gat, T* gbp, T* gbias, int64_t* fired,
                       int64_t range_bytes) {
  const int64_t entries = rows * k;
  // Entries with both weights zero add nothing and are left out of the counts and buckets (AuxK's
  // compacted selection pads short rows with such entries at latent 0: counted, they made that
  // latent's range look like most of the work and left one thread with all of the real work).
  std::vector<int64_t> count(n + 1, 0);
  for (int64_t e = 0; e < entries; ++e) count[ip[e] + 1] += (wap[e] != T(0)) | (wbp[e] != T(0));
  for (int64_t l = 0; l < n; ++l) count[l + 1] += count[l];
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_size = (n * (da + db) * int64_t(sizeof(T)) + range_bytes - 1) / std::max<int64_t>(1, range_bytes);
  int64_t P = std::max(threads, by_size);
  P = std::min(n, (P + threads - 1) / threads * threads);  // a multiple of the threads, for balance
  P = std::max<int64_t>(1, P);
  std::vector<int64_t> split(P + 1, n);
  split[0] = 0;
  for (int64_t t = 1; t < P; ++t) {
    const int64_t at_ = std::lower_bound(count.begin(), count.end(), entries * t / P) - count.begin();
    split[t] = std::max(split[t - 1], std::min(at_, n));
  }
  std::vector<int32_t> range_of(n);
  for (int64_t t = 0; t < P; ++t)
    for (int64_t l = split[t]; l < split[t + 1]; ++l) range_of[l] = static_cast<int32_t>(t);
  std::vector<int64_t> order(entries);  // entries bucketed by range (row order within each)
  const int64_t* splits = split.data();
  const int64_t* counts = count.data();
  const int32_t* range_ofp = range_of.data();
  int64_t* orderp = order.data();
  at::parallel_for(0, P, 1, [=](int64_t t_begin, int64_t t_end) {
    const int64_t first = splits[t_begin], last = splits[t_end];
    std::vector<int64_t> cursor(t_end - t_begin);
    for (int64_t t = t_begin; t < t_end; ++t) cursor[t - t_begin] = counts[splits[t]];
    for (int64_t e = 0; e < entries; ++e) {
      const int64_t l = ip[e];
      if (l >= first && l < last && ((wap[e] != T(0)) | (wbp[e] != T(0)))) orderp[cursor[range_ofp[l] - t_begin]++] = e;
    }
    std::vector<T> acc, bias_acc;
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t lo = splits[t], hi = splits[t + 1];
      if (hi <= lo) continue;
      acc.assign((hi - lo) * da, T(0));
      bias_acc.assign(hi - lo, T(0));
      std::fill(gbp + lo * db, gbp + hi * db, T(0));
      std::fill(fired + lo, fired + hi, int64_t(0));
      for (int64_t q = counts[lo]; q < counts[hi]; ++q) {
        const int64_t e = orderp[q];
        const int64_t l = ip[e];
        const T a = wap[e], b = wbp[e];
        const int64_t r = e / k;
        if (a != 0) {
          T* out = acc.data() + (l - lo) * da;
          const TX* x = xap + r * da;
_Pragma("omp simd")
          for (int64_t i = 0; i < da; ++i) out[i] += a * static_cast<T>(load_float(x, i));
          bias_acc[l - lo] += a;
        }
        if (b != 0) {
          ++fired[l];
          T* out = gbp + l * db;
          const TX* x = xbp + r * db;
_Pragma("omp simd")
          for (int64_t i = 0; i < db; ++i) out[i] += b * static_cast<T>(load_float(x, i));
        }
      }
      for (int64_t l = lo; l < hi; ++l) gbias[l] = bias_acc[l - lo];
      int64_t s0 = lo;
#ifdef __AVX512F__
      if constexpr (std::is_same_v<T, float>) {  // 16 latents at a time: one gather per column, one full-line store
        if (16 * da < (int64_t(1) << 31)) {
          const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                    _mm512_set1_epi32(static_cast<int32_t>(da)));
          for (; s0 + 16 <= hi; s0 += 16) {
            const float* src = acc.data() + (s0 - lo) * da;
            for (int64_t i = 0; i < da; ++i) _mm512_storeu_ps(gat + i * n + s0, _mm512_i32gather_ps(column, src + i, 4));
          }
        }
      }
#endif
      for (; s0 < hi; s0 += 16) {  // transposed write in 16-latent strips (whole cache lines)
        const int64_t s1 = std::min(hi, s0 + 16);
        for (int64_t i = 0; i < da; ++i) {
          T* dst = gat + i * n;
          for (int64_t l = s0; l < s1; ++l) dst[l] = acc[(l - lo) * da + i];
        }
      }
    }
  });
}

// Decoder refit: gram[l, m] += weight * sum over rows b where latents l and m are both active of
// a_bl a_bm (l, m < n; the bias row/column is handled by the caller). The entries are grouped by
// latent (a counting sort); each thread owns a range of gram rows, and a row stays in cache while
// all of its latent's entries add their row's k values into it: no atomics, no random misses
// over the whole (n x n) matrix as an index_add of B·k² pairs would have.
void gram_accumulate(torch::Tensor idx, torch::Tensor acts, torch::Tensor gram, double weight) {
  TORCH_CHECK(idx.is_contiguous() && acts.is_contiguous() && gram.is_contiguous(), "gram_accumulate: contiguous tensors expected");
  TORCH_CHECK(acts.scalar_type() == at::kFloat && gram.scalar_type() == at::kDouble, "gram_accumulate: float32 acts, float64 gram");
  const int64_t rows = idx.size(0), k = idx.size(1), entries = rows * k, stride = gram.size(1);
  const int64_t n = gram.size(0);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const float* ap = acts.data_ptr<float>();
  double* gp = gram.data_ptr<double>();
  std::vector<int64_t> start(n + 1, 0), order(entries);
  for (int64_t e = 0; e < entries; ++e) {
    TORCH_CHECK(ip[e] >= 0 && ip[e] < n, "gram_accumulate: index out of range");
    ++start[ip[e] + 1];
  }
  for (int64_t l = 0; l < n; ++l) start[l + 1] += start[l];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t e = 0; e < entries; ++e) order[fill[ip[e]]++] = e;
  }
  const int64_t* starts = start.data();
  const int64_t* orders = order.data();
  at::parallel_for(0, n, 64, [=](int64_t lo, int64_t hi) {
    for (int64_t l = lo; l < hi; ++l) {
      double* row = gp + l * stride;
      if (l + 1 < hi) {  // the next latent's row: its lines are hit in random order, so fetch them now
        const double* next = gp + (l + 1) * stride;
        for (int64_t i = 0; i < stride; i += 8) __builtin_prefetch(next + i, 1, 3);
      }
      for (int64_t q = starts[l]; q < starts[l + 1]; ++q) {
        const int64_t e = orders[q], r = e / k;
        const double a = weight * static_cast<double>(ap[e]);
        if (a == 0) continue;
        for (int64_t j = 0; j < k; ++j) row[ip[r * k + j]] += a * static_cast<double>(ap[r * k + j]);
      }
    }
  });
}

// Adam (torch.optim.Adam's update: no weight decay, no amsgrad) on a float32 matrix in one pass
// per row, with what the fast step does around it fused in: ``project``: the gradient's
// component along the (unit) row removed first, as Dictionary.remove_parallel_grad;
// ``normalize``: the row rescaled to unit norm after, as Dictionary.normalize_decoder; ``low``: a
// bf16 copy of the updated weights written too. The separate torch calls read and wrote the
// matrix (and its gradient) five or six times; this reads p, g, m, v once and writes p, m, v.
void adam_rows(torch::Tensor p, torch::Tensor g, torch::Tensor m, torch::Tensor v, double lr, double beta1, double beta2,
               double eps, double step, bool project, bool normalize, c10::optional<torch::Tensor> low) {
  TORCH_CHECK(p.scalar_type() == at::kFloat && g.scalar_type() == at::kFloat && m.scalar_type() == at::kFloat &&
              v.scalar_type() == at::kFloat, "adam_rows: float32 tensors expected");
  TORCH_CHECK(p.is_contiguous() && g.is_contiguous() && m.is_contiguous() && v.is_contiguous() && p.dim() == 2 &&
              g.sizes() == p.sizes() && m.sizes() == p.sizes() && v.sizes() == p.sizes(), "adam_rows: contiguous tensors of one shape");
  c10::BFloat16* lp = nullptr;
  if (low.has_value() && low->defined()) {
    TORCH_CHECK(low->scalar_type() == at::kBFloat16 && low->is_contiguous() && low->sizes() == p.sizes(), "adam_rows: bad bf16 copy");
    lp = low->data_ptr<c10::BFloat16>();
  }
  const int64_t rows = p.size(0), cols = p.size(1);
  const float b1 = float(beta1), b2 = float(beta2), e = float(eps);
  const float step_size = float(lr / (1.0 - std::pow(beta1, step)));
  const float bc2_sqrt = float(std::sqrt(1.0 - std::pow(beta2, step)));
  float* pp = p.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  float* mp = m.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  at::parallel_for(0, rows, 16, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* pr = pp + r * cols;
      const float* gr = gp + r * cols;
      float* mr = mp + r * cols;
      float* vr = vp + r * cols;
      float along = 0;
      if (project) {
_Pragma("omp simd reduction(+ : along)")
        for (int64_t i = 0; i < cols; ++i) along += gr[i] * pr[i];
      }
      float sq = 0;
_Pragma("omp simd reduction(+ : sq)")
      for (int64_t i = 0; i < cols; ++i) {
        const float gi = gr[i] - along * pr[i];
        const float mi = mr[i] + (1.0f - b1) * (gi - mr[i]);
        const float vi = b2 * vr[i] + (1.0f - b2) * gi * gi;
        mr[i] = mi;
        vr[i] = vi;
        const float pi = pr[i] - step_size * mi / (std::sqrt(vi) / bc2_sqrt + e);
        pr[i] = pi;
        sq += pi * pi;
      }
      if (normalize) {
        const float inv = 1.0f / std::max(std::sqrt(sq), 1e-8f);
_Pragma("omp simd")
        for (int64_t i = 0; i < cols; ++i) pr[i] *= inv;
      }
      if (lp) {
        c10::BFloat16* lr_ = lp + r * cols;
        store_bf16_row(lr_, pr, cols);
      }
    }
  });
}

std::vector<torch::Tensor> latent_grads(torch::Tensor idx, torch::Tensor wa, torch::Tensor xa, torch::Tensor wb,
                                        torch::Tensor xb, int64_t n, int64_t range_bytes,
                                        c10::optional<torch::Tensor> ga_out, c10::optional<torch::Tensor> gb_out) {
  TORCH_CHECK(idx.is_contiguous() && wa.is_contiguous() && xa.is_contiguous() && wb.is_contiguous() && xb.is_contiguous(),
              "latent_grads: expected contiguous tensors");
  TORCH_CHECK(idx.numel() == 0 || (idx.min().item<int64_t>() >= 0 && idx.max().item<int64_t>() < n),
              "latent_grads: index out of range");
  const int64_t rows = idx.size(0), k = idx.size(1), da = xa.size(1), db = xb.size(1);
  // bf16 inputs (x and the error gradient as bf16 copies: half the traffic) accumulate in float32
  const auto out_options = wa.options();
  // the weight gradients may be written into the previous step's buffers (no fresh pages each step)
  const auto reuse = [&](const c10::optional<torch::Tensor>& t, int64_t a, int64_t b) {
    return t.has_value() && t->defined() && t->is_contiguous() && t->dim() == 2 && t->size(0) == a && t->size(1) == b &&
           t->scalar_type() == wa.scalar_type();
  };
  auto ga_t = reuse(ga_out, da, n) ? *ga_out : torch::empty({da, n}, out_options);
  auto gb = reuse(gb_out, n, db) ? *gb_out : torch::empty({n, db}, out_options);
  auto gbias = torch::empty({n}, out_options);
  auto fired = torch::zeros({n}, idx.options());  // ranges left empty stay zero
  if (xa.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(xb.scalar_type() == at::kBFloat16 && wa.scalar_type() == at::kFloat && wb.scalar_type() == at::kFloat,
                "latent_grads: bf16 inputs need bf16 xb and float32 weights");
    latent_grads_impl<float, c10::BFloat16>(idx.data_ptr<int64_t>(), wa.data_ptr<float>(), xa.data_ptr<c10::BFloat16>(),
                                            wb.data_ptr<float>(), xb.data_ptr<c10::BFloat16>(), rows, k, da, db, n,
                                            ga_t.data_ptr<float>(), gb.data_ptr<float>(), gbias.data_ptr<float>(),
                                            fired.data_ptr<int64_t>(), range_bytes);
  } else {
    AT_DISPATCH_FLOATING_TYPES(xa.scalar_type(), "latent_grads", [&] {
      latent_grads_impl<scalar_t, scalar_t>(idx.data_ptr<int64_t>(), wa.data_ptr<scalar_t>(), xa.data_ptr<scalar_t>(),
                                            wb.data_ptr<scalar_t>(), xb.data_ptr<scalar_t>(), rows, k, da, db, n,
                                            ga_t.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>(), gbias.data_ptr<scalar_t>(),
                                            fired.data_ptr<int64_t>(), range_bytes);
    });
  }
  return {ga_t, gb, gbias, fired};
}
// Each row's positive entries (in column order), compacted into [rows, m] with m the most any row
// has (at least 1); the rest of a row is padded with value 0 at index 0. AuxK keeps only positive
// pre-activations, and when its k is at least m that is the whole selection: no top-k needed.
template <typename T, typename TV>
void positive_impl(const T* xp, int64_t rows, int64_t cols, int64_t m, TV* vp, int64_t* ip) {
  at::parallel_for(0, rows, 64, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x = xp + r * cols;
      TV* v = vp + r * m;
      int64_t* id = ip + r * m;
      int64_t c = 0;
      for (int64_t j = 0; j < cols; ++j) {
        const TV value = static_cast<TV>(x[j]);
        if (value > 0) { v[c] = value; id[c++] = j; }
      }
      for (; c < m; ++c) { v[c] = 0; id[c] = 0; }
    }
  });
}

// each row's number of positive entries; returns the most any row has
template <typename T>
int64_t count_positive(const T* xp, int64_t rows, int64_t cols, int64_t* cp) {
  at::parallel_for(0, rows, 256, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x = xp + r * cols;
      int64_t c = 0;
      // compared as positive_impl compares (float64 stays float64: a tiny positive value must
      // count here exactly when it is kept there, or the row would overrun its m slots)
      for (int64_t j = 0; j < cols; ++j) c += static_cast<typename Acc<T>::type>(x[j]) > 0;
      cp[r] = c;
    }
  });
  int64_t most = 0;
  for (int64_t r = 0; r < rows; ++r) most = std::max(most, cp[r]);
  return most;
}

// (values, indices, counts): counts [rows] int64, each row's number of positive entries.
std::vector<torch::Tensor> positive_entries(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "positive_entries: a contiguous 2-D tensor expected");
  const int64_t rows = x.size(0), cols = x.size(1);
  const auto vdtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto counts = torch::empty({rows}, x.options().dtype(at::kLong));
  int64_t* cp = counts.data_ptr<int64_t>();
  int64_t most = 0;
  switch (x.scalar_type()) {
    case at::kBFloat16: most = count_positive(x.data_ptr<c10::BFloat16>(), rows, cols, cp); break;
    case at::kFloat: most = count_positive(x.data_ptr<float>(), rows, cols, cp); break;
    case at::kDouble: most = count_positive(x.data_ptr<double>(), rows, cols, cp); break;
    default: TORCH_CHECK(false, "positive_entries: unsupported dtype");
  }
  const int64_t m = std::max<int64_t>(1, most);
  auto values = torch::empty({rows, m}, x.options().dtype(vdtype));
  auto indices = torch::empty({rows, m}, x.options().dtype(at::kLong));
  switch (x.scalar_type()) {
    case at::kBFloat16: positive_impl(x.data_ptr<c10::BFloat16>(), rows, cols, m, values.data_ptr<float>(), indices.data_ptr<int64_t>()); break;
    case at::kFloat: positive_impl(x.data_ptr<float>(), rows, cols, m, values.data_ptr<float>(), indices.data_ptr<int64_t>()); break;
    case at::kDouble: positive_impl(x.data_ptr<double>(), rows, cols, m, values.data_ptr<double>(), indices.data_ptr<int64_t>()); break;
    default: break;
  }
  return {values, indices, counts};
}

// Rows of several 2-D tensors of one dtype and width addressed as their row-wise concatenation
// without concatenating them (the loader's shards of a group, the writer's collected batches).
template <typename T>
struct PartRows {
  std::vector<const T*> parts;
  std::vector<int64_t> offsets;  // each part's first row, ascending
  int64_t d = 0, total = 0;
  const T* operator()(int64_t g) const {
    int64_t p = static_cast<int64_t>(parts.size()) - 1;
    while (p > 0 && offsets[p] > g) --p;
    return parts[p] + (g - offsets[p]) * d;
  }
};

template <typename T>
PartRows<T> part_rows(const std::vector<torch::Tensor>& parts, const char* who) {
  TORCH_CHECK(!parts.empty(), who, ": no parts");
  PartRows<T> rows;
  rows.d = parts[0].size(1);
  for (const auto& t : parts) {
    TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.scalar_type() == parts[0].scalar_type() && t.size(1) == rows.d,
                who, ": parts must be contiguous 2-D tensors of one dtype and width");
    rows.parts.push_back(t.data_ptr<T>());
    rows.offsets.push_back(rows.total);
    rows.total += t.size(0);
  }
  return rows;
}

// idx as contiguous 1-D int64, every entry a row of a table of total rows.
inline torch::Tensor checked_rows(const torch::Tensor& idx, int64_t total, const char* who) {
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong, who, ": 1-D int64 indices expected");
  auto ix = idx.contiguous();
  TORCH_CHECK(ix.numel() == 0 || (ix.min().item<int64_t>() >= 0 && ix.max().item<int64_t>() < total),
              who, ": row index out of range");
  return ix;
}

// out[r] = (float(part[p][idx[r] - offsets[p]]) - mean) / scale, p the part holding row idx[r]
// (offsets: each part's first row, ascending). The loader's minibatch from the memory-mapped
// shards of a group, as stored (float16, bfloat16 or float32), in one pass: no copy of the
// group, no float32 intermediate. Subtraction then division, as torch's sub_/div_: same bits.
template <typename T>
void gather_normalize_impl(const PartRows<T>& row_of, const int64_t* ip, int64_t rows, const float* mean, const float* scale,
                           float* out) {
  const int64_t d = row_of.d;
  // The rows are random rows of shards far larger than the caches: each comes from DRAM, and one
  // row at a time the gather waits on memory (~1 ms a batch of 4096 against 0.15 ms cache-warm).
  // Prefetching the rows AHEAD rows on keeps several in flight.
  constexpr int64_t AHEAD = 16;
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < std::min(end, begin + AHEAD); ++r) {
      const char* next = reinterpret_cast<const char*>(row_of(ip[r]));
      for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(next + b);
    }
    for (int64_t r = begin; r < end; ++r) {
      if (r + AHEAD < end) {
        const char* next = reinterpret_cast<const char*>(row_of(ip[r + AHEAD]));
        for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(next + b);
      }
      const T* src = row_of(ip[r]);
      float* o = out + r * d;
      int64_t i = 0;
#ifdef __AVX512F__
      // float16 -> float32 with the hardware conversion (c10::Half's own goes one value at a time)
      if constexpr (std::is_same_v<T, c10::Half>) {
        for (; i + 16 <= d; i += 16) {
          const __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
          _mm512_storeu_ps(o + i, _mm512_div_ps(_mm512_sub_ps(x, _mm512_loadu_ps(mean + i)), _mm512_loadu_ps(scale + i)));
        }
      }
#endif
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
_Pragma("omp simd")
        for (int64_t j = i; j < d; ++j) o[j] = (load_float(src, j) - mean[j]) / scale[j];
      } else {
        for (int64_t j = i; j < d; ++j) o[j] = (static_cast<float>(src[j]) - mean[j]) / scale[j];
      }
    }
  });
}

// out: a float32 [rows, d] tensor to write into (the loader reuses its batch buffers), or undefined for a new one.
torch::Tensor gather_normalize(std::vector<torch::Tensor> parts, torch::Tensor idx, torch::Tensor mean, torch::Tensor scale,
                               c10::optional<torch::Tensor> out_buffer) {
  TORCH_CHECK(!parts.empty(), "gather_normalize: no parts");
  const auto dtype = parts[0].scalar_type();
  const int64_t d = parts[0].size(1), total = [&] { int64_t n = 0; for (const auto& t : parts) n += t.size(0); return n; }();
  idx = checked_rows(idx, total, "gather_normalize");
  auto m = mean.to(at::kFloat).contiguous(), s = scale.to(at::kFloat).contiguous();
  TORCH_CHECK(m.numel() == d && s.numel() == d, "gather_normalize: mean and scale need one entry per column");
  torch::Tensor out;
  if (out_buffer.has_value() && out_buffer->defined()) {
    out = *out_buffer;
    TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == idx.numel() &&
                out.size(1) == d, "gather_normalize: out must be a contiguous float32 [rows, d] tensor");
  } else {
    out = torch::empty({idx.numel(), d}, idx.options().dtype(at::kFloat));
  }
  const int64_t rows = idx.numel();
  switch (dtype) {
#define SAECLT_GATHER_CASE(ST, CT)                                                                              \
    case ST:                                                                                                    \
      gather_normalize_impl<CT>(part_rows<CT>(parts, "gather_normalize"), idx.data_ptr<int64_t>(), rows,        \
                                m.data_ptr<float>(), s.data_ptr<float>(), out.data_ptr<float>());               \
      break;
    SAECLT_GATHER_CASE(at::kHalf, c10::Half)
    SAECLT_GATHER_CASE(at::kBFloat16, c10::BFloat16)
    SAECLT_GATHER_CASE(at::kFloat, float)
#undef SAECLT_GATHER_CASE
    default: TORCH_CHECK(false, "gather_normalize: float16, bfloat16 or float32 parts expected");
  }
  return out;
}
// The activation store's writer: rows idx (in that order; all rows when idx is undefined) of the
// row-wise concatenation of float32 parts, converted to the store's dtype into out (skipped when
// out is undefined), with the statistics the manifest and the normaliser need, in one pass over
// each row: per-column sums and sums of squares and the sum of the rows' norms (all in float64),
// the count of exact zeros, and the count of rows holding NaN or inf (the caller then discards
// the result and takes its checking path). In torch that was ~9 passes over the shard, each
// allocating (and page-faulting) a fresh shard-sized temporary: ~0.5 s a shard, a fifth of the
// collection's time. The rows are cut into a fixed number of chunks whose partial sums are added
// in chunk order afterwards, so the sums have the same bits whatever the number of threads.
constexpr int64_t STORE_CHUNKS = 32;

inline void store_row(const float* src, int64_t d, c10::Half* out) {
  int64_t j = 0;
#ifdef __AVX512F__
  for (; j + 16 <= d; j += 16)  // round to nearest even, as c10::Half's (one value at a time) does
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; j < d; ++j) out[j] = c10::Half(src[j]);
}
inline void store_row(const float* src, int64_t d, c10::BFloat16* out) { store_bf16_row(out, src, d); }
inline void store_row(const float* src, int64_t d, float* out) { std::memcpy(out, src, d * sizeof(float)); }

template <typename TO>
void store_rows_impl(const PartRows<float>& row_of, const int64_t* ip, int64_t rows, TO* out, double* partial) {
  const int64_t d = row_of.d;
  constexpr int64_t AHEAD = 8;
  const int64_t width = 2 * d + 3;  // per chunk: d sums, d sums of squares, norm sum, zeros, bad rows
  const int64_t per_chunk = (rows + STORE_CHUNKS - 1) / STORE_CHUNKS;
  at::parallel_for(0, STORE_CHUNKS, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double* s = partial + c * width;
      double* q = s + d;
      double norm_sum = 0, zeros = 0, bad_rows = 0;
      const int64_t begin = std::min(rows, c * per_chunk), end = std::min(rows, begin + per_chunk);
      for (int64_t r = begin; r < end; ++r) {
        if (ip != nullptr && r + AHEAD < end) {
          const char* next = reinterpret_cast<const char*>(row_of(ip[r + AHEAD]));
          for (int64_t b = 0; b < d * 4; b += 64) __builtin_prefetch(next + b);
        }
        const float* src = row_of(ip != nullptr ? ip[r] : r);
        double row_sq = 0;
        int64_t row_zeros = 0;
        float poison = 0;  // v * 0 is NaN exactly when v is NaN or inf
_Pragma("omp simd reduction(+ : row_sq, row_zeros, poison)")
        for (int64_t j = 0; j < d; ++j) {
          const float v = src[j];
          const double dv = v;
          s[j] += dv;
          q[j] += dv * dv;
          row_sq += dv * dv;
          row_zeros += v == 0.0f;
          poison += v * 0.0f;
        }
        norm_sum += std::sqrt(row_sq);
        zeros += static_cast<double>(row_zeros);
        bad_rows += poison != poison;
        if (out != nullptr) store_row(src, d, out + r * d);
      }
      s[2 * d] = norm_sum;
      s[2 * d + 1] = zeros;
      s[2 * d + 2] = bad_rows;
    }
  });
}

// {column sums [d], column sums of squares [d], (norm sum, zeros, bad rows) [3]}, all float64.
std::vector<torch::Tensor> store_rows(std::vector<torch::Tensor> parts, c10::optional<torch::Tensor> idx,
                                      c10::optional<torch::Tensor> out) {
  for (const auto& t : parts) TORCH_CHECK(t.scalar_type() == at::kFloat, "store_rows: float32 parts expected");
  const auto row_of = part_rows<float>(parts, "store_rows");
  const int64_t d = row_of.d;
  torch::Tensor ix;
  const int64_t* ip = nullptr;
  int64_t rows = row_of.total;
  if (idx.has_value() && idx->defined()) {
    ix = checked_rows(*idx, row_of.total, "store_rows");
    ip = ix.data_ptr<int64_t>();
    rows = ix.numel();
  }
  auto partial = torch::zeros({STORE_CHUNKS, 2 * d + 3}, parts[0].options().dtype(at::kDouble));
  double* pp = partial.data_ptr<double>();
  if (out.has_value() && out->defined()) {
    TORCH_CHECK(out->is_contiguous() && out->dim() == 2 && out->size(0) == rows && out->size(1) == d,
                "store_rows: out must be a contiguous [rows, d] tensor");
    switch (out->scalar_type()) {
      case at::kHalf: store_rows_impl(row_of, ip, rows, out->data_ptr<c10::Half>(), pp); break;
      case at::kBFloat16: store_rows_impl(row_of, ip, rows, out->data_ptr<c10::BFloat16>(), pp); break;
      case at::kFloat: store_rows_impl(row_of, ip, rows, out->data_ptr<float>(), pp); break;
      default: TORCH_CHECK(false, "store_rows: out must be float16, bfloat16 or float32");
    }
  } else {
    store_rows_impl<float>(row_of, ip, rows, nullptr, pp);
  }
  auto sums = partial[0].clone();  // chunk by chunk, in order: the same bits for any thread count
  double* t = sums.data_ptr<double>();
  for (int64_t c = 1; c < STORE_CHUNKS; ++c) {
    const double* s = pp + c * (2 * d + 3);
    for (int64_t j = 0; j < 2 * d + 3; ++j) t[j] += s[j];
  }
  return {sums.slice(0, 0, d), sums.slice(0, d, 2 * d), sums.slice(0, 2 * d, 2 * d + 3)};
}
// out = bf16(x - b) row by row (round to nearest even, as torch's sub into a bf16 tensor, which
// here took ~1 ms at [4096, 384] for a mixed-dtype pass).
void center_bf16(torch::Tensor x, torch::Tensor b, torch::Tensor out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "center_bf16: contiguous float32 x expected");
  TORCH_CHECK(b.is_contiguous() && b.scalar_type() == at::kFloat && b.numel() == x.size(1), "center_bf16: float32 b of x's width");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kBFloat16 && out.sizes() == x.sizes(), "center_bf16: bf16 out of x's shape");
  const int64_t rows = x.size(0), d = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  at::parallel_for(0, rows, 256, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * d;
      uint16_t* o = op + r * d;
_Pragma("omp simd")
      for (int64_t i = 0; i < d; ++i) o[i] = bf16_bits(xr[i] - bp[i]);
    }
  });
}
