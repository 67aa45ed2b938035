#include "json_out.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pyfloat.h"
#include "qlora/error.h"
#include "qlora/fs.h"

typedef struct buf {
    char *data;
    size_t len, cap;
    int failed;
} buf;

static void put(buf *b, const char *s, size_t n)
{
    if (b->failed) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 1024;
        while (cap < b->len + n + 1) cap *= 2;
        char *p = realloc(b->data, cap);
        if (!p) {
            b->failed = 1;
            return;
        }
        b->data = p;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

static void puts_(buf *b, const char *s) { put(b, s, strlen(s)); }

static void put_string(buf *b, const char *s)
{
    puts_(b, "\"");
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char esc[8];
        switch (*p) {
        case '"': puts_(b, "\\\""); break;
        case '\\': puts_(b, "\\\\"); break;
        case '\n': puts_(b, "\\n"); break;
        case '\r': puts_(b, "\\r"); break;
        case '\t': puts_(b, "\\t"); break;
        case '\b': puts_(b, "\\b"); break;
        case '\f': puts_(b, "\\f"); break;
        default:
            if (*p < 0x20) {
                snprintf(esc, sizeof esc, "\\u%04x", *p);
                puts_(b, esc);
            } else {
                put(b, (const char *)p, 1);
            }
        }
    }
    puts_(b, "\"");
}

static void newline(buf *b, int indent, int depth)
{
    puts_(b, "\n");
    for (int i = 0; i < indent * depth; i++) puts_(b, " ");
}

static int cmp_key(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

static void dump(buf *b, const json_t *v, int indent, int sort_keys, int depth)
{
    char num[64];
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        size_t n = json_object_size(v);
        if (n == 0) {
            puts_(b, "{}");
            return;
        }
        const char **keys = malloc(n * sizeof *keys);
        if (!keys) {
            b->failed = 1;
            return;
        }
        size_t k = 0;
        const char *key;
        json_t *val;
        json_object_foreach((json_t *)v, key, val) keys[k++] = key;
        if (sort_keys) qsort(keys, n, sizeof *keys, cmp_key);
        puts_(b, "{");
        for (size_t i = 0; i < n; i++) {
            if (i) puts_(b, ",");
            if (indent) newline(b, indent, depth + 1);
            else if (i) puts_(b, " ");
            put_string(b, keys[i]);
            puts_(b, ": ");
            dump(b, json_object_get(v, keys[i]), indent, sort_keys, depth + 1);
        }
        if (indent) newline(b, indent, depth);
        puts_(b, "}");
        free(keys);
        return;
    }
    case JSON_ARRAY: {
        size_t n = json_array_size(v);
        if (n == 0) {
            puts_(b, "[]");
            return;
        }
        puts_(b, "[");
        for (size_t i = 0; i < n; i++) {
            if (i) puts_(b, ",");
            if (indent) newline(b, indent, depth + 1);
            else if (i) puts_(b, " ");
            dump(b, json_array_get(v, i), indent, sort_keys, depth + 1);
        }
        if (indent) newline(b, indent, depth);
        puts_(b, "]");
        return;
    }
    case JSON_STRING: put_string(b, json_string_value(v)); return;
    case JSON_INTEGER:
        snprintf(num, sizeof num, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        puts_(b, num);
        return;
    case JSON_REAL:
        qlp_format_pyfloat(json_real_value(v), num, sizeof num);
        puts_(b, num);
        return;
    case JSON_TRUE: puts_(b, "true"); return;
    case JSON_FALSE: puts_(b, "false"); return;
    case JSON_NULL: puts_(b, "null"); return;
    }
}

char *ql_json_dumps_py(const json_t *v, int indent, int sort_keys)
{
    buf b = {0};
    dump(&b, v, indent, sort_keys, 0);
    if (b.failed) {
        free(b.data);
        return NULL;
    }
    return b.data;
}

json_t *ql_json_float(float f)
{
    char buf[32];
    for (int p = 1; p <= 9; p++) {
        snprintf(buf, sizeof buf, "%.*g", p, (double)f);
        if (strtof(buf, NULL) == f) break;
    }
    return json_real(strtod(buf, NULL));
}

/* Is the integer literal d[0..n) (digits only) beyond json_int_t? */
static int int_overflows(const char *d, size_t n, int negative)
{
    static const char max[] = "9223372036854775807", min[] = "9223372036854775808";
    const char *lim = negative ? min : max;
    while (n > 1 && d[0] == '0') d++, n--;
    if (n != sizeof max - 1) return n > sizeof max - 1;
    return memcmp(d, lim, n) > 0;
}

/* End of the number literal starting at i (sign, digits, fraction,
 * exponent); *big when it is an integer beyond json_int_t. */
static size_t number_end(const char *text, size_t len, size_t i, int *big)
{
    size_t s = i + (text[i] == '-'), e = s;
    while (e < len && text[e] >= '0' && text[e] <= '9') e++;
    int is_int = e == len || (text[e] != '.' && text[e] != 'e' && text[e] != 'E');
    *big = is_int && e > s && int_overflows(text + s, e - s, text[i] == '-');
    while (e < len && (text[e] == '.' || text[e] == 'e' || text[e] == 'E' || text[e] == '+' || text[e] == '-' ||
                       (text[e] >= '0' && text[e] <= '9')))
        e++;
    return e;
}

json_t *ql_json_loadb(const char *text, size_t len, size_t flags, json_error_t *err)
{
    /* first pass: count the integer literals (outside strings) that overflow */
    size_t extra = 0;
    int in_str = 0, big;
    for (size_t i = 0; i < len; i++) {
        char c = text[i];
        if (in_str) {
            if (c == '\\') i++;
            else if (c == '"') in_str = 0;
        } else if (c == '"') {
            in_str = 1;
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            i = number_end(text, len, i, &big) - 1;
            extra += big ? 2 : 0;
        }
    }
    if (!extra) return json_loadb(text, len, flags, err);
    /* second pass: copy, appending ".0" to each of them */
    char *t = malloc(len + extra);
    if (!t) {
        if (err) {
            memset(err, 0, sizeof *err);
            snprintf(err->text, sizeof err->text, "out of memory");
        }
        return NULL;
    }
    size_t o = 0;
    in_str = 0;
    for (size_t i = 0; i < len; i++) {
        char c = text[i];
        if (!in_str && (c == '-' || (c >= '0' && c <= '9'))) {
            size_t e = number_end(text, len, i, &big);
            memcpy(t + o, text + i, e - i);
            o += e - i;
            if (big) t[o++] = '.', t[o++] = '0';
            i = e - 1;
            continue;
        }
        t[o++] = c;
        if (in_str && c == '\\' && i + 1 < len) t[o++] = text[++i];
        else if (c == '"') in_str = !in_str;
    }
    json_t *j = json_loadb(t, o, flags, err);
    free(t);
    return j;
}

json_t *ql_json_load_path(const char *path, size_t flags, json_error_t *err)
{
    char *text;
    size_t len;
    if (ql_read_file(path, &text, &len) != QL_OK) {
        if (err) {
            memset(err, 0, sizeof *err);
            snprintf(err->text, sizeof err->text, "%s", ql_error_message());
        }
        return NULL;
    }
    json_t *j = ql_json_loadb(text, len, flags, err);
    free(text);
    return j;
}
