/* A shipped plugin's load() of saved tensors, through the plugin ABI
 * (include/qlora/quantizer.h): built with -DQF_PLUGIN="nf4" (or fp4, int8).
 * The input is a .safetensors file whose tensor names are the suffixes the
 * plugin asks for ("weight", "weight.absmax", "SCB", ...); its __metadata__
 * "rows" and "cols" give the expected shape (absent: unknown, as when
 * inspecting).  A state that loads is described, materialized as F32 and
 * BF16, saved again and freed. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "qlora/dtype.h"
#include "qlora/error.h"
#include "qlora/plugin.h"
#include "qlora/safetensors.h"

#ifndef QF_PLUGIN
#error "build with -DQF_PLUGIN=\"nf4\" or another plugin"
#endif

static ql_qz *qz;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    qf_pin_plugins();
    if (ql_qz_open(QF_PLUGIN, &qz) != QL_OK) {
        fprintf(stderr, "fuzz harness: %s (set QLORA_PLUGIN_PATH to the build's plugins folder)\n", ql_error_message());
        abort();
    }
    return 0;
}

static const ql_tensor *get(void *ctx, const char *suffix) { return ql_st_find(ctx, suffix); }

typedef struct {
    uint64_t bytes;
} sink;

static int put(void *ctx, const ql_tensor *t)
{
    sink *s = ctx;
    if (!t->name || !*t->name || t->dtype < 0 || t->dtype >= QL_DTYPE_COUNT || t->ndim < 0 || t->ndim > QL_MAX_DIMS)
        abort();
    if ((uint64_t)ql_shape_numel(t->shape, t->ndim) * ql_dtype_size(t->dtype) != t->nbytes) abort();
    volatile uint8_t x = 0;
    for (uint64_t i = 0; i < t->nbytes; i++) x ^= ((const uint8_t *)t->data)[i];
    (void)x;
    s->bytes += t->nbytes;
    return QL_OK;
}

static int64_t meta_int(const ql_st_file *f, const char *key)
{
    const char *v = ql_st_metadata(f, key);
    return v ? strtoll(v, NULL, 10) : 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *path = qf_write("layer.safetensors", data, size);
    ql_st_file *f = NULL;
    if (ql_st_open(path, &f) != QL_OK) {
        free(path);
        return 0;
    }
    const ql_quantizer_desc *d = qz->desc;
    ql_matrix_desc md = {.name = "model.layers.0.mlp.down_proj", .rows = meta_int(f, "rows"), .cols = meta_int(f, "cols"),
                         .src_dtype = QL_DTYPE_F32};
    ql_tensor_reader r = {f, get};
    ql_qstate *s = NULL;
    ql_error_clear();
    int rc = d->load(qz->inst, &md, &r, &s);
    if (rc != QL_ENOTFOUND) qf_check_status(rc, "load");
    if (rc == QL_OK) {
        ql_state_info info;
        ql_error_clear();
        rc = d->state_info(qz->inst, s, &info);
        qf_check_status(rc, "state_info");
        if (rc == QL_OK && md.rows > 0 && (info.rows != md.rows || info.cols != md.cols)) abort();
        if (rc == QL_OK && info.rows > 0 && info.cols > 0 && info.rows <= (1 << 20) / info.cols) {
            size_t n = (size_t)(info.rows * info.cols);
            float *w = malloc(n * sizeof *w);
            if (w) {
                ql_error_clear();
                qf_check_status(d->materialize(qz->inst, s, QL_DTYPE_F32, w), "materialize F32");
                ql_error_clear();
                qf_check_status(d->materialize(qz->inst, s, QL_DTYPE_BF16, w), "materialize BF16");
                free(w);
            }
            sink k = {0};
            ql_tensor_writer tw = {&k, put};
            ql_error_clear();
            qf_check_status(d->save(qz->inst, s, &tw), "save");
        }
        d->free_state(qz->inst, s);
    }
    ql_st_close(f);
    free(path);
    return 0;
}
