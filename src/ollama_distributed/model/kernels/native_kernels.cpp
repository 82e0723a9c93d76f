// qmatmul: Y = X Wᵀ for W kept in its GGUF file's quantisation (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), and
// dequant_rows (rows by index -> float32, for embedding lookups). model/native.py repacks each type's blocks
// (ggml-common.h block_q4_0 … block_q6_K) losslessly into one layout, so one kernel, templated on the code width
// and the scale structure, serves every type. Per row n, input k in group g of 32 (Q6_K: half-group h of 16) and
// super-block s (1 group for the legacy types, 8 for the K-quants' 256 inputs):
//   w[n,k] = d[n,s]·sc[n,g(,h)]·q[n,k] − dmin[n,s]·m[n,g(,h)]        q: unsigned 4/5/6/8-bit codes
// (legacy types: sc = m = 1; see native.py for how each type's own d, m, scales map onto d, dmin, sc, m).
//
// Layout (an extension of q4_matmul's, cpu_kernels.cpp): rows in blocks of 4, one 128-bit lane per row.
//   codes  (N/4, G, 64) u8:     lane r, byte j = q[4b+r, 32g+j] & 15 | (q[4b+r, 32g+16+j] & 15) << 4
//   planes (N/4, G, P, 2) u64:  P = 0/1/2/4 extra bits; plane p, word h, bit 16r+j = bit 4+p of q[4b+r, 32g+16h+j]
//                               (a 64-bit word is exactly an AVX-512 byte mask over one half's 4 lanes)
//   d, dmin (N/4, S, 4) f16;  sc, m (N/4, G, 4) or Q6_K's (N/4, G, 2, 4) int8, empty for the legacy types.
// Q8_0 keeps its 8-bit codes whole instead: codes (N/4, G, 128) u8, byte 64h + 16r + j = q[4b+r, 32g+16h+j], no
// planes (P = kBytes below): each half of 4 rows is one load, where merging 4 bit planes took ~14 instructions per
// group and held Q8_0 at ~0.55x llama.cpp's speed.
//
// AVX-512 VNNI (the default build): as q4_matmul, activations in two int8 levels per group (x ≈ dx·(256·q1 + q2),
// quantize_activations in common.h), integer group sums on VPDPBUSD, scales and offsets in float:
//   y[n] = Σ_g d·sc·dx_g·Σ_k q·(256·q1 + q2)  −  Σ_g dmin·m·Σ_k x        (Σ_k x in float, per half for Q6_K)
// llama.cpp quantises activations to the weight type's dot-product partner (Q8_0/Q8_1 per 32, Q8_K per 256 in
// ggml-quants.c quantize_row_q8_K) with one int8 level; two levels keep ~15 bits (see common.h).
//
// AVX2 (a separate build, -DOD_NATIVE_MODULE, for x86 CPUs without AVX-512): the same layout and math with
// activations in one int16 level per group (x ≈ dx·q16, 16 bits) and VPMADDWD on codes widened to int16. Why
// not VPMADDUBSW on u8 codes, as llama.cpp's AVX2 dot products do: it saturates at int16, and 8-bit codes (255)
// times int8 activations (127), two per lane, exceed 32767; widening costs one shuffle per 16 codes, shared by
// all activation rows of a tile, and leaves no saturation case for any code width. (Dequantising to float and
// FMA-ing would take 16 conversions and 16 FMAs per 128 weights against 8 VPMADDWD.)
#include "common.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace od {
namespace {

using Weights = NativeWeights;  // (common.h: exported for DecodePlan in cpu_kernels.cpp)
constexpr int kBytes = 8;        // the P of whole-byte codes (Q8_0)
// Codes are prefetched this many groups ahead of the loads (in each of a tile's row-block streams): decode reads
// every weight once, mostly from DRAM. One-row matmuls over 8 distinct 28 MB matrices in turn (more than the
// cache holds), 2 threads, A/B in one process: Q4_1 +20 %, Q8_0 +7 % with 8 groups ahead; 16 was slower than 8.
constexpr int64_t kAhead = 8;

inline __m128 load4_f16(const uint16_t* p) { return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }

inline __m128 load4_i8(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(v)));
}

