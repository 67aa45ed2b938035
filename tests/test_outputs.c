/* Output folders: what --force may replace (only an earlier qlora output of
 * the same kind, never the command's inputs, a special file or a link), the
 * one-step swap, stale temporary folders of killed runs, and write faults
 * (no space, I/O errors, failed fsyncs) injected by tests/fault_write.c. */
#include <check.h>
#include <dirent.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "qlora/qlora.h"
#include "testutil.h"

/* ---- helpers ---- */

static char *join(const char *a, const char *b)
{
    char *p = ql_path_join(a, b);
    ck_assert_ptr_nonnull(p);
    return p;
}

static char *model_dir(void) { return join(tu_env("QLORA_SHARED"), "models/stories260K"); }

/* Run `[ENV] qlora ARGS`; env is a prefix of shell assignments or "". */
static int qlora_env(char **err, const char *env, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int qlora_env(char **err, const char *env, const char *fmt, ...)
{
    char args[8192];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    ck_assert_int_lt(n, (int)sizeof args);
    char cmd[12000];
    snprintf(cmd, sizeof cmd, "OMP_NUM_THREADS=1 %s '%s' %s", env, tu_env("QLORA_BIN"), args);
    char *e = NULL;
    int st = tu_run(cmd, NULL, &e);
    if (err) *err = e;
    else free(e);
    return st;
}

/* The environment prefix that loads the write-fault shim with `settings`. */
static const char *faults(const char *settings)
{
    static char buf[4096];
    snprintf(buf, sizeof buf, "LD_PRELOAD='%s' %s", tu_env("QLORA_FAULT_WRITE"), settings);
    return buf;
}

static char *slurp(const char *path, size_t *len)
{
    char *data;
    size_t l;
    int rc = ql_read_file(path, &data, &l);
    ck_assert_msg(rc == QL_OK, "%s", ql_error_message());
    if (len) *len = l;
    return data;
}

static void spit(const char *path, const char *text)
{
    ck_assert_int_eq(ql_write_file_atomic(path, text, strlen(text)), QL_OK);
}

/* Entries of a folder, sorted, joined by spaces. */
static void list_dir(const char *dir, char *buf, size_t cap)
{
    char names[64][256];
    int n = 0;
    DIR *d = opendir(dir);
    ck_assert_msg(d != NULL, "cannot open %s", dir);
    struct dirent *e;
    while ((e = readdir(d)) && n < 64) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(names[n++], sizeof names[0], "%s", e->d_name);
    }
    closedir(d);
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
            char t[256];
            memcpy(t, names[j], sizeof t);
            memcpy(names[j], names[j - 1], sizeof t);
            memcpy(names[j - 1], t, sizeof t);
        }
    size_t k = 0;
    buf[0] = '\0';
    for (int i = 0; i < n && k < cap; i++) k += (size_t)snprintf(buf + k, cap - k, "%s%s", i ? " " : "", names[i]);
}

static void assert_dir_is(const char *dir, const char *expect)
{
    char names[8192];
    list_dir(dir, names, sizeof names);
    ck_assert_msg(!strcmp(names, expect), "%s holds \"%s\", expected \"%s\"", dir, names, expect);
}

/* A snapshot of a flat folder: every file's name and bytes. */
typedef struct snap {
    int n;
    char names[16][256];
    char *data[16];
    size_t len[16];
} snap;

static void take_snap(const char *dir, snap *s)
{
    memset(s, 0, sizeof *s);
    DIR *d = opendir(dir);
    ck_assert_msg(d != NULL, "cannot open %s", dir);
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char *p = join(dir, e->d_name);
        if (ql_is_dir(p)) { /* files only */
            free(p);
            continue;
        }
        ck_assert_int_lt(s->n, 16);
        snprintf(s->names[s->n], sizeof s->names[0], "%s", e->d_name);
        s->data[s->n] = slurp(p, &s->len[s->n]);
        free(p);
        s->n++;
    }
    closedir(d);
}

/* dir holds exactly the files of s, byte for byte. */
static void assert_snap(const char *dir, snap *s)
{
    snap now;
    take_snap(dir, &now);
    ck_assert_msg(now.n == s->n, "%s has %d files, had %d", dir, now.n, s->n);
    for (int i = 0; i < s->n; i++) {
        int found = 0;
        for (int j = 0; j < now.n; j++)
            if (!strcmp(now.names[j], s->names[i])) {
                found = 1;
                ck_assert_msg(now.len[j] == s->len[i] && !memcmp(now.data[j], s->data[i], s->len[i]),
                              "%s/%s changed (%zu bytes, had %zu)", dir, s->names[i], now.len[j], s->len[i]);
            }
        ck_assert_msg(found, "%s/%s is gone", dir, s->names[i]);
    }
    for (int j = 0; j < now.n; j++) free(now.data[j]);
}

