/* qlora.py's option names on `qlora train` and `qlora eval`: each one does
 * what our own option does (the settings a --dry-run prints are the same),
 * booleans are read as HfArgumentParser reads them, --bits/--quant_type/
 * --double_quant become a quantizer spec, and an option of qlora.py that
 * qlora lacks is refused by name. */
#include <check.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qlora/qlora.h"
#include "testutil.h"

static char model[1024], data[1100], tmp[1024];

static void setup(void)
{
    snprintf(model, sizeof model, "%s/models/stories260K", tu_env("QLORA_SHARED"));
    snprintf(tmp, sizeof tmp, "%s", tu_tmpdir());
    snprintf(data, sizeof data, "%s/io.jsonl", tmp);
    FILE *f = fopen(data, "w");
    ck_assert_ptr_nonnull(f);
    for (int i = 0; i < 12; i++)
        fprintf(f, "{\"input\": \"Tell a story about a cat number %d.\", \"output\": \"Once upon a time there was a cat. "
                   "It played %d times.\"}\n",
                i, i);
    fclose(f);
}

static void teardown(void) { ql_remove_tree(tmp); }

static int qlora(char **out, char **err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int qlora(char **out, char **err, const char *fmt, ...)
{
    char args[6000], cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    ck_assert_int_lt(n, (int)sizeof args);
    snprintf(cmd, sizeof cmd, "timeout -k 5 120 '%s' %s", tu_env("QLORA_BIN"), args);
    char *o = NULL, *e = NULL;
    int st = tu_run(cmd, &o, &e);
    if (out) *out = o;
    else free(o);
    if (err) *err = e;
    else free(e);
    return st;
}

/* The settings `qlora train ARGS --dry-run` prints (its "settings: {...}" line) */
static json_t *settings(const char *args)
{
    char *out, *err;
    int st = qlora(&out, &err, "train --model '%s' %s --dry-run --quiet", model, args);
    ck_assert_msg(st == 0, "train %s --dry-run: exit %d: %s", args, st, err);
    const char *line = strstr(out, "\nsettings: ");
    ck_assert_msg(line != NULL, "no settings line in:\n%s", out);
    json_error_t jerr;
    json_t *j = json_loadb(line + 11, strcspn(line + 11, "\n"), 0, &jerr);
    ck_assert_msg(j != NULL, "settings are not JSON (%s): %s", jerr.text, line);
    free(out);
    free(err);
    return j;
}

static void assert_same_settings(json_t *a, json_t *b, const char *what)
{
    char *x = json_dumps(a, JSON_SORT_KEYS), *y = json_dumps(b, JSON_SORT_KEYS);
    ck_assert_msg(json_equal(a, b), "%s:\nqlora.py's names: %s\nours:             %s", what, x, y);
    free(x);
    free(y);
}

static double num(json_t *j, const char *key)
{
    json_t *v = json_object_get(j, key);
    ck_assert_msg(json_is_number(v), "settings have no number %s", key);
    return json_number_value(v);
}

static const char *str(json_t *j, const char *key)
{
    json_t *v = json_object_get(j, key);
    ck_assert_msg(json_is_string(v), "settings have no string %s", key);
    return json_string_value(v);
}

static int boolean(json_t *j, const char *key)
{
    json_t *v = json_object_get(j, key);
    ck_assert_msg(json_is_boolean(v), "settings have no boolean %s", key);
    return json_is_true(v);
}

/* Every option of one of qlora.py's scripts that qlora has, spelled as
 * qlora.py spells it: the same run as our own names, and not the defaults. */
START_TEST(qlora_py_names_are_ours)
{
    char a[4096], b[4096];
    snprintf(a, sizeof a,
             "--model_name_or_path '%s' --dataset '%s' --dataset_format input-output --lora_r 8 --lora_alpha 32 "
             "--lora_dropout 0.1 --lora_modules q_proj,v_proj --learning_rate 0.001 --per_device_train_batch_size 2 "
             "--gradient_accumulation_steps 4 --max_steps 7 --source_max_len 64 --target_max_len 32 --warmup_ratio 0.1 "
             "--lr_scheduler_type cosine --max_grad_norm 0.5 --weight_decay 0.01 --adam_beta1 0.8 --adam_beta2 0.99 "
             "--adam_epsilon 1e-6 --save_steps 3 --save_total_limit 2 --eval_steps 2 --seed 7 --data_seed 9 "
             "--bits 4 --quant_type fp4 --double_quant False --group_by_length False --train_on_source True "
             "--gradient_checkpointing True --do_eval --eval_dataset_size 3 --max_eval_samples 2 "
             "--optim adamw_torch --bf16 False --max_train_samples 11",
             model, data);
    json_t *theirs = settings(a);
    snprintf(b, sizeof b,
             "--data '%s' --format input-output --lora-r 8 --lora-alpha 32 --lora-dropout 0.1 --lora-modules "
             "q_proj,v_proj --lr 0.001 --batch-size 2 --grad-accum 4 --steps 7 --source-max-len 64 --target-max-len 32 "
             "--warmup-ratio 0.1 --lr-scheduler cosine --max-grad-norm 0.5 --weight-decay 0.01 --adam-beta1 0.8 "
             "--adam-beta2 0.99 --adam-epsilon 1e-6 --save-steps 3 --save-total-limit 2 --eval-steps 2 --seed 7 "
             "--data-seed 9 --quantizer fp4:double_quant=0 --no-group-by-length --train-on-source "
             "--gradient-checkpointing --eval-dataset-size 3 --max-eval-examples 2 --optim adamw --precision fp32 "
             "--max-examples 11",
             data);
    json_t *ours = settings(b);
    assert_same_settings(theirs, ours, "the same run");
    /* and each took effect */
    ck_assert_int_eq((int)num(theirs, "lora_r"), 8);
    ck_assert_double_eq_tol(num(theirs, "lora_alpha"), 32, 1e-9);
    ck_assert_double_eq_tol(num(theirs, "lora_dropout"), 0.1, 1e-7);
    ck_assert_int_eq((int)num(theirs, "lora_modules"), 1 + 4); /* q_proj, v_proj */
    ck_assert_double_eq_tol(num(theirs, "lr"), 1e-3, 1e-10);
    ck_assert_int_eq((int)num(theirs, "batch_size"), 2);
    ck_assert_int_eq((int)num(theirs, "grad_accum"), 4);
    ck_assert_int_eq((int)num(theirs, "steps"), 7);
    ck_assert_int_eq((int)num(theirs, "source_max_len"), 64);
    ck_assert_int_eq((int)num(theirs, "target_max_len"), 32);
    ck_assert_int_eq((int)num(theirs, "warmup_steps"), 1); /* ceil(0.1 x 7) */
    ck_assert_str_eq(str(theirs, "lr_scheduler"), "cosine");
    ck_assert_double_eq_tol(num(theirs, "max_grad_norm"), 0.5, 1e-7);
    ck_assert_double_eq_tol(num(theirs, "weight_decay"), 0.01, 1e-9);
    ck_assert_double_eq_tol(num(theirs, "adam_beta1"), 0.8, 1e-7);
    ck_assert_double_eq_tol(num(theirs, "adam_beta2"), 0.99, 1e-7);
    ck_assert_double_eq_tol(num(theirs, "adam_epsilon"), 1e-6, 1e-12);
    ck_assert_int_eq((int)num(theirs, "save_steps"), 3);
    ck_assert_int_eq((int)num(theirs, "save_total_limit"), 2);
    ck_assert_int_eq((int)num(theirs, "eval_steps"), 2);
    ck_assert_int_eq((int)num(theirs, "seed"), 7);
    ck_assert_int_eq((int)num(theirs, "data_seed"), 9);
    ck_assert_str_eq(str(theirs, "quantizer"), "fp4:blocksize=64,double_quant=0");
    ck_assert(!boolean(theirs, "group_by_length"));
    ck_assert(boolean(theirs, "train_on_source"));
    ck_assert(boolean(theirs, "gradient_checkpointing"));
    ck_assert_int_eq((int)num(theirs, "max_examples"), 11);
    ck_assert_int_eq((int)num(theirs, "eval_examples"), 2);     /* 3 held out, 2 evaluated */
    ck_assert_int_eq((int)num(theirs, "train_examples"), 11 - 3);
    ck_assert_str_eq(str(theirs, "precision"), "fp32");
    json_decref(theirs);
    json_decref(ours);

    /* dashed forms (HfArgumentParser takes them too), --name=value, and
     * --max_steps -1 (HF: train num_train_epochs) */
    snprintf(a, sizeof a, "--data '%s' --learning-rate=0.001 --per-device-train-batch-size 2 --max_steps -1 "
                          "--num_train_epochs 2",
             data);
    snprintf(b, sizeof b, "--data '%s' --lr 0.001 --batch-size 2 --epochs 2", data);
    theirs = settings(a);
    ours = settings(b);
    assert_same_settings(theirs, ours, "dashed names, --max_steps -1");
    ck_assert_int_eq((int)num(theirs, "steps"), 1); /* 2 epochs of 6 micro-batches, 16 per step: at least 1 */
    json_decref(theirs);
    json_decref(ours);
}
END_TEST

/* The options of qlora.py's Guanaco 7B script (scripts/finetune_guanaco_7b.sh
 * of artidoro/qlora), with a local Guanaco file for its Hub dataset, a
 * smaller hold-out for 12 examples, and without --do_mmlu_eval, which is
 * refused: the run it describes */
START_TEST(guanaco_script_options)
{
    char guanaco[1200], args[4096];
    snprintf(guanaco, sizeof guanaco, "%s/guanaco.jsonl", tmp);
    FILE *f = fopen(guanaco, "w");
    for (int i = 0; i < 12; i++) fprintf(f, "{\"text\": \"### Human: Story %d? ### Assistant: Once upon a time.\"}\n", i);
    fclose(f);
    snprintf(args, sizeof args,
             "--model_name_or_path '%s' --output_dir '%s/guanaco-7b' --logging_steps 10 --save_strategy steps "
             "--data_seed 42 --save_steps 500 --save_total_limit 40 --evaluation_strategy steps --eval_dataset_size 4 "
             "--max_eval_samples 1000 --per_device_eval_batch_size 1 --max_new_tokens 32 --dataloader_num_workers 3 "
             "--group_by_length --logging_strategy steps --remove_unused_columns False --do_train --do_eval "
             "--lora_r 64 --lora_alpha 16 --lora_modules all --double_quant --quant_type nf4 --bf16 --bits 4 "
             "--warmup_ratio 0.03 --lr_scheduler_type constant --gradient_checkpointing --dataset '%s' "
             "--source_max_len 16 --target_max_len 512 --per_device_train_batch_size 1 --gradient_accumulation_steps 16 "
             "--max_steps 1875 --eval_steps 187 --learning_rate 0.0002 --adam_beta2 0.999 --max_grad_norm 0.3 "
             "--lora_dropout 0.1 --weight_decay 0.0 --seed 0 --use_auth",
             model, tmp, guanaco);
    char *out, *err;
    int st = qlora(&out, &err, "train %s --do_mmlu_eval", args);
    ck_assert_int_eq(st, 2);
    ck_assert_contains(err, "qlora.py's --do_mmlu_eval is not supported");
    free(out), free(err);
    json_t *s = settings(args);
    ck_assert_str_eq(str(s, "format"), "oasst1");
    ck_assert_str_eq(str(s, "quantizer"), "nf4:blocksize=64,double_quant=1");
    ck_assert_int_eq((int)num(s, "steps"), 1875);
    ck_assert_int_eq((int)num(s, "warmup_steps"), 0); /* constant: no warmup, as transformers */
    ck_assert_int_eq((int)num(s, "eval_steps"), 187);
    ck_assert_int_eq((int)num(s, "save_steps"), 500);
    ck_assert_int_eq((int)num(s, "eval_examples"), 4);
    ck_assert_int_eq((int)num(s, "train_examples"), 8);
    ck_assert_int_eq((int)num(s, "source_max_len"), 16);
    ck_assert_int_eq((int)num(s, "target_max_len"), 512);
    ck_assert_int_eq((int)num(s, "seed"), 0);
    ck_assert_int_eq((int)num(s, "data_seed"), 42);
    ck_assert_double_eq_tol(num(s, "lora_dropout"), 0.1, 1e-7);
    ck_assert(boolean(s, "gradient_checkpointing"));
    ck_assert(boolean(s, "group_by_length"));
    ck_assert_str_eq(str(s, "precision"), "bf16");
    json_decref(s);
}
END_TEST

/* Booleans as HfArgumentParser reads them: --flag, --flag True, --flag=no,
 * --no_flag for those that default to true; a bad word is refused. */
START_TEST(qlora_py_booleans)
{
    static const struct {
        const char *args;
        int group_by_length;
    } cases[] = {
        {"--group_by_length", 1},          {"--group_by_length True", 1},   {"--group_by_length=yes", 1},
        {"--group_by_length 1", 1},        {"--group_by_length False", 0},  {"--group_by_length=no", 0},
        {"--group_by_length F", 0},        {"--no_group_by_length", 0},     {"--no-group-by-length", 0},
        {"--group-by-length false", 0},    {"--no_group_by_length --group_by_length", 1},
        {"--group_by_length --seed 3", 1}, /* a value is taken only when it is one */
    };
    char args[2048];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(args, sizeof args, "--data '%s' %s", data, cases[i].args);
        json_t *s = settings(args);
        ck_assert_msg(boolean(s, "group_by_length") == cases[i].group_by_length, "%s: group_by_length %d",
                      cases[i].args, boolean(s, "group_by_length"));
        json_decref(s);
    }
    char *out, *err;
    int st = qlora(&out, &err, "train --model '%s' --data '%s' --dry-run --group_by_length maybe", model, data);
    ck_assert_int_eq(st, 2);
    ck_assert_str_eq(err, "qlora: train: --group_by_length maybe: expected a boolean (true or false, yes or no, 1 or "
                          "0) (see 'qlora train --help')\n");
    free(out);
    free(err);
}
END_TEST

