#include "qlora/lora.h"

#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "json_out.h"
#include "qlora/dtype.h"
#include "qlora/error.h"
#include "qlora/fs.h"
#include "qlora/safetensors.h"

static const char *const module_names[QL_MOD_COUNT] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"};
static const char *const module_paths[QL_MOD_COUNT] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                       "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                                       "mlp.down_proj"};

const char *ql_lora_module_name(int module) { return module >= 0 && module < QL_MOD_COUNT ? module_names[module] : "?"; }
const char *ql_lora_module_path(int module) { return module >= 0 && module < QL_MOD_COUNT ? module_paths[module] : "?"; }

int ql_lora_modules_parse(const char *list, uint32_t *mask)
{
    *mask = 0;
    if (!list || !strcmp(list, "all") || !strcmp(list, "all-linear")) {
        *mask = QL_LORA_ALL_MODULES;
        return QL_OK;
    }
    if (!*list) return ql_error(QL_EINVAL, "--lora-modules is empty (use all or some of q_proj,k_proj,v_proj,o_proj,"
                                           "gate_proj,up_proj,down_proj)");
    /* names between commas; an empty one ("q_proj,,v_proj", a trailing comma) is a typo, not nothing */
    int rc = QL_OK;
    for (const char *p = list; rc == QL_OK;) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        int found = -1;
        for (int k = 0; k < QL_MOD_COUNT; k++)
            if (strlen(module_names[k]) == n && !strncmp(p, module_names[k], n)) found = k;
        if (n == 0)
            rc = ql_error(QL_EINVAL, "--lora-modules %s: an empty module name (use all or a comma-separated list of "
                                     "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)", list);
        else if (found < 0)
            rc = ql_error(QL_EINVAL, "--lora-modules: unknown module '%.*s' (use all or q_proj,k_proj,v_proj,o_proj,"
                                     "gate_proj,up_proj,down_proj)", (int)(n < 200 ? n : 200), p);
        else *mask |= 1u << found;
        if (!end) break;
        p = end + 1;
    }
    return rc;
}

static void module_shape(const ql_llama_config *c, int module, int64_t *out, int64_t *in)
{
    int64_t H = c->hidden, I = c->intermediate, qd = (int64_t)c->n_heads * c->head_dim,
            kvd = (int64_t)c->n_kv_heads * c->head_dim;
    switch (module) {
    case QL_MOD_Q: *out = qd, *in = H; break;
    case QL_MOD_K:
    case QL_MOD_V: *out = kvd, *in = H; break;
    case QL_MOD_O: *out = H, *in = qd; break;
    case QL_MOD_GATE:
    case QL_MOD_UP: *out = I, *in = H; break;
    default: *out = H, *in = I; break;
    }
}

/* splitmix64: the initialisation generator */
static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static int lora_alloc(const ql_llama_config *c, const ql_lora_config *cfg, ql_lora **out)
{
    if (cfg->r <= 0 || cfg->r > 65536) return ql_error(QL_EINVAL, "--lora-r must be from 1 to 65536, not %d", cfg->r);
    if (!(cfg->alpha > 0)) return ql_error(QL_EINVAL, "--lora-alpha must be positive");
    if (!(cfg->dropout >= 0 && cfg->dropout < 1)) return ql_error(QL_EINVAL, "--lora-dropout must be in [0, 1)");
    if (!(cfg->modules & QL_LORA_ALL_MODULES)) return ql_error(QL_EINVAL, "no LoRA target modules");
    ql_lora *l = calloc(1, sizeof *l);
    if (!l) return ql_error(QL_ENOMEM, "out of memory");
    l->cfg = *cfg;
    l->scaling = cfg->alpha / (float)cfg->r;
    l->n_layers = c->n_layers;
    l->pairs = calloc((size_t)c->n_layers * QL_MOD_COUNT, sizeof *l->pairs);
    if (!l->pairs) {
        free(l);
        return ql_error(QL_ENOMEM, "out of memory");
    }
    size_t total = 0;
    for (int i = 0; i < c->n_layers; i++)
        for (int k = 0; k < QL_MOD_COUNT; k++) {
            if (!(cfg->modules & (1u << k))) continue;
            int64_t o, in;
            module_shape(c, k, &o, &in);
            total += (size_t)(cfg->r * in + o * cfg->r);
        }
    l->n_params = total;
    l->params = calloc(total, sizeof(float));
    l->grads = calloc(total, sizeof(float));
    if (!l->params || !l->grads) {
        ql_lora_destroy(l);
        return ql_error(QL_ENOMEM, "out of memory for %zu LoRA parameters", total);
    }
    size_t off = 0;
    for (int i = 0; i < c->n_layers; i++)
        for (int k = 0; k < QL_MOD_COUNT; k++) {
            if (!(cfg->modules & (1u << k))) continue;
            ql_lora_pair *p = &l->pairs[i * QL_MOD_COUNT + k];
            module_shape(c, k, &p->out, &p->in);
            p->A = l->params + off;
            p->dA = l->grads + off;
            off += (size_t)(cfg->r * p->in);
            p->B = l->params + off;
            p->dB = l->grads + off;
            off += (size_t)(p->out * cfg->r);
        }
    *out = l;
    return QL_OK;
}

