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

/* Longest quantizer spec (name or path, then ":key=value,..."), and the most
 * options one may carry.  Longer specs and more options are refused, never
 * cut short. */
#define QL_QZ_SPEC_MAX 511
#define QL_QZ_MAX_OPTIONS 32

/* A plugin plus a configured instance, from a spec such as "nf4",
 * "nf4:double_quant=0,blocksize=64", "./my.so" or "./my.so:group_size=64". */
typedef struct ql_qz {
    ql_plugin *plugin;
    const ql_quantizer_desc *desc;
    ql_quantizer *inst;
    char spec[QL_QZ_SPEC_MAX + 1];    /* as given */
    char options[QL_QZ_SPEC_MAX + 1]; /* canonical, from describe() */
} ql_qz;

/* Where a spec comes from decides what it may name (docs/security.md).
 *
 * ql_qz_open: a spec the user typed on the command line (--quantizer=...),
 * which qlora trusts: a plugin name resolved on the search path, or a path to
 * a shared object, which is loaded and so runs its code. */
int ql_qz_open(const char *spec, ql_qz **out);
/* ql_qz_open_from_file: a spec read from a file the user did not write
 * (a model's config.json, a run folder's run_config.json).  Only a plugin
 * name ([a-z0-9_-], 1-63 characters) with optional ":key=value,..." options
 * (keys [a-z0-9_], values [A-Za-z0-9_.+-]) is taken, and resolved only on the
 * plugin search path.  A path, or anything else, is refused before anything
 * is loaded, with a message naming `file` and `field` and saying to pass the
 * plugin with --quantizer=PATH if the user trusts it. */
int ql_qz_open_from_file(const char *spec, const char *file, const char *field, ql_qz **out);
/* The check ql_qz_open_from_file makes, without loading anything. */
int ql_qz_check_from_file(const char *spec, const char *file, const char *field);
/* 1 when a spec is taken as a path to a shared object rather than a name. */
int ql_qz_spec_is_path(const char *spec);
/* 1 when the opened quantizer `q` (from the command line) is the plugin that
 * `file_spec` (read from a file) names: the same plugin name; or, when
 * file_spec is a path, the same file, or a file whose name (qlora_NAME.so or
 * NAME.so) gives q's plugin name.  Loads nothing. */
int ql_qz_matches(const ql_qz *q, const char *file_spec);
/* 1 when the plugin-name parts of two name specs are equal ("nf4" and
 * "nf4:blocksize=64"). */
int ql_qz_same_name(const char *a, const char *b);
void ql_qz_close(ql_qz *q);
/* ABI 1.3: 1 when q has the calibration slots; 1 when q, as configured,
 * cannot quantize without calibration data (QL_QUANTIZER_NEEDS_CALIBRATION,
 * and calibration_needed() when present). */
int ql_qz_can_calibrate(const ql_qz *q);
int ql_qz_needs_calibration(const ql_qz *q);
/* QL_OK when q can `what` ("quantize MODEL", ...) with have_data, else
 * QL_EINVAL with a message naming --calib-data. */
int ql_qz_require_calibration(const ql_qz *q, int have_data, const char *what);

/* ---- probing plugins in a child process ---- */

/* What one plugin file says about itself, read in a child process so that a
 * plugin that crashes, exits or hangs in any of its calls cannot take the
 * caller down. */
typedef struct ql_plugin_info {
    char *path;
    char *name, *description, *version, *options; /* NULL when the probe failed */
    unsigned abi_major, abi_minor;
    int64_t rows, cols;    /* the matrix bits_per_param is for */
    double bits_per_param; /* of a rows x cols matrix, default options: every byte save() writes for it
                            * over its parameters (docs/writing-a-quantizer.md, "Bits per parameter") */
    char *error;           /* NULL when the plugin loaded; else what happened */
} ql_plugin_info;

/* Open `path` in a child process (fork), configure it with default options,
 * ask its description and bits/param, close it, and send the answers back
 * over a pipe.  QL_OK when all of that worked; otherwise the status (the
 * plugin's own, QL_EINTERNAL for a crash, an exit or a timeout) with
 * out->error and the error message naming the file, the signal or exit
 * status, and the call it was in.  The child is killed after timeout_s.
 * The plugin's code runs (in the child): pass only paths the user trusts,
 * such as those ql_plugin_scan finds. */
int ql_plugin_probe(const char *path, double timeout_s, ql_plugin_info *out);
/* The same, with bits_per_param for a rows x cols matrix (ql_plugin_probe: 4096 x 4096). */
int ql_plugin_probe_shape(const char *path, double timeout_s, int64_t rows, int64_t cols, ql_plugin_info *out);
void ql_plugin_info_free(ql_plugin_info *info);

#ifdef __cplusplus
}
#endif
#endif
