#include "qlora/quantize.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "json_out.h"
#include "prequantized.h"
#include "progress.h"
#include "ql_config.h"
#include "qlora/dtype.h"
#include "qlora/error.h"
#include "qlora/fs.h"
#include "qlora/llama.h"
#include "qlora/model.h"
#include "qlora/safetensors.h"
#include "quantize_device.h"


/* ---- adapters between plugin tensor suffixes and full checkpoint names ---- */

typedef struct prefixed_writer {
    ql_st_writer *w;
    const char *prefix;
} prefixed_writer;

static int prefixed_put(void *ctx, const ql_tensor *t)
{
    prefixed_writer *pw = ctx;
    char name[1024];
    if (snprintf(name, sizeof name, "%s.%s", pw->prefix, t->name) >= (int)sizeof name)
        return ql_error(QL_EINVAL, "tensor name too long: %s.%s", pw->prefix, t->name);
    ql_tensor c = *t;
    c.name = name;
    return ql_st_writer_add(pw->w, &c);
}

typedef struct prefixed_reader {
    const ql_st_file *file;
    const char *prefix;
} prefixed_reader;

static const ql_tensor *prefixed_get(void *ctx, const char *suffix)
{
    prefixed_reader *pr = ctx;
    char name[1024];
    if (snprintf(name, sizeof name, "%s.%s", pr->prefix, suffix) >= (int)sizeof name) return NULL;
    return ql_st_find(pr->file, name);
}

static int check_finite(const ql_tensor *t)
{
    if (!ql_dtype_is_float(t->dtype)) return QL_OK;
    size_t n = (size_t)ql_shape_numel(t->shape, t->ndim);
    int64_t bad = ql_first_nonfinite(t->dtype, t->data, n);
    if (bad < 0) return QL_OK;
    float v;
    ql_convert_to_f32(t->dtype, (const char *)t->data + (size_t)bad * ql_dtype_size(t->dtype), 1, &v);
    return ql_error(QL_ENUMERIC, "tensor %s has %s at index %lld", t->name, isnan(v) ? "NaN" : "Inf", (long long)bad);
}

static int tensor_to_f32(const ql_tensor *t, float **out)
{
    size_t n = (size_t)ql_shape_numel(t->shape, t->ndim);
    float *w = malloc((n ? n : 1) * sizeof *w);
    if (!w) return ql_error(QL_ENOMEM, "out of memory converting %s", t->name);
    int rc = ql_convert_to_f32(t->dtype, t->data, n, w);
    if (rc) {
        free(w);
        return ql_error_context("tensor %s", t->name);
    }
    *out = w;
    return QL_OK;
}

static size_t count_block_linears(const ql_model_files *m)
{
    size_t k = 0;
    for (size_t i = 0; i < ql_model_files_count(m); i++) k += ql_is_block_linear(ql_model_files_at(m, i)->name, NULL, 0);
    return k;
}

/* A block linear must be a float matrix; anything else means the folder is
 * not a plain checkpoint. */
static int check_linear(const ql_tensor *t)
{
    if (t->ndim != 2 || t->shape[0] <= 0 || t->shape[1] <= 0)
        return ql_error(QL_EFORMAT, "tensor %s should be a matrix but has %d dimensions", t->name, t->ndim);
    if (!ql_dtype_is_float(t->dtype))
        return ql_error(QL_EFORMAT, "tensor %s is %s, not F32/F16/BF16: is this model already quantized?", t->name,
                        ql_dtype_name(t->dtype));
    return QL_OK;
}

static const char *const copied_files[] = {
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "generation_config.json", "added_tokens.json",
};

static int write_config(const ql_model_files *m, const ql_qz *q, const char *dir)
{
    char buf[4096];
    int rc = q->desc->checkpoint_config(q->inst, buf, sizeof buf);
    if (rc) return ql_error_context("quantizer %s: checkpoint_config", q->desc->name);
    json_error_t err;
    json_t *qc = json_loads(buf, 0, &err);
    if (!qc || !json_is_object(qc)) {
        json_decref(qc);
        return ql_error(QL_EFORMAT, "quantizer %s wrote a quantization_config that is not a JSON object: %s",
                        q->desc->name, err.text);
    }
    /* A qlora checkpoint names its quantizer by plugin name, so that it loads
     * wherever the plugin is installed: a path (the plugin's own, or the one
     * the user gave) would be refused when loading (docs/security.md). */
    const char *method = json_string_value(json_object_get(qc, "quant_method"));
    if (method && !strcmp(method, "qlora")) {
        const char *named = json_string_value(json_object_get(qc, "quantizer"));
        if (!named || ql_qz_check_from_file(named, "", "") != QL_OK || !ql_qz_matches(q, named))
            json_object_set_new(qc, "quantizer", json_string(q->desc->name));
        ql_error_clear();
    }
    json_t *cfg = json_deep_copy(ql_model_files_config(m));
    if (!cfg) {
        json_decref(qc);
        return ql_error(QL_ENOMEM, "out of memory");
    }
    json_object_set_new(cfg, "quantization_config", qc);
    char *text = ql_json_dumps_py(cfg, 2, 1);
    json_decref(cfg);
    if (!text) return ql_error(QL_ENOMEM, "out of memory");
    size_t len = strlen(text);
    char *with_nl = realloc(text, len + 2);
    if (!with_nl) {
        free(text);
        return ql_error(QL_ENOMEM, "out of memory");
    }
    with_nl[len] = '\n';
    char *path = ql_path_join(dir, "config.json");
    rc = path ? ql_write_file_atomic(path, with_nl, len + 1) : ql_error(QL_ENOMEM, "out of memory");
    free(path);
    free(with_nl);
    return rc;
}

