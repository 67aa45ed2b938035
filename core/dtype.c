#include "qlora/dtype.h"

#include <math.h>
#include <string.h>

#include "qlora/error.h"

typedef struct dtype_traits {
    const char *name;
    const char *torch_name;
    size_t size;
    int is_float;
} dtype_traits;

static const dtype_traits traits[QL_DTYPE_COUNT] = {
    [QL_DTYPE_F32] = {"F32", "float32", 4, 1},   [QL_DTYPE_F16] = {"F16", "float16", 2, 1},
    [QL_DTYPE_BF16] = {"BF16", "bfloat16", 2, 1}, [QL_DTYPE_U8] = {"U8", "uint8", 1, 0},
    [QL_DTYPE_I8] = {"I8", "int8", 1, 0},        [QL_DTYPE_I16] = {"I16", "int16", 2, 0},
    [QL_DTYPE_I32] = {"I32", "int32", 4, 0},     [QL_DTYPE_I64] = {"I64", "int64", 8, 0},
    [QL_DTYPE_F64] = {"F64", "float64", 8, 1},   [QL_DTYPE_BOOL] = {"BOOL", "bool", 1, 0},
    [QL_DTYPE_U16] = {"U16", "uint16", 2, 0},    [QL_DTYPE_U32] = {"U32", "uint32", 4, 0},
    [QL_DTYPE_U64] = {"U64", "uint64", 8, 0},
};

static int known(int dtype) { return dtype >= 0 && dtype < QL_DTYPE_COUNT && traits[dtype].name; }

const char *ql_dtype_name(int dtype) { return known(dtype) ? traits[dtype].name : "?"; }
const char *ql_dtype_torch_name(int dtype) { return known(dtype) ? traits[dtype].torch_name : "?"; }
size_t ql_dtype_size(int dtype) { return known(dtype) ? traits[dtype].size : 0; }
int ql_dtype_is_float(int dtype) { return known(dtype) && traits[dtype].is_float; }

int ql_dtype_from_name(const char *name)
{
    for (int i = 0; i < QL_DTYPE_COUNT; i++)
        if (traits[i].name && strcmp(traits[i].name, name) == 0) return i;
    return -1;
}

static uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

float ql_bf16_to_f32(uint16_t b) { return u2f((uint32_t)b << 16); }

uint16_t ql_f32_to_bf16(float f)
{
    uint32_t u = f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

float ql_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    if (exp == 0) {
        if (man == 0) return u2f(sign);
        float v = ldexpf((float)man, -24); /* subnormal half: exact in float */
        return sign ? -v : v;
    }
    if (exp == 31) return u2f(sign | 0x7f800000u | (man << 13));
    return u2f(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t ql_f32_to_f16(float f)
{
    uint32_t u = f2u(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t mag = u & 0x7fffffffu;
    if (mag > 0x7f800000u) return sign | 0x7e00;         /* NaN */
    if (mag >= 0x477ff000u) return sign | 0x7c00;        /* rounds to inf */
    if (mag < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
        if (mag < 0x33000000u) return sign; /* under half of the smallest subnormal */
        uint32_t exp = mag >> 23;
        uint32_t man = (mag & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - exp; /* to units of 2^-24, 14..24 */
        uint32_t q = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1);
        uint32_t halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (q & 1))) q++;
        return sign | (uint16_t)q;
    }
    uint32_t r = mag + 0x0fffu + ((mag >> 13) & 1) - 0x38000000u;
    return sign | (uint16_t)(r >> 13);
}

int64_t ql_shape_numel(const int64_t *shape, int ndim)
{
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    return n;
}

/* Tensor data sits at whatever offset the file gives it (safetensors aligns
 * nothing), so every element is loaded through memcpy, never through a
 * pointer of the element's type. */
static uint16_t load_u16(const unsigned char *p, size_t i)
{
    uint16_t v;
    memcpy(&v, p + i * 2, 2);
    return v;
}

static uint32_t load_u32(const unsigned char *p, size_t i)
{
    uint32_t v;
    memcpy(&v, p + i * 4, 4);
    return v;
}

static double load_f64(const unsigned char *p, size_t i)
{
    double v;
    memcpy(&v, p + i * 8, 8);
    return v;
}

int ql_convert_to_f32(int dtype, const void *src, size_t n, float *dst)
{
    const unsigned char *s = src;
    switch (dtype) {
    case QL_DTYPE_F32:
        if (n) memcpy(dst, src, n * 4);
        return QL_OK;
    case QL_DTYPE_F16:
        for (size_t i = 0; i < n; i++) dst[i] = ql_f16_to_f32(load_u16(s, i));
        return QL_OK;
    case QL_DTYPE_BF16:
        for (size_t i = 0; i < n; i++) dst[i] = ql_bf16_to_f32(load_u16(s, i));
        return QL_OK;
    case QL_DTYPE_F64:
        for (size_t i = 0; i < n; i++) dst[i] = (float)load_f64(s, i);
        return QL_OK;
    default:
        return ql_error(QL_ENOTSUP, "cannot convert %s to float32", ql_dtype_name(dtype));
    }
}

int64_t ql_first_nonfinite(int dtype, const void *src, size_t n)
{
    const unsigned char *s = src;
    switch (dtype) {
    case QL_DTYPE_F32:
        for (size_t i = 0; i < n; i++)
            if ((load_u32(s, i) & 0x7f800000u) == 0x7f800000u) return (int64_t)i;
        return -1;
    case QL_DTYPE_F16:
        for (size_t i = 0; i < n; i++)
            if ((load_u16(s, i) & 0x7c00u) == 0x7c00u) return (int64_t)i;
        return -1;
    case QL_DTYPE_BF16:
        for (size_t i = 0; i < n; i++)
            if ((load_u16(s, i) & 0x7f80u) == 0x7f80u) return (int64_t)i;
        return -1;
    case QL_DTYPE_F64:
        for (size_t i = 0; i < n; i++)
            if (!isfinite(load_f64(s, i))) return (int64_t)i;
        return -1;
    default:
        return -1;
    }
}