// A block's 4 row scales d·sc and offsets dmin·m for group g (per half-group h when H = 2).
template <bool SUB, int H>
inline void group_scales(const Weights& w, int64_t blk, int64_t g, __m128 (&scale)[H], __m128 (&offset)[H]) {
  const int64_t s = SUB ? g / 8 : g;  // K-quants: 8 groups per 256-input super-block (QK_K in ggml-common.h)
  const __m128 d4 = load4_f16(w.d + (blk * w.ns + s) * kRows), n4 = load4_f16(w.dmin + (blk * w.ns + s) * kRows);
  for (int h = 0; h < H; ++h) {
    if constexpr (SUB) {
      const int64_t at = ((blk * w.ng + g) * H + h) * kRows;
      scale[h] = _mm_mul_ps(d4, load4_i8(w.sc + at));
      offset[h] = _mm_mul_ps(n4, load4_i8(w.m + at));
    } else {
      scale[h] = d4;
      offset[h] = n4;
    }
  }
}

// The first `valid` of 4 outputs (the last block of an N that is not a multiple of 4 has padding rows).
inline void store4(float* y, __m128 v, int64_t valid) {
  if (valid >= 4) {
    _mm_storeu_ps(y, v);
  } else {
    alignas(16) float t[4];
    _mm_store_ps(t, v);
    std::copy_n(t, valid, y);
  }
}

#if defined(__AVX512VNNI__)
constexpr const char* kIsa = "avx512_vnni";

struct Activations {  // quantize_activations' output
  std::vector<int8_t> q;
  std::vector<float> dx, sx, sx_half;
};

Activations quantize(const float* x, int64_t M, int64_t K, bool halves) {
  Activations a{std::vector<int8_t>(M * K * kLevels), std::vector<float>(M * K / kGroup),
                std::vector<float>(M * K / kGroup), std::vector<float>(halves ? 2 * M * K / kGroup : 0)};
  quantize_activations(x, M, K, a.q.data(), a.dx.data(), a.sx.data(), halves ? a.sx_half.data() : nullptr);
  return a;
}

