/* qlora bench: the engine's own speed and memory at the shapes of real
 * models, with random weights of realistic scale (ql_llama_random). */
#ifndef QLORA_BENCH_H
#define QLORA_BENCH_H

#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ql_bench_opts {
    /* step: "7b,13b,33b,65b,70b" (any subset, comma-separated; NULL: 7b);
     * materialize, linear: matrices "ROWSxCOLS,..." (NULL: 4096x4096,
     * 11008x4096,28672x8192) */
    const char *shapes;
    const char *device;    /* "cuda", "cpu" or "auto" */
    const char *precision; /* "fp32", "bf16" or "auto" */
    const char *quantizer; /* "nf4" by default */
    const char *optim;     /* "adamw", "paged_adamw" or "auto" (paged on the GPU) */
    int layers;            /* 0: the shape's own; else this many decoder layers (quick runs) */
    int seq, batch;        /* tokens per sequence (2048), sequences per step (1) */
    int lora_r;            /* 64 */
    float lora_dropout;    /* 0.1, as the QLoRA paper for 7B and 13B */
    int steps, warmup;     /* timed steps (5), untimed first (2) */
    int progress;          /* per-step JSON lines on stderr */
    int tokens;            /* linear: rows of the activation (4096) */
    const char *offload;   /* step: "on", "off" or "auto" (ql_train_opts.offload) */
    int plan;              /* step: each shape's memory plan on stderr */
} ql_bench_opts;

void ql_bench_opts_default(ql_bench_opts *o);

/* The training step (forward, backward with gradient checkpointing, LoRA on
 * every linear, AdamW) of each shape: one JSON line per shape on `json`
 * (NULL: none), and a table on `table` (NULL: none). */
int ql_bench_step(const ql_bench_opts *o, FILE *json, FILE *table);

/* what = "materialize": the quantizer's materialize to bf16 of each matrix
 * (o->shapes), against a copy of as many bytes in backend memory; "linear":
 * the 4-bit linear forward (materialize, then the bf16 product) of
 * o->tokens rows against the same product with bf16 weights.  Medians of
 * o->steps samples after o->warmup; a JSON line per matrix and a table. */
int ql_bench_kernels(const ql_bench_opts *o, const char *what, FILE *json, FILE *table);

#ifdef __cplusplus
}
#endif
#endif
