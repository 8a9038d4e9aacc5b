// Few-row matrix products of a decode step on CPU, registered as torch.ops.mmgen_cpu.*:
//
//   int8_gemv(x, q, scales)              out = (x @ q.T) * scales   (int8 weight-only)
//   panel_gemv(x, panels, bias, n)       out = x @ W.T + bias       (float32 or bfloat16,
//                                                                   W pre-packed)
//
// Built at run time by torch_mmgen_opt/kernels/cpu_gemv.py (g++, -O3, AVX2 + FMA, and
// AVX-512F where the CPU has it).
//
// int8_gemv: x (M, K) float32 with 1 <= M <= 8 (a decode step's rows), q (N, K) int8,
// scales (N,) float32. Each thread takes a range of output features; for each feature the
// int8 row is read once, widened to float32 eight at a time and multiplied into the M rows
// of x (which stay in L1). A decode step is bound by reading its weights, so reading a
// quarter of float32's bytes is the point; torch 2.13's _weight_int8pack_mm has no fast
// float32 path on AVX2 and Inductor's CPU code loads 8-bit data through a temporary
// buffer (docs/passes/decode_gemv.md).
//
// panel_gemv: x (M, K) float32 or bfloat16 (the weight's dtype; bfloat16 is accumulated
// in float32 and rounded once at the end), any M (rows are taken in groups of at most 8, or 4 on
// AVX2), panels (P, K, 16): W (N, K) cut into P = ceil(N / 16) panels of 16 output
// features, stored feature-fastest (panels[p, k, j] = W[16 p + j, k], zero past N;
// kernels/gemv_linear.py packs them once). For each panel the kernel streams its K x 16
// weights in order, one 16-wide vector a k, and multiplies it into one accumulator vector
// per row with x[m, k] broadcast: no horizontal sums, one sequential read of the weight,
// which is what bounds a decode step. Each thread takes a range of panels.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <utility>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MMGEN_AVX2 1
#endif

namespace {

#ifdef MMGEN_AVX2
inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}
#endif

template <int M>
void feature_range(const float* x, const int8_t* q, const float* scales, float* out,
                   int64_t n0, int64_t n1, int64_t N, int64_t K) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qn = q + n * K;
    float acc[M] = {};
    int64_t k = 0;
#ifdef MMGEN_AVX2
    // two accumulators a row (the two 8-wide halves of 16 weights) for M <= 4
    constexpr int A = M <= 4 ? 2 : 1;
    __m256 vacc[A][M];
    for (int a = 0; a < A; ++a)
      for (int m = 0; m < M; ++m) vacc[a][m] = _mm256_setzero_ps();
    for (; k + 16 <= K; k += 16) {
      __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qn + k));
      __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
      __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b)));
      for (int m = 0; m < M; ++m) {
        vacc[0][m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), vacc[0][m]);
        vacc[A - 1][m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), vacc[A - 1][m]);
      }
    }
    for (int m = 0; m < M; ++m)
      acc[m] = hsum(A == 2 ? _mm256_add_ps(vacc[0][m], vacc[A - 1][m]) : vacc[0][m]);
#endif
    for (; k < K; ++k) {  // the tail (and every K without AVX2)
      const float wk = static_cast<float>(qn[k]);
      for (int m = 0; m < M; ++m) acc[m] += wk * x[m * K + k];
    }
    for (int m = 0; m < M; ++m) out[m * N + n] = acc[m] * scales[n];
  }
}

