/* Paged decode attention and the paged KV write for the CPU, called from glmserve/kernels/cpu_attention.py
 * through ctypes. The cache may hold float32 or bfloat16; all arithmetic is float32.
 *
 * Why native code: in torch, decode attention over a paged cache has to gather every sequence's blocks into a
 * padded copy before attending (read, write, read again, plus padding); this reads each cached K/V row once, in
 * place, and the G query heads of a group share each row while it is in L1.
 *
 * Layouts (elements, all float32 unless said):
 *   query        [B, H, D]         row b, head h at query + b*q_stride_token + h*q_stride_head (D contiguous)
 *   k/v_cache    [NB, BS, KVH, D]  float32 or bfloat16, contiguous; token t of sequence b is in block
 *                                  block_tables[b, t / BS]
 *   block_tables [B, MB] int32     contiguous
 *   seq_lens     [B] int32         context length of each sequence (its keys 0 .. len-1 are attended)
 *   out          [B, H, D]         contiguous
 * Query head h reads KV head h / G (G = H / KVH). Softmax in float32 with the row maximum subtracted, as torch's
 * reference does.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Query heads one work item may hold (its per-head sums live on the stack). */
#define MAX_HEADS_PER_ITEM 256
/* Rows of a block handled between two prefetches of the next block's rows (one 8-token score tile). */
#define ROWS_PER_STEP 8
/* How far ahead rows are prefetched, in blocks (1 measured better than 2 or 3). */
#define PREFETCH_BLOCKS_AHEAD 1

#include "vec_math.h"     /* dot, exp_avx2, bf16 widening; defines GLMSERVE_AVX2 where AVX2 + FMA are there */

/* ---- portable path: any head_dim, any x86/ARM target ------------------------------------------------------ */

static void scores_portable(const float *q, int64_t q_stride_head, const float *k, int64_t row_stride, int64_t n,
                            int64_t G, int64_t D, float scale, float *scores, int64_t len) {
    for (int64_t t = 0; t < n; t++, k += row_stride)
        for (int64_t g = 0; g < G; g++) scores[g * len + t] = dot(q + g * q_stride_head, k, D) * scale;
}

/* s[t] <- exp(s[t] - max(s)); returns 1 / sum of the new s. */
static float softmax_unnormalised_portable(float *s, int64_t n) {
    float m = -INFINITY, sum = 0.0f;
    for (int64_t t = 0; t < n; t++) m = s[t] > m ? s[t] : m;
    for (int64_t t = 0; t < n; t++) { s[t] = expf(s[t] - m); sum += s[t]; }
    return 1.0f / sum;
}

static void pv_portable(const float *p, int64_t len, const float *v, int64_t row_stride, int64_t n, int64_t G,
                        int64_t D, float *out) {
    for (int64_t t = 0; t < n; t++, v += row_stride)
        for (int64_t g = 0; g < G; g++) {
            const float w = p[g * len + t];
            for (int64_t d = 0; d < D; d++) out[g * D + d] += w * v[d];
        }
}

#ifdef GLMSERVE_AVX2
/* ---- AVX2 + FMA path: head_dim a multiple of 8 ----------------------------------------------------------- */

/* r[i] = sum of the 8 lanes of a[i]: a transposing reduction, cheaper than 8 separate horizontal sums. */
static inline __m256 sum_lanes_8x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                                   __m256 a7) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* Scores of up to 8 consecutive tokens of a block for the G heads of a group: each K row is loaded from L1 once
 * per head, and 8 tokens' partial sums are reduced together. Missing tokens (n < 8) repeat the last row. */
