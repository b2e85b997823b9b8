/* Fused logit GEMM + softmax kernels for datagen.capture.correspondence (float32, CPU).
 *
 * The torch path computes a block of logits with one batched GEMM (written to memory), then
 * reads it back several times (softmax, head sum, maxima). Here a small group of query rows is
 * multiplied with one head's keys by a register-blocked GEMM (6 rows x 16 keys per tile, GNU C
 * vector types, so the compiler emits FMA code for the CPU it builds on) into a buffer that
 * stays in cache; the GEMM's epilogue keeps each row's maximum, and the softmax, the head sums
 * and the maxima are taken from the buffer right away. Each logit is computed, exponentiated
 * and used while it is in cache; whole blocks of logits never travel to memory.
 *
 * Units: keys are pre-scaled by softmax_scale * log2(e), so logits are in base 2 and
 * exp(scale * q.k - m) = 2^(s - m2). The exponential is a degree-5 polynomial for 2^r on
 * [-1/2, 1/2] (max relative error 1.8e-7, float rounding) times 2^n built in the exponent
 * bits; arguments below -126 give exactly 0 (float underflow). Argmax ties go to the first
 * index, as torch.argmax does. Denormals are flushed inside the calls (MXCSR restored on exit).
 *
 * Keys are packed in panels of 16: kp[h][p][c][i] = key (16 p + i) of head h, channel c, zero
 * beyond the last key (dg_pack_keys). Inputs may be float32, float16 or bfloat16 (dtype codes
 * 0, 1, 2), converted here. Callers split the work across threads (rows in both directions);
 * each thread passes its own work buffer. Built at first use by datagen/capture/fused.py
 * (cc -O3 -march=native -fopenmp-simd -fno-math-errno -fno-trapping-math); no Python or torch
 * headers.
 */
#include <math.h>
#include <stdint.h>

#if defined(__SSE__)
#include <xmmintrin.h>
#define DG_FTZ_ON()                                                                       \
    unsigned int dg_csr = _mm_getcsr();                                                   \
    _mm_setcsr(dg_csr | 0x8040u) /* FTZ | DAZ */
#define DG_FTZ_OFF() _mm_setcsr(dg_csr)
#else
#define DG_FTZ_ON() (void)0
#define DG_FTZ_OFF() (void)0
#endif

typedef union {
    int32_t i;
    uint32_t u;
    float f;
} dg_bits;

/* 2^x for x <= 0 (see the header). */
static inline float dg_exp2(float x) {
    const float lo = -126.0f;
    const float xc = x < lo ? lo : x;
    const float n = floorf(xc + 0.5f);
    const float r = xc - n;
    float p = 1.3218674575909972e-3f;
    p = p * r + 9.671702980995178e-3f;
    p = p * r + 5.550893023610115e-2f;
    p = p * r + 2.4022237956523895e-1f;
    p = p * r + 6.931468844413757e-1f;
    p = p * r + 1.0f;
    dg_bits scale;
    scale.i = ((int32_t)n + 127) << 23;
    return x < lo ? 0.0f : p * scale.f;
}

/* out[i] = 2^x[i] for x[i] <= 0 (the kernels' exponential, exported for tests). */
void dg_exp2_n(const float *x, int64_t n, float *out) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) out[i] = dg_exp2(x[i]);
}

/* One input element as float: dtype 0 float32, 1 float16, 2 bfloat16. */
static inline float dg_load(const void *src, int64_t i, int dtype) {
    dg_bits b;
    if (dtype == 0) return ((const float *)src)[i];
    const uint32_t h = ((const uint16_t *)src)[i];
    if (dtype == 2) {
        b.u = h << 16;
        return b.f;
    }
    const uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) { /* zero or subnormal: m * 2^-24 */
        b.f = (float)m * 5.9604644775390625e-8f;
        b.u |= sign;
    } else if (e == 31) { /* inf / nan */
        b.u = sign | 0x7f800000u | (m << 13);
    } else {
        b.u = sign | ((e + 112) << 23) | (m << 13);
    }
    return b.f;
}

