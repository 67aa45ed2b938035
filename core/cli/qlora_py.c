/* qlora.py's option names for `qlora train` and `qlora eval`.
 *
 * artidoro/qlora's qlora.py reads its options with transformers'
 * HfArgumentParser: --name_with_underscores (--name-with-dashes too), a
 * value after a space or '=', booleans as `--flag`, `--flag True` or
 * `--flag=no` (HF's string_to_bool: yes/no, true/false, t/f, y/n, 1/0, any
 * case) and `--no_flag` for a boolean whose default is true.  Each is
 * rewritten here into our option, so the command line of one of qlora.py's
 * scripts runs with the program name changed; an option of qlora.py that
 * has no counterpart here is refused by name, and one that changes nothing
 * here is taken with a note. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "cli.h"

typedef enum {
    QP_VALUE,   /* takes a value: `on`=VALUE (after `map`); on == NULL: only `map`'s values are taken */
    QP_BOOL,    /* a boolean: `on` when true, `off` when false; NULL refuses that side (why), "" does nothing */
    QP_NOTE,    /* takes a value that changes nothing here: a note says why */
    QP_NOTE_BOOL,
    QP_REFUSE,  /* takes a value; refused, saying why */
    QP_DATASET, /* --dataset: a local file, or the name of a Hub dataset (refused) */
    QP_BITS,    /* --bits, --quant_type, --double_quant: the quantizer spec */
    QP_QUANT_TYPE,
    QP_DOUBLE_QUANT,
    QP_DO_EVAL,
    QP_MAX_STEPS, /* -1 is HF's "from num_train_epochs" */
} qp_kind;

/* A value of a qlora.py option: `to` replaces it (NULL: refused, saying
 * why); for an option without `on`, `to` is a whole argument ("": none). */
typedef struct qp_value {
    const char *from, *to, *why;
} qp_value;

typedef struct qp_flag {
    const char *name; /* qlora.py's, with underscores */
    unsigned cmds;    /* QP_TRAIN, QP_EVAL */
    qp_kind kind;
    const char *on, *off;
    const char *why;
    const qp_value *map; /* ends with {NULL} */
    int trailing;        /* what it becomes goes after every other option (it overrides them) */
    int default_true;    /* a boolean that defaults to true: --no_NAME sets it false */
} qp_flag;

#define T QP_TRAIN
#define E QP_EVAL
#define TE (QP_TRAIN | QP_EVAL)

const char qp_eight_bit[] = "qlora keeps AdamW's states in 32 bits: use paged_adamw_32bit (or adamw)";

static const qp_value format_values[] = {
    {"alpaca-clean", "alpaca", NULL},
    {"chip2", NULL, "convert OIG's <human>/<bot> text to input/output records"},
    {"hh-rlhf", NULL, "convert it to input/output records (input empty, output the chosen text)"},
    {NULL, NULL, NULL},
};
static const qp_value optim_values[] = {
    {"adamw_torch", "adamw", NULL},       {"adamw_torch_fused", "adamw", NULL}, {"adamw_hf", "adamw", NULL},
    {"paged_adamw_8bit", NULL, qp_eight_bit}, {"adamw_bnb_8bit", NULL, qp_eight_bit},  {"adamw_8bit", NULL, qp_eight_bit},
    {"paged_adamw_32bit", "paged_adamw_32bit", NULL},
    {NULL, NULL, NULL},
};
static const qp_value save_strategy_values[] = {
    {"steps", "", NULL},
    {"no", "--save-steps=0", NULL}, /* qlora.py still saves the adapter at the end; so do we */
    {"epoch", NULL, "save every N steps with --save_steps N"},
    {NULL, NULL, NULL},
};
static const qp_value eval_strategy_values[] = {
    {"steps", "", NULL},
    {"no", "--eval-steps=0", NULL}, /* qlora.py's --do_eval still evaluates after training; so do we */
    {"epoch", NULL, "evaluate every N steps with --eval_steps N"},
    {NULL, NULL, NULL},
};
static const qp_value report_to_values[] = {
    {"none", "", NULL},
    {NULL, NULL, "qlora logs to RUN_DIR/metrics.jsonl only (--report_to none)"},
};
static const qp_value mmlu_split_values[] = {{"eval", "val", NULL}, {NULL, NULL, NULL}};
static const qp_value mmlu_dataset_values[] = {
    {"mmlu-zs", "--shots=0", NULL},
    {"mmlu-fs", "--shots=5", NULL},
    {"mmlu", "--shots=5", NULL},
    {NULL, NULL, "qlora reads MMLU's CSV folders (--mmlu DIR): mmlu-zs is --shots 0, mmlu-fs --shots 5"},
};