static void scores_avx2(const float *q, int64_t q_stride_head, const float *k, int64_t row_stride, int64_t n,
                        int64_t G, int64_t D, float scale, float *scores, int64_t len) {
    const __m256 vscale = _mm256_set1_ps(scale);
    for (int64_t t0 = 0; t0 < n; t0 += 8) {
        const float *rows[8];
        for (int j = 0; j < 8; j++) rows[j] = k + (t0 + j < n ? t0 + j : n - 1) * row_stride;
        for (int64_t g = 0; g < G; g++) {
            const float *qg = q + g * q_stride_head;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
            for (int64_t d = 0; d < D; d += 8) {
                const __m256 qv = _mm256_loadu_ps(qg + d);
                a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows[0] + d), a0);
                a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows[1] + d), a1);
                a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows[2] + d), a2);
                a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows[3] + d), a3);
                a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows[4] + d), a4);
                a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows[5] + d), a5);
                a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows[6] + d), a6);
                a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows[7] + d), a7);
            }
            const __m256 s = _mm256_mul_ps(sum_lanes_8x8(a0, a1, a2, a3, a4, a5, a6, a7), vscale);
            float *dst = scores + g * len + t0;
            if (n - t0 >= 8) {
                _mm256_storeu_ps(dst, s);
            } else {
                float tmp[8];
                _mm256_storeu_ps(tmp, s);
                memcpy(dst, tmp, (size_t)(n - t0) * sizeof(float));
            }
        }
    }
}

static inline float max_lanes(__m256 v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

static inline float sum_lanes(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

/* As softmax_unnormalised_portable, eight scores at a time. */
static float softmax_unnormalised_avx2(float *s, int64_t n) {
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + t));
    float m = max_lanes(vmax);
    for (; t < n; t++) m = s[t] > m ? s[t] : m;
    const __m256 vm = _mm256_set1_ps(m);
    __m256 vsum = _mm256_setzero_ps();
    for (t = 0; t + 8 <= n; t += 8) {
        const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + t), vm));
        _mm256_storeu_ps(s + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float sum = sum_lanes(vsum);
    for (; t < n; t++) { s[t] = expf(s[t] - m); sum += s[t]; }
    return 1.0f / sum;
}

/* out[g, d0:d0+8*NC] += sum over the block's n tokens of p[g, t] * V[t, d0:...]: NC independent accumulators in
 * registers (NC <= 8, a compile-time constant at each call so the loops unroll). */
static inline __attribute__((always_inline)) void pv_chunk_avx2(const float *p, const float *v, int64_t row_stride,
                                                                int64_t n, float *out, const int NC) {
    __m256 acc[8];
    for (int c = 0; c < NC; c++) acc[c] = _mm256_loadu_ps(out + 8 * c);
    for (int64_t t = 0; t < n; t++, v += row_stride) {
        const __m256 w = _mm256_broadcast_ss(p + t);
        for (int c = 0; c < NC; c++) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * c), acc[c]);
    }
    for (int c = 0; c < NC; c++) _mm256_storeu_ps(out + 8 * c, acc[c]);
}

static void pv_avx2(const float *p, int64_t len, const float *v, int64_t row_stride, int64_t n, int64_t G,
                    int64_t D, float *out) {
    for (int64_t g = 0; g < G; g++) {
        int64_t d = 0;
        for (; d + 64 <= D; d += 64) pv_chunk_avx2(p + g * len, v + d, row_stride, n, out + g * D + d, 8);
        for (; d < D; d += 8) pv_chunk_avx2(p + g * len, v + d, row_stride, n, out + g * D + d, 1);
    }
}
#endif

/* Asks for `width` bytes of each of n rows (row_stride bytes apart) ahead of their use. Into L2 (locality 1), not
 * L1: on the AMD EPYC (Zen 4) this was tuned on, L1 prefetches of whole blocks were slower, crowding out the loads
 * in use, and L2 is close enough for the next block's rows. */
static inline void prefetch_rows(const char *rows, int64_t row_stride, int64_t n, int64_t width) {
    for (int64_t t = 0; t < n; t++)
        for (int64_t d = 0; d < width; d += 64) __builtin_prefetch(rows + t * row_stride + d, 0, 1);
}

/* What the cache holds. */
enum kv_type { KV_F32 = 0, KV_BF16 = 1 };

/* n rows (row_stride elements apart) of `width` elements, as float32 rows the score and PV loops can read: the
 * cache itself for float32 (*stride_out = row_stride); for bfloat16, widened once into `tile` (n x width, so
 * *stride_out = width) and then shared by the G heads of the group, instead of widening each row G times. */
