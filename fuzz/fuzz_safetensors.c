/* safetensors reader (core/safetensors.c) and the float conversions that
 * follow it (core/dtype.c): the input is a whole .safetensors file. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "qlora/dtype.h"
#include "qlora/error.h"
#include "qlora/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *path = qf_write("model.safetensors", data, size);
    ql_st_file *f = NULL;
    ql_error_clear();
    int rc = ql_st_open(path, &f);
    qf_check_status(rc, "ql_st_open");
    if (rc == QL_OK) {
        (void)ql_st_metadata(f, "format");
        (void)ql_st_file_size(f);
        for (size_t i = 0; i < ql_st_count(f); i++) {
            const ql_tensor *t = ql_st_at(f, i);
            if (ql_st_find(f, t->name) == NULL) abort(); /* every listed tensor is found by its name */
            int64_t numel = ql_shape_numel(t->shape, t->ndim);
            if ((uint64_t)numel * ql_dtype_size(t->dtype) != t->nbytes) abort();
            /* read every byte the reader vouches for */
            volatile uint8_t sink = 0;
            for (uint64_t k = 0; k < t->nbytes; k++) sink ^= ((const uint8_t *)t->data)[k];
            (void)sink;
            if (ql_dtype_is_float(t->dtype) && numel <= (1 << 16)) {
                float *out = malloc((size_t)(numel ? numel : 1) * sizeof *out);
                if (out) {
                    rc = ql_convert_to_f32(t->dtype, t->data, (size_t)numel, out);
                    qf_check_status(rc, "ql_convert_to_f32");
                    (void)ql_first_nonfinite(t->dtype, t->data, (size_t)numel);
                    free(out);
                }
            }
        }
    }
    ql_st_close(f);
    free(path);
    return 0;
}