/* The block linear of m with module prefix `prefix`, or NULL. */
static ql_linear *find_linear(ql_llama *m, const char *prefix)
{
    ql_llama_layer *layers = ql_llama_layers(m);
    for (int i = 0; i < ql_llama_get_config(m)->n_layers; i++) {
        ql_linear *ls[] = {&layers[i].q,    &layers[i].k,  &layers[i].v,   &layers[i].o,
                           &layers[i].gate, &layers[i].up, &layers[i].down};
        for (size_t k = 0; k < sizeof ls / sizeof ls[0]; k++)
            if (!strcmp(ls[k]->name, prefix)) return ls[k];
    }
    return NULL;
}

int ql_quantize_model(const char *model_dir, const char *spec, const char *out_dir, const ql_quantize_opts *opts)
{
    ql_model_files *m = NULL;
    ql_qz *q = NULL;
    ql_outdir *od = NULL;
    ql_st_writer *w = NULL;
    ql_llama *cm = NULL; /* the model quantized in the calibration pass */
    int rc;
    double t0 = ql_now();
    ql_qdev upload = {NULL, 0};
    int on_gpu = 0;
    if ((rc = ql_model_files_open(model_dir, &m))) goto done;
    if ((rc = ql_qz_open(spec, &q))) goto done;
    const int have_calib = opts->calib && opts->calib->data;
    if ((rc = ql_qz_require_calibration(q, have_calib, "quantize a model"))) goto done;
    const int calibrated = have_calib && ql_qz_can_calibrate(q);
    if (have_calib && !calibrated)
        fprintf(stderr, "qlora: warning: quantizer %s takes no calibration data; ignoring --calib-data %s\n",
                q->desc->name, opts->calib->data);
    if (calibrated && opts->device && strcmp(opts->device, "cpu"))
        fprintf(stderr, "qlora: warning: the calibration pass runs on the CPU; ignoring --device %s\n", opts->device);
    char what[64];
    snprintf(what, sizeof what, "quantize --device %.20s", opts->device ? opts->device : "cpu");
    if (!calibrated && (rc = ql_qdev_pick(opts->device, q, what, &on_gpu))) goto done;
    /* check all inputs before writing anything */
    for (size_t i = 0; i < ql_model_files_count(m); i++) {
        const ql_tensor *t = ql_model_files_at(m, i);
        if (ql_is_block_linear(t->name, NULL, 0) && (rc = check_linear(t))) goto done;
        if ((rc = check_finite(t))) goto done;
        ql_model_files_release(m, t); /* read again below: host memory holds about one tensor of the checkpoint */
    }
    size_t nlin = count_block_linears(m);
    if (nlin == 0) {
        rc = ql_error(QL_EFORMAT, "%s has no decoder-block linear layers (model.layers.N.{self_attn,mlp}.*_proj.weight)",
                      model_dir);
        goto done;
    }
    /* a data-aware quantizer: the model, quantized in the calibration pass
     * (its own instance of the plugin), before the output folder is begun */
    if (calibrated) {
        ql_llama_load_opts lo = {.quantizer = spec, .progress = 0, .calib = opts->calib};
        if ((rc = ql_llama_load(model_dir, &lo, &cm))) goto done;
    }
    const char *const inputs[] = {model_dir};
    if ((rc = ql_outdir_begin(out_dir, "quantized-model", opts->force, inputs, 1, &od))) goto done;
    if ((rc = ql_st_writer_create(&w))) goto done;
    ql_st_writer_set_metadata(w, "format", "pt");
    if ((rc = ql_st_writer_spill_to(w, ql_outdir_path(od)))) goto done;

    ql_progress prog;
    ql_progress_begin(&prog, "quantize", (int64_t)nlin, "layers", opts->progress);
    size_t done_layers = 0;
    int64_t params = 0, all_params = 0;
    uint64_t bytes_in = 0, bytes_out = 0, all_bytes = 0;
    for (size_t i = 0; i < ql_model_files_count(m) && rc == QL_OK; i++) {
        const ql_tensor *t = ql_model_files_at(m, i);
        char prefix[512];
        if (!ql_is_block_linear(t->name, prefix, sizeof prefix)) {
            rc = ql_st_writer_add(w, t);
            ql_model_files_release(m, t);
            all_params += ql_shape_numel(t->shape, t->ndim);
            all_bytes += t->nbytes;
            continue;
        }
        ql_matrix_desc md = {.name = prefix, .rows = t->shape[0], .cols = t->shape[1], .src_dtype = t->dtype};
        ql_qstate *s = NULL;
        const ql_qz *sq = q; /* the instance that made s */
        if (calibrated) {
            const ql_linear *l = find_linear(cm, prefix);
            if (!l || !l->state) {
                rc = ql_error(QL_EINTERNAL, "%s: the calibration pass left no quantized state", prefix);
                break;
            }
            s = l->state;
            sq = l->qz;
        } else if (on_gpu) {
            /* the checkpoint's own bytes go up (bf16 as it is) */
            ql_error_clear();
            rc = ql_qdev_quantize(q, &md, t->data, t->dtype, &upload, &s);
            if (rc) {
                if (!ql_error_message()[0]) ql_error(rc, "quantize failed");
                ql_error_context("quantizer %s on %s", q->desc->name, t->name);
                break;
            }
        } else {
            float *dense;
            if ((rc = tensor_to_f32(t, &dense))) break;
            ql_error_clear();
            rc = q->desc->quantize(q->inst, &md, dense, &s);
            free(dense);
            if (rc) {
                if (!ql_error_message()[0]) ql_error(rc, "quantize failed");
                ql_error_context("quantizer %s on %s", q->desc->name, t->name);
                break;
            }
        }
        ql_model_files_release(m, t);
        prefixed_writer pw = {w, prefix};
        ql_tensor_writer tw = {&pw, prefixed_put};
        rc = sq->desc->save(sq->inst, s, &tw);
        ql_state_info info = {0};
        if (rc == QL_OK) rc = sq->desc->state_info(sq->inst, s, &info);
        if (!calibrated) q->desc->free_state(q->inst, s); /* the model owns the calibrated states */
        if (rc) {
            ql_error_context("quantizer %s saving %s", q->desc->name, prefix);
            break;
        }
        params += md.rows * md.cols;
        all_params += md.rows * md.cols;
        bytes_in += t->nbytes;
        bytes_out += info.bytes;
        all_bytes += info.bytes;
        ql_progress_update(&prog, (int64_t)++done_layers, prefix);
    }
    if (rc) goto done;
    ql_progress_end(&prog);

    char *st_path = ql_path_join(ql_outdir_path(od), "model.safetensors");
    rc = st_path ? ql_st_writer_save(w, st_path) : ql_error(QL_ENOMEM, "out of memory");
    free(st_path);
    if (rc) goto done;
    if ((rc = write_config(m, q, ql_outdir_path(od)))) goto done;
    for (size_t i = 0; i < sizeof copied_files / sizeof copied_files[0] && rc == QL_OK; i++) {
        char *src = ql_path_join(model_dir, copied_files[i]);
        char *dst = ql_path_join(ql_outdir_path(od), copied_files[i]);
        if (!src || !dst) rc = ql_error(QL_ENOMEM, "out of memory");
        else if (ql_path_exists(src)) rc = ql_copy_file_atomic(src, dst);
        free(src);
        free(dst);
    }
    if (rc) goto done;
    rc = ql_outdir_commit(od);
    od = NULL;
    if (rc) goto done;
    /* the two figures of docs/writing-a-quantizer.md, "Bits per parameter" */
    printf("quantized %zu layers (%lld parameters) with %s%s%s: %.2f MiB -> %.2f MiB, %.2f s%s\n",
           nlin, (long long)params, q->desc->name, q->options[0] ? ":" : "", q->options,
           (double)bytes_in / 1048576.0, (double)bytes_out / 1048576.0, ql_now() - t0, on_gpu ? " on cuda" : "");
    printf("matrix bits/param: %.3f (every byte stored for the quantized matrices, %llu, over their parameters)\n",
           8.0 * (double)bytes_out / (double)params, (unsigned long long)bytes_out);
    printf("model bits/param: %.3f (every tensor byte of model.safetensors, %llu, over all %lld parameters)\n",
           8.0 * (double)all_bytes / (double)all_params, (unsigned long long)all_bytes, (long long)all_params);
    if (calibrated)
        printf("calibration: %d windows of %d tokens from %s (seed %llu), layer by layer\n",
               opts->calib->samples > 0 ? opts->calib->samples : QL_CALIB_DEFAULT_SAMPLES,
               opts->calib->len > 0 ? opts->calib->len : QL_CALIB_DEFAULT_LEN, opts->calib->data,
               (unsigned long long)opts->calib->seed);
    printf("wrote %s\n", out_dir);
done:
    if (rc == QL_EIO && od) ql_error_context("writing %s (nothing there was changed)", out_dir);
    ql_outdir_abandon(od);
    ql_st_writer_destroy(w);
    ql_qdev_free(&upload);
    ql_llama_destroy(cm);
    ql_qz_close(q);
    ql_model_files_close(m);
    return rc;
}

