/* Data parallel on the CPU (core/dist.c, qlora launch): the host
 * communicator's sums across forked ranks, its failures (a rank that never
 * joins, one that dies, bad environment values), and `qlora launch --nproc 2
 * train` against one `qlora train` of the same global batch. */
#include <check.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "dist.h"
#include "qlora/error.h"
#include "qlora/fs.h"
#include "qlora/safetensors.h"
#include "testutil.h"

static void fmt(char *buf, size_t cap, const char *f, ...) __attribute__((format(printf, 3, 4)));
static void fmt(char *buf, size_t cap, const char *f, ...)
{
    va_list ap;
    va_start(ap, f);
    int n = vsnprintf(buf, cap, f, ap);
    va_end(ap);
    ck_assert_msg(n >= 0 && (size_t)n < cap, "%zu bytes are too few for \"%s\"", cap, f);
}

/* a TCP port of 127.0.0.1 free now */
static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    ck_assert(fd >= 0 && !bind(fd, (struct sockaddr *)&a, sizeof a) && !getsockname(fd, (struct sockaddr *)&a, &len));
    close(fd);
    return ntohs(a.sin_port);
}

static void set_world(int world, int rank, int port)
{
    char w[16], r[16], p[16];
    fmt(w, sizeof w, "%d", world);
    fmt(r, sizeof r, "%d", rank);
    fmt(p, sizeof p, "%d", port);
    setenv("WORLD_SIZE", w, 1);
    setenv("RANK", r, 1);
    setenv("MASTER_ADDR", "127.0.0.1", 1);
    setenv("MASTER_PORT", p, 1);
}

static void clear_world(void)
{
    unsetenv("WORLD_SIZE");
    unsetenv("RANK");
    unsetenv("LOCAL_RANK");
    unsetenv("MASTER_ADDR");
    unsetenv("MASTER_PORT");
    unsetenv("QLORA_DIST_TIMEOUT");
}

enum { N = 1000, WORLD = 3 };

/* rank r's values: of every sign and size, so that the order of the sum shows in the bits */
static void values(int r, float *x, double *y)
{
    tu_randn(x, N, 50 + (uint64_t)r, 1.0f);
    for (int i = 0; i < N; i++) {
        x[i] *= (float)(1 << (i % 20));
        y[i] = (double)x[i] / 3.0 + r;
    }
}

/* Three ranks (forked processes): each gets the same sum, bit for bit,
 * and it is rank order's ((x0 + x1) + x2), in float32 and in double. */
START_TEST(sums_are_the_same_on_every_rank)
{
    const int port = free_port();
    char path[WORLD][4096];
    pid_t pid[WORLD];
    for (int r = 0; r < WORLD; r++) {
        fmt(path[r], sizeof path[r], "%s/sum%d.bin", tu_tmpdir(), r);
        pid[r] = fork();
        ck_assert(pid[r] >= 0);
        if (pid[r] == 0) {
            set_world(WORLD, r, port);
            ql_dist *d = NULL;
            float x[N];
            double y[N];
            values(r, x, y);
            if (ql_dist_from_env(&d) || ql_dist_world(d) != WORLD || ql_dist_rank(d) != r ||
                ql_dist_sum_f32(d, x, N) || ql_dist_sum_f64(d, y, N)) {
                fprintf(stderr, "rank %d: %s\n", r, ql_error_message());
                _exit(1);
            }
            FILE *f = fopen(path[r], "wb");
            if (!f || fwrite(x, sizeof x, 1, f) != 1 || fwrite(y, sizeof y, 1, f) != 1 || fclose(f)) _exit(2);
            ql_dist_close(d);
            _exit(0);
        }
    }
    for (int r = 0; r < WORLD; r++) {
        int st;
        ck_assert_int_eq(waitpid(pid[r], &st, 0), pid[r]);
        ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "rank %d failed", r);
    }
    float want[N], x[N];
    double wanty[N], y[N];
    values(0, want, wanty);
    for (int r = 1; r < WORLD; r++) {
        values(r, x, y);
        for (int i = 0; i < N; i++) want[i] += x[i], wanty[i] += y[i];
    }
    for (int r = 0; r < WORLD; r++) {
        FILE *f = fopen(path[r], "rb");
        ck_assert(f && fread(x, sizeof x, 1, f) == 1 && fread(y, sizeof y, 1, f) == 1);
        fclose(f);
        ck_assert_msg(!memcmp(x, want, sizeof x), "rank %d: float32 sum differs from ((x0 + x1) + x2)", r);
        ck_assert_msg(!memcmp(y, wanty, sizeof y), "rank %d: double sum differs", r);
    }
}
END_TEST