static inline const float *rows_as_f32(const char *rows, enum kv_type type, int64_t row_stride, int64_t n,
                                       int64_t width, float *tile, int64_t *stride_out) {
    if (type == KV_F32) {
        *stride_out = row_stride;
        return (const float *)rows;
    }
    const uint16_t *src = (const uint16_t *)rows;
    for (int64_t t = 0; t < n; t++) {
        const uint16_t *row = src + t * row_stride;
        float *dst = tile + t * width;
        int64_t d = 0;
#ifdef GLMSERVE_AVX2
        for (; d + 8 <= width; d += 8) _mm256_storeu_ps(dst + d, load8_bf16(row + d));
#endif
        for (; d < width; d++) dst[d] = bf16_to_f32(row[d]);
    }
    *stride_out = width;
    return tile;
}

/* How one work item reads its rows of the cache; the same in both passes. */
struct item_rows {
    enum kv_type type;
    int64_t row_stride;     /* elements between consecutive tokens of a block */
    int64_t elem;           /* bytes per cached element */
    int64_t width;          /* elements of a token the item reads: its nkv heads of D */
    float *tile;            /* bfloat16: scratch for ROWS_PER_STEP widened rows */
};

/* Rows t0 .. t0 + m of `block` as float32 (rows_as_f32), after asking for the same rows of `next` (the block to be
 * read after this one, next_n tokens long; NULL: none) to be prefetched while these are in use. */
static inline const float *step_rows(const struct item_rows *r, const char *block, const char *next, int64_t next_n,
                                     int64_t t0, int64_t m, int64_t *stride_out) {
    if (next != NULL && t0 < next_n)
        prefetch_rows(next + t0 * r->row_stride * r->elem, r->row_stride * r->elem, next_n - t0 < m ? next_n - t0 : m,
                      r->width * r->elem);
    return rows_as_f32(block + t0 * r->row_stride * r->elem, r->type, r->row_stride, m, r->width, r->tile,
                       stride_out);
}

/* One work item: KV heads [kv0, kv0 + nkv) of one sequence, i.e. query heads [kv0 * G, (kv0 + nkv) * G), over the
 * sequence's `len` cached tokens. Reading all of a token's KV heads together makes each block one contiguous
 * stretch of memory. q: the item's first query head; scores: scratch of nkv * G * len floats; tile: scratch of
 * ROWS_PER_STEP * nkv * D floats (bfloat16 caches); out: [nkv * G, D]. */
