#include "qlora/mmlu.h"

#include <dirent.h>
#include <limits.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "json_out.h"
#include "lora_model.h"
#include "progress.h"
#include "qlora/error.h"
#include "qlora/fs.h"

/* Free what a failed record kept, so the caller never sees stale pointers. */
static int csv_fail(char **fields, int kept, char *current, int code)
{
    free(current);
    for (int i = 0; i < kept; i++) {
        free(fields[i]);
        fields[i] = NULL;
    }
    return code;
}

int ql_csv_record(const char *text, size_t len, size_t *pos, char **fields, int max_fields)
{
    size_t p = *pos;
    if (p >= len) return 0;
    int n = 0, kept = 0;
    for (;;) {
        size_t cap = 64, k = 0;
        char *f = malloc(cap);
        if (!f) return csv_fail(fields, kept, NULL, QL_CSV_NOMEM);
        int quoted = p < len && text[p] == '"';
        if (quoted) p++;
        for (;;) {
            if (p >= len) {
                if (quoted) return csv_fail(fields, kept, f, QL_CSV_UNTERMINATED);
                break;
            }
            char c = text[p];
            if (c == '\0') return csv_fail(fields, kept, f, QL_CSV_NUL);
            if (quoted) {
                if (c == '"') {
                    if (p + 1 < len && text[p + 1] == '"') {
                        p += 2;
                        c = '"';
                    } else {
                        p++;
                        quoted = 0;
                        continue;
                    }
                } else {
                    p++;
                }
            } else {
                if (c == ',' || c == '\n' || c == '\r') break;
                p++;
            }
            if (k + 2 > cap) {
                char *g = realloc(f, cap *= 2);
                if (!g) return csv_fail(fields, kept, f, QL_CSV_NOMEM);
                f = g;
            }
            f[k++] = c;
        }
        f[k] = '\0';
        /* fields past max_fields are counted, not kept: the caller sees the true width */
        if (kept < max_fields) fields[kept++] = f;
        else free(f);
        if (n == INT_MAX) return csv_fail(fields, kept, NULL, QL_CSV_NOMEM);
        n++;
        if (p < len && text[p] == ',') {
            p++;
            continue;
        }
        if (p < len && text[p] == '\r') p++;
        if (p < len && text[p] == '\n') p++;
        break;
    }
    *pos = p;
    return n;
}

typedef ql_mmlu_question question;

static void free_questions(question *q, size_t n)
{
    for (size_t i = 0; i < n; i++)
        for (int k = 0; k < 6; k++) free(q[i].field[k]);
    free(q);
}

static int read_csv(const char *path, question **out, size_t *n)
{
    char *text;
    size_t len, pos = 0, count = 0, cap = 0, record = 0;
    question *qs = NULL;
    *out = NULL;
    *n = 0;
    int rc = ql_read_file(path, &text, &len);
    if (rc) return rc;
    for (;;) {
        char *f[6] = {0};
        int k = ql_csv_record(text, len, &pos, f, 6);
        record++;
        if (k == 0) break;
        if (k == QL_CSV_UNTERMINATED) {
            rc = ql_error(QL_EFORMAT, "%s: record %zu has a quoted field that is never closed", path, record);
        } else if (k == QL_CSV_NUL) {
            rc = ql_error(QL_EFORMAT, "%s: record %zu has a NUL byte in a field", path, record);
        } else if (k < 0) {
            rc = ql_error(QL_ENOMEM, "out of memory reading %s", path);
        } else if (k != 6) {
            rc = ql_error(QL_EFORMAT, "%s: record %zu has %d fields, expected question,choice0..3,answer", path, record,
                          k);
        } else if (record == 1 && !strcmp(f[0], "question")) { /* header */
            for (int i = 0; i < 6; i++) free(f[i]);
            continue;
        } else if (strlen(f[5]) != 1 || f[5][0] < '0' || f[5][0] > '3') {
            rc = ql_error(QL_EFORMAT, "%s: record %zu: answer must be 0-3", path, record);
        } else if (count == cap) {
            question *p = realloc(qs, (cap = cap ? cap * 2 : 64) * sizeof *p);
            if (!p) rc = ql_error(QL_ENOMEM, "out of memory");
            else qs = p;
        }
        if (rc) {
            for (int i = 0; i < 6; i++) free(f[i]); /* NULL after a failed record */
            break;
        }
        memcpy(qs[count].field, f, sizeof f);
        count++;
    }
    free(text);
    if (rc) {
        free_questions(qs, count);
        return rc;
    }
    *out = qs;
    *n = count;
    return QL_OK;
}

