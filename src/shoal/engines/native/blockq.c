/* Block-quantized matrix products for shoal's CPU engines.
 *
 * Weights are held in blocks of 32 along the input dimension, as GGUF does:
 *   q8: 32 int8 values and one fp16 scale d:             w = d * q      (GGUF Q8_0)
 *   q4: 32 4-bit values, an fp16 scale d and minimum m:  w = d * q + m  (GGUF Q4_1)
 * q8 is row-major: values [n, k] int8, scales [n, k / 32] fp16.
 * q4 interleaves 8 rows ("lanes"), so one vector register holds 4 values of each of 8 rows and
 * one pass over a block yields 8 outputs: rows go in groups of 8 (the last padded with zeros);
 * group g, block b has 128 bytes of values, where byte 32c + 4l + e (c < 4, l < 8, e < 4) holds
 * value 4c + e of row 8g + l in its low nibble and value 16 + 4c + e in its high one, then
 * 8 fp16 scales and 8 fp16 minimums, one per lane, in their own arrays [groups, k / 32, 8].
 *
 * y = x @ W^T writes each row of x as two int8 digits per block of 32 (one fp32 scale per block,
 * so a row's result never depends on the other rows; see quantize_rows) and sums integer
 * products; with AVX2, maddubs multiplies 32 pairs at once. Without AVX2 the same arithmetic runs
 * in plain C. shoal_forward runs a Llama-family shard's layers over a batch of rows in one call.
 *
 * Compiled at first use for the machine it runs on (shoal/engines/native/__init__.py); threads
 * come from OpenMP, the runtime torch uses, so both share one pool.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(SHOAL_PORTABLE)
#include <immintrin.h>
#define SHOAL_AVX2 1
#endif

#define QK 32

int shoal_blockq_simd(void) {
#ifdef SHOAL_AVX2
    return 1;
#else
    return 0;
#endif
}

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

/* e^x for x[0..n) in place; 8 at a time with AVX2, x clamped to [-87, 88] (e^-87 ~ 1.6e-38),
 * e^x = 2^m e^r with m = round(x log2 e),
 * r = x - m ln 2 in two parts, e^r by Cephes' expf polynomial (relative error ~1e-7) */
static void exp_in_place(float *x, int64_t n) {
    int64_t i = 0;
#ifdef SHOAL_AVX2
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_min_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(88.0f));
        v = _mm256_max_ps(v, _mm256_set1_ps(-87.0f));
        __m256 m = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 r = _mm256_fnmadd_ps(m, _mm256_set1_ps(0.693359375f), v);
        r = _mm256_fnmadd_ps(m, _mm256_set1_ps(-2.12194440e-4f), r);
        __m256 p = _mm256_set1_ps(1.9875691500e-4f);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
        p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
        __m256i e = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(m), _mm256_set1_epi32(127)), 23);
        _mm256_storeu_ps(x + i, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
    }
#endif
    for (; i < n; i++) x[i] = expf(x[i]);
}

/* ---- quantizing weights (load time) -------------------------------------------------------- */

void shoal_quantize_q8(const float *w, int64_t n, int64_t k, int8_t *q, uint16_t *d, int threads) {
    int64_t nb = k / QK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n * nb; i++) {
        const float *v = w + i * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = max_of(amax, fabsf(v[j]));
        d[i] = float_to_half(amax / 127.0f);
        float scale = half_to_float(d[i]), inv = scale > 0.0f ? 1.0f / scale : 0.0f;
        for (int j = 0; j < QK; j++) {
            float r = nearbyintf(v[j] * inv);
            q[i * QK + j] = (int8_t)(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
        }
    }
}

#define LANES 8 /* q4 rows per group */

