/* qlora study, run as a separate process on stories260K with the bundled
 * alpaca data: what study.json holds, the report and its plots, resuming an
 * interrupted study, a failing run inside one, and how bad input is refused. */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "qlora/qlora.h"
#include "testutil.h"

/* ---- helpers ---- */

static char *join(const char *a, const char *b)
{
    char *p = ql_path_join(a, b);
    ck_assert_ptr_nonnull(p);
    return p;
}

static char *shared(const char *rel) { return join(tu_env("QLORA_SHARED"), rel); }

/* Run `qlora ARGS` (printf-style); stdout and stderr into *out / *err (caller frees). */
static int qlora(char **out, char **err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int qlora(char **out, char **err, const char *fmt, ...)
{
    char args[8192];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    ck_assert_int_lt(n, (int)sizeof args);
    char cmd[8400];
    snprintf(cmd, sizeof cmd, "timeout -k 5 500 '%s' %s", tu_env("QLORA_BIN"), args);
    char *o = NULL, *e = NULL;
    int status = tu_run(cmd, &o, &e);
    if (out) *out = o;
    else free(o);
    if (err) *err = e;
    else free(e);
    return status;
}

/* The tiny finetune every study here runs: a few steps of batch 2 on
 * alpaca_en_demo.json, 20 examples held out as the eval set */
static char *tiny_study_args(const char *quantizers, const char *seeds, int steps, const char *out, const char *extra)
{
    char *model = shared("models/stories260K"), *data = shared("data/alpaca/alpaca_en_demo.json");
    char *a = malloc(8192);
    snprintf(a, 8192,
             "study --model '%s' --data '%s' --format alpaca --quantizers '%s' --seeds %s --steps %d --grad-accum 1 "
             "--batch-size 2 --max-len 128 --lora-r 8 --lr 1e-3 --eval-dataset-size 20 --output '%s' %s",
             model, data, quantizers, seeds, steps, out, extra ? extra : "");
    free(model);
    free(data);
    return a;
}

static json_t *load_json(const char *path)
{
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    ck_assert_msg(j != NULL, "%s: %s", path, jerr.text);
    return j;
}

static json_t *load_study(const char *dir)
{
    char *p = join(dir, "study.json");
    json_t *j = load_json(p);
    free(p);
    return j;
}

static json_t *run_of(json_t *study, const char *id)
{
    size_t i;
    json_t *r;
    json_array_foreach(json_object_get(study, "runs"), i, r)
        if (!strcmp(json_string_value(json_object_get(r, "id")), id)) return r;
    ck_abort_msg("no run %s in study.json", id);
    return NULL;
}

static const char *sget(const json_t *o, const char *k)
{
    const char *s = json_string_value(json_object_get(o, k));
    return s ? s : "";
}

static double nget(const json_t *o, const char *path)
{
    const char *dot = strchr(path, '.');
    if (dot) {
        char head[64];
        snprintf(head, sizeof head, "%.*s", (int)(dot - path), path);
        return nget(json_object_get(o, head), dot + 1);
    }
    const json_t *v = json_object_get(o, path);
    ck_assert_msg(json_is_number(v), "%s is not a number", path);
    return json_number_value(v);
}

static char *slurp(const char *path, size_t *len)
{
    char *data;
    size_t l;
    int rc = ql_read_file(path, &data, &l);
    ck_assert_msg(rc == QL_OK, "%s", ql_error_message());
    if (len) *len = l;
    return data;
}

static void assert_png(const char *dir, const char *name)
{
    char *p = join(dir, name);
    size_t len;
    char *d = slurp(p, &len);
    ck_assert_msg(len > 2000 && !memcmp(d, "\x89PNG\r\n\x1a\n", 8), "%s is not a PNG of a plot (%zu bytes)", p, len);
    free(d);
    free(p);
}

static void remove_tree(char *dir)
{
    ql_remove_tree(dir);
    free(dir);
}

/* ---- a whole study ---- */

/* none, nf4 and int8 over two seeds: every figure in study.json, real and consistent */
START_TEST(test_study_figures)
{
    char *dir = strdup(tu_tmpdir()), *out_dir = join(dir, "s");
    char *args = tiny_study_args("none,nf4,int8", "0,1", 6, out_dir, "--quiet");
    char *out, *err;
    int st = qlora(&out, &err, "%s", args);
    ck_assert_msg(st == 0, "exit %d: %.600s", st, err);
    ck_assert_contains(out, "wrote ");
    json_t *s = load_study(out_dir);
    ck_assert_int_eq(json_array_size(json_object_get(s, "runs")), 6);
    /* the command and versions, for the report */
    ck_assert_str_eq(json_string_value(json_array_get(json_object_get(s, "command"), 1)), "study");
    ck_assert_str_eq(sget(s, "qlora_version"), ql_version());
    const char *ids[] = {"none-seed0", "nf4-seed0", "int8-seed0", "none-seed1", "nf4-seed1", "int8-seed1"};
    for (int i = 0; i < 6; i++) {
        json_t *r = run_of(s, ids[i]);
        ck_assert_msg(!strcmp(sget(r, "status"), "done"), "%s: %s %s", ids[i], sget(r, "status"), sget(r, "error"));
        ck_assert_str_eq(sget(r, "device"), "cpu");
        ck_assert_int_eq(json_integer_value(json_object_get(r, "attempts")), 1);
        /* finetuning lowers the eval NLL of every base */
        double before = nget(r, "before.nll"), after = nget(r, "after.nll");
        ck_assert_msg(after < before - 0.05, "%s: eval NLL %.4f after, %.4f before", ids[i], after, before);
        ck_assert_msg(before > 2 && before < 8, "%s: eval NLL before %.4f", ids[i], before);
        /* the study's eval of the adapter is train's own eval of the same held-out split */
        json_t *tel = json_object_get(r, "train_eval_loss");
        ck_assert_int_eq(json_array_size(tel), 1);
        double train_eval = json_number_value(json_array_get(json_array_get(tel, 0), 1));
        ck_assert_msg(fabs(train_eval - after) < 1e-4, "%s: train's eval loss %.6f, the study's %.6f", ids[i], train_eval,
                      after);
        ck_assert_int_eq(json_array_size(json_object_get(r, "loss_curve")), 6);
        ck_assert_double_gt(nget(r, "tokens_per_s"), 100);
        ck_assert_double_gt(nget(r, "peak_rss_bytes"), 1e6);
        ck_assert_double_gt(nget(r, "wall_s"), 0);
        ck_assert_double_le(nget(r, "train_s"), nget(r, "wall_s"));
        /* a normal run folder: the adapter, metrics, run_config */
        char *rd = join(out_dir, sget(r, "dir")), *ad = join(rd, "adapter_model.safetensors");
        ck_assert_msg(ql_path_exists(ad), "%s missing", ad);
        free(ad), free(rd);
    }
    /* bits per parameter: nf4 < int8 < none (the f32 checkpoint) */
    json_t *none = run_of(s, "none-seed0"), *nf4 = run_of(s, "nf4-seed0"), *int8 = run_of(s, "int8-seed0");
    ck_assert_double_eq_tol(nget(none, "quantization.matrix_bits_per_param"), 32.0, 1e-9);
    double b_nf4 = nget(nf4, "quantization.matrix_bits_per_param"), b_int8 = nget(int8, "quantization.matrix_bits_per_param");
    ck_assert_msg(b_nf4 > 4 && b_nf4 < b_int8 && b_int8 > 8 && b_int8 < 10, "matrix bits: nf4 %.3f, int8 %.3f", b_nf4, b_int8);
    ck_assert_double_lt(nget(nf4, "quantization.model_bytes"), nget(int8, "quantization.model_bytes"));
    ck_assert_double_lt(nget(int8, "quantization.model_bytes"), nget(none, "quantization.model_bytes"));
    /* reconstruction error: 4 bits err more than 8, none not at all; 35 block linears each */
    double e_nf4 = nget(nf4, "quantization.rel_error"), e_int8 = nget(int8, "quantization.rel_error");
    ck_assert_msg(e_nf4 > 0.03 && e_nf4 < 0.3 && e_int8 > 0 && e_int8 < e_nf4 / 4, "rel error nf4 %g int8 %g", e_nf4, e_int8);
    ck_assert_double_eq(nget(none, "quantization.rel_error"), 0);
    ck_assert_int_eq(json_array_size(json_object_get(json_object_get(nf4, "quantization"), "layers")), 35);
    /* the quantized base before finetuning: the same for every seed, worse at 4 bits than dense */
    ck_assert_double_eq(nget(nf4, "before.nll"), nget(run_of(s, "nf4-seed1"), "before.nll"));
    ck_assert_double_gt(nget(nf4, "before.nll"), nget(none, "before.nll"));
    /* the seed changes the finetune */
    ck_assert_double_ne(nget(nf4, "after.nll"), nget(run_of(s, "nf4-seed1"), "after.nll"));

    /* the report: its tables and plots; --report makes the same report.md from study.json */
    char *rp = join(out_dir, "report.md");
    char *report = slurp(rp, NULL);
    ck_assert_contains(report, "| `nf4` |");
    ck_assert_contains(report, "| nf4-seed1 | `nf4` | 1 | done | cpu |");
    ck_assert_contains(report, "qlora study --model");
    ck_assert_contains(report, "![Training loss of each quantizer](plots/loss.png)");
    ck_assert_contains(report, " ± ");
    char *plots = join(out_dir, "plots");
    assert_png(plots, "loss.png");
    assert_png(plots, "nll_vs_bits.png");
    assert_png(plots, "layer_error.png");
    free(out), free(err);
    ck_assert_int_eq(unlink(rp), 0);
    st = qlora(&out, &err, "study --output '%s' --report", out_dir);
    ck_assert_msg(st == 0, "--report: exit %d: %s", st, err);
    char *again = slurp(rp, NULL);
    ck_assert_msg(!strcmp(again, report), "--report made another report.md:\n%.300s\nnot:\n%.300s", again, report);
    free(again), free(report), free(rp), free(plots);
    free(out), free(err);
    json_decref(s);
    free(args);
    free(out_dir);
    remove_tree(dir);
}
END_TEST

/* --mmlu: the accuracy of the base before finetuning and with the run's
 * adapter after it, each what `qlora eval --mmlu` gives for the same model */
static double eval_mmlu(const char *extra)
{
    char *model = shared("models/stories260K"), *mmlu = shared("data/mmlu"), *out, *err;
    int st = qlora(&out, &err, "eval --model '%s' %s --mmlu '%s' --shots 0 --max-examples 2", model, extra, mmlu);
    ck_assert_msg(st == 0, "eval --mmlu: exit %d: %.600s", st, err);
    /* the JSON object is the last line */
    size_t n = strlen(out);
    while (n && out[n - 1] == '\n') out[--n] = '\0';
    const char *nl = strrchr(out, '\n'), *last = nl ? nl + 1 : out;
    ck_assert_msg(*last == '{', "eval --mmlu printed no JSON line last:\n%s", out);
    json_t *j = json_loads(last, JSON_DISABLE_EOF_CHECK, NULL);
    ck_assert_ptr_nonnull(j);
    double acc = nget(j, "accuracy");
    ck_assert_int_eq(json_integer_value(json_object_get(j, "questions")), 114);
    json_decref(j);
    free(out), free(err), free(model), free(mmlu);
    return acc;
}

START_TEST(test_study_mmlu)
{
    char *dir = strdup(tu_tmpdir()), *out_dir = join(dir, "s"), *mmlu = shared("data/mmlu");
    char extra[4400];
    snprintf(extra, sizeof extra, "--quiet --mmlu '%s' --shots 0 --mmlu-max-examples 2", mmlu);
    char *args = tiny_study_args("none", "0", 4, out_dir, extra);
    char *out, *err;
    int st = qlora(&out, &err, "%s", args);
    ck_assert_msg(st == 0, "exit %d: %.600s", st, err);
    json_t *s = load_study(out_dir);
    json_t *r = run_of(s, "none-seed0");
    ck_assert_msg(!strcmp(sget(r, "status"), "done"), "%s %s", sget(r, "status"), sget(r, "error"));
    double before = nget(r, "before.mmlu_accuracy"), after = nget(r, "after.mmlu_accuracy");
    ck_assert_double_eq_tol(before, eval_mmlu(""), 1e-9);
    char *rd = join(out_dir, sget(r, "dir")), adapter[4200];
    snprintf(adapter, sizeof adapter, "--adapter '%s'", rd);
    ck_assert_double_eq_tol(after, eval_mmlu(adapter), 1e-9);
    char *rp = join(out_dir, "report.md"), *report = slurp(rp, NULL);
    ck_assert_contains(report, " MMLU before | MMLU after |");
    free(report), free(rp), free(rd), free(out), free(err), free(args), free(mmlu);
    json_decref(s);
    free(out_dir);
    remove_tree(dir);
}
END_TEST

/* ---- resume ---- */

static int wait_for(const char *path, double seconds)
{
    for (double t = 0; t < seconds; t += 0.05) {
        if (ql_path_exists(path)) return 1;
        struct timespec ts = {0, 50000000};
        nanosleep(&ts, NULL);
    }
    return 0;
}

/* `qlora ARGS` started in the background; stderr into err_path */
static pid_t start_qlora(const char *args, const char *err_path)
{
    char cmd[8400];
    snprintf(cmd, sizeof cmd, "exec '%s' %s >/dev/null 2>'%s' </dev/null", tu_env("QLORA_BIN"), args, err_path);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    return pid;
}

/* Ctrl-C in the second run: the first stays as it is, --resume goes on from
 * the second's checkpoint and runs the third; nothing finished is redone */
START_TEST(test_study_resume_after_interrupt)
{
    char *dir = strdup(tu_tmpdir()), *out_dir = join(dir, "s"), *errp = join(dir, "err.txt");
    char *args = tiny_study_args("none,nf4,int8", "7", 60, out_dir, "--save-steps 5");
    pid_t pid = start_qlora(args, errp);
    /* the first run done, the second with a checkpoint */
    char *first = join(out_dir, "runs/none-seed7/adapter_model.safetensors");
    char *ckpt = join(out_dir, "runs/nf4-seed7/checkpoint-5/trainer_state.json");
    ck_assert_msg(wait_for(ckpt, 200), "no %s", ckpt);
    ck_assert_int_eq(kill(pid, SIGINT), 0);
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    char *err = slurp(errp, NULL);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 130, "status %d: %s", status, err);
    char want[4300];
    snprintf(want, sizeof want, "qlora study --output %s --resume", out_dir);
    ck_assert_contains(err, want);
    free(err);
    json_t *s = load_study(out_dir);
    ck_assert_str_eq(sget(run_of(s, "none-seed7"), "status"), "done");
    ck_assert_str_eq(sget(run_of(s, "nf4-seed7"), "status"), "interrupted");
    ck_assert_str_eq(sget(run_of(s, "int8-seed7"), "status"), "pending");
    ck_assert_contains(sget(run_of(s, "nf4-seed7"), "error"), "--resume' goes on from there");
    double none_after = nget(run_of(s, "none-seed7"), "after.nll");
    json_decref(s);
    struct stat before;
    ck_assert_int_eq(stat(first, &before), 0);

    char *out;
    int st = qlora(&out, &err, "study --output '%s' --resume --quiet", out_dir);
    ck_assert_msg(st == 0, "--resume: exit %d: %s", st, err);
    s = load_study(out_dir);
    json_t *none = run_of(s, "none-seed7"), *nf4 = run_of(s, "nf4-seed7"), *int8 = run_of(s, "int8-seed7");
    /* the finished run is not redone: one attempt, the same figures, its adapter untouched */
    ck_assert_int_eq(json_integer_value(json_object_get(none, "attempts")), 1);
    ck_assert_double_eq(nget(none, "after.nll"), none_after);
    struct stat after;
    ck_assert_int_eq(stat(first, &after), 0);
    ck_assert(after.st_mtim.tv_sec == before.st_mtim.tv_sec && after.st_mtim.tv_nsec == before.st_mtim.tv_nsec);
    /* the interrupted one went on from its last checkpoint, to all its steps */
    ck_assert_str_eq(sget(nf4, "status"), "done");
    ck_assert_int_eq(json_integer_value(json_object_get(nf4, "attempts")), 2);
    ck_assert_msg(!strncmp(sget(nf4, "resumed_from"), "checkpoint-", 11), "resumed_from: %s", sget(nf4, "resumed_from"));
    ck_assert_int_eq(json_array_size(json_object_get(nf4, "loss_curve")), 60);
    ck_assert_double_lt(nget(nf4, "after.nll"), nget(nf4, "before.nll"));
    ck_assert_str_eq(sget(int8, "status"), "done");
    ck_assert_int_eq(json_integer_value(json_object_get(int8, "attempts")), 1);
    json_t *sessions = json_object_get(s, "sessions");
    ck_assert_int_eq(json_array_size(sessions), 2);
    ck_assert(json_is_true(json_object_get(json_array_get(sessions, 1), "resume")));
    json_decref(s);
    free(out), free(err);
    /* nothing left to do: a second --resume runs nothing */
    st = qlora(&out, &err, "study --output '%s' --resume --quiet", out_dir);
    ck_assert_msg(st == 0, "second --resume: exit %d: %s", st, err);
    s = load_study(out_dir);
    ck_assert_int_eq(json_integer_value(json_object_get(run_of(s, "int8-seed7"), "attempts")), 1);
    json_decref(s);
    free(out), free(err);
    free(first), free(ckpt), free(args), free(errp), free(out_dir);
    remove_tree(dir);
}
END_TEST

