/* Forward and backward of a LLaMA model with LoRA adapters over frozen
 * (possibly quantized) weights, one sequence at a time (internal). */
#ifndef QL_LORA_MODEL_H
#define QL_LORA_MODEL_H

#include <stdint.h>

#include "qlora/llama.h"
#include "qlora/lora.h"

typedef struct ql_lora_step_opts {
    float loss_scale;      /* multiplies every gradient: 1 / (targets in the batch * accumulation) */
    uint64_t dropout_seed; /* LoRA dropout masks derive from it (per layer and module) */
    int checkpointing;     /* keep only each layer's input; recompute the rest in backward */
    int backward;          /* 0: loss only (no dropout) */
} ql_lora_step_opts;

/* Loss over one sequence: position t predicts ids[t+1] where labels[t+1] !=
 * -100.  Adds the summed NLL to *loss_sum and the count to *n_targets; with
 * backward, adds loss_scale * d(sum)/dparams into lora->grads.  lora may be
 * NULL (base model only, no backward). */
int ql_lora_model_step(ql_llama *m, ql_lora *lora, const int32_t *ids, const int32_t *labels, int T,
                       const ql_lora_step_opts *opts, double *loss_sum, int64_t *n_targets);

#endif
