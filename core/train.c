#include "qlora/train.h"

#include <errno.h>
#include <jansson.h>
#include <libgen.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "json_out.h"
#include "lora_model.h"
#include "ops_backward.h"
#include "progress.h"
#include "qlora/error.h"
#include "qlora/fs.h"
#include "qlora/safetensors.h"
#include "qlora/tokenizer.h"

#define CHECKPOINT_FORMAT 1

void ql_train_opts_default(ql_train_opts *o)
{
    memset(o, 0, sizeof *o);
    o->quantizer = "nf4";
    o->data.format = QL_FMT_ALPACA;
    o->data.source_max_len = 1024;
    o->data.target_max_len = 256;
    o->lora = (ql_lora_config){.r = 64, .alpha = 16.0f, .dropout = 0.05f, .modules = QL_LORA_ALL_MODULES};
    o->lr = 2e-4f;
    o->weight_decay = 0.0f;
    o->max_grad_norm = 0.3f;
    o->warmup_ratio = 0.03f;
    o->beta1 = 0.9f;
    o->beta2 = 0.999f;
    o->eps = 1e-8f;
    o->schedule = QL_SCHED_CONSTANT;
    o->batch_size = 1;
    o->grad_accum = 16;
    o->epochs = 1.0;
    o->seed = 42;
    o->shuffle = 1;
    o->progress = 1;
}

int ql_lr_schedule_parse(const char *name, ql_lr_schedule *out)
{
    if (!strcmp(name, "constant")) *out = QL_SCHED_CONSTANT;
    else if (!strcmp(name, "linear")) *out = QL_SCHED_LINEAR;
    else if (!strcmp(name, "cosine")) *out = QL_SCHED_COSINE;
    else return ql_error(QL_EINVAL, "--lr-scheduler %s: use constant, linear or cosine", name);
    return QL_OK;
}

static const char *schedule_name(ql_lr_schedule s)
{
    return s == QL_SCHED_LINEAR ? "linear" : s == QL_SCHED_COSINE ? "cosine" : "constant";
}

/* Linear warmup over ceil(warmup_ratio * total) steps (for every schedule,
 * constant included), then constant, linear decay to 0, or half a cosine to 0. */
float ql_lr_at(const ql_train_opts *o, int64_t step, int64_t total)
{
    int64_t warm = (int64_t)ceil((double)o->warmup_ratio * (double)total);
    if (step < warm) return o->lr * (float)(step + 1) / (float)(warm + 1);
    if (o->schedule == QL_SCHED_CONSTANT || total <= warm) return o->lr;
    double progress = (double)(step - warm) / (double)(total - warm);
    if (o->schedule == QL_SCHED_LINEAR) return (float)(o->lr * (1.0 - progress));
    return (float)(o->lr * 0.5 * (1.0 + cos(M_PI * progress)));
}

/* ---- the run's configuration, compared on --resume ---- */

static json_t *run_config(const ql_train_opts *o, const char *quantization)
{
    json_t *c = json_object();
    char *abs_model = realpath(o->model_dir, NULL), *abs_data = realpath(o->data_path, NULL);
    json_object_set_new(c, "model", json_string(abs_model ? abs_model : o->model_dir));
    json_object_set_new(c, "quantizer", json_string(quantization));
    json_object_set_new(c, "data", json_string(abs_data ? abs_data : o->data_path));
    free(abs_model);
    free(abs_data);
    json_object_set_new(c, "format", json_string(ql_data_format_name(o->data.format)));
    json_object_set_new(c, "source_max_len", json_integer(o->data.source_max_len));
    json_object_set_new(c, "target_max_len", json_integer(o->data.target_max_len));
    json_object_set_new(c, "max_len", json_integer(o->data.max_len));
    json_object_set_new(c, "max_examples", json_integer(o->data.max_examples));
    json_object_set_new(c, "train_on_source", json_boolean(o->data.train_on_source));
    json_object_set_new(c, "lora_r", json_integer(o->lora.r));
    json_object_set_new(c, "lora_alpha", ql_json_float(o->lora.alpha));
    json_object_set_new(c, "lora_dropout", ql_json_float(o->lora.dropout));
    json_object_set_new(c, "lora_modules", json_integer(o->lora.modules));
    json_object_set_new(c, "lr", ql_json_float(o->lr));
    json_object_set_new(c, "weight_decay", ql_json_float(o->weight_decay));
    json_object_set_new(c, "max_grad_norm", ql_json_float(o->max_grad_norm));
    json_object_set_new(c, "warmup_ratio", ql_json_float(o->warmup_ratio));
    json_object_set_new(c, "lr_scheduler", json_string(schedule_name(o->schedule)));
    json_object_set_new(c, "batch_size", json_integer(o->batch_size));
    json_object_set_new(c, "grad_accum", json_integer(o->grad_accum));
    json_object_set_new(c, "seed", json_integer(o->seed));
    json_object_set_new(c, "shuffle", json_boolean(o->shuffle));
    json_object_set_new(c, "group_by_length", json_boolean(o->group_by_length));
    json_object_set_new(c, "gradient_checkpointing", json_boolean(o->gradient_checkpointing));
    return c;
}

