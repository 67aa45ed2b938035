/* End-to-end training through the command line: determinism, bit-exact
 * resume, gradient checkpointing, the run folder's files, PEFT adapters,
 * eval/generate/merge with an adapter, and every bad-input message. */
#include <check.h>
#include <dirent.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qlora/mmlu.h"
#include "qlora/qlora.h"
#include "qlora/train.h"
#include "testutil.h"

/* transformers' get_scheduler, every step (tests/reference/gen_schedule_ref.py) */
#include "reference/schedule_ref.h"
/* torch's clip_grad_norm_ and AdamW on a fixed vector (tests/reference/gen_adamw_ref.py) */
#include "reference/adamw_ref.h"

static char model[1024], data[1100], tmp[1024];
static char cmd[8192];

static void setup(void)
{
    snprintf(model, sizeof model, "%s/models/stories260K", tu_env("QLORA_SHARED"));
    snprintf(tmp, sizeof tmp, "%s", tu_tmpdir());
    snprintf(data, sizeof data, "%s/small.json", tmp);
    /* 12 short Alpaca records */
    FILE *f = fopen(data, "w");
    ck_assert_ptr_nonnull(f);
    fputs("[", f);
    for (int i = 0; i < 12; i++)
        fprintf(f, "%s{\"instruction\": \"Tell a story about a cat number %d.\", \"input\": \"%s\", \"output\": "
                   "\"Once upon a time there was a cat. The cat was happy and played with a ball %d times.\"}",
                i ? ", " : "", i, i % 3 ? "" : "It is sunny.", i);
    fputs("]\n", f);
    fclose(f);
}

static void teardown(void)
{
    ql_remove_tree(tmp);
}

static int qlora(char **out, char **err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int qlora(char **out, char **err, const char *fmt, ...)
{
    char args[7000];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    snprintf(cmd, sizeof cmd, "OMP_NUM_THREADS=2 %s %s", tu_env("QLORA_BIN"), args);
    return tu_run(cmd, out, err);
}

#define TRAIN_ARGS "train --model %s --data %s --format alpaca --lora-r 4 --batch-size 2 --grad-accum 2 --lr 1e-3 --quiet"

static json_t *read_rows(const char *run, size_t *n)
{
    char path[1200];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run);
    char *text;
    size_t len;
    ck_assert_int_eq(ql_read_file(path, &text, &len), QL_OK);
    json_t *rows = json_array();
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        json_t *r = json_loads(line, 0, NULL);
        ck_assert_msg(r != NULL, "bad metrics row: %s", line);
        json_array_append_new(rows, r);
    }
    free(text);
    *n = json_array_size(rows);
    return rows;
}

static double field(json_t *rows, size_t i, const char *key)
{
    json_t *v = json_object_get(json_array_get(rows, i), key);
    ck_assert_msg(json_is_number(v), "row %zu has no number %s", i, key);
    return json_number_value(v);
}

static int same_file(const char *a, const char *b)
{
    char *x, *y;
    size_t lx, ly;
    if (ql_read_file(a, &x, &lx) || ql_read_file(b, &y, &ly)) return 0;
    int same = lx == ly && memcmp(x, y, lx) == 0;
    free(x);
    free(y);
    return same;
}

