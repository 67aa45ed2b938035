/* The nf4 quantizer plugin: NormalFloat4 (QLoRA), blockwise absmax, optional double quantization; bitsandbytes format. */
#include <qlora/quantizer.h>

#include "bnb4bit.h"

static int create_nf4(const ql_option *options, size_t n, ql_quantizer **out)
{
    return qlp_4bit_create(QLP_NF4, options, n, out);
}

static const ql_quantizer_desc descriptor = {
    .struct_size = sizeof(ql_quantizer_desc),
    .abi_major = QL_QUANTIZER_ABI_MAJOR,
    .abi_minor = QL_QUANTIZER_ABI_MINOR,
    .name = "nf4",
    .description = "NormalFloat4 (QLoRA), blockwise absmax, optional double quantization; bitsandbytes format",
    .version = "1.0.0",
    .init = qlp_4bit_init,
    .create = create_nf4,
    .destroy = qlp_4bit_destroy,
    .describe = qlp_4bit_describe,
    .bits_per_param = qlp_4bit_bits_per_param,
    .quantize = qlp_4bit_quantize,
    .materialize = qlp_4bit_materialize,
    .save = qlp_4bit_save,
    .load = qlp_4bit_load,
    .free_state = qlp_4bit_free_state,
    .state_info = qlp_4bit_state_info,
    .checkpoint_config = qlp_4bit_checkpoint_config,
};

QL_PLUGIN_EXPORT const ql_quantizer_desc *ql_quantizer_entry(void) { return &descriptor; }