/* Keys whose change makes a checkpoint's continuation a different run. */
static int config_mismatch(json_t *saved, json_t *now, const char *ckpt)
{
    const char *key;
    json_t *v;
    json_object_foreach(now, key, v) {
        if (!strcmp(key, "gradient_checkpointing")) continue; /* same results either way */
        json_t *s = json_object_get(saved, key);
        if (!s || !json_equal(s, v)) {
            char *a = s ? json_dumps(s, JSON_ENCODE_ANY) : strdup("(absent)"), *b = json_dumps(v, JSON_ENCODE_ANY);
            int rc = ql_error(QL_EINVAL,
                              "%s was written by a run with %s = %s, but this run has %s = %s; resume with the same "
                              "settings or start a new run",
                              ckpt, key, a ? a : "?", key, b ? b : "?");
            free(a);
            free(b);
            return rc;
        }
    }
    return QL_OK;
}

static int write_json_file(const char *dir, const char *name, json_t *j)
{
    char *text = ql_json_dumps_py(j, 2, 0);
    char *path = ql_path_join(dir, name);
    int rc = text && path ? ql_write_file_atomic(path, text, strlen(text)) : ql_error(QL_ENOMEM, "out of memory");
    free(text);
    free(path);
    return rc;
}

/* ---- checkpoints ---- */

typedef struct state {
    int64_t step;        /* optimizer steps done */
    int64_t micro_done;  /* micro-batches consumed */
    double tokens_seen;
} state;

static int save_checkpoint(const ql_train_opts *o, const char *run_dir, const ql_lora *lora, const ql_adamw *opt,
                           const state *st, json_t *config)
{
    char name[64], *dest;
    snprintf(name, sizeof name, "checkpoint-%lld", (long long)st->step);
    dest = ql_path_join(run_dir, name);
    if (!dest) return ql_error(QL_ENOMEM, "out of memory");
    ql_outdir *od;
    int rc = ql_outdir_begin(dest, 1, &od);
    if (rc) {
        free(dest);
        return rc;
    }
    const char *tmp = ql_outdir_path(od);
    rc = ql_lora_save_peft(lora, tmp, o->model_dir);
    ql_st_writer *w = NULL;
    if (rc == QL_OK) rc = ql_st_writer_create(&w);
    if (rc == QL_OK) {
        ql_tensor m = {.name = "adamw.m", .dtype = QL_DTYPE_F32, .ndim = 1, .data = opt->m, .nbytes = opt->n * 4};
        m.shape[0] = (int64_t)opt->n;
        ql_tensor v = m;
        v.name = "adamw.v";
        v.data = opt->v;
        int64_t step = opt->step;
        ql_tensor s = {.name = "adamw.step", .dtype = QL_DTYPE_I64, .ndim = 0, .data = &step, .nbytes = 8};
        rc = ql_st_writer_add(w, &m);
        if (rc == QL_OK) rc = ql_st_writer_add(w, &v);
        if (rc == QL_OK) rc = ql_st_writer_add(w, &s);
        char *path = ql_path_join(tmp, "optimizer.safetensors");
        if (rc == QL_OK) rc = ql_st_writer_save(w, path);
        free(path);
    }
    ql_st_writer_destroy(w);
    if (rc == QL_OK) {
        json_t *ts = json_object();
        json_object_set_new(ts, "format", json_integer(CHECKPOINT_FORMAT));
        json_object_set_new(ts, "global_step", json_integer(st->step));
        json_object_set_new(ts, "micro_batches_done", json_integer(st->micro_done));
        json_object_set_new(ts, "tokens_seen", json_real(st->tokens_seen));
        json_object_set_new(ts, "lora_parameters", json_integer((json_int_t)lora->n_params));
        json_object_set(ts, "config", config);
        rc = write_json_file(tmp, "trainer_state.json", ts);
        json_decref(ts);
    }
    if (rc) {
        ql_outdir_abandon(od);
        free(dest);
        return rc;
    }
    rc = ql_outdir_commit(od);
    free(dest);
    return rc;
}

