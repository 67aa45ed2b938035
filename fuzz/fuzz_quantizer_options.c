/* Quantizer specs (core/plugin.c ql_qz_open and each shipped plugin's
 * create()/describe()): "<plugin>:" + the input, the plugin chosen by the
 * input's hash among nf4, fp4 and int8.  A spec that opens is described,
 * priced and asked for its checkpoint config, and must open again from its
 * own canonical options. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "qlora/error.h"
#include "qlora/plugin.h"

static const char *const plugins[] = {"nf4", "fp4", "int8"};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    qf_pin_plugins();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *name = plugins[qf_hash(data, size) % 3];
    size_t nl = strlen(name);
    char *spec = malloc(nl + 1 + size + 1);
    if (!spec) return 0;
    memcpy(spec, name, nl);
    spec[nl] = ':';
    memcpy(spec + nl + 1, data, size);
    spec[nl + 1 + size] = '\0'; /* a NUL inside the input ends the spec, as on a command line */
    ql_qz *q = NULL;
    ql_error_clear();
    int rc = ql_qz_open(spec, &q);
    qf_check_status(rc, "ql_qz_open");
    if (rc == QL_OK) {
        char buf[4096];
        (void)q->desc->bits_per_param(q->inst, 64, 64);
        (void)q->desc->bits_per_param(q->inst, 1, 1);
        ql_error_clear();
        rc = q->desc->checkpoint_config(q->inst, buf, sizeof buf);
        qf_check_status(rc, "checkpoint_config");
        /* the canonical form opens the same quantizer */
        snprintf(buf, sizeof buf, "%s%s%s", q->desc->name, q->options[0] ? ":" : "", q->options);
        ql_qz *again = NULL;
        ql_error_clear();
        rc = ql_qz_open(buf, &again);
        if (rc != QL_OK || strcmp(again->options, q->options) != 0) {
            fprintf(stderr, "fuzz harness: '%s' opened as '%s' but that does not reopen: %s\n", spec, buf,
                    rc ? ql_error_message() : again->options);
            abort();
        }
        ql_qz_close(again);
    }
    ql_qz_close(q);
    free(spec);
    return 0;
}
