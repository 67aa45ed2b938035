/* JSON text as Python's json.dumps writes it (shortest round-trip floats,
 * ", " and ": " separators), so files we write read like the ones
 * transformers and peft write (internal). */
#ifndef QL_JSON_OUT_H
#define QL_JSON_OUT_H

#include <jansson.h>

/* indent 0: one line; sort_keys as json.dumps(sort_keys=True).  Caller frees. */
char *ql_json_dumps_py(const json_t *v, int indent, int sort_keys);

/* A float as the shortest decimal that reads back as that float (not its
 * double widening): 0.05f is written 0.05. */
json_t *ql_json_float(float f);

/* json_loadb that also reads integers beyond 64 bits, as Python's json
 * does: such a literal (transformers writes "model_max_length":
 * 1000000000000000019884624838656 into most tokenizer_config.json files)
 * becomes a real, so a field that must be an integer still fails its type
 * check and one that is only range-checked can be read.  Everything else is
 * json_loadb's, flags included. */
json_t *ql_json_loadb(const char *text, size_t len, size_t flags, json_error_t *err);

/* json_load_file, but through ql_read_file: a FIFO or other special file is
 * refused instead of blocking; big integers as ql_json_loadb.  On failure err->text holds the reason. */
json_t *ql_json_load_path(const char *path, size_t flags, json_error_t *err);

#endif