static void free_snap(snap *s)
{
    for (int i = 0; i < s->n; i++) free(s->data[i]);
}

static void copy_dir(const char *src, const char *dst)
{
    ck_assert_int_eq(ql_mkdir_p(dst), QL_OK);
    DIR *d = opendir(src);
    ck_assert_ptr_nonnull(d);
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char *a = join(src, e->d_name), *b = join(dst, e->d_name);
        ck_assert_int_eq(ql_copy_file_atomic(a, b), QL_OK);
        free(a);
        free(b);
    }
    closedir(d);
}

/* An earlier quantized output at dest, written by qlora itself. */
static void quantize_into(const char *dest, const char *quantizer)
{
    char *model = model_dir(), *err;
    int st = qlora_env(&err, "", "quantize --quiet --quantizer=%s '%s' -o '%s'", quantizer, model, dest);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    free(err);
    free(model);
}

/* A trained adapter (a run folder) for merge, made once by main(). */
static char adapter_dir[512];

static char *train_adapter(const char *parent)
{
    (void)parent;
    ck_assert_msg(ql_is_dir(adapter_dir), "no adapter at %s", adapter_dir);
    return strdup(adapter_dir);
}

static char *train_adapter_now(const char *parent)
{
    char *data = join(parent, "d.json");
    spit(data, "[{\"instruction\": \"Tell a story.\", \"input\": \"\", \"output\": \"Once upon a time there was a cat.\"},"
               " {\"instruction\": \"Name a pet.\", \"input\": \"\", \"output\": \"A cat.\"}]");
    char *run = join(parent, "run"), *model = model_dir(), *err;
    int st = qlora_env(&err, "",
                       "train --quiet --model '%s' --data '%s' --format alpaca --lora-r 4 --batch-size 2 --steps 1 "
                       "--output '%s'",
                       model, data, run);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    free(err);
    free(model);
    free(data);
    return run;
}

static int has_temporaries(const char *dir)
{
    char names[8192];
    list_dir(dir, names, sizeof names);
    return strstr(names, "qlora-tmp") || strstr(names, "qlora-new") || strstr(names, ".tmp.") || strstr(names, ".old.");
}

static char fixtures[64];

static void make_adapter(void)
{
    snprintf(fixtures, sizeof fixtures, "%s", tu_tmpdir());
    char *run = train_adapter_now(fixtures);
    snprintf(adapter_dir, sizeof adapter_dir, "%s", run);
    free(run);
}

static void remove_adapter(void)
{
    ql_remove_tree(fixtures);
}

/* ---- --force refusals ---- */

/* Run `quantize --force -o dest` and expect a refusal naming dest and `why`. */
static void expect_quantize_refused(const char *dest, const char *why)
{
    char *model = model_dir(), *err;
    int st = qlora_env(&err, "", "quantize --quiet --force '%s' -o '%s'", model, dest);
    ck_assert_msg(st != 0, "quantize -o %s --force succeeded", dest);
    char named[1200]; /* the message names the path without a trailing slash */
    snprintf(named, sizeof named, "%s", dest);
    for (size_t n = strlen(named); n > 1 && named[n - 1] == '/'; n--) named[n - 1] = '\0';
    ck_assert_contains(err, named);
    ck_assert_contains(err, why);
    free(err);
    free(model);
}

START_TEST(test_force_refuses_special_files)
{
    char *parent = strdup(tu_tmpdir());
    /* a FIFO */
    char *fifo = join(parent, "fifo");
    ck_assert_int_eq(mkfifo(fifo, 0644), 0);
    expect_quantize_refused(fifo, "is a FIFO");
    struct stat st;
    ck_assert_int_eq(lstat(fifo, &st), 0);
    ck_assert(S_ISFIFO(st.st_mode));
    /* a socket */
    char *sock = join(parent, "sock");
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", sock);
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    expect_quantize_refused(sock, "is a socket");
    ck_assert_int_eq(lstat(sock, &st), 0);
    ck_assert(S_ISSOCK(st.st_mode));
    close(fd);
    /* a plain file */
    char *file = join(parent, "file");
    spit(file, "mine");
    expect_quantize_refused(file, "is a file, not a qlora output folder");
    size_t len;
    char *got = slurp(file, &len);
    ck_assert_str_eq(got, "mine");
    free(got);
    /* a device node: a copy of /dev/null's where we may make one, then /dev/null itself
     * (only reached once the copies above were refused) */
    char *dev = join(parent, "null");
    if (mknod(dev, S_IFCHR | 0666, makedev(1, 3)) == 0) {
        expect_quantize_refused(dev, "is a device");
        ck_assert_int_eq(lstat(dev, &st), 0);
        ck_assert(S_ISCHR(st.st_mode));
        expect_quantize_refused("/dev/null", "is a device");
        ck_assert_int_eq(lstat("/dev/null", &st), 0);
        ck_assert(S_ISCHR(st.st_mode));
    }
    ck_assert(!has_temporaries(parent));
    ck_assert(!has_temporaries("/dev"));
    ql_remove_tree(parent);
    free(dev);
    free(file);
    free(sock);
    free(fifo);
    free(parent);
}
END_TEST

