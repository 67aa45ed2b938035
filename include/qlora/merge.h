/* Fold a LoRA adapter into its base: W' = W + (alpha / r) * B A, written as
 * a plain Hugging Face checkpoint. */
#ifndef QLORA_MERGE_H
#define QLORA_MERGE_H

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ql_merge_opts {
    const char *quantizer; /* the base the adapter was trained on: NULL reads the run's run_config.json */
    int dtype;             /* QL_DTYPE_F32/F16/BF16, or -1: the base checkpoint's */
    int force;
    /* where the weights are materialized and merged: "cpu" (also NULL),
     * "cuda" or "auto"; the file is the same bytes either way */
    const char *device;
} ql_merge_opts;

int ql_merge(const char *model_dir, const char *adapter_dir, const char *out_dir, const ql_merge_opts *opts);

#ifdef __cplusplus
}
#endif
#endif
