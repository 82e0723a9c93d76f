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
// AVX-512 VNNI (the default build): activations in two int8 levels per group of 32 (x ≈ dx·xq, xq = 256·q1 + q2,
// ~15 bits; common.h quantize_activations), integer group totals on VPDPBUSD, or for batches of 8 rows or more on
// AMX tiles (TDPBUSD) where the CPU has them; scales and offsets in float:
//   y[n] = Σ_g d·sc·dx_g·Σ_k q·xq  −  Σ_g dmin·m·sx_g        (sx_g = dx_g·Σ_k xq, per half for Q6_K)
// Built with -DOD_ACT_LEVELS=1, one int8 level as ggml quantises activations for these types (Q8_1: dx = amax/127
// stored as float16, ggml-quants.c quantize_row_q8_1_ref; Q8_0's is the same; the K-quants' Q8_K has one scale per
// 256 where this keeps one per 32): half the integer work, llama.cpp's accuracy, not the default (bench/README.md,
// issue 13: greedy text). Every tile computes a row the same way, so a row's value does not depend on M or on the
// path (see `tile`).
//
// AVX2 (a separate build, -DOD_NATIVE_MODULE, for x86 CPUs without AVX-512): the same layout and math with
// activations in one int16 level per group (x ≈ dx·q16, 16 bits) and VPMADDWD on codes widened to int16. Why
// not VPMADDUBSW on u8 codes, as llama.cpp's AVX2 dot products do: it saturates at int16, and 8-bit codes (255)
// times int8 activations (127), two per lane, exceed 32767; widening costs one shuffle per 16 codes, shared by
// all activation rows of a tile, and leaves no saturation case for any code width. (Dequantising to float and
// FMA-ing would take 16 conversions and 16 FMAs per 128 weights against 8 VPMADDWD.)
#include "common.h"

#include <cpuid.h>
#include <sys/syscall.h>

#include <algorithm>
#include <atomic>
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

// int8 levels per activation group (common.h quantize_activations): 2 (~15 bits) by default; -DOD_ACT_LEVELS=1 builds
// ggml's numerics (Q8_1 / Q8_0 activations: half the integer work, llama.cpp's accuracy; bench/README.md, issue 13).
#ifndef OD_ACT_LEVELS
#define OD_ACT_LEVELS 2
#endif
constexpr int kAct = OD_ACT_LEVELS;
static_assert(kAct == 1 || kAct == 2, "one or two activation levels");

struct Activations {  // quantize_activations<kAct>'s output (common.h)
  std::vector<int8_t> q;  // (M·G, kAct, 32)
  std::vector<float> dx, sx, sx_half, sx_q8_1;
  // AMX operands (amx_blocks), where `chunks` > 0: the activations in chunks of 16 rows (the last zero-padded)
  int64_t chunks = 0;
  std::vector<int8_t> bt;  // (chunks, G, kAct, 8, 16, 4): a B tile per group and level, row k4, bytes 4t.. = q[t, 4k4..]
  std::vector<float> tdx, tsx, tsx_q8_1;  // (chunks, G, 16) dx; (chunks, G, H, 16) sx (H = 2: sx_half); sx_q8_1
};

// AMX int8 tiles (TDPBUSD) where the CPU has them and Linux grants the process their state; OLLAMA_DISTRIBUTED_AMX=0
// (read once) or use_amx(False) turns them off. Batches of at least kAmxMin rows take them (amx_blocks).
constexpr int64_t kAmxMin = 8;
std::atomic<bool> amx_on{true};

