/* Block-quantized matrix products for shoal's CPU engines.
 *
 * Weights are held in blocks of 32 along the input dimension, as GGUF does:
 *   q8: 32 int8 values and one fp16 scale d:             w = d * q      (GGUF Q8_0)
 *   q4: 32 4-bit values, an fp16 scale d and minimum m:  w = d * q + m  (GGUF Q4_1)
 * Rows go in groups of 8 ("lanes"; the last group padded with zeros) so that one pass over a
 * block yields 8 outputs. A vector register holds two rows, lane j in its low 128 bits and lane
 * j + 4 in its high ones, so an activation row's values reach it by one 16-byte broadcast.
 * Group g, block b holds
 *   q4: 128 bytes; bytes 32 j + 16 h + e (j < 4, h < 2, e < 16) are lane 4 h + j's GGUF qs[e]:
 *       value e in the low nibble and value 16 + e in the high one;
 *   q8: 256 bytes; bytes 16 (4 j + c) + 8 h + e (c < 4, e < 8) are lane 4 h + j's value 8 c + e;
 * and fp16 scales (and q4 minimums) in their own arrays [groups, k / 32, 8], one per lane.
 *
 * y = x @ W^T writes each row of x as 15-bit integers, one fp32 scale per block of 32 (so a
 * row's result never depends on the other rows; see quantize_rows), and sums each block's
 * integer products exactly: with AVX2, the block's weights are widened to int16 once for all
 * rows and madd multiplies 16 pairs at once. Without AVX2 the same arithmetic runs in plain C.
 * shoal_forward runs a Llama-family shard's layers over a batch of rows in one call.
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

#define LANES 8 /* rows per group */

/* where value v (< 32) of lane l sits in a group's block (see the layouts at the top) */
static inline int64_t q8_at(int l, int v) {
    return 16 * (4 * (l % 4) + v / 8) + 8 * (l / 4) + v % 8;
}
static inline int64_t q4_at(int l, int v) { return 32 * (l % 4) + 16 * (l / 4) + v % 16; }

void shoal_quantize_q8(const float *w, int64_t n, int64_t k, int8_t *q, uint16_t *d, int threads) {
    int64_t nb = k / QK, groups = (n + LANES - 1) / LANES;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < groups * nb; i++) { /* group g = i / nb, block b = i % nb */
        int64_t g = i / nb, b = i % nb;
        int8_t *out = q + i * (LANES * QK);
        for (int l = 0; l < LANES; l++) {
            int64_t row = g * LANES + l;
            if (row >= n) {
                d[i * LANES + l] = 0;
                for (int j = 0; j < QK; j++) out[q8_at(l, j)] = 0;
                continue;
            }
            const float *v = w + row * k + b * QK;
            float amax = 0.0f;
            for (int j = 0; j < QK; j++) amax = max_of(amax, fabsf(v[j]));
            uint16_t dh = float_to_half(amax / 127.0f);
            d[i * LANES + l] = dh;
            float scale = half_to_float(dh), inv = scale > 0.0f ? 1.0f / scale : 0.0f;
            for (int j = 0; j < QK; j++) {
                float r = nearbyintf(v[j] * inv);
                out[q8_at(l, j)] = (int8_t)(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
            }
        }
    }
}

void shoal_quantize_q4(const float *w, int64_t n, int64_t k, uint8_t *q, uint16_t *d, uint16_t *m,
                       int threads) {
    int64_t nb = k / QK, groups = (n + LANES - 1) / LANES;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < groups * nb; i++) {
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
                out[q4_at(l, j)] |= (uint8_t)(value << (j < QK / 2 ? 0 : 4));
            }
        }
    }
}

/* ---- activations: 15-bit integers, a scale and the exact sum per block of 32 ------------- */