static const char generation_note[] = "qlora.py uses its generation options only with --predict_with_generate";
static const char mmlu_note[] = "it is used only with --do_mmlu_eval";

static const qp_flag flags[] = {
    /* the model, the data, the run folder */
    {.name = "model_name_or_path", .cmds = TE, .kind = QP_VALUE, .on = "--model"},
    {.name = "output_dir", .cmds = T, .kind = QP_VALUE, .on = "--output"},
    {.name = "resume_from_checkpoint", .cmds = T, .kind = QP_VALUE, .on = "--resume"},
    {.name = "dataset", .cmds = TE, .kind = QP_DATASET, .on = "--data"},
    {.name = "dataset_format", .cmds = TE, .kind = QP_VALUE, .on = "--format", .map = format_values},
    {.name = "source_max_len", .cmds = TE, .kind = QP_VALUE, .on = "--source-max-len"},
    {.name = "target_max_len", .cmds = TE, .kind = QP_VALUE, .on = "--target-max-len"},
    {.name = "max_train_samples", .cmds = T, .kind = QP_VALUE, .on = "--max-examples"},
    {.name = "max_eval_samples", .cmds = T, .kind = QP_VALUE, .on = "--max-eval-examples"},
    {.name = "max_eval_samples", .cmds = E, .kind = QP_VALUE, .on = "--max-examples"},
    {.name = "eval_dataset_size", .cmds = T, .kind = QP_VALUE, .on = "--eval-dataset-size"},
    {.name = "do_eval", .cmds = T, .kind = QP_DO_EVAL},
    {.name = "do_train", .cmds = T, .kind = QP_BOOL, .on = "", .off = NULL, .why = "qlora train always trains; to evaluate an adapter, use qlora eval", .default_true = 1},
    {.name = "train_on_source", .cmds = T, .kind = QP_BOOL, .on = "--train-on-source", .off = ""},
    {.name = "group_by_length", .cmds = T, .kind = QP_BOOL, .on = "--group-by-length", .off = "--no-group-by-length", .default_true = 1},
    /* the quantized base */
    {.name = "bits", .cmds = TE, .kind = QP_BITS},
    {.name = "quant_type", .cmds = TE, .kind = QP_QUANT_TYPE},
    {.name = "double_quant", .cmds = TE, .kind = QP_DOUBLE_QUANT, .default_true = 1},
    {.name = "bf16", .cmds = TE, .kind = QP_BOOL, .on = "--precision=bf16", .off = "--precision=fp32"},
    {.name = "fp16", .cmds = TE, .kind = QP_BOOL, .on = NULL, .off = "", .why = "qlora computes in fp32 or bf16: use --bf16 (or --precision bf16)"},
    {.name = "full_finetune", .cmds = T, .kind = QP_BOOL, .on = NULL, .off = "", .why = "qlora trains LoRA adapters over a frozen base only"},
    {.name = "trust_remote_code", .cmds = TE, .kind = QP_NOTE_BOOL,
     .why = "qlora never runs code from a model folder; it reads the architectures it knows (docs/models.md)"},
    {.name = "use_auth_token", .cmds = TE, .kind = QP_NOTE_BOOL, .why = "qlora reads local model folders only (--model DIR)"},
    {.name = "cache_dir", .cmds = TE, .kind = QP_NOTE, .why = "qlora reads local folders; there is no download cache"},
    /* LoRA */
    {.name = "lora_r", .cmds = T, .kind = QP_VALUE, .on = "--lora-r"},
    {.name = "lora_alpha", .cmds = T, .kind = QP_VALUE, .on = "--lora-alpha"},
    {.name = "lora_dropout", .cmds = T, .kind = QP_VALUE, .on = "--lora-dropout"},
    {.name = "lora_modules", .cmds = T, .kind = QP_VALUE, .on = "--lora-modules"},
    /* the optimizer and its schedule */
    {.name = "learning_rate", .cmds = T, .kind = QP_VALUE, .on = "--lr"},
    {.name = "weight_decay", .cmds = T, .kind = QP_VALUE, .on = "--weight-decay"},
    {.name = "max_grad_norm", .cmds = T, .kind = QP_VALUE, .on = "--max-grad-norm"},
    {.name = "adam_beta1", .cmds = T, .kind = QP_VALUE, .on = "--adam-beta1"},
    {.name = "adam_beta2", .cmds = T, .kind = QP_VALUE, .on = "--adam-beta2"},
    {.name = "adam_epsilon", .cmds = T, .kind = QP_VALUE, .on = "--adam-epsilon"},
    {.name = "optim", .cmds = T, .kind = QP_VALUE, .on = "--optim", .map = optim_values},
    {.name = "adam8bit", .cmds = T, .kind = QP_BOOL, .on = NULL, .off = "", .why = qp_eight_bit},
    {.name = "lr_scheduler_type", .cmds = T, .kind = QP_VALUE, .on = "--lr-scheduler"},
    {.name = "warmup_ratio", .cmds = T, .kind = QP_VALUE, .on = "--warmup-ratio"},
    {.name = "warmup_steps", .cmds = T, .kind = QP_REFUSE, .why = "give the warmup as --warmup_ratio R (ceil(R x steps) steps)"},
    /* batches and steps */
    {.name = "per_device_train_batch_size", .cmds = T, .kind = QP_VALUE, .on = "--batch-size"},
    {.name = "per_device_eval_batch_size", .cmds = E, .kind = QP_VALUE, .on = "--batch-size"},
    {.name = "per_device_eval_batch_size", .cmds = T, .kind = QP_NOTE, .why = "evaluation runs --batch-size sequences at a time, and its loss does not depend on it"},
    {.name = "gradient_accumulation_steps", .cmds = T, .kind = QP_VALUE, .on = "--grad-accum"},
    {.name = "max_steps", .cmds = T, .kind = QP_MAX_STEPS, .on = "--steps"},
    {.name = "num_train_epochs", .cmds = T, .kind = QP_VALUE, .on = "--epochs"},
    {.name = "gradient_checkpointing", .cmds = T, .kind = QP_BOOL, .on = "--gradient-checkpointing", .off = "--no-gradient-checkpointing", .default_true = 1},
    {.name = "seed", .cmds = T, .kind = QP_VALUE, .on = "--seed"},
    {.name = "data_seed", .cmds = T, .kind = QP_VALUE, .on = "--data-seed"},
    /* checkpoints, evaluation, logging */
    {.name = "save_steps", .cmds = T, .kind = QP_VALUE, .on = "--save-steps"},
    {.name = "save_total_limit", .cmds = T, .kind = QP_VALUE, .on = "--save-total-limit"},
    {.name = "save_strategy", .cmds = T, .kind = QP_VALUE, .on = NULL, .map = save_strategy_values, .trailing = 1},
    {.name = "eval_steps", .cmds = T, .kind = QP_VALUE, .on = "--eval-steps"},
    {.name = "evaluation_strategy", .cmds = T, .kind = QP_VALUE, .on = NULL, .map = eval_strategy_values, .trailing = 1},
    {.name = "eval_strategy", .cmds = T, .kind = QP_VALUE, .on = NULL, .map = eval_strategy_values, .trailing = 1},
    {.name = "logging_steps", .cmds = T, .kind = QP_NOTE, .why = "metrics.jsonl has a row for every step"},
    {.name = "logging_strategy", .cmds = T, .kind = QP_NOTE, .why = "metrics.jsonl has a row for every step"},
    {.name = "report_to", .cmds = T, .kind = QP_VALUE, .on = NULL, .map = report_to_values},
    {.name = "run_name", .cmds = T, .kind = QP_NOTE, .why = "a run is named by its folder (--output_dir)"},
    {.name = "remove_unused_columns", .cmds = T, .kind = QP_NOTE_BOOL, .why = "qlora reads only the fields a format uses", .default_true = 1},
    {.name = "dataloader_num_workers", .cmds = T, .kind = QP_NOTE, .why = "the data is tokenized once, before training"},
    {.name = "max_memory_MB", .cmds = T, .kind = QP_NOTE, .why = "qlora trains on one device and plans its memory from the model and data (--dry-run shows the plan)"},
    /* MMLU */
    {.name = "do_mmlu_eval", .cmds = T, .kind = QP_BOOL, .on = NULL, .off = "", .why = "MMLU runs after training here: qlora eval --mmlu DIR --adapter RUN_DIR"},
    {.name = "mmlu_split", .cmds = E, .kind = QP_VALUE, .on = "--mmlu-split", .map = mmlu_split_values},
    {.name = "mmlu_dataset", .cmds = E, .kind = QP_VALUE, .on = NULL, .map = mmlu_dataset_values},
    {.name = "mmlu_split", .cmds = T, .kind = QP_NOTE, .why = mmlu_note},
    {.name = "mmlu_dataset", .cmds = T, .kind = QP_NOTE, .why = mmlu_note},
    {.name = "max_mmlu_samples", .cmds = T, .kind = QP_NOTE, .why = mmlu_note},
    {.name = "mmlu_source_max_len", .cmds = T, .kind = QP_NOTE, .why = mmlu_note},
    /* prediction and generation */
    {.name = "do_predict", .cmds = T, .kind = QP_BOOL, .on = NULL, .off = "", .why = "to generate with an adapter, use qlora generate"},
    {.name = "predict_with_generate", .cmds = T, .kind = QP_BOOL, .on = NULL, .off = "", .why = "to generate with an adapter, use qlora generate"},
    {.name = "max_new_tokens", .cmds = T, .kind = QP_NOTE, .why = generation_note},
    {.name = "min_new_tokens", .cmds = T, .kind = QP_NOTE, .why = generation_note},
    {.name = "do_sample", .cmds = T, .kind = QP_NOTE_BOOL, .why = generation_note},
    {.name = "num_beams", .cmds = T, .kind = QP_NOTE, .why = generation_note},
    {.name = "num_beam_groups", .cmds = T, .kind = QP_NOTE, .why = generation_note},
    {.name = "penalty_alpha", .cmds = T, .kind = QP_NOTE, .why = generation_note},
    {.name = "use_cache", .cmds = T, .kind = QP_NOTE_BOOL, .why = generation_note, .default_true = 1},
    {.name = "temperature", .cmds = T, .kind = QP_NOTE, .why = generation_note},
    {.name = "top_k", .cmds = T, .kind = QP_NOTE, .why = generation_note},
    {.name = "top_p", .cmds = T, .kind = QP_NOTE, .why = generation_note},
    {.name = "typical_p", .cmds = T, .kind = QP_NOTE, .why = generation_note},
    {.name = "diversity_penalty", .cmds = T, .kind = QP_NOTE, .why = generation_note},
    {.name = "repetition_penalty", .cmds = T, .kind = QP_NOTE, .why = generation_note},
    {.name = "length_penalty", .cmds = T, .kind = QP_NOTE, .why = generation_note},
    {.name = "no_repeat_ngram_size", .cmds = T, .kind = QP_NOTE, .why = generation_note},
};