/* ---- failing runs ---- */

/* A run whose quantizer fails, one whose loss turns NaN: each recorded as
 * failed with its message, and the study goes on to the next */
START_TEST(test_study_failing_runs)
{
    char *dir = strdup(tu_tmpdir()), *out_dir = join(dir, "s");
    char *bad = join(tu_env("QLORA_TEST_PLUGINS"), "qlora_bad_failquant.so");
    char list[4200];
    snprintf(list, sizeof list, "int8,%s,none", bad);
    char *args = tiny_study_args(list, "3", 3, out_dir, "--quiet");
    char *out, *err;
    int st = qlora(&out, &err, "%s", args);
    ck_assert_msg(st == 1, "exit %d, not 1: %s", st, err);
    ck_assert_contains(err, "1 of 3 runs failed");
    json_t *s = load_study(out_dir);
    json_t *f = run_of(s, "bad_failquant-seed3");
    ck_assert_str_eq(sget(f, "status"), "failed");
    ck_assert_contains(sget(f, "error"), "planned failure on call 3");
    ck_assert_str_eq(sget(run_of(s, "int8-seed3"), "status"), "done");
    ck_assert_str_eq(sget(run_of(s, "none-seed3"), "status"), "done");
    char *rp = join(out_dir, "report.md");
    char *report = slurp(rp, NULL);
    ck_assert_contains(report, "- bad_failquant-seed3 (failed): ");
    ck_assert_contains(report, "planned failure on call 3");
    free(report), free(rp);
    json_decref(s);
    free(out), free(err), free(args);
    /* a --resume does not redo the failed run; --retry-failed does (and it fails again) */
    st = qlora(&out, &err, "study --output '%s' --resume --quiet", out_dir);
    ck_assert_msg(st == 1, "--resume: exit %d: %s", st, err);
    s = load_study(out_dir);
    ck_assert_int_eq(json_integer_value(json_object_get(run_of(s, "bad_failquant-seed3"), "attempts")), 1);
    json_decref(s);
    free(out), free(err);
    st = qlora(&out, &err, "study --output '%s' --resume --retry-failed --quiet", out_dir);
    ck_assert_msg(st == 1, "--retry-failed: exit %d: %s", st, err);
    s = load_study(out_dir);
    ck_assert_int_eq(json_integer_value(json_object_get(run_of(s, "bad_failquant-seed3"), "attempts")), 2);
    ck_assert_int_eq(json_integer_value(json_object_get(run_of(s, "int8-seed3"), "attempts")), 1);
    json_decref(s);
    free(out), free(err);

    /* a learning rate that overflows the weights: NaN loss */
    char *out2 = join(dir, "nan");
    args = tiny_study_args("nf4", "0", 5, out2, "--quiet --lr 1e30 --max-grad-norm 0");
    st = qlora(&out, &err, "%s", args);
    ck_assert_msg(st == 1, "exit %d, not 1: %s", st, err);
    s = load_study(out2);
    f = run_of(s, "nf4-seed0");
    ck_assert_str_eq(sget(f, "status"), "failed");
    ck_assert_contains(sget(f, "error"), "loss is NaN");
    json_decref(s);
    free(out), free(err), free(args), free(out2);
    free(bad), free(out_dir);
    remove_tree(dir);
}
END_TEST

