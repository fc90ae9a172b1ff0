/* Grouped GEMM in float32 on x86 CPUs with AVX2 and FMA, or AVX-512: groups of rows, each times its own weight.
 * The routed experts' projections (a group per expert: the tokens routed to it) and the linear layers (one group).
 *
 * Built by workers/cpu_grouped_gemm.py (through CLibrary) with cc -O3 -fopenmp and either -mavx512f (where the CPU
 * has it) or -mavx2 -mfma, and called through ctypes on torch's OpenMP pool. The point is the thread split: oneDNN
 * and MKL split each expert's small GEMM (10-30 rows at decode) over the threads, and ran it barely faster on two
 * threads than on one; here one thread takes a whole item, and the threads share out the items of all the groups as
 * they go.
 *
 * Layouts (all float32, row-major): x [T, K], its rows sorted by group; offsets [G + 1], group g's rows being
 * offsets[g] .. offsets[g + 1]; w [G, N / NR, K, NR], each group's [N, K] weight cut into panels of NR outputs, a
 * panel stored k-major (`pack_panels` in cpu_grouped_gemm.py); y [T, N]. N is a multiple of NR.
 *
 * One work item is a group, a chunk of its rows and PW panels: the chunk's rows, MR at a time, against the panels'
 * [K, NR] weights (32 KiB each at K = 512, read from memory once and then from cache). Each output is summed over k
 * in order, one FMA at a time, in both builds.
 * - AVX2: the register block is MR = 6 rows by one panel (two vectors of 8): 12 of the 16 vector registers
 *   accumulate, two hold the panel's row k, one the broadcast input.
 * - AVX-512: a panel's row k is one vector of 16, and the block is MR = 12 rows by two panels: 24 of the 32
 *   registers accumulate, and each broadcast input feeds two FMAs. On the 2-core Zen 5 machine the AVX2 build ran
 *   at a quarter to a half of oneDNN's AVX-512 GEMMs (112-189 against 403-425 GFLOP/s for 64 rows of 512 -> 3072,
 *   in two runs), the AVX-512 build at 419.
 */
#include <immintrin.h>
#include <stdint.h>

#define NR 16  /* outputs per panel (cpu_grouped_gemm.PANEL) */

#ifdef __AVX512F__
#define MR 12  /* rows per register block */
#define PW 2   /* panels per work item (the last of a group's may have one) */

/* c [R, P * NR] (row stride ldc) = a [R, K] (row stride lda) times P panels b [K, NR], the second at b + ldb; R <=
 * MR and P <= PW, constants once inlined. */
