// Few-row float32 x int8 weight-only matrix product on CPU: out = (x @ q.T) * scales.
//
// Built at run time by torch_mmgen_opt/kernels/cpu_gemv.py (g++, -O3, AVX2 + FMA where the
// CPU has them) and registered as torch.ops.mmgen_cpu.int8_gemv.
//
// x (M, K) float32 with 1 <= M <= 8 (a decode step's rows), q (N, K) int8, scales (N,)
// float32. Each thread takes a range of output features; for each feature the int8 row
// is read once, widened to float32 eight at a time and multiplied into the M rows of x
// (which stay in L1). A decode step is bound by reading its weights, so reading a
// quarter of float32's bytes is the point; torch 2.13's _weight_int8pack_mm has no fast
// float32 path on AVX2 and Inductor's CPU code loads 8-bit data through a temporary
// buffer (docs/passes/decode_gemv.md).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>

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

}  // namespace

TORCH_LIBRARY(mmgen_cpu, m) { m.def("int8_gemv(Tensor x, Tensor q, Tensor scales) -> Tensor"); }

TORCH_LIBRARY_IMPL(mmgen_cpu, CPU, m) { m.impl("int8_gemv", &int8_gemv); }
