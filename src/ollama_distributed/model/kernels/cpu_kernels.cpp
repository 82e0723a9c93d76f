// CPU kernels for the decode step, where torch's own ops are either slow (int4 matmul) or several small ops whose
// dispatch costs more than their arithmetic (RMSNorm: 6 ops; decode attention: the flash kernel's setup).
//
// q4_matmul: Y = X Wᵀ for 4-bit group-quantised W on x86 CPUs with AVX-512 VNNI, the way llama.cpp's Q4_1 x Q8_1 dot
// product works (ggml-cpu quants.c, ggml_vec_dot_q4_1_q8_1): activations are quantised to int8 per group of 32
// (one float scale each), and each group's integer dot product runs on VPDPBUSD (64 u8 x s8 products per
// instruction) before its float scales are applied. torch's own CPU int4 kernel converts every weight to float
// first and tops out near 12 GB/s of weights per core here; this one does not (bench/README.md, section 6).
//
// Math, per output row n and group g of 32 inputs (w = d·q + m, q in [0, 16), the GGUF Q4_1 form):
//   y[n] = Σ_g d[n,g]·dx[g]·Σ_{k∈g} q[n,k]·(256·q1[k] + q2[k])  +  Σ_g m[n,g]·sx[g]
// with x ≈ dx·(256·q1 + q2) in two int8 levels (quantize_activations) and sx[g] = Σ_{k∈g} x[k] summed in float.
// (llama.cpp uses one level; two keep real activations to ~15 bits, at 2 more VPDPBUSD per group.)
//
// Weight layout (built by model/cpu_kernels.py): rows in blocks of 4, one 128-bit lane per row, so one 512-bit
// load holds a group of 32 weights for 4 rows:
//   codes (N/4, G, 64) u8: lane r, byte j = q[4b+r, 32g+j] | q[4b+r, 32g+16+j] << 4  (GGUF's own qs order)
//   d, m  (N/4, G, 4) f16: the group's scale and offset for the block's 4 rows.
#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

using od::kGroup;
constexpr int kLevels = 2;  // int8 levels per activation group (common.h quantize_activations)
using od::kRows;
using od::lane_sums;
using od::parallel;

struct Operands {
  const uint8_t* codes;  // (N/4, G, 64)
  const uint16_t* d;     // (N/4, G, 4) float16
  const uint16_t* m;
  const int8_t* xq;      // (M·G, 2, 32)
  const float* dx;       // (M·G)
  const float* sx;
  float* y;              // (M, N)
  int64_t ng, n;
};

// NT activation rows from t0 times NB row blocks from b0. Compile-time sizes keep every accumulator in a register,
// and NB > 1 gives independent FMA chains (one chain per accumulator is latency-bound: 4 cycles per group).
template <int NT, int NB>
inline void tile(const Operands& o, int64_t t0, int64_t b0) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i quarter = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  __m512 acc[NT][NB];
  __m128 off[NT][NB];
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < NB; ++j) {
      acc[i][j] = _mm512_setzero_ps();
      off[i][j] = _mm_setzero_ps();
    }
  for (int64_t g = 0; g < o.ng; ++g) {
    __m512i lo[NB], hi[NB];
    __m512 d16[NB];
    __m128 m4[NB];
    for (int j = 0; j < NB; ++j) {
      const int64_t at = (b0 + j) * o.ng + g;
      const __m512i w = _mm512_loadu_si512(o.codes + at * 64);
      lo[j] = _mm512_and_si512(w, low4);                        // inputs 0..15 of each row
      hi[j] = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);  // inputs 16..31
      const __m128 d4 = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(o.d + at * kRows)));
      d16[j] = _mm512_permutexvar_ps(quarter, _mm512_castps128_ps512(d4));
      m4[j] = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(o.m + at * kRows)));
    }
    for (int i = 0; i < NT; ++i) {
      const int64_t r = (t0 + i) * o.ng + g;
      const int8_t* xg = o.xq + r * kLevels * kGroup;
      const __m512i xa1 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xg)));
      const __m512i xb1 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xg + 16)));
      const __m512i xa2 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xg + 32)));
      const __m512i xb2 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xg + 48)));
      const __m512 step = _mm512_set1_ps(o.dx[r]);
      const __m128 sum = _mm_set1_ps(o.sx[r]);
      for (int j = 0; j < NB; ++j) {
        __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[j], xa1);
        s = _mm512_slli_epi32(_mm512_dpbusd_epi32(s, hi[j], xb1), 8);  // level 1 counts 256 level-2 steps
        s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(s, lo[j], xa2), hi[j], xb2);
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d16[j], step), acc[i][j]);
        off[i][j] = _mm_fmadd_ps(m4[j], sum, off[i][j]);
      }
    }
  }
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < NB; ++j)
      _mm_storeu_ps(o.y + (t0 + i) * o.n + (b0 + j) * kRows, _mm_add_ps(lane_sums(acc[i][j]), off[i][j]));
}

