#include "qlora/fs.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "qlora/error.h"

char *ql_path_join(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    char *p = malloc(la + lb + 2);
    if (!p) return NULL;
    memcpy(p, a, la);
    size_t k = la;
    if (la && a[la - 1] != '/') p[k++] = '/';
    memcpy(p + k, b, lb + 1);
    return p;
}

int ql_path_exists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

int ql_is_dir(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

int ql_mkdir_p(const char *path)
{
    char buf[4096];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf)
        return ql_error(QL_EINVAL, "path too long: %s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0777) != 0 && errno != EEXIST)
            return ql_error(QL_EIO, "cannot create folder %s: %s", buf, strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, 0777) != 0 && errno != EEXIST)
        return ql_error(QL_EIO, "cannot create folder %s: %s", buf, strerror(errno));
    return QL_OK;
}

/* fsync a folder, so that renames into it are durable.  EINVAL means the
 * file system has no way to sync a folder: nothing to report. */
int ql_fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0) return ql_error(QL_EIO, "cannot open folder %s to flush it: %s", dir, strerror(errno));
    int rc = QL_OK;
    if (fsync(fd) != 0 && errno != EINVAL) rc = ql_error(QL_EIO, "cannot flush folder %s: %s", dir, strerror(errno));
    if (close(fd) != 0 && rc == QL_OK) rc = ql_error(QL_EIO, "cannot close folder %s: %s", dir, strerror(errno));
    return rc;
}

static int fsync_parent(const char *path)
{
    char buf[4096];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) return ql_error(QL_EINVAL, "path too long: %s", path);
    return ql_fsync_dir(dirname(buf));
}

int ql_write_file_atomic(const char *path, const void *data, size_t len)
{
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.XXXXXX", path) >= (int)sizeof tmp)
        return ql_error(QL_EINVAL, "path too long: %s", path);
    int fd = mkstemp(tmp);
    if (fd < 0) return ql_error(QL_EIO, "cannot create %s: %s", tmp, strerror(errno));
    const char *p = data;
    size_t left = len;
    while (left > 0) {
        ssize_t w = write(fd, p, left);
        if (w < 0) {
            if (errno == EINTR) continue;
            int e = errno;
            close(fd);
            unlink(tmp);
            return ql_error(QL_EIO, "cannot write %s: %s", path, strerror(e));
        }
        p += w;
        left -= (size_t)w;
    }
    if (fchmod(fd, 0644) != 0 || fsync(fd) != 0) {
        int e = errno;
        close(fd);
        unlink(tmp);
        return ql_error(QL_EIO, "cannot flush %s: %s", path, strerror(e));
    }
    if (close(fd) != 0) {
        unlink(tmp);
        return ql_error(QL_EIO, "cannot close %s: %s", path, strerror(errno));
    }
    if (rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return ql_error(QL_EIO, "cannot rename %s to %s: %s", tmp, path, strerror(e));
    }
    int rc = fsync_parent(path);
    if (rc) ql_error_context("writing %s", path);
    return rc;
}

int ql_read_file(const char *path, char **data, size_t *len)
{
    *data = NULL;
    *len = 0;
    /* O_NONBLOCK: opening a FIFO must not wait for a writer; only regular files are read */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return ql_error(errno == ENOENT ? QL_ENOTFOUND : QL_EIO, "cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return ql_error(QL_EIO, "cannot stat %s: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return ql_error(QL_EINVAL, "%s is not a regular file", path);
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0) fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    if (st.st_size < 0 || (uint64_t)st.st_size >= SIZE_MAX) {
        close(fd);
        return ql_error(QL_ENOMEM, "%s is too large to read", path);
    }
    size_t size = (size_t)st.st_size;
    char *buf = malloc(size + 1);
    if (!buf) {
        close(fd);
        return ql_error(QL_ENOMEM, "out of memory reading %s", path);
    }
    size_t got = 0;
    while (got < size) {
        ssize_t r = read(fd, buf + got, size - got);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            int e = errno;
            close(fd);
            free(buf);
            return ql_error(QL_EIO, "cannot read %s: %s", path, strerror(e));
        }
        if (r == 0) break; /* shrank while reading: keep what is there */
        got += (size_t)r;
    }
    close(fd);
    buf[got] = '\0';
    *data = buf;
    *len = got;
    return QL_OK;
}

int ql_copy_file_atomic(const char *src, const char *dst)
{
    char *data;
    size_t len;
    int rc = ql_read_file(src, &data, &len);
    if (rc) return rc;
    rc = ql_write_file_atomic(dst, data, len);
    free(data);
    return rc;
}

