/* QLP_HD marks the element operations that the CPU reference and the device
 * kernels share (fastmath.h, bnb_block.h, torch_mean.h, int8/int8_ops.h):
 * one definition compiled by the C compiler for the CPU and by nvcc for the
 * GPU, so the two cannot drift apart (internal). */
#ifndef QLP_HD_H
#define QLP_HD_H

#ifdef __CUDACC__
#define QLP_HD static inline __host__ __device__
#else
#define QLP_HD static inline
#endif

#endif
