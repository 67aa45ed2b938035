#include "qlora/plugin.h"

#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
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

/* In a probe's child process, the write end of the pipe to the parent: each
 * plugin call is announced on it first, so that a crash can be reported with
 * the call it happened in.  -1 elsewhere. */
static int probe_fd = -1;

static void probe_stage(const char *stage)
{
    if (probe_fd < 0) return;
    char line[64];
    int n = snprintf(line, sizeof line, "stage %s\n", stage);
    if (n > 0 && write(probe_fd, line, (size_t)n) < 0) probe_fd = -1;
}

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

static int validate_calibration(const char *path, const ql_quantizer_desc *d);

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
    return validate_calibration(path, d);
}

/* The calibration slots of a descriptor as the host will see them: NULL
 * past the plugin's struct_size. */
static int has_slot(const ql_quantizer_desc *d, size_t offset) { return d->struct_size >= offset + sizeof(void (*)(void)); }
#define SLOT(d, field) (has_slot((d), offsetof(ql_quantizer_desc, field)) ? (d)->field : NULL)

/* ABI 1.3: the four calibration slots come together, and a plugin that
 * says it needs calibration has them. */
static int validate_calibration(const char *path, const ql_quantizer_desc *d)
{
    const struct {
        const char *field;
        int present;
    } calib[] = {
        {"calib_create", SLOT(d, calib_create) != NULL},
        {"calib_feed", SLOT(d, calib_feed) != NULL},
        {"quantize_calibrated", SLOT(d, quantize_calibrated) != NULL},
        {"calib_free", SLOT(d, calib_free) != NULL},
    };
    size_t n = 0, k = sizeof calib / sizeof calib[0];
    for (size_t i = 0; i < k; i++) n += (size_t)calib[i].present;
    /* the bit means something from 1.3 on; an older plugin's flags cannot have meant it */
    const int needs = (d->flags & QL_QUANTIZER_NEEDS_CALIBRATION) != 0 && d->abi_minor >= 3;
    if (n == k || (n == 0 && !needs)) return QL_OK;
    for (size_t i = 0; i < k; i++)
        if (!calib[i].present)
            return ql_error(QL_EABI,
                            "plugin %s: %s, but calibration slot '%s' is %s (plugin ABI %u.%u, host %d.%d): "
                            "calib_create, calib_feed, quantize_calibrated and calib_free come together",
                            path, needs ? "its flags say it needs calibration (QL_QUANTIZER_NEEDS_CALIBRATION)"
                                        : "it has some calibration slots",
                            calib[i].field, has_slot(d, offsetof(ql_quantizer_desc, calib_free)) ? "NULL" : "absent",
                            d->abi_major, d->abi_minor, QL_QUANTIZER_ABI_MAJOR, QL_QUANTIZER_ABI_MINOR);
    return QL_OK;
}