int ql_lora_create(const ql_llama *m, const ql_lora_config *cfg, uint64_t seed, ql_lora **out)
{
    *out = NULL;
    ql_lora *l;
    int rc = lora_alloc(ql_llama_get_config(m), cfg, &l);
    if (rc) return rc;
    uint64_t s = seed ^ 0x6C6F7261ull; /* "lora" */
    for (int i = 0; i < l->n_layers; i++)
        for (int k = 0; k < QL_MOD_COUNT; k++) {
            ql_lora_pair *p = &l->pairs[i * QL_MOD_COUNT + k];
            if (!p->A) continue;
            double bound = 1.0 / sqrt((double)p->in);
            for (int64_t j = 0; j < cfg->r * p->in; j++) {
                double u = (double)(splitmix64(&s) >> 11) / 9007199254740992.0;
                p->A[j] = (float)((2.0 * u - 1.0) * bound);
            }
        }
    *out = l;
    return QL_OK;
}

void ql_lora_destroy(ql_lora *l)
{
    if (!l) return;
    free(l->pairs);
    free(l->params);
    free(l->grads);
    free(l);
}

ql_lora_pair *ql_lora_pair_at(ql_lora *l, int layer, int module)
{
    if (layer < 0 || layer >= l->n_layers || module < 0 || module >= QL_MOD_COUNT) return NULL;
    ql_lora_pair *p = &l->pairs[layer * QL_MOD_COUNT + module];
    return p->A ? p : NULL;
}

int ql_lora_attached(ql_llama *m)
{
    const ql_llama_config *c = ql_llama_get_config(m);
    for (int i = 0; i < c->n_layers; i++) {
        const ql_llama_layer *L = &ql_llama_layers(m)[i];
        const ql_linear *ls[] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
        for (size_t k = 0; k < sizeof ls / sizeof *ls; k++)
            if (ls[k]->lora_a) return 1;
    }
    return 0;
}

void ql_lora_attach(ql_llama *m, const ql_lora *l)
{
    const ql_llama_config *c = ql_llama_get_config(m);
    for (int i = 0; i < c->n_layers; i++) {
        ql_llama_layer *L = &ql_llama_layers(m)[i];
        ql_linear *ls[QL_MOD_COUNT] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
        for (int k = 0; k < QL_MOD_COUNT; k++) {
            const ql_lora_pair *p = l ? &l->pairs[i * QL_MOD_COUNT + k] : NULL;
            ls[k]->lora_a = p ? p->A : NULL;
            ls[k]->lora_b = p ? p->B : NULL;
            ls[k]->lora_r = p && p->A ? l->cfg.r : 0;
            ls[k]->lora_scale = l ? l->scaling : 0.0f;
        }
    }
}

static void peft_key(char *buf, size_t cap, int layer, int module, char which)
{
    snprintf(buf, cap, "base_model.model.model.layers.%d.%s.lora_%c.weight", layer, module_paths[module], which);
}

/* What an adapter's weights mean besides their shapes, as one line: written
 * into adapter_model.safetensors' metadata beside the weights, and compared
 * with adapter_config.json on load, so a pair whose two files come from
 * different writes is refused instead of applied with the wrong scale. */
