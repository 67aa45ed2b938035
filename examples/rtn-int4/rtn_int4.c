/* rtn_int4: round-to-nearest affine int4 with a zero point per group.
 *
 * A third-party example quantizer plugin for qlora.  It stores weights the
 * way GPTQ checkpoints do (4-bit codes, one float scale and one zero point
 * per group of `group_size` consecutive elements along each row) but picks
 * them by plain rounding, with no calibration data.
 *
 * Per group (asymmetric, the default):
 *     lo = min(min(w), 0), hi = max(max(w), 0)
 *     scale = (hi - lo) / 15, zero = clamp(round(-lo / scale), 0, 15)
 *     q = clamp(round(w / scale) + zero, 0, 15),   w' = (q - zero) * scale
 * With sym=1 the zero is fixed at 8 and scale = absmax / 7.
 * round() is ties-to-even, as torch.round in GPTQ's reference.
 *
 * Saved tensors (names relative to the module prefix):
 *     qweight          U8  [rows, ceil(cols / 2)]  element 2j in the low nibble
 *     scales           F32 [rows, groups_per_row]
 *     qzeros           U8  [rows, groups_per_row]
 *     rtn_int4.config  U8  [len]  JSON {"quantizer":"rtn_int4","group_size":G,
 *                                       "sym":S,"shape":[rows,cols]}
 * The last group of a row is short when cols is not a multiple of group_size.
 *
 * Build (out of tree):
 *     cc -std=c11 -O2 -fPIC -shared -fvisibility=hidden \
 *        $(pkg-config --cflags qlora) rtn_int4.c -o rtn_int4.so -lm */
#include <qlora/quantizer.h>

#include <errno.h>
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RTN_NAME "rtn_int4"
#define RTN_CONFIG_TENSOR RTN_NAME ".config"
#define RTN_DEFAULT_GROUP_SIZE 128
#define RTN_MIN_GROUP_SIZE 32
#define RTN_MAX_GROUP_SIZE 1024
#define RTN_GROUP_PER_ROW (-1) /* group_size=-1: one group spans a whole row */
#define RTN_MAX_CODE 15
#define RTN_SYM_ZERO 8
#define RTN_SYM_MAX_MAGNITUDE 7
#define RTN_CONFIG_JSON_CAP 256

/* The only global state, set once by init() before any other call; the host
 * may call everything else concurrently, so nothing here is ever written
 * again. */
static const ql_host_api *host_api;

/* The host API fields this plugin calls: a host table shorter than this
 * predates them and is refused in init(). */
#define RTN_HOST_API_NEEDED_SIZE (offsetof(ql_host_api, json_int_array) + sizeof(void (*)(void)))

struct ql_quantizer {
    int32_t group_size; /* as configured: a power of two, or RTN_GROUP_PER_ROW */
    int32_t sym;        /* 0 or 1 */
};

/* One allocation per state: the struct, then its three arrays carved from
 * the bytes after it, so free_state() is a single free(). */
struct ql_qstate {
    int64_t rows;
    int64_t cols;
    int32_t src_dtype;
    int32_t group_size; /* as in the config, RTN_GROUP_PER_ROW kept as is */
    int32_t sym;
    int64_t group_cols;       /* elements in a full group: group_size, or cols */
    int64_t groups_per_row;   /* ceil(cols / group_cols) */
    int64_t packed_row_bytes; /* ceil(cols / 2) */
    float *scales;            /* (rows, groups_per_row) */
    uint8_t *qzeros;          /* (rows, groups_per_row) */
    uint8_t *qweight;         /* (rows, packed_row_bytes) */
};

/* ---------------------------------------------------------------- helpers */

static const char *matrix_label(const ql_matrix_desc *m)
{
    return (m != NULL && m->name != NULL) ? m->name : "(unnamed matrix)";
}

static int64_t ceil_div(int64_t numerator, int64_t denominator)
{
    return (numerator + denominator - 1) / denominator;
}

static bool is_power_of_two(int64_t value)
{
    return value > 0 && (value & (value - 1)) == 0;
}

static bool group_size_is_valid(int64_t group_size)
{
    return group_size == RTN_GROUP_PER_ROW ||
           (is_power_of_two(group_size) && group_size >= RTN_MIN_GROUP_SIZE &&
            group_size <= RTN_MAX_GROUP_SIZE);
}