/* --bits, --quant_type and --double_quant as qlora.py passes them to
 * bitsandbytes: the quantizer spec */
START_TEST(qlora_py_quantization)
{
    static const struct {
        const char *args, *quantizer;
    } cases[] = {
        {"--bits 4", "nf4:blocksize=64,double_quant=1"},
        {"--double_quant", "nf4:blocksize=64,double_quant=1"},
        {"--quant_type nf4 --double_quant False", "nf4:blocksize=64,double_quant=0"},
        {"--no_double_quant", "nf4:blocksize=64,double_quant=0"},
        {"--quant_type fp4", "fp4:blocksize=64,double_quant=1"},
        {"--bits 4 --quant_type fp4 --double_quant=0", "fp4:blocksize=64,double_quant=0"},
        {"--bits 8", "int8"},
        {"--bits 8 --quant_type fp4", "int8"}, /* bitsandbytes' 8-bit ignores both */
        {"--bits 16", "none"},
        {"--bits 32 --double_quant", "none"},
    };
    char args[2048];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(args, sizeof args, "--data '%s' %s", data, cases[i].args);
        json_t *s = settings(args);
        ck_assert_msg(!strcmp(str(s, "quantizer"), cases[i].quantizer), "%s: quantizer %s, not %s", cases[i].args,
                      str(s, "quantizer"), cases[i].quantizer);
        json_decref(s);
    }
}
END_TEST

