#include "qlora/train.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <libgen.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dist.h"
#include "json_out.h"
#include "lora_model.h"
#include "ops_backward.h"
#include "progress.h"
#include "train_internal.h"
#include "qlora/dtype.h"
#include "qlora/error.h"
#include "qlora/fs.h"
#include "qlora/safetensors.h"
#include "qlora/tokenizer.h"

#define CHECKPOINT_FORMAT 1

/* the default --quantizer: told from one the user gave by its address */
static const char default_quantizer[] = "nf4";

void ql_train_opts_default(ql_train_opts *o)
{
    memset(o, 0, sizeof *o);
    o->quantizer = default_quantizer;
    o->data.format = QL_FMT_ALPACA;
    o->data.source_max_len = 1024;
    o->data.target_max_len = 256;
    /* qlora.py's defaults (docs/training.md lists where ours differ and why) */
    o->lora = (ql_lora_config){.r = 64, .alpha = 16.0f, .dropout = 0.0f, .modules = QL_LORA_ALL_MODULES};
    o->lr = 2e-4f;
    o->weight_decay = 0.0f;
    o->max_grad_norm = 0.3f;
    o->warmup_ratio = 0.03;
    o->beta1 = 0.9f;
    o->beta2 = 0.999f;
    o->eps = 1e-8f;
    o->schedule = QL_SCHED_CONSTANT;
    o->batch_size = 1;
    o->grad_accum = 16;
    o->save_steps = 250;
    o->save_total_limit = 40;
    o->group_by_length = 1;
    o->epochs = 1.0;
    o->seed = 42;
    o->data_seed = -1;
    o->shuffle = 1;
    o->progress = 1;
}

int ql_lr_schedule_parse(const char *name, ql_lr_schedule *out)
{
    if (!strcmp(name, "constant")) *out = QL_SCHED_CONSTANT;
    else if (!strcmp(name, "linear")) *out = QL_SCHED_LINEAR;
    else if (!strcmp(name, "cosine")) *out = QL_SCHED_COSINE;
    else if (!strcmp(name, "constant_with_warmup")) *out = QL_SCHED_CONSTANT_WITH_WARMUP;
    else return ql_error(QL_EINVAL, "--lr-scheduler %s: use constant, constant_with_warmup, linear or cosine", name);
    return QL_OK;
}

const char *ql_lr_schedule_name(ql_lr_schedule s)
{
    switch (s) {
    case QL_SCHED_CONSTANT: return "constant";
    case QL_SCHED_LINEAR: return "linear";
    case QL_SCHED_COSINE: return "cosine";
    case QL_SCHED_CONSTANT_WITH_WARMUP: return "constant_with_warmup";
    }
    return "?";
}

/* transformers' schedules (optimization.py): the lambda of step k times lr */
float ql_lr_at(const ql_train_opts *o, int64_t step, int64_t total)
{
    if (o->schedule == QL_SCHED_CONSTANT) return o->lr;
    int64_t warm = (int64_t)ceil(o->warmup_ratio * (double)total);
    double f;
    if (step < warm) f = (double)step / (double)(warm > 1 ? warm : 1);
    else if (o->schedule == QL_SCHED_CONSTANT_WITH_WARMUP) f = 1.0;
    else if (o->schedule == QL_SCHED_LINEAR) f = fmax(0.0, (double)(total - step) / (double)(total - warm > 1 ? total - warm : 1));
    else {
        double progress = (double)(step - warm) / (double)(total - warm > 1 ? total - warm : 1);
        f = fmax(0.0, 0.5 * (1.0 + cos(M_PI * progress)));
    }
    return (float)((double)o->lr * f);
}

/* ---- the run's configuration, compared on --resume ---- */

/* calib: the calibration the base was quantized with, or NULL */
static json_t *run_config(const ql_train_opts *o, const char *quantization, const ql_calib_opts *calib)
{
    json_t *c = json_object();
    char *abs_model = realpath(o->model_dir, NULL), *abs_data = realpath(o->data_path, NULL);
    json_object_set_new(c, "model", json_string(abs_model ? abs_model : o->model_dir));
    json_object_set_new(c, "quantizer", json_string(quantization));
    /* what eval, generate and merge of the adapter calibrate the base with again (ql_lora_run_calibration) */
    if (calib) {
        char *abs_calib = realpath(calib->data, NULL);
        json_object_set_new(c, "calibration",
                            json_pack("{s:s, s:s?, s:i, s:i, s:I}", "data", abs_calib ? abs_calib : calib->data, "format",
                                      calib->format, "samples", calib->samples > 0 ? calib->samples : QL_CALIB_DEFAULT_SAMPLES,
                                      "len", calib->len > 0 ? calib->len : QL_CALIB_DEFAULT_LEN, "seed",
                                      (json_int_t)calib->seed));
        free(abs_calib);
    } else
        json_object_set_new(c, "calibration", json_null());
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
    json_object_set_new(c, "warmup_ratio", json_real(o->warmup_ratio));
    json_object_set_new(c, "lr_scheduler", json_string(ql_lr_schedule_name(o->schedule)));
    json_object_set_new(c, "batch_size", json_integer(o->batch_size));
    json_object_set_new(c, "grad_accum", json_integer(o->grad_accum));
    json_object_set_new(c, "seed", json_integer(o->seed));
    json_object_set_new(c, "data_seed", json_integer(o->data_seed));
    json_object_set_new(c, "adam_beta1", ql_json_float(o->beta1));
    json_object_set_new(c, "adam_beta2", ql_json_float(o->beta2));
    json_object_set_new(c, "adam_epsilon", ql_json_float(o->eps));
    json_object_set_new(c, "eval_dataset_size", json_real(o->eval_dataset_size));
    json_object_set_new(c, "shuffle", json_boolean(o->shuffle));
    json_object_set_new(c, "group_by_length", json_boolean(o->group_by_length));
    json_object_set_new(c, "gradient_checkpointing", json_boolean(o->gradient_checkpointing));
    json_object_set_new(c, "device", json_string(o->device ? o->device : "cpu"));
    json_object_set_new(c, "precision", json_string(o->precision ? o->precision : "fp32"));
    return c;
}

/* The value of a key that checkpoints written before it existed lack: what
 * those runs did (NULL: the key was always written). */
static json_t *value_before_key(const char *key)
{
    if (!strcmp(key, "data_seed")) return json_integer(-1);
    if (!strcmp(key, "adam_beta1")) return ql_json_float(0.9f);
    if (!strcmp(key, "adam_beta2")) return ql_json_float(0.999f);
    if (!strcmp(key, "adam_epsilon")) return ql_json_float(1e-8f);
    if (!strcmp(key, "eval_dataset_size")) return json_real(0);
    if (!strcmp(key, "calibration")) return json_null();
    if (!strcmp(key, "world_size")) return json_integer(1);
    return NULL;
}