static int load_checkpoint(const char *ckpt, ql_lora *lora, ql_adamw *opt, state *st, json_t *config)
{
    char *path = ql_path_join(ckpt, "trainer_state.json");
    json_error_t jerr;
    json_t *ts = json_load_file(path, 0, &jerr);
    int rc = QL_OK;
    if (!ts) {
        rc = ql_path_exists(path) ? ql_error(QL_EFORMAT, "%s is not valid JSON: %s", path, jerr.text)
                                  : ql_error(QL_ENOTFOUND, "%s is not a checkpoint: trainer_state.json is missing", ckpt);
        free(path);
        return rc;
    }
    free(path);
    json_t *fmt = json_object_get(ts, "format");
    if (!json_is_integer(fmt) || json_integer_value(fmt) != CHECKPOINT_FORMAT)
        rc = ql_error(QL_EFORMAT, "%s: checkpoint format %lld, this qlora reads format %d", ckpt,
                      json_is_integer(fmt) ? (long long)json_integer_value(fmt) : -1LL, CHECKPOINT_FORMAT);
    if (rc == QL_OK) rc = config_mismatch(json_object_get(ts, "config"), config, ckpt);
    if (rc == QL_OK) {
        st->step = json_integer_value(json_object_get(ts, "global_step"));
        st->micro_done = json_integer_value(json_object_get(ts, "micro_batches_done"));
        st->tokens_seen = json_number_value(json_object_get(ts, "tokens_seen"));
    }
    json_decref(ts);
    if (rc) return rc;
    /* adapter weights */
    path = ql_path_join(ckpt, "adapter_model.safetensors");
    ql_st_file *f = NULL;
    rc = ql_st_open(path, &f);
    free(path);
    if (rc) return rc;
    for (int i = 0; i < lora->n_layers && rc == QL_OK; i++)
        for (int k = 0; k < QL_MOD_COUNT && rc == QL_OK; k++) {
            ql_lora_pair *p = ql_lora_pair_at(lora, i, k);
            if (!p) continue;
            for (int which = 0; which < 2 && rc == QL_OK; which++) {
                char key[256];
                snprintf(key, sizeof key, "base_model.model.model.layers.%d.%s.lora_%c.weight", i, ql_lora_module_path(k),
                         which ? 'B' : 'A');
                const ql_tensor *t = ql_st_find(f, key);
                size_t n = (size_t)(which ? p->out * lora->cfg.r : lora->cfg.r * p->in);
                if (!t || t->dtype != QL_DTYPE_F32 || t->nbytes != n * 4)
                    rc = ql_error(QL_EFORMAT, "%s: adapter tensor %s is missing or has the wrong shape", ckpt, key);
                else memcpy(which ? p->B : p->A, t->data, n * 4);
            }
        }
    ql_st_close(f);
    if (rc) return rc;
    path = ql_path_join(ckpt, "optimizer.safetensors");
    rc = ql_st_open(path, &f);
    free(path);
    if (rc) return rc;
    const ql_tensor *m = ql_st_find(f, "adamw.m"), *v = ql_st_find(f, "adamw.v"), *s = ql_st_find(f, "adamw.step");
    if (!m || !v || !s || m->nbytes != opt->n * 4 || v->nbytes != opt->n * 4 || s->dtype != QL_DTYPE_I64)
        rc = ql_error(QL_EFORMAT, "%s/optimizer.safetensors does not match %zu LoRA parameters", ckpt, opt->n);
    else {
        memcpy(opt->m, m->data, opt->n * 4);
        memcpy(opt->v, v->data, opt->n * 4);
        memcpy(&opt->step, s->data, 8);
    }
    ql_st_close(f);
    return rc;
}