START_TEST(test_force_refuses_symlink)
{
    char *parent = strdup(tu_tmpdir());
    char *real = join(parent, "real"), *link = join(parent, "link");
    quantize_into(real, "nf4"); /* a genuine earlier output, but reached through a link */
    snap before;
    take_snap(real, &before);
    ck_assert_int_eq(symlink(real, link), 0);
    expect_quantize_refused(link, "is a symbolic link");
    struct stat st;
    ck_assert_int_eq(lstat(link, &st), 0);
    ck_assert(S_ISLNK(st.st_mode));
    assert_snap(real, &before);
    assert_dir_is(parent, "link real");
    /* a trailing slash does not get through either */
    char with_slash[1200];
    snprintf(with_slash, sizeof with_slash, "%s/", link);
    expect_quantize_refused(with_slash, "is a symbolic link");
    assert_snap(real, &before);
    assert_dir_is(parent, "link real");
    free_snap(&before);
    ql_remove_tree(parent);
    free(link);
    free(real);
    free(parent);
}
END_TEST

START_TEST(test_force_refuses_unmarked_folder)
{
    char *parent = strdup(tu_tmpdir());
    char *dest = join(parent, "out");
    ck_assert_int_eq(ql_mkdir_p(dest), QL_OK);
    char *f = join(dest, "thesis.txt");
    spit(f, "years of work");
    snap before;
    take_snap(dest, &before);
    expect_quantize_refused(dest, "is not a qlora output");
    char *model = model_dir(), *err;
    int st = qlora_env(&err, "", "quantize --quiet --force '%s' -o '%s'", model, dest);
    ck_assert_int_ne(st, 0);
    /* the message says how to proceed */
    ck_assert_contains(err, "delete it yourself or choose another path");
    free(err);
    assert_snap(dest, &before);
    assert_dir_is(parent, "out");
    /* an output of another kind is not replaced either */
    ck_assert_int_eq(ql_output_mark(dest, "merged-model"), QL_OK);
    expect_quantize_refused(dest, "is a qlora merged-model, not a quantized-model");
    ck_assert(!has_temporaries(parent));
    free(model);
    free_snap(&before);
    free(f);
    ql_remove_tree(parent);
    free(dest);
    free(parent);
}
END_TEST

START_TEST(test_force_refuses_inputs)
{
    char *parent = strdup(tu_tmpdir());
    /* a model folder that even carries a marker of the right kind */
    char *models = join(parent, "models");
    char *mdir = join(models, "m");
    char *src = model_dir();
    copy_dir(src, mdir);
    free(src);
    ck_assert_int_eq(ql_output_mark(mdir, "quantized-model"), QL_OK);
    ck_assert_int_eq(ql_output_mark(models, "quantized-model"), QL_OK);
    snap before;
    take_snap(mdir, &before);
    char *err;
    /* -o MODEL_DIR */
    int st = qlora_env(&err, "", "quantize --quiet --force '%s' -o '%s'", mdir, mdir);
    ck_assert_int_ne(st, 0);
    ck_assert_contains(err, mdir);
    ck_assert_contains(err, "is the input");
    free(err);
    assert_snap(mdir, &before);
    /* the same folder by another name */
    char other[1300];
    snprintf(other, sizeof other, "%s/../models/./m", models);
    st = qlora_env(&err, "", "quantize --quiet --force '%s' -o '%s'", mdir, other);
    ck_assert_int_ne(st, 0);
    ck_assert_contains(err, "is the input");
    free(err);
    assert_snap(mdir, &before);
    /* a folder that contains the model */
    st = qlora_env(&err, "", "quantize --quiet --force '%s' -o '%s'", mdir, models);
    ck_assert_int_ne(st, 0);
    ck_assert_contains(err, models);
    ck_assert_contains(err, "holds the input");
    free(err);
    assert_snap(mdir, &before);
    /* an earlier output inside the model folder */
    char *inside = join(mdir, "q");
    quantize_into(inside, "int8");
    st = qlora_env(&err, "", "quantize --quiet --force '%s' -o '%s'", mdir, inside);
    ck_assert_int_ne(st, 0);
    ck_assert_contains(err, "is inside the input");
    free(err);
    ck_assert_int_eq(ql_remove_tree(inside), QL_OK);
    free(inside);
    assert_snap(mdir, &before);

    /* merge: neither the model nor the adapter */
    char *run = train_adapter(parent);
    snap run_before;
    take_snap(run, &run_before);
    ck_assert_int_eq(ql_output_mark(mdir, "merged-model"), QL_OK);
    free_snap(&before);
    take_snap(mdir, &before);
    st = qlora_env(&err, "", "merge --model '%s' --adapter '%s' -o '%s' --force", mdir, run, mdir);
    ck_assert_int_ne(st, 0);
    ck_assert_contains(err, "is the input");
    free(err);
    st = qlora_env(&err, "", "merge --model '%s' --adapter '%s' -o '%s' --force", mdir, run, run);
    ck_assert_int_ne(st, 0);
    ck_assert_contains(err, run);
    ck_assert_contains(err, "is the input");
    free(err);
    st = qlora_env(&err, "", "merge --model '%s' --adapter '%s' -o '%s' --force", mdir, run, parent);
    ck_assert_int_ne(st, 0);
    ck_assert_contains(err, "holds the input");
    free(err);
    assert_snap(mdir, &before);
    assert_snap(run, &run_before);
    ck_assert(!has_temporaries(parent));
    ck_assert(!has_temporaries(models));
    free_snap(&run_before);
    free_snap(&before);
    free(run);
    ql_remove_tree(parent);
    free(mdir);
    free(models);
    free(parent);
}
END_TEST