int ql_remove_tree(const char *path)
{
    struct stat st;
    if (lstat(path, &st) != 0) return errno == ENOENT ? QL_OK : ql_error(QL_EIO, "cannot stat %s", path);
    if (S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        if (!d) return ql_error(QL_EIO, "cannot open folder %s: %s", path, strerror(errno));
        struct dirent *e;
        int rc = QL_OK;
        while (rc == QL_OK && (e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            char *child = ql_path_join(path, e->d_name);
            if (!child) {
                rc = ql_error(QL_ENOMEM, "out of memory");
                break;
            }
            rc = ql_remove_tree(child);
            free(child);
        }
        closedir(d);
        if (rc) return rc;
        if (rmdir(path) != 0) return ql_error(QL_EIO, "cannot remove %s: %s", path, strerror(errno));
        return QL_OK;
    }
    if (unlink(path) != 0) return ql_error(QL_EIO, "cannot remove %s: %s", path, strerror(errno));
    return QL_OK;
}

/* ---- output markers ---- */

#define TMP_MARKER ".qlora-tmp" /* inside a temporary folder while it is being written */
#define KIND_CAP 64

int ql_output_mark(const char *dir, const char *kind)
{
    char text[KIND_CAP + 2];
    if (!kind || !*kind || snprintf(text, sizeof text, "%s\n", kind) >= (int)sizeof text)
        return ql_error(QL_EINVAL, "bad output kind '%s'", kind ? kind : "(null)");
    char *path = ql_path_join(dir, QL_OUTPUT_MARKER);
    if (!path) return ql_error(QL_ENOMEM, "out of memory");
    int rc = ql_write_file_atomic(path, text, strlen(text));
    free(path);
    return rc;
}

/* Read a small marker file without following a link: 1 and its first line
 * in buf when it is there, 0 when it is not (or is not a plain file). */
static int read_marker(const char *dir, const char *name, char *buf, size_t cap)
{
    char *path = ql_path_join(dir, name);
    if (!path) return 0;
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    free(path);
    if (fd < 0) return 0;
    struct stat st;
    ssize_t n = -1;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) n = read(fd, buf, cap - 1);
    close(fd);
    if (n < 0) return 0;
    buf[n] = '\0';
    buf[strcspn(buf, "\n")] = '\0';
    for (char *c = buf; *c; c++)
        if (*c < 0x20 || *c == 0x7f) *c = '?'; /* it is shown in messages */
    return 1;
}

int ql_output_is(const char *dir, const char *kind)
{
    struct stat st;
    char found[KIND_CAP];
    return lstat(dir, &st) == 0 && S_ISDIR(st.st_mode) && read_marker(dir, QL_OUTPUT_MARKER, found, sizeof found) &&
           strcmp(found, kind) == 0;
}

static const char *file_type_name(mode_t m)
{
    if (S_ISLNK(m)) return "is a symbolic link";
    if (S_ISCHR(m) || S_ISBLK(m)) return "is a device";
    if (S_ISFIFO(m)) return "is a FIFO";
    if (S_ISSOCK(m)) return "is a socket";
    if (S_ISREG(m)) return "is a file, not a qlora output folder";
    return "is not a folder";
}

/* Is (dev, ino) `path` or one of the folders above it? */
static int is_at_or_above(dev_t dev, ino_t ino, const char *real)
{
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", real);
    for (;;) {
        struct stat st;
        if (stat(buf, &st) == 0 && st.st_dev == dev && st.st_ino == ino) return 1;
        char *slash = strrchr(buf, '/');
        if (!slash) return 0;
        if (slash == buf) {
            if (buf[1] == '\0') return 0;
            buf[1] = '\0';
        } else {
            *slash = '\0';
        }
    }
}

static int path_within(const char *inner, const char *outer)
{
    size_t n = strlen(outer);
    if (strncmp(inner, outer, n) != 0) return 0;
    return inner[n] == '\0' || inner[n] == '/' || (n == 1 && outer[0] == '/');
}

