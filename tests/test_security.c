/* What qlora trusts (docs/security.md): no file it reads (a model's
 * config.json, a run's run_config.json, a checkpoint) ever makes it load
 * code; a plugin is loaded by path only from the command line; quantizer
 * specs are refused, never cut short, when too long; and one plugin that
 * crashes, exits or hangs does not take `qlora quantizers` down.
 *
 * The "code" is tests/bad_plugin.c built with -DBAD_MARKER: a working plugin
 * named "marker" whose constructor appends to the file $QLORA_TEST_MARKER
 * names, so a test sees whether it was ever loaded. */
#include <check.h>
#include <dlfcn.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "qlora/qlora.h"
#include "testutil.h"

static char tmp[512], work[600], marker[600], evil[1024], model[1024], data[700];

static void setup(void)
{
    snprintf(tmp, sizeof tmp, "%s", tu_tmpdir());
    snprintf(work, sizeof work, "%s/work", tmp);
    snprintf(marker, sizeof marker, "%s/loaded.txt", tmp);
    snprintf(evil, sizeof evil, "%s/qlora_bad_marker.so", tu_env("QLORA_TEST_PLUGINS"));
    ck_assert_msg(ql_path_exists(evil), "%s was not built", evil);
    snprintf(model, sizeof model, "%s/models/stories260K", tu_env("QLORA_SHARED"));
    ck_assert_int_eq(setenv("QLORA_TEST_MARKER", marker, 1), 0);
    /* a working folder with the plugin under other names, for relative paths */
    char sub[700], link[700];
    snprintf(sub, sizeof sub, "%s/sub", work);
    ck_assert_int_eq(ql_mkdir_p(sub), QL_OK);
    snprintf(link, sizeof link, "%s/evil.so", work);
    ck_assert_int_eq(symlink(evil, link), 0);
    snprintf(link, sizeof link, "%s/evil", work);
    ck_assert_int_eq(symlink(evil, link), 0);
    snprintf(data, sizeof data, "%s/data.json", tmp);
    FILE *f = fopen(data, "w");
    ck_assert_ptr_nonnull(f);
    fputs("[", f);
    for (int i = 0; i < 4; i++)
        fprintf(f, "%s{\"instruction\": \"Tell a story about cat %d.\", \"input\": \"\", \"output\": \"Once upon a time "
                   "there was a cat.\"}",
                i ? ", " : "", i);
    fputs("]\n", f);
    fclose(f);
}

static void teardown(void) { ql_remove_tree(tmp); }

/* Run `qlora ARGS` (printf-style) in the folder `work`; stdout and stderr
 * into *out / *err (caller frees; NULL drops them). */
