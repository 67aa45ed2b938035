/* `qlora inspect` (core/quantize.c ql_inspect_file): a .safetensors file,
 * plain or quantized, described as text and as JSON; the quantized layers it
 * finds go through the plugins' load(). */
#include <stdio.h>
#include <stdlib.h>

#include "fuzz_common.h"
#include "qlora/error.h"
#include "qlora/quantize.h"

static FILE *devnull;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    qf_pin_plugins();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!devnull && !(devnull = fopen("/dev/null", "w"))) abort();
    char *path = qf_write("model.safetensors", data, size);
    ql_error_clear();
    int rc = ql_inspect_file(path, (int)(qf_hash(data, size) & 1), devnull);
    qf_check_status(rc, "ql_inspect_file");
    free(path);
    return 0;
}