static const char letters[4] = {'A', 'B', 'C', 'D'};

/* Appends s; on a failed allocation frees *buf and leaves it NULL (later appends do nothing). */
static void append_n(char **buf, size_t *len, size_t *cap, const char *s, size_t l)
{
    if (!*buf) return;
    if (*len + l + 1 > *cap) {
        size_t want = (*len + l + 1) * 2;
        char *p = realloc(*buf, want);
        if (!p) {
            free(*buf);
            *buf = NULL;
            return;
        }
        *buf = p;
        *cap = want;
    }
    memcpy(*buf + *len, s, l);
    *len += l;
    (*buf)[*len] = '\0';
}

static void append(char **buf, size_t *len, size_t *cap, const char *s) { append_n(buf, len, cap, s, strlen(s)); }

static void format_question(char **buf, size_t *len, size_t *cap, const question *q, int with_answer)
{
    append(buf, len, cap, q->field[0]);
    for (int c = 0; c < 4; c++) {
        char head[8];
        snprintf(head, sizeof head, "\n%c. ", letters[c]);
        append(buf, len, cap, head);
        append(buf, len, cap, q->field[1 + c]);
    }
    append(buf, len, cap, "\nAnswer:");
    if (with_answer) {
        char ans[8];
        snprintf(ans, sizeof ans, " %c\n\n", letters[q->field[5][0] - '0']);
        append(buf, len, cap, ans);
    }
}

/* hendrycks' format_subject: each word of the file name after a space, so
 * "abstract_algebra" is " abstract algebra" and the header reads "about  abstract
 * algebra." with two spaces, as in qlora.py's five-shot files. */
char *ql_mmlu_prompt(const char *subject, const ql_mmlu_question *dev, int shots, const ql_mmlu_question *q)
{
    size_t len = 0, cap = 1024;
    char *buf = malloc(cap);
    if (!buf) return NULL;
    buf[0] = '\0';
    append(&buf, &len, &cap, "The following are multiple choice questions (with answers) about ");
    for (const char *w = subject;;) {
        const char *end = strchr(w, '_');
        size_t wl = end ? (size_t)(end - w) : strlen(w);
        append(&buf, &len, &cap, " ");
        append_n(&buf, &len, &cap, w, wl);
        if (!end) break;
        w = end + 1;
    }
    append(&buf, &len, &cap, ".\n\n");
    for (int s = 0; s < shots; s++) format_question(&buf, &len, &cap, &dev[s], 1);
    format_question(&buf, &len, &cap, q, 0);
    return buf;
}

