/* MMLU evaluation as artidoro/qlora's qlora.py scores it: k-shot prompts from
 * the dev split, the model's logits for the tokens of "A", "B", "C", "D" at
 * the answer position, accuracy per subject and over subjects. */
#ifndef QLORA_MMLU_H
#define QLORA_MMLU_H

#include <stdio.h>

#include "llama.h"
#include "lora.h"
#include "tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ql_mmlu_opts {
    const char *dir;         /* holds dev/ and test/ (or the split named) with SUBJECT_{dev,test}.csv */
    const char *split;       /* "test" (default) or "dev"... any folder name */
    int shots;               /* dev examples in each prompt (qlora.py: 5) */
    int64_t max_per_subject; /* <= 0: all */
    int progress;
    int no_warnings; /* 1: the warnings (letter tokens, fewer shots, cut prompts) are not printed; the JSON has them */
    /* 1: a table of each subject's questions and accuracy, then the
     * averages, before the JSON line (the command does so on a terminal) */
    int table;
    /* 1: every prompt from an empty cache.  0 (default): a prompt reuses the
     * attention cache of the tokens it shares with the one before (the
     * subject's header and dev questions), so only its question is run;
     * not with dynamic RoPE, whose frequencies follow the whole length */
    int no_reuse;
    /* > 1 (with the reuse): up to this many consecutive questions of a
     * subject run together after the prefix they share, one cache row each
     * (ql_lora_model_decode_rows); their scores are those of running them
     * one after another.  0 or 1: one at a time */
    int batch;
    /* the adapter to score with (NULL: the base model; an attached adapter
     * must be passed here), and where, as ql_eval_opts: every prompt goes
     * through the training forward pass's memory plan with a key/value
     * cache (ql_lora_model_decode) */
    const ql_lora *lora;
    const char *device;    /* "cpu" (also NULL), "cuda" or "auto" */
    const char *precision; /* "fp32", "bf16" or "auto"/NULL: bf16 on cuda, fp32 on the CPU */
} ql_mmlu_opts;

/* Prints one JSON object (accuracy = mean over subjects as qlora.py reports
 * it, accuracy_micro over questions, per-subject accuracies) as the last
 * line on `out`. */
int ql_mmlu_eval(ql_llama *m, const ql_tokenizer *tok, const ql_mmlu_opts *opts, FILE *out);

/* One question of a SUBJECT_SPLIT.csv file: question, choice0..3, answer (a
 * digit 0-3 naming the choice). */
typedef struct ql_mmlu_question {
    char *field[6];
} ql_mmlu_question;

/* The prompt of question q as hendrycks' evaluate.py and qlora.py's MMLU files
 * write it: "The following are multiple choice questions (with answers) about
 * " + each word of subject (underscores split words) after a space + ".\n\n",
 * then the first `shots` dev questions as "Q\nA. c0\nB. c1\nC. c2\nD. c3\nAnswer: X\n\n"
 * and q the same way without its answer (ending in "Answer:").  Returns a
 * malloc'd string, NULL when out of memory. */
char *ql_mmlu_prompt(const char *subject, const ql_mmlu_question *dev, int shots, const ql_mmlu_question *q);

/* One CSV record (RFC 4180: quotes, doubled quotes, newlines in quotes) from
 * text at *pos; fields are malloc'd.  Returns the record's field count (fields
 * past max_fields are counted but not kept), 0 at the end, or a negative
 * QL_CSV_* code; on failure every field is freed and set to NULL. */
enum { QL_CSV_UNTERMINATED = -1, QL_CSV_NUL = -2, QL_CSV_NOMEM = -3 };
int ql_csv_record(const char *text, size_t len, size_t *pos, char **fields, int max_fields);

#ifdef __cplusplus
}
#endif
#endif
