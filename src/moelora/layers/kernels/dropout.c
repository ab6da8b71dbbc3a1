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

/* Row-indexed variants for a layer that computes only some token rows (moelora.layers.token_rows): row i
 * of the compact (n, d) array is row rows[i] of the full (T, d) one, and its mask element of column c is
 * that of the full row, e = rows[i] * d + c, so the compact rows see the mask the full array would. A
 * threshold of 0x10000 keeps every element (a plain gather / scatter). */

/* out[i, c] = x[rows[i], c] * m(rows[i] * d + c) for i < n; x has row stride xs, out is contiguous. */
void moelora_gather_rows_f32(int64_t n, int64_t d, const int64_t *rows, const float *x, int64_t xs, float *out,
                             uint64_t seed, uint32_t threshold) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int64_t i = 0; i < n; i++) {
        const float *xr = x + rows[i] * xs;
        float *orow = out + i * d;
        if (threshold > 0xffffu) {
            for (int64_t c = 0; c < d; c++) orow[c] = xr[c];
            continue;
        }
        uint64_t base = (uint64_t)(rows[i] * d);
#pragma omp simd
        for (int64_t c = 0; c < d; c++) orow[c] = lane(base + (uint64_t)c, k0, k1) < threshold ? xr[c] : 0.0f;
    }
}

/* out[rows[i], c] += src[i, c] * m(rows[i] * d + c) for i < n; src is contiguous, out has row stride os.
 * The rows must be distinct (each output row is written by one i). */
void moelora_scatter_add_rows_f32(int64_t n, int64_t d, const int64_t *rows, const float *src, float *out,
                                  int64_t os, uint64_t seed, uint32_t threshold) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int64_t i = 0; i < n; i++) {
        const float *sr = src + i * d;
        float *orow = out + rows[i] * os;
        if (threshold > 0xffffu) {
#pragma omp simd
            for (int64_t c = 0; c < d; c++) orow[c] += sr[c];
            continue;
        }
        uint64_t base = (uint64_t)(rows[i] * d);
#pragma omp simd
        for (int64_t c = 0; c < d; c++) orow[c] += lane(base + (uint64_t)c, k0, k1) < threshold ? sr[c] : 0.0f;
    }
}