/* Largest row or column count accepted: keeps every byte count below in
 * int64_t and size_t without per-product overflow checks. */
#define RTN_MAX_DIM ((int64_t)1 << 28)

static bool shape_is_supported(int64_t rows, int64_t cols)
{
    return rows > 0 && cols > 0 && rows <= RTN_MAX_DIM && cols <= RTN_MAX_DIM &&
           (uint64_t)rows * (uint64_t)cols <= (uint64_t)SIZE_MAX / sizeof(float);
}

/* Sizes of the three packed arrays, shared by quantize, load, bits_per_param
 * and state_info so they can never disagree. */
typedef struct packed_layout {
    int64_t group_cols;
    int64_t groups_per_row;
    int64_t packed_row_bytes;
    uint64_t scales_bytes;
    uint64_t qzeros_bytes;
    uint64_t qweight_bytes;
} packed_layout;

static packed_layout layout_for(int64_t rows, int64_t cols, int32_t group_size)
{
    packed_layout layout;
    layout.group_cols = (group_size == RTN_GROUP_PER_ROW) ? cols : group_size;
    layout.groups_per_row = ceil_div(cols, layout.group_cols);
    layout.packed_row_bytes = ceil_div(cols, 2);
    layout.scales_bytes = (uint64_t)rows * (uint64_t)layout.groups_per_row * sizeof(float);
    layout.qzeros_bytes = (uint64_t)rows * (uint64_t)layout.groups_per_row;
    layout.qweight_bytes = (uint64_t)rows * (uint64_t)layout.packed_row_bytes;
    return layout;
}

static ql_qstate *state_alloc(int64_t rows, int64_t cols, int32_t src_dtype, int32_t group_size,
                              int32_t sym)
{
    packed_layout layout = layout_for(rows, cols, group_size);
    /* sizeof(ql_qstate) is a multiple of its 8-byte alignment, so the float
     * array right after it is aligned. */
    size_t total = sizeof(ql_qstate) + (size_t)layout.scales_bytes + (size_t)layout.qzeros_bytes +
                   (size_t)layout.qweight_bytes;
    ql_qstate *state = malloc(total);
    if (state == NULL) return NULL;
    state->rows = rows;
    state->cols = cols;
    state->src_dtype = src_dtype;
    state->group_size = group_size;
    state->sym = sym;
    state->group_cols = layout.group_cols;
    state->groups_per_row = layout.groups_per_row;
    state->packed_row_bytes = layout.packed_row_bytes;
    unsigned char *arrays = (unsigned char *)(state + 1);
    state->scales = (float *)arrays;
    state->qzeros = arrays + layout.scales_bytes;
    state->qweight = state->qzeros + layout.qzeros_bytes;
    return state;
}

static int write_config_json(const ql_qstate *s, char *buf, size_t cap)
{
    return snprintf(buf, cap,
                    "{\"quantizer\":\"" RTN_NAME "\",\"group_size\":%" PRId32 ",\"sym\":%" PRId32
                    ",\"shape\":[%" PRId64 ",%" PRId64 "]}",
                    s->group_size, s->sym, s->rows, s->cols);
}

/* Round-to-nearest-even of the float32 bits; NaN stays a (quiet) NaN
 * instead of rounding up into infinity. */
static uint16_t bf16_from_f32(float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x0040u);
    uint32_t rounding_bias = 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)((bits + rounding_bias) >> 16);
}

static int code_at(const uint8_t *packed_row, int64_t col)
{
    uint8_t byte = packed_row[col / 2];
    return (col % 2 == 0) ? (byte & 0x0f) : (byte >> 4);
}

static void dequantize_row(const ql_qstate *s, int64_t row, float *out)
{
    const uint8_t *packed_row = s->qweight + row * s->packed_row_bytes;
    const float *row_scales = s->scales + row * s->groups_per_row;
    const uint8_t *row_zeros = s->qzeros + row * s->groups_per_row;
    for (int64_t group = 0; group < s->groups_per_row; group++) {
        int64_t begin = group * s->group_cols;
        int64_t end = begin + s->group_cols < s->cols ? begin + s->group_cols : s->cols;
        float scale = row_scales[group];
        int zero = row_zeros[group];
        for (int64_t col = begin; col < end; col++)
            out[col] = (float)(code_at(packed_row, col) - zero) * scale;
    }
}