#define ADAPTER_SIGNATURE_KEY "qlora_adapter"

static void adapter_signature(const ql_lora_config *c, char *buf, size_t cap)
{
    int n = snprintf(buf, cap, "r=%d lora_alpha=%.9g target_modules=", c->r, (double)c->alpha);
    for (int k = 0, first = 1; k < QL_MOD_COUNT && n > 0 && (size_t)n < cap; k++)
        if (c->modules & (1u << k)) {
            n += snprintf(buf + n, cap - (size_t)n, "%s%s", first ? "" : ",", module_names[k]);
            first = 0;
        }
}

static char *adapter_config_text(const ql_lora *l, const char *base_model)
{
    json_t *cfg = json_object();
    json_t *targets = json_array();
    for (int k = 0; k < QL_MOD_COUNT; k++)
        if (l->cfg.modules & (1u << k)) json_array_append_new(targets, json_string(module_names[k]));
    json_object_set_new(cfg, "alpha_pattern", json_object());
    json_object_set_new(cfg, "base_model_name_or_path", json_string(base_model ? base_model : ""));
    json_object_set_new(cfg, "bias", json_string("none"));
    json_object_set_new(cfg, "fan_in_fan_out", json_false());
    json_object_set_new(cfg, "inference_mode", json_true());
    json_object_set_new(cfg, "init_lora_weights", json_true());
    json_object_set_new(cfg, "layers_pattern", json_null());
    json_object_set_new(cfg, "layers_to_transform", json_null());
    json_object_set_new(cfg, "lora_alpha", ql_json_float(l->cfg.alpha));
    json_object_set_new(cfg, "lora_dropout", ql_json_float(l->cfg.dropout));
    json_object_set_new(cfg, "modules_to_save", json_null());
    json_object_set_new(cfg, "peft_type", json_string("LORA"));
    json_object_set_new(cfg, "r", json_integer(l->cfg.r));
    json_object_set_new(cfg, "rank_pattern", json_object());
    json_object_set_new(cfg, "revision", json_null());
    json_object_set_new(cfg, "target_modules", targets);
    json_object_set_new(cfg, "task_type", json_string("CAUSAL_LM"));
    json_object_set_new(cfg, "use_dora", json_false());
    json_object_set_new(cfg, "use_rslora", json_false());
    char *text = ql_json_dumps_py(cfg, 2, 1);
    json_decref(cfg);
    return text;
}

/* The pair is replaced so that a crash at any moment leaves it old, absent
 * (adapter_config.json missing) or new, never mixed: the old config goes
 * first, then the weights are renamed into place, then the new config, each
 * step durable (the folder is fsynced) before the next. */