/* Keys whose change makes a checkpoint's continuation a different run. */
static int config_mismatch(json_t *saved, json_t *now, const char *ckpt)
{
    const char *key;
    json_t *v;
    /* the micro-batches of a step, grad_accum on each of world_size ranks
     * (1 when absent): the same product is the same run, on any number of ranks */
    json_t *sw = json_object_get(saved, "world_size"), *nw = json_object_get(now, "world_size");
    const long long sa = json_integer_value(json_object_get(saved, "grad_accum")), sr = sw ? json_integer_value(sw) : 1,
                    na = json_integer_value(json_object_get(now, "grad_accum")), nr = nw ? json_integer_value(nw) : 1;
    if (sa * sr != na * nr)
        return ql_error(QL_EINVAL,
                        "%s was written by a run of %lld micro-batches a step (grad_accum %lld x world_size %lld), but "
                        "this run has %lld (%lld x %lld); keep grad_accum x world_size the same, or start a new run",
                        ckpt, sa * sr, sa, sr, na * nr, na, nr);
    json_object_foreach(now, key, v) {
        if (!strcmp(key, "gradient_checkpointing")) continue; /* same results either way */
        if (!strcmp(key, "grad_accum") || !strcmp(key, "world_size")) continue; /* their product, above */
        /* the same run on other hardware or arithmetic: the same trajectory within rounding */
        if (!strcmp(key, "device") || !strcmp(key, "precision")) continue;
        json_t *s = json_object_get(saved, key), *before = s ? NULL : value_before_key(key);
        int same = s ? json_equal(s, v) : before && json_equal(before, v);
        json_decref(before);
        if (!same) {
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
    int rc = ql_outdir_begin(dest, "checkpoint", 1, NULL, 0, &od);
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

/* The step N of a folder named exactly "checkpoint-N" (N as qlora writes
 * it: digits, no sign, no leading zero), or -1. */
static long long checkpoint_step(const char *name)
{
    static const char prefix[] = "checkpoint-";
    size_t lp = sizeof prefix - 1;
    if (strncmp(name, prefix, lp) != 0) return -1;
    const char *d = name + lp;
    if (*d < '0' || *d > '9' || (*d == '0' && d[1] != '\0') || strlen(d) > 18) return -1;
    for (const char *c = d; *c; c++)
        if (*c < '0' || *c > '9') return -1;
    return strtoll(d, NULL, 10);
}

static int cmp_ll(const void *a, const void *b)
{
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

/* A checkpoint folder of this run folder that qlora wrote: a real folder
 * (no link) named checkpoint-N, holding the "checkpoint" marker and a plain
 * trainer_state.json.  Anything else there is never deleted. */
static int is_our_checkpoint(const char *run_dir, const char *name)
{
    if (checkpoint_step(name) < 0) return 0;
    char *dir = ql_path_join(run_dir, name), *ts = dir ? ql_path_join(dir, "trainer_state.json") : NULL;
    struct stat st;
    int ours = ts && ql_output_is(dir, "checkpoint") && lstat(ts, &st) == 0 && S_ISREG(st.st_mode);
    free(dir);
    free(ts);
    return ours;
}

/* Remove a checkpoint folder: renamed aside first to a hidden name, so that
 * a kill midway leaves no half-deleted checkpoint-N that looks resumable. */
static int remove_checkpoint(const char *run_dir, const char *name)
{
    char *src = ql_path_join(run_dir, name), aside[4200];
    if (!src) return ql_error(QL_ENOMEM, "out of memory");
    snprintf(aside, sizeof aside, "%s/.%s.removing.XXXXXX", run_dir, name);
    int rc = QL_OK;
    if (!mkdtemp(aside) || rename(src, aside) != 0) {
        rc = ql_error(QL_EIO, "cannot move %s aside to delete it: %s", src, strerror(errno));
        if (ql_is_dir(aside)) rmdir(aside);
    } else {
        rc = ql_remove_tree(aside);
    }
    free(src);
    return rc;
}

/* --save-total-limit: after checkpoint-`saved` was written, delete the
 * oldest (lowest N) checkpoints of run_dir beyond the newest `limit`;
 * `saved` is always kept.  Only folders is_our_checkpoint() accepts are
 * counted or deleted.  Leftovers of a removal a kill interrupted (hidden
 * ".checkpoint-N.removing.*" folders) are removed too.  A failure is a
 * warning: the checkpoints are whole either way. */
static void rotate_checkpoints(const char *run_dir, int64_t limit, int64_t saved, int verbose)
{
    if (limit <= 0) return;
    DIR *d = opendir(run_dir);
    if (!d) return;
    long long *steps = NULL;
    size_t n = 0, cap = 0;
    char **leftovers = NULL;
    size_t nleft = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') {
            char ck[4096];
            const char *rm = strstr(e->d_name, ".removing.");
            struct stat st;
            char *p = NULL;
            if (rm && (size_t)(rm - e->d_name - 1) < sizeof ck) {
                snprintf(ck, sizeof ck, "%.*s", (int)(rm - e->d_name - 1), e->d_name + 1);
                p = checkpoint_step(ck) >= 0 && strlen(rm + strlen(".removing.")) == 6 ? ql_path_join(run_dir, e->d_name)
                                                                                         : NULL;
            }
            if (p && lstat(p, &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == geteuid()) {
                char **l = realloc(leftovers, (nleft + 1) * sizeof *l);
                if (l) (leftovers = l)[nleft++] = p, p = NULL;
            }
            free(p);
            continue;
        }
        if (!is_our_checkpoint(run_dir, e->d_name)) continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            long long *s = realloc(steps, cap * sizeof *s);
            if (!s) break;
            steps = s;
        }
        steps[n++] = checkpoint_step(e->d_name);
    }
    closedir(d);
    for (size_t i = 0; i < nleft; i++) {
        if (ql_remove_tree(leftovers[i]) != QL_OK)
            fprintf(stderr, "qlora: warning: cannot remove %s: %s\n", leftovers[i], ql_error_message());
        free(leftovers[i]);
    }
    free(leftovers);
    if (steps) qsort(steps, n, sizeof *steps, cmp_ll);
    size_t keep = (size_t)limit, excess = n > keep ? n - keep : 0;
    for (size_t i = 0; i < n && excess > 0; i++) {
        if (steps[i] == saved) continue; /* the one just written stays, whatever its number */
        char name[64];
        snprintf(name, sizeof name, "checkpoint-%lld", steps[i]);
        int saved_code = ql_error_code();
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", ql_error_message());
        if (remove_checkpoint(run_dir, name) == QL_OK) {
            if (verbose) fprintf(stderr, "deleted %s/%s (--save-total-limit %lld)\n", run_dir, name, (long long)limit);
        } else {
            fprintf(stderr, "qlora: warning: --save-total-limit: %s\n", ql_error_message());
        }
        if (saved_code) ql_error(saved_code, "%s", msg);
        else ql_error_clear();
        excess--;
    }
    free(steps);
}

/* The facts a checkpoint must agree with: those of the run resuming it. */
typedef struct resume_ctx {
    const char *ckpt;
    json_t *config;
    int64_t total;        /* optimizer steps of this run */
    int grad_accum;
    int batch_size;
    int max_len;          /* tokens per example at most (<= 0: no bound) */
} resume_ctx;

static void brief(const json_t *v, char *buf, size_t cap)
{
    char *s = v ? json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT) : NULL;
    snprintf(buf, cap, "%s", s ? s : "(absent)");
    if (s && strlen(s) >= cap && cap > 4) memcpy(buf + cap - 4, "...", 4);
    free(s);
}

/* An integer field of trainer_state.json in [lo, hi]. */
static int state_int(const char *file, json_t *ts, const char *key, int64_t lo, int64_t hi, int64_t *out)
{
    json_t *v = json_object_get(ts, key);
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi) {
        char val[64];
        brief(v, val, sizeof val);
        return ql_error(QL_EFORMAT, "%s: %s must be an integer from %lld to %lld, not %s", file, key, (long long)lo,
                        (long long)hi, val);
    }
    *out = json_integer_value(v);
    return QL_OK;
}

