// q8 activations (act = 1): x rounded to int8 per 32-element block (the values of
// quant.matmul.quantize_act), multiplied with integer dot products (AVX512-VNNI vpdpbusd), the
// block scales applied after each integer sum, as ggml does:
//
//   Q8_0, IQ2_XXS (signed weights):  sum_j w_j q_j = sum_j (w_j + 128) q_j - 128 sum_j q_j
//                                    (u8 x s8; the second sum is the row's, made at quantisation)
//   Q2_K (unsigned 2-bit q, mins):   sum_j (dl q_j - ml) x_j = dl dx sum q_j qx_j - ml dx sum qx_j
//
// Q8_0 and IQ2_XXS read x in the "paired" layout: per 256-element chunk, vector s (s < 4) holds
// in its 64-bit lane Q the elements 32 Q + 8 s .. + 8 (block Q's qword s). Each weight chunk is
// laid out the same way once per call (eight shuffles of Q8_0's bytes; IQ2_XXS's grid rows are
// gathered straight in that order, avx512.h iq2_rows), so the four vpdpbusd of an x row add into one int32 vector whose
// lanes 2Q, 2Q + 1 hold block Q: one convert, one scale and one FMA per x row and chunk, where
// the plain layout paid a sign fix, a convert, a scale and an FMA per 64 elements and x row.
// The weight work is shared by all the rows of the call.
//
// Other types (and CPUs without VNNI) multiply the same rounded values as floats through the
// exact kernels (gemv.h): the same numbers, not faster.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "avx512.h"

namespace ds4 {

inline int64_t align64(int64_t n) { return (n + 63) & ~int64_t(63); }

// Whether the integer kernel of `qtype` reads x in the paired layout.
inline bool paired(int qtype) { return qtype == kQ8_0 || qtype == kIQ2_XXS; }

// One quantised row, K rounded up to whole chunks (kc), zero past K:
//   plain  (Q2_K): q int8 [K], d f32 [K / 32] (amax / 127), bs int32 [K / 16] (sums of q);
//   paired: q int8 [kc] in the paired layout, d f32 [kc / 16] (lane 2Q + t of chunk c: the
//           scale of block 8c + Q), bs int32 [kc / 16] (-128 x the sum of the q lane 2Q + t
//           of chunk c multiplies).
struct Act8 {
  const int8_t* q;
  const float* d;
  const int32_t* bs;
  static int64_t chunked(int64_t k) { return (k + CK - 1) / CK * CK; }
  static int64_t stride(int64_t k) { return align64(chunked(k)) + 2 * align64(chunked(k) / 4); }
  static Act8 at(const void* base, int64_t k) {
    auto b = static_cast<const uint8_t*>(base);
    int64_t kc = chunked(k);
    return {reinterpret_cast<const int8_t*>(b), reinterpret_cast<const float*>(b + align64(kc)),
            reinterpret_cast<const int32_t*>(b + align64(kc) + align64(kc / 4))};
  }
};

// x f32 [K] (K a multiple of 32) -> the Act8 row at `out` (Act8::stride(K) bytes, 64-aligned),
// in the layout the integer kernel of `qtype` reads. Also writes the dequantised values q * d
// to `deq` when it is not null.
inline void quantize_row(const float* x, int64_t k, uint8_t* out, float* deq, int qtype) {
  int64_t kc = Act8::chunked(k);
  std::vector<int8_t> q(size_t(kc), 0);
  std::vector<float> d(size_t(kc / 32), 0.0f);
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
  std::memset(out, 0, size_t(Act8::stride(k)));
  Act8 a = Act8::at(out, k);
  auto oq = const_cast<int8_t*>(a.q);
  auto od = const_cast<float*>(a.d);
  auto obs = const_cast<int32_t*>(a.bs);
  if (!paired(qtype)) {
    std::memcpy(oq, q.data(), size_t(k));
    std::memcpy(od, d.data(), size_t(k / 32) * 4);
    for (int64_t g = 0; g < k / 16; ++g) {
      int32_t t = 0;
      for (int i = 0; i < 16; ++i) t += q[16 * g + i];
      obs[g] = t;
    }
    return;
  }
  for (int64_t c = 0; c < kc / CK; ++c)
    for (int lane = 0; lane < 16; ++lane) {
      int blk = lane / 2, half = lane % 2;
      od[16 * c + lane] = d[8 * c + blk];
      int32_t t = 0;
      for (int s = 0; s < 4; ++s)
        for (int i = 0; i < 4; ++i) {
          int8_t v = q[CK * c + 32 * blk + 8 * s + 4 * half + i];
          oq[CK * c + 64 * s + 4 * lane + i] = v;
          t += v;
        }
      obs[16 * c + lane] = -128 * t;
    }
}

#if DS4_AVX512 && defined(__AVX512VNNI__)
#define DS4_VNNI 1

inline bool has_int8_kernel(int qtype) {
  return qtype == kQ8_0 || qtype == kIQ2_XXS || qtype == kQ2_K;
}

// Q2_K: one weight row times M plain Act8 rows.
template <int M>
void row_q2k(const Weight& w, int64_t wrow, int64_t n, const float* const* x, float* const* y) {
  const uint8_t* p[4];
  w.row(wrow, p);
  Act8 a[M];
  #pragma GCC unroll 16
  for (int m = 0; m < M; ++m) a[m] = Act8::at(x[m], w.k);
  __m512 acc[M], mins[M];
  #pragma GCC unroll 16
  for (int m = 0; m < M; ++m) acc[m] = mins[m] = _mm512_setzero_ps();
  int64_t n_chunks = w.k / CK;
  for (int64_t c = 0; c < n_chunks; ++c) {
    if (g_prefetch) prefetch_next(w, wrow + kPrefetchRows, 1, c, n_chunks);
    int64_t k0 = c * CK;
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
          __m512i xv = _mm512_loadu_si512(a[m].q + k0 + 128 * h + 32 * s);
          __m512 isum = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, wq, xv));
          acc[m] = _mm512_fmadd_ps(isum, _mm512_permutexvar_ps(idx, dlx[m]), acc[m]);
        }
      }
    }
  }
  #pragma GCC unroll 16
  for (int m = 0; m < M; ++m)
    y[m][n] = _mm512_reduce_add_ps(acc[m]) - _mm512_reduce_add_ps(mins[m]);
}

