/* CPU kernels for the optimizers' per-expert r x r products: Gram matrices of the stacked factors and the
 * preconditioners applied to the gradients, E experts at a time.
 *
 * torch.bmm runs these (E, r, d) x (E, d, r) and (E, r, r) x (E, r, d) products, whose inner or outer
 * dimension is r (4 by default), through a thread pool: on a 2-core CPU waking it costs more than the
 * arithmetic. These single-threaded loops vectorise along d. Float32, contiguous arrays;
 * moelora.optim.precondition holds the torch.bmm reference. The r x r inverses likewise: one pass over
 * every system of a step, where torch's batched Cholesky makes one LAPACK call per system.
 */
#include <math.h>
#include <stdint.h>

/* out[e] = A_e A_e^T for A (E, r, d): (E, r, r). */
void moelora_gram_rows_f32(int64_t E, int64_t r, int64_t d, const float *A, float *out) {
    for (int64_t e = 0; e < E; e++) {
        const float *a = A + e * r * d;
        float *o = out + e * r * r;
        for (int64_t i = 0; i < r; i++)
            for (int64_t j = 0; j <= i; j++) {
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int64_t c = 0; c < d; c++) acc += a[i * d + c] * a[j * d + c];
                o[i * r + j] = acc;
                o[j * r + i] = acc;
            }
    }
}

/* out[e] = B_e^T B_e for B (E, d, r): (E, r, r), accumulated row by row in r x r partial sums. Inlined
 * with a constant r for the usual ranks, so that the sums stay in registers. */
static inline void gram_cols(int64_t E, int64_t d, const int64_t r, const float *B, float *out) {
    for (int64_t e = 0; e < E; e++) {
        const float *b = B + e * d * r;
        float acc[256] = {0.0f};
        for (int64_t row = 0; row < d; row++) {
            const float *v = b + row * r;
            for (int64_t i = 0; i < r; i++)
                for (int64_t j = 0; j < r; j++) acc[i * r + j] += v[i] * v[j];
        }
        for (int64_t q = 0; q < r * r; q++) out[e * r * r + q] = acc[q];
    }
}

/* The same for r = 4, 16 rows at a time: the block's four columns are copied into four vectors, and
 * G[i, j] (i >= j) accumulates their lane-wise products, summed over the lanes at the end; the
 * row-by-row loop above runs on scalars. */
static void gram_cols_4(int64_t E, int64_t d, const float *B, float *out) {
    for (int64_t e = 0; e < E; e++) {
        const float *b = B + e * d * 4;
        float acc[10][16] = {{0.0f}};
        int64_t row = 0;
        for (; row + 16 <= d; row += 16) {
            float col[4][16];
            for (int s = 0; s < 16; s++)
                for (int i = 0; i < 4; i++) col[i][s] = b[(row + s) * 4 + i];
            int pair = 0;
            for (int i = 0; i < 4; i++)
                for (int j = 0; j <= i; j++, pair++) {
#pragma omp simd
                    for (int s = 0; s < 16; s++) acc[pair][s] += col[i][s] * col[j][s];
                }
        }
        float *o = out + e * 16;
        int pair = 0;
        for (int i = 0; i < 4; i++)
            for (int j = 0; j <= i; j++, pair++) {
                float sum = 0.0f;
                for (int s = 0; s < 16; s++) sum += acc[pair][s];
                for (int64_t tail = row; tail < d; tail++) sum += b[tail * 4 + i] * b[tail * 4 + j];
                o[i * 4 + j] = sum;
                o[j * 4 + i] = sum;
            }
    }
}

void moelora_gram_cols_f32(int64_t E, int64_t d, int64_t r, const float *B, float *out) {
    switch (r) {
    case 1: gram_cols(E, d, 1, B, out); break;
    case 2: gram_cols(E, d, 2, B, out); break;
    case 4: gram_cols_4(E, d, B, out); break;
    case 8: gram_cols(E, d, 8, B, out); break;
    default: gram_cols(E, d, r, B, out);
    }
}

/* out[e] = P_e G_e for P (E, r, r) and G (E, r, d): (E, r, d). */
void moelora_left_mul_f32(int64_t E, int64_t r, int64_t d, const float *P, const float *G, float *out) {
    for (int64_t e = 0; e < E; e++) {
        const float *p = P + e * r * r, *g = G + e * r * d;
        float *o = out + e * r * d;
        for (int64_t i = 0; i < r; i++) {
            float *orow = o + i * d;
#pragma omp simd
            for (int64_t c = 0; c < d; c++) orow[c] = p[i * r] * g[c];
            for (int64_t k = 1; k < r; k++) {
                const float *grow = g + k * d;
                float w = p[i * r + k];
#pragma omp simd
                for (int64_t c = 0; c < d; c++) orow[c] += w * grow[c];
            }
        }
    }
}

