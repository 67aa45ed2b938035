#include "qlora/llama.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "calibrate_internal.h"
#include "ops.h"
#include "prequantized.h"
#include "progress.h"
#include "quantize_device.h"
#include "rope.h"
#include "qlora/dtype.h"
#include "qlora/error.h"
#include "qlora/fs.h"
#include "qlora/model.h"

struct ql_llama {
    ql_be_ctx *ctx; /* where the forward pass runs (its backend, status) */
    ql_llama_config cfg;
    char *dir;      /* the folder it was loaded from */
    json_t *config; /* its config.json */
    ql_qz *qz;              /* quantizer of the block linears, or NULL */
    int calibrated;         /* quantized on load by the calibration pass (ql_llama_calibrated) */
    char quantization[600]; /* "nf4:..." or "none" */
    float *embed;           /* [vocab, hidden] */
    float *final_norm;      /* [hidden] */
    float *lm_head;         /* [vocab, hidden]; == embed when tied */
    ql_llama_layer *layers; /* [n_layers] */
    float *scratch_w;       /* materialized weights of one linear, reused */
    int64_t scratch_w_len;
    int64_t rope_cached_len; /* dynamic rope: transformers' max_seq_len_cached (ql_rope_dynamic_len) */
    int shared_states;       /* ql_llama_random's share: layer 0's quantized states serve every layer */
};

struct ql_kv_cache {
    ql_be_ctx *ctx;
    int n_layers, capacity, len, kv_dim;
    float *k; /* [n_layers, capacity, kv_dim] */
    float *v;
};

/* ---- config ---- */

/* Every field read from config.json is type- and range-checked; an absent or
 * null field takes its default, anything else of the wrong type is an error
 * naming config.json and the field. */

static int get_int(json_t *cfg, const char *key, int *out, int required)
{
    json_t *v = json_object_get(cfg, key);
    if (!v || json_is_null(v)) return required ? ql_error(QL_EFORMAT, "config.json: missing \"%s\"", key) : QL_ENOTFOUND;
    if (!json_is_integer(v) || json_integer_value(v) <= 0 || json_integer_value(v) > (1 << 30))
        return ql_error(QL_EFORMAT, "config.json: \"%s\" must be a positive integer (at most 2^30)", key);
    *out = (int)json_integer_value(v);
    return QL_OK;
}

static int get_real(json_t *cfg, const char *key, float *out, float fallback)
{
    json_t *v = json_object_get(cfg, key);
    if (!v || json_is_null(v)) {
        *out = fallback;
        return QL_OK;
    }
    if (!json_is_number(v) || !(json_number_value(v) > 0) || !(json_number_value(v) <= 3.0e38))
        return ql_error(QL_EFORMAT, "config.json: \"%s\" must be a positive number", key);
    *out = (float)json_number_value(v);
    if (!(*out > 0)) return ql_error(QL_EFORMAT, "config.json: \"%s\" %g is too small for float32", key, json_number_value(v));
    return QL_OK;
}

static int get_bool(json_t *cfg, const char *key, int *out, int fallback)
{
    json_t *v = json_object_get(cfg, key);
    if (!v || json_is_null(v)) {
        *out = fallback;
        return QL_OK;
    }
    if (!json_is_boolean(v)) return ql_error(QL_EFORMAT, "config.json: \"%s\" must be true or false", key);
    *out = json_is_true(v);
    return QL_OK;
}

static int get_string(json_t *cfg, const char *key, const char **out)
{
    json_t *v = json_object_get(cfg, key);
    *out = NULL;
    if (!v || json_is_null(v)) return QL_OK;
    if (!json_is_string(v)) return ql_error(QL_EFORMAT, "config.json: \"%s\" must be a string", key);
    *out = json_string_value(v);
    return QL_OK;
}

/* A token id: an integer in [0, vocab_size), or for eos_token_id also a
 * non-empty list of them (the first is used); absent or null keeps *out. */
static int get_token_id(json_t *cfg, const char *key, int vocab, int allow_list, int *out)
{
    json_t *v = json_object_get(cfg, key);
    if (!v || json_is_null(v)) return QL_OK;
    size_t n = allow_list && json_is_array(v) ? json_array_size(v) : 1;
    if (allow_list && json_is_array(v) && n == 0)
        return ql_error(QL_EFORMAT, "config.json: \"%s\" is an empty list", key);
    for (size_t i = 0; i < n; i++) {
        json_t *e = allow_list && json_is_array(v) ? json_array_get(v, i) : v;
        if (!json_is_integer(e))
            return ql_error(QL_EFORMAT, "config.json: \"%s\" must be an integer token id%s", key,
                            allow_list ? " or a list of them" : "");
        if (json_integer_value(e) < 0 || json_integer_value(e) >= vocab)
            return ql_error(QL_EFORMAT, "config.json: \"%s\" %lld is outside the vocabulary (vocab_size %d)", key,
                            (long long)json_integer_value(e), vocab);
        if (i == 0) *out = (int)json_integer_value(e);
    }
    return QL_OK;
}

/* The architectures transformers reads with the arithmetic implemented here,
 * and the model_type that names each when "architectures" is absent. */
enum { ARCH_LLAMA, ARCH_MISTRAL, ARCH_QWEN2, ARCH_QWEN3, ARCH_COUNT };
static const struct {
    const char *name, *model_type;
} archs[ARCH_COUNT] = {
    [ARCH_LLAMA] = {"LlamaForCausalLM", "llama"},
    [ARCH_MISTRAL] = {"MistralForCausalLM", "mistral"},
    [ARCH_QWEN2] = {"Qwen2ForCausalLM", "qwen2"},
    [ARCH_QWEN3] = {"Qwen3ForCausalLM", "qwen3"},
};

static int arch_of(const char *name)
{
    for (int a = 0; a < ARCH_COUNT; a++)
        if (!strcmp(name, archs[a].name)) return a;
    return -1;
}

/* sliding_window as a window size: null is none (0); absent takes the
 * transformers default of 4096 (Mistral, and Qwen with use_sliding_window). */
static int get_window(json_t *cfg, int *out)
{
    json_t *sw = json_object_get(cfg, "sliding_window");
    *out = 4096;
    if (!sw) return QL_OK;
    if (json_is_null(sw)) {
        *out = 0;
        return QL_OK;
    }
    if (!json_is_integer(sw) || json_integer_value(sw) < 0 || json_integer_value(sw) > (1 << 30))
        return ql_error(QL_EFORMAT, "config.json: \"sliding_window\" must be null or a non-negative integer");
    if (json_integer_value(sw) == 0)
        return ql_error(QL_EFORMAT, "config.json: \"sliding_window\" 0 leaves no key to attend to (null means no window)");
    *out = (int)json_integer_value(sw);
    return QL_OK;
}

/* Which layers attend through the sliding window, as transformers reads the
 * config: Mistral slides every layer (sliding_window; null: none); Qwen2/3
 * only with use_sliding_window true, then the layers that layer_types names
 * "sliding_attention", or without layer_types those from max_window_layers
 * on; Llama has no window (its sliding_window field is not read).  Sets
 * c->sliding_window and c->n_sliding_layers; windows[n_layers] (may be NULL)
 * gets each layer's window, 0 for full causal attention. */
