/* Slots shared by the nf4 and fp4 plugins (internal). */
#ifndef QLP_BNB4BIT_H
#define QLP_BNB4BIT_H

#include <qlora/quantizer.h>

#include "bnb.h"

int qlp_4bit_init(const ql_host_api *h);
int qlp_4bit_create(qlp_4bit_type type, const ql_option *opts, size_t n, ql_quantizer **out);
void qlp_4bit_destroy(ql_quantizer *q);
int qlp_4bit_describe(const ql_quantizer *q, char *buf, size_t cap);
double qlp_4bit_bits_per_param(const ql_quantizer *q, int64_t rows, int64_t cols);
int qlp_4bit_quantize(const ql_quantizer *q, const ql_matrix_desc *m, const float *w, ql_qstate **out);
int qlp_4bit_quantize_device(const ql_quantizer *q, const ql_matrix_desc *m, const void *dev_w, int32_t w_dtype,
                             void *stream, ql_qstate **out);
int qlp_4bit_materialize(const ql_quantizer *q, const ql_qstate *s, int32_t out_dtype, void *out);
int qlp_4bit_save(const ql_quantizer *q, const ql_qstate *s, const ql_tensor_writer *w);
int qlp_4bit_load(const ql_quantizer *q, const ql_matrix_desc *m, const ql_tensor_reader *r, ql_qstate **out);
void qlp_4bit_free_state(const ql_quantizer *q, ql_qstate *s);
int qlp_4bit_state_info(const ql_quantizer *q, const ql_qstate *s, ql_state_info *info);
int qlp_4bit_checkpoint_config(const ql_quantizer *q, char *buf, size_t cap);
int qlp_4bit_device_buffers(const ql_quantizer *q, const ql_qstate *s, ql_state_buffer *bufs, uint32_t *n);
uint64_t qlp_4bit_device_workspace(const ql_quantizer *q, const ql_qstate *s, int64_t nrows);
int qlp_4bit_materialize_rows_device(const ql_quantizer *q, const ql_qstate *s, const void *const *dev_bufs,
                                     const ql_device_out *out, void *workspace, uint64_t workspace_bytes, void *stream);

/* The device slots (ABI 1.1 and 1.2) exist only in a plugin built with CUDA. */
#ifdef QLP_HAVE_CUDA
#define QLP_4BIT_DEVICE_SLOTS                                                                     \
    .device_buffers = qlp_4bit_device_buffers, .device_workspace = qlp_4bit_device_workspace,   \
    .materialize_rows_device = qlp_4bit_materialize_rows_device, .quantize_device = qlp_4bit_quantize_device,
#else
#define QLP_4BIT_DEVICE_SLOTS
#endif

/* The descriptor and entry point of a 4-bit plugin (nf4.c, fp4.c). */
#define QLP_4BIT_PLUGIN(NAME, TYPE, DESCRIPTION)                                                  \
    static int create_##NAME(const ql_option *options, size_t n, ql_quantizer **out)              \
    {                                                                                             \
        return qlp_4bit_create(TYPE, options, n, out);                                            \
    }                                                                                             \
    static const ql_quantizer_desc descriptor = {                                                 \
        .struct_size = sizeof(ql_quantizer_desc),                                                 \
        .abi_major = QL_QUANTIZER_ABI_MAJOR,                                                      \
        .abi_minor = QL_QUANTIZER_ABI_MINOR,                                                      \
        .name = #NAME,                                                                            \
        .description = DESCRIPTION,                                                               \
        .version = "1.0.0",                                                                       \
        .init = qlp_4bit_init,                                                                    \
        .create = create_##NAME,                                                                  \
        .destroy = qlp_4bit_destroy,                                                              \
        .describe = qlp_4bit_describe,                                                            \
        .bits_per_param = qlp_4bit_bits_per_param,                                                \
        .quantize = qlp_4bit_quantize,                                                            \
        .materialize = qlp_4bit_materialize,                                                      \
        .save = qlp_4bit_save,                                                                    \
        .load = qlp_4bit_load,                                                                    \
        .free_state = qlp_4bit_free_state,                                                        \
        .state_info = qlp_4bit_state_info,                                                        \
        .checkpoint_config = qlp_4bit_checkpoint_config,                                          \
        QLP_4BIT_DEVICE_SLOTS                                                                     \
    };                                                                                            \
    QL_PLUGIN_EXPORT const ql_quantizer_desc *ql_quantizer_entry(void) { return &descriptor; }

#endif