int ql_lora_save_peft(const ql_lora *l, const char *dir, const char *base_model)
{
    char *text = adapter_config_text(l, base_model);
    char *cfg_path = ql_path_join(dir, "adapter_config.json");
    char *model_path = ql_path_join(dir, "adapter_model.safetensors");
    char signature[256];
    adapter_signature(&l->cfg, signature, sizeof signature);
    ql_st_writer *w = NULL;
    int rc = text && cfg_path && model_path ? ql_st_writer_create(&w) : ql_error(QL_ENOMEM, "out of memory");
    if (rc == QL_OK) rc = ql_st_writer_set_metadata(w, "format", "pt");
    if (rc == QL_OK) rc = ql_st_writer_set_metadata(w, ADAPTER_SIGNATURE_KEY, signature);
    for (int i = 0; i < l->n_layers && rc == QL_OK; i++)
        for (int k = 0; k < QL_MOD_COUNT && rc == QL_OK; k++) {
            const ql_lora_pair *p = &l->pairs[i * QL_MOD_COUNT + k];
            if (!p->A) continue;
            char key[256];
            peft_key(key, sizeof key, i, k, 'A');
            ql_tensor a = {.name = key, .dtype = QL_DTYPE_F32, .ndim = 2, .data = p->A,
                           .nbytes = (uint64_t)(l->cfg.r * p->in) * 4};
            a.shape[0] = l->cfg.r;
            a.shape[1] = p->in;
            rc = ql_st_writer_add(w, &a);
            if (rc) break;
            peft_key(key, sizeof key, i, k, 'B');
            ql_tensor b = {.name = key, .dtype = QL_DTYPE_F32, .ndim = 2, .data = p->B,
                           .nbytes = (uint64_t)(p->out * l->cfg.r) * 4};
            b.shape[0] = p->out;
            b.shape[1] = l->cfg.r;
            rc = ql_st_writer_add(w, &b);
        }
    /* The new weights are written whole under a staging name first, so a
     * failed write (a full disk) leaves the earlier pair as it was; only then
     * the old config goes, the weights take their name, and the new config
     * is written last. */
    char *staged = rc == QL_OK ? ql_path_join(dir, ".adapter_model.safetensors.qlora-new") : NULL;
    if (rc == QL_OK && !staged) rc = ql_error(QL_ENOMEM, "out of memory");
    if (rc == QL_OK) rc = ql_st_writer_save(w, staged);
    if (rc == QL_OK && unlink(cfg_path) != 0 && errno != ENOENT)
        rc = ql_error(QL_EIO, "cannot remove the old %s: %s", cfg_path, strerror(errno));
    if (rc == QL_OK && rename(staged, model_path) != 0)
        rc = ql_error(QL_EIO, "cannot rename %s to %s: %s", staged, model_path, strerror(errno));
    if (rc == QL_OK) rc = ql_fsync_dir(dir); /* the unlink and the rename are durable before the new config */
    if (rc && staged) unlink(staged);
    free(staged);
    if (rc == QL_OK) rc = ql_write_file_atomic(cfg_path, text, strlen(text));
    ql_st_writer_destroy(w);
    free(model_path);
    free(cfg_path);
    free(text);
    return rc;
}

/* RUN_DIR/run_config.json as a JSON object into *cfg and its path into
 * *path (the caller frees both, either way): QL_ENOTFOUND without the file */
static int open_run_config(const char *run_dir, char **path, json_t **cfg)
{
    *cfg = NULL;
    if (!(*path = ql_path_join(run_dir, "run_config.json"))) return ql_error(QL_ENOMEM, "out of memory");
    if (!ql_path_exists(*path)) return QL_ENOTFOUND;
    json_error_t jerr;
    *cfg = ql_json_load_path(*path, 0, &jerr);
    if (!*cfg) return ql_error(QL_EFORMAT, "%s is not valid JSON: %s", *path, jerr.text);
    if (!json_is_object(*cfg)) return ql_error(QL_EFORMAT, "%s is not a JSON object", *path);
    return QL_OK;
}

int ql_lora_run_quantizer(const char *run_dir, char *buf, size_t cap)
{
    char *path = NULL;
    json_t *cfg = NULL;
    int rc = open_run_config(run_dir, &path, &cfg);
    json_t *q = rc == QL_OK ? json_object_get(cfg, "quantizer") : NULL;
    if (rc == QL_OK && !q) rc = QL_ENOTFOUND;
    /* The text names the base's quantizer, not code to load: a plugin name
     * only (the command line's --quantizer=PATH is how a path is given). */
    else if (rc == QL_OK && (rc = ql_qz_check_from_file(json_string_value(q), path, "quantizer")) == QL_OK) {
        const char *s = json_string_value(q);
        if (strlen(s) >= cap) rc = ql_error(QL_EINVAL, "%s: quantizer is %zu characters, longer than %zu", path, strlen(s), cap - 1);
        else memcpy(buf, s, strlen(s) + 1);
    }
    json_decref(cfg);
    free(path);
    return rc;
}