bool amx_available() {
  static const bool ok = [] {
    const char* env = std::getenv("OLLAMA_DISTRIBUTED_AMX");
    if (env != nullptr && std::strcmp(env, "0") == 0) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return false;  // TILE, INT8
    // Linux gives a process the 8 KB tile state only on request (Documentation/arch/x86/xstate.rst):
    // arch_prctl(ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18), once, for all its threads.
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
}

Activations quantize(const float* x, int64_t M, int64_t K, bool halves) {
  const int64_t ng = K / kGroup;
  Activations a{std::vector<int8_t>(M * K * kAct), std::vector<float>(M * ng), std::vector<float>(M * ng),
                std::vector<float>(halves ? 2 * M * ng : 0), std::vector<float>(kAct == 1 ? M * ng : 0)};
  quantize_activations<kAct>(x, M, K, a.q.data(), a.dx.data(), a.sx.data(), halves ? a.sx_half.data() : nullptr,
                             kAct == 1 ? a.sx_q8_1.data() : nullptr);
  if (M >= kAmxMin && amx_on.load(std::memory_order_relaxed) && amx_available()) {
    const int64_t H = halves ? 2 : 1;
    a.chunks = (M + 15) / 16;
    a.bt.assign(a.chunks * ng * kAct * 512, 0);
    a.tdx.assign(a.chunks * ng * 16, 0.f);
    a.tsx.assign(a.chunks * ng * H * 16, 0.f);
    a.tsx_q8_1.assign(kAct == 1 ? a.chunks * ng * 16 : 0, 0.f);
    for (int64_t row = 0; row < M; ++row) {
      const int64_t c = row / 16, t = row % 16;
      for (int64_t g = 0; g < ng; ++g) {
        const int64_t r = row * ng + g, cg = c * ng + g;
        for (int64_t l = 0; l < kAct; ++l)
          for (int64_t k4 = 0; k4 < 8; ++k4)
            std::memcpy(&a.bt[(cg * kAct + l) * 512 + k4 * 64 + 4 * t], &a.q[(r * kAct + l) * kGroup + 4 * k4], 4);
        a.tdx[cg * 16 + t] = a.dx[r];
        if (kAct == 1) a.tsx_q8_1[cg * 16 + t] = a.sx_q8_1[r];
        for (int64_t h = 0; h < H; ++h) a.tsx[(cg * H + h) * 16 + t] = halves ? a.sx_half[2 * r + h] : a.sx[r];
      }
    }
  }
  return a;
}

// Every tile below computes each output row the same way, so a row's result does not depend on the tile that
// computed it (M, the row's position, the thread split): per group g in order, with the group's integer dot product
// T = Σ_k q·xq (exact in int32 and in float: |T| ≤ 255·127·32 < 2^24),
//   acc = fma(float(T), fl(d·sc · dx), acc);  acc = fma(−dmin·m, sx, acc)    (Q6_K: both T first, then both sx)
// and y = acc. So prefill, decode, batched decode and tensor-parallel shards give a sequence the same values. (One
// accumulator: the offset cancels the biased codes' share group by group, so the running sum stays near y.)

inline int64_t load64(const void* p) {
  int64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

inline int32_t load32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The group totals of 4 blocks' VPDPBUSD sums (lane r, element e: partial e of row r) -> lane r, element j: row r of
// block j (integer adds: exact in any order).
inline __m512i totals4(const __m512i (&s)[4]) {
  const __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi32(s[0], s[1]), _mm512_unpackhi_epi32(s[0], s[1]));
  const __m512i b = _mm512_add_epi32(_mm512_unpacklo_epi32(s[2], s[3]), _mm512_unpackhi_epi32(s[2], s[3]));
  return _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
}

// One block's totals: every element of lane r = row r's.
inline __m512i totals1(__m512i s) {
  s = _mm512_add_epi32(s, _mm512_shuffle_epi32(s, _MM_PERM_BADC));
  return _mm512_add_epi32(s, _mm512_shuffle_epi32(s, _MM_PERM_CDAB));
}

// The codes of group g of block `blk`: lo = inputs 0..15, hi = 16..31 of each row (one lane per row).
template <int P>
inline void load_codes(const Weights& w, int64_t blk, int64_t g, __m512i& lo, __m512i& hi) {
  const int64_t at = blk * w.ng + g;
  if constexpr (P == kBytes) {
    _mm_prefetch(reinterpret_cast<const char*>(w.codes + (at + kAhead) * 128), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w.codes + (at + kAhead) * 128 + 64), _MM_HINT_T0);
    lo = _mm512_loadu_si512(w.codes + at * 128);
    hi = _mm512_loadu_si512(w.codes + at * 128 + 64);
  } else {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    _mm_prefetch(reinterpret_cast<const char*>(w.codes + (at + kAhead) * 64), _MM_HINT_T0);
    const __m512i c = _mm512_loadu_si512(w.codes + at * 64);
    lo = _mm512_and_si512(c, low4);
    hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), low4);
  }
  for (int p = 0; p < (P == kBytes ? 0 : P); ++p) {  // bit 4+p where the plane's mask says so (clear: add = or)
    const uint64_t* bits = w.planes + (at * P + p) * 2;
    const __m512i v = _mm512_set1_epi8(static_cast<char>(16 << p));
    lo = _mm512_mask_add_epi8(lo, _cvtu64_mask64(bits[0]), lo, v);
    hi = _mm512_mask_add_epi8(hi, _cvtu64_mask64(bits[1]), hi, v);
  }
}