/* Keys of heads [h0, h1) as panels: rows 0..La-1 of a[h] (La x d), then Lb rows of b[h],
 * zero up to Wp (a multiple of 16); each value times scale. out: (H, Wp/16, d, 16). */
void dg_pack_keys(const void *a, int64_t La, const void *b, int64_t Lb, int dtype, int64_t d,
                  float scale, int64_t Wp, int64_t h0, int64_t h1, float *out) {
    for (int64_t h = h0; h < h1; h++) {
        float *o = out + h * Wp * d;
        for (int64_t w = 0; w < Wp; w++) {
            float *dst = o + (w / 16) * d * 16 + (w % 16);
            if (w < La) {
                for (int64_t c = 0; c < d; c++) dst[16 * c] = scale * dg_load(a, (h * La + w) * d + c, dtype);
            } else if (w < La + Lb) {
                const int64_t base = (h * Lb + w - La) * d;
                for (int64_t c = 0; c < d; c++) dst[16 * c] = scale * dg_load(b, base + c, dtype);
            } else {
                for (int64_t c = 0; c < d; c++) dst[16 * c] = 0.0f;
            }
        }
    }
}

typedef float dg_v8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t dg_i8 __attribute__((vector_size(32), aligned(4)));
#define DG_MR 6 /* rows per GEMM tile: 12 accumulators of 8 floats */

static inline dg_v8 dg_vmax(dg_v8 a, dg_v8 b) {
    const dg_i8 gt = a > b; /* all ones where a > b */
    return (dg_v8)((gt & (dg_i8)a) | (~gt & (dg_i8)b));
}

/* S[G][Wp] = Q[G][d] . keys (packed panels kp[Wp/16][d][16]); rowmax[i] = max over the first
 * `valid` columns of row i. Panels outer, row tiles inner: a 4 KB panel stays in L1 while
 * every row tile uses it, and Q (G x d) stays in L1 throughout. vmax: G vectors of scratch. */
static void dg_gemm(const float *Q, int64_t G, int64_t d, const float *kp, int64_t Wp,
                    int64_t valid, float *S, float *rowmax, dg_v8 *vmax) {
    const int64_t full = valid / 16; /* panels entirely within the valid columns */
    for (int64_t i = 0; i < G; i++) vmax[i] = (dg_v8){0} - INFINITY;
    for (int64_t p = 0; p < Wp / 16; p++) {
        const float *b = kp + p * d * 16;
        for (int64_t r = 0; r < G; r += DG_MR) {
            const int64_t rows = G - r < DG_MR ? G - r : DG_MR;
            const float *q = Q + r * d;
            dg_v8 acc[DG_MR][2];
            if (rows == DG_MR) {
                for (int i = 0; i < DG_MR; i++) acc[i][0] = acc[i][1] = (dg_v8){0};
                for (int64_t c = 0; c < d; c++) {
                    const dg_v8 b0 = *(const dg_v8 *)(b + 16 * c);
                    const dg_v8 b1 = *(const dg_v8 *)(b + 16 * c + 8);
                    for (int i = 0; i < DG_MR; i++) {
                        const float x = q[i * d + c];
                        acc[i][0] += x * b0;
                        acc[i][1] += x * b1;
                    }
                }
            } else {
                for (int i = 0; i < rows; i++) {
                    acc[i][0] = acc[i][1] = (dg_v8){0};
                    for (int64_t c = 0; c < d; c++) {
                        acc[i][0] += q[i * d + c] * *(const dg_v8 *)(b + 16 * c);
                        acc[i][1] += q[i * d + c] * *(const dg_v8 *)(b + 16 * c + 8);
                    }
                }
            }
            for (int i = 0; i < rows; i++) {
                float *out = S + (r + i) * Wp + 16 * p;
                dg_v8 *vm = vmax + r + i;
                *(dg_v8 *)out = acc[i][0];
                *(dg_v8 *)(out + 8) = acc[i][1];
                if (p < full) {
                    *vm = dg_vmax(*vm, dg_vmax(acc[i][0], acc[i][1]));
                } else {
                    for (int64_t j = 16 * p; j < valid && j < 16 * p + 16; j++)
                        (*vm)[0] = out[j - 16 * p] > (*vm)[0] ? out[j - 16 * p] : (*vm)[0];
                }
            }
        }
    }
    for (int64_t i = 0; i < G; i++) {
        float m = vmax[i][0];
        for (int l = 1; l < 8; l++) m = vmax[i][l] > m ? vmax[i][l] : m;
        rowmax[i] = m;
    }
}

