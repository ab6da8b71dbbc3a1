/* CPU kernels for the optimizers' per-expert r x r products: Gram matrices of the stacked factors and the
 * preconditioners applied to the gradients, E experts at a time.
 *
 * torch.bmm runs these (E, r, d) x (E, d, r) and (E, r, r) x (E, r, d) products, whose inner or outer
 * dimension is r (4 by default), through a thread pool: on a 2-core CPU waking it costs more than the
 * arithmetic. These single-threaded loops vectorise along d. Float32, contiguous arrays;
 * moelora.optim.precondition holds the torch.bmm reference.
 */
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

void moelora_gram_cols_f32(int64_t E, int64_t d, int64_t r, const float *B, float *out) {
    switch (r) {
    case 1: gram_cols(E, d, 1, B, out); break;
    case 2: gram_cols(E, d, 2, B, out); break;
    case 4: gram_cols(E, d, 4, B, out); break;
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
