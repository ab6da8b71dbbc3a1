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

/* out = x * m for a (T, d) float32 array with row strides xs and os (out may be x itself), where the mask
 * element of (t, c) is e = t * d + c. A row whose first element starts a word hashes each word once for
 * both its lanes (into a scratch row of lanes, then a vectorised select); otherwise per element. */
#define CHUNK 4096
void moelora_dropout_f32(int64_t T, int64_t d, const float *x, int64_t xs, float *out, int64_t os,
                         uint64_t seed, uint32_t threshold) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    uint32_t lanes[CHUNK];
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * xs;
        float *orow = out + t * os;
        uint64_t base = (uint64_t)(t * d);
        if (base % 2 != 0) {
#pragma omp simd
            for (int64_t c = 0; c < d; c++) orow[c] = lane(base + (uint64_t)c, k0, k1) < threshold ? xr[c] : 0.0f;
            continue;
        }
        for (int64_t c0 = 0; c0 < d; c0 += CHUNK) {
            int64_t n = d - c0 < CHUNK ? d - c0 : CHUNK;
            uint64_t w0 = (base + (uint64_t)c0) >> 1;  /* c0 is even, so is base + c0 */
#pragma omp simd
            for (int64_t w = 0; w < (n + 1) / 2; w++) {
                uint64_t word = w0 + (uint64_t)w;
                uint32_t h = lowbias32(lowbias32((uint32_t)word ^ k0) ^ k1 ^ (uint32_t)(word >> 32));
                lanes[2 * w] = h & 0xffffu;
                lanes[2 * w + 1] = h >> 16;
            }
#pragma omp simd
            for (int64_t c = 0; c < n; c++) orow[c0 + c] = lanes[c] < threshold ? xr[c0 + c] : 0.0f;
        }
    }
}
