#include "plan.h"

#include <stdlib.h>
#include <string.h>

#include "qlora/error.h"

static const char *const role_names[QL_ROLE_COUNT] = {
    [QL_ROLE_BASE] = "base weights",       [QL_ROLE_LORA] = "LoRA weights (fp32)",
    [QL_ROLE_GRADS] = "LoRA gradients",    [QL_ROLE_OPTIM] = "optimizer state",
    [QL_ROLE_ACTS] = "activations",        [QL_ROLE_BWD] = "backward scratch",
    [QL_ROLE_WEIGHTS] = "materialized weights", [QL_ROLE_LOGITS] = "logits (chunked)",
    [QL_ROLE_HOST] = "host staging",       [QL_ROLE_PINNED] = "offloaded (pinned)",
};

const char *ql_plan_role_name(int role) { return role >= 0 && role < QL_ROLE_COUNT ? role_names[role] : "?"; }

void ql_plan_init(ql_plan *p, ql_be_ctx *ctx)
{
    memset(p, 0, sizeof *p);
    p->ctx = ctx;
    p->on_host[QL_ROLE_PINNED] = ctx && !ctx->be->host_memory; /* beside a device: not in its total */
}

/* the pinned arena: host memory, page-locked beside a device */
static int pinned_alloc(ql_plan *p, size_t bytes)
{
    size_t n = (bytes + 4095) / 4096 * 4096;
    void *a = aligned_alloc(4096, n);
    if (!a) return ql_error(QL_ENOMEM, "out of host memory: cannot allocate %.1f MiB", (double)n / 1048576.0);
    if (p->on_host[QL_ROLE_PINNED] && ql_be(p->ctx, pin, a, n)) {
        free(a);
        return ql_be_check(p->ctx);
    }
    p->arena[QL_ROLE_PINNED] = a;
    return QL_OK;
}

static void pinned_free(ql_plan *p)
{
    if (p->on_host[QL_ROLE_PINNED]) p->ctx->be->unpin(p->ctx, p->arena[QL_ROLE_PINNED]);
    free(p->arena[QL_ROLE_PINNED]);
}

static int add_size(size_t *acc, uint64_t b)
{
    if (b > SIZE_MAX - *acc) return 0;
    *acc += (size_t)b;
    return 1;
}

void ql_plan_held(ql_plan *p, int role, uint64_t bytes)
{
    if (!add_size(&p->bytes[role], bytes)) p->overflow = 1;
}

void ql_plan_held_host(ql_plan *p, int role, uint64_t bytes)
{
    ql_plan_held(p, role, bytes);
    p->on_host[role] = 1;
}

static int is_arena(const ql_plan *p, int r) { return r >= QL_PLAN_FIRST_ARENA || p->n_in_role[r] > 0; }

void ql_plan_add(ql_plan *p, int role, void **dst, int64_t count, size_t elem)
{
    *dst = NULL;
    if (count <= 0) return;
    if ((uint64_t)count > (SIZE_MAX - QL_PLAN_ALIGN) / elem) {
        p->overflow = 1;
        return;
    }
    size_t bytes = (size_t)count * elem, padded = (bytes + QL_PLAN_ALIGN - 1) / QL_PLAN_ALIGN * QL_PLAN_ALIGN;
    if (p->n_bufs == p->cap_bufs) {
        size_t cap = p->cap_bufs ? 2 * p->cap_bufs : 64;
        ql_plan_buf *nb = realloc(p->bufs, cap * sizeof *nb);
        if (!nb) {
            p->overflow = 1;
            return;
        }
        p->bufs = nb;
        p->cap_bufs = cap;
    }
    ql_plan_buf *b = &p->bufs[p->n_bufs++];
    b->role = role;
    b->dst = dst;
    b->offset = p->bytes[role];
    b->bytes = bytes;
    p->n_in_role[role]++;
    if (!add_size(&p->bytes[role], padded)) p->overflow = 1;
}

uint64_t ql_plan_total(const ql_plan *p)
{
    uint64_t t = 0;
    for (int r = 0; r < QL_ROLE_COUNT; r++)
        if (!p->on_host[r]) t += p->bytes[r];
    return t;
}

uint64_t ql_plan_backend_bytes(const ql_plan *p)
{
    uint64_t t = 0;
    for (int r = 0; r < QL_ROLE_COUNT; r++)
        if (is_arena(p, r) && r != QL_ROLE_HOST && !(r == QL_ROLE_PINNED && p->on_host[r])) t += p->bytes[r];
    return t;
}

