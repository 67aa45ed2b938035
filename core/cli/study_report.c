/* qlora study's report: report.md and the plots, from study.json alone, so
 * that --report rebuilds them the same from what is there. */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "study.h"
#include "qlora/qlora.h"

#ifdef QL_HAVE_PLPLOT
#include <plplot.h>
#endif

int study_mean_sd(const double *v, int n, double *mean, double *sd)
{
    double sum = 0;
    int k = 0;
    for (int i = 0; i < n; i++)
        if (isfinite(v[i])) sum += v[i], k++;
    *mean = k ? sum / k : NAN;
    double ss = 0;
    for (int i = 0; i < n; i++)
        if (isfinite(v[i])) ss += (v[i] - *mean) * (v[i] - *mean);
    *sd = k > 1 ? sqrt(ss / (k - 1)) : 0;
    return k;
}

static const char *jstr(const json_t *o, const char *key)
{
    const json_t *v = json_object_get(o, key);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

static double jnumv(const json_t *o, const char *key)
{
    const json_t *v = json_object_get(o, key);
    return json_is_number(v) ? json_number_value(v) : NAN;
}

/* "a.b" of a run */
static double run_num(const json_t *run, const char *path)
{
    const char *dot = strchr(path, '.');
    if (!dot) return jnumv(run, path);
    char head[64];
    snprintf(head, sizeof head, "%.*s", (int)(dot - path), path);
    return jnumv(json_object_get(run, head), dot + 1);
}

#define MAX_SEEDS 256

/* One quantizer's finished runs */
typedef struct group {
    const char *spec;
    const json_t *runs[MAX_SEEDS];
    int n, failed, total;
} group;

typedef struct report {
    const json_t *doc;
    group *g;
    int ng;
    int n_seeds;
    int none_index; /* the group of "none", or -1 */
} report;

static int make_groups(const json_t *doc, report *r)
{
    const json_t *qs = json_object_get(json_object_get(doc, "settings"), "quantizers");
    r->doc = doc;
    r->ng = (int)json_array_size(qs);
    r->n_seeds = (int)json_array_size(json_object_get(json_object_get(doc, "settings"), "seeds"));
    r->g = calloc(r->ng ? (size_t)r->ng : 1, sizeof *r->g);
    if (!r->g) return ql_error(QL_ENOMEM, "out of memory");
    r->none_index = -1;
    for (int i = 0; i < r->ng; i++) {
        r->g[i].spec = json_string_value(json_array_get(qs, (size_t)i));
        if (r->g[i].spec && !strcmp(r->g[i].spec, "none")) r->none_index = i;
    }
    size_t k;
    json_t *run;
    json_array_foreach(json_object_get(doc, "runs"), k, run) {
        for (int i = 0; i < r->ng; i++) {
            if (!r->g[i].spec || !jstr(run, "quantizer") || strcmp(jstr(run, "quantizer"), r->g[i].spec)) continue;
            r->g[i].total++;
            const char *st = jstr(run, "status");
            if (st && !strcmp(st, "failed")) r->g[i].failed++;
            if (st && !strcmp(st, "done") && r->g[i].n < MAX_SEEDS) r->g[i].runs[r->g[i].n++] = run;
        }
    }
    return QL_OK;
}

static void group_stat(const group *g, const char *path, double *mean, double *sd, int *n)
{
    double v[MAX_SEEDS];
    for (int i = 0; i < g->n; i++) v[i] = run_num(g->runs[i], path);
    int k = study_mean_sd(v, g->n, mean, sd);
    if (n) *n = k;
}

/* mean ± sd with `digits` decimals ("-" when none) */
static void fmt_ms(char *buf, size_t cap, const group *g, const char *path, int digits, double scale)
{
    double m, sd;
    int n;
    group_stat(g, path, &m, &sd, &n);
    if (!n) snprintf(buf, cap, "-");
    else if (n == 1 || sd * scale < 0.5 * pow(10, -digits))
        snprintf(buf, cap, "%.*f", digits, m * scale); /* one value, or the same for every seed */
    else snprintf(buf, cap, "%.*f ± %.*f", digits, m * scale, digits, sd * scale);
}

/* The eval NLL after finetuning minus none's of the same seed (the same
 * LoRA initialisation and data order), mean ± sd over the seeds both finished */
static void paired_delta(const report *r, const group *g, char *buf, size_t cap)
{
    double d[MAX_SEEDS];
    int n = 0;
    snprintf(buf, cap, "-");
    if (r->none_index < 0) return;
    const group *none = &r->g[r->none_index];
    for (int i = 0; i < g->n; i++)
        for (int k = 0; k < none->n; k++)
            if (json_integer_value(json_object_get(g->runs[i], "seed")) ==
                json_integer_value(json_object_get(none->runs[k], "seed")))
                d[n++] = run_num(g->runs[i], "after.nll") - run_num(none->runs[k], "after.nll");
    double m, sd;
    int k = study_mean_sd(d, n, &m, &sd);
    if (k == 1 || (k > 1 && sd < 5e-5)) snprintf(buf, cap, "%+.4f", m);
    else if (k > 1) snprintf(buf, cap, "%+.4f ± %.4f", m, sd);
}

/* A markdown table cell: | and newlines would end it */
static void cell(FILE *f, const char *text)
{
    for (const char *p = text ? text : ""; *p; p++) {
        if (*p == '|') fputs("\\|", f);
        else if (*p == '\n') fputc(' ', f);
        else fputc(*p, f);
    }
}

/* The command as a shell line: words with anything but [A-Za-z0-9_./:=,+-] quoted */
static void shell_line(FILE *f, const json_t *cmd)
{
    size_t i;
    json_t *w;
    json_array_foreach(cmd, i, w) {
        const char *s = json_string_value(w);
        if (!s) continue;
        if (i) fputc(' ', f);
        int plain = *s != '\0';
        for (const char *p = s; *p; p++)
            if (!strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./:=,+-@%", *p)) plain = 0;
        if (plain) fputs(s, f);
        else {
            fputc('\'', f);
            for (const char *p = s; *p; p++)
                if (*p == '\'') fputs("'\\''", f);
                else fputc(*p, f);
            fputc('\'', f);
        }
    }
}

/* ---- plots ---- */

typedef struct plot_status {
    int drawn;          /* 1: every plot was drawn */
    char why[512];      /* when not */
} plot_status;

#ifdef QL_HAVE_PLPLOT

const char *study_plplot_version(void)
{
    static char v[80];
    if (!v[0]) plgver(v);
    return v;
}

/* A colour-blind-safe palette (Okabe and Ito), cmap0 2.. */
static const int palette[][3] = {{0, 0, 0},       {230, 159, 0},   {86, 180, 233}, {0, 158, 115},
                                 {213, 94, 0},    {0, 114, 178},   {204, 121, 167}, {120, 120, 120},
                                 {240, 228, 66},  {153, 51, 0}};
#define NPAL ((int)(sizeof palette / sizeof palette[0]))

static void set_colours(void)
{
    PLINT r[2 + NPAL], g[2 + NPAL], b[2 + NPAL];
    r[0] = g[0] = b[0] = 255; /* background */
    r[1] = g[1] = b[1] = 0;   /* axes and text */
    for (int i = 0; i < NPAL; i++) r[2 + i] = palette[i][0], g[2 + i] = palette[i][1], b[2 + i] = palette[i][2];
    plscmap0(r, g, b, 2 + NPAL);
}

static int colour_of(int i) { return 2 + i % NPAL; }

static int have_device(const char *name)
{
    const char **menus, **devs;
    int n = 64;
    menus = calloc((size_t)n, sizeof *menus);
    devs = calloc((size_t)n, sizeof *devs);
    int found = 0;
    if (menus && devs) {
        plgDevs(&menus, &devs, &n);
        for (int i = 0; i < n; i++)
            if (devs[i] && !strcmp(devs[i], name)) found = 1;
    }
    free(menus);
    free(devs);
    return found;
}

/* One plot into `tmp` with PLplot's device `dev` (pngcairo, svgcairo) */
static void plot_open(const char *dev, const char *tmp)
{
    plsdev(dev);
    plsfnam(tmp);
    plspage(0, 0, 1000, 600, 0, 0);
    set_colours();
    plinit();
    pladv(0);
    plschr(0, 1.0);
    plwidth(1);
}

/* A quantizer's name in a plot: a path as its file name ("build/examples/rtn_int4.so" is rtn_int4.so) */
static const char *short_name(const char *spec)
{
    const char *colon = strchr(spec, ':'), *slash = strrchr(spec, '/');
    if (ql_qz_spec_is_path(spec) && slash && (!colon || slash < colon)) return slash + 1;
    return spec;
}

/* The legend at the right of the plot: line samples, symbols (filled circles;
 * the last entry a hollow one when hollow_last) */
static void legend(int n, const char *const *text, const int *colours, int lines, int symbols, int hollow_last)
{
    PLINT opt[66], tc[66], lc[66], ls[66], sc[66], sn[66];
    PLFLT lw[66], ss[66];
    const char *sym[66];
    if (n > 66) n = 66;
    for (int i = 0; i < n; i++) {
        int hollow = hollow_last && i == n - 1;
        opt[i] = (lines && !hollow ? PL_LEGEND_LINE : 0) | (symbols || hollow ? PL_LEGEND_SYMBOL : 0);
        tc[i] = 1;
        lc[i] = colours[i];
        ls[i] = 1;
        lw[i] = 2.5;
        sc[i] = colours[i];
        ss[i] = 1.2;
        sn[i] = 1;
        sym[i] = hollow ? "#(840)" : "#(850)"; /* a hollow, a filled circle (Hershey) */
    }
    PLFLT w, h;
    pllegend(&w, &h, PL_LEGEND_BACKGROUND | PL_LEGEND_BOUNDING_BOX, PL_POSITION_RIGHT | PL_POSITION_OUTSIDE, 0.015, 0.0,
             0.05, 0, 1, 1, 0, 0, n, opt, 0.8, 0.75, 2.0, 0.0, tc, text, NULL, NULL, NULL, NULL, lc, ls, lw, sc, ss, sn,
             sym);
}

/* The plot's box: viewport, window, title, axis labels (the y label clear of wide tick labels) */
static void frame(double xmin, double xmax, double ymin, double ymax, const char *xopt, const char *yopt,
                  const char *title, const char *subtitle, const char *xlabel, const char *ylabel)
{
    plvpor(0.10, 0.70, 0.12, 0.86);
    plwind(xmin, xmax, ymin, ymax);
    plcol0(1);
    plbox(xopt, 0, 0, yopt, 0, 0);
    plschr(0, 1.15);
    plmtex("t", 3.2, 0.5, 0.5, title);
    plschr(0, 0.85);
    if (subtitle) plmtex("t", 1.6, 0.5, 0.5, subtitle);
    plschr(0, 1.0);
    plmtex("b", 3.2, 0.5, 0.5, xlabel);
    plmtex("l", 5.0, 0.5, 0.5, ylabel);
}

/* x, y ranges with a margin */
static void pad_range(double *lo, double *hi, double frac)
{
    if (!isfinite(*lo) || !isfinite(*hi)) *lo = 0, *hi = 1;
    if (*hi <= *lo) *lo -= 0.5, *hi += 0.5;
    double d = (*hi - *lo) * frac;
    *lo -= d;
    *hi += d;
}

static const char *model_name(const json_t *doc)
{
    const char *m = jstr(json_object_get(doc, "settings"), "model");
    const char *slash = m ? strrchr(m, '/') : NULL;
    return slash ? slash + 1 : m ? m : "model";
}

static void seeds_note(const report *r, char *buf, size_t cap, const char *what)
{
    if (r->n_seeds > 1) snprintf(buf, cap, "%s, mean of %d seeds%s", model_name(r->doc), r->n_seeds, what);
    else snprintf(buf, cap, "%s, one seed%s", model_name(r->doc), strstr(what, ");") ? strstr(what, ");") + 1 : "");
}

/* Training loss against step: each quantizer's mean over its seeds, as a
 * trailing moving average (one micro-batch a step is too noisy to tell the
 * lines apart) */
static void draw_loss(const report *r, const char *dev, const char *tmp)
{
    plot_open(dev, tmp);
    int maxlen = 0;
    for (int i = 0; i < r->ng; i++)
        for (int k = 0; k < r->g[i].n; k++) {
            int len = (int)json_array_size(json_object_get(r->g[i].runs[k], "loss_curve"));
            if (len > maxlen) maxlen = len;
        }
    /* the window, about a twentieth of the run */
    int window = maxlen >= 40 ? maxlen / 20 : 1;
    double *x = calloc((size_t)(maxlen + 1) * (size_t)(r->ng + 1), sizeof *x);
    double *y = calloc((size_t)(maxlen + 1) * (size_t)(r->ng + 1), sizeof *y);
    int *lens = calloc((size_t)r->ng + 1, sizeof *lens);
    double xmax = 1, ymin = INFINITY, ymax = -INFINITY;
    for (int i = 0; i < r->ng && x && y && lens; i++) {
        if (!r->g[i].n) continue;
        double *xi = x + (size_t)i * (size_t)(maxlen + 1), *yi = y + (size_t)i * (size_t)(maxlen + 1), raw[4096];
        int len = maxlen < 4096 ? maxlen : 4096;
        for (int k = 0; k < r->g[i].n; k++) {
            int l = (int)json_array_size(json_object_get(r->g[i].runs[k], "loss_curve"));
            if (l < len) len = l;
        }
        for (int t = 0; t < len; t++) {
            double sum = 0;
            for (int k = 0; k < r->g[i].n; k++) {
                const json_t *p = json_array_get(json_object_get(r->g[i].runs[k], "loss_curve"), (size_t)t);
                xi[t] = json_number_value(json_array_get(p, 0));
                sum += json_number_value(json_array_get(p, 1));
            }
            raw[t] = sum / r->g[i].n;
        }
        for (int t = 0; t < len; t++) {
            double sum = 0;
            int c = 0;
            for (int u = t; u >= 0 && u > t - window; u--) sum += raw[u], c++;
            yi[t] = sum / c;
            if (isfinite(yi[t]) && yi[t] < ymin) ymin = yi[t];
            if (isfinite(yi[t]) && yi[t] > ymax) ymax = yi[t];
            if (xi[t] > xmax) xmax = xi[t];
        }
        lens[i] = len;
    }
    pad_range(&ymin, &ymax, 0.05);
    char avg[64] = "", sub[256];
    if (window > 1) snprintf(avg, sizeof avg, ", moving average over %d steps", window);
    seeds_note(r, sub, sizeof sub, avg);
    frame(0, xmax, ymin, ymax, "bcnstg", "bcnstvg", "Training loss by quantizer", sub, "optimizer step",
          "training loss (nats/token)");
    const char *names[64];
    int cols[64], nl = 0;
    for (int i = 0; i < r->ng && x && y && lens; i++) {
        if (!lens[i]) continue;
        plcol0(colour_of(i));
        plwidth(2.0);
        plline(lens[i], x + (size_t)i * (size_t)(maxlen + 1), y + (size_t)i * (size_t)(maxlen + 1));
        plwidth(1);
        if (nl < 64) names[nl] = short_name(r->g[i].spec), cols[nl++] = colour_of(i);
    }
    free(x);
    free(y);
    free(lens);
    legend(nl, names, cols, 1, 0, 0);
    plend();
}

/* Eval NLL against matrix bits/param on a log2 axis, ± 1 sd over seeds:
 * filled after finetuning, hollow the quantized base before it */
static void draw_nll_bits(const report *r, const char *dev, const char *tmp)
{
    plot_open(dev, tmp);
    double xmin = INFINITY, xmax = -INFINITY, ymin = INFINITY, ymax = -INFINITY;
    for (int i = 0; i < r->ng; i++) {
        double bm, bs, am, as, xm, xs;
        if (!r->g[i].n) continue;
        group_stat(&r->g[i], "quantization.matrix_bits_per_param", &xm, &xs, NULL);
        group_stat(&r->g[i], "after.nll", &am, &as, NULL);
        group_stat(&r->g[i], "before.nll", &bm, &bs, NULL);
        if (!(xm > 0)) continue;
        if (log2(xm) < xmin) xmin = log2(xm);
        if (log2(xm) > xmax) xmax = log2(xm);
        double lo = fmin(am - as, bm - bs), hi = fmax(am + as, bm + bs);
        if (lo < ymin) ymin = lo;
        if (hi > ymax) ymax = hi;
    }
    if (isfinite(xmin) && xmax - xmin < 1) xmin -= 0.5, xmax += 0.5;
    pad_range(&xmin, &xmax, 0.08);
    pad_range(&ymin, &ymax, 0.08);
    char sub[256];
    seeds_note(r, sub, sizeof sub, " (bars: ±1 sd); filled: after finetuning, hollow: before");
    frame(xmin, xmax, ymin, ymax, "bc", "bcnstvg", "Eval NLL against bits per parameter", sub,
          "bits per parameter of the quantized linears (log scale)", "eval NLL (nats/token)");
    /* the x ticks at whole and half-octave bit counts */
    static const double ticks[] = {1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64};
    for (size_t t = 0; t < sizeof ticks / sizeof ticks[0]; t++) {
        double lx = log2(ticks[t]);
        if (lx < xmin || lx > xmax) continue;
        PLFLT gx[2] = {lx, lx}, gy[2] = {ymin, ymax};
        plcol0(1);
        pllsty(2);
        plline(2, gx, gy);
        pllsty(1);
        char lab[16];
        snprintf(lab, sizeof lab, "%g", ticks[t]);
        plmtex("b", 1.4, (lx - xmin) / (xmax - xmin), 0.5, lab);
    }
    const char *names[66];
    int cols[66], nl = 0;
    for (int i = 0; i < r->ng; i++) {
        if (!r->g[i].n) continue;
        double bm, bs, am, as, xm, xs;
        group_stat(&r->g[i], "quantization.matrix_bits_per_param", &xm, &xs, NULL);
        group_stat(&r->g[i], "after.nll", &am, &as, NULL);
        group_stat(&r->g[i], "before.nll", &bm, &bs, NULL);
        if (!(xm > 0)) continue;
        PLFLT x[1] = {log2(xm)}, y[1] = {am}, lo[1] = {am - as}, hi[1] = {am + as}, yb[1] = {bm}, blo[1] = {bm - bs},
              bhi[1] = {bm + bs};
        plcol0(colour_of(i));
        plwidth(2.0);
        if (as > 0) plerry(1, x, lo, hi);
        if (bs > 0) plerry(1, x, blo, bhi);
        plschr(0, 1.5);
        plstring(1, x, y, "#(850)");
        plstring(1, x, yb, "#(840)");
        plschr(0, 1.0);
        plwidth(1.0);
        if (nl < 64) names[nl] = short_name(r->g[i].spec), cols[nl++] = colour_of(i);
    }
    names[nl] = "before finetuning";
    cols[nl++] = 1;
    legend(nl, names, cols, 0, 1, 1);
    plend();
}

/* Relative reconstruction error of every block linear, by quantizer (log scale) */
static void draw_layers(const report *r, const char *dev, const char *tmp)
{
    plot_open(dev, tmp);
    int nlay = 0;
    double ymin = INFINITY, ymax = -INFINITY;
    for (int i = 0; i < r->ng; i++) {
        if (!r->g[i].n) continue;
        const json_t *ls = json_object_get(json_object_get(r->g[i].runs[0], "quantization"), "layers");
        size_t k;
        json_t *l;
        json_array_foreach(ls, k, l) {
            double e = jnumv(l, "rel_error");
            if (e > 0 && isfinite(e)) {
                if (log10(e) < ymin) ymin = log10(e);
                if (log10(e) > ymax) ymax = log10(e);
            }
        }
        if ((int)json_array_size(ls) > nlay) nlay = (int)json_array_size(ls);
    }
    if (!isfinite(ymin)) ymin = -3, ymax = 0;
    ymin = floor(ymin - 0.1);
    ymax = ceil(ymax + 0.1);
    char sub[256];
    snprintf(sub, sizeof sub, "%s: each block linear, in name order (layers.N.mlp.*, then self_attn.*)",
             model_name(r->doc));
    frame(0.5, nlay > 0 ? nlay + 0.5 : 1.5, ymin, ymax, "bcnst", "bcnstlvg", "Reconstruction error per layer", sub,
          "block linear (index)", "relative error ||W'-W|| / ||W||");
    const char *names[64];
    int cols[64], nl = 0;
    double *x = calloc((size_t)nlay + 1, sizeof *x), *y = calloc((size_t)nlay + 1, sizeof *y);
    for (int i = 0; i < r->ng && x && y; i++) {
        if (!r->g[i].n) continue;
        const json_t *ls = json_object_get(json_object_get(r->g[i].runs[0], "quantization"), "layers");
        int m = 0;
        size_t k;
        json_t *l;
        json_array_foreach(ls, k, l) {
            double e = jnumv(l, "rel_error");
            if (!(e > 0) || !isfinite(e)) continue;
            x[m] = (double)k + 1;
            y[m++] = log10(e);
        }
        if (!m) continue;
        plcol0(colour_of(i));
        plwidth(1.5);
        plline(m, x, y);
        plstring(m, x, y, "#(850)");
        plwidth(1);
        if (nl < 64) names[nl] = short_name(r->g[i].spec), cols[nl++] = colour_of(i);
    }
    free(x);
    free(y);
    legend(nl, names, cols, 1, 1, 0);
    plend();
}

/* Each plot, PNG and SVG, into dir/plots, in a child process: a plotting
 * library that aborts (a missing font, a driver) cannot take the study with it. */
static void draw_all(const report *r, const char *dir, plot_status *ps)
{
    char plots[4300];
    snprintf(plots, sizeof plots, "%s/plots", dir);
    if (ql_mkdir_p(plots)) {
        snprintf(ps->why, sizeof ps->why, "%s", ql_error_message());
        return;
    }
    static const char *const names[] = {"loss", "nll_vs_bits", "layer_error"};
    static const char *const devs[][2] = {{"pngcairo", "png"}, {"svgcairo", "svg"}};
    for (size_t p = 0; p < 3; p++)
        for (size_t d = 0; d < 2; d++) {
            char tmp[4400], dest[4400];
            snprintf(dest, sizeof dest, "%s/%s.%s", plots, names[p], devs[d][1]);
            snprintf(tmp, sizeof tmp, "%s/.%s.%s.tmp.%ld", plots, names[p], devs[d][1], (long)getpid());
            fflush(NULL);
            pid_t pid = fork();
            if (pid == 0) {
                /* PLplot's own messages stay off the study's output */
                int null = open("/dev/null", O_WRONLY);
                if (null >= 0) dup2(null, STDOUT_FILENO);
                /* a missing driver would make plinit ask on stdin, or end the process */
                if (!have_device(devs[d][0])) _exit(3);
                if (p == 0) draw_loss(r, devs[d][0], tmp);
                else if (p == 1) draw_nll_bits(r, devs[d][0], tmp);
                else draw_layers(r, devs[d][0], tmp);
                _exit(0);
            }
            int st = 0;
            if (pid > 0)
                while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
            struct stat sb;
            int ok = pid > 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0 && stat(tmp, &sb) == 0 && sb.st_size > 0;
            if (ok) {
                FILE *f = fopen(tmp, "rb+");
                ok = f && fflush(f) == 0 && fsync(fileno(f)) == 0;
                if (f) fclose(f);
            }
            if (pid > 0 && WIFEXITED(st) && WEXITSTATUS(st) == 3) {
                snprintf(ps->why, sizeof ps->why, "PLplot has no %s device here (install plplot-driver-cairo)", devs[d][0]);
                return;
            }
            if (!ok || rename(tmp, dest) != 0) {
                unlink(tmp);
                snprintf(ps->why, sizeof ps->why, "drawing plots/%s.%s failed (PLplot %s)", names[p], devs[d][1],
                         study_plplot_version());
                return;
            }
        }
    ql_fsync_dir(plots);
    ps->drawn = 1;
}

#else

const char *study_plplot_version(void) { return NULL; }

static void draw_all(const report *r, const char *dir, plot_status *ps)
{
    (void)r, (void)dir;
    snprintf(ps->why, sizeof ps->why,
             "this qlora was built without PLplot (meson setup -Dplplot=enabled, with libplplot-dev and "
             "plplot-driver-cairo installed)");
}

#endif

/* ---- report.md ---- */

static void write_markdown(FILE *f, const report *r, const plot_status *ps)
{
    const json_t *doc = r->doc, *set = json_object_get(doc, "settings"), *runs = json_object_get(doc, "runs");
    int n_runs = (int)json_array_size(runs), done = 0, failed = 0, other = 0;
    size_t k;
    json_t *run;
    json_array_foreach(runs, k, run) {
        const char *st = jstr(run, "status");
        if (st && !strcmp(st, "done")) done++;
        else if (st && !strcmp(st, "failed")) failed++;
        else other++;
    }
    fprintf(f, "# Quantizer study: %s\n\n", jstr(set, "model") ? jstr(set, "model") : "?");
    fprintf(f, "%d of %d runs finished", done, n_runs);
    if (failed) fprintf(f, ", %d failed", failed);
    if (other) fprintf(f, ", %d not run yet or interrupted (`qlora study --output DIR --resume` runs them)", other);
    fprintf(f, ". Made by `qlora study` from `study.json` (last written %s).\n\n",
            jstr(doc, "updated") ? jstr(doc, "updated") : "?");
    fprintf(f, "The exact command:\n\n```\n");
    shell_line(f, json_object_get(doc, "command"));
    fprintf(f, "\n```\n\n");
    fprintf(f, "Software and machine (each session of the study):\n\n");
    json_t *sess;
    json_array_foreach(json_object_get(doc, "sessions"), k, sess)
        fprintf(f, "- qlora %s, quantizer ABI %s, PLplot %s; %s, %lld CPUs%s\n", jstr(sess, "qlora"),
                jstr(sess, "quantizer_abi"), jstr(sess, "plplot") ? jstr(sess, "plplot") : "(none)", jstr(sess, "host"),
                (long long)json_integer_value(json_object_get(sess, "cpus")),
                json_is_true(json_object_get(sess, "resume")) ? " (--resume)" : "");
    /* the devices the runs used, from their run_config.json */
    char devices[256] = "";
    json_array_foreach(runs, k, run) {
        const char *d = jstr(run, "device");
        if (!d || strstr(devices, d)) continue;
        snprintf(devices + strlen(devices), sizeof devices - strlen(devices), "%s%s", devices[0] ? ", " : "", d);
    }
    fprintf(f, "\nDevice of the runs: %s (asked: --device %s; each run's own is in the table of runs).\n\n",
            devices[0] ? devices : "none ran yet", jstr(set, "device") ? jstr(set, "device") : "?");
    fprintf(f, "Training data: `%s` (%s)", jstr(set, "data"), jstr(doc, "data_format") ? jstr(doc, "data_format") : "?");
    if (jstr(set, "eval_data"))
        fprintf(f, "; eval data: `%s` (%s)", jstr(set, "eval_data"), jstr(set, "eval_format") ? jstr(set, "eval_format") : "?");
    else fprintf(f, "; eval data: %g examples held out of the training data (seed 42, as qlora train's --eval-dataset-size)",
                 jnumv(set, "eval_dataset_size"));
    if (json_integer_value(json_object_get(set, "max_eval_examples")) > 0)
        fprintf(f, ", the first %lld of them", (long long)json_integer_value(json_object_get(set, "max_eval_examples")));
    fprintf(f, ". Seeds:");
    json_t *sd;
    json_array_foreach(json_object_get(set, "seeds"), k, sd) fprintf(f, " %lld", (long long)json_integer_value(sd));
    fprintf(f, ". Train options of every run:");
    json_t *ta;
    json_array_foreach(json_object_get(set, "train_args"), k, ta) fprintf(f, " `%s`", json_string_value(ta));
    fprintf(f, ".\n\n");

    int mmlu = jstr(set, "mmlu") != NULL;
    fprintf(f, "## Results by quantizer\n\n");
    fprintf(f, "%s Eval NLL: mean negative log-likelihood of the eval set's target tokens (nats/token, lower is better), "
               "of the quantized base before finetuning and with the run's adapter after it.",
            r->n_seeds > 1 ? "Mean ± sample standard deviation over the seeds." : "One seed.");
    if (r->none_index >= 0)
        fprintf(f, " Δ vs none: eval NLL after finetuning minus that of `none` (the dense base with LoRA) of the same "
                   "seed, so the same LoRA initialisation and data order%s.",
                r->n_seeds > 1 ? "; mean ± sd of the per-seed differences" : "");
    fprintf(f, "\n\n");
    fprintf(f, "| quantizer | matrix bits/param | model bits/param | model bytes | quantize s | rel. error | eval NLL before | "
               "eval NLL after | Δ vs none |%s tokens/s | peak RSS MiB | GPU plan MiB | wall s | runs |\n",
            mmlu ? " MMLU before | MMLU after |" : "");
    fprintf(f, "|---|---:|---:|---:|---:|---:|---:|---:|---:|%s---:|---:|---:|---:|---|\n", mmlu ? "---:|---:|" : "");
    for (int i = 0; i < r->ng; i++) {
        const group *g = &r->g[i];
        char c[12][64];
        fmt_ms(c[0], 64, g, "quantization.matrix_bits_per_param", 3, 1);
        fmt_ms(c[1], 64, g, "quantization.model_bits_per_param", 3, 1);
        fmt_ms(c[2], 64, g, "quantization.model_bytes", 0, 1);
        fmt_ms(c[3], 64, g, "quantization.quantize_s", 4, 1);
        fmt_ms(c[4], 64, g, "quantization.rel_error", 5, 1);
        fmt_ms(c[5], 64, g, "before.nll", 4, 1);
        fmt_ms(c[6], 64, g, "after.nll", 4, 1);
        paired_delta(r, g, c[7], 64);
        fmt_ms(c[8], 64, g, "tokens_per_s", 0, 1);
        fmt_ms(c[9], 64, g, "peak_rss_bytes", 1, 1.0 / (1024.0 * 1024.0));
        fmt_ms(c[10], 64, g, "wall_s", 1, 1);
        fmt_ms(c[11], 64, g, "device_plan_bytes", 1, 1.0 / (1024.0 * 1024.0));
        char m1[64] = "", m2[64] = "";
        if (mmlu) fmt_ms(m1, 64, g, "before.mmlu_accuracy", 4, 1), fmt_ms(m2, 64, g, "after.mmlu_accuracy", 4, 1);
        fprintf(f, "| `");
        cell(f, g->spec);
        fprintf(f, "` | %s | %s | %s | %s | %s | %s | %s | %s |", c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]);
        if (mmlu) fprintf(f, " %s | %s |", m1, m2);
        fprintf(f, " %s | %s | %s | %s | %d of %d%s |\n", c[8], c[9], c[11], c[10], g->n, g->total,
                g->failed ? " (failed: see below)" : "");
    }
    fprintf(f, "\nmatrix bits/param: every byte the quantizer stores for the block linears over their parameters; model "
               "bits/param and bytes: the whole checkpoint (embeddings and norms as stored) as `qlora quantize` would "
               "write it; `none` keeps the checkpoint's own dtype. quantize s and rel. error (‖W′−W‖/‖W‖ over all block "
               "linears) are `qlora compare`'s figures. tokens/s: training throughput at the last step; peak RSS: the "
               "host memory high-water mark of the run's process; GPU plan: on a GPU, the device memory of the training "
               "step's memory plan, which holds every device allocation of the step (the CUDA context and cuBLAS' "
               "workspace come on top); wall s: the whole run "
               "(quantize, evals, training).\n\n");

    fprintf(f, "## Plots\n\n");
    if (ps->drawn) {
        fprintf(f, "![Training loss of each quantizer](plots/loss.png)\n\n");
        fprintf(f, "![Eval NLL after finetuning against model bits per parameter](plots/nll_vs_bits.png)\n\n");
        fprintf(f, "![Reconstruction error per layer](plots/layer_error.png)\n\n");
        fprintf(f, "The same as SVG: [loss](plots/loss.svg), [NLL against bits](plots/nll_vs_bits.svg), "
                   "[per-layer error](plots/layer_error.svg).\n\n");
    } else
        fprintf(f, "Plots were not drawn: %s.\n\n", ps->why);

    /* per module kind: the mean relative error of the q_proj, ..., down_proj of all blocks */
    static const char *const kinds[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
    fprintf(f, "## Reconstruction error by layer kind\n\n");
    fprintf(f, "Mean relative error ‖W′−W‖/‖W‖ of each kind of block linear over the blocks (every layer is in "
               "`study.json` and in the per-layer plot).\n\n| quantizer |");
    for (size_t q = 0; q < 7; q++) fprintf(f, " %s |", kinds[q]);
    fprintf(f, "\n|---|");
    for (size_t q = 0; q < 7; q++) fprintf(f, "---:|");
    fprintf(f, "\n");
    for (int i = 0; i < r->ng; i++) {
        const group *g = &r->g[i];
        if (!g->n || (g->spec && !strcmp(g->spec, "none"))) continue;
        fprintf(f, "| `");
        cell(f, g->spec);
        fprintf(f, "` |");
        const json_t *ls = json_object_get(json_object_get(g->runs[0], "quantization"), "layers");
        for (size_t q = 0; q < 7; q++) {
            double s = 0;
            int n = 0;
            size_t j;
            json_t *l;
            json_array_foreach(ls, j, l) {
                const char *name = jstr(l, "name");
                size_t ln = name ? strlen(name) : 0, kl = strlen(kinds[q]);
                if (ln > kl && !strcmp(name + ln - kl, kinds[q]) && name[ln - kl - 1] == '.' &&
                    isfinite(jnumv(l, "rel_error")))
                    s += jnumv(l, "rel_error"), n++;
            }
            if (n) fprintf(f, " %.5f |", s / n);
            else fprintf(f, " - |");
        }
        fprintf(f, "\n");
    }
    if (!json_array_size(json_object_get(json_object_get(r->ng && r->g[0].n ? r->g[0].runs[0] : NULL, "quantization"),
                                         "layers")) &&
        r->ng == 1 && r->none_index == 0)
        fprintf(f, "\n(only `none` ran: nothing is quantized)\n");

    fprintf(f, "\n## Every run\n\n");
    fprintf(f, "| run | quantizer | seed | status | device | precision | eval NLL before | eval NLL after | train eval "
               "loss | final train loss | tokens/s | peak RSS MiB | GPU plan MiB | wall s | attempts | folder |\n");
    fprintf(f, "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    json_array_foreach(runs, k, run) {
        char b[32] = "-", a[32] = "-", te[32] = "-", fl[32] = "-", tp[32] = "-", rss[32] = "-", gp[32] = "-", w[32] = "-";
        double v;
        if (isfinite(v = run_num(run, "before.nll"))) snprintf(b, sizeof b, "%.4f", v);
        if (isfinite(v = run_num(run, "after.nll"))) snprintf(a, sizeof a, "%.4f", v);
        const json_t *tel = json_object_get(run, "train_eval_loss");
        if (json_array_size(tel))
            snprintf(te, sizeof te, "%.4f",
                     json_number_value(json_array_get(json_array_get(tel, json_array_size(tel) - 1), 1)));
        if (isfinite(v = jnumv(run, "final_train_loss"))) snprintf(fl, sizeof fl, "%.4f", v);
        if (isfinite(v = jnumv(run, "tokens_per_s"))) snprintf(tp, sizeof tp, "%.0f", v);
        if (isfinite(v = jnumv(run, "peak_rss_bytes"))) snprintf(rss, sizeof rss, "%.1f", v / (1024.0 * 1024.0));
        if (isfinite(v = jnumv(run, "device_plan_bytes"))) snprintf(gp, sizeof gp, "%.1f", v / (1024.0 * 1024.0));
        if (isfinite(v = jnumv(run, "wall_s"))) snprintf(w, sizeof w, "%.1f", v);
        fprintf(f, "| %s | `", jstr(run, "id"));
        cell(f, jstr(run, "quantizer"));
        fprintf(f, "` | %lld | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %lld | [%s](%s) |\n",
                (long long)json_integer_value(json_object_get(run, "seed")), jstr(run, "status"),
                jstr(run, "device") ? jstr(run, "device") : "-", jstr(run, "precision") ? jstr(run, "precision") : "-", b, a,
                te, fl, tp, rss, gp, w, (long long)json_integer_value(json_object_get(run, "attempts")), jstr(run, "dir"),
                jstr(run, "dir"));
    }
    int any_msg = 0;
    json_array_foreach(runs, k, run) {
        const char *e = jstr(run, "error");
        if (!e) continue;
        if (!any_msg++) fprintf(f, "\nRuns that did not finish:\n\n");
        fprintf(f, "- %s (%s): ", jstr(run, "id"), jstr(run, "status"));
        cell(f, e);
        fprintf(f, "\n");
    }
    json_array_foreach(runs, k, run) {
        const char *rf = jstr(run, "resumed_from");
        if (rf) fprintf(f, "%s- %s went on from its %s\n", any_msg++ ? "" : "\n", jstr(run, "id"), rf);
    }
}

int study_write_report(const char *dir, const json_t *doc)
{
    report r;
    memset(&r, 0, sizeof r);
    int rc = make_groups(doc, &r);
    if (rc) return rc;
    plot_status ps = {.drawn = 0, .why = ""};
    draw_all(&r, dir, &ps);
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) {
        free(r.g);
        return ql_error(QL_ENOMEM, "out of memory");
    }
    write_markdown(f, &r, &ps);
    fclose(f);
    char *path = ql_path_join(dir, "report.md");
    rc = path ? ql_write_file_atomic(path, text, len) : ql_error(QL_ENOMEM, "out of memory");
    free(path);
    free(text);
    free(r.g);
    return rc;
}