static int sliding_layers(json_t *cfg, ql_llama_config *c, int arch, int *windows)
{
    json_t *sw = json_object_get(cfg, "sliding_window");
    if (sw && !json_is_null(sw) &&
        (!json_is_integer(sw) || json_integer_value(sw) < 0 || json_integer_value(sw) > (1 << 30)))
        return ql_error(QL_EFORMAT, "config.json: \"sliding_window\" must be null or a non-negative integer");
    int W = 0, rc;
    c->sliding_window = c->n_sliding_layers = 0;
    if (windows) memset(windows, 0, (size_t)c->n_layers * sizeof *windows);
    if (arch == ARCH_LLAMA) return QL_OK;
    if (arch == ARCH_MISTRAL) {
        if ((rc = get_window(cfg, &W))) return rc;
        if (W == 0) return QL_OK;
        c->sliding_window = W;
        c->n_sliding_layers = c->n_layers;
        if (windows)
            for (int i = 0; i < c->n_layers; i++) windows[i] = W;
        return QL_OK;
    }
    int use;
    if ((rc = get_bool(cfg, "use_sliding_window", &use, 0))) return rc;
    if (use && (rc = get_window(cfg, &W))) return rc;
    json_t *lt = json_object_get(cfg, "layer_types");
    int first = 28; /* max_window_layers */
    json_t *mw = json_object_get(cfg, "max_window_layers");
    if (mw && !json_is_null(mw)) {
        if (!json_is_integer(mw) || json_integer_value(mw) < 0 || json_integer_value(mw) > (1 << 30))
            return ql_error(QL_EFORMAT, "config.json: \"max_window_layers\" must be a non-negative integer");
        first = (int)json_integer_value(mw);
    }
    if (lt && !json_is_null(lt)) {
        if (!json_is_array(lt) || json_array_size(lt) != (size_t)c->n_layers)
            return ql_error(QL_EFORMAT, "config.json: \"layer_types\" must be a list of num_hidden_layers (%d) names",
                            c->n_layers);
        for (int i = 0; i < c->n_layers; i++) {
            const char *t = json_string_value(json_array_get(lt, (size_t)i));
            int slides = t && !strcmp(t, "sliding_attention");
            if (!slides && !(t && !strcmp(t, "full_attention")))
                return ql_error(QL_ENOTSUP,
                                "config.json: \"layer_types\"[%d] is %s%s%s: only \"full_attention\" and "
                                "\"sliding_attention\" are supported",
                                i, t ? "'" : "", t ? t : "not a string", t ? "'" : "");
            if (slides && W == 0)
                return ql_error(QL_EFORMAT,
                                "config.json: \"layer_types\"[%d] is sliding_attention but no sliding window is set "
                                "(use_sliding_window %s, sliding_window %s)",
                                i, use ? "true" : "false", use ? "null" : "not used");
            if (slides) {
                c->n_sliding_layers++;
                if (windows) windows[i] = W;
            }
        }
    } else if (W > 0) {
        for (int i = first; i < c->n_layers; i++) {
            c->n_sliding_layers++;
            if (windows) windows[i] = W;
        }
    }
    if (c->n_sliding_layers) c->sliding_window = W;
    return QL_OK;
}

int ql_llama_config_parse(const void *config_json, ql_llama_config *c)
{
    json_t *cfg = (json_t *)config_json;
    memset(c, 0, sizeof *c);
    if (!json_is_object(cfg)) return ql_error(QL_EFORMAT, "config.json is not a JSON object");
    json_t *arch = json_object_get(cfg, "architectures");
    const char *name = NULL, *mt;
    int rc;
    if (arch && !json_is_null(arch)) {
        if (!json_is_array(arch) || json_array_size(arch) == 0 || !json_is_string(json_array_get(arch, 0)))
            return ql_error(QL_EFORMAT, "config.json: \"architectures\" must be a list of names");
        name = json_string_value(json_array_get(arch, 0));
    }
    if ((rc = get_string(cfg, "model_type", &mt))) return rc;
    if (!name) {
        for (int a = 0; a < ARCH_COUNT && !name; a++)
            if (mt && !strcmp(mt, archs[a].model_type)) name = archs[a].name;
        if (!name) return ql_error(QL_ENOTSUP, "config.json names no architecture (model_type %s)", mt ? mt : "missing");
    }
    const int kind = arch_of(name);
    if (kind < 0)
        return ql_error(QL_ENOTSUP,
                        "unsupported architecture %s: qlora supports LlamaForCausalLM, MistralForCausalLM, "
                        "Qwen2ForCausalLM and Qwen3ForCausalLM",
                        name);
    snprintf(c->architecture, sizeof c->architecture, "%s", name);
    if ((rc = get_int(cfg, "hidden_size", &c->hidden, 1)) || (rc = get_int(cfg, "intermediate_size", &c->intermediate, 1)) ||
        (rc = get_int(cfg, "num_hidden_layers", &c->n_layers, 1)) ||
        (rc = get_int(cfg, "num_attention_heads", &c->n_heads, 1)) || (rc = get_int(cfg, "vocab_size", &c->vocab, 1)))
        return rc;
    if ((rc = get_int(cfg, "num_key_value_heads", &c->n_kv_heads, 0)) == QL_ENOTFOUND) c->n_kv_heads = c->n_heads;
    else if (rc) return rc;
    /* Qwen3Config's head_dim defaults to 128, not hidden_size / heads */
    if ((rc = get_int(cfg, "head_dim", &c->head_dim, 0)) == QL_ENOTFOUND)
        c->head_dim = kind == ARCH_QWEN3 ? 128 : c->hidden / c->n_heads;
    else if (rc) return rc;
    if (c->head_dim == 0)
        return ql_error(QL_EFORMAT, "config.json: hidden_size %d is smaller than num_attention_heads %d", c->hidden,
                        c->n_heads);
    if ((int64_t)c->head_dim * c->n_heads > (1 << 30))
        return ql_error(QL_EFORMAT, "config.json: num_attention_heads %d times head dimension %d is too large", c->n_heads,
                        c->head_dim);
    if ((rc = get_int(cfg, "max_position_embeddings", &c->max_positions, 0)) == QL_ENOTFOUND) c->max_positions = 2048;
    else if (rc) return rc;
    if ((rc = get_real(cfg, "rms_norm_eps", &c->rms_eps, 1e-6f))) return rc;
    if ((rc = ql_rope_config_parse(cfg, c->max_positions, c->head_dim, &c->rope))) return rc;
    c->max_len = c->max_positions;
    if (c->rope.type == QL_ROPE_DYNAMIC) {
        double n = (double)c->max_positions * c->rope.factor;
        c->max_len = n > (double)(1 << 30) ? 1 << 30 : n > c->max_positions ? (int)n : c->max_positions;
    }
    /* dtype (transformers 5) or torch_dtype (4.x): recorded; the weights become float32 either way */
    const char *dt[2];
    if ((rc = get_string(cfg, "dtype", &dt[0])) || (rc = get_string(cfg, "torch_dtype", &dt[1]))) return rc;
    if (dt[0] && dt[1] && strcmp(dt[0], dt[1]))
        return ql_error(QL_EFORMAT, "config.json: \"dtype\" %s and \"torch_dtype\" %s disagree", dt[0], dt[1]);
    c->dtype = QL_DTYPE_F32;
    if (dt[0] || dt[1]) {
        const char *d = dt[0] ? dt[0] : dt[1];
        if (!strcmp(d, "bfloat16")) c->dtype = QL_DTYPE_BF16;
        else if (!strcmp(d, "float16")) c->dtype = QL_DTYPE_F16;
        else if (strcmp(d, "float32"))
            return ql_error(QL_ENOTSUP, "config.json: \"%s\" '%s' is not supported (float32, bfloat16 or float16)",
                            dt[0] ? "dtype" : "torch_dtype", d);
    }
    if ((rc = sliding_layers(cfg, c, kind, NULL))) return rc;
    const char *act;
    if ((rc = get_string(cfg, "hidden_act", &act))) return rc;
    if (act && strcmp(act, "silu") != 0)
        return ql_error(QL_ENOTSUP, "config.json: hidden_act '%s' is not supported (only silu)", act);
    /* Biases as each architecture's modules have them: Qwen2 always on q, k, v
     * (never o); Qwen3 and Llama on q, k, v and o with attention_bias, Llama on
     * the MLP with mlp_bias; Mistral never (it reads neither field). */
    int abias, mbias;
    if ((rc = get_bool(cfg, "attention_bias", &abias, 0)) || (rc = get_bool(cfg, "mlp_bias", &mbias, 0))) return rc;
    c->qkv_bias = kind == ARCH_QWEN2 || ((kind == ARCH_QWEN3 || kind == ARCH_LLAMA) && abias);
    c->o_bias = (kind == ARCH_QWEN3 || kind == ARCH_LLAMA) && abias;
    c->mlp_bias = kind == ARCH_LLAMA && mbias;
    c->qk_norm = kind == ARCH_QWEN3;
    if (c->n_heads % c->n_kv_heads)
        return ql_error(QL_EFORMAT, "config.json: num_attention_heads %d is not a multiple of num_key_value_heads %d",
                        c->n_heads, c->n_kv_heads);
    if (c->head_dim % 2) return ql_error(QL_EFORMAT, "config.json: head dimension %d is odd", c->head_dim);
    if ((rc = get_bool(cfg, "tie_word_embeddings", &c->tied_embeddings, 0))) return rc;
    c->bos_id = 1 < c->vocab ? 1 : 0;
    c->eos_id = 2 < c->vocab ? 2 : 0;
    if ((rc = get_token_id(cfg, "bos_token_id", c->vocab, 0, &c->bos_id)) ||
        (rc = get_token_id(cfg, "eos_token_id", c->vocab, 1, &c->eos_id)))
        return rc;
    return QL_OK;
}

