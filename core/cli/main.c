/* The qlora command. */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>


#include "cli.h"
#include "qlora/bench.h"
#include "qlora/eval.h"
#include "qlora/lora.h"
#include "qlora/merge.h"
#include "qlora/mmlu.h"
#include "qlora/train.h"
#include "qlora/qlora.h"

static const char usage_text[] =
    "usage: qlora COMMAND [OPTIONS]\n"
    "\n"
    "commands:\n"
    "  quantizers                          list the quantizer plugins found\n"
    "  quantize [--quantizer=Q] MODEL_DIR -o OUT_DIR [--force] [--device cpu|cuda|auto] [--calib-data FILE ...]\n"
    "                                      quantize a Hugging Face checkpoint (bitsandbytes layout);\n"
    "                                      --device cuda quantizes on the GPU, byte-identical files (default cpu)\n"
    "  inspect FILE.safetensors [--json]   tensors, dtypes, shapes, quantization, matrix and model bits/param\n"
    "  compare [--quantizers=Q1,Q2,...] MODEL_DIR [--json FILE] [--summary-only] [--calib-data FILE ...]\n"
    "                                      matrix and model bits/param, bytes, error, time per quantizer\n"
    "  eval --model DIR [--quantizer=Q] --data FILE [--format text|alpaca|input-output|oasst1 (default: detected)]\n"
    "       [--max-examples N] [--max-len N] [--source-max-len N] [--target-max-len N] [--adapter RUN_DIR]\n"
    "       [--batch-size 8] [--device auto|cpu|cuda] [--precision auto|fp32|bf16]\n"
    "  eval --model DIR --mmlu MMLU_DIR [--shots 5] [--split test] [--max-examples N per subject]\n"
    "       [--batch-size N] [--adapter RUN_DIR]\n"
    "                                      mean NLL and perplexity; last stdout line is JSON\n"
    "  generate --model DIR [--adapter RUN_DIR] [--quantizer=Q] --prompt TEXT [--max-new-tokens 128]\n"
    "       [--temperature 0] [--top-p 1] [--seed 0] [--device D]\n"
    "                                      prints only the generated text (temperature 0 = greedy)\n"
    "  train --model DIR --data FILE [--format F (default: detected)] --output RUN_DIR [--quantizer=nf4|none|Q]\n"
    "       [--resume CKPT] [--lora-r 64] [--lora-alpha 16] [--lora-dropout 0] [--lora-modules all|q_proj,...]\n"
    "       [--lr 2e-4] [--weight-decay 0] [--max-grad-norm 0.3] [--adam-beta1 0.9] [--adam-beta2 0.999]\n"
    "       [--lr-scheduler constant|constant_with_warmup|linear|cosine] [--warmup-ratio 0.03]\n"
    "       [--batch-size 1] [--grad-accum 16] [--steps N | --epochs E] [--[no-]gradient-checkpointing] [--dry-run]\n"
    "       [--save-steps 250] [--save-total-limit 40] [--eval-steps N --eval-data FILE | --eval-dataset-size N]\n"
    "       [--max-eval-examples N] [--seed 42] [--data-seed S] [--no-shuffle] [--no-group-by-length]\n"
    "       [--train-on-source] [--source-max-len 1024] [--target-max-len 256] [--max-len N] [--max-examples N]\n"
    "       [--force] [--device auto|cpu|cuda] [--precision auto|fp32|bf16] [--optim auto|adamw|paged_adamw]\n"
    "                                      auto: cuda when present, bf16 and paged_adamw there;\n"
    "                                      qlora.py's option names work too (docs/training.md)\n"
    "  merge --model DIR --adapter RUN_DIR -o OUT_DIR [--dtype bf16|f16|f32] [--quantizer=Q] [--force] [--device D]\n"
    "  bench [--only step|materialize|linear] [--shapes 7b,13b,33b,65b,70b] [--device auto|cpu|cuda] [--precision auto|fp32|bf16]\n"
    "       [--layers N] [--seq 2048] [--batch-size 1] [--lora-r 64] [--lora-dropout 0.1] [--steps 5]\n"
    "       [--warmup 2] [--optim auto|adamw|paged_adamw] [--json FILE]\n"
    "                                      a QLoRA training step at LLaMA shapes, random weights: JSON lines, then a table\n"
    "  check-plugin PLUGIN[:k=v,...] [--json FILE]  a plugin through every check a host relies on\n"
    "  study -q Q1,Q2 --model DIR --data FILE -o DIR [--resume]  finetune per Q\n"
    "  launch --nproc N train ...          data-parallel training: N ranks on this host (CPU so far)\n"
    "  version                             print the version\n"
    "  help [COMMAND]                      this text, or COMMAND's options (the same as qlora COMMAND --help)\n";

/* after usage_text (one string would pass the 4,095 characters C99 promises) */
static const char usage_notes[] =
    "\n"
    "Every command takes -h or --help: its usage, every option with its default, and an example.\n"
    "Q is a plugin name (nf4, fp4, int8, ...) or a path to a plugin .so (my.so: a file of the current folder),\n"
    "optionally followed by :key=value,... options, e.g. nf4:double_quant=0,blocksize=64.\n"
    "Plugins are searched in $" QL_PLUGIN_PATH_ENV ", then the plugin folder of the installed qlora\n"
    "(<libdir>/qlora/plugins; <builddir>/plugins when it runs from a build tree).\n"
    "Progress goes to stderr: a live line on a terminal, JSON lines otherwise (--quiet turns it off).\n"
    "--device defaults to $QLORA_DEVICE (cpu, cuda or auto; any other value is refused), else auto (cuda when a GPU\n"
    "is present).\n";

/* --device when not given: $QLORA_DEVICE (cpu, cuda or auto), else auto
 * (the test suites set cpu, so they compute the same on a machine with a GPU) */
static const char *device_from_env(void)
{
    const char *e = getenv("QLORA_DEVICE");
    return e && (!strcmp(e, "cpu") || !strcmp(e, "cuda") || !strcmp(e, "auto")) ? e : NULL;
}

const char *default_device(void) { return device_from_env() ? device_from_env() : "auto"; }

int fail(int rc)
{
    fprintf(stderr, "qlora: error: %s\n", ql_error_message()[0] ? ql_error_message() : ql_status_name(rc));
    return rc ? rc : 1;
}

/* NULL before a command is chosen */
const char *command;

int usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "qlora: ");
    if (command) fprintf(stderr, "%s: ", command);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    if (command) fprintf(stderr, " (see 'qlora %s --help')\n", command);
    else fprintf(stderr, " (see 'qlora help')\n");
    return 2;
}

/* --device, --precision and --optim: `value` must be one of the
 * space-separated `allowed` words; else a usage error listing `say`. */
int choice(const char *flag, const char *value, const char *allowed, const char *say, const char **out)
{
    size_t n = strlen(value);
    for (const char *p = allowed; *p;) {
        size_t l = strcspn(p, " ");
        if (l == n && !strncmp(p, value, n)) {
            *out = value;
            return 0;
        }
        p += l + (p[l] == ' ');
    }
    return usage_error("%s %s: use %s", flag, value, say);
}
#define DEVICES "cpu cuda auto", "cpu, cuda or auto"
#define PRECISIONS "fp32 bf16 auto", "fp32, bf16 or auto"
#define OPTIMS "adamw paged_adamw paged_adamw_32bit auto", "adamw, paged_adamw (paged_adamw_32bit) or auto"
#define OFFLOADS "on off auto", "on, off or auto"


/* getopt_long's '?' and ':' in our words (main sets opterr = 0, and every
 * optstring starts with ':' so that a missing value is told apart).
 * getopt_long leaves optopt 0 for an unknown long option and sets it to the
 * option's val when a long option is given a value it does not take or lacks
 * one; every long option without a value has a val of OPT_* (>= 256), so a
 * val below 256 is a short option's letter. */
int option_error(int c, char **argv, const struct option *longopts)
{
    const char *arg = argv[optind - 1];
    char name[128];
    if (c == ':' && !strncmp(arg, "--", 2)) return usage_error("option '%s' needs a value", arg);
    if (c == ':') return usage_error("option '-%c' needs a value", optopt);
    if (optopt >= 256) {
        for (const struct option *o = longopts; o->name; o++)
            if (o->val == optopt) return usage_error("option '--%s' takes no value", o->name);
    }
    if (optopt) return usage_error("unknown option '-%c'", optopt);
    /* an unknown --name or --name=value; getopt_long also takes any unique
     * abbreviation, so a prefix of several options is named as such */
    snprintf(name, sizeof name, "%.*s", (int)strcspn(arg, "="), arg);
    int matches = 0;
    for (const struct option *o = longopts; o->name; o++) matches += !strncmp(o->name, name + 2, strlen(name + 2));
    if (matches > 1 && name[2]) return usage_error("option '%s' is ambiguous", name);
    return usage_error("unknown option '%s'", name);
}

/* ---- --help ---- */

/* A default as a person writes it: the fewest digits that give back the
 * same float (0.05, not 0.0500000007), and 2e-4 rather than 0.0002. */
static const char *num(char *buf, size_t cap, double v)
{
    int sci = v != 0 && fabs(v) < 1e-3;
    for (int digits = 1; digits <= 9; digits++) {
        if (sci) snprintf(buf, cap, "%.*e", digits - 1, v);
        else snprintf(buf, cap, "%.*g", digits, v);
        if ((float)strtod(buf, NULL) == (float)v) break;
    }
    char *e = strchr(buf, 'e');
    if (e && (e[1] == '-' || e[1] == '+'))
        while (e[2] == '0' && e[3]) memmove(e + 2, e + 3, strlen(e + 3) + 1); /* e-04 -> e-4 */
    return buf;
}

/* One option of a command's --help: the flag, what it does, its default
 * (NULL: none to show). */
void help_opt(const char *flag, const char *what, const char *dflt)
{
    printf("  %-26s %s", flag, what);
    if (dflt) printf(" (default: %s)", dflt);
    putchar('\n');
}

void help_int(const char *flag, const char *what, long long dflt)
{
    char buf[32];
    snprintf(buf, sizeof buf, "%lld", dflt);
    help_opt(flag, what, buf);
}

static void help_num(const char *flag, const char *what, double dflt)
{
    char buf[32];
    help_opt(flag, what, num(buf, sizeof buf, dflt));
}

/* --device of train, eval and bench: its default as default_device() chooses it */
void help_device(void)
{
    char buf[96];
    if (device_from_env()) snprintf(buf, sizeof buf, "%s, from $QLORA_DEVICE", device_from_env());
    else snprintf(buf, sizeof buf, "auto, or $QLORA_DEVICE when set");
    help_opt("--device D", "cpu, cuda or auto: cuda when a GPU is present", buf);
}

