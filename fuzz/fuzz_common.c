#include "fuzz_common.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qlora/error.h"
#include "qlora/fs.h"
#include "qlora/plugin.h"
#include "qlora/quantize.h"
#include "qlora/safetensors.h"

#ifndef QF_DEFAULT_SHARED
#define QF_DEFAULT_SHARED "../shared"
#endif

static char scratch[4096];

static void die(const char *what)
{
    fprintf(stderr, "fuzz harness: %s: %s\n", what, strerror(errno));
    abort();
}

static void remove_scratch(void)
{
    if (scratch[0]) ql_remove_tree(scratch);
}

const char *qf_dir(void)
{
    if (scratch[0]) return scratch;
    const char *base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : (getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    snprintf(scratch, sizeof scratch, "%s/qlora-fuzz.%ld.XXXXXX", base, (long)getpid());
    if (!mkdtemp(scratch)) die("mkdtemp");
    atexit(remove_scratch);
    return scratch;
}

char *qf_path(const char *name)
{
    char *p = ql_path_join(qf_dir(), name);
    if (!p) die("out of memory");
    return p;
}

void qf_write_path(const char *path, const void *data, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) die(path);
    const char *p = data;
    while (len > 0) {
        ssize_t w = write(fd, p, len);
        if (w < 0) {
            if (errno == EINTR) continue;
            die(path);
        }
        p += w;
        len -= (size_t)w;
    }
    if (close(fd) != 0) die(path);
}

char *qf_write(const char *name, const void *data, size_t len)
{
    char *p = qf_path(name);
    qf_write_path(p, data, len);
    return p;
}

void qf_mkdir(const char *path)
{
    if (mkdir(path, 0700) != 0 && errno != EEXIST) die(path);
}

size_t qf_split(const uint8_t *data, size_t len, const uint8_t **part, size_t *part_len, size_t max)
{
    const size_t sl = sizeof QF_SEP - 1;
    size_t n = 0, start = 0;
    for (size_t i = 0; n + 1 < max && i + sl <= len; i++) {
        if (memcmp(data + i, QF_SEP, sl) != 0) continue;
        part[n] = data + start;
        part_len[n++] = i - start;
        start = i + sl;
        i = start - 1;
    }
    part[n] = data + start;
    part_len[n++] = len - start;
    for (size_t k = n; k < max; k++) {
        part[k] = data + len;
        part_len[k] = 0;
    }
    return n;
}

const char *qf_shared(void)
{
    const char *s = getenv("QLORA_SHARED");
    return s && *s ? s : QF_DEFAULT_SHARED;
}

static void copy_file(const char *src, const char *dst)
{
    char *data;
    size_t len;
    if (ql_read_file(src, &data, &len) != QL_OK) {
        fprintf(stderr, "fuzz harness: %s (set QLORA_SHARED to the shared folder)\n", ql_error_message());
        abort();
    }
    qf_write_path(dst, data, len);
    free(data);
}

/* Small deterministic weights: a linear congruential sequence in [-0.1, 0.1). */
static float *weights(size_t n, uint32_t seed, int ones)
{
    float *w = malloc(n * sizeof *w);
    if (!w) die("out of memory");
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        w[i] = ones ? 1.0f : ((float)(seed >> 8) / 16777216.0f - 0.5f) * 0.2f;
    }
    return w;
}

static void add(ql_st_writer *w, const char *name, int64_t d0, int64_t d1, uint32_t seed, int ones)
{
    size_t n = (size_t)(d0 * (d1 ? d1 : 1));
    float *data = weights(n, seed, ones);
    ql_tensor t = {.name = name, .dtype = QL_DTYPE_F32, .ndim = d1 ? 2 : 1, .data = data, .nbytes = n * 4};
    t.shape[0] = d0;
    t.shape[1] = d1;
    if (ql_st_writer_add(w, &t) != QL_OK) {
        fprintf(stderr, "fuzz harness: %s\n", ql_error_message());
        abort();
    }
    free(data);
}