/* ---- loading ---- */

/* Tensor `name` of mf, checked: present, of shape [d0] (d1 0) or [d0, d1], a
 * float dtype, finite */
static int find_dense(const ql_model_files *mf, const char *name, int64_t d0, int64_t d1, const ql_tensor **out)
{
    const ql_tensor *t = ql_model_files_find(mf, name);
    if (!t) return ql_error(QL_EFORMAT, "%s: tensor %s is missing", ql_model_files_dir(mf), name);
    int64_t want = d1 ? d0 * d1 : d0;
    int ndim = d1 ? 2 : 1;
    if (t->ndim != ndim || t->shape[0] != d0 || (d1 && t->shape[1] != d1))
        return ql_error(QL_EFORMAT, "tensor %s has shape [%lld%s%lld] but the config implies [%lld%s%lld]", name,
                        (long long)t->shape[0], t->ndim > 1 ? ", " : "", t->ndim > 1 ? (long long)t->shape[1] : 0LL,
                        (long long)d0, d1 ? ", " : "", (long long)d1);
    if (!ql_dtype_is_float(t->dtype))
        return ql_error(QL_EFORMAT, "tensor %s is %s, expected a float dtype", name, ql_dtype_name(t->dtype));
    int64_t bad = ql_first_nonfinite(t->dtype, t->data, (size_t)want);
    if (bad >= 0) {
        ql_model_files_release(mf, t);
        return ql_error(QL_ENUMERIC, "tensor %s has NaN or Inf at index %lld", name, (long long)bad);
    }
    *out = t;
    return QL_OK;
}

/* Tensor `name` of mf as float32 (checked as find_dense does); its pages of
 * the mapping are given back */
static int load_dense(const ql_model_files *mf, const char *name, int64_t d0, int64_t d1, float **out)
{
    const ql_tensor *t = NULL;
    int rc = find_dense(mf, name, d0, d1, &t);
    if (rc) return rc;
    const size_t want = (size_t)(d1 ? d0 * d1 : d0);
    float *w = malloc(want * sizeof *w);
    if (!w) {
        ql_model_files_release(mf, t);
        return ql_error(QL_ENOMEM, "out of memory loading %s", name);
    }
    rc = ql_convert_to_f32(t->dtype, t->data, want, w);
    ql_model_files_release(mf, t);
    if (rc) {
        free(w);
        return rc;
    }
    *out = w;
    return QL_OK;
}

typedef struct files_reader {
    const ql_model_files *mf;
    const char *prefix;
    const ql_tensor *given[32]; /* what load() was handed, to give back after it */
    int n_given;
} files_reader;

static const ql_tensor *files_get(void *ctx, const char *suffix)
{
    files_reader *r = ctx;
    char name[1024];
    if (snprintf(name, sizeof name, "%s.%s", r->prefix, suffix) >= (int)sizeof name) return NULL;
    const ql_tensor *t = ql_model_files_find(r->mf, name);
    if (t && r->n_given < (int)(sizeof r->given / sizeof r->given[0])) r->given[r->n_given++] = t;
    return t;
}

/* A GPTQ checkpoint (transformers' GPTQConfig: quant_method "gptq") is read
 * by the optq plugin; the spec names its layout.  Valid until the next call
 * on this thread. */
static int gptq_spec(json_t *qc, const char *file, const char **spec, const char **field)
{
    static _Thread_local char buf[160];
    json_t *bits = json_object_get(qc, "bits"), *gs = json_object_get(qc, "group_size");
    json_t *desc = json_object_get(qc, "desc_act"), *sym = json_object_get(qc, "sym");
    json_t *damp = json_object_get(qc, "damp_percent"), *fmt = json_object_get(qc, "checkpoint_format");
    *field = "quantization_config";
    if (!json_is_integer(bits) || (json_integer_value(bits) != 2 && json_integer_value(bits) != 3 &&
                                   json_integer_value(bits) != 4 && json_integer_value(bits) != 8))
        return ql_error(QL_ENOTSUP, "%s: quantization_config.bits of a GPTQ checkpoint must be 2, 3, 4 or 8", file);
    long g = gs && !json_is_null(gs) ? (json_is_integer(gs) ? (long)json_integer_value(gs) : 0) : -1;
    if (g != -1 && (g < 32 || g > 1024))
        return ql_error(QL_ENOTSUP, "%s: quantization_config.group_size must be -1 or 32..1024 (optq)", file);
    if ((desc && !json_is_null(desc) && !json_is_boolean(desc)) || (sym && !json_is_null(sym) && !json_is_boolean(sym)))
        return ql_error(QL_EFORMAT, "%s: quantization_config.desc_act and sym must be true or false", file);
    const char *fs = json_is_string(fmt) ? json_string_value(fmt) : NULL;
    if (fmt && !json_is_null(fmt) && (!fs || (strcmp(fs, "gptq") && strcmp(fs, "gptq_v2"))))
        return ql_error(QL_ENOTSUP,
                        "%s: quantization_config.checkpoint_format %s%s%s is not supported (\"gptq\" or \"gptq_v2\")",
                        file, json_is_string(fmt) ? "'" : "", json_is_string(fmt) ? json_string_value(fmt) : "(not a string)",
                        json_is_string(fmt) ? "'" : "");
    int k = snprintf(buf, sizeof buf, "optq:bits=%d,groupsize=%ld,act_order=%d,sym=%d", (int)json_integer_value(bits), g,
                     json_is_true(desc), sym ? json_is_true(sym) : 1);
    if (json_is_number(damp) && json_number_value(damp) > 0 && json_number_value(damp) <= 1)
        k += snprintf(buf + k, sizeof buf - (size_t)k, ",damp=%.9g", json_number_value(damp));
    if (fs && !strcmp(fs, "gptq_v2")) snprintf(buf + k, sizeof buf - (size_t)k, ",format=gptq_v2");
    *spec = buf;
    return QL_OK;
}

/* The quantizer a pre-quantized checkpoint's quantization_config names, and
 * the field it was read from.  The text is untrusted: it is only checked here
 * and opened by ql_qz_open_from_file, which takes plugin names only. */