void help_quiet(void) { help_opt("--quiet", "no progress on stderr", NULL); }

int help_end(const char *example)
{
    help_opt("-h, --help", "print this help and exit", NULL);
    printf("\nexample:\n  %s\n", example);
    return 0;
}

/* Long options without a short letter; every val is >= 256 (option_error relies on it). */
enum {
    OPT_CALIB_DATA = 900, /* the calibration flags (help_calib) */
    OPT_CALIB_FORMAT,
    OPT_CALIB_SAMPLES,
    OPT_CALIB_LEN,
    OPT_CALIB_SEED,
    OPT_CALIB_SAVE,
    OPT_FORCE = 1000,
    OPT_JSON,
    OPT_QUIET,
    OPT_DEVICE,
    OPT_PRECISION,
    OPT_SHAPES,
    OPT_SHAPE,
    OPT_OPTIM,
    OPT_OFFLOAD,
    OPT_PLAN,
    OPT_ONLY,
    OPT_TOKENS,
    OPT_LAYERS,
    OPT_WARMUP,
    OPT_SUMMARY_ONLY,
    OPT_MODEL,
    OPT_DATA,
    OPT_FORMAT,
    OPT_MAX_EXAMPLES,
    OPT_MAX_LEN,
    OPT_SOURCE_MAX_LEN,
    OPT_TARGET_MAX_LEN,
    OPT_PROMPT,
    OPT_MAX_NEW_TOKENS,
    OPT_TEMPERATURE,
    OPT_TOP_P,
    OPT_SEED,
    OPT_ADAPTER,
    OPT_OUTPUT,
    OPT_RESUME,
    OPT_EVAL_DATA,
    OPT_LORA_R,
    OPT_LORA_ALPHA,
    OPT_LORA_DROPOUT,
    OPT_LORA_MODULES,
    OPT_LR,
    OPT_WEIGHT_DECAY,
    OPT_MAX_GRAD_NORM,
    OPT_LR_SCHEDULER,
    OPT_WARMUP_RATIO,
    OPT_BATCH_SIZE,
    OPT_GRAD_ACCUM,
    OPT_STEPS,
    OPT_EPOCHS,
    OPT_GRAD_CKPT,
    OPT_DRY_RUN,
    OPT_SAVE_STEPS,
    OPT_SAVE_TOTAL_LIMIT,
    OPT_EVAL_STEPS,
    OPT_NO_SHUFFLE,
    OPT_GROUP_BY_LENGTH,
    OPT_TRAIN_ON_SOURCE,
    OPT_DTYPE,
    OPT_MMLU,
    OPT_SHOTS,
    OPT_MMLU_SPLIT,
    OPT_MMLU_NO_REUSE,
    OPT_EVAL_DATASET_SIZE,
    OPT_MAX_EVAL_EXAMPLES,
    OPT_NO_GROUP_BY_LENGTH,
    OPT_NO_GRAD_CKPT,
    OPT_DATA_SEED,
    OPT_ADAM_BETA1,
    OPT_ADAM_BETA2,
    OPT_ADAM_EPSILON,
    OPT_HELP,
};

static int help_quantizers(void)
{
    printf("usage: qlora quantizers [--quantizer SPEC] [--shape ROWSxCOLS] [--json]\n\n"
           "The quantizer plugins found: name, matrix bits/param (every byte the plugin stores for a\n"
           "ROWS x COLS matrix with its default options over its parameters; see \"Bits per parameter\"\n"
           "in docs/writing-a-quantizer.md), ABI, version, description, default options and file.\n"
           "Plugins are searched in $" QL_PLUGIN_PATH_ENV ", then the plugin folder of the installed qlora\n"
           "(<libdir>/qlora/plugins; <builddir>/plugins when it runs from a build tree)");
    char **dirs;
    size_t nd;
    if (ql_plugin_search_dirs(&dirs, &nd) == QL_OK) {
        printf("; here:");
        for (size_t i = 0; i < nd; i++) printf("\n  %s", dirs[i]);
        ql_string_list_free(dirs, nd);
    }
    printf("\n\noptions:\n");
    help_opt("--quantizer SPEC", "only this plugin, with these options (nf4:double_quant=0, or a path)",
             "every plugin found, default options");
    help_opt("--shape ROWSxCOLS", "the matrix the bits/param figure is for", "4096x4096");
    help_opt("--json", "one JSON array of the plugins instead of the table", NULL);
    return help_end("qlora quantizers --shape 11008x4096");
}

/* --quantizer=SPEC of `quantizers`: the one plugin file to probe, as
 * "FILE:OPTIONS" so the probe configures it with them; a name is looked up
 * among the plugins found (never opened here: the probe opens it). */
static int quantizer_to_probe(const char *spec, char ***out, size_t *n)
{
    size_t nl = strcspn(spec, ":");
    const char *opts = spec[nl] ? spec + nl : "";
    if (ql_qz_spec_is_path(spec)) {
        *out = calloc(1, sizeof **out);
        if (!*out || !(**out = strdup(spec))) return ql_error(QL_ENOMEM, "out of memory");
        *n = 1;
        return QL_OK;
    }
    char **paths;
    size_t np;
    int rc = ql_plugin_scan(&paths, &np);
    if (rc) return rc;
    char want[96];
    snprintf(want, sizeof want, "/qlora_%.*s.so", (int)(nl < 64 ? nl : 64), spec);
    size_t lw = strlen(want);
    char *found = NULL;
    for (size_t i = 0; i < np && !found; i++) {
        size_t lp = strlen(paths[i]);
        if (lp >= lw && !strcmp(paths[i] + lp - lw, want)) {
            size_t len = lp + strlen(opts) + 1;
            if ((found = malloc(len))) snprintf(found, len, "%s%s", paths[i], opts);
            else rc = ql_error(QL_ENOMEM, "out of memory");
        }
    }
    ql_string_list_free(paths, np);
    if (rc) return rc;
    /* not found: ql_qz_open says so, with where it looked */
    ql_qz *q = NULL;
    if (!found) {
        rc = ql_qz_open(spec, &q);
        ql_qz_close(q);
        return rc ? rc : ql_error(QL_ENOTFOUND, "quantizer %.*s is not among the plugins found", (int)nl, spec);
    }
    *out = calloc(1, sizeof **out);
    if (!*out) {
        free(found);
        return ql_error(QL_ENOMEM, "out of memory");
    }
    **out = found;
    *n = 1;
    return QL_OK;
}

static int cmd_quantizers(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"json", no_argument, NULL, OPT_JSON},
        {"shape", required_argument, NULL, OPT_SHAPE},
        {"quantizer", required_argument, NULL, 'q'},
        {"help", no_argument, NULL, OPT_HELP},
        {NULL, 0, NULL, 0},
    };
    const char *spec = NULL;
    int as_json = 0, c;
    long long rows = 4096, cols = 4096;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":hq:", longopts, NULL)) != -1) {
        switch (c) {
        case OPT_JSON: as_json = 1; break;
        case 'q': spec = optarg; break;
        case OPT_SHAPE: {
            char x, extra;
            if (sscanf(optarg, "%lld%c%lld%c", &rows, &x, &cols, &extra) != 3 || x != 'x' || rows < 1 || cols < 1 ||
                rows > (1LL << 20) || cols > (1LL << 20))
                return usage_error("--shape=%s: expected ROWSxCOLS, each from 1 to 1048576", optarg);
            break;
        }
        case 'h':
        case OPT_HELP: return help_quantizers();
        default: return option_error(c, argv, longopts);
        }
    }
    if (optind != argc) return usage_error("unexpected argument '%s'", argv[optind]);
    char **paths;
    size_t n;
    int rc = spec ? quantizer_to_probe(spec, &paths, &n) : ql_plugin_scan(&paths, &n);
    if (rc) return fail(rc);
    if (!as_json) printf("%-10s %-11s %-5s %-8s %-s\n", "name", "matrix bits", "ABI", "version", "description / file");
    else printf("[");
    /* Each plugin is opened in a child process: one that crashes, exits or
     * hangs is reported by name and the others are still listed. */
    int bad = 0, listed = 0;
    for (size_t i = 0; i < n; i++) {
        ql_plugin_info d;
        if (ql_plugin_probe_shape(paths[i], 10.0, rows, cols, &d) != QL_OK) {
            fprintf(stderr, "qlora: error: %s\n", d.error ? d.error : ql_error_message());
            ql_plugin_info_free(&d);
            bad++;
            continue;
        }
        /* the file, without the options quantizer_to_probe appended for the probe */
        int shown = (int)strlen(d.path);
        const char *opt_colon = spec ? strrchr(d.path, ':') : NULL;
        if (opt_colon && strchr(opt_colon, '=')) shown = (int)(opt_colon - d.path);
        char *file = strndup(d.path, (size_t)shown);
        if (!file) {
            ql_plugin_info_free(&d);
            ql_string_list_free(paths, n);
            return fail(ql_error(QL_ENOMEM, "out of memory"));
        }
        /* matrix bits/param of a rows x cols matrix with the default (or given) options */
        if (as_json) {
            /* the plugin's strings are escaped by jansson */
            char abi[32];
            snprintf(abi, sizeof abi, "%u.%u", d.abi_major, d.abi_minor);
            json_t *j = json_pack("{s:s, s:s, s:f, s:[I,I], s:s, s:s, s:s, s:s}", "name", d.name, "description",
                                  d.description, "matrix_bits_per_param", d.bits_per_param,
                                  "matrix_shape", (json_int_t)rows, (json_int_t)cols, "abi", abi, "version", d.version,
                                  "options", d.options, "file", file);
            char *text = j ? json_dumps(j, JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10)) : NULL;
            printf("%s\n  %s", listed ? "," : "", text ? text : "null");
            free(text);
            json_decref(j);
        } else
            printf("%-10s %-11.3f %u.%-3u %-8s %s\n%-38s %s: %s\n%-38s %s\n", d.name, d.bits_per_param, d.abi_major,
                   d.abi_minor, d.version, d.description, "", spec ? "options" : "defaults",
                   d.options[0] ? d.options : "(none)", "", file);
        free(file);
        listed++;
        ql_plugin_info_free(&d);
    }
    if (as_json) printf("\n]\n");
    else if (listed)
        printf("\nmatrix bits: bits/param of a %lld x %lld matrix with the %s options: every byte the plugin\n"
               "stores for it (codes, scales, second-level constants, code tables, metadata) over its parameters\n",
               rows, cols, spec ? "given" : "default");
    if (n == 0) {
        char **dirs;
        size_t nd;
        if (ql_plugin_search_dirs(&dirs, &nd) == QL_OK) {
            fprintf(stderr, "qlora: no plugins found in:");
            for (size_t i = 0; i < nd; i++) fprintf(stderr, " %s", dirs[i]);
            fprintf(stderr, "\n");
            ql_string_list_free(dirs, nd);
        }
        ql_string_list_free(paths, n);
        return 1;
    }
    ql_string_list_free(paths, n);
    return bad ? 1 : 0;
}

