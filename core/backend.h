/* The compute backend (internal): every operator of the forward and backward
 * passes, and the buffers they work on, go through this table, so a GPU
 * implementation fills it in op by op and the model, LoRA and trainer code
 * stay as they are.  Buffer pointers are the backend's memory (host memory
 * for the CPU backend, device memory for a CUDA one); token ids and targets
 * are host arrays.  Signatures and semantics are those of ops.h and
 * ops_backward.h, where each operator is documented. */
#ifndef QL_BACKEND_H
#define QL_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "qlora/llama.h"

typedef struct ql_backend {
    const char *name;
    /* memory */
    void *(*alloc)(size_t bytes); /* NULL when out of memory */
    void (*free)(void *p);
    void (*zero)(void *p, size_t bytes);
    void (*copy)(void *dst, const void *src, size_t bytes);          /* backend to backend */
    void (*upload)(void *dst, const void *host_src, size_t bytes);   /* host to backend */
    void (*download)(void *host_dst, const void *src, size_t bytes); /* backend to host */
    /* weights of a linear layer, dense [out, in] float32, into backend memory */
    int (*materialize)(const ql_linear *l, float *w);
    /* forward */
    void (*embedding)(float *out, const float *table, const int32_t *ids, int64_t T, int64_t C);
    void (*matmul_nt)(float *y, const float *x, const float *w, int64_t T, int64_t in, int64_t out, int accumulate);
    void (*rmsnorm_forward)(float *out, float *rstd, const float *x, const float *weight, int64_t T, int64_t C,
                            float eps);
    void (*rope_forward)(float *x, int64_t T, int nheads, int hd, int pos0, const float *inv_freq /* host [hd/2] */,
                         float attn_scale);
    void (*attention_forward)(float *out, const float *q, const float *k, const float *v, int64_t T, int64_t past,
                              int nh, int nkv, int hd, int window);
    void (*attention_forward_train)(float *out, float *probs, const float *q, const float *k, const float *v,
                                    int64_t T, int nh, int nkv, int hd, int window);
    void (*swiglu_forward)(float *out, const float *gate, const float *up, int64_t n);
    void (*add_inplace)(float *x, const float *y, int64_t n);
    void (*lora_forward)(float *y, float *h, const float *xd, const float *a, const float *b, int64_t T, int64_t in,
                         int64_t out, int64_t r, float scale);
    void (*dropout_forward)(float *out, uint8_t *mask, const float *x, int64_t n, float p, uint64_t seed);
    /* backward */
    void (*matmul_backward_input)(float *dx, const float *dy, const float *w, int64_t T, int64_t in, int64_t out,
                                  int accumulate);
    void (*rmsnorm_backward)(float *dx, float *dweight, const float *dy, const float *x, const float *weight,
                             const float *rstd, int64_t T, int64_t C, int accumulate);
    void (*rope_backward)(float *dx, int64_t T, int nheads, int hd, int pos0, const float *inv_freq /* host [hd/2] */,
                          float attn_scale);
    void (*attention_backward)(float *dq, float *dk, float *dv, float *dscores, const float *dout, const float *q,
                               const float *k, const float *v, const float *probs, int64_t T, int nh, int nkv, int hd,
                               int window);
    void (*swiglu_backward)(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
                            int64_t n);
    void (*lora_backward)(float *dxd, float *da, float *db, float *dh, const float *dy, const float *xd,
                          const float *h, const float *a, const float *b, int64_t T, int64_t in, int64_t out,
                          int64_t r, float scale, int accumulate);
    void (*dropout_backward)(float *dx, const float *dout, const uint8_t *mask, int64_t n, float p, uint64_t seed,
                             int accumulate);
    /* loss: summed token NLL over rows whose (host) target is not ignore_index;
     * dlogits (may be NULL, may alias logits) = scale * (softmax - onehot) */
    double (*cross_entropy)(float *dlogits, const float *logits, const int32_t *targets, int64_t T, int64_t V,
                            int32_t ignore_index, float scale);
} ql_backend;

/* The backend a model runs on. */
const ql_backend *ql_llama_backend(const ql_llama *m);

/* The plain C reference backend (OpenMP loops). */
const ql_backend *ql_backend_cpu(void);

#endif