// NT activation rows from t0 times NB row blocks from b0 (as q4_matmul's tile: registers for every accumulator,
// NB > 1 for independent FMA chains). P extra bit planes; SUB: K-quant sub-scales; HALF: Q6_K's per-16 scales.
//
// Integer range: each int32 element sums 8 products (4 inputs of 0..15 and 4 of 16..31; 4 with HALF) of a code and
// a two-level activation, |q·(256·q1 + q2)| ≤ 255·32640 for 8-bit codes: 8 of them are 6.7e7 < 2^31. Above 2^24
// (8-bit codes only; 4-bit: 3.9e6, 6-bit per half: 8.2e6) the conversion to float rounds that partial sum to 24
// bits, a relative 6e-8: far below the activations' own 2^-15 step.
template <int P, bool SUB, bool HALF, int NT, int NB>
inline void tile(const Weights& w, const Activations& a, float* y, int64_t t0, int64_t b0) {
  constexpr int H = HALF ? 2 : 1;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i quarter = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  __m512 acc[NT][NB];
  __m128 off[NT][NB];
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < NB; ++j) {
      acc[i][j] = _mm512_setzero_ps();
      off[i][j] = _mm_setzero_ps();
    }
  for (int64_t g = 0; g < w.ng; ++g) {
    __m512i lo[NB], hi[NB];
    __m512 scale[NB][H];
    __m128 offset[NB][H];
    for (int j = 0; j < NB; ++j) {
      const int64_t at = (b0 + j) * w.ng + g;
      if constexpr (P == kBytes) {
        _mm_prefetch(reinterpret_cast<const char*>(w.codes + (at + kAhead) * 128), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w.codes + (at + kAhead) * 128 + 64), _MM_HINT_T0);
        lo[j] = _mm512_loadu_si512(w.codes + at * 128);
        hi[j] = _mm512_loadu_si512(w.codes + at * 128 + 64);
      } else {
        _mm_prefetch(reinterpret_cast<const char*>(w.codes + (at + kAhead) * 64), _MM_HINT_T0);
        const __m512i c = _mm512_loadu_si512(w.codes + at * 64);
        lo[j] = _mm512_and_si512(c, low4);                        // inputs 0..15 of each row
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(c, 4), low4);  // inputs 16..31
      }
      for (int p = 0; p < (P == kBytes ? 0 : P); ++p) {  // bit 4+p where the plane's mask says so (clear: add = or)
        const uint64_t* bits = w.planes + (at * P + p) * 2;
        const __m512i v = _mm512_set1_epi8(static_cast<char>(16 << p));
        lo[j] = _mm512_mask_add_epi8(lo[j], _cvtu64_mask64(bits[0]), lo[j], v);
        hi[j] = _mm512_mask_add_epi8(hi[j], _cvtu64_mask64(bits[1]), hi[j], v);
      }
      __m128 s4[H];
      group_scales<SUB, H>(w, b0 + j, g, s4, offset[j]);
      for (int h = 0; h < H; ++h) scale[j][h] = _mm512_permutexvar_ps(quarter, _mm512_castps128_ps512(s4[h]));
    }
    for (int i = 0; i < NT; ++i) {
      const int64_t r = (t0 + i) * w.ng + g;
      const int8_t* xg = a.q.data() + r * kLevels * kGroup;
      const __m512i xa1 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xg)));
      const __m512i xb1 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xg + 16)));
      const __m512i xa2 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xg + 32)));
      const __m512i xb2 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xg + 48)));
      const __m512 step = _mm512_set1_ps(a.dx[r]);
      for (int j = 0; j < NB; ++j) {
        const __m512i zero = _mm512_setzero_si512();
        if constexpr (HALF) {  // the two halves have their own scales: two sums
          __m512i sl = _mm512_slli_epi32(_mm512_dpbusd_epi32(zero, lo[j], xa1), 8);
          __m512i sh = _mm512_slli_epi32(_mm512_dpbusd_epi32(zero, hi[j], xb1), 8);
          sl = _mm512_dpbusd_epi32(sl, lo[j], xa2);
          sh = _mm512_dpbusd_epi32(sh, hi[j], xb2);
          acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sl), _mm512_mul_ps(scale[j][0], step), acc[i][j]);
          acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sh), _mm512_mul_ps(scale[j][1], step), acc[i][j]);
          off[i][j] = _mm_fmadd_ps(offset[j][0], _mm_set1_ps(a.sx_half[2 * r]), off[i][j]);
          off[i][j] = _mm_fmadd_ps(offset[j][1], _mm_set1_ps(a.sx_half[2 * r + 1]), off[i][j]);
        } else {
          __m512i s = _mm512_dpbusd_epi32(zero, lo[j], xa1);
          s = _mm512_slli_epi32(_mm512_dpbusd_epi32(s, hi[j], xb1), 8);  // level 1 counts 256 level-2 steps
          s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(s, lo[j], xa2), hi[j], xb2);
          acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(scale[j][0], step), acc[i][j]);
          off[i][j] = _mm_fmadd_ps(offset[j][0], _mm_set1_ps(a.sx[r]), off[i][j]);
        }
      }
    }
  }
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < NB; ++j)
      store4(y + (t0 + i) * w.ld + (b0 + j) * kRows, _mm_sub_ps(lane_sums(acc[i][j]), off[i][j]),
             w.n - (b0 + j) * kRows);
}

// All M activation rows against row blocks [b0, b1).
template <int P, bool SUB, bool HALF>
void blocks(const Weights& w, const Activations& a, float* y, int64_t M, int64_t b0, int64_t b1) {
  if (M == 1) {  // decode: four blocks (16 rows) at a time share the activation loads
    int64_t b = b0;
    for (; b + 4 <= b1; b += 4) tile<P, SUB, HALF, 1, 4>(w, a, y, 0, b);
    for (; b < b1; ++b) tile<P, SUB, HALF, 1, 1>(w, a, y, 0, b);
    return;
  }
  for (int64_t b = b0; b < b1; ++b) {  // batches: four activation rows share each block's unpacked weights
    int64_t t = 0;
    for (; t + 4 <= M; t += 4) tile<P, SUB, HALF, 4, 1>(w, a, y, t, b);
    switch (M - t) {
      case 3: tile<P, SUB, HALF, 3, 1>(w, a, y, t, b); break;
      case 2: tile<P, SUB, HALF, 2, 1>(w, a, y, t, b); break;
      case 1: tile<P, SUB, HALF, 1, 1>(w, a, y, t, b); break;
      default: break;
    }
  }
}

#else  // AVX2 + FMA + F16C
constexpr const char* kIsa = "avx2";

struct Activations {
  std::vector<int16_t> q;  // (M·G, 32): x ≈ dx·q
  std::vector<float> dx, sx, sx_half;
};

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps(s, s, 1)));
}

