/* Bit-exact emulation of PyTorch's CUDA float32 mean of a contiguous 1-D tensor.
 *
 * On the GPU the mean is one launch of ATen's generic reduction kernel with
 * "mean" ops: the combine step is a plain float add (accumulator type float),
 * and the final projection multiplies the float sum by a factor that the host
 * computed as 1.0f / (float)n.  The result therefore depends only on the
 * order in which the float additions are done, which is fixed by the launch
 * configuration the host derives from n and the device properties.  This
 * file recomputes that configuration and replays the additions in the same
 * order, one IEEE round-to-nearest float add at a time.
 *
 * Launch configuration for one output reduced over n contiguous floats:
 *   - If n >= 128 the kernel reads the input as 16-byte vectors of 4 floats
 *     ("vectorized input"); the width it sizes the block for is then n/4
 *     (rounded down), otherwise n.  (Older PyTorch releases used n > 128.)
 *   - Block: W x 1 threads, W = largest power of two <= that width, capped
 *     at 512.  Every thread starts at its lane index and strides by W.
 *   - "Values per thread" V = ceil(n / W) (counted in elements even in the
 *     vectorized case).  If V >= 256 the input is also split across G blocks
 *     along grid.y, where, with T = 132 SMs * (2048 / W) blocks to fill the
 *     GPU, G = max(min(T, ceil(V/16)), ceil(V/256)).  Thread (lane, block)
 *     then starts at lane + block*W and strides by W*G.
 *
 * Per thread (vectorized case): four float accumulators, one per position in
 * the 4-float vector.  Accumulator k gets element 4*j+k of every vector j the
 * thread visits, in visiting order.  The n % 4 trailing elements that do not
 * fill a vector are added to accumulator 0 of lanes 0..(n%4)-1 of block 0,
 * after the vector loop.  (If the buffer is not 16-byte aligned, the leading
 * elements up to the first aligned address are instead the *initial* value
 * of accumulator 0 of the matching lanes of block 0; see mean_impl.)  The
 * thread's value is then ((a0 + a1) + a2) + a3.
 *
 * Per thread (scalar case, n < 128): four accumulators again, but each loop
 * round reads 4 elements spaced W apart (idx, idx+W, idx+2W, idx+3W) into
 * accumulators 0..3 and then advances by 4W; when fewer than 4 remain, the
 * leftovers go to accumulators 0, 1, ... in order.  Combined the same way.
 *
 * Block reduction of the W thread values: while more than 32 remain, halve
 * through shared memory (thread t adds the value of thread t + W/2, then
 * t + W/4, ... down to an offset of 32); then within the (first) warp,
 * shuffle-down steps with *decreasing* offsets min(W,32)/2, ..., 2, 1
 * (v[l] = v[l] + v[l+off]).  Lane 0 holds the block's sum.  The measured
 * PyTorch 2.11 CUDA build uses this decreasing order; older releases (and
 * ROCm builds) used increasing offsets 1, 2, 4, ..., which gives other bits.
 *
 * Across blocks (G > 1): each block stores its sum; the last block to finish
 * has thread t add (starting from 0.0f) the sums of blocks t, t+W, t+2W, ...
 * in increasing order, and then runs the same block reduction on those W
 * values.  Which block finishes last does not affect the order.
 *
 * Finally: mean = sum * (1.0f / (float)n).
 *
 * Floating-point hygiene: every intermediate is stored in a float variable
 * (C11 requires assignments to drop any excess precision, and double rounding
 * through x87 extended precision is harmless for a single add or multiply);
 * build with -ffp-contract=off and never with -ffast-math / -fassociative-math.
 */
#include "torch_mean.h"

#include <math.h>
#include <stddef.h>

enum {
    GPU_SM_COUNT = 132,          /* H100 SXM */
    GPU_THREADS_PER_SM = 2048,
    WARP = 32,
    BLOCK_MAX = 512,             /* thread cap of the reduction for float */
    VEC = 4,                     /* floats per 16-byte vector load */
    ACC = 4,                     /* accumulators per thread (unroll) */
    VEC_MIN_WIDTH = 128,         /* vectorize when n is at least this */
    SPLIT_WARPS_MIN = 16,        /* minimum values per thread ... */
    SPLIT_BLOCKS_MIN = 256       /* ... and threshold for multi-block */
};

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* Largest power of two <= v (at least 1). */
static int floor_pow2(int64_t v)
{
    int p = 1;
    while ((int64_t)p * 2 <= v) p *= 2;
    return p;
}

/* One float add, rounded to float. */
static float qlp_fadd32(float a, float b)
{
    float r = a + b;
    return r;
}

/* Sum of v[0..w-1] in the order a w x 1 thread block reduces it (w a power of
 * two <= BLOCK_MAX).  Destroys v. */
