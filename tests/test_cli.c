/* The qlora command, run as a separate process on stories260K and on small
 * hand-made checkpoints: what it writes, what it prints, and how it refuses. */
#include <check.h>
#include <dirent.h>
#include <dlfcn.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend.h"
#include "qlora/qlora.h"
#include "testutil.h"

/* ---- helpers ---- */

static char *join(const char *a, const char *b)
{
    char *p = ql_path_join(a, b);
    ck_assert_ptr_nonnull(p);
    return p;
}

static char *fresh_dir(void) { return strdup(tu_tmpdir()); }

static char *model_dir(void) { return join(tu_env("QLORA_SHARED"), "models/stories260K"); }

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
    snprintf(cmd, sizeof cmd, "'%s' %s", tu_env("QLORA_BIN"), args);
    char *o = NULL, *e = NULL;
    int status = tu_run(cmd, &o, &e);
    if (out) *out = o;
    else free(o);
    if (err) *err = e;
    else free(e);
    return status;
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

static void spit(const char *path, const void *data, size_t len)
{
    ck_assert_int_eq(ql_write_file_atomic(path, data, len), QL_OK);
}

static void assert_same_file(const char *a, const char *b)
{
    size_t la, lb;
    char *da = slurp(a, &la), *db = slurp(b, &lb);
    ck_assert_msg(la == lb && memcmp(da, db, la) == 0, "%s (%zu bytes) differs from %s (%zu bytes)", a, la, b, lb);
    free(da);
    free(db);
}

/* Entries of a folder, sorted, joined by spaces. */
static void list_dir(const char *dir, char *buf, size_t cap)
{
    char names[32][256];
    int n = 0;
    DIR *d = opendir(dir);
    ck_assert_msg(d != NULL, "cannot open %s", dir);
    struct dirent *e;
    while ((e = readdir(d)) && n < 32) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(names[n++], sizeof names[0], "%s", e->d_name);
    }
    closedir(d);
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
            char t[256];
            memcpy(t, names[j], sizeof t);
            memcpy(names[j], names[j - 1], sizeof t);
            memcpy(names[j - 1], t, sizeof t);
        }
    size_t k = 0;
    buf[0] = '\0';
    for (int i = 0; i < n && k < cap; i++) k += (size_t)snprintf(buf + k, cap - k, "%s%s", i ? " " : "", names[i]);
}

/* `parent` holds exactly `expect` (space separated, sorted): no "*.tmp.*" or "*.old.*" left behind. */
static void assert_dir_is(const char *parent, const char *expect)
{
    char names[4096];
    list_dir(parent, names, sizeof names);
    ck_assert_msg(strstr(names, ".tmp.") == NULL, "temporary leftovers in %s: %s", parent, names);
    ck_assert_str_eq(names, expect);
}

static json_t *load_json_file(const char *path)
{
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    ck_assert_msg(j != NULL, "%s: %s", path, jerr.text);
    return j;
}

static json_t *parse_json(const char *text)
{
    json_error_t jerr;
    json_t *j = json_loads(text, 0, &jerr);
    ck_assert_msg(j != NULL, "not JSON (%s): %s", jerr.text, text);
    return j;
}

static const ql_tensor *need_tensor(const ql_st_file *f, const char *name, int dtype)
{
    const ql_tensor *t = ql_st_find(f, name);
    ck_assert_msg(t != NULL, "%s has no tensor %s", ql_st_path(f), name);
    ck_assert_msg(t->dtype == dtype, "%s is %s, expected %s", name, ql_dtype_name(t->dtype), ql_dtype_name(dtype));
    return t;
}

static ql_st_file *open_st(const char *dir)
{
    char *path = join(dir, "model.safetensors");
    ql_st_file *f;
    int rc = ql_st_open(path, &f);
    ck_assert_msg(rc == QL_OK, "%s", ql_error_message());
    free(path);
    return f;
}

