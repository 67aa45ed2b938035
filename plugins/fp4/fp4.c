/* The fp4 quantizer plugin: FP4 (E2M1), blockwise absmax, optional double
 * quantization; bitsandbytes' storage format, bit for bit. */
#include <qlora/quantizer.h>

#include "bnb4bit.h"

QLP_4BIT_PLUGIN(fp4, QLP_FP4, "FP4 E2M1, blockwise absmax, optional double quantization; bitsandbytes format")
