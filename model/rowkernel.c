/* Matrix products for a few rows, for model/rowkernel.py (compiled there, on first use, for the machine it runs on).

   y[r, o] = act(x[r, :] . w[o, :] + bias[o]) + add[r, o]    for r < n, o < out

   w is [out, in] row-major, so each output is a dot product over one contiguous weight row. Outputs go in blocks of
   four rows of w, split between the threads; a block stays in L1 while every input row uses it, so the weights are
   read from memory once whatever n is. `omp simd reduction` lets the compiler vectorise the dot products (it may
   sum in any order) without -ffast-math, which would change floating point for the whole process. */

#include <math.h>

static inline float gelu_tanh(float v) {
    return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}

/* act: 0 none, 1 tanh GELU (GPT-2's). bias and add may be NULL. */
void hnaas_rows_linear(const float *restrict w, const float *restrict x, const float *restrict bias,
                       const float *restrict add, float *restrict y, long n, long out, long in, int act,
                       int threads) {
    long blocks = (out + 3) / 4;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
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
                if (add) v += add[r * out + o0 + k];
                y[r * out + o0 + k] = v;
            }
        }
    }
}