static float clamp_code(float code)
{
    return fminf(fmaxf(code, 0.0f), (float)RTN_MAX_CODE);
}

/* Quantize one group of `count` weights starting at column `begin` of a row,
 * writing codes into the row's packed bytes (whose nibbles start zeroed). */
static void quantize_group(const float *weights, int64_t begin, int64_t count, int32_t sym,
                           uint8_t *packed_row, float *scale_out, uint8_t *zero_out)
{
    float lowest = weights[0], highest = weights[0];
    for (int64_t i = 1; i < count; i++) {
        lowest = fminf(lowest, weights[i]);
        highest = fmaxf(highest, weights[i]);
    }

    float scale;
    float zero;
    if (lowest == highest) {
        /* A constant group: a code one step from the zero point with
         * scale = |c| dequantizes to exactly c ((+-1) * |c| is exact), which
         * the general formula cannot promise once scale is rounded. */
        float constant = lowest;
        scale = constant == 0.0f ? 1.0f : fabsf(constant);
        if (sym)
            zero = RTN_SYM_ZERO;
        else
            zero = constant < 0.0f ? 1.0f : 0.0f;
        uint8_t code = (uint8_t)(constant == 0.0f ? zero : constant > 0.0f ? zero + 1 : zero - 1);
        for (int64_t i = 0; i < count; i++) {
            int64_t col = begin + i;
            packed_row[col / 2] |= (uint8_t)(code << (4 * (col % 2)));
        }
        *scale_out = scale;
        *zero_out = (uint8_t)zero;
        return;
    }

    if (sym) {
        double absmax = fmax(fabs((double)lowest), fabs((double)highest));
        scale = (float)(absmax / RTN_SYM_MAX_MAGNITUDE);
        zero = RTN_SYM_ZERO;
    } else {
        /* The range always includes 0 (as in GPTQ) so that the zero point
         * lands in [0, 15]; without this, a group of all-positive weights
         * would need a negative zero and clamping it would wreck the group. */
        double range_low = fmin((double)lowest, 0.0);
        double range_high = fmax((double)highest, 0.0);
        /* In double: highest - lowest can overflow float for huge weights. */
        scale = (float)((range_high - range_low) / RTN_MAX_CODE);
        zero = 0.0f; /* fixed below, once scale is known to be nonzero */
    }
    /* Weights so tiny that the scale underflows still need a usable divisor;
     * the clamp absorbs the resulting huge quotients. */
    if (scale == 0.0f) scale = FLT_TRUE_MIN;
    if (!sym) zero = clamp_code(nearbyintf(-fminf(lowest, 0.0f) / scale));

    for (int64_t i = 0; i < count; i++) {
        int64_t col = begin + i;
        uint8_t code = (uint8_t)clamp_code(nearbyintf(weights[i] / scale) + zero);
        packed_row[col / 2] |= (uint8_t)(code << (4 * (col % 2)));
    }
    *scale_out = scale;
    *zero_out = (uint8_t)zero;
}

/* Strict base-10 integer: the whole string, no blanks, no overflow. */
static bool parse_integer(const char *text, long *out)
{
    if (text == NULL || *text == '\0') return false;
    char *end = NULL;
    errno = 0;
    long value = strtol(text, &end, 10);
    /* strtol would skip leading blanks; an option value with them is a typo. */
    bool starts_like_a_number = text[0] == '-' || (text[0] >= '0' && text[0] <= '9');
    if (errno != 0 || *end != '\0' || end == text || !starts_like_a_number) return false;
    *out = value;
    return true;
}

static const char *dtype_name(int32_t dtype)
{
    static const char *const names[QL_DTYPE_COUNT] = {
        [QL_DTYPE_F32] = "F32",   [QL_DTYPE_F16] = "F16", [QL_DTYPE_BF16] = "BF16",
        [QL_DTYPE_U8] = "U8",     [QL_DTYPE_I8] = "I8",   [QL_DTYPE_I16] = "I16",
        [QL_DTYPE_I32] = "I32",   [QL_DTYPE_I64] = "I64", [QL_DTYPE_F64] = "F64",
        [QL_DTYPE_BOOL] = "BOOL", [QL_DTYPE_U16] = "U16", [QL_DTYPE_U32] = "U32",
        [QL_DTYPE_U64] = "U64",
    };
    if (dtype < 0 || dtype >= QL_DTYPE_COUNT || names[dtype] == NULL) return "unknown dtype";
    return names[dtype];
}

