/* The plugin loader and a conformance loop that runs every registered
 * quantizer (the shipped ones, non-default options, and the out-of-tree
 * example by path) through the same checks. */
#include <check.h>
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ql_config.h"
#include "qlora/qlora.h"
#include "testutil.h"

typedef struct conformance_case {
    const char *spec; /* NULL: the example plugin by path */
    double max_rel_error;
} conformance_case;

static const conformance_case cases[] = {
    {"nf4", 0.12},
    {"nf4:double_quant=0,blocksize=128", 0.13},
    {"nf4:blocksize=32", 0.11},
    {"fp4", 0.16},
    {"fp4:double_quant=0,blocksize=4096", 0.25},
    {"int8", 0.01},
    {NULL, 0.12},
};
enum { NCASES = sizeof cases / sizeof cases[0] };

static const int64_t shapes[][2] = {{64, 172}, {3, 5}, {1, 63}, {33, 65}, {256, 300}};

static ql_qz *open_case(int i)
{
    char spec[1024];
    if (cases[i].spec) snprintf(spec, sizeof spec, "%s", cases[i].spec);
    else snprintf(spec, sizeof spec, "%s:group_size=64", tu_env("QLORA_EXAMPLE_PLUGIN"));
    ql_qz *q = NULL;
    int rc = ql_qz_open(spec, &q);
    ck_assert_msg(rc == QL_OK, "open %s: %s", spec, ql_error_message());
    return q;
}

typedef struct saved {
    ql_st_writer *w;
    uint64_t bytes;
} saved;

static int put(void *ctx, const ql_tensor *t)
{
    saved *s = ctx;
    char name[256];
    snprintf(name, sizeof name, "layer.%s", t->name);
    ql_tensor c = *t;
    c.name = name;
    s->bytes += t->nbytes;
    return ql_st_writer_add(s->w, &c);
}

typedef struct reader_ctx {
    const ql_st_file *f;
} reader_ctx;

static const ql_tensor *get(void *ctx, const char *suffix)
{
    char name[256];
    snprintf(name, sizeof name, "layer.%s", suffix);
    return ql_st_find(((reader_ctx *)ctx)->f, name);
}

static const ql_tensor *get_nothing(void *ctx, const char *suffix)
{
    (void)ctx;
    (void)suffix;
    return NULL;
}