/* ---- bad input ---- */

/* An unknown quantizer among many: refused by name before anything is written */
START_TEST(test_study_unknown_quantizer)
{
    char *dir = strdup(tu_tmpdir()), *out_dir = join(dir, "s");
    char *args = tiny_study_args("none,nf4,no_such_q,int8", "0", 3, out_dir, NULL);
    char *out, *err;
    int st = qlora(&out, &err, "%s", args);
    ck_assert_int_eq(st, 2);
    ck_assert_contains(err, "qlora: error: study: quantizer no_such_q (3 of 4 in --quantizers): unknown quantizer 'no_such_q'");
    ck_assert_contains(err, "no run was started");
    ck_assert_msg(!ql_path_exists(out_dir), "%s was made", out_dir);
    free(out), free(err), free(args), free(out_dir);
    remove_tree(dir);
}
END_TEST

/* `qlora ARGS` fails with `code` and a stderr whose last line holds `want` */
static void assert_refused(int code, const char *want, const char *args)
{
    char *out, *err;
    int st = qlora(&out, &err, "%s", args);
    size_t el = strlen(err);
    ck_assert_msg(st == code, "qlora %s: exit %d, not %d: %s", args, st, code, el > 600 ? err + el - 600 : err);
    const char *last = err;
    for (const char *p = err; *p; p++)
        if (*p == '\n' && p[1]) last = p + 1;
    ck_assert_msg(strstr(last, want), "qlora %s:\nwanted: %s\ngot:    %.600s", args, want, last);
    ck_assert_msg(!out[0], "qlora %s printed on stdout: %.300s", args, out);
    free(out), free(err);
}

