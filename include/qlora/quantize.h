/* The quantize, compare and inspect jobs behind the command line. */
#ifndef QLORA_QUANTIZE_H
#define QLORA_QUANTIZE_H

#include <stdio.h>

#include "calibrate.h"
#include "plugin.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ql_quantize_opts {
    int force;    /* replace an existing output folder */
    int progress; /* 1: report progress on stderr */
    /* Where the quantizer runs: "cpu" (also NULL), "cuda" (the plugin's
     * quantize_device on the GPU, byte-identical files; a plugin without it
     * quantizes on the CPU with a warning) or "auto" (cuda when a device is
     * present and the plugin has quantize_device, else cpu). */
    const char *device;
    /* Calibration data for a data-aware quantizer (plugin ABI 1.3); NULL or
     * calib->data NULL: none, and a quantizer that needs it is refused
     * before anything is written.  With data, the model is loaded and
     * quantized in the layer-sequential pass (on the CPU). */
    const ql_calib_opts *calib;
} ql_quantize_opts;

/* Quantize every block linear of MODEL_DIR into OUT_DIR in the layout that
 * transformers + bitsandbytes write; everything else is copied unchanged.
 * An unavailable --device cuda fails before anything is written. */
int ql_quantize_model(const char *model_dir, const char *spec, const char *out_dir,
                      const ql_quantize_opts *opts);

typedef struct ql_compare_opts {
    const char *json_path; /* write results here (atomically) when non-NULL */
    int per_layer;         /* print one row per layer too */
    int progress;
    /* Calibration data: a data-aware quantizer that needs it (optq, not
     * optq:rtn=1) is quantized in the layer-sequential pass, as quantize
     * does; the others ignore it.  NULL or calib->data NULL: such a
     * quantizer is refused, saying what to pass. */
    const ql_calib_opts *calib;
} ql_compare_opts;

/* Quantize each block linear with each quantizer in the comma-separated
 * list and report bits/param, bytes, relative and max abs error, and time. */
int ql_compare_model(const char *model_dir, const char *spec_list, const ql_compare_opts *opts,
                     FILE *out);

/* Describe a safetensors file: tensors, dtypes, shapes, sizes, and for
 * quantized layers the quantizer, options and bits per parameter. */
int ql_inspect_file(const char *path, int as_json, FILE *out);

#ifdef __cplusplus
}
#endif
#endif