/* Strict number parsing for flags: the whole argument must be the number. */
int parse_long_arg(const char *flag, const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (!*s || *end || errno || v < lo || v > hi)
        return usage_error("%s=%s: expected an integer from %ld to %ld", flag, s, lo, hi);
    *out = v;
    return 0;
}

int parse_float_arg(const char *flag, const char *s, double lo, double hi, double *out)
{
    char *end;
    double v = strtod(s, &end);
    if (!*s || *end || !(v >= lo && v <= hi))
        return usage_error("%s=%s: expected a number from %g to %g", flag, s, lo, hi);
    *out = v;
    return 0;
}

/* The model, quantized as the adapter's run was unless --quantizer says
 * otherwise, with the adapter attached. */
static int load_with_adapter(const char *model, const char *adapter, const char *quantizer, const char *device,
                             char *qbuf, size_t cap, ql_llama **m, ql_lora **lora)
{
    *m = NULL;
    *lora = NULL;
    /* The run's run_config.json names its base quantizer; as a file, it may
     * name a plugin only (ql_lora_run_quantizer checks, the load re-checks). */
    char *run_config = NULL;
    ql_calib_opts calib;
    char calib_data[4096], calib_fmt[32];
    int calibrated = 0;
    if (adapter && !quantizer) {
        int qrc = ql_lora_run_quantizer(adapter, qbuf, cap);
        if (qrc != QL_OK && qrc != QL_ENOTFOUND) return qrc;
        if (qrc == QL_OK) {
            quantizer = qbuf;
            if (!(run_config = ql_path_join(adapter, "run_config.json"))) return ql_error(QL_ENOMEM, "out of memory");
            /* a base quantized with calibration on load: the same again */
            int crc = ql_lora_run_calibration(adapter, &calib, calib_data, sizeof calib_data, calib_fmt, sizeof calib_fmt);
            if (crc != QL_OK && crc != QL_ENOTFOUND) {
                free(run_config);
                return crc;
            }
            calibrated = crc == QL_OK;
            if (calibrated)
                fprintf(stderr,
                        "qlora: the run quantized its base with calibration: calibrating %s again as it did (%d windows "
                        "of %d tokens of %s, seed %llu)\n",
                        quantizer, calib.samples, calib.len, calib.data, (unsigned long long)calib.seed);
        }
    }
    ql_llama_load_opts lopts = {.quantizer = quantizer, .quantizer_file = run_config, .progress = 0, .device = device,
                                .calib = calibrated ? &calib : NULL};
    int rc = ql_llama_load(model, &lopts, m);
    free(run_config);
    if (rc == QL_OK && adapter) {
        rc = ql_lora_load_peft(*m, adapter, lora);
        if (rc == QL_OK) ql_lora_attach(*m, *lora);
    }
    return rc;
}

/* --format when not given: what the file holds (ql_data_format_detect),
 * said on stderr as a JSON line */
static const char format_detected[] = "detected from the file";

int detect_format(const char *path, ql_data_format *fmt)
{
    char why[256];
    int rc = ql_data_format_detect(path, fmt, why, sizeof why);
    if (rc) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", ql_error_message());
        return ql_error(rc, "%s; or give --format alpaca, input-output, oasst1 or text", msg);
    }
    json_t *j = json_pack("{s:s, s:s, s:s, s:s}", "event", "format", "file", path, "format", ql_data_format_name(*fmt),
                          "detected_from", why);
    char *text = j ? json_dumps(j, JSON_PRESERVE_ORDER) : NULL;
    if (text) fprintf(stderr, "%s\n", text);
    else fprintf(stderr, "qlora: %s: --format %s (%s)\n", path, ql_data_format_name(*fmt), why);
    free(text);
    json_decref(j);
    return QL_OK;
}

/* --optim: HF's names of plain AdamW are ours */
static int optim_choice(const char *value, const char **out)
{
    if (!strcmp(value, "adamw_torch") || !strcmp(value, "adamw_torch_fused") || !strcmp(value, "adamw_hf")) value = "adamw";
    if (strstr(value, "8bit")) return usage_error("--optim %s is not supported: %s", value, qp_eight_bit);
    return choice("--optim", value, OPTIMS, out);
}

/* The calibration flags of a data-aware quantizer (plugin ABI 1.3), in quantize and train. */
static void help_calib(void)
{
    help_opt("--calib-data FILE", "calibration text for a data-aware quantizer (optq); needed by those", NULL);
    help_opt("--calib-format F", "text, alpaca, input-output or oasst1", "detected");
    help_opt("--calib-samples N", "windows of --calib-len tokens drawn from the file", "128");
    help_opt("--calib-len L", "tokens a window", "512");
    help_opt("--calib-seed S", "where the windows start (--seed in quantize)", "0");
    help_opt("--calib-save FILE", "write the windows' token ids as JSON", NULL);
}

/* One calibration flag into co; 1 when c was one, -1 on a bad value. */
static int calib_flag(int c, const char *arg, ql_calib_opts *co)
{
    long v = 0;
    switch (c) {
    case OPT_CALIB_DATA: co->data = arg; return 1;
    case OPT_CALIB_FORMAT: co->format = arg; return 1;
    case OPT_CALIB_SAMPLES:
        if (parse_long_arg("--calib-samples", arg, 1, 1 << 20, &v)) return -1;
        co->samples = (int)v;
        return 1;
    case OPT_CALIB_LEN:
        if (parse_long_arg("--calib-len", arg, 1, 1 << 24, &v)) return -1;
        co->len = (int)v;
        return 1;
    case OPT_CALIB_SEED:
        if (parse_long_arg("--seed", arg, 0, LONG_MAX, &v)) return -1;
        co->seed = (uint64_t)v;
        return 1;
    case OPT_CALIB_SAVE: co->save_tokens = arg; return 1;
    default: return 0;
    }
}

#define CALIB_LONGOPTS                                                                                         \
    {"calib-data", required_argument, NULL, OPT_CALIB_DATA},                                                    \
        {"calib-format", required_argument, NULL, OPT_CALIB_FORMAT},                                            \
        {"calib-samples", required_argument, NULL, OPT_CALIB_SAMPLES},                                          \
        {"calib-len", required_argument, NULL, OPT_CALIB_LEN}, {"calib-seed", required_argument, NULL, OPT_CALIB_SEED}, \
        {"calib-save", required_argument, NULL, OPT_CALIB_SAVE}

static int help_train(void)
{
    ql_train_opts o;
    ql_train_opts_default(&o);
    char mods[160] = "";
    if (o.lora.modules == QL_LORA_ALL_MODULES) snprintf(mods, sizeof mods, "all");
    else
        for (int k = 0; k < QL_MOD_COUNT; k++)
            if (o.lora.modules & (1u << k))
                snprintf(mods + strlen(mods), sizeof mods - strlen(mods), "%s%s", mods[0] ? "," : "",
                         ql_lora_module_name(k));
    printf("usage: qlora train --model DIR --data FILE --output RUN_DIR [OPTIONS]\n\n"
           "Train LoRA adapters on a frozen, quantized base (QLoRA). RUN_DIR gets checkpoint-N folders,\n"
           "metrics.jsonl, run_config.json and the final adapter in PEFT's format.\n\n"
           "options:\n");
    help_opt("--model DIR", "the base model: a Hugging Face folder (required)", NULL);
    help_opt("-q, --quantizer Q", "how the base is stored: nf4, fp4, int8, none (dense) or any Q", o.quantizer);
    help_opt("--data FILE", "the training data (required)", NULL);
    help_opt("--format F", "alpaca, input-output (self-instruct), oasst1 or text", format_detected);
    help_opt("--output RUN_DIR", "where the run goes (required, unless --resume or --dry-run)", NULL);
    help_opt("--resume CKPT", "continue the run of RUN_DIR/checkpoint-N, bit for bit", NULL);
    help_opt("--force", "replace RUN_DIR when it exists", NULL);
    help_opt("--eval-data FILE", "held-out data: its loss every --eval-steps and at the end", NULL);
    help_opt("--eval-dataset-size N", "hold out N examples of --data (a fraction when below 1) as the eval data",
             o.eval_dataset_size > 0 ? NULL : "none");
    help_opt("--max-eval-examples N", "evaluate the first N examples of the eval data", "all");
    help_calib();
    help_int("--lora-r N", "LoRA rank", o.lora.r);
    help_num("--lora-alpha A", "LoRA alpha: the update is scaled by alpha / r", o.lora.alpha);
    help_num("--lora-dropout P", "dropout on the LoRA input", o.lora.dropout);
    help_opt("--lora-modules M", "all, or some of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", mods);
    help_num("--lr LR", "the learning rate (after any warmup)", o.lr);
    help_num("--weight-decay W", "AdamW's weight decay", o.weight_decay);
    help_num("--max-grad-norm N", "clip the gradient norm to N; 0 does not clip", o.max_grad_norm);
    help_num("--adam-beta1 B", "AdamW's beta1", o.beta1);
    help_num("--adam-beta2 B", "AdamW's beta2", o.beta2);
    help_num("--adam-epsilon E", "AdamW's epsilon", o.eps);
    help_opt("--lr-scheduler S", "constant (no warmup), constant_with_warmup, linear or cosine",
             ql_lr_schedule_name(o.schedule));
    help_num("--warmup-ratio R", "warm up from 0 over ceil(R x steps) steps; not with constant", o.warmup_ratio);
    help_int("--batch-size N", "sequences per micro-batch", o.batch_size);
    help_int("--grad-accum N", "micro-batches per optimizer step", o.grad_accum);
    if (o.steps > 0) help_int("--steps N", "optimizer steps", o.steps);
    else help_opt("--steps N", "optimizer steps", "from --epochs");
    help_num("--epochs E", "passes over the data, when --steps is not given", o.epochs);
    help_opt("--gradient-checkpointing",
             "recompute activations in the backward pass: less memory, more time (--no-gradient-checkpointing: off)",
             o.gradient_checkpointing ? "on" : "off");
    help_opt("--dry-run", "print the memory plan and the run's settings, and stop before training", NULL);
    help_int("--save-steps N", "a checkpoint every N steps (the last step is always saved); 0: only the last",
             o.save_steps);
    help_int("--save-total-limit N", "keep the newest N checkpoint-* folders, deleting older ones qlora wrote; 0: all",
             o.save_total_limit);
    help_int("--eval-steps N", "evaluate the eval data every N steps; 0: only at the end", o.eval_steps);
    help_int("--seed S", "LoRA initialisation, dropout, and the data order unless --data-seed", o.seed);
    help_opt("--data-seed S", "the data order's seed (HF's data_seed)", "--seed");
    help_opt("--no-shuffle", "the data in file order", o.shuffle ? "shuffled" : "file order");
    help_opt("--group-by-length", "batch examples of similar length together", o.group_by_length ? "on" : "off");
    help_opt("--no-group-by-length", "batches in the shuffled order", NULL);
    help_opt("--train-on-source", "train on the prompt tokens too, not only the response",
             o.data.train_on_source ? "on" : "off");
    help_int("--source-max-len N", "prompt tokens kept at most", o.data.source_max_len);
    help_int("--target-max-len N", "response tokens kept at most", o.data.target_max_len);
    if (o.data.max_len > 0) help_int("--max-len N", "tokens per example at most", o.data.max_len);
    else help_opt("--max-len N", "tokens per example at most", "the model's max_position_embeddings");
    if (o.data.max_examples > 0) help_int("--max-examples N", "read the first N examples only", o.data.max_examples);
    else help_opt("--max-examples N", "read the first N examples only", "all");
    help_device();
    help_opt("--precision P", "fp32, bf16 or auto", o.precision ? o.precision : "auto: bf16 on cuda, fp32 on cpu");
    help_opt("--optim O", "adamw, paged_adamw (= paged_adamw_32bit) or auto",
             o.optim ? o.optim : "auto: paged_adamw on cuda; on cpu, AdamW on the host");
    help_opt("--offload O", "on, off or auto: the layer inputs gradient checkpointing keeps (bf16), in pinned host memory",
             o.offload ? o.offload : "auto: on on cuda");
    help_quiet();
    help_opt("-h, --help", "print this help and exit", NULL);
    printf("\nqlora.py's option names are taken too (--learning_rate, --per_device_train_batch_size,\n"
           "--max_steps, --bits 4 --quant_type nf4 --double_quant True, ...); docs/training.md has the table.\n");
    printf("\nexample:\n  %s\n", "qlora train --model models/llama-7b --data alpaca_data.json --output runs/llama-7b-alpaca "
                                 "--steps 1000 --save-steps 250");
    return 0;
}

