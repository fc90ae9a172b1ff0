/* MLA absorbed decode attention in float32 on x86 CPUs with AVX2 and FMA, or AVX-512, read in place from the paged
 * latent cache.
 *
 * The float32 sibling of cpu_mla_decode.c (same entry point, same work items, same online softmax; see there), built
 * by workers/cpu_mla_decode.py with cc -O3 -fopenmp and either -mavx512f (where the CPU has it) or -mavx2 -mfma,
 * and called through ctypes on torch's OpenMP pool. The two builds are one code over vectors of W lanes (8 or 16):
 * the AVX-512 build reads twice the lanes an instruction, and its registers hold twice the latents.
 *
 * Layouts (all float32): the query in two parts, q_latent [H, B, L] (as the W_UK bmm leaves it) and q_pe, row (b, h)
 * at q_pe + b * pe_b + h * pe_h, its D - L elements contiguous; cache [N, page, D], an entry being
 * [c_kv (L) | k_pe (D - L)]; tables [B, M] block ids (int64); lens [B] context lengths (int64); out [H, B, L] (as the
 * W_UV bmm takes it). D is a multiple of W, L of 2W.
 *
 * One work item is a sequence and a block of HB heads, taken a tile of TILE entries at a time: the tile's scores,
 * their exponentials against the running maximum, and the weighted sum of the tile's latents, added to the item's
 * sums after they are rescaled to the new maximum. Register blocks: scores take 4 heads by 2 entries (8 accumulators
 * of W lanes), values 4 heads by 2W latents; AVX2 has 16 vector registers, AVX-512 32.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define HB 16    /* heads per work item (zero-padded) */
#define HG 4     /* heads per register block */
#define TILE 64  /* entries per tile: 144 KiB of float32 at D = 576, held in L2 between its two passes */

#ifdef __AVX512F__
#define W 16
typedef __m512 vec;
#define vload _mm512_loadu_ps
#define vstore _mm512_storeu_ps
#define vfma _mm512_fmadd_ps
#define vset1 _mm512_set1_ps
#define vzero _mm512_setzero_ps
#define vmul _mm512_mul_ps
#define vadd _mm512_add_ps
#define vsub _mm512_sub_ps
#define vmax _mm512_max_ps
/* The sum of a's two halves of 8 lanes. */
static inline __m256 halves(__m512 a) {
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}
#else
#define W 8
typedef __m256 vec;
#define vload _mm256_loadu_ps
#define vstore _mm256_storeu_ps
#define vfma _mm256_fmadd_ps
#define vset1 _mm256_set1_ps
#define vzero _mm256_setzero_ps
#define vmul _mm256_mul_ps
#define vadd _mm256_add_ps
#define vsub _mm256_sub_ps
#define vmax _mm256_max_ps
static inline __m256 halves(__m256 a) { return a; }
#endif

/* Lane i of the result is the sum of the lanes of a[i]. */
static inline __m256 sum8(const __m256 a[8]) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  /* per 128-bit half: a[0..3], a[4..7] */
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

static inline const float *entry(const float *cache, const int64_t *table, int64_t page, int64_t D, int64_t s) {
  return cache + (table[s / page] * page + s % page) * D;
}

#ifdef __AVX512F__
#include "exp_avx512.h"
#else
/* e^x for x <= 0, and 0 below -87 (-inf included): x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to
 * r^6 (relative error < 2e-7), times 2^n built in the exponent bits (n >= -126 here, a normal float). */
static inline __m256 exp_nonpositive(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  /* ln2 in two parts, for exact n ln2 */
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i ni = _mm256_cvtps_epi32(_mm256_and_ps(live, n));  /* masked: -inf would not convert */
  const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23));
  return _mm256_and_ps(live, _mm256_mul_ps(p, two_n));
}
#endif

