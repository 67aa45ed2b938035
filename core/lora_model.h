/* Forward and backward of a LLaMA model with LoRA adapters over frozen
 * (possibly quantized) weights, a micro-batch at a time (internal).
 *
 * A ql_lora_model is made once per run for the largest micro-batch (B
 * sequences of up to T tokens): it computes the memory plan (plan.h), and
 * allocates its arenas unless only the plan is wanted; steps then allocate
 * nothing.  Every linear is one matmul over the micro-batch's B*T rows, and
 * quantized weights are materialized once per micro-batch and pass (again in
 * backward: nothing is kept). */
#ifndef QL_LORA_MODEL_H
#define QL_LORA_MODEL_H

#include <stdint.h>
#include <stdio.h>

#include "backend.h"
#include "qlora/dataset.h"
#include "qlora/llama.h"
#include "qlora/lora.h"

typedef struct ql_lora_model ql_lora_model;

enum {
    QL_OPTIM_HOST = 0,   /* on the host: gradients pulled, parameters pushed every step */
    QL_OPTIM_DEVICE = 1, /* the moments in the plan (device memory), the step there: "adamw" */
    QL_OPTIM_PAGED = 2,  /* the moments in page-locked host memory, streamed through the device in chunks
                          * for the step: "paged_adamw" (device memory: two chunks) */
};

/* --optim: "adamw" (QL_OPTIM_DEVICE on a device), "paged_adamw" or
 * "paged_adamw_32bit" (QL_OPTIM_PAGED), "auto"/NULL (paged on a device); on
 * the CPU every name means the host loop.  Unknown names are QL_EINVAL. */
int ql_optim_parse(const char *name, const ql_backend *be, int *out);
/* --offload: "on" 1, "off" -1, "auto"/NULL 0 (ql_lora_model_opts.offload) */
int ql_offload_parse(const char *name, int *out);
const char *ql_optim_name(int optimizer);

typedef struct ql_lora_model_opts {
    int batch;         /* most sequences in a micro-batch */
    int max_len;       /* most tokens in a sequence */
    int checkpointing; /* keep only each layer's input; recompute the rest in backward */
    int backward;      /* 0: plan for loss only (evaluation) */
    int allocate;      /* 0: compute the plan only (--dry-run) */
    const ql_adamw *opt; /* counted in the plan when not NULL */
    int64_t logit_rows;  /* logits rows computed at a time; 0: as many as fit in 64 MiB */
    int precision;       /* QL_PREC_FP32 (0) or QL_PREC_BF16 (backend.h); set on the context */
    int optimizer;       /* where AdamW runs on a device backend (QL_OPTIM_*; the CPU: on the host) */
    /* a second materialized-weight buffer, so that the next quantized
     * linear's weights are materialized on the side queue while the current
     * one computes: 0 (auto): on a device backend when every quantized
     * layer has device kernels; -1 off; 1 on (also on the CPU, in order) */
    int prefetch;
    /* bf16 checkpointing on a device: the layer inputs kept for the backward
     * in page-locked host memory instead of device memory, copied out and
     * back on the copy queue while the layers compute (two device staging
     * buffers): 0 (auto): on with a device backend; -1 off; 1 on (also on
     * the CPU, in order) */
    int offload;
    /* > 0: a key/value cache of that many positions in backend memory, for
     * ql_lora_model_decode (generation); forward only.  With batch > 1, a
     * cache row a sequence (ql_lora_model_decode_rows); decode uses row 0, and
     * max_len is then the most tokens one pass of decode takes (a longer
     * prompt goes through in pieces of max_len). */
    int kv_capacity;
    /* 1: for ql_lora_model_merged_weights (qlora merge): a float32 matrix
     * of the largest linear, dense ones too; float32 precision, forward
     * only, no prefetching */
    int merge;
} ql_lora_model_opts;

/* lora may be NULL (base model only, no backward); ctx NULL means the
 * model's own (ql_llama_ctx).  An out-of-memory is QL_ENOMEM with the plan
 * and what to reduce in the message. */
int ql_lora_model_create(ql_llama *m, ql_lora *lora, ql_be_ctx *ctx, const ql_lora_model_opts *o,
                         ql_lora_model **out);
void ql_lora_model_destroy(ql_lora_model *lm);
void ql_lora_model_print_plan(const ql_lora_model *lm, FILE *f);
/* Bytes of a plan role (plan.h), of the whole plan (-1), or of its arenas in
 * backend memory (-2). */
uint64_t ql_lora_model_plan_bytes(const ql_lora_model *lm, int role);

/* The LoRA parameters on a backend whose memory is not the host's (CUDA):
 * the step reads the backend copies and adds gradients into backend
 * buffers, while the optimizer updates lora->params on the host.  So a
 * trainer zeroes the gradients before a step's micro-batches, pulls them into
 * lora->grads after, and pushes lora->params after every update (and after
 * loading a checkpoint).  On the CPU these clear lora->grads or do nothing. */
