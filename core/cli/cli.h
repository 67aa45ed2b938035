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

/* ---- main.c's helpers that other commands' files use (study.c) ---- */

#include "qlora/dataset.h"
#include "qlora/train.h"

/* "qlora: error: MESSAGE" on stderr; returns the exit status (rc, or 1) */
int fail(int rc);
/* --device when not given: $QLORA_DEVICE, else auto */
const char *default_device(void);
/* `value` one of the space-separated `allowed` words, else a usage error listing `say` */
int choice(const char *flag, const char *value, const char *allowed, const char *say, const char **out);
/* strict numbers of flags: a usage error unless the whole argument is one in [lo, hi] */
int parse_long_arg(const char *flag, const char *s, long lo, long hi, long *out);
int parse_float_arg(const char *flag, const char *s, double lo, double hi, double *out);
/* --format not given: detected from the file, said on stderr as a JSON line */
int detect_format(const char *path, ql_data_format *fmt);
/* more lines of a --help (help_opt, help_end above) */
void help_int(const char *flag, const char *what, long long dflt);
void help_device(void);
void help_quiet(void);

/* train's options (getopt_long's table) and their parse into *o (o->calib
 * may point to *calib): 0; -1 after printing the help; else the exit
 * status, the error said.  The options of qlora study's runs go through it. */
extern const struct option train_options[];
int train_parse(int argc, char **argv, const qp_args *qp, ql_train_opts *o, ql_calib_opts *calib);

/* qlora study (study.c) */
int cmd_study(int argc, char **argv);

/* qlora launch (launch.c) */
int cmd_launch(int argc, char **argv);

#endif
