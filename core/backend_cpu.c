#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "ops.h"
#include "ops_backward.h"

static void *cpu_alloc(size_t bytes) { return malloc(bytes ? bytes : 1); }
static void cpu_free(void *p) { free(p); }
static void cpu_zero(void *p, size_t bytes) { memset(p, 0, bytes); }
static void cpu_copy(void *dst, const void *src, size_t bytes) { memmove(dst, src, bytes); }

static int cpu_materialize(const ql_linear *l, float *w) { return ql_linear_weights(l, w); }

static void cpu_embedding(float *out, const float *table, const int32_t *ids, int64_t T, int64_t C)
{
    for (int64_t t = 0; t < T; t++) memcpy(out + t * C, table + (int64_t)ids[t] * C, (size_t)C * sizeof *out);
}

static double cpu_cross_entropy(float *dlogits, const float *logits, const int32_t *targets, int64_t T, int64_t V,
                                int32_t ignore_index, float scale)
{
    return ql_cross_entropy_forward_backward(NULL, dlogits, logits, targets, T, V, ignore_index, scale);
}

static const ql_backend cpu_backend = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .free = cpu_free,
    .zero = cpu_zero,
    .copy = cpu_copy,
    .upload = cpu_copy,
    .download = cpu_copy,
    .materialize = cpu_materialize,
    .embedding = cpu_embedding,
    .matmul_nt = ql_matmul_nt,
    .rmsnorm_forward = ql_rmsnorm_forward,
    .rope_forward = ql_rope_forward,
    .attention_forward = ql_attention_forward,
    .attention_forward_train = ql_attention_forward_train,
    .swiglu_forward = ql_swiglu_forward,
    .add_inplace = ql_add_inplace,
    .lora_forward = ql_lora_forward,
    .dropout_forward = ql_dropout_forward,
    .matmul_backward_input = ql_matmul_backward_input,
    .rmsnorm_backward = ql_rmsnorm_backward,
    .rope_backward = ql_rope_backward,
    .attention_backward = ql_attention_backward,
    .swiglu_backward = ql_swiglu_backward,
    .lora_backward = ql_lora_backward,
    .dropout_backward = ql_dropout_backward,
    .cross_entropy = cpu_cross_entropy,
};

const ql_backend *ql_backend_cpu(void) { return &cpu_backend; }
