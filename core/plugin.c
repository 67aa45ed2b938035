#include "qlora/plugin.h"

#include <dirent.h>
#include <dlfcn.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ql_config.h"
#include "qlora/error.h"
#include "qlora/fs.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- the host API handed to plugins ---- */

static int host_error(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    ql_errorv(code, fmt, ap);
    va_end(ap);
    return code;
}

static int log_level = QL_LOG_WARN;

static void host_log(int level, const char *fmt, ...)
{
    if (level < log_level) return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

static int json_field(const char *json, size_t len, const char *key, json_t **root, json_t **val)
{
    json_error_t err;
    *root = json_loadb(json, len, 0, &err);
    if (!*root || !json_is_object(*root)) {
        json_decref(*root);
        *root = NULL;
        return QL_EFORMAT;
    }
    *val = json_object_get(*root, key);
    return *val ? QL_OK : QL_ENOTFOUND;
}

static int host_json_number(const char *json, size_t len, const char *key, double *out)
{
    json_t *root, *v;
    int rc = json_field(json, len, key, &root, &v);
    if (rc == QL_OK) {
        if (json_is_number(v)) *out = json_number_value(v);
        else rc = QL_EFORMAT;
    }
    json_decref(root);
    return rc;
}

static int host_json_string(const char *json, size_t len, const char *key, char *buf, size_t cap)
{
    json_t *root, *v;
    int rc = json_field(json, len, key, &root, &v);
    if (rc == QL_OK) {
        if (json_is_string(v) && strlen(json_string_value(v)) < cap) snprintf(buf, cap, "%s", json_string_value(v));
        else rc = QL_EFORMAT;
    }
    json_decref(root);
    return rc;
}

static int host_json_int_array(const char *json, size_t len, const char *key, int64_t *out, size_t cap, size_t *count)
{
    json_t *root, *v;
    int rc = json_field(json, len, key, &root, &v);
    if (rc == QL_OK) {
        if (!json_is_array(v) || json_array_size(v) > cap) rc = QL_EFORMAT;
        else {
            for (size_t i = 0; i < json_array_size(v) && rc == QL_OK; i++) {
                json_t *e = json_array_get(v, i);
                if (json_is_integer(e)) out[i] = json_integer_value(e);
                else rc = QL_EFORMAT;
            }
            *count = json_array_size(v);
        }
    }
    json_decref(root);
    return rc;
}

static int host_num_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
#endif
}

static const ql_host_api host_api = {
    .struct_size = sizeof(ql_host_api),
    .abi_major = QL_QUANTIZER_ABI_MAJOR,
    .abi_minor = QL_QUANTIZER_ABI_MINOR,
    .error = host_error,
    .log = host_log,
    .json_number = host_json_number,
    .json_string = host_json_string,
    .json_int_array = host_json_int_array,
    .num_threads = host_num_threads,
};

/* ---- loading ---- */

struct ql_plugin {
    char *path;
    void *handle;
    ql_quantizer_desc desc; /* copy, with slots past the plugin's struct_size zeroed */
};