/* Query rows [g0, g0 + g) of head h (input layout (H, N, d)) as float32 Q[g][d]. */
static void dg_rows(const void *q, int dtype, int64_t N, int64_t d, int64_t h, int64_t g0,
                    int64_t g, float *Q) {
    const int64_t base = (h * N + g0) * d;
    for (int64_t i = 0; i < g * d; i++) Q[i] = dg_load(q, base + i, dtype);
}

/* e[j] = 2^(x[j] - m) (in place allowed); returns the sum. */
static inline float dg_exp_sum(float *x, float m, int64_t n) {
    float z = 0.0f;
#pragma omp simd reduction(+ : z)
    for (int64_t j = 0; j < n; j++) {
        const float v = dg_exp2(x[j] - m);
        x[j] = v;
        z += v;
    }
    return z;
}

static inline float dg_max(const float *x, int64_t n) {
    float m = x[0];
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; j++) m = x[j] > m ? x[j] : m;
    return m;
}

/* First index of the maximum (torch.argmax semantics for finite inputs). */
static inline int64_t dg_argmax(const float *x, int64_t n) {
    const float m = dg_max(x, n);
    int64_t j = 0;
    while (j < n - 1 && x[j] != m) j++;
    return j;
}

/* Reverse matching. q: (H, N, d) query rows (dtype code), kp: (H, Tp/16, d, 16) frame 0's
 * packed keys. For each row r in [r0, r1): out[r] = argmax_j sum_h softmax_j(q[h, r] . k[h, j]),
 * j over the T keys. Rows go in groups of G through every head (the group's logits and head
 * sums stay in cache); work: G * (Tp + T + d + 9) floats. */
void dg_reverse(const void *q, int dtype, const float *kp, int64_t H, int64_t N, int64_t d,
                int64_t T, int64_t Tp, int64_t r0, int64_t r1, int64_t G, float *work,
                int64_t *out) {
    DG_FTZ_ON();
    float *S = work, *acc = S + G * Tp, *Q = acc + G * T, *mx = Q + G * d;
    dg_v8 *vmax = (dg_v8 *)(mx + G);
    for (int64_t g0 = r0; g0 < r1; g0 += G) {
        const int64_t g = r1 - g0 < G ? r1 - g0 : G;
        for (int64_t h = 0; h < H; h++) {
            dg_rows(q, dtype, N, d, h, g0, g, Q);
            dg_gemm(Q, g, d, kp + h * Tp * d, Tp, T, S, mx, vmax);
            for (int64_t i = 0; i < g; i++) {
                float *row = S + i * Tp, *a = acc + i * T;
                const float w = 1.0f / dg_exp_sum(row, mx[i], T);
                if (h == 0) {
#pragma omp simd
                    for (int64_t j = 0; j < T; j++) a[j] = row[j] * w;
                } else {
#pragma omp simd
                    for (int64_t j = 0; j < T; j++) a[j] += row[j] * w;
                }
            }
        }
        for (int64_t i = 0; i < g; i++) out[g0 + i] = dg_argmax(acc + i * T, T);
    }
    DG_FTZ_OFF();
}