void shoal_quantize_q4(const float *w, int64_t n, int64_t k, uint8_t *q, uint16_t *d, uint16_t *m,
                       int threads) {
    int64_t nb = k / QK, groups = (n + LANES - 1) / LANES;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < groups * nb; i++) { /* group g = i / nb, block b = i % nb */
        int64_t g = i / nb, b = i % nb;
        uint8_t *out = q + i * (LANES * QK / 2);
        memset(out, 0, LANES * QK / 2);
        for (int l = 0; l < LANES; l++) {
            int64_t row = g * LANES + l;
            if (row >= n) {
                d[i * LANES + l] = m[i * LANES + l] = 0;
                continue;
            }
            const float *v = w + row * k + b * QK;
            float lo = v[0], hi = v[0];
            for (int j = 1; j < QK; j++) {
                lo = min_of(lo, v[j]);
                hi = max_of(hi, v[j]);
            }
            uint16_t dh = float_to_half((hi - lo) / 15.0f), mh = float_to_half(lo);
            d[i * LANES + l] = dh;
            m[i * LANES + l] = mh;
            float scale = half_to_float(dh), low = half_to_float(mh);
            float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
            for (int j = 0; j < QK; j++) {
                float r = nearbyintf((v[j] - low) * inv);
                uint8_t value = (uint8_t)(r < 0.0f ? 0.0f : r > 15.0f ? 15.0f : r);
                int high = j >= QK / 2, c = (j % (QK / 2)) / 4, e = j % 4;
                out[32 * c + 4 * l + e] |= (uint8_t)(value << (high ? 4 : 0));
            }
        }
    }
}

/* ---- activations: two int8 digits per value, a scale and the exact sum per block of 32 ---- */

/* x = d * (254 q1 + q2): q1 = round(x / (254 d)) in [-127, 127] with d = amax / (127 * 254), and
 * q2 in [-127, 127] the rounded remainder. So a product costs two integer dot products and is
 * as precise as 15-bit activations: one int8 digit alone (llama.cpp's Q8 activations) turned
 * SmolLM2's answer to "What is the capital of France?" from Paris to "L'Étoile, ...". */
static void quantize_rows(const float *x, int64_t rows, int64_t k, int8_t *q1, int8_t *q2,
                          float *dx, float *sx, int threads) {
    int64_t nb = k / QK;
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 1)
    for (int64_t i = 0; i < rows * nb; i++) {
        const float *v = x + i * QK;
        float amax = 0.0f, sum = 0.0f;
        for (int j = 0; j < QK; j++) {
            amax = max_of(amax, fabsf(v[j]));
            sum += v[j];
        }
        float coarse = amax / 127.0f, fine = coarse / 254.0f;
        float inv_coarse = amax > 0.0f ? 127.0f / amax : 0.0f, inv_fine = 254.0f * inv_coarse;
        for (int j = 0; j < QK; j++) {
            float high = nearbyintf(v[j] * inv_coarse);
            float low = nearbyintf((v[j] - high * coarse) * inv_fine);
            q1[i * QK + j] = (int8_t)high;
            q2[i * QK + j] = (int8_t)(low > 127.0f ? 127.0f : low < -127.0f ? -127.0f : low);
        }
        dx[i] = fine;
        sx[i] = sum;
    }
}

/* ---- products: a q8 row or a group of 8 q4 rows against up to TILE activation rows ------- */

#define TILE 8

