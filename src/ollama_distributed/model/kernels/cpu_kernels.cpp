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
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <strings.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace {

// Whether OpenMP's idle threads sleep (OMP_WAIT_POLICY=PASSIVE; libgomp reads it once, at start-up).
bool openmp_sleeps() {
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


constexpr int64_t kGroup = 32;
constexpr int64_t kRows = 4;   // rows per block: one per 128-bit lane
constexpr int kLevels = 2;     // int8 levels per activation group (see quantize_activations)

// x ≈ dx·(q1 + q2/256) per group: the int8 codes of x, then those of what they missed (x − dx·q1, at most dx/2,
// in steps of dx/256). One level of int8 per group loses the small inputs of any group that holds an outlier
// (LLM activations have a few channels 100x the rest): on SmolLM2, greedy agreement with fp32 fell from 98.8 % to
// 93.4 % with one level (the logits' max relative error from 0.027 to 0.18). With two, x keeps ~15 bits per
// group, and since the second scale is exactly the first / 256 both levels share one integer sum
// (s1·256 + s2 < 2^24: no overflow, exact in the float conversion).
// Out: q (M·G, 2, 32) int8, dx (M·G) = the level-2 step dx/256, sx (M·G) = Σ x per group in float.
void quantize_activations(const float* x, int64_t M, int64_t K, int8_t* q, float* dx, float* sx) {
  const int64_t ng = K / kGroup;
  for (int64_t i = 0; i < M * ng; ++i) {
    const float* p = x + i * kGroup;
    __m512 a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
    sx[i] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    float scale = amax / 127.f;
    dx[i] = scale / 256.f;
    for (int level = 0; level < kLevels; ++level) {
      const __m512 inv = _mm512_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
      // round to nearest even (the default MXCSR mode), saturating to int8 (only +128 in level 2 clips, by 1)
      const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
      int8_t* out = q + (i * kLevels + level) * kGroup;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtsepi32_epi8(qa));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm512_cvtsepi32_epi8(qb));
      const __m512 vs = _mm512_set1_ps(scale);
      a = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(qa), vs, a);  // the remainder for the next level
      b = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(qb), vs, b);
      scale /= 256.f;
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
  quantize_activations(x.data_ptr<float>(), M, K, xq.data(), dx.data(), sx.data());
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
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 (M, H)");
  const int64_t M = x.size(0), H = x.size(1);
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.is_contiguous() && w.numel() == H && H % 16 == 0,
              "w: float32 (H,), H % 16 == 0");
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < M; ++r) {
    const float* xr = xp + r * H;
    __m512 ss = _mm512_setzero_ps();
    for (int64_t k = 0; k < H; k += 16) {
      const __m512 v = _mm512_loadu_ps(xr + k);
      ss = _mm512_fmadd_ps(v, v, ss);
    }
    const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / H + static_cast<float>(eps)));
    for (int64_t k = 0; k < H; k += 16) {
      _mm512_storeu_ps(yp + r * H + k, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(xr + k), inv), _mm512_loadu_ps(wp + k)));
    }
  }
  return y;
}

// Attention of one new token per sequence over its cached positions, GQA: q (B, KV·G, D) contiguous, the layer's
// cache k, v (S, KV, C, D) contiguous, sequence b in cache slot slots[b] with lengths[b] positions (its new token
// included); returns (B, KV·G·D). softmax(q·kᵀ/√D)·v per query head in float32, the running max subtracted (as
// SDPA). torch's flash kernel spends ~30 µs per call on setup for the few KB a decode step attends over at
// short contexts, and a batch of sequences of different lengths needs a padded, masked call (260 µs for 16
// sequences); this takes a few µs per sequence and splits (sequence, KV head) pairs over the threads.
torch::Tensor attend_cached(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, torch::Tensor slots, torch::Tensor lengths) {
  TORCH_CHECK(kc.dim() == 4 && kc.is_contiguous() && vc.is_contiguous() && kc.sizes() == vc.sizes() &&
              kc.scalar_type() == torch::kFloat32 && vc.scalar_type() == torch::kFloat32, "caches: contiguous float32 (S, KV, C, D)");
  const int64_t S = kc.size(0), KV = kc.size(1), C = kc.size(2), D = kc.size(3), B = q.size(0);
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.scalar_type() == torch::kFloat32 && q.size(1) % KV == 0 && q.size(2) == D,
              "q: contiguous float32 (B, KV·G, D), got ", q.sizes());
  TORCH_CHECK(D % 16 == 0 && D <= 256, "head_dim ", D, ": need a multiple of 16, at most 256");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && lengths.scalar_type() == torch::kInt64 && slots.numel() == B &&
              lengths.numel() == B && slots.is_contiguous() && lengths.is_contiguous(), "slots, lengths: int64 (B,)");
  const int64_t G = q.size(1) / KV;
  const int64_t* sl = slots.data_ptr<int64_t>();
  const int64_t* ln = lengths.data_ptr<int64_t>();
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(sl[b] >= 0 && sl[b] < S && ln[b] > 0 && ln[b] <= C, "sequence ", b, ": slot ", sl[b], ", length ", ln[b], " outside the cache");
    work += ln[b];
  }
  auto out = torch::empty({B, KV * G * D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = kc.data_ptr<float>();
  const float* vp = vc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t chunks = D / 16;
  auto pairs = [&](int64_t p0, int64_t p1) {
    std::vector<float> p;
    for (int64_t pair = p0; pair < p1; ++pair) {
      const int64_t b = pair / KV, h = pair % KV, T = ln[b];
      const float* kh = kp + (sl[b] * KV + h) * C * D;
      const float* vh = vp + (sl[b] * KV + h) * C * D;
      p.resize(T);
      for (int64_t j = 0; j < G; ++j) {
        const int64_t head = (b * KV + h) * G + j;  // = b·H + h·G + j
        __m512 qv[16];
        for (int64_t c = 0; c < chunks; ++c) qv[c] = _mm512_mul_ps(_mm512_loadu_ps(qp + head * D + 16 * c), _mm512_set1_ps(scale));
        float mx = -INFINITY;
        for (int64_t t = 0; t < T; ++t) {
          const float* kt = kh + t * D;
          __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kt));
          for (int64_t c = 1; c < chunks; ++c) acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kt + 16 * c), acc);
          p[t] = _mm512_reduce_add_ps(acc);
          mx = std::max(mx, p[t]);
        }
        float total = 0.f;
        for (int64_t t = 0; t < T; ++t) total += (p[t] = std::exp(p[t] - mx));
        __m512 o[16];
        for (int64_t c = 0; c < chunks; ++c) o[c] = _mm512_setzero_ps();
        for (int64_t t = 0; t < T; ++t) {
          const float* vt = vh + t * D;
          const __m512 pt = _mm512_set1_ps(p[t]);
          for (int64_t c = 0; c < chunks; ++c) o[c] = _mm512_fmadd_ps(pt, _mm512_loadu_ps(vt + 16 * c), o[c]);
        }
        const __m512 inv = _mm512_set1_ps(1.f / total);
        for (int64_t c = 0; c < chunks; ++c) _mm512_storeu_ps(op + head * D + 16 * c, _mm512_mul_ps(o[c], inv));
      }
    }
  };
  pybind11::gil_scoped_release no_gil;
  // Split over threads only when there is enough to outweigh handing work to them (~64k multiply-adds).
  parallel(B * KV, work * G * D >= (1 << 16), pairs);
  return out;
}

