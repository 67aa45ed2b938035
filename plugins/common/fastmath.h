/* Emulation of the CUDA fast-math float operations that bitsandbytes' kernels
 * are compiled with (--use_fast_math: flush-to-zero, approximate reciprocal),
 * so that our CPU reference produces the same bits as its GPU kernels.
 *
 * The QLP_HD operations also compile under nvcc and run in the plugins' own
 * device quantize kernels (plain IEEE float arithmetic there too: nvcc's
 * defaults keep subnormals, and the plugins are built with --fmad=false). */
#ifndef QLP_FASTMATH_H
#define QLP_FASTMATH_H

#include <stdint.h>
#include <string.h>

#include "qlp_hd.h"

#ifdef __cplusplus
extern "C" {
#endif

QLP_HD uint32_t qlp_f2u(float x)
{
#ifdef __CUDA_ARCH__
    return __float_as_uint(x);
#else
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
#endif
}
QLP_HD float qlp_u2f(uint32_t u)
{
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float x;
    memcpy(&x, &u, 4);
    return x;
#endif
}

/* Flush a subnormal to a zero of the same sign (the .ftz modifier). */
QLP_HD float qlp_ftz(float x)
{
    uint32_t u = qlp_f2u(x);
    if ((u & 0x7f800000u) == 0) return qlp_u2f(u & 0x80000000u);
    return x;
}

QLP_HD float qlp_mul_ftz(float a, float b) { return qlp_ftz(qlp_ftz(a) * qlp_ftz(b)); }
QLP_HD float qlp_abs_ftz(float a) { return qlp_ftz(a < 0 ? -a : a); }
/* max.ftz.f32: NaN inputs lose to numbers, as fmaxf. */
QLP_HD float qlp_max_ftz(float a, float b)
{
    a = qlp_ftz(a);
    b = qlp_ftz(b);
    if (a != a) return b;
    if (b != b) return a;
    return a > b ? a : b;
}

/* float32 -> bfloat16 bits, round to nearest even; NaN stays NaN. */
QLP_HD uint16_t qlp_f32_to_bf16(float f)
{
    uint32_t u = qlp_f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* rcp.approx.ftz.f32 as an sm_90 GPU computes it (bit-exact; see fastmath.c). */
float qlp_rcp_approx_ftz(float x);

/* rcp.approx.ftz.f32: on the device the instruction itself, on the CPU its
 * emulation above. */
QLP_HD float qlp_rcp_ftz(float x)
{
#ifdef __CUDA_ARCH__
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#else
    return qlp_rcp_approx_ftz(x);
#endif
}

/* __fdividef(a, b) under fast math: a * rcp.approx(b), flushed. */
QLP_HD float qlp_fdividef(float a, float b) { return qlp_mul_ftz(a, qlp_rcp_ftz(b)); }

#ifdef __cplusplus
}
#endif
#endif
