/* MLA absorbed decode attention on x86 CPUs with AVX512-BF16, read in place from the paged latent cache.
 *
 * Built at engine start by workers/cpu_mla_decode.py (cc -O3 -fopenmp -mavx512bf16 ...) and called through ctypes.
 * The work items (below) are shared out over `threads` OpenMP threads (the caller passes torch.get_num_threads(): OpenMP's
 * own default is per calling thread); loaded beside torch, the library binds to the libgomp that torch already
 * loaded (the same soname), so it runs on torch's thread pool.
 *
 * Layouts (bf16 is uint16_t here): the query in two parts, q_latent [H, B, L] (as the W_UK bmm leaves it) and q_pe,
 * row (b, h) at q_pe + b * pe_b + h * pe_h, its D - L elements contiguous; cache [N, page, D], an entry being
 * [c_kv (L) | k_pe (D - L)]; tables [B, M] block ids (int64); lens [B] context lengths (int64); out [H, B, L] bf16
 * (as the W_UV bmm takes it). D is a multiple of 32, L of 16.
 *
 * One work item is a sequence and a block of HB heads, taken a tile of TILE entries at a time (read through the
 * block table in place, and from L2 the second time): the tile's scores (fp32), their exponentials against the
 * running maximum (rounded to bf16, as the bmm form rounds its probabilities), and the weighted sum of the tile's
 * latents, added to the item's fp32 sums after they are rescaled to the new maximum; at the end the sums are divided
 * by the total weight (the softmax's denominator). So each entry is read from memory once, at any context.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "exp_avx512.h"

#define HB 16     /* heads per pass: one fp32 accumulator register each */
#define HALF (HB / 2)
#define TILE 128  /* entries per tile: ~144 KiB of bf16 at D = 576, held in L2 between its two passes */
#define ROW 32    /* score rows are padded to whole 64-byte lines of bf16 */