int ql_plugin_open(const char *given, ql_plugin **out)
{
    *out = NULL;
    if (!ql_path_exists(given)) return ql_error(QL_ENOTFOUND, "plugin file %s does not exist", given);
    /* dlopen() searches the library path for a name without a '/', never
     * the current folder: "my.so" would load another file, or none. */
    char here[PATH_MAX + 3];
    const char *path = given;
    if (!strchr(given, '/')) {
        if (snprintf(here, sizeof here, "./%s", given) >= (int)sizeof here)
            return ql_error(QL_EINVAL, "plugin file name %.60s... is too long", given);
        path = here;
    }
    dlerror();
    probe_stage("dlopen");
    /* RTLD_NODELETE: a plugin stays mapped after dlclose().  A plugin with
     * CUDA kernels registers them with the CUDA runtime when it is mapped;
     * unmapped and mapped again before CUDA started (qlora study checks
     * every quantizer first, compare opens and closes one), the runtime kept
     * the first mapping's registrations, and the next kernel launch hung or
     * failed with "invalid argument" (seen on the H200).  Kept mapped, a
     * plugin opened again is the same image, registered once. */
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
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
    probe_stage(QL_QUANTIZER_ENTRY_NAME);
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
    probe_stage("init");
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
    probe_stage("dlclose");
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

/* Beside the build tree's libqlora only (core/meson.build); its plugins are
 * then in UNINSTALLED_PLUGINDIR, relative to the library's folder. */
#define UNINSTALLED_MARKER "qlora-uninstalled-plugins"
#define UNINSTALLED_PLUGINDIR "../plugins"

/* The folder of libqlora.so, the file that holds this code, with links
 * resolved: 1, or 0 when unknown (a static link into some program, whose
 * folder says nothing of where plugins are). */
static int library_dir(char *buf, size_t cap)
{
    Dl_info info;
    void *self;
    int (*fn)(char *, size_t) = library_dir;
    memcpy(&self, &fn, sizeof self);
    if (!dladdr(self, &info) || !info.dli_fname || !*info.dli_fname) return 0;
    char real[PATH_MAX];
    if (!realpath(info.dli_fname, real)) return 0;
    char *slash = strrchr(real, '/');
    if (!slash || strncmp(slash + 1, "libqlora.so", strlen("libqlora.so")) != 0) return 0;
    *slash = '\0';
    if (strlen(real) + 1 > cap) return 0;
    memcpy(buf, real, strlen(real) + 1);
    return 1;
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
    /* The plugin folders of the libqlora that runs, found from where it is
     * rather than from paths fixed at build time: an installed copy (in any
     * prefix, a DESTDIR, or moved) searches its own <libdir>/qlora/plugins
     * and never the build tree it was built in; the build tree's library,
     * marked by the file core/meson.build puts beside it, searches
     * <builddir>/plugins. */
    char lib_dir[PATH_MAX];
    if (!library_dir(lib_dir, sizeof lib_dir)) return push(dirs, n, QL_INSTALLED_PLUGINDIR);
    char *installed = ql_path_join(lib_dir, QL_PLUGINDIR_FROM_LIBDIR);
    char *marker = ql_path_join(lib_dir, UNINSTALLED_MARKER);
    char *build = ql_path_join(lib_dir, UNINSTALLED_PLUGINDIR);
    int rc = installed && marker && build ? QL_OK : ql_error(QL_ENOMEM, "out of memory");
    struct stat st;
    int uninstalled = rc == QL_OK && lstat(marker, &st) == 0 && S_ISREG(st.st_mode);
    char build_real[PATH_MAX]; /* shown in messages: no "core/.." */
    if (uninstalled && realpath(build, build_real)) rc = push(dirs, n, build_real);
    else if (rc == QL_OK) rc = push(dirs, n, uninstalled ? build : installed);
    free(installed);
    free(marker);
    free(build);
    return rc;
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

int ql_qz_spec_is_path(const char *s) { return strchr(s, '/') != NULL || strstr(s, ".so") != NULL; }

/* Untrusted text for a message: printable ASCII as it is, other bytes as
 * \xNN, at most about 200 characters. */
static void quote_for_message(const char *s, char *buf, size_t cap)
{
    size_t k = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p && k + 8 < cap; p++) {
        if (k >= 200) {
            k += (size_t)snprintf(buf + k, cap - k, "...");
            break;
        }
        if (*p >= 0x20 && *p < 0x7f && *p != '\\') buf[k++] = (char)*p;
        else k += (size_t)snprintf(buf + k, cap - k, "\\x%02x", *p);
    }
    buf[k < cap ? k : cap - 1] = '\0';
}

static int option_key_char(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'; }
static int option_value_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' ||
           c == '+' || c == '-';
}

/* "name" or "name:k=v,k=v" with the grammar of ql_qz_open_from_file; on
 * failure *why says what is wrong. */
static int valid_name_spec(const char *spec, const char **why)
{
    size_t len = strlen(spec);
    if (len > QL_QZ_SPEC_MAX) return *why = "longer than the 511 characters allowed", 0;
    const char *colon = strchr(spec, ':');
    size_t nl = colon ? (size_t)(colon - spec) : len;
    char name[64];
    if (nl == 0 || nl >= sizeof name) return *why = "not a plugin name (1-63 characters of [a-z0-9_-])", 0;
    memcpy(name, spec, nl);
    name[nl] = '\0';
    if (!valid_name(name)) return *why = "not a plugin name (1-63 characters of [a-z0-9_-])", 0;
    if (!colon) return 1;
    size_t nopt = 0;
    const char *p = colon + 1;
    for (;;) {
        const char *k = p;
        while (option_key_char(*p)) p++;
        if (p == k || p - k > 63 || *p != '=')
            return *why = "options that are not key=value,... (keys of [a-z0-9_], values of [A-Za-z0-9_.+-])", 0;
        const char *v = ++p;
        while (option_value_char(*p)) p++;
        if (p == v || p - v > 63 || (*p != ',' && *p != '\0'))
            return *why = "options that are not key=value,... (keys of [a-z0-9_], values of [A-Za-z0-9_.+-])", 0;
        if (++nopt > QL_QZ_MAX_OPTIONS) return *why = "more than 32 options", 0;
        if (*p == '\0') return 1;
        p++;
    }
}

int ql_qz_check_from_file(const char *spec, const char *file, const char *field)
{
    char shown[256];
    if (!spec) return ql_error(QL_EFORMAT, "%s: %s is not a string", file, field);
    const char *why = NULL;
    if (valid_name_spec(spec, &why)) return QL_OK;
    quote_for_message(spec, shown, sizeof shown);
    /* a plugin name with bad options is not a path, whatever the options hold */
    char name[64];
    size_t nl = strcspn(spec, ":");
    int name_ok = nl < sizeof name && spec[nl] == ':';
    if (name_ok) {
        memcpy(name, spec, nl);
        name[nl] = '\0';
        name_ok = valid_name(name);
    }
    if (!name_ok && (ql_qz_spec_is_path(spec) || strchr(spec, '.')))
        return ql_error(QL_EINVAL,
                        "%s: %s is '%s', a path: qlora never loads code named in a file, only plugins found by name "
                        "on the plugin search path ($%s, the installed plugin folder); if you trust that plugin, pass "
                        "it on the command line with --quantizer=PATH",
                        file, field, shown, QL_PLUGIN_PATH_ENV);
    return ql_error(QL_EINVAL,
                    "%s: %s is '%s', %s; a file may only name a plugin on the plugin search path (if you trust a "
                    "plugin elsewhere, pass it on the command line with --quantizer=PATH)",
                    file, field, shown, why);
}

/* The plugin-name part of a name spec, or "" for a path. */
static void spec_name(const char *spec, char *name, size_t cap)
{
    name[0] = '\0';
    if (ql_qz_spec_is_path(spec)) return;
    size_t n = strcspn(spec, ":");
    if (n >= cap) return;
    memcpy(name, spec, n);
    name[n] = '\0';
}

int ql_qz_same_name(const char *a, const char *b)
{
    char na[128], nb[128];
    spec_name(a, na, sizeof na);
    spec_name(b, nb, sizeof nb);
    return na[0] && strcmp(na, nb) == 0;
}

int ql_qz_matches(const ql_qz *q, const char *file_spec)
{
    if (!q || !file_spec) return 0;
    if (!ql_qz_spec_is_path(file_spec)) {
        char n[128];
        spec_name(file_spec, n, sizeof n);
        return strcmp(n, q->desc->name) == 0;
    }
    /* A path: the part before options, then the very file, or its name. */
    char path[QL_QZ_SPEC_MAX + 1];
    if (strlen(file_spec) > QL_QZ_SPEC_MAX) return 0;
    snprintf(path, sizeof path, "%s", file_spec);
    char *colon = strrchr(path, ':');
    if (colon && strchr(colon + 1, '=')) *colon = '\0';
    char *a = realpath(path, NULL), *b = realpath(ql_plugin_path(q->plugin), NULL);
    int same = a && b && strcmp(a, b) == 0;
    free(a);
    free(b);
    if (same) return 1;
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    size_t lp = strlen(plugin_prefix), ls = strlen(plugin_suffix), lb = strlen(base);
    if (!strncmp(base, plugin_prefix, lp)) base += lp, lb -= lp;
    if (lb > ls && !strcmp(base + lb - ls, plugin_suffix)) lb -= ls;
    return lb == strlen(q->desc->name) && strncmp(base, q->desc->name, lb) == 0;
}

static int qz_open(const char *spec, int may_be_path, ql_qz **out)
{
    *out = NULL;
    if (!spec || !*spec) return ql_error(QL_EINVAL, "empty quantizer name");
    size_t len = strlen(spec);
    if (len > QL_QZ_SPEC_MAX)
        return ql_error(QL_EINVAL, "quantizer spec is %zu characters, longer than the %d allowed: '%.60s...'", len,
                        QL_QZ_SPEC_MAX, spec);
    ql_qz *q = calloc(1, sizeof *q);
    if (!q) return ql_error(QL_ENOMEM, "out of memory");
    memcpy(q->spec, spec, len + 1);
    char target[QL_QZ_SPEC_MAX + 1], opts[QL_QZ_SPEC_MAX + 1] = "";
    memcpy(target, spec, len + 1);
    /* A name has no ':', so its options start at the first one; a path may
     * hold ':' itself, so there the options are what follows the last ':'
     * when that looks like options. */
    int is_path = ql_qz_spec_is_path(target);
    char *colon = strchr(target, ':');
    if (colon && is_path) {
        colon = strrchr(target, ':');
        if (!strchr(colon + 1, '=') && colon[1] != '\0') colon = NULL;
    }
    if (colon) {
        *colon = '\0';
        memcpy(opts, colon + 1, strlen(colon + 1) + 1);
    }
    is_path = ql_qz_spec_is_path(target);
    int rc;
    if (is_path && !may_be_path) /* ql_qz_check_from_file refuses these first; this is the backstop */
        rc = ql_error(QL_EINVAL, "quantizer '%s' is a path, which only the command line may give", target);
    else rc = is_path ? ql_plugin_open(target, &q->plugin) : ql_plugin_find(target, &q->plugin);
    if (rc) {
        free(q);
        return rc;
    }
    q->desc = ql_plugin_desc(q->plugin);
    ql_option options[QL_QZ_MAX_OPTIONS];
    size_t nopt = 0;
    char *save = NULL;
    for (char *tok = strtok_r(opts, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '=');
        if (!eq || eq == tok) {
            rc = ql_error(QL_EINVAL, "quantizer %s: option '%s' is not key=value", q->desc->name, tok);
            goto fail;
        }
        if (nopt == QL_QZ_MAX_OPTIONS) {
            rc = ql_error(QL_EINVAL, "quantizer %s: more than %d options", q->desc->name, QL_QZ_MAX_OPTIONS);
            goto fail;
        }
        *eq = '\0';
        options[nopt++] = (ql_option){tok, eq + 1};
    }
    ql_error_clear();
    probe_stage("create");
    rc = q->desc->create(options, nopt, &q->inst);
    if (rc) {
        if (!ql_error_message()[0]) ql_error(rc, "create failed");
        ql_error_context("quantizer %s", q->desc->name);
        goto fail;
    }
    probe_stage("describe");
    rc = q->desc->describe(q->inst, q->options, sizeof q->options);
    if (rc) goto fail;
    if (!memchr(q->options, '\0', sizeof q->options)) {
        rc = ql_error(QL_EABI, "quantizer %s: describe() wrote no terminating NUL in %zu bytes", q->desc->name,
                      sizeof q->options);
        goto fail;
    }
    *out = q;
    return QL_OK;
fail:
    ql_qz_close(q);
    return rc;
}

int ql_qz_open(const char *spec, ql_qz **out) { return qz_open(spec, 1, out); }

int ql_qz_can_calibrate(const ql_qz *q) { return q && q->desc->calib_create != NULL; }

int ql_qz_needs_calibration(const ql_qz *q)
{
    if (!q || !(q->desc->flags & QL_QUANTIZER_NEEDS_CALIBRATION) || q->desc->abi_minor < 3) return 0;
    if (!q->desc->calibration_needed) return 1;
    probe_stage("calibration_needed");
    return q->desc->calibration_needed(q->inst) != 0;
}

int ql_qz_require_calibration(const ql_qz *q, int have_data, const char *what)
{
    if (have_data || !ql_qz_needs_calibration(q)) return QL_OK;
    return ql_error(QL_EINVAL,
                    "quantizer %s%s%s needs calibration data to %s: pass --calib-data FILE (qlora quantize, compare and "
                    "train take it, with --calib-format, --calib-samples and --calib-len), or quantize the model "
                    "first with qlora quantize --quantizer=%s%s%s MODEL_DIR -o OUT_DIR --calib-data FILE and use "
                    "OUT_DIR",
                    q->desc->name, q->options[0] ? ":" : "", q->options, what, q->desc->name, q->options[0] ? ":" : "",
                    q->options);
}

int ql_qz_open_from_file(const char *spec, const char *file, const char *field, ql_qz **out)
{
    *out = NULL;
    int rc = ql_qz_check_from_file(spec, file, field);
    if (rc) return rc;
    rc = qz_open(spec, 0, out);
    if (rc) ql_error_context("%s: %s", file, field);
    return rc;
}

void ql_qz_close(ql_qz *q)
{
    if (!q) return;
    if (q->inst) {
        probe_stage("destroy");
        q->desc->destroy(q->inst);
    }
    ql_plugin_close(q->plugin);
    free(q);
}

/* ---- probing a plugin in a child process ---- */

static const struct {
    int sig;
    const char *name;
} signal_names[] = {
    {SIGSEGV, "SIGSEGV"}, {SIGBUS, "SIGBUS"},   {SIGABRT, "SIGABRT"}, {SIGFPE, "SIGFPE"},   {SIGILL, "SIGILL"},
    {SIGKILL, "SIGKILL"}, {SIGTERM, "SIGTERM"}, {SIGPIPE, "SIGPIPE"}, {SIGSYS, "SIGSYS"},   {SIGTRAP, "SIGTRAP"},
    {SIGALRM, "SIGALRM"}, {SIGXCPU, "SIGXCPU"}, {SIGXFSZ, "SIGXFSZ"}, {SIGHUP, "SIGHUP"},   {SIGINT, "SIGINT"},
    {SIGQUIT, "SIGQUIT"}, {SIGUSR1, "SIGUSR1"}, {SIGUSR2, "SIGUSR2"},
};

static const char *signal_name(int sig)
{
    for (size_t i = 0; i < sizeof signal_names / sizeof signal_names[0]; i++)
        if (signal_names[i].sig == sig) return signal_names[i].name;
    return "a signal";
}

static void write_all(int fd, const char *s, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, s, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return;
        s += w;
        n -= (size_t)w;
    }
}