const struct option train_options[] = {
    {"model", required_argument, NULL, OPT_MODEL},
    {"quantizer", required_argument, NULL, 'q'},
    {"data", required_argument, NULL, OPT_DATA},
    {"format", required_argument, NULL, OPT_FORMAT},
    {"output", required_argument, NULL, OPT_OUTPUT},
    {"resume", required_argument, NULL, OPT_RESUME},
    {"force", no_argument, NULL, OPT_FORCE},
    {"eval-data", required_argument, NULL, OPT_EVAL_DATA},
    {"eval-dataset-size", required_argument, NULL, OPT_EVAL_DATASET_SIZE},
    {"max-eval-examples", required_argument, NULL, OPT_MAX_EVAL_EXAMPLES},
    {"lora-r", required_argument, NULL, OPT_LORA_R},
    {"lora-alpha", required_argument, NULL, OPT_LORA_ALPHA},
    {"lora-dropout", required_argument, NULL, OPT_LORA_DROPOUT},
    {"lora-modules", required_argument, NULL, OPT_LORA_MODULES},
    {"lr", required_argument, NULL, OPT_LR},
    {"weight-decay", required_argument, NULL, OPT_WEIGHT_DECAY},
    {"max-grad-norm", required_argument, NULL, OPT_MAX_GRAD_NORM},
    {"adam-beta1", required_argument, NULL, OPT_ADAM_BETA1},
    {"adam-beta2", required_argument, NULL, OPT_ADAM_BETA2},
    {"adam-epsilon", required_argument, NULL, OPT_ADAM_EPSILON},
    {"lr-scheduler", required_argument, NULL, OPT_LR_SCHEDULER},
    {"warmup-ratio", required_argument, NULL, OPT_WARMUP_RATIO},
    {"batch-size", required_argument, NULL, OPT_BATCH_SIZE},
    {"grad-accum", required_argument, NULL, OPT_GRAD_ACCUM},
    {"steps", required_argument, NULL, OPT_STEPS},
    {"epochs", required_argument, NULL, OPT_EPOCHS},
    {"gradient-checkpointing", no_argument, NULL, OPT_GRAD_CKPT},
    {"no-gradient-checkpointing", no_argument, NULL, OPT_NO_GRAD_CKPT},
    {"dry-run", no_argument, NULL, OPT_DRY_RUN},
    {"save-steps", required_argument, NULL, OPT_SAVE_STEPS},
    {"save-total-limit", required_argument, NULL, OPT_SAVE_TOTAL_LIMIT},
    {"eval-steps", required_argument, NULL, OPT_EVAL_STEPS},
    {"seed", required_argument, NULL, OPT_SEED},
    {"data-seed", required_argument, NULL, OPT_DATA_SEED},
    {"no-shuffle", no_argument, NULL, OPT_NO_SHUFFLE},
    {"group-by-length", no_argument, NULL, OPT_GROUP_BY_LENGTH},
    {"no-group-by-length", no_argument, NULL, OPT_NO_GROUP_BY_LENGTH},
    {"train-on-source", no_argument, NULL, OPT_TRAIN_ON_SOURCE},
    {"source-max-len", required_argument, NULL, OPT_SOURCE_MAX_LEN},
    {"target-max-len", required_argument, NULL, OPT_TARGET_MAX_LEN},
    {"max-len", required_argument, NULL, OPT_MAX_LEN},
    {"max-examples", required_argument, NULL, OPT_MAX_EXAMPLES},
    {"quiet", no_argument, NULL, OPT_QUIET},
    {"device", required_argument, NULL, OPT_DEVICE},
    {"precision", required_argument, NULL, OPT_PRECISION},
    {"optim", required_argument, NULL, OPT_OPTIM},
    {"offload", required_argument, NULL, OPT_OFFLOAD},
    CALIB_LONGOPTS,
    {"help", no_argument, NULL, OPT_HELP},
    {NULL, 0, NULL, 0},
};

/* train's options, after qp_translate, into o and calib (which o->calib
 * may point to): 0; -1 when --help was printed; else the exit status, the
 * error said (study runs each of its runs' options through here too) */