START_TEST(test_refuses_dot_destinations)
{
    char *parent = strdup(tu_tmpdir());
    char *work = join(parent, "work");
    ck_assert_int_eq(ql_mkdir_p(work), QL_OK);
    char *model = model_dir();
    static const char *const dests[] = {".", "..", "/", "./", "sub/..", "//"};
    for (size_t i = 0; i < sizeof dests / sizeof dests[0]; i++) {
        char *err;
        char args[4096];
        snprintf(args, sizeof args, "cd '%s' && ", work);
        int st = qlora_env(&err, args, "quantize --quiet --force '%s' -o '%s'", model, dests[i]);
        ck_assert_msg(st != 0, "-o %s --force succeeded", dests[i]);
        ck_assert_msg(tu_contains(err, "names an existing folder itself"), "-o %s: %s", dests[i], err);
        free(err);
        assert_dir_is(work, "");
        assert_dir_is(parent, "work");
    }
    free(model);
    ql_remove_tree(parent);
    free(work);
    free(parent);
}
END_TEST

/* ---- replacing an earlier output ---- */

START_TEST(test_force_replaces_marked_output)
{
    char *parent = strdup(tu_tmpdir());
    char *dest = join(parent, "out");
    quantize_into(dest, "int8");
    char *cfg = join(dest, "config.json");
    size_t len;
    char *text = slurp(cfg, &len);
    ck_assert_contains(text, "int8");
    free(text);
    char *model = model_dir(), *err;
    int st = qlora_env(&err, "", "quantize --quiet --force --quantizer=nf4 '%s' -o '%s'", model, dest);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    free(err);
    text = slurp(cfg, &len);
    ck_assert_contains(text, "nf4");
    free(text);
    assert_dir_is(dest, ".qlora-output config.json model.safetensors tokenizer.json tokenizer_config.json");
    char *mark = join(dest, ".qlora-output");
    text = slurp(mark, &len);
    ck_assert_str_eq(text, "quantized-model\n");
    free(text);
    assert_dir_is(parent, "out");
    /* merge outputs are marked and replaceable the same way */
    char *run = train_adapter(parent), *merged = join(parent, "merged");
    for (int i = 0; i < 2; i++) {
        st = qlora_env(&err, "", "merge --model '%s' --adapter '%s' -o '%s'%s", model, run, merged, i ? " --force" : "");
        ck_assert_msg(st == 0, "exit %d: %s", st, err);
        free(err);
    }
    char *mmark = join(merged, ".qlora-output");
    text = slurp(mmark, &len);
    ck_assert_str_eq(text, "merged-model\n");
    free(text);
    ck_assert(!has_temporaries(parent));
    free(mmark);
    free(merged);
    free(run);
    free(mark);
    free(model);
    free(cfg);
    ql_remove_tree(parent);
    free(dest);
    free(parent);
}
END_TEST

/* A kill right after the step that puts the new output in place (or, in the
 * old scheme, after the old one was moved aside) leaves a whole output. */