int ql_lora_run_calibration(const char *run_dir, ql_calib_opts *out, char *data_buf, size_t data_cap, char *fmt_buf,
                            size_t fmt_cap)
{
    memset(out, 0, sizeof *out);
    char *path = NULL;
    json_t *cfg = NULL;
    int rc = open_run_config(run_dir, &path, &cfg);
    json_t *c = rc == QL_OK ? json_object_get(cfg, "calibration") : NULL;
    if (rc == QL_OK && (!c || json_is_null(c))) rc = QL_ENOTFOUND;
    else if (rc == QL_OK && !json_is_object(c)) rc = ql_error(QL_EFORMAT, "%s: calibration must be an object or null", path);
    else if (rc == QL_OK) {
        const json_t *data = json_object_get(c, "data"), *fmt = json_object_get(c, "format"),
                     *samples = json_object_get(c, "samples"), *len = json_object_get(c, "len"),
                     *seed = json_object_get(c, "seed");
        if (!json_is_string(data) || !json_string_length(data) || json_string_length(data) >= data_cap)
            rc = ql_error(QL_EFORMAT, "%s: calibration.data must be a file name of 1 to %zu characters", path, data_cap - 1);
        else if (fmt && !json_is_null(fmt) &&
                 (!json_is_string(fmt) || json_string_length(fmt) >= fmt_cap ||
                  strspn(json_string_value(fmt), "abcdefghijklmnopqrstuvwxyz0123456789-") != json_string_length(fmt)))
            rc = ql_error(QL_EFORMAT, "%s: calibration.format must be a format name or null", path);
        else if (!json_is_integer(samples) || json_integer_value(samples) < 1 || json_integer_value(samples) > (1 << 20))
            rc = ql_error(QL_EFORMAT, "%s: calibration.samples must be an integer from 1 to %d", path, 1 << 20);
        else if (!json_is_integer(len) || json_integer_value(len) < 1 || json_integer_value(len) > (1 << 24))
            rc = ql_error(QL_EFORMAT, "%s: calibration.len must be an integer from 1 to %d", path, 1 << 24);
        else if (!json_is_integer(seed) || json_integer_value(seed) < 0)
            rc = ql_error(QL_EFORMAT, "%s: calibration.seed must be a non-negative integer", path);
        else {
            memcpy(data_buf, json_string_value(data), json_string_length(data) + 1);
            out->data = data_buf;
            if (fmt && json_is_string(fmt)) {
                memcpy(fmt_buf, json_string_value(fmt), json_string_length(fmt) + 1);
                out->format = fmt_buf;
            }
            out->samples = (int)json_integer_value(samples);
            out->len = (int)json_integer_value(len);
            out->seed = (uint64_t)json_integer_value(seed);
            if (!ql_path_exists(out->data)) /* not QL_ENOTFOUND: that says the run had no calibration */
                rc = ql_error(QL_EINVAL,
                              "%s: the run quantized its base with calibration data %s, which is not there now; "
                              "give the run's base again (qlora quantize with the same --calib-data), or "
                              "--quantizer for another base",
                              path, out->data);
        }
    }
    json_decref(cfg);
    free(path);
    return rc;
}

/* adapter_config.json fields that change what the weights mean in ways this
 * engine does not implement: each must be absent or neutral (null, false,
 * "none", {} or []), or the adapter is refused by name. */
static const char *const unsupported_fields[] = {
    "use_rslora",   "use_dora",        "use_qalora",       "fan_in_fan_out",   "bias",
    "rank_pattern", "alpha_pattern",   "layers_to_transform", "layer_replication", "exclude_modules",
    "lora_bias",    "modules_to_save", "trainable_token_indices", "target_parameters", "alora_invocation_tokens",
};

static int is_neutral(const json_t *v)
{
    return !v || json_is_null(v) || json_is_false(v) || (json_is_string(v) && !strcmp(json_string_value(v), "none")) ||
           (json_is_object(v) && json_object_size(v) == 0) || (json_is_array(v) && json_array_size(v) == 0);
}

/* A short rendering of a JSON value for messages. */
static void json_brief(const json_t *v, char *buf, size_t cap)
{
    char *s = v ? json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT) : NULL;
    snprintf(buf, cap, "%s", s ? s : "(absent)");
    if (s && strlen(s) >= cap && cap > 4) memcpy(buf + cap - 4, "...", 4);
    free(s);
}