// One int16 level per group of 32: dx = amax / 32767, q = round(x / dx) (nearest even). ~16 bits, a little more
// than the AVX-512 build's two int8 levels, and VPMADDWD takes it in one instruction per 16 inputs.
Activations quantize(const float* x, int64_t M, int64_t K, bool halves) {
  const int64_t groups = M * K / kGroup;
  Activations a{std::vector<int16_t>(M * K), std::vector<float>(groups), std::vector<float>(groups),
                std::vector<float>(halves ? 2 * groups : 0)};
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t i = 0; i < groups; ++i) {
    const float* p = x + i * kGroup;
    __m256 v[4];
    for (int k = 0; k < 4; ++k) v[k] = _mm256_loadu_ps(p + 8 * k);
    const float amax = hmax(_mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                          _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]))));
    const float scale = amax / 32767.f;
    a.dx[i] = scale;
    const __m256 inv = _mm256_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
    int32_t sums[2];  // Σ q per half: the sums of the quantised x (see common.h quantize_activations)
    for (int k = 0; k < 4; k += 2) {  // packs works within 128-bit lanes: the permute restores input order
      const __m256i q = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[k], inv)),
                                           _mm256_cvtps_epi32(_mm256_mul_ps(v[k + 1], inv)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q.data() + i * kGroup + 8 * k), _mm256_permute4x64_epi64(q, 0xD8));
      alignas(32) int32_t pairs[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(pairs), _mm256_madd_epi16(q, _mm256_set1_epi16(1)));
      sums[k / 2] = pairs[0] + pairs[1] + pairs[2] + pairs[3] + pairs[4] + pairs[5] + pairs[6] + pairs[7];
    }
    a.sx[i] = scale * static_cast<float>(sums[0] + sums[1]);
    if (halves) {
      a.sx_half[2 * i] = scale * static_cast<float>(sums[0]);
      a.sx_half[2 * i + 1] = scale * static_cast<float>(sums[1]);
    }
  }
  return a;
}

// 32 bits of a plane word -> 32 bytes, `value` where the bit is set: byte i of the result <- bit i.
inline __m256i expand_bits(uint32_t bits, __m256i value) {
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i select = _mm256_set1_epi64x(0x8040201008040201);
  const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), spread);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, select), select), value);
}

