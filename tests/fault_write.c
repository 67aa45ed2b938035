/* An LD_PRELOAD module that makes writes fail, for the fault-injection tests
 * (tests/test_outputs.c).  Only writes to regular files whose path matches
 * QL_FAULT_PATH (an fnmatch pattern; '*' also matches '/') are touched, so
 * the captured stdout and stderr of the program are never affected.
 *
 *   QL_FAULT_PATH=PATTERN      which files (required; nothing fails without it)
 *   QL_FAULT_ERRNO=ENOSPC|EIO  the error (default ENOSPC)
 *   QL_FAULT_AFTER_BYTES=N     fail once N bytes in all have gone to matching files
 *                              (the write that crosses N is cut short there)
 *   QL_FAULT_ON_CALL=N         fail the Nth write call to a matching file and every later one
 *   QL_FAULT_FSYNC=1           fsync/fdatasync of matching regular files fail
 *   QL_FAULT_FSYNC_DIR=1       fsync of matching folders fails
 *   QL_FAULT_KILL_RENAME=PAT   SIGKILL the process right after a rename whose source
 *                              or target matches PAT (rename, renameat, renameat2 and
 *                              syscall(SYS_renameat2)): a kill "between two steps"
 *   QL_FAULT_NO_RENAMEAT2=1    renameat2 fails with ENOSYS, as on a file system
 *                              (or kernel) that cannot exchange two names
 *
 * Interposed: write, pwrite, pwrite64, writev, pwritev, fwrite, fputs, fputc,
 * putc, fprintf, vfprintf, fflush, fclose, fsync, fdatasync, copy_file_range,
 * sendfile, rename, renameat, renameat2, syscall.  The safetensors writer
 * spills tensors to an unlinked file with pwrite; its path reads as
 * "DIR/.tensors.XXXXXX (deleted)", which the pattern still matches. */
/* pwrite and pwrite64 are both interposed: keep them two symbols */
#undef _FILE_OFFSET_BITS
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

static long long bytes_written, calls;

static void *next(const char *name)
{
    void *f = dlsym(RTLD_NEXT, name);
    if (!f) {
        static const char msg[] = "fault_write: missing symbol\n";
        ssize_t r = syscall(SYS_write, 2, msg, sizeof msg - 1);
        (void)r;
        abort();
    }
    return f;
}

/* Store the next definition of `name` in *slot (a function pointer). */
static void resolve(void *slot, size_t size, const char *name)
{
    void *f = next(name);
    memcpy(slot, &f, size);
}

static int fault_errno(void)
{
    const char *e = getenv("QL_FAULT_ERRNO");
    if (!e || !*e || !strcmp(e, "ENOSPC")) return ENOSPC;
    if (!strcmp(e, "EIO")) return EIO;
    if (!strcmp(e, "EDQUOT")) return EDQUOT;
    return atoi(e) > 0 ? atoi(e) : ENOSPC;
}

static long long env_ll(const char *name)
{
    const char *v = getenv(name);
    return v && *v ? atoll(v) : -1;
}

/* Does fd name a matching file (regular, or a folder when dirs)? */
static int fd_matches(int fd, int dirs)
{
    const char *pat = getenv("QL_FAULT_PATH");
    if (!pat || !*pat) return 0;
    struct stat st;
    if (fstat(fd, &st) != 0) return 0;
    if (!(S_ISREG(st.st_mode) || (dirs && S_ISDIR(st.st_mode)))) return 0;
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0) return 0;
    path[n] = '\0';
    return fnmatch(pat, path, 0) == 0;
}

/* How many of `len` bytes may go to fd now: len, fewer, or -1 with errno set. */
static ssize_t allow(int fd, size_t len)
{
    if (!fd_matches(fd, 0)) return (ssize_t)len;
    long long on_call = env_ll("QL_FAULT_ON_CALL"), after = env_ll("QL_FAULT_AFTER_BYTES");
    calls++;
    if (on_call > 0 && calls >= on_call) {
        errno = fault_errno();
        return -1;
    }
    if (after >= 0) {
        if (bytes_written >= after) {
            errno = fault_errno();
            return -1;
        }
        if ((long long)len > after - bytes_written) len = (size_t)(after - bytes_written);
    }
    bytes_written += (long long)len;
    return (ssize_t)len;
}

