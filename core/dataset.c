#include "qlora/dataset.h"

#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ops_backward.h"
#include "qlora/error.h"
#include "qlora/fs.h"

/* ---- format names ---- */

static const struct {
    const char *name;
    ql_data_format fmt;
} format_names[] = {
    {"alpaca", QL_FMT_ALPACA},
    {"input-output", QL_FMT_INPUT_OUTPUT},
    {"self-instruct", QL_FMT_INPUT_OUTPUT},
    {"oasst1", QL_FMT_OASST1},
    {"text", QL_FMT_TEXT},
};

int ql_data_format_parse(const char *name, ql_data_format *out)
{
    for (size_t i = 0; name && i < sizeof format_names / sizeof format_names[0]; i++)
        if (!strcmp(name, format_names[i].name)) {
            *out = format_names[i].fmt;
            return QL_OK;
        }
    return ql_error(QL_EINVAL, "unknown dataset format '%s' (valid: alpaca, input-output, oasst1, text; "
                               "self-instruct is read as input-output)", name ? name : "(null)");
}

const char *ql_data_format_name(ql_data_format fmt)
{
    switch (fmt) {
    case QL_FMT_ALPACA: return "alpaca";
    case QL_FMT_INPUT_OUTPUT: return "input-output";
    case QL_FMT_OASST1: return "oasst1";
    case QL_FMT_TEXT: return "text";
    }
    return "?";
}

/* ---- strings ---- */

typedef struct strbuf {
    char *p;
    size_t len, cap;
    int oom;
} strbuf;