// All activation rows against row blocks [b0, b1).
void blocks(const Operands& o, int64_t M, int64_t b0, int64_t b1) {
  if (M == 1) {  // decode: four blocks (16 rows) at a time share the activation loads
    int64_t b = b0;
    for (; b + 4 <= b1; b += 4) tile<1, 4>(o, 0, b);
    for (; b < b1; ++b) tile<1, 1>(o, 0, b);
    return;
  }
  for (int64_t b = b0; b < b1; ++b) {  // batches: four activation rows share each block's unpacked weights
    int64_t t = 0;
    for (; t + 4 <= M; t += 4) tile<4, 1>(o, t, b);
    switch (M - t) {
      case 3: tile<3, 1>(o, t, b); break;
      case 2: tile<2, 1>(o, t, b); break;
      case 1: tile<1, 1>(o, t, b); break;
      default: break;
    }
  }
}

torch::Tensor q4_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor d, torch::Tensor m) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 (M, K)");
  TORCH_CHECK(codes.dim() == 3 && codes.size(2) == 64 && codes.scalar_type() == torch::kUInt8 && codes.is_contiguous(),
              "codes: contiguous uint8 (N/4, G, 64)");
  const int64_t M = x.size(0), K = x.size(1), nb = codes.size(0), ng = codes.size(1), N = nb * kRows;
  TORCH_CHECK(K == ng * kGroup, "x has ", K, " columns, weights ", ng * kGroup);
  TORCH_CHECK(d.scalar_type() == torch::kFloat16 && m.scalar_type() == torch::kFloat16 && d.is_contiguous() &&
              m.is_contiguous() && d.numel() == nb * ng * kRows && m.numel() == nb * ng * kRows, "d, m: float16 (N/4, G, 4)");

  pybind11::gil_scoped_release no_gil;  // other Python threads (the server, other shards) run meanwhile
  std::vector<int8_t> xq(M * K * kLevels);
  std::vector<float> dx(M * ng), sx(M * ng);
  od::quantize_activations<kLevels>(x.data_ptr<float>(), M, K, xq.data(), dx.data(), sx.data());
  auto y = torch::empty({M, N}, x.options());
  const Operands o{codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>()),
                   reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>()), xq.data(), dx.data(), sx.data(),
                   y.data_ptr<float>(), ng, N};
  // Each thread takes a contiguous range of whole 4-block groups (so decode keeps its 4-block tiles).
  const int64_t quads = (nb + 3) / 4;
  parallel(quads, true, [&](int64_t q0, int64_t q1) { blocks(o, M, q0 * 4, std::min(nb, q1 * 4)); });
  return y;
}

// RMSNorm (Zhang & Sennrich 2019), as transformers' LlamaRMSNorm in float32: y = x / sqrt(mean(x²) + eps) · w.
// torch runs it as 6 ops on CPU (pow, mean, add, rsqrt, mul, mul: ~10 µs for one 576-wide row); this is one pass.
inline void rms_rows(const float* xp, const float* wp, int64_t M, int64_t H, float eps, float* yp) {
  for (int64_t r = 0; r < M; ++r) {
    const float* xr = xp + r * H;
    __m512 ss = _mm512_setzero_ps();
    for (int64_t k = 0; k < H; k += 16) {
      const __m512 v = _mm512_loadu_ps(xr + k);
      ss = _mm512_fmadd_ps(v, v, ss);
    }
    const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / H + eps));
    for (int64_t k = 0; k < H; k += 16) {
      _mm512_storeu_ps(yp + r * H + k, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(xr + k), inv), _mm512_loadu_ps(wp + k)));
    }
  }
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 (M, H)");
  const int64_t M = x.size(0), H = x.size(1);
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.is_contiguous() && w.numel() == H && H % 16 == 0,
              "w: float32 (H,), H % 16 == 0");
  auto y = torch::empty_like(x);
  rms_rows(x.data_ptr<float>(), w.data_ptr<float>(), M, H, static_cast<float>(eps), y.data_ptr<float>());
  return y;
}

// Attention of one new token per sequence over its cached positions, GQA: q (B, KV·G, D) contiguous, the layer's
// cache k, v (S, KV, C, D) contiguous, sequence b in cache slot slots[b] with lengths[b] positions (its new token
// included); returns (B, KV·G·D). softmax(q·kᵀ/√D)·v per query head in float32, the running max subtracted (as
// SDPA). torch's flash kernel spends ~30 µs per call on setup for the few KB a decode step attends over at
// short contexts, and a batch of sequences of different lengths needs a padded, masked call (260 µs for 16
// sequences); this takes a few µs per sequence and splits (sequence, KV head) pairs over the threads.
// The KV cache holds float32 or float16 (Ollama's default OLLAMA_KV_CACHE_TYPE=f16) elements: 16 at a time in and
// out of float32 registers (F16C: VCVTPH2PS / VCVTPS2PH, round to nearest even).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// A cache of float32 or float16 (both the same type), and which.
bool half_cache(const torch::Tensor& kc, const torch::Tensor& vc) {
  TORCH_CHECK(kc.dim() == 4 && kc.is_contiguous() && vc.is_contiguous() && kc.sizes() == vc.sizes() &&
              kc.scalar_type() == vc.scalar_type() &&
              (kc.scalar_type() == torch::kFloat32 || kc.scalar_type() == torch::kFloat16),
              "caches: contiguous float32 or float16 (S, KV, C, D)");
  return kc.scalar_type() == torch::kFloat16;
}