static int valid_name(const char *name)
{
    size_t n = 0;
    for (const char *p = name; *p; p++, n++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_' || *p == '-')) return 0;
    return n >= 1 && n <= 63;
}

static int validate(const char *path, const ql_quantizer_desc *d)
{
    if (!d) return ql_error(QL_EABI, "plugin %s: %s() returned NULL", path, QL_QUANTIZER_ENTRY_NAME);
    if (d->abi_major != QL_QUANTIZER_ABI_MAJOR)
        return ql_error(QL_EABI,
                        "plugin %s: abi_major is %u but this qlora speaks ABI %d.%d; rebuild the plugin against "
                        "this qlora's headers",
                        path, d->abi_major, QL_QUANTIZER_ABI_MAJOR, QL_QUANTIZER_ABI_MINOR);
    if (d->abi_minor > QL_QUANTIZER_ABI_MINOR)
        return ql_error(QL_EABI,
                        "plugin %s: abi_minor is %u (ABI %u.%u) but this qlora speaks ABI %d.%d; the plugin needs a "
                        "newer qlora",
                        path, d->abi_minor, d->abi_major, d->abi_minor, QL_QUANTIZER_ABI_MAJOR,
                        QL_QUANTIZER_ABI_MINOR);
    if (d->struct_size < QL_QUANTIZER_DESC_MIN_SIZE)
        return ql_error(QL_EABI,
                        "plugin %s: struct_size is %u bytes, smaller than the %zu bytes of required fields in ABI "
                        "%d.%d (plugin says ABI %u.%u)",
                        path, d->struct_size, (size_t)QL_QUANTIZER_DESC_MIN_SIZE, QL_QUANTIZER_ABI_MAJOR,
                        QL_QUANTIZER_ABI_MINOR, d->abi_major, d->abi_minor);
    if (!d->name || !valid_name(d->name))
        return ql_error(QL_EABI, "plugin %s: name '%s' is not 1-63 characters of [a-z0-9_-]", path,
                        d->name ? d->name : "(null)");
    if (!d->description) return ql_error(QL_EABI, "plugin %s: description is NULL", path);
    struct {
        const char *field;
        int present;
    } required[] = {
        {"init", d->init != NULL},
        {"create", d->create != NULL},
        {"destroy", d->destroy != NULL},
        {"describe", d->describe != NULL},
        {"bits_per_param", d->bits_per_param != NULL},
        {"quantize", d->quantize != NULL},
        {"materialize", d->materialize != NULL},
        {"save", d->save != NULL},
        {"load", d->load != NULL},
        {"free_state", d->free_state != NULL},
        {"state_info", d->state_info != NULL},
        {"checkpoint_config", d->checkpoint_config != NULL},
    };
    for (size_t i = 0; i < sizeof required / sizeof required[0]; i++)
        if (!required[i].present)
            return ql_error(QL_EABI, "plugin %s: required slot '%s' is NULL (plugin ABI %u.%u, host %d.%d)", path,
                            required[i].field, d->abi_major, d->abi_minor, QL_QUANTIZER_ABI_MAJOR,
                            QL_QUANTIZER_ABI_MINOR);
    return QL_OK;
}

int ql_plugin_open(const char *path, ql_plugin **out)
{
    *out = NULL;
    if (!ql_path_exists(path)) return ql_error(QL_ENOTFOUND, "plugin file %s does not exist", path);
    dlerror();
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *e = dlerror();
        return ql_error(QL_EIO, "cannot load plugin %s: %s", path, e ? e : "unknown dlopen error");
    }
    dlerror();
    void *sym = dlsym(h, QL_QUANTIZER_ENTRY_NAME);
    if (!sym) {
        const char *e = dlerror();
        ql_error(QL_EABI, "plugin %s does not export %s(): %s", path, QL_QUANTIZER_ENTRY_NAME, e ? e : "not found");
        dlclose(h);
        return QL_EABI;
    }
    ql_quantizer_entry_fn entry;
    memcpy(&entry, &sym, sizeof entry);
    const ql_quantizer_desc *d = entry();
    int rc = validate(path, d);
    if (rc) {
        dlclose(h);
        return rc;
    }
    ql_plugin *p = calloc(1, sizeof *p);
    if (!p || !(p->path = strdup(path))) {
        free(p);
        dlclose(h);
        return ql_error(QL_ENOMEM, "out of memory");
    }
    /* Slots the plugin's (older) descriptor lacks read as NULL. */
    size_t have = d->struct_size < sizeof p->desc ? d->struct_size : sizeof p->desc;
    memcpy(&p->desc, d, have);
    p->handle = h;
    rc = p->desc.init(&host_api);
    if (rc) {
        ql_error_context("plugin %s: init failed", path);
        ql_plugin_close(p);
        return rc;
    }
    *out = p;
    return QL_OK;
}

void ql_plugin_close(ql_plugin *p)
{
    if (!p) return;
    if (p->handle) dlclose(p->handle);
    free(p->path);
    free(p);
}

const ql_quantizer_desc *ql_plugin_desc(const ql_plugin *p) { return &p->desc; }
const char *ql_plugin_path(const ql_plugin *p) { return p->path; }

/* ---- search path ---- */

void ql_string_list_free(char **list, size_t n)
{
    if (!list) return;
    for (size_t i = 0; i < n; i++) free(list[i]);
    free(list);
}