int train_parse(int argc, char **argv, const qp_args *qp, ql_train_opts *op, ql_calib_opts *calibp)
{
    const struct option *longopts = train_options;
    ql_train_opts o;
    ql_train_opts_default(&o);
    o.device = default_device();
    const char *format = NULL;
    long lv = 0;
    double dv = 0;
    int c, bad = 0, rc;
    ql_calib_opts calib = {.progress = 1};
    optind = 1;
    while ((c = getopt_long(argc, argv, ":q:h", longopts, NULL)) != -1) {
        int cf = calib_flag(c, optarg, &calib);
        if (cf < 0) return 2;
        if (cf) continue;
        switch (c) {
        case OPT_MODEL: o.model_dir = optarg; break;
        case 'q': o.quantizer = optarg; break;
        case OPT_DATA: o.data_path = optarg; break;
        case OPT_FORMAT: format = optarg; break;
        case OPT_OUTPUT: o.output_dir = optarg; break;
        case OPT_RESUME: o.resume_from = optarg; break;
        case OPT_FORCE: o.force = 1; break;
        case OPT_EVAL_DATA: o.eval_data_path = optarg; break;
        case OPT_EVAL_DATASET_SIZE:
            bad |= parse_float_arg("--eval-dataset-size", optarg, 1e-12, 1e15, &o.eval_dataset_size);
            if (!bad && o.eval_dataset_size >= 1 && o.eval_dataset_size != floor(o.eval_dataset_size))
                bad |= usage_error("--eval-dataset-size=%s: a whole number of examples, or a fraction below 1", optarg);
            break;
        case OPT_MAX_EVAL_EXAMPLES:
            bad |= parse_long_arg("--max-eval-examples", optarg, 1, 1L << 40, &lv), o.max_eval_examples = lv;
            break;
        case OPT_LORA_R: bad |= parse_long_arg("--lora-r", optarg, 1, 65536, &lv), o.lora.r = (int)lv; break;
        case OPT_LORA_ALPHA: bad |= parse_float_arg("--lora-alpha", optarg, 1e-6, 1e6, &dv), o.lora.alpha = (float)dv; break;
        case OPT_LORA_DROPOUT: bad |= parse_float_arg("--lora-dropout", optarg, 0, 0.99, &dv), o.lora.dropout = (float)dv; break;
        case OPT_LORA_MODULES:
            if ((rc = ql_lora_modules_parse(optarg, &o.lora.modules))) return fail(rc);
            break;
        case OPT_LR: bad |= parse_float_arg("--lr", optarg, 1e-12, 1e30, &dv), o.lr = (float)dv; break;
        case OPT_WEIGHT_DECAY: bad |= parse_float_arg("--weight-decay", optarg, 0, 10, &dv), o.weight_decay = (float)dv; break;
        case OPT_MAX_GRAD_NORM: bad |= parse_float_arg("--max-grad-norm", optarg, 0, 1e30, &dv), o.max_grad_norm = (float)dv; break;
        case OPT_ADAM_BETA1: bad |= parse_float_arg("--adam-beta1", optarg, 0, 0.999999, &dv), o.beta1 = (float)dv; break;
        case OPT_ADAM_BETA2: bad |= parse_float_arg("--adam-beta2", optarg, 0, 0.999999999, &dv), o.beta2 = (float)dv; break;
        case OPT_ADAM_EPSILON: bad |= parse_float_arg("--adam-epsilon", optarg, 1e-30, 1, &dv), o.eps = (float)dv; break;
        case OPT_LR_SCHEDULER:
            if ((rc = ql_lr_schedule_parse(optarg, &o.schedule))) return fail(rc);
            break;
        case OPT_WARMUP_RATIO: bad |= parse_float_arg("--warmup-ratio", optarg, 0, 1, &o.warmup_ratio); break;
        case OPT_BATCH_SIZE: bad |= parse_long_arg("--batch-size", optarg, 1, 1 << 20, &lv), o.batch_size = (int)lv; break;
        case OPT_GRAD_ACCUM: bad |= parse_long_arg("--grad-accum", optarg, 1, 1 << 20, &lv), o.grad_accum = (int)lv; break;
        case OPT_STEPS: bad |= parse_long_arg("--steps", optarg, 1, 1L << 40, &lv), o.steps = lv; break;
        case OPT_EPOCHS: bad |= parse_float_arg("--epochs", optarg, 1e-9, 1e9, &o.epochs); break;
        case OPT_GRAD_CKPT: o.gradient_checkpointing = 1; break;
        case OPT_NO_GRAD_CKPT: o.gradient_checkpointing = 0; break;
        case OPT_DRY_RUN: o.dry_run = 1; break;
        case OPT_SAVE_STEPS: bad |= parse_long_arg("--save-steps", optarg, 0, 1L << 40, &lv), o.save_steps = lv; break;
        case OPT_SAVE_TOTAL_LIMIT:
            bad |= parse_long_arg("--save-total-limit", optarg, 0, 1L << 40, &lv), o.save_total_limit = lv;
            break;
        case OPT_EVAL_STEPS: bad |= parse_long_arg("--eval-steps", optarg, 0, 1L << 40, &lv), o.eval_steps = lv; break;
        case OPT_SEED: bad |= parse_long_arg("--seed", optarg, 0, LONG_MAX, &lv), o.seed = lv; break;
        case OPT_DATA_SEED: bad |= parse_long_arg("--data-seed", optarg, 0, LONG_MAX, &lv), o.data_seed = lv; break;
        case OPT_NO_SHUFFLE: o.shuffle = 0; break;
        case OPT_GROUP_BY_LENGTH: o.group_by_length = 1; break;
        case OPT_NO_GROUP_BY_LENGTH: o.group_by_length = 0; break;
        case OPT_TRAIN_ON_SOURCE: o.data.train_on_source = 1; break;
        case OPT_SOURCE_MAX_LEN: bad |= parse_long_arg("--source-max-len", optarg, 1, 1L << 24, &lv), o.data.source_max_len = (int)lv; break;
        case OPT_TARGET_MAX_LEN: bad |= parse_long_arg("--target-max-len", optarg, 1, 1L << 24, &lv), o.data.target_max_len = (int)lv; break;
        case OPT_MAX_LEN: bad |= parse_long_arg("--max-len", optarg, 2, 1L << 24, &lv), o.data.max_len = (int)lv; break;
        case OPT_MAX_EXAMPLES: bad |= parse_long_arg("--max-examples", optarg, 1, 1L << 40, &lv), o.data.max_examples = lv; break;
        case OPT_QUIET: o.progress = 0; break;
        case OPT_DEVICE:
            if (choice("--device", optarg, DEVICES, &o.device)) return 2;
            break;
        case OPT_PRECISION:
            if (choice("--precision", optarg, PRECISIONS, &o.precision)) return 2;
            break;
        case OPT_OPTIM:
            if (optim_choice(optarg, &o.optim)) return 2;
            break;
        case OPT_OFFLOAD:
            if (choice("--offload", optarg, OFFLOADS, &o.offload)) return 2;
            break;
        case 'h':
        case OPT_HELP: return help_train() == 0 ? -1 : 1;
        default: return option_error(c, argv, longopts);
        }
    }
    if (bad) return 2;
    if (optind != argc) return usage_error("unexpected argument '%s'", argv[optind]);
    if (qp->quantizer[0]) o.quantizer = qp->quantizer;
    /* qlora.py's --do_eval without an eval split holds out --eval_dataset_size (1024) examples */
    if (qp->do_eval && !o.eval_data_path && o.eval_dataset_size == 0) o.eval_dataset_size = 1024;
    if (!o.model_dir) return usage_error("--model DIR is required");
    if (!o.data_path) return usage_error("--data FILE is required");
    if (!o.output_dir && !o.resume_from && !o.dry_run)
        return usage_error("--output RUN_DIR (or --resume CHECKPOINT) is required");
    if (o.eval_data_path && o.eval_dataset_size > 0) return usage_error("give --eval-data or --eval-dataset-size, not both");
    if (o.eval_steps > 0 && !o.eval_data_path && o.eval_dataset_size == 0)
        return usage_error("--eval-steps needs --eval-data FILE or --eval-dataset-size N");
    if (format) rc = ql_data_format_parse(format, &o.data.format);
    else rc = detect_format(o.data_path, &o.data.format);
    if (rc) return fail(rc);
    if (!calib.data && (calib.format || calib.samples || calib.len || calib.save_tokens))
        return usage_error("--calib-format, --calib-samples, --calib-len and --calib-save need --calib-data FILE");
    calib.progress = o.progress;
    *calibp = calib;
    if (calib.data) o.calib = calibp;
    *op = o;
    return 0;
}

static int train_parsed(int argc, char **argv, const qp_args *qp)
{
    ql_train_opts o;
    ql_calib_opts calib;
    int rc = train_parse(argc, argv, qp, &o, &calib);
    if (rc) return rc < 0 ? 0 : rc;
    rc = ql_train(&o);
    return rc ? fail(rc) : 0;
}

static int cmd_train(int argc, char **argv)
{
    qp_args qp;
    int rc = qp_translate(QP_TRAIN, argc, argv, train_options, ":q:h", &qp);
    if (rc == 0) rc = train_parsed(qp.argc, qp.argv, &qp);
    qp_free(&qp);
    return rc;
}

static int help_bench(void)
{
    ql_bench_opts o;
    ql_bench_opts_default(&o);
    printf("usage: qlora bench [OPTIONS]\n\n"
           "Time a QLoRA training step (forward, backward with gradient checkpointing, LoRA on every linear,\n"
           "AdamW) at the shapes of LLaMA models, with random weights: a JSON line per shape, then a table.\n"
           "--only materialize times the quantizer's materialize to bf16 against a copy of as many bytes;\n"
           "--only linear the 4-bit linear forward against the same product with bf16 weights.\n\n"
           "options:\n");
    help_opt("--only WHAT", "step, materialize or linear", "step");
    help_opt("--shapes LIST", "step: some of 7b,13b,33b,65b,70b; materialize, linear: matrices ROWSxCOLS, "
             "comma-separated", "7b; 4096x4096,11008x4096,28672x8192");
    help_int("--tokens N", "linear: rows of the input", o.tokens);
    help_device();
    help_opt("--precision P", "fp32, bf16 or auto",
             strcmp(o.precision, "auto") ? o.precision : "auto: bf16 on cuda, fp32 on cpu");
    help_opt("-q, --quantizer Q", "how the base is stored", o.quantizer);
    if (o.layers > 0) help_int("--layers N", "decoder layers, fewer for a quick run", o.layers);
    else help_opt("--layers N", "decoder layers, fewer for a quick run", "the shape's own");
    help_int("--seq N", "tokens per sequence", o.seq);
    help_int("--batch-size N", "sequences per step (also --batch)", o.batch);
    help_int("--lora-r N", "LoRA rank", o.lora_r);
    help_num("--lora-dropout P", "dropout on the LoRA input", o.lora_dropout);
    help_int("--steps N", "timed steps (materialize, linear: timed samples)", o.steps);
    help_int("--warmup N", "untimed steps (samples) first", o.warmup);
    help_opt("--optim O", "adamw, paged_adamw (= paged_adamw_32bit) or auto",
             strcmp(o.optim, "auto") ? o.optim : "auto: paged_adamw on cuda; on cpu, AdamW on the host");
    help_opt("--offload O", "on, off or auto: the checkpointed layer inputs in pinned host memory", "auto: on on cuda");
    help_opt("--plan", "print each shape's memory plan on stderr", NULL);
    help_opt("--json FILE", "write the JSON lines to FILE (whole, or not at all) instead of stdout", NULL);
    help_quiet();
    return help_end("qlora bench --device cuda --shapes 7b,13b --steps 5");
}