static void format_shape(const int64_t *shape, int32_t ndim, char *buf, size_t cap)
{
    size_t used = (size_t)snprintf(buf, cap, "[");
    for (int32_t d = 0; d < ndim && d < QL_MAX_DIMS && used < cap; d++)
        used += (size_t)snprintf(buf + used, cap - used, "%s%" PRId64, d ? ", " : "", shape[d]);
    if (used < cap) snprintf(buf + used, cap - used, "]");
}

/* Check that a saved tensor is present and has exactly the dtype, rank-2
 * shape and byte count the config implies. */
static int check_tensor(const ql_matrix_desc *m, const char *suffix, const ql_tensor *tensor,
                        int32_t dtype, int64_t dim0, int64_t dim1, uint64_t element_bytes)
{
    if (tensor == NULL)
        return host_api->error(QL_EFORMAT, "%s.%s: missing, though %s is present", matrix_label(m),
                               suffix, RTN_CONFIG_TENSOR);
    int64_t expected_shape[2] = {dim0, dim1};
    uint64_t expected_bytes = (uint64_t)dim0 * (uint64_t)dim1 * element_bytes;
    bool shape_ok = tensor->ndim == 2 && tensor->shape[0] == dim0 && tensor->shape[1] == dim1;
    if (tensor->dtype != dtype || !shape_ok || tensor->nbytes != expected_bytes ||
        tensor->data == NULL) {
        char expected[64], got[128];
        format_shape(expected_shape, 2, expected, sizeof expected);
        if (tensor->ndim >= 0 && tensor->ndim <= QL_MAX_DIMS)
            format_shape(tensor->shape, tensor->ndim, got, sizeof got);
        else
            snprintf(got, sizeof got, "(rank %" PRId32 ")", tensor->ndim);
        return host_api->error(QL_EFORMAT,
                               "%s.%s: expected %s %s (%" PRIu64 " bytes), got %s %s (%" PRIu64
                               " bytes%s)",
                               matrix_label(m), suffix, dtype_name(dtype), expected, expected_bytes,
                               dtype_name(tensor->dtype), got, tensor->nbytes,
                               tensor->data == NULL ? ", no data" : "");
    }
    return QL_OK;
}

/* ------------------------------------------------------------- the slots */

static int rtn_init(const ql_host_api *host)
{
    if (host == NULL || host->abi_major != QL_QUANTIZER_ABI_MAJOR) return QL_EABI;
    if (host->struct_size < RTN_HOST_API_NEEDED_SIZE) {
        /* A short table may still reach error(), and a message beats a
         * bare status; check before touching the field. */
        if (host->struct_size >= offsetof(ql_host_api, error) + sizeof(void (*)(void)) &&
            host->error != NULL)
            return host->error(
                QL_EABI, RTN_NAME ": host API table has %" PRIu32 " bytes, this plugin needs %zu",
                host->struct_size, (size_t)RTN_HOST_API_NEEDED_SIZE);
        return QL_EABI;
    }
    host_api = host;
    return QL_OK;
}

static int rtn_create(const ql_option *options, size_t n_options, ql_quantizer **out)
{
    if (out == NULL)
        return host_api->error(QL_EINVAL, RTN_NAME ": create() needs an output pointer");
    *out = NULL;
    ql_quantizer config = {.group_size = RTN_DEFAULT_GROUP_SIZE, .sym = 0};

    /* A key given twice takes its last value, so a caller can append
     * overrides to a default option list. */
    for (size_t i = 0; i < n_options; i++) {
        const char *key = options[i].key;
        const char *value = options[i].value;
        long parsed = 0;
        if (key == NULL) return host_api->error(QL_EINVAL, RTN_NAME ": option %zu has no key", i);
        if (strcmp(key, "group_size") == 0) {
            if (!parse_integer(value, &parsed) || !group_size_is_valid(parsed))
                return host_api->error(QL_EINVAL,
                                       RTN_NAME ": bad value for group_size: '%s' (want a power of "
                                                "two from %d to %d, or -1 for one group per row)",
                                       value ? value : "", RTN_MIN_GROUP_SIZE, RTN_MAX_GROUP_SIZE);
            config.group_size = (int32_t)parsed;
        } else if (strcmp(key, "sym") == 0) {
            if (!parse_integer(value, &parsed) || (parsed != 0 && parsed != 1))
                return host_api->error(QL_EINVAL,
                                       RTN_NAME ": bad value for sym: '%s' (want 0 or 1)",
                                       value ? value : "");
            config.sym = (int32_t)parsed;
        } else {
            return host_api->error(
                QL_EINVAL, RTN_NAME ": unknown option '%s' (value '%s'); known: group_size, sym",
                key, value ? value : "");
        }
    }

    ql_quantizer *quantizer = malloc(sizeof *quantizer);
    if (quantizer == NULL)
        return host_api->error(QL_ENOMEM, RTN_NAME ": out of memory in create()");
    *quantizer = config;
    *out = quantizer;
    return QL_OK;
}

