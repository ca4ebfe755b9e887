// The CPU kernel core of quant.matmul / quant.expert_matmul, free of XLA: a weight view,
// tasks over its rows, the register-tiled multiply of exactly dequantised chunks (see
// ds4_cpu.cc for the contract). Included by ds4_cpu.cc (the FFI binding) and bench.cc (a
// stand-alone timing harness).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "avx512.h"
#include "blocks.h"

namespace ds4 {

constexpr int kMaxRows = 16;

struct Weight {
  int qtype = 0, np = 0;
  bool q8 = false;  // x rows are Act8 rows (q8.h) for the integer kernels
  int64_t k = 0;
  DeqFn deq = nullptr;
  const uint8_t* base[4] = {};
  int64_t row_bytes[4] = {};
  void row(int64_t r, const uint8_t** p) const {
    for (int i = 0; i < np; ++i) p[i] = base[i] + r * row_bytes[i];
  }
};

// One task: weight rows wrow + [n0, n1) into outputs y[m][n0 .. n1), m < rows.
struct Task {
  int64_t wrow, n0, n1;
  int rows;
  const float* const* x;
  float* const* y;
  const uint8_t* amx = nullptr;  // x as AMX tile data (amx.h), when the AMX kernel runs it
};

inline int g_prefetch = 1;

// Prefetches slice c of n_chunks of the bytes of weight rows [row, row + nr) (the next tile:
// contiguous in every plane), so the tile after this one streams in while this one computes.
inline void prefetch_next(const Weight& w, int64_t row, int nr, int64_t c, int64_t n_chunks) {
  for (int i = 0; i < w.np; ++i) {
    const char* base = reinterpret_cast<const char*>(w.base[i]) + row * w.row_bytes[i];
    int64_t size = nr * w.row_bytes[i];
    int64_t a = size * c / n_chunks, b = size * (c + 1) / n_chunks;
    for (int64_t o = a & ~int64_t(63); o < b; o += 64) __builtin_prefetch(base + o, 0, 3);
  }
}

using RowsFn = void (*)(const Weight&, int64_t wrow, int64_t n, const float* const* x,
                        float* const* y);
// Weight rows [wrow, wrow + rows) of one tile (the q8 kernels, q8.h).
using TileFn = void (*)(const Weight&, int64_t wrow, int rows, int64_t n, const float* const* x,
                        float* const* y);
// Weight rows per tile of the q8 kernels with several x rows: their sums wait in L1 (at most
// kQ8Tile x 16 vectors, 16 KiB) while the tile shares each chunk of x; one x row is in L1
// whole.
constexpr int kQ8Tile = 16;

// Rows ahead whose bytes are prefetched while a row computes.
constexpr int kPrefetchRows = 2;

#if DS4_AVX512

// y[m][n + r] = weight row `wrow + r` . x[m] for r < NR, m < M: each chunk's exact values
// (avx512.h visitors) go straight into FMAs, 2 accumulators per (row, x row). The NR rows share
// each 256-element chunk of x while it is in L1 (M rows of a long x do not fit there whole);
// the accumulators wait in memory between chunks. A row's FMAs run in the same order whatever
// NR and M, so its result does not depend on the batch.
template <int Q, int M, int NR>
void row_kernel(const Weight& w, int64_t wrow, int64_t n, const float* const* x,
                float* const* y) {
  const uint8_t* p[NR][4];
  for (int r = 0; r < NR; ++r) w.row(wrow + r, p[r]);
  alignas(64) __m512 keep[NR][M][2];
  for (int r = 0; r < NR; ++r)
    #pragma GCC unroll 16
    for (int m = 0; m < M; ++m) keep[r][m][0] = keep[r][m][1] = _mm512_setzero_ps();
  int64_t c = 0, n_chunks = (w.k + CK - 1) / CK;
  for (int64_t k0 = 0; k0 < w.k; k0 += CK, ++c) {
    int len = int(std::min<int64_t>(CK, w.k - k0));
    if (g_prefetch) prefetch_next(w, wrow + NR * kPrefetchRows, NR, c, n_chunks);
    for (int r = 0; r < NR; ++r) {
      __m512 acc[M][2];
      #pragma GCC unroll 16
      for (int m = 0; m < M; ++m) {
        acc[m][0] = keep[r][m][0];
        acc[m][1] = keep[r][m][1];
      }
      visit<Q>(p[r], c, len, [&](int off, __m512 w0, __m512 w1, __mmask16 m0, __mmask16 m1)
                                 __attribute__((always_inline)) {
        #pragma GCC unroll 16
        for (int m = 0; m < M; ++m) {
          acc[m][0] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m0, x[m] + k0 + off), acc[m][0]);
          acc[m][1] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(m1, x[m] + k0 + off + 16),
                                      acc[m][1]);
        }
      });
      #pragma GCC unroll 16
      for (int m = 0; m < M; ++m) {
        keep[r][m][0] = acc[m][0];
        keep[r][m][1] = acc[m][1];
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    #pragma GCC unroll 16
    for (int m = 0; m < M; ++m)
      y[m][n + r] = _mm512_reduce_add_ps(_mm512_add_ps(keep[r][m][0], keep[r][m][1]));
}

#else

// Portable: dequantise a chunk into a buffer (blocks.h), then multiply-add (one row at a time).
template <int Q, int M, int NR>
void row_kernel(const Weight& w, int64_t wrow, int64_t n, const float* const* x,
                float* const* y) {
  if constexpr (NR > 1) {
    for (int r = 0; r < NR; ++r) row_kernel<Q, M, 1>(w, wrow + r, n + r, x, y);
    return;
  }
  alignas(64) float buf[CK];
  const uint8_t* p[4];
  w.row(wrow, p);
  float acc[M][16] = {};
  int64_t c = 0;
  for (int64_t k0 = 0; k0 < w.k; k0 += CK, ++c) {
    int len = int(std::min<int64_t>(CK, w.k - k0));
    w.deq(p, c, len, buf);
    #pragma GCC unroll 16
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < len; ++i) acc[m][i & 15] += buf[i] * x[m][k0 + i];
  }
  #pragma GCC unroll 16
  for (int m = 0; m < M; ++m) {
    float s = 0;
    for (int i = 0; i < 16; ++i) s += acc[m][i];
    y[m][n] = s;
  }
}