/* qlora.py's --dataset names of Hugging Face Hub datasets (make_data_module) */
static const struct {
    const char *name, *hub;
} hub_datasets[] = {
    {"alpaca", "tatsu-lab/alpaca"},
    {"alpaca-clean", "yahma/alpaca-cleaned"},
    {"chip2", "laion/OIG (unified_chip2.jsonl)"},
    {"self-instruct", "yizhongw/self_instruct"},
    {"hh-rlhf", "Anthropic/hh-rlhf"},
    {"longform", "akoksal/LongForm"},
    {"oasst1", "timdettmers/openassistant-guanaco"},
};

/* The flag `name` names exactly, or as the unique prefix argparse takes
 * (qlora.py's scripts write --use_auth for --use_auth_token). */
static const qp_flag *find_flag(const char *name, int which)
{
    const qp_flag *hit = NULL;
    size_t n = strlen(name);
    int count = 0;
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++) {
        if (!(flags[i].cmds & (unsigned)which) || strncmp(flags[i].name, name, n)) continue;
        if (!flags[i].name[n]) return &flags[i];
        if (!hit || strcmp(hit->name, flags[i].name)) count++;
        hit = &flags[i];
    }
    return count == 1 && n >= 4 ? hit : NULL;
}

/* Our long option that `name` (n characters, no "--") names exactly or as
 * the unique prefix getopt_long takes; *count: how many it prefixes. */
