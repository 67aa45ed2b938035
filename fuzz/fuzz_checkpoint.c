/* Checkpoint folders read by `qlora train --resume` (core/train.c, through
 * ql_train_load_checkpoint in core/train_internal.h): the input is cut at
 * QF_SEP into trainer_state.json, adapter_model.safetensors and
 * optimizer.safetensors (an empty part is a missing file), loaded into LoRA
 * adapters (r = 2, every module) and AdamW state for the tiny model, for a
 * run of 10 steps (grad_accum 1, batch size 1, max_len 64) whose
 * configuration is config_text below (the seeds carry the same object). */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz_common.h"
#include "qlora/error.h"
#include "qlora/lora.h"
#include "train_internal.h"

/* Kept equal to CHECKPOINT_CONFIG in fuzz/make_seeds.py. */
static const char config_text[] =
    "{\"model\": \"tiny-model\", \"quantizer\": \"none\", \"data\": \"data.json\", \"format\": \"alpaca\", "
    "\"source_max_len\": 1024, \"target_max_len\": 256, \"max_len\": 64, \"max_examples\": 0, "
    "\"train_on_source\": false, \"lora_r\": 2, \"lora_alpha\": 16.0, \"lora_dropout\": 0.0, \"lora_modules\": 127, "
    "\"lr\": 0.0002, \"weight_decay\": 0.0, \"max_grad_norm\": 0.3, \"warmup_ratio\": 0.03, \"lr_scheduler\": "
    "\"constant\", \"batch_size\": 1, \"grad_accum\": 1, \"seed\": 42, \"shuffle\": true, \"group_by_length\": false, "
    "\"gradient_checkpointing\": false}";
#define TOTAL_STEPS 10

static ql_llama *model;
static ql_lora *lora;
static ql_adamw *opt;
static json_t *config;
static char *dir;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    qf_pin_plugins();
    ql_llama_load_opts lo = {.quantizer = "none"};
    ql_lora_config lc = {.r = 2, .alpha = 16.0f, .dropout = 0.0f, .modules = QL_LORA_ALL_MODULES};
    if (ql_llama_load(qf_tiny_model(), &lo, &model) != QL_OK || ql_lora_create(model, &lc, 42, &lora) != QL_OK ||
        ql_adamw_create(lora->n_params, 0.9f, 0.999f, 1e-8f, 0.0f, &opt) != QL_OK) {
        fprintf(stderr, "fuzz harness: %s\n", ql_error_message());
        abort();
    }
    if (!(config = json_loads(config_text, 0, NULL))) abort();
    dir = qf_path("checkpoint-1");
    qf_mkdir(dir);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *part[3];
    size_t len[3];
    qf_split(data, size, part, len, 3);
    const char *names[3] = {"trainer_state.json", "adapter_model.safetensors", "optimizer.safetensors"};
    for (int i = 0; i < 3; i++) {
        char p[4096];
        snprintf(p, sizeof p, "%s/%s", dir, names[i]);
        if (len[i] || i == 0) qf_write_path(p, part[i], len[i]);
        else unlink(p);
    }
    int64_t step = -1, micro = -1;
    double tokens = -1;
    ql_error_clear();
    int rc = ql_train_load_checkpoint(dir, config, TOTAL_STEPS, 1, 1, 64, lora, opt, &step, &micro, &tokens);
    qf_check_status(rc, "ql_train_load_checkpoint");
    if (rc == QL_OK) {
        /* what the trainer goes on to use */
        if (step < 1 || step >= TOTAL_STEPS || micro != step || opt->step != step || !(tokens >= 0)) {
            fprintf(stderr, "fuzz harness: checkpoint accepted with step %lld, micro-batches %lld, adamw step %lld\n",
                    (long long)step, (long long)micro, (long long)opt->step);
            abort();
        }
        ql_adamw_update(opt, lora->params, lora->grads, 1e-4f);
    }
    return 0;
}