void qf_write_tiny_model(const char *dir)
{
    enum { H = 16, I = 32, L = 2, NH = 2, NKV = 1, HD = 8, V = 512 };
    if (ql_mkdir_p(dir) != QL_OK) die(dir);
    static const char config[] =
        "{\n  \"architectures\": [\"LlamaForCausalLM\"],\n  \"model_type\": \"llama\",\n  \"hidden_size\": 16,\n"
        "  \"intermediate_size\": 32,\n  \"num_hidden_layers\": 2,\n  \"num_attention_heads\": 2,\n"
        "  \"num_key_value_heads\": 1,\n  \"vocab_size\": 512,\n  \"max_position_embeddings\": 64,\n"
        "  \"rms_norm_eps\": 1e-05,\n  \"rope_theta\": 10000.0,\n  \"hidden_act\": \"silu\",\n"
        "  \"tie_word_embeddings\": true,\n  \"bos_token_id\": 1,\n  \"eos_token_id\": 2,\n"
        "  \"torch_dtype\": \"float32\"\n}\n";
    char *p = ql_path_join(dir, "config.json");
    qf_write_path(p, config, sizeof config - 1);
    free(p);
    const char *files[] = {"tokenizer.json", "tokenizer_config.json"};
    for (int i = 0; i < 2; i++) {
        char src[4096];
        snprintf(src, sizeof src, "%s/models/stories260K/%s", qf_shared(), files[i]);
        p = ql_path_join(dir, files[i]);
        copy_file(src, p);
        free(p);
    }
    ql_st_writer *w;
    if (ql_st_writer_create(&w) != QL_OK) die("writer");
    uint32_t seed = 1;
    add(w, "model.embed_tokens.weight", V, H, seed++, 0);
    add(w, "model.norm.weight", H, 0, seed++, 1);
    static const struct {
        const char *name;
        int64_t out, in;
    } lin[] = {{"self_attn.q_proj", NH * HD, H}, {"self_attn.k_proj", NKV * HD, H}, {"self_attn.v_proj", NKV * HD, H},
               {"self_attn.o_proj", H, NH * HD}, {"mlp.gate_proj", I, H},        {"mlp.up_proj", I, H},
               {"mlp.down_proj", H, I}};
    for (int l = 0; l < L; l++) {
        char name[128];
        snprintf(name, sizeof name, "model.layers.%d.input_layernorm.weight", l);
        add(w, name, H, 0, seed++, 1);
        snprintf(name, sizeof name, "model.layers.%d.post_attention_layernorm.weight", l);
        add(w, name, H, 0, seed++, 1);
        for (size_t k = 0; k < sizeof lin / sizeof lin[0]; k++) {
            snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, lin[k].name);
            add(w, name, lin[k].out, lin[k].in, seed++, 0);
        }
    }
    p = ql_path_join(dir, "model.safetensors");
    if (ql_st_writer_save(w, p) != QL_OK) {
        fprintf(stderr, "fuzz harness: %s\n", ql_error_message());
        abort();
    }
    free(p);
    ql_st_writer_destroy(w);
}

const char *qf_tiny_model(void)
{
    static char *dir;
    if (!dir) {
        dir = qf_path("tiny-model");
        qf_write_tiny_model(dir);
    }
    return dir;
}

const char *qf_quantized_model(const char *spec)
{
    static struct {
        char spec[64];
        char *dir;
    } made[8];
    size_t i = 0;
    for (; i < 8 && made[i].dir; i++)
        if (!strcmp(made[i].spec, spec)) return made[i].dir;
    if (i == 8) abort();
    char name[128];
    snprintf(name, sizeof name, "tiny-model-%s", spec);
    for (char *p = name; *p; p++)
        if (*p == ':' || *p == ',' || *p == '=') *p = '-';
    char *dir = qf_path(name);
    ql_quantize_opts qo = {.force = 0, .progress = 0};
    if (ql_quantize_model(qf_tiny_model(), spec, dir, &qo) != QL_OK) {
        fprintf(stderr, "fuzz harness: quantizing the tiny model with %s: %s\n", spec, ql_error_message());
        abort();
    }
    snprintf(made[i].spec, sizeof made[i].spec, "%s", spec);
    made[i].dir = dir;
    return dir;
}

void qf_pin_plugins(void)
{
    static int done;
    if (done) return;
    done = 1;
    char **paths = NULL;
    size_t n = 0;
    if (ql_plugin_scan(&paths, &n) != QL_OK) return;
    for (size_t i = 0; i < n; i++)
        if (!dlopen(paths[i], RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE))
            fprintf(stderr, "fuzz harness: cannot pin %s: %s\n", paths[i], dlerror());
    ql_string_list_free(paths, n);
}

void qf_check_status(int rc, const char *what)
{
    static int verbose = -1;
    if (verbose < 0) verbose = getenv("QLORA_FUZZ_VERBOSE") != NULL;
    if (verbose) fprintf(stderr, "fuzz harness: %s: %s%s%s\n", what, ql_status_name(rc), rc ? ": " : "", rc ? ql_error_message() : "");
    if (rc == QL_OK) return;
    if (rc < 0 || rc > QL_EINTERNAL) {
        fprintf(stderr, "fuzz harness: %s returned %d, not a qlora status\n", what, rc);
        abort();
    }
    if (!ql_error_message()[0]) {
        fprintf(stderr, "fuzz harness: %s failed with %s but set no message\n", what, ql_status_name(rc));
        abort();
    }
}

uint64_t qf_hash(const uint8_t *data, size_t len)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < len; i++) h = (h ^ data[i]) * 1099511628211ull;
    return h;
}