int ql_prequantized_spec(json_t *cfg, const char *file, const char **spec, const char **field)
{
    json_t *qc = json_object_get(cfg, "quantization_config");
    if (!qc || json_is_null(qc)) return QL_ENOTFOUND;
    if (!json_is_object(qc)) return ql_error(QL_EFORMAT, "%s: quantization_config must be an object", file);
    json_t *mv = json_object_get(qc, "quant_method");
    if (mv && !json_is_string(mv)) return ql_error(QL_EFORMAT, "%s: quantization_config.quant_method must be a string", file);
    const char *method = json_string_value(mv);
    if (method && !strcmp(method, "bitsandbytes")) {
        if (json_is_true(json_object_get(qc, "load_in_4bit")) || json_is_true(json_object_get(qc, "_load_in_4bit"))) {
            *field = "quantization_config.bnb_4bit_quant_type";
            json_t *t = json_object_get(qc, "bnb_4bit_quant_type");
            if (!t || json_is_null(t)) {
                *spec = "fp4";
                return QL_OK;
            }
            int rc = ql_qz_check_from_file(json_string_value(t), file, *field);
            if (rc) return rc;
            const char *type = json_string_value(t);
            if (strcmp(type, "nf4") && strcmp(type, "fp4"))
                return ql_error(QL_ENOTSUP, "%s: %s is '%s'; bitsandbytes' 4-bit types are nf4 and fp4", file, *field,
                                type);
            /* the file's own double quantization, so that the spec reported
             * (eval, run_config.json, merge) is the checkpoint's; absent, the
             * plugin's default */
            json_t *dq = json_object_get(qc, "bnb_4bit_use_double_quant");
            if (dq && !json_is_null(dq) && !json_is_boolean(dq))
                return ql_error(QL_EFORMAT, "%s: quantization_config.bnb_4bit_use_double_quant must be true or false",
                                file);
            const int nf4 = !strcmp(type, "nf4"), off = dq && json_is_false(dq);
            *spec = nf4 ? (off ? "nf4:double_quant=0" : "nf4") : (off ? "fp4:double_quant=0" : "fp4");
            return QL_OK;
        }
        if (json_is_true(json_object_get(qc, "load_in_8bit")) || json_is_true(json_object_get(qc, "_load_in_8bit"))) {
            *spec = "int8";
            *field = "quantization_config.load_in_8bit";
            return QL_OK;
        }
    }
    if (method && !strcmp(method, "gptq")) return gptq_spec(qc, file, spec, field);
    if (method && !strcmp(method, "qlora")) {
        json_t *q = json_object_get(qc, "quantizer");
        if (q) {
            /* checked when opened: a path here is refused unless the command
             * line gives that plugin (open_prequantized) */
            *field = "quantization_config.quantizer";
            *spec = json_string_value(q);
            if (!*spec) return ql_error(QL_EFORMAT, "%s: %s is not a string", file, *field);
            return QL_OK;
        }
    }
    return ql_error(QL_ENOTSUP, "%s: quantization_config with quant_method '%s' is not supported", file,
                    method ? method : "(none)");
}

/* The quantizer of a checkpoint that config.json says is quantized with
 * `file_spec`: a plugin found by name on the search path, or the plugin the
 * user gave by path on the command line when it is that plugin.  A path in
 * the file itself is never loaded (docs/security.md). */
static int open_prequantized(ql_llama *m, const char *dir, const char *file, const char *field, const char *file_spec,
                             const ql_llama_load_opts *opts)
{
    const char *given = opts ? opts->quantizer : NULL;
    int rc, differs = 0;
    if (given && strcmp(given, "none") != 0 && !opts->quantizer_is_default) {
        if (!opts->quantizer_file && ql_qz_spec_is_path(given)) {
            ql_qz *q;
            if ((rc = ql_qz_open(given, &q))) return rc;
            if (ql_qz_matches(q, file_spec)) {
                m->qz = q;
                return QL_OK;
            }
            ql_qz_close(q);
            differs = 1;
        } else {
            differs = !ql_qz_same_name(given, file_spec);
        }
    }
    if ((rc = ql_qz_open_from_file(file_spec, file, field, &m->qz))) return rc;
    if (differs) {
        if (opts->quantizer_file)
            fprintf(stderr, "qlora: warning: %s is already quantized with %s; using it as it is, not the %s that %s names\n",
                    dir, m->qz->desc->name, given, opts->quantizer_file);
        else
            fprintf(stderr, "qlora: warning: %s is already quantized with %s; using it as it is, not --quantizer=%s\n",
                    dir, m->qz->desc->name, given);
    }
    return QL_OK;
}

/* defer: keep the weights dense for the calibration pass (core/calibrate.c),
 * which quantizes them block by block. */
static int load_linear(ql_llama *m, const ql_model_files *mf, int prequantized, int defer, ql_qdev *dev,
                       ql_linear *l, const char *prefix, int64_t out, int64_t in, int has_bias)
{
    l->name = strdup(prefix);
    l->out = out;
    l->in = in;
    if (!l->name) return ql_error(QL_ENOMEM, "out of memory");
    if (out * in > m->scratch_w_len) m->scratch_w_len = out * in;
    char wname[600];
    /* the bias stays dense float32 (never quantized) in every checkpoint */
    snprintf(wname, sizeof wname, "%s.bias", prefix);
    if (has_bias) {
        int brc = load_dense(mf, wname, out, 0, &l->bias);
        if (brc) return brc;
    }
    snprintf(wname, sizeof wname, "%s.weight", prefix);
    if (prequantized) {
        files_reader fr = {.mf = mf, .prefix = prefix};
        ql_tensor_reader r = {&fr, files_get};
        ql_matrix_desc md = {.name = prefix, .rows = out, .cols = in};
        ql_error_clear();
        int rc = m->qz->desc->load(m->qz->inst, &md, &r, &l->state); /* load() copies what it keeps */
        for (int i = 0; i < fr.n_given; i++) ql_model_files_release(mf, fr.given[i]);
        if (rc == QL_ENOTFOUND)
            return ql_error(QL_EFORMAT, "%s is not in the %s format that config.json's quantization_config names", prefix,
                            m->qz->desc->name);
        if (rc) return rc;
        l->qz = m->qz;
        return QL_OK;
    }
    if (m->qz && !defer && dev) {
        /* quantized on the GPU from the checkpoint's own bytes */
        const ql_tensor *t = NULL;
        int rc = find_dense(mf, wname, out, in, &t);
        if (rc) return rc;
        ql_matrix_desc md = {.name = prefix, .rows = out, .cols = in, .src_dtype = t->dtype};
        ql_error_clear();
        rc = ql_qdev_quantize(m->qz, &md, t->data, t->dtype, dev, &l->state);
        ql_model_files_release(mf, t);
        if (rc) return ql_error_context("quantizer %s on %s (on the GPU)", m->qz->desc->name, prefix);
        l->qz = m->qz;
        return QL_OK;
    }
    float *w;
    int rc = load_dense(mf, wname, out, in, &w);
    if (rc) return rc;
    if (!m->qz || defer) {
        l->dense = w;
        return QL_OK;
    }
    const ql_tensor *t = ql_model_files_find(mf, wname);
    ql_matrix_desc md = {.name = prefix, .rows = out, .cols = in, .src_dtype = t->dtype};
    ql_error_clear();
    rc = m->qz->desc->quantize(m->qz->inst, &md, w, &l->state);
    free(w);
    if (rc) return ql_error_context("quantizer %s on %s", m->qz->desc->name, prefix);
    l->qz = m->qz;
    return QL_OK;
}