/* A rank that never comes fails rank 0 after QLORA_DIST_TIMEOUT; one that
 * joins and dies fails it at once, naming it. */
START_TEST(a_missing_or_dead_rank_fails_the_others)
{
    int port = free_port();
    set_world(2, 0, port);
    setenv("QLORA_DIST_TIMEOUT", "1", 1);
    ql_dist *d = NULL;
    ck_assert_int_eq(ql_dist_from_env(&d), QL_EIO);
    ck_assert_contains(ql_error_message(), "1 of 2 ranks joined rank 0");
    ck_assert_ptr_null(d);
    port = free_port();
    pid_t p = fork();
    if (p == 0) { /* rank 1: joins, then dies without summing */
        set_world(2, 1, port);
        ql_dist *c = NULL;
        _exit(ql_dist_from_env(&c) == QL_OK ? 0 : 1);
    }
    set_world(2, 0, port);
    setenv("QLORA_DIST_TIMEOUT", "60", 1);
    ck_assert_msg(ql_dist_from_env(&d) == QL_OK, "%s", ql_error_message());
    int st;
    ck_assert_int_eq(waitpid(p, &st, 0), p);
    ck_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    float x[4] = {1, 2, 3, 4};
    ck_assert_int_eq(ql_dist_sum_f32(d, x, 4), QL_EIO);
    ck_assert_contains(ql_error_message(), "rank 1 closed its connection");
    ql_dist_close(d);
    clear_world();
}
END_TEST

START_TEST(bad_environment_is_refused)
{
    ql_dist *d = (ql_dist *)1;
    clear_world();
    ck_assert_int_eq(ql_dist_from_env(&d), QL_OK); /* a world of one */
    ck_assert_ptr_null(d);
    ck_assert_int_eq(ql_dist_world(d), 1);
    ck_assert_int_eq(ql_dist_rank(d), 0);
    setenv("WORLD_SIZE", "1", 1);
    ck_assert_int_eq(ql_dist_from_env(&d), QL_OK);
    ck_assert_ptr_null(d);
    static const struct {
        const char *world, *rank, *port, *msg;
    } cs[] = {
        {"two", "0", "29500", "WORLD_SIZE=two: expected an integer from 1 to 4096"},
        {"0", "0", "29500", "WORLD_SIZE=0"},
        {"2", NULL, "29500", "WORLD_SIZE=2 without RANK"},
        {"2", "2", "29500", "RANK=2: expected an integer from 0 to 1"},
        {"2", "-1", "29500", "RANK=-1"},
        {"2", "1", "70000", "MASTER_PORT=70000: expected an integer from 1 to 65535"},
    };
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++) {
        clear_world();
        setenv("WORLD_SIZE", cs[i].world, 1);
        if (cs[i].rank) setenv("RANK", cs[i].rank, 1);
        setenv("MASTER_PORT", cs[i].port, 1);
        ck_assert_int_eq(ql_dist_from_env(&d), QL_EINVAL);
        ck_assert_contains(ql_error_message(), cs[i].msg);
    }
    clear_world();
}
END_TEST

/* ---- qlora launch ---- */

static int qlora(char **out, char **err, const char *args)
{
    char cmd[8192];
    fmt(cmd, sizeof cmd, "timeout -k 5 600 '%s' %s", tu_env("QLORA_BIN"), args);
    return tu_run(cmd, out, err);
}

/* the metrics rows with a "loss" of a run folder */
static json_t *train_rows(const char *run)
{
    char path[4096];
    fmt(path, sizeof path, "%s/metrics.jsonl", run);
    FILE *f = fopen(path, "r");
    ck_assert_msg(f != NULL, "no %s", path);
    json_t *rows = json_array();
    char line[8192];
    while (fgets(line, sizeof line, f)) {
        json_t *j = json_loads(line, 0, NULL);
        if (j && json_object_get(j, "loss")) json_array_append(rows, j);
        json_decref(j);
    }
    fclose(f);
    return rows;
}