static int load_trainer_state(const resume_ctx *rx, const ql_lora *lora, state *st)
{
    char *path = ql_path_join(rx->ckpt, "trainer_state.json");
    if (!path) return ql_error(QL_ENOMEM, "out of memory");
    json_error_t jerr;
    json_t *ts = ql_json_load_path(path, 0, &jerr);
    int rc = QL_OK;
    int64_t fmt = 0, params = 0;
    char val[64];
    if (rx->grad_accum < 1 || rx->batch_size < 1) rc = ql_error(QL_EINVAL, "grad_accum and batch_size must be >= 1");
    else if (!ts)
        rc = ql_path_exists(path) ? ql_error(QL_EFORMAT, "%s is not valid JSON: %s", path, jerr.text)
                                  : ql_error(QL_ENOTFOUND, "%s is not a checkpoint: trainer_state.json is missing", rx->ckpt);
    else if (!json_is_object(ts))
        rc = ql_error(QL_EFORMAT, "%s is not a JSON object", path);
    if (rc == QL_OK) {
        json_t *f = json_object_get(ts, "format");
        if (!json_is_integer(f) || (fmt = json_integer_value(f)) != CHECKPOINT_FORMAT) {
            brief(f, val, sizeof val);
            rc = ql_error(QL_EFORMAT, "%s: checkpoint format %s, this qlora reads format %d", path, val, CHECKPOINT_FORMAT);
        }
    }
    if (rc == QL_OK && !json_is_object(json_object_get(ts, "config")))
        rc = ql_error(QL_EFORMAT, "%s: config (the run's settings) is missing or not an object", path);
    if (rc == QL_OK) rc = config_mismatch(json_object_get(ts, "config"), rx->config, path);
    /* checkpoints are saved after an optimizer step, never before the first */
    if (rc == QL_OK) rc = state_int(path, ts, "global_step", 1, INT64_MAX, &st->step);
    if (rc == QL_OK && st->step >= rx->total)
        rc = ql_error(QL_EINVAL, "%s is at step %lld (global_step in %s), already at or past --steps %lld", rx->ckpt,
                      (long long)st->step, path, (long long)rx->total);
    if (rc == QL_OK) {
        /* a checkpoint-N folder holds step N */
        char name[4096];
        snprintf(name, sizeof name, "%s", rx->ckpt);
        size_t l = strlen(name);
        while (l > 1 && name[l - 1] == '/') name[--l] = '\0';
        const char *base = strrchr(name, '/') ? strrchr(name, '/') + 1 : name;
        long long n;
        int used = 0;
        if (sscanf(base, "checkpoint-%lld%n", &n, &used) == 1 && base[used] == '\0' && n != st->step)
            rc = ql_error(QL_EFORMAT, "%s: global_step is %lld, but the folder is %s", path, (long long)st->step, base);
    }
    /* every optimizer step consumes grad_accum micro-batches */
    if (rc == QL_OK) rc = state_int(path, ts, "micro_batches_done", 0, INT64_MAX, &st->micro_done);
    if (rc == QL_OK && (st->step > INT64_MAX / rx->grad_accum || st->micro_done != st->step * rx->grad_accum))
        rc = ql_error(QL_EFORMAT, "%s: micro_batches_done is %lld, but global_step %lld with grad_accum %d means %lld", path,
                      (long long)st->micro_done, (long long)st->step, rx->grad_accum,
                      (long long)(st->step * rx->grad_accum));
    if (rc == QL_OK) {
        json_t *v = json_object_get(ts, "tokens_seen");
        double t = json_is_number(v) ? json_number_value(v) : NAN;
        double most = rx->max_len > 0 ? (double)st->micro_done * rx->batch_size * rx->max_len : INFINITY;
        if (!(t >= 0 && t <= most && t == floor(t))) {
            brief(v, val, sizeof val);
            rc = ql_error(QL_EFORMAT, "%s: tokens_seen must be a whole number from 0 to %.0f (%lld micro-batches of %d "
                                      "sequences of at most %d tokens), not %s",
                          path, most, (long long)st->micro_done, rx->batch_size, rx->max_len, val);
        } else {
            st->tokens_seen = t;
        }
    }
    if (rc == QL_OK) rc = state_int(path, ts, "lora_parameters", 0, INT64_MAX, &params);
    if (rc == QL_OK && (uint64_t)params != (uint64_t)lora->n_params)
        rc = ql_error(QL_EFORMAT, "%s: lora_parameters is %lld, but this run's adapter has %zu", path, (long long)params,
                      lora->n_params);
    json_decref(ts);
    free(path);
    return rc;
}

/* Every value of x[0..n) finite (and >= 0 when nonneg). */
static int check_values(const char *file, const char *name, const float *x, size_t n, int nonneg)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i]) || (nonneg && x[i] < 0))
            return ql_error(QL_ENUMERIC, "%s: tensor %s has %s value %g at index %zu", file, name,
                            isfinite(x[i]) ? "a negative" : "a non-finite", (double)x[i], i);
    return QL_OK;
}

/* A tensor of the given dtype and shape, copied into dst. */
static int take_tensor(const ql_st_file *f, const char *file, const char *name, int dtype, int ndim, const int64_t *shape,
                       void *dst, size_t nbytes)
{
    const ql_tensor *t = ql_st_find(f, name);
    if (!t) return ql_error(QL_EFORMAT, "%s: tensor %s is missing", file, name);
    int same = t->dtype == dtype && t->ndim == ndim && t->nbytes == nbytes;
    for (int d = 0; same && d < ndim; d++) same = t->shape[d] == shape[d];
    if (!same) {
        char want[64] = "", got[64] = "";
        for (int d = 0, k = 0; d < ndim; d++) k += snprintf(want + k, sizeof want - (size_t)k, d ? ", %lld" : "%lld", (long long)shape[d]);
        for (int d = 0, k = 0; d < t->ndim && d < 4; d++)
            k += snprintf(got + k, sizeof got - (size_t)k, d ? ", %lld" : "%lld", (long long)t->shape[d]);
        return ql_error(QL_EFORMAT, "%s: tensor %s is %s [%s], this run needs %s [%s]", file, name,
                        ql_dtype_name(t->dtype), got, ql_dtype_name(dtype), want);
    }
    memcpy(dst, t->data, nbytes);
    return QL_OK;
}

