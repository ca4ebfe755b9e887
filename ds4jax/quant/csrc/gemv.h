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

// Rows ahead whose bytes are prefetched while a row computes.
constexpr int kPrefetchRows = 2;

#if DS4_AVX512

// y[m][n] = weight row `wrow` . x[m] for m < M: each chunk's exact values (avx512.h visitors)
// go straight into FMAs, on A independent accumulators per row of x (4 for M = 1).
template <int Q, int M>
void row_kernel(const Weight& w, int64_t wrow, int64_t n, const float* const* x,
                float* const* y) {
  constexpr int A = 2;  // the same for every M: a row's sums do not depend on the batch
  const uint8_t* p[4];
  w.row(wrow, p);
  __m512 acc[M][A];
  for (int m = 0; m < M; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_ps();
  int64_t c = 0, n_chunks = (w.k + CK - 1) / CK;
  for (int64_t k0 = 0; k0 < w.k; k0 += CK, ++c) {
    int len = int(std::min<int64_t>(CK, w.k - k0));
    if (g_prefetch) prefetch_next(w, wrow + kPrefetchRows, 1, c, n_chunks);
    visit<Q>(p, c, len, [&](int off, __m512 w0, __m512 w1, __mmask16 m0, __mmask16 m1) {
      for (int m = 0; m < M; ++m) {
        acc[m][0] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m0, x[m] + k0 + off), acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(m1, x[m] + k0 + off + 16),
                                    acc[m][1]);
      }
      if constexpr (A == 4) {
        for (int m = 0; m < M; ++m) {
          std::swap(acc[m][0], acc[m][2]);
          std::swap(acc[m][1], acc[m][3]);
        }
      }
    });
  }
  for (int m = 0; m < M; ++m) {
    __m512 s = acc[m][0];
    for (int a = 1; a < A; ++a) s = _mm512_add_ps(s, acc[m][a]);
    y[m][n] = _mm512_reduce_add_ps(s);
  }
}

#else

// Portable: dequantise a chunk into a buffer (blocks.h), then multiply-add.
template <int Q, int M>
void row_kernel(const Weight& w, int64_t wrow, int64_t n, const float* const* x,
                float* const* y) {
  alignas(64) float buf[CK];
  const uint8_t* p[4];
  w.row(wrow, p);
  float acc[M][16] = {};
  int64_t c = 0;
  for (int64_t k0 = 0; k0 < w.k; k0 += CK, ++c) {
    int len = int(std::min<int64_t>(CK, w.k - k0));
    w.deq(p, c, len, buf);
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < len; ++i) acc[m][i & 15] += buf[i] * x[m][k0 + i];
  }
  for (int m = 0; m < M; ++m) {
    float s = 0;
    for (int i = 0; i < 16; ++i) s += acc[m][i];
    y[m][n] = s;
  }
}

#endif

template <int Q, int... Ms>
struct RowTable {
  static constexpr RowsFn fns[] = {row_kernel<Q, Ms>...};
};
template <int Q>
using Rows = RowTable<Q, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16>;

inline RowsFn rows_fn(int qtype, int m) {
  switch (qtype) {
    case kQ8_0: return Rows<kQ8_0>::fns[m - 1];
    case kQ2_K: return Rows<kQ2_K>::fns[m - 1];
    case kQ4_K: return Rows<kQ4_K>::fns[m - 1];
    case kIQ2_XXS: return Rows<kIQ2_XXS>::fns[m - 1];
    case kMXFP4: return Rows<kMXFP4>::fns[m - 1];
    case kF16: return Rows<kF16>::fns[m - 1];
    default: return Rows<kBF16>::fns[m - 1];
  }
}

inline void run_task(const Weight& w, const Task& t) {
  RowsFn f = rows_fn(w.qtype, t.rows);
  for (int64_t n = t.n0; n < t.n1; ++n) f(w, t.wrow + n, n, t.x, t.y);
}

// q8 activations: x rows -> int8 blocks of 32 times amax / 127, as float (the values the
// integer sums multiply). The last block of a row shorter than 32 is a block too.
inline void quantize_rows(const float* x, int64_t rows, int64_t k, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * k;
    float* o = out + r * k;
    for (int64_t b = 0; b < k; b += 32) {
      int64_t e = std::min<int64_t>(k, b + 32);
      float amax = 0;
      for (int64_t i = b; i < e; ++i) amax = std::max(amax, std::fabs(xr[i]));
      float d = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
      for (int64_t i = b; i < e; ++i) o[i] = std::nearbyint(xr[i] * id) * d;
    }
  }
}

// Runs the groups (a weight row offset and a list of activation rows each) in tasks.
struct Group {
  int64_t wrow;
  std::vector<const float*> x;
  std::vector<float*> y;
};

inline std::vector<Task> plan_tasks(int64_t threads, int64_t n, std::vector<Group>& groups) {
  int64_t work = 0;
  for (auto& g : groups) work += n * ((int64_t(g.x.size()) + kMaxRows - 1) / kMaxRows);
  int64_t tr = std::clamp<int64_t>((work / (threads * 8) + 7) / 8 * 8, 8, 1024);
  std::vector<Task> tasks;
  for (auto& g : groups)
    for (size_t m0 = 0; m0 < g.x.size(); m0 += kMaxRows) {
      int rows = int(std::min<size_t>(kMaxRows, g.x.size() - m0));
      for (int64_t n0 = 0; n0 < n; n0 += tr)
        tasks.push_back({g.wrow, n0, std::min(n, n0 + tr), rows, g.x.data() + m0,
                         g.y.data() + m0});
    }
  return tasks;
}

}  // namespace ds4