int ql_output_check_replace(const char *dest, const char *kind, const char *const *inputs, size_t n_inputs)
{
    struct stat st;
    if (lstat(dest, &st) != 0) {
        if (errno == ENOENT) return QL_OK;
        return ql_error(QL_EIO, "cannot look at output %s: %s", dest, strerror(errno));
    }
    if (!S_ISDIR(st.st_mode))
        return ql_error(QL_EEXIST, "output %s %s; --force replaces only an earlier qlora output folder: choose another path",
                        dest, file_type_name(st.st_mode));
    char real_dest[PATH_MAX];
    if (!realpath(dest, real_dest)) return ql_error(QL_EIO, "cannot resolve output %s: %s", dest, strerror(errno));
    for (size_t i = 0; i < n_inputs; i++) {
        if (!inputs[i]) continue;
        char real_in[PATH_MAX];
        struct stat ist;
        if (!realpath(inputs[i], real_in) || stat(real_in, &ist) != 0) continue; /* not there: nothing to lose */
        if ((ist.st_dev == st.st_dev && ist.st_ino == st.st_ino) || !strcmp(real_in, real_dest))
            return ql_error(QL_EEXIST, "output %s is the input %s; --force will not replace it: choose another path",
                            dest, inputs[i]);
        if (path_within(real_in, real_dest) || is_at_or_above(st.st_dev, st.st_ino, real_in))
            return ql_error(QL_EEXIST, "output %s holds the input %s; --force will not replace it: choose another path",
                            dest, inputs[i]);
        if (path_within(real_dest, real_in) || is_at_or_above(ist.st_dev, ist.st_ino, real_dest))
            return ql_error(QL_EEXIST, "output %s is inside the input %s; --force will not replace it: choose another path",
                            dest, inputs[i]);
    }
    char found[KIND_CAP];
    if (!read_marker(dest, QL_OUTPUT_MARKER, found, sizeof found))
        return ql_error(QL_EEXIST,
                        "output %s is not a qlora output (it has no " QL_OUTPUT_MARKER " marker; outputs of qlora "
                        "builds before 2026-12 have none either); --force replaces only an earlier qlora %s: "
                        "delete it yourself or choose another path",
                        dest, kind);
    if (strcmp(found, kind) != 0)
        return ql_error(QL_EEXIST, "output %s is a qlora %s, not a %s; --force will not replace it: choose another path",
                        dest, found, kind);
    return QL_OK;
}

/* ---- output folders ---- */

struct ql_outdir {
    char dest[4096];
    char tmp[4096];
    char kind[KIND_CAP];
    int force;
    const char *const *inputs;
    size_t n_inputs;
};

static int pid_is_gone(long pid)
{
    return pid > 0 && pid <= INT32_MAX && kill((pid_t)pid, 0) != 0 && errno == ESRCH;
}

static int dir_is_empty(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) return 0;
    struct dirent *e;
    int empty = 1;
    while (empty && (e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) empty = 0;
    closedir(d);
    return empty;
}

/* Temporary folders of dest are ".BASE.qlora-tmp.PID.XXXXXX" beside it.  One
 * whose run has died is removed when it is certainly ours: a real folder of
 * this user that is empty, or holds our pid marker, or holds an output of the
 * same kind (an old output swapped out, not yet removed).  Anything else with
 * such a name is only reported. */
static void clean_stale(const char *dest, const char *parent, const char *base, const char *kind)
{
    char prefix[4200];
    int plen = snprintf(prefix, sizeof prefix, ".%s.qlora-tmp.", base);
    if (plen <= 0 || plen >= (int)sizeof prefix) return;
    DIR *d = opendir(parent);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, prefix, (size_t)plen) != 0) continue;
        const char *rest = e->d_name + plen;
        char *end;
        errno = 0;
        long pid = strtol(rest, &end, 10);
        char *path = ql_path_join(parent, e->d_name);
        if (!path) break;
        struct stat st;
        char mark[KIND_CAP];
        int ours = errno == 0 && end != rest && *end == '.' && strlen(end + 1) == 6 && lstat(path, &st) == 0 &&
                   S_ISDIR(st.st_mode) && st.st_uid == geteuid();
        int whole = 0; /* a finished output of this kind, not marked as being written */
        if (ours) {
            char want[32];
            snprintf(want, sizeof want, "pid %ld", pid);
            int writing = read_marker(path, TMP_MARKER, mark, sizeof mark) && strcmp(mark, want) == 0;
            whole = !writing && read_marker(path, QL_OUTPUT_MARKER, mark, sizeof mark) && strcmp(mark, kind) == 0;
            ours = writing || whole || dir_is_empty(path);
        }
        if (ours && pid == (long)getpid()) {
            /* ours, from this very process: still in use */
        } else if (ours && whole && !ql_path_exists(dest) && pid_is_gone(pid)) {
            /* the only copy of an output whose run stopped between two renames: never delete it */
            fprintf(stderr,
                    "qlora: warning: %s holds a whole %s left by a qlora run (pid %ld) that stopped before "
                    "putting it in place; left it alone: rename it to %s or delete it\n",
                    path, kind, pid, dest);
        } else if (ours && pid_is_gone(pid)) {
            int saved = ql_error_code();
            char msg[1024];
            snprintf(msg, sizeof msg, "%s", ql_error_message());
            if (ql_remove_tree(path) == QL_OK)
                fprintf(stderr, "qlora: removed %s, left by an earlier qlora run (pid %ld) that stopped\n", path, pid);
            else
                fprintf(stderr, "qlora: warning: cannot remove %s, left by an earlier qlora run: %s\n", path,
                        ql_error_message());
            ql_error(saved, "%s", msg);
        } else if (!ours) {
            fprintf(stderr, "qlora: warning: %s looks like a temporary folder of qlora but may not be; left it alone\n",
                    path);
        }
        free(path);
    }
    closedir(d);
}