static float block_sum(float *v, int w)
{
    int width = w;
    if (width > WARP) {
        for (int off = width / 2; off >= WARP; off /= 2)
            for (int t = 0; t < off; t++)
                v[t] = qlp_fadd32(v[t], v[t + off]);
        width = WARP;
    }
    /* Shuffle-down steps, largest offset first.  Only lanes below the
     * offset can still feed lane 0, and their partners (l + off) are not
     * overwritten in the same step, so an in-place sweep is exact. */
    for (int off = width / 2; off > 0; off /= 2)
        for (int l = 0; l < off; l++)
            v[l] = qlp_fadd32(v[l], v[l + off]);
    return v[0];
}

/* `mis` = (device address % 16) / 4, i.e. how many floats the buffer start
 * lies past a 16-byte boundary (0 for a fresh allocation). */
static float mean_impl(const float *x, int64_t n, int mis)
{
    const int vectorized = n >= VEC_MIN_WIDTH;
    const int64_t span = vectorized ? n / VEC : n;
    const int w = span < BLOCK_MAX ? floor_pow2(span) : BLOCK_MAX;

    /* Split across blocks? */
    int64_t g = 1;
    const int64_t vpt = ceil_div(n, w);
    if (vpt >= SPLIT_WARPS_MIN && vpt >= SPLIT_BLOCKS_MIN) {
        const int64_t target = (int64_t)GPU_SM_COUNT * (GPU_THREADS_PER_SM / w);
        int64_t g1 = target;                       /* one output -> grid.x = 1 */
        int64_t g2 = ceil_div(vpt, SPLIT_WARPS_MIN);
        int64_t g3 = ceil_div(vpt, SPLIT_BLOCKS_MIN);
        g = g1 < g2 ? g1 : g2;
        if (g3 > g) g = g3;
    }
    const int64_t stride = (int64_t)w * g;          /* in vectors or elements */

    float part[BLOCK_MAX];       /* per-lane value within the current block */
    float acc[BLOCK_MAX][ACC];
    float last[BLOCK_MAX];       /* last block's per-lane sums of block sums */
    for (int t = 0; t < w; t++) last[t] = 0.0f;

    for (int64_t c = 0; c < g; c++) {
        for (int t = 0; t < w; t++)
            for (int k = 0; k < ACC; k++) acc[t][k] = 0.0f;

        if (vectorized) {
            const float *d = x;
            int64_t end = n;
            if (mis > 0) {
                /* Head: the elements before the first aligned vector seed
                 * accumulator 0 of lanes mis..3 of block 0. */
                if (c == 0)
                    for (int t = mis; t < VEC && t < w; t++)
                        acc[t][0] = qlp_fadd32(0.0f, x[t - mis]);
                d = x + (VEC - mis);
                end = n - (VEC - mis);
            }
            /* Vector loop, visited round by round so every lane still sees
             * its own vectors in increasing order. */
            for (int64_t base = c * w; base * VEC < end; base += stride) {
                for (int t = 0; t < w; t++) {
                    int64_t j = base + t;
                    if (j * VEC + (VEC - 1) >= end) break;
                    const float *p = d + j * VEC;
                    for (int k = 0; k < VEC; k++)
                        acc[t][k] = qlp_fadd32(acc[t][k], p[k]);
                }
            }
            /* Tail elements that do not fill a vector. */
            if (c == 0) {
                int64_t tail = end - end % VEC;
                for (int t = 0; t < w && tail + t < end; t++)
                    acc[t][0] = qlp_fadd32(acc[t][0], d[tail + t]);
            }
        } else {
            for (int t = 0; t < w; t++) {
                int64_t i = t + c * w;
                while (i + (ACC - 1) * stride < n) {
                    for (int k = 0; k < ACC; k++)
                        acc[t][k] = qlp_fadd32(acc[t][k], x[i + k * stride]);
                    i += ACC * stride;
                }
                for (int k = 0; k < ACC && i < n; k++, i += stride)
                    acc[t][k] = qlp_fadd32(acc[t][k], x[i]);
            }
        }

        for (int t = 0; t < w; t++) {
            float s = acc[t][0];
            for (int k = 1; k < ACC; k++) s = qlp_fadd32(s, acc[t][k]);
            part[t] = s;
        }
        float bsum = block_sum(part, w);
        if (g == 1) {
            last[0] = bsum;
        } else {
            /* Lane c % w of the last block adds block c's sum; blocks are
             * visited in increasing order, matching each lane's loop. */
            last[c % w] = qlp_fadd32(last[c % w], bsum);
        }
    }

    float sum = (g == 1) ? last[0] : block_sum(last, w);
    float factor = 1.0f / (float)n;
    float mean = sum * factor;
    return mean;
}

float qlp_torch_cuda_mean_f32(const float *x, int64_t n)
{
    if (n <= 0) return NAN;
    return mean_impl(x, n, 0);
}