/* An option of qlora.py (or of the TrainingArguments its scripts pass) that
 * qlora lacks is refused, by name and with what to do instead; one that
 * changes nothing here is taken with a note. */
START_TEST(qlora_py_refusals_and_notes)
{
    static const struct {
        const char *args, *err;
    } cases[] = {
        {"--do_mmlu_eval", "qlora.py's --do_mmlu_eval is not supported: MMLU runs after training here: qlora eval "
                           "--mmlu DIR --adapter RUN_DIR"},
        {"--do_mmlu_eval True", "qlora.py's --do_mmlu_eval True is not supported"},
        {"--dataset oasst1", "qlora.py's --dataset oasst1 downloads timdettmers/openassistant-guanaco from the "
                             "Hugging Face Hub; qlora reads local files: download it and give the file (--dataset FILE)"},
        {"--fp16", "qlora.py's --fp16 is not supported: qlora computes in fp32 or bf16"},
        {"--full_finetune True", "qlora.py's --full_finetune True is not supported"},
        {"--adam8bit", "qlora keeps AdamW's states in 32 bits"},
        {"--optim paged_adamw_8bit", "qlora keeps AdamW's states in 32 bits"},
        {"--warmup_steps 10", "qlora.py's --warmup_steps is not supported: give the warmup as --warmup_ratio R"},
        {"--save_strategy epoch", "qlora.py's --save_strategy epoch is not supported"},
        {"--evaluation_strategy epoch", "qlora.py's --evaluation_strategy epoch is not supported"},
        {"--report_to wandb", "qlora.py's --report_to wandb is not supported: qlora logs to RUN_DIR/metrics.jsonl"},
        {"--dataset_format chip2", "qlora.py's --dataset_format chip2 is not supported"},
        {"--do_train False", "qlora.py's --do_train False is not supported: qlora train always trains"},
        {"--bits 3", "--bits 3: qlora.py takes 4, 8, 16 or 32"},
        {"--quant_type int4", "--quant_type int4: qlora.py takes nf4 or fp4"},
        {"--bits 4 -q nf4", "give --quantizer or qlora.py's --bits/--quant_type/--double_quant, not both"},
        {"--lora_r", "option '--lora_r' needs a value"},
        {"--no_double_quant=1", "option '--no_double_quant' takes no value"},
        {"--no_lora_r", "unknown option '--no_lora_r'"},
        {"--not_an_option_of_anyone 1", "unknown option '--not_an_option_of_anyone'"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *out, *err;
        int st = qlora(&out, &err, "train --model '%s' --data '%s' --output '%s/run' %s", model, data, tmp, cases[i].args);
        ck_assert_msg(st == 2, "%s: exit %d, not 2: %s", cases[i].args, st, err);
        ck_assert_msg(!strncmp(err, "qlora: train: ", 14) && tu_contains(err, cases[i].err) &&
                          tu_contains(err, " (see 'qlora train --help')\n") && !strchr(err, '\n')[1],
                      "%s:\nwanted one line with: %s\ngot: %s", cases[i].args, cases[i].err, err);
        free(out);
        free(err);
    }
    /* no effect here: a note, and the run is the same */
    char args[2048];
    snprintf(args, sizeof args, "--data '%s' --logging_steps 10 --remove_unused_columns False --max_new_tokens 32 "
                                "--dataloader_num_workers 3 --save_strategy steps --evaluation_strategy steps "
                                "--report_to none --do_train",
             data);
    char *out, *err;
    int st = qlora(&out, &err, "train --model '%s' %s --dry-run --quiet", model, args);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(err, "qlora: train: note: qlora.py's --logging_steps has no effect here: metrics.jsonl has a "
                            "row for every step\n");
    ck_assert_contains(err, "note: qlora.py's --max_new_tokens has no effect here: qlora.py uses its generation "
                            "options only with --predict_with_generate\n");
    free(out);
    free(err);
    json_t *theirs = settings(args);
    snprintf(args, sizeof args, "--data '%s'", data);
    json_t *ours = settings(args);
    assert_same_settings(theirs, ours, "options without effect");
    json_decref(theirs);
    json_decref(ours);
    /* --save_strategy no / --evaluation_strategy no override the steps, as in qlora.py */
    snprintf(args, sizeof args, "--data '%s' --eval_steps 5 --evaluation_strategy no --save_strategy no --save_steps 4 "
                                "--eval-dataset-size 2",
             data);
    theirs = settings(args);
    ck_assert_int_eq((int)num(theirs, "eval_steps"), 0);
    ck_assert_int_eq((int)num(theirs, "save_steps"), 0);
    json_decref(theirs);
    /* --do_eval without --eval_dataset_size holds out qlora.py's 1024 */
    st = qlora(&out, &err, "train --model '%s' --data '%s' --do_eval --dry-run --quiet", model, data);
    ck_assert_int_ne(st, 0);
    ck_assert_contains(err, "--eval-dataset-size 1024 holds out 1024 of the 12 examples");
    free(out);
    free(err);
}
END_TEST

/* eval takes the names of qlora.py that apply to it */
START_TEST(qlora_py_names_on_eval)
{
    char *a_out, *a_err, *b_out, *b_err;
    int st = qlora(&a_out, &a_err,
                   "eval --model_name_or_path '%s' --dataset '%s' --dataset_format input-output --max_eval_samples 5 "
                   "--per_device_eval_batch_size 2 --source_max_len 16 --target_max_len 8 --bits 8 --quiet",
                   model, data);
    ck_assert_msg(st == 0, "exit %d: %s", st, a_err);
    st = qlora(&b_out, &b_err,
               "eval --model '%s' --data '%s' --format input-output --max-examples 5 --batch-size 2 --source-max-len 16 "
               "--target-max-len 8 -q int8 --quiet",
               model, data);
    ck_assert_msg(st == 0, "exit %d: %s", st, b_err);
    ck_assert_str_eq(a_out, b_out);
    ck_assert_contains(a_out, "\"examples\": 5,");
    ck_assert_contains(a_out, "\"quantizer\": \"int8\"");
    free(a_out), free(a_err), free(b_out), free(b_err);
    /* train's options are not eval's */
    st = qlora(&a_out, &a_err, "eval --model '%s' --data '%s' --learning_rate 1e-3", model, data);
    ck_assert_int_eq(st, 2);
    ck_assert_str_eq(a_err, "qlora: eval: unknown option '--learning_rate' (see 'qlora eval --help')\n");
    free(a_out), free(a_err);
}
END_TEST

/* --format when not given: detected from the file and said on stderr; the
 * result is that of the format given by hand; what fits none is refused */
START_TEST(format_is_detected)
{
    char alpaca[1200], guanaco[1200], odd[1200];
    snprintf(alpaca, sizeof alpaca, "%s/a.json", tmp);
    snprintf(guanaco, sizeof guanaco, "%s/g.jsonl", tmp);
    snprintf(odd, sizeof odd, "%s/odd.json", tmp);
    FILE *f = fopen(alpaca, "w");
    fputs("[{\"instruction\": \"Say hi.\", \"input\": \"\", \"output\": \"Hi there, friend.\"},\n"
          " {\"instruction\": \"Count.\", \"input\": \"to 3\", \"output\": \"1 2 3\"}]\n", f);
    fclose(f);
    f = fopen(guanaco, "w");
    fputs("{\"text\": \"### Human: Hi. ### Assistant: Hello, how can I help?\"}\n", f);
    fclose(f);
    f = fopen(odd, "w");
    fputs("[{\"question\": \"q\", \"answer\": \"a\"}]\n", f);
    fclose(f);
    static const struct {
        const char *file, *format, *why;
    } cases[] = {
        {"a", "alpaca", "a JSON array whose first record has \\\"instruction\\\" and \\\"output\\\""},
        {"g", "oasst1", "JSON Lines whose first record has \\\"text\\\""},
        {"io", "input-output", "JSON Lines whose first record has \\\"input\\\" and \\\"output\\\""},
    };
    const char *paths[] = {alpaca, guanaco, data};
    for (int i = 0; i < 3; i++) {
        char *a_out, *a_err, *b_out, *b_err, want[1600];
        int st = qlora(&a_out, &a_err, "eval --model '%s' --data '%s' --quiet", model, paths[i]);
        ck_assert_msg(st == 0, "exit %d: %s", st, a_err);
        snprintf(want, sizeof want, "{\"event\": \"format\", \"file\": \"%s\", \"format\": \"%s\", \"detected_from\": \"%s\"}\n",
                 paths[i], cases[i].format, cases[i].why);
        ck_assert_str_eq(a_err, want);
        st = qlora(&b_out, &b_err, "eval --model '%s' --data '%s' --format %s --quiet", model, paths[i], cases[i].format);
        ck_assert_msg(st == 0, "exit %d: %s", st, b_err);
        ck_assert_str_eq(a_out, b_out);
        free(a_out), free(a_err), free(b_out), free(b_err);
    }
    /* not scored as raw text (the issue: eval of an Alpaca file gave the JSON's NLL) */
    char *out, *err;
    ck_assert_int_eq(qlora(&out, &err, "eval --model '%s' --data '%s' --format text --quiet", model, alpaca), 0);
    ck_assert_contains(out, "\"examples\": 1,");
    free(out), free(err);
    /* a Guanaco text record trains on the whole text: every token but BOS is a target */
    ck_assert_int_eq(qlora(&out, &err, "eval --model '%s' --data '%s' --quiet", model, guanaco), 0);
    ck_assert_int_eq(qlora(NULL, NULL, "eval --model '%s' --data '%s' --quiet", model, guanaco), 0);
    char *t_out;
    char story[1200];
    snprintf(story, sizeof story, "%s/g.txt", tmp);
    f = fopen(story, "w");
    fputs("### Human: Hi. ### Assistant: Hello, how can I help?", f);
    fclose(f);
    ck_assert_int_eq(qlora(&t_out, NULL, "eval --model '%s' --data '%s' --quiet", model, story), 0);
    /* text: BOS + text; oasst1 text: BOS + text + EOS, one target more */
    json_t *g = json_loads(strrchr(out, '{'), 0, NULL), *t = json_loads(strrchr(t_out, '{'), 0, NULL);
    ck_assert_int_eq(json_integer_value(json_object_get(g, "tokens")), json_integer_value(json_object_get(t, "tokens")) + 1);
    json_decref(g), json_decref(t);
    free(out), free(err), free(t_out);
    /* train detects the same way, and refuses what fits none */
    char args[1400];
    snprintf(args, sizeof args, "--data '%s'", alpaca);
    json_t *s = settings(args);
    ck_assert_str_eq(str(s, "format"), "alpaca");
    json_decref(s);
    for (int c = 0; c < 2; c++) {
        int st = qlora(&out, &err, "%s --model '%s' --data '%s' %s%s", c ? "eval" : "train", model, odd, c ? "" : "--output ",
                       c ? "" : tmp);
        ck_assert_int_ne(st, 0);
        ck_assert_contains(err, "cannot tell the format: record index 0 has \"question\", \"answer\"");
        ck_assert_contains(err, "; or give --format alpaca, input-output, oasst1 or text\n");
        free(out), free(err);
    }
}
END_TEST

Suite *qlora_py_suite(void)
{
    Suite *s = suite_create("qlora_py");
    TCase *t = tcase_create("names");
    tcase_add_checked_fixture(t, setup, teardown);
    tcase_set_timeout(t, 240);
    tcase_add_test(t, qlora_py_names_are_ours);
    tcase_add_test(t, guanaco_script_options);
    tcase_add_test(t, qlora_py_booleans);
    tcase_add_test(t, qlora_py_quantization);
    tcase_add_test(t, qlora_py_refusals_and_notes);
    tcase_add_test(t, qlora_py_names_on_eval);
    tcase_add_test(t, format_is_detected);
    suite_add_tcase(s, t);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(qlora_py_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
