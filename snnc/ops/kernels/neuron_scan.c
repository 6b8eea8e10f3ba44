/* Fused IF/LIF scan over T for training (snnc.ops.neuron_scan): one pass over memory each way.
 *
 * Forward (bit-identical to Neuron.step in torch: the same IEEE float ops in the same order;
 * built with -ffp-contract=off so that no multiply-add is fused):
 *     H = (v_leak != 0 ? v_leak + decay*(V - v_leak) : decay*V) + (decay_input ? gain*X : X)
 *     z = H - v_th;  S = strict ? z > 0 : z >= 0
 *     V = S ? (zero_reset ? v_reset : z) : H        (== H - v_th*S  /  H*(1-S) + v_reset*S)
 * writes S as float (the layer's output) and as uint8 (what backward keeps: 1 byte, exact), and
 * z as float32 (zf) or as IEEE half (zh, saturated to +-65504: the low-memory mode).
 * z and the spikes may be NULL (zf and zh: z is not kept; s and s8, together: only z is wanted, as
 * when backward recomputes z from a recomputed X, written over X in place: each element of X is
 * read before z is written to it).
 * Backward (BPTT, see neuron_scan.py):
 *     gH[t] = gS[t]*g(z[t]) + b[t]*gH[t+1],   gX[t] = gain*gH[t]
 *     b[t]  = decay*(1 - v_th*g)  |  decay*((1-S) + (v_reset - H)*g)
 * S comes from the uint8 spikes, not from z (a half z may round a tiny positive z to 0).
 * gs_scalar: dL/dS is one value broadcast over [T, M] (``out.sum().backward()``), read once.
 * Layout: x, s, z, gs, gx are dense [T, M]; a call handles neurons [lo, hi) (the Python side
 * splits M across threads; ctypes releases the GIL), in blocks that walk the T steps with the
 * block's membrane in a small buffer, so the inner loop over neurons vectorises.
 */
#include <math.h>
#include <stdint.h>

#define BLOCK 512
#define HALF_MAX 65504.0f

typedef _Float16 half;

enum { SG_RECTANGULAR = 0, SG_SIGMOID = 1, SG_ATAN = 2, SG_TRIANGLE = 3 };

void snnc_scan_forward(const float *x, float *s, uint8_t *s8, float *zf, half *zh, int64_t T,
                       int64_t M, int64_t from, int64_t to, float decay, float gain,
                       int decay_input, float v_leak, float v_th, int zero_reset, float v_reset,
                       float v_init, int strict) {
    for (int64_t lo = from; lo < to; lo += BLOCK) {
        float v[BLOCK];
        /* where an output is not wanted the loop writes a block-sized scratch row instead: the
         * loop body stays branch-free and vectorises (a test per output inside it did not) */
        float sbuf[BLOCK], zbuf[BLOCK];
        uint8_t s8buf[BLOCK];
        int64_t n = (to - lo < BLOCK) ? to - lo : BLOCK;
        for (int64_t i = 0; i < n; ++i) v[i] = v_init;
        for (int64_t t = 0; t < T; ++t) {
            const int64_t off = t * M + lo;
            const float *xt = x + off;
            float *st = s ? s + off : sbuf;
            uint8_t *s8t = s8 ? s8 + off : s8buf;
            float *zft = zf ? zf + off : (zh ? 0 : zbuf);
            half *zht = zh ? zh + off : 0;
            for (int64_t i = 0; i < n; ++i) {
                float h = (v_leak != 0.0f) ? v_leak + decay * (v[i] - v_leak) : decay * v[i];
                h = h + (decay_input ? gain * xt[i] : xt[i]);
                float zz = h - v_th;
                int fired = strict ? (zz > 0.0f) : (zz >= 0.0f);
                if (zft) {
                    zft[i] = zz;
                } else {
                    float c = zz > HALF_MAX ? HALF_MAX : (zz < -HALF_MAX ? -HALF_MAX : zz);
                    zht[i] = (half)c;
                }
                st[i] = fired ? 1.0f : 0.0f;
                s8t[i] = (uint8_t)fired;
                v[i] = fired ? (zero_reset ? v_reset : zz) : h;
            }
        }
    }
}

/* g(z) for a row of n neurons: one loop per kind, so that each vectorises (a switch inside the
 * element loop kept gcc from vectorising the backward at all: 3.5 ns per element) */
static void surrogate_row(int kind, const float *zz, float *g, int64_t n, float p, float v_th) {
    switch (kind) {
    case SG_RECTANGULAR:
        for (int64_t i = 0; i < n; ++i) g[i] = (fabsf(zz[i]) < p * 0.5f) ? 1.0f / p : 0.0f;
        break;
    case SG_SIGMOID:
        for (int64_t i = 0; i < n; ++i) {
            float sg = 1.0f / (1.0f + expf(-p * zz[i]));
            g[i] = p * sg * (1.0f - sg);
        }
        break;
    case SG_ATAN:
        for (int64_t i = 0; i < n; ++i) {
            float u = 1.5707963267948966f * p * zz[i];
            g[i] = (p * 0.5f) / (1.0f + u * u);
        }
        break;
    default:
        for (int64_t i = 0; i < n; ++i) {
            float r = 1.0f - fabsf(zz[i]) / v_th;
            g[i] = r > 0.0f ? p * r / v_th : 0.0f;
        }
    }
}

void snnc_scan_backward(const float *zf, const half *zh, const uint8_t *s8, const float *gs,
                        int gs_scalar, float *gx, int64_t T, int64_t M, int64_t from, int64_t to,
                        float decay, float gain, float v_th, int zero_reset, float v_reset,
                        int kind, float param) {
    for (int64_t lo = from; lo < to; lo += BLOCK) {
        float carry[BLOCK];   /* gH[t+1] */
        float zbuf[BLOCK], g[BLOCK];
        int64_t n = (to - lo < BLOCK) ? to - lo : BLOCK;
        for (int64_t i = 0; i < n; ++i) carry[i] = 0.0f;
        for (int64_t t = T - 1; t >= 0; --t) {
            const int64_t off = t * M + lo;
            const uint8_t *s8t = s8 + off;
            const float *gst = gs_scalar ? gs : gs + off;
            const int64_t gs_step = gs_scalar ? 0 : 1;
            float *gxt = gx + off;
            const float *zt = zf ? zf + off : zbuf;
            if (!zf)
                for (int64_t i = 0; i < n; ++i) zbuf[i] = (float)zh[off + i];
            surrogate_row(kind, zt, g, n, param, v_th);
            /* the same ops in the same order as before the split: results are bit-identical */
            if (zero_reset) {
                for (int64_t i = 0; i < n; ++i) {
                    float b = decay * ((s8t[i] ? 0.0f : 1.0f) + (v_reset - (zt[i] + v_th)) * g[i]);
                    float gh = gst[i * gs_step] * g[i] + b * carry[i];
                    gxt[i] = gain * gh;
                    carry[i] = gh;
                }
            } else {
                for (int64_t i = 0; i < n; ++i) {
                    float b = decay * (1.0f - v_th * g[i]);
                    float gh = gst[i * gs_step] * g[i] + b * carry[i];
                    gxt[i] = gain * gh;
                    carry[i] = gh;
                }
            }
        }
    }
}