static void free_linear(ql_linear *l)
{
    free((char *)l->name);
    free(l->dense);
    free(l->bias);
    if (l->state) l->qz->desc->free_state(l->qz->inst, l->state);
}

int ql_llama_load(const char *dir, const ql_llama_load_opts *opts, ql_llama **out)
{
    *out = NULL;
    ql_model_files *mf = NULL;
    int *windows = NULL; /* [n_layers] */
    ql_qdev qdev = {NULL, 0}; /* quantize on load on the GPU: the upload buffer */
    int rc = ql_model_files_open(dir, &mf);
    if (rc) return rc;
    ql_llama *m = calloc(1, sizeof *m);
    if (!m) {
        ql_model_files_close(mf);
        return ql_error(QL_ENOMEM, "out of memory");
    }
    json_t *cfg = ql_model_files_config(mf);
    if ((rc = ql_be_ctx_open("cpu", NULL, &m->ctx))) goto fail;
    m->dir = strdup(dir);
    m->config = json_deep_copy(cfg);
    if ((rc = ql_llama_config_parse(cfg, &m->cfg))) goto fail;
    const ql_llama_config *c = &m->cfg;
    int prequantized = 0;
    const char *file_spec = NULL, *field = NULL;
    char *cfg_file = ql_path_join(dir, "config.json");
    if (!cfg_file) {
        rc = ql_error(QL_ENOMEM, "out of memory");
        goto fail;
    }
    rc = ql_prequantized_spec(cfg, cfg_file, &file_spec, &field);
    if (rc == QL_OK) {
        prequantized = 1;
        rc = open_prequantized(m, dir, cfg_file, field, file_spec, opts);
    } else if (rc == QL_ENOTFOUND) {
        const char *q = opts && opts->quantizer ? opts->quantizer : "none";
        if (strcmp(q, "none") == 0) rc = QL_OK;
        else if (opts->quantizer_file) rc = ql_qz_open_from_file(q, opts->quantizer_file, "quantizer", &m->qz);
        else rc = ql_qz_open(q, &m->qz);
    }
    free(cfg_file);
    if (rc) goto fail;
    /* a data-aware quantizer on a full-precision checkpoint: quantize in
     * the calibration pass after loading, or refuse before any work */
    const ql_calib_opts *calib = opts ? opts->calib : NULL;
    int calibrate = 0;
    if (m->qz && !prequantized) {
        if (calib && calib->data && ql_qz_can_calibrate(m->qz)) calibrate = 1;
        else if (calib && calib->data)
            fprintf(stderr, "qlora: warning: quantizer %s takes no calibration data; ignoring --calib-data %s\n",
                    m->qz->desc->name, calib->data);
        else if ((rc = ql_qz_require_calibration(m->qz, 0, "quantize the model on load"))) goto fail;
    } else if (prequantized && calib && calib->data) {
        fprintf(stderr, "qlora: warning: %s is already quantized; ignoring --calib-data %s\n", dir, calib->data);
    }
    if (m->qz)
        snprintf(m->quantization, sizeof m->quantization, "%s%s%s", m->qz->desc->name, m->qz->options[0] ? ":" : "",
                 m->qz->options);
    else snprintf(m->quantization, sizeof m->quantization, "none");
    int64_t H = c->hidden, I = c->intermediate, qd = (int64_t)c->n_heads * c->head_dim,
            kvd = (int64_t)c->n_kv_heads * c->head_dim;
    if ((rc = load_dense(mf, "model.embed_tokens.weight", c->vocab, H, &m->embed))) goto fail;
    if ((rc = load_dense(mf, "model.norm.weight", H, 0, &m->final_norm))) goto fail;
    if (!c->tied_embeddings && ql_model_files_find(mf, "lm_head.weight")) {
        if ((rc = load_dense(mf, "lm_head.weight", c->vocab, H, &m->lm_head))) goto fail;
    } else {
        m->lm_head = m->embed;
    }
    m->layers = calloc((size_t)c->n_layers, sizeof *m->layers);
    windows = calloc((size_t)c->n_layers, sizeof *windows);
    if (m->layers && windows) rc = sliding_layers(cfg, &m->cfg, arch_of(c->architecture), windows);
    if (rc) goto fail;
    if (!m->layers || !windows) {
        rc = ql_error(QL_ENOMEM, "out of memory");
        goto fail;
    }
    int on_gpu = 0;
    if (m->qz && !prequantized && !calibrate) {
        char what[64];
        const char *device = opts ? opts->device : NULL;
        snprintf(what, sizeof what, "quantize on load (--device %.20s)", device ? device : "cpu");
        if ((rc = ql_qdev_pick(device, m->qz, what, &on_gpu))) goto fail;
    }
    ql_progress prog;
    ql_progress_begin(&prog, "load", c->n_layers, "layers", opts ? opts->progress : 0);
    for (int i = 0; i < c->n_layers; i++) {
        ql_llama_layer *L = &m->layers[i];
        char p[256], n[300];
        snprintf(n, sizeof n, "model.layers.%d.input_layernorm.weight", i);
        if ((rc = load_dense(mf, n, H, 0, &L->attn_norm))) goto fail;
        snprintf(n, sizeof n, "model.layers.%d.post_attention_layernorm.weight", i);
        if ((rc = load_dense(mf, n, H, 0, &L->mlp_norm))) goto fail;
        if (c->qk_norm) {
            snprintf(n, sizeof n, "model.layers.%d.self_attn.q_norm.weight", i);
            if ((rc = load_dense(mf, n, c->head_dim, 0, &L->q_norm))) goto fail;
            snprintf(n, sizeof n, "model.layers.%d.self_attn.k_norm.weight", i);
            if ((rc = load_dense(mf, n, c->head_dim, 0, &L->k_norm))) goto fail;
        }
        L->window = windows[i];
        struct {
            ql_linear *l;
            const char *what;
            int64_t out, in;
            int bias;
        } lin[] = {
            {&L->q, "self_attn.q_proj", qd, H, c->qkv_bias},  {&L->k, "self_attn.k_proj", kvd, H, c->qkv_bias},
            {&L->v, "self_attn.v_proj", kvd, H, c->qkv_bias}, {&L->o, "self_attn.o_proj", H, qd, c->o_bias},
            {&L->gate, "mlp.gate_proj", I, H, c->mlp_bias},   {&L->up, "mlp.up_proj", I, H, c->mlp_bias},
            {&L->down, "mlp.down_proj", H, I, c->mlp_bias},
        };
        for (size_t k = 0; k < sizeof lin / sizeof lin[0]; k++) {
            snprintf(p, sizeof p, "model.layers.%d.%s", i, lin[k].what);
            if ((rc = load_linear(m, mf, prequantized, calibrate, on_gpu ? &qdev : NULL, lin[k].l, p, lin[k].out,
                                  lin[k].in, lin[k].bias)))
                goto fail;
        }
        ql_progress_update(&prog, i + 1, "");
    }
    ql_progress_end(&prog);
    ql_qdev_free(&qdev);
    if ((rc = ql_be(m->ctx, alloc, (void **)&m->scratch_w, (size_t)m->scratch_w_len * sizeof(float)))) {
        ql_be_check(m->ctx);
        goto fail;
    }
    ql_model_files_close(mf);
    mf = NULL;
    if (calibrate && (rc = ql_llama_calibrate(m, m->qz, calib))) goto fail;
    m->calibrated = calibrate;
    free(windows);
    *out = m;
    return QL_OK;
fail:
    ql_qdev_free(&qdev);
    free(windows);
    ql_model_files_close(mf);
    ql_llama_destroy(m);
    return rc;
}

