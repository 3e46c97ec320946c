/* GPT-2 arithmetic for a few rows (one request, two with guidance), for model/rowkernel.py, which compiles this on
   first use for the machine it runs on.

   Matrices are [out, in] row-major, so each output is a dot product over one contiguous weight row, and the weights
   are read from memory once whatever the row count. The dot products are vectorised by hand (vector extensions) and
   the attention's by `omp simd reduction`, so that summing in any order needs no -ffast-math, which would change
   floating point for the whole process.

   hnaas_decode_blocks runs every transformer block in one parallel region: at one row a block is ~15 small torch
   ops besides its 4 matrices, and on a 2-core VM each op costs 20-30 us, more than the matrices of a small model. */

#include <math.h>

static inline float gelu_tanh(float v) {
    return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}

/* Dot products over 8-float vectors (GCC/Clang vector extensions: AVX where -march=native has it, two SSE or NEON
   halves elsewhere), with four independent accumulators. One accumulator, as `omp simd reduction` gives, waits on
   its own add every iteration (~3-4 cycles): from DRAM that costs 2-10 % of the read rate, and for matrices that sit
   in cache (the default model's) it halves it (measured on Zen 3: docs/performance.md).
   memcpy loads: weight rows and inputs need not be 32-byte aligned. */
typedef float vec8 __attribute__((vector_size(32)));