/* The seven linears of each of stories260K's five blocks. */
static const char *const projections[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                          "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
enum { N_BLOCKS = 5, N_PROJ = 7, N_LINEARS = N_BLOCKS * N_PROJ, N_PARAMS = 226560 };

static void linear_name(int i, const char *suffix, char *buf, size_t cap)
{
    snprintf(buf, cap, "model.layers.%d.%s.%s", i / N_PROJ, projections[i % N_PROJ], suffix);
}

/* Non-quantized tensors pass through byte for byte. */
static void assert_passthrough(const ql_st_file *in, const ql_st_file *out)
{
    static const char *const kept[] = {"model.embed_tokens.weight", "model.norm.weight",
                                       "model.layers.0.input_layernorm.weight",
                                       "model.layers.4.post_attention_layernorm.weight"};
    for (size_t i = 0; i < sizeof kept / sizeof kept[0]; i++) {
        const ql_tensor *a = need_tensor(in, kept[i], QL_DTYPE_F32), *b = need_tensor(out, kept[i], QL_DTYPE_F32);
        ck_assert_int_eq(a->ndim, b->ndim);
        for (int d = 0; d < a->ndim; d++) ck_assert_int_eq(a->shape[d], b->shape[d]);
        ck_assert_uint_eq(a->nbytes, b->nbytes);
        ck_assert_msg(memcmp(a->data, b->data, a->nbytes) == 0, "%s changed", kept[i]);
    }
}

static const float *input_weight(const ql_st_file *in, int i, int64_t *rows, int64_t *cols)
{
    char name[256];
    linear_name(i, "weight", name, sizeof name);
    const ql_tensor *t = need_tensor(in, name, QL_DTYPE_F32);
    ck_assert_int_eq(t->ndim, 2);
    *rows = t->shape[0];
    *cols = t->shape[1];
    return t->data;
}

/* A small LLaMA-shaped checkpoint: one block with two linears. */
enum { TINY_H = 16, TINY_F = 48, TINY_V = 32 };

static void write_tiny_model(const char *dir, int dtype, const char *nonfinite_tensor, int64_t index, float value)
{
    static float up[TINY_F * TINY_H], down[TINY_H * TINY_F], norm[TINY_H];
    static uint16_t up16[TINY_F * TINY_H];
    tu_randn(up, TINY_F * TINY_H, 11, 0.05f);
    tu_randn(down, TINY_H * TINY_F, 12, 0.05f);
    for (int i = 0; i < TINY_H; i++) norm[i] = 1.0f + 0.01f * (float)i;
    if (nonfinite_tensor && strstr(nonfinite_tensor, "up_proj")) up[index] = value;
    if (nonfinite_tensor && strstr(nonfinite_tensor, "layernorm")) norm[index] = value;
    const void *up_data = up;
    if (dtype != QL_DTYPE_F32) {
        for (int i = 0; i < TINY_F * TINY_H; i++)
            up16[i] = dtype == QL_DTYPE_F16 ? ql_f32_to_f16(up[i]) : ql_f32_to_bf16(up[i]);
        up_data = up16;
    }
    const tu_tensor tensors[] = {
        {"model.embed_tokens.weight", QL_DTYPE_F32, 2, {TINY_V, TINY_H}, NULL},
        {"model.layers.0.input_layernorm.weight", QL_DTYPE_F32, 1, {TINY_H}, norm},
        {"model.layers.0.mlp.up_proj.weight", dtype, 2, {TINY_F, TINY_H}, up_data},
        {"model.layers.0.mlp.down_proj.weight", QL_DTYPE_F32, 2, {TINY_H, TINY_F}, down},
        {"model.norm.weight", QL_DTYPE_F32, 1, {TINY_H}, NULL},
    };
    tu_write_model(dir, tensors, sizeof tensors / sizeof tensors[0], NULL);
}

/* ---- listing and version ---- */

START_TEST(test_quantizers_lists_builtins)
{
    char *out, *err;
    int st = qlora(&out, &err, "quantizers");
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(out, "name");
    ck_assert_contains(out, "matrix bits");
    ck_assert_contains(out, "matrix bits: bits/param of a 4096 x 4096 matrix");
    /* one row per plugin: name, matrix bits/param of a 4096 x 4096 matrix, ABI, version */
    const char *nf4 = strstr(out, "\nnf4 ");
    ck_assert_msg(nf4 != NULL, "no nf4 row in:\n%s", out);
    char row_buf[256];
    sscanf(nf4 + 1, "%255[^\n]", row_buf);
    const char *row = row_buf;
    ck_assert_contains(row, " 4.128 "); /* 4.12755: everything save() writes, the tables and JSON included */
    ck_assert_contains(row, " 1.3 ");
    ck_assert_contains(out, "\nfp4 ");
    ck_assert_contains(out, "\nint8 ");
    ck_assert_contains(out, "defaults: blocksize=64,double_quant=1");
    char *plugins = join(tu_env("QLORA_PLUGIN_PATH"), "qlora_nf4.so");
    ck_assert_contains(out, plugins);
    free(plugins);
    free(out);
    free(err);

    st = qlora(&out, &err, "quantizers --json");
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    json_t *arr = parse_json(out);
    ck_assert(json_is_array(arr));
    int seen = 0;
    size_t i;
    json_t *q;
    json_array_foreach(arr, i, q) {
        const char *name = json_string_value(json_object_get(q, "name"));
        ck_assert_ptr_nonnull(name);
        ck_assert_str_eq(json_string_value(json_object_get(q, "abi")), "1.3");
        double bpp = json_number_value(json_object_get(q, "matrix_bits_per_param"));
        ck_assert_ptr_null(json_object_get(q, "bits_per_param")); /* one name for one figure */
        json_t *shape = json_object_get(q, "matrix_shape");
        ck_assert_int_eq(json_integer_value(json_array_get(shape, 0)), 4096);
        ck_assert_int_eq(json_integer_value(json_array_get(shape, 1)), 4096);
        if (!strcmp(name, "nf4") || !strcmp(name, "fp4")) {
            ck_assert_double_eq_tol(bpp, 4.127553, 1e-6);
            ck_assert_str_eq(json_string_value(json_object_get(q, "options")), "blocksize=64,double_quant=1");
            seen |= !strcmp(name, "nf4") ? 1 : 2;
        } else if (!strcmp(name, "int8")) {
            ck_assert_double_eq_tol(bpp, 8.008, 0.0005);
            seen |= 4;
        }
    }
    ck_assert_int_eq(seen, 7);
    json_decref(arr);
    free(out);
    free(err);

    st = qlora(NULL, &err, "quantizers --bogus");
    ck_assert_int_eq(st, 2);
    ck_assert_contains(err, "quantizers: unknown option '--bogus'");
    free(err);
}
END_TEST

START_TEST(test_version_and_usage)
{
    char *out, *err;
    int st = qlora(&out, &err, "version");
    ck_assert_int_eq(st, 0);
    char want[128];
    snprintf(want, sizeof want, "qlora %s (quantizer ABI 1.3)\n", ql_version());
    ck_assert_str_eq(out, want);
    free(out);
    free(err);

    st = qlora(&out, &err, "help");
    ck_assert_int_eq(st, 0);
    ck_assert_contains(out, "usage: qlora COMMAND");
    free(out);
    free(err);

    st = qlora(&out, &err, "frobnicate");
    ck_assert_int_eq(st, 2);
    ck_assert_contains(err, "unknown command 'frobnicate'");
    free(out);
    free(err);

    char *model = model_dir();
    st = qlora(&out, &err, "quantize --quiet '%s'", model);
    ck_assert_int_eq(st, 2);
    ck_assert_contains(err, "quantize: -o OUT_DIR is required");
    free(out);
    free(err);
    free(model);
}
END_TEST

/* ---- --help and option errors, for every command ---- */

/* snprintf that fails the test rather than cut */
static void fmt(char *buf, size_t cap, const char *f, ...) __attribute__((format(printf, 3, 4)));
static void fmt(char *buf, size_t cap, const char *f, ...)
{
    va_list ap;
    va_start(ap, f);
    int n = vsnprintf(buf, cap, f, ap);
    va_end(ap);
    ck_assert_msg(n >= 0 && (size_t)n < cap, "%zu bytes are too few for \"%s\"", cap, f);
}

static const char *const commands[] = {"quantizers", "quantize", "inspect", "compare", "eval",
                                       "generate",   "train",    "merge",   "bench",   "check-plugin",
                                       "study",      "version",  "launch"};

/* One option line of a --help text, as main.c's help_opt prints it: two
 * spaces, the flag column (26 wide: "-q, --quantizer Q"), a space, what it
 * does, then " (default: X)" when it has one. */
typedef struct help_line {
    char flag[64];  /* the long flag ("--quantizer"), or the short one when there is none */
    char value[32]; /* the value's placeholder ("Q"); "" for a flag without a value */
    char text[512]; /* the whole line */
    char dflt[256]; /* X of "(default: X)"; "" when none */
} help_line;

static int parse_help(const char *help, help_line *lines, int cap)
{
    int n = 0;
    for (const char *p = help; *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : p + strlen(p)) {
        size_t len = strcspn(p, "\n");
        if (strncmp(p, "  -", 3) != 0) continue;
        ck_assert_int_lt(n, cap);
        help_line *h = &lines[n++];
        memset(h, 0, sizeof *h);
        ck_assert_msg(len > 29 && len < sizeof h->text && p[28] == ' ', "not an option line of 26 + text: %.*s",
                      (int)len, p);
        memcpy(h->text, p, len);
        char col[32];
        snprintf(col, sizeof col, "%.26s", p + 2);
        const char *f = col;
        if (f[1] != '-' && !strncmp(f + 2, ", --", 4)) f += 4; /* "-q, --quantizer" */
        sscanf(f, "%63s %31s", h->flag, h->value);
        const char *d = strstr(h->text, " (default: ");
        if (d) {
            ck_assert_msg(h->text[len - 1] == ')', "the default does not end the line: %s", h->text);
            snprintf(h->dflt, sizeof h->dflt, "%.*s", (int)(len - 1 - (size_t)(d + 11 - h->text)), d + 11);
        }
    }
    return n;
}

static const help_line *find_help_line(const help_line *lines, int n, const char *flag)
{
    for (int i = 0; i < n; i++)
        if (!strcmp(lines[i].flag, flag)) return &lines[i];
    return NULL;
}

/* `qlora ARGS` that should stop at once (a help, a usage error): bounded in
 * time, since with --help or an option error broken `qlora bench` would
 * measure a 7B step on the CPU */
static int qlora_bounded(char **out, char **err, const char *args)
{
    char cmd[8192];
    fmt(cmd, sizeof cmd, "timeout -k 5 30 '%s' %s", tu_env("QLORA_BIN"), args);
    return tu_run(cmd, out, err);
}

/* `qlora CMD --help` on stdout, checked to exit 0 and say nothing on stderr */
static char *command_help(const char *cmd)
{
    char *out, *err, args[64];
    fmt(args, sizeof args, "%s --help", cmd);
    int st = qlora_bounded(&out, &err, args);
    ck_assert_msg(st == 0, "%s --help: exit %d: %s", cmd, st, err);
    ck_assert_str_eq(err, "");
    free(err);
    return out;
}

/* `qlora ARGS` fails with exit 2, nothing on stdout, and exactly `want` on stderr */
static void assert_usage_error(const char *args, const char *want)
{
    char *out, *err;
    int st = qlora_bounded(&out, &err, args);
    ck_assert_msg(st == 2, "qlora %s: exit %d, not 2: %s", args, st, err);
    ck_assert_msg(!strcmp(err, want), "qlora %s:\nwanted: %sgot:    %s", args, want, err);
    ck_assert_str_eq(out, "");
    free(out), free(err);
}

/* Defaults the help must show, read from the code: ql_train_opts_default,
 * ql_bench_opts_default and the commands' own (QLORA_DEVICE is cpu here, as
 * tests/meson.build sets it). "" means the flag has no default to show. */
static const struct {
    const char *cmd, *flag, *dflt;
} help_defaults[] = {
    {"train", "--model", ""},
    {"train", "--data", ""},
    {"train", "--output", ""},
    {"train", "--quantizer", "nf4"},
    {"train", "--format", "detected from the file"},
    {"train", "--lora-r", "64"},
    {"train", "--lora-alpha", "16"},
    {"train", "--lora-dropout", "0"},
    {"train", "--lora-modules", "all"},
    {"train", "--lr", "2e-4"},
    {"train", "--weight-decay", "0"},
    {"train", "--max-grad-norm", "0.3"},
    {"train", "--lr-scheduler", "constant"},
    {"train", "--warmup-ratio", "0.03"},
    {"train", "--batch-size", "1"},
    {"train", "--grad-accum", "16"},
    {"train", "--steps", "from --epochs"},
    {"train", "--epochs", "1"},
    {"train", "--save-steps", "250"},
    {"train", "--save-total-limit", "40"},
    {"train", "--seed", "42"},
    {"train", "--source-max-len", "1024"},
    {"train", "--target-max-len", "256"},
    {"train", "--group-by-length", "on"},
    {"train", "--eval-dataset-size", "none"},
    {"train", "--data-seed", "--seed"},
    {"train", "--adam-beta2", "0.999"},
    {"train", "--device", "cpu, from $QLORA_DEVICE"},
    {"train", "--precision", "auto: bf16 on cuda, fp32 on cpu"},
    {"train", "--optim", "auto: paged_adamw on cuda; on cpu, AdamW on the host"},
    {"train", "--offload", "auto: on on cuda"},
    {"train", "--resume", ""},
    {"eval", "--model", ""},
    {"eval", "--data", ""},
    {"eval", "--format", "detected from the file"},
    {"eval", "--batch-size", "8; with --mmlu 1"},
    {"eval", "--shots", "5"},
    {"eval", "--split", "test"},
    {"eval", "--source-max-len", "1024"},
    {"eval", "--device", "cpu, from $QLORA_DEVICE"},
    {"eval", "--precision", "auto: bf16 on cuda, fp32 on cpu"},
    {"eval", "--mmlu", ""},
    {"generate", "--prompt", "empty"},
    {"generate", "--max-new-tokens", "128"},
    {"generate", "--temperature", "0"},
    {"generate", "--top-p", "1"},
    {"generate", "--seed", "0"},
    {"generate", "--device", "cpu, from $QLORA_DEVICE"},
    {"generate", "--precision", "auto: bf16 on cuda, fp32 on cpu"},
    {"bench", "--shapes", "7b; 4096x4096,11008x4096,28672x8192"},
    {"bench", "--tokens", "4096"},
    {"bench", "--seq", "2048"},
    {"bench", "--batch-size", "1"},
    {"bench", "--lora-r", "64"},
    {"bench", "--lora-dropout", "0.1"},
    {"bench", "--steps", "5"},
    {"bench", "--warmup", "2"},
    {"bench", "--quantizer", "nf4"},
    {"bench", "--optim", "auto: paged_adamw on cuda; on cpu, AdamW on the host"},
    {"bench", "--offload", "auto: on on cuda"},
    {"bench", "--plan", ""},
    {"quantize", "--quantizer", "nf4"},
    {"quantize", "--output", ""},
    {"quantize", "--device", "cpu"},
    {"compare", "--quantizers", "nf4,fp4,int8"},
    {"compare", "--summary-only", ""},
    {"merge", "--adapter", ""},
    {"merge", "--output", ""},
    {"merge", "--dtype", "the base's embedding dtype, f32 when it is not a float"},
    {"merge", "--device", "cpu"},
    {"inspect", "--json", ""},
    {"quantizers", "--json", ""},
    {"quantizers", "--shape", "4096x4096"},
    {"check-plugin", "--json", ""},
    {"check-plugin", "--timeout", "60"},
    {"check-plugin", "--seed", "0"},
    {"check-plugin", "--mutations", "200"},
    {"check-plugin", "--threads", "4"},
    {"check-plugin", "--only", "all"},
    {"check-plugin", "--quiet", ""},
};

/* A value the option of `h` accepts, so that parsing goes on to the next argument */
static const char *valid_value(const help_line *h)
{
    static const char *const values[][2] = {
        {"--device", "cpu"},         {"--precision", "fp32"}, {"--optim", "adamw"}, {"--lora-modules", "q_proj"},
        {"--offload", "off"},
        {"--lr-scheduler", "linear"}, {"--dtype", "f32"},         {"--shape", "64x64"},
    };
    for (size_t i = 0; i < sizeof values / sizeof values[0]; i++)
        if (!strcmp(h->flag, values[i][0])) return values[i][1];
    char *end;
    strtod(h->dflt, &end);
    return h->dflt[0] && !*end ? h->dflt : "2"; /* its default when a number */
}

/* qlora CMD --help and -h (and qlora help CMD): exit 0, the usage, every
 * option with its real default, an example; and every option it lists is one
 * the command takes, with a value exactly when the help shows one. */
START_TEST(test_help_every_command)
{
    const char *cmd = commands[_i];
    char *help = command_help(cmd);
    char want[128];
    fmt(want, sizeof want, "usage: qlora %s", cmd);
    ck_assert_msg(!strncmp(help, want, strlen(want)), "%s --help does not start with '%s':\n%s", cmd, want, help);
    fmt(want, sizeof want, "\nexample:\n  qlora %s", cmd);
    ck_assert_contains(help, want);
    ck_assert_contains(help, "\noptions:\n");
    char *out, *err, args[64];
    fmt(args, sizeof args, "%s -h", cmd);
    int st = qlora_bounded(&out, &err, args);
    ck_assert_msg(st == 0, "%s -h: exit %d: %s", cmd, st, err);
    ck_assert_str_eq(out, help);
    free(out), free(err);
    fmt(args, sizeof args, "help %s", cmd);
    st = qlora_bounded(&out, &err, args);
    ck_assert_msg(st == 0, "help %s: exit %d: %s", cmd, st, err);
    ck_assert_str_eq(out, help);
    free(out), free(err);

    help_line lines[64];
    int n = parse_help(help, lines, 64);
    ck_assert_ptr_nonnull(find_help_line(lines, n, "--help"));
    for (size_t i = 0; i < sizeof help_defaults / sizeof help_defaults[0]; i++) {
        if (strcmp(help_defaults[i].cmd, cmd)) continue;
        const help_line *h = find_help_line(lines, n, help_defaults[i].flag);
        ck_assert_msg(h != NULL, "%s --help has no %s line:\n%s", cmd, help_defaults[i].flag, help);
        ck_assert_msg(!strcmp(h->dflt, help_defaults[i].dflt), "%s --help: %s shows default '%s', not '%s':\n%s", cmd,
                      help_defaults[i].flag, h->dflt, help_defaults[i].dflt, h->text);
    }
    /* each listed option is taken, those with a value given one: then the
     * parse goes on to the unknown option after them (two runs, so that a
     * flag listed without a value that takes one eats the unknown option) */
    for (int with_value = 0; with_value < 2; with_value++) {
        char args[4096], msg[256];
        fmt(args, sizeof args, "%s", cmd);
        for (int i = 0; i < n; i++) {
            if (!strcmp(lines[i].flag, "--help") || !lines[i].value[0] != !with_value) continue;
            size_t k = strlen(args);
            if (with_value) fmt(args + k, sizeof args - k, " '%s=%s'", lines[i].flag, valid_value(&lines[i]));
            else fmt(args + k, sizeof args - k, " %s", lines[i].flag);
        }
        fmt(args + strlen(args), sizeof args - strlen(args), " --zz-unknown");
        fmt(msg, sizeof msg, "qlora: %s: unknown option '--zz-unknown' (see 'qlora %s --help')\n", cmd, cmd);
        assert_usage_error(args, msg);
    }
    free(help);
}
END_TEST

/* --device's default follows $QLORA_DEVICE, in the help as in the code */
START_TEST(test_help_device_default)
{
    char cmd[8400];
    fmt(cmd, sizeof cmd, "env -u QLORA_DEVICE '%s' train --help", tu_env("QLORA_BIN"));
    char *out, *err;
    int st = tu_run(cmd, &out, &err);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    help_line lines[64];
    const help_line *h = find_help_line(lines, parse_help(out, lines, 64), "--device");
    ck_assert_ptr_nonnull(h);
    ck_assert_str_eq(h->dflt, "auto, or $QLORA_DEVICE when set");
    free(out), free(err);
    fmt(cmd, sizeof cmd, "QLORA_DEVICE=cuda '%s' bench --help", tu_env("QLORA_BIN"));
    st = tu_run(cmd, &out, &err);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    h = find_help_line(lines, parse_help(out, lines, 64), "--device");
    ck_assert_ptr_nonnull(h);
    ck_assert_str_eq(h->dflt, "cuda, from $QLORA_DEVICE");
    free(out), free(err);
}
END_TEST

/* One style of option error for every command: an unknown option, a missing
 * value, a value given to an option without one; exit 2, nothing else. */
START_TEST(test_option_errors_every_command)
{
    const char *cmd = commands[_i];
    char args[256], want[512];
    static const char *const unknown[][2] = {
        {"--no-such-option", "--no-such-option"}, {"--no-such-option=3", "--no-such-option"}, {"-Z", "-Z"}};
    for (int k = 0; k < 3; k++) {
        fmt(args, sizeof args, "%s %s", cmd, unknown[k][0]);
        fmt(want, sizeof want, "qlora: %s: unknown option '%s' (see 'qlora %s --help')\n", cmd, unknown[k][1], cmd);
        assert_usage_error(args, want);
    }
    /* a missing value, and a value given to an option without one: the
     * last option that needs one, the first without one other than --help */
    char *help = command_help(cmd);
    help_line lines[64];
    int n = parse_help(help, lines, 64);
    const char *needs = NULL, *takes_none = "--help";
    for (int i = n - 1; i >= 0; i--) {
        if (lines[i].value[0] && !needs) needs = lines[i].flag;
        if (!lines[i].value[0] && strcmp(lines[i].flag, "--help")) takes_none = lines[i].flag;
    }
    if (needs) {
        fmt(args, sizeof args, "%s %s", cmd, needs);
        fmt(want, sizeof want, "qlora: %s: option '%s' needs a value (see 'qlora %s --help')\n", cmd, needs, cmd);
        assert_usage_error(args, want);
    }
    fmt(args, sizeof args, "%s %s=1", cmd, takes_none);
    fmt(want, sizeof want, "qlora: %s: option '%s' takes no value (see 'qlora %s --help')\n", cmd, takes_none, cmd);
    assert_usage_error(args, want);
    /* a short option's missing value names the short option */
    if (!strcmp(cmd, "quantize") || !strcmp(cmd, "merge")) {
        fmt(args, sizeof args, "%s -o", cmd);
        fmt(want, sizeof want, "qlora: %s: option '-o' needs a value (see 'qlora %s --help')\n", cmd, cmd);
        assert_usage_error(args, want);
    }
    free(help);
}
END_TEST

/* Usage errors other than options name the command and its help too; a
 * prefix of several long options is called ambiguous, not unknown. */
START_TEST(test_usage_error_style)
{
    assert_usage_error("quantize --quiet", "qlora: quantize: expected one MODEL_DIR (see 'qlora quantize --help')\n");
    assert_usage_error("train --data x.json", "qlora: train: --model DIR is required (see 'qlora train --help')\n");
    assert_usage_error("generate --model m --top-p 2",
                       "qlora: generate: --top-p=2: expected a number from 0 to 1 (see 'qlora generate --help')\n");
    assert_usage_error("train --lora", "qlora: train: option '--lora' is ambiguous (see 'qlora train --help')\n");
    assert_usage_error("version extra", "qlora: version: unexpected argument 'extra' (see 'qlora version --help')\n");
    assert_usage_error("help nope", "qlora: unknown command 'nope' (see 'qlora help')\n");
}
END_TEST

/* The numbers that `qlora help` shows as [--flag N] are each command's real
 * defaults: the same as its --help (which reads them from the code). */
START_TEST(test_usage_matches_help)
{
    char *usage, *err;
    int st = qlora(&usage, &err, "help");
    ck_assert_int_eq(st, 0);
    free(err);
    int checked = 0, n = 0;
    char cmd[32] = "", help_of[32] = "";
    char *help = NULL;
    help_line lines[64];
    for (const char *p = usage; *p; p += strcspn(p, "\n") + (p[strcspn(p, "\n")] == '\n')) {
        size_t len = strcspn(p, "\n");
        /* "  CMD ..." starts a command's lines, deeper indented lines go on with it */
        if (len > 2 && p[0] == ' ' && p[1] == ' ' && p[2] != ' ') sscanf(p + 2, "%31s", cmd);
        else if (len == 0 || p[0] != ' ') cmd[0] = '\0';
        if (!cmd[0] || !strcmp(cmd, "help")) continue;
        for (const char *b = p; (b = strstr(b, "[--")) && b < p + len; b++) {
            char flag[64], value[64];
            if (sscanf(b + 1, "%63[^] ] %63[^]]", flag, value) != 2) continue;
            char *end;
            double v = strtod(value, &end);
            if (end == value || *end) continue; /* only numbers: the rest are choices (auto|cpu|cuda) or names */
            if (strcmp(cmd, help_of)) {
                free(help);
                help = command_help(cmd);
                n = parse_help(help, lines, 64);
                snprintf(help_of, sizeof help_of, "%s", cmd);
            }
            const help_line *h = find_help_line(lines, n, flag);
            ck_assert_msg(h != NULL, "qlora help shows %s %s, and %s --help has no such option", cmd, flag, cmd);
            ck_assert_msg(h->dflt[0] && strtod(h->dflt, NULL) == v,
                          "qlora help shows %s [%s %s], %s --help says: %s", cmd, flag, value, cmd, h->text);
            checked++;
        }
    }
    /* train's ten, eval's two, bench's six, generate's four at least */
    ck_assert_int_ge(checked, 20);
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        char line[64];
        snprintf(line, sizeof line, "\n  %s ", commands[i]);
        ck_assert_contains(usage, line);
    }
    ck_assert_contains(usage, "--help");
    free(help);
    free(usage);
}
END_TEST

/* ---- quantize ---- */