/* rows [HB, tp] <- scale * <q[h], entry s> for heads h < hb and s < n, -inf from n up to tp. */
static void scores(const float *qb, const float **ptr, int64_t n, int64_t hb, int64_t D, int64_t tp, float scale,
                   float *rows) {
  for (int64_t hg = 0; hg < hb; hg += HG) {
    const float *qh = qb + hg * D;
    for (int64_t s = 0; s < n; s += 2) {
      const float *e0 = ptr[s], *e1 = ptr[s + 1];
      vec acc[2 * HG];  /* [entry s: 4 heads | entry s + 1: 4 heads] */
      for (int i = 0; i < 2 * HG; i++) acc[i] = vzero();
      for (int64_t c = 0; c < D; c += W) {
        const vec x0 = vload(e0 + c), x1 = vload(e1 + c);
        for (int k = 0; k < HG; k++) {
          const vec qv = vload(qh + k * D + c);
          acc[k] = vfma(qv, x0, acc[k]);
          acc[HG + k] = vfma(qv, x1, acc[HG + k]);
        }
      }
      __m256 folded[2 * HG];
      for (int i = 0; i < 2 * HG; i++) folded[i] = halves(acc[i]);
      float sums[2 * HG];
      _mm256_storeu_ps(sums, _mm256_mul_ps(_mm256_set1_ps(scale), sum8(folded)));
      for (int k = 0; k < HG; k++) {
        rows[(hg + k) * tp + s] = sums[k];
        if (s + 1 < n) rows[(hg + k) * tp + s + 1] = sums[HG + k];
      }
    }
    for (int k = 0; k < HG; k++)
      for (int64_t s = n; s < tp; s++) rows[(hg + k) * tp + s] = -INFINITY;
  }
}

/* row [tp] <- e^(row - top), where top is the larger of *top and the row's maximum and becomes the new *top; the
 * weights' sum is added to *total after *total is rescaled to the new top, as the caller must rescale its sums: by
 * the factor returned. tp is a multiple of W, and the row is -inf past the tile. */
static float tile_weights(float *row, int64_t tp, float *top, float *total) {
  vec m = vset1(*top);
  for (int64_t s = 0; s < tp; s += W) m = vmax(m, vload(row + s));
  float lanes[W];
  vstore(lanes, m);
  float new_top = lanes[0];
  for (int i = 1; i < W; i++) new_top = lanes[i] > new_top ? lanes[i] : new_top;
  const float rescale = expf(*top - new_top);  /* 0 at the start (top -inf) */
  const vec top_v = vset1(new_top);
  vec sum = vzero();
  for (int64_t s = 0; s < tp; s += W) {
    const vec e = exp_nonpositive(vsub(vload(row + s), top_v));
    vstore(row + s, e);
    sum = vadd(sum, e);
  }
  vstore(lanes, sum);
  float tile_total = 0.0f;
  for (int i = 0; i < W; i++) tile_total += lanes[i];
  *top = new_top;
  *total = *total * rescale + tile_total;
  return rescale;
}

/* acc_mem [HB, L] += sum over the tile's n entries of probs[h, s] * c_kv of entry s, for heads h < hb. */
static void values(const float *probs, const float **ptr, int64_t n, int64_t hb, int64_t L, int64_t tp,
                   float *acc_mem) {
  for (int64_t hg = 0; hg < hb; hg += HG) {
    for (int64_t c = 0; c < L; c += 2 * W) {
      vec acc[2 * HG];  /* head k: latents c .. c + W - 1 in acc[2k], the next W in acc[2k + 1] */
      for (int k = 0; k < HG; k++) {
        acc[2 * k] = vload(acc_mem + (hg + k) * L + c);
        acc[2 * k + 1] = vload(acc_mem + (hg + k) * L + c + W);
      }
      for (int64_t s = 0; s < n; s++) {
        const vec x0 = vload(ptr[s] + c), x1 = vload(ptr[s] + c + W);
        for (int k = 0; k < HG; k++) {
          const vec p = vset1(probs[(hg + k) * tp + s]);
          acc[2 * k] = vfma(p, x0, acc[2 * k]);
          acc[2 * k + 1] = vfma(p, x1, acc[2 * k + 1]);
        }
      }
      for (int k = 0; k < HG; k++) {
        vstore(acc_mem + (hg + k) * L + c, acc[2 * k]);
        vstore(acc_mem + (hg + k) * L + c + W, acc[2 * k + 1]);
      }
    }
  }
}