// e^y for 16 floats, as Cephes' expf: e^y = 2^n · e^r with n = round(y·log2 e) and r = y − n·ln 2 (ln 2 in two parts,
// C1 = 0.693359375 with few bits so n·C1 is exact, C2 = −2.12194440e−4), |r| ≤ ln2/2; e^r by its Taylor series to
// degree 7 (truncation < r^8/8! ≈ 6e−9, under float32's 6e−8 step), 2^n by VSCALEFPS (overflow to inf, underflow
// to 0). Inputs are clamped to ±100 (e^100 is already inf in float32) so that r stays exact; NaN passes through.
inline __m512 exp16(__m512 y) {
  y = _mm512_max_ps(_mm512_set1_ps(-100.f), _mm512_min_ps(_mm512_set1_ps(100.f), y));  // (NaN: min/max return y)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), y);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  for (const float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// NG query heads of one KV head over its T cached positions, CH = D / 16: a GQA group shares its keys and values,
// so each key and value row is loaded (and converted from float16) once for all NG heads, where one head at a time
// read the cache G times (SmolLM2: G = 3; 12 µs per layer at 150 positions before). Per head the operations and their
// order are those of one head alone, so the result does not depend on NG; the exponentials are exp16's. qs: the NG heads' q, pre-scaled, (NG, D);
// p: (NG, T) scratch; out: NG rows of D.
// The 16 horizontal sums of v[0..15], in order, each with _mm512_reduce_add_ps's additions (halves of 8, then 4,
// then (0+2, 1+3), then those two; GCC's avx512fintrin.h), so a score is bit for bit what one reduction gives. The
// 16 reductions share their shuffles: 45 instructions where 16 single reductions take ~130.
inline __m512 reduce16(const float (*v)[16]) {
  __m512 w[8], u[4], s[2];
  for (int k = 0; k < 8; ++k) {  // + offset 8: lanes 0,1 + lanes 2,3 of two vectors at once
    const __m512 a = _mm512_load_ps(v[2 * k]), b = _mm512_load_ps(v[2 * k + 1]);
    w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int k = 0; k < 4; ++k)  // + offset 4: lane 0 + lane 1 of each half
    u[k] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int k = 0; k < 2; ++k)  // (0 + 2, 1 + 3) within each lane
    s[k] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * k], u[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(u[2 * k], u[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(s[0], s[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(s[0], s[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // element 4i + j holds vector 4j + i's sum (a 4 x 4 transpose): undo it
  return _mm512_permutexvar_ps(od::by_row(), r);
}

// Position t's q·k products of NG heads, lane-wise (acc[j]: head j's 16 partial sums, not yet reduced).
template <class E, int CH, int NG>
inline void qk_partials(const float* qs, const E* kt, __m512 (&acc)[NG]) {
  constexpr int64_t D = 16 * CH;
  for (int c = 0; c < CH; ++c) {
    const __m512 k = load16(kt + 16 * c);
    for (int j = 0; j < NG; ++j)
      acc[j] = c == 0 ? _mm512_mul_ps(_mm512_loadu_ps(qs + j * D), k) : _mm512_fmadd_ps(_mm512_loadu_ps(qs + j * D + 16 * c), k, acc[j]);
  }
}

template <class E, int CH, int NG>
void attend_heads(const float* qs, const E* kh, const E* vh, int64_t T, float* p, float* out) {
  constexpr int64_t D = 16 * CH;
  float mx[NG], total[NG];
  for (int j = 0; j < NG; ++j) mx[j] = -INFINITY;
  int64_t t = 0;
  {  // 16 positions at a time: each head's 16 products summed by one shared reduction tree (reduce16)
    alignas(64) float part[NG][16][16];
    __m512 mxv[NG];
    for (int j = 0; j < NG; ++j) mxv[j] = _mm512_set1_ps(-INFINITY);
    for (; t + 16 <= T; t += 16) {
      for (int i = 0; i < 16; ++i) {
        __m512 acc[NG];
        qk_partials<E, CH, NG>(qs, kh + (t + i) * D, acc);
        for (int j = 0; j < NG; ++j) _mm512_store_ps(part[j][i], acc[j]);
      }
      for (int j = 0; j < NG; ++j) {
        const __m512 r = reduce16(part[j]);
        _mm512_storeu_ps(p + j * T + t, r);
        mxv[j] = _mm512_max_ps(mxv[j], r);
      }
    }
    for (int j = 0; j < NG; ++j) mx[j] = _mm512_reduce_max_ps(mxv[j]);
  }
  for (; t < T; ++t) {
    __m512 acc[NG];
    qk_partials<E, CH, NG>(qs, kh + t * D, acc);
    for (int j = 0; j < NG; ++j) {
      p[j * T + t] = _mm512_reduce_add_ps(acc[j]);
      mx[j] = std::max(mx[j], p[j * T + t]);
    }
  }
  for (int j = 0; j < NG; ++j) {  // softmax numerators, 16 at a time (a scalar std::exp each was 40 % of the time)
    float* pj = p + j * T;
    const __m512 m = _mm512_set1_ps(mx[j]);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < T; t += 16) {
      const __mmask16 live = T - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (T - t)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, pj + t), m)));
      _mm512_mask_storeu_ps(pj + t, live, e);
      sum = _mm512_add_ps(sum, e);
    }
    total[j] = _mm512_reduce_add_ps(sum);
  }
  __m512 o[NG][CH];
  for (int j = 0; j < NG; ++j)
    for (int c = 0; c < CH; ++c) o[j][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < T; ++t) {
    const E* vt = vh + t * D;
    for (int c = 0; c < CH; ++c) {
      const __m512 v = load16(vt + 16 * c);
      for (int j = 0; j < NG; ++j) o[j][c] = _mm512_fmadd_ps(_mm512_set1_ps(p[j * T + t]), v, o[j][c]);
    }
  }
  for (int j = 0; j < NG; ++j) {
    const __m512 inv = _mm512_set1_ps(1.f / total[j]);
    for (int c = 0; c < CH; ++c) _mm512_storeu_ps(out + j * D + 16 * c, _mm512_mul_ps(o[j][c], inv));
  }
}

// The G heads of a group, NG at a time: as many as keep NG·CH accumulators in registers (16 of the 32).
template <class E, int CH>
void attend_group(const float* qs, const E* kh, const E* vh, int64_t T, int64_t G, float* p, float* out) {
  constexpr int kMax = CH <= 4 ? 4 : 16 / CH;
  constexpr int64_t D = 16 * CH;
  int64_t j = 0;
  for (; j + kMax <= G; j += kMax) attend_heads<E, CH, kMax>(qs + j * D, kh, vh, T, p, out + j * D);
  // the rest together too (SmolLM2's G = 3 < kMax = 4 went one head at a time: its keys read three times)
  if constexpr (kMax >= 4) {
    if (G - j == 3) return attend_heads<E, CH, 3>(qs + j * D, kh, vh, T, p, out + j * D);
  }
  if constexpr (kMax >= 3) {
    if (G - j == 2) return attend_heads<E, CH, 2>(qs + j * D, kh, vh, T, p, out + j * D);
  }
  for (; j < G; ++j) attend_heads<E, CH, 1>(qs + j * D, kh, vh, T, p, out + j * D);
}

// q (B, KV·G, D), the layer's caches (S, KV, C, D), per sequence its slot and length -> out (B, KV·G·D).
// D in {32, 64, 128, 256} takes attend_group; other multiples of 16 one head at a time (the same operations).
template <class E>
void attend_rows(const float* qp, const E* kp, const E* vp, int64_t B, int64_t KV, int64_t G, int64_t C, int64_t D,
                 const int64_t* sl, const int64_t* ln, float* op) {
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work += ln[b];
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t chunks = D / 16;
  auto pairs = [&](int64_t p0, int64_t p1) {
    std::vector<float> p, qs(G * D);
    for (int64_t pair = p0; pair < p1; ++pair) {
      const int64_t b = pair / KV, h = pair % KV, T = ln[b];
      const E* kh = kp + (sl[b] * KV + h) * C * D;
      const E* vh = vp + (sl[b] * KV + h) * C * D;
      const int64_t head0 = (b * KV + h) * G;  // = b·H + h·G
      if (D == 32 || D == 64 || D == 128 || D == 256) {
        p.resize(G * T);
        for (int64_t i = 0; i < G * D; i += 16)
          _mm512_storeu_ps(qs.data() + i, _mm512_mul_ps(_mm512_loadu_ps(qp + head0 * D + i), _mm512_set1_ps(scale)));
        float* out = op + head0 * D;
        switch (D) {
          case 32: attend_group<E, 2>(qs.data(), kh, vh, T, G, p.data(), out); break;
          case 64: attend_group<E, 4>(qs.data(), kh, vh, T, G, p.data(), out); break;
          case 128: attend_group<E, 8>(qs.data(), kh, vh, T, G, p.data(), out); break;
          default: attend_group<E, 16>(qs.data(), kh, vh, T, G, p.data(), out); break;
        }
        continue;
      }
      p.resize(T);
      for (int64_t j = 0; j < G; ++j) {
        const int64_t head = head0 + j;
        __m512 qv[16];
        for (int64_t c = 0; c < chunks; ++c) qv[c] = _mm512_mul_ps(_mm512_loadu_ps(qp + head * D + 16 * c), _mm512_set1_ps(scale));
        float mx = -INFINITY;
        for (int64_t t = 0; t < T; ++t) {
          const E* kt = kh + t * D;
          __m512 acc = _mm512_mul_ps(qv[0], load16(kt));
          for (int64_t c = 1; c < chunks; ++c) acc = _mm512_fmadd_ps(qv[c], load16(kt + 16 * c), acc);
          p[t] = _mm512_reduce_add_ps(acc);
          mx = std::max(mx, p[t]);
        }
        float total = 0.f;
        for (int64_t t = 0; t < T; ++t) total += (p[t] = std::exp(p[t] - mx));
        __m512 o[16];
        for (int64_t c = 0; c < chunks; ++c) o[c] = _mm512_setzero_ps();
        for (int64_t t = 0; t < T; ++t) {
          const E* vt = vh + t * D;
          const __m512 pt = _mm512_set1_ps(p[t]);
          for (int64_t c = 0; c < chunks; ++c) o[c] = _mm512_fmadd_ps(pt, load16(vt + 16 * c), o[c]);
        }
        const __m512 inv = _mm512_set1_ps(1.f / total);
        for (int64_t c = 0; c < chunks; ++c) _mm512_storeu_ps(op + head * D + 16 * c, _mm512_mul_ps(o[c], inv));
      }
    }
  };
  // Split over threads only when there is enough to outweigh handing work to them (~64k multiply-adds).
  parallel(B * KV, work * G * D >= (1 << 16), pairs);
}

template <class E>
torch::Tensor attend_impl(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, torch::Tensor slots, torch::Tensor lengths) {
  const int64_t S = kc.size(0), KV = kc.size(1), C = kc.size(2), D = kc.size(3), B = q.size(0);
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.scalar_type() == torch::kFloat32 && q.size(1) % KV == 0 && q.size(2) == D,
              "q: contiguous float32 (B, KV·G, D), got ", q.sizes());
  TORCH_CHECK(D % 16 == 0 && D <= 256, "head_dim ", D, ": need a multiple of 16, at most 256");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && lengths.scalar_type() == torch::kInt64 && slots.numel() == B &&
              lengths.numel() == B && slots.is_contiguous() && lengths.is_contiguous(), "slots, lengths: int64 (B,)");
  const int64_t G = q.size(1) / KV;
  const int64_t* sl = slots.data_ptr<int64_t>();
  const int64_t* ln = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(sl[b] >= 0 && sl[b] < S && ln[b] > 0 && ln[b] <= C, "sequence ", b, ": slot ", sl[b], ", length ", ln[b], " outside the cache");
  auto out = torch::empty({B, KV * G * D}, q.options());
  pybind11::gil_scoped_release no_gil;
  attend_rows<E>(q.data_ptr<float>(), kc.data_ptr<E>(), vc.data_ptr<E>(), B, KV, G, C, D, sl, ln, out.data_ptr<float>());
  return out;
}

