/* qlora study: the same finetune over a list of quantizers (and seeds).
 * Each run is a normal run folder, STUDY_DIR/runs/<quantizer>-seed<N>, made
 * by the code of qlora train (train_parse, ql_train) in a child process of
 * its own, so that its peak memory is its own, a crash or an out-of-memory
 * kill fails that run only, and Ctrl-C reaches it once.  Every figure goes
 * into STUDY_DIR/study.json, rewritten whole after every run; report.md and
 * the plots are made from study.json alone (study_report.c). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "study.h"
#include "qlora/eval.h"
#include "qlora/lora.h"
#include "qlora/mmlu.h"
#include "qlora/qlora.h"
#include "qlora/tokenizer.h"

/* the study's defaults, shown by its --help */
static const struct {
    const char *quantizers;
    int shots;
} study_defaults = {.quantizers = "none,nf4,nf4:double_quant=0,fp4,int8", .shots = 5};

/* study's own options; every val is >= 256 and apart from train's (main.c's OPT_*) */
enum {
    S_SEEDS = 3000,
    S_EVAL_DATA,
    S_EVAL_FORMAT,
    S_MMLU,
    S_SHOTS,
    S_MMLU_MAX,
    S_RESUME,
    S_REPORT,
    S_RETRY,
    S_HELP,
};

static const struct option study_own[] = {
    {"quantizers", required_argument, NULL, 'q'},
    {"seeds", required_argument, NULL, S_SEEDS},
    {"output", required_argument, NULL, 'o'},
    {"eval-data", required_argument, NULL, S_EVAL_DATA},
    {"eval-format", required_argument, NULL, S_EVAL_FORMAT},
    {"mmlu", required_argument, NULL, S_MMLU},
    {"shots", required_argument, NULL, S_SHOTS},
    {"mmlu-max-examples", required_argument, NULL, S_MMLU_MAX},
    {"resume", no_argument, NULL, S_RESUME},
    {"report", no_argument, NULL, S_REPORT},
    {"retry-failed", no_argument, NULL, S_RETRY},
    {"help", no_argument, NULL, S_HELP},
};

/* train's options a study sets itself for each run, or that make no sense in one */
static const char *const train_not_passed[] = {"quantizer", "output", "resume", "force", "dry-run",
                                               "help",      "seed",   "eval-data"};

static int not_passed(const char *name)
{
    for (size_t i = 0; i < sizeof train_not_passed / sizeof train_not_passed[0]; i++)
        if (!strcmp(name, train_not_passed[i])) return 1;
    return 0;
}

/* study_own, then the train options passed to every run */
static struct option *study_options(void)
{
    static struct option all[160];
    if (all[0].name) return all;
    size_t n = 0;
    for (size_t i = 0; i < sizeof study_own / sizeof study_own[0]; i++) all[n++] = study_own[i];
    for (const struct option *o = train_options; o->name && n + 1 < sizeof all / sizeof all[0]; o++)
        if (!not_passed(o->name)) all[n++] = *o;
    all[n] = (struct option){NULL, 0, NULL, 0};
    return all;
}

static int help_study(void)
{
    printf("usage: qlora study --quantizers Q1,Q2,... --model DIR --data FILE (--eval-data FILE | --eval-dataset-size N)\n"
           "                   --output STUDY_DIR [--seeds S1,S2,...] [train options]\n"
           "       qlora study --output STUDY_DIR --resume      carry on; finished runs are not redone\n"
           "       qlora study --output STUDY_DIR --report      rebuild report.md and the plots from study.json\n\n"
           "The same QLoRA finetune once per quantizer and seed (none: the base kept dense, the 16-bit LoRA\n"
           "baseline). Each run is a run folder STUDY_DIR/runs/<quantizer>-seed<N>, as qlora train makes it.\n"
           "For each: bits/param and bytes, quantize time, reconstruction error overall and per layer, eval\n"
           "NLL of the quantized base before finetuning and with the adapter after it (MMLU too with --mmlu),\n"
           "the loss curve, tokens/s, peak memory, wall time and device, all in STUDY_DIR/study.json\n"
           "(rewritten after every run); STUDY_DIR/report.md has the tables and links the plots in\n"
           "STUDY_DIR/plots (PNG and SVG).\n\n"
           "options:\n");
    help_opt("-q, --quantizers LIST", "comma-separated quantizer specs (none, plugin names, .so paths)",
             study_defaults.quantizers);
    help_opt("--seeds LIST", "comma-separated seeds: a run per quantizer and seed", "42, as qlora train");
    help_opt("-o, --output STUDY_DIR", "the study's folder (required); a new study needs a new or empty one", NULL);
    help_opt("--eval-data FILE", "held-out data for the eval NLL before and after finetuning", NULL);
    help_opt("--eval-format F", "alpaca, input-output, oasst1 or text", "detected from the file");
    help_opt("--mmlu DIR", "also MMLU accuracy before and after finetuning (DIR holds dev/ and test/)", NULL);
    help_int("--shots N", "MMLU: dev examples in each prompt", study_defaults.shots);
    help_opt("--mmlu-max-examples N", "MMLU: the first N questions of each subject", "all");
    help_opt("--resume", "continue the study of --output: runs not finished are run, from their last", NULL);
    help_opt("", "checkpoint when they have one", NULL);
    help_opt("--retry-failed", "with --resume: run the failed runs again too", NULL);
    help_opt("--report", "rebuild report.md and the plots from study.json, and stop", NULL);
    help_device();
    help_quiet();
    printf("  %-26s %s\n", "train options",
           "every option of qlora train but --quantizer, --seed, --output, --resume, --force, --dry-run and");
    printf("  %-26s %s\n", "", "--eval-data is given to each run as it is: --model and --data (required), --format,");
    printf("  %-26s %s\n", "", "--steps, --lr, --lora-r, --batch-size, --eval-dataset-size ... (qlora train --help)");
    return help_end("qlora study --model models/stories260K --quantizers none,nf4,nf4:double_quant=0,fp4,int8 "
                    "--data alpaca.json --eval-dataset-size 100 --steps 200 --seeds 0,1,2 --output studies/s260k");
}

/* ---- the study's settings ---- */

typedef struct study {
    char dir[4096];
    char json_path[4200];
    json_t *doc;          /* study.json */
    char **specs;         /* the quantizers */
    size_t n_specs;
    int64_t *seeds;
    size_t n_seeds;
    char **train_args;    /* "--name=value" or "--name": given to every run's train */
    size_t n_train_args;
    const char *eval_data, *eval_format; /* NULL: --eval-dataset-size holds out part of --data */
    const char *mmlu;
    long shots, mmlu_max;
    int progress;
    int tty;
} study;

static void study_free(study *s)
{
    for (size_t i = 0; i < s->n_specs; i++) free(s->specs[i]);
    free(s->specs);
    free(s->seeds);
    for (size_t i = 0; i < s->n_train_args; i++) free(s->train_args[i]);
    free(s->train_args);
    json_decref(s->doc);
}

/* The list of --quantizers as compare splits it: a piece with '=' and no ':'
 * continues the spec before it ("nf4:double_quant=0,blocksize=64,fp4" is two). */
