// q8 activations (act = 1): x rounded to int8 per 32-element block (the values of
// quant.matmul.quantize_act), multiplied with integer dot products (AVX512-VNNI vpdpbusd), the
// block scales applied after each integer sum, as ggml does:
//
//   Q8_0, IQ2_XXS (signed weights):  sum_j w_j q_j = sum_j |w_j| (sign(w_j) q_j)   (u8 x s8)
//   Q2_K (unsigned 2-bit q, mins):   sum_j (dl q_j - ml) x_j = dl dx sum q_j qx_j - ml dx sum qx_j
//
// Other types (and CPUs without VNNI) multiply the same rounded values as floats through the
// exact kernels (gemv.h): the same numbers, not faster.
#pragma once

#include <algorithm>
#include <cmath>

#include "avx512.h"

namespace ds4 {

inline int64_t align64(int64_t n) { return (n + 63) & ~int64_t(63); }

// One quantised row: q int8 [K], d f32 [K / 32] (amax / 127), bs int32 [K / 16] (sums of q).
struct Act8 {
  const int8_t* q;
  const float* d;
  const int32_t* bs;
  static int64_t stride(int64_t k) { return align64(k) + align64(k / 8) + align64(k / 4); }
  static Act8 at(const void* base, int64_t k) {
    auto b = static_cast<const uint8_t*>(base);
    return {reinterpret_cast<const int8_t*>(b), reinterpret_cast<const float*>(b + align64(k)),
            reinterpret_cast<const int32_t*>(b + align64(k) + align64(k / 8))};
  }
};

// x f32 [K] (K a multiple of 32) -> the Act8 row at `out` (Act8::stride(K) bytes, 64-aligned).
// Also writes the dequantised values q * d to `deq` when it is not null.
inline void quantize_row(const float* x, int64_t k, uint8_t* out, float* deq) {
  auto q = reinterpret_cast<int8_t*>(out);
  auto d = reinterpret_cast<float*>(out + align64(k));
  auto bs = reinterpret_cast<int32_t*>(out + align64(k) + align64(k / 8));
  for (int64_t b = 0; b < k / 32; ++b) {
    float amax = 0;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[32 * b + i]));
    float db = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
    d[b] = db;
    for (int i = 0; i < 32; ++i) {
      float r = std::nearbyint(x[32 * b + i] * id);  // round half to even, as jnp.round
      q[32 * b + i] = int8_t(r);
      if (deq) deq[32 * b + i] = r * db;
    }
  }
  for (int64_t g = 0; g < k / 16; ++g) {
    int32_t s = 0;
    for (int i = 0; i < 16; ++i) s += q[16 * g + i];
    bs[g] = s;
  }
}

#if DS4_AVX512 && defined(__AVX512VNNI__)
#define DS4_VNNI 1

inline bool has_int8_kernel(int qtype) {
  return qtype == kQ8_0 || qtype == kIQ2_XXS || qtype == kQ2_K;
}

// Lanes 0-7 <- lane i of v, lanes 8-15 <- lane j.
inline __m512 pair_lanes(__m512 v, int i, int j) {
  return _mm512_permutexvar_ps(
      _mm512_inserti32x8(_mm512_set1_epi32(i), _mm256_set1_epi32(j), 1), v);
}

// acc[m] += per-lane scale * (signed 64 weights) . (64 q of row m), lanes 0-7 / 8-15 the two
// halves of 32 (one scale each: `sc[m]` lanes i and j).
template <int M>
inline void dot64_signed(__m512i w, const int8_t* const* xq, int64_t off, const __m512* sc,
                         int i, int j, __mmask64 mask, __m512* acc) {
  __m512i aw = _mm512_abs_epi8(w);
  __mmask64 neg = _mm512_movepi8_mask(w);
  const __m512i zero = _mm512_setzero_si512();
  #pragma GCC unroll 16
  for (int m = 0; m < M; ++m) {
    __m512i xv = _mm512_maskz_loadu_epi8(mask, xq[m] + off);
    __m512i sx = _mm512_mask_sub_epi8(xv, neg, zero, xv);
    __m512 s = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, aw, sx));
    acc[m] = _mm512_fmadd_ps(s, pair_lanes(sc[m], i, j), acc[m]);
  }
}

