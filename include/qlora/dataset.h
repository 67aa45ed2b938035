/* Instruction-tuning and evaluation datasets, tokenized the way
 * artidoro/qlora's qlora.py (DataCollatorForCausalLM) does it:
 *
 *   source ids = BOS + tokens(source text)   cut to source_max_len (BOS included)
 *   target ids = tokens(target text) + EOS   cut to target_max_len (EOS lost if cut)
 *   ids        = source ids + target ids      cut to max_len
 *   labels     = -100 over the source (unless train_on_source), else the id
 *
 * Every cut keeps the beginning.  The `text` format is plain language
 * modelling: ids = BOS + tokens(text) cut to max_len, every position a label.
 *
 * Formats (the JSON ones read either one JSON array of records or JSON
 * Lines, one record per line, blank lines skipped):
 *   alpaca        {instruction, input (optional), output}: source = the Alpaca
 *                 prompt (docs/quant-formats.md), target = output
 *   input-output  {input, output}; self-instruct records: qlora.py's
 *                 {prompt, completion} (source = prompt, target = completion)
 *                 or the released {instruction, instances: [{input, output},
 *                 ...]}, one example per instance (ql_dataset_format_example)
 *   oasst1        {input: "### Human: ... ### Assistant:", output}; a record
 *                 with "text" and neither "input" nor "output" is all target
 *                 (empty source), as qlora.py reads Guanaco's {"text"}
 *   text          plain text, examples separated by blank (whitespace-only)
 *                 lines; an example's lines are kept verbatim */
#ifndef QLORA_DATASET_H
#define QLORA_DATASET_H

#include <stddef.h>
#include <stdint.h>

#include "tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

#define QL_IGNORE_INDEX (-100)

typedef enum { QL_FMT_ALPACA, QL_FMT_INPUT_OUTPUT, QL_FMT_OASST1, QL_FMT_TEXT } ql_data_format;

/* "alpaca", "input-output" (alias "self-instruct"), "oasst1", "text";
 * an unknown name is QL_EINVAL with a message listing the valid ones. */
int ql_data_format_parse(const char *name, ql_data_format *out);
const char *ql_data_format_name(ql_data_format fmt);

/* The format of a dataset file by what it holds, for when none is given:
 * a JSON array, or JSON Lines, whose first record has
 *   instruction and output                      -> alpaca
 *   instruction and instances (self-instruct),
 *   input and output, or prompt and completion  -> input-output
 *   text (Guanaco's {"text": ...})               -> oasst1
 * and a file that starts with neither '[' nor '{' -> text.  `why` (may be
 * NULL) gets what was seen, e.g. "JSON Lines whose first record has "input"
 * and "output"".  JSON that fits none of these, or a file that starts like
 * JSON and is not, is QL_EFORMAT naming what was found. */
int ql_data_format_detect(const char *path, ql_data_format *out, char *why, size_t cap);

typedef struct ql_dataset_opts {
    ql_data_format format;
    int source_max_len; /* tokens, BOS included; <= 0: no limit (qlora.py: 1024) */
    int target_max_len; /* tokens, EOS included; <= 0: no limit (qlora.py: 256) */
    int max_len;        /* cap on the whole example; the only limit for `text`; <= 0: none */
    int train_on_source;
    int64_t max_examples; /* keep the first N examples read (after flattening); <= 0: all */
} ql_dataset_opts;

typedef struct ql_example {
    int32_t *ids;     /* (len) */
    int32_t *labels;  /* (len) QL_IGNORE_INDEX where no loss is taken */
    int32_t len;
    int32_t n_source; /* leading source tokens (BOS included); 0 for `text` */
} ql_example;

typedef struct ql_dataset {
    ql_example *examples; /* (n) in file order */
    size_t n;
    /* stats for the trainer's log */
    size_t n_read;          /* examples read (up to max_examples), before dropping */
    size_t n_truncated;     /* kept examples that lost tokens to any of the three limits */
    size_t n_dropped_empty; /* examples dropped because no target token survived truncation */
    int64_t total_tokens;        /* sum of len over kept examples */
    int64_t total_target_tokens; /* positions >= 1 with a label: what the loss covers */
    int32_t *storage;            /* every example's ids and labels; one allocation */
} ql_dataset;

/* Read, format and tokenize a dataset file.  Errors name the file and the
 * line (JSON Lines, text) or record index (JSON array, counted from 0) and,
 * for a bad record, the field.  An example whose target part has no token
 * at position >= 1 after truncation is dropped; a dataset with nothing left
 * is QL_EINVAL ("no examples left after filtering: ..."). */
int ql_dataset_load(const char *path, const ql_tokenizer *tok, const ql_dataset_opts *opts, ql_dataset **out);
void ql_dataset_destroy(ql_dataset *d);

/* The source and target strings of one record before tokenization (caller
 * frees both).  `record` is one JSON object for the JSON formats (a
 * self-instruct record must then hold exactly one instance) or one
 * example's text for QL_FMT_TEXT (kept as is but for CRLF line ends; the
 * source is empty).
 *
 * Self-instruct flattening is our choice (qlora.py expects prompt/completion
 * columns): source = instruction + ("\n" + input if input is non-empty),
 * target = output. */
int ql_dataset_format_example(ql_data_format fmt, const char *record, char **source, char **target);

/* An epoch's order of example indices, written to order[0..n-1].
 *   seed >= 0: a Fisher-Yates shuffle (i from n-1 down to 1, j uniform in
 *              [0, i] by rejection sampling) driven by splitmix64 seeded
 *              with `seed`; seed < 0: file order.
 *   group_by_length: then, like HF's LengthGroupedSampler, cut that order
 *              into mega-batches of batch_size * min(n / (4 * batch_size), 50)
 *              (at least batch_size), sort each by length descending (stable),
 *              and swap the longest example overall to position 0 so the
 *              first batch shows the peak memory use.  HF draws its
 *              permutation with torch.randperm and qlora.py measures length
 *              in characters; we use our permutation and token counts. */
int ql_dataset_order(const ql_dataset *d, int64_t seed, int group_by_length, int batch_size, size_t *order);

/* Hold out n_eval of d's examples for evaluation, as qlora.py's
 * train_test_split(test_size=n_eval, shuffle=True, seed=42) does: the
 * first n_eval of ql_dataset_order(d, seed) are *eval, the rest *train,
 * each kept in file order.  Both are views of d's examples (destroy them
 * before d); their n_read is their n and they count no truncation.
 * n_eval must be from 1 to d->n - 1. */
int ql_dataset_split(const ql_dataset *d, size_t n_eval, int64_t seed, ql_dataset **train, ql_dataset **eval);

#ifdef __cplusplus
}
#endif
#endif