/* x = d * (254 q1 + q2): q1 = round(x / (254 d)) in [-127, 127] with d = amax / (127 * 254), and
 * q2 in [-127, 127] the rounded remainder, held joined as one int16 (|254 q1 + q2| <= 32385).
 * That is as precise as 15-bit activations: 8 bits (llama.cpp's Q8 activations) turned
 * SmolLM2's answer to "What is the capital of France?" from Paris to "L'Étoile, ...". */
static void quantize_rows(const float *x, int64_t rows, int64_t k, int16_t *q, float *dx,
                          float *sx, int threads) {
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
            low = low > 127.0f ? 127.0f : low < -127.0f ? -127.0f : low;
            q[i * QK + j] = (int16_t)(254 * (int)high + (int)low);
        }
        dx[i] = fine;
        sx[i] = sum;
    }
}

typedef struct {
    int64_t kind; /* 8: q8, 4: q4 */
    int64_t n, k; /* [n, k]: y = x @ W^T maps k inputs to n outputs */
    const void *values;
    const uint16_t *scales, *minimums; /* [groups, k / 32, 8] fp16; minimums for q4 only */
} shoal_matrix;

/* ---- products: a group of 8 weight rows against up to TILE activation rows ---------------- */

#define TILE 8

#ifdef SHOAL_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256i broadcast16(const void *p) { /* 16 bytes into both 128-bit halves */
    return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
}

/* t[j] holds lane j's 4 partial sums in its low half and lane j + 4's in its high one: the 8
 * lanes' totals, in order (a 4x4 transpose per half by unpacks: hadd is slower) */
static inline __m256i lane_sums(const __m256i t[4]) {
    __m256i a = _mm256_add_epi32(_mm256_unpacklo_epi32(t[0], t[1]),
                                 _mm256_unpackhi_epi32(t[0], t[1]));
    __m256i b = _mm256_add_epi32(_mm256_unpacklo_epi32(t[2], t[3]),
                                 _mm256_unpackhi_epi32(t[2], t[3]));
    return _mm256_add_epi32(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b));
}
#endif

/* out[r][l] = row r . lane l for one group, up to TILE rows. Per block, each lane's integer sum
 * is exact (at most 32 * 128 * 32385 < 2^31; q4: 32 * 15 * 32385 < 2^24) and goes into a float
 * accumulator with the block's two scales; q4 then adds its minimums times the activation
 * block sums. With AVX2 a block's weights are widened to int16 once for all rows, and madd
 * multiplies 16 pairs at once. */