/* Lane i of the result is the sum of the lanes of a[i]: a tree of shuffles and adds, not 16 separate reductions. */
static inline __m512 sum16(const __m512 a[16]) {
  __m512 r1[8], r2[4], r3[2];
  for (int k = 0; k < 8; k++)  /* per 128-bit block: [a0+a2, b0+b2, a1+a3, b1+b3] for a, b = a[2k], a[2k+1] */
    r1[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  for (int k = 0; k < 4; k++)  /* per block: lane j holds a part of a[4k + j] */
    r2[k] = _mm512_add_ps(  /* 64-bit unpacks move pairs of lanes; the adds stay fp32 */
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(r1[2 * k]), _mm512_castps_pd(r1[2 * k + 1]))),
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(r1[2 * k]), _mm512_castps_pd(r1[2 * k + 1]))));
  for (int k = 0; k < 2; k++)  /* blocks [r2[2k] (b0+b2), r2[2k] (b1+b3), r2[2k+1] (b0+b2), r2[2k+1] (b1+b3)] */
    r3[k] = _mm512_add_ps(_mm512_shuffle_f32x4(r2[2 * k], r2[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                          _mm512_shuffle_f32x4(r2[2 * k], r2[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(r3[0], r3[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(r3[0], r3[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

static inline const uint16_t *entry(const uint16_t *cache, const int64_t *table, int64_t page, int64_t D,
                                    int64_t s) {
  return cache + (table[s / page] * page + s % page) * D;
}

/* rows [HB, sp] fp32 <- scale * <q[h], entry s> for s < n, -inf up to sp. Two entries by half the heads at a time:
 * each entry chunk loaded serves 8 heads, each query chunk 2 entries. */
static void scores(const uint16_t *qb, const uint16_t **ptr, int64_t n, int64_t D, int64_t sp, float scale,
                   float *rows) {
  int32_t lane_offset[HB];  /* sum16's lane i holds head i % HALF of entry i / HALF */
  for (int i = 0; i < HB; i++) lane_offset[i] = (int32_t)((i % HALF) * sp + i / HALF);
  const __m512i offsets = _mm512_loadu_si512(lane_offset);
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t s = 0; s < n; s += 2) {
    const uint16_t *e0 = ptr[s], *e1 = ptr[s + 1];
    for (int half = 0; half < 2; half++) {
      const uint16_t *qh = qb + half * HALF * D;
      __m512 acc[HB];  /* [entry s: 8 heads | entry s + 1: 8 heads] */
#pragma GCC unroll 16
      for (int i = 0; i < HB; i++) acc[i] = _mm512_setzero_ps();
      for (int64_t c = 0; c < D; c += 32) {
        const __m512bh x0 = (__m512bh)_mm512_loadu_si512(e0 + c);
        const __m512bh x1 = (__m512bh)_mm512_loadu_si512(e1 + c);
#pragma GCC unroll 8
        for (int h = 0; h < HALF; h++) {
          const __m512bh qv = (__m512bh)_mm512_loadu_si512(qh + h * D + c);
          acc[h] = _mm512_dpbf16_ps(acc[h], qv, x0);
          acc[HALF + h] = _mm512_dpbf16_ps(acc[HALF + h], qv, x1);
        }
      }
      const __mmask16 keep = s + 1 < n ? 0xffff : 0x00ff;
      _mm512_mask_i32scatter_ps(rows + half * HALF * sp + s, keep, offsets, _mm512_mul_ps(scale_v, sum16(acc)), 4);
    }
  }
  for (int h = 0; h < HB; h++)
    for (int64_t s = n; s < sp; s++) rows[h * sp + s] = -__builtin_inff();
}

/* probs [tp] bf16 <- e^(row - top), where top is the larger of *top and the row's maximum and becomes the new
 * *top; the weights' sum is added to *total after *total is rescaled to the new top, as the caller must rescale its
 * sums: by the factor returned. The row (fp32, tp a multiple of ROW, -inf past the tile) is overwritten. */
static float tile_weights(float *row, int64_t tp, float *top, float *total, uint16_t *probs) {
  __m512 m = _mm512_set1_ps(*top);
  for (int64_t s = 0; s < tp; s += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(row + s));
  const float new_top = _mm512_reduce_max_ps(m);
  const float rescale = _mm512_cvtss_f32(exp_nonpositive(_mm512_set1_ps(*top - new_top)));  /* 0 at the start */
  const __m512 top_v = _mm512_set1_ps(new_top);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t s = 0; s < tp; s += 16) {
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + s), top_v));
    _mm256_storeu_si256((__m256i *)(probs + s), (__m256i)_mm512_cvtneps_pbh(e));
    sum = _mm512_add_ps(sum, e);
  }
  *top = new_top;
  *total = *total * rescale + _mm512_reduce_add_ps(sum);
  return rescale;
}

/* acc_mem [HB, L] fp32 += sum over the tile's n entries of probs[h, s] * c_kv of entry s. Entries are taken in
 * pairs, so one dpbf16 multiplies two weights by two entries' latents. */
static void values(const uint32_t *const prow[HB], const uint16_t **ptr, int64_t n, int64_t L, __m512i idx,
                   float *acc_mem) {
  for (int64_t c = 0; c < L; c += 16) {
    __m512 acc[HB];
#pragma GCC unroll 16
    for (int h = 0; h < HB; h++) acc[h] = _mm512_loadu_ps(acc_mem + h * L + c);
    for (int64_t s = 0; s < n; s += 2) {
      const __m512i x = _mm512_permutex2var_epi16(
          _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(ptr[s] + c))), idx,
          _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(ptr[s + 1] + c))));
#pragma GCC unroll 16
      for (int h = 0; h < HB; h++)
        acc[h] = _mm512_dpbf16_ps(acc[h], (__m512bh)_mm512_set1_epi32(prow[h][s / 2]), (__m512bh)x);
    }
#pragma GCC unroll 16
    for (int h = 0; h < HB; h++) _mm512_storeu_ps(acc_mem + h * L + c, acc[h]);
  }
}

/* out[h, b] = sum over s < lens[b] of softmax_s(scale * <[q_latent[h, b] | q_pe[b, h]], entry s>) * c_kv of entry s,
 * with `threads` OpenMP threads sharing out the (sequence, head block) items. */