static int parse_adapter_config(const char *path, json_t *cfg, ql_lora_config *c)
{
    char val[96];
    if (!json_is_object(cfg)) return ql_error(QL_EFORMAT, "%s is not a JSON object", path);
    json_t *v = json_object_get(cfg, "peft_type");
    if (!json_is_string(v) || strcmp(json_string_value(v), "LORA") != 0) {
        json_brief(v, val, sizeof val);
        return ql_error(QL_ENOTSUP, "%s: peft_type is %s; only LORA adapters are supported", path, val);
    }
    v = json_object_get(cfg, "base_model_name_or_path");
    if (v && !json_is_null(v) && !json_is_string(v)) {
        json_brief(v, val, sizeof val);
        return ql_error(QL_EFORMAT, "%s: base_model_name_or_path must be a string, not %s", path, val);
    }
    v = json_object_get(cfg, "r");
    if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > 65536) {
        json_brief(v, val, sizeof val);
        return ql_error(QL_EFORMAT, "%s: r must be an integer from 1 to 65536, not %s", path, val);
    }
    c->r = (int)json_integer_value(v);
    v = json_object_get(cfg, "lora_alpha");
    double alpha = json_is_number(v) ? json_number_value(v) : NAN;
    if (!(alpha > 0 && alpha <= 1e6)) {
        json_brief(v, val, sizeof val);
        return ql_error(QL_EFORMAT, "%s: lora_alpha must be a positive number up to 1e6, not %s", path, val);
    }
    c->alpha = (float)alpha;
    v = json_object_get(cfg, "lora_dropout");
    double dropout = !v || json_is_null(v) ? 0.0 : json_is_number(v) ? json_number_value(v) : NAN;
    if (!(dropout >= 0 && dropout < 1)) {
        json_brief(v, val, sizeof val);
        return ql_error(QL_EFORMAT, "%s: lora_dropout must be a number in [0, 1), not %s", path, val);
    }
    c->dropout = (float)dropout;
    v = json_object_get(cfg, "target_modules");
    c->modules = 0;
    if (json_is_string(v) && !strcmp(json_string_value(v), "all-linear")) {
        c->modules = QL_LORA_ALL_MODULES;
    } else if (json_is_array(v) && json_array_size(v) > 0) {
        for (size_t i = 0; i < json_array_size(v); i++) {
            json_t *t = json_array_get(v, i);
            int found = -1;
            for (int k = 0; k < QL_MOD_COUNT; k++)
                if (json_is_string(t) && !strcmp(json_string_value(t), module_names[k])) found = k;
            if (found < 0) {
                json_brief(t, val, sizeof val);
                return ql_error(QL_ENOTSUP,
                                "%s: target_modules entry %s is not supported (q_proj, k_proj, v_proj, o_proj, "
                                "gate_proj, up_proj, down_proj)",
                                path, val);
            }
            c->modules |= 1u << found;
        }
    } else {
        json_brief(v, val, sizeof val);
        return ql_error(QL_EFORMAT, "%s: target_modules must be a non-empty list of module names or \"all-linear\", not %s",
                        path, val);
    }
    for (size_t i = 0; i < sizeof unsupported_fields / sizeof unsupported_fields[0]; i++) {
        v = json_object_get(cfg, unsupported_fields[i]);
        if (is_neutral(v)) continue;
        json_brief(v, val, sizeof val);
        return ql_error(QL_ENOTSUP, "%s: %s = %s is not supported (qlora applies plain LoRA only)", path,
                        unsupported_fields[i], val);
    }
    return QL_OK;
}

/* The newest checkpoint-N folder of a run folder, for messages ("" if none). */
static void newest_checkpoint(const char *dir, char *buf, size_t cap)
{
    buf[0] = '\0';
    DIR *d = opendir(dir);
    if (!d) return;
    long long best = -1;
    struct dirent *e;
    while ((e = readdir(d))) {
        long long n;
        int used = 0;
        if (sscanf(e->d_name, "checkpoint-%lld%n", &n, &used) == 1 && e->d_name[used] == '\0' && n > best) best = n;
    }
    closedir(d);
    if (best >= 0) snprintf(buf, cap, "%s/checkpoint-%lld", dir, best);
}