static const struct option *find_ours(const struct option *ours, const char *name, size_t n, int *count)
{
    const struct option *hit = NULL;
    *count = 0;
    for (const struct option *o = ours; o->name; o++) {
        if (strncmp(o->name, name, n)) continue;
        if (strlen(o->name) == n) {
            *count = 1;
            return o;
        }
        hit = o;
        ++*count;
    }
    return *count == 1 ? hit : NULL;
}

/* HF's string_to_bool */
static int parse_bool(const char *v, int *out)
{
    static const char *const yes[] = {"yes", "true", "t", "y", "1"}, *const no[] = {"no", "false", "f", "n", "0"};
    for (int i = 0; i < 5; i++) {
        if (!strcasecmp(v, yes[i])) return *out = 1, 0;
        if (!strcasecmp(v, no[i])) return *out = 0, 0;
    }
    return -1;
}

static int push(qp_args *a, char *s, int owned)
{
    if (!s) return usage_error("out of memory");
    if (owned) a->owned[a->n_owned++] = s;
    a->argv[a->argc++] = s;
    return 0;
}

static char *cat(const char *x, const char *y)
{
    size_t nx = strlen(x), ny = strlen(y);
    char *s = malloc(nx + ny + 1);
    if (s) memcpy(s, x, nx), memcpy(s + nx, y, ny + 1);
    return s;
}

