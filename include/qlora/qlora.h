/* Umbrella header for libqlora. */
#ifndef QLORA_QLORA_H
#define QLORA_QLORA_H

#include "quantizer.h"
#include "error.h"
#include "dtype.h"
#include "fs.h"
#include "safetensors.h"
#include "plugin.h"
#include "model.h"
#include "quantize.h"

const char *ql_version(void);

#endif