torch::Tensor attend_cached(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, torch::Tensor slots, torch::Tensor lengths) {
  return half_cache(kc, vc) ? attend_impl<at::Half>(q, kc, vc, slots, lengths) : attend_impl<float>(q, kc, vc, slots, lengths);
}

// RoPE on the new tokens' q and k heads, and k, v into the cache, in one pass: q/k/v come packed as one qkv row
// per token ((H + 2·KV)·D floats), cos and the signed sin are (N, D) (model/rope.py: rotate_half(x)·sin =
// roll(x, D/2)·signed_sin), and token n's k and v land at cache[slot[n], head, pos[n]]. Replaces ~10 torch ops
// per layer (rope's mul/roll/mul/add and two index_put_ with their views). Returns the rotated q (N, H, D).
// Token n's packed qkv row -> its rotated q heads (q, (N, H, D)), rotated k and v heads into the layer's caches at
// [slot[n], head, pos[n]].
template <class E>
void rope_rows(const float* xp, const float* cp, const float* sp, E* kp, E* vp, const int64_t* slp, const int64_t* pp,
               int64_t N, int64_t H, int64_t KV, int64_t C, int64_t D, float* qp) {
  const int64_t half = D / 2;
  for (int64_t n = 0; n < N; ++n) {
    const float* row = xp + n * (H + 2 * KV) * D;
    const float* cn = cp + n * D;
    const float* sn = sp + n * D;
    // rotated q heads go to q (float32), rotated k heads to the cache (E)
    auto rotate = [&](const float* x, auto* out) {
      for (int64_t i = 0; i < half; i += 16) {
        const __m512 lo = _mm512_loadu_ps(x + i), hi = _mm512_loadu_ps(x + half + i);
        store16(out + i, _mm512_fmadd_ps(hi, _mm512_loadu_ps(sn + i), _mm512_mul_ps(lo, _mm512_loadu_ps(cn + i))));
        store16(out + half + i,
                _mm512_fmadd_ps(lo, _mm512_loadu_ps(sn + half + i), _mm512_mul_ps(hi, _mm512_loadu_ps(cn + half + i))));
      }
    };
    for (int64_t h = 0; h < H; ++h) rotate(row + h * D, qp + (n * H + h) * D);
    for (int64_t h = 0; h < KV; ++h) rotate(row + (H + h) * D, kp + ((slp[n] * KV + h) * C + pp[n]) * D);
    for (int64_t h = 0; h < KV; ++h) {
      const float* v = row + (H + KV + h) * D;
      E* dst = vp + ((slp[n] * KV + h) * C + pp[n]) * D;
      for (int64_t i = 0; i < D; i += 16) store16(dst + i, _mm512_loadu_ps(v + i));
    }
  }
}