static int split_specs(const char *list, study *s)
{
    char *copy = strdup(list), *save = NULL;
    if (!copy) return ql_error(QL_ENOMEM, "out of memory");
    int rc = QL_OK;
    for (char *tok = strtok_r(copy, ",", &save); tok && rc == QL_OK; tok = strtok_r(NULL, ",", &save)) {
        if (strchr(tok, '=') && !strchr(tok, ':') && s->n_specs > 0) {
            char *prev = s->specs[s->n_specs - 1];
            size_t len = strlen(prev) + strlen(tok) + 2;
            char *joined = malloc(len);
            if (!joined) rc = ql_error(QL_ENOMEM, "out of memory");
            else snprintf(joined, len, "%s,%s", prev, tok), free(prev), s->specs[s->n_specs - 1] = joined;
            continue;
        }
        char **p = realloc(s->specs, (s->n_specs + 1) * sizeof *p);
        if (!p) rc = ql_error(QL_ENOMEM, "out of memory");
        else if (!(p[s->n_specs] = strdup(tok))) s->specs = p, rc = ql_error(QL_ENOMEM, "out of memory");
        else s->specs = p, s->n_specs++;
    }
    free(copy);
    return rc;
}

static int add_train_arg(study *s, const char *name, const char *value)
{
    size_t len = strlen(name) + (value ? strlen(value) : 0) + 4;
    char *a = malloc(len), **p = realloc(s->train_args, (s->n_train_args + 1) * sizeof *p);
    if (p) s->train_args = p;
    if (!a || !p) {
        free(a);
        return ql_error(QL_ENOMEM, "out of memory");
    }
    if (value) snprintf(a, len, "--%s=%s", name, value);
    else snprintf(a, len, "--%s", name);
    s->train_args[s->n_train_args++] = a;
    return QL_OK;
}

/* A run's folder name: the spec in [a-z0-9_-] ("nf4:double_quant=0" is
 * nf4-double_quant-0, "./build/my_q.so" is my_q), then -seedN. */
static void spec_slug(const char *spec, char *out, size_t cap)
{
    const char *base = spec;
    char stem[256];
    if (ql_qz_spec_is_path(spec)) {
        size_t nl = strcspn(spec, ":");
        snprintf(stem, sizeof stem, "%.*s", (int)nl, spec);
        char *slash = strrchr(stem, '/');
        char *name = slash ? slash + 1 : stem;
        char *dot = strstr(name, ".so");
        if (dot) *dot = '\0';
        if (!strncmp(name, "qlora_", 6)) name += 6;
        char rest[256];
        snprintf(rest, sizeof rest, "%s%s", name, spec + nl);
        snprintf(stem, sizeof stem, "%s", rest);
        base = stem;
    }
    size_t k = 0;
    for (const char *p = base; *p && k + 1 < cap; p++) {
        char c = *p;
        if (c >= 'A' && c <= 'Z') c = (char)(c - 'A' + 'a');
        int ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '.';
        char put = ok ? (c == '.' ? '_' : c) : '-';
        if (put == '-' && k > 0 && out[k - 1] == '-') continue;
        out[k++] = put;
    }
    while (k > 0 && out[k - 1] == '-') k--;
    if (k == 0) out[k++] = 'q';
    out[k] = '\0';
}

/* monotonic seconds */
static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- small JSON helpers ---- */

static json_t *jnum(double v) { return isfinite(v) ? json_real(v) : json_null(); }

static double jget_num(const json_t *o, const char *key)
{
    const json_t *v = json_object_get(o, key);
    return json_is_number(v) ? json_number_value(v) : NAN;
}