static int cmd_bench(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"shapes", required_argument, NULL, OPT_SHAPES},       {"only", required_argument, NULL, OPT_ONLY},
        {"device", required_argument, NULL, OPT_DEVICE},       {"precision", required_argument, NULL, OPT_PRECISION},
        {"quantizer", required_argument, NULL, 'q'},           {"layers", required_argument, NULL, OPT_LAYERS},
        {"seq", required_argument, NULL, OPT_MAX_LEN},         {"batch-size", required_argument, NULL, OPT_BATCH_SIZE},
        {"batch", required_argument, NULL, OPT_BATCH_SIZE}, /* the peers' spelling (bench/peers) */
        {"lora-r", required_argument, NULL, OPT_LORA_R},       {"steps", required_argument, NULL, OPT_STEPS},
        {"lora-dropout", required_argument, NULL, OPT_LORA_DROPOUT},
        {"warmup", required_argument, NULL, OPT_WARMUP},       {"json", required_argument, NULL, OPT_JSON},
        {"optim", required_argument, NULL, OPT_OPTIM},         {"tokens", required_argument, NULL, OPT_TOKENS},
        {"offload", required_argument, NULL, OPT_OFFLOAD},     {"plan", no_argument, NULL, OPT_PLAN},
        {"quiet", no_argument, NULL, OPT_QUIET},               {"help", no_argument, NULL, OPT_HELP},
        {NULL, 0, NULL, 0},
    };
    ql_bench_opts o;
    ql_bench_opts_default(&o);
    o.device = default_device();
    const char *only = "step", *json_path = NULL;
    long lv = 0;
    double dv = 0;
    int c, bad = 0;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":q:h", longopts, NULL)) != -1) {
        switch (c) {
        case OPT_SHAPES: o.shapes = optarg; break;
        case OPT_ONLY: only = optarg; break;
        case OPT_DEVICE:
            if (choice("--device", optarg, DEVICES, &o.device)) return 2;
            break;
        case OPT_PRECISION:
            if (choice("--precision", optarg, PRECISIONS, &o.precision)) return 2;
            break;
        case 'q': o.quantizer = optarg; break;
        case OPT_LAYERS: bad |= parse_long_arg("--layers", optarg, 1, 1000, &lv), o.layers = (int)lv; break;
        case OPT_MAX_LEN: bad |= parse_long_arg("--seq", optarg, 2, 1L << 20, &lv), o.seq = (int)lv; break;
        case OPT_BATCH_SIZE: bad |= parse_long_arg("--batch-size", optarg, 1, 1024, &lv), o.batch = (int)lv; break;
        case OPT_LORA_R: bad |= parse_long_arg("--lora-r", optarg, 1, 65536, &lv), o.lora_r = (int)lv; break;
        case OPT_LORA_DROPOUT: bad |= parse_float_arg("--lora-dropout", optarg, 0, 0.99, &dv), o.lora_dropout = (float)dv; break;
        case OPT_STEPS: bad |= parse_long_arg("--steps", optarg, 1, 100000, &lv), o.steps = (int)lv; break;
        case OPT_WARMUP: bad |= parse_long_arg("--warmup", optarg, 0, 100000, &lv), o.warmup = (int)lv; break;
        case OPT_TOKENS: bad |= parse_long_arg("--tokens", optarg, 1, 1L << 20, &lv), o.tokens = (int)lv; break;
        case OPT_JSON: json_path = optarg; break;
        case OPT_QUIET: o.progress = 0; break;
        case OPT_OPTIM:
            if (choice("--optim", optarg, OPTIMS, &o.optim)) return 2;
            break;
        case OPT_OFFLOAD:
            if (choice("--offload", optarg, OFFLOADS, &o.offload)) return 2;
            break;
        case OPT_PLAN: o.plan = 1; break;
        case 'h':
        case OPT_HELP: return help_bench();
        default: return option_error(c, argv, longopts);
        }
    }
    if (bad) return 2;
    if (optind != argc) return usage_error("unexpected argument '%s'", argv[optind]);
    if (choice("--only", only, "step materialize linear", "step, materialize or linear", &only)) return 2;
    FILE *json = stdout;
    char tmp[4200];
    if (json_path) {
        /* written whole to a temporary file, then renamed: a failed run leaves no half file */
        if (snprintf(tmp, sizeof tmp, "%s.tmp", json_path) >= (int)sizeof tmp)
            return usage_error("--json %s: path too long", json_path);
        json = fopen(tmp, "w");
        if (!json) return fail(ql_error(QL_EIO, "cannot write %s: %s", tmp, strerror(errno)));
    }
    /* JSON lines, then a blank line and a table (as the peers in bench/peers print theirs) */
    int rc = !strcmp(only, "step") ? ql_bench_step(&o, json, stdout) : ql_bench_kernels(&o, only, json, stdout);
    if (json_path) {
        int wrc = fflush(json) || fsync(fileno(json));
        fclose(json);
        if (rc || wrc) unlink(tmp);
        else if (rename(tmp, json_path)) rc = ql_error(QL_EIO, "cannot rename %s to %s: %s", tmp, json_path, strerror(errno));
        if (wrc && !rc) rc = ql_error(QL_EIO, "cannot write %s", tmp);
    }
    return rc ? fail(rc) : 0;
}

static int help_merge(void)
{
    printf("usage: qlora merge --model DIR --adapter RUN_DIR -o OUT_DIR [OPTIONS]\n\n"
           "Fold a trained LoRA adapter into the base weights: OUT_DIR is a plain Hugging Face checkpoint.\n"
           "A quantized base is merged into its dequantized weights (the ones the adapter was trained on).\n\n"
           "options:\n");
    help_opt("--model DIR", "the base model the adapter was trained on (required)", NULL);
    help_opt("--adapter RUN_DIR", "the training run's folder, or any PEFT adapter folder (required)", NULL);
    help_opt("-o, --output OUT_DIR", "the merged checkpoint's folder (required)", NULL);
    help_opt("--dtype T", "bf16, f16 or f32", "the base's embedding dtype, f32 when it is not a float");
    help_opt("-q, --quantizer Q", "the base's quantizer", "as RUN_DIR/run_config.json says, else none");
    help_opt("--force", "replace OUT_DIR when it exists", NULL);
    help_opt("--device D", "cpu, cuda or auto: where the weights are merged; the file is byte-identical", "cpu");
    return help_end("qlora merge --model models/llama-7b --adapter runs/llama-7b-alpaca -o models/llama-7b-alpaca");
}

static int cmd_merge(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"model", required_argument, NULL, OPT_MODEL},   {"adapter", required_argument, NULL, OPT_ADAPTER},
        {"output", required_argument, NULL, 'o'},        {"dtype", required_argument, NULL, OPT_DTYPE},
        {"quantizer", required_argument, NULL, 'q'},     {"force", no_argument, NULL, OPT_FORCE},
        {"device", required_argument, NULL, OPT_DEVICE}, {"help", no_argument, NULL, OPT_HELP},
        {NULL, 0, NULL, 0},
    };
    const char *model = NULL, *adapter = NULL, *out = NULL;
    ql_merge_opts mo = {.quantizer = NULL, .dtype = -1, .force = 0, .device = "cpu"};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":o:q:h", longopts, NULL)) != -1) {
        switch (c) {
        case OPT_MODEL: model = optarg; break;
        case OPT_ADAPTER: adapter = optarg; break;
        case 'o': out = optarg; break;
        case 'q': mo.quantizer = optarg; break;
        case OPT_FORCE: mo.force = 1; break;
        case OPT_DEVICE:
            if (choice("--device", optarg, DEVICES, &mo.device)) return 2;
            break;
        case OPT_DTYPE:
            if (!strcmp(optarg, "f32") || !strcmp(optarg, "float32")) mo.dtype = QL_DTYPE_F32;
            else if (!strcmp(optarg, "f16") || !strcmp(optarg, "float16")) mo.dtype = QL_DTYPE_F16;
            else if (!strcmp(optarg, "bf16") || !strcmp(optarg, "bfloat16")) mo.dtype = QL_DTYPE_BF16;
            else return usage_error("--dtype %s: use bf16, f16 or f32", optarg);
            break;
        case 'h':
        case OPT_HELP: return help_merge();
        default: return option_error(c, argv, longopts);
        }
    }
    if (optind != argc) return usage_error("unexpected argument '%s'", argv[optind]);
    if (!model || !adapter || !out) return usage_error("--model, --adapter and -o are required");
    int rc = ql_merge(model, adapter, out, &mo);
    return rc ? fail(rc) : 0;
}

/* eval's defaults, shown by its --help */
static const struct {
    const char *mmlu_split, *precision;
    long shots, batch, source_max_len, target_max_len;
} eval_defaults = {.mmlu_split = "test", .precision = "auto", .shots = 5, .batch = 8,
                   .source_max_len = 1024, .target_max_len = 256};

static int help_eval(void)
{
    printf("usage: qlora eval --model DIR --data FILE [OPTIONS]\n"
           "       qlora eval --model DIR --mmlu MMLU_DIR [OPTIONS]\n\n"
           "The mean negative log-likelihood and perplexity of FILE's responses (of the whole text with\n"
           "--format text), or the few-shot MMLU accuracy on the questions of MMLU_DIR; the last line on\n"
           "stdout is a JSON object.\n\n"
           "options:\n");
    help_opt("--model DIR", "the base model: a Hugging Face folder (required)", NULL);
    help_opt("--adapter RUN_DIR", "evaluate with this trained LoRA adapter", "none");
    help_opt("-q, --quantizer Q", "quantize the base with Q; none keeps it dense",
             "as RUN_DIR/run_config.json says, else none");
    help_opt("--data FILE", "the examples to score (this or --mmlu is required)", NULL);
    help_opt("--format F", "text, alpaca, input-output (self-instruct) or oasst1", format_detected);
    help_opt("--max-examples N", "the first N examples; with --mmlu, the first N questions of each subject", "all");
    help_opt("--max-len N", "tokens per example at most", "the model's max_position_embeddings");
    help_int("--source-max-len N", "prompt tokens kept at most", eval_defaults.source_max_len);
    help_int("--target-max-len N", "response tokens kept at most", eval_defaults.target_max_len);
    char batch_default[48];
    snprintf(batch_default, sizeof batch_default, "%ld; with --mmlu 1", eval_defaults.batch);
    help_opt("--batch-size N",
             "examples per forward pass; with --mmlu, questions that share a prefix run together after it "
             "(no faster than one at a time so far, docs/benchmarks.md)",
             batch_default);
    help_device();
    help_opt("--precision P", "fp32, bf16 or auto",
             strcmp(eval_defaults.precision, "auto") ? eval_defaults.precision : "auto: bf16 on cuda, fp32 on cpu");
    help_opt("--mmlu MMLU_DIR", "score MMLU: a folder of dev/ and test/ SUBJECT_{dev,test}.csv", NULL);
    help_int("--shots N", "dev questions before each MMLU question", eval_defaults.shots);
    help_opt("--split NAME", "with --mmlu, the folder of MMLU_DIR with the questions (also --mmlu-split)",
             eval_defaults.mmlu_split);
    help_opt("--mmlu-no-reuse", "with --mmlu, run every prompt whole: no shared few-shot prefix cache (its reference)",
             NULL);
    help_quiet();
    return help_end("qlora eval --model models/llama-7b --adapter runs/llama-7b-alpaca --data alpaca_eval.json "
                    "--format alpaca");
}

static const struct option eval_options[] = {
    {"model", required_argument, NULL, OPT_MODEL},
    {"adapter", required_argument, NULL, OPT_ADAPTER},
    {"quantizer", required_argument, NULL, 'q'},
    {"data", required_argument, NULL, OPT_DATA},
    {"format", required_argument, NULL, OPT_FORMAT},
    {"max-examples", required_argument, NULL, OPT_MAX_EXAMPLES},
    {"max-len", required_argument, NULL, OPT_MAX_LEN},
    {"source-max-len", required_argument, NULL, OPT_SOURCE_MAX_LEN},
    {"target-max-len", required_argument, NULL, OPT_TARGET_MAX_LEN},
    {"quiet", no_argument, NULL, OPT_QUIET},
    {"mmlu", required_argument, NULL, OPT_MMLU},
    {"shots", required_argument, NULL, OPT_SHOTS},
    {"split", required_argument, NULL, OPT_MMLU_SPLIT},
    {"mmlu-split", required_argument, NULL, OPT_MMLU_SPLIT},
    {"mmlu-no-reuse", no_argument, NULL, OPT_MMLU_NO_REUSE},
    {"device", required_argument, NULL, OPT_DEVICE},
    {"precision", required_argument, NULL, OPT_PRECISION},
    {"batch-size", required_argument, NULL, OPT_BATCH_SIZE},
    {"help", no_argument, NULL, OPT_HELP},
    {NULL, 0, NULL, 0},
};

