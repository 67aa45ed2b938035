/* LLaMA-family decoder models (LlamaForCausalLM, MistralForCausalLM,
 * Qwen2ForCausalLM, Qwen3ForCausalLM): load
 * from a Hugging Face folder, optionally quantizing the block linears through
 * a plugin, and run the forward pass on the CPU reference backend. */
#ifndef QLORA_LLAMA_H
#define QLORA_LLAMA_H

#include <stddef.h>
#include <stdint.h>

#include "calibrate.h"
#include "plugin.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Rotary position embedding as transformers computes it (its rope_type). */
typedef enum ql_rope_type {
    QL_ROPE_DEFAULT, /* inv_freq[i] = theta^(-2i/d) */
    QL_ROPE_LINEAR,  /* inv_freq / factor */
    QL_ROPE_DYNAMIC, /* NTK: theta grows with the sequence length past max_position_embeddings */
    QL_ROPE_YARN,    /* interpolation/extrapolation blend by a linear ramp, cos and sin scaled */
    QL_ROPE_LLAMA3,  /* Llama 3.1: low frequencies / factor, a smooth band in between */
} ql_rope_type;

/* config.json's rope_parameters (transformers 5) or rope_theta and
 * rope_scaling (4.x), read into one description.  Numbers stay doubles as
 * transformers keeps them in Python; they are rounded to float32 where it
 * does (core/rope.c). */
typedef struct ql_rope_config {
    ql_rope_type type;
    double theta;            /* rope_theta, 10000 when absent */
    double factor;           /* 1 for default */
    /* yarn, llama3: original_max_position_embeddings (max_position_embeddings
     * when absent); dynamic: max_position_embeddings */
    int original_max_positions;
    double low_freq_factor, high_freq_factor; /* llama3 */
    double beta_fast, beta_slow;              /* yarn: 32 and 1 when absent (or 0) */
    int truncate;                             /* yarn: floor/ceil the correction range (true when absent) */
    double attention_factor; /* yarn: given, or from factor, mscale and mscale_all_dim; 1 for the others */
} ql_rope_config;

typedef struct ql_llama_config {
    char architecture[64];
    int hidden;        /* hidden_size */
    int intermediate;  /* intermediate_size */
    int n_layers;      /* num_hidden_layers */
    int n_heads;       /* num_attention_heads */
    int n_kv_heads;    /* num_key_value_heads */
    int head_dim;      /* hidden / n_heads unless config says */
    int vocab;         /* vocab_size */
    int max_positions; /* max_position_embeddings */
    /* The longest sequence qlora runs: max_positions, except with dynamic
     * RoPE, which exists to run past it: max_positions * factor (the length
     * at which its NTK base reaches factor times the trained context). */
    int max_len;
    float rms_eps;
    ql_rope_config rope;
    int dtype; /* dtype or torch_dtype: QL_DTYPE_F32 (also when absent), _BF16 or _F16; weights are
                * converted to float32 whatever it says */
    int tied_embeddings;
    int bos_id, eos_id;
    /* Sliding-window attention: in a sliding layer query i sees keys j with
     * i - W < j <= i (W = sliding_window).  0 when no layer slides. */
    int sliding_window;
    int n_sliding_layers; /* how many layers slide (ql_llama_layer.window) */
    int qkv_bias;         /* q, k, v projections have biases (Qwen2; attention_bias) */
    int o_bias;           /* o_proj has a bias (Qwen3 / Llama attention_bias) */
    int mlp_bias;         /* gate, up, down have biases (Llama mlp_bias) */
    int qk_norm;          /* RMSNorm over head_dim on each q and k head before RoPE (Qwen3) */
} ql_llama_config;

/* Read and check config.json (a jansson json_t *).  An unsupported
 * architecture is an error that names it. */
int ql_llama_config_parse(const void *config_json, ql_llama_config *out);

/* One linear layer: dense float32 weights, or a plugin's packed state that
 * is materialized on use and never kept. */
typedef struct ql_linear {
    const char *name; /* module prefix */
    int64_t out, in;
    float *dense;          /* [out, in] or NULL */
    float *bias;           /* [out] dense float32, frozen, or NULL */
    const ql_qz *qz;       /* with state when quantized */
    ql_qstate *state;
    /* An attached LoRA adapter (ql_lora_attach): y += scale * (x A^T) B^T */
    const float *lora_a, *lora_b; /* [r, in], [out, r] or NULL */
    int64_t lora_r;
    float lora_scale;
} ql_linear;

