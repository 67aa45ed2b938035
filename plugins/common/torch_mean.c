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
 * of accumulator 0 of the matching lanes of block 0; see
 * qlp_torch_mean_lane.)  The thread's value is then ((a0 + a1) + a2) + a3.
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
 * The plan and each lane's value are torch_mean.h's QLP_HD functions, which
 * the plugins' device quantize runs on the GPU in this same order
 * (bnb4bit_quantize.cu).
 *
 * Floating-point hygiene: every intermediate is stored in a float variable
 * (C11 requires assignments to drop any excess precision, and double rounding
 * through x87 extended precision is harmless for a single add or multiply);
 * build with -ffp-contract=off and never with -ffast-math / -fassociative-math.
 */
#include "torch_mean.h"

#include <math.h>
#include <stddef.h>

float qlp_torch_cuda_mean_f32(const float *x, int64_t n)
{
    if (n <= 0) return NAN;
    qlp_torch_mean_plan p;
    qlp_torch_mean_plan_for(n, &p);
    float part[QLP_TORCH_MEAN_BLOCK_MAX]; /* per-lane value within the current block */
    float last[QLP_TORCH_MEAN_BLOCK_MAX]; /* last block's per-lane sums of block sums */
    for (int t = 0; t < p.threads; t++) last[t] = 0.0f;
    for (int64_t c = 0; c < p.blocks; c++) {
        for (int t = 0; t < p.threads; t++) part[t] = qlp_torch_mean_lane(x, n, &p, 0, c, t);
        float bsum = qlp_torch_mean_block_sum(part, p.threads);
        if (p.blocks == 1) {
            last[0] = bsum;
        } else {
            /* Lane c % w of the last block adds block c's sum; blocks are
             * visited in increasing order, matching each lane's loop. */
            int l = (int)(c % p.threads);
            last[l] = qlp_torch_mean_add(last[l], bsum);
        }
    }
    float sum = p.blocks == 1 ? last[0] : qlp_torch_mean_block_sum(last, p.threads);
    float mean = sum * p.factor;
    return mean;
}