static void probe_child(const char *path, int64_t rows, int64_t cols, int fd)
{
    /* A plugin that prints must not mix into the parent's listing. */
    dup2(STDERR_FILENO, STDOUT_FILENO);
    probe_fd = fd;
    ql_qz *q = NULL;
    json_t *j;
    int rc = ql_qz_open(path, &q);
    if (rc == QL_OK) {
        const ql_quantizer_desc *d = q->desc;
        probe_stage("bits_per_param");
        double bpp = d->bits_per_param(q->inst, rows, cols);
        j = json_pack("{s:i, s:s, s:s, s:s, s:s, s:i, s:i, s:f}", "status", QL_OK, "name", d->name, "description",
                      d->description, "version", d->version ? d->version : "", "options", q->options, "abi_major",
                      (int)d->abi_major, "abi_minor", (int)d->abi_minor, "bits_per_param", isfinite(bpp) ? bpp : -1.0);
        ql_qz_close(q);
    } else {
        j = json_pack("{s:i, s:s}", "status", rc, "error", ql_error_message());
    }
    char *text = j ? json_dumps(j, JSON_COMPACT | JSON_ENSURE_ASCII) : NULL;
    json_decref(j);
    int ok = text != NULL;
    if (ok) {
        write_all(fd, "result ", 7);
        write_all(fd, text, strlen(text));
        write_all(fd, "\n", 1);
    }
    free(text);
    close(fd);
    _exit(ok ? 0 : 3);
}

