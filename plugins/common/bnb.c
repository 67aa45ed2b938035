#include "bnb.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fastmath.h"

static const float nf4_values[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

/* FP4 (E2M1) values before normalisation by the format maximum, 12.  Code 8
 * (sign bit, zero magnitude) is +0 in the stored table: the reference builds
 * it from the integer -0, which is 0; only its kernel decodes it as -0.0. */
static const float fp4_raw[16] = {0.0f, 0.0625f,  8.0f,  12.0f,  4.0f,  6.0f,  2.0f,  3.0f,
                                  0.0f, -0.0625f, -8.0f, -12.0f, -4.0f, -6.0f, -2.0f, -3.0f};

void qlp_4bit_table(qlp_4bit_type type, float table[16])
{
    for (int i = 0; i < 16; i++) table[i] = type == QLP_NF4 ? nf4_values[i] : fp4_raw[i] / 12.0f;
}

unsigned qlp_4bit_encode(qlp_4bit_type type, float x) { return qlp_4bit_encode_one(type, x); }

/* torch.linspace(start, end, steps, dtype=float32) on an x86-64 CPU: the
 * first half counts up from start, the second half down from end, each
 * element one fused multiply-add (PyTorch's AVX2/AVX-512 kernels contract
 * them; checked against torch 2.11 on AVX-512, see docs/bit-exactness.md). */
static void linspace_f32(float start, float end, int steps, float *out)
{
    float step = (end - start) / (float)(steps - 1);
    int halfway = steps / 2;
    for (int i = 0; i < steps; i++)
        out[i] = i < halfway ? fmaf(step, (float)i, start) : fmaf(-step, (float)(steps - i - 1), end);
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

void qlp_dynamic_map_signed(float map[256])
{
    /* 7 exponent levels; level i has 2^i fraction values, the means of
     * 2^i + 1 evenly spaced boundaries in [0.1, 1], scaled by 10^(i-6),
     * with both signs; then 0 and 1. */
    int k = 0;
    for (int i = 0; i < 7; i++) {
        int items = (1 << i) + 1;
        float boundaries[65];
        linspace_f32(0.1f, 1.0f, items, boundaries);
        float scale = (float)pow(10.0, (double)(i - 6));
        for (int j = 0; j + 1 < items; j++) {
            float mean = (boundaries[j] + boundaries[j + 1]) / 2.0f;
            map[k++] = mean * scale;
            map[k++] = mean * -scale;
        }
    }
    map[k++] = 0.0f;
    map[k++] = 1.0f;
    qsort(map, 256, sizeof map[0], cmp_float);
}

unsigned qlp_code8_encode(const float map[256], float x) { return qlp_code8_nearest(map, x); }

void qlp_quantize_4bit_blocks(qlp_4bit_type type, const float *x, int64_t n, int blocksize, uint8_t *packed,
                              float *absmax)
{
    int64_t nblocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        /* blocksize is even, so a block starts on a byte */
        int64_t begin = b * blocksize;
        int64_t count = n - begin < blocksize ? n - begin : blocksize;
        qlp_4bit_block(type, x + begin, count, packed + begin / 2, &absmax[b]);
    }
}

void qlp_quantize_8bit_blocks(const float map[256], const float *x, int64_t n, int blocksize, uint8_t *codes,
                              float *absmax)
{
    int64_t nblocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t begin = b * blocksize;
        int64_t count = n - begin < blocksize ? n - begin : blocksize;
        qlp_8bit_block(map, x + begin, count, codes + begin, &absmax[b]);
    }
}