START_TEST(conformance)
{
    ql_qz *q = open_case(_i);
    const ql_quantizer_desc *d = q->desc;
    ck_assert_str_ne(d->name, "");
    const char *dir = tu_tmpdir();
    for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
        int64_t rows = shapes[k][0], cols = shapes[k][1], n = rows * cols;
        float *w = malloc((size_t)n * 4), *back = malloc((size_t)n * 4), *back2 = malloc((size_t)n * 4);
        uint16_t *bf = malloc((size_t)n * 2);
        tu_randn(w, (size_t)n, 42 + k, 0.03f);
        ql_matrix_desc md = {.name = "layer", .rows = rows, .cols = cols, .src_dtype = QL_DTYPE_F32};
        ql_qstate *s = NULL;
        ck_assert_msg(d->quantize(q->inst, &md, w, &s) == QL_OK, "%s quantize: %s", q->spec, ql_error_message());
        ck_assert_int_eq(d->materialize(q->inst, s, QL_DTYPE_F32, back), QL_OK);
        ck_assert_int_eq(d->materialize(q->inst, s, QL_DTYPE_BF16, bf), QL_OK);
        double sq = 0, ref = 0;
        for (int64_t i = 0; i < n; i++) {
            sq += ((double)back[i] - w[i]) * ((double)back[i] - w[i]);
            ref += (double)w[i] * w[i];
            ck_assert_msg(bf[i] == ql_f32_to_bf16(back[i]), "%s bf16[%lld] = 0x%04x, f32 %g", q->spec, (long long)i,
                          bf[i], back[i]);
        }
        double rel = sqrt(sq / ref);
        ck_assert_msg(rel < cases[_i].max_rel_error, "%s on %lldx%lld: relative error %g >= %g", q->spec,
                      (long long)rows, (long long)cols, rel, cases[_i].max_rel_error);
        ck_assert_msg(rel > 0.0, "%s: lossless on random data is suspicious", q->spec);
        /* dtypes the slot does not support are refused, not guessed */
        ck_assert_int_eq(d->materialize(q->inst, s, QL_DTYPE_I8, back2), QL_ENOTSUP);

        /* save -> file -> load gives the same weights, and state_info counts the bytes */
        saved sv = {0};
        ck_assert_int_eq(ql_st_writer_create(&sv.w), QL_OK);
        ql_tensor_writer tw = {&sv, put};
        ck_assert_int_eq(d->save(q->inst, s, &tw), QL_OK);
        ql_state_info info;
        ck_assert_int_eq(d->state_info(q->inst, s, &info), QL_OK);
        ck_assert_int_eq(info.rows, rows);
        ck_assert_int_eq(info.cols, cols);
        ck_assert_uint_eq(info.bytes, sv.bytes);
        double bpp = d->bits_per_param(q->inst, rows, cols);
        /* every byte save() wrote, but for the few characters of a float the
         * weights put in bitsandbytes' quant_state JSON (the nested offset) */
        ck_assert_msg(fabs(bpp * (double)n / 8.0 - (double)sv.bytes) <= 4.0 + 1e-9,
                      "%s: bits_per_param %g gives %g bytes, save() wrote %llu", q->spec, bpp, bpp * (double)n / 8.0,
                      (unsigned long long)sv.bytes);
        char *path = ql_path_join(dir, "state.safetensors");
        ck_assert_int_eq(ql_st_writer_save(sv.w, path), QL_OK);
        ql_st_writer_destroy(sv.w);
        ql_st_file *f;
        ck_assert_int_eq(ql_st_open(path, &f), QL_OK);
        reader_ctx rc = {f};
        ql_tensor_reader tr = {&rc, get};
        ql_qstate *s2 = NULL;
        ck_assert_msg(d->load(q->inst, &md, &tr, &s2) == QL_OK, "%s load: %s", q->spec, ql_error_message());
        ck_assert_int_eq(d->materialize(q->inst, s2, QL_DTYPE_F32, back2), QL_OK);
        ck_assert_msg(memcmp(back, back2, (size_t)n * 4) == 0, "%s: weights differ after save/load", q->spec);
        /* a shape mismatch against the caller's expectation is refused */
        ql_matrix_desc wrong = md;
        wrong.rows = rows + 1;
        ql_qstate *s3 = NULL;
        ck_assert_int_eq(d->load(q->inst, &wrong, &tr, &s3), QL_EFORMAT);
        ql_st_close(f);
        free(path);
        /* tensors in another format are "not mine", with no error */
        ql_tensor_reader none = {NULL, get_nothing};
        ck_assert_int_eq(d->load(q->inst, &md, &none, &s3), QL_ENOTFOUND);
        d->free_state(q->inst, s2);
        d->free_state(q->inst, s);
        d->free_state(q->inst, NULL);

        /* NaN input is refused with its index */
        w[n / 2] = NAN;
        ql_error_clear();
        ck_assert_int_eq(d->quantize(q->inst, &md, w, &s), QL_ENUMERIC);
        char idx[32];
        snprintf(idx, sizeof idx, "%lld", (long long)(n / 2));
        ck_assert_contains(ql_error_message(), idx);
        free(w);
        free(back);
        free(back2);
        free(bf);
    }
    ql_qz_close(q);
}
END_TEST

START_TEST(bits_per_param_values)
{
    ql_qz *q;
    ck_assert_int_eq(ql_qz_open("nf4", &q), QL_OK);
    /* every byte save() writes for a 4096 x 4096 float32 matrix: 4-bit codes, an
     * 8-bit absmax per 64, a float32 nested absmax per 256 blocks, the 16- and
     * 256-entry float32 code tables, and the quant_state JSON (171 bytes with
     * the offset 0.05; 81 without double quant) */
    const double n = 4096.0 * 4096.0;
    double bpp = q->desc->bits_per_param(q->inst, 4096, 4096);
    ck_assert_double_eq_tol(bpp, 8.0 * (n / 2 + n / 64 + n / 64 / 256 * 4 + 64 + 1024 + 171) / n, 1e-12);
    ck_assert_str_eq(q->options, "blocksize=64,double_quant=1");
    ql_qz_close(q);
    ck_assert_int_eq(ql_qz_open("nf4:double_quant=0", &q), QL_OK);
    ck_assert_double_eq_tol(q->desc->bits_per_param(q->inst, 4096, 4096), 8.0 * (n / 2 + n / 64 * 4 + 64 + 81) / n,
                            1e-12);
    ql_qz_close(q);
    ck_assert_int_eq(ql_qz_open("int8", &q), QL_OK);
    ck_assert_double_eq_tol(q->desc->bits_per_param(q->inst, 4096, 4096), 8.0 + 32.0 / 4096 + 8.0 / (4096.0 * 4096),
                            1e-12);
    ql_qz_close(q);
}
END_TEST