static const char *jget_str(const json_t *o, const char *key)
{
    const json_t *v = json_object_get(o, key);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

static int write_json_atomic(const char *path, const json_t *j)
{
    char *text = json_dumps(j, JSON_INDENT(1) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(12));
    if (!text) return ql_error(QL_ENOMEM, "out of memory");
    size_t len = strlen(text);
    char *t = realloc(text, len + 2);
    if (!t) {
        free(text);
        return ql_error(QL_ENOMEM, "out of memory");
    }
    t[len++] = '\n';
    int rc = ql_write_file_atomic(path, t, len);
    free(t);
    return rc;
}

static int save_study(study *s)
{
    char now[32];
    time_t t = time(NULL);
    strftime(now, sizeof now, "%Y-%m-%dT%H:%M:%SZ", gmtime(&t));
    json_object_set_new(s->doc, "updated", json_string(now));
    int rc = write_json_atomic(s->json_path, s->doc);
    return rc ? ql_error_context("writing the study's %s", s->json_path) : QL_OK;
}

/* ---- one run, in its child process ---- */

/* train's command line for a run: the study's train options, then what the study sets */
static char **run_argv(const study *s, const char *spec, int64_t seed, const char *run_dir, int same_format, int *argc)
{
    size_t cap = s->n_train_args + 8, n = 0;
    char **a = calloc(cap, sizeof *a);
    if (!a) return NULL;
    a[n++] = strdup("study");
    for (size_t i = 0; i < s->n_train_args; i++) a[n++] = strdup(s->train_args[i]);
    char buf[4400];
    snprintf(buf, sizeof buf, "--quantizer=%s", spec);
    a[n++] = strdup(buf);
    snprintf(buf, sizeof buf, "--seed=%lld", (long long)seed);
    a[n++] = strdup(buf);
    snprintf(buf, sizeof buf, "--output=%s", run_dir);
    a[n++] = strdup(buf);
    /* train evaluates the eval data too (at the end, and every --eval-steps)
     * when it is in the training data's format, the only one train reads it in */
    if (s->eval_data && same_format) {
        snprintf(buf, sizeof buf, "--eval-data=%s", s->eval_data);
        a[n++] = strdup(buf);
    }
    for (size_t i = 0; i < n; i++)
        if (!a[i]) {
            for (size_t k = 0; k < n; k++) free(a[k]);
            free(a);
            return NULL;
        }
    *argc = (int)n;
    return a;
}

static void free_argv(char **a, int n)
{
    for (int i = 0; i < n; i++) free(a[i]);
    free(a);
}

/* Parse a run's train options (the study's checks ran them once before any run) */
static int parse_run(const study *s, const char *spec, int64_t seed, const char *run_dir, int same_format,
                     char ***argv_out, int *argc_out, ql_train_opts *o, ql_calib_opts *calib)
{
    int argc;
    char **argv = run_argv(s, spec, seed, run_dir, same_format, &argc);
    if (!argv) return fail(ql_error(QL_ENOMEM, "out of memory"));
    /* getopt_long permutes its argv: parse a copy, keep the strings */
    char **copy = calloc((size_t)argc + 1, sizeof *copy);
    if (!copy) {
        free_argv(argv, argc);
        return fail(ql_error(QL_ENOMEM, "out of memory"));
    }
    memcpy(copy, argv, (size_t)argc * sizeof *copy);
    qp_args qp;
    memset(&qp, 0, sizeof qp);
    int rc = train_parse(argc, copy, &qp, o, calib);
    free(copy);
    if (rc) {
        free_argv(argv, argc);
        return rc < 0 ? 2 : rc;
    }
    *argv_out = argv;
    *argc_out = argc;
    return 0;
}

/* Bits per parameter, bytes and reconstruction error of the quantizer on
 * the model's block linears, as qlora compare measures them; for none the
 * dense checkpoint's own. */
static int quant_stats(const char *model, const char *spec, const char *tmp_json, json_t *res)
{
    json_t *q = json_object();
    json_object_set_new(res, "quantization", q);
    if (!strcmp(spec, "none")) {
        ql_model_files *m;
        int rc = ql_model_files_open(model, &m);
        if (rc) return rc;
        uint64_t lin_bytes = 0, other_bytes = 0;
        int64_t lin_params = 0, other_params = 0;
        for (size_t i = 0; i < ql_model_files_count(m); i++) {
            const ql_tensor *t = ql_model_files_at(m, i);
            int64_t numel = 1;
            for (int d = 0; d < t->ndim; d++) numel *= t->shape[d];
            char prefix[512];
            if (ql_is_block_linear(t->name, prefix, sizeof prefix)) lin_params += numel, lin_bytes += t->nbytes;
            else other_params += numel, other_bytes += t->nbytes;
        }
        ql_model_files_close(m);
        json_object_set_new(q, "matrix_bits_per_param", jnum(lin_params ? 8.0 * (double)lin_bytes / (double)lin_params : 0));
        json_object_set_new(q, "stored_bytes", json_integer((json_int_t)lin_bytes));
        json_object_set_new(q, "params", json_integer(lin_params));
        json_object_set_new(q, "model_params", json_integer(lin_params + other_params));
        json_object_set_new(q, "model_bits_per_param",
                            jnum(8.0 * (double)(lin_bytes + other_bytes) / (double)(lin_params + other_params)));
        json_object_set_new(q, "model_bytes", json_integer((json_int_t)(lin_bytes + other_bytes)));
        json_object_set_new(q, "rel_error", json_real(0));
        json_object_set_new(q, "max_abs_error", json_real(0));
        json_object_set_new(q, "quantize_s", json_real(0));
        json_object_set_new(q, "layers", json_array());
        return QL_OK;
    }
    ql_qz *qz = NULL;
    int rc = ql_qz_open(spec, &qz);
    int needs = rc == QL_OK && ql_qz_needs_calibration(qz);
    ql_qz_close(qz);
    if (rc) return rc;
    if (needs) {
        /* compare quantizes without calibration data */
        json_object_set_new(q, "not_measured", json_string("a data-aware quantizer: qlora compare's reconstruction error "
                                                           "is measured without calibration data"));
        return QL_OK;
    }
    FILE *null = fopen("/dev/null", "w");
    if (!null) return ql_error(QL_EIO, "cannot open /dev/null: %s", strerror(errno));
    ql_compare_opts co = {.json_path = tmp_json, .per_layer = 0, .progress = 0};
    rc = ql_compare_model(model, spec, &co, null);
    fclose(null);
    if (rc) return rc;
    json_error_t jerr;
    json_t *c = json_load_file(tmp_json, 0, &jerr);
    unlink(tmp_json);
    if (!c) return ql_error(QL_EFORMAT, "%s: %s", tmp_json, jerr.text);
    json_t *r = json_array_get(json_object_get(c, "quantizers"), 0);
    static const char *const keys[] = {"name", "options", "matrix_bits_per_param", "stored_bytes", "params",
                                       "model_params", "model_bits_per_param", "rel_error", "max_abs_error"};
    for (size_t i = 0; r && i < sizeof keys / sizeof keys[0]; i++)
        if (json_object_get(r, keys[i])) json_object_set(q, keys[i], json_object_get(r, keys[i]));
    double mbits = jget_num(r, "model_bits_per_param");
    json_int_t mparams = json_integer_value(json_object_get(r, "model_params"));
    json_object_set_new(q, "model_bytes", json_integer((json_int_t)llround(mbits * (double)mparams / 8.0)));
    json_object_set_new(q, "quantize_s", jnum(jget_num(r, "quantize_ms") / 1e3));
    json_t *layers = json_array();
    size_t i;
    json_t *l;
    json_array_foreach(json_object_get(r, "layers"), i, l)
        json_array_append_new(layers, json_pack("{s:O, s:O, s:O}", "name", json_object_get(l, "name"), "rel_error",
                                                json_object_get(l, "rel_error"), "matrix_bits_per_param",
                                                json_object_get(l, "matrix_bits_per_param")));
    json_object_set_new(q, "layers", layers);
    json_decref(c);
    return QL_OK;
}

/* The eval set: --eval-data, or the examples of --data that --eval-dataset-size
 * holds out (the split train makes: ql_dataset_split, seed 42). */
static int load_eval_set(const study *s, const ql_train_opts *o, const ql_tokenizer *tok, int max_positions,
                         ql_dataset **full, ql_dataset **ed)
{
    *full = *ed = NULL;
    ql_dataset_opts dopts = o->data;
    if (dopts.max_len <= 0) dopts.max_len = max_positions;
    int rc;
    if (s->eval_data) {
        dopts.max_examples = 0;
        if ((rc = ql_data_format_parse(s->eval_format, &dopts.format))) return rc;
        if ((rc = ql_dataset_load(s->eval_data, tok, &dopts, ed))) return rc;
    } else {
        if ((rc = ql_dataset_load(o->data_path, tok, &dopts, full))) return rc;
        double want = o->eval_dataset_size < 1 ? ceil(o->eval_dataset_size * (double)(*full)->n) : o->eval_dataset_size;
        if (!(want >= 1 && want < (double)(*full)->n))
            return ql_error(QL_EINVAL, "--eval-dataset-size %g holds out %.0f of the %zu examples of %s",
                            o->eval_dataset_size, want, (*full)->n, o->data_path);
        ql_dataset *train = NULL;
        if ((rc = ql_dataset_split(*full, (size_t)want, 42, &train, ed))) return rc;
        ql_dataset_destroy(train);
    }
    if (o->max_eval_examples > 0 && (*ed)->n > (size_t)o->max_eval_examples) (*ed)->n = (size_t)o->max_eval_examples;
    return QL_OK;
}

/* Eval NLL (and MMLU) of the quantized base, with the adapter of adapter_dir when given. */
static int eval_model(const study *s, const ql_train_opts *o, const char *adapter_dir, json_t *out)
{
    ql_llama *m = NULL;
    ql_tokenizer *tok = NULL;
    ql_lora *lora = NULL;
    ql_dataset *full = NULL, *ed = NULL;
    char *mmlu_text = NULL;
    size_t mmlu_len = 0;
    double t0 = now_s();
    ql_llama_load_opts lo = {.quantizer = o->quantizer, .progress = 0, .calib = o->calib, .device = o->device};
    int rc = ql_llama_load(o->model_dir, &lo, &m);
    if (rc == QL_OK) json_object_set_new(out, "load_s", jnum(now_s() - t0));
    if (rc == QL_OK) rc = ql_tokenizer_load(o->model_dir, &tok);
    if (rc == QL_OK && adapter_dir && (rc = ql_lora_load_peft(m, adapter_dir, &lora)) == QL_OK) ql_lora_attach(m, lora);
    if (rc == QL_OK) rc = load_eval_set(s, o, tok, ql_llama_get_config(m)->max_positions, &full, &ed);
    if (rc == QL_OK) {
        ql_eval_result r;
        ql_eval_opts eo = {.lora = lora, .device = o->device, .precision = o->precision, .batch = 8,
                           .progress = o->progress};
        double t1 = now_s();
        if ((rc = ql_eval_nll(m, ed, &eo, &r)) == QL_OK) {
            double nll = r.tokens ? r.nll_sum / (double)r.tokens : NAN;
            json_object_set_new(out, "nll", jnum(nll));
            json_object_set_new(out, "ppl", jnum(exp(nll)));
            json_object_set_new(out, "tokens", json_integer(r.tokens));
            json_object_set_new(out, "examples", json_integer(r.examples));
            json_object_set_new(out, "eval_s", jnum(now_s() - t1));
        }
    }
    if (rc == QL_OK && s->mmlu) {
        FILE *mf = open_memstream(&mmlu_text, &mmlu_len);
        if (!mf) rc = ql_error(QL_ENOMEM, "out of memory");
        else {
            /* the adapter (after finetuning) and the run's device, as qlora eval --mmlu takes them */
            ql_mmlu_opts mo = {.dir = s->mmlu, .split = "test", .shots = (int)s->shots, .max_per_subject = s->mmlu_max,
                               .progress = o->progress, .no_warnings = 1, .lora = lora, .device = o->device,
                               .precision = o->precision};
            rc = ql_mmlu_eval(m, tok, &mo, mf);
            fclose(mf);
        }
        if (rc == QL_OK) {
            /* its last line is the JSON object */
            char *last = mmlu_text;
            for (char *p = mmlu_text; p && *p; p++)
                if (*p == '\n' && p[1]) last = p + 1;
            json_t *j = last ? json_loads(last, JSON_DISABLE_EOF_CHECK, NULL) : NULL;
            json_object_set_new(out, "mmlu_accuracy", jnum(jget_num(j, "accuracy")));
            json_decref(j);
        }
    }
    free(mmlu_text);
    ql_dataset_destroy(ed);
    ql_dataset_destroy(full);
    ql_tokenizer_destroy(tok);
    ql_llama_destroy(m);
    ql_lora_destroy(lora);
    return rc;
}

/* The loss curve, tokens/s and train's own eval losses, from the run's metrics.jsonl */
static void read_metrics(const char *run_dir, json_t *res)
{
    char *path = ql_path_join(run_dir, "metrics.jsonl"), *data = NULL;
    size_t len = 0;
    if (!path || ql_read_file(path, &data, &len) != QL_OK) {
        free(path);
        return;
    }
    json_t *curve = json_array(), *evals = json_array();
    double tps = NAN, last_loss = NAN, plan = NAN;
    for (char *line = data; line < data + len;) {
        char *nl = memchr(line, '\n', (size_t)(data + len - line));
        size_t ll = nl ? (size_t)(nl - line) : (size_t)(data + len - line);
        json_t *row = json_loadb(line, ll, 0, NULL);
        json_t *step = json_object_get(row, "step");
        if (json_is_integer(step) && json_is_number(json_object_get(row, "loss"))) {
            last_loss = jget_num(row, "loss");
            json_array_append_new(curve, json_pack("[O, o]", step, jnum(last_loss)));
            tps = jget_num(row, "tokens_per_s");
            if (json_is_integer(json_object_get(row, "device_plan_bytes"))) plan = jget_num(row, "device_plan_bytes");
        } else if (json_is_integer(step) && json_is_number(json_object_get(row, "eval_loss")))
            json_array_append_new(evals, json_pack("[O, o]", step, jnum(jget_num(row, "eval_loss"))));
        json_decref(row);
        line += ll + 1;
    }
    json_object_set_new(res, "loss_curve", curve);
    json_object_set_new(res, "final_train_loss", jnum(last_loss));
    json_object_set_new(res, "tokens_per_s", jnum(tps));
    if (isfinite(plan)) json_object_set_new(res, "device_plan_bytes", json_integer((json_int_t)plan));
    json_object_set_new(res, "train_eval_loss", evals);
    free(data);
    free(path);
}

/* The device, precision and resolved quantizer the run's run_config.json records */
static void read_run_config(const char *run_dir, json_t *res)
{
    char *path = ql_path_join(run_dir, "run_config.json");
    json_t *c = path ? json_load_file(path, 0, NULL) : NULL;
    static const char *const keys[][2] = {{"device", "device"}, {"precision", "precision"}, {"quantizer", "quantizer_resolved"}};
    for (size_t i = 0; c && i < sizeof keys / sizeof keys[0]; i++)
        if (jget_str(c, keys[i][0])) json_object_set_new(res, keys[i][1], json_string(jget_str(c, keys[i][0])));
    json_decref(c);
    free(path);
}

enum { CHILD_DONE = 0, CHILD_FAILED = 1, CHILD_INTERRUPTED = 3 };

/* The run, measured into res; the exit status of its process */
static int child_run(const study *s, const json_t *run, const char *resume_ckpt, int force, json_t *res)
{
    const char *spec = jget_str(run, "quantizer"), *rel = jget_str(run, "dir");
    int64_t seed = json_integer_value(json_object_get(run, "seed"));
    char run_dir[4400], tmp_json[4400];
    snprintf(run_dir, sizeof run_dir, "%s/%s", s->dir, rel);
    snprintf(tmp_json, sizeof tmp_json, "%s/.compare.%ld.json", s->dir, (long)getpid());
    char **argv = NULL;
    int argc = 0;
    ql_train_opts o;
    ql_calib_opts calib;
    int same = !s->eval_data || !strcmp(s->eval_format, jget_str(s->doc, "data_format") ? jget_str(s->doc, "data_format") : "");
    if (parse_run(s, spec, seed, run_dir, same, &argv, &argc, &o, &calib)) {
        json_object_set_new(res, "error", json_string("the run's train options were refused (see above)"));
        return CHILD_FAILED;
    }
    if (resume_ckpt) o.resume_from = resume_ckpt;
    o.force = force;
    int rc = quant_stats(o.model_dir, spec, tmp_json, res);
    json_t *before = json_object(), *after = json_object();
    json_object_set_new(res, "before", before);
    if (rc == QL_OK) rc = eval_model(s, &o, NULL, before);
    double t0 = now_s();
    char msg[4096] = "";
    if (rc == QL_OK) {
        rc = ql_train(&o);
        /* the message first: reading what the run left sets errors of its own */
        if (rc) snprintf(msg, sizeof msg, "%s", ql_error_message()[0] ? ql_error_message() : ql_status_name(rc));
        json_object_set_new(res, "train_s", jnum(now_s() - t0));
        read_metrics(run_dir, res);
        read_run_config(run_dir, res);
    }
    if (rc == QL_OK) {
        json_object_set_new(res, "after", after);
        rc = eval_model(s, &o, run_dir, after);
    } else
        json_decref(after);
    free_argv(argv, argc);
    if (rc) {
        if (!msg[0]) snprintf(msg, sizeof msg, "%s", ql_error_message()[0] ? ql_error_message() : ql_status_name(rc));
        json_object_set_new(res, "error", json_string(msg));
        return rc == QL_EINTR ? CHILD_INTERRUPTED : CHILD_FAILED;
    }
    return CHILD_DONE;
}

/* ---- the study's process ---- */

static volatile sig_atomic_t stop_signal;
static volatile pid_t running_child;

/* Ctrl-C reaches the study only (each run has a process group of its own):
 * passed on to the run, whose train saves a checkpoint and stops; a second
 * one is passed on too and ends the run at once, as it does in qlora train. */
static void on_signal(int sig)
{
    if (!stop_signal) stop_signal = sig;
    pid_t c = running_child;
    if (c > 0) kill(c, sig);
}

/* The newest checkpoint-N of a run folder that holds a trainer_state.json; 0 when none */
static long last_checkpoint(const char *run_dir)
{
    DIR *d = opendir(run_dir);
    long best = 0;
    struct dirent *e;
    while (d && (e = readdir(d))) {
        char *end;
        if (strncmp(e->d_name, "checkpoint-", 11)) continue;
        long n = strtol(e->d_name + 11, &end, 10);
        if (*end || n <= best) continue;
        char path[4600];
        snprintf(path, sizeof path, "%.4300s/%.200s/trainer_state.json", run_dir, e->d_name);
        if (ql_path_exists(path)) best = n;
    }
    if (d) closedir(d);
    return best;
}

static const char *signal_name(int sig)
{
    switch (sig) {
    case SIGINT: return "SIGINT";
    case SIGTERM: return "SIGTERM";
    case SIGKILL: return "SIGKILL (out of memory?)";
    case SIGSEGV: return "SIGSEGV";
    case SIGABRT: return "SIGABRT";
    case SIGBUS: return "SIGBUS";
    default: return "a signal";
    }
}

/* Run `run` in a child process; its figures merged into the run's entry */
static void spawn_run(study *s, json_t *run)
{
    char run_dir[4400];
    snprintf(run_dir, sizeof run_dir, "%s/%s", s->dir, jget_str(run, "dir"));
    /* an unfinished run: from its last checkpoint, else again from scratch */
    char ckpt[4600] = "";
    int force = 0;
    if (ql_is_dir(run_dir)) {
        long n = last_checkpoint(run_dir);
        if (n > 0) snprintf(ckpt, sizeof ckpt, "%s/checkpoint-%ld", run_dir, n);
        else if (ql_output_is(run_dir, "run")) force = 1;
    }
    json_object_set_new(run, "resumed_from", ckpt[0] ? json_string(strrchr(ckpt, '/') + 1) : json_null());
    int fds[2];
    json_t *res = NULL;
    double t0 = now_s();
    int status = 0;
    struct rusage ru;
    memset(&ru, 0, sizeof ru);
    if (pipe(fds) != 0) {
        json_object_set_new(run, "status", json_string("failed"));
        json_object_set_new(run, "error", json_string(strerror(errno)));
        return;
    }
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        setpgid(0, 0);
        prctl(PR_SET_PDEATHSIG, SIGTERM); /* the study gone, its run stops too (saving a checkpoint) */
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        dup2(STDERR_FILENO, STDOUT_FILENO); /* train's JSON rows go beside its progress, study's stdout keeps the summary */
        json_t *r = json_object();
        int code = child_run(s, run, ckpt[0] ? ckpt : NULL, force, r);
        char *text = json_dumps(r, JSON_COMPACT | JSON_REAL_PRECISION(12));
        for (size_t done = 0, len = text ? strlen(text) : 0; done < len;) {
            ssize_t w = write(fds[1], text + done, len - done);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) break;
            done += (size_t)w;
        }
        fflush(NULL);
        _exit(code);
    }
    close(fds[1]);
    if (pid < 0) {
        close(fds[0]);
        json_object_set_new(run, "status", json_string("failed"));
        json_object_set_new(run, "error", json_string(strerror(errno)));
        return;
    }
    setpgid(pid, pid);
    running_child = pid;
    if (stop_signal) kill(pid, stop_signal); /* it came between fork and here */
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 4096 > cap) {
            char *b = realloc(buf, cap = cap * 2 + 8192);
            if (!b) break;
            buf = b;
        }
        ssize_t r = read(fds[0], buf + len, cap - len - 1);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        len += (size_t)r;
    }
    close(fds[0]);
    while (wait4(pid, &status, 0, &ru) < 0 && errno == EINTR) {}
    running_child = 0;
    if (buf) buf[len] = '\0';
    res = buf && len ? json_loads(buf, 0, NULL) : NULL;
    free(buf);
    if (res) json_object_update(run, res);
    json_decref(res);
    json_object_set_new(run, "wall_s", jnum(now_s() - t0));
    json_object_set_new(run, "peak_rss_bytes", json_integer((json_int_t)ru.ru_maxrss * 1024));
    const char *st;
    if (WIFEXITED(status) && WEXITSTATUS(status) == CHILD_DONE && res) st = "done";
    else if (WIFEXITED(status) && WEXITSTATUS(status) == CHILD_INTERRUPTED) st = "interrupted";
    else if (WIFSIGNALED(status) && (WTERMSIG(status) == SIGINT || WTERMSIG(status) == SIGTERM) && stop_signal) {
        st = "interrupted";
        char msg[128];
        snprintf(msg, sizeof msg, "ended by %s", signal_name(WTERMSIG(status)));
        json_object_set_new(run, "error", json_string(msg));
    } else {
        st = "failed";
        if (WIFSIGNALED(status)) {
            char msg[128];
            snprintf(msg, sizeof msg, "the run's process was killed by %s", signal_name(WTERMSIG(status)));
            json_object_set_new(run, "error", json_string(msg));
        } else if (!jget_str(run, "error"))
            json_object_set_new(run, "error", json_string("the run's process ended without a result"));
    }
    if (strcmp(st, "failed") && strcmp(st, "interrupted")) json_object_del(run, "error");
    /* train's own advice (--resume CHECKPOINT) is, in a study, the study's --resume */
    const char *e = jget_str(run, "error"), *advice = e ? strstr(e, "; to go on, run the same command") : NULL;
    if (!strcmp(st, "interrupted") && advice) {
        char msg[8400];
        snprintf(msg, sizeof msg, "%.*s; 'qlora study --output %s --resume' goes on from there",
                 (int)(advice - e < 4000 ? advice - e : 4000), e, s->dir);
        json_object_set_new(run, "error", json_string(msg));
    }
    json_object_set_new(run, "status", json_string(st));
    char now[32];
    time_t t = time(NULL);
    strftime(now, sizeof now, "%Y-%m-%dT%H:%M:%SZ", gmtime(&t));
    json_object_set_new(run, "finished_at", json_string(now));
}

