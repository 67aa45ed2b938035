/* safetensors reader and writer, atomic files and output folders, dtype conversions. */
#include <check.h>
#include <dirent.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "json_out.h"
#include "qlora/llama.h"
#include "qlora/qlora.h"
#include "testutil.h"

/* ---- helpers ---- */

static char *fresh_dir(void) { return strdup(tu_tmpdir()); }

static char *join(const char *a, const char *b)
{
    char *p = ql_path_join(a, b);
    ck_assert_ptr_nonnull(p);
    return p;
}

/* Names in a folder other than "." and "..", sorted, joined by spaces. */
static void list_dir(const char *dir, char *buf, size_t cap)
{
    char names[64][256];
    int n = 0;
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    struct dirent *e;
    while ((e = readdir(d)) && n < 64) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(names[n++], sizeof names[0], "%s", e->d_name);
    }
    closedir(d);
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
            char t[256];
            memcpy(t, names[j], sizeof t);
            memcpy(names[j], names[j - 1], sizeof t);
            memcpy(names[j - 1], t, sizeof t);
        }
    size_t k = 0;
    buf[0] = '\0';
    for (int i = 0; i < n && k < cap; i++) k += (size_t)snprintf(buf + k, cap - k, "%s%s", i ? " " : "", names[i]);
}

static char *slurp(const char *path, size_t *len)
{
    char *data;
    size_t l;
    ck_assert_int_eq(ql_read_file(path, &data, &l), QL_OK);
    if (len) *len = l;
    return data;
}

static void spit(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    if (len) ck_assert_uint_eq(fwrite(data, 1, len, f), len);
    ck_assert_int_eq(fclose(f), 0);
}

/* A safetensors file by hand: 8-byte little-endian `hlen`, the header text, `data_len` bytes. */
static char *write_raw(const char *dir, const char *name, uint64_t hlen, const char *header, size_t data_len)
{
    size_t htext = strlen(header);
    size_t total = 8 + htext + data_len;
    uint8_t *buf = calloc(1, total);
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)(hlen >> (8 * i));
    memcpy(buf + 8, header, htext);
    for (size_t i = 0; i < data_len; i++) buf[8 + htext + i] = (uint8_t)(i * 7 + 1);
    char *path = join(dir, name);
    spit(path, buf, total);
    free(buf);
    return path;
}

static char *write_st(const char *dir, const char *name, const char *header, size_t data_len)
{
    return write_raw(dir, name, strlen(header), header, data_len);
}

/* Open must fail with `code` and a message holding the path, the standard
 * prefix (for format errors) and `fragment`. */
static void expect_open_error(const char *path, int code, const char *fragment)
{
    ql_st_file *f = (ql_st_file *)0x1;
    ql_error_clear();
    int rc = ql_st_open(path, &f);
    ck_assert_msg(rc == code, "%s: expected %s, got %s (%s)", path, ql_status_name(code), ql_status_name(rc),
                  ql_error_message());
    ck_assert_ptr_null(f);
    ck_assert_int_eq(ql_error_code(), code);
    const char *msg = ql_error_message();
    ck_assert_contains(msg, path);
    if (code == QL_EFORMAT) ck_assert_contains(msg, "not a valid safetensors file");
    ck_assert_contains(msg, fragment);
}

/* ---- round trip ---- */