static inline __attribute__((always_inline)) void group(const shoal_matrix *m, int64_t g,
                                                        const int16_t *q, const float *dx,
                                                        const float *sx, const int rows,
                                                        float out[][LANES]) {
    int64_t nb = m->k / QK, k = m->k;
    const uint16_t *wd = m->scales + g * nb * LANES;
    const uint16_t *wm = m->kind == 4 ? m->minimums + g * nb * LANES : NULL;
    const int8_t *w8 = (const int8_t *)m->values + g * nb * (LANES * QK);
    const uint8_t *w4 = (const uint8_t *)m->values + g * nb * (LANES * QK / 2);
#ifdef SHOAL_AVX2
    __m256 acc[TILE];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i wv[16]; /* wv[4 j + c]: values 8c .. 8c + 7 of lanes j and j + 4, as int16 */
        if (m->kind == 8) {
            for (int i = 0; i < 16; i++)
                wv[i] = _mm256_cvtepi8_epi16(
                    _mm_loadu_si128((const __m128i *)(w8 + b * (LANES * QK) + 16 * i)));
        } else {
            const __m256i nibble = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
            for (int j = 0; j < 4; j++) {
                __m256i raw =
                    _mm256_loadu_si256((const __m256i *)(w4 + b * (LANES * QK / 2) + 32 * j));
                __m256i low = _mm256_and_si256(raw, nibble);
                __m256i high = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
                wv[4 * j] = _mm256_unpacklo_epi8(low, zero);
                wv[4 * j + 1] = _mm256_unpackhi_epi8(low, zero);
                wv[4 * j + 2] = _mm256_unpacklo_epi8(high, zero);
                wv[4 * j + 3] = _mm256_unpackhi_epi8(high, zero);
            }
        }
        __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + b * LANES)));
        for (int r = 0; r < rows; r++) {
            const int16_t *x = q + r * k + b * QK;
            __m256i xs[4], t[4];
            for (int c = 0; c < 4; c++) xs[c] = broadcast16(x + 8 * c);
            for (int j = 0; j < 4; j++)
                t[j] = _mm256_add_epi32(
                    _mm256_add_epi32(_mm256_madd_epi16(wv[4 * j], xs[0]),
                                     _mm256_madd_epi16(wv[4 * j + 1], xs[1])),
                    _mm256_add_epi32(_mm256_madd_epi16(wv[4 * j + 2], xs[2]),
                                     _mm256_madd_epi16(wv[4 * j + 3], xs[3])));
            __m256 sum = _mm256_cvtepi32_ps(lane_sums(t));
            acc[r] = _mm256_fmadd_ps(sum, _mm256_mul_ps(ws, _mm256_set1_ps(dx[r * nb + b])),
                                     acc[r]);
        }
    }
    if (wm)
        for (int64_t b = 0; b < nb; b++) {
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
                const int16_t *x = q + r * k + b * QK;
                int32_t sum = 0;
                for (int v = 0; v < QK; v++) {
                    int value;
                    if (m->kind == 8) {
                        value = w8[b * (LANES * QK) + q8_at(l, v)];
                    } else {
                        uint8_t byte = w4[b * (LANES * QK / 2) + q4_at(l, v)];
                        value = v < QK / 2 ? byte & 0x0f : byte >> 4;
                    }
                    sum += value * x[v];
                }
                acc += (float)sum * (half_to_float(wd[b * LANES + l]) * dx[r * nb + b]);
            }
            if (wm)
                for (int64_t b = 0; b < nb; b++)
                    acc += half_to_float(wm[b * LANES + l]) * sx[r * nb + b];
            out[r][l] = acc;
        }
#endif
}

/* ---- matrices ----------------------------------------------------------------------------- */


void shoal_dequantize(const shoal_matrix *m, float *w, int threads) {
    int64_t nb = m->k / QK, groups = (m->n + LANES - 1) / LANES;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < groups * nb; i++) {
        int64_t g = i / nb, b = i % nb;
        for (int l = 0; l < LANES && g * LANES + l < m->n; l++) {
            float scale = half_to_float(m->scales[i * LANES + l]);
            float *out = w + (g * LANES + l) * m->k + b * QK;
            if (m->kind == 8) {
                const int8_t *in = (const int8_t *)m->values + i * (LANES * QK);
                for (int v = 0; v < QK; v++) out[v] = scale * (float)in[q8_at(l, v)];
            } else {
                const uint8_t *in = (const uint8_t *)m->values + i * (LANES * QK / 2);
                float low = half_to_float(m->minimums[i * LANES + l]);
                for (int v = 0; v < QK; v++) {
                    uint8_t byte = in[q4_at(l, v)];
                    out[v] = scale * (float)(v < QK / 2 ? byte & 0x0f : byte >> 4) + low;
                }
            }
        }
    }
}

/* Activation rows quantized for a product: 15-bit integers, per-block scale and sum. */
typedef struct {
    int16_t *q;
    float *d, *s;
} Activations;

static int activations_alloc(Activations *a, int64_t rows, int64_t k) {
    a->q = malloc((size_t)(rows * k) * sizeof(int16_t));
    a->d = malloc((size_t)(rows * (k / QK)) * sizeof(float));
    a->s = malloc((size_t)(rows * (k / QK)) * sizeof(float));
    return a->q && a->d && a->s ? 0 : -1;
}

static void activations_free(Activations *a) {
    free(a->q);
    free(a->d);
    free(a->s);
}

