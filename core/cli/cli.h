/* What the qlora command's files share. */
#ifndef QLORA_CLI_H
#define QLORA_CLI_H

#include <getopt.h>

/* The command being run ("train", ...), named by every usage error. */
extern const char *command;

/* A mistake on the command line: one line that names the command and where
 * its options are listed; returns the exit status, 2. */
int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* getopt_long's '?' and ':' as a usage error in the house words (main.c). */
int option_error(int c, char **argv, const struct option *longopts);
/* One option line of a --help (NULL dflt: none to show), and its end: the
 * -h line and the example; returns 0. */
void help_opt(const char *flag, const char *what, const char *dflt);
int help_end(const char *example);

/* qlora check-plugin (check_plugin.c) */
int cmd_check_plugin(int argc, char **argv);

/* qlora.py's option names (artidoro/qlora: its dataclasses and the
 * transformers TrainingArguments its scripts pass), rewritten into ours
 * before getopt_long reads the command line; docs/training.md has the table. */
enum { QP_TRAIN = 1, QP_EVAL = 2 };

typedef struct qp_args {
    int argc;
    char **argv;     /* the rewritten command line (argv[0] kept) */
    char **owned;    /* strings made for it */
    int n_owned;
    int quantizer_given; /* -q/--quantizer was on the command line */
    /* --bits, --quant_type, --double_quant as a quantizer spec ("nf4",
     * "fp4:double_quant=0", "int8", "none"); "" when none of them was given */
    char quantizer[64];
    int do_eval;          /* --do_eval (true) */
} qp_args;

/* Rewrite argv for `which` (QP_TRAIN or QP_EVAL); `ours` and `shortopts`
 * are the command's own options, left as they are.  A qlora.py option that
 * has no counterpart here is a usage error naming it (returns 2); an option
 * that has no effect here is taken with a note on stderr.  On success
 * returns 0; qp_free releases *out either way. */
int qp_translate(int which, int argc, char **argv, const struct option *ours, const char *shortopts, qp_args *out);
void qp_free(qp_args *a);

/* why paged_adamw_8bit and the other 8-bit optimizers are refused */
extern const char qp_eight_bit[];

#endif