static int load_checkpoint(const resume_ctx *rx, ql_lora *lora, ql_adamw *opt, state *st)
{
    int rc = load_trainer_state(rx, lora, st);
    if (rc) return rc;
    /* adapter weights */
    char *path = ql_path_join(rx->ckpt, "adapter_model.safetensors");
    ql_st_file *f = NULL;
    rc = path ? ql_st_open(path, &f) : ql_error(QL_ENOMEM, "out of memory");
    size_t expected = 0;
    for (int i = 0; i < lora->n_layers && rc == QL_OK; i++)
        for (int k = 0; k < QL_MOD_COUNT && rc == QL_OK; k++) {
            ql_lora_pair *p = ql_lora_pair_at(lora, i, k);
            if (!p) continue;
            for (int which = 0; which < 2 && rc == QL_OK; which++) {
                char key[256];
                snprintf(key, sizeof key, "base_model.model.model.layers.%d.%s.lora_%c.weight", i, ql_lora_module_path(k),
                         which ? 'B' : 'A');
                int64_t shape[2] = {which ? p->out : lora->cfg.r, which ? lora->cfg.r : p->in};
                float *dst = which ? p->B : p->A;
                size_t n = (size_t)(shape[0] * shape[1]);
                rc = take_tensor(f, path, key, QL_DTYPE_F32, 2, shape, dst, n * 4);
                if (rc == QL_OK) rc = check_values(path, key, dst, n, 0);
                expected++;
            }
        }
    if (rc == QL_OK && ql_st_count(f) != expected)
        rc = ql_error(QL_EFORMAT, "%s has %zu tensors, this run's adapter has %zu", path, ql_st_count(f), expected);
    ql_st_close(f);
    free(path);
    if (rc) return rc;
    /* optimizer state */
    path = ql_path_join(rx->ckpt, "optimizer.safetensors");
    rc = path ? ql_st_open(path, &f) : ql_error(QL_ENOMEM, "out of memory");
    int64_t n = (int64_t)opt->n, step = 0;
    if (rc == QL_OK) rc = take_tensor(f, path, "adamw.m", QL_DTYPE_F32, 1, &n, opt->m, opt->n * 4);
    if (rc == QL_OK) rc = check_values(path, "adamw.m", opt->m, opt->n, 0);
    if (rc == QL_OK) rc = take_tensor(f, path, "adamw.v", QL_DTYPE_F32, 1, &n, opt->v, opt->n * 4);
    if (rc == QL_OK) rc = check_values(path, "adamw.v", opt->v, opt->n, 1);
    if (rc == QL_OK) rc = take_tensor(f, path, "adamw.step", QL_DTYPE_I64, 0, NULL, &step, 8);
    /* one AdamW update per optimizer step */
    if (rc == QL_OK && step != st->step)
        rc = ql_error(QL_EFORMAT, "%s: adamw.step is %lld, but trainer_state.json's global_step is %lld", path,
                      (long long)step, (long long)st->step);
    if (rc == QL_OK && ql_st_count(f) != 3)
        rc = ql_error(QL_EFORMAT, "%s has %zu tensors; a qlora optimizer state has exactly adamw.m, adamw.v and adamw.step",
                      path, ql_st_count(f));
    if (rc == QL_OK) opt->step = step;
    ql_st_close(f);
    free(path);
    return rc;
}

/* For fuzz/fuzz_checkpoint.c (core/train_internal.h). */
int ql_train_load_checkpoint(const char *ckpt, json_t *config, int64_t total, int grad_accum, int batch_size,
                             int max_len, ql_lora *lora, ql_adamw *opt, int64_t *step, int64_t *micro_done,
                             double *tokens_seen)
{
    resume_ctx rx = {.ckpt = ckpt, .config = config, .total = total, .grad_accum = grad_accum, .batch_size = batch_size,
                     .max_len = max_len};
    state st = {0};
    int rc = load_checkpoint(&rx, lora, opt, &st);
    if (rc == QL_OK) {
        *step = st.step;
        *micro_done = st.micro_done;
        *tokens_seen = st.tokens_seen;
    }
    return rc;
}

/* ---- metrics.jsonl ---- */

/* A file of the run folder that qlora reads or appends to: a regular file
 * there, or absent; never followed out of the folder through a link. */
static int check_run_file(const char *path)
{
    struct stat sb;
    if (lstat(path, &sb) != 0) return errno == ENOENT ? QL_OK : ql_error(QL_EIO, "cannot look at %s: %s", path, strerror(errno));
    if (S_ISLNK(sb.st_mode))
        return ql_error(QL_EINVAL, "%s is a symbolic link; qlora reads and writes only plain files inside a run folder", path);
    if (!S_ISREG(sb.st_mode)) return ql_error(QL_EINVAL, "%s is not a regular file", path);
    return QL_OK;
}

/* metrics.jsonl keeps rows up to `step` (a resumed run rewrites what follows) */
static int trim_metrics(const char *path, int64_t step)
{
    char *data;
    size_t len;
    int rc = check_run_file(path);
    if (rc || !ql_path_exists(path)) return rc;
    if ((rc = ql_read_file(path, &data, &len))) return rc;
    char *out = malloc(len + 1);
    size_t k = 0;
    if (!out) {
        free(data);
        return ql_error(QL_ENOMEM, "out of memory");
    }
    for (char *line = data; line < data + len;) {
        char *nl = memchr(line, '\n', (size_t)(data + len - line));
        size_t ll = nl ? (size_t)(nl - line) + 1 : (size_t)(data + len - line);
        json_t *row = nl ? json_loadb(line, (size_t)(nl - line), 0, NULL) : NULL; /* a row without its newline is cut */
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

typedef struct metrics_file {
    int fd;
    char *path;
} metrics_file;

static int metrics_open(const char *run_dir, metrics_file *mf)
{
    mf->fd = -1;
    if (!(mf->path = ql_path_join(run_dir, "metrics.jsonl"))) return ql_error(QL_ENOMEM, "out of memory");
    int rc = check_run_file(mf->path);
    if (rc) return rc;
    mf->fd = open(mf->path, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (mf->fd < 0) return ql_error(QL_EIO, "cannot open %s: %s", mf->path, strerror(errno));
    struct stat sb;
    if (fstat(mf->fd, &sb) != 0 || !S_ISREG(sb.st_mode)) return ql_error(QL_EINVAL, "%s is not a regular file", mf->path);
    return QL_OK;
}

static void metrics_close(metrics_file *mf)
{
    if (mf->fd >= 0) close(mf->fd);
    free(mf->path);
    mf->fd = -1;
    mf->path = NULL;
}

/* One whole row, durable before the next step; a row that does not fit is
 * cut back off, so the file only ever holds whole rows. */
static int append_metrics(metrics_file *mf, json_t *row, int echo)
{
    char *text = ql_json_dumps_py(row, 0, 0);
    size_t len = text ? strlen(text) : 0;
    char *line = text ? realloc(text, len + 2) : NULL;
    if (!line) {
        free(text);
        return ql_error(QL_ENOMEM, "out of memory");
    }
    line[len++] = '\n';
    line[len] = '\0';
    int rc = QL_OK;
    struct stat sb;
    off_t before = fstat(mf->fd, &sb) == 0 ? sb.st_size : -1;
    for (size_t done = 0; done < len && rc == QL_OK;) {
        ssize_t w = write(mf->fd, line + done, len - done);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) rc = ql_error(QL_EIO, "cannot write %s: %s", mf->path, w < 0 ? strerror(errno) : "no progress");
        else done += (size_t)w;
    }
    if (rc && before >= 0 && ftruncate(mf->fd, before) != 0) { /* the error above is the one to report */ }
    if (rc == QL_OK && fsync(mf->fd) != 0) rc = ql_error(QL_EIO, "cannot flush %s: %s", mf->path, strerror(errno));
    if (rc == QL_OK && echo) printf("%s", line), fflush(stdout);
    free(line);
    return rc;
}

/* ---- the run folder ---- */

/* RUN/.qlora-lock, held with flock for the whole run (a resumed one too),
 * holding the pid: a second train on the folder is refused while this one
 * lives, and the kernel drops the lock however this process ends. */
#define RUN_LOCK ".qlora-lock"

static int lock_run_dir(const char *run_dir, int *fd_out)
{
    *fd_out = -1;
    char *path = ql_path_join(run_dir, RUN_LOCK);
    if (!path) return ql_error(QL_ENOMEM, "out of memory");
    int rc = QL_OK;
    int fd = open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0644);
    struct stat sb;
    if (fd < 0)
        rc = errno == ELOOP ? ql_error(QL_EINVAL, "%s is a symbolic link; a run folder's lock must be a plain file", path)
                            : ql_error(QL_EIO, "cannot open the run folder's lock %s: %s", path, strerror(errno));
    else if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode))
        rc = ql_error(QL_EINVAL, "%s is not a regular file; a run folder's lock must be a plain file", path);
    else if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        if (errno == EWOULDBLOCK) {
            char buf[32] = "";
            ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
            long pid = n > 0 ? strtol(buf, NULL, 10) : 0;
            char who[48] = "another process";
            if (pid > 0) snprintf(who, sizeof who, "process %ld", pid);
            rc = ql_error(QL_EEXIST,
                          "run folder %s is in use by another qlora train (%s, which holds %s); wait for it to end or "
                          "choose another --output",
                          run_dir, who, path);
        } else {
            rc = ql_error(QL_EIO, "cannot lock %s: %s", path, strerror(errno));
        }
    } else {
        char text[32];
        int len = snprintf(text, sizeof text, "%ld\n", (long)getpid());
        if (ftruncate(fd, 0) != 0 || pwrite(fd, text, (size_t)len, 0) != len)
            rc = ql_error(QL_EIO, "cannot write %s: %s", path, strerror(errno));
    }
    free(path);
    if (rc) {
        if (fd >= 0) close(fd);
        return rc;
    }
    *fd_out = fd;
    return QL_OK;
}