// The paired layout of one chunk of 8 blocks of 32 bytes, given in element order (a[i]: blocks
// 2i, 2i + 1): wv[s] lane Q = qword s of block Q.
__attribute__((always_inline)) inline void pair_qwords(const __m512i* a, __m512i* wv) {
  const __m512i lo = _mm512_setr_epi64(0, 4, 8, 12, 1, 5, 9, 13);
  const __m512i hi = _mm512_setr_epi64(2, 6, 10, 14, 3, 7, 11, 15);
  __m512i b01 = _mm512_permutex2var_epi64(a[0], lo, a[1]);
  __m512i b23 = _mm512_permutex2var_epi64(a[0], hi, a[1]);
  __m512i c01 = _mm512_permutex2var_epi64(a[2], lo, a[3]);
  __m512i c23 = _mm512_permutex2var_epi64(a[2], hi, a[3]);
  wv[0] = _mm512_shuffle_i64x2(b01, c01, 0x44);
  wv[1] = _mm512_shuffle_i64x2(b01, c01, 0xEE);
  wv[2] = _mm512_shuffle_i64x2(b23, c23, 0x44);
  wv[3] = _mm512_shuffle_i64x2(b23, c23, 0xEE);
}

// Chunk c of a Q8_0 / IQ2_XXS weight row in the paired layout, as u8 (w + 128) in wv[4], and
// its block scales in lanes 2Q, 2Q + 1 of *sw (0 past the row's end).
template <int Q>
__attribute__((always_inline)) inline void paired_chunk(const Weight& w, const uint8_t* const* p,
                                                        int64_t c, __m512i* wv, __m512* sw) {
  const __m512i pairs = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i bias = _mm512_set1_epi8(char(0x80));
  __m256 s8;
  if constexpr (Q == kQ8_0) {
    int nb = int(std::min<int64_t>(8, w.k / 32 - c * 8));
    s8 = _mm256_cvtph_ps(_mm_maskz_loadu_epi16(__mmask8((1u << nb) - 1), u16(p[0]) + c * 8));
    const int8_t* qs = reinterpret_cast<const int8_t*>(p[1]) + c * CK;
    __m512i a[4];
    for (int i = 0; i < 4; ++i) {
      int left = std::clamp(nb - 2 * i, 0, 2);  // blocks of the 64 bytes at 64 i
      __mmask64 m = left == 2 ? ~__mmask64(0) : left ? __mmask64(0xFFFFFFFFu) : 0;
      a[i] = _mm512_maskz_loadu_epi8(m, qs + 64 * i);
    }
    pair_qwords(a, wv);
    for (int s = 0; s < 4; ++s) wv[s] = _mm512_xor_si512(wv[s], bias);
  } else {  // IQ2_XXS: the signed grid rows, + 128, straight in the paired layout
    const uint32_t* aux = reinterpret_cast<const uint32_t*>(p[2]) + c * 8;
    iq2_rows(p, c, kIq2Paired.v, wv);
    __m256 sc = _mm256_cvtepi32_ps(
        _mm256_srli_epi32(_mm256_loadu_si256((const __m256i*)aux), 28));
    s8 = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(h2f(u16(p[0])[c])),
                                     _mm256_add_ps(_mm256_set1_ps(0.5f), sc)),
                       _mm256_set1_ps(0.25f));
  }
  *sw = _mm512_permutexvar_ps(pairs, _mm512_castps256_ps512(s8));
}

