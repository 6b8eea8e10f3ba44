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
 * Layout: x, s, z, gs, gx share one dense layout [R][T][L]: R rows of L neurons each, a row's T
 * steps of L lanes one after the other (element (t, neuron m) at (m / L) * T * L + t * L + m % L).
 * R = 1, L = M is the time-major [T, M]; R = features, L = T*B-inner lanes is the feature-major
 * layout a Linear writes when it computes y^T = W x^T (snnc.ops.gemm): each row is then one
 * sequential walk through memory instead of T jumps of M floats. A call handles neurons
 * [from, to) (the Python side splits them across threads; ctypes releases the GIL), in blocks of
 * at most BLOCK neurons (one window of lanes in each of nr consecutive rows) that walk the T
 * steps with the block's membrane in a local buffer. A block of one row (time-major, or a window
 * of a long row) is computed in place (forward_row / backward_row: through locals it measured ~25%
 * slower on conv layers). A block of several short rows gathers each step's inputs into
 * local buffers, computes over all of them in one loop and scatters the outputs: the compute loop
 * reads and writes only locals (no runtime alias checks, which sent it to gcc's scalar version
 * when the spikes overwrite x) and is BLOCK long even when a row has 16 lanes (a 16-trip loop
 * mixing float and uint8 never reached the 64-lane vector body: 2.4x the time of the whole scan).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 512
#ifndef ROW_LANES
#define ROW_LANES 64
#endif
#define HALF_MAX 65504.0f

typedef _Float16 half;

enum { SG_RECTANGULAR = 0, SG_SIGMOID = 1, SG_ATAN = 2, SG_TRIANGLE = 3 };

/* copies of a row segment between memory and the local buffers: whole 64-byte (16-byte for
 * uint8) pieces by fixed-size memcpy, which gcc inlines as one vector move each (a memcpy call per
 * 16-lane segment cost more than the scan's arithmetic) */
static inline void copy_f32(float *dst, const float *src, int64_t w) {
    int64_t i = 0;
    for (; i + 16 <= w; i += 16) memcpy(dst + i, src + i, 64);
    for (; i < w; ++i) dst[i] = src[i];
}

static inline void copy_u8(uint8_t *dst, const uint8_t *src, int64_t w) {
    int64_t i = 0;
    for (; i + 16 <= w; i += 16) memcpy(dst + i, src + i, 16);
    for (; i < w; ++i) dst[i] = src[i];
}

/* The block starting at neuron lo (< to): nr rows of w lanes, row k's step t at
 * base + k*T*L + t*L. Whole rows when a row is shorter than BLOCK and lo starts one, else one
 * window of a single row. */
typedef struct { int64_t base, nr, w; } block_t;

static inline block_t block_at(int64_t lo, int64_t to, int64_t T, int64_t L) {
    block_t b;
    int64_t r = lo / L, l0 = lo % L;
    b.base = r * T * L + l0;
    if (l0 == 0 && L <= BLOCK && to - lo >= L) {
        b.w = L;
        b.nr = (ROW_LANES + L - 1) / L;
        if (b.nr > BLOCK / L) b.nr = BLOCK / L;
        if (b.nr > (to - lo) / L) b.nr = (to - lo) / L;
    } else {
        b.nr = 1;
        b.w = L - l0;
        if (b.w > BLOCK) b.w = BLOCK;
        if (b.w > to - lo) b.w = to - lo;
    }
    return b;
}

/* the forward over one row's n lanes walking T steps of stride L, reading x and writing the
 * outputs in place (an output not wanted goes to a scratch row: the loop stays branch-free and
 * vectorises); the same ops in the same order as the gathered path */
