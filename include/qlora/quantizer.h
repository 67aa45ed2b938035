/* qlora quantizer plugin ABI.
 *
 * A quantizer plugin is one shared object that exports exactly one symbol,
 * QL_QUANTIZER_ENTRY_NAME, a function returning a pointer to a constant
 * ql_quantizer_desc.  The host validates the descriptor (struct size, ABI
 * major and minor, name, required slots) before it calls any other plugin
 * code, then hands the plugin its host API table through init().
 *
 * This header is self-contained on purpose: a plugin includes it and links
 * against nothing of qlora's.  It compiles as C11 and as C++.
 * Versioning rules are in docs/plugin-abi.md; the tables are append-only. */
#ifndef QLORA_QUANTIZER_H
#define QLORA_QUANTIZER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QL_QUANTIZER_ABI_MAJOR 1
#define QL_QUANTIZER_ABI_MINOR 3
#define QL_QUANTIZER_ENTRY_NAME "ql_quantizer_entry"

#if defined(_WIN32)
#define QL_PLUGIN_EXPORT __declspec(dllexport)
#else
#define QL_PLUGIN_EXPORT __attribute__((visibility("default")))
#endif

/* Status codes shared by host and plugins.  0 is success.  Values are part
 * of the ABI: never renumber, only append. */
enum {
    QL_OK = 0,
    QL_EINVAL = 1,    /* bad argument or option */
    QL_ENOMEM = 2,    /* allocation failed */
    QL_EIO = 3,       /* read or write failed */
    QL_EFORMAT = 4,   /* malformed file or tensor */
    QL_ENOTSUP = 5,   /* operation or dtype not supported */
    QL_ENOTFOUND = 6, /* missing file, tensor or plugin; from load(): "not my format" */
    QL_EABI = 7,      /* plugin ABI mismatch */
    QL_ENUMERIC = 8,  /* NaN or Inf where a finite value is required */
    QL_EEXIST = 9,    /* output exists */
    QL_ECUDA = 10,    /* CUDA runtime or library error */
    QL_EINTERNAL = 11,
    QL_EINTR = 12     /* stopped by a signal (SIGINT, SIGTERM) after saving what it could */
};

/* Element types.  The numbers are written nowhere on disk but are ABI:
 * append only. */
typedef enum ql_dtype {
    QL_DTYPE_F32 = 0,
    QL_DTYPE_F16 = 1,
    QL_DTYPE_BF16 = 2,
    QL_DTYPE_U8 = 3,
    QL_DTYPE_I8 = 4,
    QL_DTYPE_I16 = 5,
    QL_DTYPE_I32 = 6,
    QL_DTYPE_I64 = 7,
    QL_DTYPE_F64 = 8,
    QL_DTYPE_BOOL = 9,
    QL_DTYPE_U16 = 10,
    QL_DTYPE_U32 = 11,
    QL_DTYPE_U64 = 12,
    QL_DTYPE_COUNT
} ql_dtype;

#define QL_MAX_DIMS 8

/* A named, borrowed tensor.  Rank 0 (ndim == 0) is a scalar of one element. */
typedef struct ql_tensor {
    const char *name;
    int32_t dtype; /* ql_dtype */
    int32_t ndim;
    int64_t shape[QL_MAX_DIMS];
    const void *data;
    uint64_t nbytes;
} ql_tensor;

/* Where save() puts a state's tensors.  Names are suffixes relative to the
 * layer's module prefix ("weight", "weight.absmax", "SCB", ...); the host
 * prepends "<prefix>.".  put() copies the data before it returns. */
typedef struct ql_tensor_writer {
    void *ctx;
    int (*put)(void *ctx, const ql_tensor *tensor);
} ql_tensor_writer;

/* Where load() finds a state's tensors, by the same suffixes.  get() returns
 * NULL when the tensor is absent; returned data stays valid until load()
 * returns, so a plugin copies what it keeps. */
typedef struct ql_tensor_reader {
    void *ctx;
    const ql_tensor *(*get)(void *ctx, const char *suffix);
} ql_tensor_reader;

/* The dense matrix being quantized or loaded: row-major [rows, cols].  For
 * load(), rows == cols == 0 means the caller does not know the shape (as when
 * inspecting a checkpoint) and the plugin takes it from the saved tensors. */