START_TEST(test_replace_is_one_step)
{
    char *parent = strdup(tu_tmpdir());
    char *dest = join(parent, "out");
    quantize_into(dest, "int8");
    snap old;
    take_snap(dest, &old);
    char *model = model_dir(), *err;
    char env[2048];
    snprintf(env, sizeof env, "QL_FAULT_KILL_RENAME='%s'", dest);
    int st = qlora_env(&err, faults(env), "quantize --quiet --force --quantizer=nf4 '%s' -o '%s'", model, dest);
    free(err);
    ck_assert_msg(st == 128 + SIGKILL || st == 128, "the shim did not kill quantize (exit %d)", st);
    /* dest is there and whole: the new nf4 output */
    ck_assert_msg(ql_is_dir(dest), "%s is gone after a kill during the replacement", dest);
    assert_dir_is(dest, ".qlora-output config.json model.safetensors tokenizer.json tokenizer_config.json");
    char *cfg = join(dest, "config.json");
    size_t len;
    char *text = slurp(cfg, &len);
    ck_assert_contains(text, "nf4");
    free(text);
    /* the old one waits under a temporary name; the next run removes it */
    ck_assert(has_temporaries(parent));
    snap now;
    take_snap(dest, &now);
    st = qlora_env(&err, "", "quantize --quiet --force --quantizer=nf4 '%s' -o '%s'", model, dest);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(err, "left by an earlier qlora run");
    free(err);
    assert_dir_is(parent, "out");
    free_snap(&now);
    free_snap(&old);
    free(cfg);
    free(model);
    ql_remove_tree(parent);
    free(dest);
    free(parent);
}
END_TEST

/* Where the file system cannot exchange two names, the replacement takes two
 * renames, says so, and a kill between them never costs the earlier output:
 * it stays under a temporary name and the next run reports it. */
START_TEST(test_replace_fallback)
{
    char *parent = strdup(tu_tmpdir());
    char *dest = join(parent, "out");
    quantize_into(dest, "int8");
    char *model = model_dir(), *err;
    int st = qlora_env(&err, faults("QL_FAULT_NO_RENAMEAT2=1"), "quantize --quiet --force --quantizer=nf4 '%s' -o '%s'",
                       model, dest);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(err, "cannot swap two folders in one step");
    free(err);
    assert_dir_is(parent, "out");
    char *cfg = join(dest, "config.json");
    size_t len;
    char *text = slurp(cfg, &len);
    ck_assert_contains(text, "nf4");
    free(text);

    snap old;
    take_snap(dest, &old);
    char env[2048];
    snprintf(env, sizeof env, "QL_FAULT_NO_RENAMEAT2=1 QL_FAULT_KILL_RENAME='%s'", dest);
    st = qlora_env(&err, faults(env), "quantize --quiet --force --quantizer=int8 '%s' -o '%s'", model, dest);
    free(err);
    ck_assert_msg(st == 128 + SIGKILL || st == 128, "the shim did not kill quantize (exit %d)", st);
    ck_assert(!ql_path_exists(dest)); /* killed between the two renames */
    /* the next run leaves both folders of the killed one alone and says where the old output is */
    st = qlora_env(&err, "", "quantize --quiet --quantizer=int8 '%s' -o '%s'", model, dest);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(err, "rename it to");
    free(err);
    DIR *d = opendir(parent);
    ck_assert_ptr_nonnull(d);
    struct dirent *e;
    int kept = 0, found_old = 0;
    while ((e = readdir(d))) {
        if (!strstr(e->d_name, "qlora-tmp")) continue;
        kept++;
        char *p = join(parent, e->d_name);
        char *pc = join(p, "config.json");
        text = slurp(pc, &len);
        if (tu_contains(text, "nf4")) {
            assert_snap(p, &old);
            found_old = 1;
        }
        free(text);
        free(pc);
        free(p);
    }
    closedir(d);
    ck_assert_int_eq(kept, 2);
    ck_assert_msg(found_old, "the earlier output is gone");
    free_snap(&old);
    free(cfg);
    free(model);
    ql_remove_tree(parent);
    free(dest);
    free(parent);
}
END_TEST

/* ---- stale temporary folders ---- */

static long dead_pid(void)
{
    pid_t p = fork();
    ck_assert_int_ge(p, 0);
    if (p == 0) _exit(0);
    int status;
    waitpid(p, &status, 0);
    return (long)p;
}

static char *make_temp(const char *parent, const char *base, long pid, const char *suffix, const char *marker_name,
                       const char *marker_text)
{
    char name[512];
    snprintf(name, sizeof name, ".%s.qlora-tmp.%ld.%s", base, pid, suffix);
    char *dir = join(parent, name);
    ck_assert_int_eq(ql_mkdir_p(dir), QL_OK);
    if (marker_name) {
        char *m = join(dir, marker_name);
        spit(m, marker_text);
        free(m);
    }
    char *f = join(dir, "model.safetensors");
    spit(f, "partial");
    free(f);
    return dir;
}