EXPORT ssize_t write(int fd, const void *buf, size_t len)
{
    static ssize_t (*real)(int, const void *, size_t);
    if (!real) resolve(&real, sizeof real, "write");
    ssize_t n = allow(fd, len);
    return n < 0 ? -1 : real(fd, buf, (size_t)n);
}

EXPORT ssize_t pwrite(int fd, const void *buf, size_t len, off_t at)
{
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real) resolve(&real, sizeof real, "pwrite");
    ssize_t n = allow(fd, len);
    return n < 0 ? -1 : real(fd, buf, (size_t)n, at);
}

EXPORT ssize_t pwrite64(int fd, const void *buf, size_t len, off64_t at)
{
    static ssize_t (*real)(int, const void *, size_t, off64_t);
    if (!real) resolve(&real, sizeof real, "pwrite64");
    ssize_t n = allow(fd, len);
    return n < 0 ? -1 : real(fd, buf, (size_t)n, at);
}

static size_t iov_total(const struct iovec *iov, int cnt)
{
    size_t t = 0;
    for (int i = 0; i < cnt; i++) t += iov[i].iov_len;
    return t;
}

EXPORT ssize_t writev(int fd, const struct iovec *iov, int cnt)
{
    static ssize_t (*real)(int, const struct iovec *, int);
    if (!real) resolve(&real, sizeof real, "writev");
    size_t total = iov_total(iov, cnt);
    ssize_t n = allow(fd, total);
    if (n < 0) return -1;
    if ((size_t)n < total) return write(fd, iov[0].iov_base, iov[0].iov_len < (size_t)n ? iov[0].iov_len : (size_t)n);
    return real(fd, iov, cnt);
}

EXPORT ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t at)
{
    static ssize_t (*real)(int, const struct iovec *, int, off_t);
    if (!real) resolve(&real, sizeof real, "pwritev");
    if (fd_matches(fd, 0) && allow(fd, iov_total(iov, cnt)) != (ssize_t)iov_total(iov, cnt)) {
        errno = fault_errno();
        return -1;
    }
    return real(fd, iov, cnt, at);
}

EXPORT ssize_t copy_file_range(int in, off_t *inoff, int out, off_t *outoff, size_t len, unsigned flags)
{
    static ssize_t (*real)(int, off_t *, int, off_t *, size_t, unsigned);
    if (!real) resolve(&real, sizeof real, "copy_file_range");
    ssize_t n = allow(out, len);
    return n < 0 ? -1 : real(in, inoff, out, outoff, (size_t)n, flags);
}

EXPORT ssize_t sendfile(int out, int in, off_t *off, size_t len)
{
    static ssize_t (*real)(int, int, off_t *, size_t);
    if (!real) resolve(&real, sizeof real, "sendfile");
    ssize_t n = allow(out, len);
    return n < 0 ? -1 : real(out, in, off, (size_t)n);
}

/* stdio writes go to the kernel through glibc's internal write, which an
 * LD_PRELOAD module cannot see: check them at the stdio call instead. */
static int stream_fails(FILE *f, size_t len)
{
    int fd = fileno(f);
    if (fd < 0) return 0;
    ssize_t n = allow(fd, len);
    if (n == (ssize_t)len) return 0;
    if (n >= 0) errno = fault_errno();
    return 1;
}

EXPORT size_t fwrite(const void *p, size_t size, size_t n, FILE *f)
{
    static size_t (*real)(const void *, size_t, size_t, FILE *);
    if (!real) resolve(&real, sizeof real, "fwrite");
    if (size && n && stream_fails(f, size * n)) return 0;
    return real(p, size, n, f);
}

EXPORT int fputs(const char *s, FILE *f)
{
    static int (*real)(const char *, FILE *);
    if (!real) resolve(&real, sizeof real, "fputs");
    if (stream_fails(f, strlen(s))) return EOF;
    return real(s, f);
}