static void rtn_destroy(ql_quantizer *q)
{
    free(q);
}

static int rtn_describe(const ql_quantizer *q, char *buf, size_t cap)
{
    int length = snprintf(buf, cap, "group_size=%" PRId32 ",sym=%" PRId32, q->group_size, q->sym);
    if (length < 0 || (size_t)length >= cap)
        return host_api->error(QL_EINVAL, RTN_NAME ": describe() needs %d bytes, got %zu",
                               length + 1, cap);
    return QL_OK;
}

static double rtn_bits_per_param(const ql_quantizer *q, int64_t rows, int64_t cols)
{
    if (!shape_is_supported(rows, cols)) return 0.0;
    /* every byte save() writes, the config JSON included, as state_info() counts */
    packed_layout layout = layout_for(rows, cols, q->group_size);
    ql_qstate shape_only = {.rows = rows, .cols = cols, .group_size = q->group_size, .sym = q->sym};
    int config_length = write_config_json(&shape_only, NULL, 0);
    uint64_t total_bytes = layout.qweight_bytes + layout.scales_bytes + layout.qzeros_bytes +
                           (uint64_t)(config_length > 0 ? config_length : 0);
    return 8.0 * (double)total_bytes / ((double)rows * (double)cols);
}

static int rtn_quantize(const ql_quantizer *q, const ql_matrix_desc *m, const float *w,
                        ql_qstate **out)
{
    if (out == NULL || m == NULL || w == NULL)
        return host_api->error(QL_EINVAL, RTN_NAME ": quantize() got a NULL argument");
    *out = NULL;
    if (!shape_is_supported(m->rows, m->cols))
        return host_api->error(QL_EINVAL,
                               RTN_NAME ": %s: unsupported shape [%" PRId64 ", %" PRId64 "]",
                               matrix_label(m), m->rows, m->cols);

    /* Check everything first so a bad matrix costs no allocation. */
    size_t elements = (size_t)m->rows * (size_t)m->cols;
    for (size_t i = 0; i < elements; i++) {
        if (!isfinite(w[i]))
            return host_api->error(QL_ENUMERIC,
                                   RTN_NAME
                                   ": %s: non-finite weight %g at flat index %zu (row %" PRId64
                                   ", col %" PRId64 ")",
                                   matrix_label(m), (double)w[i], i, (int64_t)(i / (size_t)m->cols),
                                   (int64_t)(i % (size_t)m->cols));
    }

    ql_qstate *state = state_alloc(m->rows, m->cols, m->src_dtype, q->group_size, q->sym);
    if (state == NULL)
        return host_api->error(QL_ENOMEM, RTN_NAME ": %s: out of memory for the packed state",
                               matrix_label(m));
    /* quantize_group ORs nibbles in, so the codes start zeroed; this also
     * leaves the unused high nibble of an odd-length row at 0. */
    memset(state->qweight, 0, (size_t)(state->rows * state->packed_row_bytes));

    for (int64_t row = 0; row < state->rows; row++) {
        const float *row_weights = w + row * state->cols;
        uint8_t *packed_row = state->qweight + row * state->packed_row_bytes;
        for (int64_t group = 0; group < state->groups_per_row; group++) {
            int64_t begin = group * state->group_cols;
            int64_t count =
                state->cols - begin < state->group_cols ? state->cols - begin : state->group_cols;
            int64_t slot = row * state->groups_per_row + group;
            quantize_group(row_weights + begin, begin, count, state->sym, packed_row,
                           &state->scales[slot], &state->qzeros[slot]);
        }
    }
    *out = state;
    return QL_OK;
}

