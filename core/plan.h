/* A memory plan (internal): every buffer a training step uses is listed,
 * sized and placed before the first step, in one arena per role, allocated
 * once; the step then allocates nothing.  Roles held elsewhere (the
 * quantized base, LoRA weights and gradients, optimizer state) are counted
 * so the plan shows the whole footprint.
 *
 * Use: ql_plan_init, ql_plan_held for what others own, ql_plan_add for every
 * buffer (it records where to store the pointer), then ql_plan_alloc, which
 * allocates the arenas and sets every pointer; ql_plan_print shows it. */
#ifndef QL_PLAN_H
#define QL_PLAN_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "backend.h"

typedef enum ql_plan_role {
    /* held by their owners (counted, not allocated here) */
    QL_ROLE_BASE,    /* the (quantized) base model: embeddings, norms, linears */
    QL_ROLE_LORA,    /* LoRA master weights, fp32 */
    QL_ROLE_GRADS,   /* their gradients */
    QL_ROLE_OPTIM,   /* AdamW moments */
    /* arenas of the plan */
    QL_ROLE_ACTS,    /* activations kept for backward (for B, T, checkpointing) */
    QL_ROLE_BWD,     /* backward scratch */
    QL_ROLE_WEIGHTS, /* one materialized (dequantized) weight matrix */
    QL_ROLE_LOGITS,  /* logits and their gradient, a chunk of rows at a time */
    QL_ROLE_HOST,    /* host staging: token ids, labels, targets, per-row losses */
    QL_ROLE_PINNED,  /* offloaded from a device: page-locked host memory the copy queue reads and writes */
    QL_ROLE_COUNT
} ql_plan_role;

#define QL_PLAN_FIRST_ARENA QL_ROLE_ACTS
#define QL_PLAN_ALIGN 256 /* the most a plugin state buffer may ask for (ql_state_buffer.align) */

typedef struct ql_plan_buf {
    int role;
    void **dst;
    size_t offset, bytes;
} ql_plan_buf;

typedef struct ql_plan {
    ql_be_ctx *ctx;
    size_t bytes[QL_ROLE_COUNT];
    void *arena[QL_ROLE_COUNT];
    ql_plan_buf *bufs;
    size_t n_bufs, cap_bufs;
    size_t n_in_role[QL_ROLE_COUNT]; /* buffers placed in each role: a held role with buffers is an arena */
    int on_host[QL_ROLE_COUNT];      /* held in host memory while the arenas are on a device */
    int overflow;     /* a size did not fit in size_t, or the list could not grow */
    char shape[256];  /* what the plan is for ("batch 4 x 256 tokens, checkpointing off, ...") */
    char advice[256]; /* what to reduce when it does not fit */
} ql_plan;

const char *ql_plan_role_name(int role);

void ql_plan_init(ql_plan *p, ql_be_ctx *ctx);
/* Count `bytes` held elsewhere under a held role (ql_plan_held_host: in
 * host memory although the plan's arenas are on a device).  A held role
 * given buffers with ql_plan_add instead becomes an arena of the plan (the
 * weights on a device); one role is either, never both. */
void ql_plan_held(ql_plan *p, int role, uint64_t bytes);
void ql_plan_held_host(ql_plan *p, int role, uint64_t bytes);
/* A buffer of count * elem bytes in arena `role`; *dst gets its address at
 * ql_plan_alloc.  count <= 0 adds nothing and leaves *dst NULL. */
void ql_plan_add(ql_plan *p, int role, void **dst, int64_t count, size_t elem);
/* Allocate every arena and set the pointers.  Out of memory (or sizes that
 * overflow) is QL_ENOMEM with the whole plan and p->advice in the message. */
int ql_plan_alloc(ql_plan *p);
/* Total bytes of the plan (held roles included, host-held ones and, beside
 * a device, the pinned arena not). */
uint64_t ql_plan_total(const ql_plan *p);
/* Bytes the plan takes in backend memory: its arenas other than host staging. */
uint64_t ql_plan_backend_bytes(const ql_plan *p);
/* The plan as lines "  role  size" and a total. */
void ql_plan_print(const ql_plan *p, FILE *f);
void ql_plan_free(ql_plan *p);

#endif
