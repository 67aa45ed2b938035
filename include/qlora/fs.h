/* Files that are never half-written. */
#ifndef QLORA_FS_H
#define QLORA_FS_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Write to "<path>.tmp.XXXXXX" in the same folder, fsync, rename, fsync the folder. */
int ql_write_file_atomic(const char *path, const void *data, size_t len);
int ql_read_file(const char *path, char **data, size_t *len); /* caller frees; NUL-terminated */
int ql_copy_file_atomic(const char *src, const char *dst);
int ql_path_exists(const char *path);
int ql_is_dir(const char *path);
int ql_mkdir_p(const char *path);
int ql_remove_tree(const char *path);
/* Join into a new string (caller frees). */
char *ql_path_join(const char *a, const char *b);

/* An output folder built under a temporary name and renamed into place by
 * commit(); abandon() removes it.  An existing destination is an error
 * unless `force`, in which case it is replaced only at commit. */
typedef struct ql_outdir ql_outdir;
int ql_outdir_begin(const char *dest, int force, ql_outdir **out);
const char *ql_outdir_path(const ql_outdir *o); /* the temporary folder to write into */
int ql_outdir_commit(ql_outdir *o);            /* frees o */
void ql_outdir_abandon(ql_outdir *o);          /* frees o; NULL ok */

#ifdef __cplusplus
}
#endif
#endif
