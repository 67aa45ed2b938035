/* What a pre-quantized checkpoint's config.json says it is quantized with
 * (core/llama.c), for the loader and for inspect. */
#ifndef QL_PREQUANTIZED_H
#define QL_PREQUANTIZED_H

#include <jansson.h>

/* The quantizer spec cfg's quantization_config names and the field it was
 * read from (both point into cfg or are constants); QL_ENOTFOUND when cfg
 * has no quantization_config, another error naming `file` when it is bad.
 * The spec is untrusted text: open it only with ql_qz_open_from_file. */
int ql_prequantized_spec(json_t *cfg, const char *file, const char **spec, const char **field);

#endif
