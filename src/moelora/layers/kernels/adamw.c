/* The AdamW update of many small float32 CPU tensors in one single-threaded pass, and the same update
 * fused with the per-expert preconditioner of stacked expert factors.
 *
 * torch's fused CPU AdamW runs one parallel region per tensor. The optimizers here update hundreds of
 * tensors of a few ten thousand elements each (every layer's stacked A, B and router): a region's fixed
 * cost, waking the thread pool, then exceeds the work it shares (on a 2-core CPU with sleeping OpenMP
 * threads, 25 ms for the default job's 10.6 M parameters against 6.5 ms on one thread). This loop does
 * the same arithmetic as torch's kernel (decoupled weight decay, exp_avg as lerp towards the gradient,
 * exp_avg_sq, the bias-corrected step), tensor after tensor, vectorised along each tensor; the
 * optimizer (moelora.optim.adamw) keeps torch's kernel as the reference and for everything else.
 *
 * The fused form computes each expert's preconditioned gradient (P_e G_e for an A-factor, G_e P_e for a
 * B-factor, as batched.c's left_mul / right_mul compute them, operation for operation) a short block at a
 * time into a buffer on the stack and updates that block at once, so the preconditioned gradient is
 * never written to memory and read back: the update reads each gradient, parameter and moment once.
 */
#include <math.h>
#include <stdint.h>

typedef struct {
    float decay;        /* 1 - lr * weight_decay */
    int decays;         /* weight_decay != 0 */
    int near_start;     /* at::lerp's form: start + w (end - start) for |w| < 0.5, else end - (end - start) (1 - w) */
    float coeff;        /* w, or w - 1 */
    float b2, one_minus_b2, eps;
} adamw_constants;

static adamw_constants constants(double lr, double weight_decay, double beta1, double beta2, double eps) {
    adamw_constants c;
    const float weight = (float)(1.0 - beta1);
    c.decay = (float)(1.0 - lr * weight_decay);
    c.decays = weight_decay != 0.0;
    c.near_start = fabsf(weight) < 0.5f;
    c.coeff = c.near_start ? weight : weight - 1.0f;
    c.b2 = (float)beta2;
    c.one_minus_b2 = (float)(1.0 - beta2);
    c.eps = (float)eps;
    return c;
}

/* count elements, with step = lr / (1 - beta1^t) and bc2 = sqrt(1 - beta2^t):
 *   param      *= 1 - lr * weight_decay
 *   exp_avg     = lerp(exp_avg, grad, 1 - beta1)       (in torch's form: exact at weight 0 and 1)
 *   exp_avg_sq  = beta2 * exp_avg_sq + (1 - beta2) * grad^2
 *   param      -= step * exp_avg / (sqrt(exp_avg_sq) / bc2 + eps)
 */
static inline void update(const adamw_constants *c, float step, float bc2, int64_t count, float *p, const float *g,
                          float *m, float *v) {
    const float decay = c->decay, coeff = c->coeff, b2 = c->b2, one_minus_b2 = c->one_minus_b2, epsilon = c->eps;
    const int decays = c->decays, near_start = c->near_start;
#pragma omp simd
    for (int64_t k = 0; k < count; k++) {
        float param = p[k], grad = g[k];
        if (decays) param = param * decay;
        float base = near_start ? m[k] : grad;
        float avg = coeff * (grad - m[k]) + base;
        float sq = v[k] * b2 + one_minus_b2 * grad * grad;
        float denom = sqrtf(sq) / bc2 + epsilon;
        m[k] = avg;
        v[k] = sq;
        p[k] = param - step * avg / denom;
    }
}

/* The update of tensor i < n of numel[i] elements (param, grad, exp_avg, exp_avg_sq, each contiguous),
 * with step_size[i] = lr / (1 - beta1^t) and bc2_sqrt[i] = sqrt(1 - beta2^t) for its step count t. */
void moelora_adamw_f32(int64_t n, const int64_t *numel, float *const *params, const float *const *grads,
                       float *const *exp_avgs, float *const *exp_avg_sqs, const double *step_size,
                       const double *bc2_sqrt, double lr, double weight_decay, double beta1, double beta2,
                       double eps) {
    const adamw_constants c = constants(lr, weight_decay, beta1, beta2, eps);
    for (int64_t i = 0; i < n; i++)
        update(&c, (float)step_size[i], (float)bc2_sqrt[i], numel[i], params[i], grads[i], exp_avgs[i],
               exp_avg_sqs[i]);
}

/* Elements of a preconditioned gradient computed per block (on the stack, 8 KiB). */
#define BLOCK 2048

/* An A-factor (E, r, d): for each expert e and row i, u = sum_k P_e[i, k] G_e[k, :] (then times scale),
 * block by block along d, each block updated at once. */