static double max_rel(const float *a, const float *b, size_t n)
{
    double worst = 0, scale = 0;
    for (size_t i = 0; i < n; i++) scale = fmax(scale, fabs((double)b[i]));
    for (size_t i = 0; i < n; i++) worst = fmax(worst, fabs((double)a[i] - (double)b[i]));
    return scale > 0 ? worst / scale : worst;
}

/* Two ranks of one micro-batch of 2 each against one process of two
 * micro-batches of 2 (the same 4 examples a step, in the same order): the
 * same losses, gradient norms and adapter up to the order of the gradient
 * sum (observed: losses within 4e-7 relative, the adapter within 5.7e-5 of
 * each tensor's largest value),
 * the same files in the run folder, and rank 1 writes none.  Then the
 * two-rank run resumed by one process of grad_accum 2. */
START_TEST(launch_two_ranks_as_one_process)
{
    const char *shared = tu_env("QLORA_SHARED");
    char one[4096], two[4096], args[8192], common[4096];
    const char *tmp = tu_tmpdir();
    fmt(one, sizeof one, "%s/one", tmp);
    fmt(two, sizeof two, "%s/two", tmp);
    fmt(common, sizeof common,
             "--model '%s/models/stories260K' --data '%s/data/alpaca/alpaca_en_demo.json' --device cpu --steps 4 "
             "--batch-size 2 --save-steps 2 --lora-r 8 --quiet",
             shared, shared);
    char *out, *err;
    fmt(args, sizeof args, "train %s --grad-accum 2 --output '%s'", common, one);
    int st = qlora(&out, &err, args);
    ck_assert_msg(st == 0, "train: %s", err);
    free(out), free(err);
    fmt(args, sizeof args, "launch --nproc 2 train %s --grad-accum 1 --output '%s'", common, two);
    st = qlora(&out, &err, args);
    ck_assert_msg(st == 0, "launch: %s", err);
    ck_assert_contains(err, "\"world_size\": 2");
    /* rank 0 alone reports: one "wrote" line, one data line */
    const char *w = strstr(err, "wrote ");
    ck_assert_msg(w && !strstr(w + 1, "wrote "), "not exactly one 'wrote' line:\n%s", err);
    free(out), free(err);
    json_t *a = train_rows(one), *b = train_rows(two);
    ck_assert_int_eq(json_array_size(a), 4);
    ck_assert_int_eq(json_array_size(b), 4);
    for (size_t i = 0; i < 4; i++) {
        const char *keys[] = {"loss", "grad_norm"};
        for (int k = 0; k < 2; k++) {
            double x = json_real_value(json_object_get(json_array_get(a, i), keys[k]));
            double y = json_real_value(json_object_get(json_array_get(b, i), keys[k]));
            ck_assert_msg(fabs(x - y) <= 1e-6 * fabs(x), "step %zu %s: %.10g one process, %.10g two ranks", i + 1,
                          keys[k], x, y);
        }
        ck_assert_int_eq(json_integer_value(json_object_get(json_array_get(a, i), "tokens")),
                         json_integer_value(json_object_get(json_array_get(b, i), "tokens")));
    }
    json_decref(a), json_decref(b);
    /* the adapters */
    char pa[4096], pb[4096];
    fmt(pa, sizeof pa, "%s/adapter_model.safetensors", one);
    fmt(pb, sizeof pb, "%s/adapter_model.safetensors", two);
    ql_st_file *fa = NULL, *fb = NULL;
    ck_assert_int_eq(ql_st_open(pa, &fa), QL_OK);
    ck_assert_int_eq(ql_st_open(pb, &fb), QL_OK);
    ck_assert_int_eq(ql_st_count(fa), ql_st_count(fb));
    double worst = 0;
    for (size_t i = 0; i < ql_st_count(fa); i++) {
        const ql_tensor *ta = ql_st_at(fa, i), *tb = ql_st_find(fb, ta->name);
        ck_assert_msg(tb != NULL, "%s missing from the two-rank adapter", ta->name);
        ck_assert_int_eq(ta->dtype, QL_DTYPE_F32);
        ck_assert_int_eq(tb->dtype, QL_DTYPE_F32);
        ck_assert_int_eq(ta->nbytes, tb->nbytes);
        worst = fmax(worst, max_rel(tb->data, ta->data, ta->nbytes / sizeof(float)));
    }
    /* AdamW divides by the root of the second moment: where a gradient is
     * near zero, its last bits move the update (observed 5.7e-5) */
    ck_assert_msg(worst <= 5e-4, "adapters differ by %.3g relative", worst);
    printf("launch --nproc 2 against one process: adapters within %.2g relative\n", worst);
    ql_st_close(fa), ql_st_close(fb);
    /* the same files */
    fmt(args, sizeof args, "cd '%s' && find . | sort > ../one.txt && cd '%s' && find . | sort > ../two.txt && "
                           "diff ../one.txt ../two.txt", one, two);
    char *diff = NULL;
    st = tu_run(args, &out, &diff);
    ck_assert_msg(st == 0, "the run folders hold other files (exit %d):\n%s%s", st, out, diff);
    free(out), free(diff);
    /* the two-rank run resumed by one process at step 2 (grad_accum 2 x 1 =
     * 1 x 2): steps 3 and 4 and the adapter as the one-process run's */
    char three[4096];
    fmt(three, sizeof three, "%s/three", tmp);
    fmt(args, sizeof args, "cp -r '%s' '%s' && rm -rf '%s/checkpoint-4' '%s/adapter_model.safetensors'", two, three, three,
        three);
    ck_assert_int_eq(system(args), 0);
    fmt(args, sizeof args, "train %s --grad-accum 2 --resume '%s/checkpoint-2'", common, three);
    st = qlora(&out, &err, args);
    ck_assert_msg(st == 0, "resume with one process: %s", err);
    free(out), free(err);
    a = train_rows(one), b = train_rows(three);
    ck_assert_int_eq(json_array_size(b), 4);
    for (size_t i = 0; i < 4; i++) {
        double x = json_real_value(json_object_get(json_array_get(a, i), "loss"));
        double y = json_real_value(json_object_get(json_array_get(b, i), "loss"));
        ck_assert_msg(fabs(x - y) <= 1e-6 * fabs(x), "resumed, step %zu: %.10g one process, %.10g resumed", i + 1, x, y);
    }
    json_decref(a), json_decref(b);
    /* and refused when the product changes */
    fmt(args, sizeof args, "train %s --grad-accum 1 --resume '%s/checkpoint-2'", common, three);
    st = qlora(&out, &err, args);
    ck_assert_int_ne(st, 0);
    ck_assert_contains(err, "2 micro-batches a step (grad_accum 1 x world_size 2), but this run has 1 (1 x 1)");
    free(out), free(err);
}
END_TEST

