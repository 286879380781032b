/* Fused elementwise ops of a GLM layer for the CPU (float32 and bfloat16), called through ctypes from
 * glmserve/kernels/cpu_ops.py. Each replaces a chain of small torch ops whose per-op dispatch and thread start-up
 * cost more than the arithmetic at decode batch sizes. Compiled with -ffp-contract=off, so the rotary and the
 * per-element parts of the norm round exactly as torch's separate multiplies and adds do. The bfloat16 versions
 * compute in float32 and round to bfloat16 wherever torch's bf16 ops would (after the residual add, after silu,
 * after the product, at each output).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "vec_math.h"

static inline void rms_norm_row(const float *x, const float *weight, float *out, int64_t dim, float eps) {
    const float inv_rms = 1.0f / sqrtf(dot(x, x, dim) / (float)dim + eps);
    for (int64_t i = 0; i < dim; i++) out[i] = weight[i] * (x[i] * inv_rms);
}

/* ChatGLM's RMSNorm: out[r] = weight * (x[r] / sqrt(mean(x[r]^2) + eps)). x: [rows, dim] (rows x_stride apart);
 * out: [rows, dim] contiguous. With `residual_in` set, x is first updated in place: x[r] += residual_in[r]
 * (the block's residual connection; residual_in contiguous). */
void glmserve_rms_norm_f32(float *x, int64_t x_stride, const float *residual_in, const float *weight, float *out,
                           int64_t rows, int64_t dim, float eps, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * dim >= 16384)
    for (int64_t r = 0; r < rows; r++) {
        float *xr = x + r * x_stride;
        if (residual_in != NULL)
            for (int64_t i = 0; i < dim; i++) xr[i] += residual_in[r * dim + i];
        rms_norm_row(xr, weight, out + r * dim, dim, eps);
    }
}

/* GPT-J style rotary on the first `rot` features of each head, in place: pairs (x[2i], x[2i+1]) turn by the angle
 * whose cos and sin are cos[t, i], sin[t, i] ([T, rot/2] contiguous). x: [T, heads, >= rot], token t's head h at
 * x + t * token_stride + h * head_stride. */
void glmserve_rotary_f32(float *x, int64_t tokens, int64_t heads, int64_t token_stride, int64_t head_stride,
                         int64_t rot, const float *cos, const float *sin, int num_threads) {
    const int64_t half = rot / 2;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (tokens * heads * rot >= 16384)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos + t * half, *s = sin + t * half;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + t * token_stride + h * head_stride;
            for (int64_t i = 0; i < half; i++) {
                const float x0 = v[2 * i], x1 = v[2 * i + 1];
                v[2 * i] = x0 * c[i] - x1 * s[i];
                v[2 * i + 1] = x1 * c[i] + x0 * s[i];
            }
        }
    }
}

/* silu(g) = g / (1 + exp(-g)), in float32: one scalar and one 8-wide form, shared by both dtypes' SwiGLU. */
static inline float silu(float g) { return g / (1.0f + expf(-g)); }

#ifdef GLMSERVE_AVX2
static inline __m256 silu8(__m256 g) {
    return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g))));
}
#endif

/* SwiGLU: out[r, i] = silu(gate_up[r, i]) * gate_up[r, ffn + i], silu(g) = g / (1 + exp(-g)).
 * gate_up: [rows, 2 * ffn] contiguous (gate first, as ChatGLM's dense_h_to_4h); out: [rows, ffn] contiguous. */
void glmserve_silu_mul_f32(const float *gate_up, float *out, int64_t rows, int64_t ffn, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * ffn >= 16384)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * 2 * ffn, *u = g + ffn;
        float *o = out + r * ffn;
        int64_t i = 0;
#ifdef GLMSERVE_AVX2
        for (; i + 8 <= ffn; i += 8)
            _mm256_storeu_ps(o + i, _mm256_mul_ps(silu8(_mm256_loadu_ps(g + i)), _mm256_loadu_ps(u + i)));
#endif
        for (; i < ffn; i++) o[i] = silu(g[i]) * u[i];
    }
}

/* ---- bfloat16 (uint16 bit patterns; weights, activations and outputs bf16, cos/sin float32) ----------------- */

/* As glmserve_rms_norm_f32: x[r] = bf16(x[r] + residual_in[r]) in place, then out = bf16(weight * (x * inv_rms))
 * with the statistics in float32. */
void glmserve_rms_norm_bf16(uint16_t *x, int64_t x_stride, const uint16_t *residual_in, const uint16_t *weight,
                            uint16_t *out, int64_t rows, int64_t dim, float eps, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * dim >= 16384)
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *xr = x + r * x_stride;
        float sum_sq[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t i = 0; i < dim; i++) {
            float v = bf16_to_f32(xr[i]);
            if (residual_in != NULL) {
                xr[i] = f32_to_bf16(v + bf16_to_f32(residual_in[r * dim + i]));
                v = bf16_to_f32(xr[i]);
            }
            sum_sq[i & 7] += v * v;
        }
        const float total = ((sum_sq[0] + sum_sq[4]) + (sum_sq[1] + sum_sq[5])) +
                            ((sum_sq[2] + sum_sq[6]) + (sum_sq[3] + sum_sq[7]));
        const float inv_rms = 1.0f / sqrtf(total / (float)dim + eps);
        uint16_t *o = out + r * dim;
        for (int64_t i = 0; i < dim; i++) o[i] = f32_to_bf16(bf16_to_f32(weight[i]) * (bf16_to_f32(xr[i]) * inv_rms));
    }
}

/* As glmserve_rotary_f32 on bfloat16 x, rounding each rotated feature back to bf16. */
void glmserve_rotary_bf16(uint16_t *x, int64_t tokens, int64_t heads, int64_t token_stride, int64_t head_stride,
                          int64_t rot, const float *cos, const float *sin, int num_threads) {
    const int64_t half = rot / 2;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (tokens * heads * rot >= 16384)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos + t * half, *s = sin + t * half;
        for (int64_t h = 0; h < heads; h++) {
            uint16_t *v = x + t * token_stride + h * head_stride;
            for (int64_t i = 0; i < half; i++) {
                const float x0 = bf16_to_f32(v[2 * i]), x1 = bf16_to_f32(v[2 * i + 1]);
                v[2 * i] = f32_to_bf16(x0 * c[i] - x1 * s[i]);
                v[2 * i + 1] = f32_to_bf16(x1 * c[i] + x0 * s[i]);
            }
        }
    }
}

/* As glmserve_silu_mul_f32 on bfloat16: out = bf16(bf16(silu(g)) * u), as torch's bf16 silu and multiply. */
void glmserve_silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t ffn, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * ffn >= 16384)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *g = gate_up + r * 2 * ffn, *u = g + ffn;
        uint16_t *o = out + r * ffn;
        int64_t i = 0;
#ifdef GLMSERVE_AVX2
        for (; i + 8 <= ffn; i += 8) {
            uint16_t rounded[8];      /* silu's output rounded to bf16 first, as torch's bf16 silu returns it */
            store8_bf16(rounded, silu8(load8_bf16(g + i)));
            store8_bf16(o + i, _mm256_mul_ps(load8_bf16(rounded), load8_bf16(u + i)));
        }
#endif
        for (; i < ffn; i++)
            o[i] = f32_to_bf16(bf16_to_f32(f32_to_bf16(silu(bf16_to_f32(g[i])))) * bf16_to_f32(u[i]));
    }
}