// NT activation rows from t0 against row block `blk`. A 256-bit register holds two rows' lanes (rows 0-1, 2-3);
// the codes are widened to int16 once and shared by the NT rows; each row pair keeps 8 float partial sums.
// Integer range: each int32 element sums 4 products (per half) of a code ≤ 255 and |q16| ≤ 32767: < 2^25; above
// 2^24 (8-bit codes only) the float conversion rounds to 24 bits (relative 6e-8, below the activations' 2^-16 step).
template <int P, bool SUB, bool HALF, int NT>
inline void tile(const Weights& w, const Activations& a, float* y, int64_t t0, int64_t blk) {
  constexpr int H = HALF ? 2 : 1;
  const __m256i low4 = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
  const __m256i pair[2] = {_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3)};
  __m256 acc[NT][2];
  __m128 off[NT];
  for (int i = 0; i < NT; ++i) {
    acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    off[i] = _mm_setzero_ps();
  }
  for (int64_t g = 0; g < w.ng; ++g) {
    const int64_t at = blk * w.ng + g;
    __m256i q[2][2];  // [half][row pair]
    if constexpr (P == kBytes) {
      for (int h = 0; h < 2; ++h)
        for (int rp = 0; rp < 2; ++rp)
          q[h][rp] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.codes + at * 128 + 64 * h + 32 * rp));
    } else {
      const __m256i c01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.codes + at * 64));
      const __m256i c23 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.codes + at * 64 + 32));
      q[0][0] = _mm256_and_si256(c01, low4);
      q[0][1] = _mm256_and_si256(c23, low4);
      q[1][0] = _mm256_and_si256(_mm256_srli_epi16(c01, 4), low4);
      q[1][1] = _mm256_and_si256(_mm256_srli_epi16(c23, 4), low4);
    }
    for (int p = 0; p < (P == kBytes ? 0 : P); ++p) {
      const auto* bits = reinterpret_cast<const uint32_t*>(w.planes + (at * P + p) * 2);  // [h0 rows 0-1, h0 2-3, h1 …]
      const __m256i v = _mm256_set1_epi8(static_cast<char>(16 << p));
      for (int h = 0; h < 2; ++h)
        for (int rp = 0; rp < 2; ++rp) q[h][rp] = _mm256_or_si256(q[h][rp], expand_bits(bits[2 * h + rp], v));
    }
    __m128 s4[H], offset[H];
    group_scales<SUB, H>(w, blk, g, s4, offset);
    __m256 scale[H][2];
    for (int h = 0; h < H; ++h)
      for (int rp = 0; rp < 2; ++rp) scale[h][rp] = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s4[h]), pair[rp]);
    __m256i wide[2][2][2];  // [half][row pair][inputs 0-7 | 8-15 of the half], int16: each lane one row's 8 codes
    for (int h = 0; h < 2; ++h)
      for (int rp = 0; rp < 2; ++rp) {
        wide[h][rp][0] = _mm256_unpacklo_epi8(q[h][rp], zero);
        wide[h][rp][1] = _mm256_unpackhi_epi8(q[h][rp], zero);
      }
    for (int i = 0; i < NT; ++i) {
      const int64_t r = (t0 + i) * w.ng + g;
      const int16_t* xg = a.q.data() + r * kGroup;
      const __m256 step = _mm256_set1_ps(a.dx[r]);
      for (int h = 0; h < 2; ++h) {
        const __m256i xa = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xg + 16 * h)));
        const __m256i xb = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xg + 16 * h + 8)));
        for (int rp = 0; rp < 2; ++rp) {
          const __m256i s = _mm256_add_epi32(_mm256_madd_epi16(wide[h][rp][0], xa), _mm256_madd_epi16(wide[h][rp][1], xb));
          acc[i][rp] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(scale[HALF ? h : 0][rp], step), acc[i][rp]);
        }
      }
      if constexpr (HALF) {
        off[i] = _mm_fmadd_ps(offset[0], _mm_set1_ps(a.sx_half[2 * r]), off[i]);
        off[i] = _mm_fmadd_ps(offset[1], _mm_set1_ps(a.sx_half[2 * r + 1]), off[i]);
      } else {
        off[i] = _mm_fmadd_ps(offset[0], _mm_set1_ps(a.sx[r]), off[i]);
      }
    }
  }
  for (int i = 0; i < NT; ++i) {
    // acc[i][0] = [row 0 x4 | row 1 x4], acc[i][1] = [row 2 x4 | row 3 x4] -> the 4 row totals
    __m256 t = _mm256_hadd_ps(acc[i][0], acc[i][1]);
    t = _mm256_hadd_ps(t, t);  // [r0 r2 r0 r2 | r1 r3 r1 r3]
    const __m128 rows = _mm_unpacklo_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    store4(y + (t0 + i) * w.ld + blk * kRows, _mm_sub_ps(rows, off[i]), w.n - blk * kRows);
  }
}

template <int P, bool SUB, bool HALF>
void blocks(const Weights& w, const Activations& a, float* y, int64_t M, int64_t b0, int64_t b1) {
  // Two activation rows per tile at most: the widened codes (8 registers) and 2 accumulators per row fill the 16.
  for (int64_t b = b0; b < b1; ++b) {
    int64_t t = 0;
    for (; t + 2 <= M; t += 2) tile<P, SUB, HALF, 2>(w, a, y, t, b);
    if (t < M) tile<P, SUB, HALF, 1>(w, a, y, t, b);
  }
}
#endif

using BlocksFn = void (*)(const Weights&, const Activations&, float*, int64_t, int64_t, int64_t);

// The instantiations GGUF's types need: (planes, sub-scales, half-group scales).
BlocksFn pick(int64_t planes, bool sub, bool half) {
  if (!sub && planes == 0) return blocks<0, false, false>;  // Q4_0, Q4_1
  if (!sub && planes == 1) return blocks<1, false, false>;  // Q5_0, Q5_1
  if (!sub && planes == kBytes) return blocks<kBytes, false, false>;  // Q8_0 (whole bytes)
  if (sub && !half && planes == 0) return blocks<0, true, false>;  // Q4_K
  if (sub && !half && planes == 1) return blocks<1, true, false>;  // Q5_K
  if (sub && half && planes == 2) return blocks<2, true, true>;    // Q6_K
  return nullptr;
}

