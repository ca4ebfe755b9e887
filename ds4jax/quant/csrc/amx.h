// Q8_0 times 2 .. kAmxRows q8 x rows on AMX-INT8 (TDPBSSD), the same numbers as the VNNI
// kernels of q8.h bit for bit, so a row's result still does not depend on the batch.
//
// q8.h's paired kernel gives lane 2Q + t of a (weight row, x row) sum the integer half-block
// sum over elements 8s + 4t + i (s, i < 4) of block 8c + Q, then acc[2Q + t] += float(isum) *
// (dw * dx) chunk by chunk, and y = _mm512_reduce_add_ps(acc). Here one TDPBSSD per block
// multiplies 16 weight rows (the A tile: 32 int8 of the block per row, straight from the qs
// plane) by the x rows laid out as B columns 2m + t (x row m, only the half-t groups of 4: the
// others are 0), so C[row][2m + t] is that same half-block sum. Each row keeps 8 accumulators
// (Q = b mod 8) with lanes 2m + t and gets the same FMA with the same scale per block; at the
// end the 8 x 8 qwords are transposed to lanes 2Q + t and reduced as q8.h does.
//
// The weight work per block is one tile load and one tile product for 16 rows, where the VNNI
// kernel pays per row and x row; what is left is per row and block: a convert, a scale and an
// FMA for all x rows at once. Needs the kernel's permission for the tile data (arch_prctl,
// once per process); without it (or AMX) the VNNI kernels run.
#pragma once

#if DS4_VNNI && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define DS4_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

namespace ds4 {

constexpr int kAmxRows = 8;      // x rows: M columns per block of a pair, one C tile
constexpr int kAmxPair = 1088;   // bytes per block pair of the x tile data: B 16 x 64, dx 16 f32

inline bool amx_ok() {
  static const bool ok = [] {
    constexpr long kReqPerm = 0x1023, kXTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kReqPerm, kXTileData) == 0;
  }();
  return ok;
}

inline bool amx_applies(const Weight& w, size_t rows) {
  return w.q8 && w.qtype == kQ8_0 && w.k % 64 == 0 && rows >= 2 && rows <= size_t(kAmxRows) &&
         amx_ok();
}