template <int Q, int M>
void row_q8(const Weight& w, int64_t wrow, int64_t n, const float* const* x, float* const* y) {
  const uint8_t* p[4];
  w.row(wrow, p);
  Act8 a[M];
  const int8_t* xq[M];
  #pragma GCC unroll 16
  for (int m = 0; m < M; ++m) {
    a[m] = Act8::at(x[m], w.k);
    xq[m] = a[m].q;
  }
  __m512 acc[M], mins[M];
  #pragma GCC unroll 16
  for (int m = 0; m < M; ++m) acc[m] = mins[m] = _mm512_setzero_ps();
  int64_t n_chunks = (w.k + CK - 1) / CK;
  for (int64_t c = 0; c < n_chunks; ++c) {
    if (g_prefetch) prefetch_next(w, wrow + kPrefetchRows, 1, c, n_chunks);
    int64_t k0 = c * CK;
    if constexpr (Q == kQ8_0) {
      int nb = int(std::min<int64_t>(8, (w.k - k0) / 32));
      const uint16_t* d16 = u16(p[0]) + c * 8;
      __m256 dw;
      if (nb == 8) {
        dw = _mm256_cvtph_ps(load16(d16));
      } else {
        alignas(32) float t[8] = {};
        for (int b = 0; b < nb; ++b) t[b] = h2f(d16[b]);
        dw = _mm256_load_ps(t);
      }
      __m512 sc[M];
      #pragma GCC unroll 16
      for (int m = 0; m < M; ++m)
        sc[m] = _mm512_castps256_ps512(_mm256_mul_ps(dw, _mm256_maskz_loadu_ps(
                                                             __mmask8((1u << nb) - 1), a[m].d + c * 8)));
      const int8_t* qs = reinterpret_cast<const int8_t*>(p[1]) + k0;
      for (int b = 0; b < nb; b += 2) {
        __mmask64 mask = b + 1 < nb ? ~__mmask64(0) : __mmask64(0xFFFFFFFFu);
        dot64_signed<M>(_mm512_maskz_loadu_epi8(mask, qs + 32 * b), xq, k0 + 32 * b, sc, b, b + 1,
                        mask, acc);
      }
    } else if constexpr (Q == kIQ2_XXS) {
      const uint32_t* aux = reinterpret_cast<const uint32_t*>(p[2]) + c * 8;
      __m512i keys[2];
      iq2_keys(p[1] + c * 32, aux, keys);
      __m256 s = _mm256_cvtepi32_ps(
          _mm256_srli_epi32(_mm256_loadu_si256((const __m256i*)aux), 28));
      __m256 db = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(h2f(u16(p[0])[c])),
                                              _mm256_add_ps(_mm256_set1_ps(0.5f), s)),
                                _mm256_set1_ps(0.25f));
      __m512 sc[M];
      #pragma GCC unroll 16
      for (int m = 0; m < M; ++m)
        sc[m] = _mm512_castps256_ps512(_mm256_mul_ps(db, _mm256_loadu_ps(a[m].d + c * 8)));
      for (int gp = 0; gp < 4; ++gp) {
        __m256i k8 = gp & 1 ? _mm512_extracti64x4_epi64(keys[gp >> 1], 1)
                            : _mm512_castsi512_si256(keys[gp >> 1]);
        dot64_signed<M>(_mm512_i32gather_epi64(k8, g_iq2xxs_signed, 8), xq, k0 + 64 * gp, sc,
                        2 * gp, 2 * gp + 1, ~__mmask64(0), acc);
      }
    } else {  // Q2_K: 16 groups of 16, unsigned 2-bit q, scales and mins
      __m512 d = _mm512_set1_ps(h2f(u16(p[2])[c])), dmin = _mm512_set1_ps(h2f(u16(p[3])[c]));
      __m512i scb = _mm512_cvtepu8_epi32(load16(p[0] + c * 16));
      __m512 dl = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_and_si512(scb, _mm512_set1_epi32(15))));
      __m512 ml = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_srli_epi32(scb, 4)));
      const __m512i pairs = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
      __m512 dlx[M];
      #pragma GCC unroll 16
      for (int m = 0; m < M; ++m) {
        __m512 dx = _mm512_permutexvar_ps(pairs, _mm512_castps256_ps512(
                                                     _mm256_loadu_ps(a[m].d + c * 8)));
        dlx[m] = _mm512_mul_ps(dl, dx);
        __m512 bs = _mm512_cvtepi32_ps(_mm512_loadu_si512(a[m].bs + c * 16));
        mins[m] = _mm512_fmadd_ps(_mm512_mul_ps(ml, dx), bs, mins[m]);
      }
      const uint8_t* qs = p[1] + c * 64;
      const __m512i three = _mm512_set1_epi8(3);
      const __m512i zero = _mm512_setzero_si512();
      for (int h = 0; h < 2; ++h) {
        __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(qs + 32 * h)));
        for (int s = 0; s < 4; s += 2) {
          __m512i sh = _mm512_inserti64x4(_mm512_set1_epi16(short(2 * s)),
                                          _mm256_set1_epi16(short(2 * s + 2)), 1);
          __m512i wq = _mm512_and_si512(_mm512_srlv_epi16(v, sh), three);
          int g0 = 8 * h + 2 * s;
          __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(g0), _mm512_setr_epi32(
              0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
          #pragma GCC unroll 16
          for (int m = 0; m < M; ++m) {
            __m512i xv = _mm512_loadu_si512(xq[m] + k0 + 128 * h + 32 * s);
            __m512 isum = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, wq, xv));
            acc[m] = _mm512_fmadd_ps(isum, _mm512_permutexvar_ps(idx, dlx[m]), acc[m]);
          }
        }
      }
    }
  }
  #pragma GCC unroll 16
  for (int m = 0; m < M; ++m)
    y[m][n] = _mm512_reduce_add_ps(acc[m]) - _mm512_reduce_add_ps(mins[m]);
}

template <int Q, int... Ms>
struct Q8Table {
  static constexpr RowsFn fns[] = {row_q8<Q, Ms>...};
};
template <int Q>
using RowsQ8 = Q8Table<Q, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16>;

inline RowsFn rows_q8_fn(int qtype, int m) {
  switch (qtype) {
    case kQ8_0: return RowsQ8<kQ8_0>::fns[m - 1];
    case kIQ2_XXS: return RowsQ8<kIQ2_XXS>::fns[m - 1];
    default: return RowsQ8<kQ2_K>::fns[m - 1];
  }
}

#else
#define DS4_VNNI 0

inline bool has_int8_kernel(int) { return false; }
inline RowsFn rows_q8_fn(int, int) { return nullptr; }

#endif

}  // namespace ds4