/* normal values of standard deviation `scale`: Box-Muller over splitmix64, in parallel chunks */
static void random_normal(float *x, int64_t n, uint64_t seed, float scale)
{
    enum { CHUNK = 1 << 16 };
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < (n + CHUNK - 1) / CHUNK; c++) {
        uint64_t s = seed ^ ((uint64_t)(c + 1) * 0x9E3779B97F4A7C15ull);
        const int64_t end = (c + 1) * CHUNK < n ? (c + 1) * CHUNK : n;
        for (int64_t i = c * CHUNK; i < end; i += 2) {
            s += 0x9E3779B97F4A7C15ull;
            uint64_t z = s;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
            z ^= z >> 31;
            const double u1 = ((double)(z >> 11) + 1.0) * 0x1p-53, u2 = (double)(z & 0x7ff) / 2048.0 + 0x1p-12;
            const double r = sqrt(-2.0 * log(u1)), a = 6.283185307179586 * u2;
            x[i] = (float)(r * cos(a)) * scale;
            if (i + 1 < end) x[i + 1] = (float)(r * sin(a)) * scale;
        }
    }
}

static float *random_array(int64_t n, uint64_t seed, float scale, float constant)
{
    float *x = malloc((size_t)(n > 0 ? n : 1) * sizeof *x);
    if (!x) return NULL;
    if (scale > 0) random_normal(x, n, seed, scale);
    else
        for (int64_t i = 0; i < n; i++) x[i] = constant;
    return x;
}

int ql_llama_random(const char *config_json, const char *quantizer, uint64_t seed, int share, ql_llama **out)
{
    *out = NULL;
    json_error_t jerr;
    json_t *cfg = json_loads(config_json, 0, &jerr);
    if (!cfg) return ql_error(QL_EINVAL, "random model: config is not JSON: %s", jerr.text);
    ql_llama *m = calloc(1, sizeof *m);
    int rc = m ? QL_OK : ql_error(QL_ENOMEM, "out of memory");
    if (rc) {
        json_decref(cfg);
        return rc;
    }
    m->config = cfg;
    m->dir = strdup("(random weights)");
    m->shared_states = share;
    if ((rc = ql_be_ctx_open("cpu", NULL, &m->ctx)) || (rc = ql_llama_config_parse(cfg, &m->cfg))) goto fail;
    const ql_llama_config *c = &m->cfg;
    if (quantizer && strcmp(quantizer, "none") && (rc = ql_qz_open(quantizer, &m->qz))) goto fail;
    if (m->qz)
        snprintf(m->quantization, sizeof m->quantization, "%s%s%s", m->qz->desc->name, m->qz->options[0] ? ":" : "",
                 m->qz->options);
    else snprintf(m->quantization, sizeof m->quantization, "none");
    const int64_t H = c->hidden, I = c->intermediate, qd = (int64_t)c->n_heads * c->head_dim,
                  kvd = (int64_t)c->n_kv_heads * c->head_dim;
    m->embed = random_array(c->vocab * H, seed, 0.02f, 0);
    m->final_norm = random_array(H, 0, 0, 1.0f);
    m->lm_head = c->tied_embeddings ? m->embed : random_array(c->vocab * H, seed + 1, 0.02f, 0);
    m->layers = calloc((size_t)c->n_layers, sizeof *m->layers);
    if (!m->embed || !m->final_norm || !m->lm_head || !m->layers) {
        rc = ql_error(QL_ENOMEM, "out of memory");
        goto fail;
    }
    static const char *const what[7] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                        "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
    const int64_t outs[7] = {qd, kvd, kvd, H, I, I, H}, ins[7] = {H, H, H, qd, H, H, I};
    for (int i = 0; i < c->n_layers && rc == QL_OK; i++) {
        ql_llama_layer *L = &m->layers[i];
        ql_linear *ls[7] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
        L->attn_norm = random_array(H, 0, 0, 1.0f);
        L->mlp_norm = random_array(H, 0, 0, 1.0f);
        if (c->qk_norm) {
            L->q_norm = random_array(c->head_dim, 0, 0, 1.0f);
            L->k_norm = random_array(c->head_dim, 0, 0, 1.0f);
        }
        for (int k = 0; k < 7 && rc == QL_OK; k++) {
            ql_linear *l = ls[k];
            char name[128];
            snprintf(name, sizeof name, "model.layers.%d.%s", i, what[k]);
            l->name = strdup(name);
            l->out = outs[k];
            l->in = ins[k];
            if (l->out * l->in > m->scratch_w_len) m->scratch_w_len = l->out * l->in;
            if (!l->name) {
                rc = ql_error(QL_ENOMEM, "out of memory");
                break;
            }
            if (share && i > 0) { /* layer 0's */
                ql_llama_layer *L0 = &m->layers[0];
                const ql_linear *l0[7] = {&L0->q, &L0->k, &L0->v, &L0->o, &L0->gate, &L0->up, &L0->down};
                l->state = l0[k]->state;
                l->dense = l0[k]->dense;
                l->qz = l0[k]->qz;
                continue;
            }
            float *w = random_array(l->out * l->in, seed + 100 + (uint64_t)(i * 7 + k), 0.02f, 0);
            if (!w) {
                rc = ql_error(QL_ENOMEM, "out of memory");
                break;
            }
            if (!m->qz) {
                l->dense = w;
                continue;
            }
            ql_matrix_desc md = {.name = l->name, .rows = l->out, .cols = l->in, .src_dtype = QL_DTYPE_BF16};
            rc = m->qz->desc->quantize(m->qz->inst, &md, w, &l->state);
            free(w);
            if (rc) rc = ql_error_context("quantizer %s on %s", m->qz->desc->name, l->name);
            l->qz = m->qz;
        }
        if (!L->attn_norm || !L->mlp_norm || (c->qk_norm && (!L->q_norm || !L->k_norm)))
            rc = ql_error(QL_ENOMEM, "out of memory");
    }
    if (rc == QL_OK && (rc = ql_be(m->ctx, alloc, (void **)&m->scratch_w, (size_t)m->scratch_w_len * sizeof(float))))
        ql_be_check(m->ctx);
    if (rc) goto fail;
    *out = m;
    return QL_OK;
fail:
    ql_llama_destroy(m);
    return rc;
}

void ql_llama_destroy(ql_llama *m)
{
    if (!m) return;
    if (m->layers)
        for (int i = 0; i < m->cfg.n_layers; i++) {
            ql_llama_layer *L = &m->layers[i];
            if (m->shared_states && i > 0) { /* layer 0 owns the states (or dense weights) */
                ql_linear *sh[] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
                for (size_t k = 0; k < 7; k++) sh[k]->state = NULL, sh[k]->dense = NULL;
            }
            free(L->attn_norm);
            free(L->mlp_norm);
            free(L->q_norm);
            free(L->k_norm);
            ql_linear *ls[] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
            for (size_t k = 0; k < 7; k++) free_linear(ls[k]);
        }
    free(m->layers);
    if (m->lm_head != m->embed) free(m->lm_head);
    free(m->embed);
    free(m->final_norm);
    if (m->scratch_w) m->ctx->be->free(m->ctx, m->scratch_w);
    ql_be_ctx_close(m->ctx);
    ql_qz_close(m->qz);
    free(m->dir);
    json_decref(m->config);
    free(m);
}

const char *ql_llama_dir(const ql_llama *m) { return m->dir; }
ql_be_ctx *ql_llama_ctx(const ql_llama *m) { return m->ctx; }
const void *ql_llama_config_json(const ql_llama *m) { return m->config; }

const ql_llama_config *ql_llama_get_config(const ql_llama *m) { return &m->cfg; }
ql_llama_layer *ql_llama_layers(ql_llama *m) { return m->layers; }
const float *ql_llama_embeddings(const ql_llama *m) { return m->embed; }
const char *ql_llama_quantization(const ql_llama *m) { return m->quantization; }
int ql_llama_calibrated(const ql_llama *m) { return m->calibrated; }

