/* LoRA adapters on the linear layers of a LLaMA model (PEFT conventions:
 * y = x W^T + (alpha / r) * (dropout(x) A^T) B^T, A [r, in] kaiming-uniform,
 * B [out, r] zeros), their AdamW optimizer, and PEFT adapter files. */
#ifndef QLORA_LORA_H
#define QLORA_LORA_H

#include <stddef.h>
#include <stdint.h>

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The seven linear modules of a decoder block, in PEFT's names. */
enum { QL_MOD_Q, QL_MOD_K, QL_MOD_V, QL_MOD_O, QL_MOD_GATE, QL_MOD_UP, QL_MOD_DOWN, QL_MOD_COUNT };
#define QL_LORA_ALL_MODULES 0x7fu

const char *ql_lora_module_name(int module); /* "q_proj", ... */
const char *ql_lora_module_path(int module); /* "self_attn.q_proj", ... */
/* "all" or a comma-separated list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj */
int ql_lora_modules_parse(const char *list, uint32_t *mask);

typedef struct ql_lora_config {
    int r;
    float alpha;
    float dropout;
    uint32_t modules; /* bit per QL_MOD_* */
} ql_lora_config;

typedef struct ql_lora_pair {
    int64_t in, out;
    float *A, *B;   /* [r, in], [out, r] in the parameter arena */
    float *dA, *dB; /* same layout in the gradient arena */
} ql_lora_pair;

typedef struct ql_lora {
    ql_lora_config cfg;
    float scaling;     /* alpha / r */
    int n_layers;
    ql_lora_pair *pairs; /* [n_layers * QL_MOD_COUNT]; A == NULL where not targeted */
    float *params;       /* every A and B, one allocation */
    float *grads;        /* gradients, same layout */
    size_t n_params;
} ql_lora;

/* New adapters: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a =
 * sqrt(5), as PEFT), B = 0, from a seeded generator. */
int ql_lora_create(const ql_llama *m, const ql_lora_config *cfg, uint64_t seed, ql_lora **out);
void ql_lora_destroy(ql_lora *l);
ql_lora_pair *ql_lora_pair_at(ql_lora *l, int layer, int module); /* NULL if not targeted */

/* Make the model's forward pass (ql_llama_forward: eval, generate) apply
 * these adapters; NULL detaches.  The adapter must outlive the attachment. */
void ql_lora_attach(ql_llama *m, const ql_lora *l);
/* 1 when an adapter is attached to some linear of m */
int ql_lora_attached(ql_llama *m);

/* PEFT adapter folder: adapter_config.json + adapter_model.safetensors,
 * written into `dir` (which must exist) so that a crash leaves the pair old,
 * absent (the config removed first) or new: the weights are renamed into
 * place before the new config.  The weights' metadata ("qlora_adapter")
 * names the r, lora_alpha and target modules they were written with. */
int ql_lora_save_peft(const ql_lora *l, const char *dir, const char *base_model);
/* The base quantizer a `qlora train` run folder records in run_config.json
 * (QL_ENOTFOUND when there is none, e.g. a plain peft adapter folder).  The
 * file is untrusted: anything but a plugin name with options (a path above
 * all) is an error naming the file and field; open what it returns with
 * ql_llama_load_opts.quantizer_file set to RUN_DIR/run_config.json. */
int ql_lora_run_quantizer(const char *run_dir, char *buf, size_t cap);
/* The calibration a qlora run folder's base was quantized with on load
 * (run_config.json "calibration": a data-aware quantizer trained over a
 * full-precision checkpoint), into *out, its file and format copied into
 * data_buf and fmt_buf; QL_ENOTFOUND when the run had none (or there is no
 * run_config.json).  Every field is type- and range-checked; a path is data
 * to read, never code. */
int ql_lora_run_calibration(const char *run_dir, ql_calib_opts *out, char *data_buf, size_t data_cap, char *fmt_buf,
                            size_t fmt_cap);
/* Load a PEFT adapter for this model: every adapter_config.json field read
 * is type- and range-checked, unsupported variants (rslora, dora, ...) are
 * refused by name, the tensors must be exactly those of the config, of its
 * shapes and finite, and qlora-written weights must name this config. */
int ql_lora_load_peft(const ql_llama *m, const char *dir, ql_lora **out);

/* AdamW as torch.optim.AdamW (decoupled weight decay, bias correction). */
typedef struct ql_adamw {
    float beta1, beta2, eps, weight_decay;
    int64_t step;
    size_t n;
    float *m, *v;
} ql_adamw;

int ql_adamw_create(size_t n, float beta1, float beta2, float eps, float weight_decay, ql_adamw **out);

/* What one update needs besides the arrays: o's hyperparameters and the
 * bias corrections of step o->step + 1 (ql_adamw_scalars increments o->step). */
typedef struct ql_adamw_scalars {
    float beta1, beta2, eps, decay; /* decay = 1 - lr * weight_decay */
    float step_size, bc2_sqrt;      /* lr / (1 - beta1^t), sqrt(1 - beta2^t) */
} ql_adamw_scalars;
void ql_adamw_scalars_next(ql_adamw *o, float lr, ql_adamw_scalars *out);
/* the element loop of ql_adamw_update over n elements */
void ql_adamw_apply(const ql_adamw_scalars *h, float *params, float *m, float *v, const float *grads, size_t n);
void ql_adamw_destroy(ql_adamw *o);
void ql_adamw_update(ql_adamw *o, float *params, const float *grads, float lr);
/* Global L2 norm of grads; if max_norm > 0 and the norm exceeds it, scale
 * grads by max_norm / (norm + 1e-6) as torch's clip_grad_norm_ does. */
double ql_clip_grad_norm(float *grads, size_t n, double max_norm);

#ifdef __cplusplus
}
#endif
#endif