/* SIGINT to the launcher (as a Ctrl-C on its terminal): passed on once to
 * every rank, all stop after the same step, rank 0 saves a checkpoint and
 * names the --resume; a launch with that --resume goes on from it. */
START_TEST(launch_interrupted_saves_and_resumes)
{
    const char *shared = tu_env("QLORA_SHARED");
    const char *tmp = tu_tmpdir();
    char run[4096], errpath[4096], metrics[4096], common[4096];
    fmt(run, sizeof run, "%s/run", tmp);
    fmt(errpath, sizeof errpath, "%s/err.txt", tmp);
    fmt(metrics, sizeof metrics, "%s/metrics.jsonl", run);
    fmt(common, sizeof common,
        "train --model %s/models/stories260K --data %s/data/alpaca/alpaca_en_demo.json --device cpu --steps 400 "
        "--batch-size 2 --grad-accum 1 --save-steps 1000 --lora-r 8 --quiet",
        shared, shared);
    char cmd[8192];
    fmt(cmd, sizeof cmd, "exec '%s' launch --nproc 2 %s --output '%s' 2>'%s'", tu_env("QLORA_BIN"), common, run, errpath);
    pid_t p = fork();
    ck_assert(p >= 0);
    if (p == 0) {
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    /* the first step's metrics row, then the signal */
    int seen = 0;
    for (int k = 0; k < 2400 && !seen; k++) {
        FILE *f = fopen(metrics, "r");
        char line[256];
        seen = f && fgets(line, sizeof line, f) != NULL;
        if (f) fclose(f);
        if (!seen) usleep(50 * 1000);
    }
    ck_assert_msg(seen, "no metrics row in 120 s");
    kill(p, SIGINT);
    int st;
    ck_assert_int_eq(waitpid(p, &st, 0), p);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 12, "launch exit %d", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    char *err = NULL;
    size_t len = 0;
    ck_assert_int_eq(ql_read_file(errpath, &err, &len), QL_OK);
    ck_assert_contains(err, "qlora: launch: interrupted (SIGINT), passed on to every rank");
    const char *r = strstr(err, "command with --resume ");
    ck_assert_msg(r != NULL, "no --resume named:\n%s", err);
    char ckpt[4096];
    ck_assert_int_eq(sscanf(r + strlen("command with --resume "), "%4095s", ckpt), 1);
    free(err);
    /* every rank stopped after the same step: one checkpoint, its step the metrics' last */
    json_t *rows = train_rows(run);
    const json_int_t last = json_integer_value(json_object_get(json_array_get(rows, json_array_size(rows) - 1), "step"));
    json_decref(rows);
    char want[4096];
    fmt(want, sizeof want, "%s/checkpoint-%lld", run, (long long)last);
    ck_assert_str_eq(ckpt, want);
    /* resumed: to step last + 2 (a shorter run: --steps is not a setting a resume must keep) */
    char *out = NULL;
    fmt(cmd, sizeof cmd, "launch --nproc 2 %s --resume '%s'", common, ckpt);
    char *sp = strstr(cmd, "--steps 400");
    ck_assert_ptr_nonnull(sp);
    char steps[32];
    fmt(steps, sizeof steps, "--steps %-3lld", (long long)last + 2);
    memcpy(sp, steps, strlen(steps));
    st = qlora(&out, &err, cmd);
    ck_assert_msg(st == 0, "resume: %s", err);
    free(out), free(err);
    rows = train_rows(run);
    ck_assert_int_eq(json_array_size(rows), last + 2);
    json_decref(rows);
}
END_TEST

/* A rank that fails stops the launch with its status, named; usage errors are 2. */
START_TEST(launch_failures_are_reported)
{
    char *out, *err;
    int st = qlora(&out, &err, "launch --nproc 2 train --model /nonexistent/model --data /nonexistent.json --output x "
                               "--device cpu");
    ck_assert_int_ne(st, 0);
    ck_assert_contains(err, "of 2 exited with status");
    ck_assert_contains(err, "the other ranks were stopped");
    free(out), free(err);
    static const struct {
        const char *args, *msg;
    } cs[] = {
        {"launch train --model m", "--nproc N is required"},
        {"launch --nproc 2", "the command to run is missing"},
        {"launch --nproc 0 train", "--nproc"},
        {"launch --nproc 2 eval --model m", "'eval' does not run data parallel"},
        {"launch --nproc 2 --bogus train", "unknown option '--bogus'"},
    };
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++) {
        st = qlora(&out, &err, cs[i].args);
        ck_assert_msg(st == 2, "%s: exit %d", cs[i].args, st);
        ck_assert_contains(err, cs[i].msg);
        free(out), free(err);
    }
}
END_TEST

Suite *dist_suite(void)
{
    Suite *s = suite_create("dist");
    TCase *tc = tcase_create("comm");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, sums_are_the_same_on_every_rank);
    tcase_add_test(tc, a_missing_or_dead_rank_fails_the_others);
    tcase_add_test(tc, bad_environment_is_refused);
    suite_add_tcase(s, tc);
    TCase *tl = tcase_create("launch");
    tcase_set_timeout(tl, 600);
    tcase_add_test(tl, launch_two_ranks_as_one_process);
    tcase_add_test(tl, launch_failures_are_reported);
    tcase_add_test(tl, launch_interrupted_saves_and_resumes);
    suite_add_tcase(s, tl);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(dist_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
