/* A Llama-family shard's forward pass over a batch of rows in one call (shoal_forward).
 *
 * Per layer: RMSNorm, the fused q/k/v product, q/k norms and rotation, every row's keys and values
 * written into its item's fp16 cache, attention over the item's cached positions in pieces of
 * CHUNK positions per key/value head, the output product added to the residual, RMSNorm,
 * gate/up, SiLU(gate) * up, the down product added to the residual. A qwen3_moe layer's
 * feed-forward is routed experts instead: a router picks each row's top k, each used expert runs
 * once over the rows that chose it. The products are blocks.c's.
 */

#include "blocks.h"


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

/* ---- a forward pass of a Llama-family shard -------------------------------------------- */

typedef struct {
    shoal_matrix qkv, o, gate_up, down; /* q, k, v fused; gate and up fused (dense layers) */
    const float *attn_norm, *mlp_norm;  /* [hidden] */
    const float *qkv_bias;              /* [(heads + 2 kv_heads) * head_dim], or NULL */
    const float *q_norm, *k_norm;       /* [head_dim] per-head RMSNorm weights (qwen3), or NULL */
    /* routed experts in place of gate_up and down where experts > 0 (qwen3_moe) */
    int64_t experts, top_k, norm_topk_prob;
    const float *router;                /* [experts, hidden] float32 */
    const shoal_matrix *expert_gate_up; /* [experts], each [2 moe_inter, hidden]: gate and up */
    const shoal_matrix *expert_down;    /* [experts], each [hidden, moe_inter] */
} shoal_layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter;
    int64_t moe_inter; /* one expert's width (0 without experts) */
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

/* ---- routed experts (qwen3_moe) --------------------------------------------------------- */

/* Each row's top_k experts as qwen3_moe chooses them: logits [E] = router x (float32, eight
 * partial sums in a fixed order, so a row's logits never depend on the batch), softmax over all
 * E, the k largest, ties to the lower index (a stable argsort's order), weighted by their
 * softmax, renormalised to sum 1 over the k if norm_topk_prob. x [rows, hidden] →
 * choice, weight [rows, k]; logits [rows, E] is scratch. */
static void route(const shoal_layer *l, const float *x, int64_t rows, int64_t hidden,
                  float *logits, int64_t *choice, float *weight, int threads) {
    int64_t E = l->experts, K = l->top_k;
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * E > 64)
    for (int64_t i = 0; i < rows * E; i++) {
        const float *xr = x + (i / E) * hidden, *w = l->router + (i % E) * hidden;
        float acc[8] = {0};
        for (int64_t j = 0; j < hidden; j += 8) /* hidden is whole blocks of 32 */
            for (int u = 0; u < 8; u++) acc[u] += xr[j + u] * w[j + u];
        logits[i] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
    for (int64_t r = 0; r < rows; r++) {
        const float *z = logits + r * E;
        int64_t *c = choice + r * K;
        float *w = weight + r * K, total = 0.0f;
        for (int64_t j = 0; j < K; j++) { /* the largest not yet chosen, the first of equals */
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++) {
                int taken = 0;
                for (int64_t i = 0; i < j; i++) taken |= c[i] == e;
                if (!taken && (best < 0 || z[e] > z[best])) best = e;
            }
            c[j] = best;
        }
        float top = z[c[0]]; /* softmax numerators over the row's largest logit */
        for (int64_t j = 0; j < K; j++) w[j] = expf(z[c[j]] - top);
        if (l->norm_topk_prob)
            for (int64_t j = 0; j < K; j++) total += w[j];
        else
            for (int64_t e = 0; e < E; e++) total += expf(z[e] - top);
        for (int64_t j = 0; j < K; j++) w[j] /= total;
    }
}

/* h [rows, hidden] += the routed experts of x [rows, hidden] (the normed residual): route, then
 * each used expert once, in ascending order, over the rows that chose it (gathered, quantized,
 * gate/up, SiLU, down), each row's weighted outputs summed in that expert order, so a row's
 * result is the same whatever else is in the batch. a holds rows x max(hidden, moe_inter).
 * Returns 0, or -1 when out of memory. */
static int routed_experts(const shoal_dims *dm, const shoal_layer *l, const float *x,
                          int64_t rows, float *h, Activations *a, int threads) {
    int64_t hidden = dm->hidden, inter = dm->moe_inter, E = l->experts, K = l->top_k;
    float *logits = malloc((size_t)(rows * E) * sizeof(float));
    float *weight = malloc((size_t)(rows * K) * sizeof(float));
    int64_t *choice = malloc((size_t)(rows * K) * sizeof(int64_t));
    int64_t *start = calloc((size_t)(E + 2), sizeof(int64_t)); /* expert e's slots from here */
    int64_t *slot_row = malloc((size_t)(rows * K) * sizeof(int64_t));
    float *slot_weight = malloc((size_t)(rows * K) * sizeof(float));
    float *gathered = malloc((size_t)(rows * hidden) * sizeof(float));
    float *gate_up = malloc((size_t)(rows * 2 * inter) * sizeof(float));
    float *act = malloc((size_t)(rows * inter) * sizeof(float));
    float *out = malloc((size_t)(rows * hidden) * sizeof(float));
    float *sum = calloc((size_t)(rows * hidden), sizeof(float));
    int status = logits && weight && choice && start && slot_row && slot_weight && gathered &&
                         gate_up && act && out && sum ? 0 : -1;
    if (status == 0) {
        route(l, x, rows, hidden, logits, choice, weight, threads);
        /* slots grouped by expert, rows ascending within one: a counting sort whose fill moves
         * start[e + 1] from expert e's first slot to its end, expert e + 1's first */
        for (int64_t i = 0; i < rows * K; i++) start[choice[i] + 2]++;
        for (int64_t e = 0; e < E; e++) start[e + 2] += start[e + 1];
        for (int64_t i = 0; i < rows * K; i++) {
            int64_t at = start[choice[i] + 1]++;
            slot_row[at] = i / K;
            slot_weight[at] = weight[i];
        }
        for (int64_t e = 0; e < E; e++) {
            int64_t from = start[e], n = start[e + 1] - from;
            if (n == 0) continue; /* an expert no row chose: its weights are not read */
            for (int64_t i = 0; i < n; i++)
                memcpy(gathered + i * hidden, x + slot_row[from + i] * hidden,
                       (size_t)hidden * sizeof(float));
            quantize(gathered, n, hidden, a, threads);
            product(l->expert_gate_up + e, a, n, gate_up, 0, threads); /* [n, 2 inter] */
            silu_gate(gate_up, n, inter, act, threads);                /* [n, inter] */
            quantize(act, n, inter, a, threads);
            product(l->expert_down + e, a, n, out, 0, threads); /* [n, hidden] */
            for (int64_t i = 0; i < n; i++) {
                float s = slot_weight[from + i], *o = out + i * hidden;
                float *acc = sum + slot_row[from + i] * hidden;
                for (int64_t j = 0; j < hidden; j++) acc[j] += s * o[j];
            }
        }
        for (int64_t i = 0; i < rows * hidden; i++) h[i] += sum[i];
    }
    free(logits);
    free(weight);
    free(choice);
    free(start);
    free(slot_row);
    free(slot_weight);
    free(gathered);
    free(gate_up);
    free(act);
    free(out);
    free(sum);
    return status;
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
    if (dm->moe_inter > widest) widest = dm->moe_inter;
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
        if (l->experts) {
            status = routed_experts(dm, l, normed, rows, h, &a, threads);
            continue;
        }
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