static int qlora(char **out, char **err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int qlora(char **out, char **err, const char *fmt, ...)
{
    char args[8192];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    ck_assert_int_lt(n, (int)sizeof args);
    char cmd[9000];
    snprintf(cmd, sizeof cmd, "cd '%s' && OMP_NUM_THREADS=2 '%s' %s", work, tu_env("QLORA_BIN"), args);
    char *o = NULL, *e = NULL;
    int status = tu_run(cmd, &o, &e);
    if (out) *out = o;
    else free(o);
    if (err) *err = e;
    else free(e);
    return status;
}

static void assert_not_loaded(const char *what)
{
    ck_assert_msg(!ql_path_exists(marker), "%s: the plugin's code ran (%s was written)", what, marker);
}

/* `value` with "@" replaced by the plugin's absolute path. */
static void expand(const char *value, char *buf, size_t cap)
{
    const char *at = strchr(value, '@');
    if (at) snprintf(buf, cap, "%.*s%s%s", (int)(at - value), value, evil, at + 1);
    else snprintf(buf, cap, "%s", value);
}

/* A copy of stories260K (links to its files) whose config.json has this
 * quantization_config. */
static void make_model(const char *dir, json_t *qc)
{
    ck_assert_int_eq(ql_mkdir_p(dir), QL_OK);
    const char *files[] = {"model.safetensors", "tokenizer.json", "tokenizer_config.json"};
    for (size_t i = 0; i < 3; i++) {
        char from[1200], to[1200];
        snprintf(from, sizeof from, "%s/%s", model, files[i]);
        snprintf(to, sizeof to, "%s/%s", dir, files[i]);
        ck_assert_int_eq(symlink(from, to), 0);
    }
    char path[1200];
    snprintf(path, sizeof path, "%s/config.json", model);
    json_t *cfg = json_load_file(path, 0, NULL);
    ck_assert_ptr_nonnull(cfg);
    json_object_set_new(cfg, "quantization_config", qc);
    snprintf(path, sizeof path, "%s/config.json", dir);
    ck_assert_int_eq(json_dump_file(cfg, path, JSON_INDENT(2)), 0);
    json_decref(cfg);
}

static void write_json(const char *path, json_t *j)
{
    ck_assert_int_eq(json_dump_file(j, path, JSON_INDENT(2)), 0);
    json_decref(j);
}

/* ---- 1. a model's config.json never loads code ---- */

static const struct {
    const char *what;
    const char *value; /* "@" is the plugin's absolute path; others are relative to `work` */
    int bnb;           /* in bnb_4bit_quant_type rather than quantization_config.quantizer */
} config_cases[] = {
    {"absolute path", "@", 0},
    {"absolute path with options", "@:x=1", 0},
    {"relative path", "./evil.so", 0},
    {"relative path without .so", "./evil", 0},
    {"path through ..", "sub/../evil.so", 0},
    {"path up and back", "../work/evil.so", 0},
    {"bare file name", "qlora_bad_marker.so", 0},
    {"dot-dot name", "..", 0},
    {"bnb_4bit_quant_type absolute path", "@", 1},
    {"bnb_4bit_quant_type relative path", "./evil.so", 1},
};

START_TEST(config_json_never_loads_code)
{
    char value[1200], dir[700], cfg_path[800];
    expand(config_cases[_i].value, value, sizeof value);
    snprintf(dir, sizeof dir, "%s/model", tmp);
    snprintf(cfg_path, sizeof cfg_path, "%s/config.json", dir);
    const char *field = config_cases[_i].bnb ? "quantization_config.bnb_4bit_quant_type" : "quantization_config.quantizer";
    make_model(dir, config_cases[_i].bnb ? json_pack("{s:s, s:b, s:s}", "quant_method", "bitsandbytes", "load_in_4bit", 1,
                                                     "bnb_4bit_quant_type", value)
                                         : json_pack("{s:s, s:s}", "quant_method", "qlora", "quantizer", value));
    const char *commands[] = {
        "eval --model '%s' --data '%s' --format alpaca --quiet",
        "generate --model '%s' --prompt 'Once upon a time' --max-new-tokens 2",
    };
    for (size_t c = 0; c < 2; c++) {
        char *err;
        int st = qlora(NULL, &err, c == 0 ? commands[0] : commands[1], dir, data);
        ck_assert_msg(st != 0, "%s, %s: exit 0: %s", config_cases[_i].what, commands[c], err);
        assert_not_loaded(config_cases[_i].what);
        ck_assert_contains(err, cfg_path);
        ck_assert_contains(err, field);
        ck_assert_contains(err, "--quantizer=PATH");
        free(err);
    }
}
END_TEST

/* train and merge read the same config.json; nothing is created either */
START_TEST(train_and_merge_refuse_a_path_in_config_json)
{
    char dir[700], cfg_path[800], run[700], merged[700], adapter[700], *err;
    snprintf(dir, sizeof dir, "%s/model", tmp);
    snprintf(cfg_path, sizeof cfg_path, "%s/config.json", dir);
    snprintf(run, sizeof run, "%s/run", tmp);
    snprintf(merged, sizeof merged, "%s/merged", tmp);
    snprintf(adapter, sizeof adapter, "%s/adapter", tmp);
    ck_assert_int_eq(ql_mkdir_p(adapter), QL_OK);
    make_model(dir, json_pack("{s:s, s:s}", "quant_method", "qlora", "quantizer", evil));
    int st = qlora(NULL, &err, "train --model '%s' --data '%s' --format alpaca --steps 1 --output '%s' --quiet", dir, data,
                   run);
    ck_assert_msg(st != 0, "train: exit 0: %s", err);
    assert_not_loaded("train");
    ck_assert_contains(err, cfg_path);
    ck_assert_contains(err, "quantization_config.quantizer");
    ck_assert(!ql_path_exists(run));
    free(err);
    st = qlora(NULL, &err, "merge --model '%s' --adapter '%s' -o '%s'", dir, adapter, merged);
    ck_assert_msg(st != 0, "merge: exit 0: %s", err);
    assert_not_loaded("merge");
    ck_assert_contains(err, cfg_path);
    ck_assert_contains(err, "quantization_config.quantizer");
    ck_assert(!ql_path_exists(merged));
    free(err);
}
END_TEST

/* ---- a run folder's or adapter's run_config.json never loads code ---- */

static const char *const run_config_cases[] = {
    "@", "@:x=1", "./evil.so", "./evil", "sub/../evil.so", "../work/evil.so", "nf4:x=/etc/evil.so", "NF4", "",
};

START_TEST(run_config_never_loads_code)
{
    char value[1200], adapter[700], rc_path[800], merged[700];
    expand(run_config_cases[_i], value, sizeof value);
    snprintf(adapter, sizeof adapter, "%s/adapter", tmp);
    snprintf(rc_path, sizeof rc_path, "%s/run_config.json", adapter);
    snprintf(merged, sizeof merged, "%s/merged", tmp);
    ck_assert_int_eq(ql_mkdir_p(adapter), QL_OK);
    write_json(rc_path, json_pack("{s:s, s:i}", "quantizer", value, "lora_r", 4));
    const char *commands[] = {
        "eval --model '%s' --adapter '%s' --data '%s' --format alpaca --quiet",
        "generate --model '%s' --adapter '%s' --prompt 'Once upon a time' --max-new-tokens 2",
        "merge --model '%s' --adapter '%s' -o '%s'",
    };
    for (size_t c = 0; c < 3; c++) {
        char *err;
        int st = c == 0   ? qlora(NULL, &err, "eval --model '%s' --adapter '%s' --data '%s' --format alpaca --quiet", model,
                                  adapter, data)
                 : c == 1 ? qlora(NULL, &err,
                                  "generate --model '%s' --adapter '%s' --prompt 'Once upon a time' --max-new-tokens 2",
                                  model, adapter)
                          : qlora(NULL, &err, "merge --model '%s' --adapter '%s' -o '%s'", model, adapter, merged);
        ck_assert_msg(st != 0, "'%s', %s: exit 0: %s", value, commands[c], err);
        assert_not_loaded(commands[c]);
        ck_assert_contains(err, rc_path);
        ck_assert_contains(err, "quantizer");
        ck_assert_contains(err, "--quantizer=PATH");
        free(err);
    }
    ck_assert(!ql_path_exists(merged));
}
END_TEST

/* A real run and checkpoint whose run_config.json and trainer_state.json
 * name the plugin's path: --resume compares them, it never loads them. */
START_TEST(resume_never_loads_code)
{
    char run[700], ckpt[800], path[900], *err;
    snprintf(run, sizeof run, "%s/run", tmp);
    snprintf(ckpt, sizeof ckpt, "%s/checkpoint-1", run);
#define TRAIN "train --model '%s' --data '%s' --format alpaca --lora-r 2 --batch-size 1 --grad-accum 1 --quiet"
    int st = qlora(NULL, &err, TRAIN " --steps 2 --save-steps 1 --output '%s'", model, data, run);
    ck_assert_msg(st == 0, "train: exit %d: %s", st, err);
    free(err);
    ck_assert_msg(ql_is_dir(ckpt), "no %s", ckpt);
    snprintf(path, sizeof path, "%s/run_config.json", run);
    json_t *rc = json_load_file(path, 0, NULL);
    ck_assert_ptr_nonnull(rc);
    json_object_set_new(rc, "quantizer", json_string(evil));
    write_json(path, rc);
    snprintf(path, sizeof path, "%s/trainer_state.json", ckpt);
    json_t *ts = json_load_file(path, 0, NULL);
    ck_assert_ptr_nonnull(ts);
    ck_assert(json_is_object(json_object_get(ts, "config")));
    json_object_set_new(json_object_get(ts, "config"), "quantizer", json_string(evil));
    write_json(path, ts);
    st = qlora(NULL, &err, TRAIN " --steps 2 --resume '%s'", model, data, ckpt);
    ck_assert_msg(st != 0, "resume: exit 0: %s", err);
    assert_not_loaded("train --resume");
    ck_assert_contains(err, "quantizer");
    free(err);
    /* the run's adapter folder, used by eval, names the path too */
    st = qlora(NULL, &err, "eval --model '%s' --adapter '%s' --data '%s' --format alpaca --quiet", model, run, data);
    ck_assert_msg(st != 0, "eval --adapter: exit 0: %s", err);
    assert_not_loaded("eval --adapter RUN");
    snprintf(path, sizeof path, "%s/run_config.json", run);
    ck_assert_contains(err, path);
    free(err);
    /* and resuming over a model whose config.json names it */
    char dir[700];
    snprintf(dir, sizeof dir, "%s/model", tmp);
    make_model(dir, json_pack("{s:s, s:s}", "quant_method", "qlora", "quantizer", evil));
    st = qlora(NULL, &err, TRAIN " --steps 2 --resume '%s'", dir, data, ckpt);
    ck_assert_msg(st != 0, "resume over the model: exit 0: %s", err);
    assert_not_loaded("train --resume, model config");
    ck_assert_contains(err, "quantization_config.quantizer");
    free(err);
#undef TRAIN
}
END_TEST

/* inspect scans the plugin search path; a path next to the file is no plugin */
START_TEST(inspect_never_loads_code)
{
    char dir[700], file[800], *out, *err;
    snprintf(dir, sizeof dir, "%s/model", tmp);
    make_model(dir, json_pack("{s:s, s:s}", "quant_method", "qlora", "quantizer", evil));
    snprintf(file, sizeof file, "%s/model.safetensors", dir);
    int st = qlora(&out, &err, "inspect '%s'", file);
    ck_assert_msg(st == 0, "inspect: exit %d: %s", st, err);
    assert_not_loaded("inspect");
    free(out);
    free(err);
}
END_TEST

/* ---- what the command line may do ---- */

static json_t *last_json(const char *out)
{
    const char *last = strrchr(out, '{');
    ck_assert_msg(last != NULL, "no JSON in: %s", out);
    json_t *j = json_loads(last, 0, NULL);
    ck_assert_msg(j != NULL, "not JSON: %s", last);
    return j;
}

START_TEST(command_line_path_is_trusted_and_matched)
{
    char *out, *err, q[700], cfg_path[800];
    /* the control: a path on the command line is loaded (so the marker works) */
    int st = qlora(&out, &err, "eval --model '%s' '--quantizer=%s' --data '%s' --format alpaca --quiet", model, evil, data);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_msg(ql_path_exists(marker), "the plugin given by path was not loaded");
    free(out);
    free(err);
    unlink(marker);

    /* quantize with it by path: the checkpoint names the plugin, not the path it gave */
    snprintf(q, sizeof q, "%s/quantized", tmp);
    snprintf(cfg_path, sizeof cfg_path, "%s/config.json", q);
    st = qlora(&out, &err, "quantize --quiet '--quantizer=%s' '%s' -o '%s'", evil, model, q);
    ck_assert_msg(st == 0, "quantize: exit %d: %s", st, err);
    free(out);
    free(err);
    unlink(marker);
    json_t *cfg = json_load_file(cfg_path, 0, NULL);
    ck_assert_ptr_nonnull(cfg);
    json_t *qc = json_object_get(cfg, "quantization_config");
    ck_assert_str_eq(json_string_value(json_object_get(qc, "quant_method")), "qlora");
    ck_assert_str_eq(json_string_value(json_object_get(qc, "quantizer")), "marker");

    /* by name, it is looked for on the search path only */
    st = qlora(&out, &err, "eval --model '%s' --data '%s' --format alpaca --quiet", q, data);
    ck_assert_msg(st != 0, "exit 0: %s", err);
    assert_not_loaded("eval of a checkpoint naming an uninstalled plugin");
    ck_assert_contains(err, "unknown quantizer 'marker'");
    ck_assert_contains(err, cfg_path);
    free(out);
    free(err);

    /* the user's --quantizer=PATH with that plugin name is used, without a warning */
    st = qlora(&out, &err, "eval --model '%s' '--quantizer=%s' --data '%s' --format alpaca --quiet", q, evil, data);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_msg(!tu_contains(err, "warning"), "%s", err);
    json_t *res = last_json(out);
    ck_assert_str_eq(json_string_value(json_object_get(res, "quantizer")), "marker");
    json_decref(res);
    free(out);
    free(err);
    unlink(marker);

    /* installed in a folder of the search path, the name loads */
    char plugins[700], link[800];
    snprintf(plugins, sizeof plugins, "%s/plugins", tmp);
    snprintf(link, sizeof link, "%s/qlora_marker.so", plugins);
    ck_assert_int_eq(ql_mkdir_p(plugins), QL_OK);
    ck_assert_int_eq(symlink(evil, link), 0);
    char cmd[4000];
    snprintf(cmd, sizeof cmd, "eval --model '%s' --data '%s' --format alpaca --quiet", q, data);
    char envcmd[9000];
    snprintf(envcmd, sizeof envcmd, "cd '%s' && QLORA_PLUGIN_PATH='%s' '%s' %s", work, plugins, tu_env("QLORA_BIN"), cmd);
    st = tu_run(envcmd, &out, &err);
    ck_assert_msg(st == 0, "from the search path: exit %d: %s", st, err);
    ck_assert_msg(ql_path_exists(marker), "the plugin on the search path was not loaded");
    free(out);
    free(err);
    unlink(marker);

    /* the checkpoint names the very file by path: refused alone, used when the
     * command line gives that file */
    json_object_set_new(qc, "quantizer", json_string(evil));
    write_json(cfg_path, cfg);
    st = qlora(&out, &err, "eval --model '%s' --data '%s' --format alpaca --quiet", q, data);
    ck_assert_msg(st != 0, "exit 0: %s", err);
    assert_not_loaded("eval of a checkpoint naming a path");
    ck_assert_contains(err, cfg_path);
    ck_assert_contains(err, "--quantizer=PATH");
    free(out);
    free(err);
    st = qlora(&out, &err, "eval --model '%s' '--quantizer=%s' --data '%s' --format alpaca --quiet", q, evil, data);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_msg(!tu_contains(err, "warning"), "%s", err);
    free(out);
    free(err);
    /* a different plugin on the command line does not unlock the path */
    unlink(marker);
    st = qlora(&out, &err, "eval --model '%s' --quantizer=nf4 --data '%s' --format alpaca --quiet", q, data);
    ck_assert_msg(st != 0, "exit 0: %s", err);
    assert_not_loaded("eval --quantizer=nf4 of a checkpoint naming a path");
    ck_assert_contains(err, "--quantizer=PATH");
    free(out);
    free(err);
}
END_TEST

/* ---- the library's two entry points ---- */

START_TEST(open_from_file_takes_names_only)
{
    ql_qz *q = NULL;
    ck_assert_int_eq(ql_qz_open_from_file(evil, "some/config.json", "quantization_config.quantizer", &q), QL_EINVAL);
    ck_assert_ptr_null(q);
    assert_not_loaded("ql_qz_open_from_file");
    ck_assert_contains(ql_error_message(), "some/config.json: quantization_config.quantizer is '");
    ck_assert_contains(ql_error_message(), "a path");
    ck_assert_contains(ql_error_message(), "--quantizer=PATH");
    /* control characters in the value are shown escaped */
    ck_assert_int_eq(ql_qz_open_from_file("nf4\x1b[2J", "f.json", "quantizer", &q), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "nf4\\x1b[2J");
    ck_assert_int_eq(ql_qz_open_from_file("nf4:blocksize=/x", "f.json", "quantizer", &q), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "key=value");
    ck_assert_int_eq(ql_qz_open_from_file(NULL, "f.json", "quantizer", &q), QL_EFORMAT);
    ck_assert_contains(ql_error_message(), "f.json: quantizer is not a string");
    /* names, with options, work */
    ck_assert_int_eq(ql_qz_open_from_file("nf4:blocksize=128,double_quant=0", "f.json", "quantizer", &q), QL_OK);
    ck_assert_str_eq(q->options, "blocksize=128,double_quant=0");
    ql_qz_close(q);
    /* an unknown name says which file named it */
    ck_assert_int_eq(ql_qz_open_from_file("nosuch", "f.json", "quantizer", &q), QL_ENOTFOUND);
    ck_assert_contains(ql_error_message(), "f.json: quantizer");
    ck_assert_contains(ql_error_message(), "unknown quantizer 'nosuch'");
    /* the command line's entry point still takes a path */
    ck_assert_int_eq(ql_qz_open(evil, &q), QL_OK);
    ck_assert_str_eq(q->desc->name, "marker");
    ck_assert(ql_path_exists(marker));
    ck_assert(ql_qz_matches(q, "marker"));
    ck_assert(ql_qz_matches(q, "marker:x=1"));
    ck_assert(ql_qz_matches(q, evil));
    ck_assert(ql_qz_matches(q, "/elsewhere/qlora_marker.so"));
    ck_assert(!ql_qz_matches(q, "nf4"));
    ck_assert(!ql_qz_matches(q, "/elsewhere/qlora_nf4.so"));
    ql_qz_close(q);
}
END_TEST

/* ---- 2. over-long specs are refused, never cut short ---- */

START_TEST(long_specs_are_refused_not_truncated)
{
    /* strtok skips empty options, so these commas are harmless padding: the
     * old 512-byte copy cut the spec inside them and dropped blocksize=128 */
    char spec[1200];
    int k = snprintf(spec, sizeof spec, "nf4:double_quant=0");
    while (k < 600) spec[k++] = ',';
    snprintf(spec + k, sizeof spec - (size_t)k, "blocksize=128");
    ql_qz *q = NULL;
    ck_assert_int_eq(ql_qz_open(spec, &q), QL_EINVAL);
    ck_assert_ptr_null(q);
    ck_assert_contains(ql_error_message(), "longer than the 511 allowed");
    ck_assert_int_eq(ql_qz_open_from_file(spec, "f.json", "quantizer", &q), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "longer than the 511");

    /* 511 characters exactly is fine, and keeps its tail */
    k = snprintf(spec, sizeof spec, "nf4:double_quant=0");
    while (k < 511 - (int)strlen("blocksize=128")) spec[k++] = ',';
    snprintf(spec + k, sizeof spec - (size_t)k, "blocksize=128");
    ck_assert_int_eq((int)strlen(spec), 511);
    ck_assert_int_eq(ql_qz_open(spec, &q), QL_OK);
    ck_assert_str_eq(q->options, "blocksize=128,double_quant=0");
    ql_qz_close(q);

    /* more than 32 options */
    k = snprintf(spec, sizeof spec, "nf4:");
    for (int i = 0; i < 33; i++) k += snprintf(spec + k, sizeof spec - (size_t)k, "%sblocksize=64", i ? "," : "");
    ck_assert_int_eq(ql_qz_open(spec, &q), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "more than 32 options");
    ck_assert_int_eq(ql_qz_open_from_file(spec, "f.json", "quantizer", &q), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "more than 32 options");

    /* on the command line: an error, and no output */
    k = snprintf(spec, sizeof spec, "nf4:double_quant=0");
    while (k < 600) spec[k++] = ',';
    snprintf(spec + k, sizeof spec - (size_t)k, "blocksize=128");
    char out_dir[700], *out, *err;
    snprintf(out_dir, sizeof out_dir, "%s/out", tmp);
    int st = qlora(&out, &err, "quantize --quiet '--quantizer=%s' '%s' -o '%s'", spec, model, out_dir);
    ck_assert_msg(st != 0, "exit 0: %s", out);
    ck_assert_contains(err, "longer than the 511 allowed");
    ck_assert(!ql_path_exists(out_dir));
    free(out);
    free(err);
}
END_TEST

/* ---- 3. plugins are listed in child processes ---- */

static void test_plugin(const char *kind, char *buf, size_t cap)
{
    snprintf(buf, cap, "%s/qlora_bad_%s.so", tu_env("QLORA_TEST_PLUGINS"), kind);
    ck_assert_msg(ql_path_exists(buf), "%s was not built", buf);
}

START_TEST(probe_reports_what_happened)
{
    char path[1024];
    ql_plugin_info info;

    snprintf(path, sizeof path, "%s/qlora_nf4.so", tu_env("QLORA_PLUGIN_PATH"));
    ck_assert_msg(ql_plugin_probe(path, 30, &info) == QL_OK, "%s", ql_error_message());
    ck_assert_str_eq(info.name, "nf4");
    ck_assert_str_eq(info.options, "blocksize=64,double_quant=1");
    ck_assert_double_eq_tol(info.bits_per_param, 4.12755, 0.00001); /* 4096 x 4096, all save() writes */
    ck_assert_uint_eq(info.abi_major, QL_QUANTIZER_ABI_MAJOR);
    ck_assert_ptr_null(info.error);
    ql_plugin_info_free(&info);

    test_plugin("crashinit", path, sizeof path);
    ck_assert_int_eq(ql_plugin_probe(path, 30, &info), QL_EINTERNAL);
    ck_assert_ptr_null(info.name);
    ck_assert_contains(info.error, path);
    ck_assert_contains(info.error, "killed by signal SIGSEGV");
    ck_assert_contains(info.error, "init()");
    ck_assert_str_eq(info.error, ql_error_message());
    ql_plugin_info_free(&info);

    test_plugin("exitinit", path, sizeof path);
    ck_assert_int_eq(ql_plugin_probe(path, 30, &info), QL_EINTERNAL);
    ck_assert_contains(info.error, "exited with status 3");
    ck_assert_contains(info.error, "init()");
    ql_plugin_info_free(&info);

    test_plugin("hanginit", path, sizeof path);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    ck_assert_int_eq(ql_plugin_probe(path, 0.5, &info), QL_EINTERNAL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    ck_assert_contains(info.error, "no answer after 0.5 s");
    ck_assert_contains(info.error, "init()");
    double took = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
    ck_assert_msg(took < 10, "the probe of a hanging plugin took %g s", took);
    ql_plugin_info_free(&info);

    /* a refusal of the plugin's own keeps its status and message */
    test_plugin("major", path, sizeof path);
    ck_assert_int_eq(ql_plugin_probe(path, 30, &info), QL_EABI);
    ck_assert_contains(info.error, "abi_major is 99");
    ql_plugin_info_free(&info);

    /* the plugin was loaded in the child only: never in this process */
    ck_assert_int_eq(ql_plugin_probe(evil, 30, &info), QL_OK);
    ck_assert_str_eq(info.name, "marker");
    ck_assert(ql_path_exists(marker));
    ck_assert_ptr_null(dlopen(evil, RTLD_NOW | RTLD_NOLOAD));
    ql_plugin_info_free(&info);
}
END_TEST

START_TEST(quantizers_survives_a_crashing_plugin)
{
    char plugins[700], link[800], target[1024];
    snprintf(plugins, sizeof plugins, "%s/plugins", tmp);
    ck_assert_int_eq(ql_mkdir_p(plugins), QL_OK);
    test_plugin("crashinit", target, sizeof target);
    snprintf(link, sizeof link, "%s/qlora_crash.so", plugins);
    ck_assert_int_eq(symlink(target, link), 0);
    snprintf(target, sizeof target, "%s/qlora_nf4.so", tu_env("QLORA_PLUGIN_PATH"));
    snprintf(link, sizeof link, "%s/qlora_good.so", plugins);
    ck_assert_int_eq(symlink(target, link), 0);
    char cmd[3000], *out, *err;
    for (int as_json = 0; as_json < 2; as_json++) {
        snprintf(cmd, sizeof cmd, "QLORA_PLUGIN_PATH='%s' '%s' quantizers%s", plugins, tu_env("QLORA_BIN"),
                 as_json ? " --json" : "");
        int st = tu_run(cmd, &out, &err);
        ck_assert_msg(st == 1, "exit %d: %s", st, err);
        snprintf(link, sizeof link, "%s/qlora_crash.so", plugins);
        ck_assert_contains(err, link);
        ck_assert_contains(err, "killed by signal SIGSEGV");
        ck_assert_contains(err, "init()");
        snprintf(link, sizeof link, "%s/qlora_good.so", plugins);
        ck_assert_contains(out, link); /* the good one, listed (its descriptor says nf4) */
        if (as_json) {
            json_t *arr = json_loads(out, 0, NULL);
            ck_assert_msg(json_is_array(arr), "not a JSON array: %s", out);
            int good = 0;
            size_t i;
            json_t *e;
            json_array_foreach(arr, i, e) good |= !strcmp(json_string_value(json_object_get(e, "file")), link);
            ck_assert(good);
            json_decref(arr);
        } else {
            ck_assert_contains(out, "\nnf4 ");
        }
        free(out);
        free(err);
    }
}
END_TEST

Suite *security_suite(void)
{
    Suite *s = suite_create("security");
    TCase *tc = tcase_create("files_never_load_code");
    tcase_set_timeout(tc, 120);
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_loop_test(tc, config_json_never_loads_code, 0, sizeof config_cases / sizeof config_cases[0]);
    tcase_add_test(tc, train_and_merge_refuse_a_path_in_config_json);
    tcase_add_loop_test(tc, run_config_never_loads_code, 0, sizeof run_config_cases / sizeof run_config_cases[0]);
    tcase_add_test(tc, resume_never_loads_code);
    tcase_add_test(tc, inspect_never_loads_code);
    tcase_add_test(tc, command_line_path_is_trusted_and_matched);
    tcase_add_test(tc, open_from_file_takes_names_only);
    suite_add_tcase(s, tc);

    tc = tcase_create("specs");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, long_specs_are_refused_not_truncated);
    suite_add_tcase(s, tc);

    tc = tcase_create("plugins_in_child_processes");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, probe_reports_what_happened);
    tcase_add_test(tc, quantizers_survives_a_crashing_plugin);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *r = srunner_create(security_suite());
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