static inline vec8 load8(const float *p) {
    vec8 v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline float sum8(vec8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

static inline float dot_one(const float *restrict w, const float *restrict x, long in) {
    vec8 a = {0}, b = {0}, c = {0}, d = {0};
    long i = 0;
    for (; i + 32 <= in; i += 32) {
        a += load8(w + i) * load8(x + i);
        b += load8(w + i + 8) * load8(x + i + 8);
        c += load8(w + i + 16) * load8(x + i + 16);
        d += load8(w + i + 24) * load8(x + i + 24);
    }
    float s = sum8((a + b) + (c + d));
    for (; i < in; i++) s += w[i] * x[i];
    return s;
}

/* Two input rows against one weight row, read once: two accumulators per row. */
static inline void dot_pair(const float *restrict w, const float *restrict x0, const float *restrict x1, long in,
                            float *s0, float *s1) {
    vec8 a0 = {0}, b0 = {0}, a1 = {0}, b1 = {0};
    long i = 0;
    for (; i + 16 <= in; i += 16) {
        vec8 w0 = load8(w + i), w1 = load8(w + i + 8);
        a0 += w0 * load8(x0 + i);
        b0 += w1 * load8(x0 + i + 8);
        a1 += w0 * load8(x1 + i);
        b1 += w1 * load8(x1 + i + 8);
    }
    float t0 = sum8(a0 + b0), t1 = sum8(a1 + b1);
    for (; i < in; i++) {
        t0 += w[i] * x0[i];
        t1 += w[i] * x1[i];
    }
    *s0 = t0;
    *s1 = t1;
}

/* y[r, o] = act(x[r, :] . w[o, :] + bias[o]) (+ y[r, o] when accumulate) for r < n, o < out; act 1 = tanh GELU.
   x and y have row strides in and out. Called inside a parallel region: the outputs are shared out with `omp for`.
   One weight row at a time, so each thread streams one contiguous run of memory, which the hardware prefetcher
   follows best: ~30 GB/s on the 2-core AMD machine, against ~20 interleaving four rows (measured, gpt2-124M's
   matrices, one input row). Input rows go two per pass over a weight row. */
static void rows_product(const float *restrict w, const float *restrict x, const float *restrict bias,
                         float *restrict y, long n, long out, long in, int act, int accumulate) {
#pragma omp for schedule(static)
    for (long o = 0; o < out; o++) {
        const float *wo = w + o * in;
        float sums[2];
        for (long r = 0; r < n; r += 2) {
            const float *x0 = x + r * in;
            if (r + 1 < n)
                dot_pair(wo, x0, x0 + in, in, &sums[0], &sums[1]);
            else
                sums[0] = dot_one(wo, x0, in);
            for (long k = 0; k < 2 && r + k < n; k++) {
                float v = sums[k] + (bias ? bias[o] : 0.0f);
                if (act == 1) v = gelu_tanh(v);
                float *dst = y + (r + k) * out + o;
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

/* Attention of one query per row over its cached keys, for (row, head) pair `item` of row r in cache slot r at
   position positions[r]: first cache[r, head, pos] = k, v (from qkv [n, 3d]: q, k, v side by side), then
   a[r, head] = softmax(q K^T * scale) V over positions 0..pos. k_cache, v_cache: one layer's [slots, heads,
   capacity, head_dim]; scores: this pair's `pos + 1` floats. The keys and then the values are read as one contiguous
   run each. */
static inline void attend_pair(long item, const float *restrict qkv, float *restrict k_cache,
                               float *restrict v_cache, const long *restrict positions, long d, long heads,
                               long capacity, float scale, float *restrict a, float *restrict s) {
    long hd = d / heads, r = item / heads, head = item % heads, pos = positions[r];
    const float *q = qkv + r * 3 * d + head * hd;
    float *keys = k_cache + (r * heads + head) * capacity * hd;
    float *values = v_cache + (r * heads + head) * capacity * hd;
    for (long i = 0; i < hd; i++) {
        keys[pos * hd + i] = qkv[r * 3 * d + d + head * hd + i];
        values[pos * hd + i] = qkv[r * 3 * d + 2 * d + head * hd + i];
    }
    float top = -INFINITY, total = 0.0f;
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

/* attend_pair for every (row, head) pair of rows r < n; scores: n * heads * length floats, length > every position.
   Called inside a parallel region. balance: share the pairs out dynamically, for many rows that joined at different
   times and so attend over different lengths; a few rows (the fused blocks) keep the static split, measured 5-9 %
   faster at one row (gpt2-124M and the default model). */
static void attend(const float *restrict qkv, float *restrict k_cache, float *restrict v_cache,
                   const long *restrict positions, long n, long d, long heads, long capacity, float scale,
                   float *restrict a, float *restrict scores, long length, int balance) {
    if (balance) {
#pragma omp for schedule(dynamic, 2)
        for (long item = 0; item < n * heads; item++)
            attend_pair(item, qkv, k_cache, v_cache, positions, d, heads, capacity, scale, a, scores + item * length);
    } else {
#pragma omp for schedule(static)
        for (long item = 0; item < n * heads; item++)
            attend_pair(item, qkv, k_cache, v_cache, positions, d, heads, capacity, scale, a, scores + item * length);
    }
}

static long attention_length(const long *positions, long n) {
    long length = 0;
    for (long r = 0; r < n; r++) length = positions[r] + 1 > length ? positions[r] + 1 : length;
    return length;
}

/* attend() on its own, for any number of rows: the decode steps whose matrices run elsewhere (oneDNN, from 5
   rows). a: [n, d]. */
void hnaas_decode_attention(const float *qkv, float *k_cache, float *v_cache, const long *positions, long n,
                            long d, long heads, long capacity, float scale, float *a, float *scores, int threads) {
    long length = attention_length(positions, n);
#pragma omp parallel num_threads(threads) if (threads > 1)
    attend(qkv, k_cache, v_cache, positions, n, d, heads, capacity, scale, a, scores, length, 1);
}

/* One GPT-2 block (pre-norm, tanh GELU) for rows r < n, row r in cache slot r at position positions[r]:
     h = ln_1(x); q, k, v = h W_attn + b; cache[r, :, pos] = k, v; a = softmax(q K^T * scale) V over positions 0..pos;
     x += a W_proj + b; x += gelu(ln_2(x) W_fc + b) W_mlp + b
   w: the block's 12 tensors in that order (ln_1 weight, bias; W_attn, b; W_proj, b; ln_2 weight, bias; W_fc, b;
   W_mlp, b). x: [n, d], updated in place. k_cache, v_cache: this layer's [slots, heads, capacity, head_dim].
   Called inside a parallel region; every phase ends at its `omp for` barrier, so the next reads what it wrote. */
static void block(float *x, const float *const *w, float *k_cache, float *v_cache, const long *positions, long n,
                  long d, long inner, long heads, long capacity, float scale, float eps, float *scratch,
                  long length) {
    float *h = scratch, *qkv = h + n * d, *a = qkv + n * 3 * d, *f = a + n * d, *scores = f + n * inner;
#pragma omp for schedule(static)
    for (long r = 0; r < n; r++) layer_norm(x + r * d, w[0], w[1], h + r * d, d, eps);
    rows_product(w[2], h, w[3], qkv, n, 3 * d, d, 0, 0);
    attend(qkv, k_cache, v_cache, positions, n, d, heads, capacity, scale, a, scores, length, 0);
    rows_product(w[4], a, w[5], x, n, d, d, 0, 1);
#pragma omp for schedule(static)
    for (long r = 0; r < n; r++) layer_norm(x + r * d, w[6], w[7], h + r * d, d, eps);
    rows_product(w[8], h, w[9], f, n, inner, d, 1, 0);
    rows_product(w[10], f, w[11], x, n, d, inner, 0, 1);
}

/* Every block of the model, in one parallel region: one call and one fork of the threads per decode step instead
   of one per block (each ~10-20 us through ctypes and OpenMP: ~10 % of the default model's one-row step).
   weights: blocks * 12 pointers, block() order. k_cache, v_cache: [blocks, slots, heads, capacity, head_dim], block b
   at b * layer_floats. scales: per block. scratch: at least n * (5 d + inner) + n * heads * (max position + 1)
   floats. */
void hnaas_decode_blocks(float *x, const float *const *weights, long blocks, float *k_cache, float *v_cache,
                         long layer_floats, const long *positions, long n, long d, long inner, long heads,
                         long capacity, const float *scales, float eps, float *scratch, int threads) {
    long length = attention_length(positions, n);
#pragma omp parallel num_threads(threads) if (threads > 1)
    for (long b = 0; b < blocks; b++)
        block(x, weights + 12 * b, k_cache + b * layer_floats, v_cache + b * layer_floats, positions, n, d, inner,
              heads, capacity, scales[b], eps, scratch, length);
}

/* Index of the first cdf entry > uniform * cdf[V - 1] (the last index at most): engine.py's `_draw`, with the same
   float32 rounding (the uniform is rounded to float and kept below 1, then scaled by the total in float). */
static long draw_index(const float *cdf, long V, double uniform) {
    float u = (float)uniform;
    const float below_one = 0.99999994f; /* 1 - FLT_EPSILON / 2 */
    if (u > below_one) u = below_one;
    float value = u * cdf[V - 1];
    long lo = 0, hi = V;
    while (lo < hi) {
        long mid = lo + (hi - lo) / 2;
        if (cdf[mid] > value)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo < V - 1 ? lo : V - 1;
}

/* engine.sample_tokens for a few rows, in one call instead of ~100 small torch ops (~0.3 ms a step, a quarter of the
   default model's one-row step). The same arithmetic: logits * (1 / temperature) in float, exp(x - max), a cumulative
   sum accumulated in double (as torch's CPU cumsum does) and rounded to float; top-p by rejection, a draw from the
   whole softmax kept when the mass of the tokens above it is < top_p times the total (transformers' rule), with
   uniforms[r, 0 .. draws - 2]; top_p >= 1: the draw with uniforms[r, 0]. Rows it leaves get tokens[r] = -1: greedy,
   top-k, every draw rejected (the caller's exact nucleus takes those), or no finite logit. logits: [n, V];
   uniforms: [n, draws]; scratch: 3 V floats. Returns the number of rows left. */
long hnaas_sample(const float *logits, long n, long V, const float *temperature, const long *top_k,
                  const float *top_p, const double *uniforms, long draws, float *scratch, long *tokens) {
    float *s = scratch, *e = s + V, *cdf = e + V;
    long left = 0;
    for (long r = 0; r < n; r++) {
        const float *x = logits + r * V;
        const double *u = uniforms + r * draws;
        float t = temperature[r];
        tokens[r] = -1;
        if (!(t > 0.0f) || top_k[r] > 0 || draws < 1) {
            left++;
            continue;
        }
        float inv = 1.0f / t, top = -INFINITY;
        for (long i = 0; i < V; i++) {
            s[i] = x[i] * inv;
            top = s[i] > top ? s[i] : top;
        }
        if (!(top > -INFINITY) || top == INFINITY) {
            left++;
            continue;
        }
        double sum = 0.0;
        for (long i = 0; i < V; i++) {
            e[i] = expf(s[i] - top);
            sum += e[i];
            cdf[i] = (float)sum;
        }
        if (top_p[r] >= 1.0f) {
            tokens[r] = draw_index(cdf, V, u[0]);
            continue;
        }
        float target = top_p[r] * cdf[V - 1];
        for (long k = 0; k + 1 < draws && tokens[r] < 0; k++) {
            long j = draw_index(cdf, V, u[k]);
            float cut = s[j], above = 0.0f;
#pragma omp simd reduction(+ : above)
            for (long i = 0; i < V; i++) above += s[i] > cut ? e[i] : 0.0f;
            if (above < target) tokens[r] = j;
        }
        left += tokens[r] < 0;
    }
    return left;
}