static void attend(const float *q, int64_t q_stride_head, const char *k_cache, const char *v_cache,
                   enum kv_type type, const int32_t *block_row, int64_t len, int64_t kv0, int64_t nkv, int64_t G,
                   int64_t KVH, int64_t D, int64_t BS, float scale, float *scores, float *tile, float *out) {
    const int64_t elem = type == KV_F32 ? 4 : 2;   /* bytes per cached element */
    const int64_t row_stride = KVH * D;            /* elements between consecutive tokens of a block */
    const int64_t block_bytes = BS * row_stride * elem;
    const int64_t item_offset = kv0 * D * elem;    /* where the item's heads start in a token's row */
    const int64_t heads = nkv * G;
    const struct item_rows item = {type, row_stride, elem, nkv * D, tile};
#ifdef GLMSERVE_AVX2
    const int vector = D % 8 == 0;
#else
    const int vector = 0;
    (void)vector;
#endif
    /* Pass 1: scaled scores, block by block; each K row is read from memory once for the G heads sharing it.
     * Blocks sit anywhere in the pool, so the hardware prefetcher loses the stream at every block boundary: while
     * a block's rows are used, the next block's are prefetched, a few rows at a time. */
    for (int64_t start = 0; start < len; start += BS) {
        const int64_t n = len - start < BS ? len - start : BS;
        const char *block = k_cache + (int64_t)block_row[start / BS] * block_bytes + item_offset;
        const int64_t ahead = start + PREFETCH_BLOCKS_AHEAD * BS;               /* first token of the block to fetch */
        int64_t next_n = len - ahead < BS ? len - ahead : BS;                    /* <= 0: no such block */
        const char *next = next_n > 0 ? k_cache + (int64_t)block_row[ahead / BS] * block_bytes + item_offset : NULL;
        if (next == NULL && start + BS >= len) {      /* the last K block: fetch pass 2's first V block */
            next_n = len < BS ? len : BS;
            next = v_cache + (int64_t)block_row[0] * block_bytes + item_offset;
        }
        for (int64_t t0 = 0; t0 < n; t0 += ROWS_PER_STEP) {
            const int64_t m = n - t0 < ROWS_PER_STEP ? n - t0 : ROWS_PER_STEP;
            int64_t stride;
            const float *rows = step_rows(&item, block, next, next_n, t0, m, &stride);
            for (int64_t j = 0; j < nkv; j++) {
                const float *qj = q + j * G * q_stride_head, *k = rows + j * D;
                float *sj = scores + j * G * len + start + t0;
#ifdef GLMSERVE_AVX2
                if (vector) { scores_avx2(qj, q_stride_head, k, stride, m, G, D, scale, sj, len); continue; }
#endif
                scores_portable(qj, q_stride_head, k, stride, m, G, D, scale, sj, len);
            }
        }
    }
    /* Softmax per head: subtract the maximum, exponentiate, normalise at the end. */
    float inv_sum[MAX_HEADS_PER_ITEM];
    for (int64_t h = 0; h < heads; h++) {
#ifdef GLMSERVE_AVX2
        inv_sum[h] = vector ? softmax_unnormalised_avx2(scores + h * len, len)
                            : softmax_unnormalised_portable(scores + h * len, len);
#else
        inv_sum[h] = softmax_unnormalised_portable(scores + h * len, len);
#endif
        memset(out + h * D, 0, (size_t)D * sizeof(float));
    }
    /* Pass 2: out[h] = sum_t p[h, t] * V[t], block by block; each V row read from memory once per group. */
    for (int64_t start = 0; start < len; start += BS) {
        const int64_t n = len - start < BS ? len - start : BS;
        const char *block = v_cache + (int64_t)block_row[start / BS] * block_bytes + item_offset;
        const int64_t ahead = start + PREFETCH_BLOCKS_AHEAD * BS;               /* first token of the block to fetch */
        const int64_t next_n = len - ahead < BS ? len - ahead : BS;              /* <= 0: no such block */
        const char *next = next_n > 0 ? v_cache + (int64_t)block_row[ahead / BS] * block_bytes + item_offset : NULL;
        for (int64_t t0 = 0; t0 < n; t0 += ROWS_PER_STEP) {
            const int64_t m = n - t0 < ROWS_PER_STEP ? n - t0 : ROWS_PER_STEP;
            int64_t stride;
            const float *rows = step_rows(&item, block, next, next_n, t0, m, &stride);
            for (int64_t j = 0; j < nkv; j++) {
                const float *v = rows + j * D, *pj = scores + j * G * len + start + t0;
                float *oj = out + j * G * D;
#ifdef GLMSERVE_AVX2
                if (vector) { pv_avx2(pj, len, v, stride, m, G, D, oj); continue; }
#endif
                pv_portable(pj, len, v, stride, m, G, D, oj);
            }
        }
    }
    for (int64_t h = 0; h < heads; h++)
        for (int64_t d = 0; d < D; d++) out[h * D + d] *= inv_sum[h];
}

