// AVX-512 visitors: the exact f32 values of one 256-element chunk of a weight row, handed to
// a consumer 32 elements at a time as two vectors (no round trip through memory):
//
//   vis_<type>(p, c, len, f)  calls  f(off, w_lo, w_hi, mask_lo, mask_hi)
//
// for elements [off, off + 16) and [off + 16, off + 32) of chunk c (masks cover a short F16 /
// BF16 tail; lanes past it are 0). Values and operation order are blocks.h's (gguf-py's), so
// they are bit-identical to the jnp kernels; tests/quant/matmul_test.py checks every type
// through one-hot activations.
#pragma once

#include "blocks.h"

#if DS4_AVX512

namespace ds4 {

// IQ2_XXS grid rows + 128, [256][8] (filled with the grid): the 2 KiB a chunk's rows are
// gathered from (they stay in L1), signed by byte masks (iq2_rows).
extern uint8_t g_iq2xxs_biased[256][8];

constexpr __mmask16 kAll = 0xFFFF;

inline __m512 cvt_i8(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }
inline __m128i load16(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }

template <class F>
__attribute__((always_inline)) inline void vis_q8_0(const uint8_t* const* p, int64_t c, int len, F&& f) {
  const uint16_t* d = u16(p[0]) + c * 8;
  const int8_t* qs = reinterpret_cast<const int8_t*>(p[1]) + c * CK;
  int nb = len / 32;
  alignas(32) float ds[8];
  if (nb == 8) {
    _mm256_store_ps(ds, _mm256_cvtph_ps(load16(d)));  // exact, subnormal halves too
  } else {
    for (int b = 0; b < nb; ++b) ds[b] = h2f(d[b]);
  }
  for (int b = 0; b < nb; ++b) {
    __m512 db = _mm512_set1_ps(ds[b]);
    f(32 * b, _mm512_mul_ps(cvt_i8(load16(qs + 32 * b)), db),
      _mm512_mul_ps(cvt_i8(load16(qs + 32 * b + 16)), db), kAll, kAll);
  }
}

template <class F>
__attribute__((always_inline)) inline void vis_q2_k(const uint8_t* const* p, int64_t c, int, F&& f) {
  const uint8_t* qs = p[1] + c * 64;
  __m512 d = _mm512_set1_ps(h2f(u16(p[2])[c])), dmin = _mm512_set1_ps(h2f(u16(p[3])[c]));
  __m512i sc = _mm512_cvtepu8_epi32(load16(p[0] + c * 16));
  alignas(64) float dl[16], ml[16];
  _mm512_store_ps(dl, _mm512_mul_ps(d, _mm512_cvtepi32_ps(
                                           _mm512_and_si512(sc, _mm512_set1_epi32(15)))));
  _mm512_store_ps(ml, _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_srli_epi32(sc, 4))));
  const __m512i three = _mm512_set1_epi32(3);
  for (int h = 0; h < 2; ++h) {
    __m512i q0 = _mm512_cvtepu8_epi32(load16(qs + 32 * h));
    __m512i q1 = _mm512_cvtepu8_epi32(load16(qs + 32 * h + 16));
    for (int s = 0; s < 4; ++s) {
      int g = 8 * h + 2 * s;
      __m512 v0 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(q0, 2 * s), three));
      __m512 v1 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(q1, 2 * s), three));
      f(128 * h + 32 * s,
        _mm512_fmsub_ps(_mm512_set1_ps(dl[g]), v0, _mm512_set1_ps(ml[g])),
        _mm512_fmsub_ps(_mm512_set1_ps(dl[g + 1]), v1, _mm512_set1_ps(ml[g + 1])), kAll, kAll);
    }
  }
}

template <class F>
__attribute__((always_inline)) inline void vis_q4_k(const uint8_t* const* p, int64_t c, int, F&& f) {
  float d = h2f(u16(p[0])[c]), dmin = h2f(u16(p[1])[c]);
  const uint8_t* s = p[2] + c * 12;
  const uint8_t* qs = p[3] + c * 128;
  const __m512i fifteen = _mm512_set1_epi32(15);
  for (int c4 = 0; c4 < 4; ++c4) {
    int sc0, m0, sc1, m1;
    q4k_scale_min(s, 2 * c4, &sc0, &m0);
    q4k_scale_min(s, 2 * c4 + 1, &sc1, &m1);
    __m512 dl0 = _mm512_set1_ps(d * float(sc0)), ml0 = _mm512_set1_ps(dmin * float(m0));
    __m512 dl1 = _mm512_set1_ps(d * float(sc1)), ml1 = _mm512_set1_ps(dmin * float(m1));
    __m512i qa = _mm512_cvtepu8_epi32(load16(qs + 32 * c4));
    __m512i qb = _mm512_cvtepu8_epi32(load16(qs + 32 * c4 + 16));
    f(64 * c4, _mm512_fmsub_ps(dl0, _mm512_cvtepi32_ps(_mm512_and_si512(qa, fifteen)), ml0),
      _mm512_fmsub_ps(dl0, _mm512_cvtepi32_ps(_mm512_and_si512(qb, fifteen)), ml0), kAll, kAll);
    f(64 * c4 + 32, _mm512_fmsub_ps(dl1, _mm512_cvtepi32_ps(_mm512_srli_epi32(qa, 4)), ml1),
      _mm512_fmsub_ps(dl1, _mm512_cvtepi32_ps(_mm512_srli_epi32(qb, 4)), ml1), kAll, kAll);
  }
}

