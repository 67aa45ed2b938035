/* Calibration for data-aware quantizers (plugin ABI 1.3): the token windows
 * of a calibration set, and the layer-sequential pass that feeds each block
 * linear the inputs it sees at inference, as IST-DASLab/gptq's llama.py
 * does (docs/plugin-abi.md, "Calibration (1.3)"). */
#ifndef QLORA_CALIBRATE_H
#define QLORA_CALIBRATE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QL_CALIB_DEFAULT_SAMPLES 128
#define QL_CALIB_DEFAULT_LEN 512

typedef struct ql_calib_opts {
    const char *data;   /* the calibration file (a dataset of any ql_data_format); NULL: no calibration */
    const char *format; /* "text", "alpaca", ...; NULL: detected from the file */
    int samples;        /* windows; <= 0: QL_CALIB_DEFAULT_SAMPLES */
    int len;            /* tokens a window; <= 0: QL_CALIB_DEFAULT_LEN */
    uint64_t seed;      /* where the windows start */
    const char *save_tokens; /* NULL, or a file that gets the windows as JSON {"samples", "len", "tokens": [[...]]} */
    int progress;
} ql_calib_opts;

/* The calibration windows: every example of the file tokenized as the
 * dataset loader does (BOS + text; source + target for the instruction
 * formats), joined into one stream, and `samples` windows of `len`
 * consecutive tokens starting at positions drawn uniformly from
 * [0, stream - len) by splitmix64 seeded with `seed` (llama.py's
 * get_wikitext2 draws the same way with Python's random).  tokens gets
 * samples * len ids (caller frees); a stream shorter than len + 1 tokens is
 * QL_EINVAL naming the file and both numbers. */
int ql_calib_tokens(const ql_calib_opts *opts, const char *model_dir, int max_len, int32_t **tokens, int *samples,
                    int *len);

#ifdef __cplusplus
}
#endif
#endif