static void sb_add(strbuf *b, const char *s, size_t n)
{
    if (b->oom) return;
    if (n > (SIZE_MAX >> 2) || b->len > (SIZE_MAX >> 2)) { /* also tells the compiler the sizes are sane */
        b->oom = 1;
        return;
    }
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_adds(strbuf *b, const char *s) { sb_add(b, s, strlen(s)); }

/* Take the string (never NULL unless out of memory). */
static char *sb_take(strbuf *b)
{
    if (!b->oom && !b->p) sb_add(b, "", 0);
    if (b->oom) {
        free(b->p);
        return NULL;
    }
    return b->p;
}

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\v' || c == '\f'; }

/* ---- records -> (source, target) ---- */

/* The Alpaca prompts of qlora.py (ALPACA_PROMPT_DICT). */
static const char alpaca_head_input[] =
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n";
static const char alpaca_head_no_input[] =
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n";

/* Called once per example a record yields; texts are not NUL-free-checked
 * (jansson refuses \u0000 unless asked). */
typedef int (*emit_fn)(void *ctx, const char *where, const char *src, size_t src_len, const char *tgt, size_t tgt_len);

static const char *json_kind(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER:
    case JSON_REAL: return "a number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    }
    return "?";
}

/* A string field: missing is an error when `required`, else "". */
static int get_string(const json_t *rec, const char *field, int required, const char *where, const char **s, size_t *n)
{
    const json_t *v = json_object_get(rec, field);
    *s = "";
    *n = 0;
    if (!v) return required ? ql_error(QL_EFORMAT, "%s: missing field \"%s\"", where, field) : QL_OK;
    if (!json_is_string(v))
        return ql_error(QL_EFORMAT, "%s: field \"%s\" is %s, not a string", where, field, json_kind(v));
    *s = json_string_value(v);
    *n = json_string_length(v);
    return QL_OK;
}

static int emit_owned(emit_fn emit, void *ctx, const char *where, strbuf *src, const char *tgt, size_t tgt_len)
{
    char *s = sb_take(src);
    if (!s) return ql_error(QL_ENOMEM, "out of memory formatting %s", where);
    int rc = emit(ctx, where, s, src->len, tgt, tgt_len);
    free(s);
    return rc;
}

static int alpaca_record(const json_t *rec, const char *where, emit_fn emit, void *ctx)
{
    const char *ins, *inp, *out;
    size_t ins_n, inp_n, out_n;
    int rc;
    if ((rc = get_string(rec, "instruction", 1, where, &ins, &ins_n)) || (rc = get_string(rec, "input", 0, where, &inp, &inp_n)) ||
        (rc = get_string(rec, "output", 1, where, &out, &out_n)))
        return rc;
    strbuf src = {0};
    sb_adds(&src, inp_n ? alpaca_head_input : alpaca_head_no_input);
    sb_add(&src, ins, ins_n);
    if (inp_n) {
        sb_adds(&src, "\n\n### Input:\n");
        sb_add(&src, inp, inp_n);
    }
    sb_adds(&src, "\n\n### Response: ");
    return emit_owned(emit, ctx, where, &src, out, out_n);
}

/* Self-instruct: one example per instance.  qlora.py reads self-instruct as
 * prompt/completion columns; the released user_oriented_instructions.jsonl
 * has {instruction, instances[{input, output}]}, so we chose
 * source = instruction + ("\n" + input if input is non-empty), target = output. */
static int self_instruct_record(const json_t *rec, const char *where, emit_fn emit, void *ctx)
{
    const char *ins;
    size_t ins_n;
    int rc = get_string(rec, "instruction", 1, where, &ins, &ins_n);
    if (rc) return rc;
    const json_t *instances = json_object_get(rec, "instances");
    if (!json_is_array(instances))
        return ql_error(QL_EFORMAT, "%s: field \"instances\" is %s, not an array", where, json_kind(instances));
    for (size_t k = 0; k < json_array_size(instances); k++) {
        char at[512];
        snprintf(at, sizeof at, "%s: instances[%zu]", where, k);
        const json_t *inst = json_array_get(instances, k);
        if (!json_is_object(inst)) return ql_error(QL_EFORMAT, "%s: expected an object, found %s", at, json_kind(inst));
        const char *inp, *out;
        size_t inp_n, out_n;
        if ((rc = get_string(inst, "input", 1, at, &inp, &inp_n)) || (rc = get_string(inst, "output", 1, at, &out, &out_n)))
            return rc;
        strbuf src = {0};
        sb_add(&src, ins, ins_n);
        if (inp_n) {
            sb_adds(&src, "\n");
            sb_add(&src, inp, inp_n);
        }
        if ((rc = emit_owned(emit, ctx, at, &src, out, out_n))) return rc;
    }
    return QL_OK;
}

static int json_record(ql_data_format fmt, const json_t *rec, const char *where, emit_fn emit, void *ctx)
{
    if (!json_is_object(rec)) return ql_error(QL_EFORMAT, "%s: expected a JSON object, found %s", where, json_kind(rec));
    const char *src, *tgt;
    size_t src_n, tgt_n;
    int rc;
    switch (fmt) {
    case QL_FMT_ALPACA: return alpaca_record(rec, where, emit, ctx);
    case QL_FMT_INPUT_OUTPUT:
        if (json_object_get(rec, "instances")) return self_instruct_record(rec, where, emit, ctx);
        /* qlora.py's self-instruct columns, which it renames to input/output */
        if (!json_object_get(rec, "input") && !json_object_get(rec, "output") &&
            (json_object_get(rec, "prompt") || json_object_get(rec, "completion"))) {
            if ((rc = get_string(rec, "prompt", 1, where, &src, &src_n)) ||
                (rc = get_string(rec, "completion", 1, where, &tgt, &tgt_n)))
                return rc;
            return emit(ctx, where, src, src_n, tgt, tgt_n);
        }
        break;
    case QL_FMT_OASST1:
        /* qlora.py's Guanaco records are {"text": whole conversation} -> all target. */
        if (!json_object_get(rec, "input") && !json_object_get(rec, "output") && json_object_get(rec, "text")) {
            if ((rc = get_string(rec, "text", 1, where, &tgt, &tgt_n))) return rc;
            return emit(ctx, where, "", 0, tgt, tgt_n);
        }
        break;
    case QL_FMT_TEXT: return ql_error(QL_EINTERNAL, "text is not a JSON format");
    }
    if ((rc = get_string(rec, "input", 1, where, &src, &src_n)) || (rc = get_string(rec, "output", 1, where, &tgt, &tgt_n)))
        return rc;
    return emit(ctx, where, src, src_n, tgt, tgt_n);
}

/* ---- format_example ---- */

typedef struct collect {
    size_t count;
    char *src, *tgt;
} collect;

static char *dup_n(const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

static int collect_emit(void *ctx, const char *where, const char *src, size_t src_n, const char *tgt, size_t tgt_n)
{
    collect *c = ctx;
    if (c->count++ > 0) return QL_OK;
    c->src = dup_n(src, src_n);
    c->tgt = dup_n(tgt, tgt_n);
    if (!c->src || !c->tgt) return ql_error(QL_ENOMEM, "out of memory formatting %s", where);
    return QL_OK;
}

/* The text of one `text` example: verbatim but for CRLF line ends (no
 * trimming: shared/README.md's reference NLL keeps trailing spaces). */
static char *clean_text(const char *s, size_t n, size_t *out_n)
{
    char *p = malloc(n + 1);
    if (!p) return NULL;
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (!(s[i] == '\r' && (i + 1 == n || s[i + 1] == '\n'))) p[k++] = s[i];
    p[k] = '\0';
    *out_n = k;
    return p;
}

int ql_dataset_format_example(ql_data_format fmt, const char *record, char **source, char **target)
{
    *source = *target = NULL;
    if (!record) return ql_error(QL_EINVAL, "no record given");
    if (fmt == QL_FMT_TEXT) {
        size_t n;
        *target = clean_text(record, strlen(record), &n);
        *source = strdup("");
        if (!*source || !*target) {
            free(*source);
            free(*target);
            *source = *target = NULL;
            return ql_error(QL_ENOMEM, "out of memory");
        }
        return QL_OK;
    }
    json_error_t err;
    json_t *rec = json_loads(record, 0, &err);
    if (!rec) return ql_error(QL_EFORMAT, "record is not valid JSON: %s (line %d, column %d)", err.text, err.line, err.column);
    collect c = {0};
    int rc = json_record(fmt, rec, "record", collect_emit, &c);
    json_decref(rec);
    if (!rc && c.count != 1)
        rc = ql_error(QL_EINVAL, "record yields %zu examples (one per instance); format_example takes records with one", c.count);
    if (rc) {
        free(c.src);
        free(c.tgt);
        return rc;
    }
    *source = c.src;
    *target = c.tgt;
    return QL_OK;
}

/* ---- tokenization into the dataset ---- */

typedef struct pending {
    size_t offset; /* into storage: ids at offset, labels at offset + len */
    int32_t len, n_source;
} pending;

typedef struct builder {
    const char *path;
    const ql_tokenizer *tok;
    const ql_dataset_opts *opts;
    size_t limit; /* SIZE_MAX: all */
    pending *ex;
    size_t n, cap;
    int32_t *storage;
    size_t used, storage_cap;
    size_t n_read, n_truncated, n_dropped;
    int64_t total, total_target;
} builder;

static int full(const builder *b) { return b->n_read >= b->limit; }

static int encode(const builder *b, const char *where, const char *s, size_t n, int32_t **ids, size_t *count)
{
    *ids = NULL;
    *count = 0;
    if (n == 0) return QL_OK;
    int rc = ql_tokenizer_encode(b->tok, s, n, 0, ids, count);
    if (rc) return ql_error_context("%s: tokenizing", where);
    return QL_OK;
}

static int reserve(builder *b, size_t tokens)
{
    if (b->n == b->cap) {
        size_t cap = b->cap ? 2 * b->cap : 1024;
        pending *p = realloc(b->ex, cap * sizeof *p);
        if (!p) return ql_error(QL_ENOMEM, "out of memory reading %s", b->path);
        b->ex = p;
        b->cap = cap;
    }
    if (b->used + 2 * tokens > b->storage_cap) {
        size_t cap = b->storage_cap ? b->storage_cap : 1 << 16;
        while (cap < b->used + 2 * tokens) cap *= 2;
        int32_t *p = realloc(b->storage, cap * sizeof *p);
        if (!p) return ql_error(QL_ENOMEM, "out of memory reading %s", b->path);
        b->storage = p;
        b->storage_cap = cap;
    }
    return QL_OK;
}

static size_t cap_len(size_t n, int limit) { return limit > 0 && n > (size_t)limit ? (size_t)limit : n; }

/* Lay out one example: `src` tokens after BOS form the source (has_source:
 * instruction formats; else a `text` example, BOS + tgt with no EOS). */
static int add_tokens(builder *b, const char *where, int has_source, const int32_t *src, size_t ns, const int32_t *tgt, size_t nt)
{
    const ql_dataset_opts *o = b->opts;
    int32_t bos = ql_tokenizer_bos(b->tok), eos = ql_tokenizer_eos(b->tok);
    size_t src_full = has_source ? 1 + ns : 0, tgt_full = has_source ? nt + 1 : 1 + nt;
    size_t src_keep = has_source ? cap_len(src_full, o->source_max_len) : 0;
    size_t tgt_keep = has_source ? cap_len(tgt_full, o->target_max_len) : tgt_full;
    size_t len = cap_len(src_keep + tgt_keep, o->max_len);
    size_t n_source = src_keep < len ? src_keep : len;
    int truncated = src_keep < src_full || tgt_keep < tgt_full || len < src_keep + tgt_keep;
    /* Position 0 is never predicted, so a `text` example's BOS does not count. */
    size_t first_target = n_source > 0 ? n_source : 1;
    size_t target = len > first_target ? len - first_target : 0;
    size_t labelled = o->train_on_source && len > 1 ? len - 1 : target;
    b->n_read++;
    if (target == 0) {
        b->n_dropped++;
        return QL_OK;
    }
    if (len > INT32_MAX) return ql_error(QL_EINVAL, "%s: example of %zu tokens is too long (set max_len)", where, len);
    int rc = reserve(b, len);
    if (rc) return rc;
    int32_t *ids = b->storage + b->used, *labels = ids + len;
    for (size_t p = 0; p < len; p++) {
        if (has_source)
            ids[p] = p < src_keep ? (p == 0 ? bos : src[p - 1]) : (p - src_keep < nt ? tgt[p - src_keep] : eos);
        else
            ids[p] = p == 0 ? bos : tgt[p - 1];
        labels[p] = p < n_source && !o->train_on_source ? QL_IGNORE_INDEX : ids[p];
    }
    b->ex[b->n++] = (pending){.offset = b->used, .len = (int32_t)len, .n_source = (int32_t)n_source};
    b->used += 2 * len;
    b->n_truncated += truncated;
    b->total += (int64_t)len;
    b->total_target += (int64_t)labelled;
    return QL_OK;
}

static int builder_emit(void *ctx, const char *where, const char *src, size_t src_n, const char *tgt, size_t tgt_n)
{
    builder *b = ctx;
    if (full(b)) return QL_OK;
    int32_t *s = NULL, *t = NULL;
    size_t ns = 0, nt = 0;
    int rc = encode(b, where, src, src_n, &s, &ns);
    if (!rc) rc = encode(b, where, tgt, tgt_n, &t, &nt);
    if (!rc) rc = add_tokens(b, where, 1, s, ns, t, nt);
    free(s);
    free(t);
    return rc;
}

static int add_text(builder *b, const char *where, const char *text, size_t n)
{
    size_t clean_n;
    char *clean = clean_text(text, n, &clean_n);
    if (!clean) return ql_error(QL_ENOMEM, "out of memory reading %s", b->path);
    int32_t *t = NULL;
    size_t nt = 0;
    int rc = encode(b, where, clean, clean_n, &t, &nt);
    if (!rc) rc = add_tokens(b, where, 0, NULL, 0, t, nt);
    free(t);
    free(clean);
    return rc;
}

/* ---- file readers ---- */

static int line_blank(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!is_space(s[i])) return 0;
    return 1;
}

/* Examples are runs of lines separated by one or more blank (empty or
 * whitespace-only) lines, kept verbatim from the first to the last line. */
static int read_text(builder *b, const char *data, size_t len)
{
    size_t pos = 0, line = 0, start = 0, start_line = 0, end = 0;
    int in_example = 0;
    while (pos <= len && !full(b)) {
        const char *nl = pos < len ? memchr(data + pos, '\n', len - pos) : NULL;
        size_t eol = nl ? (size_t)(nl - data) : len;
        line++;
        int blank = line_blank(data + pos, eol - pos);
        if (!blank && !in_example) {
            in_example = 1;
            start = pos;
            start_line = line;
        }
        if (!blank) end = eol;
        if ((blank || !nl) && in_example) {
            char where[4200];
            snprintf(where, sizeof where, "%s: line %zu", b->path, start_line);
            int rc = add_text(b, where, data + start, end - start);
            if (rc) return rc;
            in_example = 0;
        }
        if (!nl) break;
        pos = eol + 1;
    }
    return QL_OK;
}

static int read_json_array(builder *b, const char *data, size_t len)
{
    json_error_t err;
    json_t *root = json_loadb(data, len, 0, &err);
    if (!root)
        return ql_error(QL_EFORMAT, "%s: not valid JSON: %s (line %d, column %d)", b->path, err.text, err.line, err.column);
    int rc = QL_OK;
    if (!json_is_array(root)) {
        rc = ql_error(QL_EFORMAT, "%s: expected a JSON array of records, found %s", b->path, json_kind(root));
    } else {
        for (size_t i = 0; i < json_array_size(root) && !rc && !full(b); i++) {
            char where[4200];
            snprintf(where, sizeof where, "%s: record index %zu", b->path, i);
            rc = json_record(b->opts->format, json_array_get(root, i), where, builder_emit, b);
        }
    }
    json_decref(root);
    return rc;
}

static int read_json_lines(builder *b, const char *data, size_t len)
{
    size_t pos = 0, line = 0, records = 0;
    while (pos < len && !full(b)) {
        const char *nl = memchr(data + pos, '\n', len - pos);
        size_t eol = nl ? (size_t)(nl - data) : len;
        line++;
        char where[4200];
        snprintf(where, sizeof where, "%s: line %zu", b->path, line);
        if (!line_blank(data + pos, eol - pos)) {
            json_error_t err;
            json_t *rec = json_loadb(data + pos, eol - pos, 0, &err);
            if (!rec)
                return ql_error(QL_EFORMAT, "%s: not valid JSON: %s (column %d)%s", where, err.text, err.column,
                                records ? "" : "; the file is read as JSON Lines (one record per line) since it does not "
                                               "start with '['");
            records++;
            int rc = json_record(b->opts->format, rec, where, builder_emit, b);
            json_decref(rec);
            if (rc) return rc;
        }
        pos = eol + 1;
    }
    return QL_OK;
}

static int read_any(builder *b, const char *data, size_t len)
{
    if (len >= 3 && !memcmp(data, "\xEF\xBB\xBF", 3)) data += 3, len -= 3; /* UTF-8 byte order mark */
    if (b->opts->format == QL_FMT_TEXT) return read_text(b, data, len);
    size_t i = 0;
    while (i < len && is_space(data[i])) i++;
    return i < len && data[i] == '[' ? read_json_array(b, data, len) : read_json_lines(b, data, len);
}

static int check_opts(const ql_dataset_opts *o)
{
    switch (o->format) {
    case QL_FMT_ALPACA:
    case QL_FMT_INPUT_OUTPUT:
    case QL_FMT_OASST1:
    case QL_FMT_TEXT: return QL_OK;
    }
    return ql_error(QL_EINVAL, "unknown dataset format id %d", (int)o->format);
}

int ql_dataset_load(const char *path, const ql_tokenizer *tok, const ql_dataset_opts *opts, ql_dataset **out)
{
    *out = NULL;
    if (!path || !tok || !opts) return ql_error(QL_EINVAL, "ql_dataset_load: path, tokenizer and options are required");
    int rc = check_opts(opts);
    if (rc) return rc;
    if (ql_tokenizer_bos(tok) < 0 || ql_tokenizer_eos(tok) < 0)
        return ql_error(QL_EINVAL, "the tokenizer has no %s token, which every example needs",
                        ql_tokenizer_bos(tok) < 0 ? "BOS" : "EOS");
    if (ql_is_dir(path)) return ql_error(QL_EINVAL, "dataset %s is a folder; give the file", path);
    char *data;
    size_t len;
    if ((rc = ql_read_file(path, &data, &len))) return ql_error_context("reading the dataset");

    builder b = {.path = path, .tok = tok, .opts = opts, .limit = opts->max_examples > 0 ? (size_t)opts->max_examples : SIZE_MAX};
    rc = read_any(&b, data, len);
    free(data);
    if (!rc && b.n_read == 0)
        rc = ql_error(QL_EFORMAT, "%s: no examples left after filtering: 0 read, 0 dropped (the file holds no %s)", path,
                      opts->format == QL_FMT_TEXT ? "text" : "records");
    else if (!rc && b.n == 0)
        rc = ql_error(QL_EINVAL, "%s: no examples left after filtering: %zu read, %zu dropped with no target token left after "
                                 "truncation (%s)",
                      path, b.n_read, b.n_dropped,
                      opts->format == QL_FMT_TEXT ? "raise max_len" : "raise max_len or target_max_len, or lower source_max_len");
    ql_dataset *d = NULL;
    if (!rc && !(d = calloc(1, sizeof *d))) rc = ql_error(QL_ENOMEM, "out of memory");
    if (!rc && !(d->examples = malloc(b.n * sizeof *d->examples))) rc = ql_error(QL_ENOMEM, "out of memory");
    if (rc) {
        free(d);
        free(b.ex);
        free(b.storage);
        return rc;
    }
    d->storage = b.storage;
    for (size_t i = 0; i < b.n; i++)
        d->examples[i] = (ql_example){.ids = b.storage + b.ex[i].offset, .labels = b.storage + b.ex[i].offset + (size_t)b.ex[i].len,
                                      .len = b.ex[i].len, .n_source = b.ex[i].n_source};
    free(b.ex);
    d->n = b.n;
    d->n_read = b.n_read;
    d->n_truncated = b.n_truncated;
    d->n_dropped_empty = b.n_dropped;
    d->total_tokens = b.total;
    d->total_target_tokens = b.total_target;
    *out = d;
    return QL_OK;
}

void ql_dataset_destroy(ql_dataset *d)
{
    if (!d) return;
    free(d->examples);
    free(d->storage);
    free(d);
}

/* ---- epoch order ---- */

typedef struct sort_item {
    int32_t len;
    size_t pos, idx;
} sort_item;

static int cmp_longest_first(const void *pa, const void *pb)
{
    const sort_item *a = pa, *b = pb;
    if (a->len != b->len) return a->len > b->len ? -1 : 1;
    return a->pos < b->pos ? -1 : a->pos > b->pos; /* stable, like Python's sorted */
}

int ql_dataset_order(const ql_dataset *d, int64_t seed, int group_by_length, int batch_size, size_t *order)
{
    if (!d || !order) return ql_error(QL_EINVAL, "ql_dataset_order: dataset and order are required");
    if (group_by_length && batch_size <= 0)
        return ql_error(QL_EINVAL, "group_by_length needs a batch size >= 1 (got %d)", batch_size);
    size_t n = d->n;
    for (size_t i = 0; i < n; i++) order[i] = i;
    if (seed >= 0) {
        uint64_t state = (uint64_t)seed;
        for (size_t i = n; i > 1; i--) {
            size_t j = (size_t)ql_uniform_below(&state, i);
            size_t t = order[i - 1];
            order[i - 1] = order[j];
            order[j] = t;
        }
    }
    if (!group_by_length || n == 0) return QL_OK;

    size_t mult = n / ((size_t)batch_size * 4);
    if (mult > 50) mult = 50;
    if (mult < 1) mult = 1;
    size_t mega = mult * (size_t)batch_size;
    sort_item *items = malloc((mega < n ? mega : n) * sizeof *items);
    if (!items) return ql_error(QL_ENOMEM, "out of memory");
    size_t longest_at = 0; /* the first of the mega-batch whose first is longest */
    for (size_t start = 0; start < n; start += mega) {
        size_t m = n - start < mega ? n - start : mega;
        for (size_t k = 0; k < m; k++)
            items[k] = (sort_item){.len = d->examples[order[start + k]].len, .pos = k, .idx = order[start + k]};
        qsort(items, m, sizeof *items, cmp_longest_first);
        for (size_t k = 0; k < m; k++) order[start + k] = items[k].idx;
        if (d->examples[order[start]].len > d->examples[order[longest_at]].len) longest_at = start;
    }
    free(items);
    size_t t = order[0];
    order[0] = order[longest_at];
    order[longest_at] = t;
    return QL_OK;
}

/* ---- held-out split ---- */

static int cmp_size(const void *a, const void *b)
{
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return (x > y) - (x < y);
}

/* A view of d's examples idx[0..n): d keeps the storage. */
static int dataset_view(const ql_dataset *d, const size_t *idx, size_t n, ql_dataset **out)
{
    ql_dataset *v = calloc(1, sizeof *v);
    if (!v || !(v->examples = malloc((n ? n : 1) * sizeof *v->examples))) {
        free(v);
        return ql_error(QL_ENOMEM, "out of memory");
    }
    for (size_t i = 0; i < n; i++) {
        const ql_example *e = &d->examples[idx[i]];
        v->examples[i] = *e;
        v->total_tokens += e->len;
        for (int32_t t = 1; t < e->len; t++) v->total_target_tokens += e->labels[t] != QL_IGNORE_INDEX;
    }
    v->n = v->n_read = n;
    *out = v;
    return QL_OK;
}

int ql_dataset_split(const ql_dataset *d, size_t n_eval, int64_t seed, ql_dataset **train, ql_dataset **eval)
{
    *train = *eval = NULL;
    if (!d) return ql_error(QL_EINVAL, "ql_dataset_split: no dataset");
    if (n_eval < 1 || n_eval >= d->n)
        return ql_error(QL_EINVAL, "holding out %zu of %zu examples leaves %s", n_eval, d->n,
                        n_eval < 1 ? "nothing to evaluate" : "nothing to train on");
    size_t *order = malloc(d->n * sizeof *order);
    if (!order) return ql_error(QL_ENOMEM, "out of memory");
    int rc = ql_dataset_order(d, seed, 0, 1, order);
    if (rc == QL_OK) {
        qsort(order, n_eval, sizeof *order, cmp_size);
        qsort(order + n_eval, d->n - n_eval, sizeof *order, cmp_size);
        rc = dataset_view(d, order, n_eval, eval);
    }
    if (rc == QL_OK && (rc = dataset_view(d, order + n_eval, d->n - n_eval, train))) {
        ql_dataset_destroy(*eval);
        *eval = NULL;
    }
    free(order);
    return rc;
}

/* ---- format detection ---- */

/* The format a record's fields mean, with the fields named in `why`; -1: none */
static int record_format(const json_t *rec, const char **why)
{
    static const struct {
        const char *a, *b;
        ql_data_format fmt;
    } rules[] = {
        {"instruction", "output", QL_FMT_ALPACA},
        {"instruction", "instances", QL_FMT_INPUT_OUTPUT},
        {"input", "output", QL_FMT_INPUT_OUTPUT},
        {"prompt", "completion", QL_FMT_INPUT_OUTPUT},
        {"text", NULL, QL_FMT_OASST1},
    };
    static const char *const whys[] = {"\"instruction\" and \"output\"", "\"instruction\" and \"instances\"",
                                       "\"input\" and \"output\"", "\"prompt\" and \"completion\"", "\"text\""};
    if (!json_is_object(rec)) return -1;
    for (size_t i = 0; i < sizeof rules / sizeof rules[0]; i++)
        if (json_object_get(rec, rules[i].a) && (!rules[i].b || json_object_get(rec, rules[i].b))) {
            *why = whys[i];
            return (int)rules[i].fmt;
        }
    return -1;
}

/* what format detection knows, for its refusals */
#define KNOWN_FORMATS                                                                                        \
    "none of instruction/output (alpaca), input/output, prompt/completion, instruction/instances (input-output) " \
    "or text (oasst1)"

/* The first fields of a record, for a refusal: "a", "b", ... */
static void field_names(const json_t *rec, char *buf, size_t cap)
{
    const char *key;
    json_t *v;
    size_t k = 0, n = 0;
    buf[0] = '\0';
    if (!json_is_object(rec)) {
        snprintf(buf, cap, "%s, not an object", json_kind(rec));
        return;
    }
    json_object_foreach((json_t *)rec, key, v) {
        if (n++ == 6) {
            k += (size_t)snprintf(buf + k, k < cap ? cap - k : 0, ", ...");
            break;
        }
        k += (size_t)snprintf(buf + k, k < cap ? cap - k : 0, "%s\"%.40s\"", n > 1 ? ", " : "", key);
        if (k >= cap) break;
    }
    if (n == 0) snprintf(buf, cap, "no fields");
}

int ql_data_format_detect(const char *path, ql_data_format *out, char *why, size_t cap)
{
    if (!path || !out) return ql_error(QL_EINVAL, "ql_data_format_detect: path and out are required");
    if (ql_is_dir(path)) return ql_error(QL_EINVAL, "dataset %s is a folder; give the file", path);
    char *data;
    size_t len;
    int rc = ql_read_file(path, &data, &len);
    if (rc) return ql_error_context("reading the dataset");
    const char *p = data;
    size_t n = len;
    if (n >= 3 && !memcmp(p, "\xEF\xBB\xBF", 3)) p += 3, n -= 3;
    size_t i = 0;
    while (i < n && is_space(p[i])) i++;
    const char *fix = "give --format alpaca, input-output, oasst1 or text";
    char fields[320];
    const char *rule = NULL;
    json_error_t err;
    int fmt = -1;
    if (i == n) {
        rc = ql_error(QL_EFORMAT, "%s is empty: no format to detect, and nothing to read", path);
    } else if (p[i] == '[') {
        json_t *root = json_loadb(p, n, 0, &err);
        if (!root)
            rc = ql_error(QL_EFORMAT, "%s starts with '[' but is not valid JSON: %s (line %d, column %d); %s", path,
                          err.text, err.line, err.column, fix);
        else if (!json_is_array(root) || json_array_size(root) == 0)
            rc = ql_error(QL_EFORMAT, "%s: expected a JSON array of records, found %s", path,
                          json_is_array(root) ? "an empty array" : json_kind(root));
        else if ((fmt = record_format(json_array_get(root, 0), &rule)) < 0) {
            field_names(json_array_get(root, 0), fields, sizeof fields);
            rc = ql_error(QL_EFORMAT, "%s: cannot tell the format: record index 0 has %s, " KNOWN_FORMATS, path, fields);
        } else if (why)
            snprintf(why, cap, "a JSON array whose first record has %s", rule);
        json_decref(root);
    } else if (p[i] == '{') {
        size_t eol = i;
        while (eol < n && p[eol] != '\n') eol++;
        json_t *rec = json_loadb(p + i, eol - i, 0, &err);
        if (!rec)
            rc = ql_error(QL_EFORMAT, "%s starts with '{' but its first line is not a JSON record: %s (column %d); %s",
                          path, err.text, err.column, fix);
        else if ((fmt = record_format(rec, &rule)) < 0) {
            field_names(rec, fields, sizeof fields);
            rc = ql_error(QL_EFORMAT, "%s: cannot tell the format: the first JSON line has %s, " KNOWN_FORMATS, path,
                          fields);
        } else if (why)
            snprintf(why, cap, "JSON Lines whose first record has %s", rule);
        json_decref(rec);
    } else {
        fmt = QL_FMT_TEXT;
        if (why) snprintf(why, cap, "plain text (not JSON)");
    }
    free(data);
    if (rc == QL_OK) *out = (ql_data_format)fmt;
    return rc;
}
