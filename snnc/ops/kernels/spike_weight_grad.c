/* Weight gradient of a convolution whose input is 0/1 spikes, event-driven (snnc.ops.train_conv).
 *
 *     dW[o, c, kh, kw] = sum over n, oh, ow of  dY[n, o, oh, ow] * S[n, c, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw]
 *
 * With S in {0, 1} the products are exact: dW is a sum of dY rows, one per (active input, kernel
 * tap), so the work scales with the number of spikes instead of the dense N*H*W*C*O*KH*KW
 * multiply-adds. Layouts are channels_last: S [N, H, W, C] uint8, dY [N, OH, OW, O] float32, so
 * each added row of O floats is contiguous (the inner loop vectorises). A call owns input
 * channels [c0, c1) and accumulates into acc [c1 - c0][KH][KW][O] (zeroed by the caller), so
 * threads on disjoint channel ranges never write the same memory. Summation order: n, h, w
 * ascending; only fp32 rounding of the sum differs from a dense kernel's.
 */
#include <stdint.h>

void snnc_spike_weight_grad(const uint8_t *s, const float *gy, float *acc, int64_t N, int64_t H,
                            int64_t W, int64_t C, int64_t OH, int64_t OW, int64_t O, int64_t KH,
                            int64_t KW, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                            int64_t dw, int64_t c0, int64_t c1) {
    for (int64_t n = 0; n < N; ++n) {
        for (int64_t h = 0; h < H; ++h) {
            for (int64_t w = 0; w < W; ++w) {
                const uint8_t *sp = s + ((n * H + h) * W + w) * C;
                for (int64_t c = c0; c < c1; ++c) {
                    if (!sp[c]) continue;
                    float *a = acc + (c - c0) * KH * KW * O;
                    for (int64_t kh = 0; kh < KH; ++kh) {
                        int64_t th = h + ph - kh * dh;          /* = oh * sh */
                        if (th < 0 || th % sh) continue;
                        int64_t oh = th / sh;
                        if (oh >= OH) continue;
                        for (int64_t kw = 0; kw < KW; ++kw) {
                            int64_t tw = w + pw - kw * dw;
                            if (tw < 0 || tw % sw) continue;
                            int64_t ow = tw / sw;
                            if (ow >= OW) continue;
                            const float *g = gy + ((n * OH + oh) * OW + ow) * O;
                            float *ak = a + (kh * KW + kw) * O;
                            for (int64_t o = 0; o < O; ++o) ak[o] += g[o];
                        }
                    }
                }
            }
        }
    }
}