START_TEST(test_round_trip_dtypes_shapes_metadata)
{
    char *dir = fresh_dir();
    char *path = join(dir, "t.safetensors");
    const float f32[6] = {1.5f, -2.25f, 0.0f, 3.0e-8f, -1.0e30f, 42.0f};
    const uint16_t bf16[5] = {0x3f80, 0xbf80, 0x0000, 0x7f7f, 0x0001};
    const uint8_t u8[7] = {0, 1, 2, 127, 128, 254, 255};
    const int8_t i8[1] = {-77};
    struct {
        const char *name;
        int dtype, ndim;
        int64_t shape[2];
        const void *data;
        uint64_t nbytes;
    } in[] = {
        {"a.f32", QL_DTYPE_F32, 2, {2, 3}, f32, sizeof f32},
        {"b.bf16", QL_DTYPE_BF16, 1, {5, 0}, bf16, sizeof bf16},
        {"c.u8", QL_DTYPE_U8, 1, {7, 0}, u8, sizeof u8},
        {"d.i8", QL_DTYPE_I8, 0, {0, 0}, i8, sizeof i8},
        {"e.f16", QL_DTYPE_F16, 1, {0, 0}, NULL, 0},
    };
    const size_t n = sizeof in / sizeof in[0];
    ql_st_writer *w;
    ck_assert_int_eq(ql_st_writer_create(&w), QL_OK);
    /* added out of name order on purpose */
    for (size_t k = 0; k < n; k++) {
        size_t i = (k * 3) % n;
        ql_tensor t = {.name = in[i].name, .dtype = in[i].dtype, .ndim = in[i].ndim, .data = in[i].data,
                       .nbytes = in[i].nbytes};
        t.shape[0] = in[i].shape[0];
        t.shape[1] = in[i].shape[1];
        ck_assert_int_eq(ql_st_writer_add(w, &t), QL_OK);
    }
    ck_assert_int_eq(ql_st_writer_set_metadata(w, "format", "pt"), QL_OK);
    ck_assert_int_eq(ql_st_writer_set_metadata(w, "note", "h\xc3\xa9llo \"quoted\""), QL_OK);
    ck_assert_uint_eq(ql_st_writer_count(w), n);
    ck_assert_int_eq(ql_st_writer_save(w, path), QL_OK);
    ql_st_writer_destroy(w);

    /* raw layout: header length a multiple of 8, so data starts 8-byte aligned */
    size_t len;
    char *raw = slurp(path, &len);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | (uint8_t)raw[i];
    ck_assert_uint_eq(hlen % 8, 0);
    ck_assert_uint_eq(len, 8 + hlen + sizeof f32 + sizeof bf16 + sizeof u8 + sizeof i8);
    ck_assert_int_eq(raw[8], '{');
    /* the data section holds F32 first (larger dtypes first) */
    ck_assert_int_eq(memcmp(raw + 8 + hlen, f32, sizeof f32), 0);
    free(raw);

    ql_st_file *f;
    ck_assert_int_eq(ql_st_open(path, &f), QL_OK);
    ck_assert_str_eq(ql_st_path(f), path);
    ck_assert_uint_eq(ql_st_count(f), n);
    ck_assert_uint_eq(ql_st_file_size(f), len);
    for (size_t i = 0; i < n; i++) {
        const ql_tensor *t = ql_st_find(f, in[i].name);
        ck_assert_msg(t != NULL, "tensor %s not found", in[i].name);
        ck_assert_str_eq(t->name, in[i].name);
        ck_assert_int_eq(t->dtype, in[i].dtype);
        ck_assert_int_eq(t->ndim, in[i].ndim);
        for (int d = 0; d < t->ndim; d++) ck_assert_int_eq(t->shape[d], in[i].shape[d]);
        ck_assert_uint_eq(t->nbytes, in[i].nbytes);
        if (in[i].nbytes) ck_assert_int_eq(memcmp(t->data, in[i].data, in[i].nbytes), 0);
    }
    ck_assert_int_eq(ql_st_find(f, "a.f32")->dtype, QL_DTYPE_F32);
    ck_assert_uint_eq((uintptr_t)ql_st_find(f, "a.f32")->data % 8, 0);
    /* file order: by dtype size, then name; the empty tensor sits before the U8 at its offset */
    const char *order[] = {"a.f32", "b.bf16", "e.f16", "c.u8", "d.i8"};
    for (size_t i = 0; i < n; i++) ck_assert_str_eq(ql_st_at(f, i)->name, order[i]);
    ck_assert_ptr_null(ql_st_at(f, n));
    ck_assert_str_eq(ql_st_metadata(f, "format"), "pt");
    ck_assert_str_eq(ql_st_metadata(f, "note"), "h\xc3\xa9llo \"quoted\"");
    ck_assert_ptr_null(ql_st_metadata(f, "missing"));
    ql_st_close(f);
    ql_st_close(NULL);
    ql_remove_tree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(test_find_many_names)
{
    char *dir = fresh_dir();
    char *path = join(dir, "many.safetensors");
    ql_st_writer *w;
    ck_assert_int_eq(ql_st_writer_create(&w), QL_OK);
    enum { N = 97 };
    for (int k = 0; k < N; k++) {
        int i = (k * 37) % N; /* a permutation of 0..N-1 */
        char name[64];
        snprintf(name, sizeof name, "model.layers.%d.w", i);
        int32_t v = i * 1000 + 7;
        ql_tensor t = {.name = name, .dtype = QL_DTYPE_I32, .ndim = 1, .shape = {1}, .data = &v, .nbytes = 4};
        ck_assert_int_eq(ql_st_writer_add(w, &t), QL_OK);
    }
    ck_assert_int_eq(ql_st_writer_save(w, path), QL_OK);
    ql_st_writer_destroy(w);
    ql_st_file *f;
    ck_assert_int_eq(ql_st_open(path, &f), QL_OK);
    ck_assert_uint_eq(ql_st_count(f), N);
    for (int i = 0; i < N; i++) {
        char name[64];
        snprintf(name, sizeof name, "model.layers.%d.w", i);
        const ql_tensor *t = ql_st_find(f, name);
        ck_assert_msg(t != NULL, "%s not found", name);
        ck_assert_str_eq(t->name, name);
        int32_t v;
        memcpy(&v, t->data, 4);
        ck_assert_int_eq(v, i * 1000 + 7);
    }
    ck_assert_ptr_null(ql_st_find(f, ""));
    ck_assert_ptr_null(ql_st_find(f, "model.layers.1"));
    ck_assert_ptr_null(ql_st_find(f, "model.layers.97.w"));
    ck_assert_ptr_null(ql_st_find(f, "zzz"));
    ck_assert_ptr_null(ql_st_find(f, "a"));
    ql_st_close(f);
    ql_remove_tree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(test_writer_spills_to_disk)
{
    char *dir = fresh_dir();
    ql_st_writer *w;
    ck_assert_int_eq(ql_st_writer_create(&w), QL_OK);
    ck_assert_int_eq(ql_st_writer_spill_to(w, dir), QL_OK);
    float big[3000];
    for (int i = 0; i < 3000; i++) big[i] = (float)i * 0.5f;
    uint8_t small[5] = {1, 2, 3, 4, 5};
    ql_tensor a = {.name = "big", .dtype = QL_DTYPE_F32, .ndim = 2, .shape = {30, 100}, .data = big, .nbytes = sizeof big};
    ql_tensor b = {.name = "small", .dtype = QL_DTYPE_U8, .ndim = 1, .shape = {5}, .data = small, .nbytes = 5};
    ck_assert_int_eq(ql_st_writer_add(w, &b), QL_OK);
    ck_assert_int_eq(ql_st_writer_add(w, &a), QL_OK);
    big[0] = -1.0f; /* the writer kept its own copy */
    char *path = join(dir, "spilled.safetensors");
    ck_assert_int_eq(ql_st_writer_save(w, path), QL_OK);
    ql_st_writer_destroy(w);
    ql_st_file *f;
    ck_assert_int_eq(ql_st_open(path, &f), QL_OK);
    const ql_tensor *rb = ql_st_find(f, "big"), *rs = ql_st_find(f, "small");
    ck_assert_ptr_nonnull(rb);
    ck_assert_ptr_nonnull(rs);
    ck_assert_float_eq(((const float *)rb->data)[0], 0.0f);
    ck_assert_float_eq(((const float *)rb->data)[2999], 1499.5f);
    ck_assert_int_eq(memcmp(rs->data, small, 5), 0);
    ql_st_close(f);
    /* the spill file was unlinked at creation: only the output is left */
    DIR *d = opendir(dir);
    int entries = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) entries++;
    closedir(d);
    ck_assert_int_eq(entries, 1);
    free(path);
    ql_remove_tree(dir);
    free(dir);
}
END_TEST

START_TEST(test_writer_refuses_bad_tensors)
{
    ql_st_writer *w;
    ck_assert_int_eq(ql_st_writer_create(&w), QL_OK);
    float x[6] = {0};
    ql_tensor t = {.name = "x", .dtype = QL_DTYPE_F32, .ndim = 2, .shape = {2, 3}, .data = x, .nbytes = 24};
    ck_assert_int_eq(ql_st_writer_add(w, &t), QL_OK);
    ck_assert_int_eq(ql_st_writer_add(w, &t), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "tensor 'x' added twice");
    ck_assert_uint_eq(ql_st_writer_count(w), 1);

    ql_tensor short_t = t;
    short_t.name = "y";
    short_t.nbytes = 20;
    ck_assert_int_eq(ql_st_writer_add(w, &short_t), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "tensor 'y': shape needs 24 bytes but 20 given");

    ql_tensor meta = t;
    meta.name = "__metadata__";
    ck_assert_int_eq(ql_st_writer_add(w, &meta), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "bad tensor name '__metadata__'");

    ql_tensor bad_dtype = t;
    bad_dtype.name = "z";
    bad_dtype.dtype = 77;
    ck_assert_int_eq(ql_st_writer_add(w, &bad_dtype), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "tensor 'z' has unknown dtype 77");
    ql_tensor negative = t;
    negative.name = "n";
    negative.shape[0] = -2;
    negative.shape[1] = -3; /* the product matches the bytes: still refused */
    ck_assert_int_eq(ql_st_writer_add(w, &negative), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "tensor 'n' has a negative dimension");
    ck_assert_uint_eq(ql_st_writer_count(w), 1);
    ql_st_writer_destroy(w);
    ql_st_writer_destroy(NULL);
}
END_TEST

/* ---- corrupt files ---- */

START_TEST(test_corrupt_short_file)
{
    char *dir = fresh_dir();
    char *path = join(dir, "short.safetensors");
    spit(path, "\x05\0\0\0\0", 5);
    expect_open_error(path, QL_EFORMAT, "file is 5 bytes, shorter than the 8-byte header length");
    spit(path, "", 0);
    expect_open_error(path, QL_EFORMAT, "file is 0 bytes");
    ql_remove_tree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(test_corrupt_header_length)
{
    char *dir = fresh_dir();
    char *path = write_raw(dir, "long.safetensors", 1000, "{}", 8);
    expect_open_error(path, QL_EFORMAT, "header length 1000 runs past the end of the file (18 bytes)");
    free(path);
    /* one byte past the end */
    path = write_raw(dir, "plus1.safetensors", 3, "{}", 0);
    expect_open_error(path, QL_EFORMAT, "header length 3 runs past the end of the file (10 bytes)");
    free(path);
    /* a length whose 8 + hlen would wrap around */
    path = write_raw(dir, "huge.safetensors", UINT64_MAX - 3, "{}", 0);
    expect_open_error(path, QL_EFORMAT, "runs past the end of the file");
    free(path);
    ql_remove_tree(dir);
    free(dir);
}
END_TEST

START_TEST(test_corrupt_header_not_json)
{
    char *dir = fresh_dir();
    char *path = write_st(dir, "nojson.safetensors", "{\"t\": {\"dtype\": ", 0);
    expect_open_error(path, QL_EFORMAT, "header is not JSON");
    free(path);
    path = write_st(dir, "dup.safetensors",
                    "{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                    "\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
                    2);
    expect_open_error(path, QL_EFORMAT, "header is not JSON (duplicate object key");
    free(path);
    ql_remove_tree(dir);
    free(dir);
}
END_TEST

START_TEST(test_corrupt_header_array)
{
    char *dir = fresh_dir();
    char *path = write_st(dir, "array.safetensors", "[1, 2, 3]", 0);
    expect_open_error(path, QL_EFORMAT, "header is not a JSON object");
    free(path);
    path = write_st(dir, "entry.safetensors", "{\"t\": [0, 4]}", 4);
    expect_open_error(path, QL_EFORMAT, "entry 't' is not an object");
    free(path);
    ql_remove_tree(dir);
    free(dir);
}
END_TEST

START_TEST(test_corrupt_missing_fields)
{
    char *dir = fresh_dir();
    const char *want = "tensor 't' needs dtype (string), shape (array) and data_offsets ([begin, end])";
    char *path = write_st(dir, "nooff.safetensors", "{\"t\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4);
    expect_open_error(path, QL_EFORMAT, want);
    free(path);
    path = write_st(dir, "noshape.safetensors", "{\"t\": {\"dtype\": \"F32\", \"data_offsets\": [0, 4]}}", 4);
    expect_open_error(path, QL_EFORMAT, want);
    free(path);
    path = write_st(dir, "three.safetensors", "{\"t\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4, 8]}}",
                    8);
    expect_open_error(path, QL_EFORMAT, want);
    free(path);
    path = write_st(dir, "numdtype.safetensors", "{\"t\": {\"dtype\": 4, \"shape\": [1], \"data_offsets\": [0, 4]}}", 4);
    expect_open_error(path, QL_EFORMAT, want);
    free(path);
    ql_remove_tree(dir);
    free(dir);
}
END_TEST

START_TEST(test_corrupt_unknown_dtype)
{
    char *dir = fresh_dir();
    char *path = write_st(dir, "q7.safetensors", "{\"w\": {\"dtype\": \"Q7\", \"shape\": [4], \"data_offsets\": [0, 4]}}", 4);
    expect_open_error(path, QL_EFORMAT, "tensor 'w' has unknown dtype 'Q7'");
    free(path);
    /* names are case-sensitive, as in safetensors */
    path = write_st(dir, "lower.safetensors", "{\"w\": {\"dtype\": \"f32\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4);
    expect_open_error(path, QL_EFORMAT, "unknown dtype 'f32'");
    free(path);
    ql_remove_tree(dir);
    free(dir);
}
END_TEST

START_TEST(test_corrupt_shape_bytes_mismatch)
{
    char *dir = fresh_dir();
    char *path =
        write_st(dir, "mismatch.safetensors", "{\"w\": {\"dtype\": \"F32\", \"shape\": [2, 3], \"data_offsets\": [0, 20]}}", 24);
    expect_open_error(path, QL_EFORMAT, "tensor 'w' of shape [2, 3] and dtype F32 needs 24 bytes but data_offsets span 20");
    free(path);
    /* a scalar needs one element */
    path = write_st(dir, "scalar.safetensors", "{\"s\": {\"dtype\": \"BF16\", \"shape\": [], \"data_offsets\": [0, 0]}}", 0);
    expect_open_error(path, QL_EFORMAT, "tensor 's' of shape [] and dtype BF16 needs 2 bytes but data_offsets span 0");
    free(path);
    ql_remove_tree(dir);
    free(dir);
}
END_TEST

START_TEST(test_corrupt_offsets_out_of_range)
{
    char *dir = fresh_dir();
    char *path = write_st(dir, "past.safetensors", "{\"w\": {\"dtype\": \"F32\", \"shape\": [6], \"data_offsets\": [0, 24]}}", 16);
    expect_open_error(path, QL_EFORMAT, "tensor 'w' data_offsets [0, 24] run past the data area (16 bytes)");
    free(path);
    path = write_st(dir, "backwards.safetensors", "{\"w\": {\"dtype\": \"U8\", \"shape\": [0], \"data_offsets\": [8, 4]}}", 8);
    expect_open_error(path, QL_EFORMAT, "tensor 'w' has bad data_offsets");
    free(path);
    path = write_st(dir, "negative.safetensors", "{\"w\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [-4, 0]}}", 8);
    expect_open_error(path, QL_EFORMAT, "tensor 'w' has bad data_offsets");
    free(path);
    ql_remove_tree(dir);
    free(dir);
}
END_TEST

START_TEST(test_corrupt_overlap)
{
    char *dir = fresh_dir();
    char *path = write_st(dir, "overlap.safetensors",
                          "{\"b\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [8, 24]},"
                          " \"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]}}",
                          24);
    expect_open_error(path, QL_EFORMAT, "tensors 'a' and 'b' overlap");
    free(path);
    /* contained in a wide earlier tensor, though not overlapping its neighbour */
    path = write_st(dir, "inside.safetensors",
                    "{\"wide\": {\"dtype\": \"U8\", \"shape\": [32], \"data_offsets\": [0, 32]},"
                    " \"x\": {\"dtype\": \"U8\", \"shape\": [8], \"data_offsets\": [4, 12]},"
                    " \"y\": {\"dtype\": \"U8\", \"shape\": [8], \"data_offsets\": [16, 24]}}",
                    32);
    expect_open_error(path, QL_EFORMAT, "tensors 'wide' and 'x' overlap");
    free(path);
    /* touching end to begin is fine, and so is an empty tensor at a shared offset */
    path = write_st(dir, "touch.safetensors",
                    "{\"a\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [0, 4]},"
                    " \"e\": {\"dtype\": \"F16\", \"shape\": [0], \"data_offsets\": [2, 2]},"
                    " \"b\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [4, 8]}}",
                    8);
    ql_st_file *f;
    ck_assert_msg(ql_st_open(path, &f) == QL_OK, "%s", ql_error_message());
    ck_assert_uint_eq(ql_st_count(f), 3);
    ck_assert_uint_eq(((const uint8_t *)ql_st_find(f, "b")->data)[0], (uint8_t)(4 * 7 + 1));
    ql_st_close(f);
    free(path);
    ql_remove_tree(dir);
    free(dir);
}
END_TEST

START_TEST(test_corrupt_negative_shape)
{
    char *dir = fresh_dir();
    char *path = write_st(dir, "neg.safetensors", "{\"w\": {\"dtype\": \"U8\", \"shape\": [-2, -2], \"data_offsets\": [0, 4]}}", 4);
    expect_open_error(path, QL_EFORMAT, "tensor 'w' has a shape entry that is not a non-negative integer");
    free(path);
    path = write_st(dir, "float.safetensors", "{\"w\": {\"dtype\": \"U8\", \"shape\": [2.0], \"data_offsets\": [0, 2]}}", 2);
    expect_open_error(path, QL_EFORMAT, "tensor 'w' has a shape entry that is not a non-negative integer");
    free(path);
    path = write_st(dir, "rank9.safetensors",
                    "{\"w\": {\"dtype\": \"U8\", \"shape\": [1,1,1,1,1,1,1,1,1], \"data_offsets\": [0, 1]}}", 1);
    expect_open_error(path, QL_EFORMAT, "tensor 'w' has 9 dimensions (at most 8)");
    free(path);
    /* 2^62 elements whose byte count wraps to 0 must not pass as an empty tensor */
    path = write_st(dir, "huge.safetensors",
                    "{\"w\": {\"dtype\": \"F32\", \"shape\": [2305843009213693952, 2], \"data_offsets\": [0, 0]}}", 0);
    expect_open_error(path, QL_EFORMAT, "tensor 'w' has a shape too large");
    free(path);
    ql_remove_tree(dir);
    free(dir);
}
END_TEST

START_TEST(test_corrupt_metadata)
{
    char *dir = fresh_dir();
    char *path = write_st(dir, "meta.safetensors", "{\"__metadata__\": {\"format\": \"pt\", \"step\": 3}}", 0);
    expect_open_error(path, QL_EFORMAT, "__metadata__ value of 'step' is not a string");
    free(path);
    path = write_st(dir, "metaarr.safetensors", "{\"__metadata__\": [\"pt\"]}", 0);
    expect_open_error(path, QL_EFORMAT, "__metadata__ is not an object");
    free(path);
    ql_remove_tree(dir);
    free(dir);
}
END_TEST

START_TEST(test_missing_file)
{
    char *dir = fresh_dir();
    char *path = join(dir, "nope.safetensors");
    expect_open_error(path, QL_ENOTFOUND, "cannot open");
    ck_assert_contains(ql_error_message(), "No such file or directory");
    ql_remove_tree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(test_empty_header_is_valid)
{
    char *dir = fresh_dir();
    char *path = write_st(dir, "empty.safetensors", "{}      ", 0);
    ql_st_file *f;
    ck_assert_msg(ql_st_open(path, &f) == QL_OK, "%s", ql_error_message());
    ck_assert_uint_eq(ql_st_count(f), 0);
    ck_assert_ptr_null(ql_st_find(f, "x"));
    ck_assert_ptr_null(ql_st_at(f, 0));
    ql_st_close(f);
    free(path);
    ql_remove_tree(dir);
    free(dir);
}
END_TEST

/* ---- atomic files and output folders ---- */

START_TEST(test_write_file_atomic)
{
    char *dir = fresh_dir();
    char *path = join(dir, "config.json");
    char names[1024];
    ck_assert_int_eq(ql_write_file_atomic(path, "first version", 13), QL_OK);
    list_dir(dir, names, sizeof names);
    ck_assert_str_eq(names, "config.json");
    size_t len;
    char *got = slurp(path, &len);
    ck_assert_uint_eq(len, 13);
    ck_assert_str_eq(got, "first version");
    free(got);

    ck_assert_int_eq(ql_write_file_atomic(path, "2nd", 3), QL_OK);
    list_dir(dir, names, sizeof names);
    ck_assert_str_eq(names, "config.json");
    got = slurp(path, &len);
    ck_assert_uint_eq(len, 3);
    ck_assert_str_eq(got, "2nd");
    free(got);

    ck_assert_int_eq(ql_write_file_atomic(path, "", 0), QL_OK);
    got = slurp(path, &len);
    ck_assert_uint_eq(len, 0);
    free(got);

    /* a folder that does not exist: an error naming the temporary file, nothing left */
    char *missing = join(dir, "no/such/file");
    ck_assert_int_eq(ql_write_file_atomic(missing, "x", 1), QL_EIO);
    ck_assert_contains(ql_error_message(), "cannot create");
    ck_assert_contains(ql_error_message(), "no/such/file.tmp.");
    list_dir(dir, names, sizeof names);
    ck_assert_str_eq(names, "config.json");

    /* copy is byte-identical */
    char *copy = join(dir, "copy.json");
    const char bin[5] = {'a', 0, 'b', '\n', (char)0xff};
    ck_assert_int_eq(ql_write_file_atomic(path, bin, sizeof bin), QL_OK);
    ck_assert_int_eq(ql_copy_file_atomic(path, copy), QL_OK);
    got = slurp(copy, &len);
    ck_assert_uint_eq(len, sizeof bin);
    ck_assert_int_eq(memcmp(got, bin, sizeof bin), 0);
    free(got);
    list_dir(dir, names, sizeof names);
    ck_assert_str_eq(names, "config.json copy.json");
    free(copy);
    free(missing);
    ql_remove_tree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(test_outdir_refuses_existing)
{
    char *dir = fresh_dir();
    char *dest = join(dir, "out");
    ck_assert_int_eq(ql_mkdir_p(dest), QL_OK);
    ql_outdir *o = (ql_outdir *)0x1;
    ck_assert_int_eq(ql_outdir_begin(dest, "test", 0, NULL, 0, &o), QL_EEXIST);
    ck_assert_ptr_null(o);
    ck_assert_contains(ql_error_message(), dest);
    ck_assert_contains(ql_error_message(), "already exists");
    ck_assert_contains(ql_error_message(), "--force");
    /* a plain file in the way counts too */
    char *file = join(dir, "file");
    spit(file, "x", 1);
    ck_assert_int_eq(ql_outdir_begin(file, "test", 0, NULL, 0, &o), QL_EEXIST);
    ck_assert_contains(ql_error_message(), "already exists");
    char names[1024];
    list_dir(dir, names, sizeof names);
    ck_assert_str_eq(names, "file out");
    free(file);
    ql_remove_tree(dir);
    free(dest);
    free(dir);
}
END_TEST

START_TEST(test_outdir_abandon)
{
    char *dir = fresh_dir();
    char *dest = join(dir, "out");
    ql_outdir *o;
    ck_assert_int_eq(ql_outdir_begin(dest, "test", 0, NULL, 0, &o), QL_OK);
    const char *tmp = ql_outdir_path(o);
    char prefix[512];
    snprintf(prefix, sizeof prefix, "%s/.out.qlora-tmp.%ld.", dir, (long)getpid());
    ck_assert_int_eq(strncmp(tmp, prefix, strlen(prefix)), 0);
    ck_assert(ql_is_dir(tmp));
    ck_assert(!ql_path_exists(dest));
    char *inner = join(tmp, "model.safetensors");
    spit(inner, "data", 4);
    char *sub = join(tmp, "sub/deeper");
    ck_assert_int_eq(ql_mkdir_p(sub), QL_OK);
    /* abandon keeps the error that caused it */
    ql_error(QL_ENUMERIC, "the reason we gave up");
    ql_outdir_abandon(o);
    ck_assert_int_eq(ql_error_code(), QL_ENUMERIC);
    ck_assert_str_eq(ql_error_message(), "the reason we gave up");
    char names[1024];
    list_dir(dir, names, sizeof names);
    ck_assert_str_eq(names, "");
    ql_outdir_abandon(NULL);
    free(sub);
    free(inner);
    ql_remove_tree(dir);
    free(dest);
    free(dir);
}
END_TEST

START_TEST(test_outdir_commit)
{
    char *dir = fresh_dir();
    char *dest = join(dir, "nested/out");
    ql_outdir *o;
    /* the parent is created; a trailing slash is ignored */
    char with_slash[512];
    snprintf(with_slash, sizeof with_slash, "%s/", dest);
    ck_assert_int_eq(ql_outdir_begin(with_slash, "test", 0, NULL, 0, &o), QL_OK);
    char *f = join(ql_outdir_path(o), "a.txt");
    spit(f, "A", 1);
    free(f);
    ck_assert_int_eq(ql_outdir_commit(o), QL_OK);
    ck_assert(ql_is_dir(dest));
    char names[1024];
    list_dir(dest, names, sizeof names);
    ck_assert_str_eq(names, ".qlora-output a.txt");
    char *parent = join(dir, "nested");
    list_dir(parent, names, sizeof names);
    ck_assert_str_eq(names, "out");
    free(parent);
    ql_remove_tree(dir);
    free(dest);
    free(dir);
}
END_TEST

START_TEST(test_outdir_force_replaces)
{
    char *dir = fresh_dir();
    char *dest = join(dir, "out");
    ck_assert_int_eq(ql_mkdir_p(dest), QL_OK);
    char *old = join(dest, "old.txt");
    spit(old, "old", 3);
    ck_assert_int_eq(ql_output_mark(dest, "test"), QL_OK); /* --force replaces only a marked earlier output */
    ql_outdir *o;
    ck_assert_int_eq(ql_outdir_begin(dest, "test", 1, NULL, 0, &o), QL_OK);
    /* replaced only at commit */
    ck_assert(ql_path_exists(old));
    char *f = join(ql_outdir_path(o), "new.txt");
    spit(f, "new", 3);
    free(f);
    ck_assert_int_eq(ql_outdir_commit(o), QL_OK);
    char names[1024];
    list_dir(dest, names, sizeof names);
    ck_assert_str_eq(names, ".qlora-output new.txt");
    list_dir(dir, names, sizeof names);
    ck_assert_str_eq(names, "out"); /* no .tmp. or .old. leftovers */
    char *nf = join(dest, "new.txt");
    size_t len;
    char *got = slurp(nf, &len);
    ck_assert_str_eq(got, "new");
    free(got);
    free(nf);

    /* force with an abandoned run leaves the existing folder alone */
    ck_assert_int_eq(ql_outdir_begin(dest, "test", 1, NULL, 0, &o), QL_OK);
    ql_outdir_abandon(o);
    list_dir(dest, names, sizeof names);
    ck_assert_str_eq(names, ".qlora-output new.txt");
    list_dir(dir, names, sizeof names);
    ck_assert_str_eq(names, "out");
    free(old);
    ql_remove_tree(dir);
    free(dest);
    free(dir);
}
END_TEST

/* ---- dtype conversions ---- */

static float bits_to_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

#define ASSERT_F16(x, want)                                                                                    \
    do {                                                                                                       \
        uint16_t got_ = ql_f32_to_f16(x);                                                                      \
        ck_assert_msg(got_ == (want), "f16(%.10g = 0x%08x) = 0x%04x, want 0x%04x", (double)(x), f32_bits(x), \
                      got_, (unsigned)(want));                                                                 \
    } while (0)

#define ASSERT_BF16(x, want)                                                                                    \
    do {                                                                                                        \
        uint16_t got_ = ql_f32_to_bf16(x);                                                                      \
        ck_assert_msg(got_ == (want), "bf16(%.10g = 0x%08x) = 0x%04x, want 0x%04x", (double)(x), f32_bits(x), \
                      got_, (unsigned)(want));                                                                  \
    } while (0)

START_TEST(test_f16_exact_values)
{
    ASSERT_F16(1.0f, 0x3c00);
    ASSERT_F16(-2.0f, 0xc000);
    ASSERT_F16(0.5f, 0x3800);
    ASSERT_F16(65504.0f, 0x7bff);
    ASSERT_F16(nextafterf(65520.0f, 0.0f), 0x7bff); /* just under the tie */
    ASSERT_F16(65520.0f, 0x7c00);          /* tie between 65504 (odd) and 65536: to even, which is inf */
    ASSERT_F16(1.0e6f, 0x7c00);
    ASSERT_F16(-1.0e6f, 0xfc00);
    ASSERT_F16(INFINITY, 0x7c00);
    ASSERT_F16(-INFINITY, 0xfc00);
    ASSERT_F16(5.960464477539063e-08f, 0x0001); /* 2^-24, smallest subnormal */
    ASSERT_F16(ldexpf(1.0f, -25), 0x0000);      /* half of it: tie to even, zero */
    ASSERT_F16(2.98e-08f, 0x0000);
    ASSERT_F16(ldexpf(1.0f, -25) * 1.0000001f, 0x0001);
    ASSERT_F16(ldexpf(3.0f, -25), 0x0002);      /* 1.5 subnormals: tie to even, 2 */
    ASSERT_F16(ldexpf(5.0f, -25), 0x0002);      /* 2.5: tie to even, 2 */
    ASSERT_F16(6.097555160522461e-05f, 0x03ff); /* largest subnormal */
    ASSERT_F16(6.103515625e-05f, 0x0400);       /* smallest normal */
    ASSERT_F16(1.00048828125f, 0x3c00);         /* 1 + 2^-11: tie to even */
    ASSERT_F16(1.00146484375f, 0x3c02);         /* 1 + 3 * 2^-11: tie to even, up */
    ASSERT_F16(nextafterf(1.00048828125f, 2.0f), 0x3c01); /* just above the tie */
    ASSERT_F16(0.0f, 0x0000);
    ASSERT_F16(-0.0f, 0x8000);
    ASSERT_F16(-5.960464477539063e-08f, 0x8001);
    ASSERT_F16(1.0e-30f, 0x0000);
    ASSERT_F16(-1.0e-30f, 0x8000);
    uint16_t h = ql_f32_to_f16(NAN);
    ck_assert_msg((h & 0x7c00) == 0x7c00 && (h & 0x03ff) != 0, "NaN -> 0x%04x", h);
    h = ql_f32_to_f16(bits_to_f32(0x7f800001u)); /* NaN with only low payload bits */
    ck_assert_msg((h & 0x7c00) == 0x7c00 && (h & 0x03ff) != 0, "NaN 0x7f800001 -> 0x%04x", h);

    ck_assert_float_eq(ql_f16_to_f32(0x3c00), 1.0f);
    ck_assert_float_eq(ql_f16_to_f32(0x7bff), 65504.0f);
    ck_assert_float_eq(ql_f16_to_f32(0xfbff), -65504.0f);
    ck_assert_float_eq(ql_f16_to_f32(0x0001), ldexpf(1.0f, -24));
    ck_assert_float_eq(ql_f16_to_f32(0x03ff), 6.097555160522461e-05f);
    ck_assert_uint_eq(f32_bits(ql_f16_to_f32(0x8000)), 0x80000000u);
    ck_assert(isinf(ql_f16_to_f32(0x7c00)) && ql_f16_to_f32(0x7c00) > 0);
    ck_assert(isinf(ql_f16_to_f32(0xfc00)) && ql_f16_to_f32(0xfc00) < 0);
    ck_assert(isnan(ql_f16_to_f32(0x7e00)));
    ck_assert(isnan(ql_f16_to_f32(0x7c01)));
}
END_TEST

START_TEST(test_f16_round_trip_all)
{
    /* every half value survives half -> float -> half */
    for (uint32_t h = 0; h <= 0xffff; h++) {
        float f = ql_f16_to_f32((uint16_t)h);
        uint16_t back = ql_f32_to_f16(f);
        if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) {
            ck_assert_msg(isnan(f) && (back & 0x7c00) == 0x7c00 && (back & 0x3ff), "NaN 0x%04x -> 0x%04x", h, back);
            continue;
        }
        ck_assert_msg(back == h, "0x%04x -> %.10g -> 0x%04x", h, (double)f, back);
    }
}
END_TEST

START_TEST(test_bf16_exact_values)
{
    ASSERT_BF16(1.0f, 0x3f80);
    ASSERT_BF16(-1.0f, 0xbf80);
    ASSERT_BF16(1.00390625f, 0x3f80); /* 1 + 2^-8: tie to even, down */
    ASSERT_BF16(1.01171875f, 0x3f82); /* 1 + 3 * 2^-8: tie to even, up */
    ASSERT_BF16(1.0078125f, 0x3f81);  /* exact */
    ASSERT_BF16(nextafterf(1.00390625f, 2.0f), 0x3f81); /* just above the tie */
    ASSERT_BF16(0.0f, 0x0000);
    ASSERT_BF16(-0.0f, 0x8000);
    ASSERT_BF16(INFINITY, 0x7f80);
    ASSERT_BF16(-INFINITY, 0xff80);
    ASSERT_BF16(3.4028235e38f, 0x7f80);          /* FLT_MAX rounds up to inf */
    ASSERT_BF16(bits_to_f32(0x7f7f7fffu), 0x7f7f); /* below the tie: the largest finite bf16 */
    ASSERT_BF16(bits_to_f32(0x00010000u), 0x0001); /* subnormals keep their bits */
    uint16_t b = ql_f32_to_bf16(NAN);
    ck_assert_msg((b & 0x7f80) == 0x7f80 && (b & 0x7f) != 0, "NaN -> 0x%04x", b);
    b = ql_f32_to_bf16(bits_to_f32(0x7f800001u)); /* truncating would make this inf */
    ck_assert_msg((b & 0x7f80) == 0x7f80 && (b & 0x7f) != 0, "NaN 0x7f800001 -> 0x%04x", b);
    b = ql_f32_to_bf16(bits_to_f32(0xffffffffu));
    ck_assert_msg((b & 0x7f80) == 0x7f80 && (b & 0x7f) != 0 && (b & 0x8000), "NaN 0xffffffff -> 0x%04x", b);

    ck_assert_float_eq(ql_bf16_to_f32(0x3f80), 1.0f);
    ck_assert_float_eq(ql_bf16_to_f32(0x3f82), 1.015625f);
    ck_assert_float_eq(ql_bf16_to_f32(0xc040), -3.0f);
    ck_assert(isnan(ql_bf16_to_f32(0x7fc0)));
    for (uint32_t h = 0; h <= 0xffff; h++) {
        float f = ql_bf16_to_f32((uint16_t)h);
        ck_assert_uint_eq(f32_bits(f), h << 16);
        if ((h & 0x7f80) == 0x7f80 && (h & 0x7f)) continue;
        ck_assert_msg(ql_f32_to_bf16(f) == h, "0x%04x round trip gave 0x%04x", h, ql_f32_to_bf16(f));
    }
}
END_TEST

START_TEST(test_convert_to_f32)
{
    const uint16_t h[3] = {0x3c00, 0xc000, 0x0001};
    const uint16_t b[3] = {0x3f80, 0xc040, 0x0000};
    const double d[2] = {0.25, -1.0e40};
    float out[3];
    ck_assert_int_eq(ql_convert_to_f32(QL_DTYPE_F16, h, 3, out), QL_OK);
    ck_assert_float_eq(out[0], 1.0f);
    ck_assert_float_eq(out[1], -2.0f);
    ck_assert_float_eq(out[2], ldexpf(1.0f, -24));
    ck_assert_int_eq(ql_convert_to_f32(QL_DTYPE_BF16, b, 3, out), QL_OK);
    ck_assert_float_eq(out[1], -3.0f);
    ck_assert_int_eq(ql_convert_to_f32(QL_DTYPE_F64, d, 2, out), QL_OK);
    ck_assert_float_eq(out[0], 0.25f);
    ck_assert(isinf(out[1]) && out[1] < 0);
    const uint8_t u[1] = {3};
    ck_assert_int_eq(ql_convert_to_f32(QL_DTYPE_U8, u, 1, out), QL_ENOTSUP);
    ck_assert_contains(ql_error_message(), "cannot convert U8 to float32");
}
END_TEST

START_TEST(test_first_nonfinite)
{
    float f[12];
    for (int i = 0; i < 12; i++) f[i] = (float)i - 5.5f;
    f[0] = 3.4028235e38f; /* FLT_MAX is finite */
    ck_assert_int_eq(ql_first_nonfinite(QL_DTYPE_F32, f, 12), -1);
    f[9] = INFINITY;
    ck_assert_int_eq(ql_first_nonfinite(QL_DTYPE_F32, f, 12), 9);
    f[5] = NAN;
    ck_assert_int_eq(ql_first_nonfinite(QL_DTYPE_F32, f, 12), 5);
    ck_assert_int_eq(ql_first_nonfinite(QL_DTYPE_F32, f, 5), -1);
    f[11] = -INFINITY;
    ck_assert_int_eq(ql_first_nonfinite(QL_DTYPE_F32, f + 10, 2), 1);
    ck_assert_int_eq(ql_first_nonfinite(QL_DTYPE_F32, f, 0), -1);

    uint16_t h[6] = {0x3c00, 0x7bff, 0xfbff, 0x0001, 0x8000, 0x0000};
    ck_assert_int_eq(ql_first_nonfinite(QL_DTYPE_F16, h, 6), -1);
    h[3] = 0x7c00; /* +inf */
    ck_assert_int_eq(ql_first_nonfinite(QL_DTYPE_F16, h, 6), 3);
    h[2] = 0xfe01; /* NaN */
    ck_assert_int_eq(ql_first_nonfinite(QL_DTYPE_F16, h, 6), 2);

    uint16_t b[6] = {0x3f80, 0x7f7f, 0xff7f, 0x0001, 0x8000, 0x0000};
    ck_assert_int_eq(ql_first_nonfinite(QL_DTYPE_BF16, b, 6), -1);
    b[4] = 0xff80; /* -inf */
    ck_assert_int_eq(ql_first_nonfinite(QL_DTYPE_BF16, b, 6), 4);
    b[1] = 0x7fc1; /* NaN */
    ck_assert_int_eq(ql_first_nonfinite(QL_DTYPE_BF16, b, 6), 1);

    /* integer dtypes have no non-finite values */
    const uint8_t u[4] = {0xff, 0x7f, 0x80, 0x7c};
    ck_assert_int_eq(ql_first_nonfinite(QL_DTYPE_U8, u, 4), -1);
}
END_TEST

START_TEST(test_dtype_names)
{
    ck_assert_str_eq(ql_dtype_name(QL_DTYPE_BF16), "BF16");
    ck_assert_str_eq(ql_dtype_name(99), "?");
    ck_assert_int_eq(ql_dtype_from_name("I8"), QL_DTYPE_I8);
    ck_assert_int_eq(ql_dtype_from_name("Q7"), -1);
    ck_assert_uint_eq(ql_dtype_size(QL_DTYPE_F16), 2);
    ck_assert_uint_eq(ql_dtype_size(QL_DTYPE_I64), 8);
    ck_assert_uint_eq(ql_dtype_size(-1), 0);
    ck_assert_str_eq(ql_dtype_torch_name(QL_DTYPE_BF16), "bfloat16");
    for (int d = 0; d < QL_DTYPE_COUNT; d++) ck_assert_int_eq(ql_dtype_from_name(ql_dtype_name(d)), d);
}
END_TEST

/* ---- input readers (issue 6) ---- */

/* A header that fails after some tensors were parsed frees their names (the
 * leak shows under ASan/LSan and valgrind, which the sanitizer job runs). */
START_TEST(test_header_error_after_names_frees_them)
{
    char *dir = fresh_dir();
    char *p = write_st(dir, "late.safetensors",
                       "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                       "\"b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]},"
                       "\"c\":{\"dtype\":\"Q9\",\"shape\":[1],\"data_offsets\":[2,3]}}",
                       3);
    expect_open_error(p, QL_EFORMAT, "tensor 'c' has unknown dtype 'Q9'");
    free(p);
    /* the same after the overlap check, which runs once every name is parsed */
    p = write_st(dir, "overlap.safetensors",
                 "{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]},"
                 "\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[1,3]}}",
                 3);
    expect_open_error(p, QL_EFORMAT, "overlap");
    free(p);
    /* metadata parsed, then a bad tensor */
    p = write_st(dir, "meta.safetensors",
                 "{\"__metadata__\":{\"format\":\"pt\",\"k\":\"v\"},"
                 "\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                 "\"b\":{\"dtype\":\"U8\",\"shape\":[5],\"data_offsets\":[1,2]}}",
                 2);
    expect_open_error(p, QL_EFORMAT, "tensor 'b' of shape [5] and dtype U8 needs 5 bytes");
    free(p);
    free(dir);
}
END_TEST

/* Float tensors at offsets that are not a multiple of their size: every
 * dtype conversion loads through memcpy (UBSan: no misaligned load). */
START_TEST(test_unaligned_float_tensors)
{
    char *dir = fresh_dir();
    /* one U8 byte first puts every later tensor at an odd offset */
    const char *header = "{\"pad\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                         "\"d\":{\"dtype\":\"F64\",\"shape\":[3],\"data_offsets\":[1,25]},"
                         "\"f\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[25,33]},"
                         "\"h\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[33,37]},"
                         "\"b\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[37,41]}}";
    /* pad the header so the data area itself starts 8-byte aligned: only the offsets are odd */
    size_t hl = strlen(header), padded = (hl + 7) & ~(size_t)7;
    char *htext = malloc(padded + 1);
    memcpy(htext, header, hl);
    memset(htext + hl, ' ', padded - hl);
    htext[padded] = '\0';
    uint8_t data[41] = {0};
    const double dv[3] = {0.5, -3.0, INFINITY};
    const float fv[2] = {1.5f, -2.25f};
    const uint16_t hv[2] = {0x3c00, 0xc000}, bv[2] = {0x3f80, 0x7f80};
    memcpy(data + 1, dv, sizeof dv);
    memcpy(data + 25, fv, sizeof fv);
    memcpy(data + 33, hv, sizeof hv);
    memcpy(data + 37, bv, sizeof bv);
    size_t total = 8 + padded + sizeof data;
    uint8_t *buf = malloc(total);
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    memcpy(buf + 8, htext, padded);
    memcpy(buf + 8 + padded, data, sizeof data);
    char *path = join(dir, "odd.safetensors");
    spit(path, buf, total);
    ql_st_file *f;
    ck_assert_msg(ql_st_open(path, &f) == QL_OK, "%s", ql_error_message());
    const ql_tensor *t = ql_st_find(f, "d");
    ck_assert_ptr_nonnull(t);
    ck_assert_uint_eq((uintptr_t)t->data % 8, 1);
    float out[3];
    ck_assert_int_eq(ql_convert_to_f32(QL_DTYPE_F64, t->data, 3, out), QL_OK);
    ck_assert_float_eq(out[0], 0.5f);
    ck_assert_float_eq(out[1], -3.0f);
    ck_assert_int_eq(ql_first_nonfinite(QL_DTYPE_F64, t->data, 3), 2);
    t = ql_st_find(f, "f");
    ck_assert_uint_eq((uintptr_t)t->data % 4, 1);
    ck_assert_int_eq(ql_convert_to_f32(QL_DTYPE_F32, t->data, 2, out), QL_OK);
    ck_assert_float_eq(out[1], -2.25f);
    ck_assert_int_eq(ql_first_nonfinite(QL_DTYPE_F32, t->data, 2), -1);
    t = ql_st_find(f, "h");
    ck_assert_uint_eq((uintptr_t)t->data % 2, 1);
    ck_assert_int_eq(ql_convert_to_f32(QL_DTYPE_F16, t->data, 2, out), QL_OK);
    ck_assert_float_eq(out[1], -2.0f);
    ck_assert_int_eq(ql_first_nonfinite(QL_DTYPE_F16, t->data, 2), -1);
    t = ql_st_find(f, "b");
    ck_assert_uint_eq((uintptr_t)t->data % 2, 1);
    ck_assert_int_eq(ql_convert_to_f32(QL_DTYPE_BF16, t->data, 2, out), QL_OK);
    ck_assert_float_eq(out[0], 1.0f);
    ck_assert_int_eq(ql_first_nonfinite(QL_DTYPE_BF16, t->data, 2), 1);
    ql_st_close(f);
    free(buf);
    free(htext);
    free(path);
    free(dir);
}
END_TEST

/* safetensors' shape [] is a scalar of one element, in the reader and the writer. */
START_TEST(test_zero_dim_tensor)
{
    char *dir = fresh_dir();
    ql_st_writer *w;
    ck_assert_int_eq(ql_st_writer_create(&w), QL_OK);
    const float one = 0.75f;
    ql_tensor t = {.name = "scalar", .dtype = QL_DTYPE_F32, .ndim = 0, .data = &one, .nbytes = 4};
    ck_assert_msg(ql_st_writer_add(w, &t) == QL_OK, "%s", ql_error_message());
    t.nbytes = 0;
    t.name = "empty_scalar";
    ck_assert_int_eq(ql_st_writer_add(w, &t), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "shape needs 4 bytes but 0 given");
    char *path = join(dir, "scalar.safetensors");
    ck_assert_int_eq(ql_st_writer_save(w, path), QL_OK);
    ql_st_writer_destroy(w);
    size_t len;
    char *raw = slurp(path, &len);
    ck_assert_contains(raw + 8, "\"scalar\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]}");
    free(raw);
    ql_st_file *f;
    ck_assert_msg(ql_st_open(path, &f) == QL_OK, "%s", ql_error_message());
    const ql_tensor *r = ql_st_find(f, "scalar");
    ck_assert_ptr_nonnull(r);
    ck_assert_int_eq(r->ndim, 0);
    ck_assert_uint_eq(r->nbytes, 4);
    ck_assert_int_eq(ql_shape_numel(r->shape, r->ndim), 1);
    float v;
    memcpy(&v, r->data, 4);
    ck_assert_float_eq(v, 0.75f);
    ql_st_close(f);
    free(path);
    /* a 0-d header entry spanning no bytes is refused */
    path = write_st(dir, "bad.safetensors", "{\"s\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,0]}}", 0);
    expect_open_error(path, QL_EFORMAT, "needs 4 bytes but data_offsets span 0");
    free(path);
    free(dir);
}
END_TEST

/* A FIFO (or anything not a regular file) is refused at once, never waited on. */
START_TEST(test_fifo_is_refused)
{
    char *dir = fresh_dir();
    char *path = join(dir, "model.safetensors");
    ck_assert_int_eq(mkfifo(path, 0600), 0);
    ql_st_file *f = (ql_st_file *)0x1;
    ck_assert_int_eq(ql_st_open(path, &f), QL_EINVAL);
    ck_assert_ptr_null(f);
    ck_assert_contains(ql_error_message(), path);
    ck_assert_contains(ql_error_message(), "is not a regular file");
    char *data = (char *)0x1;
    size_t len;
    ck_assert_int_eq(ql_read_file(path, &data, &len), QL_EINVAL);
    ck_assert_ptr_null(data);
    ck_assert_contains(ql_error_message(), "is not a regular file");
    /* a folder too */
    ck_assert_int_eq(ql_st_open(dir, &f), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "is not a regular file");
    ck_assert_int_eq(ql_read_file(dir, &data, &len), QL_EINVAL);
    unlink(path);
    free(path);
    free(dir);
}
END_TEST

/* JSON integers beyond 64 bits (transformers writes model_max_length =
 * 1000000000000000019884624838656) read as reals; the rest stay integers,
 * digits inside strings are left alone, and the limits are exact. */
/* ---- giving a mapping's pages back (ql_st_release) ---- */

/* A field of /proc/self/status, in kB */
static long proc_kb(const char *field)
{
    FILE *f = fopen("/proc/self/status", "r");
    ck_assert_ptr_nonnull(f);
    char line[256];
    long v = -1;
    size_t n = strlen(field);
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, field, n) && line[n] == ':') v = strtol(line + n + 1, NULL, 10);
    fclose(f);
    ck_assert_msg(v >= 0, "no %s in /proc/self/status", field);
    return v;
}

/* The peak (VmHWM) back to the current resident size */
static void reset_peak(void)
{
    FILE *f = fopen("/proc/self/clear_refs", "w");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(fputs("5", f) >= 0, 1);
    ck_assert_int_eq(fclose(f), 0);
}

START_TEST(test_release_gives_pages_back)
{
    char *dir = fresh_dir();
    enum { N = 4 << 20 }; /* 16 MiB of float32 */
    const tu_tensor t[] = {{"a", QL_DTYPE_F32, 1, {N}, NULL}, {"b", QL_DTYPE_F32, 1, {N}, NULL}};
    tu_write_model(dir, t, 2, NULL);
    char *path = join(dir, "model.safetensors");
    ql_st_file *f;
    ck_assert_int_eq(ql_st_open(path, &f), QL_OK);
    const ql_tensor *a = ql_st_find(f, "a"), *b = ql_st_find(f, "b");
    float *copy = malloc((size_t)N * 4);
    const long base = proc_kb("RssFile");
    memcpy(copy, a->data, (size_t)N * 4); /* every page of a read */
    const long read = proc_kb("RssFile");
    ck_assert_msg(read - base > 15 * 1024, "reading 16 MiB of the mapping added %ld kB to RssFile", read - base);
    ck_assert_int_eq(ql_st_release(f, a), 1);
    const long released = proc_kb("RssFile");
    ck_assert_msg(read - released > 15 * 1024, "released: RssFile %ld kB -> %ld kB", read, released);
    /* read again, from the file: the same values */
    ck_assert(memcmp(copy, a->data, (size_t)N * 4) == 0);
    ck_assert(((const float *)b->data)[N - 1] == ((const float *)b->data)[N - 1]);
    /* a tensor that is not in the mapping is left alone */
    ql_tensor other = *a;
    other.data = copy;
    ck_assert_int_eq(ql_st_release(f, &other), 0);
    ck_assert(memcmp(copy, a->data, (size_t)N * 4) == 0);
    free(copy);
    ql_st_close(f);
    free(path);
    free(dir);
}
END_TEST

/* A sharded bf16 checkpoint quantized on load holds about one tensor of it
 * in host memory at a time, not the checkpoint: each tensor's pages of the
 * mapped shards are given back once it is read (ql_llama_load). */
START_TEST(test_sharded_load_holds_one_tensor_at_a_time)
{
    enum { H = 512, I = 1536, L = 12, V = 256 };
    char *parent = fresh_dir(), *model = join(parent, "model");
    ck_assert_int_eq(ql_mkdir_p(model), QL_OK);
    char cfg[1024];
    snprintf(cfg, sizeof cfg,
             "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", \"hidden_size\": %d, "
             "\"intermediate_size\": %d, \"num_hidden_layers\": %d, \"num_attention_heads\": 8, "
             "\"num_key_value_heads\": 8, \"vocab_size\": %d, \"max_position_embeddings\": 256, \"rms_norm_eps\": 1e-5, "
             "\"tie_word_embeddings\": true, \"torch_dtype\": \"bfloat16\"}",
             H, I, L, V);
    /* shard 0: embeddings and the final norm; shard 1 + i: layer i */
    char index[16384];
    int at = snprintf(index, sizeof index, "{\"weight_map\": {");
    uint64_t bf16_bytes = 0;
    for (int s = 0; s <= L; s++) {
        char names[9][128], shard[64], sub[32];
        tu_tensor t[9];
        int n = 0;
        if (s == 0) {
            snprintf(names[0], sizeof names[0], "model.embed_tokens.weight");
            snprintf(names[1], sizeof names[1], "model.norm.weight");
            t[0] = (tu_tensor){names[0], QL_DTYPE_BF16, 2, {V, H}, NULL};
            t[1] = (tu_tensor){names[1], QL_DTYPE_BF16, 1, {H}, NULL};
            n = 2;
        } else {
            const int i = s - 1;
            static const char *const lin[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj", "mlp.down_proj"};
            for (int k = 0; k < 7; k++) {
                snprintf(names[n], sizeof names[n], "model.layers.%d.%s.weight", i, lin[k]);
                int64_t rows = k < 4 ? H : k < 6 ? I : H, cols = k < 6 ? H : I;
                t[n] = (tu_tensor){names[n], QL_DTYPE_BF16, 2, {rows, cols}, NULL};
                n++;
                bf16_bytes += (uint64_t)(rows * cols) * 2;
            }
            snprintf(names[7], sizeof names[7], "model.layers.%d.input_layernorm.weight", i);
            snprintf(names[8], sizeof names[8], "model.layers.%d.post_attention_layernorm.weight", i);
            t[7] = (tu_tensor){names[7], QL_DTYPE_BF16, 1, {H}, NULL};
            t[8] = (tu_tensor){names[8], QL_DTYPE_BF16, 1, {H}, NULL};
            n = 9;
        }
        snprintf(sub, sizeof sub, "s%d", s);
        char *tmp = join(parent, sub);
        tu_write_model(tmp, t, (size_t)n, cfg);
        snprintf(shard, sizeof shard, "model-%05d-of-%05d.safetensors", s + 1, L + 1);
        char *src = join(tmp, "model.safetensors"), *dst = join(model, shard);
        ck_assert_int_eq(rename(src, dst), 0);
        if (s == 0) {
            char *c0 = join(tmp, "config.json"), *c1 = join(model, "config.json");
            ck_assert_int_eq(rename(c0, c1), 0);
            free(c0);
            free(c1);
        }
        for (int k = 0; k < n; k++)
            at += snprintf(index + at, sizeof index - (size_t)at, "%s\"%s\": \"%s\"", s || k ? ", " : "", names[k], shard);
        free(src);
        free(dst);
        free(tmp);
    }
    snprintf(index + at, sizeof index - (size_t)at, "}}");
    char *ipath = join(model, "model.safetensors.index.json");
    ck_assert_int_eq(ql_write_file_atomic(ipath, index, strlen(index)), QL_OK);
    free(ipath);

    const long before = proc_kb("VmRSS");
    reset_peak();
    ql_llama *m = NULL;
    ql_llama_load_opts lo = {.quantizer = "nf4", .device = "cpu"};
    ck_assert_msg(ql_llama_load(model, &lo, &m) == QL_OK, "%s", ql_error_message());
    const long peak = proc_kb("VmHWM"), grew = peak - before;
    /* the 4-bit model itself is about a quarter of the bf16 bytes, a matrix
     * in float32 is 3 MiB: without the pages given back the peak is above
     * the whole checkpoint (81 MiB) */
    printf("sharded load: %.1f MiB of bf16 linears; resident peak grew by %.1f MiB\n", (double)bf16_bytes / 1048576.0,
           (double)grew / 1024.0);
    ck_assert_msg(grew * 1024.0 < 0.6 * (double)bf16_bytes, "the load's resident peak grew by %ld kB for %llu bytes of bf16",
                  grew, (unsigned long long)bf16_bytes);
    ck_assert_str_eq(ql_llama_quantization(m), "nf4:blocksize=64,double_quant=1");
    ql_llama_destroy(m);
    free(model);
    free(parent);
}
END_TEST

START_TEST(json_big_integers)
{
    const char *text = "{\"model_max_length\": 1000000000000000019884624838656, \"n\": 9223372036854775807,"
                       " \"m\": -9223372036854775808, \"over\": 9223372036854775808, \"under\": -9223372036854775809,"
                       " \"s\": \"12345678901234567890123\\\" 99999999999999999999\", \"r\": 1.5e300,"
                       " \"a\": [1, 18446744073709551616]}";
    json_error_t err;
    json_t *j = ql_json_loadb(text, strlen(text), JSON_REJECT_DUPLICATES, &err);
    ck_assert_msg(j != NULL, "%s", err.text);
    json_t *v = json_object_get(j, "model_max_length");
    ck_assert(json_is_real(v));
    ck_assert_double_eq(json_real_value(v), 1e30);
    ck_assert(json_is_integer(json_object_get(j, "n")));
    ck_assert_int_eq(json_integer_value(json_object_get(j, "n")), INT64_MAX);
    ck_assert(json_is_integer(json_object_get(j, "m")));
    ck_assert_int_eq(json_integer_value(json_object_get(j, "m")), INT64_MIN);
    ck_assert(json_is_real(json_object_get(j, "over")));
    ck_assert_double_eq(json_real_value(json_object_get(j, "over")), 9223372036854775808.0);
    ck_assert(json_is_real(json_object_get(j, "under")));
    ck_assert_str_eq(json_string_value(json_object_get(j, "s")), "12345678901234567890123\" 99999999999999999999");
    ck_assert(json_is_real(json_object_get(j, "r")));
    ck_assert(json_is_real(json_array_get(json_object_get(j, "a"), 1)));
    ck_assert(json_is_integer(json_array_get(json_object_get(j, "a"), 0)));
    json_decref(j);
    /* plain text is json_loadb's, errors included */
    ck_assert_ptr_null(ql_json_loadb("{\"a\": 1, \"a\": 2}", 16, JSON_REJECT_DUPLICATES, &err));
    ck_assert_ptr_null(ql_json_loadb("{\"a\": 1e999}", 12, 0, &err));
    ck_assert_ptr_null(ql_json_loadb("[1, 2", 5, 0, &err));
}
END_TEST

Suite *safetensors_suite(void)
{
    Suite *s = suite_create("safetensors");

    TCase *tc = tcase_create("round_trip");
    tcase_add_test(tc, test_round_trip_dtypes_shapes_metadata);
    tcase_add_test(tc, test_find_many_names);
    tcase_add_test(tc, test_writer_refuses_bad_tensors);
    tcase_add_test(tc, test_writer_spills_to_disk);
    tcase_add_test(tc, test_empty_header_is_valid);
    suite_add_tcase(s, tc);

    tc = tcase_create("corrupt");
    tcase_add_test(tc, test_corrupt_short_file);
    tcase_add_test(tc, test_corrupt_header_length);
    tcase_add_test(tc, test_corrupt_header_not_json);
    tcase_add_test(tc, test_corrupt_header_array);
    tcase_add_test(tc, test_corrupt_missing_fields);
    tcase_add_test(tc, test_corrupt_unknown_dtype);
    tcase_add_test(tc, test_corrupt_shape_bytes_mismatch);
    tcase_add_test(tc, test_corrupt_offsets_out_of_range);
    tcase_add_test(tc, test_corrupt_overlap);
    tcase_add_test(tc, test_corrupt_negative_shape);
    tcase_add_test(tc, test_corrupt_metadata);
    tcase_add_test(tc, test_missing_file);
    suite_add_tcase(s, tc);

    tc = tcase_create("atomic_files");
    tcase_add_test(tc, test_write_file_atomic);
    tcase_add_test(tc, test_outdir_refuses_existing);
    tcase_add_test(tc, test_outdir_abandon);
    tcase_add_test(tc, test_outdir_commit);
    tcase_add_test(tc, test_outdir_force_replaces);
    suite_add_tcase(s, tc);

    tc = tcase_create("dtype");
    tcase_add_test(tc, test_f16_exact_values);
    tcase_add_test(tc, test_f16_round_trip_all);
    tcase_add_test(tc, test_bf16_exact_values);
    tcase_add_test(tc, test_convert_to_f32);
    tcase_add_test(tc, test_first_nonfinite);
    tcase_add_test(tc, test_dtype_names);
    suite_add_tcase(s, tc);

    tc = tcase_create("json");
    tcase_add_test(tc, json_big_integers);
    tcase_add_test(tc, test_release_gives_pages_back);
    tcase_add_test(tc, test_sharded_load_holds_one_tensor_at_a_time);
    suite_add_tcase(s, tc);
    tc = tcase_create("readers");
    tcase_set_timeout(tc, 20); /* a reader that waits on a FIFO fails by timing out */
    tcase_add_test(tc, test_header_error_after_names_frees_them);
    tcase_add_test(tc, test_unaligned_float_tensors);
    tcase_add_test(tc, test_zero_dim_tensor);
    tcase_add_test(tc, test_fifo_is_refused);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(safetensors_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