typedef struct ql_llama_layer {
    float *attn_norm; /* [hidden] */
    float *mlp_norm;  /* [hidden] */
    float *q_norm;    /* [head_dim] per-head RMSNorm of q before RoPE (Qwen3), or NULL */
    float *k_norm;    /* [head_dim] the same for k, or NULL */
    int window;       /* sliding attention window; 0 = full causal */
    ql_linear q, k, v, o, gate, up, down;
} ql_llama_layer;

typedef struct ql_llama ql_llama;

typedef struct ql_llama_load_opts {
    /* NULL or "none": keep a full-precision checkpoint dense; otherwise the
     * quantizer spec for the block linears.  A checkpoint that is already
     * quantized is used as it is. */
    const char *quantizer;
    /* NULL when `quantizer` comes from the command line, which may name a
     * plugin by path; otherwise the file it was read from (a run folder's
     * run_config.json, field "quantizer"), and then only a plugin name on the
     * search path is taken (ql_qz_open_from_file). */
    const char *quantizer_file;
    int progress;
    /* Calibration data for a data-aware quantizer (plugin ABI 1.3) on a
     * full-precision checkpoint: the model loads dense, then the
     * layer-sequential pass quantizes it.  NULL (or calib->data NULL) with a
     * quantizer that needs calibration is QL_EINVAL naming --calib-data. */
    const ql_calib_opts *calib;
    /* Where a full-precision checkpoint's block linears are quantized on
     * load: NULL or "cpu", "cuda" (the plugin's quantize_device, plugin ABI
     * 1.2: the checkpoint's bf16 or float32 bytes go to the GPU as they are
     * and the state comes back, bit for bit the CPU's; a plugin without the
     * slot quantizes on the CPU after a warning), or "auto" (cuda when a GPU
     * is present).  Either way each tensor's pages of the mapped shards are
     * given back once it is read, so the dense checkpoint is never in host
     * memory whole.  The calibration pass (calib) runs on the CPU. */
    const char *device;
    /* 1: `quantizer` is a default, not the user's choice: a checkpoint that
     * is already quantized is used as it is without a warning */
    int quantizer_is_default;
} ql_llama_load_opts;

int ql_llama_load(const char *dir, const ql_llama_load_opts *opts, ql_llama **out);
void ql_llama_destroy(ql_llama *m);
/* A model of config.json text `config_json` with random weights of realistic
 * scale, for benchmarks and tests: embeddings, output layer and linears
 * normal with standard deviation 0.02, norms 1; linears quantized with
 * `quantizer` ("none" or NULL: dense).  share != 0: every layer uses layer
 * 0's quantized states (a 70B shape is then quickly made; a backend still
 * gets one copy a layer).  Its tokenizer and folder do not exist. */
int ql_llama_random(const char *config_json, const char *quantizer, uint64_t seed, int share, ql_llama **out);
const ql_llama_config *ql_llama_get_config(const ql_llama *m);
ql_llama_layer *ql_llama_layers(ql_llama *m);
const float *ql_llama_embeddings(const ql_llama *m); /* [vocab, hidden] */
/* "nf4:blocksize=64,double_quant=1" or "none" */
const char *ql_llama_quantization(const ql_llama *m);
/* 1 when the load quantized the model in the calibration pass (opts.calib) */
int ql_llama_calibrated(const ql_llama *m);
const char *ql_llama_dir(const ql_llama *m);
const void *ql_llama_config_json(const ql_llama *m); /* config.json as a jansson json_t * */

/* The final norm weight [hidden] and output layer [vocab, hidden] (the
 * embeddings when tied). */
void ql_llama_output_weights(const ql_llama *m, const float **final_norm, const float **lm_head);

/* Materialize a linear's weights as float32 [out, in] into `w`. */
int ql_linear_weights(const ql_linear *l, float *w);

/* Key/value cache for incremental decoding. */
typedef struct ql_kv_cache ql_kv_cache;
int ql_kv_cache_create(const ql_llama *m, int capacity, ql_kv_cache **out);
void ql_kv_cache_destroy(ql_kv_cache *c);
void ql_kv_cache_reset(ql_kv_cache *c);
int ql_kv_cache_length(const ql_kv_cache *c);
/* Keep the first len positions (0 <= len <= the length; others are clamped):
 * the next forward continues from there. */
void ql_kv_cache_truncate(ql_kv_cache *c, int len);

/* Run T tokens starting at the cache's current length; logits [T, vocab]
 * (logits may be NULL to skip the output layer, or `last_only` to compute
 * only the last row into logits[0..vocab)). */
int ql_llama_forward(ql_llama *m, ql_kv_cache *cache, const int32_t *tokens, int T, float *logits, int last_only);

#ifdef __cplusplus
}
#endif
#endif
