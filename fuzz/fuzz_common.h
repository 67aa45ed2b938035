/* Shared helpers for the libFuzzer harnesses (docs/fuzzing.md).
 *
 * Most of qlora's readers take a path, so a harness writes its input into a
 * per-process folder on tmpfs (/dev/shm when it exists) and hands the reader
 * that path.  Inputs that stand for several files are cut at QF_SEP (the
 * seeds are built that way and fuzz/qlora.dict holds it, so mutations keep
 * the parts apart). */
#ifndef QLORA_FUZZ_COMMON_H
#define QLORA_FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>

#define QF_SEP "\n#qlora-fuzz-next-file#\n"

/* The per-process scratch folder, created on first use and removed at exit. */
const char *qf_dir(void);
/* qf_dir()/name (malloc'ed). */
char *qf_path(const char *name);
/* Write data to qf_dir()/name (replacing it); returns the full path (malloc'ed). */
char *qf_write(const char *name, const void *data, size_t len);
/* Write to an arbitrary path; aborts on I/O failure (the harness, not the input, is broken). */
void qf_write_path(const char *path, const void *data, size_t len);
void qf_mkdir(const char *path);

/* Cut data at QF_SEP into at most max parts; returns the count (>= 1). */
size_t qf_split(const uint8_t *data, size_t len, const uint8_t **part, size_t *part_len, size_t max);

/* ../shared (QLORA_SHARED, else the source tree's sibling). */
const char *qf_shared(void);
/* A tiny LLaMA model folder (2 layers, hidden 16, vocab 512, the stories260K
 * tokenizer), written once into dir (created). */
void qf_write_tiny_model(const char *dir);
/* qf_dir()/tiny-model, written on first use. */
const char *qf_tiny_model(void);

/* dlopen every plugin on the search path with RTLD_NODELETE, once: libFuzzer
 * keeps reading the coverage counters of every instrumented module it has
 * seen, so a plugin the library dlclose()s must stay mapped. */
void qf_pin_plugins(void);

/* The tiny model quantized with spec ("nf4", "int8", ...), made on first use. */
const char *qf_quantized_model(const char *spec);

/* The library's contract on a failed call: a known status with a message.
 * QLORA_FUZZ_VERBOSE=1 prints every outcome (to check that seeds load). */
void qf_check_status(int rc, const char *what);

/* A deterministic choice from the input: FNV-1a of the bytes. */
uint64_t qf_hash(const uint8_t *data, size_t len);

#endif