/* ---- checks before any run ---- */

static int check_quantizers(const study *s)
{
    if (s->n_specs == 0) return usage_error("--quantizers is empty");
    for (size_t i = 0; i < s->n_specs; i++) {
        for (size_t k = 0; k < i; k++)
            if (!strcmp(s->specs[i], s->specs[k])) return usage_error("--quantizers: %s is listed twice", s->specs[i]);
        if (!strcmp(s->specs[i], "none")) continue;
        ql_qz *q = NULL;
        int rc = ql_qz_open(s->specs[i], &q);
        ql_qz_close(q);
        if (rc) {
            fprintf(stderr, "qlora: error: study: quantizer %s (%zu of %zu in --quantizers): %s; no run was started\n",
                    s->specs[i], i + 1, s->n_specs, ql_error_message());
            return 2;
        }
    }
    return 0;
}

static int parse_seeds(const char *list, study *s)
{
    char *copy = strdup(list), *save = NULL;
    if (!copy) return fail(ql_error(QL_ENOMEM, "out of memory"));
    int bad = 0;
    for (char *tok = strtok_r(copy, ",", &save); tok && !bad; tok = strtok_r(NULL, ",", &save)) {
        long v;
        if (parse_long_arg("--seeds", tok, 0, LONG_MAX, &v)) bad = 2;
        for (size_t k = 0; !bad && k < s->n_seeds; k++)
            if (s->seeds[k] == v) bad = usage_error("--seeds: %ld is listed twice", v);
        int64_t *p = bad ? NULL : realloc(s->seeds, (s->n_seeds + 1) * sizeof *p);
        if (!bad && !p) bad = fail(ql_error(QL_ENOMEM, "out of memory"));
        if (!bad) s->seeds = p, s->seeds[s->n_seeds++] = v;
    }
    free(copy);
    if (!bad && s->n_seeds == 0) bad = usage_error("--seeds is empty");
    return bad;
}

