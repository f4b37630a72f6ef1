/* What blocks.c and forward.c share: the block matrix, fp16 conversion, activation rows.
 *
 * Both files are compiled together into one library (build.py); the functions declared here are
 * internal to it (hidden), the exported ones are those abi.py names.
 */
#ifndef SHOAL_BLOCKS_H
#define SHOAL_BLOCKS_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(SHOAL_PORTABLE)
#include <immintrin.h>
#define SHOAL_AVX2 1
#endif

#define QK 32
#define LANES 8 /* rows per group */


/* ---- fp16 <-> fp32 ------------------------------------------------------------------------ */

static inline float half_to_float(uint16_t h) {
#ifdef SHOAL_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) { /* zero or subnormal: man * 2^-24 */
        float f = ldexpf((float)man, -24);
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline uint16_t float_to_half(float f) { /* round to nearest even */
#ifdef SHOAL_AVX2
    return (uint16_t)_cvtss_sh(f, 0);
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, man = x & 0x7fffffu;
    int32_t fexp = (int32_t)((x >> 23) & 0xffu), exp = fexp - 127 + 15;
    if (fexp == 0xff) return (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0));
    if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
    if (exp <= 0) { /* subnormal half, or zero */
        if (exp < -10) return (uint16_t)sign;
        man |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - exp), h = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1u))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)exp << 10) | (man >> 13), rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++; /* may carry into the exponent */
    return (uint16_t)(sign | h);
#endif
}

/* fmaxf and fminf are calls where NaNs must be honoured; these are one instruction */
static inline float max_of(float a, float b) { return a > b ? a : b; }
static inline float min_of(float a, float b) { return a < b ? a : b; }

#ifdef SHOAL_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

typedef struct {
    int64_t kind; /* 8: q8, 4: q4 */
    int64_t n, k; /* [n, k]: y = x @ W^T maps k inputs to n outputs */
    const void *values;
    const uint16_t *scales, *minimums; /* [groups, k / 32, 8] fp16; minimums for q4 only */
} shoal_matrix;

/* ---- products: a group of 8 weight rows against up to TILE activation rows ---------------- */

/* Activation rows quantized for a product: 15-bit integers, per-block scale and sum. */
typedef struct {
    int16_t *q;
    float *d, *s;
} Activations;

#define SHOAL_INTERNAL __attribute__((visibility("hidden")))

SHOAL_INTERNAL int activations_alloc(Activations *a, int64_t rows, int64_t k);
SHOAL_INTERNAL void activations_free(Activations *a);
/* x [rows, k] as 15-bit integers per block of 32 (a row's never depend on the others) */
SHOAL_INTERNAL void quantize(const float *x, int64_t rows, int64_t k, Activations *a, int threads);
/* y [rows, n] (=, or += with accumulate) quantized rows @ W^T */
SHOAL_INTERNAL void product(const shoal_matrix *m, const Activations *a, int64_t rows, float *y,
                            int accumulate, int threads);

#endif
