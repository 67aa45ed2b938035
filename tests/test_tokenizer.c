/* Tokenizer: ids and decodes against the Hugging Face `tokenizers` library.
 *
 * tests/reference/tokenizer_stories260K.json (written by gen_tokenizer_ref.py)
 * holds the library's ids for hand-picked strings, FNV-1a hashes of the ids of
 * every example of the bundled data sets, and tokenizer.json variants (as
 * patches of stories260K's, or of a small byte-level BPE stored in the file).
 * Data come from $QLORA_SHARED, the reference from $QLORA_SOURCE_ROOT. */
#include <check.h>
#include <dirent.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qlora/error.h"
#include "qlora/fs.h"
#include "qlora/mmlu.h"
#include "qlora/tokenizer.h"

/* ---- helpers ---- */

#define assert_contains(hay, needle)                                                                              \
    ck_assert_msg((hay) && strstr((hay), (needle)), "expected to find \"%s\" in:\n%s", (needle),                 \
                  (hay) ? (hay) : "(null)")

static const char *env(const char *name)
{
    const char *v = getenv(name);
    ck_assert_msg(v && *v, "environment variable %s is not set (run through meson test)", name);
    return v;
}

static char *join(const char *a, const char *b)
{
    char *p = ql_path_join(a, b);
    ck_assert_ptr_nonnull(p);
    return p;
}

static char *shared_path(const char *rel) { return join(env("QLORA_SHARED"), rel); }

