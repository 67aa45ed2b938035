#include "qlora/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qlora/dtype.h"
#include "qlora/error.h"
#include "qlora/fs.h"

/* Headers larger than this are refused rather than parsed (safetensors' own limit). */
#define ST_MAX_HEADER (100u * 1024u * 1024u)

struct ql_st_file {
    char *path;
    void *map;
    uint64_t size;
    ql_tensor *tensors; /* sorted by data offset */
    size_t count;
    size_t *by_name; /* indices sorted by name */
    char **meta_keys;
    char **meta_values;
    size_t meta_count;
};

typedef struct span {
    uint64_t begin, end;
    size_t index;
} span;

static int cmp_span(const void *a, const void *b)
{
    const span *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

static const ql_tensor *sort_base;
static int cmp_name_index(const void *a, const void *b)
{
    return strcmp(sort_base[*(const size_t *)a].name, sort_base[*(const size_t *)b].name);
}

static int bad(const char *path, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int bad(const char *path, const char *fmt, ...)
{
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return ql_error(QL_EFORMAT, "%s: not a valid safetensors file: %s", path, msg);
}

static int get_u64(json_t *v, uint64_t *out)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0) return -1;
    *out = (uint64_t)json_integer_value(v);
    return 0;
}

static int parse_header(ql_st_file *f, const char *text, uint64_t hlen, uint64_t data_len, const uint8_t *data)
{
    json_error_t jerr;
    json_t *root = json_loadb(text, hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) return bad(f->path, "header is not JSON (%s at line %d, column %d)", jerr.text, jerr.line, jerr.column);
    int rc = QL_OK;
    span *spans = NULL;
    if (!json_is_object(root)) {
        rc = bad(f->path, "header is not a JSON object");
        goto done;
    }
    size_t n = json_object_size(root);
    f->tensors = calloc(n ? n : 1, sizeof *f->tensors);
    spans = calloc(n ? n : 1, sizeof *spans);
    if (!f->tensors || !spans) {
        rc = ql_error(QL_ENOMEM, "out of memory reading %s", f->path);
        goto done;
    }
    const char *key;
    json_t *val;
    size_t count = 0;
    json_object_foreach(root, key, val) {
        if (strcmp(key, "__metadata__") == 0) {
            if (!json_is_object(val)) {
                rc = bad(f->path, "__metadata__ is not an object");
                goto done;
            }
            size_t m = json_object_size(val);
            f->meta_keys = calloc(m ? m : 1, sizeof(char *));
            f->meta_values = calloc(m ? m : 1, sizeof(char *));
            if (!f->meta_keys || !f->meta_values) {
                rc = ql_error(QL_ENOMEM, "out of memory");
                goto done;
            }
            const char *mk;
            json_t *mv;
            json_object_foreach(val, mk, mv) {
                if (!json_is_string(mv)) {
                    rc = bad(f->path, "__metadata__ value of '%s' is not a string", mk);
                    goto done;
                }
                char *k = strdup(mk), *v = strdup(json_string_value(mv));
                if (!k || !v) {
                    free(k);
                    free(v);
                    rc = ql_error(QL_ENOMEM, "out of memory reading %s", f->path);
                    goto done;
                }
                f->meta_keys[f->meta_count] = k;
                f->meta_values[f->meta_count] = v;
                f->meta_count++;
            }
            continue;
        }
        if (!json_is_object(val)) {
            rc = bad(f->path, "entry '%s' is not an object", key);
            goto done;
        }
        json_t *jd = json_object_get(val, "dtype");
        json_t *js = json_object_get(val, "shape");
        json_t *jo = json_object_get(val, "data_offsets");
        if (!json_is_string(jd) || !json_is_array(js) || !json_is_array(jo) || json_array_size(jo) != 2) {
            rc = bad(f->path, "tensor '%s' needs dtype (string), shape (array) and data_offsets ([begin, end])", key);
            goto done;
        }
        int dtype = ql_dtype_from_name(json_string_value(jd));
        if (dtype < 0) {
            rc = bad(f->path, "tensor '%s' has unknown dtype '%s'", key, json_string_value(jd));
            goto done;
        }
        ql_tensor *t = &f->tensors[count];
        t->dtype = dtype;
        if (json_array_size(js) > QL_MAX_DIMS) {
            rc = bad(f->path, "tensor '%s' has %zu dimensions (at most %d)", key, json_array_size(js), QL_MAX_DIMS);
            goto done;
        }
        t->ndim = (int32_t)json_array_size(js);
        uint64_t numel = 1;
        for (int d = 0; d < t->ndim; d++) {
            uint64_t dim;
            if (get_u64(json_array_get(js, (size_t)d), &dim)) {
                rc = bad(f->path, "tensor '%s' has a shape entry that is not a non-negative integer", key);
                goto done;
            }
            t->shape[d] = (int64_t)dim;
            if (dim && numel > UINT64_MAX / dim) {
                rc = bad(f->path, "tensor '%s' has a shape too large", key);
                goto done;
            }
            numel *= dim;
        }
        uint64_t begin, end;
        if (get_u64(json_array_get(jo, 0), &begin) || get_u64(json_array_get(jo, 1), &end) || begin > end) {
            rc = bad(f->path, "tensor '%s' has bad data_offsets", key);
            goto done;
        }
        if (end > data_len) {
            rc = bad(f->path, "tensor '%s' data_offsets [%llu, %llu] run past the data area (%llu bytes)", key,
                     (unsigned long long)begin, (unsigned long long)end, (unsigned long long)data_len);
            goto done;
        }
        if (numel > (uint64_t)INT64_MAX / ql_dtype_size(dtype)) {
            rc = bad(f->path, "tensor '%s' has a shape too large", key);
            goto done;
        }
        uint64_t need = numel * ql_dtype_size(dtype);
        if (need != end - begin) {
            char shape[256] = "";
            size_t k = 0;
            for (int d = 0; d < t->ndim && k < sizeof shape - 24; d++)
                k += (size_t)snprintf(shape + k, sizeof shape - k, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
            rc = bad(f->path, "tensor '%s' of shape [%s] and dtype %s needs %llu bytes but data_offsets span %llu", key,
                     shape, ql_dtype_name(dtype), (unsigned long long)need, (unsigned long long)(end - begin));
            goto done;
        }
        t->name = strdup(key);
        if (!t->name) {
            rc = ql_error(QL_ENOMEM, "out of memory reading %s", f->path);
            goto done;
        }
        t->data = data + begin;
        t->nbytes = need;
        spans[count] = (span){begin, end, count};
        count++;
        f->count = count; /* ql_st_close frees the names parsed so far, whatever fails next */
    }
    qsort(spans, count, sizeof *spans, cmp_span);
    size_t widest = 0; /* the earlier span reaching furthest */
    for (size_t i = 1; i < count; i++) {
        if (spans[i].end > spans[i].begin && spans[i].begin < spans[widest].end) {
            rc = bad(f->path, "tensors '%s' and '%s' overlap", f->tensors[spans[widest].index].name,
                     f->tensors[spans[i].index].name);
            goto done;
        }
        if (spans[i].end > spans[widest].end) widest = i;
    }
    /* reorder by offset */
    ql_tensor *ordered = calloc(count ? count : 1, sizeof *ordered);
    f->by_name = calloc(count ? count : 1, sizeof *f->by_name);
    if (!ordered || !f->by_name) {
        free(ordered);
        rc = ql_error(QL_ENOMEM, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < count; i++) ordered[i] = f->tensors[spans[i].index];
    free(f->tensors);
    f->tensors = ordered;
    for (size_t i = 0; i < count; i++) f->by_name[i] = i;
    sort_base = f->tensors;
    qsort(f->by_name, count, sizeof *f->by_name, cmp_name_index);
done:
    free(spans);
    json_decref(root);
    return rc;
}

int ql_st_open(const char *path, ql_st_file **out)
{
    *out = NULL;
    /* O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return ql_error(errno == ENOENT ? QL_ENOTFOUND : QL_EIO, "cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return ql_error(QL_EIO, "cannot stat %s: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return ql_error(QL_EINVAL, "%s is not a regular file", path);
    }
    ql_st_file *f = calloc(1, sizeof *f);
    if (!f) {
        close(fd);
        return ql_error(QL_ENOMEM, "out of memory");
    }
    f->path = strdup(path);
    f->size = (uint64_t)st.st_size;
    int rc = QL_OK;
    if (!f->path) {
        rc = ql_error(QL_ENOMEM, "out of memory");
        goto fail;
    }
    if (f->size < 8) {
        rc = bad(path, "file is %llu bytes, shorter than the 8-byte header length", (unsigned long long)f->size);
        goto fail;
    }
    f->map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (f->map == MAP_FAILED) {
        f->map = NULL;
        rc = ql_error(QL_EIO, "cannot map %s: %s", path, strerror(errno));
        goto fail;
    }
    const uint8_t *bytes = f->map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | bytes[i];
    if (hlen > f->size - 8) {
        rc = bad(path, "header length %llu runs past the end of the file (%llu bytes)", (unsigned long long)hlen,
                 (unsigned long long)f->size);
        goto fail;
    }
    if (hlen > ST_MAX_HEADER) {
        rc = bad(path, "header length %llu is larger than %u bytes", (unsigned long long)hlen, ST_MAX_HEADER);
        goto fail;
    }
    rc = parse_header(f, (const char *)bytes + 8, hlen, f->size - 8 - hlen, bytes + 8 + hlen);
    if (rc) goto fail;
    close(fd);
    *out = f;
    return QL_OK;
fail:
    close(fd);
    ql_st_close(f);
    return rc;
}

int ql_st_release(const ql_st_file *f, const ql_tensor *t)
{
    const uint8_t *base = f->map, *p = t->data;
    if (!base || !p || p < base || t->nbytes > f->size || (uint64_t)(p - base) > f->size - t->nbytes) return 0;
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    /* whole pages around the tensor, the mapping's own at the ends: a
     * neighbour's pages go too and come back on its next read */
    uintptr_t lo = (uintptr_t)p & ~(page - 1), hi = ((uintptr_t)p + t->nbytes + page - 1) & ~(page - 1);
    const uintptr_t end = ((uintptr_t)base + f->size + page - 1) & ~(page - 1);
    if (hi > end) hi = end;
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_DONTNEED);
    return 1;
}

void ql_st_close(ql_st_file *f)
{
    if (!f) return;
    for (size_t i = 0; i < f->count; i++) free((char *)f->tensors[i].name);
    for (size_t i = 0; i < f->meta_count; i++) {
        free(f->meta_keys[i]);
        free(f->meta_values[i]);
    }
    free(f->meta_keys);
    free(f->meta_values);
    free(f->tensors);
    free(f->by_name);
    if (f->map) munmap(f->map, f->size);
    free(f->path);
    free(f);
}

const char *ql_st_path(const ql_st_file *f) { return f->path; }
size_t ql_st_count(const ql_st_file *f) { return f->count; }
uint64_t ql_st_file_size(const ql_st_file *f) { return f->size; }
const ql_tensor *ql_st_at(const ql_st_file *f, size_t i) { return i < f->count ? &f->tensors[i] : NULL; }

const ql_tensor *ql_st_find(const ql_st_file *f, const char *name)
{
    size_t lo = 0, hi = f->count;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = strcmp(f->tensors[f->by_name[mid]].name, name);
        if (c == 0) return &f->tensors[f->by_name[mid]];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

const char *ql_st_metadata(const ql_st_file *f, const char *key)
{
    for (size_t i = 0; i < f->meta_count; i++)
        if (strcmp(f->meta_keys[i], key) == 0) return f->meta_values[i];
    return NULL;
}

/* ---- writer ---- */

/* Tensor data is kept in memory, or, once a spill folder is set, appended to
 * an unlinked temporary file there: a 65B model's output never has to fit in
 * memory.  `data` of a spilled tensor is NULL and `spill_offset` says where. */
struct ql_st_writer {
    ql_tensor *tensors;
    uint64_t *spill_offset;
    size_t count, cap;
    json_t *meta;
    char *spill_dir;
    int spill_fd;
    uint64_t spill_size;
};

int ql_st_writer_create(ql_st_writer **out)
{
    ql_st_writer *w = calloc(1, sizeof *w);
    if (!w || !(w->meta = json_object())) {
        free(w);
        return ql_error(QL_ENOMEM, "out of memory");
    }
    w->spill_fd = -1;
    *out = w;
    return QL_OK;
}

int ql_st_writer_spill_to(ql_st_writer *w, const char *dir)
{
    free(w->spill_dir);
    w->spill_dir = strdup(dir);
    return w->spill_dir ? QL_OK : ql_error(QL_ENOMEM, "out of memory");
}

void ql_st_writer_destroy(ql_st_writer *w)
{
    if (!w) return;
    for (size_t i = 0; i < w->count; i++) {
        free((char *)w->tensors[i].name);
        free((void *)w->tensors[i].data);
    }
    free(w->tensors);
    free(w->spill_offset);
    if (w->spill_fd >= 0) close(w->spill_fd);
    free(w->spill_dir);
    json_decref(w->meta);
    free(w);
}

size_t ql_st_writer_count(const ql_st_writer *w) { return w->count; }

int ql_st_writer_add(ql_st_writer *w, const ql_tensor *t)
{
    if (!t->name || !t->name[0] || strcmp(t->name, "__metadata__") == 0)
        return ql_error(QL_EINVAL, "bad tensor name '%s'", t->name ? t->name : "(null)");
    if (ql_dtype_size(t->dtype) == 0) return ql_error(QL_EINVAL, "tensor '%s' has unknown dtype %d", t->name, t->dtype);
    if (t->ndim < 0 || t->ndim > QL_MAX_DIMS) return ql_error(QL_EINVAL, "tensor '%s' has bad rank", t->name);
    for (int d = 0; d < t->ndim; d++)
        if (t->shape[d] < 0) return ql_error(QL_EINVAL, "tensor '%s' has a negative dimension", t->name);
    uint64_t need = (uint64_t)ql_shape_numel(t->shape, t->ndim) * ql_dtype_size(t->dtype);
    if (need != t->nbytes)
        return ql_error(QL_EINVAL, "tensor '%s': shape needs %llu bytes but %llu given", t->name,
                        (unsigned long long)need, (unsigned long long)t->nbytes);
    for (size_t i = 0; i < w->count; i++)
        if (strcmp(w->tensors[i].name, t->name) == 0) return ql_error(QL_EINVAL, "tensor '%s' added twice", t->name);
    if (w->count == w->cap) {
        size_t cap = w->cap ? w->cap * 2 : 64;
        ql_tensor *p = realloc(w->tensors, cap * sizeof *p);
        uint64_t *o = p ? realloc(w->spill_offset, cap * sizeof *o) : NULL;
        if (p) w->tensors = p;
        if (!p || !o) return ql_error(QL_ENOMEM, "out of memory");
        w->spill_offset = o;
        w->cap = cap;
    }
    ql_tensor c = *t;
    c.name = strdup(t->name);
    if (!c.name) return ql_error(QL_ENOMEM, "out of memory");
    if (w->spill_dir) {
        if (w->spill_fd < 0) {
            char *tmpl = ql_path_join(w->spill_dir, ".tensors.XXXXXX");
            w->spill_fd = tmpl ? mkstemp(tmpl) : -1;
            if (w->spill_fd >= 0) unlink(tmpl); /* gone with the descriptor, whatever happens */
            int e = errno;
            free(tmpl);
            if (w->spill_fd < 0) {
                free((char *)c.name);
                return ql_error(QL_EIO, "cannot create a temporary file in %s: %s", w->spill_dir, strerror(e));
            }
        }
        const char *p = t->data;
        uint64_t left = t->nbytes, at = w->spill_size;
        while (left > 0) {
            ssize_t n = pwrite(w->spill_fd, p, left > (1u << 30) ? (1u << 30) : (size_t)left, (off_t)at);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) {
                int e = errno;
                free((char *)c.name);
                return ql_error(QL_EIO, "cannot write tensor '%s' to a temporary file in %s: %s", t->name,
                                w->spill_dir, strerror(e));
            }
            p += n;
            at += (uint64_t)n;
            left -= (uint64_t)n;
        }
        w->spill_offset[w->count] = w->spill_size;
        w->spill_size = at;
        c.data = NULL;
    } else {
        void *data = malloc(t->nbytes ? t->nbytes : 1);
        if (!data) {
            free((char *)c.name);
            return ql_error(QL_ENOMEM, "out of memory copying tensor '%s'", t->name);
        }
        if (t->nbytes) memcpy(data, t->data, t->nbytes);
        c.data = data;
    }
    w->tensors[w->count++] = c;
    return QL_OK;
}

static int write_all(int fd, const void *data, size_t len);

/* Write tensor i's bytes to fd, from memory or from the spill file. */
static int write_tensor_data(const ql_st_writer *w, size_t i, int fd)
{
    const ql_tensor *t = &w->tensors[i];
    if (t->data) return write_all(fd, t->data, t->nbytes);
    enum { CHUNK = 1 << 20 };
    char *buf = malloc(CHUNK);
    if (!buf) return -1;
    uint64_t at = w->spill_offset[i], left = t->nbytes;
    int rc = 0;
    while (left > 0 && rc == 0) {
        ssize_t n = pread(w->spill_fd, buf, left < CHUNK ? (size_t)left : CHUNK, (off_t)at);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0 || write_all(fd, buf, (size_t)n)) rc = -1;
        else {
            at += (uint64_t)n;
            left -= (uint64_t)n;
        }
    }
    free(buf);
    return rc;
}