// ksigns_iq2xs: 7 sign bits -> 8 (the 8th is their parity), one byte each.
struct KSigns {
  alignas(64) uint8_t v[128];
  constexpr KSigns() : v() {
    for (int s = 0; s < 128; ++s) {
      int par = 0;
      for (int b = 0; b < 7; ++b) par ^= (s >> b) & 1;
      v[s] = uint8_t(s | (par << 7));
    }
  }
};
inline constexpr KSigns kKSigns{};

// The 32 signed grid rows of chunk c of an IQ2_XXS weight row, each byte + 128 (u8), in the
// order `perm` (64 bytes) gives: out[i] lane L (bytes 8L .. 8L + 8) is sub-group perm[8i + L]
// (sub-group j: elements 8j .. 8j + 8, grid index idx[j], 7 sign bits aux[j / 4] >> 7 (j % 4));
// perm[32 + t] must be 32 + perm[t]. The rows come from the 2 KiB g_iq2xxs_biased by gathers,
// their signs as one mask bit per byte: -(g + 128) = 128 - g (mod 256).
__attribute__((always_inline)) inline void iq2_rows(const uint8_t* const* p, int64_t c,
                                                    const uint8_t* perm, __m512i* out) {
  const uint8_t* idx = p[1] + c * 32;
  const uint8_t* aux = p[2] + c * 32;
#if defined(__AVX512VBMI__)
  // Bits 7l .. 7l + 7 of each aux word (l < 4) as bytes, in sub-group order (bit 7 is not read).
  const __m256i at = _mm256_set1_epi64x(0x352E2720150E0700LL);
  __m256i s7 = _mm256_multishift_epi64_epi8(at, _mm256_loadu_si256((const __m256i*)aux));
  __m512i z = _mm512_permutexvar_epi8(
      _mm512_loadu_si512(perm),
      _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)idx)), s7, 1));
  __m512i s8 = _mm512_permutex2var_epi8(_mm512_load_si512(kKSigns.v), z,
                                        _mm512_load_si512(kKSigns.v + 64));
  alignas(64) uint64_t m[8];
  _mm512_store_si512(m, s8);  // m[4 + i]: the sign bits of out[i]
  __m512i i0 = _mm512_cvtepu8_epi32(_mm512_castsi512_si128(z));
  __m512i i1 = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(z, 1));
  const __m512i zero = _mm512_setzero_si512();
  for (int i = 0; i < 4; ++i) {
    __m512i ii = i < 2 ? i0 : i1;
    __m512i g = _mm512_i32gather_epi64(i & 1 ? _mm512_extracti64x4_epi64(ii, 1)
                                             : _mm512_castsi512_si256(ii),
                                       g_iq2xxs_biased, 8);
    out[i] = _mm512_mask_sub_epi8(g, _cvtu64_mask64(m[4 + i]), zero, g);
  }
#else
  alignas(64) uint8_t rows[4][64];
  for (int t = 0; t < 32; ++t) {
    int j = perm[t];
    uint32_t a;
    std::memcpy(&a, aux + 4 * (j / 4), 4);
    uint32_t s8 = iq2_signs(a, j % 4);
    for (int b = 0; b < 8; ++b) {
      uint8_t v = g_iq2xxs_biased[idx[j]][b];
      rows[t / 8][8 * (t % 8) + b] = (s8 >> b) & 1 ? uint8_t(-v) : v;
    }
  }
  for (int i = 0; i < 4; ++i) out[i] = _mm512_load_si512(rows[i]);
#endif
}

