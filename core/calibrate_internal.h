/* The calibration pass's hooks into the model (core/llama.c, core/calibrate.c). */
#ifndef QL_CALIBRATE_INTERNAL_H
#define QL_CALIBRATE_INTERNAL_H

#include "qlora/calibrate.h"
#include "qlora/llama.h"

/* The four inputs of a decoder block's linears, in the order the block
 * computes them (llama.py's true-sequential groups). */
enum { QL_BLOCK_QKV, QL_BLOCK_O, QL_BLOCK_GATE_UP, QL_BLOCK_DOWN, QL_BLOCK_GROUPS };

/* Returned by a hook to stop the block there: not an error. */
#define QL_BLOCK_STOP (-1)

/* Called with the input x[rows, cols] of linear group `group`. */
typedef int (*ql_block_hook)(void *ctx, int group, const float *x, int64_t rows, int64_t cols);

/* Decoder block `layer` over one sequence x[T, hidden] in place (positions
 * 0..T-1, no cache), as ql_llama_forward computes it; hook (may be NULL)
 * sees each group's input and may stop the block (QL_BLOCK_STOP, returned
 * as is). */
int ql_llama_block_forward(ql_llama *m, int layer, float *x, int T, ql_block_hook hook, void *hook_ctx);
/* x[T, hidden] = the embeddings of tokens. */
int ql_llama_embed(ql_llama *m, const int32_t *tokens, int T, float *x);

/* Quantize every still-dense block linear of m with q (a data-aware
 * quantizer that m owns) in the layer-sequential pass over the calibration
 * windows of opts; afterwards every linear holds q's state. */
int ql_llama_calibrate(ql_llama *m, const ql_qz *q, const ql_calib_opts *opts);

#endif
