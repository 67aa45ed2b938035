/* QLoRA finetuning: LoRA adapters trained over a frozen, quantized base,
 * with checkpoints that resume bit for bit. */
#ifndef QLORA_TRAIN_H
#define QLORA_TRAIN_H

#include <stdint.h>

#include "calibrate.h"
#include "dataset.h"
#include "lora.h"

#ifdef __cplusplus
extern "C" {
#endif

/* transformers' get_scheduler names: constant ignores the warmup, the
 * others warm up linearly from 0 over ceil(warmup_ratio * steps) steps */
typedef enum { QL_SCHED_CONSTANT, QL_SCHED_LINEAR, QL_SCHED_COSINE, QL_SCHED_CONSTANT_WITH_WARMUP } ql_lr_schedule;

typedef struct ql_train_opts {
    const char *model_dir;
    const char *quantizer; /* "nf4" default; "none" keeps the base dense */
    const char *data_path;
    const char *eval_data_path; /* NULL: no evaluation during training (unless eval_dataset_size) */
    /* hold out this many examples of the training data for evaluation (a
     * fraction of them when below 1), as qlora.py's --eval_dataset_size
     * does with --do_eval; 0: none.  Not with eval_data_path. */
    double eval_dataset_size;
    int64_t max_eval_examples; /* evaluate the first N of the eval set only; <= 0: all */
    const char *output_dir;
    const char *resume_from; /* a checkpoint-N folder or NULL */
    int force;
    ql_dataset_opts data;
    ql_lora_config lora;
    float lr, weight_decay, max_grad_norm;
    double warmup_ratio; /* a double, as transformers' ceil(warmup_ratio * steps) computes it */
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
    int64_t data_seed; /* the data order's seed (HF's data_seed); < 0: seed */
    int shuffle;
    int group_by_length;
    int progress; /* 1: live line on a terminal / JSON lines otherwise */
    int dry_run;  /* print the memory plan to stdout and stop before training */
    const char *device; /* "cpu", "cuda" or "auto" (cuda when present); NULL: cpu */
    const char *precision; /* "fp32", "bf16" or "auto"/NULL: bf16 on cuda, fp32 on the CPU */
    const char *optim;     /* "adamw", "paged_adamw" (= "paged_adamw_32bit") or "auto"/NULL: paged on the GPU */
    /* "on", "off" or "auto"/NULL (on on the GPU): the layer inputs that
     * gradient checkpointing keeps, in page-locked host memory */
    const char *offload;
    /* calibration data for a data-aware quantizer that quantizes the base on
     * load (plugin ABI 1.3); NULL: none */
    const ql_calib_opts *calib;
} ql_train_opts;

void ql_train_opts_default(ql_train_opts *o);
/* "constant", "constant_with_warmup", "linear" or "cosine" */
int ql_lr_schedule_parse(const char *name, ql_lr_schedule *out);
const char *ql_lr_schedule_name(ql_lr_schedule s);
/* The learning rate at optimizer step `step` (0-based) of `total`, as
 * transformers' get_scheduler(name, warmup = ceil(warmup_ratio * total))
 * gives it: warmup lr * step / warmup (0 at the first step), then constant,
 * lr * (total - step) / (total - warmup), or half a cosine to 0; the
 * constant schedule has no warmup. */
float ql_lr_at(const ql_train_opts *o, int64_t step, int64_t total);

int ql_train(const ql_train_opts *o);

#ifdef __cplusplus
}
#endif
#endif
