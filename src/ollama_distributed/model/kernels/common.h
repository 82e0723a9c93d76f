// What cpu_kernels.cpp and native_kernels.cpp share: the spinning thread pool and `parallel`, and (AVX-512 builds)
// the int8 activation quantisation. Everything here is `inline` in a named namespace, not in an anonymous
// one, so that the pool's function-local statics exist once per process, not once per source file.
#pragma once

// Only the headers the kernels use, not <torch/extension.h>: that one pulls in all of libtorch's C++ API (autograd,
// nn modules) and took 3x longer to compile (measured 43 s vs 14 s for cpu_kernels.cpp on this 2-core machine), which
// a fresh install pays before its first request (model/cpu_kernels.py builds in the background at start-up).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>  // pybind11, with its at::Tensor caster
#include <immintrin.h>

#include <strings.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>

// The names the kernels use from torch's C++ API (<torch/extension.h> would bring them), from ATen itself.
namespace torch {
using at::empty;
using at::empty_like;
using at::Tensor;
using c10::dtype;
constexpr auto kFloat32 = at::kFloat;
constexpr auto kFloat16 = at::kHalf;
constexpr auto kInt64 = at::kLong;
constexpr auto kInt8 = at::kChar;
constexpr auto kUInt8 = at::kByte;
}  // namespace torch

namespace od {

constexpr int64_t kGroup = 32;  // inputs per activation scale: GGUF's legacy block (QK4_0 in ggml-common.h)
constexpr int64_t kRows = 4;    // weight rows per block: one per 128-bit lane

// Whether OpenMP's idle threads sleep (OMP_WAIT_POLICY=PASSIVE; libgomp reads it once, at start-up).
inline bool openmp_sleeps() {
  static const bool passive = [] {
    const char* policy = std::getenv("OMP_WAIT_POLICY");
    return policy != nullptr && strcasecmp(policy, "passive") == 0;
  }();
  return passive;
}

// Worker threads for our kernels that spin between calls, then sleep. A decode step makes 4 matmuls per layer a
// few µs apart; under OMP_WAIT_POLICY=PASSIVE (our default, so that a team never spins against a busy neighbour)
// every OpenMP parallel region wakes a sleeping thread, which costs tens of µs in this VM and made the int4 step
// ~2.7x slower than under libgomp's spinning default (bench/README.md section 6). Like llama.cpp's thread pool,
// these workers spin for kSpin after each call, so they stay awake through a step and sleep between requests.
class SpinPool {
 public:
  static SpinPool& get(int threads) {
    static SpinPool* pool = nullptr;
    static std::mutex create;
    std::lock_guard<std::mutex> lock(create);
    if (pool == nullptr || pool->threads_ != threads || pool->pid_ != getpid()) {
      // (a new intra-op thread count, or a forked child, whose copy has no workers; the old pool's threads, if
      // any, sleep on)
      pool = new SpinPool(threads);
    }
    return *pool;
  }

  // Runs fn(t) for t in [0, threads) and returns when all have; t = 0 on the calling thread. One call at a time.
  void run(const std::function<void(int)>& fn) {
    std::lock_guard<std::mutex> one(running_);
    task_ = &fn;
    pending_.store(threads_ - 1, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      wake_.notify_all();
    }
    fn(0);
    while (pending_.load(std::memory_order_acquire) > 0) _mm_pause();
  }

 private:
  static constexpr auto kSpin = std::chrono::microseconds(500);

  explicit SpinPool(int threads) : threads_(threads), pid_(getpid()) {
    for (int t = 1; t < threads; ++t) std::thread([this, t] { work(t); }).detach();
  }

  void work(int t) {
    uint64_t seen = 0;  // the generation at construction (not a fresh load: run() may already have begun one)
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      int polls = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        _mm_pause();
        if (++polls % 64 == 0 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lock(mu_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_seq_cst) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_relaxed);
          break;
        }
      }
      ++seen;  // run() waits for every worker, so each generation is seen exactly once
      (*task_)(t);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  const int threads_;
  const pid_t pid_;
  const std::function<void(int)>* task_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> sleepers_{0};
  std::mutex mu_, running_;
  std::condition_variable wake_;
};