static void update_a(const adamw_constants *c, float step, float bc2, float scale, int64_t E, int64_t r, int64_t d,
                     const float *P, const float *G, float *p, float *m, float *v) {
    float u[BLOCK];
    for (int64_t e = 0; e < E; e++) {
        const float *pe = P + e * r * r, *g = G + e * r * d;
        for (int64_t i = 0; i < r; i++) {
            const int64_t offset = (e * r + i) * d;
            for (int64_t start = 0; start < d; start += BLOCK) {
                const int64_t count = d - start < BLOCK ? d - start : BLOCK;
#pragma omp simd
                for (int64_t q = 0; q < count; q++) u[q] = pe[i * r] * g[start + q];
                for (int64_t k = 1; k < r; k++) {
                    const float *grow = g + k * d + start;
                    const float w = pe[i * r + k];
#pragma omp simd
                    for (int64_t q = 0; q < count; q++) u[q] += w * grow[q];
                }
#pragma omp simd
                for (int64_t q = 0; q < count; q++) u[q] *= scale;
                update(c, step, bc2, count, p + offset + start, u, m + offset + start, v + offset + start);
            }
        }
    }
}

/* A B-factor (E, d, r): for each expert e and row, u[row, j] = sum_k G_e[row, k] P_e[k, j] (then times
 * scale), BLOCK / r rows at a time; inlined with a constant r for the usual ranks. */
static inline void update_b(const adamw_constants *c, float step, float bc2, float scale, int64_t E, int64_t d,
                            const int64_t r, const float *P, const float *G, float *p, float *m, float *v) {
    float u[BLOCK];
    const int64_t rows_per_block = BLOCK / r;
    for (int64_t e = 0; e < E; e++) {
        const float *pe = P + e * r * r;
        for (int64_t first = 0; first < d; first += rows_per_block) {
            const int64_t rows = d - first < rows_per_block ? d - first : rows_per_block;
            const int64_t offset = (e * d + first) * r;
            const float *g = G + offset;
            for (int64_t row = 0; row < rows; row++) {
                const float *vrow = g + row * r;
                for (int64_t j = 0; j < r; j++) {
                    float acc = 0.0f;
                    for (int64_t k = 0; k < r; k++) acc += vrow[k] * pe[k * r + j];
                    u[row * r + j] = acc;
                }
            }
#pragma omp simd
            for (int64_t q = 0; q < rows * r; q++) u[q] *= scale;
            update(c, step, bc2, rows * r, p + offset, u, m + offset, v + offset);
        }
    }
}

/* The AdamW update of n stacked expert factors on their preconditioned gradients. Factor i is an
 * A-factor (E_i, r, width_i) where side[i] == 0, a B-factor (E_i, width_i, r) where side[i] == 1;
 * inverses[i] holds its experts' (E_i, r, r) preconditioners P, scale[i] multiplies its preconditioned
 * gradient (a clipping coefficient, or 1), and step_size / bc2_sqrt are as in moelora_adamw_f32. */
void moelora_precondition_adamw_f32(int64_t n, const int64_t *side, const int64_t *experts, const int64_t *width,
                                    int64_t r, const float *const *inverses, const double *scale,
                                    float *const *params, const float *const *grads, float *const *exp_avgs,
                                    float *const *exp_avg_sqs, const double *step_size, const double *bc2_sqrt,
                                    double lr, double weight_decay, double beta1, double beta2, double eps) {
    const adamw_constants c = constants(lr, weight_decay, beta1, beta2, eps);
    for (int64_t i = 0; i < n; i++) {
        const float step = (float)step_size[i], bc2 = (float)bc2_sqrt[i], s = (float)scale[i];
        if (side[i] == 0) {
            update_a(&c, step, bc2, s, experts[i], r, width[i], inverses[i], grads[i], params[i], exp_avgs[i],
                     exp_avg_sqs[i]);
            continue;
        }
        switch (r) {
        case 1: update_b(&c, step, bc2, s, experts[i], width[i], 1, inverses[i], grads[i], params[i], exp_avgs[i], exp_avg_sqs[i]); break;
        case 2: update_b(&c, step, bc2, s, experts[i], width[i], 2, inverses[i], grads[i], params[i], exp_avgs[i], exp_avg_sqs[i]); break;
        case 4: update_b(&c, step, bc2, s, experts[i], width[i], 4, inverses[i], grads[i], params[i], exp_avgs[i], exp_avg_sqs[i]); break;
        case 8: update_b(&c, step, bc2, s, experts[i], width[i], 8, inverses[i], grads[i], params[i], exp_avgs[i], exp_avg_sqs[i]); break;
        default: update_b(&c, step, bc2, s, experts[i], width[i], r, inverses[i], grads[i], params[i], exp_avgs[i], exp_avg_sqs[i]);
        }
    }
}
