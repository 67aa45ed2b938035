/* Encoding any bytes with a real tokenizer (stories260K's, SentencePiece-style
 * BPE with byte fallback), decoding the result, and decoding the input read as
 * token ids (core/tokenizer.c). */
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "qlora/error.h"
#include "qlora/tokenizer.h"

static ql_tokenizer *tok;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    qf_pin_plugins();
    if (ql_tokenizer_load(qf_tiny_model(), &tok) != QL_OK) abort();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int special = (int)(qf_hash(data, size) & 1);
    int32_t *ids = NULL;
    size_t n = 0;
    ql_error_clear();
    int rc = ql_tokenizer_encode(tok, (const char *)data, size, special, &ids, &n);
    qf_check_status(rc, "ql_tokenizer_encode");
    if (rc == QL_OK) {
        for (size_t i = 0; i < n; i++)
            if (ids[i] < 0 || (size_t)ids[i] >= ql_tokenizer_vocab_size(tok)) abort();
        char *text = NULL;
        size_t len = 0;
        ql_error_clear();
        rc = ql_tokenizer_decode_len(tok, ids, n, !special, &text, &len);
        qf_check_status(rc, "ql_tokenizer_decode_len");
        free(text);
    }
    free(ids);
    /* the same bytes as ids, any value: ids that name no token are skipped */
    size_t nid = size / 4;
    int32_t *raw = malloc((nid ? nid : 1) * sizeof *raw);
    if (!raw) return 0;
    memcpy(raw, data, nid * 4);
    char *text = NULL;
    ql_error_clear();
    rc = ql_tokenizer_decode(tok, raw, nid, special, &text);
    qf_check_status(rc, "ql_tokenizer_decode");
    free(text);
    free(raw);
    return 0;
}