#ifdef SHOAL_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 32 products of unsigned a by signed b, summed into 8 float lanes */
static inline __m256 dot_u8_s8(__m256i a, __m256i b) {
    __m256i pairs = _mm256_maddubs_epi16(a, b);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif

/* Each product needs, per block, the weight scale times the row's activation scale: made for 8
 * blocks at once (one fp16 conversion of 8 scales, one multiply), then broadcast from memory. */

static inline __attribute__((always_inline)) void row_q8(const int8_t *w, const uint16_t *wd,
                                                         int64_t nb, const int8_t *q1,
                                                         const int8_t *q2, const float *dx,
                                                         const int rows, float *out) {
    int64_t k = nb * QK;
#ifdef SHOAL_AVX2
    /* two accumulators a row, for even and odd blocks: one alone waits on the FMA's latency */
    __m256 acc[2][TILE];
    float scale[TILE][8];
    const __m256 radix = _mm256_set1_ps(254.0f);
    for (int r = 0; r < rows; r++) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
        int count = nb - b0 < 8 ? (int)(nb - b0) : 8;
        if (count == 8) {
            __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + b0)));
            for (int r = 0; r < rows; r++)
                _mm256_storeu_ps(scale[r], _mm256_mul_ps(ws, _mm256_loadu_ps(dx + r * nb + b0)));
        } else {
            for (int r = 0; r < rows; r++)
                for (int j = 0; j < count; j++)
                    scale[r][j] = half_to_float(wd[b0 + j]) * dx[r * nb + b0 + j];
        }
        for (int j = 0; j < count; j++) {
            int64_t b = b0 + j;
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + b * QK));
            __m256i wabs = _mm256_sign_epi8(wv, wv); /* |w| for maddubs; x takes w's sign */
            __m256 *a = acc[j & 1];
            for (int r = 0; r < rows; r++) {
                __m256i x1 = _mm256_loadu_si256((const __m256i *)(q1 + r * k + b * QK));
                __m256i x2 = _mm256_loadu_si256((const __m256i *)(q2 + r * k + b * QK));
                __m256 p = _mm256_fmadd_ps(dot_u8_s8(wabs, _mm256_sign_epi8(x1, wv)), radix,
                                           dot_u8_s8(wabs, _mm256_sign_epi8(x2, wv)));
                a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&scale[r][j]), p, a[r]);
            }
        }
    }
    for (int r = 0; r < rows; r++) out[r] = hsum(_mm256_add_ps(acc[0][r], acc[1][r]));
#else
    for (int r = 0; r < rows; r++) {
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            int high = 0, low = 0;
            for (int j = 0; j < QK; j++) {
                high += (int)w[b * QK + j] * (int)q1[r * k + b * QK + j];
                low += (int)w[b * QK + j] * (int)q2[r * k + b * QK + j];
            }
            acc += half_to_float(wd[b]) * dx[r * nb + b] * ((float)high * 254.0f + (float)low);
        }
        out[r] = acc;
    }
#endif
}

/* One group of 8 q4 rows against up to TILE activation rows: out[r] holds the 8 outputs of
 * row r, lane l for weight row 8g + l. */
static inline __attribute__((always_inline)) void group_q4(const uint8_t *w, const uint16_t *wd,
                                                           const uint16_t *wm, int64_t nb,
                                                           const int8_t *q1, const int8_t *q2,
                                                           const float *dx, const float *sx,
                                                           const int rows, float out[][LANES]) {
    int64_t k = nb * QK;
#ifdef SHOAL_AVX2
    __m256 acc[TILE];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    const __m256i nibble = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const __m256 radix = _mm256_set1_ps(254.0f);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * (LANES * QK / 2);
        __m256i wv[8]; /* wv[c]: values 4c..4c+3 of each lane (c < 8, 16 + ... for c >= 4) */
        for (int c = 0; c < 4; c++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(wb + 32 * c));
            wv[c] = _mm256_and_si256(raw, nibble);
            wv[c + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
        }
        __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + b * LANES)));
        for (int r = 0; r < rows; r++) {
            const int8_t *h = q1 + r * k + b * QK, *l = q2 + r * k + b * QK;
            /* int16 sums: 8 pairs of at most 2 * 15 * 127 each, no overflow */
            __m256i high = _mm256_setzero_si256(), low = _mm256_setzero_si256();
            for (int c = 0; c < 8; c++) {
                int at = c < 4 ? 4 * c : 16 + 4 * (c - 4);
                int32_t four_high, four_low;
                memcpy(&four_high, h + at, 4);
                memcpy(&four_low, l + at, 4);
                high = _mm256_add_epi16(high,
                                        _mm256_maddubs_epi16(wv[c], _mm256_set1_epi32(four_high)));
                low = _mm256_add_epi16(low,
                                       _mm256_maddubs_epi16(wv[c], _mm256_set1_epi32(four_low)));
            }
            __m256 p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(high, ones)), radix,
                                       _mm256_cvtepi32_ps(_mm256_madd_epi16(low, ones)));
            acc[r] = _mm256_fmadd_ps(p, _mm256_mul_ps(ws, _mm256_set1_ps(dx[r * nb + b])), acc[r]);
        }
    }
    for (int64_t b = 0; b < nb; b++) { /* the minimums times each block's activation sum */
        __m256 wmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wm + b * LANES)));
        for (int r = 0; r < rows; r++)
            acc[r] = _mm256_fmadd_ps(wmin, _mm256_set1_ps(sx[r * nb + b]), acc[r]);
    }
    for (int r = 0; r < rows; r++) _mm256_storeu_ps(out[r], acc[r]);