/* The run list: every quantizer for the first seed, then for the next, so an
 * unfinished study already compares every quantizer */
static json_t *make_runs(const study *s)
{
    json_t *runs = json_array();
    for (size_t k = 0; k < s->n_seeds; k++)
        for (size_t i = 0; i < s->n_specs; i++) {
            char slug[200], id[260], dir[300];
            spec_slug(s->specs[i], slug, sizeof slug);
            /* two specs of one slug ("a.so" and "a_so"): the later gets its index */
            for (size_t j = 0; j < i; j++) {
                char other[200];
                spec_slug(s->specs[j], other, sizeof other);
                if (!strcmp(other, slug)) {
                    snprintf(other, sizeof other, "%.170s-%u", slug, (unsigned)(i + 1) % 100000u);
                    snprintf(slug, sizeof slug, "%s", other);
                    break;
                }
            }
            snprintf(id, sizeof id, "%s-seed%lld", slug, (long long)s->seeds[k]);
            snprintf(dir, sizeof dir, "runs/%s", id);
            json_array_append_new(runs, json_pack("{s:s, s:s, s:I, s:s, s:s, s:i}", "id", id, "quantizer", s->specs[i],
                                                  "seed", (json_int_t)s->seeds[k], "dir", dir, "status", "pending",
                                                  "attempts", 0));
        }
    return runs;
}