void ql_llama_output_weights(const ql_llama *m, const float **final_norm, const float **lm_head)
{
    *final_norm = m->final_norm;
    *lm_head = m->lm_head;
}

int ql_linear_weights(const ql_linear *l, float *w)
{
    if (l->dense) {
        memcpy(w, l->dense, (size_t)(l->out * l->in) * sizeof *w);
        return QL_OK;
    }
    int rc = l->qz->desc->materialize(l->qz->inst, l->state, QL_DTYPE_F32, w);
    return rc ? ql_error_context("materializing %s", l->name) : QL_OK;
}

/* y[T, out] = x[T, in] W^T (+ the attached LoRA; h is [T, r] scratch),
 * materializing a quantized W into the scratch buffer first.  Ops follow the
 * sticky status rule of backend.h: the caller checks once at the end. */
static void linear_forward(ql_llama *m, const ql_linear *l, const float *x, int64_t T, float *y, float *h)
{
    ql_be_ctx *ctx = m->ctx;
    const float *w = l->dense;
    if (!w) {
        ql_be(ctx, materialize, m->scratch_w, QL_DTYPE_F32, l, NULL, NULL, 0, NULL); /* the model's context: host memory */
        w = m->scratch_w;
    }
    ql_be(ctx, matmul_nt, y, x, w, T, l->in, l->out, 0);
    if (l->bias) /* frozen, after the matmul */
        for (int64_t t = 0; t < T; t++) ql_be(ctx, add_inplace, y + t * l->out, l->bias, l->out);
    if (l->lora_a)
        ql_be(ctx, lora_forward, y, h, x, NULL, l->lora_a, l->lora_b, T, l->in, l->out, l->lora_r, l->lora_scale);
}

/* ---- cache ---- */

int ql_kv_cache_create(const ql_llama *m, int capacity, ql_kv_cache **out)
{
    ql_kv_cache *c = calloc(1, sizeof *c);
    if (!c) return ql_error(QL_ENOMEM, "out of memory");
    c->n_layers = m->cfg.n_layers;
    c->capacity = capacity;
    c->kv_dim = m->cfg.n_kv_heads * m->cfg.head_dim;
    size_t n = (size_t)c->n_layers * (size_t)capacity * (size_t)c->kv_dim;
    c->ctx = m->ctx;
    ql_be(c->ctx, alloc, (void **)&c->k, n * sizeof(float));
    ql_be(c->ctx, alloc, (void **)&c->v, n * sizeof(float));
    if (ql_be_check(c->ctx)) {
        ql_kv_cache_destroy(c);
        return ql_error(QL_ENOMEM, "out of memory for a %d-token cache (%.1f MiB)", capacity,
                        2.0 * (double)n * sizeof(float) / (1024.0 * 1024.0));
    }
    *out = c;
    return QL_OK;
}

void ql_kv_cache_destroy(ql_kv_cache *c)
{
    if (!c) return;
    if (c->k) c->ctx->be->free(c->ctx, c->k);
    if (c->v) c->ctx->be->free(c->ctx, c->v);
    free(c);
}

void ql_kv_cache_reset(ql_kv_cache *c) { c->len = 0; }
int ql_kv_cache_length(const ql_kv_cache *c) { return c->len; }
void ql_kv_cache_truncate(ql_kv_cache *c, int len) { c->len = len < 0 ? 0 : len < c->len ? len : c->len; }

/* ---- forward ---- */

void ql_llama_rope(float *inv_freq, float *attn_scale, ql_llama *m, int64_t seq_len)
{
    const ql_rope_config *r = &m->cfg.rope;
    if (r->type == QL_ROPE_DYNAMIC) seq_len = ql_rope_dynamic_len(&m->rope_cached_len, r, seq_len);
    ql_rope_inv_freq(inv_freq, attn_scale, r, m->cfg.head_dim, seq_len);
}

int ql_llama_forward(ql_llama *m, ql_kv_cache *cache, const int32_t *tokens, int T, float *logits, int last_only)
{
    const ql_llama_config *c = &m->cfg;
    const int64_t H = c->hidden, I = c->intermediate, hd = c->head_dim;
    const int64_t qd = (int64_t)c->n_heads * hd, kvd = (int64_t)c->n_kv_heads * hd;
    const int past = cache->len;
    if (T <= 0) return QL_OK;
    if (past + T > cache->capacity)
        return ql_error(QL_EINVAL, "sequence of %d tokens exceeds the cache of %d", past + T, cache->capacity);
    for (int t = 0; t < T; t++)
        if (tokens[t] < 0 || tokens[t] >= c->vocab)
            return ql_error(QL_EINVAL, "token id %d at position %d is outside the vocabulary (%d)", tokens[t], t, c->vocab);
    ql_be_ctx *ctx = m->ctx;
    int rc = ql_be_check(ctx); /* nothing left over from an earlier call */
    if (rc) return rc;
    size_t wide = (size_t)T * (size_t)(I > qd ? I : qd);
    int64_t rows = logits ? (last_only ? 1 : T) : 0;
    int64_t r_max = 1;
    for (int l = 0; l < c->n_layers; l++) {
        ql_llama_layer *L = &m->layers[l];
        const ql_linear *ls[] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
        for (size_t k = 0; k < 7; k++)
            if (ls[k]->lora_a && ls[k]->lora_r > r_max) r_max = ls[k]->lora_r;
    }
    /* per call buffers (one sequence of T new tokens) */
    float *x = NULL, *xn = NULL, *q = NULL, *att = NULL, *g = NULL, *u = NULL, *tmp = NULL, *out = NULL, *h = NULL;
    float *inv_freq = malloc((size_t)(hd / 2) * sizeof *inv_freq), rope_scale; /* host */
    ql_be(ctx, alloc, (void **)&x, (size_t)T * H * sizeof *x);
    ql_be(ctx, alloc, (void **)&xn, (size_t)T * H * sizeof *xn);
    ql_be(ctx, alloc, (void **)&q, (size_t)T * qd * sizeof *q);
    ql_be(ctx, alloc, (void **)&att, (size_t)T * qd * sizeof *att);
    ql_be(ctx, alloc, (void **)&g, wide * sizeof *g);
    ql_be(ctx, alloc, (void **)&u, wide * sizeof *u);
    ql_be(ctx, alloc, (void **)&tmp, (size_t)T * H * sizeof *tmp);
    ql_be(ctx, alloc, (void **)&out, (size_t)rows * c->vocab * sizeof *out);
    ql_be(ctx, alloc, (void **)&h, (size_t)T * r_max * sizeof *h);
    if (!inv_freq) ql_be_record(ctx, ql_error(QL_ENOMEM, "out of memory"));
    if ((rc = ql_be_check(ctx))) {
        ql_error_context("generation buffers for %d tokens", T);
        goto done;
    }
    const int32_t len = T;
    const ql_be_batch one = {.B = 1, .T = T, .len = &len};
    ql_llama_rope(inv_freq, &rope_scale, m, past + T);
    ql_be(ctx, embedding, x, m->embed, tokens, &one, H);
    for (int l = 0; l < c->n_layers; l++) {
        ql_llama_layer *L = &m->layers[l];
        float *kc = cache->k + ((size_t)l * cache->capacity) * kvd;
        float *vc = cache->v + ((size_t)l * cache->capacity) * kvd;
        ql_be(ctx, rmsnorm_forward, xn, NULL, x, L->attn_norm, T, H, c->rms_eps);
        linear_forward(m, &L->q, xn, T, q, h);
        linear_forward(m, &L->k, xn, T, kc + (size_t)past * kvd, h);
        linear_forward(m, &L->v, xn, T, vc + (size_t)past * kvd, h);
        if (L->q_norm) { /* per head, in place: each element is read before it is written */
            ql_be(ctx, rmsnorm_forward, q, NULL, q, L->q_norm, (int64_t)T * c->n_heads, hd, c->rms_eps);
            ql_be(ctx, rmsnorm_forward, kc + (size_t)past * kvd, NULL, kc + (size_t)past * kvd, L->k_norm,
                  (int64_t)T * c->n_kv_heads, hd, c->rms_eps);
        }
        ql_be(ctx, rope_forward, q, &one, c->n_heads, (int)hd, past, inv_freq, rope_scale);
        ql_be(ctx, rope_forward, kc + (size_t)past * kvd, &one, c->n_kv_heads, (int)hd, past, inv_freq, rope_scale);
        ql_be(ctx, attention_forward, att, q, kc, vc, T, past, c->n_heads, c->n_kv_heads, (int)hd, L->window);
        linear_forward(m, &L->o, att, T, tmp, h);
        ql_be(ctx, add_inplace, x, tmp, (int64_t)T * H);
        ql_be(ctx, rmsnorm_forward, xn, NULL, x, L->mlp_norm, T, H, c->rms_eps);
        linear_forward(m, &L->gate, xn, T, g, h);
        linear_forward(m, &L->up, xn, T, u, h);
        ql_be(ctx, swiglu_forward, g, g, u, (int64_t)T * I);
        linear_forward(m, &L->down, g, T, tmp, h);
        ql_be(ctx, add_inplace, x, tmp, (int64_t)T * H);
    }
    if (logits) {
        int64_t first = last_only ? T - 1 : 0;
        ql_be(ctx, rmsnorm_forward, xn, NULL, x + first * H, m->final_norm, T - first, H, c->rms_eps);
        ql_be(ctx, matmul_nt, out, xn, m->lm_head, T - first, H, c->vocab, 0);
        ql_be(ctx, download, logits, out, (size_t)rows * c->vocab * sizeof *out);
    }
    if ((rc = ql_be_check(ctx)) == QL_OK) cache->len += T;
done:;
    float *bufs[] = {x, xn, q, att, g, u, tmp, out, h};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) ctx->be->free(ctx, bufs[i]);
    free(inv_freq);
    return rc;
}