#else
    for (int r = 0; r < rows; r++)
        for (int l = 0; l < LANES; l++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *wb = w + b * (LANES * QK / 2);
                const int8_t *h = q1 + r * k + b * QK, *lo = q2 + r * k + b * QK;
                int high = 0, low = 0;
                for (int c = 0; c < 4; c++)
                    for (int e = 0; e < 4; e++) {
                        uint8_t byte = wb[32 * c + 4 * l + e];
                        int a = byte & 0x0f, z = byte >> 4, at = 4 * c + e;
                        high += a * h[at] + z * h[16 + at];
                        low += a * lo[at] + z * lo[16 + at];
                    }
                acc += half_to_float(wd[b * LANES + l]) * dx[r * nb + b] *
                           ((float)high * 254.0f + (float)low) +
                       half_to_float(wm[b * LANES + l]) * sx[r * nb + b];
            }
            out[r][l] = acc;
        }
#endif
}

/* ---- matrices ----------------------------------------------------------------------------- */

typedef struct {
    int64_t kind; /* 8: q8, 4: q4 */
    int64_t n, k; /* [n, k]: y = x @ W^T maps k inputs to n outputs */
    const void *values;
    const uint16_t *scales, *minimums; /* [n, k / 32] fp16; minimums for q4 only */
} shoal_matrix;

void shoal_dequantize(const shoal_matrix *m, float *w, int threads) {
    int64_t nb = m->k / QK;
    if (m->kind == 8) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t i = 0; i < m->n * nb; i++) {
            float scale = half_to_float(m->scales[i]), *out = w + i * QK;
            const int8_t *in = (const int8_t *)m->values + i * QK;
            for (int j = 0; j < QK; j++) out[j] = scale * (float)in[j];
        }
        return;
    }
    int64_t groups = (m->n + LANES - 1) / LANES;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < groups * nb; i++) {
        int64_t g = i / nb, b = i % nb;
        const uint8_t *in = (const uint8_t *)m->values + i * (LANES * QK / 2);
        for (int l = 0; l < LANES && g * LANES + l < m->n; l++) {
            float scale = half_to_float(m->scales[i * LANES + l]);
            float low = half_to_float(m->minimums[i * LANES + l]);
            float *out = w + (g * LANES + l) * m->k + b * QK;
            for (int c = 0; c < 4; c++)
                for (int e = 0; e < 4; e++) {
                    uint8_t byte = in[32 * c + 4 * l + e];
                    out[4 * c + e] = scale * (float)(byte & 0x0f) + low;
                    out[16 + 4 * c + e] = scale * (float)(byte >> 4) + low;
                }
        }
    }
}

/* Activation rows quantized for a product: two int8 digits, per-block scale and sum. */
typedef struct {
    int8_t *q, *q2;
    float *d, *s;
} Activations;

static int activations_alloc(Activations *a, int64_t rows, int64_t k) {
    a->q = malloc((size_t)(rows * k));
    a->q2 = malloc((size_t)(rows * k));
    a->d = malloc((size_t)(rows * (k / QK)) * sizeof(float));
    a->s = malloc((size_t)(rows * (k / QK)) * sizeof(float));
    return a->q && a->q2 && a->d && a->s ? 0 : -1;
}

