/* The element operations of the int8 (LLM.int8) quantizer, shared by the CPU
 * reference (int8.c) and the device quantize kernel (int8_quantize.cu): one
 * definition, compiled as C11 and under nvcc (QLP_HD).  The reciprocal is the
 * sm_90 instruction on the device and its exact emulation on the CPU
 * (qlp_rcp_ftz, fastmath.h) (internal). */
#ifndef QLP_INT8_OPS_H
#define QLP_INT8_OPS_H

#include <math.h>
#include <stdint.h>

#include "fastmath.h"
#include "qlp_hd.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Magnitude bits from which float32 -> float16 rounds to infinity (65520). */
#define QLP_HALF_OVERFLOW_BITS 0x477ff000u

/* float32 -> float16 -> float32 with round-to-nearest-even, as torch's .half(). */
QLP_HD float qlp_round_to_half(float f)
{
    uint32_t u = qlp_f2u(f);
    uint32_t sign = u & 0x80000000u, mag = u & 0x7fffffffu;
    float r;
    if (mag >= QLP_HALF_OVERFLOW_BITS) {
        r = qlp_u2f(0x7f800000u); /* at or past the rounding boundary to half's infinity */
    } else if (mag < 0x38800000u) {
        /* half subnormals are multiples of 2^-24: round to that grid */
        r = nearbyintf(fabsf(f) * 16777216.0f) / 16777216.0f;
    } else {
        uint32_t lsb = (mag >> 13) & 1;
        uint32_t rounded = (mag + 0x0fffu + lsb) & ~0x1fffu;
        r = qlp_u2f(rounded);
    }
    return sign ? -r : r;
}

/* One step of the row absmax: the running maximum and the next weight. */
QLP_HD float qlp_int8_absmax_step(float absmax, float w)
{
    float a = fabsf(qlp_round_to_half(w));
    return a > absmax ? a : absmax;
}

/* 127 / SCB as the kernel computes it (__fdividef). */
QLP_HD float qlp_int8_scale(float absmax) { return qlp_fdividef(127.0f, absmax); }

/* The code of weight w in a row with scale qlp_int8_scale(absmax). */
QLP_HD int8_t qlp_int8_code(float w, float scale)
{
    float v = qlp_mul_ftz(qlp_round_to_half(w), scale);
    if ((qlp_f2u(v) & 0x7fffffffu) > 0x7f800000u) return 0; /* cvt.rni of NaN gives 0 */
#ifdef __CUDA_ARCH__
    int qv = __float2int_rn(v); /* nearest even, saturating */
#else
    long qv = lrintf(v); /* nearest even (the default rounding mode) */
#endif
    if (qv > 127) qv = 127;
    if (qv < -128) qv = -128;
    return (int8_t)qv;
}

#ifdef __cplusplus
}
#endif
#endif