#endif

// Weight rows per call of a row kernel: 1 for one x row (it stays in L1), else 4.
constexpr int nr_for(int m) { return m == 1 ? 1 : 4; }

template <int Q, int... Ms>
struct RowTable {
  static constexpr RowsFn fns[] = {row_kernel<Q, Ms, nr_for(Ms)>...};
  static constexpr RowsFn one[] = {row_kernel<Q, Ms, 1>...};
};
template <int Q>
using Rows = RowTable<Q, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16>;

// The row kernel for x of m rows (`one`: a single weight row per call; else nr_for(m)).
inline RowsFn rows_fn(int qtype, int m, bool one) {
  switch (qtype) {
    case kQ8_0: return (one ? Rows<kQ8_0>::one : Rows<kQ8_0>::fns)[m - 1];
    case kQ2_K: return (one ? Rows<kQ2_K>::one : Rows<kQ2_K>::fns)[m - 1];
    case kQ4_K: return (one ? Rows<kQ4_K>::one : Rows<kQ4_K>::fns)[m - 1];
    case kIQ2_XXS: return (one ? Rows<kIQ2_XXS>::one : Rows<kIQ2_XXS>::fns)[m - 1];
    case kMXFP4: return (one ? Rows<kMXFP4>::one : Rows<kMXFP4>::fns)[m - 1];
    case kF16: return (one ? Rows<kF16>::one : Rows<kF16>::fns)[m - 1];
    default: return (one ? Rows<kBF16>::one : Rows<kBF16>::fns)[m - 1];
  }
}

}  // namespace ds4

#include "q8.h"
#include "amx.h"

namespace ds4 {

inline void run_task(const Weight& w, const Task& t) {
  if (t.amx) {
    run_amx(w, t.wrow, t.n0, t.n1, t.rows, t.amx, t.x, t.y);
    return;
  }
  if (w.q8) {
    TileFn f = rows_q8_fn(w.qtype, t.rows);
    int64_t tile = t.rows == 1 ? 1 : kQ8Tile;
    for (int64_t n = t.n0; n < t.n1; n += tile)
      f(w, t.wrow + n, int(std::min(tile, t.n1 - n)), n, t.x, t.y);
    return;
  }
  int nr = nr_for(t.rows);
  RowsFn tile = rows_fn(w.qtype, t.rows, false), one = rows_fn(w.qtype, t.rows, true);
  int64_t n = t.n0;
  for (; n + nr <= t.n1; n += nr) tile(w, t.wrow + n, n, t.x, t.y);
  for (; n < t.n1; ++n) one(w, t.wrow + n, n, t.x, t.y);
}

// Runs the groups (a weight row offset and a list of activation rows each) in tasks.
struct Group {
  int64_t wrow;
  std::vector<const float*> x;
  std::vector<float*> y;
  std::vector<uint8_t> amx;  // x as AMX tile data, made by plan_tasks where amx_applies
};

inline std::vector<Task> plan_tasks(const Weight& w, int64_t threads, int64_t n,
                                    std::vector<Group>& groups) {
  for (auto& g : groups)
    if (amx_applies(w, g.x.size())) amx_x_tiles(g.x.data(), int(g.x.size()), w.k, &g.amx);
  int64_t work = 0;
  for (auto& g : groups) work += n * ((int64_t(g.x.size()) + kMaxRows - 1) / kMaxRows);
  int64_t tr = std::clamp<int64_t>((work / (threads * 8) + 7) / 8 * 8, 8, 1024);
  std::vector<Task> tasks;
  for (auto& g : groups)
    for (size_t m0 = 0; m0 < g.x.size(); m0 += kMaxRows) {
      int rows = int(std::min<size_t>(kMaxRows, g.x.size() - m0));
      for (int64_t n0 = 0; n0 < n; n0 += tr)
        tasks.push_back({g.wrow, n0, std::min(n, n0 + tr), rows, g.x.data() + m0,
                         g.y.data() + m0, g.amx.empty() ? nullptr : g.amx.data()});
    }
  return tasks;
}

}  // namespace ds4