static void activations_free(Activations *a) {
    free(a->q);
    free(a->q2);
    free(a->d);
    free(a->s);
}

/* y [rows, n] (=, or += with accumulate) quantized rows @ W^T */
static void product(const shoal_matrix *m, const Activations *a, int64_t rows, float *y,
                    int accumulate, int threads) {
    int64_t n = m->n, k = m->k, nb = k / QK;
    if (m->kind == 8) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t i = 0; i < n; i++) {
            const int8_t *wi = (const int8_t *)m->values + i * k;
            const uint16_t *di = m->scales + i * nb;
            for (int64_t r = 0; r < rows; r += TILE) {
                const int8_t *qx = a->q + r * k, *qx2 = a->q2 + r * k;
                const float *dx = a->d + r * nb;
                int tile = rows - r < TILE ? (int)(rows - r) : TILE;
                float out[TILE] = {0};
                switch (tile) {
                case 8: row_q8(wi, di, nb, qx, qx2, dx, 8, out); break;
                case 7: row_q8(wi, di, nb, qx, qx2, dx, 7, out); break;
                case 6: row_q8(wi, di, nb, qx, qx2, dx, 6, out); break;
                case 5: row_q8(wi, di, nb, qx, qx2, dx, 5, out); break;
                case 4: row_q8(wi, di, nb, qx, qx2, dx, 4, out); break;
                case 3: row_q8(wi, di, nb, qx, qx2, dx, 3, out); break;
                case 2: row_q8(wi, di, nb, qx, qx2, dx, 2, out); break;
                default: row_q8(wi, di, nb, qx, qx2, dx, 1, out); break;
                }
                for (int t = 0; t < tile; t++) {
                    float *yi = y + (r + t) * n + i;
                    *yi = accumulate ? *yi + out[t] : out[t];
                }
            }
        }
        return;
    }
    int64_t groups = (n + LANES - 1) / LANES;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *wg = (const uint8_t *)m->values + g * nb * (LANES * QK / 2);
        const uint16_t *dg = m->scales + g * nb * LANES, *mg = m->minimums + g * nb * LANES;
        int lanes = n - g * LANES < LANES ? (int)(n - g * LANES) : LANES;
        for (int64_t r = 0; r < rows; r += TILE) {
            const int8_t *qx = a->q + r * k, *qx2 = a->q2 + r * k;
            const float *dx = a->d + r * nb, *sx = a->s + r * nb;
            int tile = rows - r < TILE ? (int)(rows - r) : TILE;
            float out[TILE][LANES] = {{0}};
            switch (tile) {
            case 8: group_q4(wg, dg, mg, nb, qx, qx2, dx, sx, 8, out); break;
            case 7: group_q4(wg, dg, mg, nb, qx, qx2, dx, sx, 7, out); break;
            case 6: group_q4(wg, dg, mg, nb, qx, qx2, dx, sx, 6, out); break;
            case 5: group_q4(wg, dg, mg, nb, qx, qx2, dx, sx, 5, out); break;
            case 4: group_q4(wg, dg, mg, nb, qx, qx2, dx, sx, 4, out); break;
            case 3: group_q4(wg, dg, mg, nb, qx, qx2, dx, sx, 3, out); break;
            case 2: group_q4(wg, dg, mg, nb, qx, qx2, dx, sx, 2, out); break;
            default: group_q4(wg, dg, mg, nb, qx, qx2, dx, sx, 1, out); break;
            }
            for (int t = 0; t < tile; t++) {
                float *yr = y + (r + t) * n + g * LANES;
                for (int l = 0; l < lanes; l++) yr[l] = accumulate ? yr[l] + out[t][l] : out[t][l];
            }
        }
    }
}

