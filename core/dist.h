/* Several processes training one adapter (data parallel), internal.
 *
 * The world comes from the environment a launcher sets, as torchrun, Slurm
 * (through a wrapper) or `qlora launch` do: WORLD_SIZE (default 1), RANK
 * (0..WORLD_SIZE-1), LOCAL_RANK (the process's index on its host, for
 * picking a GPU), MASTER_ADDR and MASTER_PORT (where rank 0 listens).  A
 * world of one needs none of them and opens no socket.
 *
 * The host communicator is a star over TCP: every rank connects to rank 0,
 * which sums the buffers it receives in rank order (x0 + x1 + ... ) and sends
 * the sum back, so every rank holds the same bits whatever the timing.  It
 * carries the LoRA gradients of the CPU backend (a few MB a step) and the
 * step's scalars; a GPU world all-reduces on the device through NCCL
 * instead (not built yet).  A peer that dies closes its socket, and the
 * others fail at once naming it; a peer that stops answering fails them
 * after QLORA_DIST_TIMEOUT seconds (default 1800).  Nothing waits forever. */
#ifndef QL_DIST_H
#define QL_DIST_H

#include <stddef.h>

typedef struct ql_dist ql_dist;

/* The world of the environment: *out NULL with QL_OK when WORLD_SIZE is
 * unset or 1; else connected (rank 0 waits up to the timeout for every
 * other rank to join).  Bad values are QL_EINVAL naming the variable. */
int ql_dist_from_env(ql_dist **out);
int ql_dist_rank(const ql_dist *d);  /* 0 for NULL */
int ql_dist_world(const ql_dist *d); /* 1 for NULL */
int ql_dist_local_rank(const ql_dist *d);
/* x[n] summed over the ranks (in rank order, on rank 0), the same bits on
 * every rank; a no-op for NULL */
int ql_dist_sum_f32(ql_dist *d, float *x, size_t n);
int ql_dist_sum_f64(ql_dist *d, double *x, size_t n);
void ql_dist_close(ql_dist *d);

#endif