static int eval_parsed(int argc, char **argv, const qp_args *qp)
{
    const struct option *longopts = eval_options;
    const char *model = NULL, *data = NULL, *format = NULL, *quantizer = NULL, *adapter = NULL,
               *mmlu = NULL, *mmlu_split = eval_defaults.mmlu_split, *device = default_device(),
               *precision = eval_defaults.precision;
    long shots = eval_defaults.shots, batch = eval_defaults.batch;
    int batch_given = 0; /* with --mmlu the default is 1 (help_eval) */
    long max_examples = 0, max_len = 0, source_max_len = eval_defaults.source_max_len,
         target_max_len = eval_defaults.target_max_len;
    int progress = 1, c, bad = 0, no_reuse = 0;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":q:h", longopts, NULL)) != -1) {
        switch (c) {
        case OPT_MODEL: model = optarg; break;
        case OPT_ADAPTER: adapter = optarg; break;
        case 'q': quantizer = optarg; break;
        case OPT_DATA: data = optarg; break;
        case OPT_FORMAT: format = optarg; break;
        case OPT_MMLU_NO_REUSE: no_reuse = 1; break;
        case OPT_MAX_EXAMPLES: bad |= parse_long_arg("--max-examples", optarg, 1, 1L << 40, &max_examples); break;
        case OPT_MAX_LEN: bad |= parse_long_arg("--max-len", optarg, 2, 1L << 24, &max_len); break;
        case OPT_SOURCE_MAX_LEN: bad |= parse_long_arg("--source-max-len", optarg, 1, 1L << 24, &source_max_len); break;
        case OPT_TARGET_MAX_LEN: bad |= parse_long_arg("--target-max-len", optarg, 1, 1L << 24, &target_max_len); break;
        case OPT_QUIET: progress = 0; break;
        case OPT_MMLU: mmlu = optarg; break;
        case OPT_MMLU_SPLIT: mmlu_split = optarg; break;
        case OPT_SHOTS: bad |= parse_long_arg("--shots", optarg, 0, 64, &shots); break;
        case OPT_BATCH_SIZE: bad |= parse_long_arg("--batch-size", optarg, 1, 1 << 16, &batch), batch_given = 1; break;
        case OPT_DEVICE:
            if (choice("--device", optarg, DEVICES, &device)) return 2;
            break;
        case OPT_PRECISION:
            if (choice("--precision", optarg, PRECISIONS, &precision)) return 2;
            break;
        case 'h':
        case OPT_HELP: return help_eval();
        default: return option_error(c, argv, longopts);
        }
    }
    if (bad) return 2;
    if (optind != argc) return usage_error("unexpected argument '%s'", argv[optind]);
    if (!model) return usage_error("--model DIR is required");
    if (mmlu && data) return usage_error("give --data or --mmlu, not both");
    if (!mmlu && !data) return usage_error("--data FILE (or --mmlu DIR) is required");
    if (!mmlu && mmlu_split != eval_defaults.mmlu_split) return usage_error("--split NAME is for --mmlu only");
    if (!mmlu && no_reuse) return usage_error("--mmlu-no-reuse is for --mmlu only");
    if (qp->quantizer[0]) quantizer = qp->quantizer;
    ql_dataset_opts dopts = {.source_max_len = (int)source_max_len, .target_max_len = (int)target_max_len,
                             .max_len = (int)max_len, .train_on_source = 0, .max_examples = max_examples};
    int rc = mmlu ? QL_OK : format ? ql_data_format_parse(format, &dopts.format) : detect_format(data, &dopts.format);
    if (rc) return fail(rc);
    ql_llama *m = NULL;
    ql_tokenizer *tok = NULL;
    ql_dataset *d = NULL;
    ql_lora *lora = NULL;
    char qbuf[512];
    if ((rc = load_with_adapter(model, adapter, quantizer, device, qbuf, sizeof qbuf, &m, &lora)) ||
        (rc = ql_tokenizer_load(model, &tok)))
        goto done;
    if (mmlu) {
        ql_mmlu_opts mo = {.dir = mmlu, .split = mmlu_split, .shots = (int)shots, .max_per_subject = max_examples,
                           .progress = progress, .table = isatty(STDOUT_FILENO), /* the JSON line stays last */
                           .lora = lora, .device = device, .precision = precision, .no_reuse = no_reuse,
                           .batch = batch_given ? (int)batch : 1};
        rc = ql_mmlu_eval(m, tok, &mo, stdout);
        goto done;
    }
    if (dopts.max_len <= 0) dopts.max_len = ql_llama_get_config(m)->max_positions;
    if ((rc = ql_dataset_load(data, tok, &dopts, &d))) goto done;
    ql_eval_result r;
    ql_eval_opts eo = {.lora = lora, .device = device, .precision = precision, .batch = (int)batch,
                       .progress = progress};
    if ((rc = ql_eval_nll(m, d, &eo, &r))) goto done;
    double nll = r.tokens ? r.nll_sum / (double)r.tokens : 0.0;
    printf("{\"examples\": %lld, \"tokens\": %lld, \"nll\": %.6f, \"ppl\": %.6f, \"truncated\": %zu, "
           "\"quantizer\": \"%s\", \"format\": \"%s\"}\n",
           (long long)r.examples, (long long)r.tokens, nll, exp(nll), d->n_truncated, ql_llama_quantization(m),
           ql_data_format_name(dopts.format));
done:
    ql_dataset_destroy(d);
    ql_tokenizer_destroy(tok);
    ql_llama_destroy(m);
    ql_lora_destroy(lora);
    return rc ? fail(rc) : 0;
}

static int cmd_eval(int argc, char **argv)
{
    qp_args qp;
    int rc = qp_translate(QP_EVAL, argc, argv, eval_options, ":q:h", &qp);
    if (rc == 0) rc = eval_parsed(qp.argc, qp.argv, &qp);
    qp_free(&qp);
    return rc;
}

/* generate's defaults, shown by its --help */
static const struct {
    long max_new_tokens, seed;
    double temperature, top_p;
} generate_defaults = {.max_new_tokens = 128, .seed = 0, .temperature = 0.0, .top_p = 1.0};

static int help_generate(void)
{
    printf("usage: qlora generate --model DIR --prompt TEXT [OPTIONS]\n\n"
           "Continue TEXT; prints only the generated text.\n\n"
           "options:\n");
    help_opt("--model DIR", "the base model: a Hugging Face folder (required)", NULL);
    help_opt("--adapter RUN_DIR", "generate with this trained LoRA adapter", "none");
    help_opt("-q, --quantizer Q", "quantize the base with Q; none keeps it dense",
             "as RUN_DIR/run_config.json says, else none");
    help_opt("--prompt TEXT", "the text to continue", "empty");
    help_int("--max-new-tokens N", "tokens to generate at most", generate_defaults.max_new_tokens);
    help_num("--temperature T", "sampling temperature; 0 is greedy", generate_defaults.temperature);
    help_num("--top-p P", "sample from the fewest tokens of total probability P; 1: all", generate_defaults.top_p);
    help_int("--seed S", "the sampler's seed", generate_defaults.seed);
    help_device();
    help_opt("--precision P", "fp32, bf16 or auto", "auto: bf16 on cuda, fp32 on cpu");
    return help_end("qlora generate --model models/llama-7b --adapter runs/llama-7b-alpaca --prompt 'Once upon a time' "
                    "--temperature 0.7 --top-p 0.9");
}

static int cmd_generate(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"model", required_argument, NULL, OPT_MODEL},
        {"adapter", required_argument, NULL, OPT_ADAPTER},
        {"quantizer", required_argument, NULL, 'q'},
        {"prompt", required_argument, NULL, OPT_PROMPT},
        {"max-new-tokens", required_argument, NULL, OPT_MAX_NEW_TOKENS},
        {"temperature", required_argument, NULL, OPT_TEMPERATURE},
        {"top-p", required_argument, NULL, OPT_TOP_P},
        {"seed", required_argument, NULL, OPT_SEED},
        {"device", required_argument, NULL, OPT_DEVICE},
        {"precision", required_argument, NULL, OPT_PRECISION},
        {"help", no_argument, NULL, OPT_HELP},
        {NULL, 0, NULL, 0},
    };
    const char *model = NULL, *prompt = "", *quantizer = NULL, *adapter = NULL, *device = default_device(),
               *precision = "auto";
    long max_new = generate_defaults.max_new_tokens, seed = generate_defaults.seed;
    double temperature = generate_defaults.temperature, top_p = generate_defaults.top_p;
    int c, bad = 0;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":q:h", longopts, NULL)) != -1) {
        switch (c) {
        case OPT_MODEL: model = optarg; break;
        case OPT_ADAPTER: adapter = optarg; break;
        case 'q': quantizer = optarg; break;
        case OPT_PROMPT: prompt = optarg; break;
        case OPT_MAX_NEW_TOKENS: bad |= parse_long_arg("--max-new-tokens", optarg, 1, 1L << 20, &max_new); break;
        case OPT_TEMPERATURE: bad |= parse_float_arg("--temperature", optarg, 0.0, 100.0, &temperature); break;
        case OPT_TOP_P: bad |= parse_float_arg("--top-p", optarg, 0.0, 1.0, &top_p); break;
        case OPT_SEED: bad |= parse_long_arg("--seed", optarg, 0, LONG_MAX, &seed); break;
        case OPT_DEVICE:
            if (choice("--device", optarg, DEVICES, &device)) return 2;
            break;
        case OPT_PRECISION:
            if (choice("--precision", optarg, PRECISIONS, &precision)) return 2;
            break;
        case 'h':
        case OPT_HELP: return help_generate();
        default: return option_error(c, argv, longopts);
        }
    }
    if (bad) return 2;
    if (optind != argc) return usage_error("unexpected argument '%s'", argv[optind]);
    if (!model) return usage_error("--model DIR is required");
    ql_llama *m = NULL;
    ql_tokenizer *tok = NULL;
    ql_lora *lora = NULL;
    char *text = NULL;
    char qbuf[512];
    ql_generate_opts gopts = {.max_new_tokens = (int)max_new, .temperature = (float)temperature,
                              .top_p = (float)top_p, .seed = (uint64_t)seed, .device = device,
                              .precision = precision};
    int rc = load_with_adapter(model, adapter, quantizer, device, qbuf, sizeof qbuf, &m, &lora);
    gopts.lora = lora;
    if (rc == QL_OK) rc = ql_tokenizer_load(model, &tok);
    if (rc == QL_OK) rc = ql_generate(m, tok, prompt, &gopts, &text);
    if (rc == QL_OK) printf("%s\n", text);
    free(text);
    ql_tokenizer_destroy(tok);
    ql_llama_destroy(m);
    ql_lora_destroy(lora);
    return rc ? fail(rc) : 0;
}