// d·sc and dmin·m of 4 blocks' 16 rows from b0 for group g (per half h when H = 2), by lane (see by_row).
template <bool SUB, int H>
inline void scales4(const Weights& w, int64_t b0, int64_t g, __m512 (&scale)[H], __m512 (&offset)[H]) {
  const int64_t s = SUB ? g / 8 : g, stride = w.ns * kRows;
  auto f16x16 = [&](const uint16_t* base) {
    const uint16_t* p = base + (b0 * w.ns + s) * kRows;
    const __m256i v = _mm256_set_epi64x(load64(p + 3 * stride), load64(p + 2 * stride), load64(p + stride), load64(p));
    return _mm512_permutexvar_ps(by_row(), _mm512_cvtph_ps(v));
  };
  const __m512 d16 = f16x16(w.d), n16 = f16x16(w.dmin);
  for (int h = 0; h < H; ++h) {
    if constexpr (SUB) {
      auto i8x16 = [&](const int8_t* base) {
        const int64_t gs = w.ng * H * kRows, at = (b0 * w.ng + g) * H * kRows + h * kRows;
        const __m128i v = _mm_set_epi32(load32(base + at + 3 * gs), load32(base + at + 2 * gs),
                                        load32(base + at + gs), load32(base + at));
        return _mm512_permutexvar_ps(by_row(), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)));
      };
      scale[h] = _mm512_mul_ps(d16, i8x16(w.sc));
      offset[h] = _mm512_mul_ps(n16, i8x16(w.m));
    } else {
      scale[h] = d16;
      offset[h] = n16;
    }
  }
}

// The same for one block: every element of lane r = row r's.
template <bool SUB, int H>
inline void scales1(const Weights& w, int64_t blk, int64_t g, __m512 (&scale)[H], __m512 (&offset)[H]) {
  const __m512i quarter = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  __m128 s4[H], o4[H];
  group_scales<SUB, H>(w, blk, g, s4, o4);
  for (int h = 0; h < H; ++h) {
    scale[h] = _mm512_permutexvar_ps(quarter, _mm512_castps128_ps512(s4[h]));
    offset[h] = _mm512_permutexvar_ps(quarter, _mm512_castps128_ps512(o4[h]));
  }
}

