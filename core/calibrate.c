/* Calibration for data-aware quantizers (plugin ABI 1.3): the calibration
 * windows, and the layer-sequential pass of IST-DASLab/gptq's llama.py
 * (true-sequential): the windows' hidden states enter block i after the
 * already quantized blocks before it; inside the block, each group of
 * linears that share an input (q, k, v; o; gate, up; down) is calibrated
 * on the inputs it sees with the groups before it already quantized, then
 * quantized; then the block's outputs, through its quantized linears, are
 * the next block's inputs.  Memory: two copies of the windows' hidden
 * states (inputs and outputs of one block) and one calibration (for optq,
 * one cols x cols Hessian) at a time, besides the model. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "calibrate_internal.h"
#include "ops_backward.h"
#include "progress.h"
#include "qlora/dataset.h"
#include "qlora/error.h"
#include "qlora/fs.h"
#include "qlora/tokenizer.h"

/* ---- the windows ---- */

static int save_windows(const char *path, const int32_t *tokens, int samples, int len)
{
    json_t *root = json_object(), *all = json_array();
    int rc = root && all ? QL_OK : ql_error(QL_ENOMEM, "out of memory");
    for (int s = 0; s < samples && rc == QL_OK; s++) {
        json_t *w = json_array();
        for (int t = 0; t < len && w; t++) json_array_append_new(w, json_integer(tokens[(size_t)s * len + t]));
        if (!w || json_array_append_new(all, w)) rc = ql_error(QL_ENOMEM, "out of memory");
    }
    char *text = NULL;
    if (rc == QL_OK) {
        json_object_set_new(root, "samples", json_integer(samples));
        json_object_set_new(root, "len", json_integer(len));
        json_object_set(root, "tokens", all);
        text = json_dumps(root, JSON_COMPACT);
        rc = text ? ql_write_file_atomic(path, text, strlen(text)) : ql_error(QL_ENOMEM, "out of memory");
        if (rc) ql_error_context("writing the calibration windows to %s", path);
    }
    free(text);
    json_decref(all);
    json_decref(root);
    return rc;
}

int ql_calib_tokens(const ql_calib_opts *opts, const char *model_dir, int max_len, int32_t **tokens, int *samples,
                    int *len)
{
    *tokens = NULL;
    const int S = opts->samples > 0 ? opts->samples : QL_CALIB_DEFAULT_SAMPLES;
    const int T = opts->len > 0 ? opts->len : QL_CALIB_DEFAULT_LEN;
    if (!opts->data) return ql_error(QL_EINVAL, "no calibration data (--calib-data FILE)");
    if (T > max_len)
        return ql_error(QL_EINVAL, "--calib-len %d is longer than the model's %d positions", T, max_len);
    if ((int64_t)S * T > ((int64_t)1 << 31))
        return ql_error(QL_EINVAL, "--calib-samples %d x --calib-len %d tokens is too many", S, T);
    ql_data_format fmt;
    int rc = opts->format ? ql_data_format_parse(opts->format, &fmt) : ql_data_format_detect(opts->data, &fmt, NULL, 0);
    if (rc) return ql_error_context("--calib-data %s", opts->data);
    ql_tokenizer *tok = NULL;
    ql_dataset *d = NULL;
    int32_t *stream = NULL, *out = NULL;
    if ((rc = ql_tokenizer_load(model_dir, &tok))) goto done;
    const ql_dataset_opts dopts = {.format = fmt, .train_on_source = 1};
    if ((rc = ql_dataset_load(opts->data, tok, &dopts, &d))) {
        ql_error_context("--calib-data %s", opts->data);
        goto done;
    }
    int64_t total = 0;
    for (size_t i = 0; i < d->n; i++) total += d->examples[i].len;
    if (total < (int64_t)T + 1) {
        rc = ql_error(QL_EINVAL,
                      "--calib-data %s holds %lld tokens (%s format), fewer than --calib-len %d + 1: give more text "
                      "or a shorter --calib-len",
                      opts->data, (long long)total, ql_data_format_name(fmt), T);
        goto done;
    }
    stream = malloc((size_t)total * sizeof *stream);
    out = malloc((size_t)S * (size_t)T * sizeof *out);
    if (!stream || !out) {
        rc = ql_error(QL_ENOMEM, "out of memory for %lld calibration tokens", (long long)total);
        goto done;
    }
    int64_t k = 0;
    for (size_t i = 0; i < d->n; i++) {
        memcpy(stream + k, d->examples[i].ids, (size_t)d->examples[i].len * sizeof *stream);
        k += d->examples[i].len;
    }
    uint64_t state = opts->seed;
    for (int s = 0; s < S; s++) {
        const uint64_t start = ql_uniform_below(&state, (uint64_t)(total - T));
        memcpy(out + (size_t)s * T, stream + start, (size_t)T * sizeof *out);
    }
    if (opts->save_tokens && (rc = save_windows(opts->save_tokens, out, S, T))) goto done;
    *tokens = out;
    out = NULL;
    *samples = S;
    *len = T;
done:
    free(out);
    free(stream);
    ql_dataset_destroy(d);
    ql_tokenizer_destroy(tok);
    return rc;
}

/* ---- the layer-sequential pass ---- */