static char *tmpdir(void)
{
    char *d = strdup("/tmp/qlora-tok-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(d));
    return d;
}

static void write_text(const char *dir, const char *name, const char *text)
{
    char *p = join(dir, name);
    ck_assert_int_eq(ql_write_file_atomic(p, text, strlen(text)), QL_OK);
    free(p);
}

static void write_json(const char *dir, const char *name, const json_t *j)
{
    char *p = join(dir, name);
    ck_assert_int_eq(json_dump_file(j, p, JSON_COMPACT), 0);
    free(p);
}

static const char *ref_error = "";

/* The reference file, loaded once (NULL and ref_error on failure). */
static json_t *ref_try(void)
{
    static json_t *ref;
    static char msg[512];
    if (ref) return ref;
    const char *root = getenv("QLORA_SOURCE_ROOT");
    if (!root || !*root) {
        ref_error = "QLORA_SOURCE_ROOT is not set (run through meson test)";
        return NULL;
    }
    char *p = ql_path_join(root, "tests/reference/tokenizer_stories260K.json");
    json_error_t err;
    ref = p ? json_load_file(p, JSON_ALLOW_NUL, &err) : NULL;
    if (!ref) {
        snprintf(msg, sizeof msg, "cannot read %s: %s", p ? p : "(oom)", err.text);
        ref_error = msg;
    }
    free(p);
    return ref;
}

static json_t *ref(void)
{
    json_t *r = ref_try();
    ck_assert_msg(r != NULL, "%s", ref_error);
    return r;
}

static ql_tokenizer *load_ok(const char *dir)
{
    ql_tokenizer *t = NULL;
    int rc = ql_tokenizer_load(dir, &t);
    ck_assert_msg(rc == QL_OK, "loading %s: %s", dir, ql_error_message());
    ck_assert_ptr_nonnull(t);
    return t;
}

static ql_tokenizer *load_stories(void)
{
    char *dir = shared_path("models/stories260K");
    ql_tokenizer *t = load_ok(dir);
    free(dir);
    return t;
}

static json_t *stories_json(void)
{
    char *p = shared_path("models/stories260K/tokenizer.json");
    json_error_t err;
    json_t *j = json_load_file(p, JSON_ALLOW_NUL, &err);
    ck_assert_msg(j != NULL, "cannot read %s: %s", p, err.text);
    free(p);
    return j;
}

static uint64_t fnv1a(uint64_t h, const void *data, size_t n)
{
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

#define FNV_OFFSET 0xcbf29ce484222325ULL

static uint64_t hash_ids(uint64_t h, const int32_t *ids, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t v = (uint32_t)ids[i];
        unsigned char le[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
                               (unsigned char)(v >> 24)};
        h = fnv1a(h, le, 4);
    }
    return h;
}

static uint64_t parse_hex64(const char *s)
{
    uint64_t h = 0;
    for (int i = 0; i < 16; i++) {
        char c = s[i];
        h = h * 16 + (uint64_t)(c <= '9' ? c - '0' : c - 'a' + 10);
    }
    return h;
}

static void encode_ok(const ql_tokenizer *t, const char *s, size_t n, int add_special, int32_t **ids, size_t *count)
{
    int rc = ql_tokenizer_encode(t, s, n, add_special, ids, count);
    ck_assert_msg(rc == QL_OK, "encoding \"%.*s\": %s", (int)(n > 80 ? 80 : n), s ? s : "", ql_error_message());
    ck_assert_ptr_nonnull(*ids);
}

static char *decode_ok(const ql_tokenizer *t, const int32_t *ids, size_t n, int skip, size_t *len)
{
    char *text = NULL;
    int rc = ql_tokenizer_decode_len(t, ids, n, skip, &text, len);
    ck_assert_msg(rc == QL_OK, "decode: %s", ql_error_message());
    ck_assert_ptr_nonnull(text);
    return text;
}

/* Describe how ids differ from the JSON array `want`; 0 when equal. */
static int ids_differ(const int32_t *ids, size_t n, const json_t *want, char *msg, size_t cap)
{
    size_t m = json_array_size(want), i = 0;
    while (i < n && i < m && json_integer_value(json_array_get(want, i)) == ids[i]) i++;
    if (i == n && i == m) return 0;
    size_t k = (size_t)snprintf(msg, cap, "%zu ids, want %zu; first difference at %zu:\n  want", n, m, i);
    for (size_t j = i > 3 ? i - 3 : 0; j < m && j < i + 8 && k < cap; j++)
        k += (size_t)snprintf(msg + k, cap - k, " %lld", (long long)json_integer_value(json_array_get(want, j)));
    if (k < cap) k += (size_t)snprintf(msg + k, cap - k, "\n  got ");
    for (size_t j = i > 3 ? i - 3 : 0; j < n && j < i + 8 && k < cap; j++)
        k += (size_t)snprintf(msg + k, cap - k, " %d", ids[j]);
    return 1;
}

/* ---- the bundled data sets, cut into examples as gen_tokenizer_ref.py does ---- */

typedef struct text {
    char *s;
    size_t n;
} text;

typedef struct texts {
    text *v;
    size_t n, cap;
} texts;

static void texts_add(texts *t, const char *s, size_t n)
{
    if (t->n == t->cap) {
        t->cap = t->cap ? t->cap * 2 : 1024;
        t->v = realloc(t->v, t->cap * sizeof *t->v);
        ck_assert_ptr_nonnull(t->v);
    }
    char *c = malloc(n + 1);
    ck_assert_ptr_nonnull(c);
    memcpy(c, s, n);
    c[n] = '\0';
    t->v[t->n++] = (text){c, n};
}

static void texts_free(texts *t)
{
    for (size_t i = 0; i < t->n; i++) free(t->v[i].s);
    free(t->v);
    t->v = NULL;
    t->n = t->cap = 0;
}

static int ascii_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\v' || c == '\f'; }

static void add_json_field(texts *out, json_t *o, const char *key, const char *where)
{
    json_t *v = json_object_get(o, key);
    ck_assert_msg(json_is_string(v), "%s: \"%s\" is not a string", where, key);
    texts_add(out, json_string_value(v), json_string_length(v));
}

static json_t *parse_line(const char *s, size_t n, const char *where)
{
    json_error_t err;
    json_t *j = json_loadb(s, n, JSON_ALLOW_NUL, &err);
    ck_assert_msg(json_is_object(j), "%s: bad JSON line: %s", where, err.text);
    return j;
}

static void read_dataset(const char *name, texts *out)
{
    char *data;
    size_t len;
    char *path;
    if (!strcmp(name, "tinystories")) {
        /* runs of lines between blank (whitespace-only) lines, stripped */
        path = shared_path("data/tinystories/validation.txt");
        ck_assert_msg(ql_read_file(path, &data, &len) == QL_OK, "%s", ql_error_message());
        size_t pos = 0, start = SIZE_MAX, end = 0;
        for (;;) {
            const char *nl = pos < len ? memchr(data + pos, '\n', len - pos) : NULL;
            size_t eol = nl ? (size_t)(nl - data) : len;
            int blank = 1;
            for (size_t i = pos; i < eol && blank; i++) blank = ascii_space(data[i]);
            if (!blank) {
                if (start == SIZE_MAX) start = pos;
                end = eol;
            }
            if ((blank || !nl) && start != SIZE_MAX) {
                while (start < end && ascii_space(data[start])) start++;
                while (end > start && ascii_space(data[end - 1])) end--;
                texts_add(out, data + start, end - start);
                start = SIZE_MAX;
            }
            if (!nl) break;
            pos = eol + 1;
        }
    } else if (!strcmp(name, "alpaca")) {
        path = shared_path("data/alpaca/alpaca_en_demo.json");
        json_error_t err;
        json_t *root = json_load_file(path, JSON_ALLOW_NUL, &err);
        ck_assert_msg(json_is_array(root), "%s: %s", path, err.text);
        size_t i;
        json_t *r;
        json_array_foreach(root, i, r)
        {
            add_json_field(out, r, "instruction", path);
            add_json_field(out, r, "input", path);
            add_json_field(out, r, "output", path);
        }
        json_decref(root);
        data = NULL;
    } else {
        int oasst = !strcmp(name, "oasst1");
        ck_assert_msg(oasst || !strcmp(name, "self-instruct"), "unknown data set %s", name);
        path = shared_path(oasst ? "data/oasst1/oasst1_validation.jsonl"
                                 : "data/self-instruct/user_oriented_instructions.jsonl");
        ck_assert_msg(ql_read_file(path, &data, &len) == QL_OK, "%s", ql_error_message());
        for (size_t pos = 0; pos < len;) {
            const char *nl = memchr(data + pos, '\n', len - pos);
            size_t eol = nl ? (size_t)(nl - data) : len;
            int blank = 1;
            for (size_t i = pos; i < eol && blank; i++) blank = ascii_space(data[i]);
            if (!blank) {
                json_t *j = parse_line(data + pos, eol - pos, path);
                if (oasst) {
                    add_json_field(out, j, "input", path);
                    add_json_field(out, j, "output", path);
                } else {
                    add_json_field(out, j, "instruction", path);
                    json_t *inst = json_object_get(j, "instances"), *x;
                    size_t k;
                    ck_assert_msg(json_is_array(inst), "%s: no instances", path);
                    json_array_foreach(inst, k, x)
                    {
                        add_json_field(out, x, "input", path);
                        add_json_field(out, x, "output", path);
                    }
                }
                json_decref(j);
            }
            pos = eol + 1;
        }
    }
    free(data);
    free(path);
}

static const char *const dataset_names[] = {"tinystories", "alpaca", "oasst1", "self-instruct"};
enum { N_DATASETS = 4 };

/* ---- API basics ---- */

START_TEST(test_api)
{
    ql_tokenizer *t = load_stories();
    ck_assert_uint_eq(ql_tokenizer_vocab_size(t), 512);
    ck_assert_int_eq(ql_tokenizer_bos(t), 1);
    ck_assert_int_eq(ql_tokenizer_eos(t), 2);
    ck_assert_str_eq(ql_tokenizer_piece(t, 0), "<unk>");
    ck_assert_str_eq(ql_tokenizer_piece(t, 1), "<s>");
    ck_assert_str_eq(ql_tokenizer_piece(t, 13), "<0x0A>");
    ck_assert_str_eq(ql_tokenizer_piece(t, 410), "\xe2\x96\x81"); /* ▁ */
    ck_assert_ptr_null(ql_tokenizer_piece(t, -1));
    ck_assert_ptr_null(ql_tokenizer_piece(t, 512));
    ck_assert_int_eq(ql_tokenizer_token_id(t, "</s>"), 2);
    ck_assert_int_eq(ql_tokenizer_token_id(t, "\xe2\x96\x81"), 410);
    ck_assert_int_eq(ql_tokenizer_token_id(t, "no such piece"), -1);
    for (int32_t id = 0; id < 512; id++) {
        const char *p = ql_tokenizer_piece(t, id);
        ck_assert_msg(p != NULL, "id %d has no piece", id);
        ck_assert_int_eq(ql_tokenizer_token_id(t, p), id);
    }

    int32_t *ids;
    size_t n;
    encode_ok(t, NULL, 0, 0, &ids, &n);
    ck_assert_uint_eq(n, 0);
    free(ids);
    encode_ok(t, "", 0, 1, &ids, &n);
    ck_assert_uint_eq(n, 1);
    ck_assert_int_eq(ids[0], 1);
    char *s = decode_ok(t, ids, n, 1, NULL);
    ck_assert_str_eq(s, "");
    free(s);
    free(ids);

    /* the text is bounded by len, not by a NUL */
    encode_ok(t, "hello world", 5, 1, &ids, &n);
    s = decode_ok(t, ids, n, 1, NULL);
    ck_assert_str_eq(s, "hello");
    free(s);
    free(ids);

    ck_assert_int_eq(ql_tokenizer_encode(NULL, "x", 1, 1, &ids, &n), QL_EINVAL);
    ck_assert_int_eq(ql_tokenizer_encode(t, NULL, 3, 1, &ids, &n), QL_EINVAL);
    ck_assert_int_eq(ql_tokenizer_decode(t, NULL, 3, 1, &s), QL_EINVAL);
    ck_assert_int_eq(ql_tokenizer_load(NULL, NULL), QL_EINVAL);
    ql_tokenizer_destroy(NULL);
    ql_tokenizer_destroy(t);
}
END_TEST

/* Bytes that are not UTF-8 go through byte fallback one by one; the library
 * cannot receive them (it takes Rust strings), so these are checked by hand. */
START_TEST(test_invalid_utf8)
{
    ql_tokenizer *t = load_stories();
    const int32_t a = ql_tokenizer_token_id(t, "\xe2\x96\x81" "a"), b = ql_tokenizer_token_id(t, "b");
    const int32_t xff = ql_tokenizer_token_id(t, "<0xFF>"), xe6 = ql_tokenizer_token_id(t, "<0xE6>"),
                  x97 = ql_tokenizer_token_id(t, "<0x97>"), xc0 = ql_tokenizer_token_id(t, "<0xC0>"),
                  x80 = ql_tokenizer_token_id(t, "<0x80>");
    ck_assert(a > 0 && b > 0 && xff > 0 && xe6 > 0 && x97 > 0 && xc0 > 0 && x80 > 0);
    static const struct {
        const char *text;
        size_t n;
        const char *decoded;
    } cases[] = {
        {"a\xff" "b", 4, "a\xef\xbf\xbd" "b"},
        {"a\xe6\x97" "b", 5, "a\xef\xbf\xbd\xef\xbf\xbd" "b"}, /* 日 cut short */
        {"a\xc0\x80" "b", 5, "a\xef\xbf\xbd\xef\xbf\xbd" "b"}, /* overlong NUL */
    };
    const int32_t expect[3][5] = {{1, a, xff, b}, {1, a, xe6, x97, b}, {1, a, xc0, x80, b}};
    for (size_t c = 0; c < 3; c++) {
        int32_t *ids;
        size_t n;
        encode_ok(t, cases[c].text, strlen(cases[c].text), 1, &ids, &n);
        ck_assert_uint_eq(n, cases[c].n);
        for (size_t i = 0; i < n; i++) ck_assert_int_eq(ids[i], expect[c][i]);
        char *s = decode_ok(t, ids, n, 1, NULL);
        ck_assert_str_eq(s, cases[c].decoded);
        free(s);
        free(ids);
    }
    ql_tokenizer_destroy(t);
}
END_TEST

/* tokenizer_config.json's add_bos_token / add_eos_token decide what add_special adds. */
START_TEST(test_config_files)
{
    json_t *tj = stories_json();
    char *dir = tmpdir();
    write_json(dir, "tokenizer.json", tj);
    write_text(dir, "tokenizer_config.json",
               "{\"bos_token\": {\"content\": \"<s>\"}, \"eos_token\": \"</s>\", \"add_bos_token\": true, "
               "\"add_eos_token\": true}");
    ql_tokenizer *t = load_ok(dir);
    int32_t *ids;
    size_t n;
    encode_ok(t, "hello", 5, 1, &ids, &n);
    ck_assert_uint_eq(n, 5); /* <s> ▁he ll o </s> */
    ck_assert_int_eq(ids[0], 1);
    ck_assert_int_eq(ids[4], 2);
    char *s = decode_ok(t, ids, n, 0, NULL);
    ck_assert_str_eq(s, "<s> hello</s>");
    free(s);
    s = decode_ok(t, ids, n, 1, NULL);
    ck_assert_str_eq(s, "hello");
    free(s);
    free(ids);
    ql_tokenizer_destroy(t);

    write_text(dir, "tokenizer_config.json", "{\"add_bos_token\": false}");
    t = load_ok(dir);
    encode_ok(t, "hello", 5, 1, &ids, &n);
    ck_assert_uint_eq(n, 3);
    ck_assert_int_ne(ids[0], 1);
    free(ids);
    ck_assert_int_eq(ql_tokenizer_bos(t), 1); /* from the post-processor's template */
    ck_assert_int_eq(ql_tokenizer_eos(t), -1);
    ql_tokenizer_destroy(t);

    /* config.json ids when tokenizer_config.json names no tokens */
    char *p = join(dir, "tokenizer_config.json");
    unlink(p);
    free(p);
    write_text(dir, "config.json", "{\"bos_token_id\": 1, \"eos_token_id\": [2, 0]}");
    t = load_ok(dir);
    ck_assert_int_eq(ql_tokenizer_bos(t), 1);
    ck_assert_int_eq(ql_tokenizer_eos(t), 2);
    ql_tokenizer_destroy(t);

    /* the path of a tokenizer.json file itself */
    p = join(dir, "tokenizer.json");
    t = load_ok(p);
    ck_assert_int_eq(ql_tokenizer_bos(t), 1);
    ck_assert_int_eq(ql_tokenizer_eos(t), -1);
    free(p);
    ql_tokenizer_destroy(t);

    write_text(dir, "tokenizer_config.json", "{\"add_eos_token\": true, \"eos_token\": \"<nope>\"}");
    p = join(dir, "config.json");
    unlink(p);
    free(p);
    ck_assert_int_eq(ql_tokenizer_load(dir, &t), QL_EFORMAT);
    assert_contains(ql_error_message(), "add_eos_token is true but no eos token is known");
    write_text(dir, "tokenizer_config.json", "{\"add_eos_token\": tru");
    ck_assert_int_eq(ql_tokenizer_load(dir, &t), QL_EFORMAT);
    assert_contains(ql_error_message(), "tokenizer_config.json is not valid JSON");
    ck_assert_ptr_null(t);

    ql_remove_tree(dir);
    free(dir);
    json_decref(tj);
}
END_TEST

/* ---- against the library: hand-picked strings ---- */

START_TEST(test_tricky_strings)
{
    json_t *tricky = json_object_get(ref(), "tricky");
    ck_assert_msg(json_array_size(tricky) >= 40, "reference has %zu tricky strings", json_array_size(tricky));
    ql_tokenizer *t = load_stories();
    char first[4096] = "";
    size_t bad = 0;
    for (size_t i = 0; i < json_array_size(tricky); i++) {
        json_t *e = json_array_get(tricky, i);
        json_t *tx = json_object_get(e, "text");
        const char *s = json_string_value(tx);
        size_t len = json_string_length(tx);
        for (int sp = 1; sp >= 0; sp--) {
            int32_t *ids;
            size_t n;
            char msg[1024];
            encode_ok(t, s, len, sp, &ids, &n);
            if (ids_differ(ids, n, json_object_get(e, sp ? "ids" : "ids_plain"), msg, sizeof msg) && !bad++)
                snprintf(first, sizeof first, "string %zu \"%s\" (add_special %d): %s", i, s, sp, msg);
            if (sp) {
                for (int skip = 1; skip >= 0; skip--) {
                    json_t *want = json_object_get(e, skip ? "decoded" : "decoded_special");
                    size_t dl;
                    char *d = decode_ok(t, ids, n, skip, &dl);
                    if ((dl != json_string_length(want) || memcmp(d, json_string_value(want), dl) != 0) && !bad++)
                        snprintf(first, sizeof first, "string %zu \"%s\": decode (skip_special %d) gave \"%s\", want \"%s\"",
                                 i, s, skip, d, json_string_value(want));
                    free(d);
                }
            }
            free(ids);
        }
    }
    ck_assert_msg(bad == 0, "%zu mismatches with the library; first: %s", bad, first);
    ql_tokenizer_destroy(t);
}
END_TEST

/* ---- against the library: every example of the bundled data sets ---- */

START_TEST(test_dataset)
{
    const char *name = dataset_names[_i];
    json_t *sets = json_object_get(ref(), "datasets"), *want = NULL;
    for (size_t k = 0; k < json_array_size(sets); k++)
        if (!strcmp(json_string_value(json_object_get(json_array_get(sets, k), "name")), name))
            want = json_array_get(sets, k);
    ck_assert_msg(want != NULL, "reference has no data set %s", name);
    texts ex = {0};
    read_dataset(name, &ex);
    ck_assert_uint_eq(ex.n, (size_t)json_integer_value(json_object_get(want, "count")));
    const char *hashes = json_string_value(json_object_get(want, "hashes"));
    json_t *lengths = json_object_get(want, "lengths");
    ck_assert_uint_eq(strlen(hashes), 16 * ex.n);
    ck_assert_uint_eq(json_array_size(lengths), ex.n);

    ql_tokenizer *t = load_stories();
    uint64_t dec_hash = FNV_OFFSET;
    for (size_t i = 0; i < ex.n; i++) {
        int32_t *ids;
        size_t n;
        encode_ok(t, ex.v[i].s, ex.v[i].n, 1, &ids, &n);
        size_t want_n = (size_t)json_integer_value(json_array_get(lengths, i));
        uint64_t h = hash_ids(FNV_OFFSET, ids, n);
        ck_assert_msg(n == want_n && h == parse_hex64(hashes + 16 * i),
                      "%s example %zu of %zu: %zu ids, the library gives %zu (hash %016llx, want %.16s); text: "
                      "\"%.120s\"",
                      name, i, ex.n, n, want_n, (unsigned long long)h, hashes + 16 * i, ex.v[i].s);
        size_t dl;
        char *d = decode_ok(t, ids, n, 1, &dl);
        dec_hash = fnv1a(fnv1a(dec_hash, d, dl), "", 1);
        free(d);
        free(ids);
    }
    ck_assert_msg(dec_hash == parse_hex64(json_string_value(json_object_get(want, "decode_hash"))),
                  "%s: decodes differ from the library's (hash %016llx, want %s)", name,
                  (unsigned long long)dec_hash, json_string_value(json_object_get(want, "decode_hash")));
    ql_tokenizer_destroy(t);
    texts_free(&ex);
}
END_TEST

/* ---- against the library: tokenizer.json variants ---- */

/* The patch format of gen_tokenizer_ref.py's apply_patch. */
static json_t *apply_patch(const json_t *base, json_t *v)
{
    json_t *j = json_deep_copy(base), *model = json_object_get(j, "model");
    ck_assert_ptr_nonnull(model);
    const char *key;
    json_t *val;
    json_object_foreach(json_object_get(v, "set"), key, val) json_object_set(j, key, val);
    json_object_foreach(json_object_get(v, "model"), key, val) json_object_set(model, key, val);
    size_t i;
    json_array_foreach(json_object_get(v, "vocab_delete"), i, val)
        ck_assert_int_eq(json_object_del(json_object_get(model, "vocab"), json_string_value(val)), 0);
    if (json_is_true(json_object_get(v, "merges_as_strings"))) {
        json_t *merges = json_object_get(model, "merges"), *strs = json_array();
        json_array_foreach(merges, i, val)
        {
            char buf[256];
            snprintf(buf, sizeof buf, "%s %s", json_string_value(json_array_get(val, 0)),
                     json_string_value(json_array_get(val, 1)));
            json_array_append_new(strs, json_string(buf));
        }
        json_object_set_new(model, "merges", strs);
    }
    json_t *added = json_object_get(j, "added_tokens");
    if (!added || json_is_null(added)) {
        added = json_array();
        json_object_set_new(j, "added_tokens", added);
    }
    json_t *more = json_object_get(v, "added_tokens_append");
    if (json_is_array(more)) json_array_extend(added, more);
    return j;
}

static size_t n_variants(void)
{
    json_t *r = ref_try();
    size_t n = r ? json_array_size(json_object_get(r, "variants")) : 0;
    return n ? n : 1; /* one test that reports why there are none */
}

START_TEST(test_variant)
{
    json_t *variants = json_object_get(ref(), "variants"), *tricky = json_object_get(ref(), "tricky");
    ck_assert_msg((size_t)_i < json_array_size(variants), "reference has no variants");
    json_t *v = json_array_get(variants, (size_t)_i);
    const char *name = json_string_value(json_object_get(v, "name"));
    const char *base_name = json_string_value(json_object_get(v, "base"));
    json_t *base = !strcmp(base_name, "stories260K") ? stories_json()
                                                     : json_incref(json_object_get(ref(), "bytelevel_tokenizer"));
    ck_assert_ptr_nonnull(base);
    json_t *j = apply_patch(base, v);
    char *dir = tmpdir();
    write_json(dir, "tokenizer.json", j);
    ql_tokenizer *t = load_ok(dir);

    json_t *want = json_object_get(v, "tricky");
    ck_assert_uint_eq(json_array_size(want), json_array_size(tricky));
    for (size_t i = 0; i < json_array_size(tricky); i++) {
        json_t *tx = json_object_get(json_array_get(tricky, i), "text");
        json_t *w = json_array_get(want, i);
        int32_t *ids;
        size_t n;
        char msg[1024];
        encode_ok(t, json_string_value(tx), json_string_length(tx), 1, &ids, &n);
        ck_assert_msg(!ids_differ(ids, n, json_object_get(w, "ids"), msg, sizeof msg), "%s, string %zu \"%s\": %s",
                      name, i, json_string_value(tx), msg);
        json_t *dw = json_object_get(w, "decoded");
        size_t dl;
        char *d = decode_ok(t, ids, n, 1, &dl);
        ck_assert_msg(dl == json_string_length(dw) && memcmp(d, json_string_value(dw), dl) == 0,
                      "%s, string %zu \"%s\": decoded \"%s\", want \"%s\"", name, i, json_string_value(tx), d,
                      json_string_value(dw));
        free(d);
        free(ids);
    }

    /* every example of every data set, one hash */
    json_t *data = json_object_get(v, "data");
    uint64_t h = FNV_OFFSET, dh = FNV_OFFSET;
    size_t examples = 0, tokens = 0;
    for (int k = 0; k < N_DATASETS; k++) {
        texts ex = {0};
        read_dataset(dataset_names[k], &ex);
        for (size_t i = 0; i < ex.n; i++) {
            int32_t *ids;
            size_t n, dl;
            encode_ok(t, ex.v[i].s, ex.v[i].n, 1, &ids, &n);
            h = hash_ids(h, ids, n);
            tokens += n;
            char *d = decode_ok(t, ids, n, 1, &dl);
            dh = fnv1a(fnv1a(dh, d, dl), "", 1);
            free(d);
            free(ids);
        }
        examples += ex.n;
        texts_free(&ex);
    }
    ck_assert_uint_eq(examples, (size_t)json_integer_value(json_object_get(data, "examples")));
    ck_assert_msg(tokens == (size_t)json_integer_value(json_object_get(data, "tokens")) &&
                      h == parse_hex64(json_string_value(json_object_get(data, "hash"))),
                  "%s: the data sets give %zu tokens (hash %016llx), the library %lld (hash %s)", name, tokens,
                  (unsigned long long)h, json_integer_value(json_object_get(data, "tokens")),
                  json_string_value(json_object_get(data, "hash")));
    ck_assert_msg(dh == parse_hex64(json_string_value(json_object_get(data, "decode_hash"))),
                  "%s: decodes of the data sets differ from the library's", name);

    ql_tokenizer_destroy(t);
    ql_remove_tree(dir);
    free(dir);
    json_decref(j);
    json_decref(base);
}
END_TEST

/* ---- against the library: tokenizers built like the models' (tests/reference/tokenizers/) ---- */

/* gen_tokenizer_models.py's fixtures: LLaMA 3.x, Qwen2 / 2.5 / 3, Mistral v0.1 (LLaMA 2 style) and v0.3. */
static const char *const fixture_names[] = {"llama3", "qwen2", "qwen2.5", "qwen3", "mistral-v0.1", "mistral-v0.3"};
enum { N_FIXTURES = 6 };

static char *fixture_dir(const char *name)
{
    char *base = join(env("QLORA_SOURCE_ROOT"), "tests/reference/tokenizers");
    char *d = join(base, name);
    free(base);
    return d;
}

static json_t *fixture_expected(const char *name)
{
    char *d = fixture_dir(name), *p = join(d, "expected.json");
    json_error_t err;
    json_t *j = json_load_file(p, JSON_ALLOW_NUL, &err);
    ck_assert_msg(j != NULL, "cannot read %s: %s", p, err.text);
    free(p);
    free(d);
    return j;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* mmlu/dev whole and the first 20 questions of each mmlu/test file, in file-name order, as
 * "question\nA. c0\nB. c1\nC. c2\nD. c3\nAnswer:" (gen_tokenizer_models.py mmlu_examples). */
static void read_mmlu(texts *out)
{
    static const char *const parts[] = {"data/mmlu/dev", "data/mmlu/test"};
    for (int part = 0; part < 2; part++) {
        char *dir = shared_path(parts[part]);
        DIR *dp = opendir(dir);
        ck_assert_msg(dp != NULL, "cannot open %s", dir);
        char **names = NULL;
        size_t nn = 0;
        struct dirent *de;
        while ((de = readdir(dp))) {
            size_t l = strlen(de->d_name);
            if (l < 4 || strcmp(de->d_name + l - 4, ".csv") != 0) continue;
            names = realloc(names, (nn + 1) * sizeof *names);
            ck_assert_ptr_nonnull(names);
            names[nn++] = strdup(de->d_name);
        }
        closedir(dp);
        qsort(names, nn, sizeof *names, cmp_str);
        for (size_t f = 0; f < nn; f++) {
            char *p = join(dir, names[f]), *data;
            size_t len, pos = 0;
            ck_assert_msg(ql_read_file(p, &data, &len) == QL_OK, "%s", ql_error_message());
            char *fields[6];
            int k = ql_csv_record(data, len, &pos, fields, 6);
            ck_assert_msg(k == 6 && !strcmp(fields[0], "question") && !strcmp(fields[5], "answer"), "%s: header", p);
            for (int i = 0; i < 6; i++) free(fields[i]);
            for (int row = 0; part == 0 || row < 20; row++) {
                k = ql_csv_record(data, len, &pos, fields, 6);
                ck_assert_msg(k >= 0, "%s: bad CSV record", p);
                if (k == 0) break;
                ck_assert_msg(k >= 5, "%s: a record of %d fields", p, k);
                char *s;
                int n = asprintf(&s, "%s\nA. %s\nB. %s\nC. %s\nD. %s\nAnswer:", fields[0], fields[1], fields[2],
                                 fields[3], fields[4]);
                ck_assert_int_ge(n, 0);
                texts_add(out, s, (size_t)n);
                free(s);
                for (int i = 0; i < k && i < 6; i++) free(fields[i]);
            }
            free(data);
            free(p);
            free(names[f]);
        }
        free(names);
        free(dir);
    }
}

/* The examples of set `name` (oasst1_chat: every oasst1 pair wrapped in the model's chat markup). */
static void read_set(const char *name, json_t *chat, texts *out)
{
    if (!strcmp(name, "mmlu")) {
        read_mmlu(out);
        return;
    }
    if (strcmp(name, "oasst1_chat") != 0) {
        read_dataset(name, out);
        return;
    }
    texts pairs = {0};
    read_dataset("oasst1", &pairs);
    ck_assert_msg(json_array_size(chat) == 3, "chat markup is not three strings");
    const char *part[3];
    size_t plen[3];
    for (int k = 0; k < 3; k++) {
        part[k] = json_string_value(json_array_get(chat, (size_t)k));
        plen[k] = json_string_length(json_array_get(chat, (size_t)k));
    }
    for (size_t i = 0; i + 1 < pairs.n; i += 2) {
        size_t n = plen[0] + pairs.v[i].n + plen[1] + pairs.v[i + 1].n + plen[2], o = 0;
        char *s = malloc(n + 1);
        ck_assert_ptr_nonnull(s);
        memcpy(s + o, part[0], plen[0]), o += plen[0];
        memcpy(s + o, pairs.v[i].s, pairs.v[i].n), o += pairs.v[i].n;
        memcpy(s + o, part[1], plen[1]), o += plen[1];
        memcpy(s + o, pairs.v[i + 1].s, pairs.v[i + 1].n), o += pairs.v[i + 1].n;
        memcpy(s + o, part[2], plen[2]);
        texts_add(out, s, n);
        free(s);
    }
    texts_free(&pairs);
}

static uint32_t parse_hex32(const char *s)
{
    uint32_t h = 0;
    for (int i = 0; i < 8; i++) h = h * 16 + (uint32_t)(s[i] <= '9' ? s[i] - '0' : s[i] - 'a' + 10);
    return h;
}

static int in_list(json_t *list, size_t i)
{
    for (size_t k = 0; k < json_array_size(list); k++)
        if ((size_t)json_integer_value(json_array_get(list, k)) == i) return 1;
    return 0;
}

START_TEST(test_model_fixture)
{
    const char *name = fixture_names[_i];
    json_t *exp = fixture_expected(name);
    char *dir = fixture_dir(name);
    ql_tokenizer *t = load_ok(dir);

    /* hand-picked strings: ids with and without special tokens, both decodes */
    json_t *tricky = json_object_get(exp, "tricky");
    ck_assert_msg(json_array_size(tricky) >= 90, "%s: %zu tricky strings", name, json_array_size(tricky));
    for (size_t i = 0; i < json_array_size(tricky); i++) {
        json_t *e = json_array_get(tricky, i), *tx = json_object_get(e, "text");
        const char *s = json_string_value(tx);
        for (int sp = 1; sp >= 0; sp--) {
            int32_t *ids;
            size_t n, dl;
            char msg[1024];
            encode_ok(t, s, json_string_length(tx), sp, &ids, &n);
            ck_assert_msg(!ids_differ(ids, n, json_object_get(e, sp ? "ids" : "ids_plain"), msg, sizeof msg),
                          "%s, string %zu \"%s\" (add_special %d): %s", name, i, s, sp, msg);
            for (int skip = 1; sp && skip >= 0; skip--) {
                json_t *want = json_object_get(e, skip ? "decoded" : "decoded_special");
                char *d = decode_ok(t, ids, n, skip, &dl);
                ck_assert_msg(dl == json_string_length(want) && memcmp(d, json_string_value(want), dl) == 0,
                              "%s, string %zu \"%s\": decode (skip_special %d) gave \"%s\", want \"%s\"", name, i, s,
                              skip, d, json_string_value(want));
                free(d);
            }
            free(ids);
        }
    }

    /* every example of every set, id for id (a 32-bit hash each), decodes and round trips */
    json_t *sets = json_object_get(exp, "sets");
    ck_assert_uint_eq(json_array_size(sets), 6);
    for (size_t k = 0; k < json_array_size(sets); k++) {
        json_t *w = json_array_get(sets, k);
        const char *set = json_string_value(json_object_get(w, "name"));
        texts ex = {0};
        read_set(set, json_object_get(exp, "chat"), &ex);
        ck_assert_msg(ex.n == (size_t)json_integer_value(json_object_get(w, "count")), "%s/%s: %zu examples, want %lld",
                      name, set, ex.n, json_integer_value(json_object_get(w, "count")));
        const char *hashes = json_string_value(json_object_get(w, "hashes"));
        ck_assert_uint_eq(strlen(hashes), 8 * ex.n);
        json_t *differs = json_object_get(w, "roundtrip_differs");
        uint64_t hp = FNV_OFFSET, dh = FNV_OFFSET, dsh = FNV_OFFSET;
        size_t tokens = 0, roundtrips = 0;
        for (size_t i = 0; i < ex.n; i++) {
            int32_t *ids, *plain;
            size_t n, np, dl;
            encode_ok(t, ex.v[i].s, ex.v[i].n, 1, &ids, &n);
            uint32_t h = (uint32_t)hash_ids(FNV_OFFSET, ids, n);
            ck_assert_msg(h == parse_hex32(hashes + 8 * i),
                          "%s/%s example %zu of %zu: ids differ from the library's (%zu ids, hash %08x, want %.8s); "
                          "text: \"%.160s\"",
                          name, set, i, ex.n, n, h, hashes + 8 * i, ex.v[i].s);
            tokens += n;
            char *d = decode_ok(t, ids, n, 1, &dl);
            dh = fnv1a(fnv1a(dh, d, dl), "", 1);
            free(d);
            d = decode_ok(t, ids, n, 0, &dl);
            dsh = fnv1a(fnv1a(dsh, d, dl), "", 1);
            free(d);
            encode_ok(t, ex.v[i].s, ex.v[i].n, 0, &plain, &np);
            hp = hash_ids(hp, plain, np);
            d = decode_ok(t, plain, np, 0, &dl);
            int same = dl == ex.v[i].n && memcmp(d, ex.v[i].s, dl) == 0;
            ck_assert_msg(same != in_list(differs, i), "%s/%s example %zu: round trip %s, the library's %s", name, set,
                          i, same ? "exact" : "differs", same ? "differs" : "is exact");
            roundtrips += same;
            free(d);
            free(plain);
            free(ids);
        }
        ck_assert_uint_eq(tokens, (size_t)json_integer_value(json_object_get(w, "tokens")));
        ck_assert_msg(hp == parse_hex64(json_string_value(json_object_get(w, "hash_plain"))),
                      "%s/%s: ids without special tokens differ from the library's", name, set);
        ck_assert_msg(dh == parse_hex64(json_string_value(json_object_get(w, "decode_hash"))),
                      "%s/%s: decodes (skip_special) differ from the library's", name, set);
        ck_assert_msg(dsh == parse_hex64(json_string_value(json_object_get(w, "decode_special_hash"))),
                      "%s/%s: decodes (keep special) differ from the library's", name, set);
        ck_assert_uint_eq(roundtrips + json_array_size(differs), ex.n);
        texts_free(&ex);
    }
    ql_tokenizer_destroy(t);
    free(dir);
    json_decref(exp);
}
END_TEST

/* What the fixtures' tokenizer_config.json / config.json decide: BOS, EOS, what add_special adds. */
START_TEST(test_model_fixture_configs)
{
    static const struct {
        const char *name, *bos, *eos, *first; /* first: what add_special puts first, NULL: nothing */
    } want[] = {
        {"llama3", "<|begin_of_text|>", "<|eot_id|>", "<|begin_of_text|>"},
        {"qwen2", "<|endoftext|>", "<|im_end|>", NULL},
        {"qwen2.5", "<|endoftext|>", "<|im_end|>", NULL},
        {"qwen3", "<|endoftext|>", "<|im_end|>", NULL},
        {"mistral-v0.1", "<s>", "</s>", "<s>"},
        {"mistral-v0.3", "<s>", "</s>", "<s>"},
    };
    for (size_t k = 0; k < sizeof want / sizeof want[0]; k++) {
        char *dir = fixture_dir(want[k].name);
        ql_tokenizer *t = load_ok(dir);
        ck_assert_int_eq(ql_tokenizer_bos(t), ql_tokenizer_token_id(t, want[k].bos));
        ck_assert_int_eq(ql_tokenizer_eos(t), ql_tokenizer_token_id(t, want[k].eos));
        ck_assert_int_ge(ql_tokenizer_bos(t), 0);
        int32_t *ids, *plain;
        size_t n, np;
        encode_ok(t, "hi", 2, 1, &ids, &n);
        encode_ok(t, "hi", 2, 0, &plain, &np);
        ck_assert_uint_eq(n, np + (want[k].first != NULL));
        if (want[k].first) ck_assert_int_eq(ids[0], ql_tokenizer_token_id(t, want[k].first));
        free(ids);
        free(plain);
        ql_tokenizer_destroy(t);
        free(dir);
    }
}
END_TEST

/* ---- bad input ---- */

/* Load a patched stories260K tokenizer.json; expect `code` and `needle`. */
static void patched_fails(const char *patch_json, int code, const char *needle)
{
    json_error_t err;
    json_t *patch = json_loads(patch_json, 0, &err);
    ck_assert_msg(patch != NULL, "bad test patch: %s", err.text);
    json_t *base = stories_json(), *j = apply_patch(base, patch);
    char *dir = tmpdir();
    write_json(dir, "tokenizer.json", j);
    ql_tokenizer *t = (ql_tokenizer *)1;
    int rc = ql_tokenizer_load(dir, &t);
    ck_assert_msg(rc == code, "patch %s: got %s (%s), want %s", patch_json, ql_status_name(rc), ql_error_message(),
                  ql_status_name(code));
    ck_assert_ptr_null(t);
    assert_contains(ql_error_message(), needle);
    assert_contains(ql_error_message(), "tokenizer.json");
    ql_remove_tree(dir);
    free(dir);
    json_decref(j);
    json_decref(base);
    json_decref(patch);
}

START_TEST(test_bad_tokenizer_json)
{
    patched_fails("{\"set\": {\"model\": {\"type\": \"Unigram\", \"vocab\": [[\"a\", 0.0]]}}}", QL_ENOTSUP,
                  "tokenizer model type 'Unigram' is not supported");
    patched_fails("{\"set\": {\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}}", QL_ENOTSUP, "'WordPiece'");
    patched_fails("{\"model\": {\"merges\": [[\"\\u2581\", \"t\"], [\"\\u2581\", \"zzz\"]]}}", QL_EFORMAT,
                  "model.merges[1] names token 'zzz' that is not in the vocabulary");
    patched_fails("{\"model\": {\"merges\": [[\"a\", \"\\u2581\"]]}}", QL_EFORMAT,
                  "merged token 'a\xe2\x96\x81' is not in the vocabulary");
    patched_fails("{\"model\": {\"merges\": [\"h e\", \"he\"]}}", QL_EFORMAT,
                  "model.merges[1] \"he\" is not two tokens separated by one space");
    patched_fails("{\"model\": {\"merges\": [[\"h\"]]}}", QL_EFORMAT, "model.merges[0] must be");
    patched_fails("{\"model\": {\"vocab\": {\"a\": -1}}}", QL_EFORMAT, "model.vocab[\"a\"]");
    patched_fails("{\"model\": {\"vocab\": null}}", QL_EFORMAT, "needs a \"vocab\" object");
    patched_fails("{\"model\": {\"dropout\": 0.1}}", QL_ENOTSUP, "BPE dropout 0.1");
    patched_fails("{\"model\": {\"dropout\": 2}}", QL_EFORMAT, "dropout");
    patched_fails("{\"model\": {\"byte_fallback\": \"yes\"}}", QL_EFORMAT, "\"byte_fallback\" must be true or false");
    patched_fails("{\"set\": {\"version\": \"2.0\"}}", QL_ENOTSUP, "unknown tokenizer.json version '2.0'");
    patched_fails("{\"set\": {\"model\": null}}", QL_EFORMAT, "has no \"model\"");
    patched_fails("{\"set\": {\"normalizer\": {\"type\": \"NFKC\"}}}", QL_ENOTSUP, "normalizer type 'NFKC' is not supported");
    patched_fails("{\"set\": {\"normalizer\": {\"type\": \"Replace\", \"pattern\": {\"Regex\": \" +\"}, \"content\": \"_\"}}}",
                  QL_ENOTSUP, "Replace with a Regex pattern is not supported");
    patched_fails("{\"set\": {\"pre_tokenizer\": {\"type\": \"Whitespace\"}}}", QL_ENOTSUP,
                  "pre_tokenizer type 'Whitespace' is not supported");
    patched_fails("{\"set\": {\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"\\\\w+\"}, "
                  "\"behavior\": \"Isolated\", \"invert\": false}}}",
                  QL_ENOTSUP, "Split regex '\\w+' is not supported");
    patched_fails("{\"set\": {\"pre_tokenizer\": {\"type\": \"Metaspace\", \"replacement\": \"ab\"}}}", QL_EFORMAT,
                  "\"replacement\" must be exactly one character");
    patched_fails("{\"set\": {\"pre_tokenizer\": {\"type\": \"Metaspace\", \"replacement\": \"_\", "
                  "\"add_prefix_space\": false}}}",
                  QL_EFORMAT, "add_prefix_space does not match declared prepend_scheme");
    patched_fails("{\"set\": {\"decoder\": {\"type\": \"WordPiece\"}}}", QL_ENOTSUP, "decoder type 'WordPiece' is not supported");
    patched_fails("{\"set\": {\"post_processor\": {\"type\": \"Nonsense\"}}}", QL_ENOTSUP,
                  "post_processor type 'Nonsense' is not supported");
    patched_fails("{\"set\": {\"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": "
                  "[{\"SpecialToken\": {\"id\": \"<x>\", \"type_id\": 0}}, {\"Sequence\": {\"id\": \"A\", \"type_id\": 0}}], "
                  "\"special_tokens\": {}}}}",
                  QL_EFORMAT, "special token '<x>' without ids");
    patched_fails("{\"set\": {\"added_tokens\": {\"content\": \"x\"}}}", QL_EFORMAT, "\"added_tokens\" must be an array");
    /* fields no pipeline here knows are refused by name, never skipped */
    patched_fails("{\"set\": {\"normalizer\": {\"type\": \"NFD\"}}}", QL_ENOTSUP, "normalizer type 'NFD' is not supported");
    patched_fails("{\"set\": {\"normalizer\": {\"type\": \"NFC\", \"form\": 1}}}", QL_ENOTSUP,
                  "normalizer NFC field \"form\" is not supported");
    patched_fails("{\"set\": {\"normalizer\": {\"type\": \"Sequence\", \"normalizers\": [{\"type\": \"Prepend\", "
                  "\"prepend\": \"x\", \"once\": true}]}}}",
                  QL_ENOTSUP, "normalizer Prepend field \"once\" is not supported");
    patched_fails("{\"set\": {\"sparkle\": 1}}", QL_ENOTSUP, "top-level field \"sparkle\" is not supported");
    patched_fails("{\"model\": {\"cache_capacity\": 10}}", QL_ENOTSUP, "model BPE field \"cache_capacity\" is not supported");
    patched_fails("{\"set\": {\"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"lowercase\": true}}}",
                  QL_ENOTSUP, "pre_tokenizer ByteLevel field \"lowercase\" is not supported");
    patched_fails("{\"set\": {\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"x\"}, "
                  "\"behavior\": \"Isolated\", \"invert\": false, \"limit\": 2}}}",
                  QL_ENOTSUP, "pre_tokenizer Split field \"limit\" is not supported");
    patched_fails("{\"set\": {\"pre_tokenizer\": {\"type\": \"Metaspace\", \"replacement\": \"_\", \"lower\": 1}}}",
                  QL_ENOTSUP, "pre_tokenizer Metaspace field \"lower\" is not supported");
    patched_fails("{\"set\": {\"decoder\": {\"type\": \"Sequence\", \"decoders\": [{\"type\": \"Fuse\", \"sep\": \" \"}]}}}",
                  QL_ENOTSUP, "decoder Fuse field \"sep\" is not supported");
    patched_fails("{\"set\": {\"decoder\": {\"type\": \"Strip\", \"content\": \" \", \"start\": 1, \"stop\": 0, "
                  "\"all\": true}}}",
                  QL_ENOTSUP, "decoder Strip field \"all\" is not supported");
    patched_fails("{\"set\": {\"post_processor\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"x\": 0}}}",
                  QL_ENOTSUP, "post_processor ByteLevel field \"x\" is not supported");
    patched_fails("{\"set\": {\"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": [], \"triple\": []}}}",
                  QL_ENOTSUP, "post_processor TemplateProcessing field \"triple\" is not supported");
    patched_fails("{\"added_tokens_append\": [{\"id\": 0, \"content\": \"[X]\", \"special\": true, \"casefold\": true}]}",
                  QL_ENOTSUP, "added_tokens[3] field \"casefold\" is not supported");
}
END_TEST

/* tokenizer_config.json fields with which transformers would give other ids than tokenizer.json alone. */
static void config_refused(const char *dir, int code, const char *text, const char *n1, const char *n2)
{
    write_text(dir, "tokenizer_config.json", text);
    ql_tokenizer *t = (ql_tokenizer *)1;
    int rc = ql_tokenizer_load(dir, &t);
    ck_assert_msg(rc == code, "tokenizer_config.json = %s: got %s (%s)", text, ql_status_name(rc), ql_error_message());
    ck_assert_ptr_null(t);
    assert_contains(ql_error_message(), "tokenizer_config.json");
    assert_contains(ql_error_message(), n1);
    if (n2) assert_contains(ql_error_message(), n2);
}

START_TEST(test_config_refusals)
{
    char *qwen = fixture_dir("qwen2"), *src = join(qwen, "tokenizer.json");
    char *dir = tmpdir(), *dst = join(dir, "tokenizer.json");
    ck_assert_int_eq(ql_copy_file_atomic(src, dst), QL_OK);
    config_refused(dir, QL_ENOTSUP, "{\"split_special_tokens\": true}",
                 "\"split_special_tokens\": true (special tokens in the text encoded as plain text) is not supported",
                 NULL);
    config_refused(dir, QL_ENOTSUP, "{\"add_prefix_space\": true}",
                 "\"add_prefix_space\": true makes transformers rebuild the pre-tokenizer",
                 "only null or false (as tokenizer.json's ByteLevel) is supported");
    config_refused(dir, QL_EFORMAT, "{\"add_bos_token\": \"yes\"}",
                 "\"add_bos_token\" must be true, false or null", NULL);
    config_refused(dir, QL_EFORMAT, "{\"split_special_tokens\": 1}",
                 "\"split_special_tokens\" must be true, false or null", NULL);
    write_text(dir, "tokenizer_config.json", "{\"split_special_tokens\": false, \"add_prefix_space\": false, "
                                             "\"model_max_length\": 1000000000000000019884624838656}");
    ql_tokenizer *t = load_ok(dir);
    ql_tokenizer_destroy(t);
    free(src);
    free(dst);
    free(qwen);
    ql_remove_tree(dir);
    free(dir);

    /* a SentencePiece-style file: any add_prefix_space is refused */
    dir = tmpdir();
    src = shared_path("models/stories260K/tokenizer.json");
    dst = join(dir, "tokenizer.json");
    ck_assert_int_eq(ql_copy_file_atomic(src, dst), QL_OK);
    config_refused(dir, QL_ENOTSUP, "{\"add_prefix_space\": false}",
                 "\"add_prefix_space\": false makes transformers rebuild the pre-tokenizer", "only null is supported");
    free(src);
    free(dst);
    ql_remove_tree(dir);
    free(dir);
}
END_TEST

START_TEST(test_bad_files)
{
    ql_tokenizer *t = (ql_tokenizer *)1;
    ck_assert_int_eq(ql_tokenizer_load("/nonexistent/model", &t), QL_ENOTFOUND);
    ck_assert_ptr_null(t);
    assert_contains(ql_error_message(), "/nonexistent/model does not exist");

    char *dir = tmpdir();
    ck_assert_int_eq(ql_tokenizer_load(dir, &t), QL_ENOTFOUND);
    assert_contains(ql_error_message(), "tokenizer.json is missing");

    write_text(dir, "tokenizer.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [");
    ck_assert_int_eq(ql_tokenizer_load(dir, &t), QL_EFORMAT);
    assert_contains(ql_error_message(), "tokenizer.json is not valid JSON");
    write_text(dir, "tokenizer.json", "[1, 2]");
    ck_assert_int_eq(ql_tokenizer_load(dir, &t), QL_EFORMAT);
    assert_contains(ql_error_message(), "is not a JSON object");
    ql_remove_tree(dir);
    free(dir);
}
END_TEST

/* ---- input readers (issue 6) ---- */

static long max_rss_kib(void)
{
    struct rusage ru;
    ck_assert_int_eq(getrusage(RUSAGE_SELF, &ru), 0);
    return ru.ru_maxrss;
}

/* Ids index tables of max id + 1 entries: a 60-byte file naming id
 * 67,108,863 is refused before any table is allocated, by name. */
START_TEST(test_vocab_ids_bounded_by_entries)
{
    char *dir = tmpdir();
    write_text(dir, "tokenizer.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 67108863}, \"merges\": []}}");
    long before = max_rss_kib();
    ql_tokenizer *t = (ql_tokenizer *)1;
    ck_assert_int_eq(ql_tokenizer_load(dir, &t), QL_EFORMAT);
    ck_assert_ptr_null(t);
    assert_contains(ql_error_message(), "tokenizer.json: model.vocab uses id 67108863 but has only 1 entries");
    long grew = max_rss_kib() - before;
    ck_assert_msg(grew < 64 * 1024, "loading a 70-byte tokenizer.json took %ld KiB", grew);
    /* holes are allowed (the library allows them), up to as many as entries */
    write_text(dir, "tokenizer.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 3}, \"merges\": []}}");
    t = load_ok(dir);
    ck_assert_uint_eq(ql_tokenizer_vocab_size(t), 4);
    ql_tokenizer_destroy(t);
    write_text(dir, "tokenizer.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 4}, \"merges\": []}}");
    ck_assert_int_eq(ql_tokenizer_load(dir, &t), QL_EFORMAT);
    assert_contains(ql_error_message(), "model.vocab uses id 4 but has only 2 entries");
    ql_remove_tree(dir);
    free(dir);
}
END_TEST

/* Ids the post-processor adds are range-checked before they are narrowed. */
START_TEST(test_post_processor_ids_range)
{
    patched_fails("{\"set\": {\"post_processor\": {\"type\": \"BertProcessing\", \"cls\": [\"<s>\", 4294967297], "
                  "\"sep\": [\"</s>\", 2]}}}",
                  QL_EFORMAT, "BertProcessing needs \"cls\" and \"sep\" as [token, id] with ids from 0 to 2^31-1");
    patched_fails("{\"set\": {\"post_processor\": {\"type\": \"RobertaProcessing\", \"cls\": [\"<s>\", 1], "
                  "\"sep\": [\"</s>\", -2]}}}",
                  QL_EFORMAT, "with ids from 0 to 2^31-1");
}
END_TEST

static void config_fails(const char *dir, const char *name, const char *text, const char *n1, const char *n2)
{
    write_text(dir, name, text);
    ql_tokenizer *t = (ql_tokenizer *)1;
    int rc = ql_tokenizer_load(dir, &t);
    ck_assert_msg(rc == QL_EFORMAT, "%s = %s: got %s (%s)", name, text, ql_status_name(rc), ql_error_message());
    ck_assert_ptr_null(t);
    assert_contains(ql_error_message(), name);
    assert_contains(ql_error_message(), n1);
    if (n2) assert_contains(ql_error_message(), n2);
}

/* config.json's ids and tokenizer_config.json's tokens: a wrong type is an
 * error naming the file and the field, not silently ignored. */
START_TEST(test_config_fields_typed)
{
    char *dir = tmpdir();
    char *src = shared_path("models/stories260K/tokenizer.json"), *dst = join(dir, "tokenizer.json");
    ck_assert_int_eq(ql_copy_file_atomic(src, dst), QL_OK);
    free(src);
    free(dst);
    config_fails(dir, "config.json", "{\"eos_token_id\": \"2\"}", "\"eos_token_id\" must be an integer token id", NULL);
    config_fails(dir, "config.json", "{\"bos_token_id\": 1.0}", "\"bos_token_id\" must be an integer token id", NULL);
    config_fails(dir, "config.json", "{\"bos_token_id\": [1]}", "\"bos_token_id\" must be an integer token id", NULL);
    config_fails(dir, "config.json", "{\"eos_token_id\": [2, \"x\"]}", "\"eos_token_id\" must be an integer", NULL);
    config_fails(dir, "config.json", "{\"eos_token_id\": []}", "\"eos_token_id\" is an empty list", NULL);
    config_fails(dir, "config.json", "{\"eos_token_id\": 512}", "\"eos_token_id\" 512 is not an id of the tokenizer",
                 "512 ids");
    config_fails(dir, "config.json", "{\"bos_token_id\": -1}", "\"bos_token_id\" -1 is not an id", NULL);
    write_text(dir, "config.json", "{\"bos_token_id\": null, \"eos_token_id\": [2, 1]}");
    config_fails(dir, "tokenizer_config.json", "{\"eos_token\": 2}", "\"eos_token\" must be a string or {\"content\": string}",
                 NULL);
    config_fails(dir, "tokenizer_config.json", "{\"bos_token\": {\"content\": 1}}", "\"bos_token\" must be a string", NULL);
    /* null is "not set" */
    write_text(dir, "tokenizer_config.json", "{\"bos_token\": null, \"eos_token\": {\"content\": \"</s>\"}}");
    ql_tokenizer *t = load_ok(dir);
    ck_assert_int_eq(ql_tokenizer_eos(t), 2);
    ql_tokenizer_destroy(t);
    ql_remove_tree(dir);
    free(dir);
}
END_TEST

/* A FIFO in place of tokenizer.json or a config file is refused at once. */
START_TEST(test_fifo_files_refused)
{
    char *dir = tmpdir();
    static const char *const names[] = {"tokenizer.json", "tokenizer_config.json", "config.json"};
    char *src = shared_path("models/stories260K/tokenizer.json");
    for (size_t i = 0; i < 3; i++) {
        char *tj = join(dir, "tokenizer.json");
        unlink(tj);
        if (i) ck_assert_int_eq(ql_copy_file_atomic(src, tj), QL_OK);
        char *p = join(dir, names[i]);
        ck_assert_int_eq(mkfifo(p, 0600), 0);
        ql_tokenizer *t = (ql_tokenizer *)1;
        ck_assert_int_eq(ql_tokenizer_load(dir, &t), QL_EINVAL);
        ck_assert_ptr_null(t);
        assert_contains(ql_error_message(), p);
        assert_contains(ql_error_message(), "is not a regular file");
        unlink(p);
        free(p);
        free(tj);
    }
    free(src);
    ql_remove_tree(dir);
    free(dir);
}
END_TEST

START_TEST(test_bad_text)
{
    /* no byte fallback: bytes that are not UTF-8 have nowhere to go */
    json_t *base = stories_json();
    json_t *patch = json_loads("{\"model\": {\"byte_fallback\": false}}", 0, NULL);
    json_t *j = apply_patch(base, patch);
    char *dir = tmpdir();
    write_json(dir, "tokenizer.json", j);
    ql_tokenizer *t = load_ok(dir);
    int32_t *ids = (int32_t *)1;
    size_t n = 7;
    ck_assert_int_eq(ql_tokenizer_encode(t, "ok \xe6\x97 no", 8, 1, &ids, &n), QL_EINVAL);
    ck_assert_ptr_null(ids);
    ck_assert_uint_eq(n, 0);
    assert_contains(ql_error_message(), "text is not valid UTF-8 (byte 0xE6 at offset 3)");
    encode_ok(t, "ok \xe6\x97\xa5", 6, 1, &ids, &n); /* 日 itself becomes <unk> */
    ck_assert_int_eq(ids[n - 1], 0);
    free(ids);
    ql_tokenizer_destroy(t);
    json_decref(j);
    json_decref(patch);

    /* an unk_token missing from the vocabulary fails when it is needed, as in the library */
    patch = json_loads("{\"model\": {\"byte_fallback\": false, \"unk_token\": \"<nope>\"}}", 0, NULL);
    j = apply_patch(base, patch);
    write_json(dir, "tokenizer.json", j);
    t = load_ok(dir);
    encode_ok(t, "hello", 5, 1, &ids, &n);
    free(ids);
    ck_assert_int_eq(ql_tokenizer_encode(t, "\xe6\x97\xa5", 3, 1, &ids, &n), QL_EFORMAT);
    assert_contains(ql_error_message(), "unk_token '<nope>' is not in the vocabulary");
    ql_tokenizer_destroy(t);
    json_decref(j);
    json_decref(patch);

    /* byte-level models take any byte; decode replaces what is not UTF-8 */
    json_t *bl = json_object_get(ref(), "bytelevel_tokenizer");
    write_json(dir, "tokenizer.json", bl);
    t = load_ok(dir);
    encode_ok(t, "\xff", 1, 0, &ids, &n);
    ck_assert_uint_eq(n, 1);
    ck_assert_int_eq(ids[0], ql_tokenizer_token_id(t, "\xc3\xbf")); /* byte 0xFF is the character ÿ */
    char *s = decode_ok(t, ids, n, 1, NULL);
    ck_assert_str_eq(s, "\xef\xbf\xbd");
    free(s);
    free(ids);
    ql_tokenizer_destroy(t);

    ql_remove_tree(dir);
    free(dir);
    json_decref(base);
}
END_TEST

Suite *tokenizer_suite(void)
{
    Suite *s = suite_create("tokenizer");
    TCase *tc = tcase_create("api");
    tcase_add_test(tc, test_api);
    tcase_add_test(tc, test_invalid_utf8);
    tcase_add_test(tc, test_config_files);
    suite_add_tcase(s, tc);

    tc = tcase_create("reference");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_tricky_strings);
    tcase_add_loop_test(tc, test_dataset, 0, N_DATASETS);
    tcase_add_loop_test(tc, test_variant, 0, (int)n_variants());
    tcase_add_loop_test(tc, test_model_fixture, 0, N_FIXTURES);
    tcase_add_test(tc, test_model_fixture_configs);
    suite_add_tcase(s, tc);

    tc = tcase_create("errors");
    tcase_add_test(tc, test_bad_tokenizer_json);
    tcase_add_test(tc, test_bad_files);
    tcase_add_test(tc, test_bad_text);
    suite_add_tcase(s, tc);

    tc = tcase_create("readers");
    tcase_set_timeout(tc, 30); /* a reader that waits on a FIFO fails by timing out */
    tcase_add_test(tc, test_vocab_ids_bounded_by_entries);
    tcase_add_test(tc, test_post_processor_ids_range);
    tcase_add_test(tc, test_config_fields_typed);
    tcase_add_test(tc, test_config_refusals);
    tcase_add_test(tc, test_fifo_files_refused);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(tokenizer_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
