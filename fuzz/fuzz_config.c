/* config.json: the LLaMA config parser (core/llama.c ql_llama_config_parse),
 * then the whole model load (ql_llama_load: quantization_config, the plugin
 * it names, shapes against the weights).  The weights are the tiny model's,
 * dense or quantized with the plugin the input names (nf4, fp4 or int8 found
 * in it), so that a config close to the real one loads. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz_common.h"
#include "qlora/error.h"
#include "qlora/llama.h"

enum { DENSE, NF4, FP4, INT8, KINDS };
static const char *const specs[KINDS] = {NULL, "nf4", "fp4", "int8"};
static char *model_dir[KINDS];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    qf_pin_plugins();
    for (int k = 0; k < KINDS; k++) {
        const char *src = specs[k] ? qf_quantized_model(specs[k]) : qf_tiny_model();
        char name[64];
        snprintf(name, sizeof name, "model-%d", k);
        model_dir[k] = qf_path(name);
        qf_mkdir(model_dir[k]);
        const char *files[] = {"model.safetensors", "tokenizer.json", "tokenizer_config.json"};
        for (int i = 0; i < 3; i++) {
            char s[4096], d[4096];
            snprintf(s, sizeof s, "%s/%s", src, files[i]);
            snprintf(d, sizeof d, "%s/%s", model_dir[k], files[i]);
            if (symlink(s, d) != 0) abort();
        }
    }
    return 0;
}

static int names(const uint8_t *data, size_t size, const char *what)
{
    size_t n = strlen(what);
    for (size_t i = 0; i + n <= size; i++)
        if (!memcmp(data + i, what, n)) return 1;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* the parser alone, on the JSON as ql_model_files_open reads it */
    json_error_t err;
    json_t *cfg = json_loadb((const char *)data, size, JSON_REJECT_DUPLICATES, &err);
    if (cfg) {
        ql_llama_config c;
        ql_error_clear();
        qf_check_status(ql_llama_config_parse(cfg, &c), "ql_llama_config_parse");
        json_decref(cfg);
    }
    /* the loader, on the same bytes as the folder's config.json */
    int kind = names(data, size, "nf4")                                               ? NF4
               : names(data, size, "\"int8") || names(data, size, "\"load_in_8bit\": true") ? INT8
               : names(data, size, "fp4") || names(data, size, "load_in_4bit")         ? FP4
                                                                                        : DENSE;
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", model_dir[kind]);
    qf_write_path(path, data, size);
    ql_llama *m = NULL;
    ql_llama_load_opts lo = {.quantizer = (qf_hash(data, size) & 1) ? "nf4" : NULL, .progress = 0};
    ql_error_clear();
    int rc = ql_llama_load(model_dir[kind], &lo, &m);
    qf_check_status(rc, "ql_llama_load");
    if (rc == QL_OK) {
        ql_kv_cache *cache = NULL;
        const ql_llama_config *c = ql_llama_get_config(m);
        if (ql_kv_cache_create(m, 8, &cache) == QL_OK) {
            int32_t tok[4] = {1, 2, 3, 4};
            float *logits = malloc((size_t)c->vocab * sizeof *logits);
            for (int i = 0; i < 4; i++) tok[i] %= c->vocab;
            if (logits) qf_check_status(ql_llama_forward(m, cache, tok, 4, logits, 1), "ql_llama_forward");
            free(logits);
            ql_kv_cache_destroy(cache);
        }
    }
    ql_llama_destroy(m);
    return 0;
}
