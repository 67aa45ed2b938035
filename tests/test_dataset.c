/* Datasets: prompt strings, qlora.py's tokenization and truncation, the
 * bundled data files, epoch order, and every bad-input message.
 *
 * Token ids are checked against the tokenizer itself (stories260K's, from
 * $QLORA_SHARED/models/stories260K): an example must equal
 * BOS + encode(source) + encode(target) + EOS, cut where the options say. */
#include <check.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qlora/dataset.h"
#include "qlora/error.h"
#include "qlora/fs.h"
#include "qlora/llama.h"
#include "qlora/lora.h"
#include "qlora/mmlu.h"
#include "qlora/tokenizer.h"
#include "testutil.h"

/* ---- helpers ---- */

static const char *shared_dir(void)
{
    const char *v = getenv("QLORA_SHARED");
    ck_assert_msg(v && *v, "QLORA_SHARED is not set (it names ../shared: models/stories260K and data/)");
    return v;
}

static char *shared_path(const char *rel)
{
    char *p = ql_path_join(shared_dir(), rel);
    ck_assert_ptr_nonnull(p);
    return p;
}

static ql_tokenizer *load_tokenizer(void)
{
    char *dir = shared_path("models/stories260K");
    ql_tokenizer *t = NULL;
    int rc = ql_tokenizer_load(dir, &t);
    ck_assert_msg(rc == QL_OK, "loading the tokenizer from %s: %s", dir, ql_error_message());
    free(dir);
    return t;
}

static char tmp_root[256];

/* A file in a fresh temporary folder holding `text`; caller frees the path. */
static char *write_tmp(const char *name, const char *text)
{
    if (!tmp_root[0]) {
        snprintf(tmp_root, sizeof tmp_root, "/tmp/qlora-dataset-XXXXXX");
        ck_assert_ptr_nonnull(mkdtemp(tmp_root));
    }
    char *path = ql_path_join(tmp_root, name);
    ck_assert_ptr_nonnull(path);
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(text, 1, strlen(text), f), strlen(text));
    ck_assert_int_eq(fclose(f), 0);
    return path;
}

static void remove_tmp(void)
{
    if (tmp_root[0]) ql_remove_tree(tmp_root);
    tmp_root[0] = '\0';
}

static ql_dataset_opts opts_of(ql_data_format fmt, int src_max, int tgt_max, int max_len)
{
    return (ql_dataset_opts){.format = fmt, .source_max_len = src_max, .target_max_len = tgt_max, .max_len = max_len};
}

static ql_dataset *load_ok(const char *path, const ql_tokenizer *t, const ql_dataset_opts *o)
{
    ql_dataset *d = NULL;
    int rc = ql_dataset_load(path, t, o, &d);
    ck_assert_msg(rc == QL_OK, "loading %s: %s", path, ql_error_message());
    ck_assert_ptr_nonnull(d);
    return d;
}

/* Load must fail with `code` and a message holding every needle. */
static void load_fails(const char *path, const ql_tokenizer *t, const ql_dataset_opts *o, int code, const char *n1, const char *n2)
{
    ql_dataset *d = (ql_dataset *)1;
    int rc = ql_dataset_load(path, t, o, &d);
    ck_assert_msg(rc == code, "loading %s: expected %s, got %s (%s)", path, ql_status_name(code), ql_status_name(rc),
                  ql_error_message());
    ck_assert_ptr_null(d);
    if (n1) ck_assert_contains(ql_error_message(), n1);
    if (n2) ck_assert_contains(ql_error_message(), n2);
}

typedef struct toks {
    int32_t *ids;
    size_t n;
} toks;

static toks enc(const ql_tokenizer *t, const char *s)
{
    toks r = {0};
    if (!*s) return r; /* the loader never asks the tokenizer about "" */
    ck_assert_int_eq(ql_tokenizer_encode(t, s, strlen(s), 0, &r.ids, &r.n), QL_OK);
    ck_assert_uint_gt(r.n, 0);
    return r;
}

/* The expected example: [BOS] + src (cut to src_max) ++ tgt + [EOS] (cut to tgt_max), cut to max_len. */
static void expect_example(const ql_tokenizer *t, const ql_example *e, const char *src, const char *tgt, int src_max,
                           int tgt_max, int max_len, int train_on_source)
{
    toks s = enc(t, src), g = enc(t, tgt);
    size_t ns = 1 + s.n, nt = g.n + 1;
    if (src_max > 0 && ns > (size_t)src_max) ns = (size_t)src_max;
    if (tgt_max > 0 && nt > (size_t)tgt_max) nt = (size_t)tgt_max;
    size_t len = ns + nt;
    if (max_len > 0 && len > (size_t)max_len) len = (size_t)max_len;
    ck_assert_int_eq(e->len, (int32_t)len);
    ck_assert_int_eq(e->n_source, (int32_t)(ns < len ? ns : len));
    for (size_t p = 0; p < len; p++) {
        int32_t want = p < ns ? (p == 0 ? ql_tokenizer_bos(t) : s.ids[p - 1])
                              : (p - ns < g.n ? g.ids[p - ns] : ql_tokenizer_eos(t));
        ck_assert_msg(e->ids[p] == want, "ids[%zu] = %d, expected %d", p, e->ids[p], want);
        int32_t label = p < ns && !train_on_source ? QL_IGNORE_INDEX : want;
        ck_assert_msg(e->labels[p] == label, "labels[%zu] = %d, expected %d", p, e->labels[p], label);
    }
    free(s.ids);
    free(g.ids);
}

/* A `text` example: BOS + text, cut to max_len, every label the id. */
static void expect_text(const ql_tokenizer *t, const ql_example *e, const char *text, int max_len)
{
    toks g = enc(t, text);
    size_t len = 1 + g.n;
    if (max_len > 0 && len > (size_t)max_len) len = (size_t)max_len;
    ck_assert_int_eq(e->len, (int32_t)len);
    ck_assert_int_eq(e->n_source, 0);
    for (size_t p = 0; p < len; p++) {
        int32_t want = p == 0 ? ql_tokenizer_bos(t) : g.ids[p - 1];
        ck_assert_msg(e->ids[p] == want && e->labels[p] == want, "position %zu: id %d label %d, expected %d", p, e->ids[p],
                      e->labels[p], want);
    }
    free(g.ids);
}

static void format_ok(ql_data_format fmt, const char *record, const char *want_src, const char *want_tgt)
{
    char *s = NULL, *g = NULL;
    int rc = ql_dataset_format_example(fmt, record, &s, &g);
    ck_assert_msg(rc == QL_OK, "formatting %s: %s", record, ql_error_message());
    ck_assert_str_eq(s, want_src);
    ck_assert_str_eq(g, want_tgt);
    free(s);
    free(g);
}

static void format_fails(ql_data_format fmt, const char *record, int code, const char *needle)
{
    char *s = (char *)1, *g = (char *)1;
    int rc = ql_dataset_format_example(fmt, record, &s, &g);
    ck_assert_msg(rc == code, "formatting %s: expected %s, got %s (%s)", record, ql_status_name(code), ql_status_name(rc),
                  ql_error_message());
    ck_assert_ptr_null(s);
    ck_assert_ptr_null(g);
    ck_assert_contains(ql_error_message(), needle);
}