/* ---- compare ---- */

typedef struct layer_result {
    char name[512];
    int64_t rows, cols;
    uint64_t stored_bytes; /* every tensor save() writes for it: codes, scales, second-level constants, tables */
    double rel_err, max_abs_err;
    double sq_err, sq_ref;
    double quant_ms, materialize_ms;
} layer_result;

typedef struct qz_result {
    char spec[512];
    char name[64];
    char options[512];
    int calibrated; /* quantized in a calibration pass (quant_ms: shares of its time) */
    layer_result *layers;
    size_t nlayers;
    int64_t other_params;  /* the tensors kept as they are: embeddings, norms, ... */
    uint64_t other_bytes;
} qz_result;

/* Split "nf4:double_quant=0,blocksize=64,fp4,int8" into quantizer specs: a
 * piece with '=' but no ':' continues the previous spec's options. */
static int split_specs(const char *list, char ***out, size_t *n)
{
    *out = NULL;
    *n = 0;
    char *copy = strdup(list);
    if (!copy) return ql_error(QL_ENOMEM, "out of memory");
    char *save = NULL;
    int rc = QL_OK;
    for (char *tok = strtok_r(copy, ",", &save); tok && rc == QL_OK; tok = strtok_r(NULL, ",", &save)) {
        if (strchr(tok, '=') && !strchr(tok, ':') && *n > 0) {
            char *prev = (*out)[*n - 1];
            size_t len = strlen(prev) + strlen(tok) + 2;
            char *joined = malloc(len);
            if (!joined) rc = ql_error(QL_ENOMEM, "out of memory");
            else {
                snprintf(joined, len, "%s,%s", prev, tok);
                free(prev);
                (*out)[*n - 1] = joined;
            }
            continue;
        }
        char **p = realloc(*out, (*n + 1) * sizeof *p);
        if (!p || !(p[*n] = strdup(tok))) {
            if (p) *out = p;
            rc = ql_error(QL_ENOMEM, "out of memory");
            break;
        }
        *out = p;
        (*n)++;
    }
    free(copy);
    if (rc == QL_OK && *n == 0) rc = ql_error(QL_EINVAL, "--quantizers is empty");
    return rc;
}