START_TEST(test_stale_temporaries)
{
    char *parent = strdup(tu_tmpdir());
    long dead = dead_pid(), alive = (long)getpid();
    char line[64];
    snprintf(line, sizeof line, "pid %ld\n", dead);
    char *crashed = make_temp(parent, "out", dead, "aaaaaa", ".qlora-tmp", line);
    snprintf(line, sizeof line, "pid %ld\n", alive);
    char *running = make_temp(parent, "out", alive, "bbbbbb", ".qlora-tmp", line);
    char *strange = make_temp(parent, "out", dead, "cccccc", NULL, NULL);      /* not certainly ours */
    char *other = make_temp(parent, "other", dead, "dddddd", ".qlora-tmp", ""); /* another output's */
    char *model = model_dir(), *dest = join(parent, "out"), *err;
    int st = qlora_env(&err, "", "quantize --quiet '%s' -o '%s'", model, dest);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(err, crashed);
    ck_assert_contains(err, "left by an earlier qlora run");
    ck_assert_contains(err, strange);
    ck_assert_contains(err, "left it alone");
    free(err);
    ck_assert(!ql_path_exists(crashed));
    ck_assert(ql_is_dir(running));
    ck_assert(ql_is_dir(strange));
    ck_assert(ql_is_dir(other));
    /* a whole output that a killed run never put in place (dest missing) is only reported */
    ql_remove_tree(dest);
    char *orphan = make_temp(parent, "out", dead, "eeeeee", ".qlora-output", "quantized-model\n");
    st = qlora_env(&err, "", "quantize --quiet '%s' -o '%s'", model, dest);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    ck_assert_contains(err, orphan);
    ck_assert_contains(err, "rename it to");
    free(err);
    ck_assert(ql_is_dir(orphan));
    free(orphan);
    free(model);
    free(dest);
    free(other);
    free(strange);
    free(running);
    free(crashed);
    ql_remove_tree(parent);
    free(parent);
}
END_TEST

/* ---- write faults ---- */

static const struct {
    const char *what;
    const char *settings; /* %s: the parent folder */
    const char *message;
} write_faults[] = {
    {"no space after 1 KB", "QL_FAULT_PATH='%s/*' QL_FAULT_AFTER_BYTES=1000", "No space left on device"},
    {"I/O error after 200 KB", "QL_FAULT_PATH='%s/*' QL_FAULT_AFTER_BYTES=200000 QL_FAULT_ERRNO=EIO",
     "Input/output error"},
    {"no space on the first write", "QL_FAULT_PATH='%s/*' QL_FAULT_ON_CALL=1", "No space left on device"},
    {"config.json fails", "QL_FAULT_PATH='%s/*/config.json.tmp.*' QL_FAULT_ON_CALL=1 QL_FAULT_ERRNO=EIO",
     "config.json"},
    {"model.safetensors fails", "QL_FAULT_PATH='%s/*/model.safetensors.tmp.*' QL_FAULT_AFTER_BYTES=5000",
     "model.safetensors"},
    {"fsync of a file fails", "QL_FAULT_PATH='%s/*' QL_FAULT_FSYNC=1 QL_FAULT_ERRNO=EIO", "Input/output error"},
    {"the marker fails", "QL_FAULT_PATH='%s/*/.qlora-output.tmp.*' QL_FAULT_ON_CALL=1", ".qlora-output"},
};
#define N_WRITE_FAULTS (int)(sizeof write_faults / sizeof write_faults[0])

/* An existing output being replaced with --force stays as it was, byte for
 * byte; the message names the output and the error; nothing is left behind. */
static void check_fault(int _i, const char *cmd_fmt, const char *kind_tag)
{
    char *parent = strdup(tu_tmpdir());
    char *dest = join(parent, "out"), *model = model_dir();
    char *run = NULL;
    if (!strcmp(kind_tag, "merge")) {
        run = train_adapter(parent);
        char *err;
        int st = qlora_env(&err, "", "merge --model '%s' --adapter '%s' -o '%s'", model, run, dest);
        ck_assert_msg(st == 0, "exit %d: %s", st, err);
        free(err);
    } else {
        quantize_into(dest, "int8");
    }
    snap before;
    take_snap(dest, &before);
    char settings[2048], *err;
    snprintf(settings, sizeof settings, write_faults[_i].settings, parent);
    int st = run ? qlora_env(&err, faults(settings), cmd_fmt, model, run, dest)
                 : qlora_env(&err, faults(settings), cmd_fmt, model, dest);
    ck_assert_msg(st != 0 && st < 128, "%s: %s: exit %d: %s", kind_tag, write_faults[_i].what, st, err);
    ck_assert_msg(tu_contains(err, dest) && tu_contains(err, write_faults[_i].message), "%s: %s: %s", kind_tag,
                  write_faults[_i].what, err);
    free(err);
    assert_snap(dest, &before);
    ck_assert_msg(!has_temporaries(parent), "%s: %s: temporaries left", kind_tag, write_faults[_i].what);
    if (run) ck_assert_msg(!has_temporaries(run), "temporaries left in %s", run);
    free_snap(&before);
    free(run);
    free(model);
    ql_remove_tree(parent);
    free(dest);
    free(parent);
}

