/* A Hugging Face checkpoint folder: config.json plus model.safetensors or
 * shards listed by model.safetensors.index.json. */
#ifndef QLORA_MODEL_H
#define QLORA_MODEL_H

#include <stddef.h>

#include "quantizer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ql_model_files ql_model_files;

int ql_model_files_open(const char *dir, ql_model_files **out);
void ql_model_files_close(ql_model_files *m);
const char *ql_model_files_dir(const ql_model_files *m);
/* config.json as a jansson json_t * (borrowed). */
void *ql_model_files_config(const ql_model_files *m);
size_t ql_model_files_count(const ql_model_files *m);
const ql_tensor *ql_model_files_at(const ql_model_files *m, size_t i); /* sorted by name */
const ql_tensor *ql_model_files_find(const ql_model_files *m, const char *name);
/* Done with t for now: its pages of its shard's mapping are given back
 * (ql_st_release); a later read of t still works. */
void ql_model_files_release(const ql_model_files *m, const ql_tensor *t);

/* 1 if `name` is the weight of a linear layer of a decoder block that
 * quantizers replace (q, k, v, o, gate, up, down projections); the module
 * prefix (without ".weight") is copied to `prefix`. */
int ql_is_block_linear(const char *name, char *prefix, size_t cap);

#ifdef __cplusplus
}
#endif
#endif