/* The run's inputs: a folder holding one of them is never replaced. */
static size_t run_inputs(const ql_train_opts *o, const char *in[3])
{
    size_t n = 0;
    in[n++] = o->model_dir;
    in[n++] = o->data_path;
    if (o->eval_data_path) in[n++] = o->eval_data_path;
    return n;
}

static int check_new_run_dir(const ql_train_opts *o, const char *run_dir)
{
    if (!ql_path_exists(run_dir)) return QL_OK;
    if (!o->force)
        return ql_error(QL_EEXIST,
                        "run folder %s already exists: continue it with --resume %s/checkpoint-N, or replace it with --force",
                        run_dir, run_dir);
    const char *in[3];
    size_t n = run_inputs(o, in);
    return ql_output_check_replace(run_dir, "run", in, n);
}

/* A new run folder, made with one mkdir (two runs never share one), locked
 * and marked as a qlora run.  With --force an earlier run there (not one
 * still training, not one holding this run's inputs) is renamed aside first
 * and removed once the new folder is in place. */
static int create_run_dir(const ql_train_opts *o, const char *run_dir, int *lock_fd)
{
    *lock_fd = -1;
    int rc = check_new_run_dir(o, run_dir);
    if (rc) return rc;
    char old[4200] = "";
    int old_fd = -1;
    if (ql_path_exists(run_dir)) {
        if ((rc = lock_run_dir(run_dir, &old_fd))) return rc;
        snprintf(old, sizeof old, "%s.replaced.XXXXXX", run_dir);
        /* rename(2) over the empty folder mkdtemp made is one step */
        if (!mkdtemp(old) || rename(run_dir, old) != 0) {
            rc = ql_error(QL_EIO, "cannot move the earlier run %s aside: %s", run_dir, strerror(errno));
            if (old[0] && ql_is_dir(old)) rmdir(old);
            close(old_fd);
            return rc;
        }
    } else {
        char parent[4096];
        snprintf(parent, sizeof parent, "%s", run_dir);
        if ((rc = ql_mkdir_p(dirname(parent)))) return rc;
    }
    if (mkdir(run_dir, 0777) != 0) {
        int e = errno;
        rc = e == EEXIST ? ql_error(QL_EEXIST, "run folder %s was created by someone else meanwhile (another qlora train?)%s%s",
                                    run_dir, old[0] ? "; the earlier run is now " : "", old)
                         : ql_error(QL_EIO, "cannot create the run folder %s: %s", run_dir, strerror(e));
        if (old_fd >= 0) close(old_fd);
        return rc;
    }
    rc = lock_run_dir(run_dir, lock_fd);
    if (rc == QL_OK) rc = ql_output_mark(run_dir, "run");
    if (old[0]) {
        int saved = ql_error_code();
        char msg[4096];
        snprintf(msg, sizeof msg, "%s", ql_error_message());
        if (ql_remove_tree(old) != QL_OK)
            fprintf(stderr, "qlora: warning: cannot remove the replaced run %s: %s\n", old, ql_error_message());
        ql_error(saved, "%s", msg);
        close(old_fd);
    }
    return rc;
}

/* The folder a resumed run writes into: an existing qlora run folder. */
static int open_resume_dir(const char *run_dir, int *lock_fd)
{
    *lock_fd = -1;
    char *cfg = ql_path_join(run_dir, "run_config.json"), *mark = ql_path_join(run_dir, QL_OUTPUT_MARKER);
    int rc = QL_OK;
    if (!cfg || !mark) rc = ql_error(QL_ENOMEM, "out of memory");
    else if (!ql_is_dir(run_dir)) rc = ql_error(QL_ENOTFOUND, "run folder %s does not exist", run_dir);
    else if (!ql_path_exists(cfg)) rc = ql_error(QL_EINVAL, "%s is not a qlora run folder: run_config.json is missing", run_dir);
    if (rc == QL_OK) rc = lock_run_dir(run_dir, lock_fd);
    /* folders of qlora before markers have none */
    if (rc == QL_OK && !ql_path_exists(mark)) rc = ql_output_mark(run_dir, "run");
    free(cfg);
    free(mark);
    return rc;
}

/* SIGINT and SIGTERM during training: the first asks the loop to finish
 * the step, save a checkpoint and stop; a second ends the process at once. */
static volatile sig_atomic_t stop_signal;

static void on_stop_signal(int sig)
{
    if (stop_signal) {
        signal(sig, SIG_DFL);
        raise(sig);
        return;
    }
    stop_signal = sig;
}

typedef struct stop_handlers {
    struct sigaction old_int, old_term;
    int installed;
} stop_handlers;

static void catch_stop_signals(stop_handlers *h)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    stop_signal = 0;
    h->installed = sigaction(SIGINT, &sa, &h->old_int) == 0 && sigaction(SIGTERM, &sa, &h->old_term) == 0;
}