void mla_decode(const uint16_t *q_latent, const uint16_t *q_pe, int64_t pe_b, int64_t pe_h, const uint16_t *cache,
                const int64_t *tables, const int64_t *lens, int64_t B, int64_t H, int64_t D, int64_t L, int64_t page,
                int64_t M, float scale, uint16_t *out, int64_t threads) {
  int64_t longest = 0;
  for (int64_t b = 0; b < B; b++) longest = lens[b] > longest ? lens[b] : longest;
  const int64_t blocks = (H + HB - 1) / HB;
  uint16_t interleave[32];  /* zmm lanes 2i and 2i+1 take element i of the first and of the second entry */
  for (int i = 0; i < 16; i++) { interleave[2 * i] = i; interleave[2 * i + 1] = 32 + i; }
  const __m512i idx = _mm512_loadu_si512(interleave);
#pragma omp parallel num_threads(threads)
  {
  const uint16_t **ptr = malloc((longest + 1) * sizeof(*ptr));  /* a sequence's entries, in order, and one more */
  uint16_t *qb = aligned_alloc(64, HB * D * sizeof(uint16_t));  /* a block of heads, zero-padded to HB */
  float *rows = aligned_alloc(64, HB * TILE * sizeof(float));  /* [HB, tp] a tile's scores */
  uint16_t *probs = aligned_alloc(64, HB * TILE * sizeof(uint16_t));  /* [HB, tp] their weights */
  float *acc_mem = aligned_alloc(64, HB * L * sizeof(float));  /* [HB, L] weighted sums of the latents */
#pragma omp for schedule(dynamic, 1)
  for (int64_t item = 0; item < B * blocks; item++) {
    const int64_t b = item / blocks, h0 = item % blocks * HB, hb = H - h0 < HB ? H - h0 : HB;
    const int64_t n = lens[b];
    for (int64_t s = 0; s < n; s++) ptr[s] = entry(cache, tables + b * M, page, D, s);
    ptr[n] = n ? ptr[n - 1] : cache;  /* an odd length's last pair: its weight is zero */
    memset(qb, 0, HB * D * sizeof(uint16_t));
    for (int64_t h = 0; h < hb; h++) {  /* [q_latent | q_pe] of each head */
      memcpy(qb + h * D, q_latent + ((h0 + h) * B + b) * L, L * sizeof(uint16_t));
      memcpy(qb + h * D + L, q_pe + b * pe_b + (h0 + h) * pe_h, (D - L) * sizeof(uint16_t));
    }
    memset(acc_mem, 0, HB * L * sizeof(float));
    float top[HB], total[HB];
    for (int h = 0; h < HB; h++) top[h] = -__builtin_inff(), total[h] = 0.0f;
    for (int64_t t0 = 0; t0 < n; t0 += TILE) {
      const int64_t tn = n - t0 < TILE ? n - t0 : TILE, tp = (tn + ROW - 1) / ROW * ROW;
      scores(qb, ptr + t0, tn, D, tp, scale, rows);
      const uint32_t *prow[HB];  /* each head's weights, two bf16 to a word; padding heads read head 0's */
      for (int h = 0; h < HB; h++) {
        if (h < hb) {
          const float rescale = tile_weights(rows + h * tp, tp, &top[h], &total[h], probs + h * tp);
          if (rescale != 1.0f)
            for (int64_t c = 0; c < L; c += 16)
              _mm512_storeu_ps(acc_mem + h * L + c, _mm512_mul_ps(_mm512_set1_ps(rescale),
                                                                  _mm512_loadu_ps(acc_mem + h * L + c)));
        }
        prow[h] = (const uint32_t *)(probs + (h < hb ? h : 0) * tp);
      }
      values(prow, ptr + t0, tn, L, idx, acc_mem);
    }
    for (int64_t h = 0; h < hb; h++) {
      const __m512 inv = _mm512_set1_ps(1.0f / total[h]);
      for (int64_t c = 0; c < L; c += 16)
        _mm256_storeu_si256((__m256i *)(out + ((h0 + h) * B + b) * L + c),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(inv, _mm512_loadu_ps(acc_mem + h * L + c))));
    }
  }
  free(acc_mem);
  free(probs);
  free(rows);
  free(qb);
  free(ptr);
  }
}