// fn(begin, end) over [0, n) in one contiguous range per thread, on the spinning pool or OpenMP's team (see
// openmp_sleeps); inline when not `worth` it or with one thread.
template <class F>
void parallel(int64_t n, bool worth, const F& fn) {
  // The pool always has the intra-op thread count (one pool per process, not one per size); with fewer items than
  // threads some ranges are empty.
  const int threads = at::get_num_threads();
  if (!worth || threads <= 1 || n <= 1) {
    fn(0, n);
  } else if (openmp_sleeps()) {
    SpinPool::get(threads).run([&](int t) { fn(n * t / threads, n * (t + 1) / threads); });
  } else {  // OpenMP's own team spins between regions: a second spinning pool would only compete with it
    at::parallel_for(0, n, (n + threads - 1) / threads, fn);
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// The 4 x 4 transpose of 16 lanes: element e = 4r + j <-> element 4j + r (its own inverse). The native kernels'
// blocks hold row r of block j at 4r + j ("by lane") and reorder to row 4j + r with it; decode attention's
// reduce16 undoes its tree's order with it.
inline __m512i by_row() { return _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15); }

// Activations in int8 per group of 32, in LEVELS levels: x ≈ dx·q (LEVELS = 1), or x ≈ dx·(256·q1 + q2) (LEVELS = 2:
// the codes of x, then those of what they missed, x − 256·dx·q1, at most 128·dx, in steps of dx).
//
// LEVELS = 1 is ggml's own activation quantisation for these types: the weight type's dot-product partner,
// Q8_1 (ggml-quants.c quantize_row_q8_1_ref: d = amax/127, q = round(x/d), s = d·Σq) for Q4_0/Q4_1/Q5_x, Q8_0's
// (the same d and q) for Q8_0, and Q8_K for the K-quants, whose one scale per 256 inputs we refine to one per 32
// (never coarser than ggml's): one VPDPBUSD per 16 weights of 4 rows, as llama.cpp. The native kernels build it
// with -DOD_ACT_LEVELS=1 (native_kernels.cpp); it is not the default: their greedy text then followed neither
// llama.cpp's nor transformers' on 2-3 of 5 prompts (bench/README.md, issue 13).
// LEVELS = 2 (the default, and q4_matmul's) keeps ~15 bits per group (one level loses the small inputs of a group
// that holds an outlier: on SmolLM2 greedy agreement with fp32, teacher-forced, was 98.8 % with two levels and
// 93.4 % with one). Both levels share one integer sum (256·s1 + s2) since the second scale is exactly the first / 256.
// Rounding is to nearest even (the default MXCSR mode, as ggml's AVX paths' _mm256_round_ps), saturating to int8
// (only LEVELS = 2's +128 in level 2 clips, by 1).
// Out: q (M·G, LEVELS, 32) int8, dx (M·G) = the finest step, sx (M·G) = Σ x per group, and where `sx_half` is
// given, (M·G, 2) = Σ x over inputs 0..15 and 16..31 of each group (Q6_K's scales are per 16). The sums are those
// of the quantised x (step · Σ codes, as quantize_row_q8_1_ref's s = d·Σqs): a weight's offset term (−dmin·m·Σx)
// then cancels against its code term (d·sc·Σq·x) exactly, and the result's error is Σ w·(x̃ − x). With the exact
// float Σx instead, the error is Σ d·q·(x̃ − x): 3-5x larger for biased codes (Q4_0's q − 8, Q8_0's q + 128).
// Where `sx_q8_1` is given (LEVELS = 1), also (M·G) = block_q8_1's s, float16(d·Σq) with d before its rounding:
// what ggml's Q4_1 / Q5_1 dot products multiply the weights' m by (ggml_vec_dot_q4_1_q8_1).
template <int LEVELS>
inline void quantize_activations(const float* x, int64_t M, int64_t K, int8_t* q, float* dx, float* sx,
                                 float* sx_half = nullptr, float* sx_q8_1 = nullptr) {
  const int64_t ng = K / kGroup;
  for (int64_t i = 0; i < M * ng; ++i) {
    const float* p = x + i * kGroup;
    __m512 a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    float scale = amax / 127.f;
    // one level: the scale as ggml stores it, float16 (block_q8_0 / block_q8_1 d), the codes from the exact one
    dx[i] = LEVELS == 2 ? scale / 256.f : _cvtsh_ss(_cvtss_sh(scale, _MM_FROUND_TO_NEAREST_INT));
    int32_t sum_a = 0, sum_b = 0;  // Σ codes (LEVELS = 2: Σ (256·q1 + q2)) over inputs 0..15 and 16..31
    for (int level = 0; level < LEVELS; ++level) {
      const __m512 inv = _mm512_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
      const __m512i lo = _mm512_set1_epi32(-128), hi = _mm512_set1_epi32(127);
      const __m512i qa = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), lo), hi);
      const __m512i qb = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(b, inv)), lo), hi);
      int8_t* out = q + (i * LEVELS + level) * kGroup;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(qa));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm512_cvtepi32_epi8(qb));
      sum_a = sum_a * 256 + _mm512_reduce_add_epi32(qa);
      sum_b = sum_b * 256 + _mm512_reduce_add_epi32(qb);
      if (LEVELS > 1) {
        const __m512 vs = _mm512_set1_ps(scale);
        a = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(qa), vs, a);  // the remainder for the next level
        b = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(qb), vs, b);
        scale /= 256.f;
      }
    }
    sx[i] = dx[i] * static_cast<float>(sum_a + sum_b);
    if (sx_q8_1 != nullptr)
      sx_q8_1[i] = _cvtsh_ss(_cvtss_sh(amax / 127.f * static_cast<float>(sum_a + sum_b), _MM_FROUND_TO_NEAREST_INT));
    if (sx_half != nullptr) {
      sx_half[2 * i] = dx[i] * static_cast<float>(sum_a);
      sx_half[2 * i + 1] = dx[i] * static_cast<float>(sum_b);
    }
  }
}

