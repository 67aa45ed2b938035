/* Evaluation (mean NLL / perplexity over a dataset's target tokens) and text
 * generation with a loaded model. */
#ifndef QLORA_EVAL_H
#define QLORA_EVAL_H

#include <stdint.h>

#include "dataset.h"
#include "llama.h"
#include "lora.h"
#include "tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ql_eval_result {
    int64_t examples;
    int64_t tokens;  /* predicted (target) tokens */
    double nll_sum;  /* natural log */
} ql_eval_result;

typedef struct ql_eval_opts {
    const ql_lora *lora; /* an adapter applied in the forward pass, or NULL */
    const char *device;  /* "cpu" (also NULL), "cuda", or "auto" (cuda when present) */
    const char *precision; /* "fp32", "bf16" or "auto"/NULL: bf16 on cuda, fp32 on the CPU */
    int batch;           /* sequences per forward pass (padded to the longest); 0: 8 */
    int progress;        /* 1: live line on a terminal / JSON lines otherwise */
} ql_eval_opts;

/* Token t+1 of each example is scored from positions 0..t when its label is
 * not -100.  Examples run in micro-batches of similar length through the
 * training forward pass (the same memory plan), on the chosen device. */
int ql_eval_nll(ql_llama *m, const ql_dataset *d, const ql_eval_opts *o, ql_eval_result *out);

typedef struct ql_generate_opts {
    int max_new_tokens;
    float temperature; /* 0: greedy */
    float top_p;       /* 1: no nucleus cut */
    uint64_t seed;
    /* the LoRA adapter to generate with (NULL: the base model; a model with
     * an adapter attached by ql_lora_attach must pass it here) */
    const ql_lora *lora;
    const char *device;    /* as ql_eval_opts: "cpu" (also NULL), "cuda" or "auto" */
    const char *precision; /* as ql_eval_opts: "fp32", "bf16" or "auto"/NULL */
} ql_generate_opts;

/* One token from logits[V] as ql_generate draws it: the argmax when
 * o->temperature <= 0; otherwise softmax(logits / temperature), cut when
 * 0 < top_p < 1 to the most probable tokens whose probabilities first reach
 * top_p in sum (the token that crosses it is kept), renormalised, and drawn
 * with *rng (xorshift64*, advanced once).  work: V slots of scratch. */
typedef struct ql_sample_slot {
    float p;
    int32_t id;
} ql_sample_slot;
int32_t ql_sample_token(const float *logits, int V, const ql_generate_opts *o, uint64_t *rng, ql_sample_slot *work);

/* Generated text only (the prompt is not repeated); caller frees.  The
 * prompt and every new token go through the training forward pass's memory
 * plan with a key/value cache (ql_lora_model_decode) on the chosen device. */
int ql_generate(ql_llama *m, const ql_tokenizer *tok, const char *prompt, const ql_generate_opts *opts, char **text);

#ifdef __cplusplus
}
#endif
#endif
