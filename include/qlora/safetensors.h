/* safetensors files: strict validating reader (mmap) and atomic writer. */
#ifndef QLORA_SAFETENSORS_H
#define QLORA_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "quantizer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ql_st_file ql_st_file;

/* Open and validate: header length within the file, header a JSON object,
 * every entry with a known dtype, a shape whose byte size equals its
 * data_offsets span, offsets inside the data area and not overlapping. */
int ql_st_open(const char *path, ql_st_file **out);
void ql_st_close(ql_st_file *f);
const char *ql_st_path(const ql_st_file *f);
size_t ql_st_count(const ql_st_file *f);
const ql_tensor *ql_st_at(const ql_st_file *f, size_t i); /* in file order of data offsets */
const ql_tensor *ql_st_find(const ql_st_file *f, const char *name);
/* __metadata__ value or NULL. */
const char *ql_st_metadata(const ql_st_file *f, const char *key);
uint64_t ql_st_file_size(const ql_st_file *f);
/* Done with tensor t of f for now: its pages of the file's mapping are given
 * back (madvise MADV_DONTNEED; the mapping is read-only, so a later read
 * faults them in from the file again).  Loading a checkpoint larger than the
 * host's memory then holds about one tensor of it at a time.  0 when t's
 * data is not in f's mapping (nothing is done). */
int ql_st_release(const ql_st_file *f, const ql_tensor *t);

typedef struct ql_st_writer ql_st_writer;

int ql_st_writer_create(ql_st_writer **out);
/* From now on keep added tensors' data in an (unlinked) temporary file in
 * `dir` instead of memory: for outputs larger than memory.  Put it on the
 * destination's file system so it has the room. */
int ql_st_writer_spill_to(ql_st_writer *w, const char *dir);
void ql_st_writer_destroy(ql_st_writer *w);
/* Copies name and data.  Duplicate names are an error. */
int ql_st_writer_add(ql_st_writer *w, const ql_tensor *t);
int ql_st_writer_set_metadata(ql_st_writer *w, const char *key, const char *value);
size_t ql_st_writer_count(const ql_st_writer *w);
/* Write to a temporary file beside `path`, fsync, rename over `path`.
 * Tensors are laid out in safetensors' canonical order (larger dtypes
 * first, then by name). */
int ql_st_writer_save(ql_st_writer *w, const char *path);

#ifdef __cplusplus
}
#endif
#endif