/* The study's settings back from study.json (--resume, --report) */
static int load_settings(study *s)
{
    json_t *set = json_object_get(s->doc, "settings");
    json_t *v;
    size_t i;
    if (!json_is_object(set)) return ql_error(QL_EFORMAT, "%s has no settings", s->json_path);
    json_array_foreach(json_object_get(set, "quantizers"), i, v) {
        char **p = realloc(s->specs, (s->n_specs + 1) * sizeof *p);
        if (!p || !json_is_string(v)) return ql_error(QL_EFORMAT, "%s: bad settings.quantizers", s->json_path);
        s->specs = p;
        if (!(s->specs[s->n_specs] = strdup(json_string_value(v)))) return ql_error(QL_ENOMEM, "out of memory");
        s->n_specs++;
    }
    json_array_foreach(json_object_get(set, "seeds"), i, v) {
        int64_t *p = realloc(s->seeds, (s->n_seeds + 1) * sizeof *p);
        if (!p || !json_is_integer(v)) return ql_error(QL_EFORMAT, "%s: bad settings.seeds", s->json_path);
        s->seeds = p;
        s->seeds[s->n_seeds++] = json_integer_value(v);
    }
    json_array_foreach(json_object_get(set, "train_args"), i, v) {
        char **p = realloc(s->train_args, (s->n_train_args + 1) * sizeof *p);
        if (!p || !json_is_string(v)) return ql_error(QL_EFORMAT, "%s: bad settings.train_args", s->json_path);
        s->train_args = p;
        if (!(s->train_args[s->n_train_args] = strdup(json_string_value(v)))) return ql_error(QL_ENOMEM, "out of memory");
        s->n_train_args++;
    }
    s->eval_data = jget_str(set, "eval_data");
    s->eval_format = jget_str(set, "eval_format");
    s->mmlu = jget_str(set, "mmlu");
    s->shots = (long)json_integer_value(json_object_get(set, "shots"));
    s->mmlu_max = (long)json_integer_value(json_object_get(set, "mmlu_max_examples"));
    if (!s->n_specs || !s->n_seeds || !json_is_array(json_object_get(s->doc, "runs")))
        return ql_error(QL_EFORMAT, "%s: no quantizers, seeds or runs", s->json_path);
    return QL_OK;
}

static int lock_study(const char *dir)
{
    char path[4300];
    snprintf(path, sizeof path, "%s/.qlora-lock", dir);
    int fd = open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0) return -1;
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        close(fd);
        return -2;
    }
    return fd; /* held until the process ends */
}

static void human_time(double s, char *buf, size_t cap)
{
    if (!isfinite(s) || s < 0) snprintf(buf, cap, "?");
    else if (s < 90) snprintf(buf, cap, "%.0fs", s);
    else if (s < 5400) snprintf(buf, cap, "%.0fm%02.0fs", floor(s / 60), fmod(s, 60));
    else snprintf(buf, cap, "%.0fh%02.0fm", floor(s / 3600), fmod(floor(s / 60), 60));
}

static void progress_line(const study *s, size_t k, size_t n, const json_t *run, int done, int failed,
                          double elapsed, double eta)
{
    if (!s->progress) return;
    if (s->tty) {
        char e[32], a[32];
        human_time(elapsed, e, sizeof e);
        human_time(eta, a, sizeof a);
        fprintf(stderr, "\033[1mstudy: run %zu of %zu: %s, seed %lld\033[0m  (%d done, %d failed; elapsed %s, ETA %s)\n",
                k, n, jget_str(run, "quantizer"), (long long)json_integer_value(json_object_get(run, "seed")), done,
                failed, e, a);
    } else {
        json_t *j = json_pack("{s:s, s:I, s:I, s:s, s:s, s:I, s:i, s:i, s:o, s:o}", "event", "study", "run",
                              (json_int_t)k, "of", (json_int_t)n, "id", jget_str(run, "id"), "quantizer",
                              jget_str(run, "quantizer"), "seed", json_integer_value(json_object_get(run, "seed")),
                              "done", done, "failed", failed, "elapsed_s", jnum(round(elapsed * 10) / 10), "eta_s",
                              jnum(round(eta)));
        char *t = j ? json_dumps(j, JSON_PRESERVE_ORDER | JSON_COMPACT | JSON_REAL_PRECISION(6)) : NULL;
        if (t) fprintf(stderr, "%s\n", t);
        free(t);
        json_decref(j);
    }
}

static void end_line(const study *s, const json_t *run)
{
    if (!s->progress) return;
    const char *st = jget_str(run, "status");
    double b = jget_num(json_object_get(run, "before"), "nll"), a = jget_num(json_object_get(run, "after"), "nll");
    if (s->tty) {
        if (!strcmp(st, "done"))
            fprintf(stderr, "study: %s done in %.1fs: eval NLL %.4f before, %.4f after finetuning\n", jget_str(run, "id"),
                    jget_num(run, "wall_s"), b, a);
        else fprintf(stderr, "study: %s %s: %s\n", jget_str(run, "id"), st, jget_str(run, "error") ? jget_str(run, "error") : "");
    } else {
        json_t *j = json_pack("{s:s, s:s, s:s, s:o, s:o, s:o, s:s?}", "event", "study_run", "id", jget_str(run, "id"),
                              "status", st, "wall_s", jnum(jget_num(run, "wall_s")), "nll_before", jnum(b), "nll_after",
                              jnum(a), "error", jget_str(run, "error"));
        char *t = j ? json_dumps(j, JSON_PRESERVE_ORDER | JSON_COMPACT | JSON_REAL_PRECISION(6)) : NULL;
        if (t) fprintf(stderr, "%s\n", t);
        free(t);
        json_decref(j);
    }
}

/* One line per quantizer on stdout at the end */
static void print_summary(const study *s)
{
    json_t *runs = json_object_get(s->doc, "runs");
    int w = 9;
    for (size_t i = 0; i < s->n_specs; i++)
        if ((int)strlen(s->specs[i]) > w) w = (int)strlen(s->specs[i]);
    printf("%-*s %11s %6s %19s %19s %s\n", w, "quantizer", "matrix bits", "runs", "eval NLL before", "eval NLL after",
           "failed");
    for (size_t i = 0; i < s->n_specs; i++) {
        double b[256], a[256], bits = NAN;
        int n = 0, failed = 0;
        size_t k;
        json_t *r;
        json_array_foreach(runs, k, r) {
            if (strcmp(jget_str(r, "quantizer"), s->specs[i])) continue;
            if (!strcmp(jget_str(r, "status"), "failed")) failed++;
            if (strcmp(jget_str(r, "status"), "done") || n >= 256) continue;
            bits = jget_num(json_object_get(r, "quantization"), "matrix_bits_per_param");
            b[n] = jget_num(json_object_get(r, "before"), "nll");
            a[n++] = jget_num(json_object_get(r, "after"), "nll");
        }
        double bm, bs, am, as;
        study_mean_sd(b, n, &bm, &bs);
        study_mean_sd(a, n, &am, &as);
        char bb[40] = "-", ab[40] = "-";
        if (n) snprintf(bb, sizeof bb, "%.4f ± %.4f", bm, bs), snprintf(ab, sizeof ab, "%.4f ± %.4f", am, as);
        char bits_s[32] = "-";
        if (isfinite(bits)) snprintf(bits_s, sizeof bits_s, "%.3f", bits);
        printf("%-*s %11s %6d %19s %19s %d\n", w, s->specs[i], bits_s, n, bb, ab, failed);
    }
}