// Sum of each 128-bit lane of v (one row's partial sums) -> the 4 row totals.
inline __m128 lane_sums(__m512 v) {
  v = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
  const __m512i first = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(first, v));
}
#endif

// A NativeMatrix (model/native.py) resolved to pointers: native_kernels.cpp's operand, also held by cpu_kernels.cpp's
// DecodePlan, which calls the matmul from C++ for every layer of a decode step.
struct NativeWeights {
  const uint8_t* codes;    // (N/4, G, 64), or (N/4, G, 128) whole bytes (Q8_0)
  const uint64_t* planes;  // (N/4, G, P, 2)
  const uint16_t* d;       // (N/4, S, 4) float16
  const uint16_t* dmin;
  const int8_t* sc;        // (N/4, G, H, 4) or null
  const int8_t* m;
  int64_t ng, ns, n;       // groups and super-blocks per row, rows (unpadded)
  int64_t ld;              // the output's row stride (n, or more when parts share an output)
  int64_t planes_count;    // P, or 8 for whole-byte codes
  bool half;               // Q6_K's per-16 scales
  bool q8_1;               // Q4_1, Q5_1: offsets times the activations' Σ as ggml rounds it (quantize_activations)
};

// Checks a NativeMatrix's tensors (native.py's layout) and resolves them; the tensors must outlive the result.
NativeWeights native_weights(const at::Tensor& codes, const at::Tensor& planes, const at::Tensor& d,
                             const at::Tensor& dmin, const at::Tensor& sc, const at::Tensor& m, int64_t n,
                             bool q8_1 = false);

// y[:, c_p : c_p + n_p] = x W_pᵀ for the parts p of an output-row concatenation (c_p = n_0 + … + n_(p−1); y's row
// stride ldy): x (M, K) float32 quantised once for all parts, and one parallel pass over all parts' row blocks.
// Call without the GIL.
void native_matmul(const NativeWeights* parts, int64_t count, const float* x, int64_t M, float* y, int64_t ldy);

// Defines qmatmul and dequant_rows (native_kernels.cpp) in the extension's module.
void register_native(pybind11::module_& mod);

}  // namespace od