static void format_size(char *buf, size_t cap, uint64_t b)
{
    if (b >= (UINT64_C(1) << 30)) snprintf(buf, cap, "%.2f GiB", (double)b / (double)(UINT64_C(1) << 30));
    else if (b >= (UINT64_C(1) << 20)) snprintf(buf, cap, "%.2f MiB", (double)b / (double)(UINT64_C(1) << 20));
    else snprintf(buf, cap, "%.1f KiB", (double)b / 1024.0);
}

/* the plan as text into buf (cap bytes) */
static void plan_text(const ql_plan *p, char *buf, size_t cap)
{
    size_t n = 0;
    char sz[64];
#define PUT(...) (n += (size_t)snprintf(buf + n, n < cap ? cap - n : 0, __VA_ARGS__), n = n < cap ? n : cap)
    PUT("memory plan (%s):\n", p->shape);
    for (int r = 0; r < QL_ROLE_COUNT; r++) {
        format_size(sz, sizeof sz, p->bytes[r]);
        PUT("  %-22s %12s  %s\n", role_names[r], sz,
            r == QL_ROLE_PINNED && p->on_host[r] ? "(arena, page-locked host memory, not in the total)"
            : r == QL_ROLE_PINNED ? "(arena)"
            : p->on_host[r] ? "(host memory, not in the total)" : r == QL_ROLE_HOST ? "(arena, host memory)"
            : is_arena(p, r) ? "(arena)" : "(held by its owner)");
    }
    format_size(sz, sizeof sz, ql_plan_total(p));
    PUT("  %-22s %12s%s\n", "total", sz, p->overflow ? "  (overflows: sizes do not fit in memory addresses)" : "");
    if (p->ctx && !p->ctx->be->host_memory) {
        format_size(sz, sizeof sz, ql_plan_backend_bytes(p));
        PUT("  %-22s %12s  (the arenas in %s memory)\n", "on the device", sz, p->ctx->be->name);
    }
#undef PUT
}

void ql_plan_print(const ql_plan *p, FILE *f)
{
    char buf[4096];
    plan_text(p, buf, sizeof buf);
    fputs(buf, f);
}

int ql_plan_alloc(ql_plan *p)
{
    int failed = -1;
    if (!p->overflow)
        for (int r = 0; r < QL_ROLE_COUNT && failed < 0; r++) {
            if (!p->bytes[r] || !is_arena(p, r)) continue;
            if (r == QL_ROLE_HOST) {
                p->arena[r] = malloc(p->bytes[r]);
                if (!p->arena[r]) failed = r;
            } else if (r == QL_ROLE_PINNED) {
                if (pinned_alloc(p, p->bytes[r])) failed = r;
            } else if (ql_be(p->ctx, alloc, &p->arena[r], p->bytes[r])) {
                ql_be_check(p->ctx);
                p->arena[r] = NULL;
                failed = r;
            }
        }
    if (p->overflow || failed >= 0) {
        char text[4096], sz[64];
        plan_text(p, text, sizeof text);
        format_size(sz, sizeof sz, failed >= 0 ? p->bytes[failed] : 0);
        ql_plan_free(p);
        if (failed == QL_ROLE_PINNED) /* host memory that could not be had or page-locked */
            return ql_error(QL_ENOMEM, "cannot allocate and page-lock the %s arena (%s) in host memory for this %s%s, "
                            "or keep it on the device with --offload off", role_names[failed], sz, text, p->advice);
        if (failed >= 0)
            return ql_error(QL_ENOMEM, "out of memory for the %s arena (%s) of this %s%s", role_names[failed], sz,
                            text, p->advice);
        return ql_error(QL_ENOMEM, "the buffers do not fit in memory addresses: %s%s", text, p->advice);
    }
    for (size_t i = 0; i < p->n_bufs; i++) *p->bufs[i].dst = (char *)p->arena[p->bufs[i].role] + p->bufs[i].offset;
    return QL_OK;
}

void ql_plan_free(ql_plan *p)
{
    for (int r = 0; r < QL_ROLE_COUNT; r++) {
        if (!p->arena[r]) continue;
        if (r == QL_ROLE_HOST) free(p->arena[r]);
        else if (r == QL_ROLE_PINNED) pinned_free(p);
        else p->ctx->be->free(p->ctx, p->arena[r]);
        p->arena[r] = NULL;
    }
    for (size_t i = 0; i < p->n_bufs; i++) *p->bufs[i].dst = NULL;
    free(p->bufs);
    p->bufs = NULL;
    p->n_bufs = p->cap_bufs = 0;
}