#define ALPACA_IN                                                                                                      \
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "    \
    "response that appropriately completes the request.\n\n### Instruction:\n"
#define ALPACA_NO_IN                                                                                                   \
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"  \
    "### Instruction:\n"

/* ---- format names and prompt strings ---- */

START_TEST(test_format_names)
{
    static const struct {
        const char *name;
        ql_data_format fmt;
    } ok[] = {{"alpaca", QL_FMT_ALPACA}, {"input-output", QL_FMT_INPUT_OUTPUT}, {"self-instruct", QL_FMT_INPUT_OUTPUT},
              {"oasst1", QL_FMT_OASST1}, {"text", QL_FMT_TEXT}};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        ql_data_format f = (ql_data_format)-1;
        ck_assert_int_eq(ql_data_format_parse(ok[i].name, &f), QL_OK);
        ck_assert_int_eq(f, ok[i].fmt);
    }
    ck_assert_str_eq(ql_data_format_name(QL_FMT_INPUT_OUTPUT), "input-output");
    ck_assert_str_eq(ql_data_format_name(QL_FMT_TEXT), "text");
    ql_data_format f;
    ck_assert_int_eq(ql_data_format_parse("chip2", &f), QL_EINVAL);
    ck_assert_str_eq(ql_error_message(), "unknown dataset format 'chip2' (valid: alpaca, input-output, oasst1, text; "
                                         "self-instruct is read as input-output)");
}
END_TEST

START_TEST(test_alpaca_prompts)
{
    format_ok(QL_FMT_ALPACA, "{\"instruction\": \"Add the numbers.\", \"input\": \"2 and 3\", \"output\": \"5\"}",
              ALPACA_IN "Add the numbers.\n\n### Input:\n2 and 3\n\n### Response: ", "5");
    format_ok(QL_FMT_ALPACA, "{\"instruction\": \"Say hi.\", \"input\": \"\", \"output\": \"Hi!\"}",
              ALPACA_NO_IN "Say hi.\n\n### Response: ", "Hi!");
    /* "input" may be left out (qlora.py: example.get("input", "")). */
    format_ok(QL_FMT_ALPACA, "{\"instruction\": \"Say hi.\", \"output\": \"\"}", ALPACA_NO_IN "Say hi.\n\n### Response: ", "");
}
END_TEST

START_TEST(test_other_prompts)
{
    format_ok(QL_FMT_INPUT_OUTPUT, "{\"input\": \"Q: 1+1?\", \"output\": \"2\", \"extra\": 7}", "Q: 1+1?", "2");
    format_ok(QL_FMT_INPUT_OUTPUT,
              "{\"id\": \"t0\", \"instruction\": \"Fix the grammar.\", \"instances\": [{\"input\": \"he go\", \"output\": \"He goes.\"}]}",
              "Fix the grammar.\nhe go", "He goes.");
    format_ok(QL_FMT_INPUT_OUTPUT, "{\"instruction\": \"Tell a joke.\", \"instances\": [{\"input\": \"\", \"output\": \"No.\"}]}",
              "Tell a joke.", "No.");
    format_ok(QL_FMT_OASST1, "{\"input\": \"### Human: Hi ### Assistant:\", \"output\": \"Hello!\", \"text\": \"x\", \"rank\": 0}",
              "### Human: Hi ### Assistant:", "Hello!");
    format_ok(QL_FMT_OASST1, "{\"text\": \"### Human: Hi ### Assistant: Hello!\"}", "", "### Human: Hi ### Assistant: Hello!");
    format_ok(QL_FMT_TEXT, "  Once upon a time. \r\nThe end.\r", "", "  Once upon a time. \nThe end.");
    /* qlora.py's self-instruct columns: prompt -> input, completion -> output */
    format_ok(QL_FMT_INPUT_OUTPUT, "{\"prompt\": \"Write a haiku.\\n\", \"completion\": \"Autumn moon.\"}",
              "Write a haiku.\n", "Autumn moon.");
    /* input/output win over prompt/completion, as they are what qlora.py reads */
    format_ok(QL_FMT_INPUT_OUTPUT, "{\"input\": \"I\", \"output\": \"O\", \"prompt\": \"P\", \"completion\": \"C\"}", "I", "O");
}
END_TEST

START_TEST(test_format_errors)
{
    format_fails(QL_FMT_ALPACA, "{\"instruction\": \"x\"", QL_EFORMAT, "record is not valid JSON");
    format_fails(QL_FMT_ALPACA, "{\"input\": \"x\", \"output\": \"y\"}", QL_EFORMAT, "record: missing field \"instruction\"");
    format_fails(QL_FMT_ALPACA, "{\"instruction\": \"x\", \"input\": null, \"output\": \"y\"}", QL_EFORMAT,
                 "record: field \"input\" is null, not a string");
    format_fails(QL_FMT_OASST1, "[1, 2]", QL_EFORMAT, "record: expected a JSON object, found an array");
    format_fails(QL_FMT_INPUT_OUTPUT,
                 "{\"instruction\": \"x\", \"instances\": [{\"input\": \"\", \"output\": \"a\"}, {\"input\": \"\", \"output\": \"b\"}]}",
                 QL_EINVAL, "record yields 2 examples");
    format_fails(QL_FMT_INPUT_OUTPUT, "{\"prompt\": \"x\"}", QL_EFORMAT, "record: missing field \"completion\"");
    format_fails(QL_FMT_INPUT_OUTPUT, "{\"completion\": \"x\"}", QL_EFORMAT, "record: missing field \"prompt\"");
    format_fails(QL_FMT_INPUT_OUTPUT, "{\"prompt\": 3, \"completion\": \"x\"}", QL_EFORMAT,
                 "record: field \"prompt\" is a number, not a string");
}
END_TEST

/* --format when not given: what the file holds */
static void detects(const char *name, const char *text, ql_data_format want, const char *want_why)
{
    char *path = write_tmp(name, text), why[256] = "";
    ql_data_format got = (ql_data_format)-1;
    int rc = ql_data_format_detect(path, &got, why, sizeof why);
    ck_assert_msg(rc == QL_OK, "%s: %s", name, ql_error_message());
    ck_assert_msg(got == want, "%s: detected %s, not %s", name, ql_data_format_name(got), ql_data_format_name(want));
    ck_assert_str_eq(why, want_why);
    free(path);
}

static void undetected(const char *name, const char *text, const char *needle)
{
    char *path = write_tmp(name, text);
    ql_data_format got;
    int rc = ql_data_format_detect(path, &got, NULL, 0);
    ck_assert_msg(rc == QL_EFORMAT, "%s: %s (%s)", name, ql_status_name(rc), ql_error_message());
    ck_assert_contains(ql_error_message(), path);
    ck_assert_contains(ql_error_message(), needle);
    free(path);
}