// NT activation rows from t0 times NB = 4 row blocks from b0 (16 rows, one accumulator register per activation row),
// or NB = 1 block (the leftover blocks; each lane's 4 elements compute its row's value alike). P extra bit planes;
// SUB: K-quant sub-scales; HALF: Q6_K's per-16 scales. Per group and activation row: 2 VPDPBUSD per block and level
// (and a shift with two levels), 6 integer ops to total 16 rows, one conversion and two FMAs.
template <int P, bool SUB, bool HALF, int NT, int NB>
inline void tile(const Weights& w, const Activations& a, float* y, int64_t t0, int64_t b0) {
  static_assert(NB == 1 || NB == 4, "tiles of 1 or 4 row blocks");
  constexpr int H = HALF ? 2 : 1;
  __m512 acc[NT];
  for (int i = 0; i < NT; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.ng; ++g) {
    __m512i lo[NB], hi[NB];
    for (int j = 0; j < NB; ++j) load_codes<P>(w, b0 + j, g, lo[j], hi[j]);
    __m512 scale[H], offset[H];
    if constexpr (NB == 4) scales4<SUB, H>(w, b0, g, scale, offset);
    else scales1<SUB, H>(w, b0, g, scale, offset);
    for (int i = 0; i < NT; ++i) {
      const int64_t r = (t0 + i) * w.ng + g;
      const int8_t* xg = a.q.data() + r * kAct * kGroup;
      const __m512i xa = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xg)));
      const __m512i xb = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xg + 16)));
      // level 2 (kAct = 2): the remainders, 1/256 of level 1's step; T = 256·T1 + T2 exactly in int32
      const __m512i xa2 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xg + (kAct - 1) * 32)));
      const __m512i xb2 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xg + (kAct - 1) * 32 + 16)));
      const __m512 step = _mm512_set1_ps(a.dx[r]);
      const __m512i zero = _mm512_setzero_si512();
      auto total = [&](const __m512i (&s)[NB]) {
        if constexpr (NB == 4) return totals4(s);
        else return totals1(s[0]);
      };
      if constexpr (HALF) {  // the two halves have their own scales: two totals
        __m512i sl[NB], sh[NB];
        for (int j = 0; j < NB; ++j) {
          sl[j] = _mm512_dpbusd_epi32(zero, lo[j], xa);
          sh[j] = _mm512_dpbusd_epi32(zero, hi[j], xb);
          if constexpr (kAct == 2) {
            sl[j] = _mm512_dpbusd_epi32(_mm512_slli_epi32(sl[j], 8), lo[j], xa2);
            sh[j] = _mm512_dpbusd_epi32(_mm512_slli_epi32(sh[j], 8), hi[j], xb2);
          }
        }
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total(sl)), _mm512_mul_ps(scale[0], step), acc[i]);
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total(sh)), _mm512_mul_ps(scale[HALF ? 1 : 0], step), acc[i]);
        acc[i] = _mm512_fnmadd_ps(offset[0], _mm512_set1_ps(a.sx_half[2 * r]), acc[i]);
        acc[i] = _mm512_fnmadd_ps(offset[HALF ? 1 : 0], _mm512_set1_ps(a.sx_half[2 * r + 1]), acc[i]);
      } else {
        __m512i s[NB];
        for (int j = 0; j < NB; ++j) {
          s[j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo[j], xa), hi[j], xb);
          if constexpr (kAct == 2)
            s[j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(s[j], 8), lo[j], xa2), hi[j], xb2);
        }
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total(s)), _mm512_mul_ps(scale[0], step), acc[i]);
        acc[i] = _mm512_fnmadd_ps(offset[0], _mm512_set1_ps(kAct == 1 && w.q8_1 ? a.sx_q8_1[r] : a.sx[r]), acc[i]);
      }
    }
  }
  for (int i = 0; i < NT; ++i) {
    float* out = y + (t0 + i) * w.ld + b0 * kRows;
    const __m512 v = acc[i];
    if constexpr (NB == 4) {
      const int64_t valid = std::min<int64_t>(16, w.n - b0 * kRows);
      _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << valid) - 1), _mm512_permutexvar_ps(by_row(), v));
    } else {
      const __m512i first = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
      store4(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(first, v)), w.n - b0 * kRows);
    }
  }
}

// All M activation rows against row blocks [b0, b1): four blocks (16 rows) at a time share each activation load,
// and up to four activation rows share each group's unpacked codes.
template <int P, bool SUB, bool HALF, int NB>
void rows_of(const Weights& w, const Activations& a, float* y, int64_t M, int64_t b) {
  int64_t t = 0;
  for (; t + 4 <= M; t += 4) tile<P, SUB, HALF, 4, NB>(w, a, y, t, b);
  switch (M - t) {
    case 3: tile<P, SUB, HALF, 3, NB>(w, a, y, t, b); break;
    case 2: tile<P, SUB, HALF, 2, NB>(w, a, y, t, b); break;
    case 1: tile<P, SUB, HALF, 1, NB>(w, a, y, t, b); break;
    default: break;
  }
}