static void release_stop_signals(stop_handlers *h)
{
    if (!h->installed) return;
    sigaction(SIGINT, &h->old_int, NULL);
    sigaction(SIGTERM, &h->old_term, NULL);
    h->installed = 0;
}

/* Append where training stopped and what is left to resume from. */
static int stopped(int rc, const char *run_dir, int64_t at_step, int64_t last_saved, int64_t total)
{
    char msg[4096];
    snprintf(msg, sizeof msg, "%s", ql_error_message());
    if (last_saved == total)
        return ql_error(rc, "%s; the final adapter is whole in %s/checkpoint-%lld", msg, run_dir, (long long)last_saved);
    if (last_saved > 0)
        return ql_error(rc, "%s; training stopped at step %lld: the last good checkpoint is checkpoint-%lld in %s", msg,
                        (long long)at_step, (long long)last_saved, run_dir);
    return ql_error(rc, "%s; training stopped at step %lld: the last good checkpoint is none (no checkpoint was saved yet)",
                    msg, (long long)at_step);
}

/* ---- evaluation ---- */

/* The mean loss over d's target tokens, `batch` sequences per step (ex:
 * scratch for batch pointers); with several ranks each runs every world-th
 * batch and the sums are added up. */
static int evaluate(ql_lora_model *lm, ql_dist *dist, const ql_dataset *d, int batch, const ql_example **ex,
                    double *loss, int64_t *tokens)
{
    double sum = 0;
    int64_t n = 0;
    ql_lora_step_opts so = {.loss_scale = 0, .backward = 0};
    const size_t world = (size_t)ql_dist_world(dist), first = (size_t)ql_dist_rank(dist) * (size_t)batch;
    for (size_t i = first; i < d->n; i += (size_t)batch * world) {
        int k = 0;
        for (; k < batch && i + (size_t)k < d->n; k++) ex[k] = &d->examples[i + (size_t)k];
        ql_lora_batch mb;
        int rc = ql_lora_model_gather(lm, ex, k, NULL, &mb);
        if (rc == QL_OK) rc = ql_lora_model_step(lm, &mb, &so, &sum, &n);
        if (rc) return rc;
    }
    double both[2] = {sum, (double)n};
    int rc = ql_dist_sum_f64(dist, both, 2);
    if (rc) return rc;
    *loss = both[1] > 0 ? both[0] / both[1] : NAN;
    *tokens = (int64_t)both[1];
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
    ql_dataset *d = NULL, *ed = NULL, *full = NULL; /* full: the data d and ed are views of, when split */
    ql_lora *lora = NULL;
    ql_adamw *opt = NULL;
    ql_lora_model *lm = NULL;
    ql_be_ctx *bctx = NULL;
    ql_dist *dist = NULL; /* several ranks (WORLD_SIZE > 1): data parallel */
    stop_handlers sigs = {0};
    uint64_t *seeds = NULL;
    const ql_example **batch = NULL;
    json_t *config = NULL;
    metrics_file metrics = {.fd = -1, .path = NULL};
    size_t *order = NULL;
    char run_dir[4096];
    int lock_fd = -1;
    int created = 0;          /* this run made run_dir */
    int started = 0;          /* the training loop has begun */
    int64_t last_saved = -1;  /* the newest whole checkpoint of this run folder */
    int64_t total = 0;
    state st = {0};
    int tty = isatty(STDERR_FILENO);
    int echo_rows = o->progress && !isatty(STDOUT_FILENO);

    if (o->batch_size < 1 || o->grad_accum < 1) return ql_error(QL_EINVAL, "--batch-size and --grad-accum must be >= 1");
    if (!(o->lr > 0)) return ql_error(QL_EINVAL, "--lr must be positive");
    /* data parallel: every rank reads the model and the data, runs its share
     * of each step's micro-batches and adds its gradients to the others';
     * rank 0 alone writes the run folder */
    if ((rc = ql_dist_from_env(&dist))) return rc;
    const int world = ql_dist_world(dist), rank = ql_dist_rank(dist), writer = rank == 0;
    if (!writer) echo_rows = 0;
    if (o->resume_from) {
        char tmp[4096];
        if (snprintf(tmp, sizeof tmp, "%s", o->resume_from) >= (int)sizeof tmp) {
            rc = ql_error(QL_EINVAL, "--resume %s: path too long", o->resume_from);
            goto done;
        }
        size_t l = strlen(tmp);
        while (l > 1 && tmp[l - 1] == '/') tmp[--l] = '\0';
        if (!ql_is_dir(tmp)) {
            rc = ql_error(QL_ENOTFOUND, "--resume %s: no such checkpoint folder", o->resume_from);
            goto done;
        }
        char *ts = ql_path_join(tmp, "trainer_state.json");
        int found = ts && ql_path_exists(ts);
        free(ts);
        if (!found) {
            rc = ql_error(QL_ENOTFOUND, "%s is not a checkpoint: trainer_state.json is missing", o->resume_from);
            goto done;
        }
        snprintf(run_dir, sizeof run_dir, "%s", o->output_dir ? o->output_dir : dirname(tmp));
    } else if (o->dry_run && !o->output_dir) {
        run_dir[0] = '\0';
    } else {
        if (!o->output_dir) {
            rc = ql_error(QL_EINVAL, "--output RUN_DIR is required");
            goto done;
        }
        if (snprintf(run_dir, sizeof run_dir, "%s", o->output_dir) >= (int)sizeof run_dir) {
            rc = ql_error(QL_EINVAL, "--output %s: path too long", o->output_dir);
            goto done;
        }
        size_t l = strlen(run_dir);
        while (l > 1 && run_dir[l - 1] == '/') run_dir[--l] = '\0';
        /* before the slow part; checked again at creation */
        if (!o->dry_run && writer && (rc = check_new_run_dir(o, run_dir))) goto done;
    }

    /* the device first: a missing GPU is reported before the slow part */
    if ((rc = ql_be_ctx_open(o->device ? o->device : "cpu", NULL, &bctx))) goto done;
    int precision = QL_PREC_FP32, optimizer = QL_OPTIM_HOST;
    if ((rc = ql_be_precision(o->precision, bctx->be, &precision)) || (rc = ql_optim_parse(o->optim, bctx->be, &optimizer)))
        goto done;
    if (world > 1 && !bctx->be->host_memory) {
        /* the gradients would be summed on the device through NCCL: not built yet */
        rc = ql_error(QL_ENOTSUP, "data parallel (WORLD_SIZE=%d) runs on --device cpu so far; on %s it needs the NCCL "
                                  "communicator, which is not built yet", world, bctx->be->name);
        goto done;
    }
    if (writer)
        fprintf(stderr, "{\"event\": \"device\", \"device\": \"%s\", \"precision\": \"%s\", \"optim\": \"%s\"}\n",
                bctx->be->name, ql_be_precision_name(precision), ql_optim_name(optimizer));
    if (writer && world > 1)
        fprintf(stderr, "{\"event\": \"data_parallel\", \"world_size\": %d, \"micro_batches_per_rank\": %d, "
                        "\"global_batch\": %lld}\n",
                world, o->grad_accum, (long long)world * o->grad_accum * o->batch_size);
    ql_llama_load_opts lo = {.quantizer = o->quantizer, .progress = 0, .calib = o->calib, .device = bctx->be->name,
                             .quantizer_is_default = o->quantizer == default_quantizer};
    if ((rc = ql_llama_load(o->model_dir, &lo, &m))) goto done;
    if ((rc = ql_tokenizer_load(o->model_dir, &tok))) goto done;
    ql_dataset_opts dopts = o->data;
    if (dopts.max_len <= 0) dopts.max_len = ql_llama_get_config(m)->max_positions;
    if ((rc = ql_dataset_load(o->data_path, tok, &dopts, &d))) goto done;
    if (o->eval_data_path && (rc = ql_dataset_load(o->eval_data_path, tok, &dopts, &ed))) goto done;
    if (writer)
        fprintf(stderr,
            "{\"event\": \"data\", \"file\": \"%s\", \"examples\": %zu, \"read\": %zu, \"truncated\": %zu, "
            "\"dropped_empty\": %zu, \"tokens\": %lld, \"target_tokens\": %lld}\n",
            o->data_path, d->n, d->n_read, d->n_truncated, d->n_dropped_empty, (long long)d->total_tokens,
            (long long)d->total_target_tokens);
    if (o->eval_dataset_size > 0) {
        /* qlora.py's --do_eval without an eval split: train_test_split(test_size=N or fraction, seed=42) */
        double want = o->eval_dataset_size < 1 ? ceil(o->eval_dataset_size * (double)d->n) : o->eval_dataset_size;
        if (o->eval_data_path) {
            rc = ql_error(QL_EINVAL, "give --eval-data or --eval-dataset-size, not both");
            goto done;
        }
        if (!(want >= 1 && want < (double)d->n)) {
            rc = ql_error(QL_EINVAL, "--eval-dataset-size %g holds out %.0f of the %zu examples of %s: leave at least one "
                                     "to train on", o->eval_dataset_size, want, d->n, o->data_path);
            goto done;
        }
        full = d;
        d = NULL;
        if ((rc = ql_dataset_split(full, (size_t)want, 42, &d, &ed))) goto done;
        if (writer) fprintf(stderr, "{\"event\": \"eval_split\", \"held_out\": %zu, \"train\": %zu, \"seed\": 42}\n", ed->n, d->n);
    }
    if (ed && o->max_eval_examples > 0 && ed->n > (size_t)o->max_eval_examples) ed->n = (size_t)o->max_eval_examples;

    if ((rc = ql_lora_create(m, &o->lora, (uint64_t)o->seed, &lora))) goto done;
    if ((rc = ql_adamw_create(lora->n_params, o->beta1, o->beta2, o->eps, o->weight_decay, &opt))) goto done;
    ql_train_opts effective = *o;
    effective.data.max_len = dopts.max_len; /* the model's length when not given */
    effective.device = bctx->be->name;      /* what auto chose */
    effective.precision = ql_be_precision_name(precision);
    config = run_config(&effective, ql_llama_quantization(m), ql_llama_calibrated(m) ? o->calib : NULL);
    /* each rank runs grad_accum micro-batches of a step: the global batch is world times larger */
    json_object_set_new(config, "world_size", json_integer(world));

    /* the memory plan, for the longest example of either set: made (and
     * allocated) once, before anything is written */
    int max_len = 1;
    for (size_t i = 0; i < d->n; i++)
        if (d->examples[i].len > max_len) max_len = d->examples[i].len;
    for (size_t i = 0; ed && i < ed->n; i++)
        if (ed->examples[i].len > max_len) max_len = ed->examples[i].len;
    ql_lora_model_opts mo = {.batch = o->batch_size, .max_len = max_len, .checkpointing = o->gradient_checkpointing,
                             .backward = 1, .allocate = !o->dry_run, .opt = opt, .precision = precision,
                             .optimizer = optimizer};
    if ((rc = ql_offload_parse(o->offload, &mo.offload))) goto done;
    if ((rc = ql_lora_model_create(m, lora, bctx, &mo, &lm))) goto done;
    const int64_t mb_per_epoch = ((int64_t)d->n + o->batch_size - 1) / o->batch_size;
    total = o->steps;
    if (total <= 0) {
        total = (int64_t)floor(o->epochs * (double)mb_per_epoch / ((double)o->grad_accum * world));
        if (total < 1) total = 1;
    }
    if (o->dry_run && !writer) goto done;
    if (o->dry_run) {
        ql_lora_model_print_plan(lm, stdout);
        /* what the run would do: run_config.json's settings and the rest */
        json_t *plan = json_deep_copy(config);
        json_object_set_new(plan, "steps", json_integer(total));
        json_object_set_new(plan, "warmup_steps",
                            json_integer(o->schedule == QL_SCHED_CONSTANT ? 0 : (json_int_t)ceil(o->warmup_ratio * (double)total)));
        json_object_set_new(plan, "train_examples", json_integer((json_int_t)d->n));
        json_object_set_new(plan, "eval_examples", json_integer(ed ? (json_int_t)ed->n : 0));
        json_object_set_new(plan, "save_steps", json_integer(o->save_steps));
        json_object_set_new(plan, "save_total_limit", json_integer(o->save_total_limit));
        json_object_set_new(plan, "eval_steps", json_integer(o->eval_steps));
        json_object_set_new(plan, "optim", json_string(ql_optim_name(optimizer)));
        char *text = ql_json_dumps_py(plan, 0, 0);
        json_decref(plan);
        if (!text) {
            rc = ql_error(QL_ENOMEM, "out of memory");
            goto done;
        }
        printf("settings: %s\n", text);
        free(text);
        goto done;
    }
    seeds = malloc((size_t)o->batch_size * sizeof *seeds);
    batch = malloc((size_t)o->batch_size * sizeof *batch);
    if (!seeds || !batch) {
        rc = ql_error(QL_ENOMEM, "out of memory");
        goto done;
    }

    if (o->resume_from) {
        /* lock first: nothing of the folder is read while another run writes it (rank 0's lock covers the world) */
        if (writer && (rc = open_resume_dir(run_dir, &lock_fd))) goto done;
        /* grad_accum: the micro-batches of a step, of every rank */
        resume_ctx rx = {.ckpt = o->resume_from, .config = config, .total = total, .grad_accum = o->grad_accum * world,
                         .batch_size = o->batch_size, .max_len = dopts.max_len};
        if ((rc = load_checkpoint(&rx, lora, opt, &st))) goto done;
        last_saved = st.step;
    } else if (writer) {
        if ((rc = create_run_dir(o, run_dir, &lock_fd))) goto done;
        created = 1;
        if ((rc = write_json_file(run_dir, "run_config.json", config))) goto done;
    }
    if (writer && (rc = metrics_open(run_dir, &metrics))) goto done;
    if (writer && o->resume_from) {
        /* appends go to the trimmed file, so open it again after the rename */
        if ((rc = trim_metrics(metrics.path, st.step))) goto done;
        metrics_close(&metrics);
        if ((rc = metrics_open(run_dir, &metrics))) goto done;
    }

    order = malloc(d->n * sizeof *order);
    if (!order) {
        rc = ql_error(QL_ENOMEM, "out of memory");
        goto done;
    }
    int64_t order_epoch = -1;
    const int64_t start_step = st.step;
    started = 1;
    catch_stop_signals(&sigs);
    double t_start = ql_now();
    double tokens_at_start = st.tokens_seen;
    if ((rc = ql_lora_model_push_state(lm, opt))) goto done; /* new or resumed parameters (and moments) to the device */
    for (int64_t step = st.step; step < total; step++) {
        if ((rc = ql_lora_model_zero_grads(lm))) goto done;
        double step_loss = 0;
        int64_t step_tokens = 0;
        /* the step's world * grad_accum micro-batches: rank r runs the r-th of
         * every world in turn (one rank: all of them) */
        for (int a = 0; a < o->grad_accum; a++) {
            int64_t g = st.micro_done + (int64_t)a * world + rank;
            int64_t epoch = g / mb_per_epoch, within = g % mb_per_epoch;
            if (epoch != order_epoch) {
                int64_t data_seed = o->data_seed >= 0 ? o->data_seed : o->seed;
                if ((rc = ql_dataset_order(d, o->shuffle ? data_seed + epoch : -1, o->group_by_length, o->batch_size,
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
            for (int64_t j = first; j < last; j++) {
                const ql_example *e = &d->examples[order[j]];
                uint64_t seed = (uint64_t)o->seed * 0x9E3779B97F4A7C15ull ^ (uint64_t)(g * o->batch_size + (j - first));
                batch[j - first] = e;
                seeds[j - first] = ql_splitmix64_next(&seed);
                step_tokens += e->len;
            }
            ql_lora_batch mb;
            ql_lora_step_opts so = {.loss_scale = 1.0f / ((float)count * (float)o->grad_accum * (float)world),
                                    .backward = 1};
            rc = ql_lora_model_gather(lm, batch, (int)(last - first), seeds, &mb);
            if (rc == QL_OK) rc = ql_lora_model_step(lm, &mb, &so, &sum, &n);
            if (rc) goto done;
            step_loss += (sum / (double)n) / ((double)o->grad_accum * world);
        }
        st.micro_done += (int64_t)o->grad_accum * world;
        /* several ranks: their gradients, losses and tokens added up, and
         * whether any was asked to stop (then all stop after this step) */
        int stop_now = stop_signal != 0;
        if (world > 1) {
            double sc[3] = {step_loss, (double)step_tokens, stop_now};
            if ((rc = ql_lora_model_pull_grads(lm)) || (rc = ql_dist_sum_f32(dist, lora->grads, lora->n_params)) ||
                (rc = ql_dist_sum_f64(dist, sc, 3)))
                goto done;
            step_loss = sc[0];
            step_tokens = (int64_t)sc[1];
            stop_now = sc[2] > 0;
        }
        double norm = 0;
        if ((rc = ql_lora_model_clip_grads(lm, o->max_grad_norm, &norm))) goto done;
        if (!isfinite(step_loss) || !isfinite(norm)) {
            rc = ql_error(QL_ENUMERIC, "loss is %s at step %lld (gradient norm %g)",
                          isnan(step_loss) ? "NaN" : isfinite(step_loss) ? "finite but the gradient is not" : "infinite",
                          (long long)step + 1, norm);
            goto done;
        }
        float lr = ql_lr_at(o, step, total);
        if ((rc = ql_lora_model_optimizer_step(lm, opt, lr))) goto done;
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
        /* on a GPU: the device memory of the plan, every allocation of the step (no more is made in it) */
        if (!bctx->be->host_memory)
            json_object_set_new(row, "device_plan_bytes", json_integer((json_int_t)ql_lora_model_plan_bytes(lm, -2)));
        rc = writer ? append_metrics(&metrics, row, echo_rows) : QL_OK;
        json_decref(row);
        if (rc) goto done;
        if (o->progress && tty && writer) {
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
            if ((rc = evaluate(lm, dist, ed, o->batch_size, batch, &el, &et))) goto done;
            json_t *er = json_object();
            json_object_set_new(er, "step", json_integer(st.step));
            json_object_set_new(er, "eval_loss", json_real(el));
            json_object_set_new(er, "eval_ppl", json_real(exp(el)));
            json_object_set_new(er, "eval_tokens", json_integer(et));
            rc = writer ? append_metrics(&metrics, er, echo_rows) : QL_OK;
            json_decref(er);
            if (rc) goto done;
        }
        if (writer && (save_now || (stop_now && st.step < total))) {
            if ((rc = ql_lora_model_pull_state(lm, opt))) goto done;
            if ((rc = save_checkpoint(o, run_dir, lora, opt, &st, config))) goto done;
            last_saved = st.step;
            rotate_checkpoints(run_dir, o->save_total_limit, st.step, o->progress);
        }
        if (stop_now && st.step < total) {
            rc = ql_error(QL_EINTR,
                          "interrupted by %s after step %lld of %lld: saved %s/checkpoint-%lld; to go on, run the same "
                          "command with --resume %s/checkpoint-%lld",
                          stop_signal == SIGINT ? "SIGINT" : stop_signal ? "SIGTERM" : "a signal to another rank",
                          (long long)st.step, (long long)total, run_dir,
                          (long long)st.step, run_dir, (long long)st.step);
            goto done;
        }
    }
    if (o->progress && tty) fputc('\n', stderr);
    /* the final adapter at the top of the run folder, loadable by peft; the
     * last checkpoint (saved above) holds the same adapter whole */
    if (writer) {
        if ((rc = ql_lora_model_pull_state(lm, opt)) || (rc = ql_lora_save_peft(lora, run_dir, o->model_dir))) goto done;
        fprintf(stderr, "wrote %s (adapter after %lld steps)\n", run_dir, (long long)st.step);
    }
done:
    if (o->progress && tty && rc && started) fputc('\n', stderr);
    release_stop_signals(&sigs);
    /* rank 0 keeps the run folder: another rank's word on its checkpoints would be wrong */
    if (rc && started && rc != QL_EINTR && writer)
        stopped(rc, run_dir, st.step + (last_saved == total ? 0 : 1), last_saved, total);
    /* a new run that stopped before its first checkpoint holds nothing to
     * resume: leave the path as it was before the run */
    if (rc && created && last_saved < 1) {
        char msg[4096];
        snprintf(msg, sizeof msg, "%s", ql_error_message());
        metrics_close(&metrics);
        if (ql_remove_tree(run_dir) == QL_OK) ql_error(rc, "%s; removed the new run folder %s", msg, run_dir);
        else ql_error(rc, "%s (and the new run folder %s could not be removed: %s)", msg, run_dir, ql_error_message());
    }
    metrics_close(&metrics);
    if (lock_fd >= 0) close(lock_fd);
    free(order);
    free(seeds);
    free(batch);
    ql_lora_model_destroy(lm);
    ql_be_ctx_close(bctx);
    ql_dist_close(dist);
    json_decref(config);
    ql_adamw_destroy(opt);
    ql_lora_destroy(lora);
    ql_dataset_destroy(ed);
    ql_dataset_destroy(d);
    ql_dataset_destroy(full);
    ql_tokenizer_destroy(tok);
    ql_llama_destroy(m);
    return rc;
}