typedef struct ql_matrix_desc {
    const char *name; /* module prefix, e.g. "model.layers.0.mlp.down_proj"; for messages */
    int64_t rows;
    int64_t cols;
    int32_t src_dtype; /* dtype the checkpoint stored before conversion to float32 */
} ql_matrix_desc;

/* One key=value option as the user wrote it. */
typedef struct ql_option {
    const char *key;
    const char *value;
} ql_option;

/* Facts about a packed state, filled by state_info(). */
typedef struct ql_state_info {
    int64_t rows;
    int64_t cols;
    int32_t src_dtype;
    uint64_t bytes; /* bytes of every tensor save() would write, including tables and metadata */
} ql_state_info;

typedef struct ql_quantizer ql_quantizer; /* a configured quantizer (plugin-defined) */
typedef struct ql_qstate ql_qstate;       /* packed weights of one matrix (plugin-defined) */
typedef struct ql_calib ql_calib;         /* ABI 1.3: what a data-aware quantizer saw of a matrix's inputs */

enum { QL_LOG_DEBUG = 0, QL_LOG_INFO = 1, QL_LOG_WARN = 2 };

/* What the host offers a plugin.  Handed to init(); valid until unload. */
typedef struct ql_host_api {
    uint32_t struct_size;
    uint16_t abi_major;
    uint16_t abi_minor;
    /* Record an error message for the current thread and return `code`,
     * so a plugin can write `return host->error(QL_EINVAL, "...", ...)`. */
    int (*error)(int code, const char *fmt, ...)
#if defined(__GNUC__)
        __attribute__((format(printf, 2, 3)))
#endif
        ;
    void (*log)(int level, const char *fmt, ...)
#if defined(__GNUC__)
        __attribute__((format(printf, 2, 3)))
#endif
        ;
    /* Read fields of a JSON object given as bytes (need not be NUL-terminated).
     * Return QL_OK, QL_ENOTFOUND (no such key) or QL_EFORMAT (bad JSON or wrong type). */
    int (*json_number)(const char *json, size_t len, const char *key, double *out);
    int (*json_string)(const char *json, size_t len, const char *key, char *buf, size_t cap);
    int (*json_int_array)(const char *json, size_t len, const char *key, int64_t *out, size_t cap,
                          size_t *count);
    /* Threads the plugin may use for CPU work (>= 1). */
    int (*num_threads)(void);
} ql_host_api;

/* ABI 1.1: one block of a packed state that the device needs.  The host
 * copies `bytes` bytes from `data` into device memory that it plans and owns
 * (one arena for the whole quantized base), at `align`, and hands the device
 * addresses back to materialize_rows_device in the same order. */
typedef struct ql_state_buffer {
    const char *name; /* for messages and the memory plan, e.g. "packed" */
    const void *data; /* host bytes, valid while the state lives */
    uint64_t bytes;
    uint64_t align; /* a power of two from 1 to 256 */
} ql_state_buffer;

#define QL_MAX_STATE_BUFFERS 16

/* ABI 1.1: where materialize_rows_device writes rows [row0, row0 + nrows) of
 * the dense row-major [rows, cols] matrix: row r at data + (r - row0) * ld
 * elements of `dtype`.  data is device memory. */
typedef struct ql_device_out {
    int32_t dtype; /* QL_DTYPE_BF16 or QL_DTYPE_F32; anything else is QL_ENOTSUP */
    int32_t reserved; /* 0 */
    void *data;
    int64_t ld; /* elements from one row to the next, >= cols */
    int64_t row0, nrows;
} ql_device_out;

/* Optional-slot capability bits in ql_quantizer_desc.flags. */
#define QL_QUANTIZER_HAS_CUDA 0x1u
/* ABI 1.3: quantize() needs calibration data: the host must calibrate
 * (calib_create, calib_feed, quantize_calibrated, calib_free, all four
 * present) unless calibration_needed() says this configured instance does
 * not (an option such as optq's rtn=1).  The host refuses to quantize with
 * such a plugin without calibration data, before any work. */
#define QL_QUANTIZER_NEEDS_CALIBRATION 0x2u

/* The descriptor a plugin exports.  Required slots must be non-NULL; optional
 * slots are NULL when unsupported and the host checks before calling.  New
 * fields are only ever appended; struct_size tells the host which exist. */