/* Every block linear of m quantized with q and materialized again, against
 * its weights.  With cm (the model a calibration pass quantized with q's
 * spec), the states are cm's, and each layer's quantize time is an equal
 * share of the pass's pass_ms. */
static int compare_one(const ql_model_files *m, ql_qz *q, ql_llama *cm, double pass_ms, qz_result *res,
                       ql_progress *prog, int64_t *done)
{
    size_t n = ql_model_files_count(m);
    res->layers = calloc(n ? n : 1, sizeof *res->layers);
    if (!res->layers) return ql_error(QL_ENOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        const ql_tensor *t = ql_model_files_at(m, i);
        char prefix[512];
        if (!ql_is_block_linear(t->name, prefix, sizeof prefix)) {
            res->other_params += ql_shape_numel(t->shape, t->ndim);
            res->other_bytes += t->nbytes;
            continue;
        }
        int rc = check_linear(t);
        if (rc) return rc;
        float *dense, *back;
        if ((rc = tensor_to_f32(t, &dense))) return rc;
        size_t count = (size_t)(t->shape[0] * t->shape[1]);
        back = malloc(count * sizeof *back);
        if (!back) {
            free(dense);
            return ql_error(QL_ENOMEM, "out of memory");
        }
        ql_matrix_desc md = {.name = prefix, .rows = t->shape[0], .cols = t->shape[1], .src_dtype = t->dtype};
        ql_qstate *s = NULL;
        layer_result *lr = &res->layers[res->nlayers];
        snprintf(lr->name, sizeof lr->name, "%s", prefix);
        lr->rows = md.rows;
        lr->cols = md.cols;
        ql_error_clear();
        const ql_qz *made = q; /* the instance that made s */
        double t0 = ql_now();
        if (cm) {
            const ql_linear *l = find_linear(cm, prefix);
            if (!l || !l->state) rc = ql_error(QL_EINTERNAL, "%s: the calibration pass left no quantized state", prefix);
            else s = l->state, made = l->qz;
        } else {
            rc = q->desc->quantize(q->inst, &md, dense, &s);
        }
        double t1 = ql_now();
        if (rc == QL_OK) rc = made->desc->materialize(made->inst, s, QL_DTYPE_F32, back);
        double t2 = ql_now();
        ql_state_info info = {0};
        if (rc == QL_OK) rc = made->desc->state_info(made->inst, s, &info);
        if (s && !cm) q->desc->free_state(q->inst, s); /* the model owns the calibrated states */
        if (rc) {
            free(dense);
            free(back);
            if (!ql_error_message()[0]) ql_error(rc, "failed");
            return ql_error_context("quantizer %s on %s", q->desc->name, t->name);
        }
        double sq = 0, ref = 0, mx = 0;
        for (size_t k = 0; k < count; k++) {
            double d = (double)back[k] - (double)dense[k];
            sq += d * d;
            ref += (double)dense[k] * (double)dense[k];
            if (fabs(d) > mx || d != d) mx = fabs(d);
        }
        free(dense);
        free(back);
        lr->sq_err = sq;
        lr->sq_ref = ref;
        lr->rel_err = ref > 0 ? sqrt(sq / ref) : sqrt(sq);
        lr->max_abs_err = mx;
        lr->stored_bytes = info.bytes;
        lr->quant_ms = cm ? pass_ms / (double)count_block_linears(m) : (t1 - t0) * 1e3;
        lr->materialize_ms = (t2 - t1) * 1e3;
        res->nlayers++;
        ql_progress_update(prog, ++*done, prefix);
    }
    return QL_OK;
}

typedef struct totals {
    int64_t params;
    uint64_t bytes;
    double matrix_bits_per_param;
    double model_bits_per_param; /* the whole checkpoint quantized with this quantizer */
    double sq_err, sq_ref, max_abs, quant_ms, materialize_ms;
} totals;

static double matrix_bpp(const layer_result *l) { return 8.0 * (double)l->stored_bytes / (double)(l->rows * l->cols); }

