/* The AdamW update of many small float32 CPU tensors in one single-threaded pass.
 *
 * torch's fused CPU AdamW runs one parallel region per tensor. The optimizers here update hundreds of
 * tensors of a few ten thousand elements each (every layer's stacked A, B and router): a region's fixed
 * cost, waking the thread pool, then exceeds the work it shares (on a 2-core CPU with sleeping OpenMP
 * threads, 25 ms for the default job's 10.6 M parameters against 6.5 ms on one thread). This loop does
 * the same arithmetic as torch's kernel (decoupled weight decay, exp_avg as lerp towards the gradient,
 * exp_avg_sq, the bias-corrected step), tensor after tensor, vectorised along each tensor; the
 * optimizer (moelora.optim.adamw) keeps torch's kernel as the reference and for everything else.
 */
#include <math.h>
#include <stdint.h>

/* For tensor i < n of numel[i] elements (param, grad, exp_avg, exp_avg_sq, each contiguous), with
 * step_size[i] = lr / (1 - beta1^t) and bc2_sqrt[i] = sqrt(1 - beta2^t):
 *   param      *= 1 - lr * weight_decay
 *   exp_avg     = lerp(exp_avg, grad, 1 - beta1)       (in torch's form: exact at weight 0 and 1)
 *   exp_avg_sq  = beta2 * exp_avg_sq + (1 - beta2) * grad^2
 *   param      -= step_size * exp_avg / (sqrt(exp_avg_sq) / bc2_sqrt + eps)
 */
void moelora_adamw_f32(int64_t n, const int64_t *numel, float *const *params, const float *const *grads,
                       float *const *exp_avgs, float *const *exp_avg_sqs, const double *step_size,
                       const double *bc2_sqrt, double lr, double weight_decay, double beta1, double beta2,
                       double eps) {
    const float decay = (float)(1.0 - lr * weight_decay);
    const float weight = (float)(1.0 - beta1);
    /* at::lerp: start + w (end - start) for |w| < 0.5, else end - (end - start) (1 - w) */
    const int near_start = fabsf(weight) < 0.5f;
    const float coeff = near_start ? weight : weight - 1.0f;
    const float b2 = (float)beta2, one_minus_b2 = (float)(1.0 - beta2), epsilon = (float)eps;
    for (int64_t i = 0; i < n; i++) {
        float *p = params[i], *m = exp_avgs[i], *v = exp_avg_sqs[i];
        const float *g = grads[i];
        const float step = (float)step_size[i], bc2 = (float)bc2_sqrt[i];
        const int64_t count = numel[i];
#pragma omp simd
        for (int64_t k = 0; k < count; k++) {
            float param = p[k], grad = g[k];
            if (weight_decay != 0.0) param = param * decay;
            float base = near_start ? m[k] : grad;
            float avg = coeff * (grad - m[k]) + base;
            float sq = v[k] * b2 + one_minus_b2 * grad * grad;
            float denom = sqrtf(sq) / bc2 + epsilon;
            m[k] = avg;
            v[k] = sq;
            p[k] = param - step * avg / denom;
        }
    }
}