Weights check_weights(const torch::Tensor& codes, const torch::Tensor& planes, const torch::Tensor& d,
                      const torch::Tensor& dmin, const torch::Tensor& sc, const torch::Tensor& m, int64_t n) {
  TORCH_CHECK(codes.dim() == 3 && (codes.size(2) == 64 || codes.size(2) == 128) && codes.scalar_type() == torch::kUInt8 &&
              codes.is_contiguous(), "codes: contiguous uint8 (N/4, G, 64), or (N/4, G, 128) whole bytes");
  const int64_t nb = codes.size(0), ng = codes.size(1);
  const bool bytes = codes.size(2) == 128;
  TORCH_CHECK(n > (nb - 1) * kRows && n <= nb * kRows, "n = ", n, " rows for ", nb, " blocks of 4");
  TORCH_CHECK(planes.dim() == 4 && planes.size(0) == nb && planes.size(1) == ng && planes.size(3) == 2 &&
              planes.scalar_type() == torch::kInt64 && planes.is_contiguous(), "planes: contiguous int64 (N/4, G, P, 2)");
  const bool sub = sc.numel() > 0, half = sub && sc.dim() == 4;
  const int64_t ns = sub ? ng / 8 : ng;
  TORCH_CHECK(!sub || ng % 8 == 0, "K-quant rows need whole 256-input super-blocks");
  for (const auto* t : {&d, &dmin})
    TORCH_CHECK(t->scalar_type() == torch::kFloat16 && t->is_contiguous() && t->dim() == 3 && t->size(0) == nb &&
                t->size(1) == ns && t->size(2) == kRows, "d, dmin: contiguous float16 (N/4, S, 4)");
  if (sub)
    for (const auto* t : {&sc, &m})
      TORCH_CHECK(t->scalar_type() == torch::kInt8 && t->is_contiguous() && t->numel() == nb * ng * (half ? 2 : 1) * kRows &&
                  t->size(0) == nb && t->size(1) == ng && t->sizes() == sc.sizes(), "sc, m: contiguous int8 (N/4, G, [2,] 4)");
  TORCH_CHECK(!bytes || planes.size(2) == 0, "whole-byte codes have no bit planes");
  const int64_t P = bytes ? kBytes : planes.size(2);
  TORCH_CHECK(pick(P, sub, half) != nullptr, "no kernel for ", planes.size(2), " bit planes with sc ", sc.sizes(),
              bytes ? " and whole-byte codes" : "");
  return Weights{codes.data_ptr<uint8_t>(), reinterpret_cast<const uint64_t*>(planes.data_ptr<int64_t>()),
                 reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>()),
                 reinterpret_cast<const uint16_t*>(dmin.data_ptr<at::Half>()),
                 sub ? sc.data_ptr<int8_t>() : nullptr, sub ? m.data_ptr<int8_t>() : nullptr, ng, ns, n, n, P, half};
}

// Row blocks [b0, b1) of every part, with M activation rows quantised once (`a`).
void part_blocks(const Weights* parts, int64_t count, const Activations& a, float* y, int64_t M, int64_t q0,
                 int64_t q1) {
  // q0, q1 count 4-block groups over the parts laid end to end (each part's last group may be short)
  int64_t first = 0, col = 0;
  for (int64_t p = 0; p < count && first < q1; ++p) {
    const Weights& w = parts[p];
    const int64_t nb = (w.n + kRows - 1) / kRows, quads = (nb + 3) / 4;
    const int64_t lo = std::max(q0, first), hi = std::min(q1, first + quads);
    if (lo < hi)
      pick(w.planes_count, w.sc != nullptr, w.half)(w, a, y + col, M, (lo - first) * 4, std::min(nb, (hi - first) * 4));
    first += quads;
    col += w.n;
  }
}

torch::Tensor qmatmul(torch::Tensor x, torch::Tensor codes, torch::Tensor planes, torch::Tensor d, torch::Tensor dmin,
                      torch::Tensor sc, torch::Tensor m, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 (M, K)");
  const Weights w = check_weights(codes, planes, d, dmin, sc, m, n);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K == w.ng * kGroup, "x has ", K, " columns, weights ", w.ng * kGroup);
  auto y = torch::empty({M, n}, x.options());
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  pybind11::gil_scoped_release no_gil;  // other Python threads (the server, other shards) run meanwhile
  native_matmul(&w, 1, xp, M, yp, n);
  return y;
}