START_TEST(test_study_bad_input)
{
    char *dir = strdup(tu_tmpdir()), *out_dir = join(dir, "s");
    char *model = shared("models/stories260K"), *data = shared("data/alpaca/alpaca_en_demo.json");
    char a[8192];
    assert_refused(2, "qlora: study: --output STUDY_DIR is required (see 'qlora study --help')", "study --model x");
    snprintf(a, sizeof a, "study --model '%s' --data '%s' --steps 2 --output '%s'", model, data, out_dir);
    assert_refused(2, "give --eval-data FILE or --eval-dataset-size N", a);
    snprintf(a, sizeof a, "study --data '%s' --eval-dataset-size 5 --output '%s'", data, out_dir);
    assert_refused(2, "qlora: study: --model DIR is required", a);
    snprintf(a, sizeof a, "study --model '%s' --data '%s' --eval-dataset-size 5 --seeds 1,x --output '%s'", model, data, out_dir);
    assert_refused(2, "--seeds=x: expected an integer", a);
    snprintf(a, sizeof a, "study --model '%s' --data '%s' --eval-dataset-size 5 --seeds 1,1 --output '%s'", model, data, out_dir);
    assert_refused(2, "--seeds: 1 is listed twice", a);
    snprintf(a, sizeof a, "study --model '%s' --data '%s' --eval-dataset-size 5 -q nf4,int8,nf4 --output '%s'", model, data,
             out_dir);
    assert_refused(2, "--quantizers: nf4 is listed twice", a);
    snprintf(a, sizeof a, "study --model '%s' --data '%s' --eval-dataset-size 5 --lr abc --output '%s'", model, data, out_dir);
    assert_refused(2, "qlora: study: --lr=abc: expected a number", a);
    snprintf(a, sizeof a, "study --model '%s' --data '%s' --eval-data /no/such.txt --output '%s'", model, data, out_dir);
    assert_refused(6, "--eval-data /no/such.txt: no such file", a);
    snprintf(a, sizeof a, "study --model '%s' --data '%s' --eval-dataset-size 5 --force --output '%s'", model, data, out_dir);
    assert_refused(2, "unknown option '--force'", a);
    ck_assert_msg(!ql_path_exists(out_dir), "%s was made by a refused study", out_dir);
    /* --resume and --report need a study there, and take no settings */
    snprintf(a, sizeof a, "study --output '%s' --resume", out_dir);
    assert_refused(6, "holds no study (no study.json)", a);
    snprintf(a, sizeof a, "study --output '%s' --report", out_dir);
    assert_refused(6, "holds no study (no study.json)", a);
    snprintf(a, sizeof a, "study --output '%s' --resume --steps 3", out_dir);
    assert_refused(2, "--resume takes only --output (and --quiet)", a);
    snprintf(a, sizeof a, "study --output '%s' --resume --report", out_dir);
    assert_refused(2, "give --resume or --report, not both", a);
    /* a folder that is not empty is not a new study's */
    ck_assert_int_eq(mkdir(out_dir, 0755), 0);
    char *keep = join(out_dir, "mine.txt");
    ck_assert_int_eq(ql_write_file_atomic(keep, "x", 1), QL_OK);
    snprintf(a, sizeof a, "study --model '%s' --data '%s' --eval-dataset-size 5 --output '%s'", model, data, out_dir);
    assert_refused(9, "exists and is not empty: a study needs a new or empty folder", a);
    ck_assert(ql_path_exists(keep));
    free(keep);
    free(model), free(data), free(out_dir);
    remove_tree(dir);
}
END_TEST

static Suite *study_suite(void)
{
    Suite *s = suite_create("study");
    TCase *tc = tcase_create("study");
    tcase_set_timeout(tc, 600); /* each; a loaded machine under ASan is slow */
    tcase_add_test(tc, test_study_unknown_quantizer);
    tcase_add_test(tc, test_study_bad_input);
    tcase_add_test(tc, test_study_figures);
    tcase_add_test(tc, test_study_mmlu);
    tcase_add_test(tc, test_study_failing_runs);
    tcase_add_test(tc, test_study_resume_after_interrupt);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(study_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