static int rtn_materialize(const ql_quantizer *q, const ql_qstate *s, int32_t out_dtype, void *out)
{
    (void)q; /* the state carries its own group_size and sym */
    if (s == NULL || out == NULL)
        return host_api->error(QL_EINVAL, RTN_NAME ": materialize() got a NULL argument");

    if (out_dtype == QL_DTYPE_F32) {
        float *dense = out;
        for (int64_t row = 0; row < s->rows; row++)
            dequantize_row(s, row, dense + row * s->cols);
        return QL_OK;
    }
    if (out_dtype == QL_DTYPE_BF16) {
        float *row_values = malloc((size_t)s->cols * sizeof(float));
        if (row_values == NULL)
            return host_api->error(QL_ENOMEM, RTN_NAME ": out of memory in materialize()");
        uint16_t *dense = out;
        for (int64_t row = 0; row < s->rows; row++) {
            dequantize_row(s, row, row_values);
            for (int64_t col = 0; col < s->cols; col++)
                dense[row * s->cols + col] = bf16_from_f32(row_values[col]);
        }
        free(row_values);
        return QL_OK;
    }
    return host_api->error(QL_ENOTSUP, RTN_NAME ": materialize() supports F32 and BF16, not %s",
                           dtype_name(out_dtype));
}

static int rtn_save(const ql_quantizer *q, const ql_qstate *s, const ql_tensor_writer *w)
{
    (void)q;
    if (s == NULL || w == NULL || w->put == NULL)
        return host_api->error(QL_EINVAL, RTN_NAME ": save() got a NULL argument");

    char config_json[RTN_CONFIG_JSON_CAP];
    int config_length = write_config_json(s, config_json, sizeof config_json);
    if (config_length < 0 || (size_t)config_length >= sizeof config_json)
        return host_api->error(QL_EINTERNAL, RTN_NAME ": config JSON does not fit");

    const ql_tensor tensors[] = {
        {.name = RTN_CONFIG_TENSOR,
         .dtype = QL_DTYPE_U8,
         .ndim = 1,
         .shape = {config_length},
         .data = config_json,
         .nbytes = (uint64_t)config_length},
        {.name = "qweight",
         .dtype = QL_DTYPE_U8,
         .ndim = 2,
         .shape = {s->rows, s->packed_row_bytes},
         .data = s->qweight,
         .nbytes = (uint64_t)(s->rows * s->packed_row_bytes)},
        {.name = "scales",
         .dtype = QL_DTYPE_F32,
         .ndim = 2,
         .shape = {s->rows, s->groups_per_row},
         .data = s->scales,
         .nbytes = (uint64_t)(s->rows * s->groups_per_row) * sizeof(float)},
        {.name = "qzeros",
         .dtype = QL_DTYPE_U8,
         .ndim = 2,
         .shape = {s->rows, s->groups_per_row},
         .data = s->qzeros,
         .nbytes = (uint64_t)(s->rows * s->groups_per_row)},
    };
    for (size_t i = 0; i < sizeof tensors / sizeof tensors[0]; i++) {
        /* put() reports its own failure through host->error. */
        int status = w->put(w->ctx, &tensors[i]);
        if (status != QL_OK) return status;
    }
    return QL_OK;
}