static inline __attribute__((always_inline)) void block(int R, int P, const float *a, int64_t lda, const float *b,
                                                        int64_t ldb, int64_t K, float *c, int64_t ldc) {
  __m512 acc[MR][PW];
  for (int r = 0; r < R; r++)
    for (int p = 0; p < P; p++) acc[r][p] = _mm512_setzero_ps();
  /* The next PW panels in memory (those of the next item of the group, or of the next group), fetched into the L2
   * cache a cache line a panel per k on the way: a work item's first block reads its panels from memory, and the
   * hardware's own prefetch left it waiting there. On the 2-core Zen 5 machine, passes over 240 MB of distinct
   * weights (as in a step) ran 10-18% faster at 16 and 64 rows for most widths (64 x 512 -> 3072: 268 -> 316
   * GFLOP/s), the same at K = 2048. The last item's prefetch reads past w: harmless, a prefetch never faults. */
  const float *next = b + PW * ldb;
  for (int64_t k = 0; k < K; k++) {
    _mm_prefetch((const char *)(next + k * PW * NR), _MM_HINT_T1);
    _mm_prefetch((const char *)(next + k * PW * NR + NR), _MM_HINT_T1);
    __m512 w[PW];
    for (int p = 0; p < P; p++) w[p] = _mm512_loadu_ps(b + p * ldb + k * NR);
    for (int r = 0; r < R; r++) {
      const __m512 v = _mm512_set1_ps(a[r * lda + k]);
      for (int p = 0; p < P; p++) acc[r][p] = _mm512_fmadd_ps(v, w[p], acc[r][p]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int p = 0; p < P; p++) _mm512_storeu_ps(c + r * ldc + p * NR, acc[r][p]);
}

#define BLOCK(R) case R: if (P == 2) block(R, 2, a, K, b, ldb, K, c, N); else block(R, 1, a, K, b, ldb, K, c, N); break;

/* R rows of a against P panels, R in 1 .. MR. */
static void rows_block(int64_t R, int P, const float *a, const float *b, int64_t ldb, int64_t K, float *c, int64_t N) {
  switch (R) {
    BLOCK(12) BLOCK(11) BLOCK(10) BLOCK(9) BLOCK(8) BLOCK(7) BLOCK(6) BLOCK(5) BLOCK(4) BLOCK(3) BLOCK(2)
    default: if (P == 2) block(1, 2, a, K, b, ldb, K, c, N); else block(1, 1, a, K, b, ldb, K, c, N); break;
  }
}
#else
#define MR 6  /* rows per register block */
#define PW 1  /* panels per work item */

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

/* R rows of a against one panel (P = 1 here), R in 1 .. MR. */
static void rows_block(int64_t R, int P, const float *a, const float *b, int64_t ldb, int64_t K, float *c, int64_t N) {
  (void)P, (void)ldb;
  switch (R) {
    case 6: block(6, a, K, b, K, c, N); break;
    case 5: block(5, a, K, b, K, c, N); break;
    case 4: block(4, a, K, b, K, c, N); break;
    case 3: block(3, a, K, b, K, c, N); break;
    case 2: block(2, a, K, b, K, c, N); break;
    default: block(1, a, K, b, K, c, N); break;
  }
}
#endif

/* Rows [rows] of a against P panels (the first at b, the next K * NR on), in the fewest blocks of at most MR rows,
 * as even as can be (13 rows in blocks of 6: 4, 4, 5, not 6, 6, 1): a block keeps R * P * (vectors a panel row) FMA
 * chains in flight, and with too few rows too few to hide the FMA latency. */
static void panel(const float *a, int64_t rows, int P, const float *b, int64_t K, float *c, int64_t N) {
  const int64_t blocks = (rows + MR - 1) / MR;
  for (int64_t i = 0, r = 0; i < blocks; i++) {
    const int64_t R = (rows - r) / (blocks - i);  /* the larger blocks come last */
    rows_block(R, P, a + r * K, b, K * NR, K, c + r * N, N);
    r += R;
  }
}

/* Rows per work item: a chunk of at most this many input bytes, so that a group's rows stay in the core's L2 cache
 * while its item walks through the panel's weights and the next items (the same chunk, the next panels) reuse them.
 * At decode a group's rows are one chunk; a prefill's thousands of rows are cut up. */
#define CHUNK_BYTES (128 * 1024)

/* y[offsets[g] : offsets[g + 1]] = x[offsets[g] : offsets[g + 1]] times w[g] transposed, for each group g, with
 * `threads` OpenMP threads sharing out the (group, row chunk, panels) items. */
void grouped_gemm(const float *x, const int64_t *offsets, int64_t G, const float *w, int64_t K, int64_t N, float *y,
                  int64_t threads) {
  const int64_t panels = N / NR, pairs = (panels + PW - 1) / PW;  /* a "pair": the PW panels of one item */
  int64_t chunk = K > 0 ? CHUNK_BYTES / (K * (int64_t)sizeof(float)) : MR;  /* K = 0: zeros, in chunks of MR */
  chunk = chunk < MR ? MR : chunk - chunk % MR;
  int64_t first[G + 1];  /* group g's items are first[g] .. first[g + 1] */
  first[0] = 0;
  for (int64_t g = 0; g < G; g++)
    first[g + 1] = first[g] + (offsets[g + 1] - offsets[g] + chunk - 1) / chunk * pairs;
#pragma omp parallel num_threads(threads)
  {
    int64_t g = 0;  /* this thread's last group: its items come in rising order, so the search walks on from it */
#pragma omp for schedule(dynamic, 2)
    for (int64_t item = 0; item < first[G]; item++) {
      if (first[g] > item) g = 0;
      while (first[g + 1] <= item) g++;
      const int64_t c = (item - first[g]) / pairs, p = (item - first[g]) % pairs * PW;  /* p: its first panel */
      const int64_t start = offsets[g] + c * chunk, left = offsets[g + 1] - start;
      panel(x + start * K, left < chunk ? left : chunk, panels - p < PW ? (int)(panels - p) : PW,
            w + (g * panels + p) * K * NR, K, y + start * N + p * NR, N);
    }
  }
}