template <class E>
torch::Tensor rope_impl(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor kc, torch::Tensor vc,
                        torch::Tensor slot, torch::Tensor pos, int64_t H, int64_t KV) {
  const int64_t S = kc.size(0), C = kc.size(2), D = kc.size(3), N = qkv.size(0);
  TORCH_CHECK(kc.size(1) == KV && D % 32 == 0, "cache heads/head_dim: ", kc.sizes());
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.scalar_type() == torch::kFloat32 && qkv.size(1) == (H + 2 * KV) * D,
              "qkv: contiguous float32 (N, (H + 2KV) D)");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == N * D && sin.numel() == N * D &&
              cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32, "cos, sin: float32 (N, D)");
  TORCH_CHECK(slot.scalar_type() == torch::kInt64 && pos.scalar_type() == torch::kInt64 && slot.numel() == N &&
              pos.numel() == N && slot.is_contiguous() && pos.is_contiguous(), "slot, pos: int64 (N,)");
  const int64_t* slp = slot.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(slp[n] >= 0 && slp[n] < S && pp[n] >= 0 && pp[n] < C, "token ", n, ": slot ", slp[n], " pos ", pp[n], " outside the cache");
  auto q = torch::empty({N, H, D}, qkv.options());
  rope_rows<E>(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), kc.data_ptr<E>(), vc.data_ptr<E>(),
               slp, pp, N, H, KV, C, D, q.data_ptr<float>());
  return q;
}