int ql_st_writer_set_metadata(ql_st_writer *w, const char *key, const char *value)
{
    if (json_object_set_new(w->meta, key, json_string(value)) != 0) return ql_error(QL_ENOMEM, "out of memory");
    return QL_OK;
}

static int cmp_layout(const void *a, const void *b)
{
    const ql_tensor *x = *(ql_tensor *const *)a, *y = *(ql_tensor *const *)b;
    size_t sx = ql_dtype_size(x->dtype), sy = ql_dtype_size(y->dtype);
    if (sx != sy) return sx > sy ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int write_all(int fd, const void *data, size_t len)
{
    const char *p = data;
    while (len > 0) {
        ssize_t w = write(fd, p, len);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

int ql_st_writer_save(ql_st_writer *w, const char *path)
{
    int rc = QL_OK;
    ql_tensor **order = calloc(w->count ? w->count : 1, sizeof *order);
    json_t *root = json_object();
    char *header = NULL;
    int fd = -1;
    char tmp[4096] = "";
    if (!order || !root) {
        rc = ql_error(QL_ENOMEM, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < w->count; i++) order[i] = &w->tensors[i];
    qsort(order, w->count, sizeof *order, cmp_layout);
    if (json_object_size(w->meta)) json_object_set(root, "__metadata__", w->meta);
    uint64_t offset = 0;
    for (size_t i = 0; i < w->count; i++) {
        const ql_tensor *t = order[i];
        json_t *shape = json_array();
        for (int d = 0; d < t->ndim; d++) json_array_append_new(shape, json_integer(t->shape[d]));
        json_t *entry = json_pack("{s:s, s:o, s:[I, I]}", "dtype", ql_dtype_name(t->dtype), "shape", shape,
                                  "data_offsets", (json_int_t)offset, (json_int_t)(offset + t->nbytes));
        if (!entry || json_object_set_new(root, t->name, entry) != 0) {
            rc = ql_error(QL_ENOMEM, "out of memory");
            goto done;
        }
        offset += t->nbytes;
    }
    header = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!header) {
        rc = ql_error(QL_ENOMEM, "out of memory");
        goto done;
    }
    size_t hlen = strlen(header);
    size_t padded = (hlen + 7) & ~(size_t)7; /* data starts 8-byte aligned */
    if (snprintf(tmp, sizeof tmp, "%s.tmp.XXXXXX", path) >= (int)sizeof tmp) {
        rc = ql_error(QL_EINVAL, "path too long: %s", path);
        goto done;
    }
    fd = mkstemp(tmp);
    if (fd < 0) {
        rc = ql_error(QL_EIO, "cannot create %s: %s", tmp, strerror(errno));
        tmp[0] = '\0';
        goto done;
    }
    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    static const char spaces[8] = "        ";
    if (write_all(fd, len8, 8) || write_all(fd, header, hlen) || write_all(fd, spaces, padded - hlen)) goto io_error;
    for (size_t i = 0; i < w->count; i++)
        if (write_tensor_data(w, (size_t)(order[i] - w->tensors), fd)) goto io_error;
    if (fchmod(fd, 0644) || fsync(fd)) goto io_error;
    if (close(fd) != 0) {
        fd = -1;
        goto io_error;
    }
    fd = -1;
    if (rename(tmp, path) != 0) goto io_error;
    tmp[0] = '\0';
    {
        char dir[4096];
        snprintf(dir, sizeof dir, "%s", path);
        rc = ql_fsync_dir(dirname(dir)); /* the rename is durable only once its folder is */
    }
    goto done;
io_error:
    rc = ql_error(QL_EIO, "cannot write %s: %s", path, strerror(errno));
done:
    if (fd >= 0) close(fd);
    if (tmp[0]) unlink(tmp);
    free(header);
    json_decref(root);
    free(order);
    return rc;
}