int ql_lora_model_zero_grads(ql_lora_model *lm);
/* After the micro-batches of a step: the gradients (added since zero_grads)
 * clipped to a norm of max_norm (0: no clipping), *norm the norm before;
 * then an AdamW step at lr.  With the plan's device optimizer both run on the
 * backend (lora->params and opt's moments on the host are then stale until
 * ql_lora_model_pull_state); else on the host, as ql_clip_grad_norm and
 * ql_adamw_update (the gradients pulled, the parameters pushed after). */
int ql_lora_model_clip_grads(ql_lora_model *lm, double max_norm, double *norm);
int ql_lora_model_optimizer_step(ql_lora_model *lm, ql_adamw *opt, float lr);
/* The parameters (and, with the device optimizer, opt's moments) to the host
 * (before writing a checkpoint or an adapter) and back (after reading one). */
int ql_lora_model_pull_state(ql_lora_model *lm, ql_adamw *opt);
int ql_lora_model_push_state(ql_lora_model *lm, const ql_adamw *opt);
int ql_lora_model_pull_grads(ql_lora_model *lm);
int ql_lora_model_push_params(ql_lora_model *lm);

/* A micro-batch: B sequences right-padded to T (the longest). */
typedef struct ql_lora_batch {
    int B, T;
    const int32_t *ids;            /* host [B, T]; padding positions are not read */
    const int32_t *labels;         /* host [B, T]; QL_IGNORE_INDEX where no loss is taken */
    const int32_t *len;            /* host [B], each 0..T */
    const uint64_t *dropout_seeds; /* host [B]: sequence b's LoRA dropout masks derive from seeds[b] */
} ql_lora_batch;

/* Gather n examples (n <= the planned batch) into the model's host staging,
 * padded to the longest, with the given dropout seeds (NULL: zeros). */
int ql_lora_model_gather(ql_lora_model *lm, const ql_example *const *ex, int n, const uint64_t *seeds,
                         ql_lora_batch *out);

typedef struct ql_lora_step_opts {
    float loss_scale; /* multiplies every gradient: 1 / (targets in the batch * accumulation) */
    int backward;     /* 0: loss only (no dropout) */
} ql_lora_step_opts;

/* Loss over a micro-batch: in sequence b, position t predicts ids[b, t+1]
 * where labels[b, t+1] != -100 (t + 1 < len[b]).  Each sequence rotates with
 * the RoPE table for its own length (ql_llama_rope(len[b]), taken in order b
 * = 0..B-1 as B one-sequence steps take it: dynamic RoPE past
 * max_position_embeddings is per sequence, and keeps the model's state).  Adds the summed NLL to
 * *loss_sum (summed per sequence, in order, as B one-sequence steps would)
 * and the count to *n_targets; with backward, adds loss_scale *
 * d(sum)/dparams into lora->grads. */
int ql_lora_model_step(ql_lora_model *lm, const ql_lora_batch *mb, const ql_lora_step_opts *opts, double *loss_sum,
                       int64_t *n_targets);

/* Generation through the memory plan's weights (on the plan's backend): the
 * T tokens append to the key/value cache (opts.kv_capacity) after the
 * ql_lora_model_kv_length() positions already in it, through every layer
 * (the same ops as a forward step: RoPE at their positions, the LoRA
 * adapter without dropout, bf16 rounding at layer boundaries in bf16
 * precision), and logits (host [V], may be NULL) gets the next-token logits
 * of the last of them.  Positions past the cache's capacity, or tokens
 * outside the vocabulary, are QL_EINVAL; on failure the cache keeps its
 * length. */
int ql_lora_model_decode(ql_lora_model *lm, const int32_t *tokens, int T, float *logits);
int ql_lora_model_kv_length(const ql_lora_model *lm);
/* Linear (layer, module)'s frozen weights in float32 (materialized through
 * its plugin on the plan's backend) with the adapter's scaling * B A added
 * (the backend's lora_merge), into host[out, in]: on every backend the same
 * bits.  Needs a plan made with opts.merge. */
int ql_lora_model_merged_weights(ql_lora_model *lm, int layer, int module, float *host);
/* keep the first len positions (0: empty) */
void ql_lora_model_kv_truncate(ql_lora_model *lm, int len);
/* Several sequences that share the cache's first kv_length() positions (a
 * plan made with batch > 1 and kv_capacity): kv_fork copies sequence 0's
 * cache (what ql_lora_model_decode wrote) into sequences 1..n-1; then
 * decode_rows runs n sequences of up to T <= the plan's max_len tokens each
 * after it (tokens [n, T], right-padded, len[b] real), as n separate
 * ql_lora_model_decode calls from that cache would, and writes each one's
 * next-token logits of its last real token into logits [n, V] (host).  The
 * cache keeps its length: what the sequences wrote past it is dropped. */
int ql_lora_model_kv_fork(ql_lora_model *lm, int n);
int ql_lora_model_decode_rows(ql_lora_model *lm, int n, const int32_t *tokens, int T, const int *len, float *logits);
/* After decode_rows: sequence `row`'s positions up to len (its real tokens)
 * become the cache's (row 0's, kv_length() = len), so that the next
 * decode continues after that sequence. */
int ql_lora_model_kv_adopt(ql_lora_model *lm, int row, int len);

#endif