START_TEST(test_quantize_nf4_default)
{
    char *model = model_dir();
    char *parent = fresh_dir();
    char *dest = join(parent, "out");
    char *out, *err;
    int st = qlora(&out, &err, "quantize --quiet --quantizer=nf4 '%s' -o '%s'", model, dest);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(out, "quantized 35 layers (226560 parameters) with nf4:blocksize=64,double_quant=1");
    ck_assert_contains(out, "wrote ");
    free(out);
    free(err);
    assert_dir_is(parent, "out");
    assert_dir_is(dest, ".qlora-output config.json model.safetensors tokenizer.json tokenizer_config.json");

    /* tokenizer files copied byte for byte */
    static const char *const copied[] = {"tokenizer.json", "tokenizer_config.json"};
    for (int i = 0; i < 2; i++) {
        char *a = join(model, copied[i]), *b = join(dest, copied[i]);
        assert_same_file(a, b);
        free(a);
        free(b);
    }

    /* config.json: the original plus bitsandbytes' quantization_config */
    char *cfg_path = join(dest, "config.json");
    json_t *cfg = load_json_file(cfg_path);
    ck_assert_int_eq(json_integer_value(json_object_get(cfg, "hidden_size")), 64);
    ck_assert_str_eq(json_string_value(json_object_get(cfg, "model_type")), "llama");
    json_t *qc = json_object_get(cfg, "quantization_config");
    ck_assert(json_is_object(qc));
    ck_assert_str_eq(json_string_value(json_object_get(qc, "quant_method")), "bitsandbytes");
    ck_assert(json_is_true(json_object_get(qc, "load_in_4bit")));
    ck_assert(json_is_false(json_object_get(qc, "load_in_8bit")));
    ck_assert_str_eq(json_string_value(json_object_get(qc, "bnb_4bit_quant_type")), "nf4");
    ck_assert(json_is_true(json_object_get(qc, "bnb_4bit_use_double_quant")));
    ck_assert_str_eq(json_string_value(json_object_get(qc, "bnb_4bit_compute_dtype")), "float32");
    json_decref(cfg);
    free(cfg_path);

    ql_st_file *in = open_st(model), *q = open_st(dest);
    assert_passthrough(in, q);
    ck_assert_str_eq(ql_st_metadata(q, "format"), "pt");
    /* 12 untouched tensors + 6 per quantized linear */
    ck_assert_uint_eq(ql_st_count(q), 12 + 6 * N_LINEARS);
    for (int i = 0; i < N_LINEARS; i++) {
        int64_t rows, cols;
        const float *w = input_weight(in, i, &rows, &cols);
        int64_t n = rows * cols, blocks = (n + 63) / 64;
        char name[256];
        linear_name(i, "weight", name, sizeof name);
        const ql_tensor *t = need_tensor(q, name, QL_DTYPE_U8);
        ck_assert_int_eq(t->ndim, 2);
        ck_assert_int_eq(t->shape[0], n / 2);
        ck_assert_int_eq(t->shape[1], 1);
        linear_name(i, "weight.absmax", name, sizeof name);
        t = need_tensor(q, name, QL_DTYPE_U8);
        ck_assert_int_eq(t->ndim, 1);
        ck_assert_int_eq(t->shape[0], blocks);
        linear_name(i, "weight.nested_absmax", name, sizeof name);
        t = need_tensor(q, name, QL_DTYPE_F32);
        ck_assert_int_eq(t->shape[0], (blocks + 255) / 256);
        linear_name(i, "weight.quant_map", name, sizeof name);
        t = need_tensor(q, name, QL_DTYPE_F32);
        ck_assert_int_eq(t->shape[0], 16);
        const float *map = t->data;
        ck_assert_float_eq(map[0], -1.0f);
        ck_assert_float_eq(map[7], 0.0f);
        ck_assert_float_eq(map[15], 1.0f);
        linear_name(i, "weight.nested_quant_map", name, sizeof name);
        t = need_tensor(q, name, QL_DTYPE_F32);
        ck_assert_int_eq(t->shape[0], 256);
        linear_name(i, "weight.quant_state.bitsandbytes__nf4", name, sizeof name);
        t = need_tensor(q, name, QL_DTYPE_U8);
        json_error_t jerr;
        json_t *qs = json_loadb(t->data, t->nbytes, 0, &jerr);
        ck_assert_msg(qs != NULL, "%s: %s", name, jerr.text);
        ck_assert_str_eq(json_string_value(json_object_get(qs, "quant_type")), "nf4");
        ck_assert_int_eq(json_integer_value(json_object_get(qs, "blocksize")), 64);
        ck_assert_int_eq(json_integer_value(json_object_get(qs, "nested_blocksize")), 256);
        ck_assert_str_eq(json_string_value(json_object_get(qs, "dtype")), "float32");
        json_t *shape = json_object_get(qs, "shape");
        ck_assert_int_eq(json_integer_value(json_array_get(shape, 0)), rows);
        ck_assert_int_eq(json_integer_value(json_array_get(shape, 1)), cols);
        json_decref(qs);
        (void)w;
        /* no dense float weight left for a quantized linear */
        linear_name(i, "bias", name, sizeof name);
        ck_assert_ptr_null(ql_st_find(q, name));
    }
    ql_st_close(in);
    ql_st_close(q);
    ql_remove_tree(parent);
    free(dest);
    free(parent);
    free(model);
}
END_TEST

/* --device cuda: on a machine without a usable GPU (CI) a clear refusal that
 * writes nothing; with one, the same files as --device cpu.  --device takes
 * only cpu, cuda and auto. */
/* --lora-modules and --lr-scheduler (and qlora.py's --lr_scheduler_type) as
 * train parses them: the settings --dry-run prints name the modules' mask
 * (bit k: q, k, v, o, gate, up, down) and the schedule; typos are refused by
 * name, an empty name between commas too. */