/* Logits of one row against keys [w0, w0 + n) of a packed key set (rare path). */
static void dg_dot_keys(const float *Qrow, const float *kp, int64_t d, int64_t w0, int64_t n,
                        float *out) {
    for (int64_t j = 0; j < n; j++) {
        const int64_t w = w0 + j;
        const float *b = kp + (w / 16) * d * 16 + (w % 16);
        float s = 0.0f;
        for (int64_t c = 0; c < d; c++) s += Qrow[c] * b[16 * c];
        out[j] = s;
    }
}

/* Forward matching and full-sequence attention, rows [r0, r1). q: (H, N, d) query rows (dtype
 * code); kp: (H, Wp/16, d, 16) packed keys, L text keys then F frames of T video keys. Adds,
 * for each row r and each head, the frame-pair softmax P (over frame f's keys) to
 * pair[r, f, :], the full-sequence softmax A (over all L + F*T keys) to full[r, f, :], and A's
 * mass on the text and on each frame to mass[r, 0] and mass[r, 1 + f] (all zero on entry); the
 * caller divides by H. Rows go in groups of G through every head (the group's sums stay in
 * cache; the keys are read once per group); work: G * (Wp + d + 9) + 2 * F floats.
 *
 * One exponential per logit, relative to the row's maximum over all keys. A frame whose logits
 * all lie far below that maximum (its sum of exponentials under T * 2^-100, i.e. its largest
 * logit more than ~100 below: never seen in real attention, but possible) is recomputed
 * relative to its own maximum, so P keeps full float precision there too. */
void dg_forward(const void *q, int dtype, const float *kp, int64_t H, int64_t N, int64_t d,
                int64_t L, int64_t F, int64_t T, int64_t Wp, int64_t r0, int64_t r1, int64_t G,
                float *work, float *pair, float *full, float *mass) {
    DG_FTZ_ON();
    float *S = work, *Q = S + G * Wp, *mx = Q + G * d, *mseg = mx + G, *zseg = mseg + F;
    dg_v8 *vmax = (dg_v8 *)(zseg + F);
    const float tiny = (float)T * 0x1p-100f;
    for (int64_t g0 = r0; g0 < r1; g0 += G) {
        const int64_t g = r1 - g0 < G ? r1 - g0 : G;
        for (int64_t h = 0; h < H; h++) {
            const float *kph = kp + h * Wp * d;
            dg_rows(q, dtype, N, d, h, g0, g, Q);
            dg_gemm(Q, g, d, kph, Wp, L + F * T, S, mx, vmax);
            for (int64_t i = 0; i < g; i++) {
                const int64_t r = g0 + i;
                float *row = S + i * Wp;
                const float M = mx[i];
                const double zt = L > 0 ? dg_exp_sum(row, M, L) : 0.0;
                double zall = zt;
                for (int64_t f = 0; f < F; f++) {
                    float *seg = row + L + f * T;
                    mseg[f] = M;
                    zseg[f] = dg_exp_sum(seg, M, T);
                    if (zseg[f] < tiny) { /* rare: redo this frame relative to its own max */
                        dg_dot_keys(Q + i * d, kph, d, L + f * T, T, seg);
                        mseg[f] = dg_max(seg, T);
                        zseg[f] = dg_exp_sum(seg, mseg[f], T);
                    }
                    zall += (double)zseg[f] * exp2((double)mseg[f] - M);
                }
                float *ms = mass + r * (F + 1);
                ms[0] += (float)(zt / zall);
                for (int64_t f = 0; f < F; f++) {
                    const double share = exp2((double)mseg[f] - M) / zall;
                    const float wp = 1.0f / zseg[f], wf = (float)share;
                    const float *seg = row + L + f * T;
                    float *pa = pair + (r * F + f) * T, *fu = full + (r * F + f) * T;
                    ms[1 + f] += (float)(share * zseg[f]);
#pragma omp simd
                    for (int64_t j = 0; j < T; j++) {
                        pa[j] += seg[j] * wp;
                        fu[j] += seg[j] * wf;
                    }
                }
            }
        }
    }
    DG_FTZ_OFF();
}