static totals sum_layers(const qz_result *r)
{
    totals t = {0};
    for (size_t i = 0; i < r->nlayers; i++) {
        const layer_result *l = &r->layers[i];
        int64_t p = l->rows * l->cols;
        t.params += p;
        t.bytes += l->stored_bytes;
        t.sq_err += l->sq_err;
        t.sq_ref += l->sq_ref;
        if (l->max_abs_err > t.max_abs) t.max_abs = l->max_abs_err;
        t.quant_ms += l->quant_ms;
        t.materialize_ms += l->materialize_ms;
    }
    t.matrix_bits_per_param = t.params ? 8.0 * (double)t.bytes / (double)t.params : 0.0;
    int64_t all = t.params + r->other_params;
    t.model_bits_per_param = all ? 8.0 * (double)(t.bytes + r->other_bytes) / (double)all : 0.0;
    return t;
}

static int write_compare_json(const char *path, const char *model_dir, const qz_result *res, size_t n)
{
    json_t *root = json_object();
    json_t *arr = json_array();
    json_object_set_new(root, "model", json_string(model_dir));
    json_object_set_new(root, "quantizers", arr);
    for (size_t i = 0; i < n; i++) {
        totals t = sum_layers(&res[i]);
        json_t *layers = json_array();
        for (size_t k = 0; k < res[i].nlayers; k++) {
            const layer_result *l = &res[i].layers[k];
            json_array_append_new(layers,
                                  json_pack("{s:s, s:[I,I], s:f, s:I, s:f, s:f, s:f, s:f}", "name", l->name, "shape",
                                            (json_int_t)l->rows, (json_int_t)l->cols, "matrix_bits_per_param",
                                            matrix_bpp(l), "stored_bytes", (json_int_t)l->stored_bytes,
                                            "rel_error", l->rel_err,
                                            "max_abs_error", l->max_abs_err, "quantize_ms", l->quant_ms,
                                            "materialize_ms", l->materialize_ms));
        }
        json_array_append_new(
            arr, json_pack("{s:s, s:s, s:s, s:b, s:I, s:f, s:I, s:I, s:f, s:f, s:f, s:f, s:f, s:o}", "spec", res[i].spec,
                           "name", res[i].name, "options", res[i].options, "calibrated", res[i].calibrated,
                           "params", (json_int_t)t.params,
                           "matrix_bits_per_param", t.matrix_bits_per_param, "stored_bytes",
                           (json_int_t)t.bytes, "model_params", (json_int_t)(t.params + res[i].other_params),
                           "model_bits_per_param", t.model_bits_per_param, "rel_error",
                           t.sq_ref > 0 ? sqrt(t.sq_err / t.sq_ref) : 0.0, "max_abs_error", t.max_abs, "quantize_ms",
                           t.quant_ms, "materialize_ms", t.materialize_ms, "layers", layers));
    }
    char *text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(root);
    if (!text) return ql_error(QL_ENOMEM, "out of memory");
    size_t len = strlen(text);
    text[len] = '\n'; /* overwrite NUL; length known */
    int rc = ql_write_file_atomic(path, text, len + 1);
    free(text);
    return rc;
}