static int push(char ***list, size_t *n, const char *s)
{
    char **p = realloc(*list, (*n + 1) * sizeof **list);
    if (!p) return ql_error(QL_ENOMEM, "out of memory");
    *list = p;
    if (!(p[*n] = strdup(s))) return ql_error(QL_ENOMEM, "out of memory");
    (*n)++;
    return QL_OK;
}

int ql_plugin_search_dirs(char ***dirs, size_t *n)
{
    *dirs = NULL;
    *n = 0;
    const char *env = getenv(QL_PLUGIN_PATH_ENV);
    if (env && *env) {
        char *copy = strdup(env);
        if (!copy) return ql_error(QL_ENOMEM, "out of memory");
        char *save = NULL;
        for (char *tok = strtok_r(copy, ":", &save); tok; tok = strtok_r(NULL, ":", &save))
            if (*tok && push(dirs, n, tok)) {
                free(copy);
                return QL_ENOMEM;
            }
        free(copy);
    }
    if (push(dirs, n, QL_INSTALLED_PLUGINDIR) || push(dirs, n, QL_BUILD_PLUGINDIR)) return QL_ENOMEM;
    return QL_OK;
}

static const char plugin_prefix[] = "qlora_";
static const char plugin_suffix[] = ".so";

/* "qlora_<name>.so" -> name, or NULL */
static int plugin_file_name(const char *file, char *name, size_t cap)
{
    size_t lp = strlen(plugin_prefix), ls = strlen(plugin_suffix), lf = strlen(file);
    if (lf <= lp + ls || strncmp(file, plugin_prefix, lp) || strcmp(file + lf - ls, plugin_suffix)) return 0;
    size_t ln = lf - lp - ls;
    if (ln >= cap) return 0;
    memcpy(name, file + lp, ln);
    name[ln] = '\0';
    return 1;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int ql_plugin_scan(char ***paths, size_t *n)
{
    *paths = NULL;
    *n = 0;
    char **dirs;
    size_t nd;
    int rc = ql_plugin_search_dirs(&dirs, &nd);
    if (rc) return rc;
    char **names = NULL;
    size_t nn = 0;
    for (size_t i = 0; i < nd && rc == QL_OK; i++) {
        DIR *d = opendir(dirs[i]);
        if (!d) continue;
        char **found = NULL;
        size_t nf = 0;
        struct dirent *e;
        while ((e = readdir(d))) {
            char name[128];
            if (plugin_file_name(e->d_name, name, sizeof name)) push(&found, &nf, e->d_name);
        }
        closedir(d);
        if (found) qsort(found, nf, sizeof *found, cmp_str);
        for (size_t k = 0; k < nf && rc == QL_OK; k++) {
            char name[128];
            plugin_file_name(found[k], name, sizeof name);
            int seen = 0;
            for (size_t j = 0; j < nn; j++) seen |= strcmp(names[j], name) == 0;
            if (seen) continue;
            char *full = ql_path_join(dirs[i], found[k]);
            rc = full ? push(paths, n, full) : ql_error(QL_ENOMEM, "out of memory");
            free(full);
            if (rc == QL_OK) rc = push(&names, &nn, name);
        }
        ql_string_list_free(found, nf);
    }
    ql_string_list_free(names, nn);
    ql_string_list_free(dirs, nd);
    return rc;
}

int ql_plugin_find(const char *name, ql_plugin **out)
{
    *out = NULL;
    if (!valid_name(name)) return ql_error(QL_EINVAL, "'%s' is not a quantizer name ([a-z0-9_-]) or a path to a .so", name);
    char **dirs;
    size_t nd;
    int rc = ql_plugin_search_dirs(&dirs, &nd);
    if (rc) return rc;
    char file[256];
    snprintf(file, sizeof file, "%s%s%s", plugin_prefix, name, plugin_suffix);
    for (size_t i = 0; i < nd; i++) {
        char *full = ql_path_join(dirs[i], file);
        if (!full) {
            ql_string_list_free(dirs, nd);
            return ql_error(QL_ENOMEM, "out of memory");
        }
        if (ql_path_exists(full)) {
            rc = ql_plugin_open(full, out);
            free(full);
            ql_string_list_free(dirs, nd);
            return rc;
        }
        free(full);
    }
    /* Not found: say where we looked and what was there. */
    char msg[3072];
    size_t k = (size_t)snprintf(msg, sizeof msg, "unknown quantizer '%s': no %s in", name, file);
    for (size_t i = 0; i < nd && k < sizeof msg - 64; i++) {
        k += (size_t)snprintf(msg + k, sizeof msg - k, "%s %s (", i ? ";" : "", dirs[i]);
        DIR *d = opendir(dirs[i]);
        if (!d) k += (size_t)snprintf(msg + k, sizeof msg - k, "missing");
        else {
            int any = 0;
            struct dirent *e;
            while ((e = readdir(d)) && k < sizeof msg - 64) {
                char nm[128];
                if (!plugin_file_name(e->d_name, nm, sizeof nm)) continue;
                k += (size_t)snprintf(msg + k, sizeof msg - k, "%s%s", any ? ", " : "found: ", nm);
                any = 1;
            }
            closedir(d);
            if (!any) k += (size_t)snprintf(msg + k, sizeof msg - k, "no plugins");
        }
        if (k < sizeof msg - 2) k += (size_t)snprintf(msg + k, sizeof msg - k, ")");
    }
    ql_string_list_free(dirs, nd);
    return ql_error(QL_ENOTFOUND, "%s; set %s or give a path to the .so", msg, QL_PLUGIN_PATH_ENV);
}

/* ---- spec: name[:k=v,...] or path[:k=v,...] ---- */

static int looks_like_path(const char *s) { return strchr(s, '/') != NULL || strstr(s, ".so") != NULL; }

int ql_qz_open(const char *spec, ql_qz **out)
{
    *out = NULL;
    if (!spec || !*spec) return ql_error(QL_EINVAL, "empty quantizer name");
    ql_qz *q = calloc(1, sizeof *q);
    if (!q) return ql_error(QL_ENOMEM, "out of memory");
    snprintf(q->spec, sizeof q->spec, "%s", spec);
    char target[512], opts[512] = "";
    snprintf(target, sizeof target, "%s", spec);
    /* A name has no ':', so its options start at the first one; a path may
     * hold ':' itself, so there the options are what follows the last ':'
     * when that looks like options. */
    char *colon = strchr(target, ':');
    if (colon && looks_like_path(target)) {
        colon = strrchr(target, ':');
        if (!strchr(colon + 1, '=') && colon[1] != '\0') colon = NULL;
    }
    if (colon) {
        *colon = '\0';
        snprintf(opts, sizeof opts, "%s", colon + 1);
    }
    int rc = looks_like_path(target) ? ql_plugin_open(target, &q->plugin) : ql_plugin_find(target, &q->plugin);
    if (rc) {
        free(q);
        return rc;
    }
    q->desc = ql_plugin_desc(q->plugin);
    ql_option options[32];
    size_t nopt = 0;
    char *save = NULL;
    for (char *tok = strtok_r(opts, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '=');
        if (!eq || eq == tok) {
            rc = ql_error(QL_EINVAL, "quantizer %s: option '%s' is not key=value", q->desc->name, tok);
            goto fail;
        }
        if (nopt == sizeof options / sizeof options[0]) {
            rc = ql_error(QL_EINVAL, "quantizer %s: too many options", q->desc->name);
            goto fail;
        }
        *eq = '\0';
        options[nopt++] = (ql_option){tok, eq + 1};
    }
    ql_error_clear();
    rc = q->desc->create(options, nopt, &q->inst);
    if (rc) {
        if (!ql_error_message()[0]) ql_error(rc, "create failed");
        ql_error_context("quantizer %s", q->desc->name);
        goto fail;
    }
    rc = q->desc->describe(q->inst, q->options, sizeof q->options);
    if (rc) goto fail;
    *out = q;
    return QL_OK;
fail:
    ql_qz_close(q);
    return rc;
}

void ql_qz_close(ql_qz *q)
{
    if (!q) return;
    if (q->inst) q->desc->destroy(q->inst);
    ql_plugin_close(q->plugin);
    free(q);
}
