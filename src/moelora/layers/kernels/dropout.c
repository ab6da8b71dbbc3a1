/* CPU kernels for the layer's dropout keep-mask, drawn from a seed by a counter-based hash.
 *
 * Element e of a mask of seed s keeps when the 16-bit lane e % 2 of the 32-bit word
 *     h(e / 2) = lowbias32(lowbias32(lo32(e / 2) ^ lo32(s)) ^ hi32(s) ^ hi32(e / 2))
 * is below the keep threshold q * 2^16 (moelora.layers.dropout). lowbias32 is a 32-bit integer hash
 * (xor-shift / multiply rounds with full avalanche). Being a function of (seed, index) alone, the mask
 * is drawn again in the backward pass from the seed, in any order, and every element is independent of
 * the others' computation, so the loops vectorise. moelora.layers.dropout.hashed_lanes is the PyTorch
 * reference (bit for bit).
 */
#include <stddef.h>
#include <stdint.h>

static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x21f0aaadu;
    x ^= x >> 15;
    x *= 0xd35a2d97u;
    x ^= x >> 15;
    return x;
}

static inline uint32_t lane(uint64_t e, uint32_t k0, uint32_t k1) {
    uint64_t w = e >> 1;
    uint32_t h = lowbias32(lowbias32((uint32_t)w ^ k0) ^ k1 ^ (uint32_t)(w >> 32));
    return (h >> ((uint32_t)(e & 1) * 16u)) & 0xffffu;
}

/* keep[e] = 1 if element e of the mask is kept, else 0, for e < count. */
void moelora_keep_mask(int64_t count, uint64_t seed, uint32_t threshold, uint8_t *keep) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#pragma omp simd
    for (int64_t e = 0; e < count; e++) keep[e] = lane((uint64_t)e, k0, k1) < threshold;
}

/* lanes[i] = the 16-bit lane of mask element start + i, for i < n (n <= CHUNK). From an even start each
 * word is hashed once for both its lanes; otherwise per element. */
#define CHUNK 4096
static void fill_lanes(uint64_t start, int64_t n, uint32_t k0, uint32_t k1, uint32_t *lanes) {
    if (start % 2 != 0) {
#pragma omp simd
        for (int64_t c = 0; c < n; c++) lanes[c] = lane(start + (uint64_t)c, k0, k1);
        return;
    }
    uint64_t w0 = start >> 1;
#pragma omp simd
    for (int64_t w = 0; w < (n + 1) / 2; w++) {
        uint64_t word = w0 + (uint64_t)w;
        uint32_t h = lowbias32(lowbias32((uint32_t)word ^ k0) ^ k1 ^ (uint32_t)(word >> 32));
        lanes[2 * w] = h & 0xffffu;
        lanes[2 * w + 1] = h >> 16;
    }
}

/* out = x * m for a (T, d) float32 array with row strides xs and os (out may be x itself), where the mask
 * element of (t, c) is e = t * d + c. */
void moelora_dropout_f32(int64_t T, int64_t d, const float *x, int64_t xs, float *out, int64_t os,
                         uint64_t seed, uint32_t threshold) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    uint32_t lanes[CHUNK + 1];
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * xs;
        float *orow = out + t * os;
        for (int64_t c0 = 0; c0 < d; c0 += CHUNK) {
            int64_t n = d - c0 < CHUNK ? d - c0 : CHUNK;
            fill_lanes((uint64_t)(t * d + c0), n, k0, k1, lanes);
#pragma omp simd
            for (int64_t c = 0; c < n; c++) orow[c0 + c] = lanes[c] < threshold ? xr[c0 + c] : 0.0f;
        }
    }
}

/* The dropout of the experts' input together with what the router, which reads x without the mask, is
 * owed for the dropped elements, so that the router's logits come out of the experts' GEMM on x * m:
 *   out = x * m  (T, d) row stride os (out may be x);   corr (T, E) contiguous = (x * (1 - m)) R^T
 * with rt = R^T (d, E) contiguous. At dropout p only a fraction p of the elements adds to corr. */
void moelora_dropout_router_f32(int64_t T, int64_t d, int64_t E, const float *x, int64_t xs, float *out,
                                int64_t os, uint64_t seed, uint32_t threshold, const float *rt, float *corr) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    uint32_t lanes[CHUNK + 1];
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * xs;
        float *orow = out + t * os, *cr = corr + t * E;
        for (int64_t j = 0; j < E; j++) cr[j] = 0.0f;
        for (int64_t c0 = 0; c0 < d; c0 += CHUNK) {
            int64_t n = d - c0 < CHUNK ? d - c0 : CHUNK;
            fill_lanes((uint64_t)(t * d + c0), n, k0, k1, lanes);
            for (int64_t c = 0; c < n; c++) {
                if (lanes[c] >= threshold) {  /* dropped: read before out (which may be x) is written */
                    float v = xr[c0 + c];
                    const float *rr = rt + (c0 + c) * E;
#pragma omp simd
                    for (int64_t j = 0; j < E; j++) cr[j] += v * rr[j];
                }
            }
#pragma omp simd
            for (int64_t c = 0; c < n; c++) orow[c0 + c] = lanes[c] < threshold ? xr[c0 + c] : 0.0f;
        }
    }
}

/* Its backward pass, with dl = dL/dlogits (T, E) row stride dls:
 *   u (T, d) row stride us, holding [dh, dl] [A_cat; R] on entry (may be NULL): at each dropped element,
 *     replaced by (dl R)_tc, the router's share alone (the experts' share is masked out);
 *   grt (d, E) contiguous (may be NULL): += (x * (1 - m))^T dl, the router gradient's dropped share
 *     (transposed), its kept share coming from the experts' GEMM on x * m.
 * rt = R^T (d, E) contiguous. Only the dropped elements are touched. */
void moelora_dropout_router_backward_f32(int64_t T, int64_t d, int64_t E, uint64_t seed, uint32_t threshold,
                                         const float *x, int64_t xs, const float *dl, int64_t dls,
                                         const float *rt, float *u, int64_t us, float *grt) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    uint32_t lanes[CHUNK + 1];
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * xs, *dr = dl + t * dls;
        for (int64_t c0 = 0; c0 < d; c0 += CHUNK) {
            int64_t n = d - c0 < CHUNK ? d - c0 : CHUNK;
            fill_lanes((uint64_t)(t * d + c0), n, k0, k1, lanes);
            for (int64_t c = 0; c < n; c++) {
                if (lanes[c] < threshold) continue;
                const float *rr = rt + (c0 + c) * E;
                if (u != NULL) {
                    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                    for (int64_t j = 0; j < E; j++) acc += dr[j] * rr[j];
                    u[t * us + c0 + c] = acc;
                }
                if (grt != NULL) {
                    float v = xr[c0 + c];
                    float *gr = grt + (c0 + c) * E;
#pragma omp simd
                    for (int64_t j = 0; j < E; j++) gr[j] += v * dr[j];
                }
            }
        }
    }
}