int ql_compare_model(const char *model_dir, const char *spec_list, const ql_compare_opts *opts, FILE *out)
{
    ql_model_files *m = NULL;
    char **specs = NULL;
    size_t nspecs = 0;
    qz_result *res = NULL;
    int rc;
    if ((rc = ql_model_files_open(model_dir, &m))) goto done;
    if ((rc = split_specs(spec_list, &specs, &nspecs))) goto done;
    size_t nlin = count_block_linears(m);
    if (nlin == 0) {
        rc = ql_error(QL_EFORMAT, "%s has no decoder-block linear layers", model_dir);
        goto done;
    }
    res = calloc(nspecs, sizeof *res);
    if (!res) {
        rc = ql_error(QL_ENOMEM, "out of memory");
        goto done;
    }
    /* open every quantizer first, so a bad name fails before the work */
    ql_qz **qs = calloc(nspecs, sizeof *qs);
    if (!qs) {
        rc = ql_error(QL_ENOMEM, "out of memory");
        goto done;
    }
    const int have_calib = opts->calib && opts->calib->data;
    for (size_t i = 0; i < nspecs && rc == QL_OK; i++)
        if ((rc = ql_qz_open(specs[i], &qs[i])) == QL_OK)
            rc = ql_qz_require_calibration(qs[i], have_calib, "be compared");
    ql_progress prog;
    ql_progress_begin(&prog, "compare", (int64_t)(nlin * nspecs), "layers", opts->progress);
    int64_t done_layers = 0;
    int any_calibrated = 0;
    for (size_t i = 0; i < nspecs && rc == QL_OK; i++) {
        snprintf(res[i].spec, sizeof res[i].spec, "%s", specs[i]);
        snprintf(res[i].name, sizeof res[i].name, "%s", qs[i]->desc->name);
        snprintf(res[i].options, sizeof res[i].options, "%s", qs[i]->options);
        /* a data-aware quantizer that wants the data: the layer-sequential
         * pass, as quantize runs it; the others ignore --calib-data */
        ql_llama *cm = NULL;
        double pass_ms = 0;
        if (have_calib && ql_qz_can_calibrate(qs[i]) && ql_qz_needs_calibration(qs[i])) {
            ql_llama_load_opts lo = {.quantizer = specs[i], .progress = 0, .calib = opts->calib};
            double t0 = ql_now();
            if ((rc = ql_llama_load(model_dir, &lo, &cm))) break;
            pass_ms = (ql_now() - t0) * 1e3;
            res[i].calibrated = any_calibrated = 1;
        }
        rc = compare_one(m, qs[i], cm, pass_ms, &res[i], &prog, &done_layers);
        ql_llama_destroy(cm);
    }
    for (size_t i = 0; i < nspecs; i++) ql_qz_close(qs[i]);
    free(qs);
    if (rc) goto done;
    ql_progress_end(&prog);

    /* the two figures of docs/writing-a-quantizer.md, "Bits per parameter" */
    fprintf(out, "%-12s %-28s %11s %12s %11s %10s %12s %11s %11s\n", "quantizer", "options", "matrix bits",
            "stored bytes", "model bits", "rel.error", "max.abs.err", "quant ms", "dequant ms");
    for (size_t i = 0; i < nspecs; i++) {
        totals t = sum_layers(&res[i]);
        fprintf(out, "%-12s %-28s %11.3f %12llu %11.3f %10.5f %12.6f %11.2f %11.2f\n", res[i].name, res[i].options,
                t.matrix_bits_per_param, (unsigned long long)t.bytes, t.model_bits_per_param,
                t.sq_ref > 0 ? sqrt(t.sq_err / t.sq_ref) : 0.0, t.max_abs, t.quant_ms, t.materialize_ms);
    }
    fprintf(out,
            "\nmatrix bits: bits/param of the quantized matrices, all they store (stored bytes) over their parameters;\n"
            "model bits: bits/param of the whole checkpoint, every tensor (embeddings, norms) over all parameters\n");
    if (any_calibrated)
        fprintf(out,
                "calibrated (%d windows of %d tokens from %s, seed %llu): quant ms is the whole layer-sequential pass\n"
                "(the model's forward on the calibration windows included), and a layer's its equal share; such a\n"
                "quantizer lowers each layer's output error on those inputs, not the weight error above: compare\n"
                "them by eval loss (qlora quantize, then qlora eval)\n",
                opts->calib->samples > 0 ? opts->calib->samples : QL_CALIB_DEFAULT_SAMPLES,
                opts->calib->len > 0 ? opts->calib->len : QL_CALIB_DEFAULT_LEN, opts->calib->data,
                (unsigned long long)opts->calib->seed);
    if (opts->per_layer) {
        fprintf(out, "\n%-12s %-40s %-12s %11s %12s %10s %12s %9s\n", "quantizer", "layer", "shape", "matrix bits",
                "stored bytes", "rel.error", "max.abs.err", "quant ms");
        for (size_t i = 0; i < nspecs; i++)
            for (size_t k = 0; k < res[i].nlayers; k++) {
                const layer_result *l = &res[i].layers[k];
                char shape[32];
                snprintf(shape, sizeof shape, "%lldx%lld", (long long)l->rows, (long long)l->cols);
                fprintf(out, "%-12s %-40s %-12s %11.3f %12llu %10.5f %12.6f %9.2f\n", res[i].name, l->name, shape,
                        matrix_bpp(l), (unsigned long long)l->stored_bytes, l->rel_err, l->max_abs_err,
                        l->quant_ms);
            }
    }
    if (opts->json_path) rc = write_compare_json(opts->json_path, model_dir, res, nspecs);
done:
    if (res)
        for (size_t i = 0; i < nspecs; i++) free(res[i].layers);
    free(res);
    ql_string_list_free(specs, nspecs);
    ql_model_files_close(m);
    return rc;
}

/* ---- inspect ---- */

typedef struct found_layer {
    char prefix[512];
    char quantizer[64];
    ql_state_info info;
} found_layer;