START_TEST(test_detect_format)
{
    detects("a.json", "\xEF\xBB\xBF [ {\"instruction\": \"i\", \"input\": \"\", \"output\": \"o\"} ]", QL_FMT_ALPACA,
            "a JSON array whose first record has \"instruction\" and \"output\"");
    detects("a.jsonl", "{\"instruction\": \"i\", \"output\": \"o\"}\n", QL_FMT_ALPACA,
            "JSON Lines whose first record has \"instruction\" and \"output\"");
    detects("io.jsonl", "\n{\"input\": \"i\", \"output\": \"o\", \"text\": \"t\"}\n{\"input\": 1", QL_FMT_INPUT_OUTPUT,
            "JSON Lines whose first record has \"input\" and \"output\"");
    detects("pc.json", "[{\"prompt\": \"p\", \"completion\": \"c\"}]", QL_FMT_INPUT_OUTPUT,
            "a JSON array whose first record has \"prompt\" and \"completion\"");
    detects("si.jsonl", "{\"id\": \"x\", \"instruction\": \"i\", \"instances\": []}\n", QL_FMT_INPUT_OUTPUT,
            "JSON Lines whose first record has \"instruction\" and \"instances\"");
    detects("guanaco.jsonl", "{\"text\": \"### Human: Hi ### Assistant: Hello.\"}\n", QL_FMT_OASST1,
            "JSON Lines whose first record has \"text\"");
    detects("story.txt", "Once upon a time.\n\n{not json}\n", QL_FMT_TEXT, "plain text (not JSON)");
    detects("brace.txt", "  \n(a story) [1]\n", QL_FMT_TEXT, "plain text (not JSON)");

    undetected("other.json", "[{\"question\": \"q\", \"answer\": \"a\"}]",
               "cannot tell the format: record index 0 has \"question\", \"answer\", none of instruction/output (alpaca)");
    undetected("other.jsonl", "{\"q\": 1}\n", "cannot tell the format: the first JSON line has \"q\"");
    undetected("nums.json", "[1, 2]", "record index 0 has a number, not an object");
    undetected("obj.json", "[]", "expected a JSON array of records, found an empty array");
    undetected("bad.json", "[{\"instruction\": ", "starts with '[' but is not valid JSON");
    undetected("bad.jsonl", "{\"input\": \"x\"\n", "starts with '{' but its first line is not a JSON record");
    undetected("empty.txt", " \n\n", "is empty: no format to detect");
    remove_tmp();
}
END_TEST

/* --eval-dataset-size: the held-out examples, and the rest, in file order */
START_TEST(test_split)
{
    ql_tokenizer *t = load_tokenizer();
    char text[4096] = "";
    for (int i = 0; i < 10; i++)
        snprintf(text + strlen(text), sizeof text - strlen(text), "{\"input\": \"q%d\", \"output\": \"%.*s\"}\n", i, i + 1,
                 "aaaaaaaaaaaa");
    char *path = write_tmp("split.jsonl", text);
    ql_dataset_opts o = opts_of(QL_FMT_INPUT_OUTPUT, 1024, 256, 0);
    ql_dataset *d = load_ok(path, t, &o), *train, *eval;
    size_t order[10];
    ck_assert_int_eq(ql_dataset_order(d, 42, 0, 1, order), QL_OK);
    ck_assert_int_eq(ql_dataset_split(d, 3, 42, &train, &eval), QL_OK);
    ck_assert_uint_eq(eval->n, 3);
    ck_assert_uint_eq(train->n, 7);
    /* eval: the first 3 of the seed's order, sorted; train: the others */
    int held[10] = {0};
    for (int k = 0; k < 3; k++) held[order[k]] = 1;
    size_t e = 0, r = 0;
    int64_t tokens = 0;
    for (size_t i = 0; i < 10; i++) {
        const ql_example *want = &d->examples[i];
        const ql_example *got = held[i] ? &eval->examples[e++] : &train->examples[r++];
        ck_assert_ptr_eq(got->ids, want->ids);
        ck_assert_int_eq(got->len, want->len);
        if (held[i]) tokens += want->len;
    }
    ck_assert_int_eq(eval->total_tokens, tokens);
    ck_assert_int_eq(eval->total_tokens + train->total_tokens, d->total_tokens);
    ck_assert_int_eq(eval->total_target_tokens + train->total_target_tokens, d->total_target_tokens);
    ql_dataset_destroy(eval);
    ql_dataset_destroy(train);
    /* at least one on each side */
    ck_assert_int_eq(ql_dataset_split(d, 10, 42, &train, &eval), QL_EINVAL);
    ck_assert_str_eq(ql_error_message(), "holding out 10 of 10 examples leaves nothing to train on");
    ck_assert_ptr_null(train);
    ck_assert_int_eq(ql_dataset_split(d, 0, 42, &train, &eval), QL_EINVAL);
    ql_dataset_destroy(d);
    free(path);
    ql_tokenizer_destroy(t);
    remove_tmp();
}
END_TEST

/* ---- tokenization ---- */

static const char alpaca_small[] =
    "[\n"
    "  {\"instruction\": \"Add the numbers.\", \"input\": \"2 and 3\", \"output\": \"The sum is 5.\"},\n"
    "  {\"instruction\": \"Name a colour.\", \"input\": \"\", \"output\": \"Blue is a colour that many people like.\"}\n"
    "]\n";
#define SRC0 ALPACA_IN "Add the numbers.\n\n### Input:\n2 and 3\n\n### Response: "
#define TGT0 "The sum is 5."
#define SRC1 ALPACA_NO_IN "Name a colour.\n\n### Response: "
#define TGT1 "Blue is a colour that many people like."

START_TEST(test_alpaca_tokens)
{
    ql_tokenizer *t = load_tokenizer();
    char *path = write_tmp("small.json", alpaca_small);
    ql_dataset_opts o = opts_of(QL_FMT_ALPACA, 1024, 256, 0);
    ql_dataset *d = load_ok(path, t, &o);
    ck_assert_uint_eq(d->n, 2);
    ck_assert_uint_eq(d->n_read, 2);
    ck_assert_uint_eq(d->n_truncated, 0);
    ck_assert_uint_eq(d->n_dropped_empty, 0);
    expect_example(t, &d->examples[0], SRC0, TGT0, 0, 0, 0, 0);
    expect_example(t, &d->examples[1], SRC1, TGT1, 0, 0, 0, 0);
    /* BOS first, EOS last, source masked */
    ck_assert_int_eq(d->examples[0].ids[0], ql_tokenizer_bos(t));
    ck_assert_int_eq(d->examples[0].labels[0], QL_IGNORE_INDEX);
    ck_assert_int_eq(d->examples[0].ids[d->examples[0].len - 1], ql_tokenizer_eos(t));
    int64_t total = 0, target = 0;
    for (size_t i = 0; i < d->n; i++) {
        total += d->examples[i].len;
        target += d->examples[i].len - d->examples[i].n_source;
    }
    ck_assert_int_eq(d->total_tokens, total);
    ck_assert_int_eq(d->total_target_tokens, target);
    ql_dataset_destroy(d);

    o.train_on_source = 1;
    d = load_ok(path, t, &o);
    expect_example(t, &d->examples[0], SRC0, TGT0, 0, 0, 0, 1);
    ck_assert_int_eq(d->examples[0].labels[0], ql_tokenizer_bos(t));
    ck_assert_int_eq(d->total_target_tokens, total - 2); /* every position but the first of each */
    ql_dataset_destroy(d);
    ql_tokenizer_destroy(t);
    free(path);
    remove_tmp();
}
END_TEST