// One (weight row, x row) result: its 8 block accumulators (lanes 2Q, the same in 2Q + 1)
// summed as ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)), as amx.h does.
inline float block_sum(__m512 acc) {
  alignas(64) float t[16];
  _mm512_store_ps(t, acc);
  return ((t[0] + t[2]) + (t[4] + t[6])) + ((t[8] + t[10]) + (t[12] + t[14]));
}

// acc[m] += chunk c of one weight row (planes p) times paired Act8 row a[m], m < M.
template <int Q, int M>
__attribute__((always_inline)) inline void paired_rows(const Weight& w, const uint8_t* const* p,
                                                       int64_t c, const Act8* a, __m512* acc) {
  __m512i wv[4];
  __m512 sw;
  paired_chunk<Q>(w, p, c, wv, &sw);
  #pragma GCC unroll 16
  for (int m = 0; m < M; ++m) {
    const int8_t* xq = a[m].q + c * CK;
    // Two chains of two (integer sums: the same result in any order).
    __m512i s0 = _mm512_dpbusd_epi32(_mm512_load_si512(a[m].bs + c * 16), wv[0],
                                     _mm512_load_si512(xq));
    __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[2],
                                     _mm512_load_si512(xq + 128));
    s0 = _mm512_dpbusd_epi32(s0, wv[1], _mm512_load_si512(xq + 64));
    s1 = _mm512_dpbusd_epi32(s1, wv[3], _mm512_load_si512(xq + 192));
    __m512i s = _mm512_add_epi32(s0, s1);
    s = _mm512_add_epi32(s, _mm512_shuffle_epi32(s, _MM_PERM_CDAB));  // lanes 2Q, 2Q + 1: block Q
    __m512 sc = _mm512_mul_ps(sw, _mm512_load_ps(a[m].d + c * 16));
    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[m]);
  }
}

// Weight rows [wrow, wrow + rows) times M paired Act8 rows. Chunk by chunk, each weight row's
// chunk is laid out once (paired_chunk) and multiplied with every x row; the rows of a tile
// share the x chunk while it is in L1 and their sums wait in L1 between chunks (one row keeps
// them in registers). A (row, x row) pair runs the same operations in the same order whatever
// the tile and M.
template <int Q, int M>
void tile_paired(const Weight& w, int64_t wrow, int rows, int64_t n, const float* const* x,
                 float* const* y) {
  Act8 a[M];
  #pragma GCC unroll 16
  for (int m = 0; m < M; ++m) a[m] = Act8::at(x[m], w.k);
  int64_t n_chunks = Act8::chunked(w.k) / CK;
  const uint8_t* p[4];
  if (rows == 1) {
    __m512 acc[M];
    #pragma GCC unroll 16
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    w.row(wrow, p);
    for (int64_t c = 0; c < n_chunks; ++c) {
      if (g_prefetch) prefetch_next(w, wrow + kPrefetchRows, 1, c, n_chunks);
      paired_rows<Q, M>(w, p, c, a, acc);
    }
    #pragma GCC unroll 16
    for (int m = 0; m < M; ++m) y[m][n] = block_sum(acc[m]);
    return;
  }
  alignas(64) __m512 keep[kQ8Tile * M];
  for (int i = 0; i < rows * M; ++i) keep[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < n_chunks; ++c) {
    if (g_prefetch) prefetch_next(w, wrow + rows * kPrefetchRows, rows, c, n_chunks);
    for (int r = 0; r < rows; ++r) {
      w.row(wrow + r, p);
      paired_rows<Q, M>(w, p, c, a, keep + r * M);
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int m = 0; m < M; ++m) y[m][n + r] = block_sum(keep[r * M + m]);
}

template <int M>
void tile_q2k(const Weight& w, int64_t wrow, int rows, int64_t n, const float* const* x,
              float* const* y) {
  for (int r = 0; r < rows; ++r) row_q2k<M>(w, wrow + r, n + r, x, y);
}

template <int Q, int... Ms>
struct Q8Table {
  static constexpr TileFn fns[] = {tile_paired<Q, Ms>...};
};
template <int... Ms>
struct Q2KTable {
  static constexpr TileFn fns[] = {tile_q2k<Ms>...};
};
template <int Q>
using TilesQ8 = Q8Table<Q, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16>;
using TilesQ2K = Q2KTable<1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16>;

inline TileFn rows_q8_fn(int qtype, int m) {
  switch (qtype) {
    case kQ8_0: return TilesQ8<kQ8_0>::fns[m - 1];
    case kIQ2_XXS: return TilesQ8<kIQ2_XXS>::fns[m - 1];
    default: return TilesQ2K::fns[m - 1];
  }
}

#else
#define DS4_VNNI 0

inline bool has_int8_kernel(int) { return false; }
inline TileFn rows_q8_fn(int, int) { return nullptr; }

#endif

}  // namespace ds4