/* A closed plugin stays mapped (RTLD_NODELETE): a plugin with CUDA kernels
 * unmapped and mapped again before CUDA starts makes the next launch hang or
 * fail (core/plugin.c).  Opened again, it is the same image. */
START_TEST(closed_plugin_stays_mapped)
{
    ql_qz *q = NULL;
    ck_assert_int_eq(ql_qz_open("fp4", &q), QL_OK);
    char path[4096];
    snprintf(path, sizeof path, "%s", ql_plugin_path(q->plugin));
    unsigned char entry[sizeof q->desc->quantize]; /* a function pointer, compared as bytes (C has no cast to void *) */
    memcpy(entry, &q->desc->quantize, sizeof entry);
    ql_qz_close(q);
    void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    ck_assert_msg(h != NULL, "%s was unmapped by ql_qz_close", path);
    dlclose(h);
    ck_assert_int_eq(ql_qz_open("fp4:double_quant=0", &q), QL_OK);
    ck_assert(memcmp(entry, &q->desc->quantize, sizeof entry) == 0);
    ql_qz_close(q);
}
END_TEST

START_TEST(options_are_checked)
{
    ql_qz *q = NULL;
    ck_assert_int_eq(ql_qz_open("nf4:foo=1", &q), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "'foo'");
    ck_assert_int_eq(ql_qz_open("nf4:blocksize=100", &q), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "blocksize=100");
    ck_assert_int_eq(ql_qz_open("fp4:double_quant=2", &q), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "double_quant=2");
    ck_assert_int_eq(ql_qz_open("int8:x=1", &q), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "'x'");
    ck_assert_int_eq(ql_qz_open("nf4:blocksize", &q), QL_EINVAL);
    ck_assert_contains(ql_error_message(), "not key=value");
    ck_assert_ptr_null(q);
}
END_TEST

START_TEST(unknown_quantizer_says_where_it_looked)
{
    ql_qz *q = NULL;
    ck_assert_int_eq(ql_qz_open("nosuch", &q), QL_ENOTFOUND);
    const char *m = ql_error_message();
    ck_assert_contains(m, "unknown quantizer 'nosuch'");
    ck_assert_contains(m, tu_env("QLORA_PLUGIN_PATH"));
    ck_assert_contains(m, "found: ");
    ck_assert_contains(m, "nf4");
    ck_assert_int_eq(ql_qz_open("./does/not/exist.so", &q), QL_ENOTFOUND);
    ck_assert_contains(ql_error_message(), "./does/not/exist.so");
}
END_TEST

static const struct {
    const char *kind;
    const char *fragment;
} bad[] = {
    {"major", "abi_major is 99"},
    {"minor", "needs a newer qlora"},
    {"size", "struct_size is 40 bytes"},
    {"nullslot", "required slot 'quantize' is NULL"},
    {"name", "name 'Bad Name!'"},
    {"noentry", "does not export ql_quantizer_entry"},
    {"nulldesc", "returned NULL"},
};

START_TEST(abi_refusals)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/qlora_bad_%s.so", tu_env("QLORA_TEST_PLUGINS"), bad[_i].kind);
    ql_plugin *p = NULL;
    ck_assert_int_eq(ql_plugin_open(path, &p), QL_EABI);
    ck_assert_ptr_null(p);
    ck_assert_contains(ql_error_message(), path);
    ck_assert_contains(ql_error_message(), bad[_i].fragment);
    if (strcmp(bad[_i].kind, "major") == 0 || strcmp(bad[_i].kind, "minor") == 0)
        ck_assert_contains(ql_error_message(), "1.3"); /* the host's version too */
}
END_TEST

/* A plugin built against ABI 1.0 loads, and the 1.1 device slots past its
 * struct_size read as absent whatever bytes lie there. */
START_TEST(abi_1_0_plugin_loads_without_device_slots)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/qlora_bad_v10.so", tu_env("QLORA_TEST_PLUGINS"));
    ql_plugin *p = NULL;
    ck_assert_msg(ql_plugin_open(path, &p) == QL_OK, "%s", ql_error_message());
    const ql_quantizer_desc *d = ql_plugin_desc(p);
    ck_assert_int_eq(d->abi_minor, 0);
    ck_assert(d->device_buffers == NULL);
    ck_assert(d->device_workspace == NULL);
    ck_assert(d->materialize_rows_device == NULL);
    ck_assert(d->quantize_device == NULL);
    ck_assert(d->materialize != NULL);
    ql_plugin_close(p);
}
END_TEST