/* ---- one decoder block, for the calibration pass ---- */

int ql_llama_block_forward(ql_llama *m, int layer, float *x, int T, ql_block_hook hook, void *hook_ctx)
{
    const ql_llama_config *c = &m->cfg;
    const int64_t H = c->hidden, I = c->intermediate, hd = c->head_dim;
    const int64_t qd = (int64_t)c->n_heads * hd, kvd = (int64_t)c->n_kv_heads * hd;
    if (layer < 0 || layer >= c->n_layers || T <= 0) return ql_error(QL_EINVAL, "block %d, %d tokens", layer, T);
    ql_be_ctx *ctx = m->ctx;
    int rc = ql_be_check(ctx);
    if (rc) return rc;
    ql_llama_layer *L = &m->layers[layer];
    float *xn = NULL, *q = NULL, *k = NULL, *v = NULL, *att = NULL, *g = NULL, *u = NULL, *tmp = NULL;
    float *inv_freq = malloc((size_t)(hd / 2) * sizeof *inv_freq), rope_scale;
    ql_be(ctx, alloc, (void **)&xn, (size_t)T * H * sizeof *xn);
    ql_be(ctx, alloc, (void **)&q, (size_t)T * qd * sizeof *q);
    ql_be(ctx, alloc, (void **)&k, (size_t)T * kvd * sizeof *k);
    ql_be(ctx, alloc, (void **)&v, (size_t)T * kvd * sizeof *v);
    ql_be(ctx, alloc, (void **)&att, (size_t)T * qd * sizeof *att);
    ql_be(ctx, alloc, (void **)&g, (size_t)T * I * sizeof *g);
    ql_be(ctx, alloc, (void **)&u, (size_t)T * I * sizeof *u);
    ql_be(ctx, alloc, (void **)&tmp, (size_t)T * H * sizeof *tmp);
    if (!inv_freq) ql_be_record(ctx, ql_error(QL_ENOMEM, "out of memory"));
    if ((rc = ql_be_check(ctx))) goto done;
    const int32_t len = T;
    const ql_be_batch one = {.B = 1, .T = T, .len = &len};
    ql_llama_rope(inv_freq, &rope_scale, m, T);
    /* the hook sees each linear group's input once it is computed; the ops
     * of the CPU context (the model's) have run when ql_be_check returns */
#define HOOK(group, in, cols)                                                           \
    do {                                                                                \
        if ((rc = ql_be_check(ctx))) goto done;                                         \
        if (hook && (rc = hook(hook_ctx, (group), (in), T, (cols))) != QL_OK) goto done; \
    } while (0)
    ql_be(ctx, rmsnorm_forward, xn, NULL, x, L->attn_norm, T, H, c->rms_eps);
    HOOK(QL_BLOCK_QKV, xn, H);
    linear_forward(m, &L->q, xn, T, q, NULL);
    linear_forward(m, &L->k, xn, T, k, NULL);
    linear_forward(m, &L->v, xn, T, v, NULL);
    if (L->q_norm) {
        ql_be(ctx, rmsnorm_forward, q, NULL, q, L->q_norm, (int64_t)T * c->n_heads, hd, c->rms_eps);
        ql_be(ctx, rmsnorm_forward, k, NULL, k, L->k_norm, (int64_t)T * c->n_kv_heads, hd, c->rms_eps);
    }
    ql_be(ctx, rope_forward, q, &one, c->n_heads, (int)hd, 0, inv_freq, rope_scale);
    ql_be(ctx, rope_forward, k, &one, c->n_kv_heads, (int)hd, 0, inv_freq, rope_scale);
    ql_be(ctx, attention_forward, att, q, k, v, T, 0, c->n_heads, c->n_kv_heads, (int)hd, L->window);
    HOOK(QL_BLOCK_O, att, qd);
    linear_forward(m, &L->o, att, T, tmp, NULL);
    ql_be(ctx, add_inplace, x, tmp, (int64_t)T * H);
    ql_be(ctx, rmsnorm_forward, xn, NULL, x, L->mlp_norm, T, H, c->rms_eps);
    HOOK(QL_BLOCK_GATE_UP, xn, H);
    linear_forward(m, &L->gate, xn, T, g, NULL);
    linear_forward(m, &L->up, xn, T, u, NULL);
    ql_be(ctx, swiglu_forward, g, g, u, (int64_t)T * I);
    HOOK(QL_BLOCK_DOWN, g, I);
    linear_forward(m, &L->down, g, T, tmp, NULL);
    ql_be(ctx, add_inplace, x, tmp, (int64_t)T * H);
#undef HOOK
    rc = ql_be_check(ctx);
done:;
    float *bufs[] = {xn, q, k, v, att, g, u, tmp};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) ctx->be->free(ctx, bufs[i]);
    free(inv_freq);
    return rc;
}

int ql_llama_embed(ql_llama *m, const int32_t *tokens, int T, float *x)
{
    for (int t = 0; t < T; t++)
        if (tokens[t] < 0 || tokens[t] >= m->cfg.vocab)
            return ql_error(QL_EINVAL, "token id %d at position %d is outside the vocabulary (%d)", tokens[t], t,
                            m->cfg.vocab);
    for (int t = 0; t < T; t++)
        memcpy(x + (size_t)t * m->cfg.hidden, m->embed + (size_t)tokens[t] * m->cfg.hidden,
               (size_t)m->cfg.hidden * sizeof *x);
    return QL_OK;
}