EXPORT int fputc(int c, FILE *f)
{
    static int (*real)(int, FILE *);
    if (!real) resolve(&real, sizeof real, "fputc");
    if (stream_fails(f, 1)) return EOF;
    return real(c, f);
}

EXPORT int putc(int c, FILE *f)
{
    return fputc(c, f);
}

EXPORT int vfprintf(FILE *f, const char *fmt, va_list ap)
{
    static int (*real)(FILE *, const char *, va_list);
    if (!real) resolve(&real, sizeof real, "vfprintf");
    va_list cp;
    va_copy(cp, ap);
    int len = vsnprintf(NULL, 0, fmt, cp);
    va_end(cp);
    if (len > 0 && stream_fails(f, (size_t)len)) return -1;
    return real(f, fmt, ap);
}

EXPORT int fprintf(FILE *f, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = vfprintf(f, fmt, ap);
    va_end(ap);
    return r;
}

EXPORT int fsync(int fd)
{
    static int (*real)(int);
    if (!real) resolve(&real, sizeof real, "fsync");
    const char *f = getenv("QL_FAULT_FSYNC"), *d = getenv("QL_FAULT_FSYNC_DIR");
    struct stat st;
    int is_dir = fstat(fd, &st) == 0 && S_ISDIR(st.st_mode);
    if (((f && *f == '1' && !is_dir) || (d && *d == '1' && is_dir)) && fd_matches(fd, 1)) {
        errno = fault_errno();
        return -1;
    }
    return real(fd);
}

EXPORT int fdatasync(int fd)
{
    static int (*real)(int);
    if (!real) resolve(&real, sizeof real, "fdatasync");
    const char *f = getenv("QL_FAULT_FSYNC");
    if (f && *f == '1' && fd_matches(fd, 0)) {
        errno = fault_errno();
        return -1;
    }
    return real(fd);
}

/* ---- kills between two renames ---- */

static void kill_if(const char *a, const char *b)
{
    const char *pat = getenv("QL_FAULT_KILL_RENAME");
    if (!pat || !*pat) return;
    if ((a && fnmatch(pat, a, 0) == 0) || (b && fnmatch(pat, b, 0) == 0)) raise(SIGKILL);
}

EXPORT int rename(const char *a, const char *b)
{
    static int (*real)(const char *, const char *);
    if (!real) resolve(&real, sizeof real, "rename");
    int r = real(a, b);
    if (r == 0) kill_if(a, b);
    return r;
}

EXPORT int renameat(int da, const char *a, int db, const char *b)
{
    static int (*real)(int, const char *, int, const char *);
    if (!real) resolve(&real, sizeof real, "renameat");
    int r = real(da, a, db, b);
    if (r == 0) kill_if(a, b);
    return r;
}

EXPORT int renameat2(int da, const char *a, int db, const char *b, unsigned flags)
{
    static int (*real)(int, const char *, int, const char *, unsigned);
    if (!real) resolve(&real, sizeof real, "renameat2");
    const char *no = getenv("QL_FAULT_NO_RENAMEAT2");
    if (no && *no == '1') {
        errno = ENOSYS;
        return -1;
    }
    int r = real(da, a, db, b, flags);
    if (r == 0) kill_if(a, b);
    return r;
}

EXPORT long syscall(long nr, ...)
{
    va_list ap;
    va_start(ap, nr);
    long a[6];
    for (int i = 0; i < 6; i++) a[i] = va_arg(ap, long);
    va_end(ap);
    static long (*real)(long, ...);
    if (!real) resolve(&real, sizeof real, "syscall");
#ifdef SYS_renameat2
    const char *no = getenv("QL_FAULT_NO_RENAMEAT2");
    if (nr == SYS_renameat2 && no && *no == '1') {
        errno = ENOSYS;
        return -1;
    }
#endif
    long r = real(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
#ifdef SYS_renameat2
    if (nr == SYS_renameat2 && r == 0) kill_if((const char *)a[1], (const char *)a[3]);
#endif
    return r;
}