static int cmp_cstr(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Every proper dot-prefix of every tensor name ("a.b.c" gives "a", "a.b"):
 * the module prefixes a quantizer's load() may recognise. */
static int module_prefixes(const ql_st_file *f, char ***out, size_t *n)
{
    size_t cap = 0;
    *out = NULL;
    *n = 0;
    for (size_t i = 0; i < ql_st_count(f); i++) {
        const char *name = ql_st_at(f, i)->name;
        for (const char *dot = strchr(name, '.'); dot; dot = strchr(dot + 1, '.')) {
            if (*n == cap) {
                cap = cap ? cap * 2 : 256;
                char **p = realloc(*out, cap * sizeof *p);
                if (!p) return ql_error(QL_ENOMEM, "out of memory");
                *out = p;
            }
            if (!((*out)[*n] = strndup(name, (size_t)(dot - name)))) return ql_error(QL_ENOMEM, "out of memory");
            (*n)++;
        }
    }
    if (*n) qsort(*out, *n, sizeof **out, cmp_cstr);
    size_t k = 0;
    for (size_t i = 0; i < *n; i++) {
        if (k && strcmp((*out)[k - 1], (*out)[i]) == 0) free((*out)[i]);
        else (*out)[k++] = (*out)[i];
    }
    *n = k;
    return QL_OK;
}

static int has_prefix(const char *name, const char *prefix)
{
    size_t n = strlen(prefix);
    return strncmp(name, prefix, n) == 0 && name[n] == '.';
}

/* When no plugin found a quantized layer in `path`: is that because the
 * plugin its config.json (beside it) names is not on the search path, or
 * did not load?  Then an error saying so and where it was looked for;
 * QL_OK when the file names none, or one that is there.  The name is read
 * from a file, so it is only compared with the names of the plugins found,
 * never opened as a path. */
static int named_plugin_missing(const char *path, char **plugins, size_t nplugins, ql_qz **qs)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = '\0';
    else snprintf(dir, sizeof dir, ".");
    char *cfg_path = ql_path_join(dir, "config.json");
    if (!cfg_path) return ql_error(QL_ENOMEM, "out of memory");
    json_t *cfg = ql_path_exists(cfg_path) ? json_load_file(cfg_path, 0, NULL) : NULL;
    const char *spec = NULL, *field = NULL;
    int rc = QL_OK;
    /* a config.json that says nothing usable leaves the answer at "no quantized layers" */
    if (cfg && ql_prequantized_spec(cfg, cfg_path, &spec, &field) == QL_OK && spec &&
        ql_qz_check_from_file(spec, cfg_path, field) == QL_OK) {
        char name[64];
        size_t nl = strcspn(spec, ":");
        snprintf(name, sizeof name, "%.*s", (int)(nl < sizeof name ? nl : sizeof name - 1), spec);
        int loaded = 0, file = -1;
        char want[96];
        snprintf(want, sizeof want, "/qlora_%s.so", name);
        for (size_t k = 0; k < nplugins; k++) {
            if (qs[k] && !strcmp(qs[k]->desc->name, name)) loaded = 1;
            size_t lp = strlen(plugins[k]), lw = strlen(want);
            if (lp >= lw && !strcmp(plugins[k] + lp - lw, want)) file = (int)k;
        }
        if (!loaded && file >= 0) {
            rc = ql_error(QL_EABI, "%s: %s names quantizer %s: plugin %s (%s) did not load (see the warning above), so "
                                   "its quantized layers cannot be read",
                          path, cfg_path, name, name, plugins[file]);
        } else if (!loaded) {
            char looked[3072] = "";
            char **dirs;
            size_t nd, k = 0;
            if (ql_plugin_search_dirs(&dirs, &nd) == QL_OK) {
                for (size_t i = 0; i < nd && k < sizeof looked - 2; i++)
                    k += (size_t)snprintf(looked + k, sizeof looked - k, "%s%s", i ? ", " : "", dirs[i]);
                ql_string_list_free(dirs, nd);
            }
            rc = ql_error(QL_ENOTFOUND,
                          "%s: %s names quantizer %s (%s): plugin %s not found (looked in %s); put qlora_%s.so in "
                          "one of those folders or add its folder to $%s",
                          path, cfg_path, name, field, name, looked, name, QL_PLUGIN_PATH_ENV);
        }
    }
    if (rc == QL_OK) ql_error_clear(); /* what the checks above refused is no error of inspect */
    json_decref(cfg);
    free(cfg_path);
    return rc;
}

