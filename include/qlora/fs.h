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
/* fsync a folder (so renames into it last); a failure is an error naming it. */
int ql_fsync_dir(const char *dir);
/* Join into a new string (caller frees). */
char *ql_path_join(const char *a, const char *b);

/* Every folder qlora writes holds a marker file naming its kind ("run",
 * "quantized-model", "merged-model", "checkpoint"), so that --force can tell
 * an earlier qlora output from anything else. */
#define QL_OUTPUT_MARKER ".qlora-output"
/* Write DIR/.qlora-output holding `kind`, atomically. */
int ql_output_mark(const char *dir, const char *kind);
/* 1 when `dir` is a real folder (not a symbolic link) holding the marker of
 * `kind` as a plain file (read without following a link), else 0. */
int ql_output_is(const char *dir, const char *kind);
/* May `dest` be replaced by a new output of `kind`?  QL_OK when dest does not
 * exist, or is a real folder (not a symbolic link, not a special file) holding
 * a marker of that kind that neither holds one of `inputs` nor lies inside
 * one.  Otherwise an error naming dest and the reason. */
int ql_output_check_replace(const char *dest, const char *kind, const char *const *inputs, size_t n_inputs);

/* An output folder built under a temporary name beside dest
 * (".NAME.qlora-tmp.PID.XXXXXX") and swapped into place by commit(), which
 * also writes the marker of `kind`; abandon() removes it.  An existing
 * destination is an error unless `force`, and then only an earlier output of
 * the same kind that holds none of `inputs` (see ql_output_check_replace) is
 * replaced, in one step where the file system can exchange two names.
 * begin() removes temporary folders left beside dest by qlora runs that died.
 * `inputs` must stay valid until commit() or abandon(). */
typedef struct ql_outdir ql_outdir;
int ql_outdir_begin(const char *dest, const char *kind, int force, const char *const *inputs, size_t n_inputs,
                    ql_outdir **out);
const char *ql_outdir_path(const ql_outdir *o); /* the temporary folder to write into */
int ql_outdir_commit(ql_outdir *o);            /* frees o */
void ql_outdir_abandon(ql_outdir *o);          /* frees o; NULL ok */

#ifdef __cplusplus
}
#endif
#endif