/* metrics.jsonl keeps rows up to `step` (a resumed run rewrites what follows) */
static int trim_metrics(const char *path, int64_t step)
{
    char *data;
    size_t len;
    if (!ql_path_exists(path)) return QL_OK;
    int rc = ql_read_file(path, &data, &len);
    if (rc) return rc;
    char *out = malloc(len + 1);
    size_t k = 0;
    if (!out) {
        free(data);
        return ql_error(QL_ENOMEM, "out of memory");
    }
    for (char *line = data; line < data + len;) {
        char *nl = memchr(line, '\n', (size_t)(data + len - line));
        size_t ll = nl ? (size_t)(nl - line) + 1 : (size_t)(data + len - line);
        json_t *row = json_loadb(line, nl ? (size_t)(nl - line) : ll, 0, NULL);
        json_t *s = row ? json_object_get(row, "step") : NULL;
        if (row && json_is_integer(s) && json_integer_value(s) <= step) {
            memcpy(out + k, line, ll);
            k += ll;
        }
        json_decref(row);
        line += ll;
    }
    rc = ql_write_file_atomic(path, out, k);
    free(out);
    free(data);
    return rc;
}

static int append_metrics(FILE *f, json_t *row, int echo)
{
    char *text = ql_json_dumps_py(row, 0, 0);
    if (!text) return ql_error(QL_ENOMEM, "out of memory");
    fprintf(f, "%s\n", text);
    fflush(f);
    fsync(fileno(f));
    if (echo) printf("%s\n", text), fflush(stdout);
    free(text);
    return QL_OK;
}

/* ---- evaluation ---- */

static int evaluate(ql_llama *m, ql_lora *lora, const ql_dataset *d, double *loss, int64_t *tokens)
{
    double sum = 0;
    int64_t n = 0;
    ql_lora_step_opts so = {.loss_scale = 0, .backward = 0};
    for (size_t i = 0; i < d->n; i++) {
        int rc = ql_lora_model_step(m, lora, d->examples[i].ids, d->examples[i].labels, d->examples[i].len, &so, &sum, &n);
        if (rc) return rc;
    }
    *loss = n ? sum / (double)n : NAN;
    *tokens = n;
    return QL_OK;
}

static int64_t count_targets(const ql_example *e)
{
    int64_t n = 0;
    for (int32_t t = 1; t < e->len; t++) n += e->labels[t] != QL_IGNORE_INDEX;
    return n;
}