typedef struct feed_ctx {
    const ql_qz *q;
    ql_calib *calib;
    int group;
} feed_ctx;

static int feed_group(void *ctx, int group, const float *x, int64_t rows, int64_t cols)
{
    feed_ctx *f = ctx;
    (void)cols;
    if (group != f->group) return QL_OK;
    ql_error_clear();
    int rc = f->q->desc->calib_feed(f->q->inst, f->calib, x, rows);
    if (rc && !ql_error_message()[0]) ql_error(rc, "calib_feed failed");
    return rc ? rc : QL_BLOCK_STOP;
}

int ql_llama_calibrate(ql_llama *m, const ql_qz *q, const ql_calib_opts *opts)
{
    const ql_llama_config *c = ql_llama_get_config(m);
    const int64_t H = c->hidden;
    int32_t *tokens = NULL;
    int S = 0, T = 0;
    int rc = ql_calib_tokens(opts, ql_llama_dir(m), c->max_len, &tokens, &S, &T);
    if (rc) return rc;
    const size_t window = (size_t)T * (size_t)H;
    float *inps = malloc((size_t)S * window * sizeof *inps), *outs = malloc((size_t)S * window * sizeof *outs);
    float *work = malloc(window * sizeof *work);
    if (!inps || !outs || !work) {
        rc = ql_error(QL_ENOMEM, "out of memory for the hidden states of %d calibration windows of %d tokens (%.1f MiB)",
                      S, T, 2.0 * (double)S * (double)window * sizeof(float) / 1048576.0);
        goto done;
    }
    for (int s = 0; s < S && rc == QL_OK; s++) rc = ql_llama_embed(m, tokens + (size_t)s * T, T, inps + (size_t)s * window);
    if (rc) goto done;
    ql_progress prog;
    ql_progress_begin(&prog, "calibrate", (int64_t)c->n_layers * QL_BLOCK_GROUPS, "groups", opts->progress);
    ql_llama_layer *layers = ql_llama_layers(m);
    for (int i = 0; i < c->n_layers && rc == QL_OK; i++) {
        ql_llama_layer *L = &layers[i];
        ql_linear *const groups[QL_BLOCK_GROUPS][3] = {
            [QL_BLOCK_QKV] = {&L->q, &L->k, &L->v},
            [QL_BLOCK_O] = {&L->o, NULL, NULL},
            [QL_BLOCK_GATE_UP] = {&L->gate, &L->up, NULL},
            [QL_BLOCK_DOWN] = {&L->down, NULL, NULL},
        };
        for (int g = 0; g < QL_BLOCK_GROUPS && rc == QL_OK; g++) {
            ql_linear *first = groups[g][0];
            ql_matrix_desc md = {.name = first->name, .rows = first->out, .cols = first->in, .src_dtype = c->dtype};
            feed_ctx f = {.q = q, .calib = NULL, .group = g};
            ql_error_clear();
            if ((rc = q->desc->calib_create(q->inst, &md, &f.calib))) {
                if (!ql_error_message()[0]) ql_error(rc, "calib_create failed");
                ql_error_context("quantizer %s calibrating %s", q->desc->name, first->name);
                break;
            }
            for (int s = 0; s < S && rc == QL_OK; s++) {
                memcpy(work, inps + (size_t)s * window, window * sizeof *work);
                rc = ql_llama_block_forward(m, i, work, T, feed_group, &f);
                if (rc == QL_BLOCK_STOP) rc = QL_OK;
                else if (rc == QL_OK) rc = ql_error(QL_EINTERNAL, "block %d never reached linear group %d", i, g);
                if (rc) ql_error_context("quantizer %s calibrating %s on window %d", q->desc->name, first->name, s);
            }
            for (int k = 0; k < 3 && groups[g][k] && rc == QL_OK; k++) {
                ql_linear *l = groups[g][k];
                ql_matrix_desc lm = {.name = l->name, .rows = l->out, .cols = l->in, .src_dtype = c->dtype};
                ql_qstate *st = NULL;
                ql_error_clear();
                rc = q->desc->quantize_calibrated(q->inst, &lm, l->dense, f.calib, &st);
                if (rc) {
                    if (!ql_error_message()[0]) ql_error(rc, "quantize_calibrated failed");
                    ql_error_context("quantizer %s on %s", q->desc->name, l->name);
                    break;
                }
                free(l->dense);
                l->dense = NULL;
                l->state = st;
                l->qz = q;
            }
            q->desc->calib_free(q->inst, f.calib);
            if (rc == QL_OK) ql_progress_update(&prog, (int64_t)i * QL_BLOCK_GROUPS + g + 1, first->name);
        }
        /* the next block's inputs come through this block's quantized linears */
        for (int s = 0; s < S && rc == QL_OK; s++) {
            float *o = outs + (size_t)s * window;
            memcpy(o, inps + (size_t)s * window, window * sizeof *o);
            rc = ql_llama_block_forward(m, i, o, T, NULL, NULL);
        }
        float *t = inps;
        inps = outs;
        outs = t;
    }
    if (rc == QL_OK) ql_progress_end(&prog);
done:
    free(inps);
    free(outs);
    free(work);
    free(tokens);
    return rc;
}
