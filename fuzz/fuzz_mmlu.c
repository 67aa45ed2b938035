/* MMLU CSV files (core/mmlu.c): the input is cut at QF_SEP into the dev and
 * the test CSV of one subject (without QF_SEP both are the input), and
 * ql_mmlu_eval scores them on the tiny model; then every record of the input
 * goes through ql_csv_record. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "qlora/error.h"
#include "qlora/mmlu.h"

static ql_llama *model;
static ql_tokenizer *tok;
static char *root, *dev_csv, *test_csv;
static FILE *devnull;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    qf_pin_plugins();
    ql_llama_load_opts lo = {.quantizer = "none"};
    if (ql_llama_load(qf_tiny_model(), &lo, &model) != QL_OK || ql_tokenizer_load(qf_tiny_model(), &tok) != QL_OK) {
        fprintf(stderr, "fuzz harness: %s\n", ql_error_message());
        abort();
    }
    root = qf_path("mmlu");
    qf_mkdir(root);
    char p[4096];
    snprintf(p, sizeof p, "%s/dev", root);
    qf_mkdir(p);
    snprintf(p, sizeof p, "%s/test", root);
    qf_mkdir(p);
    dev_csv = qf_path("mmlu/dev/high_school_fuzz_dev.csv");
    test_csv = qf_path("mmlu/test/high_school_fuzz_test.csv");
    if (!(devnull = fopen("/dev/null", "w"))) abort();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *part[2];
    size_t len[2];
    if (qf_split(data, size, part, len, 2) == 1) {
        part[1] = data;
        len[1] = size;
    }
    qf_write_path(dev_csv, part[0], len[0]);
    qf_write_path(test_csv, part[1], len[1]);
    uint64_t h = qf_hash(data, size);
    ql_mmlu_opts o = {.dir = root, .split = "test", .shots = (int)(h % 3), .max_per_subject = 1 + (int64_t)((h >> 8) % 4),
                      .no_warnings = 1};
    ql_error_clear();
    int rc = ql_mmlu_eval(model, tok, &o, devnull);
    qf_check_status(rc, "ql_mmlu_eval");

    char *fields[8];
    size_t pos = 0;
    for (int guard = 0; guard <= (int)size + 1; guard++) {
        size_t before = pos;
        int n = ql_csv_record((const char *)data, size, &pos, fields, 8);
        if (n <= 0) break;
        if (pos <= before || pos > size) abort(); /* progress, within bounds */
        for (int i = 0; i < n && i < 8; i++) free(fields[i]); /* fields past 8 are counted, not kept */
    }
    return 0;
}