template <int P, bool SUB, bool HALF>
void amx_blocks(const Weights& w, const Activations& a, float* y, int64_t M, int64_t b0, int64_t b1);

template <int P, bool SUB, bool HALF>
void blocks(const Weights& w, const Activations& a, float* y, int64_t M, int64_t b0, int64_t b1) {
  if (a.chunks > 0) return amx_blocks<P, SUB, HALF>(w, a, y, M, b0, b1);
  int64_t b = b0;
  for (; b + 4 <= b1; b += 4) rows_of<P, SUB, HALF, 4>(w, a, y, M, b);
  for (; b < b1; ++b) rows_of<P, SUB, HALF, 1>(w, a, y, M, b);
}

// All M activation rows against row blocks [b0, b1) on AMX (Intel's Advanced Matrix Extensions: 8 tile registers
// of up to 16 rows × 64 bytes; TDPBUSD C += A·B over u8 A and s8 B in int32): per group, 4 row blocks' codes become
// an A tile of 16 weight rows × 32 inputs, the activations' B tile (Activations::bt) holds 16 activation rows, and
// one TDPBUSD gives all 256 group totals T, exact as VPDPBUSD's. The scales then apply per (weight row, activation
// row) as in `tile`, in the same order with the same roundings, so every value equals the VPDPBUSD path's bit for
// bit (tests/model/test_native.py checks). Q6_K's halves: two A tiles of 16 inputs and two C tiles.
// What 16 rows cost here per group and 16 weight rows: 1 TDPBUSD (16 × 16 × 32 products) and ~5 vector
// instructions per weight row for the scales, against 16 × ~20 on VPDPBUSD. (llama.cpp's ggml-cpu/amx/mmq.cpp
// multiplies its quantised types on TDPBUSD the same way, per 32-input block with float scales after.)
struct TileConfig {  // the LDTILECFG operand (Intel SDM vol. 2, LDTILECFG): palette 1
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tile registers (the intrinsics paste the register's number into their assembly, so they are literals).
// Not HALF: group g's A tile in tmm(g & 1), level l's B tile in tmm(2 + l), group g's level-l totals in
// tmm(4 + 2 (g & 1) + l). Group g's products are issued before group g − 1's totals are stored and scaled, so a
// TDPBUSD's latency (~50 cycles) hides behind the previous group's float work instead of stalling the store that
// follows it (perf: tilezero/tilestored waits were ~35 % of this function's cycles with one C tile for both levels).
// HALF (Q6_K): A lo/hi in tmm0/1, B lo/hi in tmm2/3, level l half h's totals in tmm(4 + 2l + h): four independent
// products per group, then their stores.
#define OD_AMX_ISSUE(TA, TC0, TC1)                        \
  _tile_loadd(TA, abuf[s][0], 32);                        \
  _tile_loadd(2, bt, 64);                                 \
  _tile_zero(TC0);                                        \
  _tile_dpbusd(TC0, TA, 2);                               \
  if constexpr (kAct == 2) {                              \
    _tile_loadd(3, bt + 512, 64);                         \
    _tile_zero(TC1);                                      \
    _tile_dpbusd(TC1, TA, 3);                             \
  }
#define OD_AMX_STORE(TC0, TC1)                            \
  _tile_stored(TC0, cbuf[0][0], 64);                      \
  if constexpr (kAct == 2) _tile_stored(TC1, cbuf[kAct - 1][0], 64);
#define OD_AMX_HALF_LEVEL(TC_LO, TC_HI, OFF)              \
  _tile_loadd(2, bt + (OFF), 64);                         \
  _tile_loadd(3, bt + (OFF) + 256, 64);                   \
  _tile_zero(TC_LO);                                      \
  _tile_zero(TC_HI);                                      \
  _tile_dpbusd(TC_LO, 0, 2);                              \
  _tile_dpbusd(TC_HI, 1, 3);

template <int P, bool SUB, bool HALF>
void amx_blocks(const Weights& w, const Activations& a, float* y, int64_t M, int64_t b0, int64_t b1) {
  constexpr int H = HALF ? 2 : 1;
  TileConfig cfg;
  auto shape = [&](int t, int rows, int colsb) { cfg.rows[t] = static_cast<uint8_t>(rows); cfg.colsb[t] = static_cast<uint16_t>(colsb); };
  for (int t = 0; t < 2; ++t) {
    shape(t, 16, HALF ? 16 : 32);      // 16 weight rows × 32 codes (HALF: × 16, one tile per half)
    shape(2 + t, HALF ? 4 : 8, 64);    // inputs / 4 × 16 activation rows × 4
  }
  for (int t = 4; t < 8; ++t) shape(t, 16, 64);  // 16 weight rows × 16 activation rows of int32
  _tile_loadconfig(&cfg);
  alignas(64) uint8_t abuf[2][2][16 * 32];     // [group & 1][half]
  alignas(64) int32_t cbuf[kAct][2][16 * 16];  // [level][half]
  alignas(64) float scale[2][H][16], offset[2][H][16], out[16][16];
  const __m512i rows01 = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), rows23 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  for (int64_t b = b0; b < b1; b += 4) {
    const int64_t nbk = std::min<int64_t>(4, b1 - b);
    for (int64_t c = 0; c < a.chunks; ++c) {
      __m512 acc[16];
      for (int n = 0; n < 16; ++n) acc[n] = _mm512_setzero_ps();
      // group g's codes as A tile rows (abuf[s]) and its scales and offsets per weight row (scale[s], offset[s])
      auto prepare = [&](int64_t g, int s) {
        for (int j = 0; j < 4; ++j) {
          __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
          __m128 s4[H], o4[H];
          if (j < nbk) {
            load_codes<P>(w, b + j, g, lo, hi);
            group_scales<SUB, H>(w, b + j, g, s4, o4);
          } else {
            for (int h = 0; h < H; ++h) s4[h] = o4[h] = _mm_setzero_ps();
          }
          for (int h = 0; h < H; ++h) {
            _mm_store_ps(scale[s][h] + 4 * j, s4[h]);
            _mm_store_ps(offset[s][h] + 4 * j, o4[h]);
          }
          if constexpr (HALF) {  // lane r = row 4j + r's 16 codes: the A tiles' rows as they lie
            _mm512_store_si512(abuf[s][0] + 64 * j, lo);
            _mm512_store_si512(abuf[s][1] + 64 * j, hi);
          } else {  // row 4j + r = lo's lane r, then hi's
            _mm512_store_si512(abuf[s][0] + 128 * j, _mm512_permutex2var_epi64(lo, rows01, hi));
            _mm512_store_si512(abuf[s][0] + 128 * j + 64, _mm512_permutex2var_epi64(lo, rows23, hi));
          }
        }
      };
      // group g's totals (in cbuf) scaled into the accumulators, groups in order (the same roundings as `tile`)
      auto finish = [&](int64_t g, int s) {
        const int64_t cg = c * w.ng + g;
        const __m512 step = _mm512_loadu_ps(a.tdx.data() + cg * 16);
        const float* sums = kAct == 1 && w.q8_1 ? a.tsx_q8_1.data() + cg * 16 : a.tsx.data() + cg * H * 16;
        for (int n = 0; n < 16; ++n) {
          for (int h = 0; h < H; ++h) {
            __m512i t = _mm512_load_si512(cbuf[0][h] + 16 * n);
            if constexpr (kAct == 2) t = _mm512_add_epi32(_mm512_slli_epi32(t, 8), _mm512_load_si512(cbuf[kAct - 1][h] + 16 * n));
            acc[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(_mm512_set1_ps(scale[s][h][n]), step), acc[n]);
          }
          for (int h = 0; h < H; ++h)
            acc[n] = _mm512_fnmadd_ps(_mm512_set1_ps(offset[s][h][n]), _mm512_loadu_ps(sums + h * 16), acc[n]);
        }
      };
      for (int64_t g = 0; g <= w.ng; ++g) {
        const int s = static_cast<int>(g & 1);
        if (g < w.ng) {
          prepare(g, s);
          const int8_t* bt = a.bt.data() + (c * w.ng + g) * kAct * 512;
          if constexpr (HALF) {
            _tile_loadd(0, abuf[s][0], 16);
            _tile_loadd(1, abuf[s][1], 16);
            OD_AMX_HALF_LEVEL(4, 5, 0)
            if constexpr (kAct == 2) { OD_AMX_HALF_LEVEL(6, 7, 512) }
            _tile_stored(4, cbuf[0][0], 64);
            _tile_stored(5, cbuf[0][1], 64);
            if constexpr (kAct == 2) {
              _tile_stored(6, cbuf[kAct - 1][0], 64);
              _tile_stored(7, cbuf[kAct - 1][1], 64);
            }
            finish(g, s);
          } else if (s == 0) {
            OD_AMX_ISSUE(0, 4, 5)
          } else {
            OD_AMX_ISSUE(1, 6, 7)
          }
        }
        if (!HALF && g > 0) {  // the previous group's totals: stored and scaled while this group's products run
          if (s == 1) {
            OD_AMX_STORE(4, 5)
          } else {
            OD_AMX_STORE(6, 7)
          }
          finish(g - 1, 1 - s);
        }
      }
      for (int n = 0; n < 16; ++n) _mm512_store_ps(out[n], acc[n]);
      const int64_t rows = std::min<int64_t>(16, w.n - b * kRows), tokens = std::min<int64_t>(16, M - 16 * c);
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t n = 0; n < rows; ++n) y[(16 * c + t) * w.ld + b * kRows + n] = out[n][t];
    }
  }
  _tile_release();
}
#undef OD_AMX_ISSUE
#undef OD_AMX_STORE
#undef OD_AMX_HALF_LEVEL

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
                      const torch::Tensor& dmin, const torch::Tensor& sc, const torch::Tensor& m, int64_t n,
                      bool q8_1) {
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
                 sub ? sc.data_ptr<int8_t>() : nullptr, sub ? m.data_ptr<int8_t>() : nullptr, ng, ns, n, n, P, half,
                 q8_1 && !sub};
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
                      torch::Tensor sc, torch::Tensor m, int64_t n, bool q8_1) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 (M, K)");
  const Weights w = check_weights(codes, planes, d, dmin, sc, m, n, q8_1);
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
                           torch::Tensor dmin, torch::Tensor sc, torch::Tensor m, int64_t n, bool /*q8_1*/) {
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == torch::kInt64 && idx.is_contiguous(), "idx: contiguous int64 (L,)");
  const Weights w = check_weights(codes, planes, d, dmin, sc, m, n, false);
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
                             const at::Tensor& dmin, const at::Tensor& sc, const at::Tensor& m, int64_t n, bool q8_1) {
  return check_weights(codes, planes, d, dmin, sc, m, n, q8_1);
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
  namespace py = pybind11;
  mod.def("qmatmul", &qmatmul, "Y = X W^T, W in native.py's layout of a GGUF type (codes, planes, d, dmin, sc, m), n rows; "
          "q8_1: Q4_1/Q5_1 (offsets times ggml's block_q8_1 s)", py::arg("x"), py::arg("codes"), py::arg("planes"),
          py::arg("d"), py::arg("dmin"), py::arg("sc"), py::arg("m"), py::arg("n"), py::arg("q8_1") = false);
  mod.def("dequant_rows", &dequant_rows, "rows idx of W as float32", py::arg("idx"), py::arg("codes"), py::arg("planes"),
          py::arg("d"), py::arg("dmin"), py::arg("sc"), py::arg("m"), py::arg("n"), py::arg("q8_1") = false);
  mod.attr("native_isa") = kIsa;
#if defined(__AVX512VNNI__)
  mod.attr("act_levels") = kAct;
  // use_amx(on) -> whether batches now run on AMX tiles (tests and benches compare both paths)
  mod.def("use_amx", [](bool on) { amx_on = on; return on && amx_available(); }, "AMX tiles for batches on/off");
#endif
}

}  // namespace od

#ifdef OD_NATIVE_MODULE  // the AVX2 build: this file alone is the extension
PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) { od::register_native(mod); }
#endif
