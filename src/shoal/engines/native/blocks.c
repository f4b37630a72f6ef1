/* Block-quantized matrix products for shoal's CPU engines.
 *
 * Weights are held in blocks of 32 along the input dimension, as GGUF does:
 *   q8: 32 int8 values and one fp16 scale d:             w = d * q      (GGUF Q8_0)
 *       or, with minimums, 32 uint8 values, d and m:     w = d * q + m  (MLX 8-bit, exactly)
 *   q4: 32 4-bit values, an fp16 scale d and minimum m:  w = d * q + m  (GGUF Q4_1; MLX 4-bit)
 * d may be negative (MLX's scales are, in about half of all groups): nothing here assumes d >= 0.
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
 *
 * Compiled at first use for the machine it runs on (build.py) together with forward.c, which
 * runs whole passes over these products; threads come from OpenMP, the runtime torch uses, so
 * both share one pool.
 */

#include "blocks.h"

int shoal_blockq_simd(void) {
#ifdef SHOAL_AVX2
    return 1;
#else
    return 0;
#endif
}

/* ---- quantizing weights (load time) -------------------------------------------------------- */


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


#define TILE 8

#ifdef SHOAL_AVX2
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
 * is exact (at most 32 * 255 * 32385 < 2^31; q4: 32 * 15 * 32385 < 2^24) and goes into a float
 * accumulator with the block's two scales; q4 (and q8 with minimums) then adds its minimums
 * times the activation block sums. With AVX2 a block's weights are widened to int16 once for all rows, and madd
 * multiplies 16 pairs at once. */
static inline __attribute__((always_inline)) void group(const shoal_matrix *m, int64_t g,
                                                        const int16_t *q, const float *dx,
                                                        const float *sx, const int rows,
                                                        float out[][LANES]) {
    int64_t nb = m->k / QK, k = m->k;
    const uint16_t *wd = m->scales + g * nb * LANES;
    const uint16_t *wm = m->minimums ? m->minimums + g * nb * LANES : NULL;
    const int unsigned8 = m->kind == 8 && wm != NULL; /* q8 with minimums: values are uint8 */
    const int8_t *w8 = (const int8_t *)m->values + g * nb * (LANES * QK);
    const uint8_t *w4 = (const uint8_t *)m->values + g * nb * (LANES * QK / 2);
#ifdef SHOAL_AVX2
    __m256 acc[TILE];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i wv[16]; /* wv[4 j + c]: values 8c .. 8c + 7 of lanes j and j + 4, as int16 */
        if (m->kind == 8) {
            for (int i = 0; i < 16; i++) {
                __m128i raw = _mm_loadu_si128((const __m128i *)(w8 + b * (LANES * QK) + 16 * i));
                wv[i] = unsigned8 ? _mm256_cvtepu8_epi16(raw) : _mm256_cvtepi8_epi16(raw);
            }
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
                        int8_t byte = w8[b * (LANES * QK) + q8_at(l, v)];
                        value = unsigned8 ? (int)(uint8_t)byte : (int)byte;
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
            if (m->kind == 8 && m->minimums) {
                const uint8_t *in = (const uint8_t *)m->values + i * (LANES * QK);
                float low = half_to_float(m->minimums[i * LANES + l]);
                for (int v = 0; v < QK; v++) out[v] = scale * (float)in[q8_at(l, v)] + low;
            } else if (m->kind == 8) {
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

int activations_alloc(Activations *a, int64_t rows, int64_t k) {
    a->q = malloc((size_t)(rows * k) * sizeof(int16_t));
    a->d = malloc((size_t)(rows * (k / QK)) * sizeof(float));
    a->s = malloc((size_t)(rows * (k / QK)) * sizeof(float));
    return a->q && a->d && a->s ? 0 : -1;
}

void activations_free(Activations *a) {
    free(a->q);
    free(a->d);
    free(a->s);
}

void quantize(const float *x, int64_t rows, int64_t k, Activations *a, int threads) {
    quantize_rows(x, rows, k, a->q, a->d, a->s, threads);
}

/* one group against `tile` rows; tile a constant in each case, so the kernel unrolls */
#define GROUP(tile) group(m, g, a->q + r * k, a->d + r * nb, a->s + r * nb, tile, out)

void product(const shoal_matrix *m, const Activations *a, int64_t rows, float *y,
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