int ql_lora_load_peft(const ql_llama *m, const char *dir, ql_lora **out)
{
    *out = NULL;
    char *path = ql_path_join(dir, "adapter_config.json");
    char *model_path = ql_path_join(dir, "adapter_model.safetensors");
    if (!path || !model_path) {
        free(path);
        free(model_path);
        return ql_error(QL_ENOMEM, "out of memory");
    }
    json_error_t jerr;
    json_t *cfg = ql_json_load_path(path, 0, &jerr);
    if (!cfg) {
        int rc;
        char ckpt[4200];
        if (ql_path_exists(path)) {
            rc = ql_error(QL_EFORMAT, "%s is not valid JSON: %s", path, jerr.text);
        } else if (ql_path_exists(model_path)) {
            /* what a run leaves when it stops between the two files of its final adapter */
            newest_checkpoint(dir, ckpt, sizeof ckpt);
            rc = ql_error(QL_EFORMAT,
                          "%s is missing beside %s: the adapter's files were being replaced when its writer stopped%s%s",
                          path, model_path, ckpt[0] ? "; a whole copy is in " : "", ckpt);
        } else {
            rc = ql_error(QL_ENOTFOUND, "%s is missing: not a PEFT adapter folder", path);
        }
        free(path);
        free(model_path);
        return rc;
    }
    ql_lora_config c = {0};
    int rc = parse_adapter_config(path, cfg, &c);
    /* The base the adapter names: when it is another folder here with another
     * config, say so (shapes are checked below; matching shapes still apply). */
    const char *base = rc ? NULL : json_string_value(json_object_get(cfg, "base_model_name_or_path"));
    if (base && *base && ql_is_dir(base)) {
        char *a = realpath(base, NULL), *b = realpath(ql_llama_dir(m), NULL);
        char *bcfg_path = ql_path_join(base, "config.json");
        json_t *bcfg = bcfg_path ? ql_json_load_path(bcfg_path, 0, NULL) : NULL;
        json_t *mine = json_deep_copy(ql_llama_config_json(m));
        if (json_is_object(bcfg)) json_object_del(bcfg, "quantization_config");
        if (mine) json_object_del(mine, "quantization_config");
        if (a && b && strcmp(a, b) != 0 && (!bcfg || !mine || !json_equal(bcfg, mine)))
            fprintf(stderr,
                    "qlora: warning: adapter %s was trained on %s, whose config differs from %s's; applying it "
                    "because the shapes match\n",
                    dir, base, ql_llama_dir(m));
        json_decref(bcfg);
        json_decref(mine);
        free(bcfg_path);
        free(a);
        free(b);
    }
    json_decref(cfg);
    ql_lora *l = NULL;
    if (rc == QL_OK) rc = lora_alloc(ql_llama_get_config(m), &c, &l);
    ql_st_file *f = NULL;
    if (rc == QL_OK) rc = ql_st_open(model_path, &f);
    if (rc == QL_OK) {
        /* written by qlora: the weights name the config they were written with */
        const char *saved = ql_st_metadata(f, ADAPTER_SIGNATURE_KEY);
        char mine[256];
        adapter_signature(&c, mine, sizeof mine);
        if (saved && strcmp(saved, mine) != 0)
            rc = ql_error(QL_EFORMAT,
                          "%s and %s are not a pair: the weights were written with %s, the config says %s (a write "
                          "was interrupted, or the files come from different adapters)",
                          model_path, path, saved, mine);
    }
    size_t expected = 0;
    for (int i = 0; i < (l ? l->n_layers : 0) && rc == QL_OK; i++)
        for (int k = 0; k < QL_MOD_COUNT && rc == QL_OK; k++) {
            ql_lora_pair *p = &l->pairs[i * QL_MOD_COUNT + k];
            if (!p->A) continue;
            for (int which = 0; which < 2 && rc == QL_OK; which++) {
                char key[256];
                peft_key(key, sizeof key, i, k, which ? 'B' : 'A');
                const ql_tensor *t = ql_st_find(f, key);
                int64_t d0 = which ? p->out : c.r, d1 = which ? c.r : p->in;
                float *dst = which ? p->B : p->A;
                expected++;
                if (!t) {
                    rc = ql_error(QL_EFORMAT, "%s: adapter tensor %s is missing", dir, key);
                } else if (t->ndim != 2 || t->shape[0] != d0 || t->shape[1] != d1) {
                    rc = ql_error(QL_EFORMAT, "%s: adapter tensor %s has shape [%lld, %lld] but this model needs [%lld, %lld]",
                                  dir, key, (long long)t->shape[0], (long long)(t->ndim > 1 ? t->shape[1] : 0),
                                  (long long)d0, (long long)d1);
                } else {
                    rc = ql_convert_to_f32(t->dtype, t->data, (size_t)(d0 * d1), dst);
                    if (rc) ql_error_context("%s: %s", dir, key);
                    for (int64_t j = 0; rc == QL_OK && j < d0 * d1; j++)
                        if (!isfinite(dst[j]))
                            rc = ql_error(QL_ENUMERIC, "%s: adapter tensor %s has a non-finite value (%g) at index %lld",
                                          model_path, key, (double)dst[j], (long long)j);
                }
            }
        }
    if (rc == QL_OK && ql_st_count(f) != expected)
        rc = ql_error(QL_EFORMAT,
                      "%s has %zu tensors, but %s (r %d, %d target modules) on this model's %d layers needs exactly "
                      "%zu: the files are not a pair",
                      model_path, ql_st_count(f), path, c.r, __builtin_popcount(c.modules), l->n_layers, expected);
    ql_st_close(f);
    free(path);
    free(model_path);
    if (rc) {
        ql_lora_destroy(l);
        return rc;
    }
    *out = l;
    return QL_OK;
}