int ql_inspect_file(const char *path, int as_json, FILE *out)
{
    ql_st_file *f = NULL;
    char **plugins = NULL;
    size_t nplugins = 0;
    ql_qz **qs = NULL;
    found_layer *layers = NULL;
    size_t nlayers = 0;
    char **prefixes = NULL;
    size_t nprefixes = 0;
    int rc = ql_st_open(path, &f);
    if (rc) return rc;
    if ((rc = ql_plugin_scan(&plugins, &nplugins))) goto done;
    qs = calloc(nplugins ? nplugins : 1, sizeof *qs);
    layers = calloc(ql_st_count(f) ? ql_st_count(f) : 1, sizeof *layers);
    if (!qs || !layers) {
        rc = ql_error(QL_ENOMEM, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < nplugins; i++)
        if (ql_qz_open(plugins[i], &qs[i]) != QL_OK) {
            fprintf(stderr, "warning: skipping plugin: %s\n", ql_error_message());
            qs[i] = NULL;
        }
    int64_t qparams = 0;
    uint64_t qbytes = 0;
    if ((rc = module_prefixes(f, &prefixes, &nprefixes))) goto done;
    free(layers);
    layers = calloc(nprefixes ? nprefixes : 1, sizeof *layers);
    if (!layers) {
        rc = ql_error(QL_ENOMEM, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < nprefixes; i++) {
        const char *prefix = prefixes[i];
        prefixed_reader pr = {f, prefix};
        ql_tensor_reader reader = {&pr, prefixed_get};
        ql_matrix_desc md = {.name = prefix};
        for (size_t k = 0; k < nplugins; k++) {
            if (!qs[k]) continue;
            ql_qstate *s = NULL;
            ql_error_clear();
            int lrc = qs[k]->desc->load(qs[k]->inst, &md, &reader, &s);
            if (lrc == QL_ENOTFOUND) continue;
            if (lrc) {
                rc = ql_error_context("%s: layer %s (%s)", path, prefix, qs[k]->desc->name);
                goto done;
            }
            found_layer *fl = &layers[nlayers++];
            snprintf(fl->prefix, sizeof fl->prefix, "%s", prefix);
            snprintf(fl->quantizer, sizeof fl->quantizer, "%s", qs[k]->desc->name);
            qs[k]->desc->state_info(qs[k]->inst, s, &fl->info);
            qs[k]->desc->free_state(qs[k]->inst, s);
            qparams += fl->info.rows * fl->info.cols;
            qbytes += fl->info.bytes;
            break;
        }
    }
    if (nlayers == 0 && (rc = named_plugin_missing(path, plugins, nplugins, qs))) goto done;
    /* the two figures of docs/writing-a-quantizer.md, "Bits per parameter" */
    double matrix_bpp = qparams ? 8.0 * (double)qbytes / (double)qparams : 0.0;
    uint64_t total = 0;
    int64_t all_params = qparams;
    for (size_t i = 0; i < ql_st_count(f); i++) {
        const ql_tensor *t = ql_st_at(f, i);
        total += t->nbytes;
        size_t k = 0;
        while (k < nlayers && !has_prefix(t->name, layers[k].prefix)) k++;
        if (k == nlayers) all_params += ql_shape_numel(t->shape, t->ndim);
    }
    double model_bpp = all_params ? 8.0 * (double)total / (double)all_params : 0.0;
    if (as_json) {
        json_t *root = json_object();
        json_object_set_new(root, "file", json_string(path));
        json_object_set_new(root, "file_bytes", json_integer((json_int_t)ql_st_file_size(f)));
        json_t *ts = json_array();
        for (size_t i = 0; i < ql_st_count(f); i++) {
            const ql_tensor *t = ql_st_at(f, i);
            json_t *shape = json_array();
            for (int d = 0; d < t->ndim; d++) json_array_append_new(shape, json_integer(t->shape[d]));
            json_array_append_new(ts, json_pack("{s:s, s:s, s:o, s:I}", "name", t->name, "dtype",
                                                ql_dtype_name(t->dtype), "shape", shape, "bytes", (json_int_t)t->nbytes));
        }
        json_object_set_new(root, "tensors", ts);
        json_t *ls = json_array();
        for (size_t i = 0; i < nlayers; i++)
            json_array_append_new(ls, json_pack("{s:s, s:s, s:[I,I], s:s, s:I, s:o}", "layer", layers[i].prefix,
                                                "quantizer", layers[i].quantizer, "shape", (json_int_t)layers[i].info.rows,
                                                (json_int_t)layers[i].info.cols, "source_dtype",
                                                ql_dtype_torch_name(layers[i].info.src_dtype), "stored_bytes",
                                                (json_int_t)layers[i].info.bytes, "matrix_bits_per_param",
                                                json_real(8.0 * (double)layers[i].info.bytes /
                                                          (double)(layers[i].info.rows * layers[i].info.cols))));
        json_object_set_new(root, "quantized_layers", ls);
        json_object_set_new(root, "quantized_params", json_integer(qparams));
        json_object_set_new(root, "quantized_stored_bytes", json_integer((json_int_t)qbytes));
        json_object_set_new(root, "matrix_bits_per_param", json_real(matrix_bpp));
        json_object_set_new(root, "model_params", json_integer(all_params));
        json_object_set_new(root, "tensor_bytes", json_integer((json_int_t)total));
        json_object_set_new(root, "model_bits_per_param", json_real(model_bpp));
        char *text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        json_decref(root);
        if (text) fprintf(out, "%s\n", text);
        free(text);
    } else {
        fprintf(out, "%s: %zu tensors, %.2f MiB\n\n", path, ql_st_count(f), (double)ql_st_file_size(f) / 1048576.0);
        fprintf(out, "%-64s %-5s %-16s %12s\n", "tensor", "dtype", "shape", "bytes");
        for (size_t i = 0; i < ql_st_count(f); i++) {
            const ql_tensor *t = ql_st_at(f, i);
            char shape[64] = "[";
            size_t k = 1;
            for (int d = 0; d < t->ndim; d++)
                k += (size_t)snprintf(shape + k, sizeof shape - k, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
            snprintf(shape + k, sizeof shape - k, "]");
            fprintf(out, "%-64s %-5s %-16s %12llu\n", t->name, ql_dtype_name(t->dtype), shape,
                    (unsigned long long)t->nbytes);
        }
        if (nlayers) {
            fprintf(out, "\n%-48s %-10s %-12s %-9s %12s %11s\n", "quantized layer", "quantizer", "shape", "from",
                    "stored bytes", "matrix bits");
            for (size_t i = 0; i < nlayers; i++) {
                char shape[32];
                snprintf(shape, sizeof shape, "%lldx%lld", (long long)layers[i].info.rows, (long long)layers[i].info.cols);
                fprintf(out, "%-48s %-10s %-12s %-9s %12llu %11.3f\n", layers[i].prefix, layers[i].quantizer, shape,
                        ql_dtype_torch_name(layers[i].info.src_dtype), (unsigned long long)layers[i].info.bytes,
                        8.0 * (double)layers[i].info.bytes / (double)(layers[i].info.rows * layers[i].info.cols));
            }
            fprintf(out, "\n%zu quantized layers, %lld parameters\n", nlayers, (long long)qparams);
            fprintf(out, "matrix bits/param: %.3f (every byte stored for the quantized matrices, %llu, over their parameters)\n",
                    matrix_bpp, (unsigned long long)qbytes);
        } else {
            fprintf(out, "\nno quantized layers\n");
        }
        fprintf(out, "model bits/param: %.3f (every tensor byte, %llu, over all %lld parameters)\n", model_bpp,
                (unsigned long long)total, (long long)all_params);
    }
done:
    if (qs)
        for (size_t i = 0; i < nplugins; i++) ql_qz_close(qs[i]);
    free(qs);
    free(layers);
    ql_string_list_free(prefixes, nprefixes);
    ql_string_list_free(plugins, nplugins);
    ql_st_close(f);
    return rc;
}
