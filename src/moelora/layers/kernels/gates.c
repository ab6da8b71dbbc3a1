/* CPU kernels for the small per-token work of the dense MoE-LoRA layer: routing and the gate products.
 *
 * On a CPU each PyTorch kernel over a (T, E) or (T, E*r) tensor costs tens of microseconds whatever its
 * size (dispatch, a parallel region, a pass over memory), and the layer's routing and gate products take
 * about twenty of them per forward and backward pass. These two functions do the same arithmetic in one
 * pass over the tokens each. Single-threaded on purpose: the work is a few hundred thousand flops, less
 * than waking a thread pool costs. Float32; strides are in elements; every (T, ...) array has unit
 * column stride. moelora.layers.kernels builds and loads this file; moelora.layers.dense holds the
 * PyTorch reference. Built with -fno-trapping-math (the selects below vectorise only without FP traps)
 * and -fopenmp-simd (the simd pragmas, no OpenMP runtime).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_EXPERTS 1024 /* moelora.layers.kernels.MAX_EXPERTS: the per-expert arrays on the stack */

#define LANES 16 /* tokens ranked together, one per vector lane */

/* keep[j * LANES + q] = whether expert j is among the top_k largest logits of token q of the block
 * (ties broken towards the lower expert index): expert j is kept when fewer than top_k experts rank
 * above it, else 0. The E x E comparisons run across the block's tokens, so they vectorise. */
static void keep_top_k(const float *lt, int64_t E, int64_t top_k, float *keep) {
    for (int64_t j = 0; j < E; j++) {
        const float *lj = lt + j * LANES;
        int32_t above[LANES] = {0};
        for (int64_t i = 0; i < j; i++) {
            const float *li = lt + i * LANES;
            for (int q = 0; q < LANES; q++) above[q] += li[q] >= lj[q];
        }
        for (int64_t i = j + 1; i < E; i++) {
            const float *li = lt + i * LANES;
            for (int q = 0; q < LANES; q++) above[q] += li[q] > lj[q];
        }
        for (int q = 0; q < LANES; q++) keep[j * LANES + q] = above[q] < top_k ? 1.0f : 0.0f;
    }
}

/* exp(x) for x <= 0 in a form the compiler vectorises (libm's expf is a call per element): x = n ln2 + f
 * with |f| <= ln2 / 2, a degree-7 Taylor-Horner polynomial for exp(f) (relative error below 3e-8 on that
 * range) and 2^n from the exponent bits, in two factors so that results below the normal range come out
 * as the subnormals they are; 0 below exp's float range. */
