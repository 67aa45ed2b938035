/* PEFT adapter folders (core/lora.c ql_lora_load_peft, ql_lora_run_quantizer):
 * the input is cut at QF_SEP into adapter_config.json,
 * adapter_model.safetensors and run_config.json (an empty part is a missing
 * file); the adapter is loaded for the tiny model and, when it loads, applied
 * in a forward pass. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz_common.h"
#include "qlora/error.h"
#include "qlora/lora.h"

static ql_llama *model;
static char *dir;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    qf_pin_plugins();
    ql_llama_load_opts lo = {.quantizer = "none"};
    if (ql_llama_load(qf_tiny_model(), &lo, &model) != QL_OK) {
        fprintf(stderr, "fuzz harness: %s\n", ql_error_message());
        abort();
    }
    dir = qf_path("adapter");
    qf_mkdir(dir);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *part[3];
    size_t len[3];
    qf_split(data, size, part, len, 3);
    const char *names[3] = {"adapter_config.json", "adapter_model.safetensors", "run_config.json"};
    for (int i = 0; i < 3; i++) {
        char p[4096];
        snprintf(p, sizeof p, "%s/%s", dir, names[i]);
        if (len[i] || i == 0) qf_write_path(p, part[i], len[i]);
        else unlink(p);
    }
    char spec[512];
    ql_error_clear();
    int rc = ql_lora_run_quantizer(dir, spec, sizeof spec);
    if (rc != QL_ENOTFOUND) qf_check_status(rc, "ql_lora_run_quantizer");
    ql_lora *l = NULL;
    ql_error_clear();
    rc = ql_lora_load_peft(model, dir, &l);
    qf_check_status(rc, "ql_lora_load_peft");
    if (rc == QL_OK) {
        ql_lora_attach(model, l);
        ql_kv_cache *cache = NULL;
        if (ql_kv_cache_create(model, 4, &cache) == QL_OK) {
            int32_t ids[3] = {1, 100, 200};
            float *logits = malloc(512 * sizeof *logits);
            if (logits) qf_check_status(ql_llama_forward(model, cache, ids, 3, logits, 1), "ql_llama_forward");
            free(logits);
            ql_kv_cache_destroy(cache);
        }
        ql_lora_attach(model, NULL);
        ql_lora_destroy(l);
    }
    return 0;
}
