// Exact GGML block dequantisers for the CPU kernels (ds4jax/quant/csrc/ds4_cpu.cc).
//
// Each `deq_*` writes the float32 values of one 256-element chunk of one weight row (fewer at
// the end of an F16/BF16 row) to `out`, bit for bit what gguf-py's `dequantize` and the jnp
// kernels (ds4jax/quant/kernels.py) give: the same f32 operations in the same order, every
// product exact (see kernels.py), the K-quants' final `- m` rounded once (an FMA of an exact
// product rounds the same way). MXFP4 scales of e < 2 (f32 subnormals) read as 0, as XLA:CPU
// does. A row is read through its plane pointers `p[i]` (the planes of `kernels.PLANES`, one
// row each): e.g. Q8_0 `p[0]` = d (f16 [B]), `p[1]` = qs (int8 [B, 32]).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__)
#define DS4_AVX512 1
#include <immintrin.h>
#else
#define DS4_AVX512 0
#endif

namespace ds4 {

enum QType : int {
  kF16 = 1, kQ8_0 = 8, kQ2_K = 10, kQ4_K = 12, kIQ2_XXS = 16, kBF16 = 30, kMXFP4 = 39
};
constexpr int CK = 256;  // elements per chunk

// Grid of IQ2_XXS as bytes 8/25/43, [256][8] (filled from Python: gguf-py's init_grid).
extern uint8_t g_iq2xxs_grid[256][8];

inline float bits_f32(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }

// float16 bits -> float32, exact (subnormals, inf, NaN), never flushed: kernels.f16_to_f32.
inline float h2f(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, em = h & 0x7FFFu;
  if (em < 0x400) {
    float t = float(em) * 0x1p-24f;
    return sign ? -t : t;
  }
  if (em >= 0x7C00) return bits_f32(sign | (em << 13) | 0x7F800000u);
  return bits_f32(sign | ((em << 13) + (112u << 23)));
}

inline const uint16_t* u16(const uint8_t* p) { return reinterpret_cast<const uint16_t*>(p); }

inline void q4k_scale_min(const uint8_t* s, int j, int* sc, int* m) {
  if (j < 4) {
    *sc = s[j] & 63; *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

inline uint32_t iq2_signs(uint32_t aux, int l) {  // ksigns_iq2xs[(aux >> 7l) & 127]
  uint32_t s7 = (aux >> (7 * l)) & 127u;
  return s7 | (uint32_t(__builtin_parity(s7)) << 7);
}

constexpr float kMxfp4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

inline float mxfp4_scale(uint8_t e) { return e < 2 ? 0.0f : bits_f32(uint32_t(e - 1) << 23); }

#if DS4_AVX512

inline __m512 i8x16_f32(const void* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
inline __m512i u8x16_i32(const void* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
}

inline void deq_q8_0(const uint8_t* const* p, int64_t c, int len, float* out) {
  const uint16_t* d = u16(p[0]) + c * 8;
  const int8_t* qs = reinterpret_cast<const int8_t*>(p[1]) + c * CK;
  for (int b = 0; b < len / 32; ++b) {
    __m512 db = _mm512_set1_ps(h2f(d[b]));
    _mm512_store_ps(out + 32 * b, _mm512_mul_ps(i8x16_f32(qs + 32 * b), db));
    _mm512_store_ps(out + 32 * b + 16, _mm512_mul_ps(i8x16_f32(qs + 32 * b + 16), db));
  }
}

inline void deq_q2_k(const uint8_t* const* p, int64_t c, int, float* out) {
  const uint8_t* sc = p[0] + c * 16;
  const uint8_t* qs = p[1] + c * 64;
  float d = h2f(u16(p[2])[c]), dmin = h2f(u16(p[3])[c]);
  const __m512i three = _mm512_set1_epi32(3);
  for (int h = 0; h < 2; ++h) {
    for (int j = 0; j < 2; ++j) {
      __m512i q = u8x16_i32(qs + 32 * h + 16 * j);
      for (int s = 0; s < 4; ++s) {
        int g = 8 * h + 2 * s + j;
        __m512 dl = _mm512_set1_ps(d * float(sc[g] & 15));
        __m512 ml = _mm512_set1_ps(dmin * float(sc[g] >> 4));
        __m512 qv = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(q, 2 * s), three));
        _mm512_store_ps(out + 128 * h + 32 * s + 16 * j, _mm512_fmsub_ps(dl, qv, ml));
      }
    }
  }
}

inline void deq_q4_k(const uint8_t* const* p, int64_t c, int, float* out) {
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
    for (int l = 0; l < 32; l += 16) {
      __m512i q = u8x16_i32(qs + 32 * c4 + l);
      __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, fifteen));
      __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
      _mm512_store_ps(out + 64 * c4 + l, _mm512_fmsub_ps(dl0, lo, ml0));
      _mm512_store_ps(out + 64 * c4 + 32 + l, _mm512_fmsub_ps(dl1, hi, ml1));
    }
  }
}