torch::Tensor rope_cache(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor kc, torch::Tensor vc,
                         torch::Tensor slot, torch::Tensor pos, int64_t H, int64_t KV) {
  return half_cache(kc, vc) ? rope_impl<at::Half>(qkv, cos, sin, kc, vc, slot, pos, H, KV)
                            : rope_impl<float>(qkv, cos, sin, kc, vc, slot, pos, H, KV);
}

// silu(g)·u per element (Llama's SwiGLU FFN, Shazeer 2020: down(silu(gate(x)) · up(x))), silu(g) = g / (1 + e^−g)
// as torch's F.silu computes it; F % 16 == 0.
inline void swiglu_rows(const float* gu, int64_t B, int64_t F, float* out) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < F; j += 16) {
      const __m512 g = _mm512_loadu_ps(gu + b * 2 * F + j), u = _mm512_loadu_ps(gu + b * 2 * F + F + j);
      const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      _mm512_storeu_ps(out + b * F + j, _mm512_mul_ps(silu, u));
    }
}

// A decode step through every layer of a shard in one call: for B sequences of one new token each,
//   h += o(attend(rope(q, k), v))  with q, k, v = qkv(rmsnorm(h)) (+ bias, per-head q/k norms, q scaled)
//   h += down(silu(gate) · up)     with gate, up = gu(rmsnorm(h))
// (model/transformer.py ModelShard._block for llama, qwen2 and qwen3 layers; the same kernels and the same order of
// operations, so the result equals the op-by-op path's up to SiLU's last bits). The op-by-op path costs ~15 torch
// and pybind calls per layer (norms, adds, splits, SiLU, the kernels' argument checks), ~200 µs per SmolLM2 layer
// of Python and dispatch against ~80 µs of matmuls; here each layer is a few C++ calls, and the GIL is released
// for the whole step except the tensor-parallel all-reduce (a Python callable: the caller's collective).
// Weights stay model/native.py's NativeMatrix tensors (kept alive here); q/k/v and gate/up may be several parts
// of different types (a Q4_K_M file's Q4_K q, k with a Q6_K v), computed on one quantisation of their input.
class DecodePlan {
 public:
  DecodePlan(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t ffn, double eps, double q_factor)
      : hidden_(hidden), heads_(heads), kv_(kv_heads), dim_(head_dim), ffn_(ffn), eps_(static_cast<float>(eps)),
        q_factor_(static_cast<float>(q_factor)) {
    TORCH_CHECK(hidden % 16 == 0 && head_dim % 32 == 0 && head_dim <= 256 && ffn % 16 == 0 && kv_heads > 0 &&
                heads % kv_heads == 0, "DecodePlan: unsupported shape");
  }