static void forward_row(const float *x, float *s, uint8_t *s8, float *zf, half *zh, float *v,
                        int64_t T, int64_t L, int64_t n, float decay, float gain, int decay_input,
                        float v_leak, float v_th, int zero_reset, float v_reset, int strict) {
    float sbuf[BLOCK], zbuf[BLOCK];
    uint8_t s8buf[BLOCK];
    for (int64_t t = 0; t < T; ++t) {
        const int64_t off = t * L;
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

void snnc_scan_forward(const float *x, float *s, uint8_t *s8, float *zf, half *zh, int64_t T,
                       int64_t L, int64_t from, int64_t to, float decay, float gain,
                       int decay_input, float v_leak, float v_th, int zero_reset, float v_reset,
                       float v_init, int strict) {
    const int64_t row = T * L;
    for (int64_t lo = from; lo < to;) {
        float v[BLOCK], xin[BLOCK], sout[BLOCK], zout[BLOCK];
        uint8_t s8out[BLOCK];
        const block_t b = block_at(lo, to, T, L);
        const int64_t n = b.nr * b.w, w = b.w;
        for (int64_t i = 0; i < n; ++i) v[i] = v_init;
        if (b.nr == 1) {   /* one row (time-major): in place, ~25% faster than through locals */
            forward_row(x + b.base, s ? s + b.base : 0, s8 ? s8 + b.base : 0, zf ? zf + b.base : 0,
                        zh ? zh + b.base : 0, v, T, L, n, decay, gain, decay_input, v_leak, v_th,
                        zero_reset, v_reset, strict);
            lo += n;
            continue;
        }
        for (int64_t t = 0; t < T; ++t) {
            const int64_t off = b.base + t * L;
            for (int64_t k = 0; k < b.nr; ++k)
                copy_f32(xin + k * w, x + off + k * row, w);
            for (int64_t i = 0; i < n; ++i) {
                float h = (v_leak != 0.0f) ? v_leak + decay * (v[i] - v_leak) : decay * v[i];
                h = h + (decay_input ? gain * xin[i] : xin[i]);
                float zz = h - v_th;
                int fired = strict ? (zz > 0.0f) : (zz >= 0.0f);
                zout[i] = zz;
                sout[i] = fired ? 1.0f : 0.0f;
                s8out[i] = (uint8_t)fired;
                v[i] = fired ? (zero_reset ? v_reset : zz) : h;
            }
            for (int64_t k = 0; k < b.nr; ++k) {
                const int64_t o = off + k * row;
                /* outputs not wanted are NULL: the tests sit outside the compute loop */
                if (s) copy_f32(s + o, sout + k * w, w);
                if (s8) copy_u8(s8 + o, s8out + k * w, w);
                if (zf) {
                    copy_f32(zf + o, zout + k * w, w);
                } else if (zh) {
                    for (int64_t i = 0; i < w; ++i) {
                        float c = zout[k * w + i];
                        c = c > HALF_MAX ? HALF_MAX : (c < -HALF_MAX ? -HALF_MAX : c);
                        zh[o + i] = (half)c;
                    }
                }
            }
        }
        lo += n;
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

static void backward_row(const float *zf, const half *zh, const uint8_t *s8, const float *gs,
                         int gs_scalar, float *gx, float *carry, int64_t T, int64_t L, int64_t n,
                         float decay, float gain, float v_th, int zero_reset, float v_reset, int kind,
                         float param) {
    float zbuf[BLOCK], g[BLOCK];
    for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t off = t * L;
        const uint8_t *s8t = s8 + off;
        const float *gst = gs_scalar ? gs : gs + off;
        const int64_t gs_step = gs_scalar ? 0 : 1;
        float *gxt = gx + off;
        const float *zt = zf ? zf + off : zbuf;
        if (!zf)
            for (int64_t i = 0; i < n; ++i) zbuf[i] = (float)zh[off + i];
        surrogate_row(kind, zt, g, n, param, v_th);
        if (zero_reset) {
            for (int64_t i = 0; i < n; ++i) {
                float bb = decay * ((s8t[i] ? 0.0f : 1.0f) + (v_reset - (zt[i] + v_th)) * g[i]);
                float gh = gst[i * gs_step] * g[i] + bb * carry[i];
                gxt[i] = gain * gh;
                carry[i] = gh;
            }
        } else {
            for (int64_t i = 0; i < n; ++i) {
                float bb = decay * (1.0f - v_th * g[i]);
                float gh = gst[i * gs_step] * g[i] + bb * carry[i];
                gxt[i] = gain * gh;
                carry[i] = gh;
            }
        }
    }
}

void snnc_scan_backward(const float *zf, const half *zh, const uint8_t *s8, const float *gs,
                        int gs_scalar, float *gx, int64_t T, int64_t L, int64_t from, int64_t to,
                        float decay, float gain, float v_th, int zero_reset, float v_reset,
                        int kind, float param) {
    const int64_t row = T * L;
    for (int64_t lo = from; lo < to;) {
        float carry[BLOCK];   /* gH[t+1] */
        float zt[BLOCK], g[BLOCK], gst[BLOCK], gout[BLOCK];
        uint8_t s8t[BLOCK];
        const block_t b = block_at(lo, to, T, L);
        const int64_t n = b.nr * b.w, w = b.w;
        for (int64_t i = 0; i < n; ++i) carry[i] = 0.0f;
        if (b.nr == 1) {   /* one row (time-major): in place, as forward_row */
            backward_row(zf ? zf + b.base : 0, zh ? zh + b.base : 0, s8 + b.base,
                         gs_scalar ? gs : gs + b.base, gs_scalar, gx + b.base, carry, T, L, n, decay,
                         gain, v_th, zero_reset, v_reset, kind, param);
            lo += n;
            continue;
        }
        if (gs_scalar)   /* a broadcast dL/dS: its one value in every lane, once */
            for (int64_t i = 0; i < n; ++i) gst[i] = gs[0];
        for (int64_t t = T - 1; t >= 0; --t) {
            const int64_t off = b.base + t * L;
            for (int64_t k = 0; k < b.nr; ++k) {
                const int64_t o = off + k * row;
                if (zf) {
                    copy_f32(zt + k * w, zf + o, w);
                } else {
                    for (int64_t i = 0; i < w; ++i) zt[k * w + i] = (float)zh[o + i];
                }
                copy_u8(s8t + k * w, s8 + o, w);
                if (!gs_scalar) copy_f32(gst + k * w, gs + o, w);
            }
            surrogate_row(kind, zt, g, n, param, v_th);
            /* the same ops in the same order as before the split: results are bit-identical */
            if (zero_reset) {
                for (int64_t i = 0; i < n; ++i) {
                    float bb = decay * ((s8t[i] ? 0.0f : 1.0f) + (v_reset - (zt[i] + v_th)) * g[i]);
                    float gh = gst[i] * g[i] + bb * carry[i];
                    gout[i] = gain * gh;
                    carry[i] = gh;
                }
            } else {
                for (int64_t i = 0; i < n; ++i) {
                    float bb = decay * (1.0f - v_th * g[i]);
                    float gh = gst[i] * g[i] + bb * carry[i];
                    gout[i] = gain * gh;
                    carry[i] = gh;
                }
            }
            for (int64_t k = 0; k < b.nr; ++k)
                copy_f32(gx + off + k * row, gout + k * w, w);
        }
        lo += n;
    }
}