// Rows `idx` of W as float32 (embedding lookups), each weight as (d·sc)·q − dmin·m in float32: the same operations
// as gguf-py's dequantize_blocks (and ggml-quants.c dequantize_row_*), so the values are identical to theirs.
torch::Tensor dequant_rows(torch::Tensor idx, torch::Tensor codes, torch::Tensor planes, torch::Tensor d,
                           torch::Tensor dmin, torch::Tensor sc, torch::Tensor m, int64_t n) {
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == torch::kInt64 && idx.is_contiguous(), "idx: contiguous int64 (L,)");
  const Weights w = check_weights(codes, planes, d, dmin, sc, m, n);
  const int64_t L = idx.size(0), K = w.ng * kGroup, P = w.planes_count == kBytes ? 0 : w.planes_count, H = sc.dim() == 4 ? 2 : 1;
  const bool bytes = w.planes_count == kBytes;
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t l = 0; l < L; ++l) TORCH_CHECK(ip[l] >= 0 && ip[l] < n, "row ", ip[l], " outside [0, ", n, ")");
  auto out = torch::empty({L, K}, torch::dtype(torch::kFloat32));
  float* op = out.data_ptr<float>();
  pybind11::gil_scoped_release no_gil;
  parallel(L, L * K >= (1 << 16), [&](int64_t l0, int64_t l1) {
    for (int64_t l = l0; l < l1; ++l) {
      const int64_t blk = ip[l] / kRows, r = ip[l] % kRows;
      for (int64_t g = 0; g < w.ng; ++g) {
        const int64_t at = blk * w.ng + g, s = w.sc != nullptr ? g / 8 : g;
        const float dd = _cvtsh_ss(w.d[(blk * w.ns + s) * kRows + r]), dm = _cvtsh_ss(w.dmin[(blk * w.ns + s) * kRows + r]);
        for (int64_t j = 0; j < kGroup; ++j) {
          const int64_t h = j / 16, bit = 16 * r + j % 16;
          const uint8_t byte = bytes ? w.codes[at * 128 + 64 * h + bit] : w.codes[at * 64 + bit];
          int q = bytes ? byte : h == 0 ? byte & 15 : byte >> 4;
          for (int64_t p = 0; p < P; ++p) q |= static_cast<int>((w.planes[(at * P + p) * 2 + h] >> bit) & 1) << (4 + p);
          float scale = dd, offset = dm;
          if (w.sc != nullptr) {
            const int64_t k = (at * H + (H == 2 ? h : 0)) * kRows + r;
            scale = dd * static_cast<float>(w.sc[k]);
            offset = dm * static_cast<float>(w.m[k]);
          }
          op[l * K + g * kGroup + j] = scale * static_cast<float>(q) - offset;
        }
      }
    }
  });
  return out;
}

}  // namespace

NativeWeights native_weights(const at::Tensor& codes, const at::Tensor& planes, const at::Tensor& d,
                             const at::Tensor& dmin, const at::Tensor& sc, const at::Tensor& m, int64_t n) {
  return check_weights(codes, planes, d, dmin, sc, m, n);
}

void native_matmul(const NativeWeights* parts, int64_t count, const float* x, int64_t M, float* y, int64_t ldy) {
  std::vector<Weights> ws(parts, parts + count);
  bool half = false;
  int64_t quads = 0;
  for (auto& w : ws) {
    TORCH_CHECK(w.ng == ws[0].ng, "parts of one output need the same inputs");
    w.ld = ldy;
    half = half || w.half;
    quads += ((w.n + kRows - 1) / kRows + 3) / 4;
  }
  const Activations a = quantize(x, M, ws[0].ng * kGroup, half);
  // Each thread takes a contiguous range of whole 4-block groups (so decode keeps its 4-block tiles).
  parallel(quads, true, [&](int64_t q0, int64_t q1) { part_blocks(ws.data(), count, a, y, M, q0, q1); });
}

void register_native(pybind11::module_& mod) {
  mod.def("qmatmul", &qmatmul, "Y = X W^T, W in native.py's layout of a GGUF type (codes, planes, d, dmin, sc, m), n rows");
  mod.def("dequant_rows", &dequant_rows, "rows idx of W as float32");
  mod.attr("native_isa") = kIsa;
}

}  // namespace od

#ifdef OD_NATIVE_MODULE  // the AVX2 build: this file alone is the extension
PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) { od::register_native(mod); }
#endif