START_TEST(test_modules_and_scheduler_parse)
{
    char *model = model_dir();
    char *data = join(tu_env("QLORA_SHARED"), "data/alpaca/alpaca_en_demo.json");
    static const struct {
        const char *args;
        long long modules;
        const char *schedule;
    } ok[] = {
        {"--lora-modules all", 0x7f, "constant"},
        {"--lora-modules all-linear --lr-scheduler linear", 0x7f, "linear"},
        {"--lora-modules q_proj", 0x01, "constant"},
        {"--lora-modules k_proj,o_proj --lr-scheduler cosine", 0x0a, "cosine"},
        {"--lora-modules down_proj,q_proj,q_proj --lr-scheduler constant_with_warmup", 0x41, "constant_with_warmup"},
        {"--lora-modules gate_proj,up_proj,v_proj --lr_scheduler_type cosine", 0x34, "cosine"},
        {"--lora-modules=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --lr-scheduler=constant", 0x7f,
         "constant"},
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        char *out, *err;
        int st = qlora(&out, &err, "train --model '%s' --data '%s' --max-examples 4 --dry-run --quiet %s", model, data,
                       ok[i].args);
        ck_assert_msg(st == 0, "%s: exit %d: %s", ok[i].args, st, err);
        const char *line = strstr(out, "settings: ");
        ck_assert_msg(line != NULL, "%s: no settings line: %s", ok[i].args, out);
        char *end = strchr(line, '\n');
        if (end) *end = '\0';
        json_t *j = parse_json(line + strlen("settings: "));
        ck_assert_msg(json_integer_value(json_object_get(j, "lora_modules")) == ok[i].modules,
                      "%s: lora_modules %lld, expected %lld", ok[i].args,
                      (long long)json_integer_value(json_object_get(j, "lora_modules")), ok[i].modules);
        ck_assert_str_eq(json_string_value(json_object_get(j, "lr_scheduler")), ok[i].schedule);
        json_decref(j);
        free(out), free(err);
    }
    static const struct {
        const char *args, *msg;
    } bad[] = {
        {"--lora-modules q_proj,,v_proj", "--lora-modules q_proj,,v_proj: an empty module name"},
        {"--lora-modules q_proj,", "--lora-modules q_proj,: an empty module name"},
        {"--lora-modules ,", "--lora-modules ,: an empty module name"},
        {"--lora-modules=", "--lora-modules is empty"},
        {"--lora-modules Q_PROJ", "--lora-modules: unknown module 'Q_PROJ'"},
        {"'--lora-modules=q_proj, v_proj'", "--lora-modules: unknown module ' v_proj'"},
        {"--lora-modules lm_head", "--lora-modules: unknown module 'lm_head'"},
        {"--lr-scheduler Linear", "--lr-scheduler Linear: use constant, constant_with_warmup, linear or cosine"},
        {"--lr-scheduler=", "--lr-scheduler : use constant, constant_with_warmup, linear or cosine"},
        {"--lr-scheduler polynomial", "--lr-scheduler polynomial: use constant"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char *out, *err;
        int st = qlora(&out, &err, "train --model '%s' --data '%s' --max-examples 4 --dry-run --quiet %s", model, data,
                       bad[i].args);
        ck_assert_msg(st != 0, "%s was taken: %s", bad[i].args, out);
        ck_assert_contains(err, bad[i].msg);
        free(out), free(err);
    }
    free(data), free(model);
}
END_TEST

/* --device, --precision and --optim of train, eval and bench: bad values are
 * usage errors; a missing GPU is an error before anything is written (here,
 * in CI, there is none); QLORA_DEVICE sets the default; `qlora bench` on the
 * CPU writes its JSON lines and table, and --json atomically. */
START_TEST(test_device_flags)
{
    char *model = model_dir();
    char *parent = fresh_dir();
    char *run = join(parent, "run");
    char *data = join(tu_env("QLORA_SHARED"), "data/alpaca/alpaca_en_demo.json");
    char *out, *err;
    static const char *const bad[][2] = {
        {"--device tpu", "train: --device tpu: use cpu, cuda or auto"},
        {"--precision fp8", "train: --precision fp8: use fp32, bf16 or auto"},
        {"--optim sgd", "train: --optim sgd: use adamw, paged_adamw (paged_adamw_32bit) or auto"},
        {"--offload yes", "train: --offload yes: use on, off or auto"},
    };
    for (int i = 0; i < 4; i++) {
        int st = qlora(&out, &err, "train --model '%s' --data '%s' --output '%s' --steps 1 %s", model, data, run,
                       bad[i][0]);
        ck_assert_int_eq(st, 2);
        ck_assert_contains(err, bad[i][1]);
        ck_assert_msg(!ql_path_exists(run), "%s was written", run);
        free(out), free(err);
    }
    int st = qlora(&out, &err, "eval --model '%s' --data '%s' --format alpaca --precision x", model, data);
    ck_assert_int_eq(st, 2);
    ck_assert_contains(err, "eval: --precision x: use fp32, bf16 or auto");
    free(out), free(err);
    if (!ql_backend_cuda()) {
        ql_error_clear();
        st = qlora(&out, &err, "train --model '%s' --data '%s' --output '%s' --steps 1 --device cuda --quiet", model,
                   data, run);
        ck_assert_int_ne(st, 0);
        ck_assert_contains(err, "device cuda is not available");
        ck_assert_msg(!ql_path_exists(run), "%s was written", run);
        free(out), free(err);
        /* the default from the environment */
        char cmd[8400];
        snprintf(cmd, sizeof cmd, "QLORA_DEVICE=cuda '%s' eval --model '%s' --data '%s' --format alpaca --quiet",
                 tu_env("QLORA_BIN"), model, data);
        st = tu_run(cmd, &out, &err);
        ck_assert_int_ne(st, 0);
        ck_assert_contains(err, "device cuda is not available");
        free(out), free(err);
    }
    /* auto on this machine, and the run config says what it chose */
    st = qlora(&out, &err, "train --model '%s' --data '%s' --output '%s' --steps 1 --grad-accum 1 --max-examples 8 "
                           "--device auto --quiet", model, data, run);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(err, "\"event\": \"device\"");
    free(out), free(err);
    char *cfgp = join(run, "run_config.json");
    char *cfg = slurp(cfgp, NULL);
    ck_assert_contains(cfg, ql_backend_cuda() ? "\"device\": \"cuda\"" : "\"device\": \"cpu\"");
    ck_assert_contains(cfg, "\"precision\": ");
    free(cfg), free(cfgp);
    /* bf16 precision with a plugin whose materialize gives F32 only (ABI 1.0):
     * its weights are rounded to bf16 on the host */
    char *v10 = join(tu_env("QLORA_TEST_PLUGINS"), "qlora_bad_v10.so");
    char *run16 = join(parent, "run16");
    st = qlora(&out, &err, "train --model '%s' --data '%s' --output '%s' --steps 1 --grad-accum 1 --max-examples 8 "
                           "--quantizer='%s' --device cpu --precision bf16 --quiet", model, data, run16, v10);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(err, "\"precision\": \"bf16\"");
    free(out), free(err), free(v10), free(run16);
    /* bench on the CPU: JSON lines, then the table; --json FILE whole */
    st = qlora(&out, &err, "bench --device cpu --shapes 7b --layers 1 --seq 8 --lora-r 2 --steps 1 --warmup 0 --quiet");
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(out, "{\"bench\": \"step\", \"impl\": \"qlora\", \"shape\": \"7b\"");
    ck_assert_contains(out, "tokens/s");
    free(out), free(err);
    char *json = join(parent, "bench.jsonl");
    st = qlora(&out, &err, "bench --device cpu --shapes 7b --layers 1 --seq 8 --lora-r 2 --steps 1 --warmup 0 --quiet "
                           "--json '%s'", json);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    char *j = slurp(json, NULL);
    ck_assert_contains(j, "\"tokens_per_s\": ");
    free(j), free(out), free(err);
    /* a --json that cannot be written, and a QLORA_DEVICE that names nothing */
    st = qlora(&out, &err, "bench --device cpu --shapes 7b --layers 1 --seq 8 --lora-r 2 --steps 1 --warmup 0 --quiet "
                           "--json '%s/no/such/dir/b.jsonl'", parent);
    ck_assert_int_ne(st, 0);
    ck_assert_contains(err, "cannot write");
    free(out), free(err);
    {
        char envcmd[8400];
        snprintf(envcmd, sizeof envcmd, "QLORA_DEVICE=gpu '%s' version", tu_env("QLORA_BIN"));
        st = tu_run(envcmd, &out, &err);
        ck_assert_int_eq(st, 2);
        ck_assert_contains(err, "qlora: QLORA_DEVICE=gpu: use cpu, cuda or auto");
        free(out), free(err);
    }
    st = qlora(&out, &err, "bench --shapes 8b --device cpu");
    ck_assert_int_ne(st, 0);
    ck_assert_contains(err, "unknown shape '8b'");
    free(out), free(err);
    /* the kernels: materialize against a copy, the 4-bit linear against bf16 */
    st = qlora(&out, &err, "bench --only materialize --device cpu --shapes 64x128,32x256 --steps 2 --warmup 0");
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(out, "{\"bench\": \"materialize\", \"impl\": \"qlora\", \"quantizer\": "
                            "\"nf4:blocksize=64,double_quant=1\", \"rows\": 64, \"cols\": 128, \"out\": \"bf16\"");
    ck_assert_contains(out, "\"rows\": 32, \"cols\": 256");
    ck_assert_contains(out, "\"bytes_out\": 16384"); /* 64 x 128 bf16 */
    ck_assert_contains(out, "x copy");
    free(out), free(err);
    st = qlora(&out, &err, "bench --only linear --device cpu -q int8 --shapes 48x64 --tokens 16 --steps 2 --warmup 1");
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(out, "{\"bench\": \"linear\", \"impl\": \"qlora\", \"quantizer\": \"int8");
    ck_assert_contains(out, "\"rows\": 48, \"cols\": 64, \"tokens\": 16");
    ck_assert_contains(out, "x bf16");
    free(out), free(err);
    st = qlora(&out, &err, "bench --only kernels --device cpu");
    ck_assert_int_eq(st, 2);
    ck_assert_contains(err, "--only kernels: use step, materialize or linear");
    free(out), free(err);
    st = qlora(&out, &err, "bench --only linear --device cpu --shapes 64x");
    ck_assert_int_ne(st, 0);
    ck_assert_contains(err, "matrix shape '64x': want ROWSxCOLS");
    free(out), free(err);
    free(json), free(data), free(run), free(parent), free(model);
}
END_TEST

START_TEST(test_quantize_device)
{
    char *model = model_dir();
    char *parent = fresh_dir();
    char *dest = join(parent, "out");
    char *out, *err;
    int have_gpu = ql_backend_cuda() != NULL;
    ql_error_clear();
    int st = qlora(&out, &err, "quantize --quiet --device cuda '%s' -o '%s'", model, dest);
    if (!have_gpu) {
        ck_assert_msg(st != 0, "exit 0 without a GPU:\n%s", out);
        ck_assert_contains(err, "quantize --device cuda: device cuda is not available");
        ck_assert_msg(!ql_path_exists(dest), "%s was written", dest);
    } else {
        ck_assert_msg(st == 0, "exit %d: %s", st, err);
        ck_assert_contains(out, " on cuda");
        char *cpu = join(parent, "cpu");
        free(out);
        free(err);
        st = qlora(&out, &err, "quantize --quiet --device cpu '%s' -o '%s'", model, cpu);
        ck_assert_msg(st == 0, "exit %d: %s", st, err);
        const char *files[] = {"model.safetensors", "config.json"};
        for (size_t i = 0; i < 2; i++) {
            char *a = join(dest, files[i]), *b = join(cpu, files[i]);
            assert_same_file(a, b);
            free(a);
            free(b);
        }
        free(cpu);
    }
    free(out);
    free(err);
    st = qlora(&out, &err, "quantize --quiet --device tpu '%s' -o '%s'", model, dest);
    ck_assert_int_eq(st, 2);
    ck_assert_contains(err, "quantize: --device tpu: use cpu, cuda or auto");
    free(out);
    free(err);
    /* auto: whichever it picks, it succeeds */
    st = qlora(&out, &err, "quantize --quiet --device auto '%s' -o '%s'", model, dest);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    free(out);
    free(err);
    free(dest);
    free(parent);
    free(model);
}
END_TEST

START_TEST(test_quantize_nf4_options)
{
    char *model = model_dir();
    char *parent = fresh_dir();
    char *dest = join(parent, "out");
    char *out, *err;
    int st = qlora(&out, &err, "quantize --quiet --quantizer=nf4:double_quant=0,blocksize=128 '%s' -o '%s'", model, dest);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(out, "with nf4:blocksize=128,double_quant=0");
    free(out);
    free(err);
    assert_dir_is(parent, "out");

    char *cfg_path = join(dest, "config.json");
    json_t *cfg = load_json_file(cfg_path);
    json_t *qc = json_object_get(cfg, "quantization_config");
    ck_assert(json_is_false(json_object_get(qc, "bnb_4bit_use_double_quant")));
    ck_assert_str_eq(json_string_value(json_object_get(qc, "bnb_4bit_quant_type")), "nf4");
    json_decref(cfg);
    free(cfg_path);

    ql_st_file *in = open_st(model), *q = open_st(dest);
    assert_passthrough(in, q);
    ck_assert_uint_eq(ql_st_count(q), 12 + 4 * N_LINEARS);
    for (int i = 0; i < N_LINEARS; i++) {
        int64_t rows, cols;
        const float *w = input_weight(in, i, &rows, &cols);
        int64_t n = rows * cols, blocks = (n + 127) / 128;
        char name[256];
        linear_name(i, "weight.absmax", name, sizeof name);
        const ql_tensor *t = need_tensor(q, name, QL_DTYPE_F32);
        ck_assert_int_eq(t->ndim, 1);
        ck_assert_int_eq(t->shape[0], blocks);
        /* without double quantization absmax is each block's exact max |w| */
        const float *absmax = t->data;
        for (int64_t b = 0; b < blocks; b++) {
            float mx = 0;
            for (int64_t k = b * 128; k < n && k < (b + 1) * 128; k++) mx = fmaxf(mx, fabsf(w[k]));
            ck_assert_msg(absmax[b] == mx, "%s[%lld] = %.9g, max |w| = %.9g", name, (long long)b, (double)absmax[b],
                          (double)mx);
        }
        linear_name(i, "weight.nested_absmax", name, sizeof name);
        ck_assert_ptr_null(ql_st_find(q, name));
        linear_name(i, "weight.nested_quant_map", name, sizeof name);
        ck_assert_ptr_null(ql_st_find(q, name));
        linear_name(i, "weight.quant_map", name, sizeof name);
        need_tensor(q, name, QL_DTYPE_F32);
        linear_name(i, "weight", name, sizeof name);
        ck_assert_int_eq(need_tensor(q, name, QL_DTYPE_U8)->shape[0], n / 2);
    }
    const ql_tensor *qs = need_tensor(q, "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4", QL_DTYPE_U8);
    const char want[] = "{\"quant_type\": \"nf4\", \"blocksize\": 128, \"dtype\": \"float32\", \"shape\": [64, 172]}";
    ck_assert_int_eq(qs->ndim, 1);
    ck_assert_int_eq(qs->shape[0], (int64_t)strlen(want));
    ck_assert_msg(qs->nbytes == strlen(want) && memcmp(qs->data, want, qs->nbytes) == 0, "quant_state is %.*s",
                  (int)qs->nbytes, (const char *)qs->data);
    ql_st_close(in);
    ql_st_close(q);
    ql_remove_tree(parent);
    free(dest);
    free(parent);
    free(model);
}
END_TEST

START_TEST(test_quantize_fp4)
{
    char *model = model_dir();
    char *parent = fresh_dir();
    char *dest = join(parent, "out");
    char *out, *err;
    int st = qlora(&out, &err, "quantize --quiet --quantizer=fp4 '%s' -o '%s'", model, dest);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(out, "with fp4:blocksize=64,double_quant=1");
    free(out);
    free(err);
    assert_dir_is(parent, "out");
    char *cfg_path = join(dest, "config.json");
    json_t *cfg = load_json_file(cfg_path);
    json_t *qc = json_object_get(cfg, "quantization_config");
    ck_assert_str_eq(json_string_value(json_object_get(qc, "bnb_4bit_quant_type")), "fp4");
    ck_assert(json_is_true(json_object_get(qc, "load_in_4bit")));
    json_decref(cfg);
    free(cfg_path);
    ql_st_file *in = open_st(model), *q = open_st(dest);
    assert_passthrough(in, q);
    for (int i = 0; i < N_LINEARS; i++) {
        char name[256];
        linear_name(i, "weight.quant_state.bitsandbytes__fp4", name, sizeof name);
        const ql_tensor *t = need_tensor(q, name, QL_DTYPE_U8);
        json_t *qs = json_loadb(t->data, t->nbytes, 0, NULL);
        ck_assert_ptr_nonnull(qs);
        ck_assert_str_eq(json_string_value(json_object_get(qs, "quant_type")), "fp4");
        json_decref(qs);
        linear_name(i, "weight.quant_state.bitsandbytes__nf4", name, sizeof name);
        ck_assert_ptr_null(ql_st_find(q, name));
        linear_name(i, "weight", name, sizeof name);
        need_tensor(q, name, QL_DTYPE_U8);
    }
    ql_st_close(in);
    ql_st_close(q);
    ql_remove_tree(parent);
    free(dest);
    free(parent);
    free(model);
}
END_TEST

START_TEST(test_quantize_int8)
{
    char *model = model_dir();
    char *parent = fresh_dir();
    char *dest = join(parent, "out");
    char *out, *err;
    int st = qlora(&out, &err, "quantize --quiet --quantizer=int8 '%s' -o '%s'", model, dest);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(out, "quantized 35 layers (226560 parameters) with int8");
    free(out);
    free(err);
    assert_dir_is(parent, "out");
    char *cfg_path = join(dest, "config.json");
    json_t *cfg = load_json_file(cfg_path);
    json_t *qc = json_object_get(cfg, "quantization_config");
    ck_assert_str_eq(json_string_value(json_object_get(qc, "quant_method")), "bitsandbytes");
    ck_assert(json_is_true(json_object_get(qc, "load_in_8bit")));
    ck_assert(json_is_false(json_object_get(qc, "load_in_4bit")));
    json_decref(cfg);
    free(cfg_path);

    ql_st_file *in = open_st(model), *q = open_st(dest);
    assert_passthrough(in, q);
    ck_assert_uint_eq(ql_st_count(q), 12 + 3 * N_LINEARS);
    for (int i = 0; i < N_LINEARS; i++) {
        int64_t rows, cols;
        const float *w = input_weight(in, i, &rows, &cols);
        char name[256];
        linear_name(i, "weight", name, sizeof name);
        const ql_tensor *wt = need_tensor(q, name, QL_DTYPE_I8);
        ck_assert_int_eq(wt->ndim, 2);
        ck_assert_int_eq(wt->shape[0], rows);
        ck_assert_int_eq(wt->shape[1], cols);
        char prefix[256];
        snprintf(prefix, sizeof prefix, "%s", name);
        prefix[strlen(prefix) - strlen(".weight")] = '\0';
        snprintf(name, sizeof name, "%s.SCB", prefix);
        const ql_tensor *scb = need_tensor(q, name, QL_DTYPE_F32);
        ck_assert_int_eq(scb->ndim, 1);
        ck_assert_int_eq(scb->shape[0], rows);
        snprintf(name, sizeof name, "%s.weight_format", prefix);
        const ql_tensor *fmt = need_tensor(q, name, QL_DTYPE_U8);
        ck_assert_int_eq(fmt->ndim, 0);
        ck_assert_uint_eq(fmt->nbytes, 1);
        ck_assert_uint_eq(((const uint8_t *)fmt->data)[0], 0);
        /* SCB is each row's max |w| rounded through float16, and that element becomes +-127 */
        const float *s = scb->data;
        const int8_t *qw = wt->data;
        for (int64_t r = 0; r < rows; r++) {
            int64_t arg = 0;
            for (int64_t c = 1; c < cols; c++)
                if (fabsf(w[r * cols + c]) > fabsf(w[r * cols + arg])) arg = c;
            float want = ql_f16_to_f32(ql_f32_to_f16(fabsf(w[r * cols + arg])));
            ck_assert_msg(s[r] == want, "%s[%lld] = %.9g, want %.9g", name, (long long)r, (double)s[r], (double)want);
            ck_assert_int_eq(qw[r * cols + arg], w[r * cols + arg] > 0 ? 127 : -127);
        }
    }
    ql_st_close(in);
    ql_st_close(q);
    ql_remove_tree(parent);
    free(dest);
    free(parent);
    free(model);
}
END_TEST

START_TEST(test_quantize_example_plugin_by_path)
{
    char *model = model_dir();
    char *parent = fresh_dir();
    char *dest = join(parent, "out");
    char *out, *err;
    int st = qlora(&out, &err, "quantize --quiet '--quantizer=%s:group_size=64' '%s' -o '%s'",
                   tu_env("QLORA_EXAMPLE_PLUGIN"), model, dest);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(out, "quantized 35 layers (226560 parameters) with rtn_int4:");
    ck_assert_contains(out, "group_size=64");
    free(out);
    free(err);
    assert_dir_is(parent, "out");
    char *cfg_path = join(dest, "config.json");
    json_t *cfg = load_json_file(cfg_path);
    json_t *qc = json_object_get(cfg, "quantization_config");
    ck_assert(json_is_object(qc));
    ck_assert_int_eq(json_integer_value(json_object_get(qc, "group_size")), 64);
    json_decref(cfg);
    free(cfg_path);
    ql_st_file *in = open_st(model), *q = open_st(dest);
    assert_passthrough(in, q);
    /* every linear's dense weight was replaced */
    for (int i = 0; i < N_LINEARS; i++) {
        char name[256];
        linear_name(i, "weight", name, sizeof name);
        ck_assert_msg(ql_st_find(q, name) == NULL || ql_st_find(q, name)->dtype != QL_DTYPE_F32, "%s still dense", name);
    }
    ck_assert_uint_gt(ql_st_count(q), 12);
    ql_st_close(in);
    ql_st_close(q);
    ql_remove_tree(parent);
    free(dest);
    free(parent);
    free(model);
}
END_TEST

/* --quantizer=my.so names a file of the current folder (dlopen alone would
 * search the library path for it); inspect of what it wrote, with that
 * plugin not on the search path, names the plugin and where it looked. */
START_TEST(test_plugin_in_current_folder)
{
    char *model = model_dir();
    char *dir = fresh_dir();
    char cmd[8192], *out, *err;
    snprintf(cmd, sizeof cmd, "cp '%s' '%s/my.so'", tu_env("QLORA_EXAMPLE_PLUGIN"), dir);
    ck_assert_int_eq(system(cmd), 0);
    snprintf(cmd, sizeof cmd, "cd '%s' && '%s' quantize --quiet --quantizer=my.so:group_size=64 '%s' -o out", dir,
             tu_env("QLORA_BIN"), model);
    int st = tu_run(cmd, &out, &err);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(out, "quantized 35 layers (226560 parameters) with rtn_int4:group_size=64");
    free(out);
    free(err);
    snprintf(cmd, sizeof cmd, "cd '%s' && '%s' compare --quiet --summary-only --quantizers=nf4,my.so '%s'", dir,
             tu_env("QLORA_BIN"), model);
    st = tu_run(cmd, &out, &err);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(out, "\nrtn_int4 ");
    free(out);
    free(err);

    /* rtn_int4 is not on the search path (the build's plugins only) */
    char *dest = join(dir, "out");
    st = qlora(&out, &err, "inspect '%s/model.safetensors'", dest);
    ck_assert_msg(st != 0, "inspect without the plugin succeeded:\n%.300s", out);
    ck_assert_contains(err, "config.json names quantizer rtn_int4");
    ck_assert_contains(err, "plugin rtn_int4 not found (looked in ");
    ck_assert_contains(err, tu_env("QLORA_PLUGIN_PATH"));
    ck_assert_msg(!tu_contains(out, "no quantized layers"), "inspect said no quantized layers:\n%s", out);
    free(out);
    free(err);
    st = qlora(&out, &err, "inspect --json '%s'", dest);
    ck_assert_msg(st != 0, "inspect --json without the plugin succeeded:\n%.300s", out);
    ck_assert_contains(err, "plugin rtn_int4 not found (looked in ");
    free(out);
    free(err);
    /* on the search path, it reads the layers */
    snprintf(cmd, sizeof cmd, "ln -s my.so '%s/qlora_rtn_int4.so' && QLORA_PLUGIN_PATH='%s' '%s' inspect '%s'", dir, dir,
             tu_env("QLORA_BIN"), dest);
    st = tu_run(cmd, &out, &err);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(out, "35 quantized layers, 226560 parameters\n");
    free(out);
    free(err);
    /* a checkpoint that names no quantizer is still just "no quantized layers" */
    st = qlora(&out, &err, "inspect '%s'", model);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(out, "\nno quantized layers\n");
    free(out);
    free(err);
    ql_remove_tree(dir);
    free(dest);
    free(dir);
    free(model);
}
END_TEST

START_TEST(test_quantize_half_precision_checkpoint)
{
    /* F16 and BF16 linears are read as such and their dtype lands in the quant_state */
    static const struct {
        int dtype;
        const char *torch;
    } cases[] = {{QL_DTYPE_BF16, "bfloat16"}, {QL_DTYPE_F16, "float16"}};
    for (int k = 0; k < 2; k++) {
        char *parent = fresh_dir();
        char *model = join(parent, "model");
        char *dest = join(parent, "out");
        write_tiny_model(model, cases[k].dtype, NULL, 0, 0);
        char *out, *err;
        int st = qlora(&out, &err, "quantize --quiet --quantizer=nf4:double_quant=0 '%s' -o '%s'", model, dest);
        ck_assert_msg(st == 0, "exit %d: %s", st, err);
        ck_assert_contains(out, "quantized 2 layers (1536 parameters)");
        free(out);
        free(err);
        ql_st_file *q = open_st(dest);
        const ql_tensor *t =
            need_tensor(q, "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4", QL_DTYPE_U8);
        json_t *qs = json_loadb(t->data, t->nbytes, 0, NULL);
        ck_assert_ptr_nonnull(qs);
        ck_assert_str_eq(json_string_value(json_object_get(qs, "dtype")), cases[k].torch);
        json_decref(qs);
        t = need_tensor(q, "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4", QL_DTYPE_U8);
        qs = json_loadb(t->data, t->nbytes, 0, NULL);
        ck_assert_str_eq(json_string_value(json_object_get(qs, "dtype")), "float32");
        json_decref(qs);
        ql_st_close(q);
        ql_remove_tree(parent);
        free(dest);
        free(model);
        free(parent);
    }
}
END_TEST

START_TEST(test_quantize_sharded_checkpoint)
{
    char *parent = fresh_dir();
    char *model = join(parent, "model");
    char *a = join(parent, "a"), *b = join(parent, "b");
    const tu_tensor first[] = {
        {"model.embed_tokens.weight", QL_DTYPE_F32, 2, {TINY_V, TINY_H}, NULL},
        {"model.layers.0.mlp.up_proj.weight", QL_DTYPE_F32, 2, {TINY_F, TINY_H}, NULL},
    };
    const tu_tensor second[] = {
        {"model.layers.0.mlp.down_proj.weight", QL_DTYPE_F32, 2, {TINY_H, TINY_F}, NULL},
        {"model.norm.weight", QL_DTYPE_F32, 1, {TINY_H}, NULL},
    };
    tu_write_model(a, first, 2, NULL);
    tu_write_model(b, second, 2, NULL);
    ck_assert_int_eq(ql_mkdir_p(model), QL_OK);
    char *src = join(a, "model.safetensors"), *dst = join(model, "model-00001-of-00002.safetensors");
    ck_assert_int_eq(rename(src, dst), 0);
    free(src);
    free(dst);
    src = join(b, "model.safetensors");
    dst = join(model, "model-00002-of-00002.safetensors");
    ck_assert_int_eq(rename(src, dst), 0);
    free(src);
    free(dst);
    src = join(a, "config.json");
    dst = join(model, "config.json");
    ck_assert_int_eq(rename(src, dst), 0);
    free(src);
    free(dst);
    char *index = join(model, "model.safetensors.index.json");
    const char good[] = "{\"metadata\": {}, \"weight_map\": {"
                        "\"model.embed_tokens.weight\": \"model-00001-of-00002.safetensors\","
                        "\"model.layers.0.mlp.up_proj.weight\": \"model-00001-of-00002.safetensors\","
                        "\"model.layers.0.mlp.down_proj.weight\": \"model-00002-of-00002.safetensors\","
                        "\"model.norm.weight\": \"model-00002-of-00002.safetensors\"}}";
    spit(index, good, strlen(good));

    char *dest = join(parent, "out");
    char *out, *err;
    int st = qlora(&out, &err, "quantize --quiet '%s' -o '%s'", model, dest);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(out, "quantized 2 layers");
    free(out);
    free(err);
    ql_st_file *q = open_st(dest);
    need_tensor(q, "model.norm.weight", QL_DTYPE_F32);
    need_tensor(q, "model.layers.0.mlp.down_proj.weight.absmax", QL_DTYPE_U8);
    need_tensor(q, "model.layers.0.mlp.up_proj.weight.absmax", QL_DTYPE_U8);
    ql_st_close(q);
    ck_assert_int_eq(ql_remove_tree(dest), QL_OK);

    /* the index names a shard that is not there */
    const char missing_shard[] = "{\"weight_map\": {"
                                 "\"model.embed_tokens.weight\": \"model-00001-of-00002.safetensors\","
                                 "\"model.layers.0.mlp.down_proj.weight\": \"model-00003-of-00003.safetensors\"}}";
    spit(index, missing_shard, strlen(missing_shard));
    st = qlora(&out, &err, "quantize --quiet '%s' -o '%s'", model, dest);
    ck_assert_int_ne(st, 0);
    char *shard = join(model, "model-00003-of-00003.safetensors");
    ck_assert_contains(err, "cannot open");
    ck_assert_contains(err, shard);
    ck_assert_contains(err, "No such file or directory");
    free(shard);
    free(out);
    free(err);
    ck_assert(!ql_path_exists(dest));

    /* the index lists a tensor that no shard holds */
    const char ghost[] = "{\"weight_map\": {"
                         "\"model.embed_tokens.weight\": \"model-00001-of-00002.safetensors\","
                         "\"model.layers.7.mlp.up_proj.weight\": \"model-00002-of-00002.safetensors\"}}";
    spit(index, ghost, strlen(ghost));
    st = qlora(&out, &err, "quantize --quiet '%s' -o '%s'", model, dest);
    ck_assert_int_ne(st, 0);
    ck_assert_contains(err, "model.safetensors.index.json lists tensor 'model.layers.7.mlp.up_proj.weight' but no shard holds it");
    free(out);
    free(err);
    ck_assert(!ql_path_exists(dest));

    /* a shard name that tries to leave the folder */
    const char escape[] = "{\"weight_map\": {\"model.norm.weight\": \"../b/config.json\"}}";
    spit(index, escape, strlen(escape));
    st = qlora(&out, &err, "quantize --quiet '%s' -o '%s'", model, dest);
    ck_assert_int_ne(st, 0);
    ck_assert_contains(err, "shard name '../b/config.json' must be a plain file name");
    free(out);
    free(err);
    ck_assert(!ql_path_exists(dest));

    free(index);
    ql_remove_tree(parent);
    free(dest);
    free(a);
    free(b);
    free(model);
    free(parent);
}
END_TEST

/* ---- inspect and compare ---- */

START_TEST(test_inspect_quantized)
{
    char *model = model_dir();
    char *parent = fresh_dir();
    char *dest = join(parent, "out");
    char *out, *err;
    int st = qlora(&out, &err, "quantize --quiet '%s' -o '%s'", model, dest);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    free(out);
    free(err);

    st = qlora(&out, &err, "inspect '%s/model.safetensors'", dest);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(out, "222 tensors");
    ck_assert_contains(out, "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4");
    ck_assert_contains(out, "quantized layer");
    ck_assert_contains(out, "matrix bits/param: ");
    ck_assert_contains(out, "model bits/param: ");
    const char *row = strstr(out, "\nmodel.layers.0.mlp.down_proj ");
    ck_assert_msg(row != NULL, "no layer row in:\n%s", out);
    char line_buf[256];
    sscanf(row + 1, "%255[^\n]", line_buf);
    const char *line = line_buf;
    ck_assert_contains(line, " nf4 ");
    ck_assert_contains(line, " 64x172 ");
    ck_assert_contains(line, " float32 ");
    ck_assert_contains(out, "35 quantized layers, 226560 parameters\n");
    free(out);
    free(err);

    st = qlora(&out, &err, "inspect --json '%s'", dest); /* a folder means its model.safetensors */
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    json_t *j = parse_json(out);
    json_t *layers = json_object_get(j, "quantized_layers");
    ck_assert_uint_eq(json_array_size(layers), N_LINEARS);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "quantized_params")), N_PARAMS);
    ck_assert_uint_eq(json_array_size(json_object_get(j, "tensors")), 12 + 6 * N_LINEARS);
    size_t i;
    json_t *l;
    json_array_foreach(layers, i, l) {
        ck_assert_str_eq(json_string_value(json_object_get(l, "quantizer")), "nf4");
        ck_assert_str_eq(json_string_value(json_object_get(l, "source_dtype")), "float32");
        double bpp = json_number_value(json_object_get(l, "matrix_bits_per_param"));
        ck_assert_msg(bpp > 4.0 && bpp < 10.0, "matrix_bits_per_param %g", bpp);
        const char *name = json_string_value(json_object_get(l, "layer"));
        ck_assert_ptr_nonnull(name);
        if (!strcmp(name, "model.layers.0.mlp.down_proj")) {
            json_t *shape = json_object_get(l, "shape");
            ck_assert_int_eq(json_integer_value(json_array_get(shape, 0)), 64);
            ck_assert_int_eq(json_integer_value(json_array_get(shape, 1)), 172);
        }
    }
    json_decref(j);
    free(out);
    free(err);

    /* an unquantized checkpoint has none */
    st = qlora(&out, &err, "inspect '%s/model.safetensors'", model);
    ck_assert_int_eq(st, 0);
    ck_assert_contains(out, "47 tensors");
    ck_assert_contains(out, "no quantized layers");
    free(out);
    free(err);

    /* and a file that is not safetensors is refused */
    char *cfg = join(dest, "config.json");
    st = qlora(&out, &err, "inspect '%s'", cfg);
    ck_assert_int_ne(st, 0);
    ck_assert_contains(err, "not a valid safetensors file");
    free(cfg);
    free(out);
    free(err);
    ql_remove_tree(parent);
    free(dest);
    free(parent);
    free(model);
}
END_TEST