static int rtn_load(const ql_quantizer *q, const ql_matrix_desc *m, const ql_tensor_reader *r,
                    ql_qstate **out)
{
    (void)q; /* the saved config, not q's options, says how the tensors are laid out */
    if (m == NULL || r == NULL || r->get == NULL || out == NULL)
        return host_api->error(QL_EINVAL, RTN_NAME ": load() got a NULL argument");
    *out = NULL;

    const ql_tensor *config = r->get(r->ctx, RTN_CONFIG_TENSOR);
    if (config == NULL) return QL_ENOTFOUND; /* not ours: no message, the host tries others */
    if (config->dtype != QL_DTYPE_U8 || config->ndim != 1 || config->shape[0] < 0 ||
        config->nbytes != (uint64_t)config->shape[0] || config->data == NULL)
        return host_api->error(
            QL_EFORMAT, "%s.%s: expected a U8 vector of JSON bytes, got %s of rank %" PRId32,
            matrix_label(m), RTN_CONFIG_TENSOR, dtype_name(config->dtype), config->ndim);

    const char *json = config->data;
    size_t json_length = (size_t)config->nbytes;
    char quantizer_name[32];
    double group_size_value = 0.0, sym_value = 0.0;
    int64_t shape[QL_MAX_DIMS];
    size_t shape_count = 0;
    if (host_api->json_string(json, json_length, "quantizer", quantizer_name,
                              sizeof quantizer_name) != QL_OK ||
        strcmp(quantizer_name, RTN_NAME) != 0)
        return host_api->error(QL_EFORMAT,
                               "%s.%s: \"quantizer\" is missing or not \"" RTN_NAME "\"",
                               matrix_label(m), RTN_CONFIG_TENSOR);
    if (host_api->json_number(json, json_length, "group_size", &group_size_value) != QL_OK ||
        group_size_value != (double)(int32_t)group_size_value ||
        !group_size_is_valid((int64_t)group_size_value))
        return host_api->error(QL_EFORMAT, "%s.%s: \"group_size\" is missing or invalid",
                               matrix_label(m), RTN_CONFIG_TENSOR);
    if (host_api->json_number(json, json_length, "sym", &sym_value) != QL_OK ||
        (sym_value != 0.0 && sym_value != 1.0))
        return host_api->error(QL_EFORMAT, "%s.%s: \"sym\" is missing or not 0/1", matrix_label(m),
                               RTN_CONFIG_TENSOR);
    /* A cap larger than 2 makes a longer array visible as a wrong count
     * rather than a silent truncation. */
    if (host_api->json_int_array(json, json_length, "shape", shape, QL_MAX_DIMS, &shape_count) !=
            QL_OK ||
        shape_count != 2)
        return host_api->error(QL_EFORMAT, "%s.%s: \"shape\" is missing or not [rows, cols]",
                               matrix_label(m), RTN_CONFIG_TENSOR);
    /* rows == 0 means the caller does not know the shape and takes ours */
    if ((m->rows > 0 && (shape[0] != m->rows || shape[1] != m->cols)) || !shape_is_supported(shape[0], shape[1]))
        return host_api->error(QL_EFORMAT,
                               "%s.%s: shape [%" PRId64 ", %" PRId64
                               "] does not match the matrix [%" PRId64 ", %" PRId64 "]",
                               matrix_label(m), RTN_CONFIG_TENSOR, shape[0], shape[1], m->rows,
                               m->cols);

    int32_t group_size = (int32_t)group_size_value;
    int32_t sym = (int32_t)sym_value;
    packed_layout layout = layout_for(shape[0], shape[1], group_size);
    const ql_tensor *qweight = r->get(r->ctx, "qweight");
    const ql_tensor *scales = r->get(r->ctx, "scales");
    const ql_tensor *qzeros = r->get(r->ctx, "qzeros");
    int status =
        check_tensor(m, "qweight", qweight, QL_DTYPE_U8, shape[0], layout.packed_row_bytes, 1);
    if (status == QL_OK)
        status = check_tensor(m, "scales", scales, QL_DTYPE_F32, shape[0], layout.groups_per_row,
                              sizeof(float));
    if (status == QL_OK)
        status = check_tensor(m, "qzeros", qzeros, QL_DTYPE_U8, shape[0], layout.groups_per_row, 1);
    if (status != QL_OK) return status;

    ql_qstate *state = state_alloc(shape[0], shape[1], m->src_dtype, group_size, sym);
    if (state == NULL)
        return host_api->error(QL_ENOMEM, RTN_NAME ": %s: out of memory for the packed state",
                               matrix_label(m));
    /* memcpy, never a cast: the reader promises no alignment, and a U8
     * tensor of odd length before "scales" in a file leaves it unaligned. */
    memcpy(state->qweight, qweight->data, (size_t)layout.qweight_bytes);
    memcpy(state->scales, scales->data, (size_t)layout.scales_bytes);
    memcpy(state->qzeros, qzeros->data, (size_t)layout.qzeros_bytes);

    /* Values a valid writer never produces would turn into silent NaNs or
     * garbage in every forward pass, so catch them once here. */
    size_t groups = (size_t)(state->rows * state->groups_per_row);
    for (size_t i = 0; i < groups; i++) {
        const char *bad_tensor = !isfinite(state->scales[i])       ? "scales"
                                 : state->qzeros[i] > RTN_MAX_CODE ? "qzeros"
                                                                   : NULL;
        if (bad_tensor != NULL) {
            status =
                host_api->error(QL_EFORMAT,
                                "%s.%s: group %zu (row %zu) has scale %g, zero point %u; "
                                "want a finite scale and a zero point in [0, 15]",
                                matrix_label(m), bad_tensor, i, i / (size_t)state->groups_per_row,
                                (double)state->scales[i], (unsigned)state->qzeros[i]);
            free(state);
            return status;
        }
    }
    *out = state;
    return QL_OK;
}

