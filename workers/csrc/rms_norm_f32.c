/* RMSNorm in float32 on x86 CPUs with AVX2 and FMA: y[r] = w * (x[r] / sqrt(mean(x[r]^2) + eps)), a row at a time.
 *
 * Built by workers/cpu_rms_norm.py (through CLibrary) with cc -O3 -fopenmp -mavx2 -mfma and called through ctypes.
 * torch computes it as six ops (pow, mean, add, rsqrt, mul, mul), each a pass over the rows and a dispatch:
 * 37-62 us for one row of 512 and 57-95 for 64 rows on the 2-core Zen 3 machine, 13 times a decode step of the mini
 * model. Here it is one pass that reads each row twice from cache (9 and 17 us, the call from Python included).
 * Small inputs run on the calling thread; from PARALLEL_MIN elements (a prefill's rows) the rows are shared out over
 * `threads` OpenMP threads.
 *
 * Layouts (float32): x [rows, cols] with row stride ldx (its rows contiguous: a slice of wider rows is read in
 * place), w [cols], y [rows, cols] contiguous.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define PARALLEL_MIN (1 << 18)  /* elements: below this, an OpenMP fork costs more than the second core gives */

static void row(const float *x, const float *w, int64_t cols, float eps, float *y) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= cols; c += 16) {
    const __m256 a = _mm256_loadu_ps(x + c), b = _mm256_loadu_ps(x + c + 8);
    s0 = _mm256_fmadd_ps(a, a, s0);
    s1 = _mm256_fmadd_ps(b, b, s1);
  }
  for (; c + 8 <= cols; c += 8) {
    const __m256 a = _mm256_loadu_ps(x + c);
    s0 = _mm256_fmadd_ps(a, a, s0);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, _mm256_add_ps(s0, s1));
  float squares = 0.0f;
  for (int i = 0; i < 8; i++) squares += lanes[i];
  for (; c < cols; c++) squares += x[c] * x[c];
  const float inv = 1.0f / sqrtf(squares / (float)cols + eps);
  const __m256 inv_v = _mm256_set1_ps(inv);
  c = 0;
  for (; c + 8 <= cols; c += 8)
    _mm256_storeu_ps(y + c, _mm256_mul_ps(_mm256_loadu_ps(w + c), _mm256_mul_ps(_mm256_loadu_ps(x + c), inv_v)));
  for (; c < cols; c++) y[c] = w[c] * (x[c] * inv);
}

void rms_norm(const float *x, int64_t rows, int64_t cols, int64_t ldx, const float *w, float eps, float *y,
              int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= PARALLEL_MIN)
  for (int64_t r = 0; r < rows; r++) row(x + r * ldx, w, cols, eps, y + r * cols);
}