START_TEST(test_truncation)
{
    ql_tokenizer *t = load_tokenizer();
    char *path = write_tmp("small.json", alpaca_small);
    toks g1 = enc(t, TGT1);
    ck_assert_uint_gt(g1.n, 4); /* the cuts below must bite */

    /* each part cut separately, keeping its beginning: EOS is lost */
    ql_dataset_opts o = opts_of(QL_FMT_ALPACA, 5, 3, 0);
    ql_dataset *d = load_ok(path, t, &o);
    ck_assert_uint_eq(d->n, 2);
    ck_assert_uint_eq(d->n_truncated, 2);
    for (size_t i = 0; i < 2; i++) {
        ck_assert_int_eq(d->examples[i].len, 8);
        ck_assert_int_eq(d->examples[i].n_source, 5);
        ck_assert_int_ne(d->examples[i].ids[7], ql_tokenizer_eos(t));
    }
    expect_example(t, &d->examples[1], SRC1, TGT1, 5, 3, 0, 0);
    ck_assert_int_eq(d->total_tokens, 16);
    ck_assert_int_eq(d->total_target_tokens, 6);
    ql_dataset_destroy(d);

    /* the overall cap cuts the end of example 1's target and leaves example
     * 0, whose source is longer, no target: dropped and counted */
    toks s0 = enc(t, SRC0), s1 = enc(t, SRC1);
    int src_len = 1 + (int)s1.n, max_len = src_len + 2;
    ck_assert_uint_gt(s0.n + 1, (size_t)max_len);
    o = opts_of(QL_FMT_ALPACA, 1024, 256, max_len);
    d = load_ok(path, t, &o);
    ck_assert_uint_eq(d->n_read, 2);
    ck_assert_uint_eq(d->n, 1);
    ck_assert_uint_eq(d->n_dropped_empty, 1);
    ck_assert_uint_eq(d->n_truncated, 1);
    ck_assert_int_eq(d->examples[0].len, max_len);
    ck_assert_int_eq(d->examples[0].n_source, src_len);
    expect_example(t, &d->examples[0], SRC1, TGT1, 1024, 256, max_len, 0);
    ck_assert_int_eq(d->total_target_tokens, 2);
    ql_dataset_destroy(d);

    o.max_len = 4;
    load_fails(path, t, &o, QL_EINVAL, "no examples left after filtering: 2 read, 2 dropped", "small.json");

    free(g1.ids);
    free(s1.ids);
    free(s0.ids);
    ql_tokenizer_destroy(t);
    free(path);
    remove_tmp();
}
END_TEST

START_TEST(test_jsonl_formats)
{
    ql_tokenizer *t = load_tokenizer();
    char *io = write_tmp("io.jsonl", "{\"input\": \"Question one\", \"output\": \"Answer one\"}\n"
                                     "\n"
                                     "{\"instruction\": \"Fix it.\", \"instances\": [{\"input\": \"he go\", \"output\": \"He goes.\"},"
                                     " {\"input\": \"\", \"output\": \"Nothing to fix.\"}]}\n");
    ql_dataset_opts o = opts_of(QL_FMT_INPUT_OUTPUT, 1024, 256, 0);
    ql_dataset *d = load_ok(io, t, &o);
    ck_assert_uint_eq(d->n, 3);
    expect_example(t, &d->examples[0], "Question one", "Answer one", 0, 0, 0, 0);
    expect_example(t, &d->examples[1], "Fix it.\nhe go", "He goes.", 0, 0, 0, 0);
    expect_example(t, &d->examples[2], "Fix it.", "Nothing to fix.", 0, 0, 0, 0);
    ql_dataset_destroy(d);

    /* max_examples counts flattened examples; <= 0 is all */
    o.max_examples = 2;
    d = load_ok(io, t, &o);
    ck_assert_uint_eq(d->n, 2);
    ck_assert_uint_eq(d->n_read, 2);
    ql_dataset_destroy(d);
    o.max_examples = -1;
    d = load_ok(io, t, &o);
    ck_assert_uint_eq(d->n, 3);
    ql_dataset_destroy(d);

    /* the JSON formats also read one JSON array */
    char *arr = write_tmp("io.json", "[{\"input\": \"Question one\", \"output\": \"Answer one\"}]");
    o.max_examples = 0;
    d = load_ok(arr, t, &o);
    ck_assert_uint_eq(d->n, 1);
    expect_example(t, &d->examples[0], "Question one", "Answer one", 0, 0, 0, 0);
    ql_dataset_destroy(d);

    /* oasst1: prompt/response, or a lone "text" that is all target */
    char *oa = write_tmp("oa.jsonl", "{\"input\": \"### Human: Hi ### Assistant:\", \"output\": \"Hello there.\"}\r\n"
                                     "{\"text\": \"### Human: Hi ### Assistant: Hello.\"}");
    o = opts_of(QL_FMT_OASST1, 1024, 256, 0);
    d = load_ok(oa, t, &o);
    ck_assert_uint_eq(d->n, 2);
    expect_example(t, &d->examples[0], "### Human: Hi ### Assistant:", "Hello there.", 0, 0, 0, 0);
    expect_example(t, &d->examples[1], "", "### Human: Hi ### Assistant: Hello.", 0, 0, 0, 0);
    ck_assert_int_eq(d->examples[1].n_source, 1);
    ck_assert_int_eq(d->examples[1].labels[0], QL_IGNORE_INDEX);
    ck_assert_int_eq(d->examples[1].labels[1], d->examples[1].ids[1]);
    ql_dataset_destroy(d);

    free(io);
    free(arr);
    free(oa);
    ql_tokenizer_destroy(t);
    remove_tmp();
}
END_TEST

START_TEST(test_text_format)
{
    ql_tokenizer *t = load_tokenizer();
    char *path = write_tmp("stories.txt", "\n\nOnce upon a time there was a cat.\nIt was happy.\n"
                                          "\n\n \t\n"
                                          "The dog ran.\r\n\r\n"
                                          "  A bird sang a long song in the tall green tree.  ");
    ql_dataset_opts o = opts_of(QL_FMT_TEXT, 0, 0, 0);
    ql_dataset *d = load_ok(path, t, &o);
    ck_assert_uint_eq(d->n, 3);
    expect_text(t, &d->examples[0], "Once upon a time there was a cat.\nIt was happy.", 0);
    expect_text(t, &d->examples[1], "The dog ran.", 0);
    expect_text(t, &d->examples[2], "  A bird sang a long song in the tall green tree.  ", 0);
    ck_assert_uint_eq(d->n_truncated, 0);
    int64_t predicted = 0;
    for (size_t i = 0; i < d->n; i++) predicted += d->examples[i].len - 1;
    ck_assert_int_eq(d->total_target_tokens, predicted);
    ql_dataset_destroy(d);

    o.max_len = 6;
    d = load_ok(path, t, &o);
    ck_assert_uint_eq(d->n, 3);
    for (size_t i = 0; i < 3; i++) ck_assert_int_le(d->examples[i].len, 6);
    expect_text(t, &d->examples[2], "  A bird sang a long song in the tall green tree.  ", 6);
    ck_assert_uint_eq(d->n_truncated, 3);
    ql_dataset_destroy(d);

    /* BOS alone predicts nothing */
    o.max_len = 1;
    load_fails(path, t, &o, QL_EINVAL, "no examples left after filtering: 3 read, 3 dropped", "(raise max_len)");
    ql_tokenizer_destroy(t);
    free(path);
    remove_tmp();
}
END_TEST

