/* Emulation of the CUDA fast-math float operations that bitsandbytes' kernels
 * are compiled with (--use_fast_math: flush-to-zero, approximate reciprocal),
 * so that our CPU reference produces the same bits as its GPU kernels. */
#ifndef QLP_FASTMATH_H
#define QLP_FASTMATH_H

#include <stdint.h>
#include <string.h>

static inline uint32_t qlp_f2u(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float qlp_u2f(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

/* Flush a subnormal to a zero of the same sign (the .ftz modifier). */
static inline float qlp_ftz(float x)
{
    uint32_t u = qlp_f2u(x);
    if ((u & 0x7f800000u) == 0) return qlp_u2f(u & 0x80000000u);
    return x;
}

static inline float qlp_mul_ftz(float a, float b) { return qlp_ftz(qlp_ftz(a) * qlp_ftz(b)); }
static inline float qlp_abs_ftz(float a) { return qlp_ftz(a < 0 ? -a : a); }
/* max.ftz.f32: NaN inputs lose to numbers, as fmaxf. */
static inline float qlp_max_ftz(float a, float b)
{
    a = qlp_ftz(a);
    b = qlp_ftz(b);
    if (a != a) return b;
    if (b != b) return a;
    return a > b ? a : b;
}

/* float32 -> bfloat16 bits, round to nearest even; NaN stays NaN. */
static inline uint16_t qlp_f32_to_bf16(float f)
{
    uint32_t u = qlp_f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* rcp.approx.ftz.f32 as an sm_90 GPU computes it (bit-exact; see fastmath.c). */
float qlp_rcp_approx_ftz(float x);
/* __fdividef(a, b) under fast math: a * rcp.approx(b), flushed. */
static inline float qlp_fdividef(float a, float b) { return qlp_mul_ftz(a, qlp_rcp_approx_ftz(b)); }

#endif