/* A plugin built against ABI 1.1 loads with its device slots, and 1.2's
 * quantize_device past its struct_size reads as absent. */
START_TEST(abi_1_1_plugin_loads_without_quantize_device)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/qlora_bad_v11.so", tu_env("QLORA_TEST_PLUGINS"));
    ql_plugin *p = NULL;
    ck_assert_msg(ql_plugin_open(path, &p) == QL_OK, "%s", ql_error_message());
    const ql_quantizer_desc *d = ql_plugin_desc(p);
    ck_assert_int_eq(d->abi_minor, 1);
    ck_assert(d->device_buffers != NULL);
    ck_assert(d->device_workspace != NULL);
    ck_assert(d->materialize_rows_device != NULL);
    ck_assert(d->quantize_device == NULL);
    ql_plugin_close(p);
}
END_TEST

START_TEST(shipped_plugins_have_all_device_slots_or_none)
{
    const char *names[] = {"nf4", "fp4", "int8"};
    for (size_t i = 0; i < 3; i++) {
        ql_qz *q = NULL;
        ck_assert_int_eq(ql_qz_open(names[i], &q), QL_OK);
        int n = !!q->desc->device_buffers + !!q->desc->device_workspace + !!q->desc->materialize_rows_device +
                !!q->desc->quantize_device;
        ck_assert_msg(n == 0 || n == 4, "%s has %d of the 4 device slots", names[i], n);
#if QL_HAVE_CUDA
        ck_assert_msg(n == 4, "%s was built with CUDA but lacks its device slots", names[i]);
#endif
        ql_qz_close(q);
    }
}
END_TEST

START_TEST(not_a_shared_object)
{
    const char *dir = tu_tmpdir();
    char *path = ql_path_join(dir, "junk.so");
    ck_assert_int_eq(ql_write_file_atomic(path, "not an ELF file\n", 16), QL_OK);
    ql_plugin *p = NULL;
    ck_assert_int_eq(ql_plugin_open(path, &p), QL_EIO);
    ck_assert_contains(ql_error_message(), path);
    ck_assert_msg(tu_contains(ql_error_message(), "invalid ELF header") || tu_contains(ql_error_message(), "too short"),
                  "no dlerror text in: %s", ql_error_message());
    free(path);
}
END_TEST

START_TEST(scan_finds_shipped_plugins)
{
    char **paths;
    size_t n;
    ck_assert_int_eq(ql_plugin_scan(&paths, &n), QL_OK);
    int nf4 = 0, fp4 = 0, int8 = 0;
    for (size_t i = 0; i < n; i++) {
        nf4 += tu_contains(paths[i], "/qlora_nf4.so");
        fp4 += tu_contains(paths[i], "/qlora_fp4.so");
        int8 += tu_contains(paths[i], "/qlora_int8.so");
    }
    ck_assert_int_eq(nf4, 1);
    ck_assert_int_eq(fp4, 1);
    ck_assert_int_eq(int8, 1);
    ql_string_list_free(paths, n);
}
END_TEST

Suite *plugins_suite(void)
{
    Suite *s = suite_create("plugins");
    TCase *t = tcase_create("conformance");
    tcase_set_timeout(t, 120);
    tcase_add_loop_test(t, conformance, 0, NCASES);
    tcase_add_test(t, bits_per_param_values);
    suite_add_tcase(s, t);
    t = tcase_create("loader");
    tcase_add_test(t, options_are_checked);
    tcase_add_test(t, closed_plugin_stays_mapped);
    tcase_add_test(t, unknown_quantizer_says_where_it_looked);
    tcase_add_loop_test(t, abi_refusals, 0, sizeof bad / sizeof bad[0]);
    tcase_add_test(t, abi_1_0_plugin_loads_without_device_slots);
    tcase_add_test(t, abi_1_1_plugin_loads_without_quantize_device);
    tcase_add_test(t, shipped_plugins_have_all_device_slots_or_none);
    tcase_add_test(t, not_a_shared_object);
    tcase_add_test(t, scan_finds_shipped_plugins);
    suite_add_tcase(s, t);
    return s;
}

int main(void)
{
    SRunner *r = srunner_create(plugins_suite());
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