/* ---- the bundled data files ---- */

/* Expected totals were measured with Hugging Face `tokenizers` 0.23.3 on
 * stories260K's tokenizer.json, tokenizing as qlora.py does:
 * encode("<s>" + source)[:source_max_len] + encode(target + "</s>")[:target_max_len],
 * then [:max_len]; target = len - n_source. */
typedef struct bundled {
    int src_max, tgt_max, max_len;
    size_t n, truncated;
    int64_t tokens, target;
} bundled;

static void check_bundled(const ql_tokenizer *t, const char *rel, ql_data_format fmt, const bundled *want)
{
    char *path = shared_path(rel);
    ql_dataset_opts o = opts_of(fmt, want->src_max, want->tgt_max, want->max_len);
    ql_dataset *d = load_ok(path, t, &o);
    free(path);
    ck_assert_uint_eq(d->n, want->n);
    ck_assert_uint_eq(d->n_read, want->n);
    ck_assert_uint_eq(d->n_dropped_empty, 0);
    ck_assert_uint_eq(d->n_truncated, want->truncated);
    ck_assert_int_eq(d->total_tokens, want->tokens);
    ck_assert_int_eq(d->total_target_tokens, want->target);
    for (size_t i = 0; i < d->n; i++) {
        const ql_example *e = &d->examples[i];
        ck_assert_int_eq(e->ids[0], ql_tokenizer_bos(t));
        ck_assert_int_gt(e->len, e->n_source);
        if (want->max_len > 0) ck_assert_int_le(e->len, want->max_len);
        if (fmt == QL_FMT_TEXT) ck_assert_int_eq(e->n_source, 0);
        else if (want->src_max > 0) ck_assert_int_le(e->n_source, want->src_max);
    }
    ql_dataset_destroy(d);
}

START_TEST(test_bundled_alpaca)
{
    ql_tokenizer *t = load_tokenizer();
    const char *f = "data/alpaca/alpaca_en_demo.json";
    check_bundled(t, f, QL_FMT_ALPACA, &(bundled){1024, 256, 0, 999, 529, 339782, 175196});
    check_bundled(t, f, QL_FMT_ALPACA, &(bundled){64, 32, 80, 999, 999, 79766, 15830});
    /* record 0's prompt, straight from the file */
    format_ok(QL_FMT_ALPACA, "{\"instruction\": \"Describe a process of making crepes.\", \"input\": \"\", \"output\": \"x\"}",
              ALPACA_NO_IN "Describe a process of making crepes.\n\n### Response: ", "x");
    ql_tokenizer_destroy(t);
}
END_TEST

START_TEST(test_bundled_oasst1)
{
    ql_tokenizer *t = load_tokenizer();
    const char *f = "data/oasst1/oasst1_validation.jsonl";
    check_bundled(t, f, QL_FMT_OASST1, &(bundled){1024, 256, 0, 953, 707, 555066, 208477});
    check_bundled(t, f, QL_FMT_OASST1, &(bundled){64, 32, 80, 953, 951, 75816, 16936});
    ql_tokenizer_destroy(t);
}
END_TEST

START_TEST(test_bundled_self_instruct)
{
    ql_tokenizer *t = load_tokenizer();
    /* 252 records of one instance each */
    const char *f = "data/self-instruct/user_oriented_instructions.jsonl";
    check_bundled(t, f, QL_FMT_INPUT_OUTPUT, &(bundled){1024, 256, 0, 252, 55, 70167, 31910});
    check_bundled(t, f, QL_FMT_INPUT_OUTPUT, &(bundled){64, 32, 80, 252, 236, 19408, 4697});
    ql_tokenizer_destroy(t);
}
END_TEST

START_TEST(test_bundled_tinystories)
{
    ql_tokenizer *t = load_tokenizer();
    /* 4,300 runs of text between empty lines, and two lines holding only a
     * space split two of them (blank = whitespace only); the longest story
     * has 469 tokens with BOS. */
    const char *f = "data/tinystories/validation.txt";
    check_bundled(t, f, QL_FMT_TEXT, &(bundled){0, 0, 512, 4302, 0, 385888, 381586});
    check_bundled(t, f, QL_FMT_TEXT, &(bundled){0, 0, 64, 4302, 3176, 252896, 248594});

    /* shared/README.md: the first 2000 stories, each <s> + story cut at 512
     * tokens, give 178,402 predicted tokens */
    char *path = shared_path(f);
    ql_dataset_opts o = opts_of(QL_FMT_TEXT, 0, 0, 512);
    o.max_examples = 2000;
    ql_dataset *d = load_ok(path, t, &o);
    ck_assert_uint_eq(d->n, 2000);
    ck_assert_int_eq(d->total_target_tokens, 178402);
    ck_assert_int_eq(d->total_tokens, 178402 + 2000);
    ql_dataset_destroy(d);
    free(path);
    ql_tokenizer_destroy(t);
}
END_TEST

/* ---- bad input ---- */

