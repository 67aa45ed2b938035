/* Finding, loading and validating quantizer plugins. */
#ifndef QLORA_PLUGIN_H
#define QLORA_PLUGIN_H

#include <stddef.h>

#include "quantizer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Environment variable with extra plugin folders, colon separated; searched first. */
#define QL_PLUGIN_PATH_ENV "QLORA_PLUGIN_PATH"

typedef struct ql_plugin ql_plugin;

/* Load one plugin file and validate its descriptor before calling any of its
 * code except the entry function.  On failure the file is unloaded and the
 * message names the file and the problem (dlerror's text, the field and both
 * versions for an ABI mismatch). */
int ql_plugin_open(const char *path, ql_plugin **out);
/* Find "qlora_<name>.so" in the search path and open it.  An unknown name
 * says where it looked and what it found. */
int ql_plugin_find(const char *name, ql_plugin **out);
void ql_plugin_close(ql_plugin *p);
const ql_quantizer_desc *ql_plugin_desc(const ql_plugin *p);
const char *ql_plugin_path(const ql_plugin *p);

/* The folders searched, in order (caller frees with ql_string_list_free). */
int ql_plugin_search_dirs(char ***dirs, size_t *n);
/* Every plugin file in the search path, first of each name wins. */
int ql_plugin_scan(char ***paths, size_t *n);
void ql_string_list_free(char **list, size_t n);

/* A plugin plus a configured instance, from a spec such as "nf4",
 * "nf4:double_quant=0,blocksize=64", "./my.so" or "./my.so:group_size=64". */
typedef struct ql_qz {
    ql_plugin *plugin;
    const ql_quantizer_desc *desc;
    ql_quantizer *inst;
    char spec[512];    /* as given */
    char options[512]; /* canonical, from describe() */
} ql_qz;

int ql_qz_open(const char *spec, ql_qz **out);
void ql_qz_close(ql_qz *q);

#ifdef __cplusplus
}
#endif
#endif