static int bad_dest_name(const char *dest)
{
    const char *base = strrchr(dest, '/');
    base = base ? base + 1 : dest;
    return *base == '\0' || !strcmp(base, ".") || !strcmp(base, "..");
}

int ql_outdir_begin(const char *dest, const char *kind, int force, const char *const *inputs, size_t n_inputs,
                    ql_outdir **out)
{
    *out = NULL;
    size_t len = strlen(dest);
    while (len > 1 && dest[len - 1] == '/') len--;
    if (len == 0 || len >= 4000) return ql_error(QL_EINVAL, "bad output folder name '%s'", dest);
    if (!kind || !*kind || strlen(kind) >= KIND_CAP) return ql_error(QL_EINVAL, "bad output kind");
    ql_outdir *o = calloc(1, sizeof *o);
    if (!o) return ql_error(QL_ENOMEM, "out of memory");
    memcpy(o->dest, dest, len);
    o->dest[len] = '\0';
    snprintf(o->kind, sizeof o->kind, "%s", kind);
    o->force = force;
    o->inputs = inputs;
    o->n_inputs = n_inputs;
    if (bad_dest_name(o->dest)) {
        free(o);
        return ql_error(QL_EINVAL,
                        "output %s names an existing folder itself ('.', '..' or '/'), not a new one: "
                        "give the output its own folder name, such as %s/out",
                        dest, dest);
    }
    int rc = QL_OK;
    if (ql_path_exists(o->dest)) {
        if (!force) rc = ql_error(QL_EEXIST, "output %s already exists (use --force to replace it)", dest);
        else rc = ql_output_check_replace(o->dest, kind, inputs, n_inputs);
        if (rc) {
            free(o);
            return rc;
        }
    }
    char parent[4096], basebuf[4096];
    snprintf(parent, sizeof parent, "%s", o->dest);
    snprintf(basebuf, sizeof basebuf, "%s", o->dest);
    const char *pdir = dirname(parent), *base = basename(basebuf);
    if ((rc = ql_mkdir_p(pdir))) {
        free(o);
        return rc;
    }
    clean_stale(o->dest, pdir, base, kind);
    if (snprintf(o->tmp, sizeof o->tmp, "%s/.%s.qlora-tmp.%ld.XXXXXX", pdir, base, (long)getpid()) >= (int)sizeof o->tmp) {
        free(o);
        return ql_error(QL_EINVAL, "output folder name too long: %s", dest);
    }
    if (!mkdtemp(o->tmp)) {
        int e = errno;
        free(o);
        return ql_error(QL_EIO, "cannot create a temporary folder beside %s: %s", dest, strerror(e));
    }
    char pidline[32];
    snprintf(pidline, sizeof pidline, "pid %ld\n", (long)getpid());
    char *mark = ql_path_join(o->tmp, TMP_MARKER);
    rc = mark ? ql_write_file_atomic(mark, pidline, strlen(pidline)) : ql_error(QL_ENOMEM, "out of memory");
    free(mark);
    if (rc) {
        ql_error_context("preparing output %s", o->dest);
        ql_outdir_abandon(o);
        return rc;
    }
    *out = o;
    return QL_OK;
}

const char *ql_outdir_path(const ql_outdir *o) { return o->tmp; }

#ifndef RENAME_NOREPLACE
#define RENAME_NOREPLACE (1 << 0)
#endif
#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif

static int rename2(const char *from, const char *to, unsigned flags)
{
#ifdef SYS_renameat2
    return (int)syscall(SYS_renameat2, AT_FDCWD, from, AT_FDCWD, to, flags);
#else
    (void)from;
    (void)to;
    (void)flags;
    errno = ENOSYS;
    return -1;
#endif
}

/* Replace dest by tmp in two renames, for file systems that cannot exchange
 * two names: the old output is kept under a temporary name until the new one
 * is in place. */