START_TEST(test_bad_files)
{
    ql_tokenizer *t = load_tokenizer();
    ql_dataset_opts o = opts_of(QL_FMT_ALPACA, 1024, 256, 0);
    char *p;

    load_fails("/nonexistent/data.json", t, &o, QL_ENOTFOUND, "reading the dataset: cannot open /nonexistent/data.json",
               "No such file");

    p = write_tmp("x.json", "[]");
    *strrchr(p, '/') = '\0';
    load_fails(p, t, &o, QL_EINVAL, "is a folder", NULL);
    free(p);

    p = write_tmp("broken.json", "[\n  {\"instruction\": \"a\",\n   \"output\": }\n]\n");
    load_fails(p, t, &o, QL_EFORMAT, "broken.json: not valid JSON:", "(line 3, column ");
    free(p);

    p = write_tmp("broken.jsonl", "{\"input\": \"a\", \"output\": \"b\"}\n{\"input\": \"a\", \"output\": \"b\"}\n{\"input\": \"a\"\n");
    o.format = QL_FMT_INPUT_OUTPUT;
    load_fails(p, t, &o, QL_EFORMAT, "broken.jsonl: line 3: not valid JSON:", "(column ");
    free(p);

    o.format = QL_FMT_ALPACA;
    p = write_tmp("pretty.json", "{\n  \"instruction\": \"a\",\n  \"output\": \"b\"\n}\n");
    load_fails(p, t, &o, QL_EFORMAT, "pretty.json: line 1: not valid JSON:", "read as JSON Lines (one record per line)");
    free(p);

    p = write_tmp("missing.json", "[{\"instruction\": \"a\", \"output\": \"b\"}, {\"instruction\": \"a\", \"input\": \"\"}]");
    load_fails(p, t, &o, QL_EFORMAT, "missing.json: record index 1: missing field \"output\"", NULL);
    free(p);

    p = write_tmp("number.json", "[{\"instruction\": \"a\", \"input\": 5, \"output\": \"b\"}]");
    load_fails(p, t, &o, QL_EFORMAT, "number.json: record index 0: field \"input\" is a number, not a string", NULL);
    free(p);

    p = write_tmp("notobj.json", "[{\"instruction\": \"a\", \"output\": \"b\"}, \"oops\"]");
    load_fails(p, t, &o, QL_EFORMAT, "notobj.json: record index 1: expected a JSON object, found a string", NULL);
    free(p);

    o.format = QL_FMT_OASST1;
    p = write_tmp("oa.jsonl", "{\"input\": \"a\", \"output\": \"b\"}\n\n{\"input\": \"a\", \"output\": [\"b\"]}\n");
    load_fails(p, t, &o, QL_EFORMAT, "oa.jsonl: line 3: field \"output\" is an array, not a string", NULL);
    free(p);

    p = write_tmp("oa2.jsonl", "{\"prompt\": \"a\", \"output\": \"b\"}\n");
    load_fails(p, t, &o, QL_EFORMAT, "oa2.jsonl: line 1: missing field \"input\"", NULL);
    free(p);

    o.format = QL_FMT_INPUT_OUTPUT;
    p = write_tmp("si.jsonl", "{\"instruction\": \"a\", \"instances\": [{\"input\": \"\", \"output\": \"b\"}, {\"input\": \"\"}]}\n");
    load_fails(p, t, &o, QL_EFORMAT, "si.jsonl: line 1: instances[1]: missing field \"output\"", NULL);
    free(p);

    p = write_tmp("si2.jsonl", "{\"instruction\": \"a\", \"instances\": {\"input\": \"\", \"output\": \"b\"}}\n");
    load_fails(p, t, &o, QL_EFORMAT, "si2.jsonl: line 1: field \"instances\" is an object, not an array", NULL);
    free(p);

    p = write_tmp("empty.jsonl", "\n  \n");
    load_fails(p, t, &o, QL_EFORMAT, "empty.jsonl: no examples left after filtering: 0 read, 0 dropped", "(the file holds no records)");
    free(p);

    o.format = QL_FMT_TEXT;
    p = write_tmp("empty.txt", "");
    load_fails(p, t, &o, QL_EFORMAT, "empty.txt: no examples left after filtering: 0 read, 0 dropped", "(the file holds no text)");
    free(p);

    o.format = (ql_data_format)42;
    p = write_tmp("x.txt", "hello");
    load_fails(p, t, &o, QL_EINVAL, "unknown dataset format id 42", NULL);
    free(p);

    ql_tokenizer_destroy(t);
    remove_tmp();
}
END_TEST

/* ---- epoch order ---- */

static ql_dataset fake_dataset(ql_example *ex, const int32_t *lens, size_t n)
{
    for (size_t i = 0; i < n; i++) ex[i] = (ql_example){.len = lens[i]};
    return (ql_dataset){.examples = ex, .n = n};
}

START_TEST(test_order_shuffle)
{
    enum { N = 10 };
    ql_example ex[N];
    int32_t lens[N] = {0};
    ql_dataset d = fake_dataset(ex, lens, N);
    size_t order[N], again[N];

    ck_assert_int_eq(ql_dataset_order(&d, -1, 0, 0, order), QL_OK);
    for (size_t i = 0; i < N; i++) ck_assert_uint_eq(order[i], i);

    /* splitmix64(seed) driving Fisher-Yates, checked against a Python
     * rendering of the same rule */
    static const size_t seed0[N] = {6, 3, 2, 9, 8, 1, 4, 7, 0, 5};
    static const size_t seed1234[N] = {0, 1, 8, 6, 4, 3, 7, 2, 9, 5};
    ck_assert_int_eq(ql_dataset_order(&d, 0, 0, 0, order), QL_OK);
    for (size_t i = 0; i < N; i++) ck_assert_msg(order[i] == seed0[i], "seed 0: order[%zu] = %zu, expected %zu", i, order[i], seed0[i]);
    ck_assert_int_eq(ql_dataset_order(&d, 1234, 0, 0, again), QL_OK);
    for (size_t i = 0; i < N; i++)
        ck_assert_msg(again[i] == seed1234[i], "seed 1234: order[%zu] = %zu, expected %zu", i, again[i], seed1234[i]);
}
END_TEST

START_TEST(test_order_group_by_length)
{
    enum { N = 23 };
    ql_example ex[N];
    int32_t lens[N];
    for (size_t i = 0; i < N; i++) lens[i] = (int32_t)((i * 7) % 11) + 1; /* ties on purpose */
    ql_dataset d = fake_dataset(ex, lens, N);
    size_t order[N], base[N];

    /* batch 2: mult = min(23 / 8, 50) = 2, mega-batches of 4 */
    ck_assert_int_eq(ql_dataset_order(&d, 7, 0, 2, base), QL_OK);
    ck_assert_int_eq(ql_dataset_order(&d, 7, 1, 2, order), QL_OK);
    /* expected from HF's get_length_grouped_indices applied to `base` */
    static const size_t want[N] = {14, 10, 13, 16, 15, 18, 2, 8, 20, 9, 4, 11, 17, 12, 7, 5, 3, 6, 19, 22, 1, 21, 0};
    for (size_t i = 0; i < N; i++) ck_assert_msg(order[i] == want[i], "order[%zu] = %zu, expected %zu", i, order[i], want[i]);
    int seen[N] = {0};
    for (size_t i = 0; i < N; i++) seen[order[i]]++;
    for (size_t i = 0; i < N; i++) ck_assert_int_eq(seen[i], 1);
    for (size_t i = 1; i < N; i++) ck_assert_int_le(lens[order[i]], lens[order[0]]);

    /* file order then grouping: one mega-batch, a stable sort by length */
    static const size_t file_order[N] = {3, 14, 6, 17, 9, 20, 1, 12, 4, 15, 7, 18, 10, 21, 2, 13, 5, 16, 8, 19, 0, 11, 22};
    ck_assert_int_eq(ql_dataset_order(&d, -1, 1, 100, order), QL_OK);
    for (size_t i = 0; i < N; i++) ck_assert_msg(order[i] == file_order[i], "order[%zu] = %zu, expected %zu", i, order[i], file_order[i]);
    /* a batch size is required */
    ck_assert_int_eq(ql_dataset_order(&d, 7, 1, 0, order), QL_EINVAL);
    ck_assert_str_eq(ql_error_message(), "group_by_length needs a batch size >= 1 (got 0)");
}
END_TEST

/* ---- input readers (issue 6) ---- */

/* A FIFO as --data (or --eval-data, which loads the same way) is refused at
 * once instead of waiting for a writer forever. */
