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
int qlp_4bit_materialize(const ql_quantizer *q, const ql_qstate *s, int32_t out_dtype, void *out);
int qlp_4bit_save(const ql_quantizer *q, const ql_qstate *s, const ql_tensor_writer *w);
int qlp_4bit_load(const ql_quantizer *q, const ql_matrix_desc *m, const ql_tensor_reader *r, ql_qstate **out);
void qlp_4bit_free_state(const ql_quantizer *q, ql_qstate *s);
int qlp_4bit_state_info(const ql_quantizer *q, const ql_qstate *s, ql_state_info *info);
int qlp_4bit_checkpoint_config(const ql_quantizer *q, char *buf, size_t cap);

#endif