using RangeFn = void (*)(const float*, const int8_t*, const float*, float*, int64_t, int64_t,
                         int64_t, int64_t);

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scales.dim() == 1,
              "mmgen_cpu::int8_gemv: expected x (M, K), q (N, K), scales (N,)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && scales.scalar_type() == at::kFloat &&
                  q.scalar_type() == at::kChar,
              "mmgen_cpu::int8_gemv: expected float32 x and scales and an int8 q");
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu() && scales.device().is_cpu(),
              "mmgen_cpu::int8_gemv: CPU tensors only");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == K && scales.size(0) == N, "mmgen_cpu::int8_gemv: shapes do not match");
  TORCH_CHECK(M >= 1 && M <= 8, "mmgen_cpu::int8_gemv: 1 to 8 rows, got ", M);
  const at::Tensor xc = x.contiguous(), qc = q.contiguous(), sc = scales.contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  static constexpr RangeFn fns[] = {feature_range<1>, feature_range<2>, feature_range<3>,
                                    feature_range<4>, feature_range<5>, feature_range<6>,
                                    feature_range<7>, feature_range<8>};
  const RangeFn fn = fns[M - 1];
  const float* xp = xc.data_ptr<float>();
  const int8_t* qp = qc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { fn(xp, qp, sp, op, n0, n1, N, K); });
  return out;
}


// ------------------------------------------------- float32 / bfloat16, packed panels

constexpr int64_t kPanel = 16;

// 16 weights of a panel row as float32: a float32 panel is loaded as is, a bfloat16 one
// is widened (its 16 bits are the high half of a float32)
#if defined(__AVX512F__)
inline __m512 load_w(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 load_w(const c10::BFloat16* w) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

constexpr int kMaxGroup = 8;  // 8 accumulators + weight + broadcasts: within 32 zmm

template <int M, typename W>
void panel_group(const float* x, int64_t ldx, const W* w, int64_t K, float* acc_out) {
  __m512 acc[M], acc2[M];
  for (int m = 0; m < M; ++m) acc[m] = acc2[m] = _mm512_setzero_ps();
  int64_t k = 0;
  if (M <= 2) {  // a second chain per row: more than one FMA in flight
    for (; k + 2 <= K; k += 2) {
      const __m512 w0 = load_w(w + k * kPanel);
      const __m512 w1 = load_w(w + (k + 1) * kPanel);
      for (int m = 0; m < M; ++m) {
        acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * ldx + k]), w0, acc[m]);
        acc2[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * ldx + k + 1]), w1, acc2[m]);
      }
    }
  }
  for (; k < K; ++k) {
    const __m512 w0 = load_w(w + k * kPanel);
    for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * ldx + k]), w0, acc[m]);
  }
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(acc_out + m * kPanel, _mm512_add_ps(acc[m], acc2[m]));
}
#elif defined(MMGEN_AVX2)
inline void load_w(const float* w, __m256& lo, __m256& hi) {
  lo = _mm256_loadu_ps(w);
  hi = _mm256_loadu_ps(w + 8);
}
inline void load_w(const c10::BFloat16* w, __m256& lo, __m256& hi) {
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 8));
  lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(a), 16));
  hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
}

constexpr int kMaxGroup = 4;  // 2 x 4 accumulators + 2 weight halves: within 16 ymm

template <int M, typename W>
void panel_group(const float* x, int64_t ldx, const W* w, int64_t K, float* acc_out) {
  __m256 lo[M], hi[M];
  for (int m = 0; m < M; ++m) lo[m] = hi[m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 w0, w1;
    load_w(w + k * kPanel, w0, w1);
    for (int m = 0; m < M; ++m) {
      const __m256 xb = _mm256_broadcast_ss(x + m * ldx + k);
      lo[m] = _mm256_fmadd_ps(xb, w0, lo[m]);
      hi[m] = _mm256_fmadd_ps(xb, w1, hi[m]);
    }
  }
  for (int m = 0; m < M; ++m) {
    _mm256_storeu_ps(acc_out + m * kPanel, lo[m]);
    _mm256_storeu_ps(acc_out + m * kPanel + 8, hi[m]);
  }
}
#else
constexpr int kMaxGroup = 4;

template <int M, typename W>
void panel_group(const float* x, int64_t ldx, const W* w, int64_t K, float* acc_out) {
  float acc[M][kPanel] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < kPanel; ++j)
        acc[m][j] += x[m * ldx + k] * static_cast<float>(w[k * kPanel + j]);
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < kPanel; ++j) acc_out[m * kPanel + j] = acc[m][j];
}
#endif

