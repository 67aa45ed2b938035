/* Rotary position embedding parameters (internal): read from config.json in
 * either form transformers writes, and the inverse frequencies of each
 * rope_type, computed in the float32 order transformers 5 uses so that q and
 * k rotate by the same angles. */
#ifndef QL_ROPE_H
#define QL_ROPE_H

#include <stdint.h>

#include "qlora/llama.h"

/* The rotary fields of config.json (a json_t *): transformers 5's
 * rope_parameters {rope_theta, rope_type, ...}, or 4.x's top-level
 * rope_theta with rope_scaling {rope_type or type, factor, ...}; when both
 * are there they must describe the same embedding.  max_positions is
 * max_position_embeddings, head_dim the attention head size.  A rope_type,
 * key or value that is not understood is refused with a message naming it. */
int ql_rope_config_parse(const void *config_json, int max_positions, int head_dim, ql_rope_config *out);

/* inv_freq[hd/2] and the factor cos and sin are multiplied by (attn_scale),
 * for a forward call whose positions end at seq_len - 1.  Only dynamic
 * depends on seq_len (see ql_rope_dynamic_len). */
void ql_rope_inv_freq(float *inv_freq, float *attn_scale, const ql_rope_config *r, int hd, int64_t seq_len);

/* The sequence length transformers computes dynamic inv_freq for: its
 * rotary module keeps the longest seq_len seen (`*cached`, start it at 0),
 * recomputes when a call goes beyond it, and goes back to the original
 * frequencies only when a call is shorter than max_position_embeddings.
 * Returns the length to pass to ql_rope_inv_freq. */
int64_t ql_rope_dynamic_len(int64_t *cached, const ql_rope_config *r, int64_t seq_len);

/* The table of model m for a forward call (inference or training) whose
 * positions end at seq_len - 1, keeping m's dynamic-rope state as
 * transformers' rotary module does (core/llama.c). */
void ql_llama_rope(float *inv_freq, float *attn_scale, ql_llama *m, int64_t seq_len);

#endif