static void note(const char *user, const char *why)
{
    fprintf(stderr, "qlora: %s: note: qlora.py's %s has no effect here: %s\n", command, user, why);
}

int qp_translate(int which, int argc, char **argv, const struct option *ours, const char *shortopts, qp_args *a)
{
    memset(a, 0, sizeof *a);
    /* every argument gives at most one, and the trailing ones come from arguments too */
    a->argv = calloc((size_t)argc * 2 + 4, sizeof *a->argv);
    a->owned = calloc((size_t)argc * 2 + 4, sizeof *a->owned);
    char **trailing = calloc((size_t)argc + 1, sizeof *trailing);
    int n_trailing = 0;
    if (!a->argv || !a->owned || !trailing) {
        free(trailing);
        return usage_error("out of memory");
    }
    const char *bits = NULL, *quant_type = NULL;
    int double_quant = 1, quant_given = 0, rc = 0;
    a->argv[a->argc++] = argv[0];
    for (int i = 1; i < argc && !rc; i++) {
        const char *arg = argv[i];
        if (!strcmp(arg, "--")) {
            while (i < argc) a->argv[a->argc++] = argv[i++];
            break;
        }
        if (arg[0] == '-' && arg[1] != '-' && arg[1]) {
            /* a short option: -q SPEC or -qSPEC */
            const char *s = strchr(shortopts, arg[1]);
            if (arg[1] == 'q') a->quantizer_given = 1;
            a->argv[a->argc++] = argv[i];
            if (s && s[1] == ':' && !arg[2] && i + 1 < argc) a->argv[a->argc++] = argv[++i];
            continue;
        }
        if (strncmp(arg, "--", 2) || !arg[2]) {
            a->argv[a->argc++] = argv[i];
            continue;
        }
        const char *name = arg + 2, *eq = strchr(name, '=');
        size_t n = eq ? (size_t)(eq - name) : strlen(name);
        char key[128], user[160];
        const qp_flag *f = NULL;
        int negated = 0, dummy;
        if (n < sizeof key) {
            for (size_t k = 0; k < n; k++) key[k] = name[k] == '-' ? '_' : name[k];
            key[n] = '\0';
            snprintf(user, sizeof user, "--%.*s", (int)n, name);
            f = find_flag(key, which);
            if (!f && !strncmp(key, "no_", 3)) {
                /* HF's --no_NAME of a boolean whose default is true */
                f = find_flag(key + 3, which);
                if (f && !f->default_true) f = NULL;
                negated = f != NULL;
            }
        }
        int is_bool = f && (f->kind == QP_BOOL || f->kind == QP_NOTE_BOOL || f->kind == QP_DOUBLE_QUANT ||
                            f->kind == QP_DO_EVAL);
        /* our --group-by-length, --gradient-checkpointing and --train-on-source
         * take no value; with one (True, =no) they are qlora.py's booleans */
        int bool_value = is_bool && !negated && (eq || (i + 1 < argc && !parse_bool(argv[i + 1], &dummy)));
        int count;
        const struct option *o = bool_value ? NULL : find_ours(ours, name, n, &count);
        if (!bool_value && (o || count > 1)) {
            /* ours (or a prefix of several of ours, which getopt_long calls ambiguous) */
            if (o && !strcmp(o->name, "quantizer")) a->quantizer_given = 1;
            a->argv[a->argc++] = argv[i];
            if (o && o->has_arg == required_argument && !eq && i + 1 < argc) a->argv[a->argc++] = argv[++i];
            continue;
        }
        if (!f) {
            a->argv[a->argc++] = argv[i]; /* getopt_long says it is unknown */
            continue;
        }
        const char *value = NULL;
        int truth = 1;
        if (negated) {
            if (eq) {
                rc = usage_error("option '%s' takes no value", user);
                break;
            }
            truth = 0;
        } else if (is_bool) {
            /* --flag, --flag=V, or --flag V when V is not an option (argparse's nargs='?') */
            const char *v = eq ? eq + 1 : i + 1 < argc && argv[i + 1][0] != '-' ? argv[++i] : NULL;
            if (v && parse_bool(v, &truth)) {
                rc = usage_error("%s %s: expected a boolean (true or false, yes or no, 1 or 0)", user, v);
                break;
            }
            value = v;
        } else {
            value = eq ? eq + 1 : i + 1 < argc ? argv[++i] : NULL;
            if (!value) {
                rc = usage_error("option '%s' needs a value", user);
                break;
            }
        }
        switch (f->kind) {
        case QP_VALUE: {
            const qp_value *m = f->map;
            while (m && m->from && strcmp(m->from, value)) m++;
            const char *to = value;
            /* a value of the map, or the end of the map of an option without `on` */
            if (m && (m->from || !f->on)) {
                if (!m->to) {
                    rc = m->why ? usage_error("qlora.py's %s %s is not supported: %s", user, value, m->why)
                                : usage_error("%s %s: not a value qlora takes", user, value);
                    break;
                }
                to = m->to;
            }
            if (!f->on) {
                if (!to[0]) break; /* what qlora does anyway */
                if (f->trailing) trailing[n_trailing++] = (char *)to;
                else rc = push(a, (char *)to, 0);
                break;
            }
            char *s = cat(f->on, "=");
            rc = push(a, s ? cat(s, to) : NULL, 1);
            free(s);
            break;
        }
        case QP_BOOL: {
            const char *to = truth ? f->on : f->off;
            if (!to)
                rc = usage_error("qlora.py's %s%s%s is not supported: %s", user, value ? " " : "", value ? value : "",
                                 f->why);
            else if (to[0]) rc = push(a, (char *)to, 0);
            break;
        }
        case QP_NOTE:
        case QP_NOTE_BOOL: note(user, f->why); break;
        case QP_REFUSE: rc = usage_error("qlora.py's %s is not supported: %s", user, f->why); break;
        case QP_DATASET: {
            size_t h = 0;
            for (; h < sizeof hub_datasets / sizeof hub_datasets[0]; h++)
                if (!strcmp(value, hub_datasets[h].name)) break;
            if (h < sizeof hub_datasets / sizeof hub_datasets[0] && access(value, F_OK) != 0) {
                rc = usage_error("qlora.py's %s %s downloads %s from the Hugging Face Hub; qlora reads local files: "
                                 "download it and give the file (%s FILE)",
                                 user, value, hub_datasets[h].hub, user);
                break;
            }
            rc = push(a, cat("--data=", value), 1);
            break;
        }
        case QP_BITS:
            bits = value;
            quant_given = 1;
            break;
        case QP_QUANT_TYPE:
            quant_type = value;
            quant_given = 1;
            break;
        case QP_DOUBLE_QUANT:
            double_quant = truth;
            quant_given = 1;
            break;
        case QP_DO_EVAL: a->do_eval = truth; break;
        case QP_MAX_STEPS:
            if (strcmp(value, "-1")) rc = push(a, cat("--steps=", value), 1); /* HF: -1 trains num_train_epochs */
            break;
        }
    }
    for (int k = 0; k < n_trailing && !rc; k++) rc = push(a, trailing[k], 0);
    free(trailing);
    if (rc) return rc;
    if (quant_given) {
        /* qlora.py: bits 4 quantizes with quant_type (nf4 or fp4) and
         * double_quant, 8 is LLM.int8 (quant_type and double_quant do not
         * apply), 16 and 32 keep the base unquantized */
        if (a->quantizer_given) return usage_error("give --quantizer or qlora.py's --bits/--quant_type/--double_quant, not both");
        const char *qt = quant_type ? quant_type : "nf4";
        if (strcmp(qt, "nf4") && strcmp(qt, "fp4")) return usage_error("--quant_type %s: qlora.py takes nf4 or fp4", qt);
        const char *b = bits ? bits : "4";
        if (!strcmp(b, "4")) snprintf(a->quantizer, sizeof a->quantizer, "%s%s", qt, double_quant ? "" : ":double_quant=0");
        else if (!strcmp(b, "8")) snprintf(a->quantizer, sizeof a->quantizer, "int8");
        else if (!strcmp(b, "16") || !strcmp(b, "32")) snprintf(a->quantizer, sizeof a->quantizer, "none");
        else return usage_error("--bits %s: qlora.py takes 4, 8, 16 or 32", b);
    }
    return 0;
}

void qp_free(qp_args *a)
{
    for (int i = 0; i < a->n_owned; i++) free(a->owned[i]);
    free(a->owned);
    free(a->argv);
    memset(a, 0, sizeof *a);
}