template <typename W>
using GroupFn = void (*)(const float*, int64_t, const W*, int64_t, float*);

template <typename W, int... Ms>
constexpr auto make_groups(std::integer_sequence<int, Ms...>) {
  return std::array<GroupFn<W>, sizeof...(Ms)>{panel_group<Ms + 1, W>...};
}

// out (M, n) = x (M, K, float32 rows) @ W.T + bias, W given as panels of type W
template <typename W, typename O>
void panel_gemv_impl(const float* xp, int64_t M, int64_t K, const W* wp, int64_t P,
                     const O* bp, O* op, int64_t n) {
  static constexpr auto fns = make_groups<W>(std::make_integer_sequence<int, kMaxGroup>{});
  // a chunk of at least ~32 KB of weights per task, so small weights stay on one thread
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(K, 1));
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    alignas(64) float acc[kMaxGroup * kPanel];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t j0 = p * kPanel, cols = std::min<int64_t>(kPanel, n - j0);
      for (int64_t m0 = 0; m0 < M; m0 += kMaxGroup) {
        const int64_t g = std::min<int64_t>(kMaxGroup, M - m0);
        fns[g - 1](xp + m0 * K, K, wp + p * K * kPanel, K, acc);
        for (int64_t m = 0; m < g; ++m) {
          O* row = op + (m0 + m) * n + j0;
          for (int64_t j = 0; j < cols; ++j)
            row[j] = static_cast<O>(acc[m * kPanel + j] + (bp ? static_cast<float>(bp[j0 + j]) : 0.f));
        }
      }
    }
  });
}

at::Tensor panel_gemv(const at::Tensor& x, const at::Tensor& panels,
                      const std::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && panels.dim() == 3 && panels.size(2) == kPanel,
              "mmgen_cpu::panel_gemv: expected x (M, K) and panels (P, K, 16)");
  const auto dtype = panels.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && x.scalar_type() == dtype,
              "mmgen_cpu::panel_gemv: float32 or bfloat16 x and panels of the same dtype, got ",
              x.scalar_type(), " and ", dtype);
  TORCH_CHECK(x.device().is_cpu() && panels.device().is_cpu(), "mmgen_cpu::panel_gemv: CPU tensors only");
  const int64_t M = x.size(0), K = x.size(1), P = panels.size(0);
  TORCH_CHECK(panels.size(1) == K, "mmgen_cpu::panel_gemv: x has ", K, " features, the panels ",
              panels.size(1));
  TORCH_CHECK(n > (P - 1) * kPanel && n <= P * kPanel, "mmgen_cpu::panel_gemv: ", n,
              " outputs do not fit ", P, " panels of 16");
  at::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == dtype &&
                    bias->device().is_cpu(),
                "mmgen_cpu::panel_gemv: bias must be (", n, ",) of the weight's dtype on the CPU");
    bc = bias->contiguous();
  }
  const at::Tensor pc = panels.contiguous();
  at::Tensor out = at::empty({M, n}, x.options());
  if (M == 0) return out;
  if (dtype == at::kFloat) {
    const at::Tensor xc = x.contiguous();
    panel_gemv_impl<float, float>(xc.data_ptr<float>(), M, K, pc.data_ptr<float>(), P,
                                  bc.defined() ? bc.data_ptr<float>() : nullptr,
                                  out.data_ptr<float>(), n);
  } else {  // bfloat16: the rows once to float32 (tiny), products accumulated in float32
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    using bf16 = c10::BFloat16;
    panel_gemv_impl<bf16, bf16>(xf.data_ptr<float>(), M, K, pc.data_ptr<bf16>(), P,
                                bc.defined() ? bc.data_ptr<bf16>() : nullptr,
                                out.data_ptr<bf16>(), n);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(mmgen_cpu, m) {
  m.def("int8_gemv(Tensor x, Tensor q, Tensor scales) -> Tensor");
  m.def("panel_gemv(Tensor x, Tensor panels, Tensor? bias, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmgen_cpu, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("panel_gemv", &panel_gemv);
}