START_TEST(test_fifo_is_refused)
{
    ql_tokenizer *t = load_tokenizer();
    ql_dataset_opts o = opts_of(QL_FMT_ALPACA, 1024, 256, 0);
    char *p = write_tmp("placeholder", "");
    unlink(p);
    ck_assert_int_eq(mkfifo(p, 0600), 0);
    load_fails(p, t, &o, QL_EINVAL, p, "is not a regular file");
    o.format = QL_FMT_TEXT;
    load_fails("/dev/null", t, &o, QL_EINVAL, "/dev/null is not a regular file", NULL);
    unlink(p);
    free(p);
    ql_tokenizer_destroy(t);
    remove_tmp();
}
END_TEST

static void free_fields(char **f, int n)
{
    for (int i = 0; i < n; i++) {
        free(f[i]);
        f[i] = NULL;
    }
}

/* The prompt byte for byte as hendrycks' evaluate.py (format_subject puts a
 * space before each word of the subject, so "about  abstract algebra." has two)
 * and qlora.py's five-shot MMLU files write it. */
START_TEST(test_mmlu_prompt_bytes)
{
    ql_mmlu_question dev[2] = {{{"Find 1+1.", "0", "1", "2", "3", "2"}}, {{"Pick, \"one\".", "w", "x", "y", "z", "0"}}};
    ql_mmlu_question q = {{"Which?", "p", "q", "r", "s", "3"}};
    char *p = ql_mmlu_prompt("abstract_algebra", dev, 2, &q);
    ck_assert_ptr_nonnull(p);
    ck_assert_str_eq(p, "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
                        "Find 1+1.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: C\n\n"
                        "Pick, \"one\".\nA. w\nB. x\nC. y\nD. z\nAnswer: A\n\n"
                        "Which?\nA. p\nB. q\nC. r\nD. s\nAnswer:");
    free(p);
    p = ql_mmlu_prompt("us_foreign_policy", dev, 0, &q);
    ck_assert_str_eq(p, "The following are multiple choice questions (with answers) about  us foreign policy.\n\n"
                        "Which?\nA. p\nB. q\nC. r\nD. s\nAnswer:");
    free(p);
    p = ql_mmlu_prompt("x", dev, 1, &q);
    ck_assert_str_eq(p, "The following are multiple choice questions (with answers) about  x.\n\n"
                        "Find 1+1.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: C\n\nWhich?\nA. p\nB. q\nC. r\nD. s\nAnswer:");
    free(p);
}
END_TEST

/* MMLU's CSV records: a failed record leaves no field behind (the caller's
 * cleanup must not free them twice), extra fields are counted, NUL bytes are
 * an error rather than a silent cut. */
START_TEST(test_csv_records)
{
    char *f[6] = {0};
    size_t pos = 0;
    const char *unterminated = "a,\"";
    ck_assert_int_eq(ql_csv_record(unterminated, strlen(unterminated), &pos, f, 6), QL_CSV_UNTERMINATED);
    for (int i = 0; i < 6; i++) ck_assert_ptr_null(f[i]);
    free_fields(f, 6); /* what read_csv does after any record: harmless now */

    const char *eight = "q,a,b,c,d,1,extra,more\nnext,row\n";
    pos = 0;
    ck_assert_int_eq(ql_csv_record(eight, strlen(eight), &pos, f, 6), 8);
    ck_assert_str_eq(f[5], "1");
    ck_assert_uint_eq(pos, strlen("q,a,b,c,d,1,extra,more\n"));
    free_fields(f, 6);
    ck_assert_int_eq(ql_csv_record(eight, strlen(eight), &pos, f, 6), 2);
    free_fields(f, 6);

    const char nul[] = "q,a\0b,c\n";
    pos = 0;
    ck_assert_int_eq(ql_csv_record(nul, sizeof nul - 1, &pos, f, 6), QL_CSV_NUL);
    for (int i = 0; i < 6; i++) ck_assert_ptr_null(f[i]);
    const char qnul[] = "\"q\0\",a\n";
    pos = 0;
    ck_assert_int_eq(ql_csv_record(qnul, sizeof qnul - 1, &pos, f, 6), QL_CSV_NUL);
    ck_assert_ptr_null(f[0]);

    /* a quoted field with a doubled quote, a comma and a newline */
    const char *quoted = "\"x \"\"y\"\", z\nw\",2\r\n";
    pos = 0;
    ck_assert_int_eq(ql_csv_record(quoted, strlen(quoted), &pos, f, 6), 2);
    ck_assert_str_eq(f[0], "x \"y\", z\nw");
    ck_assert_str_eq(f[1], "2");
    ck_assert_uint_eq(pos, strlen(quoted));
    free_fields(f, 6);
}
END_TEST

/* MMLU with the attention cache of the shared prompt prefix (the subject's
 * header and dev questions) kept from one question to the next gives the
 * answers of scoring each prompt from scratch, in far fewer tokens; the
 * table comes before the JSON line, which stays last. */
static char *mmlu_run_lora(ql_llama *m, const ql_lora *l, const ql_tokenizer *t, const char *dir, int no_reuse,
                           int table, int batch, int per_subject)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    ck_assert_ptr_nonnull(f);
    ql_mmlu_opts o = {.dir = dir, .shots = 2, .max_per_subject = per_subject, .no_warnings = 1, .table = table,
                      .no_reuse = no_reuse, .batch = batch, .lora = l};
    int rc = ql_mmlu_eval(m, t, &o, f);
    fclose(f);
    ck_assert_msg(rc == QL_OK, "%s", ql_error_message());
    return buf;
}

static char *mmlu_run_batch(ql_llama *m, const ql_tokenizer *t, const char *dir, int no_reuse, int table, int batch,
                            int per_subject)
{
    return mmlu_run_lora(m, NULL, t, dir, no_reuse, table, batch, per_subject);
}

static char *mmlu_run(ql_llama *m, const ql_tokenizer *t, const char *dir, int no_reuse, int table)
{
    return mmlu_run_batch(m, t, dir, no_reuse, table, 1, 3);
}

static json_t *last_line_json(const char *text)
{
    const char *end = text + strlen(text);
    ck_assert(end > text && end[-1] == '\n');
    const char *line = end - 1;
    while (line > text && line[-1] != '\n') line--;
    json_error_t e;
    json_t *j = json_loadb(line, (size_t)(end - line), 0, &e);
    ck_assert_msg(j != NULL, "the last line is not JSON: %s", line);
    return j;
}

