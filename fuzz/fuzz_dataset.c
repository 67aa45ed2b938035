/* Dataset files (core/dataset.c ql_dataset_load), one harness per format:
 * built with -DQF_FORMAT_NAME="alpaca" (or input-output, self-instruct,
 * oasst1, text).  The input is the whole file; it is tokenized with the
 * stories260K tokenizer under limits chosen from the input's hash, then the
 * epoch order and a held-out split are drawn.  The file's format is
 * detected (ql_data_format_detect), and the whole input as one record goes
 * through ql_dataset_format_example too. */
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "qlora/dataset.h"
#include "qlora/error.h"

#ifndef QF_FORMAT_NAME
#error "build with -DQF_FORMAT_NAME=\"alpaca\" or another format"
#endif

static ql_tokenizer *tok;
static ql_data_format fmt;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    qf_pin_plugins();
    if (ql_data_format_parse(QF_FORMAT_NAME, &fmt) != QL_OK) abort();
    if (ql_tokenizer_load(qf_tiny_model(), &tok) != QL_OK) abort();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint64_t h = qf_hash(data, size);
    char *path = qf_write("data", data, size);
    ql_dataset_opts o = {.format = fmt};
    if (h & 1) { /* small limits, so that every cut happens */
        o.source_max_len = 1 + (int)((h >> 8) % 16);
        o.target_max_len = 1 + (int)((h >> 16) % 8);
        o.max_len = 2 + (int)((h >> 24) % 24);
        o.max_examples = (int64_t)((h >> 32) % 4);
    } else {
        o.source_max_len = 1024;
        o.target_max_len = 256;
        o.max_len = 512;
    }
    o.train_on_source = (int)((h >> 2) & 1);
    ql_dataset *d = NULL;
    ql_error_clear();
    int rc = ql_dataset_load(path, tok, &o, &d);
    qf_check_status(rc, "ql_dataset_load");
    if (rc == QL_OK) {
        if (d->n == 0) abort(); /* an empty result is an error, not a dataset */
        for (size_t i = 0; i < d->n; i++) {
            const ql_example *e = &d->examples[i];
            if (e->len <= 0 || (o.max_len > 0 && e->len > o.max_len) || e->n_source > e->len) abort();
            for (int32_t k = 0; k < e->len; k++)
                if (e->ids[k] < 0 || (size_t)e->ids[k] >= ql_tokenizer_vocab_size(tok)) abort();
        }
        size_t *order = malloc(d->n * sizeof *order);
        if (order) {
            ql_error_clear();
            rc = ql_dataset_order(d, (h & 4) ? -1 : (int64_t)(h >> 40), (int)((h >> 3) & 1), 1 + (int)((h >> 4) % 4),
                                  order);
            qf_check_status(rc, "ql_dataset_order");
            if (rc == QL_OK) {
                char *seen = calloc(d->n, 1);
                for (size_t i = 0; seen && i < d->n; i++) {
                    if (order[i] >= d->n || seen[order[i]]) abort(); /* a permutation */
                    seen[order[i]] = 1;
                }
                free(seen);
            }
            free(order);
        }
        if (d->n >= 2) {
            /* a held-out split is a partition of the examples */
            size_t n_eval = 1 + (size_t)((h >> 44) % (d->n - 1));
            ql_dataset *tr = NULL, *ev = NULL;
            ql_error_clear();
            rc = ql_dataset_split(d, n_eval, (int64_t)(h >> 48), &tr, &ev);
            qf_check_status(rc, "ql_dataset_split");
            if (rc == QL_OK && (ev->n != n_eval || tr->n + ev->n != d->n ||
                                tr->total_tokens + ev->total_tokens != d->total_tokens))
                abort();
            ql_dataset_destroy(tr);
            ql_dataset_destroy(ev);
        }
    }
    ql_dataset_destroy(d);
    ql_data_format detected;
    char why[256];
    ql_error_clear();
    rc = ql_data_format_detect(path, &detected, why, sizeof why);
    qf_check_status(rc, "ql_data_format_detect");
    if (rc == QL_OK && !ql_data_format_name(detected)[0]) abort();
    free(path);
    /* one record, as a string */
    char *rec = malloc(size + 1);
    if (rec) {
        memcpy(rec, data, size);
        rec[size] = '\0';
        char *src = NULL, *tgt = NULL;
        ql_error_clear();
        rc = ql_dataset_format_example(fmt, rec, &src, &tgt);
        qf_check_status(rc, "ql_dataset_format_example");
        free(src);
        free(tgt);
        free(rec);
    }
    return 0;
}