/* quantize's defaults, shown by its --help; cpu unless asked: the files
 * are the same either way, and the GPU may be busy training */
static const struct {
    const char *quantizer, *device;
} quantize_defaults = {.quantizer = "nf4", .device = "cpu"};

static int help_quantize(void)
{
    printf("usage: qlora quantize [--quantizer=Q] MODEL_DIR -o OUT_DIR [OPTIONS]\n\n"
           "Quantize the linear layers of a Hugging Face checkpoint with a quantizer plugin; OUT_DIR is a\n"
           "checkpoint in bitsandbytes' layout, with the other files of MODEL_DIR.\n\n"
           "options:\n");
    help_opt("-q, --quantizer Q", "a plugin name or .so path, with :key=value,... options",
             quantize_defaults.quantizer);
    help_opt("-o, --output OUT_DIR", "the quantized checkpoint's folder (required)", NULL);
    help_opt("--force", "replace OUT_DIR when it exists", NULL);
    help_opt("--device D", "cpu, cuda or auto: where to quantize; the files are byte-identical",
             quantize_defaults.device);
    help_calib();
    help_quiet();
    return help_end("qlora quantize --quantizer=nf4:double_quant=0 models/llama-7b -o models/llama-7b-nf4\n"
                    "       qlora quantize --quantizer=optq:bits=3,groupsize=128 models/llama-7b -o models/llama-7b-optq3 "
                    "--calib-data c4.txt --calib-format text --calib-samples 128 --calib-len 2048");
}

static int cmd_quantize(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"quantizer", required_argument, NULL, 'q'}, {"output", required_argument, NULL, 'o'},
        {"force", no_argument, NULL, OPT_FORCE},     {"quiet", no_argument, NULL, OPT_QUIET},
        {"device", required_argument, NULL, OPT_DEVICE},
        CALIB_LONGOPTS,
        {"seed", required_argument, NULL, OPT_CALIB_SEED},
        {"help", no_argument, NULL, OPT_HELP},
        {NULL, 0, NULL, 0},
    };
    const char *spec = quantize_defaults.quantizer, *out = NULL;
    ql_calib_opts calib = {.progress = 1};
    ql_quantize_opts opts = {.force = 0, .progress = 1, .device = quantize_defaults.device, .calib = &calib};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":q:o:h", longopts, NULL)) != -1) {
        int cf = calib_flag(c, optarg, &calib);
        if (cf < 0) return 2;
        if (cf) continue;
        switch (c) {
        case 'q': spec = optarg; break;
        case 'o': out = optarg; break;
        case OPT_FORCE: opts.force = 1; break;
        case OPT_QUIET: opts.progress = 0; break;
        case OPT_DEVICE:
            if (choice("--device", optarg, DEVICES, &opts.device)) return 2;
            break;
        case 'h':
        case OPT_HELP: return help_quantize();
        default: return option_error(c, argv, longopts);
        }
    }
    if (optind != argc - 1) return usage_error("expected one MODEL_DIR");
    if (!out) return usage_error("-o OUT_DIR is required");
    if (!calib.data && (calib.format || calib.samples || calib.len || calib.save_tokens))
        return usage_error("--calib-format, --calib-samples, --calib-len and --calib-save need --calib-data FILE");
    calib.progress = opts.progress;
    int rc = ql_quantize_model(argv[optind], spec, out, &opts);
    return rc ? fail(rc) : 0;
}

static int help_inspect(void)
{
    printf("usage: qlora inspect FILE.safetensors|MODEL_DIR [--json]\n\n"
           "The tensors of a safetensors file (of a model folder: its model.safetensors): dtype, shape,\n"
           "quantization, matrix bits/param (every byte stored for the quantized matrices over their\n"
           "parameters) and model bits/param (every tensor byte over all parameters).\n\n"
           "options:\n");
    help_opt("--json", "one JSON object instead of the table", NULL);
    return help_end("qlora inspect models/llama-7b-nf4/model.safetensors --json");
}

static int cmd_inspect(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"json", no_argument, NULL, OPT_JSON},
        {"help", no_argument, NULL, OPT_HELP},
        {NULL, 0, NULL, 0},
    };
    int as_json = 0, c;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
        switch (c) {
        case OPT_JSON: as_json = 1; break;
        case 'h':
        case OPT_HELP: return help_inspect();
        default: return option_error(c, argv, longopts);
        }
    }
    if (optind == argc) return usage_error("FILE.safetensors is required");
    if (argc - optind > 1) return usage_error("one file at a time ('%s')", argv[optind + 1]);
    const char *path = argv[optind];
    /* a model folder is inspected through its single file */
    char *file = NULL;
    if (ql_is_dir(path)) {
        file = ql_path_join(path, "model.safetensors");
        path = file;
    }
    int rc = ql_inspect_file(path, as_json, stdout);
    free(file);
    return rc ? fail(rc) : 0;
}

/* compare's --quantizers when not given */
static const char compare_default_quantizers[] = "nf4,fp4,int8";

static int help_compare(void)
{
    printf("usage: qlora compare [--quantizers=Q1,Q2,...] MODEL_DIR [OPTIONS]\n\n"
           "Quantize every linear layer of MODEL_DIR with each quantizer, in memory: matrix bits/param and\n"
           "stored bytes of the quantized matrices, model bits/param of the checkpoint quantize would write,\n"
           "error and time, per quantizer and per layer.\n\n"
           "options:\n");
    help_opt("-q, --quantizers LIST", "quantizers to compare, comma-separated", compare_default_quantizers);
    help_opt("--json FILE", "also write the results to FILE as JSON", NULL);
    help_opt("--summary-only", "one row per quantizer, no per-layer rows", NULL);
    help_calib();
    printf("    (the calibration flags apply to the data-aware quantizers of the list, optq; the others ignore them)\n");
    help_quiet();
    return help_end("qlora compare --quantizers=nf4,nf4:double_quant=0,fp4,int8 models/llama-7b --json compare.json\n"
                    "  qlora compare --quantizers=optq:bits=3,optq:bits=3,rtn=1,nf4 MODEL_DIR --calib-data val.txt");
}

static int cmd_compare(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"quantizers", required_argument, NULL, 'q'},     {"json", required_argument, NULL, OPT_JSON},
        {"summary-only", no_argument, NULL, OPT_SUMMARY_ONLY}, {"quiet", no_argument, NULL, OPT_QUIET},
        {"help", no_argument, NULL, OPT_HELP},                 CALIB_LONGOPTS,
        {NULL, 0, NULL, 0},
    };
    const char *specs = compare_default_quantizers;
    ql_calib_opts calib = {.progress = 1};
    ql_compare_opts opts = {.json_path = NULL, .per_layer = 1, .progress = 1, .calib = &calib};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":q:h", longopts, NULL)) != -1) {
        int cf = calib_flag(c, optarg, &calib);
        if (cf < 0) return 2;
        if (cf) continue;
        switch (c) {
        case 'q': specs = optarg; break;
        case OPT_JSON: opts.json_path = optarg; break;
        case OPT_SUMMARY_ONLY: opts.per_layer = 0; break;
        case OPT_QUIET: opts.progress = 0; break;
        case 'h':
        case OPT_HELP: return help_compare();
        default: return option_error(c, argv, longopts);
        }
    }
    if (optind != argc - 1) return usage_error("expected one MODEL_DIR");
    if (!calib.data && (calib.format || calib.samples || calib.len || calib.save_tokens))
        return usage_error("--calib-format, --calib-samples, --calib-len and --calib-save need --calib-data FILE");
    calib.progress = opts.progress;
    int rc = ql_compare_model(argv[optind], specs, &opts, stdout);
    if (rc == QL_OK && opts.json_path) fprintf(stderr, "wrote %s\n", opts.json_path);
    return rc ? fail(rc) : 0;
}

static int help_version(void)
{
    printf("usage: qlora version\n\n"
           "The version of qlora and of the quantizer plugin ABI it loads (also: qlora --version).\n\n"
           "options:\n");
    return help_end("qlora version");
}

static int cmd_version(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, OPT_HELP},
        {NULL, 0, NULL, 0},
    };
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
        case OPT_HELP: return help_version();
        default: return option_error(c, argv, longopts);
        }
    }
    if (optind != argc) return usage_error("unexpected argument '%s'", argv[optind]);
    printf("qlora %s (quantizer ABI %d.%d)\n", ql_version(), QL_QUANTIZER_ABI_MAJOR, QL_QUANTIZER_ABI_MINOR);
    return 0;
}

static const struct {
    const char *name;
    int (*run)(int argc, char **argv); /* argv[0] is the command's name */
} commands[] = {
    {"quantizers", cmd_quantizers}, {"quantize", cmd_quantize}, {"inspect", cmd_inspect}, {"compare", cmd_compare},
    {"eval", cmd_eval},             {"generate", cmd_generate}, {"train", cmd_train},     {"merge", cmd_merge},
    {"bench", cmd_bench},           {"version", cmd_version},   {"check-plugin", cmd_check_plugin},
    {"study", cmd_study},           {"launch", cmd_launch},
};

int main(int argc, char **argv)
{
    if (argc < 2) {
        fputs(usage_text, stderr);
        fputs(usage_notes, stderr);
        return 2;
    }
    /* option errors are ours (option_error), in one style for every command */
    opterr = 0;
    const char *cmd = argv[1];
    int for_help = 0;
    if (!strcmp(cmd, "help") || !strcmp(cmd, "--help") || !strcmp(cmd, "-h")) {
        if (argc == 2) {
            fputs(usage_text, stdout);
            fputs(usage_notes, stdout);
            return 0;
        }
        if (argc > 3) return usage_error("help: one command at a time ('%s')", argv[3]);
        /* qlora help CMD is qlora CMD --help */
        cmd = argv[2];
        for_help = 1;
    }
    if (!strcmp(cmd, "--version")) cmd = "version";
    const char *env_device = getenv("QLORA_DEVICE");
    if (env_device && *env_device && !device_from_env()) {
        fprintf(stderr, "qlora: QLORA_DEVICE=%s: use cpu, cuda or auto (or unset it)\n", env_device);
        return 2;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        if (strcmp(cmd, commands[i].name)) continue;
        command = commands[i].name;
        char *help_argv[] = {(char *)commands[i].name, (char *)"--help", NULL};
        return for_help ? commands[i].run(2, help_argv) : commands[i].run(argc - 1, argv + 1);
    }
    return usage_error("unknown command '%s'", cmd);
}