START_TEST(test_mmlu_prefix_reuse)
{
    char *mdir = shared_path("models/stories260K"), *dir = shared_path("data/mmlu");
    ql_llama *m = NULL;
    ql_llama_load_opts lo = {.quantizer = "none"};
    ck_assert_msg(ql_llama_load(mdir, &lo, &m) == QL_OK, "%s", ql_error_message());
    ql_tokenizer *t = load_tokenizer();
    char *fresh = mmlu_run(m, t, dir, 1, 0), *kept = mmlu_run(m, t, dir, 0, 1);
    json_t *a = last_line_json(fresh), *b = last_line_json(kept);
    ck_assert_int_eq(json_integer_value(json_object_get(a, "questions")), 57 * 3);
    ck_assert_int_eq(json_integer_value(json_object_get(a, "tokens_reused")), 0);
    const json_int_t run_a = json_integer_value(json_object_get(a, "tokens_run")),
                     run_b = json_integer_value(json_object_get(b, "tokens_run")),
                     reused = json_integer_value(json_object_get(b, "tokens_reused"));
    ck_assert_int_eq(run_b + reused, run_a); /* the same prompts */
    ck_assert_msg(run_b * 4 < run_a * 3, "reusing the prefix ran %lld of %lld tokens", (long long)run_b, (long long)run_a);
    const char *keys[] = {"accuracy", "accuracy_micro", "per_subject"};
    for (size_t k = 0; k < 3; k++)
        ck_assert_msg(json_equal(json_object_get(a, keys[k]), json_object_get(b, keys[k])),
                      "%s differs with the prefix reused:\n%s\n%s", keys[k], fresh, kept);
    /* the table: a header, a line per subject, the two averages, then the JSON */
    ck_assert(fresh[0] == '{'); /* no table: the JSON line alone */
    ck_assert_msg(!strncmp(kept, "subject ", 8), "%s", kept);
    ck_assert_ptr_nonnull(strstr(kept, "\nabstract_algebra "));
    ck_assert_ptr_nonnull(strstr(kept, "\nall subjects "));
    ck_assert_ptr_nonnull(strstr(kept, "\nall questions "));
    int lines = 0;
    for (const char *p = kept; *p; p++) lines += *p == '\n';
    ck_assert_int_eq(lines, 1 + 57 + 2 + 1);
    printf("MMLU, 2 shots, 3 questions a subject: %lld tokens run with the prefix reused, %lld from scratch\n",
           (long long)run_b, (long long)run_a);
    json_decref(a), json_decref(b);
    free(fresh), free(kept);
    ql_tokenizer_destroy(t);
    ql_llama_destroy(m);
    free(mdir), free(dir);
}
END_TEST

/* stories260K answers nearly every question of a subject with the same
 * letter, which would hide a question scored against another's answer: a
 * random adapter (B of std 0.3) makes its choices follow the question */
static ql_lora *mmlu_adapter(ql_llama *m)
{
    ql_lora_config cfg = {.r = 4, .alpha = 8.0f, .modules = QL_LORA_ALL_MODULES};
    ql_lora *l = NULL;
    ck_assert_int_eq(ql_lora_create(m, &cfg, 11, &l), QL_OK);
    for (int i = 0; i < l->n_layers; i++)
        for (int k = 0; k < QL_MOD_COUNT; k++) {
            ql_lora_pair *p = ql_lora_pair_at(l, i, k);
            if (p) tu_randn(p->B, (size_t)(p->out * l->cfg.r), 300 + (uint64_t)(i * QL_MOD_COUNT + k), 0.3f);
        }
    ql_lora_attach(m, l);
    return l;
}

/* Questions run together after their shared prefix (--batch-size with
 * --mmlu; groups of 3 at 4 questions a subject, so one left over alone,
 * in the order of their lengths) score as they do one at a time and from
 * scratch, and run no more tokens than one at a time */
START_TEST(test_mmlu_batched)
{
    char *mdir = shared_path("models/stories260K"), *dir = shared_path("data/mmlu");
    ql_llama *m = NULL;
    ql_llama_load_opts lo = {.quantizer = "none"};
    ck_assert_msg(ql_llama_load(mdir, &lo, &m) == QL_OK, "%s", ql_error_message());
    ql_lora *l = mmlu_adapter(m);
    ql_tokenizer *t = load_tokenizer();
    char *fresh = mmlu_run_lora(m, l, t, dir, 1, 0, 1, 4), *one = mmlu_run_lora(m, l, t, dir, 0, 0, 1, 4),
         *three = mmlu_run_lora(m, l, t, dir, 0, 0, 3, 4);
    json_t *a = last_line_json(fresh), *b = last_line_json(one), *c = last_line_json(three);
    ck_assert_int_eq(json_integer_value(json_object_get(c, "questions")), 57 * 4);
    const char *keys[] = {"accuracy", "accuracy_micro", "per_subject"};
    for (size_t k = 0; k < 3; k++) {
        ck_assert_msg(json_equal(json_object_get(a, keys[k]), json_object_get(c, keys[k])),
                      "%s differs batched:\n%s\n%s", keys[k], fresh, three);
        ck_assert(json_equal(json_object_get(a, keys[k]), json_object_get(b, keys[k])));
    }
    const json_int_t run_a = json_integer_value(json_object_get(a, "tokens_run")),
                     run_b = json_integer_value(json_object_get(b, "tokens_run")),
                     run_c = json_integer_value(json_object_get(c, "tokens_run")),
                     reused_c = json_integer_value(json_object_get(c, "tokens_reused"));
    ck_assert_int_eq(run_c + reused_c, run_a);
    ck_assert_msg(run_c <= run_b, "batched ran %lld tokens, one at a time %lld", (long long)run_c, (long long)run_b);
    printf("MMLU, 2 shots, 4 questions a subject: %lld tokens from scratch, %lld with the prefix reused, %lld batched "
           "by 3\n",
           (long long)run_a, (long long)run_b, (long long)run_c);
    json_decref(a), json_decref(b), json_decref(c);
    free(fresh), free(one), free(three);
    ql_tokenizer_destroy(t);
    ql_lora_destroy(l);
    ql_llama_destroy(m);
    free(mdir), free(dir);
}
END_TEST

Suite *dataset_suite(void)
{
    Suite *s = suite_create("dataset");
    TCase *tc = tcase_create("format");
    tcase_add_test(tc, test_format_names);
    tcase_add_test(tc, test_alpaca_prompts);
    tcase_add_test(tc, test_other_prompts);
    tcase_add_test(tc, test_format_errors);
    tcase_add_test(tc, test_detect_format);
    suite_add_tcase(s, tc);

    tc = tcase_create("tokenize");
    tcase_add_test(tc, test_alpaca_tokens);
    tcase_add_test(tc, test_truncation);
    tcase_add_test(tc, test_jsonl_formats);
    tcase_add_test(tc, test_text_format);
    suite_add_tcase(s, tc);

    tc = tcase_create("bundled");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_bundled_alpaca);
    tcase_add_test(tc, test_bundled_oasst1);
    tcase_add_test(tc, test_bundled_self_instruct);
    tcase_add_test(tc, test_bundled_tinystories);
    suite_add_tcase(s, tc);

    tc = tcase_create("errors");
    tcase_add_test(tc, test_bad_files);
    suite_add_tcase(s, tc);

    tc = tcase_create("readers");
    tcase_set_timeout(tc, 20); /* a reader that waits on a FIFO fails by timing out */
    tcase_add_test(tc, test_fifo_is_refused);
    tcase_add_test(tc, test_csv_records);
    tcase_add_test(tc, test_mmlu_prompt_bytes);
    suite_add_tcase(s, tc);

    tc = tcase_create("order");
    tcase_add_test(tc, test_order_shuffle);
    tcase_add_test(tc, test_order_group_by_length);
    tcase_add_test(tc, test_split);
    suite_add_tcase(s, tc);
    {
        TCase *mm = tcase_create("mmlu");
        tcase_set_timeout(mm, 300);
        tcase_add_test(mm, test_mmlu_prefix_reuse);
        tcase_add_test(mm, test_mmlu_batched);
        suite_add_tcase(s, mm);
    }
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(dataset_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
