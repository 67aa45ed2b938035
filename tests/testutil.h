/* Helpers shared by the Check suites. */
#ifndef QL_TESTUTIL_H
#define QL_TESTUTIL_H

#include <check.h>
#include <stddef.h>
#include <stdint.h>

#include "qlora/safetensors.h"

/* Environment value or abort the test with a clear message. */
const char *tu_env(const char *name);
/* A fresh temporary folder (removed by tu_cleanup at exit). */
const char *tu_tmpdir(void);
/* Run a shell command line; capture stdout and stderr (caller frees); return exit status. */
int tu_run(const char *cmdline, char **out, char **err);
/* Write a fake LLaMA checkpoint folder with the given tensors (F32 unless dtype given). */
typedef struct tu_tensor {
    const char *name;
    int dtype;
    int ndim;
    int64_t shape[4];
    const void *data; /* NULL: deterministic pseudo-random normal values */
} tu_tensor;
void tu_write_model(const char *dir, const tu_tensor *tensors, size_t n, const char *config_json);
/* Deterministic pseudo-random normal numbers. */
void tu_randn(float *x, size_t n, uint64_t seed, float scale);
int tu_contains(const char *haystack, const char *needle);
/* A tensor of a reference file by printf-formatted name; fails the test when absent. */
const ql_tensor *tu_need(const ql_st_file *f, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Relative L2 error ||got - want|| / ||want||; *worst gets the index of the largest |difference|. */
double tu_rel_error(const float *got, const float *want, size_t n, size_t *worst);

#define ck_assert_contains(hay, needle)                                                                   \
    ck_assert_msg(tu_contains((hay), (needle)), "expected to find \"%s\" in:\n%s", (needle), (hay) ? (hay) : "(null)")

#endif