static void quantize(const float *x, int64_t rows, int64_t k, Activations *a, int threads) {
    quantize_rows(x, rows, k, a->q, a->d, a->s, threads);
}

/* one group against `tile` rows; tile a constant in each case, so the kernel unrolls */
#define GROUP(tile) group(m, g, a->q + r * k, a->d + r * nb, a->s + r * nb, tile, out)

/* y [rows, n] (=, or += with accumulate) quantized rows @ W^T */
static void product(const shoal_matrix *m, const Activations *a, int64_t rows, float *y,
                    int accumulate, int threads) {
    int64_t n = m->n, k = m->k, nb = k / QK, groups = (n + LANES - 1) / LANES;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < groups; g++) {
        int lanes = n - g * LANES < LANES ? (int)(n - g * LANES) : LANES;
        for (int64_t r = 0; r < rows; r += TILE) {
            int tile = rows - r < TILE ? (int)(rows - r) : TILE;
            float out[TILE][LANES];
            switch (tile) {
            case 8: GROUP(8); break;
            case 7: GROUP(7); break;
            case 6: GROUP(6); break;
            case 5: GROUP(5); break;
            case 4: GROUP(4); break;
            case 3: GROUP(3); break;
            case 2: GROUP(2); break;
            default: GROUP(1); break;
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
        quantize(x, rows, m->k, &a, threads);
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
 * item[r]; item i's cache is [layers, kv_heads, capacity[i], head_dim] fp16 at k[i] and v[i]
 * (half the bytes of float32 to read at every step, as llama.cpp's default cache).
 * A pass writes every row's keys and values at its position, then each row attends to its
 * item's positions 0 .. position[r]. */
typedef struct {
    const int64_t *item, *position;
    uint16_t *const *k, *const *v;
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

/* n floats into fp16, rounding to nearest even (as F16C does) */
static void to_half(const float *x, int64_t n, uint16_t *out) {
    int64_t j = 0;
#ifdef SHOAL_AVX2
    for (; j + 8 <= n; j += 8)
        _mm_storeu_si128((__m128i *)(out + j),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + j), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; j < n; j++) out[j] = float_to_half(x[j]);
}

#ifdef SHOAL_AVX2
static inline __m256 load_half(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
#endif

/* scores[s] = scale * q . keys[s] for s < n (keys [n, dim] fp16). One dot alone waits on its FMA
 * chain, so with AVX2 four positions run at once, two accumulators each (dim % 16 == 0). */
static void head_scores(const float *q, const uint16_t *keys, int64_t n, int64_t dim, float scale,
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
                    const uint16_t *k = keys + (s + i) * dim + c;
                    acc[i][0] = _mm256_fmadd_ps(q0, load_half(k), acc[i][0]);
                    acc[i][1] = _mm256_fmadd_ps(q1, load_half(k + 8), acc[i][1]);
                }
            }
            for (int i = 0; i < 4; i++)
                scores[s + i] = hsum(_mm256_add_ps(acc[i][0], acc[i][1])) * scale;
        }
#endif
    for (; s < n; s++) {
        float sum = 0.0f;
        for (int64_t j = 0; j < dim; j++) sum += q[j] * half_to_float(keys[s * dim + j]);
        scores[s] = sum * scale;
    }
}

/* out [dim] = sum over s < n of p[s] * values[s] (values [n, dim] fp16); with AVX2, 64 outputs
 * stay in eight registers across all positions (dim % 8 == 0). */
static void head_values(const float *p, const uint16_t *values, int64_t n, int64_t dim,
                        float *out) {
    int64_t c0 = 0;
#ifdef SHOAL_AVX2
    if (dim % 8 == 0) {
        for (; c0 + 64 <= dim; c0 += 64) {
            __m256 acc[8];
            for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
            for (int64_t s = 0; s < n; s++) {
                __m256 ps = _mm256_broadcast_ss(p + s);
                const uint16_t *v = values + s * dim + c0;
                for (int i = 0; i < 8; i++)
                    acc[i] = _mm256_fmadd_ps(ps, load_half(v + 8 * i), acc[i]);
            }
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(out + c0 + 8 * i, acc[i]);
        }
        for (; c0 < dim; c0 += 8) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t s = 0; s < n; s++)
                acc = _mm256_fmadd_ps(_mm256_broadcast_ss(p + s),
                                      load_half(values + s * dim + c0), acc);
            _mm256_storeu_ps(out + c0, acc);
        }
    }
#endif
    if (c0 < dim) {
        memset(out + c0, 0, (size_t)(dim - c0) * sizeof(float));
        for (int64_t s = 0; s < n; s++) {
            const uint16_t *v = values + s * dim;
            for (int64_t j = c0; j < dim; j++) out[j] += p[s] * half_to_float(v[j]);
        }
    }
}

