#include "qlora/merge.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json_out.h"
#include "lora_model.h"
#include "ops.h"
#include "qlora/dtype.h"
#include "qlora/error.h"
#include "qlora/fs.h"
#include "qlora/llama.h"
#include "qlora/lora.h"
#include "qlora/model.h"
#include "qlora/safetensors.h"

/* Add `src` (float32, of the given shape; ndim 0 is a scalar of one element)
 * to the output as dtype. */
static int add_converted(ql_st_writer *w, const char *name, const float *src, const int64_t *shape, int ndim, int dtype)
{
    size_t n = (size_t)ql_shape_numel(shape, ndim);
    size_t es = ql_dtype_size(dtype);
    void *buf = malloc(n * es + 1);
    if (!buf) return ql_error(QL_ENOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        if (dtype == QL_DTYPE_F32) ((float *)buf)[i] = src[i];
        else if (dtype == QL_DTYPE_F16) ((uint16_t *)buf)[i] = ql_f32_to_f16(src[i]);
        else ((uint16_t *)buf)[i] = ql_f32_to_bf16(src[i]);
    }
    ql_tensor t = {.name = name, .dtype = dtype, .ndim = ndim, .data = buf, .nbytes = n * es};
    for (int d = 0; d < ndim; d++) t.shape[d] = shape[d];
    int rc = ql_st_writer_add(w, &t);
    free(buf);
    return rc;
}

/* "model.layers.0.mlp.up_proj.weight.absmax" belongs to a block linear; its
 * bias "model.layers.0.self_attn.q_proj.bias" (never quantized) does not: it is
 * copied like any other tensor */
static int belongs_to_block_linear(const char *name)
{
    char buf[700];
    size_t n = strlen(name);
    if (n > 5 && !strcmp(name + n - 5, ".bias") && n - 5 + sizeof ".weight" <= sizeof buf) {
        snprintf(buf, sizeof buf, "%.*s.weight", (int)(n - 5), name);
        if (ql_is_block_linear(buf, NULL, 0)) return 0;
    }
    for (const char *dot = strchr(name, '.'); dot; dot = strchr(dot + 1, '.')) {
        int n = snprintf(buf, sizeof buf, "%.*s.weight", (int)(dot - name), name);
        if (n > 0 && (size_t)n < sizeof buf && ql_is_block_linear(buf, NULL, 0)) return 1;
    }
    return 0;
}