static json_t *find_by_name(json_t *arr, const char *name)
{
    size_t i;
    json_t *q;
    json_array_foreach(arr, i, q) if (!strcmp(json_string_value(json_object_get(q, "name")), name)) return q;
    ck_abort_msg("no quantizer %s in the compare JSON", name);
    return NULL;
}

START_TEST(test_compare)
{
    char *model = model_dir();
    char *parent = fresh_dir();
    char *json_path = join(parent, "cmp.json");
    char *out, *err;
    int st = qlora(&out, &err, "compare --quiet --quantizers=nf4,fp4,int8 '%s' --json '%s'", model, json_path);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(out, "quantizer");
    ck_assert_contains(out, "rel.error");
    ck_assert_contains(out, "\nnf4 ");
    ck_assert_contains(out, "\nfp4 ");
    ck_assert_contains(out, "\nint8 ");
    ck_assert_contains(out, "model.layers.4.self_attn.v_proj"); /* per-layer rows */
    ck_assert_contains(err, "wrote ");
    free(out);
    free(err);
    assert_dir_is(parent, "cmp.json");

    json_t *j = load_json_file(json_path);
    json_t *qs = json_object_get(j, "quantizers");
    ck_assert_uint_eq(json_array_size(qs), 3);
    size_t i;
    json_t *q;
    json_array_foreach(qs, i, q) {
        ck_assert_uint_eq(json_array_size(json_object_get(q, "layers")), N_LINEARS);
        ck_assert_int_eq(json_integer_value(json_object_get(q, "params")), N_PARAMS);
    }
    json_t *nf4 = find_by_name(qs, "nf4"), *fp4 = find_by_name(qs, "fp4"), *int8 = find_by_name(qs, "int8");
    ck_assert_str_eq(json_string_value(json_object_get(nf4, "options")), "blocksize=64,double_quant=1");
    double nf4_bpp = json_number_value(json_object_get(nf4, "matrix_bits_per_param"));
    ck_assert_msg(nf4_bpp >= 5.6 && nf4_bpp <= 5.8, "nf4 matrix bits/param %g", nf4_bpp);
    /* 4 bits a weight, an 8-bit absmax per 64, a float32 nested absmax per 256 blocks,
     * the 16- and 256-entry float32 code tables and the quant_state JSON: 11008
     * weights have 172 blocks, one nested block */
    json_t *first = json_array_get(json_object_get(nf4, "layers"), 0);
    ck_assert_str_eq(json_string_value(json_object_get(first, "name")), "model.layers.0.mlp.down_proj");
    json_int_t stored = json_integer_value(json_object_get(first, "stored_bytes"));
    ck_assert_msg(stored >= 11008 / 2 + 172 + 4 + 64 + 1024 + 150 && stored <= 11008 / 2 + 172 + 4 + 64 + 1024 + 180,
                  "stored bytes %lld", (long long)stored);
    ck_assert_double_eq_tol(json_number_value(json_object_get(first, "matrix_bits_per_param")),
                            8.0 * (double)stored / 11008, 1e-9);
    double int8_bpp = json_number_value(json_object_get(int8, "matrix_bits_per_param"));
    ck_assert_msg(int8_bpp > 8.0 && int8_bpp < 8.5, "int8 matrix bits/param %g", int8_bpp);
    double e_nf4 = json_number_value(json_object_get(nf4, "rel_error"));
    double e_fp4 = json_number_value(json_object_get(fp4, "rel_error"));
    double e_int8 = json_number_value(json_object_get(int8, "rel_error"));
    ck_assert_msg(e_int8 > 0 && e_int8 < e_nf4 && e_nf4 < e_fp4, "rel errors int8 %g nf4 %g fp4 %g", e_int8, e_nf4,
                  e_fp4);
    ck_assert_msg(e_nf4 > 0.05 && e_nf4 < 0.12, "nf4 rel error %g", e_nf4);
    ck_assert_msg(e_int8 < 0.01, "int8 rel error %g", e_int8);
    json_decref(j);

    /* a bad name fails before any work, and no JSON is written */
    char *json2 = join(parent, "cmp2.json");
    st = qlora(&out, &err, "compare --quiet --quantizers=nf4,nosuch '%s' --json '%s'", model, json2);
    ck_assert_int_ne(st, 0);
    ck_assert_contains(err, "unknown quantizer 'nosuch'");
    ck_assert(!ql_path_exists(json2));
    free(out);
    free(err);
    free(json2);
    ql_remove_tree(parent);
    free(json_path);
    free(parent);
    free(model);
}
END_TEST

/* Bits per parameter mean one thing in every command (docs/writing-a-quantizer.md,
 * "Bits per parameter"): the matrix figure is every byte stored for the quantized
 * matrices over their parameters, the model figure every tensor byte of the file
 * over all parameters; both are counted here from the file's own tensor sizes. */
static const char *const bpp_specs[] = {"nf4", "nf4:double_quant=0", "fp4", "int8"};

static double figure_after(const char *text, const char *label)
{
    const char *p = strstr(text, label);
    ck_assert_msg(p != NULL, "no '%s' in:\n%s", label, text);
    double v = NAN;
    ck_assert_int_eq(sscanf(p + strlen(label), "%lf", &v), 1);
    return v;
}

static int under_layer(const char *name, char *layer, size_t cap)
{
    for (int i = 0; i < N_LINEARS; i++) {
        linear_name(i, "", layer, cap);
        if (!strncmp(name, layer, strlen(layer))) {
            layer[strlen(layer) - 1] = '\0'; /* without the dot */
            return 1;
        }
    }
    return 0;
}