// RoPE on the new tokens' q and k heads, and k, v into the cache, in one pass: q/k/v come packed as one qkv row
// per token ((H + 2·KV)·D floats), cos and the signed sin are (N, D) (model/rope.py: rotate_half(x)·sin =
// roll(x, D/2)·signed_sin), and token n's k and v land at cache[slot[n], head, pos[n]]. Replaces ~10 torch ops
// per layer (rope's mul/roll/mul/add and two index_put_ with their views). Returns the rotated q (N, H, D).
torch::Tensor rope_cache(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor kc, torch::Tensor vc,
                         torch::Tensor slot, torch::Tensor pos, int64_t H, int64_t KV) {
  TORCH_CHECK(kc.dim() == 4 && kc.is_contiguous() && vc.is_contiguous() && kc.sizes() == vc.sizes() &&
              kc.scalar_type() == torch::kFloat32 && vc.scalar_type() == torch::kFloat32, "caches: contiguous float32 (S, KV, C, D)");
  const int64_t S = kc.size(0), C = kc.size(2), D = kc.size(3), N = qkv.size(0);
  TORCH_CHECK(kc.size(1) == KV && D % 32 == 0, "cache heads/head_dim: ", kc.sizes());
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.scalar_type() == torch::kFloat32 && qkv.size(1) == (H + 2 * KV) * D,
              "qkv: contiguous float32 (N, (H + 2KV) D)");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == N * D && sin.numel() == N * D &&
              cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32, "cos, sin: float32 (N, D)");
  TORCH_CHECK(slot.scalar_type() == torch::kInt64 && pos.scalar_type() == torch::kInt64 && slot.numel() == N &&
              pos.numel() == N && slot.is_contiguous() && pos.is_contiguous(), "slot, pos: int64 (N,)");
  auto q = torch::empty({N, H, D}, qkv.options());
  const float* xp = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t* slp = slot.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  float* qp = q.data_ptr<float>();
  float* kp = kc.data_ptr<float>();
  float* vp = vc.data_ptr<float>();
  const int64_t half = D / 2;
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(slp[n] >= 0 && slp[n] < S && pp[n] >= 0 && pp[n] < C, "token ", n, ": slot ", slp[n], " pos ", pp[n], " outside the cache");
    const float* row = xp + n * (H + 2 * KV) * D;
    const float* cn = cp + n * D;
    const float* sn = sp + n * D;
    for (int64_t h = 0; h < H + KV; ++h) {
      const float* x = row + h * D;
      float* out = h < H ? qp + (n * H + h) * D : kp + ((slp[n] * KV + (h - H)) * C + pp[n]) * D;
      for (int64_t i = 0; i < half; i += 16) {
        const __m512 lo = _mm512_loadu_ps(x + i), hi = _mm512_loadu_ps(x + half + i);
        _mm512_storeu_ps(out + i, _mm512_fmadd_ps(hi, _mm512_loadu_ps(sn + i), _mm512_mul_ps(lo, _mm512_loadu_ps(cn + i))));
        _mm512_storeu_ps(out + half + i,
                         _mm512_fmadd_ps(lo, _mm512_loadu_ps(sn + half + i), _mm512_mul_ps(hi, _mm512_loadu_ps(cn + half + i))));
      }
    }
    for (int64_t h = 0; h < KV; ++h) {
      std::copy_n(row + (H + KV + h) * D, D, vp + ((slp[n] * KV + h) * C + pp[n]) * D);
    }
  }
  return q;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("q4_matmul", &q4_matmul, "Y = X W^T, W 4-bit groups in blocks of 4 rows, X quantised to int8 per group");
  mod.def("rms_norm", &rms_norm, "RMSNorm of float32 rows");
  mod.def("attend_cached", &attend_cached, "one-query GQA attention per sequence over its cache slot");
  mod.def("rope_cache", &rope_cache, "RoPE on q and k, k and v into the cache; returns q");
}