int ql_merge(const char *model_dir, const char *adapter_dir, const char *out_dir, const ql_merge_opts *opts)
{
    /* The base the adapter was trained on: --quantizer, else what the run's
     * run_config.json names (a plugin name only: it is a file, not the user). */
    char spec[QL_QZ_SPEC_MAX + 1];
    char *run_config = NULL;
    ql_calib_opts calib;
    char calib_data[4096], calib_fmt[32];
    int calibrated = 0;
    if (opts->quantizer) {
        if (strlen(opts->quantizer) >= sizeof spec)
            return ql_error(QL_EINVAL, "--quantizer is %zu characters, longer than the %d allowed",
                            strlen(opts->quantizer), QL_QZ_SPEC_MAX);
        snprintf(spec, sizeof spec, "%s", opts->quantizer);
    } else {
        int qrc = ql_lora_run_quantizer(adapter_dir, spec, sizeof spec);
        if (qrc == QL_ENOTFOUND) snprintf(spec, sizeof spec, "none");
        else if (qrc) return qrc;
        else if (!(run_config = ql_path_join(adapter_dir, "run_config.json"))) return ql_error(QL_ENOMEM, "out of memory");
        /* a base quantized with calibration on load: the same again */
        int crc = qrc ? QL_ENOTFOUND
                      : ql_lora_run_calibration(adapter_dir, &calib, calib_data, sizeof calib_data, calib_fmt, sizeof calib_fmt);
        if (crc != QL_OK && crc != QL_ENOTFOUND) {
            free(run_config);
            return crc;
        }
        calibrated = crc == QL_OK;
    }
    ql_llama *m = NULL;
    ql_lora *lora = NULL;
    ql_model_files *mf = NULL;
    ql_st_writer *w = NULL;
    ql_outdir *od = NULL;
    float *wbuf = NULL;
    ql_be_ctx *ctx = NULL;
    ql_lora_model *lm = NULL;
    int rc;
    ql_llama_load_opts lo = {.quantizer = spec, .quantizer_file = run_config, .progress = 0, .device = opts->device,
                             .calib = calibrated ? &calib : NULL};
    rc = ql_llama_load(model_dir, &lo, &m);
    free(run_config);
    if (rc) goto done;
    if ((rc = ql_lora_load_peft(m, adapter_dir, &lora))) goto done;
    if ((rc = ql_model_files_open(model_dir, &mf))) goto done;
    int dtype = opts->dtype;
    const ql_tensor *emb = ql_model_files_find(mf, "model.embed_tokens.weight");
    if (dtype < 0) dtype = emb && ql_dtype_is_float(emb->dtype) && emb->dtype != QL_DTYPE_F64 ? emb->dtype : QL_DTYPE_F32;
    if (strcmp(ql_llama_quantization(m), "none") != 0)
        fprintf(stderr,
                "qlora: merging into the %s-dequantized base weights (the base the adapter was trained on), "
                "not the original full-precision ones\n",
                ql_llama_quantization(m));
    const char *const inputs[] = {model_dir, adapter_dir};
    if ((rc = ql_outdir_begin(out_dir, "merged-model", opts->force, inputs, 2, &od))) goto done;
    if ((rc = ql_st_writer_create(&w))) goto done;
    ql_st_writer_set_metadata(w, "format", "pt");
    if ((rc = ql_st_writer_spill_to(w, ql_outdir_path(od)))) goto done;
    const ql_llama_config *c = ql_llama_get_config(m);
    int64_t maxw = 0;
    for (int i = 0; i < c->n_layers; i++) {
        ql_llama_layer *L = &ql_llama_layers(m)[i];
        const ql_linear *ls[QL_MOD_COUNT] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
        for (int k = 0; k < QL_MOD_COUNT; k++)
            if (ls[k]->out * ls[k]->in > maxw) maxw = ls[k]->out * ls[k]->in;
    }
    wbuf = malloc((size_t)maxw * sizeof *wbuf);
    if (!wbuf) {
        rc = ql_error(QL_ENOMEM, "out of memory");
        goto done;
    }
    /* block linears: materialized base + scaling * B A, on the chosen device
     * (ql_lora_model_merged_weights: the same bits on every device) */
    if ((rc = ql_be_ctx_open(opts->device ? opts->device : "cpu", NULL, &ctx))) goto done;
    ql_lora_model_opts mo = {.batch = 1, .max_len = 1, .allocate = 1, .precision = QL_PREC_FP32, .prefetch = -1,
                             .offload = -1, .merge = 1};
    if ((rc = ql_lora_model_create(m, lora, ctx, &mo, &lm))) goto done;
    if ((rc = ql_lora_model_push_params(lm))) goto done;
    for (int i = 0; i < c->n_layers && rc == QL_OK; i++) {
        ql_llama_layer *L = &ql_llama_layers(m)[i];
        const ql_linear *ls[QL_MOD_COUNT] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
        for (int k = 0; k < QL_MOD_COUNT && rc == QL_OK; k++) {
            const ql_linear *l = ls[k];
            if ((rc = ql_lora_model_merged_weights(lm, i, k, wbuf))) break;
            char name[600];
            snprintf(name, sizeof name, "%s.weight", l->name);
            const int64_t shape[2] = {l->out, l->in};
            rc = add_converted(w, name, wbuf, shape, 2, dtype);
        }
    }
    ql_lora_model_destroy(lm);
    lm = NULL;
    /* everything else from the base checkpoint, converted to dtype */
    for (size_t i = 0; i < ql_model_files_count(mf) && rc == QL_OK; i++) {
        const ql_tensor *t = ql_model_files_at(mf, i);
        if (ql_is_block_linear(t->name, NULL, 0)) continue;
        if (belongs_to_block_linear(t->name)) continue; /* a pre-quantized base's side tensors */
        if (!ql_dtype_is_float(t->dtype) || t->ndim > 2) {
            rc = ql_st_writer_add(w, t);
            continue;
        }
        size_t n = (size_t)ql_shape_numel(t->shape, t->ndim);
        float *f = malloc((n ? n : 1) * sizeof *f);
        if (!f) {
            rc = ql_error(QL_ENOMEM, "out of memory");
            break;
        }
        rc = ql_convert_to_f32(t->dtype, t->data, n, f);
        if (rc == QL_OK) rc = add_converted(w, t->name, f, t->shape, t->ndim, dtype);
        free(f);
    }
    if (rc) goto done;
    char *path = ql_path_join(ql_outdir_path(od), "model.safetensors");
    rc = ql_st_writer_save(w, path);
    free(path);
    if (rc) goto done;
    json_t *cfg = json_deep_copy(ql_model_files_config(mf));
    json_object_del(cfg, "quantization_config");
    json_object_set_new(cfg, "torch_dtype", json_string(ql_dtype_torch_name(dtype)));
    char *text = ql_json_dumps_py(cfg, 2, 1);
    json_decref(cfg);
    path = ql_path_join(ql_outdir_path(od), "config.json");
    rc = text ? ql_write_file_atomic(path, text, strlen(text)) : ql_error(QL_ENOMEM, "out of memory");
    free(text);
    free(path);
    static const char *const copied[] = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                         "special_tokens_map.json", "generation_config.json"};
    for (size_t i = 0; i < sizeof copied / sizeof copied[0] && rc == QL_OK; i++) {
        char *src = ql_path_join(model_dir, copied[i]), *dst = ql_path_join(ql_outdir_path(od), copied[i]);
        if (ql_path_exists(src)) rc = ql_copy_file_atomic(src, dst);
        free(src);
        free(dst);
    }
    if (rc) goto done;
    rc = ql_outdir_commit(od);
    od = NULL;
    if (rc == QL_OK) fprintf(stderr, "wrote %s (%s)\n", out_dir, ql_dtype_torch_name(dtype));
done:
    if (rc == QL_EIO && od) ql_error_context("writing %s (nothing there was changed)", out_dir);
    ql_outdir_abandon(od);
    ql_lora_model_destroy(lm);
    ql_be_ctx_close(ctx);
    free(wbuf);
    ql_st_writer_destroy(w);
    ql_model_files_close(mf);
    ql_lora_destroy(lora);
    ql_llama_destroy(m);
    return rc;
}