static const char *stage_words(const char *stage)
{
    if (!strcmp(stage, "dlopen")) return "while being loaded (dlopen, its constructors)";
    if (!strcmp(stage, "dlclose")) return "while being unloaded (dlclose, its destructors)";
    if (!strcmp(stage, "")) return "before loading";
    return NULL;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static char *dup_json_string(json_t *o, const char *key)
{
    const char *s = json_string_value(json_object_get(o, key));
    return strdup(s ? s : "");
}

void ql_plugin_info_free(ql_plugin_info *info)
{
    if (!info) return;
    free(info->path);
    free(info->name);
    free(info->description);
    free(info->version);
    free(info->options);
    free(info->error);
    memset(info, 0, sizeof *info);
}

/* Keep the message as info->error too. */
static int probe_fail(ql_plugin_info *out, int code)
{
    out->error = strdup(ql_error_message());
    return code;
}

int ql_plugin_probe(const char *path, double timeout_s, ql_plugin_info *out)
{
    return ql_plugin_probe_shape(path, timeout_s, 4096, 4096, out);
}

int ql_plugin_probe_shape(const char *path, double timeout_s, int64_t rows, int64_t cols, ql_plugin_info *out)
{
    memset(out, 0, sizeof *out);
    out->rows = rows;
    out->cols = cols;
    if (!(out->path = strdup(path))) return ql_error(QL_ENOMEM, "out of memory");
    int fds[2];
    if (pipe(fds) != 0) return probe_fail(out, ql_error(QL_EIO, "plugin %s: pipe: %s", path, strerror(errno)));
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        return probe_fail(out, ql_error(QL_EIO, "plugin %s: fork: %s", path, strerror(errno)));
    }
    if (pid == 0) {
        close(fds[0]);
        probe_child(path, rows, cols, fds[1]);
    }
    close(fds[1]);
    fcntl(fds[0], F_SETFD, FD_CLOEXEC);

    /* Read everything the child says until it closes the pipe, the answer
     * grows past a sane size, or the time is up. */
    enum { max_answer = 1 << 20 };
    char *buf = malloc(max_answer + 1);
    size_t len = 0;
    int timed_out = 0;
    double deadline = now_s() + timeout_s;
    while (buf && len < max_answer) {
        double left = deadline - now_s();
        if (left <= 0) {
            timed_out = 1;
            break;
        }
        struct pollfd pfd = {.fd = fds[0], .events = POLLIN};
        int pr = poll(&pfd, 1, left < 1e6 ? (int)(left * 1000) + 1 : 1000000000);
        if (pr < 0 && errno == EINTR) continue;
        if (pr == 0) continue; /* the deadline check above ends it */
        if (pr < 0) break;
        ssize_t r = read(fds[0], buf + len, max_answer - len);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        len += (size_t)r;
    }
    close(fds[0]);
    if (timed_out || len >= max_answer) kill(pid, SIGKILL);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (!buf) return probe_fail(out, ql_error(QL_ENOMEM, "out of memory"));
    buf[len] = '\0';

    /* The last call announced, and the result line if one came. */
    char stage[64] = "";
    json_t *result = NULL;
    for (char *line = buf, *next; line && *line; line = next) {
        next = strchr(line, '\n');
        if (next) *next++ = '\0';
        if (!strncmp(line, "stage ", 6)) snprintf(stage, sizeof stage, "%s", line + 6);
        else if (!strncmp(line, "result ", 7)) {
            json_decref(result);
            result = json_loads(line + 7, 0, NULL);
        }
    }
    free(buf);
    char where[128];
    const char *words = stage_words(stage);
    if (words) snprintf(where, sizeof where, "%s", words);
    else snprintf(where, sizeof where, "in its %s() call", stage);

    int rc;
    if (timed_out)
        rc = ql_error(QL_EINTERNAL, "plugin %s: no answer after %g s %s; stopped it", path, timeout_s, where);
    else if (len >= max_answer)
        rc = ql_error(QL_EINTERNAL, "plugin %s: wrote more than %d bytes to the probe pipe; stopped it", path,
                      max_answer);
    else if (WIFSIGNALED(status))
        rc = ql_error(QL_EINTERNAL, "plugin %s: crashed %s: killed by signal %s (%s)", path, where,
                      signal_name(WTERMSIG(status)), strsignal(WTERMSIG(status)));
    /* After the result line the plugin is closed and unloaded: the exit
     * status no longer speaks for it (a leak checker may set it). */
    else if (!result)
        rc = ql_error(QL_EINTERNAL, "plugin %s: the process exited with status %d %s", path,
                      WIFEXITED(status) ? WEXITSTATUS(status) : -1, where);
    else {
        json_int_t code = json_integer_value(json_object_get(result, "status"));
        if (code != QL_OK) {
            const char *msg = json_string_value(json_object_get(result, "error"));
            rc = ql_error(code > 0 && code <= INT_MAX ? (int)code : QL_EINTERNAL, "%s",
                          msg && *msg ? msg : "plugin failed to load");
        } else {
            out->name = dup_json_string(result, "name");
            out->description = dup_json_string(result, "description");
            out->version = dup_json_string(result, "version");
            out->options = dup_json_string(result, "options");
            out->abi_major = (unsigned)json_integer_value(json_object_get(result, "abi_major"));
            out->abi_minor = (unsigned)json_integer_value(json_object_get(result, "abi_minor"));
            out->bits_per_param = json_number_value(json_object_get(result, "bits_per_param"));
            rc = out->name && out->description && out->version && out->options ? QL_OK
                                                                                 : ql_error(QL_ENOMEM, "out of memory");
        }
    }
    json_decref(result);
    if (rc) {
        free(out->name);
        free(out->description);
        free(out->version);
        free(out->options);
        out->name = out->description = out->version = out->options = NULL;
        return probe_fail(out, rc);
    }
    return QL_OK;
}