/* ---- AdamW ---- */

int ql_adamw_create(size_t n, float beta1, float beta2, float eps, float weight_decay, ql_adamw **out)
{
    ql_adamw *o = calloc(1, sizeof *o);
    if (!o) return ql_error(QL_ENOMEM, "out of memory");
    o->beta1 = beta1;
    o->beta2 = beta2;
    o->eps = eps;
    o->weight_decay = weight_decay;
    o->n = n;
    o->m = calloc(n ? n : 1, sizeof(float));
    o->v = calloc(n ? n : 1, sizeof(float));
    if (!o->m || !o->v) {
        ql_adamw_destroy(o);
        return ql_error(QL_ENOMEM, "out of memory for optimizer state");
    }
    *out = o;
    return QL_OK;
}

void ql_adamw_destroy(ql_adamw *o)
{
    if (!o) return;
    free(o->m);
    free(o->v);
    free(o);
}

void ql_adamw_scalars_next(ql_adamw *o, float lr, ql_adamw_scalars *h)
{
    o->step++;
    const float bc1 = 1.0f - powf(o->beta1, (float)o->step);
    const float bc2 = 1.0f - powf(o->beta2, (float)o->step);
    *h = (ql_adamw_scalars){.beta1 = o->beta1, .beta2 = o->beta2, .eps = o->eps, .decay = 1.0f - lr * o->weight_decay,
                            .step_size = lr / bc1, .bc2_sqrt = sqrtf(bc2)};
}

/* kernels/ops_optim.cu's k_adamw is this loop, operation for operation */
void ql_adamw_apply(const ql_adamw_scalars *h, float *params, float *m, float *v, const float *grads, size_t n)
{
#pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) {
        float p = params[i] * h->decay;
        float g = grads[i];
        m[i] = h->beta1 * m[i] + (1.0f - h->beta1) * g;
        v[i] = h->beta2 * v[i] + (1.0f - h->beta2) * g * g;
        float denom = sqrtf(v[i]) / h->bc2_sqrt + h->eps;
        params[i] = p - h->step_size * m[i] / denom;
    }
}

void ql_adamw_update(ql_adamw *o, float *params, const float *grads, float lr)
{
    ql_adamw_scalars h;
    ql_adamw_scalars_next(o, lr, &h);
    ql_adamw_apply(&h, params, o->m, o->v, grads, o->n);
}

double ql_clip_grad_norm(float *grads, size_t n, double max_norm)
{
    double ss = 0;
    for (size_t i = 0; i < n; i++) ss += (double)grads[i] * grads[i];
    double norm = sqrt(ss);
    if (max_norm > 0 && norm > max_norm) {
        float coef = (float)(max_norm / (norm + 1e-6));
        for (size_t i = 0; i < n; i++) grads[i] *= coef;
    }
    return norm;
}
