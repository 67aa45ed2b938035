/* End-to-end training through the command line: determinism, bit-exact
 * resume, gradient checkpointing, the run folder's files, PEFT adapters,
 * eval/generate/merge with an adapter, and every bad-input message. */
#include <check.h>
#include <dirent.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qlora/mmlu.h"
#include "qlora/qlora.h"
#include "testutil.h"

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
    ck_assert_double_eq_tol(json_number_value(json_object_get(cfg, "lora_dropout")), 0.05, 1e-12);
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
    /* the same model with a sliding attention window shorter than the stories: refused by name */
    char cfgp[1300];
    snprintf(cfgp, sizeof cfgp, "%s/config.json", tiny);
    json_t *tc = json_load_file(cfgp, 0, NULL);
    json_object_set_new(tc, "sliding_window", json_integer(8));
    ck_assert_int_eq(json_dump_file(tc, cfgp, 0), 0);
    json_decref(tc);
    ck_assert_int_ne(qlora(NULL, &err, "eval --model %s --data %s --format text --max-examples 2 --quiet", tiny, stories), 0);
    ck_assert_contains(err, "sliding attention window (8)");
    free(err);
    tc = json_load_file(cfgp, 0, NULL);
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

Suite *train_suite(void)
{
    Suite *s = suite_create("train");
    TCase *t = tcase_create("cli");
    tcase_add_checked_fixture(t, setup, teardown);
    tcase_set_timeout(t, 240);
    tcase_add_test(t, same_seed_same_losses_and_run_files);
    tcase_add_test(t, resume_is_bit_exact);
    tcase_add_test(t, eval_generate_merge_with_adapter);
    tcase_add_test(t, base_model_facts);
    tcase_add_test(t, bad_input);
    tcase_add_test(t, mmlu_scoring);
    tcase_add_test(t, any_quantizer_trains);
    tcase_add_test(t, untied_bf16_model_and_foreign_adapter);
    tcase_add_test(t, kill_mid_run_leaves_good_checkpoints);
    tcase_add_test(t, prequantized_checkpoint_is_used_as_is);
    tcase_add_test(t, csv_records);
    suite_add_tcase(s, t);
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
