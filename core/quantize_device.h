/* Quantizing on the GPU through a plugin's quantize_device slot (plugin ABI
 * 1.2), shared by `qlora quantize --device` (quantize.c) and quantize-on-load
 * (llama.c).  Internal. */
#ifndef QL_QUANTIZE_DEVICE_H
#define QL_QUANTIZE_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#include "qlora/plugin.h"

/* Whether to quantize with q's quantize_device: device "cpu" (or NULL)
 * never, "cuda" always (an error when no GPU is usable; a plugin without the
 * slot quantizes on the CPU after a one-line warning), "auto" when a GPU is
 * present and the plugin has the slot.  what names the caller in messages
 * ("quantize --device cuda"). */
int ql_qdev_pick(const char *device, const ql_qz *q, const char *what, int *on_gpu);

/* Device memory for one matrix at a time, grown to the largest. */
typedef struct ql_qdev {
    void *buf;
    size_t cap;
} ql_qdev;

/* The row-major matrix w (host memory, elements of dtype: QL_DTYPE_F32 or
 * QL_DTYPE_BF16, which the shipped plugins take as they are; any other float
 * dtype is converted to float32 first) uploaded into u and quantized there
 * on the default stream; the state comes back on the host, bit for bit the
 * one quantize() makes from the same values.  A plugin that refuses bf16
 * input (QL_ENOTSUP) gets the matrix again as float32. */
int ql_qdev_quantize(const ql_qz *q, const ql_matrix_desc *md, const void *w, int32_t dtype, ql_qdev *u,
                     ql_qstate **s);
void ql_qdev_free(ql_qdev *u);

#endif