START_TEST(test_bits_per_param_agree)
{
    const char *spec = bpp_specs[_i];
    char *model = model_dir();
    char *parent = fresh_dir();
    char *dest = join(parent, "out");
    char *cmp_path = join(parent, "cmp.json");
    char *out, *err;

    /* the count, from the files: parameters from the original's shapes, bytes from the quantized file's */
    ql_st_file *in = open_st(model);
    int64_t all_params = 0, q_params = 0;
    char layer[256];
    for (size_t i = 0; i < ql_st_count(in); i++) {
        const ql_tensor *t = ql_st_at(in, i);
        int64_t numel = ql_shape_numel(t->shape, t->ndim);
        all_params += numel;
        if (strstr(t->name, "_proj.weight")) q_params += numel;
    }
    ql_st_close(in);
    ck_assert_int_eq(q_params, N_PARAMS);

    int st = qlora(&out, &err, "quantize --quiet --quantizer=%s '%s' -o '%s'", spec, model, dest);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    double quantize_matrix = figure_after(out, "matrix bits/param: ");
    double quantize_model = figure_after(out, "model bits/param: ");
    free(out);
    free(err);

    ql_st_file *f = open_st(dest);
    uint64_t all_bytes = 0, q_bytes = 0, down_bytes = 0;
    for (size_t i = 0; i < ql_st_count(f); i++) {
        const ql_tensor *t = ql_st_at(f, i);
        all_bytes += t->nbytes;
        if (under_layer(t->name, layer, sizeof layer)) {
            q_bytes += t->nbytes;
            if (!strcmp(layer, "model.layers.0.mlp.down_proj")) down_bytes += t->nbytes;
        }
    }
    ql_st_close(f);
    const double want_matrix = 8.0 * (double)q_bytes / (double)q_params;
    const double want_model = 8.0 * (double)all_bytes / (double)all_params;
    const double want_down = 8.0 * (double)down_bytes / (64.0 * 172.0);
    ck_assert_msg(want_model > want_matrix, "%s: model %g, matrices %g", spec, want_model, want_matrix);

    /* quantize prints both, to three decimals */
    ck_assert_msg(fabs(quantize_matrix - want_matrix) <= 0.0005, "%s: quantize says matrix %g, the file %g", spec,
                  quantize_matrix, want_matrix);
    ck_assert_msg(fabs(quantize_model - want_model) <= 0.0005, "%s: quantize says model %g, the file %g", spec,
                  quantize_model, want_model);

    /* inspect: the same two figures, and per layer */
    st = qlora(&out, &err, "inspect --json '%s'", dest);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    json_t *j = parse_json(out);
    ck_assert_ptr_null(json_object_get(j, "bits_per_param"));
    ck_assert_double_eq_tol(json_number_value(json_object_get(j, "matrix_bits_per_param")), want_matrix, 1e-9);
    ck_assert_double_eq_tol(json_number_value(json_object_get(j, "model_bits_per_param")), want_model, 1e-9);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "model_params")), all_params);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "tensor_bytes")), (json_int_t)all_bytes);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "quantized_stored_bytes")), (json_int_t)q_bytes);
    json_t *down = json_array_get(json_object_get(j, "quantized_layers"), 0);
    ck_assert_str_eq(json_string_value(json_object_get(down, "layer")), "model.layers.0.mlp.down_proj");
    ck_assert_double_eq_tol(json_number_value(json_object_get(down, "matrix_bits_per_param")), want_down, 1e-9);
    json_decref(j);
    free(out);
    free(err);
    st = qlora(&out, &err, "inspect '%s'", dest);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_double_eq_tol(figure_after(out, "matrix bits/param: "), quantize_matrix, 1e-9);
    ck_assert_double_eq_tol(figure_after(out, "model bits/param: "), quantize_model, 1e-9);
    free(out);
    free(err);

    /* compare quantizes in memory: the same bytes, so the same figures */
    st = qlora(&out, &err, "compare --quiet --quantizers=%s '%s' --json '%s'", spec, model, cmp_path);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(out, "matrix bits");
    ck_assert_contains(out, "model bits");
    free(out);
    free(err);
    j = load_json_file(cmp_path);
    json_t *q = json_array_get(json_object_get(j, "quantizers"), 0);
    ck_assert_ptr_null(json_object_get(q, "bits_per_param"));
    ck_assert_double_eq_tol(json_number_value(json_object_get(q, "matrix_bits_per_param")), want_matrix, 1e-9);
    ck_assert_double_eq_tol(json_number_value(json_object_get(q, "model_bits_per_param")), want_model, 1e-9);
    ck_assert_int_eq(json_integer_value(json_object_get(q, "stored_bytes")), (json_int_t)q_bytes);
    down = json_array_get(json_object_get(q, "layers"), 0);
    ck_assert_double_eq_tol(json_number_value(json_object_get(down, "matrix_bits_per_param")), want_down, 1e-9);
    json_decref(j);

    /* quantizers predicts a matrix of that shape from the options alone: exact
     * but for the characters of bitsandbytes' nested offset in its JSON, which
     * only double quant writes */
    st = qlora(&out, &err, "quantizers --quantizer=%s --shape 64x172 --json", spec);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    j = parse_json(out);
    ck_assert_uint_eq(json_array_size(j), 1);
    double predicted = json_number_value(json_object_get(json_array_get(j, 0), "matrix_bits_per_param"));
    int offset_text = !strcmp(spec, "nf4") || !strcmp(spec, "fp4");
    ck_assert_msg(fabs(predicted - want_down) <= (offset_text ? 8.0 * 4 / (64.0 * 172.0) : 1e-9),
                  "%s: quantizers says %.6f for 64x172, the file %.6f", spec, predicted, want_down);
    json_decref(j);
    free(out);
    free(err);

    ql_remove_tree(parent);
    free(cmp_path);
    free(dest);
    free(parent);
    free(model);
}
END_TEST

/* ---- refusals ---- */

START_TEST(test_output_exists_and_force)
{
    char *model = model_dir();
    char *parent = fresh_dir();
    char *dest = join(parent, "out");
    ck_assert_int_eq(ql_mkdir_p(dest), QL_OK);
    char *marker = join(dest, "keep.txt");
    spit(marker, "mine", 4);
    char *out, *err;
    int st = qlora(&out, &err, "quantize --quiet '%s' -o '%s'", model, dest);
    ck_assert_int_eq(st, QL_EEXIST);
    ck_assert_contains(err, dest);
    ck_assert_contains(err, "already exists");
    ck_assert_contains(err, "--force");
    free(out);
    free(err);
    assert_dir_is(dest, "keep.txt");
    assert_dir_is(parent, "out");

    /* --force replaces only an earlier qlora output of the same kind (tests/test_outputs.c has the refusals) */
    ck_assert_int_eq(ql_output_mark(dest, "quantized-model"), QL_OK);
    st = qlora(&out, &err, "quantize --quiet --force '%s' -o '%s'", model, dest);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    free(out);
    free(err);
    assert_dir_is(dest, ".qlora-output config.json model.safetensors tokenizer.json tokenizer_config.json");
    assert_dir_is(parent, "out");
    free(marker);
    ql_remove_tree(parent);
    free(dest);
    free(parent);
    free(model);
}
END_TEST

START_TEST(test_unknown_quantizer)
{
    char *model = model_dir();
    char *parent = fresh_dir();
    char *dest = join(parent, "out");
    char *out, *err;
    int st = qlora(&out, &err, "quantize --quiet --quantizer=nosuch '%s' -o '%s'", model, dest);
    ck_assert_int_eq(st, QL_ENOTFOUND);
    ck_assert_contains(err, "unknown quantizer 'nosuch'");
    ck_assert_contains(err, "qlora_nosuch.so");
    /* it says where it looked and what it found there */
    char where[1024];
    snprintf(where, sizeof where, "%s (found: ", tu_env("QLORA_PLUGIN_PATH"));
    const char *found = strstr(err, where);
    ck_assert_msg(found != NULL, "no \"%s\" in:\n%s", where, err);
    char list_buf[512];
    sscanf(found + strlen(where), "%511[^)]", list_buf);
    const char *list = list_buf;
    ck_assert_contains(list, "nf4");
    ck_assert_contains(list, "fp4");
    ck_assert_contains(list, "int8");
    ck_assert_contains(err, "QLORA_PLUGIN_PATH");
    free(out);
    free(err);
    assert_dir_is(parent, "");

    st = qlora(&out, &err, "quantize --quiet '--quantizer=Bad Name' '%s' -o '%s'", model, dest);
    ck_assert_int_ne(st, 0);
    ck_assert_contains(err, "'Bad Name' is not a quantizer name");
    free(out);
    free(err);
    assert_dir_is(parent, "");
    ql_remove_tree(parent);
    free(dest);
    free(parent);
    free(model);
}
END_TEST

START_TEST(test_plugin_path_missing)
{
    char *model = model_dir();
    char *parent = fresh_dir();
    char *dest = join(parent, "out");
    char *plugin = join(parent, "qlora_missing.so");
    char *out, *err;
    int st = qlora(&out, &err, "quantize --quiet '--quantizer=%s' '%s' -o '%s'", plugin, model, dest);
    ck_assert_int_eq(st, QL_ENOTFOUND);
    char want[1024];
    snprintf(want, sizeof want, "plugin file %s does not exist", plugin);
    ck_assert_contains(err, want);
    free(out);
    free(err);
    assert_dir_is(parent, "");
    free(plugin);
    ql_remove_tree(parent);
    free(dest);
    free(parent);
    free(model);
}
END_TEST

START_TEST(test_plugin_not_a_shared_object)
{
    char *model = model_dir();
    char *parent = fresh_dir();
    char *dest = join(parent, "out");
    char *junk = join(parent, "junk.so");
    char text[512];
    memset(text, 0, sizeof text);
    for (size_t i = 0; i + 1 < sizeof text; i++) text[i] = "this is not a shared object\n"[i % 28];
    spit(junk, text, strlen(text));
    /* what the dynamic loader itself says about this file */
    void *h = dlopen(junk, RTLD_NOW | RTLD_LOCAL);
    ck_assert_ptr_null(h);
    char dl_msg[1024];
    snprintf(dl_msg, sizeof dl_msg, "%s", dlerror());

    char *out, *err;
    int st = qlora(&out, &err, "quantize --quiet '--quantizer=%s' '%s' -o '%s'", junk, model, dest);
    ck_assert_int_eq(st, QL_EIO);
    char want[1024];
    snprintf(want, sizeof want, "cannot load plugin %s: ", junk);
    ck_assert_contains(err, want);
    ck_assert_contains(err, dl_msg);
    ck_assert_contains(err, "invalid ELF header");
    free(out);
    free(err);
    assert_dir_is(parent, "junk.so");
    free(junk);
    ql_remove_tree(parent);
    free(dest);
    free(parent);
    free(model);
}
END_TEST

START_TEST(test_bad_options)
{
    char *model = model_dir();
    char *parent = fresh_dir();
    char *dest = join(parent, "out");
    char *out, *err;
    int st = qlora(&out, &err, "quantize --quiet --quantizer=nf4:blocksize=100 '%s' -o '%s'", model, dest);
    ck_assert_int_eq(st, QL_EINVAL);
    ck_assert_contains(err, "quantizer nf4");
    ck_assert_contains(err, "blocksize=100");
    free(out);
    free(err);
    st = qlora(&out, &err, "quantize --quiet --quantizer=nf4:foo=1 '%s' -o '%s'", model, dest);
    ck_assert_int_eq(st, QL_EINVAL);
    ck_assert_contains(err, "unknown option 'foo'");
    free(out);
    free(err);
    st = qlora(&out, &err, "quantize --quiet --quantizer=nf4:blocksize '%s' -o '%s'", model, dest);
    ck_assert_int_ne(st, 0);
    ck_assert_contains(err, "blocksize");
    free(out);
    free(err);
    assert_dir_is(parent, "");
    ql_remove_tree(parent);
    free(dest);
    free(parent);
    free(model);
}
END_TEST

START_TEST(test_bad_model_folders)
{
    char *real = model_dir();
    char *parent = fresh_dir();
    char *dest = join(parent, "out");
    char *model = join(parent, "model");
    char *out, *err;

    /* no such folder */
    int st = qlora(&out, &err, "quantize --quiet '%s' -o '%s'", model, dest);
    ck_assert_int_eq(st, QL_ENOTFOUND);
    char want[1024];
    snprintf(want, sizeof want, "model folder %s does not exist", model);
    ck_assert_contains(err, want);
    free(out);
    free(err);

    /* no config.json */
    ck_assert_int_eq(ql_mkdir_p(model), QL_OK);
    char *cfg = join(model, "config.json"), *st_path = join(model, "model.safetensors");
    char *real_st = join(real, "model.safetensors"), *real_cfg = join(real, "config.json");
    ck_assert_int_eq(ql_copy_file_atomic(real_st, st_path), QL_OK);
    st = qlora(&out, &err, "quantize --quiet '%s' -o '%s'", model, dest);
    ck_assert_int_eq(st, QL_ENOTFOUND);
    snprintf(want, sizeof want, "%s is missing", cfg);
    ck_assert_contains(err, want);
    free(out);
    free(err);

    /* config.json is not JSON */
    spit(cfg, "{\"model_type\": \"llama\",", 23);
    st = qlora(&out, &err, "quantize --quiet '%s' -o '%s'", model, dest);
    ck_assert_int_eq(st, QL_EFORMAT);
    snprintf(want, sizeof want, "%s is not valid JSON", cfg);
    ck_assert_contains(err, want);
    free(out);
    free(err);

    /* config.json is JSON but not an object */
    spit(cfg, "[1, 2]", 6);
    st = qlora(&out, &err, "quantize --quiet '%s' -o '%s'", model, dest);
    ck_assert_int_eq(st, QL_EFORMAT);
    ck_assert_contains(err, "is not a JSON object");
    free(out);
    free(err);

    /* model.safetensors cut to 100 bytes */
    ck_assert_int_eq(ql_copy_file_atomic(real_cfg, cfg), QL_OK);
    size_t len;
    char *data = slurp(real_st, &len);
    ck_assert_uint_gt(len, 100);
    spit(st_path, data, 100);
    free(data);
    st = qlora(&out, &err, "quantize --quiet '%s' -o '%s'", model, dest);
    ck_assert_int_eq(st, QL_EFORMAT);
    ck_assert_contains(err, st_path);
    ck_assert_contains(err, "not a valid safetensors file");
    ck_assert_contains(err, "runs past the end of the file (100 bytes)");
    free(out);
    free(err);

    /* neither model.safetensors nor an index */
    ck_assert_int_eq(unlink(st_path), 0);
    st = qlora(&out, &err, "quantize --quiet '%s' -o '%s'", model, dest);
    ck_assert_int_eq(st, QL_ENOTFOUND);
    ck_assert_contains(err, "has neither model.safetensors nor model.safetensors.index.json");
    free(out);
    free(err);

    assert_dir_is(parent, "model");
    free(cfg);
    free(st_path);
    free(real_st);
    free(real_cfg);
    ql_remove_tree(parent);
    free(model);
    free(dest);
    free(parent);
    free(real);
}
END_TEST

START_TEST(test_nonfinite_weights)
{
    static const struct {
        int dtype;
        const char *tensor;
        int64_t index;
        float value;
        const char *want;
    } cases[] = {
        {QL_DTYPE_F32, "model.layers.0.mlp.up_proj.weight", 37, NAN,
         "tensor model.layers.0.mlp.up_proj.weight has NaN at index 37"},
        {QL_DTYPE_F32, "model.layers.0.input_layernorm.weight", 5, INFINITY,
         "tensor model.layers.0.input_layernorm.weight has Inf at index 5"},
        {QL_DTYPE_BF16, "model.layers.0.mlp.up_proj.weight", 700, -INFINITY,
         "tensor model.layers.0.mlp.up_proj.weight has Inf at index 700"},
        {QL_DTYPE_F16, "model.layers.0.mlp.up_proj.weight", 0, NAN,
         "tensor model.layers.0.mlp.up_proj.weight has NaN at index 0"},
        /* finite in float32 but past float16's range: Inf once stored as F16 */
        {QL_DTYPE_F16, "model.layers.0.mlp.up_proj.weight", 12, 1.0e5f,
         "tensor model.layers.0.mlp.up_proj.weight has Inf at index 12"},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        char *parent = fresh_dir();
        char *model = join(parent, "model");
        char *dest = join(parent, "out");
        write_tiny_model(model, cases[k].dtype, cases[k].tensor, cases[k].index, cases[k].value);
        char *out, *err;
        int st = qlora(&out, &err, "quantize --quiet '%s' -o '%s'", model, dest);
        ck_assert_msg(st == QL_ENUMERIC, "case %zu: exit %d: %s", k, st, err);
        ck_assert_contains(err, cases[k].want);
        free(out);
        free(err);
        assert_dir_is(parent, "model");
        ql_remove_tree(parent);
        free(dest);
        free(model);
        free(parent);
    }
}
END_TEST

START_TEST(test_already_quantized)
{
    char *model = model_dir();
    char *parent = fresh_dir();
    char *first = join(parent, "once"), *second = join(parent, "twice");
    char *out, *err;
    int st = qlora(&out, &err, "quantize --quiet '%s' -o '%s'", model, first);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    free(out);
    free(err);
    st = qlora(&out, &err, "quantize --quiet '%s' -o '%s'", first, second);
    ck_assert_int_eq(st, QL_EFORMAT);
    ck_assert_contains(err, "tensor model.layers.0.mlp.down_proj.weight is U8, not F32/F16/BF16");
    ck_assert_contains(err, "already quantized");
    free(out);
    free(err);
    assert_dir_is(parent, "once");
    ql_remove_tree(parent);
    free(first);
    free(second);
    free(parent);
    free(model);
}
END_TEST

