/* Progress of long work on stderr: one live line with rate and ETA on a
 * terminal, JSON lines otherwise (internal). */
#ifndef QL_PROGRESS_H
#define QL_PROGRESS_H

#include <stdint.h>

typedef struct ql_progress {
    const char *task;
    const char *unit;
    int64_t total;
    int64_t done;
    double start;
    double last_print;
    int enabled;
    int tty;
} ql_progress;

double ql_now(void); /* monotonic seconds */
void ql_progress_begin(ql_progress *p, const char *task, int64_t total, const char *unit, int enabled);
void ql_progress_update(ql_progress *p, int64_t done, const char *item);
void ql_progress_end(ql_progress *p);

#endif
