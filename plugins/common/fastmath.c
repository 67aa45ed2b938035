#include "fastmath.h"

#include <math.h>

/* rcp.approx (the multi-function unit's reciprocal) is not correctly rounded:
 * on an sm_90 GPU it returns the neighbour of the IEEE result for about 13% of
 * mantissas.  It depends on the mantissa alone (the exponent only scales it),
 * and it is always one of the two floats around the exact reciprocal.  So one
 * bit per mantissa, "the GPU picked the other neighbour", reproduces it
 * exactly.  rcp_sm90.bin holds those 2^23 bits, little-endian bit order,
 * measured on an H100 by scripts/gen-rcp-table.cu. */
extern const unsigned char qlp_rcp_sm90_table[];

float qlp_rcp_approx_ftz(float x)
{
    x = qlp_ftz(x);
    uint32_t u = qlp_f2u(x);
    uint32_t sign = u & 0x80000000u;
    uint32_t mag = u & 0x7fffffffu;
    if (mag == 0) return qlp_u2f(sign | 0x7f800000u);    /* 1/±0 = ±inf */
    if (mag == 0x7f800000u) return qlp_u2f(sign);         /* 1/±inf = ±0 */
    if (mag > 0x7f800000u) return qlp_u2f(0x7fffffffu);   /* NaN (canonical) */
    float r = 1.0f / x;
    if (qlp_ftz(r) == 0.0f) return qlp_u2f(sign);          /* result would be subnormal */
    uint32_t m = mag & 0x007fffffu;
    if (qlp_rcp_sm90_table[m >> 3] & (1u << (m & 7))) {
        /* The exact reciprocal lies between r and its other neighbour: the
         * residual 1 - x*r (exact with fma) says on which side. */
        float e = fmaf(-x, r, 1.0f);
        int toward_larger_magnitude = (e > 0) == (sign == 0);
        uint32_t ru = qlp_f2u(r);
        ru = toward_larger_magnitude ? ru + 1 : ru - 1;
        r = qlp_u2f(ru);
        r = qlp_ftz(r);
    }
    return r;
}