START_TEST(test_quantize_write_faults)
{
    check_fault(_i, "quantize --quiet --force --quantizer=nf4 '%s' -o '%s'", "quantize");
}
END_TEST

START_TEST(test_merge_write_faults)
{
    check_fault(_i, "merge --model '%s' --adapter '%s' -o '%s' --force --dtype float16", "merge");
}
END_TEST

/* A failed fsync of the folder that receives the output is reported. */
START_TEST(test_parent_fsync_fails)
{
    char *parent = strdup(tu_tmpdir());
    char *dest = join(parent, "out"), *model = model_dir(), *err;
    char settings[2048];
    snprintf(settings, sizeof settings, "QL_FAULT_PATH='%s' QL_FAULT_FSYNC_DIR=1 QL_FAULT_ERRNO=EIO", parent);
    int st = qlora_env(&err, faults(settings), "quantize --quiet '%s' -o '%s'", model, dest);
    ck_assert_msg(st != 0 && st < 128, "exit %d: %s", st, err);
    ck_assert_contains(err, "cannot flush folder");
    ck_assert_contains(err, parent);
    ck_assert_contains(err, "Input/output error");
    free(err);
    ck_assert(!has_temporaries(parent));
    /* the same inside ql_write_file_atomic, for each file written into the temporary folder */
    ql_remove_tree(dest);
    snprintf(settings, sizeof settings, "QL_FAULT_PATH='%s/.out.qlora-tmp.*' QL_FAULT_FSYNC_DIR=1", parent);
    st = qlora_env(&err, faults(settings), "quantize --quiet '%s' -o '%s'", model, dest);
    ck_assert_msg(st != 0 && st < 128, "exit %d: %s", st, err);
    ck_assert_contains(err, "cannot flush folder");
    ck_assert_contains(err, dest);
    ck_assert_contains(err, "No space left on device");
    free(err);
    ck_assert(!ql_path_exists(dest));
    assert_dir_is(parent, "");
    free(model);
    ql_remove_tree(parent);
    free(dest);
    free(parent);
}
END_TEST

/* train under the shim: the run's earlier checkpoints stay whole, the message
 * names the file, nothing temporary is left (needs h2's train write checks). */
static const struct {
    const char *what;
    const char *settings; /* %s: the run folder */
} train_faults[] = {
    {"no space in the run", "QL_FAULT_PATH='%s/*' QL_FAULT_AFTER_BYTES=20000"},
    {"I/O error on metrics", "QL_FAULT_PATH='%s/metrics.jsonl' QL_FAULT_ON_CALL=1 QL_FAULT_ERRNO=EIO"},
    {"a checkpoint's optimizer", "QL_FAULT_PATH='%s/*/optimizer.safetensors.tmp.*' QL_FAULT_AFTER_BYTES=100"},
};

START_TEST(test_train_write_faults)
{
    char *parent = strdup(tu_tmpdir());
    char *data = join(parent, "d.json");
    spit(data, "[{\"instruction\": \"Tell a story.\", \"input\": \"\", \"output\": \"Once upon a time there was a cat.\"},"
               " {\"instruction\": \"Name a pet.\", \"input\": \"\", \"output\": \"A cat.\"}]");
    char *run = join(parent, "run"), *model = model_dir(), *err;
#define TRAIN "train --quiet --model '%s' --data '%s' --format alpaca --lora-r 4 --batch-size 1 --save-steps 1 "
    int st = qlora_env(&err, "", TRAIN "--steps 1 --output '%s'", model, data, run);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    free(err);
    char *ckpt = join(run, "checkpoint-1");
    snap before;
    take_snap(ckpt, &before);
    char settings[2048];
    snprintf(settings, sizeof settings, train_faults[_i].settings, run);
    st = qlora_env(&err, faults(settings), TRAIN "--steps 3 --resume '%s' --output '%s'", model, data, ckpt, run);
    ck_assert_msg(st != 0 && st < 128, "%s: exit %d: %s", train_faults[_i].what, st, err);
    ck_assert_msg(tu_contains(err, run), "%s: the message does not name the run: %s", train_faults[_i].what, err);
    free(err);
    assert_snap(ckpt, &before);
    ck_assert_msg(!has_temporaries(run), "%s: temporaries left in %s", train_faults[_i].what, run);
    ck_assert(!has_temporaries(parent));
#undef TRAIN
    free_snap(&before);
    free(ckpt);
    free(model);
    free(run);
    free(data);
    ql_remove_tree(parent);
    free(parent);
}
END_TEST

