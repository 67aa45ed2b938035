/* qlora check-plugin: a quantizer plugin through every check a host relies
 * on, each check in a child process of its own, so that a plugin that
 * crashes or hangs fails that check and the others still run. */
#ifndef QLORA_CHECK_PLUGIN_H
#define QLORA_CHECK_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { QL_CHECK_PASS = 0, QL_CHECK_FAIL = 1, QL_CHECK_SKIP = 2 };

typedef struct ql_check_opts {
    double timeout_s;   /* each check's child is killed after this long (a FAIL) */
    uint64_t seed;      /* the test matrices, calibration inputs and tampering */
    int mutations;      /* iterations of the seeded mutation loop over saved tensors */
    int threads;        /* threads that materialize one state at once */
    const char *only;   /* comma-separated check ids to run (NULL: all; the rest SKIP) */
    int progress;       /* progress on stderr */
} ql_check_opts;

/* The defaults of the qlora check-plugin flags. */
#define QL_CHECK_DEFAULT_TIMEOUT_S 60.0
#define QL_CHECK_DEFAULT_MUTATIONS 200
#define QL_CHECK_DEFAULT_THREADS 4

typedef struct ql_check_result {
    const char *id;   /* "load", "quantize", ... (static) */
    const char *what; /* one line: what it checks (static) */
    int status;       /* QL_CHECK_PASS, _FAIL or _SKIP */
    char *reason;     /* one line: why it failed or skipped, or what it measured */
    double seconds;
    char *details;    /* JSON text of what it measured in detail (quantize: each matrix's error), or NULL */
} ql_check_result;

typedef struct ql_check_report {
    char *spec;                         /* as given */
    ql_check_opts opts;                 /* as run (only: NULL; see `only`) */
    char *only;                         /* --only, or NULL */
    char *name, *version, *file, *options; /* from the load check; NULL when it failed */
    unsigned abi_major, abi_minor;
    ql_check_result *results;
    size_t n;
    int passed, failed, skipped;
} ql_check_report;

/* The id of check i, in the order they run ("load", "slots", ...); NULL
 * past the last. */
const char *ql_check_id(size_t i);
/* What check i checks, in one line. */
const char *ql_check_what(size_t i);

/* Run every check on the plugin `spec` (a path or a name on the plugin
 * search path, then optional ":key=value,..." options).  QL_OK when the
 * checks ran, whatever they found (out->failed counts the failures); an
 * error (bad --only id, no fork) otherwise.  The plugin's code runs, in
 * child processes: pass only a plugin the user asked for. */
int ql_check_plugin(const char *spec, const ql_check_opts *opts, ql_check_report *out);
/* The report as JSON text, ending in a newline (caller frees). */
char *ql_check_report_json(const ql_check_report *r);
void ql_check_report_free(ql_check_report *r);

#ifdef __cplusplus
}
#endif
#endif