/* Attention runs in pieces of CHUNK cached positions, one piece of one row's key/value head a
 * task: its query heads (H / KV of them) go over the piece's keys and values while they are in
 * cache, leaving per head the piece's largest score m, its sum of e^(score - m) and the values
 * weighted by those. Each (row, head) then merges its pieces in order. Pieces depend only on a
 * row's position, so a row's arithmetic is the same in any batch, and the work splits evenly
 * over threads even for one row. */
#define CHUNK 128
#define PIECES 4096 /* pieces per pass: bounds the scratch of a long prompt */

typedef struct {
    int64_t row, group, chunk;
} Piece;

static void attend_piece(const float *q, const uint16_t *keys, const uint16_t *values,
                         int64_t from, int64_t to, int64_t G, int64_t D, int64_t qstride,
                         float scale, float *scores, float *partial) {
    int64_t n = to - from;
    for (int64_t e = 0; e < G; e++) {
        float *s = scores, *p = partial + e * (D + 2), top = -INFINITY, total = 0.0f;
        head_scores(q + e * qstride, keys + from * D, n, D, scale, s);
        for (int64_t j = 0; j < n; j++) top = max_of(top, s[j]);
        for (int64_t j = 0; j < n; j++) s[j] -= top;
        exp_in_place(s, n);
        for (int64_t j = 0; j < n; j++) total += s[j];
        p[0] = top;
        p[1] = total;
        head_values(s, values + from * D, n, D, p + 2);
    }
}

/* qkv [rows, (H + 2 KV) D] → attention output [rows, H D]: norms and rotation of q and k, keys
 * and values written to the caches, then each query head against its group's keys. */