START_TEST(test_plugin_fails_midway)
{
    char *model = model_dir();
    char *parent = fresh_dir();
    char *dest = join(parent, "out");
    char *plugin = join(tu_env("QLORA_TEST_PLUGINS"), "qlora_bad_failquant.so");
    char *out, *err;
    int st = qlora(&out, &err, "quantize '--quantizer=%s' '%s' -o '%s'", plugin, model, dest);
    ck_assert_int_eq(st, QL_EINTERNAL);
    /* the third linear in name order is layer 0's up_proj */
    ck_assert_contains(err, "quantizer bad on model.layers.0.mlp.up_proj.weight");
    ck_assert_contains(err, "planned failure on call 3");
    ck_assert(!ql_path_exists(dest));
    assert_dir_is(parent, "");
    free(out);
    free(err);

    /* with --force an existing output survives the failed run untouched */
    ck_assert_int_eq(ql_mkdir_p(dest), QL_OK);
    char *marker = join(dest, "keep.txt");
    spit(marker, "mine", 4);
    ck_assert_int_eq(ql_output_mark(dest, "quantized-model"), QL_OK);
    st = qlora(&out, &err, "quantize --quiet --force '--quantizer=%s' '%s' -o '%s'", plugin, model, dest);
    ck_assert_int_eq(st, QL_EINTERNAL);
    ck_assert_contains(err, "planned failure on call 3");
    assert_dir_is(parent, "out");
    assert_dir_is(dest, ".qlora-output keep.txt");
    free(out);
    free(err);
    free(marker);
    free(plugin);
    ql_remove_tree(parent);
    free(dest);
    free(parent);
    free(model);
}
END_TEST

/* ---- the loader's ABI refusals ---- */

static const struct {
    const char *kind;
    const char *want[2];
} abi_cases[] = {
    {"major", {"abi_major is 99", "this qlora speaks ABI 1.3"}},
    {"minor", {"abi_minor is 99", "needs a newer qlora"}},
    {"size", {"struct_size is 40 bytes", "smaller than"}},
    {"nullslot", {"required slot 'quantize' is NULL", "plugin ABI 1.3, host 1.3"}},
    {"name", {"name 'Bad Name!'", "is not 1-63 characters of [a-z0-9_-]"}},
    {"noentry", {"does not export ql_quantizer_entry()", NULL}},
    {"nulldesc", {"ql_quantizer_entry() returned NULL", NULL}},
};

START_TEST(test_abi_refusal)
{
    char *model = model_dir();
    char *parent = fresh_dir();
    char *dest = join(parent, "out");
    char file[64];
    snprintf(file, sizeof file, "qlora_bad_%s.so", abi_cases[_i].kind);
    char *plugin = join(tu_env("QLORA_TEST_PLUGINS"), file);
    ck_assert_msg(ql_path_exists(plugin), "%s was not built", plugin);
    char *out, *err;
    int st = qlora(&out, &err, "quantize --quiet '--quantizer=%s' '%s' -o '%s'", plugin, model, dest);
    ck_assert_msg(st == QL_EABI, "%s: exit %d: %s", abi_cases[_i].kind, st, err);
    char want[1024];
    snprintf(want, sizeof want, "plugin %s", plugin);
    ck_assert_contains(err, want);
    for (int k = 0; k < 2; k++)
        if (abi_cases[_i].want[k]) ck_assert_contains(err, abi_cases[_i].want[k]);
    free(out);
    free(err);
    assert_dir_is(parent, "");
    free(plugin);
    ql_remove_tree(parent);
    free(dest);
    free(parent);
    free(model);
}
END_TEST

/* ---- input readers (issue 6) ---- */

/* A copy of stories260K in a fresh folder (config.json, weights, tokenizer files). */
static char *copy_stories(const char *parent, const char *name)
{
    char *real = model_dir(), *dir = join(parent, name);
    ck_assert_int_eq(ql_mkdir_p(dir), QL_OK);
    static const char *const files[] = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"};
    for (size_t i = 0; i < 4; i++) {
        char *a = join(real, files[i]), *b = join(dir, files[i]);
        ck_assert_int_eq(ql_copy_file_atomic(a, b), QL_OK);
        free(a);
        free(b);
    }
    free(real);
    return dir;
}

static void write_text_file(const char *dir, const char *name, const char *text, size_t len)
{
    char *p = join(dir, name);
    spit(p, text, len);
    free(p);
}

/* `eval --mmlu` on a test CSV `csv` (len bytes) beside a good dev CSV: exits
 * non-zero with a message naming the file and `needle`. */
static void mmlu_refuses(const char *model, const char *root, const char *csv, size_t len, const char *needle)
{
    char *test = join(root, "test");
    write_text_file(test, "x_test.csv", csv, len);
    char *out, *err;
    int st = qlora(&out, &err, "eval --model '%s' --mmlu '%s' --shots 1 --quiet", model, root);
    ck_assert_msg(st == QL_EFORMAT, "exit %d for test csv \"%.*s\": %s", st, (int)len, csv, err);
    char *file = join(test, "x_test.csv");
    ck_assert_contains(err, file);
    ck_assert_contains(err, needle);
    free(file);
    free(test);
    free(out);
    free(err);
}

/* qlora.py's MMLU on stories260K, whose tokenizer encodes "A", "C" and "D" as
 * the lone space piece then the letter: scoring by the first ids (shared) would
 * answer one letter always, so each letter's last token is scored, and a
 * warning says so.  --split picks the folder; prompts_with_fewer_shots counts
 * prompts (not dropped shots) and a warning says --shots was not honoured. */
START_TEST(test_mmlu_letters_split_shots)
{
    char *model = model_dir(), *root = fresh_dir();
    char *dev = join(root, "dev"), *val = join(root, "val"), *test = join(root, "test");
    ck_assert_int_eq(ql_mkdir_p(dev), QL_OK);
    ck_assert_int_eq(ql_mkdir_p(val), QL_OK);
    ck_assert_int_eq(ql_mkdir_p(test), QL_OK);
    const char *short_dev = "q one,a,b,c,d,1\nq two,a,b,c,d,2\n";
    write_text_file(dev, "x_dev.csv", short_dev, strlen(short_dev));
    const char *one = "t,a,b,c,d,0\n", *three = "v one,a,b,c,d,0\nv two,a,b,c,d,3\nv three,a,b,c,d,1\n";
    write_text_file(test, "x_test.csv", one, strlen(one));
    write_text_file(val, "x_val.csv", three, strlen(three));
    char *out, *err;
    ck_assert_msg(qlora(&out, &err, "eval --model '%s' --mmlu '%s' --shots 1 --split val --quiet", model, root) == 0, "%s",
                  err);
    json_t *res = parse_json(out); /* the one stdout line with --quiet */
    ck_assert_str_eq(json_string_value(json_object_get(res, "mmlu_split")), "val");
    ck_assert_int_eq(json_integer_value(json_object_get(res, "questions")), 3);
    ck_assert_int_eq(json_integer_value(json_object_get(res, "prompts_with_fewer_shots")), 0);
    ck_assert_str_eq(json_string_value(json_object_get(res, "answer_tokens")), "last");
    json_t *ids = json_object_get(res, "answer_token_ids");
    ck_assert_uint_eq(json_array_size(ids), 4);
    for (size_t a = 0; a < 4; a++)
        for (size_t b = a + 1; b < 4; b++)
            ck_assert_msg(json_integer_value(json_array_get(ids, a)) != json_integer_value(json_array_get(ids, b)),
                          "letters %zu and %zu are scored by one token: %s", a, b, out);
    ck_assert_contains(err, "warning: MMLU: the answer letters are not four distinct single tokens");
    ck_assert_contains(err, "their first tokens are shared; scoring each letter by its last token");
    ck_assert(strstr(err, "fewer than --shots") == NULL);
    json_decref(res);
    free(out), free(err);
    /* the old name of the flag, and the default split */
    ck_assert_msg(qlora(&out, &err, "eval --model '%s' --mmlu '%s' --shots 1 --mmlu-split val --quiet", model, root) == 0,
                  "%s", err);
    ck_assert_contains(out, "\"questions\": 3");
    free(out), free(err);
    ck_assert_msg(qlora(&out, &err, "eval --model '%s' --mmlu '%s' --shots 1 --quiet", model, root) == 0, "%s", err);
    ck_assert_contains(out, "\"mmlu_split\": \"test\", \"shots\": 1, \"subjects\": 1, \"questions\": 1,");
    free(out), free(err);
    assert_usage_error("eval --model m --data d --split val", "qlora: eval: --split NAME is for --mmlu only (see 'qlora eval --help')\n");
    /* --mmlu-no-reuse: every prompt whole, the same scores */
    ck_assert_msg(qlora(&out, &err, "eval --model '%s' --mmlu '%s' --shots 1 --split val --quiet", model, root) == 0, "%s", err);
    json_t *with = parse_json(out);
    free(out), free(err);
    ck_assert_msg(qlora(&out, &err, "eval --model '%s' --mmlu '%s' --shots 1 --split val --mmlu-no-reuse --quiet", model,
                        root) == 0, "%s", err);
    json_t *without = parse_json(out);
    ck_assert_int_gt(json_integer_value(json_object_get(with, "tokens_reused")), 0);
    ck_assert_int_eq(json_integer_value(json_object_get(without, "tokens_reused")), 0);
    ck_assert(json_equal(json_object_get(with, "per_subject"), json_object_get(without, "per_subject")));
    ck_assert_double_eq(json_number_value(json_object_get(with, "accuracy")),
                        json_number_value(json_object_get(without, "accuracy")));
    json_decref(with), json_decref(without);
    free(out), free(err);
    assert_usage_error("eval --model m --data d --mmlu-no-reuse",
                       "qlora: eval: --mmlu-no-reuse is for --mmlu only (see 'qlora eval --help')\n");
    /* a tokenizer with a token of its own for each letter is scored as qlora.py does, by the first ids, and
     * silently; one whose letters share every token is refused */
    char *llama = join(tu_env("QLORA_SOURCE_ROOT"), "tests/reference/hf_models/llama");
    ck_assert_msg(qlora(&out, &err, "eval --model '%s' --mmlu '%s' --shots 0 --quiet", llama, root) == 0, "%s", err);
    res = parse_json(out);
    ck_assert_str_eq(json_string_value(json_object_get(res, "answer_tokens")), "first");
    ck_assert(strstr(err, "answer letters") == NULL);
    json_decref(res);
    free(out), free(err), free(llama);
    char *qwen2 = join(tu_env("QLORA_SOURCE_ROOT"), "tests/reference/hf_models/qwen2");
    ck_assert_int_ne(qlora(&out, &err, "eval --model '%s' --mmlu '%s' --shots 0 --quiet", qwen2, root), 0);
    ck_assert_contains(err, "MMLU: the tokenizer gives the answer letters no four distinct tokens");
    free(out), free(err), free(qwen2);

    /* dev questions of about 120 tokens each: 5 shots do not fit 512
     * positions, 3 do, so each of the 2 prompts drops 2 shots */
    char long_dev[4096] = "";
    for (int i = 0; i < 5; i++) {
        size_t k = strlen(long_dev);
        fmt(long_dev + k, sizeof long_dev - k, "Question %d:", i);
        for (int w = 0; w < 20; w++) {
            k = strlen(long_dev);
            fmt(long_dev + k, sizeof long_dev - k, " word%d", (i * 20 + w) * 7919 % 1000);
        }
        k = strlen(long_dev);
        fmt(long_dev + k, sizeof long_dev - k, "?,a,b,c,d,%d\n", i % 4);
    }
    write_text_file(dev, "x_dev.csv", long_dev, strlen(long_dev));
    const char *two = "t one,a,b,c,d,0\nt two,a,b,c,d,1\n";
    write_text_file(test, "x_test.csv", two, strlen(two));
    ck_assert_msg(qlora(&out, &err, "eval --model '%s' --mmlu '%s' --shots 5 --quiet", model, root) == 0, "%s", err);
    res = parse_json(out);
    ck_assert_int_eq(json_integer_value(json_object_get(res, "questions")), 2);
    ck_assert_int_eq(json_integer_value(json_object_get(res, "prompts_with_fewer_shots")), 2);
    ck_assert_int_eq(json_integer_value(json_object_get(res, "prompts_truncated")), 0);
    ck_assert_contains(err, "warning: MMLU: 2 of 2 prompts have fewer than --shots 5 dev questions");
    json_decref(res);
    free(out), free(err);
    free(dev), free(val), free(test), free(root), free(model);
}
END_TEST

START_TEST(test_mmlu_bad_csv)
{
    char *model = model_dir(), *root = fresh_dir();
    char *dev = join(root, "dev"), *test = join(root, "test");
    ck_assert_int_eq(ql_mkdir_p(dev), QL_OK);
    ck_assert_int_eq(ql_mkdir_p(test), QL_OK);
    const char *good = "q one,a,b,c,d,1\nq two,a,b,c,d,2\n";
    write_text_file(dev, "x_dev.csv", good, strlen(good));
    /* the reference: the same files score */
    write_text_file(test, "x_test.csv", good, strlen(good));
    char *out, *err;
    ck_assert_msg(qlora(&out, &err, "eval --model '%s' --mmlu '%s' --shots 1 --quiet", model, root) == 0, "%s", err);
    ck_assert_contains(out, "\"questions\": 2");
    free(out);
    free(err);
    /* an unterminated quote (was a double free) */
    const char *unterminated = "q one,a,b,c,d,1\na,\"";
    mmlu_refuses(model, root, unterminated, strlen(unterminated), "record 2 has a quoted field that is never closed");
    /* extra fields are not dropped */
    const char *eight = "q one,a,b,c,d,1,extra,more\n";
    mmlu_refuses(model, root, eight, strlen(eight), "record 1 has 8 fields, expected question,choice0..3,answer");
    /* a NUL byte does not cut the field */
    const char nul[] = "q one,a,b,c,d,1\nq\0two,a,b,c,d,2\n";
    mmlu_refuses(model, root, nul, sizeof nul - 1, "record 2 has a NUL byte in a field");
    /* no questions: not an accuracy of 0 over 0 */
    mmlu_refuses(model, root, "", 0, "holds no questions");
    const char *header = "question,choice0,choice1,choice2,choice3,answer\n";
    mmlu_refuses(model, root, header, strlen(header), "holds no questions");
    /* the dev file is read the same way */
    write_text_file(test, "x_test.csv", good, strlen(good));
    write_text_file(dev, "x_dev.csv", unterminated, strlen(unterminated));
    ck_assert_int_eq(qlora(&out, &err, "eval --model '%s' --mmlu '%s' --shots 1 --quiet", model, root), QL_EFORMAT);
    ck_assert_contains(err, "x_dev.csv: record 2 has a quoted field that is never closed");
    free(out);
    free(err);
    free(dev);
    free(test);
    free(root);
    free(model);
}
END_TEST

START_TEST(test_generate_max_new_tokens_zero)
{
    char *model = model_dir(), *out, *err;
    ck_assert_int_eq(qlora(&out, &err, "generate --model '%s' --prompt 'Once' --max-new-tokens 0", model), 2);
    ck_assert_contains(err, "--max-new-tokens=0: expected an integer from 1 to");
    ck_assert(!tu_contains(err, "prompt"));
    free(out);
    free(err);
    ck_assert_msg(qlora(&out, &err, "generate --model '%s' --prompt 'Once' --max-new-tokens 1", model) == 0, "%s", err);
    free(out);
    free(err);
    free(model);
}
END_TEST