int shoal_matmul(const shoal_matrix *m, const float *x, int64_t rows, float *y, int threads) {
    Activations a;
    int status = activations_alloc(&a, rows, m->k);
    if (status == 0) {
        quantize_rows(x, rows, m->k, a.q, a.q2, a.d, a.s, threads);
        product(m, &a, rows, y, 0, threads);
    }
    activations_free(&a);
    return status;
}

/* ---- a forward pass of a Llama-family shard -------------------------------------------- */

typedef struct {
    shoal_matrix qkv, o, gate_up, down; /* q, k, v fused; gate and up fused */
    const float *attn_norm, *mlp_norm;  /* [hidden] */
    const float *qkv_bias;              /* [(heads + 2 kv_heads) * head_dim], or NULL */
    const float *q_norm, *k_norm;       /* [head_dim] per-head RMSNorm weights (qwen3), or NULL */
} shoal_layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter;
    float eps;
    const float *inv_freq; /* [head_dim / 2]: the rotary frequencies, rope scaling applied */
} shoal_dims;

/* The rows of a pass and the caches they belong to. Row r is position position[r] of item
 * item[r]; item i's cache is [layers, kv_heads, capacity[i], head_dim] float32 at k[i] and v[i].
 * A pass writes every row's keys and values at its position, then each row attends to its
 * item's positions 0 .. position[r]. */
typedef struct {
    const int64_t *item, *position;
    float *const *k, *const *v;
    const int64_t *capacity;
} shoal_rows;

static void rms_norm_row(const float *x, const float *weight, int64_t dim, float eps, float *out) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < dim; j++) sum += x[j] * x[j];
    float inv = 1.0f / sqrtf(sum / (float)dim + eps);
    for (int64_t j = 0; j < dim; j++) out[j] = x[j] * inv * weight[j];
}

void shoal_rms_norm(const float *x, int64_t rows, int64_t dim, const float *weight, float eps,
                    float *out, int threads) {
#pragma omp parallel for num_threads(threads) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) rms_norm_row(x + r * dim, weight, dim, eps, out + r * dim);
}

/* x [head_dim] rotated in place by the halves layout: x cos + roll(x, D/2) sin (sin signed) */
static void rotate(float *x, const float *cos, const float *sin, int64_t dim, float *tmp) {
    int64_t half = dim / 2;
    for (int64_t j = 0; j < dim; j++) tmp[j] = x[j] * cos[j] + x[(j + half) % dim] * sin[j];
    memcpy(x, tmp, (size_t)dim * sizeof(float));
}

static float dot(const float *a, const float *b, int64_t n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; j++) sum += a[j] * b[j];
    return sum;
}

/* scores[s] = scale * q . keys[s] for s < n (keys [n, dim]). One dot alone waits on its FMA
 * chain, so with AVX2 four positions run at once, two accumulators each (dim % 16 == 0). */
static void head_scores(const float *q, const float *keys, int64_t n, int64_t dim, float scale,
                        float *scores) {
    int64_t s = 0;
#ifdef SHOAL_AVX2
    if (dim % 16 == 0)
        for (; s + 4 <= n; s += 4) {
            __m256 acc[4][2];
            for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
            for (int64_t c = 0; c < dim; c += 16) {
                __m256 q0 = _mm256_loadu_ps(q + c), q1 = _mm256_loadu_ps(q + c + 8);
                for (int i = 0; i < 4; i++) {
                    const float *k = keys + (s + i) * dim + c;
                    acc[i][0] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k), acc[i][0]);
                    acc[i][1] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(k + 8), acc[i][1]);
                }
            }
            for (int i = 0; i < 4; i++) scores[s + i] = hsum(_mm256_add_ps(acc[i][0], acc[i][1])) * scale;
        }
#endif
    for (; s < n; s++) scores[s] = dot(q, keys + s * dim, dim) * scale;
}

/* out [dim] = sum over s < n of p[s] * values[s] (values [n, dim]); with AVX2, 64 outputs stay
 * in eight registers across all positions (dim % 8 == 0). */