/* The final adapter at the top of a run folder: a write that fails while
 * replacing it leaves the earlier pair as it was, loadable. */
START_TEST(test_final_adapter_write_fault)
{
    char *parent = strdup(tu_tmpdir());
    char *data = join(parent, "d.json");
    spit(data, "[{\"instruction\": \"Tell a story.\", \"input\": \"\", \"output\": \"Once upon a time there was a cat.\"},"
               " {\"instruction\": \"Name a pet.\", \"input\": \"\", \"output\": \"A cat.\"}]");
    char *run = join(parent, "run"), *model = model_dir(), *err;
#define TRAIN "train --quiet --model '%s' --data '%s' --format alpaca --lora-r 4 --batch-size 1 --save-steps 1 "
    int st = qlora_env(&err, "", TRAIN "--steps 1 --output '%s'", model, data, run);
    ck_assert_msg(st == 0, "exit %d: %s", st, err);
    free(err);
    char *cfg = join(run, "adapter_config.json"), *weights = join(run, "adapter_model.safetensors");
    size_t cl, wl;
    char *cfg0 = slurp(cfg, &cl), *weights0 = slurp(weights, &wl);
    char *ckpt = join(run, "checkpoint-1");
    char settings[2048];
    /* the top-level weights only (checkpoint-N are written in folders of their own) */
    snprintf(settings, sizeof settings, "QL_FAULT_PATH='%s/[.a]adapter_model.safetensors*' QL_FAULT_AFTER_BYTES=100", run);
    st = qlora_env(&err, faults(settings), TRAIN "--steps 2 --resume '%s' --output '%s'", model, data, ckpt, run);
    ck_assert_msg(st != 0 && st < 128, "exit %d: %s", st, err);
    free(err);
    size_t cl1 = 0, wl1 = 0;
    char *cfg1 = ql_path_exists(cfg) ? slurp(cfg, &cl1) : NULL, *weights1 = slurp(weights, &wl1);
    ck_assert_msg(cfg1 != NULL, "%s is gone after a failed write of the new adapter", cfg);
    ck_assert_msg(cl1 == cl && !memcmp(cfg1, cfg0, cl), "%s changed", cfg);
    ck_assert_msg(wl1 == wl && !memcmp(weights1, weights0, wl), "%s changed", weights);
    ck_assert_msg(!has_temporaries(run), "temporaries left in %s", run);
    /* and the earlier adapter still loads */
    st = qlora_env(&err, "", "generate --model '%s' --adapter '%s' --prompt x --max-new-tokens 1", model, run);
    ck_assert_msg(st == 0, "the earlier adapter no longer loads: exit %d: %s", st, err);
    free(err);
#undef TRAIN
    free(cfg0), free(weights0), free(cfg1), free(weights1);
    free(cfg), free(weights), free(ckpt);
    free(model);
    free(run);
    free(data);
    ql_remove_tree(parent);
    free(parent);
}
END_TEST

Suite *outputs_suite(void)
{
    Suite *s = suite_create("outputs");
    TCase *tc = tcase_create("force");
    tcase_set_timeout(tc, 120);
    tcase_add_unchecked_fixture(tc, make_adapter, remove_adapter);
    tcase_add_test(tc, test_force_refuses_special_files);
    tcase_add_test(tc, test_force_refuses_symlink);
    tcase_add_test(tc, test_force_refuses_unmarked_folder);
    tcase_add_test(tc, test_force_refuses_inputs);
    tcase_add_test(tc, test_refuses_dot_destinations);
    suite_add_tcase(s, tc);

    tc = tcase_create("replace");
    tcase_set_timeout(tc, 120);
    tcase_add_unchecked_fixture(tc, make_adapter, remove_adapter);
    tcase_add_test(tc, test_force_replaces_marked_output);
    tcase_add_test(tc, test_replace_is_one_step);
    tcase_add_test(tc, test_replace_fallback);
    tcase_add_test(tc, test_stale_temporaries);
    suite_add_tcase(s, tc);

    tc = tcase_create("faults");
    tcase_set_timeout(tc, 240);
    tcase_add_unchecked_fixture(tc, make_adapter, remove_adapter);
    tcase_add_loop_test(tc, test_quantize_write_faults, 0, N_WRITE_FAULTS);
    tcase_add_loop_test(tc, test_merge_write_faults, 0, N_WRITE_FAULTS);
    tcase_add_test(tc, test_parent_fsync_fails);
    suite_add_tcase(s, tc);

    tc = tcase_create("train_faults");
    tcase_set_timeout(tc, 240);
    tcase_add_loop_test(tc, test_train_write_faults, 0, (int)(sizeof train_faults / sizeof train_faults[0]));
    tcase_add_test(tc, test_final_adapter_write_fault);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(outputs_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