/* out[e] = G_e P_e for G (E, d, r) and P (E, r, r): (E, d, r); inlined with a constant r as above. */
static inline void right_mul(int64_t E, int64_t d, const int64_t r, const float *G, const float *P, float *out) {
    for (int64_t e = 0; e < E; e++) {
        const float *p = P + e * r * r, *g = G + e * d * r;
        float *o = out + e * d * r;
        for (int64_t row = 0; row < d; row++) {
            const float *v = g + row * r;
            float *orow = o + row * r;
            for (int64_t j = 0; j < r; j++) {
                float acc = 0.0f;
                for (int64_t k = 0; k < r; k++) acc += v[k] * p[k * r + j];
                orow[j] = acc;
            }
        }
    }
}

void moelora_right_mul_f32(int64_t E, int64_t d, int64_t r, const float *G, const float *P, float *out) {
    switch (r) {
    case 1: right_mul(E, d, 1, G, P, out); break;
    case 2: right_mul(E, d, 2, G, P, out); break;
    case 4: right_mul(E, d, 4, G, P, out); break;
    case 8: right_mul(E, d, 8, G, P, out); break;
    default: right_mul(E, d, r, G, P, out);
    }
}

/* The Gram matrices of n layers' partner factors into one (N, r, r) array, N = sum_i E_i, in order: for
 * an A-factor (side[i] == 0) its layer's B (E_i, width_i, r) gives B_e^T B_e, for a B-factor
 * (side[i] == 1) its layer's A (E_i, r, width_i) gives A_e A_e^T. */
void moelora_grams_f32(int64_t n, const int64_t *side, const int64_t *experts, const int64_t *width, int64_t r,
                       const float *const *partners, float *out) {
    for (int64_t i = 0; i < n; i++) {
        if (side[i] == 0)
            moelora_gram_cols_f32(experts[i], width[i], r, partners[i], out);
        else
            moelora_gram_rows_f32(experts[i], r, width[i], partners[i], out);
        out += experts[i] * r * r;
    }
}

/* Inverses of n symmetric positive definite (r, r) systems through their Cholesky factors, as
 * torch.linalg.cholesky_ex followed by torch.cholesky_inverse compute them in float32 (LAPACK's potrf
 * and potri, one small call per system, where this is one pass for all):
 *   S = L L^T (L lower; only S's lower triangle is read), S^-1 = L^-T L^-1.
 * status[s] = 0, or 1 where the factorisation fails (a pivot that is not positive, or NaN, as potrf's
 * info > 0), or 2 where it succeeds but the inverse is not finite; out[s] is zero unless status[s] == 0. */
void moelora_damped_inverse_f32(int64_t n, int64_t r, const float *systems, float *out, int8_t *status) {
    float L[256], M[256]; /* r <= 16: the factor, then its inverse (both lower triangular) */
    for (int64_t s = 0; s < n; s++) {
        const float *S = systems + s * r * r;
        float *o = out + s * r * r;
        int8_t code = 0;
        for (int64_t j = 0; j < r && !code; j++) {
            float diagonal = S[j * r + j];
            for (int64_t k = 0; k < j; k++) diagonal -= L[j * r + k] * L[j * r + k];
            if (!(diagonal > 0.0f)) { /* also NaN */
                code = 1;
                break;
            }
            const float pivot = sqrtf(diagonal);
            L[j * r + j] = pivot;
            for (int64_t i = j + 1; i < r; i++) {
                float value = S[i * r + j];
                for (int64_t k = 0; k < j; k++) value -= L[i * r + k] * L[j * r + k];
                L[i * r + j] = value / pivot;
            }
        }
        if (!code) {
            /* M = L^-1 by forward substitution, column by column. */
            for (int64_t j = 0; j < r; j++) {
                for (int64_t i = 0; i < j; i++) M[i * r + j] = 0.0f;
                M[j * r + j] = 1.0f / L[j * r + j];
                for (int64_t i = j + 1; i < r; i++) {
                    float value = 0.0f;
                    for (int64_t k = j; k < i; k++) value -= L[i * r + k] * M[k * r + j];
                    M[i * r + j] = value / L[i * r + i];
                }
            }
            /* S^-1[i, j] = sum_k M[k, i] M[k, j] over k >= max(i, j). */
            int finite = 1;
            for (int64_t i = 0; i < r; i++)
                for (int64_t j = 0; j <= i; j++) {
                    float value = 0.0f;
                    for (int64_t k = i; k < r; k++) value += M[k * r + i] * M[k * r + j];
                    o[i * r + j] = value;
                    o[j * r + i] = value;
                    finite &= isfinite(value) != 0;
                }
            if (!finite) code = 2;
        }
        if (code)
            for (int64_t q = 0; q < r * r; q++) o[q] = 0.0f;
        status[s] = code;
    }
}
