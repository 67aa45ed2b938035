#include "progress.h"

#include <stdio.h>
#include <time.h>
#include <unistd.h>

double ql_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void fmt_secs(double s, char *buf, size_t cap)
{
    if (s < 0) s = 0;
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(buf, cap, "%ldh%02ldm", t / 3600, (t / 60) % 60);
    else if (t >= 60) snprintf(buf, cap, "%ldm%02lds", t / 60, t % 60);
    else snprintf(buf, cap, "%lds", t);
}

void ql_progress_begin(ql_progress *p, const char *task, int64_t total, const char *unit, int enabled)
{
    p->task = task;
    p->unit = unit;
    p->total = total;
    p->done = 0;
    p->start = ql_now();
    p->last_print = 0;
    p->enabled = enabled;
    p->tty = isatty(STDERR_FILENO);
}

static void json_escape_print(FILE *f, const char *s)
{
    fputc('"', f);
    for (; s && *s; s++) {
        if (*s == '"' || *s == '\\') fprintf(f, "\\%c", *s);
        else if ((unsigned char)*s < 0x20) fprintf(f, "\\u%04x", *s);
        else fputc(*s, f);
    }
    fputc('"', f);
}

static void print(ql_progress *p, const char *item, int final)
{
    double elapsed = ql_now() - p->start;
    double rate = elapsed > 0 ? (double)p->done / elapsed : 0.0;
    double eta = rate > 0 ? (double)(p->total - p->done) / rate : 0.0;
    if (p->tty) {
        char el[32], et[32];
        fmt_secs(elapsed, el, sizeof el);
        fmt_secs(eta, et, sizeof et);
        fprintf(stderr, "\r\033[K%s %lld/%lld %s  %.1f %s/s  elapsed %s  ETA %s  %s", p->task, (long long)p->done,
                (long long)p->total, p->unit, rate, p->unit, el, et, item ? item : "");
        if (final) fputc('\n', stderr);
    } else {
        fprintf(stderr, "{\"event\": \"progress\", \"task\": \"%s\", \"done\": %lld, \"total\": %lld, \"unit\": \"%s\", "
                        "\"rate\": %.3f, \"elapsed_s\": %.3f, \"eta_s\": %.3f, \"item\": ",
                p->task, (long long)p->done, (long long)p->total, p->unit, rate, elapsed, eta);
        json_escape_print(stderr, item ? item : "");
        fprintf(stderr, "}\n");
    }
    fflush(stderr);
    p->last_print = ql_now();
}

void ql_progress_update(ql_progress *p, int64_t done, const char *item)
{
    p->done = done;
    if (!p->enabled) return;
    double now = ql_now();
    /* a terminal redraws often; logs get a line a second at most; end() prints the last */
    if (done >= p->total || now - p->last_print < (p->tty ? 0.1 : 1.0)) return;
    print(p, item, 0);
}

void ql_progress_end(ql_progress *p)
{
    if (!p->enabled) return;
    print(p, "done", 1);
}