#pragma omp declare simd
static inline float exp_nonpositive(float x) {
    const float log2e = 1.44269504f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    float xc = x < -104.0f ? -104.0f : x;
    float n = (xc * log2e + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    float f = (xc - n * ln2_hi) - n * ln2_lo;
    float p = 1.0f / 5040.0f;
    p = p * f + 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    int32_t ni = (int32_t)n, n1 = ni / 2, n2 = ni - n1;
    union { int32_t i; float f; } s1 = {(n1 + 127) << 23}, s2 = {(n2 + 127) << 23};
    return x < -104.0f ? 0.0f : p * s1.f * s2.f;
}

/* zr[j * r + c] = hr[j * r + c] * g[j * gs] for each expert j < E and column c < r: a row's expert blocks
 * scaled by their gates. Inlined with r a constant (see BY_RANK), the block loop becomes a few vector
 * instructions per expert, with no per-column copy of the gates. zr may be hr (in place). */
static inline __attribute__((always_inline)) void scale_blocks(int64_t E, int64_t r, const float *hr,
                                                                const float *g, int64_t gs, float *zr) {
    for (int64_t j = 0; j < E; j++) {
        float gj = g[j * gs];
        for (int64_t c = 0; c < r; c++) zr[j * r + c] = hr[j * r + c] * gj;
    }
}

/* Calls BODY(R) with R the compile-time constant r for the common ranks, else with r itself, so that
 * always-inline helpers given R unroll their per-expert loops. */
#define BY_RANK(r, BODY) \
    switch (r) { \
    case 1: BODY(1); break; \
    case 2: BODY(2); break; \
    case 4: BODY(4); break; \
    case 8: BODY(8); break; \
    case 16: BODY(16); break; \
    default: BODY(r); break; \
    }

/* Forward routing and the gated expert projections of T tokens.
 *   logits (T, E) row stride ls; h (T, E*r) row stride hs
 *   gates (T, E): renormalised softmax over each token's kept experts, 0 elsewhere
 *   z (T, E*r) row stride zs = h * gates repeated over each expert's r columns (z may be h: in place)
 *   stats (2E + 1,): [sum_t gates^2 (E) | share of the T * top_k assignments per expert (E) | mean entropy]
 * gates and stats may be NULL (the inference path needs z alone). Returns 0, or -1 when its scratch
 * memory (3 * E * LANES floats) cannot be allocated.
 * Tokens go LANES at a time through (E, LANES) tiles, every loop running across the tile's tokens, so that
 * it vectorises and has no data-dependent branch (which experts a token keeps is unpredictable). The top-1
 * expert is always kept, so the kept maximum is the maximum. A token's entropy is
 * log(sum) - sum_j g_j (l_j - top) over its kept experts: one logarithm per token. The scratch tiles are
 * allocated per call rather than thread-local: a thread-local array in a shared library costs a
 * __tls_get_addr call wherever the compiler cannot keep its address.
 */
int moelora_route_f32(int64_t T, int64_t E, int64_t r, int64_t top_k,
                      const float *logits, int64_t ls, const float *h, int64_t hs,
                      float *gates, float *z, int64_t zs, float *stats) {
    double sq_sum[MAX_EXPERTS] = {0.0};
    int64_t counts[MAX_EXPERTS] = {0};
    float *scratch = malloc(sizeof(float) * 3 * (size_t)(E * LANES));
    if (scratch == NULL) return -1;
    float *lt = scratch, *gt = scratch + E * LANES, *keep = scratch + 2 * E * LANES;
    double ent = 0.0;
    for (int64_t t0 = 0; t0 < T; t0 += LANES) {
        int64_t n = T - t0 < LANES ? T - t0 : LANES;
        float valid[LANES], top[LANES], denom[LANES], spread[LANES];
        for (int q = 0; q < LANES; q++) valid[q] = q < n ? 1.0f : 0.0f;
        for (int64_t q = 0; q < LANES; q++)
            for (int64_t j = 0; j < E; j++) lt[j * LANES + q] = q < n ? logits[(t0 + q) * ls + j] : 0.0f;
        keep_top_k(lt, E, top_k, keep);
        for (int q = 0; q < LANES; q++) top[q] = lt[q], denom[q] = 0.0f, spread[q] = 0.0f;
        for (int64_t j = 1; j < E; j++)
            for (int q = 0; q < LANES; q++) top[q] = lt[j * LANES + q] > top[q] ? lt[j * LANES + q] : top[q];
        for (int64_t j = 0; j < E; j++) {
#pragma omp simd
            for (int q = 0; q < LANES; q++) {
                gt[j * LANES + q] = exp_nonpositive(lt[j * LANES + q] - top[q]) * keep[j * LANES + q];
                denom[q] += gt[j * LANES + q];
            }
        }
        for (int64_t j = 0; j < E; j++) {
            float square = 0.0f, kept = 0.0f;
#pragma omp simd reduction(+ : square, kept)
            for (int q = 0; q < LANES; q++) {
                float g = gt[j * LANES + q] / denom[q] * valid[q];
                float gap = lt[j * LANES + q] - top[q];  /* >= -104 keeps 0 * gap finite for a -inf logit */
                gt[j * LANES + q] = g;
                square += g * g;
                kept += keep[j * LANES + q] * valid[q];
                spread[q] += g * (gap < -104.0f ? -104.0f : gap);
            }
            sq_sum[j] += square;
            counts[j] += (int64_t)kept;
        }
        for (int64_t q = 0; q < n; q++) ent += logf(denom[q]) - spread[q];
        if (gates != NULL)
            for (int64_t q = 0; q < n; q++)
                for (int64_t j = 0; j < E; j++) gates[(t0 + q) * E + j] = gt[j * LANES + q];
#define GATE_ROWS(R) \
        for (int64_t q = 0; q < n; q++) scale_blocks(E, R, h + (t0 + q) * hs, gt + q, LANES, z + (t0 + q) * zs)
        BY_RANK(r, GATE_ROWS)
#undef GATE_ROWS
    }
    free(scratch);
    if (stats == NULL) return 0;
    for (int64_t j = 0; j < E; j++) {
        stats[j] = (float)sq_sum[j];
        stats[E + j] = T > 0 ? (float)counts[j] / (float)(T * top_k) : 0.0f;
    }
    stats[2 * E] = T > 0 ? (float)(ent / (double)T) : 0.0f;
    return 0;
}

/* The layer's record of one forward pass's routing_statistics stats (2E + 1,): sq_sum (E) += stats[:E] and
 * count (1) += tokens when sq_sum is not NULL; load (E) = stats[E:2E] and entropy (1) = stats[2E] when
 * load is not NULL. Four PyTorch operations on small buffers cost tens of microseconds per layer; this
 * is one call. */
void moelora_record_routing_f32(int64_t E, double tokens, const float *stats, float *sq_sum, float *count,
                                float *load, float *entropy) {
    if (sq_sum != NULL) {
        for (int64_t j = 0; j < E; j++) sq_sum[j] += stats[j];
        *count += (float)tokens;
    }
    if (load != NULL) {
        for (int64_t j = 0; j < E; j++) load[j] = stats[E + j];
        *entropy = stats[2 * E];
    }
}

/* One token's backward gate products for r columns per expert (inlined with r a constant by BY_RANK):
 * grad_h = sdz * gp and hgp = h * gp per expert block, dg_j = sum over the block of sdz * h, and the
 * router's gradient gl_j = g_j (dg_j - sum_i g_i dg_i). */
static inline __attribute__((always_inline)) void gate_backward_row(
        int64_t E, int64_t r, const float *g, const float *gp, const float *d, const float *hr,
        float *gh, float *hp, float *gl) {
    float dg[MAX_EXPERTS];
    float inner = 0.0f;
    for (int64_t j = 0; j < E; j++) {
        float acc = 0.0f;
        for (int64_t c = 0; c < r; c++) {
            gh[j * r + c] = d[j * r + c] * gp[j];
            hp[j * r + c] = hr[j * r + c] * gp[j];
            acc += d[j * r + c] * hr[j * r + c];
        }
        dg[j] = acc;
        inner += g[j] * acc;
    }
    for (int64_t j = 0; j < E; j++) gl[j] = g[j] * (dg[j] - inner);
}

/* The gate products of the backward pass, with sdz = s * dL/dout B_cat (T, E*r, contiguous):
 *   gp = gates^power (0 where the gate is 0)
 *   grad_h (T, E*r) row stride ghs = sdz * gp;  hgp (T, E*r) contiguous = h * gp
 *   dgates_te = sum over expert e's r columns of sdz * h
 *   grad_logits (T, E) row stride gls = gates * (dgates - sum_e gates * dgates)
 */
void moelora_gate_backward_f32(int64_t T, int64_t E, int64_t r, double power,
                               const float *sdz, const float *h, int64_t hs, const float *gates,
                               float *grad_h, int64_t ghs, float *hgp, float *grad_logits, int64_t gls) {
    float gp[MAX_EXPERTS];
    int64_t cols = E * r;
    for (int64_t t = 0; t < T; t++) {
        const float *g = gates + t * E;
        /* G^p, 0 where the gate is 0; branch-free per gate (which gates are 0 is unpredictable). */
        if (power == 1.0)
            for (int64_t j = 0; j < E; j++) gp[j] = g[j];
        else if (power == 0.5)
            for (int64_t j = 0; j < E; j++) gp[j] = sqrtf(g[j]);
        else if (power == 0.0)
            for (int64_t j = 0; j < E; j++) gp[j] = g[j] > 0.0f ? 1.0f : 0.0f;
        else
            for (int64_t j = 0; j < E; j++) gp[j] = g[j] > 0.0f ? powf(g[j], (float)power) : 0.0f;
#define GATE_BACKWARD_ROW(R) \
        gate_backward_row(E, R, g, gp, sdz + t * cols, h + t * hs, grad_h + t * ghs, hgp + t * cols, \
                          grad_logits + t * gls)
        BY_RANK(r, GATE_BACKWARD_ROW)
#undef GATE_BACKWARD_ROW
    }
}

/* The inference path's whole adapter for a few tokens (key/value-cache decoding), added into the base
 * output in place:
 *   y_t += s * sum over token t's kept experts i of g_ti * B_i (A_i x_t)
 * for x (T, d_in) row stride xs, w (E + E*r, d_in) contiguous = [router; A_1; ...; A_E], bt (E*r, d_out)
 * contiguous with row block i = B_i^T, y (T, d_out) row stride ys. The routing is the forward kernel's
 * (top-k by counting, lower expert ids kept on ties, the same exponential). Per token it reads the router
 * and only the kept experts' rows of A and B: at top_k < E that is less than the two GEMMs over every
 * expert read, and one call instead of three. For few tokens only: the weights are read once per token.
 */
void moelora_decode_f32(int64_t T, int64_t E, int64_t r, int64_t top_k, int64_t d_in, int64_t d_out,
                        double scaling, const float *x, int64_t xs, const float *w, const float *bt,
                        float *y, int64_t ys) {
    float logits[MAX_EXPERTS], weight[MAX_EXPERTS];
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * xs;
        float *yr = y + t * ys;
        for (int64_t j = 0; j < E; j++) {
            const float *wr = w + j * d_in;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t c = 0; c < d_in; c++) acc += wr[c] * xr[c];
            logits[j] = acc;
        }
        float top = logits[0], denom = 0.0f;
        for (int64_t j = 1; j < E; j++) top = logits[j] > top ? logits[j] : top;
        for (int64_t j = 0; j < E; j++) {
            int64_t above = 0;
            for (int64_t i = 0; i < j; i++) above += logits[i] >= logits[j];
            for (int64_t i = j + 1; i < E; i++) above += logits[i] > logits[j];
            weight[j] = above < top_k ? exp_nonpositive(logits[j] - top) : 0.0f;
            denom += weight[j];
        }
        for (int64_t j = 0; j < E; j++) {
            if (weight[j] == 0.0f) continue;
            float g = weight[j] / denom;
            for (int64_t c = 0; c < r; c++) {
                const float *ar = w + (E + j * r + c) * d_in;
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int64_t k = 0; k < d_in; k++) acc += ar[k] * xr[k];
                float hc = (float)scaling * (acc * g);
                const float *br = bt + (j * r + c) * d_out;
#pragma omp simd
                for (int64_t o = 0; o < d_out; o++) yr[o] += hc * br[o];
            }
        }
    }
}
