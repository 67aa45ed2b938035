/* The arithmetic of bitsandbytes' blockwise quantizers, reproduced bit for
 * bit on the CPU (shared by the nf4, fp4 and int8 plugins; internal). */
#ifndef QLP_BNB_H
#define QLP_BNB_H

#include <stddef.h>
#include <stdint.h>

#include "bnb_block.h"
#include "pyfloat.h"

/* The 16-entry dequantization table as bitsandbytes stores it (quant_map). */
void qlp_4bit_table(qlp_4bit_type type, float table[16]);
/* Nearest code of a normalised value, with the reference's thresholds and
 * its handling of NaN (code 0). */
unsigned qlp_4bit_encode(qlp_4bit_type type, float x);

/* The signed 8-bit dynamic map (create_dynamic_map(signed=True)): 256 sorted values. */
void qlp_dynamic_map_signed(float map[256]);
/* Nearest code in a sorted 256-entry map, by the reference's binary search. */
unsigned qlp_code8_encode(const float map[256], float x);

/* Blockwise absmax quantization over the flat array x[0..n), as the CUDA
 * kernel does it (fast-math reciprocal, flush-to-zero), one qlp_4bit_block
 * or qlp_8bit_block (bnb_block.h) per block.
 * 4-bit: packed gets (n+1)/2 bytes (element 2j in the high nibble), absmax
 * one float per block.  8-bit: codes gets n bytes. */
void qlp_quantize_4bit_blocks(qlp_4bit_type type, const float *x, int64_t n, int blocksize, uint8_t *packed,
                              float *absmax);
void qlp_quantize_8bit_blocks(const float map[256], const float *x, int64_t n, int blocksize, uint8_t *codes,
                              float *absmax);

#endif
