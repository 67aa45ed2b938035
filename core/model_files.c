#include "qlora/model.h"

#include "json_out.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "qlora/error.h"
#include "qlora/fs.h"
#include "qlora/safetensors.h"

struct ql_model_files {
    char *dir;
    json_t *config;
    ql_st_file **shards;
    size_t nshards;
    const ql_tensor **sorted; /* every tensor of every shard, by name */
    size_t count;
};

static int cmp_tensor_name(const void *a, const void *b)
{
    return strcmp((*(const ql_tensor *const *)a)->name, (*(const ql_tensor *const *)b)->name);
}

static int load_json_object(const char *path, json_t **out)
{
    json_error_t err;
    *out = NULL;
    if (!ql_path_exists(path)) return ql_error(QL_ENOTFOUND, "%s is missing", path);
    char *text;
    size_t len;
    int rc = ql_read_file(path, &text, &len); /* refuses FIFOs and other special files */
    if (rc) return rc;
    json_t *j = ql_json_loadb(text, len, JSON_REJECT_DUPLICATES, &err);
    free(text);
    if (!j) return ql_error(QL_EFORMAT, "%s is not valid JSON: %s (line %d, column %d)", path, err.text, err.line, err.column);
    if (!json_is_object(j)) {
        json_decref(j);
        return ql_error(QL_EFORMAT, "%s is not a JSON object", path);
    }
    *out = j;
    return QL_OK;
}

static int add_shard(ql_model_files *m, const char *file)
{
    for (size_t i = 0; i < m->nshards; i++) {
        const char *p = ql_st_path(m->shards[i]);
        size_t lp = strlen(p), lf = strlen(file);
        if (lp >= lf && strcmp(p + lp - lf, file) == 0 && (lp == lf || p[lp - lf - 1] == '/')) return QL_OK;
    }
    if (strchr(file, '/') || strcmp(file, "..") == 0)
        return ql_error(QL_EFORMAT, "%s: shard name '%s' must be a plain file name", m->dir, file);
    char *path = ql_path_join(m->dir, file);
    if (!path) return ql_error(QL_ENOMEM, "out of memory");
    ql_st_file *f;
    int rc = ql_st_open(path, &f);
    free(path);
    if (rc) return rc;
    ql_st_file **p = realloc(m->shards, (m->nshards + 1) * sizeof *p);
    if (!p) {
        ql_st_close(f);
        return ql_error(QL_ENOMEM, "out of memory");
    }
    m->shards = p;
    m->shards[m->nshards++] = f;
    return QL_OK;
}