  void add_layer(const torch::Tensor& attn_norm, const torch::Tensor& ffn_norm, const pybind11::list& qkv,
                 const pybind11::object& bias, const pybind11::object& q_norm, const pybind11::object& k_norm,
                 const pybind11::list& o, const pybind11::list& gu, const pybind11::list& down) {
    Layer l;
    l.attn_norm = vector(attn_norm, hidden_);
    l.ffn_norm = vector(ffn_norm, hidden_);
    l.qkv = parts(qkv, (heads_ + 2 * kv_) * dim_, hidden_);
    l.bias = bias.is_none() ? nullptr : vector(bias.cast<torch::Tensor>(), (heads_ + 2 * kv_) * dim_);
    TORCH_CHECK(q_norm.is_none() == k_norm.is_none(), "q_norm and k_norm come together");
    l.q_norm = q_norm.is_none() ? nullptr : vector(q_norm.cast<torch::Tensor>(), dim_);
    l.k_norm = k_norm.is_none() ? nullptr : vector(k_norm.cast<torch::Tensor>(), dim_);
    l.o = parts(o, hidden_, heads_ * dim_);
    l.gu = parts(gu, 2 * ffn_, hidden_);
    l.down = parts(down, hidden_, ffn_);
    layers_.push_back(std::move(l));
  }