int ql_train(const ql_train_opts *o)
{
    int rc = QL_OK;
    ql_llama *m = NULL;
    ql_tokenizer *tok = NULL;
    ql_dataset *d = NULL, *ed = NULL;
    ql_lora *lora = NULL;
    ql_adamw *opt = NULL;
    json_t *config = NULL;
    FILE *metrics = NULL;
    size_t *order = NULL;
    char run_dir[4096];
    int tty = isatty(STDERR_FILENO);
    int echo_rows = o->progress && !isatty(STDOUT_FILENO);

    if (o->batch_size < 1 || o->grad_accum < 1) return ql_error(QL_EINVAL, "--batch-size and --grad-accum must be >= 1");
    if (!(o->lr > 0)) return ql_error(QL_EINVAL, "--lr must be positive");
    if (o->resume_from) {
        char tmp[4096];
        snprintf(tmp, sizeof tmp, "%s", o->resume_from);
        size_t l = strlen(tmp);
        while (l > 1 && tmp[l - 1] == '/') tmp[--l] = '\0';
        if (!ql_is_dir(tmp)) return ql_error(QL_ENOTFOUND, "--resume %s: no such checkpoint folder", o->resume_from);
        snprintf(run_dir, sizeof run_dir, "%s", o->output_dir ? o->output_dir : dirname(tmp));
    } else {
        if (!o->output_dir) return ql_error(QL_EINVAL, "--output RUN_DIR is required");
        snprintf(run_dir, sizeof run_dir, "%s", o->output_dir);
        if (ql_path_exists(run_dir) && !o->force)
            return ql_error(QL_EEXIST,
                            "run folder %s already exists: continue it with --resume %s/checkpoint-N, or replace it with "
                            "--force",
                            run_dir, run_dir);
    }

    ql_llama_load_opts lo = {.quantizer = o->quantizer, .progress = 0};
    if ((rc = ql_llama_load(o->model_dir, &lo, &m))) goto done;
    if ((rc = ql_tokenizer_load(o->model_dir, &tok))) goto done;
    ql_dataset_opts dopts = o->data;
    if (dopts.max_len <= 0) dopts.max_len = ql_llama_get_config(m)->max_positions;
    if ((rc = ql_dataset_load(o->data_path, tok, &dopts, &d))) goto done;
    if (o->eval_data_path && (rc = ql_dataset_load(o->eval_data_path, tok, &dopts, &ed))) goto done;
    fprintf(stderr,
            "{\"event\": \"data\", \"file\": \"%s\", \"examples\": %zu, \"read\": %zu, \"truncated\": %zu, "
            "\"dropped_empty\": %zu, \"tokens\": %lld, \"target_tokens\": %lld}\n",
            o->data_path, d->n, d->n_read, d->n_truncated, d->n_dropped_empty, (long long)d->total_tokens,
            (long long)d->total_target_tokens);

    if ((rc = ql_lora_create(m, &o->lora, (uint64_t)o->seed, &lora))) goto done;
    if ((rc = ql_adamw_create(lora->n_params, o->beta1, o->beta2, o->eps, o->weight_decay, &opt))) goto done;
    ql_train_opts effective = *o;
    effective.data.max_len = dopts.max_len; /* the model's length when not given */
    config = run_config(&effective, ql_llama_quantization(m));

    const int64_t mb_per_epoch = ((int64_t)d->n + o->batch_size - 1) / o->batch_size;
    int64_t total = o->steps;
    if (total <= 0) {
        total = (int64_t)floor(o->epochs * (double)mb_per_epoch / (double)o->grad_accum);
        if (total < 1) total = 1;
    }
    state st = {0};
    if (o->resume_from) {
        if ((rc = load_checkpoint(o->resume_from, lora, opt, &st, config))) goto done;
        if (st.step >= total) {
            rc = ql_error(QL_EINVAL, "%s is at step %lld, already at or past --steps %lld", o->resume_from,
                          (long long)st.step, (long long)total);
            goto done;
        }
    } else {
        if (ql_path_exists(run_dir) && (rc = ql_remove_tree(run_dir))) goto done;
        if ((rc = ql_mkdir_p(run_dir))) goto done;
        if ((rc = write_json_file(run_dir, "run_config.json", config))) goto done;
    }
    char *mpath = ql_path_join(run_dir, "metrics.jsonl");
    if (!mpath) {
        rc = ql_error(QL_ENOMEM, "out of memory");
        goto done;
    }
    if (o->resume_from) rc = trim_metrics(mpath, st.step);
    if (rc == QL_OK && !(metrics = fopen(mpath, "a"))) rc = ql_error(QL_EIO, "cannot open %s: %s", mpath, strerror(errno));
    free(mpath);
    if (rc) goto done;

    order = malloc(d->n * sizeof *order);
    if (!order) {
        rc = ql_error(QL_ENOMEM, "out of memory");
        goto done;
    }
    int64_t order_epoch = -1;
    int64_t last_saved = o->resume_from ? st.step : -1;
    const int64_t start_step = st.step;
    double t_start = ql_now();
    double tokens_at_start = st.tokens_seen;
    for (int64_t step = st.step; step < total; step++) {
        memset(lora->grads, 0, lora->n_params * sizeof(float));
        double step_loss = 0;
        int64_t step_tokens = 0;
        for (int a = 0; a < o->grad_accum; a++) {
            int64_t g = st.micro_done++;
            int64_t epoch = g / mb_per_epoch, within = g % mb_per_epoch;
            if (epoch != order_epoch) {
                if ((rc = ql_dataset_order(d, o->shuffle ? o->seed + epoch : -1, o->group_by_length, o->batch_size,
                                           order)))
                    goto done;
                order_epoch = epoch;
            }
            int64_t first = within * o->batch_size;
            int64_t last = first + o->batch_size < (int64_t)d->n ? first + o->batch_size : (int64_t)d->n;
            int64_t count = 0;
            for (int64_t j = first; j < last; j++) count += count_targets(&d->examples[order[j]]);
            if (count == 0) continue;
            double sum = 0;
            int64_t n = 0;
            for (int64_t j = first; j < last && rc == QL_OK; j++) {
                const ql_example *e = &d->examples[order[j]];
                uint64_t seed = (uint64_t)o->seed * 0x9E3779B97F4A7C15ull ^ (uint64_t)(g * o->batch_size + (j - first));
                ql_lora_step_opts so = {.loss_scale = 1.0f / ((float)count * (float)o->grad_accum),
                                        .dropout_seed = ql_splitmix64_next(&seed),
                                        .checkpointing = o->gradient_checkpointing,
                                        .backward = 1};
                rc = ql_lora_model_step(m, lora, e->ids, e->labels, e->len, &so, &sum, &n);
                step_tokens += e->len;
            }
            if (rc) goto done;
            step_loss += (sum / (double)n) / o->grad_accum;
        }
        double norm = ql_clip_grad_norm(lora->grads, lora->n_params, o->max_grad_norm);
        if (!isfinite(step_loss) || !isfinite(norm)) {
            char last[64] = "none (no checkpoint was saved yet)";
            if (last_saved >= 0) snprintf(last, sizeof last, "checkpoint-%lld", (long long)last_saved);
            rc = ql_error(QL_ENUMERIC, "loss is %s at step %lld (gradient norm %g): stopped; the last good checkpoint is %s in %s",
                          isnan(step_loss) ? "NaN" : isfinite(step_loss) ? "finite but the gradient is not" : "infinite",
                          (long long)step + 1, norm, last, run_dir);
            goto done;
        }
        float lr = ql_lr_at(o, step, total);
        ql_adamw_update(opt, lora->params, lora->grads, lr);
        st.step = step + 1;
        st.tokens_seen += (double)step_tokens;
        double elapsed = ql_now() - t_start;
        double tps = elapsed > 0 ? (st.tokens_seen - tokens_at_start) / elapsed : 0;
        json_t *row = json_object();
        json_object_set_new(row, "step", json_integer(st.step));
        json_object_set_new(row, "loss", json_real(step_loss));
        json_object_set_new(row, "lr", ql_json_float(lr));
        json_object_set_new(row, "grad_norm", json_real(norm));
        json_object_set_new(row, "tokens", json_integer((json_int_t)st.tokens_seen));
        json_object_set_new(row, "tokens_per_s", json_real(round(tps * 10) / 10));
        json_object_set_new(row, "epoch", json_real(round((double)st.micro_done / (double)mb_per_epoch * 1e4) / 1e4));
        append_metrics(metrics, row, echo_rows);
        json_decref(row);
        if (o->progress && tty) {
            double eta = elapsed / (double)(st.step - start_step) * (double)(total - st.step);
            fprintf(stderr, "\r\033[Ktrain %lld/%lld  loss %.4f  lr %.2e  %.0f tok/s  elapsed %.0fs  ETA %.0fs",
                    (long long)st.step, (long long)total, step_loss, lr, tps, elapsed, eta);
            fflush(stderr);
        }
        int save_now = (o->save_steps > 0 && st.step % o->save_steps == 0) || st.step == total;
        int eval_now = ed && ((o->eval_steps > 0 && st.step % o->eval_steps == 0) || st.step == total);
        if (eval_now) {
            double el;
            int64_t et;
            if ((rc = evaluate(m, lora, ed, &el, &et))) goto done;
            json_t *er = json_object();
            json_object_set_new(er, "step", json_integer(st.step));
            json_object_set_new(er, "eval_loss", json_real(el));
            json_object_set_new(er, "eval_ppl", json_real(exp(el)));
            json_object_set_new(er, "eval_tokens", json_integer(et));
            append_metrics(metrics, er, echo_rows);
            json_decref(er);
        }
        if (save_now) {
            if ((rc = save_checkpoint(o, run_dir, lora, opt, &st, config))) goto done;
            last_saved = st.step;
        }
    }
    if (o->progress && tty) fputc('\n', stderr);
    /* the final adapter at the top of the run folder, loadable by peft */
    if ((rc = ql_lora_save_peft(lora, run_dir, o->model_dir))) goto done;
    fprintf(stderr, "wrote %s (adapter after %lld steps)\n", run_dir, (long long)st.step);
done:
    if (metrics) fclose(metrics);
    free(order);
    json_decref(config);
    ql_adamw_destroy(opt);
    ql_lora_destroy(lora);
    ql_dataset_destroy(ed);
    ql_dataset_destroy(d);
    ql_tokenizer_destroy(tok);
    ql_llama_destroy(m);
    return rc;
}