typedef struct ql_quantizer_desc {
    uint32_t struct_size; /* sizeof(ql_quantizer_desc) as the plugin was compiled */
    uint16_t abi_major;   /* QL_QUANTIZER_ABI_MAJOR the plugin was compiled against */
    uint16_t abi_minor;   /* QL_QUANTIZER_ABI_MINOR likewise */
    const char *name;        /* [a-z0-9_-]+, used on the command line */
    const char *description; /* one line */
    const char *version;     /* the plugin's own version string */
    uint32_t flags;

    /* --- required --- */
    /* Called once after validation.  Keep `host`; nothing else reaches the host. */
    int (*init)(const ql_host_api *host);
    /* Configure an instance from options.  Unknown keys and bad values are
     * errors that name the key. */
    int (*create)(const ql_option *options, size_t n_options, ql_quantizer **out);
    void (*destroy)(ql_quantizer *q); /* destroy(NULL) is a no-op */
    /* Canonical options, "key=value,..." with every key, for logs and files. */
    int (*describe)(const ql_quantizer *q, char *buf, size_t cap);
    /* Storage cost of a rows x cols float32 matrix in bits per parameter:
     * every byte save() would write for it (codes, scales, second-level
     * constants, and the tables and metadata the layout keeps per matrix),
     * over rows x cols.  Lengths that depend on the weights count a typical
     * value.  docs/writing-a-quantizer.md, "Bits per parameter". */
    double (*bits_per_param)(const ql_quantizer *q, int64_t rows, int64_t cols);
    /* Quantize a dense float32 row-major matrix.  Non-finite input is QL_ENUMERIC
     * with the index in the message. */
    int (*quantize)(const ql_quantizer *q, const ql_matrix_desc *m, const float *w, ql_qstate **out);
    /* Materialize dense weights into a caller buffer of rows*cols elements of
     * out_dtype (QL_DTYPE_F32 or QL_DTYPE_BF16).  The LoRA engine calls this in
     * the forward pass and again in the backward pass and never keeps the result. */
    int (*materialize)(const ql_quantizer *q, const ql_qstate *s, int32_t out_dtype, void *out);
    int (*save)(const ql_quantizer *q, const ql_qstate *s, const ql_tensor_writer *w);
    /* Rebuild a state from saved tensors.  QL_ENOTFOUND means "these tensors
     * are not in my format" and sets no error message. */
    int (*load)(const ql_quantizer *q, const ql_matrix_desc *m, const ql_tensor_reader *r, ql_qstate **out);
    void (*free_state)(const ql_quantizer *q, ql_qstate *s); /* free_state(q, NULL) is a no-op */
    int (*state_info)(const ql_quantizer *q, const ql_qstate *s, ql_state_info *out);
    /* The JSON object stored as config.json's "quantization_config". */
    int (*checkpoint_config)(const ql_quantizer *q, char *buf, size_t cap);

    /* --- optional (NULL when absent) --- */
    /* y[n, rows] = x[n, cols] * W^T, without materializing W. */
    int (*matmul)(const ql_quantizer *q, const ql_qstate *s, const float *x, int64_t n, float *y);
    /* Retired by ABI 1.3's calibration slots below: no host calls it (it
     * stays in the table, which is append-only). */
    int (*calibrate)(ql_quantizer *q, const ql_matrix_desc *m, const float *x, int64_t n);
    /* CUDA: copy a state to the device, materialize there on a stream
     * (cudaStream_t passed as void *), free the device copy. */
    int (*to_device)(const ql_quantizer *q, const ql_qstate *s, void *stream, ql_qstate **out);
    int (*materialize_device)(const ql_quantizer *q, const ql_qstate *dev_state, int32_t out_dtype,
                              void *dev_out, void *stream);
    void (*free_device_state)(const ql_quantizer *q, ql_qstate *dev_state);

    /* --- optional, ABI 1.1 (the host's GPU engine; see docs/plugin-abi.md) --- */
    /* The buffers of state s that the device reads, at most
     * QL_MAX_STATE_BUFFERS; *n gets how many.  The same state always gives
     * the same list. */
    int (*device_buffers)(const ql_quantizer *q, const ql_qstate *s, ql_state_buffer *bufs, uint32_t *n);
    /* Bytes of device scratch that materialize_rows_device needs to write up
     * to nrows rows of s (0 for none). */
    uint64_t (*device_workspace)(const ql_quantizer *q, const ql_qstate *s, int64_t nrows);
    /* Dense weights of rows out->row0 .. row0 + nrows - 1 on the device, from
     * the device copies of device_buffers (dev_bufs[i] for buffer i; s itself
     * stays on the host and is read for its shape and parameters only).  The
     * values are bit for bit those of materialize().  Launches on `stream`
     * (a cudaStream_t) and returns without waiting; a launch failure is
     * QL_ECUDA with a message.  workspace has device_workspace(nrows) bytes.
     * The plugin shares the host's CUDA runtime (libcudart.so, dynamically
     * linked; docs/writing-a-quantizer.md). */
    int (*materialize_rows_device)(const ql_quantizer *q, const ql_qstate *s, const void *const *dev_bufs,
                                   const ql_device_out *out, void *workspace, uint64_t workspace_bytes, void *stream);

    /* --- optional, ABI 1.2 (qlora quantize --device cuda) --- */
    /* quantize() on the GPU: the dense row-major [m->rows, m->cols] matrix
     * is in device memory at dev_w, elements of w_dtype (QL_DTYPE_F32, which
     * every implementation takes; QL_DTYPE_BF16 where it says so; anything
     * else is QL_ENOTSUP).  The work runs on `stream` (a cudaStream_t; NULL
     * is the default stream), and the slot waits for it: *out is an ordinary
     * host state, bit for bit the one quantize() makes from the same values,
     * so save(), materialize() and device_buffers() cannot tell them apart.
     * dev_w is only read.  The slot may allocate device memory for the call
     * and frees it before returning.  Non-finite input is QL_ENUMERIC as in
     * quantize(); a CUDA failure is QL_ECUDA with the CUDA error text. */
    int (*quantize_device)(const ql_quantizer *q, const ql_matrix_desc *m, const void *dev_w, int32_t w_dtype,
                           void *stream, ql_qstate **out);

    /* --- optional, ABI 1.3 (data-aware quantizers; docs/plugin-abi.md, "Calibration (1.3)") --- */
    /* The four calibration slots come together (all or none).  Per matrix
     * the host calls calib_create, then calib_feed once per batch of the
     * inputs the matrix sees at inference (the layer-sequential pass: the
     * blocks before it already quantized), then quantize_calibrated, then
     * calib_free.  One calibration may serve several matrices that see the
     * same inputs (q, k and v; gate and up): quantize_calibrated only reads
     * it.  Calls on one calibration come from one thread; different
     * calibrations may be fed concurrently. */
    /* A calibration for matrices of m->cols input features (m names the
     * first matrix it serves, for messages). */
    int (*calib_create)(const ql_quantizer *q, const ql_matrix_desc *m, ql_calib **out);
    /* One batch of inputs: x[n, cols] float32 rows, row-major, borrowed for
     * the call (conventionally one calibration sequence of n tokens).
     * Non-finite input is QL_ENUMERIC with the index. */
    int (*calib_feed)(const ql_quantizer *q, ql_calib *c, const float *x, int64_t n);
    /* quantize() of w with what c has seen; m->cols equals c's width (else
     * QL_EINVAL).  The state is an ordinary one: save(), materialize() and
     * the rest take it unchanged. */
    int (*quantize_calibrated)(const ql_quantizer *q, const ql_matrix_desc *m, const float *w, const ql_calib *c,
                               ql_qstate **out);
    void (*calib_free)(const ql_quantizer *q, ql_calib *c); /* calib_free(q, NULL) is a no-op */
    /* Optional even with the four: 1 when this configured instance cannot
     * quantize without calibration, 0 when it can (quantize() then works
     * alone).  NULL: as QL_QUANTIZER_NEEDS_CALIBRATION in flags says. */
    int (*calibration_needed)(const ql_quantizer *q);
} ql_quantizer_desc;

/* The one symbol a plugin exports. */
typedef const ql_quantizer_desc *(*ql_quantizer_entry_fn)(void);

/* Bytes of the descriptor up to and including the last required slot: a
 * plugin whose struct_size is smaller is refused. */
#define QL_QUANTIZER_DESC_MIN_SIZE \
    (offsetof(ql_quantizer_desc, checkpoint_config) + sizeof(void (*)(void)))

#ifdef __cplusplus
}
#endif
#endif
