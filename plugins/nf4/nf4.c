/* The nf4 quantizer plugin: NormalFloat4 (QLoRA), blockwise absmax, optional
 * double quantization; bitsandbytes' storage format, bit for bit. */
#include <qlora/quantizer.h>

#include "bnb4bit.h"

QLP_4BIT_PLUGIN(nf4, QLP_NF4, "NormalFloat4 (QLoRA), blockwise absmax, optional double quantization; bitsandbytes format")
