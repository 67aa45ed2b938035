/* Internal entry points of core/train.c for the fuzz harnesses (fuzz/). */
#ifndef QLORA_TRAIN_INTERNAL_H
#define QLORA_TRAIN_INTERNAL_H

#include <jansson.h>
#include <stdint.h>

#include "qlora/lora.h"

/* The resume loader of `qlora train --resume` on its own: checks
 * ckpt/trainer_state.json against `config` (the resuming run's run_config
 * object), `total` optimizer steps, grad_accum, batch_size and max_len, and
 * reads adapter_model.safetensors and optimizer.safetensors into lora and opt.
 * On success the state's step, micro-batches done and tokens seen are
 * returned. */
int ql_train_load_checkpoint(const char *ckpt, json_t *config, int64_t total, int grad_accum, int batch_size,
                             int max_len, ql_lora *lora, ql_adamw *opt, int64_t *step, int64_t *micro_done,
                             double *tokens_seen);

#endif