inline void deq_iq2_xxs(const uint8_t* const* p, int64_t c, int, float* out) {
  float d = h2f(u16(p[0])[c]);
  const uint8_t* idx = p[1] + c * 32;
  const uint32_t* aux = reinterpret_cast<const uint32_t*>(p[2]) + c * 8;
  const __m512 neg = _mm512_set1_ps(-0.0f);
  for (int g = 0; g < 8; ++g) {
    uint32_t a;
    std::memcpy(&a, aux + g, 4);
    __m512 db = _mm512_set1_ps(d * (0.5f + float(a >> 28)) * 0.25f);
    uint64_t r[4];
    uint32_t mask = 0;
    for (int l = 0; l < 4; ++l) {
      std::memcpy(&r[l], g_iq2xxs_grid[idx[4 * g + l]], 8);
      mask |= iq2_signs(a, l) << (8 * l);
    }
    __m128i lo = _mm_set_epi64x(int64_t(r[1]), int64_t(r[0]));
    __m128i hi = _mm_set_epi64x(int64_t(r[3]), int64_t(r[2]));
    __m512 v0 = _mm512_mul_ps(db, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)));
    __m512 v1 = _mm512_mul_ps(db, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)));
    // Negation is a sign flip (xor), so -(db * grid) keeps gguf-py's -0.0 for db = 0.
    _mm512_store_ps(out + 32 * g, _mm512_mask_xor_ps(v0, __mmask16(mask), v0, neg));
    _mm512_store_ps(out + 32 * g + 16, _mm512_mask_xor_ps(v1, __mmask16(mask >> 16), v1, neg));
  }
}

inline void deq_mxfp4(const uint8_t* const* p, int64_t c, int len, float* out) {
  const uint8_t* e = p[0] + c * 8;
  const uint8_t* qs = p[1] + c * 128;
  const __m512 kv = _mm512_loadu_ps(kMxfp4);
  const __m512i fifteen = _mm512_set1_epi32(15);
  for (int b = 0; b < len / 32; ++b) {
    __m512 db = _mm512_set1_ps(mxfp4_scale(e[b]));
    __m512i q = u8x16_i32(qs + 16 * b);
    __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(q, fifteen), kv);
    __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), kv);
    _mm512_store_ps(out + 32 * b, _mm512_mul_ps(lo, db));
    _mm512_store_ps(out + 32 * b + 16, _mm512_mul_ps(hi, db));
  }
}

inline void deq_f16(const uint8_t* const* p, int64_t c, int len, float* out) {
  const uint16_t* h = u16(p[0]) + c * CK;
  int i = 0;
  for (; i + 16 <= len; i += 16)
    _mm512_store_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(h + i))));
  if (i < len) {
    __mmask16 m = __mmask16((1u << (len - i)) - 1);
    _mm512_store_ps(out + i, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, h + i)));
  }
}

inline void deq_bf16(const uint8_t* const* p, int64_t c, int len, float* out) {
  const uint16_t* h = u16(p[0]) + c * CK;
  int i = 0;
  for (; i + 16 <= len; i += 16) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(h + i)));
    _mm512_store_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
  }
  if (i < len) {
    __mmask16 m = __mmask16((1u << (len - i)) - 1);
    __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, h + i));
    _mm512_store_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
  }
}

#else  // portable scalar versions (same arithmetic)

inline void deq_q8_0(const uint8_t* const* p, int64_t c, int len, float* out) {
  const uint16_t* d = u16(p[0]) + c * 8;
  const int8_t* qs = reinterpret_cast<const int8_t*>(p[1]) + c * CK;
  for (int b = 0; b < len / 32; ++b) {
    float db = h2f(d[b]);
    for (int j = 0; j < 32; ++j) out[32 * b + j] = float(qs[32 * b + j]) * db;
  }
}