// The x rows (paired Act8, q8.h) of one call as B tiles: per block pair j, kAmxPair bytes at
// out + j * kAmxPair: B row r (elements 4 (r % 8) .. + 4 of block 2j + r / 8) holds x row m's 4
// int8 in column (r / 8) M + m, zeros in the other block's columns; then 16 f32, lane p M + m
// = x row m's scale of block 2j + p.
inline void amx_x_tiles(const float* const* x, int m, int64_t k, std::vector<uint8_t>* out) {
  int64_t nb = k / 32;
  out->assign(size_t(nb / 2 * kAmxPair), 0);
  for (int i = 0; i < m; ++i) {
    Act8 a = Act8::at(x[i], k);
    for (int64_t b = 0; b < nb; ++b) {
      int64_t c = b / 8, blk = b % 8, p = b % 2;
      uint8_t* bt = out->data() + b / 2 * kAmxPair;
      for (int r = 0; r < 8; ++r)  // elements 4r .. 4r + 4: qword r / 2, half r % 2
        std::memcpy(bt + 64 * (8 * p + r) + 4 * (p * m + i),
                    a.q + CK * c + 64 * (r / 2) + 4 * (2 * blk + r % 2), 4);
      reinterpret_cast<float*>(bt + 1024)[p * m + i] = a.d[16 * c + 2 * blk];
    }
  }
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0 (A: 16 weight rows x 64 int8, a block pair), 1 (B: 16 x 8M), 2 (C: 16 rows x 2M
// int32), and 3-5 the same.
inline void amx_config(int m) {
  TileConfig cfg;
  for (int t = 0; t < 6; t += 3) {
    cfg.colsb[t] = 64;
    cfg.colsb[t + 1] = cfg.colsb[t + 2] = uint16_t(8 * m);
    cfg.rows[t] = cfg.rows[t + 1] = cfg.rows[t + 2] = 16;
  }
  _tile_loadconfig(&cfg);
}

// 16 Q8_0 weight rows [wrow, wrow + 16) times M x rows (their tile data xt), into y[m][n + r].
template <int M>
void tile_amx(const Weight& w, int64_t wrow, int64_t n, const uint8_t* xt, float* const* y) {
  const int8_t* qs = reinterpret_cast<const int8_t*>(w.base[1] + wrow * w.row_bytes[1]);
  const uint8_t* d = w.base[0] + wrow * w.row_bytes[0];
  int64_t nb = w.k / 32, n_chunks = Act8::chunked(w.k) / CK;
  alignas(64) __m512 acc[16][4];  // [row][J]: lane p M + m sums block 8c + 2J + p, x row m
  alignas(64) int32_t ct[2][16][16] = {};
  alignas(32) float dw[16][8];
  __m512i widx[4];  // lane p M + m of pair J: 2J + p, the chunk's block of dw
  for (int j = 0; j < 4; ++j) {
    alignas(64) int32_t t[16] = {};
    for (int l = 0; l < 2 * M; ++l) t[l] = 2 * j + l / M;
    widx[j] = _mm512_load_si512(t);
  }
  for (auto& r : acc)
    for (auto& v : r) v = _mm512_setzero_ps();
  for (int64_t c = 0; c < n_chunks; ++c) {
    if (g_prefetch) prefetch_next(w, wrow + 16 * kPrefetchRows, 16, c, n_chunks);
    int npc = int(std::min<int64_t>(8, nb - 8 * c)) / 2;  // block pairs in this chunk
    __mmask8 mk = __mmask8((1u << (2 * npc)) - 1);
    for (int r = 0; r < 16; ++r)
      _mm256_store_ps(dw[r], _mm256_cvtph_ps(_mm_maskz_loadu_epi16(
                                 mk, reinterpret_cast<const uint16_t*>(d + r * w.row_bytes[0]) + 8 * c)));
    // Pairs two at a time on the two sets of tiles, so the products overlap.
    for (int jj = 0; jj < npc; jj += 2) {
      int64_t j = 4 * c + jj;
      const uint8_t* bt = xt + j * kAmxPair;
      bool two = jj + 1 < npc;
      _tile_zero(2);
      _tile_loadd(0, qs + 64 * j, w.row_bytes[1]);
      _tile_loadd(1, bt, 64);
      _tile_dpbssd(2, 0, 1);
      if (two) {
        _tile_zero(5);
        _tile_loadd(3, qs + 64 * j + 64, w.row_bytes[1]);
        _tile_loadd(4, bt + kAmxPair, 64);
        _tile_dpbssd(5, 3, 4);
      }
      _tile_stored(2, ct[0], 64);
      if (two) _tile_stored(5, ct[1], 64);
      for (int h = 0; h < 1 + two; ++h) {
        __m512 dx = _mm512_loadu_ps(reinterpret_cast<const float*>(bt + h * kAmxPair + 1024));
        for (int r = 0; r < 16; ++r) {
          __m512 sc = _mm512_mul_ps(
              _mm512_permutexvar_ps(widx[jj + h], _mm512_castps256_ps512(_mm256_load_ps(dw[r]))), dx);
          acc[r][jj + h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(ct[h][r])), sc,
                                           acc[r][jj + h]);
        }
      }
    }
  }
  // y = sum8 of the 8 block accumulators a_Q (Q = 2J + p), in sum8's order, M rows at once.
  const __m512i down = _mm512_add_epi32(_mm512_set1_epi32(M), _mm512_setr_epi32(
      0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  for (int r = 0; r < 16; ++r) {
    __m512 u[4];
    for (int j = 0; j < 4; ++j)  // lane m: a_2J + a_2J+1
      u[j] = _mm512_add_ps(acc[r][j], _mm512_permutexvar_ps(down, acc[r][j]));
    alignas(64) float t[16];
    _mm512_store_ps(t, _mm512_add_ps(_mm512_add_ps(u[0], u[1]), _mm512_add_ps(u[2], u[3])));
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) y[m][n + r] = t[m];
  }
}

template <int... Ms>
struct AmxTable {
  static constexpr void (*fns[])(const Weight&, int64_t, int64_t, const uint8_t*,
                                 float* const*) = {tile_amx<Ms>...};
};

// Weight rows [n0, n1) of a task on AMX in tiles of 16 (a shorter tail on the VNNI kernel).
inline void run_amx(const Weight& w, int64_t wrow, int64_t n0, int64_t n1, int m,
                    const uint8_t* xt, const float* const* x, float* const* y) {
  amx_config(m);
  auto f = AmxTable<2, 3, 4, 5, 6, 7, 8>::fns[m - 2];
  int64_t n = n0;
  for (; n + 16 <= n1; n += 16) f(w, wrow + n, n, xt, y);
  _tile_release();
  if (n < n1) rows_q8_fn(w.qtype, m)(w, wrow + n, int(n1 - n), n, x, y);
}

}  // namespace ds4

#else
#define DS4_AMX 0

namespace ds4 {
inline bool amx_applies(const Weight&, size_t) { return false; }
inline void amx_x_tiles(const float* const*, int, int64_t, std::vector<uint8_t>*) {}
inline void run_amx(const Weight&, int64_t, int64_t, int64_t, int, const uint8_t*,
                    const float* const*, float* const*) {}
}  // namespace ds4
#endif