/* out[h, b] = sum over s < lens[b] of softmax_s(scale * <[q_latent[h, b] | q_pe[b, h]], entry s>) * c_kv of entry s,
 * with `threads` OpenMP threads sharing out the (sequence, head block) items. */
void mla_decode(const float *q_latent, const float *q_pe, int64_t pe_b, int64_t pe_h, const float *cache,
                const int64_t *tables, const int64_t *lens, int64_t B, int64_t H, int64_t D, int64_t L, int64_t page,
                int64_t M, float scale, float *out, int64_t threads) {
  int64_t longest = 0;
  for (int64_t b = 0; b < B; b++) longest = lens[b] > longest ? lens[b] : longest;
  const int64_t blocks = (H + HB - 1) / HB;
#pragma omp parallel num_threads(threads)
  {
  const float **ptr = malloc((longest + 1) * sizeof(*ptr));  /* a sequence's entries, in order, and one more */
  float *qb = aligned_alloc(64, HB * D * sizeof(float));  /* a block of heads, zero-padded to HB */
  float *rows = aligned_alloc(64, HB * TILE * sizeof(float));  /* [HB, tp] a tile's scores, then weights */
  float *acc_mem = aligned_alloc(64, HB * L * sizeof(float));  /* [HB, L] weighted sums of the latents */
#pragma omp for schedule(dynamic, 1)
  for (int64_t item = 0; item < B * blocks; item++) {
    const int64_t b = item / blocks, h0 = item % blocks * HB, hb = H - h0 < HB ? H - h0 : HB;
    const int64_t n = lens[b];
    for (int64_t s = 0; s < n; s++) ptr[s] = entry(cache, tables + b * M, page, D, s);
    ptr[n] = n ? ptr[n - 1] : cache;  /* an odd length's last pair: its score is not kept */
    memset(qb, 0, HB * D * sizeof(float));
    for (int64_t h = 0; h < hb; h++) {  /* [q_latent | q_pe] of each head */
      memcpy(qb + h * D, q_latent + ((h0 + h) * B + b) * L, L * sizeof(float));
      memcpy(qb + h * D + L, q_pe + b * pe_b + (h0 + h) * pe_h, (D - L) * sizeof(float));
    }
    memset(acc_mem, 0, HB * L * sizeof(float));
    float top[HB], total[HB];
    for (int h = 0; h < HB; h++) top[h] = -INFINITY, total[h] = 0.0f;
    for (int64_t t0 = 0; t0 < n; t0 += TILE) {
      const int64_t tn = n - t0 < TILE ? n - t0 : TILE, tp = (tn + W - 1) / W * W;
      scores(qb, ptr + t0, tn, hb, D, tp, scale, rows);
      for (int64_t h = 0; h < hb; h++) {
        const float rescale = tile_weights(rows + h * tp, tp, &top[h], &total[h]);
        if (rescale != 1.0f)
          for (int64_t c = 0; c < L; c += W)
            vstore(acc_mem + h * L + c, vmul(vset1(rescale), vload(acc_mem + h * L + c)));
      }
      values(rows, ptr + t0, tn, hb, L, tp, acc_mem);
    }
    for (int64_t h = 0; h < hb; h++) {
      const vec inv = vset1(1.0f / total[h]);
      for (int64_t c = 0; c < L; c += W)
        vstore(out + ((h0 + h) * B + b) * L + c, vmul(inv, vload(acc_mem + h * L + c)));
    }
  }
  free(acc_mem);
  free(rows);
  free(qb);
  free(ptr);
  }
}