static void head_values(const float *p, const float *values, int64_t n, int64_t dim, float *out) {
    int64_t c0 = 0;
#ifdef SHOAL_AVX2
    if (dim % 8 == 0) {
        for (; c0 + 64 <= dim; c0 += 64) {
            __m256 acc[8];
            for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
            for (int64_t s = 0; s < n; s++) {
                __m256 ps = _mm256_broadcast_ss(p + s);
                const float *v = values + s * dim + c0;
                for (int i = 0; i < 8; i++)
                    acc[i] = _mm256_fmadd_ps(ps, _mm256_loadu_ps(v + 8 * i), acc[i]);
            }
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(out + c0 + 8 * i, acc[i]);
        }
        for (; c0 < dim; c0 += 8) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t s = 0; s < n; s++)
                acc = _mm256_fmadd_ps(_mm256_broadcast_ss(p + s),
                                      _mm256_loadu_ps(values + s * dim + c0), acc);
            _mm256_storeu_ps(out + c0, acc);
        }
    }
#endif
    if (c0 < dim) {
        memset(out + c0, 0, (size_t)(dim - c0) * sizeof(float));
        for (int64_t s = 0; s < n; s++) {
            const float *v = values + s * dim;
#pragma omp simd
            for (int64_t j = c0; j < dim; j++) out[j] += p[s] * v[j];
        }
    }
}

/* qkv [rows, (H + 2 KV) D] → attention output [rows, H D]: norms and rotation of q and k, keys
 * and values written to the caches, then each query head against its group's keys. */
static int attend(const shoal_dims *dm, const shoal_layer *l, int64_t layer, float *qkv,
                  int64_t rows, const float *cos, const float *sin, const shoal_rows *c,
                  float *out, int threads) {
    int64_t H = dm->heads, KV = dm->kv_heads, D = dm->head_dim, width = (H + 2 * KV) * D;
    int64_t longest = 0;
    for (int64_t r = 0; r < rows; r++)
        if (c->position[r] + 1 > longest) longest = c->position[r] + 1;
    int status = 0;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < rows * (H + KV); i++) {
        int64_t r = i / (H + KV), head = i % (H + KV), b = c->item[r];
        float *x = qkv + r * width + head * D, tmp[512];
        const float *nw = head < H ? l->q_norm : l->k_norm;
        if (nw) rms_norm_row(x, nw, D, dm->eps, x);
        rotate(x, cos + r * D, sin + r * D, D, tmp);
        if (head >= H) {
            int64_t g = head - H, at = ((layer * KV + g) * c->capacity[b] + c->position[r]) * D;
            memcpy(c->k[b] + at, x, (size_t)D * sizeof(float));
            memcpy(c->v[b] + at, x + KV * D, (size_t)D * sizeof(float));
        }
    }
    float scale = 1.0f / sqrtf((float)D);
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc((size_t)longest * sizeof(float));
        if (!scores) {
#pragma omp atomic write
            status = -1;
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows * H; i++) {
            if (!scores) continue;
            int64_t r = i / H, head = i % H, b = c->item[r], g = head / (H / KV);
            int64_t n = c->position[r] + 1;
            const float *q = qkv + r * width + head * D;
            const float *keys = c->k[b] + (layer * KV + g) * c->capacity[b] * D;
            const float *values = c->v[b] + (layer * KV + g) * c->capacity[b] * D;
            float top = -INFINITY, total = 0.0f;
            head_scores(q, keys, n, D, scale, scores);
            for (int64_t s = 0; s < n; s++) top = max_of(top, scores[s]);
            for (int64_t s = 0; s < n; s++) scores[s] -= top;
            exp_in_place(scores, n);
            for (int64_t s = 0; s < n; s++) total += scores[s];
            for (int64_t s = 0; s < n; s++) scores[s] /= total;
            head_values(scores, values, n, D, out + r * H * D + head * D);
        }
        free(scores);
    }
    return status;
}