  // h (B, hidden) float32 -> h after every layer. kc, vc: the shard's KV cache (layers, S, KV, C, D), float32 or
  // float16; token b is written at [slot[b], :, pos[b]] and attends over positions [0, pos[b]]. cos, sin (B, D):
  // model/rope.py's tables. all_reduce: None, or the tensor-parallel sum (called on each o / down output).
  torch::Tensor run(const torch::Tensor& h, const torch::Tensor& kc, const torch::Tensor& vc, const torch::Tensor& slot,
                    const torch::Tensor& pos, const torch::Tensor& cos, const torch::Tensor& sin,
                    const pybind11::object& all_reduce) {
    const int64_t B = h.size(0), L = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(h.dim() == 2 && h.size(1) == hidden_ && h.scalar_type() == torch::kFloat32, "h: float32 (B, hidden)");
    TORCH_CHECK(kc.dim() == 5 && kc.size(0) == L && kc.size(1) > 0 && kc.size(2) == kv_ && kc.size(4) == dim_,
                "caches: (layers, S, KV, C, D), got ", kc.sizes());
    const bool f16 = half_cache(kc[0], vc[0]);
    const int64_t S = kc.size(1), C = kc.size(3);
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == B * dim_ && sin.numel() == B * dim_ &&
                cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32, "cos, sin: float32 (B, D)");
    TORCH_CHECK(slot.scalar_type() == torch::kInt64 && pos.scalar_type() == torch::kInt64 && slot.numel() == B &&
                pos.numel() == B && slot.is_contiguous() && pos.is_contiguous(), "slot, pos: int64 (B,)");
    const int64_t* sl = slot.data_ptr<int64_t>();
    const int64_t* pp = pos.data_ptr<int64_t>();
    std::vector<int64_t> lengths(B);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(sl[b] >= 0 && sl[b] < S && pp[b] >= 0 && pp[b] < C, "token ", b, ": slot ", sl[b], " pos ", pp[b],
                  " outside the cache");
      lengths[b] = pp[b] + 1;
    }
    const bool reduce = !all_reduce.is_none();
    torch::Tensor out = h.contiguous().clone();
    torch::Tensor o_t = torch::empty({B, hidden_}, h.options());  // a tensor: handed to all_reduce
    float* hp = out.data_ptr<float>();
    float* op = o_t.data_ptr<float>();
    const int64_t qkv_w = (heads_ + 2 * kv_) * dim_, layer_elems = S * kv_ * C * dim_;
    std::vector<float> xn(B * hidden_), qkv(B * qkv_w), q(B * heads_ * dim_), att(B * heads_ * dim_),
        gu(B * 2 * ffn_), act(B * ffn_);
    auto sum = [&]() {  // the all-reduce of o_t's partial sums, then o_t's values in op
      if (!reduce) return;
      pybind11::gil_scoped_acquire gil;
      torch::Tensor r = all_reduce(o_t).cast<torch::Tensor>();
      TORCH_CHECK(r.scalar_type() == torch::kFloat32 && r.numel() == B * hidden_, "all_reduce returned ", r.sizes());
      if (r.data_ptr() != o_t.data_ptr()) std::memcpy(op, r.contiguous().data_ptr<float>(), B * hidden_ * sizeof(float));
    };
    pybind11::gil_scoped_release no_gil;
    for (int64_t li = 0; li < L; ++li) {
      const Layer& l = layers_[li];
      rms_rows(hp, l.attn_norm, B, hidden_, eps_, xn.data());
      native_matmul(l.qkv.data(), l.qkv.size(), xn.data(), B, qkv.data(), qkv_w);
      for (int64_t b = 0; b < B; ++b) {
        float* row = qkv.data() + b * qkv_w;
        if (l.bias != nullptr)
          for (int64_t j = 0; j < qkv_w; ++j) row[j] += l.bias[j];
        if (l.q_norm != nullptr) {  // qwen3: RMSNorm per head of q and of k, before RoPE
          rms_rows(row, l.q_norm, heads_, dim_, eps_, row);
          rms_rows(row + heads_ * dim_, l.k_norm, kv_, dim_, eps_, row + heads_ * dim_);
        }
        if (q_factor_ != 1.f)
          for (int64_t j = 0; j < heads_ * dim_; ++j) row[j] *= q_factor_;
      }
      if (f16) {
        auto* kp = kc.data_ptr<at::Half>() + li * layer_elems;
        auto* vp = vc.data_ptr<at::Half>() + li * layer_elems;
        rope_rows<at::Half>(qkv.data(), cos.data_ptr<float>(), sin.data_ptr<float>(), kp, vp, sl, pp, B, heads_, kv_, C, dim_, q.data());
        attend_rows<at::Half>(q.data(), kp, vp, B, kv_, heads_ / kv_, C, dim_, sl, lengths.data(), att.data());
      } else {
        float* kp = kc.data_ptr<float>() + li * layer_elems;
        float* vp = vc.data_ptr<float>() + li * layer_elems;
        rope_rows<float>(qkv.data(), cos.data_ptr<float>(), sin.data_ptr<float>(), kp, vp, sl, pp, B, heads_, kv_, C, dim_, q.data());
        attend_rows<float>(q.data(), kp, vp, B, kv_, heads_ / kv_, C, dim_, sl, lengths.data(), att.data());
      }
      native_matmul(l.o.data(), l.o.size(), att.data(), B, op, hidden_);
      sum();
      for (int64_t i = 0; i < B * hidden_; ++i) hp[i] += op[i];
      rms_rows(hp, l.ffn_norm, B, hidden_, eps_, xn.data());
      native_matmul(l.gu.data(), l.gu.size(), xn.data(), B, gu.data(), 2 * ffn_);
      swiglu_rows(gu.data(), B, ffn_, act.data());
      native_matmul(l.down.data(), l.down.size(), act.data(), B, op, hidden_);
      sum();
      for (int64_t i = 0; i < B * hidden_; ++i) hp[i] += op[i];
    }
    return out;
  }

 private:
  struct Layer {
    const float *attn_norm, *ffn_norm, *bias, *q_norm, *k_norm;
    std::vector<od::NativeWeights> qkv, o, gu, down;
  };

  const float* vector(const torch::Tensor& t, int64_t n) {
    TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.numel() == n, "expected a contiguous float32 vector of ", n);
    keep_.push_back(t);
    return t.data_ptr<float>();
  }

  // (codes, planes, d, dmin, sc, m, n[, q8_1]) per part, rows adding up to `rows`, `cols` inputs each
  std::vector<od::NativeWeights> parts(const pybind11::list& list, int64_t rows, int64_t cols) {
    std::vector<od::NativeWeights> out;
    int64_t total = 0;
    for (const auto& item : list) {
      const auto t = item.cast<pybind11::tuple>();
      TORCH_CHECK(t.size() == 7 || t.size() == 8, "a part is (codes, planes, d, dmin, sc, m, n[, q8_1])");
      std::vector<torch::Tensor> ts;
      for (int i = 0; i < 6; ++i) ts.push_back(t[i].cast<torch::Tensor>());
      out.push_back(od::native_weights(ts[0], ts[1], ts[2], ts[3], ts[4], ts[5], t[6].cast<int64_t>(),
                                       t.size() == 8 && t[7].cast<bool>()));
      TORCH_CHECK(out.back().ng * kGroup == cols, "a part has ", out.back().ng * kGroup, " inputs, expected ", cols);
      total += out.back().n;
      keep_.insert(keep_.end(), ts.begin(), ts.end());
    }
    TORCH_CHECK(!out.empty() && total == rows, "parts hold ", total, " rows, expected ", rows);
    return out;
  }

  const int64_t hidden_, heads_, kv_, dim_, ffn_;
  const float eps_, q_factor_;
  std::vector<Layer> layers_;
  std::vector<torch::Tensor> keep_;  // the tensors behind every pointer above
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  od::register_native(mod);  // qmatmul, dequant_rows (native_kernels.cpp)
  mod.def("q4_matmul", &q4_matmul, "Y = X W^T, W 4-bit groups in blocks of 4 rows, X quantised to int8 per group");
  mod.def("rms_norm", &rms_norm, "RMSNorm of float32 rows");
  mod.def("attend_cached", &attend_cached, "one-query GQA attention per sequence over its cache slot");
  mod.def("rope_cache", &rope_cache, "RoPE on q and k, k and v into the cache; returns q");
  pybind11::class_<DecodePlan>(mod, "DecodePlan")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double>())
      .def("add_layer", &DecodePlan::add_layer)
      .def("run", &DecodePlan::run);
}
