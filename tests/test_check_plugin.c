/* qlora check-plugin, run as a separate process: every shipped plugin and
 * the out-of-tree example pass; tests/broken_plugin.c, with each of its
 * defects ($QLORA_BROKEN), fails the check that should catch it, with the
 * right reason, while the other checks still run. */
#include <check.h>
#include <dirent.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qlora/qlora.h"
#include "testutil.h"

static const char *const all_checks[] = {"load",     "slots",       "unknown-option", "bad-value", "describe",
                                         "quantize", "non-finite",  "determinism",    "save-load", "bits-per-param",
                                         "bf16",     "tamper",      "mutations",      "threads",   "leaks",
                                         "matmul",   "calibration", "cuda"};
enum { NCHECKS = sizeof all_checks / sizeof all_checks[0] };

typedef struct run {
    int status;
    char *out, *err;
    json_t *report; /* the --json file */
} run;

static void run_free(run *r)
{
    free(r->out);
    free(r->err);
    json_decref(r->report);
}

/* `[ENV] qlora check-plugin --quiet --json FILE ARGS` */
static run check_plugin(const char *env, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static run check_plugin(const char *env, const char *fmt, ...)
{
    char args[4096], cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    ck_assert_int_lt(n, (int)sizeof args);
    char *json = ql_path_join(tu_tmpdir(), "report.json");
    n = snprintf(cmd, sizeof cmd, "%s timeout -k 5 280 '%s' check-plugin --quiet --json '%s' %s", env ? env : "",
                 tu_env("QLORA_BIN"), json, args);
    ck_assert_int_lt(n, (int)sizeof cmd);
    run r = {0};
    r.status = tu_run(cmd, &r.out, &r.err);
    json_error_t e;
    r.report = json_load_file(json, 0, &e);
    free(json);
    return r;
}

static json_t *find_check(const run *r, const char *id)
{
    ck_assert_msg(r->report != NULL, "no JSON report; stdout:\n%s\nstderr:\n%s", r->out, r->err);
    json_t *checks = json_object_get(r->report, "checks");
    size_t i;
    json_t *c;
    json_array_foreach(checks, i, c) if (!strcmp(json_string_value(json_object_get(c, "id")), id)) return c;
    ck_abort_msg("no check '%s' in the report:\n%s", id, r->out);
    return NULL;
}

static const char *status_of(const run *r, const char *id)
{
    return json_string_value(json_object_get(find_check(r, id), "status"));
}

static const char *reason_of(const run *r, const char *id)
{
    return json_string_value(json_object_get(find_check(r, id), "reason"));
}

static void assert_status(const run *r, const char *id, const char *want)
{
    ck_assert_msg(!strcmp(status_of(r, id), want), "check %s is %s, not %s: %s\n%s", id, status_of(r, id), want,
                  reason_of(r, id), r->out);
}

/* The cuda check passes where it can run (a CUDA build, a GPU, the
 * plugin's device slots: the gpu suite's machine) and says why it cannot
 * elsewhere. 1 when it ran. */
static int assert_cuda_ran_or_could_not(const run *r)
{
    if (!strcmp(status_of(r, "cuda"), "PASS")) return 1;
    assert_status(r, "cuda", "SKIP");
    const char *why = reason_of(r, "cuda");
    ck_assert_msg(tu_contains(why, "no device slots") || tu_contains(why, "built without CUDA") ||
                      tu_contains(why, "no CUDA device"),
                  "cuda skipped for another reason: %s", why);
    return 0;
}

/* ---- the shipped plugins and the example pass ---- */

static const struct {
    const char *spec; /* NULL: the example plugin by path */
    const char *skips; /* the checks that SKIP here (no GPU: cuda always) */
    const char *quantize_says;
} shipped[] = {
    {"nf4", "matmul,calibration,cuda", "worst relative error: gaussian 0.0"},
    {"nf4:double_quant=0,blocksize=128", "matmul,calibration,cuda", "42 matrices"},
    {"fp4", "matmul,calibration,cuda", "42 matrices"},
    /* LLM.int8 quantizes through float16: a 1e30 weight is refused, with the reason */
    {"int8", "bad-value,matmul,calibration,cuda", "huge refused with: check.huge.1x1: "},
    {"optq", "matmul,cuda", "huge refused with: optq: check.huge.1x1: a scale of "},
    {"optq:bits=3,groupsize=32,sym=1", "matmul,cuda", "materialized, all finite"},
    {"optq:bits=2,rtn=1", "matmul,cuda", "materialized, all finite"},
    /* act_order: a load without g_idx must be refused (tamper) */
    {"optq:bits=4,groupsize=32,act_order=1", "matmul,cuda", "materialized, all finite"},
    {NULL, "calibration,cuda", "42 matrices"},
};

static int in_list(const char *list, const char *id)
{
    size_t n = strlen(id);
    for (const char *p = list; *p; p += strcspn(p, ",") + (p[strcspn(p, ",")] == ',')) {
        if (strcspn(p, ",") == n && !strncmp(p, id, n)) return 1;
    }
    return 0;
}

START_TEST(shipped_plugins_pass)
{
    char spec[1024];
    if (shipped[_i].spec) snprintf(spec, sizeof spec, "%s", shipped[_i].spec);
    else snprintf(spec, sizeof spec, "%s:group_size=64", tu_env("QLORA_EXAMPLE_PLUGIN"));
    run r = check_plugin(NULL, "'%s'", spec);
    ck_assert_msg(r.status == 0, "%s: exit %d\n%s%s", spec, r.status, r.out, r.err);
    ck_assert_msg(json_is_true(json_object_get(r.report, "ok")), "%s", r.out);
    ck_assert_int_eq(json_array_size(json_object_get(r.report, "checks")), NCHECKS);
    for (size_t k = 0; k < NCHECKS; k++)
        if (strcmp(all_checks[k], "cuda"))
            assert_status(&r, all_checks[k], in_list(shipped[_i].skips, all_checks[k]) ? "SKIP" : "PASS");
    assert_cuda_ran_or_could_not(&r);
    ck_assert_contains(reason_of(&r, "quantize"), shipped[_i].quantize_says);
    /* each matrix's reconstruction error, in the JSON report: gaussian 64 x 128 is lossy, but not by much (2-bit RTN: 0.50) */
    json_t *details = json_object_get(find_check(&r, "quantize"), "details");
    ck_assert_int_ge(json_array_size(details), 35);
    json_t *g = json_array_get(details, 6);
    ck_assert_str_eq(json_string_value(json_object_get(g, "matrix")), "gaussian");
    ck_assert_int_eq(json_integer_value(json_object_get(g, "rows")), 64);
    double e = json_real_value(json_object_get(g, "rel_error"));
    ck_assert_msg(e > 1e-4 && e < 0.8, "%s: gaussian 64x128 relative error %g", spec, e);
    ck_assert_int_eq(json_integer_value(json_object_get(r.report, "failed")), 0);
    ck_assert_str_eq(json_string_value(json_object_get(r.report, "abi")), "1.3");
    /* the data-aware plugin is calibrated before every quantize; rtn=1 needs none */
    int needs = shipped[_i].spec && !strncmp(spec, "optq", 4) && !strstr(spec, "rtn=1");
    ck_assert_int_eq(tu_contains(reason_of(&r, "load"), "needs calibration"), needs);
    if (needs) ck_assert_contains(reason_of(&r, "non-finite"), "quantize_calibrated, calib_feed");
    /* the table on stdout: a line a check, then the counts */
    ck_assert_contains(r.out, "\nquantize        PASS   ");
    char counts[96];
    snprintf(counts, sizeof counts, "\n%d checks: %d passed, 0 failed, %d skipped\n", NCHECKS,
             (int)json_integer_value(json_object_get(r.report, "passed")),
             (int)json_integer_value(json_object_get(r.report, "skipped")));
    ck_assert_contains(r.out, counts);
    run_free(&r);
}
END_TEST

/* ---- the broken plugin: each defect caught by its check ---- */

static char *broken(void) { return ql_path_join(tu_env("QLORA_TEST_PLUGINS"), "qlora_broken.so"); }

START_TEST(broken_plugin_without_defect_passes)
{
    char *so = broken();
    run r = check_plugin("env -u QLORA_BROKEN", "'%s'", so);
    ck_assert_msg(r.status == 0, "exit %d\n%s%s", r.status, r.out, r.err);
    for (size_t k = 0; k < NCHECKS; k++)
        if (strcmp(all_checks[k], "cuda"))
            assert_status(&r, all_checks[k], in_list("matmul,calibration", all_checks[k]) ? "SKIP" : "PASS");
    assert_cuda_ran_or_could_not(&r);
    run_free(&r);
    free(so);
}
END_TEST

static const struct {
    const char *defect, *check, *reason, *args;
} defects[] = {
    {"nondeterministic", "determinism",
     "two quantizes of the same check.gaussian.64x172 saved different tensors: 'broken.scale' differs at byte", ""},
    {"threadcount", "determinism",
     "a quantize offered one thread and one offered 4 of the same check.gaussian.64x172 saved different tensors", ""},
    {"lastrow", "quantize", "never written", ""},
    {"overrun", "quantize", "materialize(F32) of check.gaussian.1x1 wrote outside its 1-element output", ""},
    {"truncated", "tamper",
     "crashed in load() of tensor 'weight' one byte short (I8 [9, 172], 1547 bytes): killed by signal SIGSEGV", ""},
    {"shape", "save-load", "load() took the tensors of check.gaussian.3x5 for a 4 x 5 matrix", ""},
    {"notfound", "save-load", "load() from no tensors returned EFORMAT, not QL_ENOTFOUND", ""},
    {"describe", "describe", "describe() wrote 'clip=0.5'; create() of that describes itself as 'clip=0.25'", ""},
    {"nan", "non-finite", "quantize() accepted a NaN at index 47", ""},
    {"unknownkey", "unknown-option", "create() accepted the unknown option 'ql_check_no_such_option=1'", ""},
    {"badmsg", "bad-value", "create() refused clip='', but its message does not name the key: bad value ''", ""},
    {"bits", "bits-per-param", "bits_per_param(64, 172) is 4.0000, 5504 bytes, but save() wrote 11264", ""},
    {"bf16", "bf16", "rounds (to nearest even) to 0x", ""},
    {"race", "threads", "differs from the one-thread result at element", ""},
    {"crash", "quantize", "crashed in materialize(F32) of check.gaussian.1x1: killed by signal SIGSEGV", ""},
    {"exit", "quantize", "the process exited with status 3 in materialize(F32) of check.gaussian.1x1", ""},
    {"hang", "quantize", "no answer after 2 s, in materialize(F32) of check.gaussian.1x1; stopped it (a hang)",
     "--timeout 2 --only quantize"},
    {"nullfree", "slots", "crashed in free_state(q, NULL): killed by signal SIGSEGV", ""},
    {"borrow", "save-load",
     "crashed in materialize(F32) of the loaded state (the tensors it was loaded from are unmapped): killed by signal "
     "SIGSEGV",
     ""},
    {"borroww", "quantize", "crashed in materialize(F32) of check.gaussian.1x1: killed by signal SIGSEGV", ""},
    /* (glibc's counts; in the sanitizer build, LeakSanitizer's report) */
    {"leak", "leaks", "a leak", ""},
    {"prints", "quantize",
     "bytes to stdout during the check, beginning 'broken: materializing 1 x 1 broken: materializing 1 x 63 ", ""},
    /* the device slots exist in a CUDA build of the plugin, and run on a GPU */
    {"rowrange", "cuda", "of check.gaussian.33x257 rows 11.. (ld 260): row 11 column 0 differs from materialize()",
     "--only cuda"},
};

START_TEST(broken_plugin_defect_is_caught)
{
    char *so = broken(), env[96];
    /* four threads offered however many cores there are, so that one thread is fewer */
    snprintf(env, sizeof env, "OMP_NUM_THREADS=4 QLORA_BROKEN=%s", defects[_i].defect);
    run r = check_plugin(env, "%s '%s'", defects[_i].args, so);
    if (!strcmp(defects[_i].check, "cuda") && strcmp(status_of(&r, "cuda"), "FAIL")) {
        /* no GPU, or no CUDA build: the check says so (and the gpu machine runs it) */
        ck_assert_int_eq(r.status, 0);
        ck_assert_int_eq(assert_cuda_ran_or_could_not(&r), 0);
        run_free(&r);
        free(so);
        return;
    }
    ck_assert_msg(r.status == 1, "%s: exit %d, not 1\n%s%s", defects[_i].defect, r.status, r.out, r.err);
    ck_assert(json_is_false(json_object_get(r.report, "ok")));
    assert_status(&r, defects[_i].check, "FAIL");
    ck_assert_contains(reason_of(&r, defects[_i].check), defects[_i].reason);
    /* the checker itself survived: later checks ran, and those the defect
     * does not touch pass */
    assert_status(&r, "load", "PASS");
    if (strcmp(defects[_i].defect, "unknownkey") && !defects[_i].args[0]) {
        assert_status(&r, "unknown-option", "PASS");
        ck_assert_str_ne(status_of(&r, "threads"), "SKIP");
    }
    if (!strcmp(defects[_i].defect, "crash")) assert_status(&r, "describe", "PASS");
    if (!strcmp(defects[_i].defect, "hang")) assert_status(&r, "describe", "SKIP");
    char line[64];
    snprintf(line, sizeof line, "\n%-15s FAIL   ", defects[_i].check);
    ck_assert_contains(r.out, line);
    run_free(&r);
    free(so);
}
END_TEST

/* A plugin that crashes or hangs while loading fails the load check; the
 * rest are skipped. */
START_TEST(load_failures)
{
    static const struct {
        const char *file, *args, *reason;
    } cases[] = {
        {"qlora_bad_crashinit.so", "", "crashed in dlopen(), init() and create() (loading the plugin): killed by signal SIGSEGV"},
        {"qlora_bad_hanginit.so", "--timeout 2", "no answer after 2 s, in dlopen(), init() and create()"},
        {"qlora_bad_major.so", "", "abi_major is"},
        {"qlora_calib_partial.so", "", "calibration slot 'quantize_calibrated' is NULL"},
        {"no_such_plugin.so", "", "does not exist"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *so = ql_path_join(tu_env("QLORA_TEST_PLUGINS"), cases[i].file);
        run r = check_plugin(NULL, "%s '%s'", cases[i].args, so);
        ck_assert_msg(r.status == 1, "%s: exit %d\n%s%s", cases[i].file, r.status, r.out, r.err);
        assert_status(&r, "load", "FAIL");
        ck_assert_contains(reason_of(&r, "load"), cases[i].reason);
        assert_status(&r, "quantize", "SKIP");
        ck_assert_str_eq(reason_of(&r, "quantize"), "the plugin does not load (see the load check)");
        ck_assert_int_eq(json_integer_value(json_object_get(r.report, "failed")), 1);
        ck_assert(json_is_null(json_object_get(r.report, "name")));
        run_free(&r);
        free(so);
    }
    /* by name: an unknown one, and options that create() refuses */
    run r = check_plugin(NULL, "no_such_quantizer");
    ck_assert_int_eq(r.status, 1);
    ck_assert_contains(reason_of(&r, "load"), "unknown quantizer 'no_such_quantizer'");
    run_free(&r);
    r = check_plugin(NULL, "nf4:blocksize=7");
    ck_assert_int_eq(r.status, 1);
    ck_assert_contains(reason_of(&r, "load"), "blocksize=7");
    run_free(&r);
}
END_TEST

/* --only, --seed, --mutations and --threads reach the checks */
START_TEST(flags_reach_the_checks)
{
    char *so = broken();
    run r = check_plugin("env -u QLORA_BROKEN", "--only mutations,threads --seed 7 --mutations 25 --threads 3 '%s'", so);
    ck_assert_msg(r.status == 0, "exit %d\n%s%s", r.status, r.out, r.err);
    ck_assert_contains(reason_of(&r, "mutations"), "25 seeded mutations (seed 7)");
    ck_assert_contains(reason_of(&r, "threads"), "3 threads materialized");
    assert_status(&r, "load", "PASS");
    assert_status(&r, "quantize", "SKIP");
    ck_assert_str_eq(reason_of(&r, "quantize"), "not in --only");
    ck_assert_int_eq(json_integer_value(json_object_get(r.report, "passed")), 3);
    json_t *how = json_object_get(r.report, "run");
    ck_assert_int_eq(json_integer_value(json_object_get(how, "seed")), 7);
    ck_assert_int_eq(json_integer_value(json_object_get(how, "mutations")), 25);
    ck_assert_int_eq(json_integer_value(json_object_get(how, "threads")), 3);
    ck_assert_str_eq(json_string_value(json_object_get(how, "only")), "mutations,threads");
    run_free(&r);
    /* the loop is the seed's: run again, the same counts */
    r = check_plugin("env -u QLORA_BROKEN", "--only mutations --seed 7 --mutations 25 '%s'", so);
    char *first = strdup(reason_of(&r, "mutations"));
    run_free(&r);
    r = check_plugin("env -u QLORA_BROKEN", "--only mutations --seed 7 --mutations 25 '%s'", so);
    ck_assert_str_eq(reason_of(&r, "mutations"), first);
    run_free(&r);
    free(first);
    free(so);
}
END_TEST

/* the report file is written whole and replaces an older one; a folder
 * that does not exist is an error */
START_TEST(json_report_file)
{
    char *dir = strdup(tu_tmpdir()), *path = ql_path_join(dir, "r.json"), cmd[8192];
    ck_assert_int_eq(ql_write_file_atomic(path, "old", 3), QL_OK);
    snprintf(cmd, sizeof cmd, "'%s' check-plugin --quiet --only describe --json '%s' nf4", tu_env("QLORA_BIN"), path);
    char *out, *err;
    ck_assert_int_eq(tu_run(cmd, &out, &err), 0);
    json_error_t e;
    json_t *j = json_load_file(path, 0, &e);
    ck_assert_msg(j != NULL, "%s", e.text);
    ck_assert_str_eq(json_string_value(json_object_get(j, "name")), "nf4");
    ck_assert_str_eq(json_string_value(json_object_get(j, "options")), "blocksize=64,double_quant=1");
    json_decref(j);
    DIR *d = opendir(dir);
    struct dirent *de;
    int files = 0;
    while ((de = readdir(d)))
        if (de->d_name[0] != '.') files++;
    closedir(d);
    ck_assert_int_eq(files, 1); /* no temporary file left beside it */
    free(out), free(err);
    snprintf(cmd, sizeof cmd, "'%s' check-plugin --quiet --only describe --json '%s/no/such/dir/r.json' nf4",
             tu_env("QLORA_BIN"), dir);
    ck_assert_int_eq(tu_run(cmd, &out, &err), 1);
    ck_assert_contains(err, "qlora: error: ");
    free(out), free(err);
    free(path);
    free(dir);
}
END_TEST

static void usage_error(const char *args, const char *want)
{
    char cmd[4096], *out, *err;
    snprintf(cmd, sizeof cmd, "'%s' check-plugin %s", tu_env("QLORA_BIN"), args);
    int st = tu_run(cmd, &out, &err);
    ck_assert_msg(st == 2, "%s: exit %d: %s", args, st, err);
    ck_assert_str_eq(err, want);
    ck_assert_str_eq(out, "");
    free(out), free(err);
}

START_TEST(usage_errors)
{
    usage_error("", "qlora: check-plugin: expected one PLUGIN (a path to a .so, or a plugin name) (see 'qlora "
                    "check-plugin --help')\n");
    usage_error("nf4 fp4", "qlora: check-plugin: unexpected argument 'fp4' (see 'qlora check-plugin --help')\n");
    usage_error("--only quantize,nope nf4",
                "qlora: check-plugin: --only=quantize,nope: unknown check 'nope' (see 'qlora check-plugin --help')\n");
    usage_error("--timeout 0 nf4",
                "qlora: check-plugin: --timeout=0: expected seconds from 0.1 to 86400 (see 'qlora check-plugin --help')\n");
    usage_error("--threads 0 nf4",
                "qlora: check-plugin: --threads=0: expected an integer from 1 to 256 (see 'qlora check-plugin --help')\n");
    usage_error("--mutations x nf4", "qlora: check-plugin: --mutations=x: expected an integer from 0 to 1000000 (see "
                                     "'qlora check-plugin --help')\n");
    /* the help names every check */
    char cmd[4096], *out, *err;
    snprintf(cmd, sizeof cmd, "'%s' check-plugin --help", tu_env("QLORA_BIN"));
    ck_assert_int_eq(tu_run(cmd, &out, &err), 0);
    for (size_t k = 0; k < NCHECKS; k++) {
        char line[64];
        snprintf(line, sizeof line, "\n  %-15s ", all_checks[k]);
        ck_assert_contains(out, line);
    }
    free(out), free(err);
}
END_TEST

Suite *check_plugin_suite(void)
{
    Suite *s = suite_create("check_plugin");
    TCase *t = tcase_create("plugins");
    tcase_set_timeout(t, 300);
    tcase_add_loop_test(t, shipped_plugins_pass, 0, sizeof shipped / sizeof shipped[0]);
    tcase_add_test(t, broken_plugin_without_defect_passes);
    tcase_add_loop_test(t, broken_plugin_defect_is_caught, 0, sizeof defects / sizeof defects[0]);
    tcase_add_test(t, load_failures);
    suite_add_tcase(s, t);
    t = tcase_create("cli");
    tcase_set_timeout(t, 120);
    tcase_add_test(t, flags_reach_the_checks);
    tcase_add_test(t, json_report_file);
    tcase_add_test(t, usage_errors);
    suite_add_tcase(s, t);
    return s;
}

int main(void)
{
    SRunner *r = srunner_create(check_plugin_suite());
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