/* ---- the command ---- */

int cmd_study(int argc, char **argv)
{
    struct option *longopts = study_options();
    study s;
    memset(&s, 0, sizeof s);
    const char *quantizers = study_defaults.quantizers, *seeds = NULL, *output = NULL;
    int resume = 0, report = 0, retry = 0, c, idx = -1, bad = 0, given_settings = 0, rc = 0;
    s.shots = study_defaults.shots;
    s.progress = 1;
    long lv;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":q:o:h", longopts, &idx)) != -1) {
        switch (c) {
        case 'q': quantizers = optarg, given_settings = 1; break;
        case S_SEEDS: seeds = optarg, given_settings = 1; break;
        case 'o': output = optarg; break;
        case S_EVAL_DATA: s.eval_data = optarg, given_settings = 1; break;
        case S_EVAL_FORMAT: s.eval_format = optarg, given_settings = 1; break;
        case S_MMLU: s.mmlu = optarg, given_settings = 1; break;
        case S_SHOTS: bad |= parse_long_arg("--shots", optarg, 0, 64, &s.shots), given_settings = 1; break;
        case S_MMLU_MAX:
            bad |= parse_long_arg("--mmlu-max-examples", optarg, 1, 1L << 30, &lv), s.mmlu_max = lv, given_settings = 1;
            break;
        case S_RESUME: resume = 1; break;
        case S_REPORT: report = 1; break;
        case S_RETRY: retry = 1; break;
        case 'h':
        case S_HELP: rc = help_study(); goto out;
        case '?':
        case ':': rc = option_error(c, argv, longopts); goto out;
        default:
            /* a train option, given to every run as it is */
            if (c < 256 || idx < 0) {
                rc = option_error(c, argv, longopts);
                goto out;
            }
            if (!strcmp(longopts[idx].name, "quiet")) s.progress = 0;
            else given_settings = 1;
            if (add_train_arg(&s, longopts[idx].name, longopts[idx].has_arg ? optarg : NULL)) {
                rc = fail(QL_ENOMEM);
                goto out;
            }
            break;
        }
        idx = -1;
    }
    if (bad) goto usage;
    if (optind != argc) {
        rc = usage_error("unexpected argument '%s'", argv[optind]);
        goto out;
    }
    if (!output) {
        rc = usage_error("--output STUDY_DIR is required");
        goto out;
    }
    if (resume && report) {
        rc = usage_error("give --resume or --report, not both");
        goto out;
    }
    if (retry && !resume) {
        rc = usage_error("--retry-failed goes with --resume");
        goto out;
    }
    if ((resume || report) && given_settings) {
        rc = usage_error("--%s takes only --output (and --quiet): the study's settings are in its study.json",
                         resume ? "resume" : "report");
        goto out;
    }
    s.tty = isatty(STDERR_FILENO);
    snprintf(s.dir, sizeof s.dir, "%s", output);
    for (size_t l = strlen(s.dir); l > 1 && s.dir[l - 1] == '/';) s.dir[--l] = '\0';
    snprintf(s.json_path, sizeof s.json_path, "%s/study.json", s.dir);

    if (resume || report) {
        if (!ql_path_exists(s.json_path)) {
            rc = fail(ql_error(QL_ENOTFOUND, "%s holds no study (no study.json): start one without --%s", s.dir,
                               resume ? "resume" : "report"));
            goto out;
        }
        json_error_t jerr;
        s.doc = json_load_file(s.json_path, 0, &jerr);
        if (!s.doc) {
            rc = fail(ql_error(QL_EFORMAT, "%s: %s (line %d)", s.json_path, jerr.text, jerr.line));
            goto out;
        }
        if ((rc = load_settings(&s))) {
            rc = fail(rc);
            goto out;
        }
        /* the settings' relative paths are relative to the folder the study
         * was started in: go there, with the study's folder made absolute */
        const char *cwd = jget_str(s.doc, "cwd");
        char here[4096], abs_dir[PATH_MAX];
        if (cwd && getcwd(here, sizeof here) && strcmp(here, cwd) && realpath(s.dir, abs_dir)) {
            if (chdir(cwd) == 0) {
                snprintf(s.dir, sizeof s.dir, "%s", abs_dir);
                snprintf(s.json_path, sizeof s.json_path, "%s/study.json", s.dir);
            } else
                fprintf(stderr, "qlora: study: warning: cannot go to %s, where the study was started (%s); its relative "
                                "paths are taken from here\n", cwd, strerror(errno));
        }
        if (report) {
            if ((rc = study_write_report(s.dir, s.doc))) rc = fail(rc);
            else printf("wrote %s/report.md\n", s.dir);
            goto out;
        }
    } else {
        if ((rc = split_specs(quantizers, &s))) {
            rc = fail(rc);
            goto out;
        }
        char dflt[32];
        ql_train_opts d;
        ql_train_opts_default(&d);
        snprintf(dflt, sizeof dflt, "%lld", (long long)d.seed);
        if ((rc = parse_seeds(seeds ? seeds : dflt, &s))) goto out;
    }

    /* the checks, before any run: the quantizers, then the train options of a run */
    if ((rc = check_quantizers(&s))) goto out;
    char probe_dir[4400];
    snprintf(probe_dir, sizeof probe_dir, "%s/runs/probe", s.dir);
    char **targv = NULL;
    int targc = 0;
    ql_train_opts o;
    ql_calib_opts calib;
    if ((rc = parse_run(&s, s.specs[0], s.seeds[0], probe_dir, 0, &targv, &targc, &o, &calib))) goto out;
    s.progress = o.progress;
    if (!ql_is_dir(o.model_dir)) rc = fail(ql_error(QL_ENOTFOUND, "--model %s: no such folder", o.model_dir));
    else if (!ql_path_exists(o.data_path)) rc = fail(ql_error(QL_ENOTFOUND, "--data %s: no such file", o.data_path));
    else if (s.eval_data && o.eval_dataset_size > 0) rc = usage_error("give --eval-data or --eval-dataset-size, not both");
    else if (!s.eval_data && !(o.eval_dataset_size > 0))
        rc = usage_error("give --eval-data FILE or --eval-dataset-size N: the study measures the eval NLL before and "
                         "after finetuning");
    else if (s.eval_data && !ql_path_exists(s.eval_data)) rc = fail(ql_error(QL_ENOTFOUND, "--eval-data %s: no such file", s.eval_data));
    else if (!s.eval_data && s.eval_format) rc = usage_error("--eval-format goes with --eval-data");
    else if (s.mmlu && !ql_is_dir(s.mmlu)) rc = fail(ql_error(QL_ENOTFOUND, "--mmlu %s: no such folder", s.mmlu));
    const char *data_format = ql_data_format_name(o.data.format);
    static char eval_fmt[32];
    if (!rc && s.eval_data && !s.eval_format) {
        ql_data_format ef;
        if ((rc = detect_format(s.eval_data, &ef))) rc = fail(rc);
        else snprintf(eval_fmt, sizeof eval_fmt, "%s", ql_data_format_name(ef)), s.eval_format = eval_fmt;
    } else if (!rc && s.eval_format) {
        ql_data_format ef;
        if (ql_data_format_parse(s.eval_format, &ef)) rc = usage_error("--eval-format %s: use alpaca, input-output, oasst1 or text", s.eval_format);
    }
    if (rc) {
        free_argv(targv, targc);
        goto out;
    }

    if (!resume) {
        /* a new study: a new folder, or an empty one */
        if (ql_path_exists(s.dir)) {
            DIR *d = opendir(s.dir);
            int empty = d != NULL;
            struct dirent *e;
            while (d && (e = readdir(d)))
                if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) empty = 0;
            if (d) closedir(d);
            if (!empty && ql_path_exists(s.json_path))
                rc = fail(ql_error(QL_EEXIST, "%s already holds a study: continue it with 'qlora study --output %s --resume', "
                                              "or choose another --output", s.dir, s.dir));
            else if (!empty)
                rc = fail(ql_error(QL_EEXIST, "%s exists and is not empty: a study needs a new or empty folder", s.dir));
        }
        if (!rc && (rc = ql_mkdir_p(s.dir))) rc = fail(rc);
    }
    int lock = rc ? 0 : lock_study(s.dir);
    if (!rc && lock < 0)
        rc = fail(ql_error(QL_EEXIST, lock == -2 ? "%s is in use by another qlora study" : "cannot lock %s", s.dir));
    if (rc) {
        free_argv(targv, targc);
        goto out;
    }
    if (!resume) {
        if ((rc = ql_output_mark(s.dir, "study"))) {
            free_argv(targv, targc);
            rc = fail(rc);
            goto out;
        }
        s.doc = json_object();
        json_t *cmd = json_array();
        json_array_append_new(cmd, json_string("qlora"));
        for (int i = 0; i < argc; i++) json_array_append_new(cmd, json_string(argv[i]));
        json_object_set_new(s.doc, "command", cmd);
        json_t *set = json_object(), *qs = json_array(), *ss = json_array(), *ta = json_array();
        for (size_t i = 0; i < s.n_specs; i++) json_array_append_new(qs, json_string(s.specs[i]));
        for (size_t i = 0; i < s.n_seeds; i++) json_array_append_new(ss, json_integer(s.seeds[i]));
        for (size_t i = 0; i < s.n_train_args; i++) json_array_append_new(ta, json_string(s.train_args[i]));
        json_object_set_new(set, "quantizers", qs);
        json_object_set_new(set, "seeds", ss);
        json_object_set_new(set, "train_args", ta);
        json_object_set_new(set, "model", json_string(o.model_dir));
        json_object_set_new(set, "data", json_string(o.data_path));
        json_object_set_new(set, "eval_data", s.eval_data ? json_string(s.eval_data) : json_null());
        json_object_set_new(set, "eval_format", s.eval_format ? json_string(s.eval_format) : json_null());
        json_object_set_new(set, "eval_dataset_size", jnum(s.eval_data ? 0 : o.eval_dataset_size));
        json_object_set_new(set, "max_eval_examples", json_integer(o.max_eval_examples));
        json_object_set_new(set, "mmlu", s.mmlu ? json_string(s.mmlu) : json_null());
        json_object_set_new(set, "shots", json_integer(s.shots));
        json_object_set_new(set, "mmlu_max_examples", json_integer(s.mmlu_max));
        json_object_set_new(set, "steps", json_integer(o.steps));
        json_object_set_new(set, "lora_r", json_integer(o.lora.r));
        json_object_set_new(set, "lr", jnum(o.lr));
        json_object_set_new(set, "batch_size", json_integer(o.batch_size));
        json_object_set_new(set, "grad_accum", json_integer(o.grad_accum));
        json_object_set_new(set, "device", json_string(o.device ? o.device : "cpu"));
        json_object_set_new(s.doc, "settings", set);
        json_object_set_new(s.doc, "data_format", json_string(data_format));
        json_object_set_new(s.doc, "runs", make_runs(&s));
        char now[32];
        time_t t = time(NULL);
        strftime(now, sizeof now, "%Y-%m-%dT%H:%M:%SZ", gmtime(&t));
        json_object_set_new(s.doc, "created", json_string(now));
        char cwd[4096];
        if (getcwd(cwd, sizeof cwd)) json_object_set_new(s.doc, "cwd", json_string(cwd));
    }
    free_argv(targv, targc);
    /* what this qlora is, each session (a resumed study may run on another) */
    struct utsname un;
    char host[400] = "unknown", abi[16];
    if (uname(&un) == 0) snprintf(host, sizeof host, "%s %s %s", un.sysname, un.release, un.machine);
    snprintf(abi, sizeof abi, "%d.%d", QL_QUANTIZER_ABI_MAJOR, QL_QUANTIZER_ABI_MINOR);
    json_t *sessions = json_object_get(s.doc, "sessions");
    if (!json_is_array(sessions)) json_object_set_new(s.doc, "sessions", sessions = json_array());
    json_array_append_new(sessions, json_pack("{s:s, s:s, s:s?, s:s, s:I, s:b}", "qlora", ql_version(), "quantizer_abi",
                                              abi, "plplot", study_plplot_version(), "host", host, "cpus",
                                              (json_int_t)sysconf(_SC_NPROCESSORS_ONLN), "resume", resume));
    json_object_set_new(s.doc, "qlora_version", json_string(ql_version()));
    json_object_set_new(s.doc, "quantizer_abi", json_string(abi));
    if ((rc = save_study(&s))) {
        rc = fail(rc);
        goto out;
    }

    struct sigaction sa, old_int, old_term;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    stop_signal = 0;
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    json_t *runs = json_object_get(s.doc, "runs"), *run;
    size_t n = json_array_size(runs), k;
    double t_start = now_s();
    int failed_now = 0;
    json_array_foreach(runs, k, run) {
        if (stop_signal) break;
        const char *st = jget_str(run, "status");
        if (!st || !strcmp(st, "done") || (!strcmp(st, "failed") && !retry)) continue;
        int done = 0, failed = 0, walls = 0, todo = 0;
        double wall_sum = 0;
        size_t j;
        json_t *r;
        json_array_foreach(runs, j, r) {
            const char *rs = jget_str(r, "status");
            done += !strcmp(rs, "done");
            failed += !strcmp(rs, "failed");
            if (!strcmp(rs, "done") && isfinite(jget_num(r, "wall_s"))) wall_sum += jget_num(r, "wall_s"), walls++;
            todo += strcmp(rs, "done") && (strcmp(rs, "failed") || retry);
        }
        progress_line(&s, k + 1, n, run, done, failed, now_s() - t_start, walls ? wall_sum / walls * todo : NAN);
        json_object_set_new(run, "status", json_string("running"));
        json_object_set_new(run, "attempts", json_integer(json_integer_value(json_object_get(run, "attempts")) + 1));
        json_object_del(run, "error");
        if ((rc = save_study(&s))) break;
        spawn_run(&s, run);
        failed_now += !strcmp(jget_str(run, "status"), "failed");
        end_line(&s, run);
        if ((rc = save_study(&s))) break;
    }
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    if (rc) {
        rc = fail(rc);
        goto out;
    }
    if ((rc = study_write_report(s.dir, s.doc))) {
        rc = fail(rc);
        goto out;
    }
    if (stop_signal) {
        fprintf(stderr,
                "qlora: study interrupted by %s: the finished runs are kept in %s/study.json; to go on, run: qlora study "
                "--output %s --resume\n",
                stop_signal == SIGINT ? "SIGINT" : "SIGTERM", s.dir, s.dir);
        rc = 128 + stop_signal;
        goto out;
    }
    print_summary(&s);
    printf("wrote %s/study.json and %s/report.md\n", s.dir, s.dir);
    int failed_all = 0;
    json_array_foreach(runs, k, run) failed_all += !strcmp(jget_str(run, "status"), "failed");
    if (failed_all) fprintf(stderr, "qlora: study: %d of %zu runs failed (report.md has their messages)\n", failed_all, n);
    (void)failed_now;
    rc = failed_all ? 1 : 0;
    goto out;
usage:
    rc = 2;
out:
    study_free(&s);
    return rc;
}