inline void deq_q2_k(const uint8_t* const* p, int64_t c, int, float* out) {
  const uint8_t* sc = p[0] + c * 16;
  const uint8_t* qs = p[1] + c * 64;
  float d = h2f(u16(p[2])[c]), dmin = h2f(u16(p[3])[c]);
  for (int h = 0; h < 2; ++h)
    for (int s = 0; s < 4; ++s)
      for (int j = 0; j < 2; ++j) {
        int g = 8 * h + 2 * s + j;
        float dl = d * float(sc[g] & 15), ml = dmin * float(sc[g] >> 4);
        for (int i = 0; i < 16; ++i) {
          float q = float((qs[32 * h + 16 * j + i] >> (2 * s)) & 3);
          out[128 * h + 32 * s + 16 * j + i] = dl * q - ml;  // dl * q is exact
        }
      }
}

inline void deq_q4_k(const uint8_t* const* p, int64_t c, int, float* out) {
  float d = h2f(u16(p[0])[c]), dmin = h2f(u16(p[1])[c]);
  const uint8_t* s = p[2] + c * 12;
  const uint8_t* qs = p[3] + c * 128;
  for (int c4 = 0; c4 < 4; ++c4)
    for (int h = 0; h < 2; ++h) {
      int sc, m;
      q4k_scale_min(s, 2 * c4 + h, &sc, &m);
      float dl = d * float(sc), ml = dmin * float(m);
      for (int l = 0; l < 32; ++l) {
        out[64 * c4 + 32 * h + l] = dl * float((qs[32 * c4 + l] >> (4 * h)) & 15) - ml;
      }
    }
}

inline void deq_iq2_xxs(const uint8_t* const* p, int64_t c, int, float* out) {
  float d = h2f(u16(p[0])[c]);
  const uint8_t* idx = p[1] + c * 32;
  const uint32_t* aux = reinterpret_cast<const uint32_t*>(p[2]) + c * 8;
  for (int g = 0; g < 8; ++g) {
    uint32_t a;
    std::memcpy(&a, aux + g, 4);
    float db = d * (0.5f + float(a >> 28)) * 0.25f;
    for (int l = 0; l < 4; ++l) {
      uint32_t s8 = iq2_signs(a, l);
      for (int j = 0; j < 8; ++j) {
        float v = db * float(g_iq2xxs_grid[idx[4 * g + l]][j]);
        out[32 * g + 8 * l + j] = (s8 >> j) & 1 ? -v : v;
      }
    }
  }
}

inline void deq_mxfp4(const uint8_t* const* p, int64_t c, int len, float* out) {
  const uint8_t* e = p[0] + c * 8;
  const uint8_t* qs = p[1] + c * 128;
  for (int b = 0; b < len / 32; ++b) {
    float db = mxfp4_scale(e[b]);
    for (int j = 0; j < 16; ++j) {
      out[32 * b + j] = kMxfp4[qs[16 * b + j] & 15] * db;
      out[32 * b + 16 + j] = kMxfp4[qs[16 * b + j] >> 4] * db;
    }
  }
}

inline void deq_f16(const uint8_t* const* p, int64_t c, int len, float* out) {
  const uint16_t* h = u16(p[0]) + c * CK;
  for (int i = 0; i < len; ++i) out[i] = h2f(h[i]);
}

inline void deq_bf16(const uint8_t* const* p, int64_t c, int len, float* out) {
  const uint16_t* h = u16(p[0]) + c * CK;
  for (int i = 0; i < len; ++i) out[i] = bits_f32(uint32_t(h[i]) << 16);
}

#endif

using DeqFn = void (*)(const uint8_t* const*, int64_t, int, float*);

inline DeqFn deq_fn(int qtype) {
  switch (qtype) {
    case kF16: return deq_f16;
    case kBF16: return deq_bf16;
    case kQ8_0: return deq_q8_0;
    case kQ2_K: return deq_q2_k;
    case kQ4_K: return deq_q4_k;
    case kIQ2_XXS: return deq_iq2_xxs;
    case kMXFP4: return deq_mxfp4;
    default: return nullptr;
  }
}

// Planes per type, and the elements a row's K must be a multiple of.
inline int n_planes(int qtype) {
  switch (qtype) {
    case kF16: case kBF16: return 1;
    case kQ8_0: case kMXFP4: return 2;
    case kIQ2_XXS: return 3;
    case kQ2_K: case kQ4_K: return 4;
    default: return 0;
  }
}
inline int block_elems(int qtype) {
  switch (qtype) {
    case kF16: case kBF16: return 1;
    case kQ8_0: case kMXFP4: return 32;
    default: return 256;
  }
}

}  // namespace ds4