static void rtn_free_state(const ql_quantizer *q, ql_qstate *s)
{
    (void)q;
    free(s);
}

static int rtn_state_info(const ql_quantizer *q, const ql_qstate *s, ql_state_info *out)
{
    (void)q;
    if (s == NULL || out == NULL)
        return host_api->error(QL_EINVAL, RTN_NAME ": state_info() got a NULL argument");
    packed_layout layout = layout_for(s->rows, s->cols, s->group_size);
    int config_length = write_config_json(s, NULL, 0);
    if (config_length < 0) return host_api->error(QL_EINTERNAL, RTN_NAME ": config JSON failed");
    out->rows = s->rows;
    out->cols = s->cols;
    out->src_dtype = s->src_dtype;
    out->bytes =
        layout.qweight_bytes + layout.scales_bytes + layout.qzeros_bytes + (uint64_t)config_length;
    return QL_OK;
}

static int rtn_checkpoint_config(const ql_quantizer *q, char *buf, size_t cap)
{
    int length = snprintf(buf, cap,
                          "{\"quant_method\": \"qlora\", \"quantizer\": \"" RTN_NAME "\", "
                          "\"group_size\": %" PRId32 ", \"sym\": %" PRId32 "}",
                          q->group_size, q->sym);
    if (length < 0 || (size_t)length >= cap)
        return host_api->error(QL_EINVAL, RTN_NAME ": checkpoint_config() needs %d bytes, got %zu",
                               length + 1, cap);
    return QL_OK;
}

/* y[n, rows] = x[n, cols] * W^T, one weight row decoded at a time: the
 * scratch is one row, however large W is, and each decoded row serves all
 * n inputs before the next is decoded. */
static int rtn_matmul(const ql_quantizer *q, const ql_qstate *s, const float *x, int64_t n,
                      float *y)
{
    (void)q;
    if (s == NULL || (n > 0 && (x == NULL || y == NULL)) || n < 0)
        return host_api->error(QL_EINVAL, RTN_NAME ": matmul() got a NULL argument or n < 0");
    float *weight_row = malloc((size_t)s->cols * sizeof(float));
    if (weight_row == NULL)
        return host_api->error(QL_ENOMEM, RTN_NAME ": out of memory in matmul()");
    for (int64_t row = 0; row < s->rows; row++) {
        dequantize_row(s, row, weight_row);
        for (int64_t i = 0; i < n; i++) {
            const float *input = x + i * s->cols;
            /* Double accumulation keeps long rows (cols in the thousands)
             * within float rounding of the exact product. */
            double sum = 0.0;
            for (int64_t col = 0; col < s->cols; col++)
                sum += (double)input[col] * weight_row[col];
            y[i * s->rows + row] = (float)sum;
        }
    }
    free(weight_row);
    return QL_OK;
}

static const ql_quantizer_desc rtn_descriptor = {
    .struct_size = sizeof(ql_quantizer_desc),
    .abi_major = QL_QUANTIZER_ABI_MAJOR,
    .abi_minor = QL_QUANTIZER_ABI_MINOR,
    .name = RTN_NAME,
    .description =
        "round-to-nearest affine int4, zero point per row group (GPTQ layout, no calibration)",
    .version = "0.1.0",
    .flags = 0,
    .init = rtn_init,
    .create = rtn_create,
    .destroy = rtn_destroy,
    .describe = rtn_describe,
    .bits_per_param = rtn_bits_per_param,
    .quantize = rtn_quantize,
    .materialize = rtn_materialize,
    .save = rtn_save,
    .load = rtn_load,
    .free_state = rtn_free_state,
    .state_info = rtn_state_info,
    .checkpoint_config = rtn_checkpoint_config,
    .matmul = rtn_matmul,
    .calibrate = NULL,
    .to_device = NULL,
    .materialize_device = NULL,
    .free_device_state = NULL,
};

QL_PLUGIN_EXPORT const ql_quantizer_desc *ql_quantizer_entry(void)
{
    return &rtn_descriptor;
}
