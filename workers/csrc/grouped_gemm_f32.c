/* Grouped GEMM in float32 on x86 CPUs with AVX2 and FMA: groups of rows, each times its own weight. The routed
 * experts' projections (a group per expert: the tokens routed to it) and the linear layers (one group).
 *
 * Built by workers/cpu_grouped_gemm.py (through CLibrary) with cc -O3 -fopenmp -mavx2 -mfma and called through
 * ctypes on torch's OpenMP pool. The point is the thread split: oneDNN and MKL split each expert's small GEMM (10-30
 * rows at decode) over the threads, and ran it barely faster on two threads than on one; here one thread takes a
 * whole item, and the threads share out the items of all the groups as they go.
 *
 * Layouts (all float32, row-major): x [T, K], its rows sorted by group; offsets [G + 1], group g's rows being
 * offsets[g] .. offsets[g + 1]; w [G, N / NR, K, NR], each group's [N, K] weight cut into panels of NR outputs, a
 * panel stored k-major (`pack_panels` in cpu_grouped_gemm.py); y [T, N]. N is a multiple of NR.
 *
 * One work item is a group, a chunk of its rows and a panel: the chunk's rows, MR at a time, against the panel's
 * [K, NR] weights (32 KiB at K = 512, read from memory once and then from cache). The register block is MR rows by
 * NR outputs: 12 of AVX2's 16 vector registers accumulate, two hold the panel's row k, one the broadcast input. Each
 * output is summed over k in order, one FMA at a time.
 */
#include <immintrin.h>
#include <stdint.h>

#define MR 6   /* rows per register block */
#define NR 16  /* outputs per panel: two vectors of 8 */

/* c [R, NR] (row stride ldc) = a [R, K] (row stride lda) times the panel b [K, NR]; R <= MR, a constant once
 * inlined. */
static inline __attribute__((always_inline)) void block(int R, const float *a, int64_t lda, const float *b,
                                                        int64_t K, float *c, int64_t ldc) {
  __m256 acc[MR][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k++) {
    const __m256 b0 = _mm256_loadu_ps(b + k * NR), b1 = _mm256_loadu_ps(b + k * NR + 8);
    for (int r = 0; r < R; r++) {
      const __m256 v = _mm256_broadcast_ss(a + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(v, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(v, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; r++) {
    _mm256_storeu_ps(c + r * ldc, acc[r][0]);
    _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
  }
}

/* Rows [rows] of a against one panel, in the fewest blocks of at most MR rows, as even as can be (13 rows: 4, 4, 5,
 * not 6, 6, 1): a block of R rows keeps 2R accumulators in flight, and below 4 rows too few to hide the FMA latency. */
static void panel(const float *a, int64_t rows, const float *b, int64_t K, float *c, int64_t N) {
  const int64_t blocks = (rows + MR - 1) / MR;
  for (int64_t i = 0, r = 0; i < blocks; i++) {
    const int64_t R = (rows - r) / (blocks - i);  /* the larger blocks come last */
    switch (R) {
      case 6: block(6, a + r * K, K, b, K, c + r * N, N); break;
      case 5: block(5, a + r * K, K, b, K, c + r * N, N); break;
      case 4: block(4, a + r * K, K, b, K, c + r * N, N); break;
      case 3: block(3, a + r * K, K, b, K, c + r * N, N); break;
      case 2: block(2, a + r * K, K, b, K, c + r * N, N); break;
      default: block(1, a + r * K, K, b, K, c + r * N, N); break;
    }
    r += R;
  }
}

/* Rows per work item: a chunk of at most this many input bytes, so that a group's rows stay in the core's L2 cache
 * while its item walks through the panel's weights and the next items (the same chunk, the next panels) reuse them.
 * At decode a group's rows are one chunk; a prefill's thousands of rows are cut up. */
#define CHUNK_BYTES (128 * 1024)

/* y[offsets[g] : offsets[g + 1]] = x[offsets[g] : offsets[g + 1]] times w[g] transposed, for each group g, with
 * `threads` OpenMP threads sharing out the (group, row chunk, panel) items. */
void grouped_gemm(const float *x, const int64_t *offsets, int64_t G, const float *w, int64_t K, int64_t N, float *y,
                  int64_t threads) {
  const int64_t panels = N / NR;
  int64_t chunk = K > 0 ? CHUNK_BYTES / (K * (int64_t)sizeof(float)) : MR;  /* K = 0: zeros, in chunks of MR */
  chunk = chunk < MR ? MR : chunk - chunk % MR;
  int64_t first[G + 1];  /* group g's items are first[g] .. first[g + 1] */
  first[0] = 0;
  for (int64_t g = 0; g < G; g++)
    first[g + 1] = first[g] + (offsets[g + 1] - offsets[g] + chunk - 1) / chunk * panels;
#pragma omp parallel num_threads(threads)
  {
    int64_t g = 0;  /* this thread's last group: its items come in rising order, so the search walks on from it */
#pragma omp for schedule(dynamic, 2)
    for (int64_t item = 0; item < first[G]; item++) {
      if (first[g] > item) g = 0;
      while (first[g + 1] <= item) g++;
      const int64_t c = (item - first[g]) / panels, p = (item - first[g]) % panels;
      const int64_t start = offsets[g] + c * chunk, left = offsets[g + 1] - start;
      panel(x + start * K, left < chunk ? left : chunk, w + (g * panels + p) * K * NR, K, y + start * N + p * NR, N);
    }
  }
}
