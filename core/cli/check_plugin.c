/* qlora check-plugin: the command line of core/check_plugin.c. */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "qlora/check_plugin.h"
#include "qlora/error.h"
#include "qlora/fs.h"

/* Long options without a short letter; every val is >= 256 (option_error relies on it). */
enum { OPT_JSON = 2000, OPT_TIMEOUT, OPT_SEED, OPT_MUTATIONS, OPT_THREADS, OPT_ONLY, OPT_QUIET, OPT_HELP };

static int help(void)
{
    printf("usage: qlora check-plugin [OPTIONS] PLUGIN[:key=value,...]\n\n"
           "Runs a quantizer plugin through every check a host relies on and prints one line a check:\n"
           "PASS, FAIL or SKIP, with the reason. PLUGIN is a path to the .so or a plugin name on the\n"
           "plugin search path; the options configure it as --quantizer would. Each check runs in a child\n"
           "process of its own: a plugin that crashes or hangs fails that check, naming the call and the\n"
           "signal, and the other checks still run. Exit status 0 when no check fails, 1 when one does\n"
           "(or the report cannot be written), 2 on a usage error.\n"
           "The plugin's code runs: check only plugins you mean to load.\n\nchecks:\n");
    for (size_t i = 0; ql_check_id(i); i++) printf("  %-15s %s\n", ql_check_id(i), ql_check_what(i));
    printf("(docs/writing-a-quantizer.md, \"Checking a plugin\", says what each one checks)\n\noptions:\n");
    char buf[32];
    help_opt("--json FILE", "also write the report as JSON to FILE (atomically)", NULL);
    snprintf(buf, sizeof buf, "%g", QL_CHECK_DEFAULT_TIMEOUT_S);
    help_opt("--timeout SECONDS", "a check still running after this long fails as a hang", buf);
    help_opt("--seed N", "seed of the test matrices, calibration inputs and tampering", "0");
    snprintf(buf, sizeof buf, "%d", QL_CHECK_DEFAULT_MUTATIONS);
    help_opt("--mutations N", "iterations of the mutation loop over saved tensors", buf);
    snprintf(buf, sizeof buf, "%d", QL_CHECK_DEFAULT_THREADS);
    help_opt("--threads N", "threads that materialize one state at once", buf);
    help_opt("--only IDS", "run only these checks (comma-separated; load always runs)", "all");
    help_opt("--quiet", "no progress on stderr", NULL);
    return help_end("qlora check-plugin ./rtn_int4.so:group_size=64 --json report.json");
}

static int parse_count(const char *flag, const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (!*s || *end || errno || v < lo || v > hi)
        return usage_error("%s=%s: expected an integer from %ld to %ld", flag, s, lo, hi);
    *out = v;
    return 0;
}

/* the table: one line a check, the reason in full */
static void print_report(const ql_check_report *r)
{
    if (r->name)
        printf("plugin  %s %s (ABI %u.%u), options %s\nfile    %s\n\n", r->name, r->version[0] ? r->version : "(no version)",
               r->abi_major, r->abi_minor, r->options[0] ? r->options : "(none)", r->file);
    else printf("plugin  %s\n\n", r->spec);
    printf("%-15s %-6s %s\n", "check", "result", "reason");
    for (size_t i = 0; i < r->n; i++) {
        const ql_check_result *c = &r->results[i];
        printf("%-15s %-6s %s\n", c->id,
               c->status == QL_CHECK_PASS ? "PASS" : c->status == QL_CHECK_SKIP ? "SKIP" : "FAIL", c->reason);
    }
    printf("\n%zu checks: %d passed, %d failed, %d skipped\n", r->n, r->passed, r->failed, r->skipped);
}

int cmd_check_plugin(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"json", required_argument, NULL, OPT_JSON},
        {"timeout", required_argument, NULL, OPT_TIMEOUT},
        {"seed", required_argument, NULL, OPT_SEED},
        {"mutations", required_argument, NULL, OPT_MUTATIONS},
        {"threads", required_argument, NULL, OPT_THREADS},
        {"only", required_argument, NULL, OPT_ONLY},
        {"quiet", no_argument, NULL, OPT_QUIET},
        {"help", no_argument, NULL, OPT_HELP},
        {NULL, 0, NULL, 0},
    };
    ql_check_opts o = {.timeout_s = QL_CHECK_DEFAULT_TIMEOUT_S,
                       .mutations = QL_CHECK_DEFAULT_MUTATIONS,
                       .threads = QL_CHECK_DEFAULT_THREADS,
                       .progress = 1};
    const char *json_path = NULL;
    int c;
    long v = 0;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
        switch (c) {
        case OPT_JSON: json_path = optarg; break;
        case OPT_TIMEOUT: {
            char *end;
            errno = 0;
            double t = strtod(optarg, &end);
            if (!*optarg || *end || errno || !(t >= 0.1 && t <= 86400))
                return usage_error("--timeout=%s: expected seconds from 0.1 to 86400", optarg);
            o.timeout_s = t;
            break;
        }
        case OPT_SEED:
            if (parse_count("--seed", optarg, 0, LONG_MAX, &v)) return 2;
            o.seed = (uint64_t)v;
            break;
        case OPT_MUTATIONS:
            if (parse_count("--mutations", optarg, 0, 1000000, &v)) return 2;
            o.mutations = (int)v;
            break;
        case OPT_THREADS:
            if (parse_count("--threads", optarg, 1, 256, &v)) return 2;
            o.threads = (int)v;
            break;
        case OPT_ONLY: o.only = optarg; break;
        case OPT_QUIET: o.progress = 0; break;
        case 'h':
        case OPT_HELP: return help();
        default: return option_error(c, argv, longopts);
        }
    }
    if (optind >= argc) return usage_error("expected one PLUGIN (a path to a .so, or a plugin name)");
    if (optind + 1 < argc) return usage_error("unexpected argument '%s'", argv[optind + 1]);
    if (o.only) {
        /* every id one of the checks */
        for (const char *p = o.only;;) {
            size_t l = strcspn(p, ","), i = 0;
            while (ql_check_id(i) && (strlen(ql_check_id(i)) != l || strncmp(ql_check_id(i), p, l))) i++;
            if (!ql_check_id(i))
                return usage_error("--only=%s: unknown check '%.*s'", o.only, (int)l, p);
            if (!p[l]) break;
            p += l + 1;
        }
    }
    ql_check_report r;
    int rc = ql_check_plugin(argv[optind], &o, &r);
    if (rc) {
        fprintf(stderr, "qlora: error: %s\n", ql_error_message());
        ql_check_report_free(&r);
        return 1;
    }
    print_report(&r);
    if (json_path) {
        char *text = ql_check_report_json(&r);
        rc = text ? ql_write_file_atomic(json_path, text, strlen(text)) : ql_error(QL_ENOMEM, "out of memory");
        free(text);
        if (rc) {
            fprintf(stderr, "qlora: error: %s\n", ql_error_message());
            ql_check_report_free(&r);
            return 1;
        }
    }
    int failed = r.failed;
    ql_check_report_free(&r);
    return failed ? 1 : 0;
}
