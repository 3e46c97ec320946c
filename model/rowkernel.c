/* GPT-2 arithmetic for a few rows (one request, two with guidance), for model/rowkernel.py, which compiles this on
   first use for the machine it runs on.

   Matrices are [out, in] row-major, so each output is a dot product over one contiguous weight row. Outputs go in
   blocks of four weight rows, split between the threads; a block stays in L1 while every input row uses it, so the
   weights are read from memory once whatever the row count. `omp simd reduction` lets the compiler vectorise the dot
   products (summing in any order) without -ffast-math, which would change floating point for the whole process.

   hnaas_decode_layer runs a whole transformer block in one parallel region: at one row a block is ~15 small torch ops
   besides its 4 matrices, and on a 2-core VM each op costs 20-30 us, more than the matrices of a small model. */

#include <math.h>

static inline float gelu_tanh(float v) {
    return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}

/* y[r, o] = act(x[r, :] . w[o, :] + bias[o]) (+ y[r, o] when accumulate) for r < n, o < out; act 1 = tanh GELU.
   x and y have row strides in and out. Called inside a parallel region: the blocks are shared out with `omp for`. */
static void rows_product(const float *restrict w, const float *restrict x, const float *restrict bias,
                         float *restrict y, long n, long out, long in, int act, int accumulate) {
    long blocks = (out + 3) / 4;
#pragma omp for schedule(static)
    for (long b = 0; b < blocks; b++) {
        long o0 = b * 4, m = out - o0 < 4 ? out - o0 : 4;
        for (long r = 0; r < n; r++) {
            const float *xr = x + r * in;
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (m == 4) {
                const float *w0 = w + o0 * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
                float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
                for (long i = 0; i < in; i++) {
                    float xi = xr[i];
                    a0 += w0[i] * xi;
                    a1 += w1[i] * xi;
                    a2 += w2[i] * xi;
                    a3 += w3[i] * xi;
                }
                acc[0] = a0;
                acc[1] = a1;
                acc[2] = a2;
                acc[3] = a3;
            } else {
                for (long k = 0; k < m; k++) {
                    const float *wk = w + (o0 + k) * in;
                    float a = 0.0f;
#pragma omp simd reduction(+ : a)
                    for (long i = 0; i < in; i++) a += wk[i] * xr[i];
                    acc[k] = a;
                }
            }
            for (long k = 0; k < m; k++) {
                float v = acc[k] + (bias ? bias[o0 + k] : 0.0f);
                if (act == 1) v = gelu_tanh(v);
                float *dst = y + r * out + o0 + k;
                *dst = accumulate ? *dst + v : v;
            }
        }
    }
}

/* y[r, o] = act(x[r, :] . w[o, :] + bias[o]) + add[r, o]. bias and add may be NULL; y must not alias x. */
void hnaas_rows_linear(const float *w, const float *x, const float *bias, const float *add, float *y, long n,
                       long out, long in, int act, int threads) {
    if (add)
        for (long i = 0; i < n * out; i++) y[i] = add[i];
#pragma omp parallel num_threads(threads) if (threads > 1)
    rows_product(w, x, bias, y, n, out, in, act, add != 0);
}

static void layer_norm(const float *restrict x, const float *restrict weight, const float *restrict bias,
                       float *restrict y, long d, float eps) {
    float mean = 0.0f, var = 0.0f;
    for (long i = 0; i < d; i++) mean += x[i];
    mean /= (float)d;
    for (long i = 0; i < d; i++) var += (x[i] - mean) * (x[i] - mean);
    float inv = 1.0f / sqrtf(var / (float)d + eps);
    for (long i = 0; i < d; i++) y[i] = (x[i] - mean) * inv * weight[i] + bias[i];
}

/* One GPT-2 block (pre-norm, tanh GELU) for rows r < n, row r in cache slot r at position positions[r]:
     h = ln_1(x); q, k, v = h W_attn + b; cache[r, :, pos] = k, v; a = softmax(q K^T * scale) V over positions 0..pos;
     x += a W_proj + b; x += gelu(ln_2(x) W_fc + b) W_mlp + b
   x: [n, d], updated in place. k_cache, v_cache: this layer's [slots, heads, capacity, head_dim]. scratch: at least
   n * (5 d + inner) + n * heads * (max position + 1) floats. */
void hnaas_decode_layer(float *x, const float *ln1_w, const float *ln1_b, const float *attn_w, const float *attn_b,
                        const float *proj_w, const float *proj_b, const float *ln2_w, const float *ln2_b,
                        const float *fc_w, const float *fc_b, const float *mlp_w, const float *mlp_b,
                        float *k_cache, float *v_cache, const long *positions, long n, long d, long inner,
                        long heads, long capacity, float scale, float eps, float *scratch, int threads) {
    long hd = d / heads, length = 0;
    for (long r = 0; r < n; r++) length = positions[r] + 1 > length ? positions[r] + 1 : length;
    float *h = scratch, *qkv = h + n * d, *a = qkv + n * 3 * d, *f = a + n * d, *scores = f + n * inner;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static)
        for (long r = 0; r < n; r++) layer_norm(x + r * d, ln1_w, ln1_b, h + r * d, d, eps);
        rows_product(attn_w, h, attn_b, qkv, n, 3 * d, d, 0, 0);
#pragma omp for schedule(static)
        for (long item = 0; item < n * heads; item++) {
            long r = item / heads, head = item % heads, pos = positions[r];
            const float *q = qkv + r * 3 * d + head * hd;
            float *keys = k_cache + (r * heads + head) * capacity * hd;
            float *values = v_cache + (r * heads + head) * capacity * hd;
            for (long i = 0; i < hd; i++) {
                keys[pos * hd + i] = qkv[r * 3 * d + d + head * hd + i];
                values[pos * hd + i] = qkv[r * 3 * d + 2 * d + head * hd + i];
            }
            float *s = scores + item * length, top = -INFINITY, total = 0.0f;
            for (long t = 0; t <= pos; t++) {
                const float *kt = keys + t * hd;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (long i = 0; i < hd; i++) dot += q[i] * kt[i];
                s[t] = dot * scale;
                top = s[t] > top ? s[t] : top;
            }
            for (long t = 0; t <= pos; t++) {
                s[t] = expf(s[t] - top);
                total += s[t];
            }
            float *out = a + r * d + head * hd;
            for (long i = 0; i < hd; i++) out[i] = 0.0f;
            for (long t = 0; t <= pos; t++) {
                const float *vt = values + t * hd;
                float p = s[t] / total;
#pragma omp simd
                for (long i = 0; i < hd; i++) out[i] += p * vt[i];
            }
        }
        rows_product(proj_w, a, proj_b, x, n, d, d, 0, 1);
#pragma omp for schedule(static)
        for (long r = 0; r < n; r++) layer_norm(x + r * d, ln2_w, ln2_b, h + r * d, d, eps);
        rows_product(fc_w, h, fc_b, f, n, inner, d, 1, 0);
        rows_product(mlp_w, f, mlp_b, x, n, d, inner, 0, 1);
    }
}
