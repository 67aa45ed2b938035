/* tokenizer.json loading (core/tokenizer.c ql_tokenizer_load), then encoding
 * and decoding with whatever loaded.  An input without QF_SEP is a
 * tokenizer.json file given by path; one with QF_SEP is a model folder:
 * tokenizer.json, tokenizer_config.json and config.json in that order
 * (an empty part is a missing file). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz_common.h"
#include "qlora/error.h"
#include "qlora/tokenizer.h"

static const char *const texts[] = {
    "Hello world",
    " Once upon a time, there was a little girl named Lily.\n\nShe liked  tabs\tand   spaces. ",
    "caf\xc3\xa9 \xe4\xb8\xad\xe6\x96\x87 \xf0\x9f\x98\x80 <s> </s> <unk> \xe2\x96\x81",
    "\xff\xfe invalid \xc3 utf-8 \x80",
    "it's 2026: don't I'll we've 12345 !!! ...",
};

static void exercise(const ql_tokenizer *t, const uint8_t *tail, size_t tail_len)
{
    for (size_t i = 0; i <= sizeof texts / sizeof texts[0]; i++) {
        const char *s = i < sizeof texts / sizeof texts[0] ? texts[i] : (const char *)tail;
        size_t n = i < sizeof texts / sizeof texts[0] ? strlen(s) : tail_len;
        for (int special = 0; special < 2; special++) {
            int32_t *ids = NULL;
            size_t count = 0;
            ql_error_clear();
            int rc = ql_tokenizer_encode(t, s, n, special, &ids, &count);
            qf_check_status(rc, "ql_tokenizer_encode");
            if (rc == QL_OK) {
                if (!ids) abort();
                for (size_t k = 0; k < count; k++)
                    if (ids[k] < 0 || (size_t)ids[k] >= ql_tokenizer_vocab_size(t)) abort();
                char *text = NULL;
                size_t len = 0;
                ql_error_clear();
                rc = ql_tokenizer_decode_len(t, ids, count, special, &text, &len);
                qf_check_status(rc, "ql_tokenizer_decode_len");
                free(text);
                if (count) (void)ql_tokenizer_piece(t, ids[0]);
            }
            free(ids);
        }
    }
    (void)ql_tokenizer_bos(t);
    (void)ql_tokenizer_eos(t);
    (void)ql_tokenizer_token_id(t, "<s>");
    (void)ql_tokenizer_piece(t, -1);
    (void)ql_tokenizer_piece(t, (int32_t)ql_tokenizer_vocab_size(t));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *part[3];
    size_t len[3];
    size_t n = qf_split(data, size, part, len, 3);
    char *target;
    if (n == 1) {
        target = qf_write("tokenizer.json", data, size);
    } else {
        target = qf_path("model");
        qf_mkdir(target);
        const char *names[3] = {"tokenizer.json", "tokenizer_config.json", "config.json"};
        for (int i = 0; i < 3; i++) {
            char p[4096];
            snprintf(p, sizeof p, "%s/%s", target, names[i]);
            if (len[i] || i == 0) qf_write_path(p, part[i], len[i]);
            else unlink(p);
        }
    }
    ql_tokenizer *t = NULL;
    ql_error_clear();
    int rc = ql_tokenizer_load(target, &t);
    qf_check_status(rc, "ql_tokenizer_load");
    if (rc == QL_OK) {
        size_t tail = size < 64 ? size : 64;
        exercise(t, data + size - tail, tail);
    }
    ql_tokenizer_destroy(t);
    free(target);
    return 0;
}