/* config.json fields of the wrong type or out of range: an error naming
 * config.json and the field, whichever command reads it. */
START_TEST(test_config_fields_checked)
{
    char *parent = fresh_dir();
    char *model = copy_stories(parent, "model");
    char *cfg_path = join(model, "config.json");
    char *data = join(tu_env("QLORA_SHARED"), "data/alpaca/alpaca_en_demo.json");
    static const struct {
        const char *key, *value, *needle;
    } cases[] = {
        {"eos_token_id", "\"2\"", "config.json: \"eos_token_id\" must be an integer token id"},
        {"eos_token_id", "512", "config.json: \"eos_token_id\" 512 is outside the vocabulary (vocab_size 512)"},
        {"bos_token_id", "-1", "config.json: \"bos_token_id\" -1 is outside the vocabulary"},
        {"bos_token_id", "[1]", "config.json: \"bos_token_id\" must be an integer token id"},
        {"tie_word_embeddings", "\"true\"", "config.json: \"tie_word_embeddings\" must be true or false"},
        {"sliding_window", "-4", "config.json: \"sliding_window\" must be null or a non-negative integer"},
        {"hidden_act", "\"gelu\"", "config.json: hidden_act 'gelu' is not supported"},
        {"model_type", "7", "config.json: \"model_type\" must be a string"},
        {"architectures", "\"LlamaForCausalLM\"", "config.json: \"architectures\" must be a list of names"},
        {"rms_norm_eps", "\"1e-5\"", "config.json: \"rms_norm_eps\" must be a positive number"},
        {"num_attention_heads", "128", "hidden_size 64 is smaller than num_attention_heads 128"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        json_t *cfg = load_json_file(cfg_path);
        json_error_t jerr;
        json_t *v = json_loads(cases[i].value, JSON_DECODE_ANY, &jerr);
        ck_assert_ptr_nonnull(v);
        json_object_set_new(cfg, cases[i].key, v);
        ck_assert_int_eq(json_dump_file(cfg, cfg_path, JSON_INDENT(2)), 0);
        json_decref(cfg);
        char *out, *err;
        int st = qlora(&out, &err, "generate --model '%s' --prompt 'Once' --max-new-tokens 2", model);
        ck_assert_msg(st != 0 && tu_contains(err, cases[i].needle), "%s = %s: exit %d, stderr:\n%s", cases[i].key,
                      cases[i].value, st, err);
        free(out);
        free(err);
        st = qlora(&out, &err, "eval --model '%s' --data '%s' --format alpaca --max-examples 1 --quiet", model, data);
        ck_assert_msg(st != 0 && tu_contains(err, cases[i].needle), "eval with %s = %s: exit %d, stderr:\n%s",
                      cases[i].key, cases[i].value, st, err);
        free(out);
        free(err);
        /* back to the original */
        char *real = model_dir(), *real_cfg = join(real, "config.json");
        ck_assert_int_eq(ql_copy_file_atomic(real_cfg, cfg_path), QL_OK);
        free(real_cfg);
        free(real);
    }
    free(data);
    free(cfg_path);
    free(model);
    free(parent);
}
END_TEST

/* A FIFO as --data, --eval-data or a tokenizer file: refused at once, no hang
 * (`timeout` turns a hang into exit 124). */
START_TEST(test_fifo_inputs_refused)
{
    char *parent = fresh_dir();
    char *model = model_dir();
    char *fifo = join(parent, "data.json");
    ck_assert_int_eq(mkfifo(fifo, 0600), 0);
    char *data = join(tu_env("QLORA_SHARED"), "data/alpaca/alpaca_en_demo.json");
    char cmd[8192];
    char *out, *err;
    const char *const forms[] = {
        "eval --model '%s' --data '%s' --format alpaca --quiet",
        "train --model '%s' --data '%s' --format alpaca --steps 1 --quiet --output '%s/run1'",
        "train --model '%s' --data '%s' --eval-data '%s' --eval-steps 1 --format alpaca --steps 1 --quiet --output '%s/run2'",
    };
    for (int i = 0; i < 3; i++) {
        char args[4096];
        if (i == 0) snprintf(args, sizeof args, forms[0], model, fifo);
        else if (i == 1) snprintf(args, sizeof args, forms[1], model, fifo, parent);
        else snprintf(args, sizeof args, forms[2], model, data, fifo, parent);
        snprintf(cmd, sizeof cmd, "timeout 30 '%s' %s", tu_env("QLORA_BIN"), args);
        int st = tu_run(cmd, &out, &err);
        ck_assert_msg(st != 0 && st != 124, "%s: exit %d", args, st);
        ck_assert_contains(err, fifo);
        ck_assert_contains(err, "is not a regular file");
        free(out);
        free(err);
    }
    /* MMLU files and the tokenizer of a model folder */
    char *root = join(parent, "mmlu"), *dev = join(root, "dev"), *test = join(root, "test");
    ck_assert_int_eq(ql_mkdir_p(dev), QL_OK);
    ck_assert_int_eq(ql_mkdir_p(test), QL_OK);
    write_text_file(dev, "x_dev.csv", "q,a,b,c,d,1\n", 12);
    char *csv = join(test, "x_test.csv");
    ck_assert_int_eq(mkfifo(csv, 0600), 0);
    snprintf(cmd, sizeof cmd, "timeout 30 '%s' eval --model '%s' --mmlu '%s' --shots 1 --quiet", tu_env("QLORA_BIN"),
             model, root);
    int st = tu_run(cmd, &out, &err);
    ck_assert_msg(st != 0 && st != 124, "mmlu: exit %d", st);
    ck_assert_contains(err, csv);
    ck_assert_contains(err, "is not a regular file");
    free(out);
    free(err);
    char *copy = copy_stories(parent, "model");
    char *tj = join(copy, "tokenizer.json");
    unlink(tj);
    ck_assert_int_eq(mkfifo(tj, 0600), 0);
    snprintf(cmd, sizeof cmd, "timeout 30 '%s' generate --model '%s' --prompt x --max-new-tokens 1", tu_env("QLORA_BIN"),
             copy);
    st = tu_run(cmd, &out, &err);
    ck_assert_msg(st != 0 && st != 124, "generate: exit %d", st);
    ck_assert_contains(err, tj);
    ck_assert_contains(err, "is not a regular file");
    free(out);
    free(err);
    /* config.json too (read by the model loader) */
    char *real = model_dir(), *real_tj = join(real, "tokenizer.json"), *cj = join(copy, "config.json");
    unlink(tj);
    ck_assert_int_eq(ql_copy_file_atomic(real_tj, tj), QL_OK);
    unlink(cj);
    ck_assert_int_eq(mkfifo(cj, 0600), 0);
    st = tu_run(cmd, &out, &err);
    ck_assert_msg(st != 0 && st != 124, "generate with a FIFO config.json: exit %d", st);
    ck_assert_contains(err, cj);
    ck_assert_contains(err, "is not a regular file");
    free(out);
    free(err);
    unlink(cj);
    free(cj);
    /* an adapter folder's adapter_config.json and run_config.json (read by eval --adapter) */
    const char *const adapter_files[] = {"adapter_config.json", "run_config.json"};
    for (int i = 0; i < 2; i++) {
        char name[32];
        snprintf(name, sizeof name, "adapter%d", i);
        char *ad = join(parent, name), *f = join(ad, adapter_files[i]);
        ck_assert_int_eq(ql_mkdir_p(ad), QL_OK);
        ck_assert_int_eq(mkfifo(f, 0600), 0);
        snprintf(cmd, sizeof cmd, "timeout 30 '%s' generate --model '%s' --adapter '%s' --prompt x --max-new-tokens 1",
                 tu_env("QLORA_BIN"), real, ad);
        st = tu_run(cmd, &out, &err);
        ck_assert_msg(st != 0 && st != 124, "generate with a FIFO %s: exit %d", adapter_files[i], st);
        ck_assert_contains(err, f);
        ck_assert_contains(err, "is not a regular file");
        free(out);
        free(err);
        unlink(f);
        free(f);
        free(ad);
    }
    free(real_tj);
    free(real);
    unlink(tj);
    unlink(csv);
    unlink(fifo);
    free(tj);
    free(copy);
    free(csv);
    free(root);
    free(dev);
    free(test);
    free(data);
    free(fifo);
    free(model);
    free(parent);
}
END_TEST

/* merge keeps a 0-d (scalar) F32 tensor of the base: shape [] is one element. */
START_TEST(test_merge_zero_dim_tensor)
{
    char *parent = fresh_dir();
    char *model = copy_stories(parent, "model");
    /* the base's tensors plus a scalar */
    char *st_path = join(model, "model.safetensors");
    ql_st_file *in;
    ck_assert_int_eq(ql_st_open(st_path, &in), QL_OK);
    ql_st_writer *w;
    ck_assert_int_eq(ql_st_writer_create(&w), QL_OK);
    for (size_t i = 0; i < ql_st_count(in); i++) ck_assert_int_eq(ql_st_writer_add(w, ql_st_at(in, i)), QL_OK);
    const float scalar = 0.625f;
    ql_tensor t0 = {.name = "model.extra_scale", .dtype = QL_DTYPE_F32, .ndim = 0, .data = &scalar, .nbytes = 4};
    ck_assert_int_eq(ql_st_writer_add(w, &t0), QL_OK);
    ck_assert_int_eq(ql_st_writer_save(w, st_path), QL_OK);
    ql_st_writer_destroy(w);
    ql_st_close(in);
    /* a PEFT adapter by hand: r 1 on q_proj of the 5 layers (64 x 64) */
    char *adapter = join(parent, "adapter");
    ck_assert_int_eq(ql_mkdir_p(adapter), QL_OK);
    const char *acfg = "{\"peft_type\": \"LORA\", \"r\": 1, \"lora_alpha\": 2, \"lora_dropout\": 0.0, "
                       "\"target_modules\": [\"q_proj\"], \"bias\": \"none\", \"task_type\": \"CAUSAL_LM\"}";
    write_text_file(adapter, "adapter_config.json", acfg, strlen(acfg));
    ck_assert_int_eq(ql_st_writer_create(&w), QL_OK);
    static float a[64], b[64];
    tu_randn(a, 64, 3, 0.1f);
    tu_randn(b, 64, 4, 0.1f);
    for (int l = 0; l < 5; l++) {
        char na[200], nb[200];
        snprintf(na, sizeof na, "base_model.model.model.layers.%d.self_attn.q_proj.lora_A.weight", l);
        snprintf(nb, sizeof nb, "base_model.model.model.layers.%d.self_attn.q_proj.lora_B.weight", l);
        ql_tensor ta = {.name = na, .dtype = QL_DTYPE_F32, .ndim = 2, .shape = {1, 64}, .data = a, .nbytes = sizeof a};
        ql_tensor tb = {.name = nb, .dtype = QL_DTYPE_F32, .ndim = 2, .shape = {64, 1}, .data = b, .nbytes = sizeof b};
        ck_assert_int_eq(ql_st_writer_add(w, &ta), QL_OK);
        ck_assert_int_eq(ql_st_writer_add(w, &tb), QL_OK);
    }
    char *ap = join(adapter, "adapter_model.safetensors");
    ck_assert_int_eq(ql_st_writer_save(w, ap), QL_OK);
    ql_st_writer_destroy(w);
    char *merged = join(parent, "merged"), *out, *err;
    int st = qlora(&out, &err, "merge --model '%s' --adapter '%s' -o '%s' --quantizer=none", model, adapter, merged);
    ck_assert_msg(st == 0, "merge: exit %d: %s", st, err);
    free(out);
    free(err);
    char *mp = join(merged, "model.safetensors");
    ql_st_file *m;
    ck_assert_msg(ql_st_open(mp, &m) == QL_OK, "%s", ql_error_message());
    const ql_tensor *s0 = ql_st_find(m, "model.extra_scale");
    ck_assert_ptr_nonnull(s0);
    ck_assert_int_eq(s0->ndim, 0);
    ck_assert_int_eq(s0->dtype, QL_DTYPE_F32);
    ck_assert_uint_eq(s0->nbytes, 4);
    float v;
    memcpy(&v, s0->data, 4);
    ck_assert_float_eq(v, 0.625f);
    ql_st_close(m);
    /* to bf16 as well */
    st = qlora(&out, &err, "merge --model '%s' --adapter '%s' -o '%s/m16' --quantizer=none --dtype bf16", model, adapter,
               parent);
    ck_assert_msg(st == 0, "merge --dtype bf16: exit %d: %s", st, err);
    free(out);
    free(err);
    free(mp);
    free(merged);
    free(ap);
    free(adapter);
    free(st_path);
    free(model);
    free(parent);
}
END_TEST

Suite *cli_suite(void)
{
    Suite *s = suite_create("cli");

    TCase *tc = tcase_create("info");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_quantizers_lists_builtins);
    tcase_add_test(tc, test_version_and_usage);
    suite_add_tcase(s, tc);

    tc = tcase_create("help");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_help_every_command, 0, (int)(sizeof commands / sizeof commands[0]));
    tcase_add_test(tc, test_help_device_default);
    tcase_add_loop_test(tc, test_option_errors_every_command, 0, (int)(sizeof commands / sizeof commands[0]));
    tcase_add_test(tc, test_usage_error_style);
    tcase_add_test(tc, test_usage_matches_help);
    suite_add_tcase(s, tc);

    tc = tcase_create("quantize");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_quantize_nf4_default);
    tcase_add_test(tc, test_quantize_nf4_options);
    tcase_add_test(tc, test_quantize_device);
    tcase_add_test(tc, test_quantize_fp4);
    tcase_add_test(tc, test_quantize_int8);
    tcase_add_test(tc, test_quantize_example_plugin_by_path);
    tcase_add_test(tc, test_plugin_in_current_folder);
    tcase_add_test(tc, test_quantize_half_precision_checkpoint);
    tcase_add_test(tc, test_quantize_sharded_checkpoint);
    suite_add_tcase(s, tc);

    tc = tcase_create("inspect_compare");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_inspect_quantized);
    tcase_add_test(tc, test_compare);
    tcase_add_loop_test(tc, test_bits_per_param_agree, 0, (int)(sizeof bpp_specs / sizeof bpp_specs[0]));
    suite_add_tcase(s, tc);

    tc = tcase_create("refusals");
    tcase_add_test(tc, test_modules_and_scheduler_parse);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_output_exists_and_force);
    tcase_add_test(tc, test_unknown_quantizer);
    tcase_add_test(tc, test_plugin_path_missing);
    tcase_add_test(tc, test_plugin_not_a_shared_object);
    tcase_add_test(tc, test_bad_options);
    tcase_add_test(tc, test_bad_model_folders);
    tcase_add_test(tc, test_nonfinite_weights);
    tcase_add_test(tc, test_already_quantized);
    tcase_add_test(tc, test_plugin_fails_midway);
    suite_add_tcase(s, tc);

    tc = tcase_create("readers");
    tcase_set_timeout(tc, 240);
    tcase_add_test(tc, test_mmlu_bad_csv);
    tcase_add_test(tc, test_mmlu_letters_split_shots);
    tcase_add_test(tc, test_generate_max_new_tokens_zero);
    tcase_add_test(tc, test_config_fields_checked);
    tcase_add_test(tc, test_fifo_inputs_refused);
    tcase_add_test(tc, test_merge_zero_dim_tensor);
    tcase_add_test(tc, test_device_flags);
    suite_add_tcase(s, tc);

    tc = tcase_create("abi");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_abi_refusal, 0, (int)(sizeof abi_cases / sizeof abi_cases[0]));
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(cli_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
