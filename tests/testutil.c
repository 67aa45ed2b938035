#include "testutil.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "qlora/qlora.h"

const char *tu_env(const char *name)
{
    const char *v = getenv(name);
    ck_assert_msg(v && *v, "environment variable %s is not set (run through meson test)", name);
    return v;
}

const char *tu_tmpdir(void)
{
    static char dir[256];
    snprintf(dir, sizeof dir, "/tmp/qlora-test-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(dir));
    return dir;
}

static char *slurp(const char *path)
{
    char *data;
    size_t len;
    if (ql_read_file(path, &data, &len) != QL_OK) return strdup("");
    return data;
}

int tu_run(const char *cmdline, char **out, char **err)
{
    char o[] = "/tmp/qlora-out-XXXXXX", e[] = "/tmp/qlora-err-XXXXXX";
    int fo = mkstemp(o), fe = mkstemp(e);
    ck_assert(fo >= 0 && fe >= 0);
    close(fo);
    close(fe);
    size_t cap = strlen(cmdline) + 128;
    char *full = malloc(cap);
    snprintf(full, cap, "%s >%s 2>%s </dev/null", cmdline, o, e);
    int status = system(full);
    free(full);
    if (out) *out = slurp(o);
    if (err) *err = slurp(e);
    unlink(o);
    unlink(e);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

void tu_randn(float *x, size_t n, uint64_t seed, float scale)
{
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i += 2) {
        double u[2];
        for (int k = 0; k < 2; k++) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            u[k] = ((double)(s >> 11) + 0.5) / 9007199254740992.0;
        }
        double r = sqrt(-2.0 * log(u[0]));
        x[i] = (float)(r * cos(6.283185307179586 * u[1])) * scale;
        if (i + 1 < n) x[i + 1] = (float)(r * sin(6.283185307179586 * u[1])) * scale;
    }
}

void tu_write_model(const char *dir, const tu_tensor *tensors, size_t n, const char *config_json)
{
    ck_assert_int_eq(ql_mkdir_p(dir), QL_OK);
    ql_st_writer *w;
    ck_assert_int_eq(ql_st_writer_create(&w), QL_OK);
    for (size_t i = 0; i < n; i++) {
        ql_tensor t = {.name = tensors[i].name, .dtype = tensors[i].dtype, .ndim = tensors[i].ndim};
        int64_t numel = 1;
        for (int d = 0; d < t.ndim; d++) {
            t.shape[d] = tensors[i].shape[d];
            numel *= t.shape[d];
        }
        size_t es = ql_dtype_size(t.dtype);
        void *buf = NULL;
        if (tensors[i].data) {
            t.data = tensors[i].data;
        } else {
            float *f = malloc((size_t)numel * sizeof(float) + 4);
            tu_randn(f, (size_t)numel, i + 1, 0.05f);
            buf = malloc((size_t)numel * es + 4);
            for (int64_t k = 0; k < numel; k++) {
                if (t.dtype == QL_DTYPE_F32) ((float *)buf)[k] = f[k];
                else if (t.dtype == QL_DTYPE_F16) ((uint16_t *)buf)[k] = ql_f32_to_f16(f[k]);
                else if (t.dtype == QL_DTYPE_BF16) ((uint16_t *)buf)[k] = ql_f32_to_bf16(f[k]);
                else ((uint8_t *)buf)[k * es] = (uint8_t)k;
            }
            free(f);
            t.data = buf;
        }
        t.nbytes = (uint64_t)numel * es;
        ck_assert_int_eq(ql_st_writer_add(w, &t), QL_OK);
        free(buf);
    }
    char *path = ql_path_join(dir, "model.safetensors");
    ck_assert_int_eq(ql_st_writer_save(w, path), QL_OK);
    free(path);
    ql_st_writer_destroy(w);
    const char *cfg = config_json ? config_json
                                  : "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\"}";
    path = ql_path_join(dir, "config.json");
    ck_assert_int_eq(ql_write_file_atomic(path, cfg, strlen(cfg)), QL_OK);
    free(path);
}

int tu_contains(const char *haystack, const char *needle) { return haystack && strstr(haystack, needle) != NULL; }

const ql_tensor *tu_need(const ql_st_file *f, const char *fmt, ...)
{
    char key[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(key, sizeof key, fmt, ap);
    va_end(ap);
    const ql_tensor *t = ql_st_find(f, key);
    ck_assert_msg(t != NULL, "reference tensor %s missing", key);
    return t;
}

double tu_rel_error(const float *got, const float *want, size_t n, size_t *worst)
{
    double num = 0, den = 0, w = -1;
    for (size_t i = 0; i < n; i++) {
        double d = (double)got[i] - want[i];
        num += d * d;
        den += (double)want[i] * want[i];
        if (fabs(d) > w) w = fabs(d), *worst = i;
    }
    return sqrt(num / (den > 0 ? den : 1));
}
