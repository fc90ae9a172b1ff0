/* The exponential of the CPU MLA decode kernels' softmax in AVX-512 (cpu_mla_decode.c, and cpu_mla_decode_f32.c's
 * AVX-512 build): included by both, and part of their kernel-cache key (CLibrary hashes the headers in csrc/). */
#ifndef EXP_AVX512_H
#define EXP_AVX512_H
#include <immintrin.h>

/* e^x for x <= 0, and 0 below -87 (-inf included): x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor
 * series to r^6 (relative error < 2e-7), times 2^n (scalef). */
static inline __m512 exp_nonpositive(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  /* ln2 in two parts, for exact n ln2 */
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

#endif