/* DIR/SUBJECTSUFFIX, or NULL when out of memory */
static char *subject_file(const char *dir, const char *subject, const char *suffix)
{
    size_t ls = strlen(subject), lx = strlen(suffix);
    char *base = malloc(ls + lx + 1);
    if (!base) return NULL;
    memcpy(base, subject, ls);
    memcpy(base + ls, suffix, lx + 1);
    char *p = ql_path_join(dir, base);
    free(base);
    return p;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* The ids scored for "A".."D".  qlora.py takes the first id of each letter
 * encoded alone (with a SentencePiece tokenizer that is " A", the token after
 * "Answer:").  When the four encodings are not four distinct single tokens,
 * that first id can be shared (stories260K: " A", " C", " D" all start with
 * the lone space piece), and scoring by it answers one letter always: then each
 * letter's own (last) token is scored, with a warning.  Four letters that
 * still share a token cannot be scored at all. */
static int letter_tokens(const ql_tokenizer *tok, int vocab, int32_t id[4], int *by_last, int quiet)
{
    int32_t first[4], last[4];
    size_t count[4];
    char shown[4][64];
    for (int c = 0; c < 4; c++) {
        int32_t *ids = NULL;
        size_t n = 0;
        char s[2] = {letters[c], 0};
        int rc = ql_tokenizer_encode(tok, s, 1, 0, &ids, &n);
        if (rc) return rc;
        if (n == 0) {
            free(ids);
            return ql_error(QL_EINVAL, "MMLU: the tokenizer gives no token for \"%c\"", letters[c]);
        }
        for (size_t k = 0; k < n; k++)
            if (ids[k] < 0 || ids[k] >= vocab) {
                rc = ql_error(QL_EINVAL, "MMLU: a token of \"%c\" (id %d) is outside the model's vocabulary (%d)",
                              letters[c], ids[k], vocab);
                free(ids);
                return rc;
            }
        first[c] = ids[0];
        last[c] = ids[n - 1];
        count[c] = n;
        int w = snprintf(shown[c], sizeof shown[c], "%c:", letters[c]);
        for (size_t k = 0; k < n && w > 0 && (size_t)w < sizeof shown[c]; k++)
            w += snprintf(shown[c] + w, sizeof shown[c] - (size_t)w, "%s%d", k ? "," : "[", ids[k]);
        if (w > 0 && (size_t)w < sizeof shown[c]) snprintf(shown[c] + w, sizeof shown[c] - (size_t)w, "]");
        free(ids);
    }
    int single = 1, first_distinct = 1, last_distinct = 1;
    for (int a = 0; a < 4; a++) {
        single &= count[a] == 1;
        for (int b = a + 1; b < 4; b++) {
            first_distinct &= first[a] != first[b];
            last_distinct &= last[a] != last[b];
        }
    }
    if (single && first_distinct) {
        memcpy(id, first, sizeof first);
        *by_last = 0;
        return QL_OK;
    }
    if (!last_distinct)
        return ql_error(QL_EINVAL, "MMLU: the tokenizer gives the answer letters no four distinct tokens (%s %s %s %s)",
                        shown[0], shown[1], shown[2], shown[3]);
    if (!quiet)
        fprintf(stderr,
                "qlora: warning: MMLU: the answer letters are not four distinct single tokens (%s %s %s %s)%s; scoring "
                "each letter by its last token (%d %d %d %d), not by the first as qlora.py does\n",
                shown[0], shown[1], shown[2], shown[3], first_distinct ? "" : ", and their first tokens are shared",
                last[0], last[1], last[2], last[3]);
    memcpy(id, last, sizeof last);
    *by_last = 1;
    return QL_OK;
}

/* a subject's prompt: its shots, its tokens, its question */
typedef struct prompt_order {
    int shots;
    size_t n, i;
} prompt_order;

/* most shots first (the full prefix), then shorter first, then as read */
static int cmp_prompt_order(const void *pa, const void *pb)
{
    const prompt_order *a = pa, *b = pb;
    if (a->shots != b->shots) return a->shots > b->shots ? -1 : 1;
    if (a->n != b->n) return a->n < b->n ? -1 : 1;
    return a->i < b->i ? -1 : a->i > b->i;
}

int ql_mmlu_eval(ql_llama *m, const ql_tokenizer *tok, const ql_mmlu_opts *o, FILE *out)
{
    const char *split = o->split ? o->split : "test";
    char *split_dir = ql_path_join(o->dir, split), *dev_dir = ql_path_join(o->dir, "dev");
    if (!split_dir || !dev_dir || strlen(split) > 48 || strchr(split, '/')) {
        int rc = split_dir && dev_dir ? ql_error(QL_EINVAL, "MMLU: split name '%s' is not a folder name of at most 48 characters", split)
                                      : ql_error(QL_ENOMEM, "out of memory");
        free(split_dir);
        free(dev_dir);
        return rc;
    }
    DIR *d = opendir(split_dir);
    if (!d) {
        int rc = ql_error(QL_ENOTFOUND, "MMLU: %s is not a folder of SUBJECT_%s.csv files", split_dir, split);
        free(split_dir);
        free(dev_dir);
        return rc;
    }
    char suffix[64];
    snprintf(suffix, sizeof suffix, "_%s.csv", split);
    char **subjects = NULL;
    size_t ns = 0;
    struct dirent *e;
    int rc = QL_OK;
    while (rc == QL_OK && (e = readdir(d))) {
        size_t l = strlen(e->d_name), ls = strlen(suffix);
        if (l <= ls || strcmp(e->d_name + l - ls, suffix)) continue;
        char **grown = realloc(subjects, (ns + 1) * sizeof *subjects);
        char *name = grown ? strndup(e->d_name, l - ls) : NULL;
        if (grown) subjects = grown;
        if (!name) rc = ql_error(QL_ENOMEM, "out of memory");
        else subjects[ns++] = name;
    }
    closedir(d);
    if (rc == QL_OK && ns == 0) rc = ql_error(QL_ENOTFOUND, "MMLU: no *%s files in %s", suffix, split_dir);
    if (ns) qsort(subjects, ns, sizeof *subjects, cmp_str);
    int32_t letter_id[4];
    int by_last = 0;
    if (rc == QL_OK) rc = letter_tokens(tok, ql_llama_get_config(m)->vocab, letter_id, &by_last, o->no_warnings);
    const ql_llama_config *c = ql_llama_get_config(m);
    const int nbatch = !o->no_reuse && o->batch > 1 ? o->batch : 1;
    float *logits = malloc((size_t)nbatch * (size_t)c->vocab * sizeof *logits);
    int *group_lens = malloc((size_t)nbatch * sizeof *group_lens); /* a group's rest lengths */
    if (rc == QL_OK && (!logits || !group_lens)) rc = ql_error(QL_ENOMEM, "out of memory");
    if (rc == QL_OK && !o->lora && ql_lora_attached(m))
        rc = ql_error(QL_EINVAL, "the model has a LoRA adapter attached: pass it as ql_mmlu_opts.lora");
    /* the decoder: a cache of the model's positions, prompts in pieces of 512 */
    ql_be_ctx *ctx = NULL;
    ql_lora_model *lm = NULL;
    if (rc == QL_OK) rc = ql_be_ctx_open(o->device ? o->device : "cpu", NULL, &ctx);
    int precision = QL_PREC_FP32;
    if (rc == QL_OK) rc = ql_be_precision(o->precision, ctx->be, &precision);
    /* dynamic RoPE: a prompt in one piece, up to 8192 tokens (its
     * frequencies follow the whole length, as transformers runs it) */
    const int piece = c->rope.type == QL_ROPE_DYNAMIC ? 8192 : 512;
    /* the previous prompt's ids, whose attention cache the next one reuses where they agree */
    const int reuse = !o->no_reuse && c->rope.type != QL_ROPE_DYNAMIC;
    /* batch: the questions after a shared prefix run together, a cache row each */
    const int batch = reuse && o->batch > 1 ? o->batch : 1;
    ql_lora_model_opts mo = {.batch = batch, .max_len = c->max_len < piece ? c->max_len : piece, .allocate = 1,
                             .precision = precision, .kv_capacity = c->max_len};
    if (rc == QL_OK) rc = ql_lora_model_create(m, (ql_lora *)o->lora, ctx, &mo, &lm);
    if (rc == QL_OK) rc = ql_lora_model_push_params(lm);
    json_t *per = json_object();
    /* the table: each subject's questions and correct answers */
    int64_t *sub_n = calloc(ns ? ns : 1, sizeof *sub_n), *sub_ok = calloc(ns ? ns : 1, sizeof *sub_ok);
    if (rc == QL_OK && (!sub_n || !sub_ok)) rc = ql_error(QL_ENOMEM, "out of memory");
    int32_t *prev = NULL;
    size_t prev_n = 0;
    int64_t prompt_tokens = 0, run = 0;
    double sum_subject = 0;
    int64_t correct_all = 0, total_all = 0, fewer_shots = 0, truncated = 0;
    ql_progress prog;
    ql_progress_begin(&prog, "mmlu", (int64_t)ns, "subjects", o->progress);
    for (size_t s = 0; s < ns && rc == QL_OK; s++) {
        question *dev = NULL, *qs = NULL;
        size_t ndev = 0, nq = 0;
        char *dev_name = subject_file(dev_dir, subjects[s], "_dev.csv");
        char *test_name = subject_file(split_dir, subjects[s], suffix);
        rc = dev_name && test_name ? read_csv(dev_name, &dev, &ndev) : ql_error(QL_ENOMEM, "out of memory");
        if (rc == QL_OK) rc = read_csv(test_name, &qs, &nq);
        if (rc == QL_OK && nq == 0) rc = ql_error(QL_EFORMAT, "MMLU: %s holds no questions", test_name);
        free(dev_name);
        free(test_name);
        if (rc == QL_OK && (size_t)o->shots > ndev)
            rc = ql_error(QL_EINVAL, "MMLU: %s has %zu dev questions, fewer than --shots %d", subjects[s], ndev, o->shots);
        size_t limit = o->max_per_subject > 0 && (size_t)o->max_per_subject < nq ? (size_t)o->max_per_subject : nq;
        int64_t correct = 0;
        /* every prompt of the subject, with fewer shots when it does not fit the model */
        int32_t **pids = calloc(limit ? limit : 1, sizeof *pids), **sorted_ids = NULL;
        size_t *pn = calloc(limit ? limit : 1, sizeof *pn);
        int *answer = calloc(limit ? limit : 1, sizeof *answer);
        prompt_order *order = NULL;
        if (reuse) {
            order = calloc(limit ? limit : 1, sizeof *order);
            sorted_ids = calloc(limit ? limit : 1, sizeof *sorted_ids);
        }
        if (rc == QL_OK && (!pids || !pn || !answer || (reuse && (!order || !sorted_ids))))
            rc = ql_error(QL_ENOMEM, "out of memory");
        for (size_t i = 0; i < limit && rc == QL_OK; i++) {
            int32_t *ids = NULL;
            size_t n = 0;
            int shots = o->shots;
            for (;; shots--) {
                char *prompt = ql_mmlu_prompt(subjects[s], dev, shots, &qs[i]);
                if (!prompt) {
                    rc = ql_error(QL_ENOMEM, "out of memory");
                    break;
                }
                free(ids);
                ids = NULL;
                rc = ql_tokenizer_encode(tok, prompt, strlen(prompt), 1, &ids, &n);
                free(prompt);
                if (rc || (int)n <= c->max_len) break;
                if (shots == 0) {
                    /* keep the end (the question and "Answer:") */
                    memmove(ids, ids + (n - (size_t)c->max_len), (size_t)c->max_len * sizeof *ids);
                    n = (size_t)c->max_len;
                    truncated++;
                    break;
                }
            }
            if (rc == QL_OK && shots < o->shots) fewer_shots++;
            pids[i] = ids;
            pn[i] = n;
            if (order) order[i] = (prompt_order){.shots = shots, .n = n, .i = i};
        }
        /* with the reuse: the prompts with the same shots (the same prefix)
         * together, so that each reuses all of the one before's prefix, and
         * by length, so that a batched group's rests are padded to little
         * more than their own lengths (each question is scored alone: the
         * order changes no score) */
        if (rc == QL_OK && order) {
            qsort(order, limit, sizeof *order, cmp_prompt_order);
            for (size_t i = 0; i < limit; i++) sorted_ids[i] = pids[order[i].i];
            memcpy(pids, sorted_ids, limit * sizeof *pids);
            for (size_t i = 0; i < limit; i++) pn[i] = order[i].n;
        }
        for (size_t i = 0; rc == QL_OK && i < limit; i++) answer[i] = qs[order ? order[i].i : i].field[5][0] - '0';
        /* groups of up to `batch` consecutive prompts that share one prefix
         * (at least the last token of each left to run): the prefix once,
         * from where it agrees with the cache, then their rests together */
        for (size_t i = 0; i < limit && rc == QL_OK;) {
            size_t g = 1, lcp = pn[i] - 1, cached = 0; /* cached: what prompt i alone would reuse */
            if (reuse)
                while (cached < prev_n && cached + 1 < pn[i] && pids[i][cached] == prev[cached]) cached++;
            while (batch > 1 && g < (size_t)batch && i + g < limit) {
                size_t k = 0, cap = lcp < pn[i + g] - 1 ? lcp : pn[i + g] - 1;
                while (k < cap && pids[i + g][k] == pids[i][k]) k++;
                /* it joins when that costs no more tokens than running after the
                 * prompt before it: it shares at least as much with the group as
                 * with that one, the group's prefix does not shrink, and is no
                 * shorter than what the cache holds for the first */
                size_t kp = 0, capp = pn[i + g] - 1 < pn[i + g - 1] ? pn[i + g] - 1 : pn[i + g - 1];
                while (kp < capp && pids[i + g][kp] == pids[i + g - 1][kp]) kp++;
                if (k < kp || k < (g >= 2 ? lcp : cached)) break;
                size_t rest = 0; /* the group's longest rest must fit one pass */
                for (size_t j = 0; j <= g; j++) rest = pn[i + j] - k > rest ? pn[i + j] - k : rest;
                if (rest > (size_t)mo.max_len) break;
                lcp = k;
                g++;
            }
            size_t keep = 0;
            if (reuse)
                while (keep < prev_n && keep < lcp && pids[i][keep] == prev[keep]) keep++;
            if (g == 1) { /* alone: the whole prompt from the cache's end, as decode runs it */
                keep = cached;
                ql_lora_model_kv_truncate(lm, (int)keep);
                rc = ql_lora_model_decode(lm, pids[i] + keep, (int)(pn[i] - keep), logits);
                run += (int64_t)(pn[i] - keep);
                free(prev);
                prev = pids[i];
                prev_n = rc == QL_OK ? pn[i] : 0;
                pids[i] = NULL;
            } else {
                ql_lora_model_kv_truncate(lm, (int)keep);
                if (lcp > keep) rc = ql_lora_model_decode(lm, pids[i] + keep, (int)(lcp - keep), NULL);
                run += (int64_t)(lcp - keep);
                if (rc == QL_OK) rc = ql_lora_model_kv_fork(lm, (int)g);
                int T = 0, *lens = group_lens;
                for (size_t j = 0; j < g; j++) {
                    lens[j] = (int)(pn[i + j] - lcp);
                    T = lens[j] > T ? lens[j] : T;
                    run += lens[j];
                }
                int32_t *rows = rc == QL_OK ? calloc(g * (size_t)T, sizeof *rows) : NULL;
                if (rc == QL_OK && !rows) rc = ql_error(QL_ENOMEM, "out of memory");
                for (size_t j = 0; rc == QL_OK && j < g; j++)
                    memcpy(rows + j * (size_t)T, pids[i + j] + lcp, (size_t)lens[j] * sizeof *rows);
                if (rc == QL_OK) rc = ql_lora_model_decode_rows(lm, (int)g, rows, T, lens, logits);
                free(rows);
                /* the cache continues after the group's last prompt, as it would
                 * one at a time: the next one reuses what it shares with it */
                if (rc == QL_OK) rc = ql_lora_model_kv_adopt(lm, (int)g - 1, (int)pn[i + g - 1]);
                free(prev);
                prev = pids[i + g - 1];
                prev_n = rc == QL_OK ? pn[i + g - 1] : 0;
                pids[i + g - 1] = NULL;
            }
            for (size_t j = 0; rc == QL_OK && j < g; j++) {
                const float *lg = logits + j * (size_t)c->vocab;
                int best = 0;
                for (int k = 1; k < 4; k++)
                    if (lg[letter_id[k]] > lg[letter_id[best]]) best = k;
                correct += best == answer[i + j];
                prompt_tokens += (int64_t)pn[i + j];
            }
            i += g;
        }
        for (size_t i = 0; pids && i < limit; i++) free(pids[i]);
        free(pids);
        free(pn);
        free(answer);
        free(order);
        free(sorted_ids);
        if (rc == QL_OK && limit > 0) {
            double acc = (double)correct / (double)limit;
            json_object_set_new(per, subjects[s], json_real(acc));
            sum_subject += acc;
            correct_all += correct;
            total_all += (int64_t)limit;
            sub_n[s] = (int64_t)limit;
            sub_ok[s] = correct;
        }
        free_questions(dev, ndev);
        free_questions(qs, nq);
        ql_progress_update(&prog, (int64_t)s + 1, subjects[s]);
    }
    if (rc == QL_OK) {
        ql_progress_end(&prog);
        if (fewer_shots && !o->no_warnings)
            fprintf(stderr,
                    "qlora: warning: MMLU: %lld of %lld prompts have fewer than --shots %d dev questions: with all of "
                    "them the prompt is longer than the model's %d positions\n",
                    (long long)fewer_shots, (long long)total_all, o->shots, c->max_len);
        if (truncated && !o->no_warnings)
            fprintf(stderr,
                    "qlora: warning: MMLU: %lld of %lld prompts are longer than the model's %d positions even without "
                    "dev questions; their start was cut\n",
                    (long long)truncated, (long long)total_all, c->max_len);
        if (o->table) {
            fprintf(out, "%-40s %9s %8s %9s\n", "subject", "questions", "correct", "accuracy");
            for (size_t s = 0; s < ns; s++)
                if (sub_n[s])
                    fprintf(out, "%-40s %9lld %8lld %8.1f%%\n", subjects[s], (long long)sub_n[s], (long long)sub_ok[s],
                            100.0 * (double)sub_ok[s] / (double)sub_n[s]);
            const size_t k = json_object_size(per);
            fprintf(out, "%-40s %9lld %8lld %8.1f%%  (the mean of the %zu subjects' accuracies, as qlora.py reports it)\n",
                    "all subjects", (long long)total_all, (long long)correct_all, k ? 100.0 * sum_subject / (double)k : 0.0,
                    k);
            fprintf(out, "%-40s %9s %8s %8.1f%%  (correct / questions)\n", "all questions", "", "",
                    total_all ? 100.0 * (double)correct_all / (double)total_all : 0.0);
        }
        json_t *res = json_object();
        json_object_set_new(res, "mmlu_split", json_string(split));
        json_object_set_new(res, "shots", json_integer(o->shots));
        json_object_set_new(res, "subjects", json_integer((json_int_t)json_object_size(per)));
        json_object_set_new(res, "questions", json_integer(total_all));
        json_object_set_new(res, "accuracy", json_real(json_object_size(per) ? sum_subject / (double)json_object_size(per) : 0));
        json_object_set_new(res, "accuracy_micro", json_real(total_all ? (double)correct_all / (double)total_all : 0));
        json_object_set_new(res, "prompts_with_fewer_shots", json_integer(fewer_shots));
        json_object_set_new(res, "prompts_truncated", json_integer(truncated));
        json_object_set_new(res, "tokens_run", json_integer(run));
        json_object_set_new(res, "tokens_reused", json_integer(prompt_tokens - run)); /* the prompts' tokens not run */
        json_t *aid = json_array();
        for (int k = 0; k < 4; k++) json_array_append_new(aid, json_integer(letter_id[k]));
        json_object_set_new(res, "answer_token_ids", aid);
        json_object_set_new(res, "answer_tokens", json_string(by_last ? "last" : "first"));
        json_object_set_new(res, "per_subject", per);
        per = NULL;
        char *text = ql_json_dumps_py(res, 0, 0);
        json_decref(res);
        if (text) fprintf(out, "%s\n", text);
        free(text);
    }
    json_decref(per);
    free(prev);
    free(sub_n);
    free(sub_ok);
    ql_lora_model_destroy(lm);
    ql_be_ctx_close(ctx);
    free(logits);
    free(group_lens);
    for (size_t i = 0; i < ns; i++) free(subjects[i]);
    free(subjects);
    free(split_dir);
    free(dev_dir);
    return rc;
}