START_TEST(same_seed_same_losses_and_run_files)
{
    char a[1200], b[1200], *err;
    snprintf(a, sizeof a, "%s/a", tmp);
    snprintf(b, sizeof b, "%s/b", tmp);
    ck_assert_msg(qlora(NULL, &err, TRAIN_ARGS " --steps 4 --output %s", model, data, a) == 0, "%s", err);
    free(err);
    ck_assert_msg(qlora(NULL, &err, TRAIN_ARGS " --steps 4 --output %s --gradient-checkpointing", model, data, b) == 0,
                  "%s", err);
    free(err);
    size_t na, nb;
    json_t *ra = read_rows(a, &na), *rb = read_rows(b, &nb);
    ck_assert_uint_eq(na, 4);
    ck_assert_uint_eq(nb, 4);
    for (size_t i = 0; i < na; i++) {
        ck_assert_double_eq(field(ra, i, "step"), (double)(i + 1));
        ck_assert_msg(field(ra, i, "loss") == field(rb, i, "loss"), "step %zu loss %.17g vs %.17g", i + 1,
                      field(ra, i, "loss"), field(rb, i, "loss"));
        ck_assert(field(ra, i, "grad_norm") == field(rb, i, "grad_norm"));
        ck_assert(field(ra, i, "loss") > 0.5 && field(ra, i, "loss") < 10);
        ck_assert(field(ra, i, "lr") > 0 && field(ra, i, "lr") <= 1e-3);
        ck_assert(field(ra, i, "tokens") > 0);
        ck_assert(field(ra, i, "tokens_per_s") > 0);
    }
    json_decref(ra);
    json_decref(rb);
    char fa[1300], fb[1300];
    snprintf(fa, sizeof fa, "%s/adapter_model.safetensors", a);
    snprintf(fb, sizeof fb, "%s/adapter_model.safetensors", b);
    ck_assert_msg(same_file(fa, fb), "adapters differ with and without gradient checkpointing");
    /* PEFT layout */
    ql_st_file *f;
    ck_assert_int_eq(ql_st_open(fa, &f), QL_OK);
    ck_assert_uint_eq(ql_st_count(f), 70);
    const ql_tensor *t = ql_st_find(f, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
    ck_assert_ptr_nonnull(t);
    ck_assert_int_eq(t->shape[0], 4);
    ck_assert_int_eq(t->shape[1], 64);
    t = ql_st_find(f, "base_model.model.model.layers.4.mlp.down_proj.lora_B.weight");
    ck_assert_ptr_nonnull(t);
    ck_assert_int_eq(t->shape[0], 64);
    ck_assert_int_eq(t->shape[1], 4);
    ql_st_close(f);
    snprintf(fa, sizeof fa, "%s/adapter_config.json", a);
    json_t *cfg = json_load_file(fa, 0, NULL);
    ck_assert_str_eq(json_string_value(json_object_get(cfg, "peft_type")), "LORA");
    ck_assert_int_eq(json_integer_value(json_object_get(cfg, "r")), 4);
    ck_assert_double_eq(json_number_value(json_object_get(cfg, "lora_alpha")), 16.0);
    ck_assert_double_eq_tol(json_number_value(json_object_get(cfg, "lora_dropout")), 0.0, 1e-12);
    ck_assert_uint_eq(json_array_size(json_object_get(cfg, "target_modules")), 7);
    ck_assert_str_eq(json_string_value(json_object_get(cfg, "task_type")), "CAUSAL_LM");
    json_decref(cfg);
    snprintf(fa, sizeof fa, "%s/checkpoint-4/optimizer.safetensors", a);
    ck_assert(ql_path_exists(fa));
}
END_TEST

START_TEST(resume_is_bit_exact)
{
    char full[1200], part[1200], ckpt[1300], *err;
    snprintf(full, sizeof full, "%s/full", tmp);
    snprintf(part, sizeof part, "%s/part", tmp);
    ck_assert_msg(qlora(NULL, &err, TRAIN_ARGS " --steps 6 --save-steps 3 --output %s", model, data, full) == 0, "%s", err);
    free(err);
    /* the interrupted run: stop after its checkpoint at step 3 */
    ck_assert_msg(qlora(NULL, &err, TRAIN_ARGS " --steps 3 --output %s", model, data, part) == 0, "%s", err);
    free(err);
    /* a crash mid-save leaves only a temporary folder, never a half checkpoint */
    snprintf(ckpt, sizeof ckpt, "%s/checkpoint-6.tmp.XXXXXX", part);
    ck_assert_ptr_nonnull(mkdtemp(ckpt));
    snprintf(ckpt, sizeof ckpt, "%s/checkpoint-3", part);
    ck_assert_msg(qlora(NULL, &err, TRAIN_ARGS " --steps 6 --save-steps 3 --resume %s", model, data, ckpt) == 0, "%s",
                  err);
    free(err);
    size_t nf, np;
    json_t *rf = read_rows(full, &nf), *rp = read_rows(part, &np);
    ck_assert_uint_eq(nf, 6);
    ck_assert_uint_eq(np, 6);
    for (size_t i = 0; i < nf; i++) {
        ck_assert_msg(field(rf, i, "loss") == field(rp, i, "loss"), "step %zu: %.17g vs %.17g", i + 1,
                      field(rf, i, "loss"), field(rp, i, "loss"));
        ck_assert(field(rf, i, "grad_norm") == field(rp, i, "grad_norm"));
        ck_assert(field(rf, i, "step") == field(rp, i, "step"));
    }
    json_decref(rf);
    json_decref(rp);
    char a[1300], b[1300];
    snprintf(a, sizeof a, "%s/adapter_model.safetensors", full);
    snprintf(b, sizeof b, "%s/adapter_model.safetensors", part);
    ck_assert_msg(same_file(a, b), "resumed adapter differs from the uninterrupted run's");
    snprintf(a, sizeof a, "%s/checkpoint-6/optimizer.safetensors", full);
    snprintf(b, sizeof b, "%s/checkpoint-6/optimizer.safetensors", part);
    ck_assert_msg(same_file(a, b), "resumed optimizer state differs");
}
END_TEST

/* A checkpoint written before data_seed, the Adam settings and
 * eval_dataset_size were recorded resumes when the run keeps their old
 * values, and is refused naming the setting when it does not. */
START_TEST(resume_checkpoint_without_newer_settings)
{
    char part[1200], ckpt[1300], ts[1400], *err;
    snprintf(part, sizeof part, "%s/part", tmp);
    ck_assert_msg(qlora(NULL, &err, TRAIN_ARGS " --steps 1 --output %s", model, data, part) == 0, "%s", err);
    free(err);
    snprintf(ckpt, sizeof ckpt, "%s/checkpoint-1", part);
    snprintf(ts, sizeof ts, "%s/trainer_state.json", ckpt);
    json_t *state = json_load_file(ts, 0, NULL);
    ck_assert_ptr_nonnull(state);
    json_t *config = json_object_get(state, "config");
    static const char *const newer[] = {"data_seed", "adam_beta1", "adam_beta2", "adam_epsilon", "eval_dataset_size"};
    for (int k = 0; k < 5; k++) ck_assert_int_eq(json_object_del(config, newer[k]), 0);
    ck_assert_int_eq(json_dump_file(state, ts, JSON_INDENT(2)), 0);
    json_decref(state);
    static const char *const changed[][2] = {{"--data-seed 5", "data_seed"},
                                             {"--adam-beta2 0.99", "adam_beta2"},
                                             {"--eval-dataset-size 2", "eval_dataset_size"}};
    for (int k = 0; k < 3; k++) {
        ck_assert_int_ne(qlora(NULL, &err, TRAIN_ARGS " --steps 2 %s --resume %s", model, data, changed[k][0], ckpt), 0);
        char want[256];
        snprintf(want, sizeof want, "was written by a run with %s = (absent), but this run has %s = ", changed[k][1],
                 changed[k][1]);
        ck_assert_contains(err, want);
        free(err);
    }
    ck_assert_msg(qlora(NULL, &err, TRAIN_ARGS " --steps 2 --resume %s", model, data, ckpt) == 0, "%s", err);
    free(err);
}
END_TEST

/* SIGINT (or SIGTERM) during training: the step finishes, a checkpoint is
 * written, the message names it and the --resume that continues, the exit
 * status is non-zero; resuming from it goes on to the end. */
START_TEST(interrupt_saves_a_checkpoint)
{
    char run[1200], *out, *err;
    const char *sig = _i ? "TERM" : "INT";
    snprintf(run, sizeof run, "%s/int-%s", tmp, sig);
    char script[9000];
    snprintf(script, sizeof script,
             "(OMP_NUM_THREADS=2 '%s' " TRAIN_ARGS " --steps 100000 --output %s & pid=$!; i=0; "
             "while [ ! -s %s/metrics.jsonl ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; "
             "kill -%s $pid; wait $pid; echo \"status=$?\")",
             tu_env("QLORA_BIN"), model, data, run, run, sig);
    ck_assert_int_eq(tu_run(script, &out, &err), 0);
    ck_assert_msg(!tu_contains(out, "status=0"), "the interrupted run exited 0:\n%s", err);
    ck_assert_contains(err, "interrupted by SIG");
    ck_assert_contains(err, sig);
    size_t n;
    json_t *rows = read_rows(run, &n);
    ck_assert_uint_ge(n, 1);
    int64_t done_steps = (int64_t)field(rows, n - 1, "step");
    json_decref(rows);
    char ckpt[1300], want[1400];
    snprintf(ckpt, sizeof ckpt, "%s/checkpoint-%lld", run, (long long)done_steps);
    ck_assert_msg(ql_path_exists(ckpt), "%s was not written:\n%s", ckpt, err);
    snprintf(want, sizeof want, "--resume %s", ckpt);
    ck_assert_contains(err, want);
    free(out), free(err);
    ck_assert_msg(qlora(NULL, &err, TRAIN_ARGS " --steps %lld --resume %s", model, data, (long long)done_steps + 2,
                        ckpt) == 0,
                  "%s", err);
    free(err);
    rows = read_rows(run, &n);
    ck_assert_uint_eq(n, (size_t)done_steps + 2);
    json_decref(rows);
}
END_TEST

START_TEST(eval_generate_merge_with_adapter)
{
    char run[1200], merged[1200], *out, *err;
    snprintf(run, sizeof run, "%s/run", tmp);
    snprintf(merged, sizeof merged, "%s/merged", tmp);
    ck_assert_msg(qlora(NULL, &err, TRAIN_ARGS " --steps 4 --lr 5e-3 --eval-data %s --eval-steps 2 --output %s", model,
                        data, data, run) == 0,
                  "%s", err);
    free(err);
    size_t n;
    json_t *rows = read_rows(run, &n);
    ck_assert_uint_eq(n, 6); /* 4 steps + evals at 2 and 4 */
    ck_assert(json_object_get(json_array_get(rows, 2), "eval_loss") != NULL);
    double eval_at_4 = json_number_value(json_object_get(json_array_get(rows, 5), "eval_loss"));
    json_decref(rows);
    /* eval with the adapter (base quantized as the run was) reports the same loss */
    ck_assert_msg(qlora(&out, &err, "eval --model %s --adapter %s --data %s --format alpaca --quiet", model, run, data) == 0,
                  "%s", err);
    const char *last = strrchr(out, '{');
    json_t *res = json_loads(last, 0, NULL);
    ck_assert_ptr_nonnull(res);
    double nll = json_number_value(json_object_get(res, "nll"));
    ck_assert_msg(fabs(nll - eval_at_4) < 1e-5, "eval nll %.7f vs the run's eval_loss %.7f", nll, eval_at_4);
    ck_assert_str_eq(json_string_value(json_object_get(res, "quantizer")), "nf4:blocksize=64,double_quant=1");
    json_decref(res);
    free(out);
    free(err);
    /* merge: the merged dense model scores what base + adapter scores */
    ck_assert_msg(qlora(NULL, &err, "merge --model %s --adapter %s -o %s", model, run, merged) == 0, "%s", err);
    ck_assert_contains(err, "nf4");
    ck_assert_contains(err, "dequantized");
    free(err);
    ck_assert_msg(qlora(&out, &err, "eval --model %s --quantizer=none --data %s --format alpaca --quiet", merged, data) == 0,
                  "%s", err);
    res = json_loads(strrchr(out, '{'), 0, NULL);
    double merged_nll = json_number_value(json_object_get(res, "nll"));
    ck_assert_msg(fabs(merged_nll - nll) < 1e-4, "merged nll %.7f vs adapter nll %.7f", merged_nll, nll);
    json_decref(res);
    free(out);
    free(err);
    char cfgpath[1300];
    snprintf(cfgpath, sizeof cfgpath, "%s/config.json", merged);
    json_t *cfg = json_load_file(cfgpath, 0, NULL);
    ck_assert_ptr_null(json_object_get(cfg, "quantization_config"));
    json_decref(cfg);
    /* generate with the adapter: only generated text on stdout, deterministic when greedy */
    char *o1, *o2;
    ck_assert_int_eq(qlora(&o1, NULL, "generate --model %s --adapter %s --prompt 'Once upon a time' --max-new-tokens 12",
                           model, run), 0);
    ck_assert_int_eq(qlora(&o2, NULL, "generate --model %s --adapter %s --prompt 'Once upon a time' --max-new-tokens 12",
                           model, run), 0);
    ck_assert_str_eq(o1, o2);
    ck_assert_msg(strlen(o1) > 5 && strstr(o1, "Once upon a time") == NULL, "generated: %s", o1);
    free(o1);
    free(o2);
}
END_TEST

START_TEST(base_model_facts)
{
    char *out, *err;
    /* greedy decoding from <s>, and the mean NLL on stories (the bundled model's documented values) */
    ck_assert_int_eq(qlora(&out, &err, "generate --model %s --quantizer=none --max-new-tokens 30", model), 0);
    ck_assert_msg(strncmp(out, "Once upon a time, there was a little girl named Lily. She loved to play outside", 78) == 0,
                  "%s", out);
    free(out);
    free(err);
    /* A prompt of a few words, greedy, dense and nf4: the text as generate gave it
     * when its prompt went through ql_llama_forward (issue 7 moves prompt
     * processing to the batched forward; the tokens must stay the same). */
    static const struct {
        const char *q, *want;
    } pinned[] = {
        {"none", "play with his toys and run around the house. One day, Tom saw a big box in the ground. He wanted to\n"},
        {"nf4", "play with his toys. One day, he found a big box in the park. He was very happy.\nTom wanted to play with the "
                "b\n"},
    };
    for (size_t i = 0; i < sizeof pinned / sizeof pinned[0]; i++) {
        ck_assert_int_eq(qlora(&out, &err,
                               "generate --model %s --quantizer=%s --prompt 'Once upon a time, there was a little boy "
                               "named Tom. He liked to' --max-new-tokens 40",
                               model, pinned[i].q),
                         0);
        ck_assert_str_eq(out, pinned[i].want);
        free(out);
        free(err);
    }
    char stories[1200];
    snprintf(stories, sizeof stories, "%s/data/tinystories/validation.txt", tu_env("QLORA_SHARED"));
    ck_assert_int_eq(qlora(&out, &err, "eval --model %s --quantizer=none --data %s --format text --max-examples 200 --quiet",
                           model, stories), 0);
    json_t *res = json_loads(strrchr(out, '{'), 0, NULL);
    ck_assert_int_eq(json_integer_value(json_object_get(res, "examples")), 200);
    ck_assert_int_eq(json_integer_value(json_object_get(res, "tokens")), 19395);
    ck_assert_double_eq_tol(json_number_value(json_object_get(res, "nll")), 1.439589, 2e-6);
    json_decref(res);
    free(out);
    free(err);
}
END_TEST

START_TEST(bad_input)
{
    char run[1200], *err;
    snprintf(run, sizeof run, "%s/bad", tmp);
    ck_assert_int_eq(qlora(NULL, NULL, TRAIN_ARGS " --steps 1 --output %s", model, data, run), 0);
    /* a run folder that exists, without --resume or --force */
    ck_assert_int_ne(qlora(NULL, &err, TRAIN_ARGS " --steps 1 --output %s", model, data, run), 0);
    ck_assert_contains(err, "already exists");
    ck_assert_contains(err, "--resume");
    free(err);
    /* a checkpoint from a different configuration */
    ck_assert_int_ne(qlora(NULL, &err, TRAIN_ARGS " --steps 3 --lora-alpha 32 --resume %s/checkpoint-1", model, data, run), 0);
    ck_assert_contains(err, "lora_alpha = 16.0");
    ck_assert_contains(err, "lora_alpha = 32.0");
    free(err);
    /* NaN loss: stop, name the step and the last good checkpoint */
    char nan_run[1200];
    snprintf(nan_run, sizeof nan_run, "%s/nan", tmp);
    ck_assert_int_ne(qlora(NULL, &err, TRAIN_ARGS " --steps 8 --save-steps 1 --lr 1e30 --max-grad-norm 0 --output %s",
                           model, data, nan_run), 0);
    ck_assert_contains(err, "at step");
    ck_assert_contains(err, "the last good checkpoint is checkpoint-");
    free(err);
    /* bad JSON, missing fields, an empty dataset, a wrong format name */
    char bad[1200];
    snprintf(bad, sizeof bad, "%s/bad.jsonl", tmp);
    FILE *f = fopen(bad, "w");
    fputs("{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \n", f);
    fclose(f);
    ck_assert_int_ne(qlora(NULL, &err, TRAIN_ARGS " --steps 1 --output %s/x --force", model, bad, tmp), 0);
    ck_assert_contains(err, "line 2");
    free(err);
    f = fopen(bad, "w");
    fputs("{\"instruction\": \"a\", \"answer\": \"b\"}\n", f);
    fclose(f);
    ck_assert_int_ne(qlora(NULL, &err, TRAIN_ARGS " --steps 1 --output %s/x --force", model, bad, tmp), 0);
    ck_assert_contains(err, "output");
    free(err);
    f = fopen(bad, "w");
    fclose(f);
    ck_assert_int_ne(qlora(NULL, &err, TRAIN_ARGS " --steps 1 --output %s/x --force", model, bad, tmp), 0);
    ck_assert_msg(tu_contains(err, "empty") || tu_contains(err, "no examples"), "%s", err);
    free(err);
    ck_assert_int_ne(qlora(NULL, &err, "train --model %s --data %s --format csv --output %s/y", model, data, tmp), 0);
    ck_assert_contains(err, "alpaca");
    free(err);
    /* an unsupported architecture is named */
    char fake[1200];
    snprintf(fake, sizeof fake, "%s/gpt2", tmp);
    tu_tensor t[] = {{"transformer.wte.weight", QL_DTYPE_F32, 2, {8, 4}, NULL}};
    tu_write_model(fake, t, 1, "{\"architectures\": [\"GPT2LMHeadModel\"], \"model_type\": \"gpt2\"}");
    ck_assert_int_ne(qlora(NULL, &err, "generate --model %s --prompt hi", fake), 0);
    ck_assert_contains(err, "unsupported architecture GPT2LMHeadModel");
    free(err);
    /* an adapter for another model: shapes do not match */
    char other[1200];
    snprintf(other, sizeof other, "%s/other_adapter", tmp);
    ck_assert_int_eq(ql_mkdir_p(other), QL_OK);
    char p1[1300];
    snprintf(p1, sizeof p1, "%s/adapter_config.json", other);
    const char *ac = "{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"target_modules\": [\"q_proj\"]}";
    ck_assert_int_eq(ql_write_file_atomic(p1, ac, strlen(ac)), QL_OK);
    char *q = NULL;
    float zeros[4 * 128] = {0};
    tu_tensor at[] = {{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", QL_DTYPE_F32, 2, {4, 128}, zeros}};
    (void)q;
    char tmpmodel[1200];
    snprintf(tmpmodel, sizeof tmpmodel, "%s/adapter_tmp", tmp);
    tu_write_model(tmpmodel, at, 1, NULL);
    char src[1300], dst[1300];
    snprintf(src, sizeof src, "%s/model.safetensors", tmpmodel);
    snprintf(dst, sizeof dst, "%s/adapter_model.safetensors", other);
    ck_assert_int_eq(ql_copy_file_atomic(src, dst), QL_OK);
    ck_assert_int_ne(qlora(NULL, &err, "generate --model %s --quantizer=none --adapter %s --prompt hi", model, other), 0);
    ck_assert_contains(err, "has shape [4, 128] but this model needs [4, 64]");
    free(err);
    /* resume from something that is not a checkpoint */
    ck_assert_int_ne(qlora(NULL, &err, TRAIN_ARGS " --steps 2 --resume %s", model, data, tmp), 0);
    ck_assert_contains(err, "trainer_state.json is missing");
    free(err);
}
END_TEST

START_TEST(any_quantizer_trains)
{
    /* the same run over each quantizer: the plugin's materialize slot is all the engine uses */
    const char *specs[4] = {"int8", "fp4:double_quant=0", "none", NULL};
    char example[1200];
    snprintf(example, sizeof example, "%s:group_size=64", tu_env("QLORA_EXAMPLE_PLUGIN"));
    specs[3] = example;
    double first_loss[4];
    for (int i = 0; i < 4; i++) {
        char run[1200], *err;
        snprintf(run, sizeof run, "%s/q%d", tmp, i);
        ck_assert_msg(qlora(NULL, &err, TRAIN_ARGS " --steps 2 --quantizer=%s --output %s", model, data, specs[i], run) == 0,
                      "%s: %s", specs[i], err);
        free(err);
        size_t n;
        json_t *rows = read_rows(run, &n);
        ck_assert_uint_eq(n, 2);
        first_loss[i] = field(rows, 0, "loss");
        ck_assert(isfinite(first_loss[i]) && first_loss[i] > 0.5);
        json_decref(rows);
    }
    /* different bases give different (but close) losses */
    ck_assert(first_loss[0] != first_loss[1] && first_loss[1] != first_loss[3]);
    ck_assert(fabs(first_loss[0] - first_loss[2]) < 0.05); /* int8 is close to the dense base */
}
END_TEST

START_TEST(prequantized_checkpoint_is_used_as_is)
{
    char q[1200], stories[1200], *out1, *out2, *err;
    snprintf(q, sizeof q, "%s/quantized", tmp);
    snprintf(stories, sizeof stories, "%s/data/tinystories/validation.txt", tu_env("QLORA_SHARED"));
    ck_assert_int_eq(qlora(NULL, NULL, "quantize --quiet --quantizer=nf4 %s -o %s", model, q), 0);
    ck_assert_int_eq(qlora(&out1, NULL, "eval --model %s --quantizer=nf4 --data %s --format text --max-examples 20 --quiet",
                           model, stories), 0);
    ck_assert_msg(qlora(&out2, &err, "eval --model %s --data %s --format text --max-examples 20 --quiet", q, stories) == 0,
                  "%s", err);
    ck_assert_str_eq(out1, out2); /* same bytes, same scores */
    free(out1);
    free(out2);
    free(err);
    /* train's default --quantizer (nf4) says nothing over a quantized
     * checkpoint; one the user gave and the checkpoint's differ is a warning */
    ck_assert_msg(qlora(&out1, &err, "train --model %s --data %s --output %s/r --dry-run", q, data, tmp) == 0, "%s", err);
    ck_assert_msg(!strstr(err, "already quantized"), "a warning for the default quantizer:\n%s", err);
    free(out1);
    free(err);
    ck_assert_msg(qlora(&out1, &err, "train --model %s --quantizer=fp4 --data %s --output %s/r --dry-run", q, data, tmp) == 0,
                  "%s", err);
    ck_assert_contains(err, "is already quantized with nf4; using it as it is, not --quantizer=fp4");
    free(out1);
    free(err);
}
END_TEST

static void copy_into(const char *from_dir, const char *name, const char *to_dir)
{
    char a[1300], b[1300];
    snprintf(a, sizeof a, "%s/%s", from_dir, name);
    snprintf(b, sizeof b, "%s/%s", to_dir, name);
    ck_assert_int_eq(ql_copy_file_atomic(a, b), QL_OK);
}

START_TEST(untied_bf16_model_and_foreign_adapter)
{
    /* a tiny untied BF16 LLaMA with grouped-query attention: loads, evaluates, trains */
    char tiny[1200], stories[1200], *out, *err;
    snprintf(tiny, sizeof tiny, "%s/tiny", tmp);
    snprintf(stories, sizeof stories, "%s/data/tinystories/validation.txt", tu_env("QLORA_SHARED"));
    const int B = QL_DTYPE_BF16;
    tu_tensor t[] = {
        {"model.embed_tokens.weight", B, 2, {512, 16}, NULL},
        {"model.norm.weight", B, 1, {16}, NULL},
        {"lm_head.weight", B, 2, {512, 16}, NULL},
        {"model.layers.0.input_layernorm.weight", B, 1, {16}, NULL},
        {"model.layers.0.post_attention_layernorm.weight", B, 1, {16}, NULL},
        {"model.layers.0.self_attn.q_proj.weight", B, 2, {16, 16}, NULL},
        {"model.layers.0.self_attn.k_proj.weight", B, 2, {8, 16}, NULL},
        {"model.layers.0.self_attn.v_proj.weight", B, 2, {8, 16}, NULL},
        {"model.layers.0.self_attn.o_proj.weight", B, 2, {16, 16}, NULL},
        {"model.layers.0.mlp.gate_proj.weight", B, 2, {24, 16}, NULL},
        {"model.layers.0.mlp.up_proj.weight", B, 2, {24, 16}, NULL},
        {"model.layers.0.mlp.down_proj.weight", B, 2, {16, 24}, NULL},
    };
    tu_write_model(tiny, t, sizeof t / sizeof t[0],
                   "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 16, \"intermediate_size\": 24, "
                   "\"num_hidden_layers\": 1, \"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"vocab_size\": 512, "
                   "\"max_position_embeddings\": 128, \"rms_norm_eps\": 1e-5, \"tie_word_embeddings\": false}");
    copy_into(model, "tokenizer.json", tiny);
    copy_into(model, "tokenizer_config.json", tiny);
    ck_assert_msg(qlora(&out, &err, "eval --model %s --quantizer=nf4 --data %s --format text --max-examples 5 --quiet", tiny,
                        stories) == 0, "%s", err);
    json_t *res = json_loads(strrchr(out, '{'), 0, NULL);
    double nll = json_number_value(json_object_get(res, "nll"));
    ck_assert_msg(nll > 5.5 && nll < 7.0, "untrained 512-way model should score near ln 512 = 6.24, got %g", nll);
    json_decref(res);
    free(out);
    free(err);
    /* the same weights as a Mistral with a sliding attention window shorter than the stories: banded attention
     * scores them differently (a Llama config's sliding_window is not read, as in transformers) */
    char cfgp[1300];
    snprintf(cfgp, sizeof cfgp, "%s/config.json", tiny);
    json_t *tc = json_load_file(cfgp, 0, NULL);
    json_object_set_new(tc, "architectures", json_pack("[s]", "MistralForCausalLM"));
    json_object_set_new(tc, "sliding_window", json_integer(8));
    ck_assert_int_eq(json_dump_file(tc, cfgp, 0), 0);
    json_decref(tc);
    ck_assert_msg(qlora(&out, &err, "eval --model %s --quantizer=nf4 --data %s --format text --max-examples 5 --quiet",
                        tiny, stories) == 0, "%s", err);
    res = json_loads(strrchr(out, '{'), 0, NULL);
    double banded = json_number_value(json_object_get(res, "nll"));
    ck_assert_msg(banded > 5.5 && banded < 7.0 && banded != nll, "banded nll %g (full causal %g)", banded, nll);
    json_decref(res);
    free(out);
    free(err);
    tc = json_load_file(cfgp, 0, NULL);
    json_object_set_new(tc, "architectures", json_pack("[s]", "LlamaForCausalLM"));
    json_object_del(tc, "sliding_window");
    ck_assert_int_eq(json_dump_file(tc, cfgp, 0), 0);
    json_decref(tc);
    char run[1200];
    snprintf(run, sizeof run, "%s/tiny_run", tmp);
    ck_assert_msg(qlora(NULL, &err, TRAIN_ARGS " --steps 2 --max-len 128 --output %s", tiny, data, run) == 0, "%s", err);
    free(err);
    /* the stories260K adapter of another run on a copy whose config differs: warned, applied (shapes match) */
    char copy[1200], srun[1200];
    snprintf(copy, sizeof copy, "%s/stories_copy", tmp);
    snprintf(srun, sizeof srun, "%s/stories_run", tmp);
    ck_assert_int_eq(ql_mkdir_p(copy), QL_OK);
    copy_into(model, "model.safetensors", copy);
    copy_into(model, "tokenizer.json", copy);
    copy_into(model, "tokenizer_config.json", copy);
    snprintf(cfgp, sizeof cfgp, "%s/config.json", model);
    json_t *cfg = json_load_file(cfgp, 0, NULL);
    json_object_set_new(cfg, "rope_theta", json_real(20000.0));
    snprintf(cfgp, sizeof cfgp, "%s/config.json", copy);
    ck_assert_int_eq(json_dump_file(cfg, cfgp, 0), 0);
    json_decref(cfg);
    ck_assert_int_eq(qlora(NULL, NULL, TRAIN_ARGS " --steps 1 --output %s", model, data, srun), 0);
    ck_assert_int_eq(qlora(NULL, &err, "generate --model %s --adapter %s --max-new-tokens 3", copy, srun), 0);
    ck_assert_contains(err, "was trained on");
    ck_assert_contains(err, "config differs");
    free(err);
}
END_TEST

START_TEST(kill_mid_run_leaves_good_checkpoints)
{
    /* SIGKILL a run that saves every step, at several moments; every
     * checkpoint-N left behind is whole, and the newest resumes */
    for (int attempt = 0; attempt < 3; attempt++) {
        char run[1200], *err;
        snprintf(run, sizeof run, "%s/killed%d", tmp, attempt);
        snprintf(cmd, sizeof cmd,
                 "OMP_NUM_THREADS=1 %s " TRAIN_ARGS " --steps 200 --save-steps 1 --output %s >/dev/null 2>&1 & "
                 "pid=$!; sleep %.2f; kill -9 $pid; wait $pid 2>/dev/null; true",
                 tu_env("QLORA_BIN"), model, data, run, 0.6 + 0.37 * attempt);
        tu_run(cmd, NULL, NULL);
        DIR *d = opendir(run);
        ck_assert_ptr_nonnull(d);
        int newest = -1, whole = 0;
        struct dirent *e;
        while ((e = readdir(d))) {
            int n;
            char rest[8];
            if (sscanf(e->d_name, "checkpoint-%d%7s", &n, rest) != 1) continue; /* skips *.tmp.* folders */
            const char *files[] = {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors",
                                   "trainer_state.json"};
            for (size_t k = 0; k < 4; k++) {
                char path[1600];
                snprintf(path, sizeof path, "%s/%s/%s", run, e->d_name, files[k]);
                ck_assert_msg(ql_path_exists(path), "%s is missing: a checkpoint was left half-written", path);
            }
            whole++;
            if (n > newest) newest = n;
        }
        closedir(d);
        if (newest < 0) continue; /* killed before the first save: nothing to check */
        ck_assert(whole >= 1);
        char ckpt[1300];
        snprintf(ckpt, sizeof ckpt, "%s/checkpoint-%d", run, newest);
        ck_assert_msg(qlora(NULL, &err, TRAIN_ARGS " --steps %d --save-steps 1 --resume %s", model, data, newest + 1, ckpt) == 0,
                      "resume from %s: %s", ckpt, err);
        free(err);
        size_t nrows;
        json_t *rows = read_rows(run, &nrows);
        ck_assert_uint_eq(nrows, (size_t)newest + 1);
        json_decref(rows);
    }
}
END_TEST

START_TEST(mmlu_scoring)
{
    char *out, *err;
    char mmlu[1200];
    snprintf(mmlu, sizeof mmlu, "%s/data/mmlu", tu_env("QLORA_SHARED"));
    ck_assert_msg(qlora(&out, &err, "eval --model %s --quantizer=none --mmlu %s --shots 5 --max-examples 1 --quiet", model,
                        mmlu) == 0, "%s", err);
    json_t *res = json_loads(strrchr(out, '\n') ? out : out, 0, NULL);
    ck_assert_msg(res != NULL, "not JSON: %s", out);
    ck_assert_int_eq(json_integer_value(json_object_get(res, "subjects")), 57);
    ck_assert_int_eq(json_integer_value(json_object_get(res, "questions")), 57);
    double acc = json_number_value(json_object_get(res, "accuracy"));
    ck_assert(acc >= 0.0 && acc <= 1.0);
    ck_assert_uint_eq(json_object_size(json_object_get(res, "per_subject")), 57);
    double a = json_number_value(json_object_get(json_object_get(res, "per_subject"), "anatomy"));
    ck_assert(a == 0.0 || a == 1.0); /* one question per subject */
    json_decref(res);
    free(out);
    free(err);
    ck_assert_int_ne(qlora(NULL, &err, "eval --model %s --mmlu %s/nowhere", model, tmp), 0);
    ck_assert_contains(err, "is not a folder of SUBJECT_test.csv files");
    free(err);
    /* a malformed CSV record is named */
    char bad[1200], path[1300];
    snprintf(bad, sizeof bad, "%s/badmmlu", tmp);
    snprintf(path, sizeof path, "%s/dev", bad);
    ck_assert_int_eq(ql_mkdir_p(path), QL_OK);
    snprintf(path, sizeof path, "%s/test", bad);
    ck_assert_int_eq(ql_mkdir_p(path), QL_OK);
    const char *csv = "question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,1\nonly,three,fields\n";
    snprintf(path, sizeof path, "%s/dev/x_dev.csv", bad);
    ck_assert_int_eq(ql_write_file_atomic(path, csv, strlen(csv)), QL_OK);
    snprintf(path, sizeof path, "%s/test/x_test.csv", bad);
    ck_assert_int_eq(ql_write_file_atomic(path, csv, strlen(csv)), QL_OK);
    ck_assert_int_ne(qlora(NULL, &err, "eval --model %s --mmlu %s --shots 1 --quiet", model, bad), 0);
    ck_assert_contains(err, "record 3 has 3 fields");
    free(err);
    /* train without a run folder */
    ck_assert_int_eq(qlora(NULL, &err, "train --model %s --data %s", model, data), 2);
    ck_assert_contains(err, "--output RUN_DIR (or --resume CHECKPOINT) is required");
    free(err);
}
END_TEST

START_TEST(csv_records)
{
    const char *text = "question,choice0\n\"a, \"\"quoted\"\"\nline\",b\r\nlast,x";
    size_t pos = 0;
    char *f[4];
    ck_assert_int_eq(ql_csv_record(text, strlen(text), &pos, f, 4), 2);
    ck_assert_str_eq(f[0], "question");
    free(f[0]);
    free(f[1]);
    ck_assert_int_eq(ql_csv_record(text, strlen(text), &pos, f, 4), 2);
    ck_assert_str_eq(f[0], "a, \"quoted\"\nline");
    ck_assert_str_eq(f[1], "b");
    free(f[0]);
    free(f[1]);
    ck_assert_int_eq(ql_csv_record(text, strlen(text), &pos, f, 4), 2);
    ck_assert_str_eq(f[1], "x");
    free(f[0]);
    free(f[1]);
    ck_assert_int_eq(ql_csv_record(text, strlen(text), &pos, f, 4), 0);
    const char *bad = "\"unterminated";
    pos = 0;
    ck_assert_int_eq(ql_csv_record(bad, strlen(bad), &pos, f, 4), -1);
}
END_TEST

/* ---- checkpoints, adapters and the run folder against bad files, crashes,
 * full disks, concurrent runs and --force ---- */

/* One trained run shared by the loop tests below (made once per test case,
 * in the parent process): checkpoint-1, checkpoint-2 and the final adapter. */
static char base_dir[1024], base_data[1200], base_run[1200];

static void base_setup(void)
{
    snprintf(base_dir, sizeof base_dir, "%s", tu_tmpdir());
    snprintf(model, sizeof model, "%s/models/stories260K", tu_env("QLORA_SHARED"));
    snprintf(base_data, sizeof base_data, "%s/small.json", base_dir);
    FILE *f = fopen(base_data, "w");
    ck_assert_ptr_nonnull(f);
    fputs("[", f);
    for (int i = 0; i < 12; i++)
        fprintf(f, "%s{\"instruction\": \"Tell a story about a dog number %d.\", \"input\": \"\", \"output\": "
                   "\"Once upon a time there was a dog. It ran %d times.\"}",
                i ? ", " : "", i, i);
    fputs("]\n", f);
    fclose(f);
    snprintf(base_run, sizeof base_run, "%s/run", base_dir);
    char *err;
    ck_assert_msg(qlora(NULL, &err, TRAIN_ARGS " --steps 2 --save-steps 1 --output %s", model, base_data, base_run) == 0,
                  "%s", err);
    free(err);
}

static void base_teardown(void) { ql_remove_tree(base_dir); }

static void sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void sh(const char *fmt, ...)
{
    char line[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    char *err;
    ck_assert_msg(tu_run(line, NULL, &err) == 0, "%s: %s", line, err);
    free(err);
}

/* Every file under dir (but the lock, whose pid changes) with its SHA-256. */
static char *digest(const char *dir)
{
    char line[2048], *out;
    snprintf(line, sizeof line, "(cd '%s' && find . -type f ! -name .qlora-lock | LC_ALL=C sort | xargs -r sha256sum)", dir);
    ck_assert_int_eq(tu_run(line, &out, NULL), 0);
    ck_assert_msg(strstr(out, "./") != NULL, "no files under %s", dir);
    return out;
}

enum { M_NONE, M_JSON, M_FILE, M_SHAPE, M_DTYPE, M_VALUE, M_DROP, M_ADD };

typedef struct mutation {
    const char *file;   /* the file to change */
    int op;
    const char *key;    /* M_JSON: a key ("config.lora_r" reaches into config); tensors: the tensor's name */
    const char *value;  /* M_JSON: the new value's JSON (NULL: delete the key); M_FILE: the whole text */
    int dtype, ndim;    /* M_SHAPE, M_DTYPE */
    int64_t shape[2];
    double num;         /* M_VALUE: element 0 becomes this */
    const char *expect; /* in the message (beside the file's name); NULL: the command succeeds */
    const char *absent; /* not in the message */
} mutation;

static void mutate_json(const char *path, const mutation *mu)
{
    if (mu->op == M_FILE) {
        ck_assert_int_eq(ql_write_file_atomic(path, mu->value, strlen(mu->value)), QL_OK);
        return;
    }
    json_t *root = json_load_file(path, 0, NULL), *obj = root;
    ck_assert_ptr_nonnull(root);
    char key[128];
    snprintf(key, sizeof key, "%s", mu->key);
    char *dot = strchr(key, '.');
    if (dot) {
        *dot = '\0';
        obj = json_object_get(root, key);
        memmove(key, dot + 1, strlen(dot + 1) + 1);
    }
    if (mu->value) {
        json_error_t je;
        json_t *v = json_loads(mu->value, JSON_DECODE_ANY, &je);
        ck_assert_msg(v != NULL, "%s: %s", mu->value, je.text);
        json_object_set_new(obj, key, v);
    } else {
        json_object_del(obj, key);
    }
    ck_assert_int_eq(json_dump_file(root, path, JSON_INDENT(2)), 0);
    json_decref(root);
}

static void mutate_tensors(const char *path, const mutation *mu)
{
    ql_st_file *f;
    ck_assert_int_eq(ql_st_open(path, &f), QL_OK);
    ql_st_writer *w;
    ck_assert_int_eq(ql_st_writer_create(&w), QL_OK);
    const char *meta[] = {"format", "qlora_adapter"};
    for (int i = 0; i < 2; i++)
        if (ql_st_metadata(f, meta[i])) ck_assert_int_eq(ql_st_writer_set_metadata(w, meta[i], ql_st_metadata(f, meta[i])), QL_OK);
    int found = 0;
    for (size_t i = 0; i < ql_st_count(f); i++) {
        ql_tensor t = *ql_st_at(f, i);
        void *buf = NULL;
        if (!strcmp(t.name, mu->key)) {
            found = 1;
            if (mu->op == M_DROP) continue;
            if (mu->op == M_SHAPE || mu->op == M_DTYPE) {
                if (mu->op == M_SHAPE) {
                    t.ndim = mu->ndim;
                    for (int d = 0; d < 2; d++) t.shape[d] = mu->shape[d];
                } else {
                    t.dtype = mu->dtype;
                }
                uint64_t numel = 1;
                for (int d = 0; d < t.ndim; d++) numel *= (uint64_t)t.shape[d];
                t.nbytes = numel * ql_dtype_size(t.dtype);
                buf = calloc(1, t.nbytes + 8);
            } else if (mu->op == M_VALUE) {
                buf = malloc(t.nbytes);
                memcpy(buf, t.data, t.nbytes);
                if (t.dtype == QL_DTYPE_I64) ((int64_t *)buf)[0] = (int64_t)mu->num;
                else ((float *)buf)[0] = (float)mu->num;
            }
            if (buf) t.data = buf;
        }
        ck_assert_int_eq(ql_st_writer_add(w, &t), QL_OK);
        free(buf);
    }
    if (mu->op == M_ADD) {
        float one = 1;
        ql_tensor t = {.name = mu->key, .dtype = QL_DTYPE_F32, .ndim = 1, .shape = {1}, .data = &one, .nbytes = 4};
        ck_assert_int_eq(ql_st_writer_add(w, &t), QL_OK);
    } else {
        ck_assert_msg(found, "no tensor %s in %s", mu->key, path);
    }
    ql_st_close(f);
    ck_assert_int_eq(ql_st_writer_save(w, path), QL_OK);
    ql_st_writer_destroy(w);
}

static void apply_mutation(const char *dir, const mutation *mu)
{
    if (mu->op == M_NONE) return;
    char path[1400];
    snprintf(path, sizeof path, "%s/%s", dir, mu->file);
    if (mu->op == M_JSON || mu->op == M_FILE) mutate_json(path, mu);
    else mutate_tensors(path, mu);
}

#define Q_A "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
#define D_B "base_model.model.model.layers.4.mlp.down_proj.lora_B.weight"
#define TS "trainer_state.json"
#define OPT "optimizer.safetensors"
#define AD "adapter_model.safetensors"
#define I64 QL_DTYPE_I64
#define F16 QL_DTYPE_F16

/* Resumed with --steps 3 from checkpoint-1 (global_step 1, grad_accum 2, r 4). */
static const mutation ckpt_mutations[] = {
    {TS, M_NONE, NULL, NULL, 0, 0, {0}, 0, NULL, NULL}, /* the untouched copy resumes */
    {TS, M_FILE, NULL, "[1, 2]", 0, 0, {0}, 0, "is not a JSON object", NULL},
    {TS, M_FILE, NULL, "{\"format\": ", 0, 0, {0}, 0, "is not valid JSON", NULL},
    {TS, M_JSON, "format", "2", 0, 0, {0}, 0, "checkpoint format 2", NULL},
    {TS, M_JSON, "format", "\"1\"", 0, 0, {0}, 0, "checkpoint format \"1\"", NULL},
    {TS, M_JSON, "global_step", "-3", 0, 0, {0}, 0, "global_step must be an integer from 1", NULL},
    {TS, M_JSON, "global_step", "0", 0, 0, {0}, 0, "global_step must be an integer from 1", NULL},
    {TS, M_JSON, "global_step", "\"x\"", 0, 0, {0}, 0, "global_step must be an integer from 1 to", NULL},
    {TS, M_JSON, "global_step", NULL, 0, 0, {0}, 0, "global_step must be an integer from 1 to 9223372036854775807, not (absent)", NULL},
    {TS, M_JSON, "global_step", "2", 0, 0, {0}, 0, "global_step is 2, but the folder is checkpoint-1", NULL},
    {TS, M_JSON, "global_step", "7", 0, 0, {0}, 0, "is at step 7 (global_step in", NULL},
    {TS, M_JSON, "micro_batches_done", "-5", 0, 0, {0}, 0, "micro_batches_done must be an integer from 0", NULL},
    {TS, M_JSON, "micro_batches_done", "4611686018427387904", 0, 0, {0}, 0, "micro_batches_done is 4611686018427387904, but global_step 1 with grad_accum 2 means 2", NULL},
    {TS, M_JSON, "micro_batches_done", "3", 0, 0, {0}, 0, "micro_batches_done is 3", NULL},
    {TS, M_JSON, "micro_batches_done", "2.0", 0, 0, {0}, 0, "micro_batches_done must be an integer", NULL},
    {TS, M_JSON, "tokens_seen", "-1", 0, 0, {0}, 0, "tokens_seen must be a whole number", NULL},
    {TS, M_JSON, "tokens_seen", "\"many\"", 0, 0, {0}, 0, "tokens_seen must be a whole number", NULL},
    {TS, M_JSON, "tokens_seen", "1e30", 0, 0, {0}, 0, "tokens_seen must be a whole number", NULL},
    {TS, M_JSON, "tokens_seen", "10.5", 0, 0, {0}, 0, "tokens_seen must be a whole number", NULL},
    {TS, M_JSON, "lora_parameters", "5", 0, 0, {0}, 0, "lora_parameters is 5, but this run's adapter has", NULL},
    {TS, M_JSON, "lora_parameters", "null", 0, 0, {0}, 0, "lora_parameters must be an integer", NULL},
    {TS, M_JSON, "config", NULL, 0, 0, {0}, 0, "config (the run's settings) is missing", NULL},
    {TS, M_JSON, "config", "7", 0, 0, {0}, 0, "config (the run's settings) is missing or not an object", NULL},
    {TS, M_JSON, "config.lora_r", "8", 0, 0, {0}, 0, "lora_r = 8, but this run has lora_r = 4", NULL},
    {OPT, M_SHAPE, "adamw.step", NULL, I64, 1, {0}, 0, "tensor adamw.step is I64 [0], this run needs I64 []", NULL},
    {OPT, M_DTYPE, "adamw.step", NULL, QL_DTYPE_F64, 0, {0}, 0, "tensor adamw.step is F64", NULL},
    {OPT, M_VALUE, "adamw.step", NULL, 0, 0, {0}, 7, "adamw.step is 7, but trainer_state.json's global_step is 1", NULL},
    {OPT, M_DROP, "adamw.step", NULL, 0, 0, {0}, 0, "tensor adamw.step is missing", NULL},
    {OPT, M_SHAPE, "adamw.m", NULL, 0, 1, {5}, 0, "tensor adamw.m is F32 [5], this run needs F32 [", NULL},
    {OPT, M_DTYPE, "adamw.m", NULL, F16, 0, {0}, 0, "tensor adamw.m is F16", NULL},
    {OPT, M_VALUE, "adamw.m", NULL, 0, 0, {0}, NAN, "tensor adamw.m has a non-finite value nan at index 0", NULL},
    {OPT, M_VALUE, "adamw.v", NULL, 0, 0, {0}, -1, "tensor adamw.v has a negative value -1 at index 0", NULL},
    {OPT, M_VALUE, "adamw.v", NULL, 0, 0, {0}, INFINITY, "tensor adamw.v has a non-finite value", NULL},
    {OPT, M_ADD, "junk", NULL, 0, 0, {0}, 0, "has 4 tensors", NULL},
    {AD, M_SHAPE, Q_A, NULL, 0, 2, {4, 63}, 0, "q_proj.lora_A.weight is F32 [4, 63], this run needs F32 [4, 64]", NULL},
    {AD, M_SHAPE, Q_A, NULL, 0, 1, {256}, 0, "q_proj.lora_A.weight is F32 [256], this run needs F32 [4, 64]", NULL},
    {AD, M_DTYPE, D_B, NULL, F16, 0, {0}, 0, "down_proj.lora_B.weight is F16 [64, 4], this run needs F32 [64, 4]", NULL},
    {AD, M_VALUE, D_B, NULL, 0, 0, {0}, INFINITY, "down_proj.lora_B.weight has a non-finite value inf", NULL},
    {AD, M_DROP, Q_A, NULL, 0, 0, {0}, 0, "q_proj.lora_A.weight is missing", NULL},
    {AD, M_ADD, "base_model.model.lm_head.lora_A.weight", NULL, 0, 0, {0}, 0, "has 71 tensors, this run's adapter has 70", NULL},
};
#define N_CKPT_MUTATIONS ((int)(sizeof ckpt_mutations / sizeof ckpt_mutations[0]))

START_TEST(checkpoint_fields_are_checked)
{
    const mutation *mu = &ckpt_mutations[_i];
    char run[1200], ckpt[1300], *err;
    snprintf(run, sizeof run, "%s/ckpt%d", tmp, _i);
    sh("cp -a '%s' '%s'", base_run, run);
    snprintf(ckpt, sizeof ckpt, "%s/checkpoint-1", run);
    apply_mutation(ckpt, mu);
    int st = qlora(NULL, &err, TRAIN_ARGS " --steps 3 --resume %s", model, base_data, ckpt);
    if (!mu->expect) {
        ck_assert_msg(st == 0, "the untouched checkpoint does not resume: %s", err);
    } else {
        ck_assert_msg(st != 0 && st < 128, "#%d (%s %s): exit %d\n%s", _i, mu->file, mu->key ? mu->key : "", st, err);
        ck_assert_contains(err, mu->file);
        ck_assert_contains(err, mu->expect);
    }
    free(err);
}
END_TEST

#define AC "adapter_config.json"

/* Loaded for generate from a copy of a run's final adapter (r 4, alpha 16, all modules). */
static const mutation adapter_mutations[] = {
    {AC, M_NONE, NULL, NULL, 0, 0, {0}, 0, NULL, NULL},
    {AC, M_FILE, NULL, "[1]", 0, 0, {0}, 0, "adapter_config.json is not a JSON object", NULL},
    {AC, M_JSON, "r", "4294967300", 0, 0, {0}, 0, "adapter_config.json: r must be an integer from 1 to 65536, not 4294967300", NULL},
    {AC, M_JSON, "r", "0", 0, 0, {0}, 0, "adapter_config.json: r must be an integer from 1 to 65536, not 0", NULL},
    {AC, M_JSON, "r", "\"4\"", 0, 0, {0}, 0, "adapter_config.json: r must be an integer", NULL},
    {AC, M_JSON, "r", NULL, 0, 0, {0}, 0, "adapter_config.json: r must be an integer from 1 to 65536, not (absent)", NULL},
    {AC, M_JSON, "lora_alpha", "-1", 0, 0, {0}, 0, "adapter_config.json: lora_alpha must be a positive number", "--lora-alpha"},
    {AC, M_JSON, "lora_alpha", "\"16\"", 0, 0, {0}, 0, "adapter_config.json: lora_alpha must be a positive number", NULL},
    {AC, M_JSON, "lora_dropout", "1.5", 0, 0, {0}, 0, "adapter_config.json: lora_dropout must be a number in [0, 1)", "--lora-dropout"},
    {AC, M_JSON, "lora_dropout", "\"x\"", 0, 0, {0}, 0, "adapter_config.json: lora_dropout must be", NULL},
    {AC, M_JSON, "peft_type", "\"IA3\"", 0, 0, {0}, 0, "adapter_config.json: peft_type is \"IA3\"", NULL},
    {AC, M_JSON, "peft_type", NULL, 0, 0, {0}, 0, "adapter_config.json: peft_type is (absent)", NULL},
    {AC, M_JSON, "target_modules", "[]", 0, 0, {0}, 0, "adapter_config.json: target_modules must be a non-empty list", NULL},
    {AC, M_JSON, "target_modules", "\"q_proj\"", 0, 0, {0}, 0, "adapter_config.json: target_modules must be", NULL},
    {AC, M_JSON, "target_modules", "[\"q_proj\", 3]", 0, 0, {0}, 0, "adapter_config.json: target_modules entry 3", NULL},
    {AC, M_JSON, "target_modules", "[\"lm_head\"]", 0, 0, {0}, 0, "target_modules entry \"lm_head\" is not supported", NULL},
    {AC, M_JSON, "base_model_name_or_path", "5", 0, 0, {0}, 0, "adapter_config.json: base_model_name_or_path must be a string", NULL},
    {AC, M_JSON, "use_rslora", "true", 0, 0, {0}, 0, "adapter_config.json: use_rslora = true is not supported", NULL},
    {AC, M_JSON, "use_dora", "true", 0, 0, {0}, 0, "adapter_config.json: use_dora = true is not supported", NULL},
    {AC, M_JSON, "bias", "\"all\"", 0, 0, {0}, 0, "adapter_config.json: bias = \"all\" is not supported", NULL},
    {AC, M_JSON, "rank_pattern", "{\"q_proj\": 8}", 0, 0, {0}, 0, "adapter_config.json: rank_pattern", NULL},
    {AC, M_JSON, "layers_to_transform", "[0]", 0, 0, {0}, 0, "adapter_config.json: layers_to_transform = [0]", NULL},
    {AC, M_JSON, "fan_in_fan_out", "true", 0, 0, {0}, 0, "adapter_config.json: fan_in_fan_out = true", NULL},
    {AC, M_JSON, "modules_to_save", "[\"lm_head\"]", 0, 0, {0}, 0, "adapter_config.json: modules_to_save", NULL},
    /* a config of the right shapes that is not the one the weights were written with */
    {AC, M_JSON, "lora_alpha", "32", 0, 0, {0}, 0, "are not a pair: the weights were written with r=4 lora_alpha=16", NULL},
    {AC, M_JSON, "target_modules", "[\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\"]", 0, 0, {0}, 0,
     "are not a pair", NULL},
    {AD, M_ADD, "base_model.model.lm_head.lora_A.weight", NULL, 0, 0, {0}, 0, "has 71 tensors, but", NULL},
    {AD, M_VALUE, Q_A, NULL, 0, 0, {0}, NAN, "q_proj.lora_A.weight has a non-finite value", NULL},
};
#define N_ADAPTER_MUTATIONS ((int)(sizeof adapter_mutations / sizeof adapter_mutations[0]))

START_TEST(adapter_config_fields_are_checked)
{
    const mutation *mu = &adapter_mutations[_i];
    char dir[1200], *err;
    snprintf(dir, sizeof dir, "%s/adapter%d", tmp, _i);
    sh("mkdir '%s' && cp '%s/adapter_config.json' '%s/adapter_model.safetensors' '%s'", dir, base_run, base_run, dir);
    apply_mutation(dir, mu);
    int st = qlora(NULL, &err, "generate --model %s --quantizer=none --adapter %s --max-new-tokens 1", model, dir);
    if (!mu->expect) {
        ck_assert_msg(st == 0, "the untouched adapter does not load: %s", err);
    } else {
        ck_assert_msg(st != 0 && st < 128, "#%d (%s): exit %d\n%s", _i, mu->key ? mu->key : "", st, err);
        ck_assert_contains(err, mu->file);
        ck_assert_contains(err, mu->expect);
        if (mu->absent) ck_assert_msg(!tu_contains(err, mu->absent), "'%s' in: %s", mu->absent, err);
    }
    free(err);
}
END_TEST

/* The states a crash can leave the top-level adapter pair in, each loaded:
 * old pair (with a writer's temporary beside it), config removed before the
 * new weights or after them (a kill between the two renames). */
START_TEST(final_adapter_crash_states)
{
    char run[1200], path[1400], *err;
    snprintf(run, sizeof run, "%s/crash", tmp);
    sh("cp -a '%s' '%s'", base_run, run);
    /* a temporary of the next write beside the old pair: the old pair loads */
    sh("head -c 100 '%s/adapter_model.safetensors' > '%s/adapter_model.safetensors.tmp.AbC123'", run, run);
    ck_assert_msg(qlora(NULL, &err, "generate --model %s --quantizer=none --adapter %s --max-new-tokens 1", model, run) == 0,
                  "%s", err);
    free(err);
    /* the old config removed, the weights not yet replaced (or replaced): refused, pointing at the whole copy */
    snprintf(path, sizeof path, "%s/adapter_config.json", run);
    ck_assert_int_eq(unlink(path), 0);
    ck_assert_int_ne(qlora(NULL, &err, "generate --model %s --quantizer=none --adapter %s --max-new-tokens 1", model, run), 0);
    ck_assert_contains(err, "adapter_config.json is missing beside");
    ck_assert_contains(err, "adapter_model.safetensors");
    ck_assert_contains(err, "a whole copy is in");
    ck_assert_contains(err, "/checkpoint-2");
    free(err);
    /* a real kill right after the weights' rename, and one right after the config's */
    const char *shim = getenv("QLORA_FAULT_WRITE");
    if (!shim || !*shim) return;
    const char *after[2] = {"adapter_model.safetensors", "adapter_config.json"};
    for (int k = 0; k < 2; k++) {
        char killed[1200];
        snprintf(killed, sizeof killed, "%s/killed%d", tmp, k);
        snprintf(cmd, sizeof cmd, "LD_PRELOAD='%s' QL_FAULT_KILL_RENAME='%s/%s' OMP_NUM_THREADS=2 %s " TRAIN_ARGS
                                  " --steps 1 --output %s",
                 shim, killed, after[k], tu_env("QLORA_BIN"), model, base_data, killed);
        int st = tu_run(cmd, NULL, NULL);
        ck_assert_msg(st == 128 || st == 137, "not killed after renaming %s: exit %d", after[k], st);
        int gen = qlora(NULL, &err, "generate --model %s --quantizer=none --adapter %s --max-new-tokens 1", model, killed);
        if (k == 0) {
            ck_assert_int_ne(gen, 0);
            ck_assert_contains(err, "a whole copy is in");
            ck_assert_contains(err, "/checkpoint-1");
        } else {
            ck_assert_msg(gen == 0, "the pair written before the kill does not load: %s", err);
        }
        free(err);
        /* the checkpoint's copy is whole either way */
        snprintf(path, sizeof path, "%s/checkpoint-1", killed);
        ck_assert_msg(qlora(NULL, &err, "generate --model %s --quantizer=none --adapter %s --max-new-tokens 1", model, path) == 0,
                      "%s", err);
        free(err);
    }
}
END_TEST

/* Whichever flock the other run holds, a second train on its folder is refused
 * by name, and nothing of the folder changes. */
START_TEST(run_folder_is_locked)
{
    char run[1200], lock[1300], *err;
    snprintf(run, sizeof run, "%s/locked", tmp);
    ck_assert_int_eq(qlora(NULL, NULL, TRAIN_ARGS " --steps 1 --output %s", model, data, run), 0);
    char *before = digest(run);
    snprintf(lock, sizeof lock, "%s/.qlora-lock", run);
    int fd = open(lock, O_RDWR);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(flock(fd, LOCK_EX | LOCK_NB), 0);
    ck_assert_int_eq(ftruncate(fd, 0), 0);
    char mine[64], text[32];
    snprintf(text, sizeof text, "%ld\n", (long)getpid());
    ck_assert_int_eq(pwrite(fd, text, strlen(text), 0), (ssize_t)strlen(text));
    snprintf(mine, sizeof mine, "in use by another qlora train (process %ld", (long)getpid());
    int st = qlora(NULL, &err, TRAIN_ARGS " --steps 2 --resume %s/checkpoint-1", model, data, run);
    ck_assert_msg(st != 0 && st < 128, "exit %d: %s", st, err);
    ck_assert_contains(err, mine);
    ck_assert_contains(err, run);
    free(err);
    st = qlora(NULL, &err, TRAIN_ARGS " --steps 2 --output %s --force", model, data, run);
    ck_assert_msg(st != 0 && st < 128, "exit %d: %s", st, err);
    ck_assert_contains(err, mine);
    free(err);
    char *after = digest(run);
    ck_assert_str_eq(before, after);
    free(after);
    close(fd); /* the other run ends: now it resumes */
    ck_assert_msg(qlora(NULL, &err, TRAIN_ARGS " --steps 2 --resume %s/checkpoint-1", model, data, run) == 0, "%s", err);
    free(err);
    free(before);
}
END_TEST

/* Two trains started at once on one new folder: one runs, the other is refused. */
START_TEST(two_runs_one_folder)
{
    char run[1200], path[1400];
    snprintf(run, sizeof run, "%s/shared", tmp);
    snprintf(cmd, sizeof cmd,
             "for k in 1 2; do (OMP_NUM_THREADS=1 %s " TRAIN_ARGS " --steps 6 --output %s 2>%s/err$k; echo $? >%s/rc$k) & "
             "done; wait",
             tu_env("QLORA_BIN"), model, data, run, tmp, tmp);
    tu_run(cmd, NULL, NULL);
    int rc[2], ok = 0;
    char *err[2];
    for (int k = 0; k < 2; k++) {
        char *t;
        size_t len;
        snprintf(path, sizeof path, "%s/rc%d", tmp, k + 1);
        ck_assert_int_eq(ql_read_file(path, &t, &len), QL_OK);
        rc[k] = atoi(t);
        free(t);
        snprintf(path, sizeof path, "%s/err%d", tmp, k + 1);
        ck_assert_int_eq(ql_read_file(path, &err[k], &len), QL_OK);
        ok += rc[k] == 0;
    }
    ck_assert_msg(ok == 1, "exits %d and %d:\n%s\n%s", rc[0], rc[1], err[0], err[1]);
    const char *loser = rc[0] ? err[0] : err[1];
    ck_assert_msg(tu_contains(loser, "already exists") || tu_contains(loser, "in use by another qlora train") ||
                      tu_contains(loser, "created by someone else"),
                  "%s", loser);
    free(err[0]);
    free(err[1]);
    size_t n;
    json_t *rows = read_rows(run, &n);
    ck_assert_uint_eq(n, 6);
    for (size_t i = 0; i < n; i++) ck_assert_double_eq(field(rows, i, "step"), (double)(i + 1));
    json_decref(rows);
}
END_TEST

/* A real failing write (RLIMIT_FSIZE: writes past 5632 bytes fail with EFBIG)
 * hits metrics.jsonl after the checkpoints at 10, 20, 30: training stops,
 * names the file and the last good checkpoint, and leaves whole rows only. */
START_TEST(metrics_write_error_stops_training)
{
    char run[1200], *err;
    snprintf(run, sizeof run, "%s/fsize", tmp);
    snprintf(cmd, sizeof cmd,
             "trap '' XFSZ; ulimit -f 11; OMP_NUM_THREADS=2 %s train --model %s --data %s --format alpaca --lora-r 1 "
             "--lora-modules q_proj --batch-size 1 --grad-accum 1 --quiet --steps 80 --save-steps 10 --output %s",
             tu_env("QLORA_BIN"), model, data, run);
    int st = tu_run(cmd, NULL, &err);
    ck_assert_msg(st != 0 && st < 128, "exit %d: %s", st, err);
    ck_assert_contains(err, "cannot write");
    ck_assert_contains(err, "/metrics.jsonl: File too large");
    const char *at = strstr(err, "the last good checkpoint is checkpoint-");
    ck_assert_msg(at != NULL, "%s", err);
    int last = atoi(at + strlen("the last good checkpoint is checkpoint-"));
    ck_assert_msg(last >= 10 && last % 10 == 0, "%s", err);
    free(err);
    size_t n;
    json_t *rows = read_rows(run, &n); /* every row whole */
    ck_assert_msg(n >= (size_t)last && n < 80, "%zu rows", n);
    json_decref(rows);
    char ckpt[1300];
    snprintf(ckpt, sizeof ckpt, "%s/checkpoint-%d", run, last);
    ck_assert_msg(qlora(NULL, &err, "train --model %s --data %s --format alpaca --lora-r 1 --lora-modules q_proj "
                                    "--batch-size 1 --grad-accum 1 --quiet --steps %d --save-steps 10 --resume %s",
                        model, data, last + 1, ckpt) == 0,
                  "%s", err);
    free(err);
    rows = read_rows(run, &n);
    ck_assert_uint_eq(n, (size_t)last + 1);
    json_decref(rows);
}
END_TEST

/* A disk full before the first checkpoint: the new run folder goes, nothing is
 * left beside it, and the message says why. */
START_TEST(full_disk_before_first_checkpoint)
{
    char parent[1200], run[1300], *err, *out;
    snprintf(parent, sizeof parent, "%s/disk", tmp);
    ck_assert_int_eq(ql_mkdir_p(parent), QL_OK);
    snprintf(run, sizeof run, "%s/run", parent);
    snprintf(cmd, sizeof cmd, "trap '' XFSZ; ulimit -f 11; OMP_NUM_THREADS=2 %s " TRAIN_ARGS " --steps 3 --save-steps 1 --output %s",
             tu_env("QLORA_BIN"), model, data, run);
    int st = tu_run(cmd, NULL, &err);
    ck_assert_msg(st != 0 && st < 128, "exit %d: %s", st, err);
    ck_assert_contains(err, "File too large");
    ck_assert_contains(err, "no checkpoint was saved");
    ck_assert_contains(err, "removed the new run folder");
    free(err);
    snprintf(cmd, sizeof cmd, "ls -A '%s'", parent);
    ck_assert_int_eq(tu_run(cmd, &out, NULL), 0);
    ck_assert_msg(out[0] == '\0', "left behind: %s", out);
    free(out);
}
END_TEST

/* A resumed run reads and writes only plain files inside its folder. */
START_TEST(run_files_are_not_followed)
{
    char run[1200], path[1300], outside[1300], *err;
    snprintf(run, sizeof run, "%s/links", tmp);
    ck_assert_int_eq(qlora(NULL, NULL, TRAIN_ARGS " --steps 1 --output %s", model, data, run), 0);
    snprintf(outside, sizeof outside, "%s/outside.jsonl", tmp);
    const char *keep = "{\"step\": 1, \"mine\": true}\n";
    ck_assert_int_eq(ql_write_file_atomic(outside, keep, strlen(keep)), QL_OK);
    snprintf(path, sizeof path, "%s/metrics.jsonl", run);
    ck_assert_int_eq(unlink(path), 0);
    ck_assert_int_eq(symlink(outside, path), 0);
    int st = qlora(NULL, &err, TRAIN_ARGS " --steps 2 --resume %s/checkpoint-1", model, data, run);
    ck_assert_msg(st != 0 && st < 128, "exit %d: %s", st, err);
    ck_assert_contains(err, "metrics.jsonl is a symbolic link");
    free(err);
    char *text;
    size_t len;
    ck_assert_int_eq(ql_read_file(outside, &text, &len), QL_OK);
    ck_assert_str_eq(text, keep);
    free(text);
}
END_TEST

/* The checkpoint-* names in run, sorted by N, as "1,3,4" (what else is
 * there, apart from the run's own files, as ";+name"). */
static void list_checkpoints(const char *run, char *buf, size_t cap)
{
    int steps[256], n = 0;
    char others[1024] = "";
    DIR *d = opendir(run);
    ck_assert_ptr_nonnull(d);
    struct dirent *e;
    while ((e = readdir(d))) {
        int k, used = 0;
        char again[64];
        if (sscanf(e->d_name, "checkpoint-%d%n", &k, &used) == 1 && e->d_name[used] == '\0' && n < 256 &&
            snprintf(again, sizeof again, "checkpoint-%d", k) > 0 && !strcmp(again, e->d_name))
            steps[n++] = k;
        else if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..") && strcmp(e->d_name, ".qlora-lock") &&
                 strcmp(e->d_name, ".qlora-output") && strcmp(e->d_name, "metrics.jsonl") &&
                 strcmp(e->d_name, "run_config.json") && strcmp(e->d_name, "adapter_config.json") &&
                 strcmp(e->d_name, "adapter_model.safetensors"))
            snprintf(others + strlen(others), sizeof others - strlen(others), ";+%s", e->d_name);
    }
    closedir(d);
    for (int i = 0; i < n; i++)
        for (int j = i + 1; j < n; j++)
            if (steps[j] < steps[i]) {
                int t = steps[i];
                steps[i] = steps[j];
                steps[j] = t;
            }
    buf[0] = '\0';
    for (int i = 0; i < n; i++) snprintf(buf + strlen(buf), cap - strlen(buf), "%s%d", i ? "," : "", steps[i]);
    snprintf(buf + strlen(buf), cap - strlen(buf), "%s", others);
}

/* --save-total-limit keeps the newest N checkpoints qlora wrote in the run
 * folder and deletes the older ones, and nothing else there. */
START_TEST(save_total_limit_keeps_the_newest)
{
    char run[1200], list[2048], *err;
    snprintf(run, sizeof run, "%s/limited", tmp);
    ck_assert_msg(qlora(NULL, &err, TRAIN_ARGS " --steps 4 --save-steps 1 --save-total-limit 2 --output %s", model, data,
                        run) == 0, "%s", err);
    free(err);
    list_checkpoints(run, list, sizeof list);
    ck_assert_str_eq(list, "3,4");
    /* the newest is whole: it resumes */
    ck_assert_msg(qlora(NULL, &err, TRAIN_ARGS " --steps 5 --save-steps 1 --save-total-limit 2 --resume %s/checkpoint-4",
                        model, data, run) == 0, "%s", err);
    free(err);
    list_checkpoints(run, list, sizeof list);
    ck_assert_str_eq(list, "4,5");

    /* 0 keeps them all; then what is not a checkpoint qlora wrote is never
     * deleted or counted: a folder of the user's, a link to a checkpoint
     * (neither it nor its target), a file */
    snprintf(run, sizeof run, "%s/decoys", tmp);
    ck_assert_msg(qlora(NULL, &err, TRAIN_ARGS " --steps 2 --save-steps 1 --save-total-limit 0 --output %s", model, data,
                        run) == 0, "%s", err);
    free(err);
    list_checkpoints(run, list, sizeof list);
    ck_assert_str_eq(list, "1,2");
    snprintf(cmd, sizeof cmd,
             "cd '%s' && mkdir checkpoint-0 && echo mine > checkpoint-0/notes.txt && cp -r checkpoint-1 '%s/copy' && "
             "ln -s '%s/copy' checkpoint-6 && echo mine > checkpoint-7 && mkdir checkpoint-01 && cp -r checkpoint-1 checkpoint-8 && "
             "rm checkpoint-8/.qlora-output",
             run, tmp, tmp);
    ck_assert_int_eq(system(cmd), 0);
    ck_assert_msg(qlora(NULL, &err, TRAIN_ARGS " --steps 4 --save-steps 1 --save-total-limit 2 --resume %s/checkpoint-2",
                        model, data, run) == 0, "%s", err);
    free(err);
    list_checkpoints(run, list, sizeof list);
    /* 1 and 2 were this run's: deleted after 3 and after 4 */
    ck_assert_str_eq(list, "0,3,4,6,7,8;+checkpoint-01");
    char path[1400];
    snprintf(path, sizeof path, "%s/checkpoint-0/notes.txt", run);
    ck_assert(ql_path_exists(path));
    snprintf(path, sizeof path, "%s/copy/trainer_state.json", tmp);
    ck_assert_msg(ql_path_exists(path), "the target of the link checkpoint-6 was deleted");
    snprintf(path, sizeof path, "%s/checkpoint-8/trainer_state.json", run);
    ck_assert_msg(ql_path_exists(path), "checkpoint-8 (no marker) was touched");
}
END_TEST

/* qlora.py's defaults: a checkpoint every 250 steps, the newest 40 kept
 * (train --help shows the defaults train itself starts from,
 * ql_train_opts_default; a run of 41 checkpoints is too slow for this suite). */
START_TEST(save_defaults_are_qlora_py)
{
    char *out, *err;
    ck_assert_int_eq(qlora(&out, &err, "train --help"), 0);
    ck_assert_contains(out, "--save-steps N ");
    const char *l = strstr(out, "--save-steps N ");
    char line_buf[256];
    const char *line = line_buf;
    sscanf(l, "%255[^\n]", line_buf);
    ck_assert_contains(line, "(default: 250)");
    l = strstr(out, "--save-total-limit N ");
    ck_assert_msg(l != NULL, "train --help has no --save-total-limit:\n%s", out);
    sscanf(l, "%255[^\n]", line_buf);
    ck_assert_contains(line, "(default: 40)");
    free(out);
    free(err);
}
END_TEST

/* --force replaces an earlier run folder, and nothing else. */
START_TEST(force_replaces_only_earlier_runs)
{
    char mcopy[1200], earlier[1200], path[1400], *err;
    /* the model folder as the output */
    snprintf(mcopy, sizeof mcopy, "%s/model", tmp);
    sh("cp -a '%s' '%s'", model, mcopy);
    char *model_before = digest(mcopy);
    int st = qlora(NULL, &err, TRAIN_ARGS " --steps 1 --output %s --force", mcopy, data, mcopy);
    ck_assert_msg(st != 0 && st < 128, "exit %d: %s", st, err);
    ck_assert_contains(err, mcopy);
    ck_assert_contains(err, "--force will not replace it");
    free(err);
    char *model_after = digest(mcopy);
    ck_assert_str_eq(model_before, model_after);
    free(model_after);
    /* an earlier run holding this run's data or eval data */
    snprintf(earlier, sizeof earlier, "%s/earlier", tmp);
    ck_assert_int_eq(qlora(NULL, NULL, TRAIN_ARGS " --steps 1 --output %s", model, data, earlier), 0);
    snprintf(path, sizeof path, "%s/d.json", earlier);
    ck_assert_int_eq(ql_copy_file_atomic(data, path), QL_OK);
    char *run_before = digest(earlier);
    st = qlora(NULL, &err, TRAIN_ARGS " --steps 1 --output %s --force", model, path, earlier);
    ck_assert_msg(st != 0 && st < 128, "exit %d: %s", st, err);
    ck_assert_contains(err, "--force will not replace it");
    ck_assert_contains(err, "d.json");
    free(err);
    st = qlora(NULL, &err, TRAIN_ARGS " --steps 1 --eval-data %s --output %s --force", model, data, path, earlier);
    ck_assert_msg(st != 0 && st < 128, "exit %d: %s", st, err);
    ck_assert_contains(err, "--force will not replace it");
    free(err);
    char *run_after = digest(earlier);
    ck_assert_str_eq(run_before, run_after);
    free(run_after);
    /* a folder qlora did not write, a link to a run, a FIFO */
    char plain[1200], link[1200], fifo[1200];
    snprintf(plain, sizeof plain, "%s/plain", tmp);
    sh("mkdir '%s' && echo mine > '%s/notes.txt'", plain, plain);
    st = qlora(NULL, &err, TRAIN_ARGS " --steps 1 --output %s --force", model, data, plain);
    ck_assert_msg(st != 0 && st < 128, "exit %d: %s", st, err);
    ck_assert_contains(err, "is not a qlora output");
    free(err);
    snprintf(path, sizeof path, "%s/notes.txt", plain);
    ck_assert(ql_path_exists(path));
    snprintf(link, sizeof link, "%s/link", tmp);
    ck_assert_int_eq(symlink(earlier, link), 0);
    st = qlora(NULL, &err, TRAIN_ARGS " --steps 1 --output %s --force", model, data, link);
    ck_assert_msg(st != 0 && st < 128, "exit %d: %s", st, err);
    ck_assert_contains(err, "is a symbolic link");
    free(err);
    snprintf(fifo, sizeof fifo, "%s/fifo", tmp);
    ck_assert_int_eq(mkfifo(fifo, 0644), 0);
    st = qlora(NULL, &err, TRAIN_ARGS " --steps 1 --output %s --force", model, data, fifo);
    ck_assert_msg(st != 0 && st < 128, "exit %d: %s", st, err);
    ck_assert_contains(err, "is a FIFO");
    free(err);
    run_after = digest(earlier);
    ck_assert_str_eq(run_before, run_after);
    free(run_after);
    /* an earlier run is replaced whole: nothing of it is left, beside it either */
    snprintf(path, sizeof path, "%s/d.json", earlier);
    ck_assert_int_eq(unlink(path), 0);
    ck_assert_int_eq(qlora(NULL, NULL, TRAIN_ARGS " --steps 2 --save-steps 1 --output %s --force", model, data, earlier), 0);
    snprintf(path, sizeof path, "%s/checkpoint-2", earlier);
    ck_assert(ql_path_exists(path));
    ck_assert_msg(qlora(NULL, &err, TRAIN_ARGS " --steps 1 --output %s --force", model, data, earlier) == 0, "%s", err);
    free(err);
    ck_assert(!ql_path_exists(path));
    size_t n;
    json_t *rows = read_rows(earlier, &n);
    ck_assert_uint_eq(n, 1);
    json_decref(rows);
    char *out;
    snprintf(cmd, sizeof cmd, "(ls -A '%s' | grep -c earlier)", tmp);
    tu_run(cmd, &out, NULL);
    ck_assert_msg(atoi(out) == 1, "beside the run: %s", out);
    free(out);
    free(run_before);
    free(model_before);
}
END_TEST

/* --eval-dataset-size N: qlora.py's --do_eval without an eval split.  N
 * examples of the training data are held out (ql_dataset_split with seed
 * 42), never trained on, and their loss is logged at --eval-steps: the same
 * loss `qlora eval` gives for those records with the final adapter. */
START_TEST(eval_dataset_size_holds_out)
{
    char run[1200], held[1200], *out, *err;
    snprintf(run, sizeof run, "%s/run", tmp);
    snprintf(held, sizeof held, "%s/held.json", tmp);
    ck_assert_msg(qlora(NULL, &err, TRAIN_ARGS " --steps 4 --eval-dataset-size 3 --eval-steps 2 --output %s", model, data,
                        run) == 0,
                  "%s", err);
    ck_assert_contains(err, "{\"event\": \"eval_split\", \"held_out\": 3, \"train\": 9, \"seed\": 42}");
    free(err);
    size_t n;
    json_t *rows = read_rows(run, &n);
    ck_assert_uint_eq(n, 6); /* 4 steps + evals at 2 and 4 */
    ck_assert_int_eq((int)field(rows, 2, "step"), 2);
    ck_assert(field(rows, 2, "eval_loss") > 0);
    ck_assert_int_eq((int)field(rows, 5, "step"), 4);
    double eval_at_4 = field(rows, 5, "eval_loss");
    int64_t eval_tokens = (int64_t)field(rows, 5, "eval_tokens");
    ck_assert(field(rows, 2, "eval_loss") != eval_at_4);
    json_decref(rows);

    /* which records were held out: the split of the same examples */
    ql_tokenizer *tok;
    ck_assert_int_eq(ql_tokenizer_load(model, &tok), QL_OK);
    ql_dataset_opts dopts = {.format = QL_FMT_ALPACA, .source_max_len = 1024, .target_max_len = 256, .max_len = 512};
    ql_dataset *d, *tr, *ev;
    ck_assert_int_eq(ql_dataset_load(data, tok, &dopts, &d), QL_OK);
    ck_assert_uint_eq(d->n, 12);
    ck_assert_int_eq(ql_dataset_split(d, 3, 42, &tr, &ev), QL_OK);
    json_error_t jerr;
    json_t *all = json_load_file(data, 0, &jerr), *some = json_array();
    for (size_t k = 0; k < ev->n; k++)
        for (size_t i = 0; i < d->n; i++)
            if (ev->examples[k].ids == d->examples[i].ids) json_array_append(some, json_array_get(all, i));
    ck_assert_uint_eq(json_array_size(some), 3);
    ck_assert_int_eq(json_dump_file(some, held, 0), 0);
    json_decref(all), json_decref(some);
    ql_dataset_destroy(ev), ql_dataset_destroy(tr), ql_dataset_destroy(d);
    ql_tokenizer_destroy(tok);
    ck_assert_msg(qlora(&out, &err, "eval --model %s --adapter %s --data %s --format alpaca --quiet", model, run, held) == 0,
                  "%s", err);
    json_t *res = json_loads(strrchr(out, '{'), 0, NULL);
    ck_assert_ptr_nonnull(res);
    ck_assert_msg(fabs(json_number_value(json_object_get(res, "nll")) - eval_at_4) < 1e-5,
                  "eval of the held-out records: nll %.7f, the run's eval_loss %.7f",
                  json_number_value(json_object_get(res, "nll")), eval_at_4);
    ck_assert_int_eq(json_integer_value(json_object_get(res, "tokens")), eval_tokens);
    json_decref(res);
    free(out), free(err);

    /* a fraction: ceil(0.25 x 12) = 3, the same examples; the refusals */
    ck_assert_int_eq(qlora(&out, &err, TRAIN_ARGS " --eval-dataset-size 0.25 --max-eval-examples 2 --dry-run", model, data), 0);
    ck_assert_contains(out, "\"eval_examples\": 2,");
    ck_assert_contains(out, "\"train_examples\": 9,");
    ck_assert_contains(out, "\"eval_dataset_size\": 0.25,");
    free(out), free(err);
    ck_assert_int_ne(qlora(&out, &err, TRAIN_ARGS " --eval-dataset-size 12 --output %s/r2", model, data, tmp), 0);
    ck_assert_contains(err, "--eval-dataset-size 12 holds out 12 of the 12 examples of");
    free(out), free(err);
    ck_assert_int_eq(qlora(&out, &err, TRAIN_ARGS " --eval-dataset-size 3 --eval-data %s --output %s/r2", model, data, data, tmp), 2);
    ck_assert_contains(err, "give --eval-data or --eval-dataset-size, not both");
    free(out), free(err);
    ck_assert_int_eq(qlora(&out, &err, TRAIN_ARGS " --eval-dataset-size 2.5 --output %s/r2", model, data, tmp), 2);
    ck_assert_contains(err, "--eval-dataset-size=2.5: a whole number of examples, or a fraction below 1");
    free(out), free(err);
    ck_assert_int_eq(qlora(&out, &err, TRAIN_ARGS " --eval-steps 2 --output %s/r2", model, data, tmp), 2);
    ck_assert_contains(err, "--eval-steps needs --eval-data FILE or --eval-dataset-size N");
    free(out), free(err);
}
END_TEST

/* ql_clip_grad_norm then ql_adamw_update, step by step as the trainer runs
 * them on the host, against torch.nn.utils.clip_grad_norm_ and
 * torch.optim.AdamW: the norm each step returns and every parameter after each
 * of 6 steps (gradients above and below max_grad_norm, lr changing per step,
 * weight decay 0 and 0.1).  The bound, 1e-6 (4 float32 ulps of the largest
 * parameters, about 2.8; seen: 1.2e-7), is well below what a changed rule
 * moves (a missing bias correction, coupled weight decay, no clip: 1e-5 and
 * more). */
START_TEST(adamw_and_clipping_match_torch)
{
    const size_t n = ADAMW_REF_N;
    for (int c = 0; c < ADAMW_REF_CASES; c++) {
        ql_adamw *opt = NULL;
        ck_assert_int_eq(ql_adamw_create(n, (float)adamw_ref_beta1, (float)adamw_ref_beta2, (float)adamw_ref_eps,
                                         (float)adamw_ref_weight_decay[c], &opt), QL_OK);
        float params[ADAMW_REF_N], grads[ADAMW_REF_N];
        memcpy(params, adamw_ref_p0, sizeof params);
        double worst = 0;
        for (int k = 0; k < ADAMW_REF_STEPS; k++) {
            memcpy(grads, adamw_ref_grads[k], sizeof grads);
            double norm = ql_clip_grad_norm(grads, n, adamw_ref_max_grad_norm);
            ck_assert_msg(fabs(norm - adamw_ref_norm[c][k]) <= 1e-6 * adamw_ref_norm[c][k],
                          "weight decay %g, step %d: norm %.9g, torch %.9g", adamw_ref_weight_decay[c], k + 1, norm,
                          adamw_ref_norm[c][k]);
            ql_adamw_update(opt, params, grads, (float)adamw_ref_lr[k]);
            for (size_t i = 0; i < n; i++) {
                double want = adamw_ref_params[c][k][i], d = fabs(params[i] - want);
                if (d > worst) worst = d;
                ck_assert_msg(d <= 1e-6, "weight decay %g, step %d, parameter %zu: %.9g, torch %.9g "
                              "(difference %.3g)", adamw_ref_weight_decay[c], k + 1, i, params[i], want, d);
            }
        }
        printf("  adamw weight decay %g: largest difference from torch after %d steps %.3g\n",
               adamw_ref_weight_decay[c], ADAMW_REF_STEPS, worst);
        ql_adamw_destroy(opt);
    }
}
END_TEST

/* ql_lr_at against transformers' schedulers: every step of each schedule,
 * for totals from 1 to 250 steps and warmup ratios from 0 to 1; constant
 * ignores the warmup, the others warm up from 0 */
START_TEST(schedule_matches_transformers)
{
    size_t n = sizeof schedule_ref_cases / sizeof schedule_ref_cases[0];
    for (size_t i = 0; i < n; i++) {
        ql_train_opts o;
        ql_train_opts_default(&o);
        o.lr = (float)schedule_ref_lr;
        o.warmup_ratio = schedule_ref_cases[i].warmup_ratio;
        ck_assert_int_eq(ql_lr_schedule_parse(schedule_ref_cases[i].schedule, &o.schedule), QL_OK);
        ck_assert_str_eq(ql_lr_schedule_name(o.schedule), schedule_ref_cases[i].schedule);
        int total = schedule_ref_cases[i].total;
        for (int k = 0; k < total; k++) {
            double want = schedule_ref_values[schedule_ref_cases[i].first + k], got = ql_lr_at(&o, k, total);
            ck_assert_msg(fabs(got - want) <= 1e-7 * schedule_ref_lr,
                          "%s, %d steps, warmup ratio %g: step %d has lr %.9g, transformers %.9g",
                          schedule_ref_cases[i].schedule, total, o.warmup_ratio, k, got, want);
        }
    }
    ql_lr_schedule s;
    ck_assert_int_eq(ql_lr_schedule_parse("polynomial", &s), QL_EINVAL);
    ck_assert_str_eq(ql_error_message(), "--lr-scheduler polynomial: use constant, constant_with_warmup, linear or cosine");
}
END_TEST

/* qlora.py's defaults, as ql_train_opts_default and run_config.json have them */
START_TEST(defaults_are_qlora_py)
{
    ql_train_opts o;
    ql_train_opts_default(&o);
    ck_assert_int_eq(o.lora.r, 64);
    ck_assert_float_eq(o.lora.alpha, 16.0f);
    ck_assert_float_eq(o.lora.dropout, 0.0f);
    ck_assert_float_eq(o.lr, 2e-4f);
    ck_assert_int_eq(o.schedule, QL_SCHED_CONSTANT);
    ck_assert_double_eq(o.warmup_ratio, 0.03);
    ck_assert_int_eq(o.group_by_length, 1);
    ck_assert_int_eq(o.batch_size, 1);
    ck_assert_int_eq(o.grad_accum, 16);
    ck_assert_float_eq(o.max_grad_norm, 0.3f);
    ck_assert_float_eq(o.weight_decay, 0.0f);
    ck_assert_int_eq(o.data.source_max_len, 1024);
    ck_assert_int_eq(o.data.target_max_len, 256);
    ck_assert_int_eq(o.data.train_on_source, 0);
    ck_assert_float_eq(o.beta2, 0.999f);
    /* the constant default ignores the warmup, as transformers' does */
    for (int k = 0; k < 10; k++) ck_assert_float_eq(ql_lr_at(&o, k, 100), 2e-4f);
}
END_TEST

Suite *train_suite(void)
{
    Suite *s = suite_create("train");
    TCase *t = tcase_create("cli");
    tcase_add_checked_fixture(t, setup, teardown);
    tcase_set_timeout(t, 240);
    tcase_add_test(t, same_seed_same_losses_and_run_files);
    tcase_add_test(t, resume_is_bit_exact);
    tcase_add_loop_test(t, interrupt_saves_a_checkpoint, 0, 2);
    tcase_add_test(t, eval_generate_merge_with_adapter);
    tcase_add_test(t, eval_dataset_size_holds_out);
    tcase_add_test(t, base_model_facts);
    tcase_add_test(t, bad_input);
    tcase_add_test(t, mmlu_scoring);
    tcase_add_test(t, any_quantizer_trains);
    tcase_add_test(t, untied_bf16_model_and_foreign_adapter);
    tcase_add_test(t, kill_mid_run_leaves_good_checkpoints);
    tcase_add_test(t, prequantized_checkpoint_is_used_as_is);
    tcase_add_test(t, csv_records);
    tcase_add_test(t, run_folder_is_locked);
    tcase_add_test(t, two_runs_one_folder);
    tcase_add_test(t, metrics_write_error_stops_training);
    tcase_add_test(t, full_disk_before_first_checkpoint);
    tcase_add_test(t, run_files_are_not_followed);
    tcase_add_test(t, force_replaces_only_earlier_runs);
    suite_add_tcase(s, t);
    TCase *r = tcase_create("checkpoint_rotation");
    tcase_add_checked_fixture(r, setup, teardown);
    tcase_set_timeout(r, 240);
    tcase_add_test(r, save_total_limit_keeps_the_newest);
    tcase_add_test(r, save_defaults_are_qlora_py);
    suite_add_tcase(s, r);
    TCase *rc = tcase_create("resume_compat");
    tcase_add_checked_fixture(rc, setup, teardown);
    tcase_set_timeout(rc, 240);
    tcase_add_test(rc, resume_checkpoint_without_newer_settings);
    suite_add_tcase(s, rc);
    TCase *sc = tcase_create("schedule");
    tcase_add_test(sc, schedule_matches_transformers);
    tcase_add_test(sc, defaults_are_qlora_py);
    tcase_add_test(sc, adamw_and_clipping_match_torch);
    suite_add_tcase(s, sc);
    TCase *c = tcase_create("checkpoint_files");
    tcase_add_unchecked_fixture(c, base_setup, base_teardown);
    tcase_add_checked_fixture(c, setup, teardown);
    tcase_set_timeout(c, 240);
    tcase_add_loop_test(c, checkpoint_fields_are_checked, 0, N_CKPT_MUTATIONS);
    tcase_add_loop_test(c, adapter_config_fields_are_checked, 0, N_ADAPTER_MUTATIONS);
    tcase_add_test(c, final_adapter_crash_states);
    suite_add_tcase(s, c);
    return s;
}

int main(void)
{
    SRunner *r = srunner_create(train_suite());
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