/* out [rows, inter] = SiLU(gate) * up from gate_up [rows, 2 inter] */
static void silu_gate(const float *gate_up, int64_t rows, int64_t inter, float *out,
                      int threads) {
#pragma omp parallel for num_threads(threads) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = gate_up + r * 2 * inter, *up = gate + inter;
        float *o = out + r * inter;
        for (int64_t j = 0; j < inter; j++) o[j] = -gate[j];
        exp_in_place(o, inter); /* e^-gate: huge for gate < -88, where SiLU is ~0 */
        for (int64_t j = 0; j < inter; j++) o[j] = gate[j] / (1.0f + o[j]) * up[j];
    }
}

/* h [rows, hidden], the residual stream, through `count` layers (local indexes 0 .. count - 1
 * of the caches), in place. Every step is per row, in the same order whatever the other rows, so
 * a row's result is the same in any batch: a prompt's rows give exactly what decoding them one
 * by one gives. Returns 0, or -1 when out of memory or head_dim is odd or over 512. */
int shoal_forward(const shoal_dims *dm, const shoal_layer *layers, int64_t count, float *h,
                  int64_t rows, const shoal_rows *c, int threads) {
    int64_t hidden = dm->hidden, H = dm->heads, KV = dm->kv_heads, D = dm->head_dim;
    int64_t inter = dm->inter, width = (H + 2 * KV) * D;
    if (D > 512 || D % 2) return -1;
    int64_t widest = hidden > H * D ? hidden : H * D;
    if (inter > widest) widest = inter;
    Activations a;
    float *normed = malloc((size_t)(rows * widest) * sizeof(float));
    float *qkv = malloc((size_t)(rows * width) * sizeof(float));
    float *gate_up = malloc((size_t)(rows * 2 * inter) * sizeof(float));
    float *cos = malloc((size_t)(rows * D) * sizeof(float));
    float *sin = malloc((size_t)(rows * D) * sizeof(float));
    int status = activations_alloc(&a, rows, widest);
    if (!normed || !qkv || !gate_up || !cos || !sin) status = -1;
    for (int64_t r = 0; r < rows && status == 0; r++) /* halves layout; sin signed: rotate() */
        for (int64_t j = 0; j < D / 2; j++) {
            float angle = (float)c->position[r] * dm->inv_freq[j];
            cos[r * D + j] = cos[r * D + j + D / 2] = cosf(angle);
            sin[r * D + j] = -sinf(angle);
            sin[r * D + j + D / 2] = sinf(angle);
        }
    for (int64_t li = 0; li < count && status == 0; li++) {
        const shoal_layer *l = layers + li;
        shoal_rms_norm(h, rows, hidden, l->attn_norm, dm->eps, normed, threads);
        quantize_rows(normed, rows, hidden, a.q, a.q2, a.d, a.s, threads);
        product(&l->qkv, &a, rows, qkv, 0, threads);
        if (l->qkv_bias)
            for (int64_t r = 0; r < rows; r++)
                for (int64_t j = 0; j < width; j++) qkv[r * width + j] += l->qkv_bias[j];
        status = attend(dm, l, li, qkv, rows, cos, sin, c, normed, threads);
        if (status) break;
        quantize_rows(normed, rows, H * D, a.q, a.q2, a.d, a.s, threads);
        product(&l->o, &a, rows, h, 1, threads);
        shoal_rms_norm(h, rows, hidden, l->mlp_norm, dm->eps, normed, threads);
        quantize_rows(normed, rows, hidden, a.q, a.q2, a.d, a.s, threads);
        product(&l->gate_up, &a, rows, gate_up, 0, threads);
        silu_gate(gate_up, rows, inter, normed, threads);
        quantize_rows(normed, rows, inter, a.q, a.q2, a.d, a.s, threads);
        product(&l->down, &a, rows, h, 1, threads);
    }
    activations_free(&a);
    free(normed);
    free(qkv);
    free(gate_up);
    free(cos);
    free(sin);
    return status;
}
