#include "qlora/fs.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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

static void fsync_parent(const char *path)
{
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    int fd = open(dirname(buf), O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
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
    fsync_parent(path);
    return QL_OK;
}

int ql_read_file(const char *path, char **data, size_t *len)
{
    *data = NULL;
    *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return ql_error(errno == ENOENT ? QL_ENOTFOUND : QL_EIO, "cannot open %s: %s", path, strerror(errno));
    if (fseek(f, 0, SEEK_END) != 0) {
        fclose(f);
        return ql_error(QL_EIO, "cannot seek %s", path);
    }
    long size = ftell(f);
    rewind(f);
    if (size < 0) {
        fclose(f);
        return ql_error(QL_EIO, "cannot size %s", path);
    }
    char *buf = malloc((size_t)size + 1);
    if (!buf) {
        fclose(f);
        return ql_error(QL_ENOMEM, "out of memory reading %s", path);
    }
    if (fread(buf, 1, (size_t)size, f) != (size_t)size) {
        fclose(f);
        free(buf);
        return ql_error(QL_EIO, "cannot read %s", path);
    }
    fclose(f);
    buf[size] = '\0';
    *data = buf;
    *len = (size_t)size;
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

struct ql_outdir {
    char dest[4096];
    char tmp[4096];
    int force;
};

int ql_outdir_begin(const char *dest, int force, ql_outdir **out)
{
    *out = NULL;
    size_t len = strlen(dest);
    while (len > 1 && dest[len - 1] == '/') len--;
    if (len == 0 || len >= 4000) return ql_error(QL_EINVAL, "bad output folder name '%s'", dest);
    if (ql_path_exists(dest) && !force)
        return ql_error(QL_EEXIST, "output %s already exists (use --force to replace it)", dest);
    ql_outdir *o = calloc(1, sizeof *o);
    if (!o) return ql_error(QL_ENOMEM, "out of memory");
    memcpy(o->dest, dest, len);
    o->dest[len] = '\0';
    o->force = force;
    char parent[4096];
    snprintf(parent, sizeof parent, "%s", o->dest);
    int rc = ql_mkdir_p(dirname(parent));
    if (rc) {
        free(o);
        return rc;
    }
    if (snprintf(o->tmp, sizeof o->tmp, "%s.tmp.XXXXXX", o->dest) >= (int)sizeof o->tmp) {
        free(o);
        return ql_error(QL_EINVAL, "output folder name too long");
    }
    if (!mkdtemp(o->tmp)) {
        int e = errno;
        free(o);
        return ql_error(QL_EIO, "cannot create a temporary folder beside %s: %s", dest, strerror(e));
    }
    *out = o;
    return QL_OK;
}

const char *ql_outdir_path(const ql_outdir *o) { return o->tmp; }

int ql_outdir_commit(ql_outdir *o)
{
    int rc = QL_OK;
    char old[4200] = "";
    if (ql_path_exists(o->dest)) {
        if (!o->force) {
            rc = ql_error(QL_EEXIST, "output %s appeared while writing; left the result in %s", o->dest, o->tmp);
            free(o);
            return rc;
        }
        snprintf(old, sizeof old, "%s.old.XXXXXX", o->dest);
        if (!mkdtemp(old) || rmdir(old) != 0 || rename(o->dest, old) != 0) {
            rc = ql_error(QL_EIO, "cannot move the old %s aside: %s", o->dest, strerror(errno));
            free(o);
            return rc;
        }
    }
    if (chmod(o->tmp, 0755) != 0 || rename(o->tmp, o->dest) != 0) {
        rc = ql_error(QL_EIO, "cannot rename %s to %s: %s", o->tmp, o->dest, strerror(errno));
        if (old[0]) rename(old, o->dest);
        free(o);
        return rc;
    }
    fsync_parent(o->dest);
    if (old[0]) rc = ql_remove_tree(old);
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