// iq2_rows orders: sub-groups in element order, and the paired layout of q8.h.
struct Iq2Perm {
  alignas(64) uint8_t v[64];
  constexpr explicit Iq2Perm(bool paired) : v() {
    for (int t = 0; t < 32; ++t) {
      int j = paired ? 4 * (t % 8) + t / 8 : t;  // out[s] lane Q: sub-group 4Q + s
      v[t] = uint8_t(j);
      v[32 + t] = uint8_t(32 + j);
    }
  }
};
inline constexpr Iq2Perm kIq2Plain{false}, kIq2Paired{true};

template <class F>
__attribute__((always_inline)) inline void vis_iq2_xxs(const uint8_t* const* p, int64_t c, int, F&& f) {
  const uint32_t* aux = reinterpret_cast<const uint32_t*>(p[2]) + c * 8;
  __m512i rows[4];  // groups 2i, 2i + 1 in element order
  iq2_rows(p, c, kIq2Plain.v, rows);
  // db = d * (0.5 + s) * 0.25 per group, in gguf-py's order.
  __m256 s = _mm256_cvtepi32_ps(_mm256_srli_epi32(_mm256_loadu_si256((const __m256i*)aux), 28));
  alignas(32) float db[8];
  _mm256_store_ps(db, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(h2f(u16(p[0])[c])),
                                                  _mm256_add_ps(_mm256_set1_ps(0.5f), s)),
                                    _mm256_set1_ps(0.25f)));
  for (int gp = 0; gp < 4; ++gp) {
    __m512i v = _mm512_xor_si512(rows[gp], _mm512_set1_epi8(char(0x80)));  // signed
    for (int h = 0; h < 2; ++h) {
      int g = 2 * gp + h;
      __m512 dbv = _mm512_set1_ps(db[g]);
      __m128i lo = h ? _mm512_extracti32x4_epi32(v, 2) : _mm512_castsi512_si128(v);
      __m128i hi = h ? _mm512_extracti32x4_epi32(v, 3) : _mm512_extracti32x4_epi32(v, 1);
      f(32 * g, _mm512_mul_ps(dbv, cvt_i8(lo)), _mm512_mul_ps(dbv, cvt_i8(hi)), kAll, kAll);
    }
  }
}

template <class F>
__attribute__((always_inline)) inline void vis_mxfp4(const uint8_t* const* p, int64_t c, int len, F&& f) {
  const uint8_t* e = p[0] + c * 8;
  const uint8_t* qs = p[1] + c * 128;
  const __m512 kv = _mm512_loadu_ps(kMxfp4);
  const __m512i fifteen = _mm512_set1_epi32(15);
  for (int b = 0; b < len / 32; ++b) {
    __m512 db = _mm512_set1_ps(mxfp4_scale(e[b]));
    __m512i q = _mm512_cvtepu8_epi32(load16(qs + 16 * b));
    f(32 * b, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(q, fifteen), kv), db),
      _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), kv), db), kAll, kAll);
  }
}

inline __mmask16 tail_mask(int n) { return n >= 16 ? kAll : n <= 0 ? 0 : __mmask16((1u << n) - 1); }

template <class F>
__attribute__((always_inline)) inline void vis_f16(const uint8_t* const* p, int64_t c, int len, F&& f) {
  const uint16_t* h = u16(p[0]) + c * CK;
  for (int i = 0; i < len; i += 32) {
    __mmask16 m0 = tail_mask(len - i), m1 = tail_mask(len - i - 16);
    f(i, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m0, h + i)),
      _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m1, h + i + 16)), m0, m1);
  }
}

template <class F>
__attribute__((always_inline)) inline void vis_bf16(const uint8_t* const* p, int64_t c, int len, F&& f) {
  const uint16_t* h = u16(p[0]) + c * CK;
  auto cvt = [](__m256i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  };
  for (int i = 0; i < len; i += 32) {
    __mmask16 m0 = tail_mask(len - i), m1 = tail_mask(len - i - 16);
    f(i, cvt(_mm256_maskz_loadu_epi16(m0, h + i)), cvt(_mm256_maskz_loadu_epi16(m1, h + i + 16)),
      m0, m1);
  }
}

template <int Q, class F>
__attribute__((always_inline)) inline void visit(const uint8_t* const* p, int64_t c, int len, F&& f) {
  if constexpr (Q == kQ8_0) vis_q8_0(p, c, len, f);
  else if constexpr (Q == kQ2_K) vis_q2_k(p, c, len, f);
  else if constexpr (Q == kQ4_K) vis_q4_k(p, c, len, f);
  else if constexpr (Q == kIQ2_XXS) vis_iq2_xxs(p, c, len, f);
  else if constexpr (Q == kMXFP4) vis_mxfp4(p, c, len, f);
  else if constexpr (Q == kF16) vis_f16(p, c, len, f);
  else vis_bf16(p, c, len, f);
}

}  // namespace ds4

#endif