static int attend(const shoal_dims *dm, const shoal_layer *l, int64_t layer, float *qkv,
                  int64_t rows, const float *cos, const float *sin, const shoal_rows *c,
                  float *out, int threads) {
    int64_t H = dm->heads, KV = dm->kv_heads, D = dm->head_dim, width = (H + 2 * KV) * D;
    int64_t G = H / KV;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < rows * (H + KV); i++) {
        int64_t r = i / (H + KV), head = i % (H + KV), b = c->item[r];
        float *x = qkv + r * width + head * D, tmp[512];
        const float *nw = head < H ? l->q_norm : l->k_norm;
        if (nw) rms_norm_row(x, nw, D, dm->eps, x);
        rotate(x, cos + r * D, sin + r * D, D, tmp);
        if (head >= H) {
            int64_t g = head - H, at = ((layer * KV + g) * c->capacity[b] + c->position[r]) * D;
            to_half(x, D, c->k[b] + at);
            to_half(x + KV * D, D, c->v[b] + at);
        }
    }
    float scale = 1.0f / sqrtf((float)D);
    Piece *pieces = malloc(PIECES * sizeof(Piece));
    float *partials = malloc((size_t)PIECES * (size_t)(G * (D + 2)) * sizeof(float));
    int64_t *first = malloc((size_t)(rows + 1) * sizeof(int64_t)); /* row r's pieces from here */
    int status = pieces && partials && first ? 0 : -1;
    for (int64_t r0 = 0; r0 < rows && status == 0;) { /* rows r0 .. r1 - 1 in this pass */
        int64_t count = 0, r1 = r0;
        while (r1 < rows) {
            int64_t chunks = c->position[r1] / CHUNK + 1;
            if (r1 > r0 && count + KV * chunks > PIECES) break;
            if (KV * chunks > PIECES) { /* one row alone over the bound: more scratch */
                Piece *more = realloc(pieces, (size_t)(KV * chunks) * sizeof(Piece));
                float *wider = realloc(partials, (size_t)(KV * chunks) *
                                                     (size_t)(G * (D + 2)) * sizeof(float));
                if (more) pieces = more;
                if (wider) partials = wider;
                if (!more || !wider) {
                    status = -1;
                    break;
                }
            }
            first[r1 - r0] = count;
            for (int64_t g = 0; g < KV; g++)
                for (int64_t k = 0; k < chunks; k++) pieces[count++] = (Piece){r1, g, k};
            r1++;
        }
        if (status) break;
        first[r1 - r0] = count;
#pragma omp parallel num_threads(threads)
        {
            float *scores = malloc(CHUNK * sizeof(float));
            if (!scores) {
#pragma omp atomic write
                status = -1;
            }
#pragma omp for schedule(static)
            for (int64_t i = 0; i < count; i++) {
                if (!scores) continue;
                Piece pc = pieces[i];
                int64_t b = c->item[pc.row], n = c->position[pc.row] + 1;
                int64_t from = pc.chunk * CHUNK, to = from + CHUNK < n ? from + CHUNK : n;
                int64_t base = (layer * KV + pc.group) * c->capacity[b] * D;
                attend_piece(qkv + pc.row * width + pc.group * G * D, c->k[b] + base,
                             c->v[b] + base, from, to, G, D, D, scale, scores,
                             partials + i * G * (D + 2));
            }
            free(scores);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < (r1 - r0) * H; i++) { /* merge each head's pieces, in order */
                int64_t r = r0 + i / H, head = i % H, g = head / G, e = head % G;
                int64_t chunks = c->position[r] / CHUNK + 1, stride = G * (D + 2);
                const float *p = partials + (first[r - r0] + g * chunks) * stride + e * (D + 2);
                float top = -INFINITY, total = 0.0f, *o = out + r * H * D + head * D;
                for (int64_t k = 0; k < chunks; k++) top = max_of(top, p[k * stride]);
                memset(o, 0, (size_t)D * sizeof(float));
                for (int64_t k = 0; k < chunks; k++) {
                    const float *pk = p + k * stride;
                    float w = expf(pk[0] - top);
                    total += w * pk[1];
                    for (int64_t j = 0; j < D; j++) o[j] += w * pk[2 + j];
                }
                float inv = 1.0f / total;
                for (int64_t j = 0; j < D; j++) o[j] *= inv;
            }
        }
        r0 = r1;
    }
    free(pieces);
    free(partials);
    free(first);
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
        quantize(normed, rows, hidden, &a, threads);
        product(&l->qkv, &a, rows, qkv, 0, threads);
        if (l->qkv_bias)
            for (int64_t r = 0; r < rows; r++)
                for (int64_t j = 0; j < width; j++) qkv[r * width + j] += l->qkv_bias[j];
        status = attend(dm, l, li, qkv, rows, cos, sin, c, normed, threads);
        if (status) break;
        quantize(normed, rows, H * D, &a, threads);
        product(&l->o, &a, rows, h, 1, threads);
        shoal_rms_norm(h, rows, hidden, l->mlp_norm, dm->eps, normed, threads);
        quantize(normed, rows, hidden, &a, threads);
        product(&l->gate_up, &a, rows, gate_up, 0, threads);
        silu_gate(gate_up, rows, inter, normed, threads);
        quantize(normed, rows, inter, &a, threads);
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