/* Returns 0 on success, 1 when scratch memory could not be allocated, 2 when H exceeds MAX_HEADS_PER_ITEM per item. */
static int paged_decode(const float *query, int64_t q_stride_token, int64_t q_stride_head, const char *k_cache,
                        const char *v_cache, enum kv_type type, const int32_t *block_tables, const int32_t *seq_lens,
                        float *out, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t BS, int64_t MB,
                        float scale, int num_threads) {
    const int64_t G = H / KVH;
    /* A whole sequence is one item when there are enough sequences to keep every thread busy; a small batch (a
     * latency-bound decode) splits each sequence by KV head instead. */
    const int64_t nkv = B >= 2 * (int64_t)num_threads ? KVH : 1;
    if (nkv * G > MAX_HEADS_PER_ITEM) return 2;
    const int64_t items_per_seq = KVH / nkv;
    int64_t max_len = 0;
    for (int64_t b = 0; b < B; b++) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    const size_t score_floats = (size_t)(nkv * G * (max_len > 0 ? max_len : 1));
    const size_t tile_floats = type == KV_F32 ? 0 : (size_t)(ROWS_PER_STEP * nkv * D);
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *scores = (float *)malloc((score_floats + tile_floats) * sizeof(float));
        if (scores == NULL) failed = 1;
        /* Sequence lengths differ, so items are handed out dynamically. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < B * items_per_seq; item++) {
            const int64_t b = item / items_per_seq, kv0 = (item % items_per_seq) * nkv;
            float *o = out + (b * H + kv0 * G) * D;
            if (scores == NULL || seq_lens[b] <= 0) {
                memset(o, 0, (size_t)(nkv * G * D) * sizeof(float));
                continue;
            }
            attend(query + b * q_stride_token + kv0 * G * q_stride_head, q_stride_head, k_cache, v_cache, type,
                   block_tables + b * MB, seq_lens[b], kv0, nkv, G, KVH, D, BS, scale, scores, scores + score_floats,
                   o);
        }
        free(scores);
    }
    return failed;
}

int glmserve_paged_decode_f32(const float *query, int64_t q_stride_token, int64_t q_stride_head,
                              const float *k_cache, const float *v_cache, const int32_t *block_tables,
                              const int32_t *seq_lens, float *out, int64_t B, int64_t H, int64_t KVH, int64_t D,
                              int64_t BS, int64_t MB, float scale, int num_threads) {
    return paged_decode(query, q_stride_token, q_stride_head, (const char *)k_cache, (const char *)v_cache, KV_F32,
                        block_tables, seq_lens, out, B, H, KVH, D, BS, MB, scale, num_threads);
}

/* The same with bfloat16 caches (uint16 bit patterns); query and out stay float32. */
int glmserve_paged_decode_bf16(const float *query, int64_t q_stride_token, int64_t q_stride_head,
                               const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *block_tables,
                               const int32_t *seq_lens, float *out, int64_t B, int64_t H, int64_t KVH, int64_t D,
                               int64_t BS, int64_t MB, float scale, int num_threads) {
    return paged_decode(query, q_stride_token, q_stride_head, (const char *)k_cache, (const char *)v_cache, KV_BF16,
                        block_tables, seq_lens, out, B, H, KVH, D, BS, MB, scale, num_threads);
}

/* Writes this step's K and V rows into the paged caches: token i goes to slot slot_mapping[i] (block * BS +
 * offset; -1 = a padding token, skipped). key/value: [T, KVH, D] elements of elem_size bytes, rows
 * `kv_stride_token` and heads `kv_stride_head` elements apart (views into the fused QKV output), D contiguous;
 * caches [num_slots, KVH, D] contiguous, of the same element type. Returns the number of tokens whose slot was out
 * of range (not written); 0 on success. */
int64_t glmserve_write_kv(const char *key, const char *value, int64_t kv_stride_token, int64_t kv_stride_head,
                          const int64_t *slot_mapping, int64_t T, int64_t KVH, int64_t D, char *k_cache,
                          char *v_cache, int64_t num_slots, int64_t elem_size) {
    const size_t row_bytes = (size_t)(D * elem_size);
    int64_t bad = 0;
    for (int64_t i = 0; i < T; i++) {
        const int64_t slot = slot_mapping[i];
        if (slot < 0) continue;
        if (slot >= num_slots) { bad++; continue; }
        for (int64_t h = 0; h < KVH; h++) {
            const int64_t from = (i * kv_stride_token + h * kv_stride_head) * elem_size;
            const int64_t to = (slot * KVH + h) * D * elem_size;
            memcpy(k_cache + to, key + from, row_bytes);
            memcpy(v_cache + to, value + from, row_bytes);
        }
    }
    return bad;
}