int ql_model_files_open(const char *dir, ql_model_files **out)
{
    *out = NULL;
    if (!ql_is_dir(dir)) return ql_error(QL_ENOTFOUND, "model folder %s does not exist", dir);
    ql_model_files *m = calloc(1, sizeof *m);
    if (!m || !(m->dir = strdup(dir))) {
        free(m);
        return ql_error(QL_ENOMEM, "out of memory");
    }
    int rc;
    char *cfg = ql_path_join(dir, "config.json");
    rc = load_json_object(cfg, &m->config);
    free(cfg);
    if (rc) goto fail;

    char *single = ql_path_join(dir, "model.safetensors");
    char *index = ql_path_join(dir, "model.safetensors.index.json");
    if (ql_path_exists(single)) {
        rc = add_shard(m, "model.safetensors");
    } else if (ql_path_exists(index)) {
        json_t *idx;
        rc = load_json_object(index, &idx);
        if (rc == QL_OK) {
            json_t *map = json_object_get(idx, "weight_map");
            if (!json_is_object(map)) {
                rc = ql_error(QL_EFORMAT, "%s has no weight_map object", index);
            } else {
                const char *k;
                json_t *v;
                json_object_foreach(map, k, v) {
                    if (!json_is_string(v)) {
                        rc = ql_error(QL_EFORMAT, "%s: weight_map entry '%s' is not a file name", index, k);
                        break;
                    }
                    if ((rc = add_shard(m, json_string_value(v)))) break;
                }
                /* every listed tensor must be in the shard the index names */
                if (rc == QL_OK) {
                    json_object_foreach(map, k, v) {
                        int found = 0;
                        for (size_t i = 0; i < m->nshards && !found; i++) found = ql_st_find(m->shards[i], k) != NULL;
                        if (!found) {
                            rc = ql_error(QL_EFORMAT, "%s lists tensor '%s' but no shard holds it", index, k);
                            break;
                        }
                    }
                }
            }
            json_decref(idx);
        }
    } else {
        rc = ql_error(QL_ENOTFOUND, "%s has neither model.safetensors nor model.safetensors.index.json", dir);
    }
    free(single);
    free(index);
    if (rc) goto fail;

    for (size_t i = 0; i < m->nshards; i++) m->count += ql_st_count(m->shards[i]);
    m->sorted = calloc(m->count ? m->count : 1, sizeof *m->sorted);
    if (!m->sorted) {
        rc = ql_error(QL_ENOMEM, "out of memory");
        goto fail;
    }
    size_t k = 0;
    for (size_t i = 0; i < m->nshards; i++)
        for (size_t j = 0; j < ql_st_count(m->shards[i]); j++) m->sorted[k++] = ql_st_at(m->shards[i], j);
    qsort(m->sorted, m->count, sizeof *m->sorted, cmp_tensor_name);
    for (size_t i = 1; i < m->count; i++)
        if (strcmp(m->sorted[i]->name, m->sorted[i - 1]->name) == 0) {
            rc = ql_error(QL_EFORMAT, "%s: tensor '%s' appears in two shards", dir, m->sorted[i]->name);
            goto fail;
        }
    *out = m;
    return QL_OK;
fail:
    ql_model_files_close(m);
    return rc;
}

void ql_model_files_close(ql_model_files *m)
{
    if (!m) return;
    for (size_t i = 0; i < m->nshards; i++) ql_st_close(m->shards[i]);
    free(m->shards);
    free(m->sorted);
    json_decref(m->config);
    free(m->dir);
    free(m);
}

const char *ql_model_files_dir(const ql_model_files *m) { return m->dir; }
void *ql_model_files_config(const ql_model_files *m) { return m->config; }
size_t ql_model_files_count(const ql_model_files *m) { return m->count; }
const ql_tensor *ql_model_files_at(const ql_model_files *m, size_t i) { return i < m->count ? m->sorted[i] : NULL; }

const ql_tensor *ql_model_files_find(const ql_model_files *m, const char *name)
{
    size_t lo = 0, hi = m->count;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = strcmp(m->sorted[mid]->name, name);
        if (c == 0) return m->sorted[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

void ql_model_files_release(const ql_model_files *m, const ql_tensor *t)
{
    for (size_t i = 0; t && i < m->nshards; i++)
        if (ql_st_release(m->shards[i], t)) return;
}

int ql_is_block_linear(const char *name, char *prefix, size_t cap)
{
    static const char *const projections[] = {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj",
    };
    static const char head[] = "model.layers.";
    static const char tail[] = ".weight";
    size_t n = strlen(name);
    if (strncmp(name, head, sizeof head - 1) != 0 || n < sizeof tail || strcmp(name + n - (sizeof tail - 1), tail))
        return 0;
    const char *p = name + sizeof head - 1;
    if (*p < '0' || *p > '9') return 0;
    while (*p >= '0' && *p <= '9') p++;
    if (*p++ != '.') return 0;
    size_t rest = (size_t)(name + n - (sizeof tail - 1) - p);
    for (size_t i = 0; i < sizeof projections / sizeof projections[0]; i++) {
        if (strlen(projections[i]) == rest && strncmp(p, projections[i], rest) == 0) {
            size_t lp = n - (sizeof tail - 1);
            if (prefix && cap) {
                if (lp >= cap) return 0;
                memcpy(prefix, name, lp);
                prefix[lp] = '\0';
            }
            return 1;
        }
    }
    return 0;
}
