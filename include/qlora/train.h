/* QLoRA finetuning: LoRA adapters trained over a frozen, quantized base,
 * with checkpoints that resume bit for bit. */
#ifndef QLORA_TRAIN_H
#define QLORA_TRAIN_H

#include <stdint.h>

#include "dataset.h"
#include "lora.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { QL_SCHED_CONSTANT, QL_SCHED_LINEAR, QL_SCHED_COSINE } ql_lr_schedule;

typedef struct ql_train_opts {
    const char *model_dir;
    const char *quantizer; /* "nf4" default; "none" keeps the base dense */
    const char *data_path;
    const char *eval_data_path; /* NULL: no evaluation during training */
    const char *output_dir;
    const char *resume_from; /* a checkpoint-N folder or NULL */
    int force;
    ql_dataset_opts data;
    ql_lora_config lora;
    float lr, weight_decay, max_grad_norm, warmup_ratio;
    float beta1, beta2, eps;
    ql_lr_schedule schedule;
    int batch_size, grad_accum;
    int64_t steps;  /* optimizer steps; 0: from epochs */
    double epochs;  /* used when steps == 0 */
    int gradient_checkpointing;
    int64_t save_steps; /* 0: only the final checkpoint */
    /* checkpoint-N folders kept in the run folder, the newest ones: after
     * each save, older checkpoints qlora wrote there are deleted; 0: all */
    int64_t save_total_limit;
    int64_t eval_steps; /* 0: evaluate only at the end (when eval data is given) */
    int64_t seed;
    int shuffle;
    int group_by_length;
    int progress; /* 1: live line on a terminal / JSON lines otherwise */
    int dry_run;  /* print the memory plan to stdout and stop before training */
    const char *device; /* "cpu", "cuda" or "auto" (cuda when present); NULL: cpu */
    const char *precision; /* "fp32", "bf16" or "auto"/NULL: bf16 on cuda, fp32 on the CPU */
    const char *optim;     /* "adamw", "paged_adamw" (= "paged_adamw_32bit") or "auto"/NULL: paged on the GPU */
} ql_train_opts;

void ql_train_opts_default(ql_train_opts *o);
int ql_lr_schedule_parse(const char *name, ql_lr_schedule *out);
/* The learning rate at optimizer step `step` (0-based) of `total`. */
float ql_lr_at(const ql_train_opts *o, int64_t step, int64_t total);

int ql_train(const ql_train_opts *o);

#ifdef __cplusplus
}
#endif
#endif
