/* qlora study: what study.c and study_report.c share. */
#ifndef QLORA_CLI_STUDY_H
#define QLORA_CLI_STUDY_H

#include <jansson.h>
#include <stddef.h>

/* STUDY_DIR/report.md and STUDY_DIR/plots/ from the study's study.json
 * alone, each file written whole (temporary file, fsync, rename): 0, or the
 * ql_error code with the message set. */
int study_write_report(const char *dir, const json_t *study);

/* The PLplot version the plots are drawn with, or NULL when this qlora was
 * built without PLplot (meson -Dplplot=disabled). */
const char *study_plplot_version(void);

/* Mean and sample standard deviation (0 for one value) of the finite values of v[n]; the count. */
int study_mean_sd(const double *v, int n, double *mean, double *sd);

#endif