static int replace_in_two_steps(ql_outdir *o)
{
    fprintf(stderr, "qlora: warning: the file system of %s cannot swap two folders in one step; replacing it in two\n",
            o->dest);
    char old[4200];
    snprintf(old, sizeof old, "%s", o->tmp);
    size_t n = strlen(old);
    if (n >= 6) old[n - 6] = '\0';
    strcat(old, "XXXXXX");
    if (!mkdtemp(old) || rmdir(old) != 0 || rename(o->dest, old) != 0)
        return ql_error(QL_EIO, "cannot move the old %s aside: %s", o->dest, strerror(errno));
    if (rename(o->tmp, o->dest) != 0) {
        int e = errno;
        if (rename(old, o->dest) != 0)
            return ql_error(QL_EIO, "cannot rename %s to %s: %s; the old output is in %s", o->tmp, o->dest, strerror(e),
                            old);
        return ql_error(QL_EIO, "cannot rename %s to %s: %s", o->tmp, o->dest, strerror(e));
    }
    snprintf(o->tmp, sizeof o->tmp, "%s", old); /* what is left to remove */
    return QL_OK;
}

int ql_outdir_commit(ql_outdir *o)
{
    int rc = ql_output_mark(o->tmp, o->kind);
    char *mark = rc ? NULL : ql_path_join(o->tmp, TMP_MARKER);
    if (rc == QL_OK && !mark) rc = ql_error(QL_ENOMEM, "out of memory");
    if (rc == QL_OK && unlink(mark) != 0) rc = ql_error(QL_EIO, "cannot remove %s: %s", mark, strerror(errno));
    free(mark);
    if (rc == QL_OK && chmod(o->tmp, 0755) != 0)
        rc = ql_error(QL_EIO, "cannot set the permissions of %s: %s", o->tmp, strerror(errno));
    if (rc == QL_OK) rc = ql_fsync_dir(o->tmp);
    if (rc) {
        ql_error_context("finishing output %s", o->dest);
        ql_outdir_abandon(o);
        return rc;
    }
    int swapped = 0;
    if (ql_path_exists(o->dest)) {
        if (!o->force) rc = ql_error(QL_EEXIST, "output %s appeared while writing; nothing was replaced", o->dest);
        else rc = ql_output_check_replace(o->dest, o->kind, o->inputs, o->n_inputs); /* it may have changed since */
        if (rc == QL_OK) {
            if (rename2(o->tmp, o->dest, RENAME_EXCHANGE) == 0) swapped = 1;
            else if (errno == EINVAL || errno == ENOSYS) {
                if ((rc = replace_in_two_steps(o)) == QL_OK) swapped = 1;
            } else {
                rc = ql_error(QL_EIO, "cannot swap %s into %s: %s", o->tmp, o->dest, strerror(errno));
            }
        }
    } else if (rename2(o->tmp, o->dest, RENAME_NOREPLACE) != 0) {
        if (errno == EINVAL || errno == ENOSYS) {
            if (rename(o->tmp, o->dest) != 0)
                rc = ql_error(QL_EIO, "cannot rename %s to %s: %s", o->tmp, o->dest, strerror(errno));
        } else if (errno == EEXIST) {
            rc = ql_error(QL_EEXIST, "output %s appeared while writing; nothing was replaced", o->dest);
        } else {
            rc = ql_error(QL_EIO, "cannot rename %s to %s: %s", o->tmp, o->dest, strerror(errno));
        }
    }
    if (rc) {
        ql_outdir_abandon(o);
        return rc;
    }
    /* dest is the new output now; o->tmp is the old one when there was one */
    rc = fsync_parent(o->dest);
    if (rc) ql_error_context("putting %s in place", o->dest);
    if (swapped) {
        int saved = ql_error_code();
        char msg[4096];
        snprintf(msg, sizeof msg, "%s", ql_error_message());
        if (ql_remove_tree(o->tmp) != QL_OK)
            fprintf(stderr, "qlora: warning: %s is in place, but its old version in %s could not be removed: %s\n",
                    o->dest, o->tmp, ql_error_message());
        ql_error(saved, "%s", msg);
    }
    free(o);
    return rc;
}

void ql_outdir_abandon(ql_outdir *o)
{
    if (!o) return;
    int saved = ql_error_code();
    char msg[4096];
    snprintf(msg, sizeof msg, "%s", ql_error_message());
    ql_remove_tree(o->tmp);
    ql_error(saved, "%s", msg); /* keep the error that made us abandon */
    free(o);
}
