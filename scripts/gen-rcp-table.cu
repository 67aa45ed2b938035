// Measures rcp.approx.ftz.f32 (what `1.0f / x` compiles to under nvcc
// --use_fast_math, as bitsandbytes is built) on the GPU it runs on, and writes
// plugins/common/rcp_sm90.bin: one bit per float mantissa (2^23 bits, bit m at
// byte m/8, bit m%8), set where the GPU's result is not the correctly rounded
// reciprocal.  The result depends on the mantissa alone, and is always one of
// the two floats around the exact value, so that bit reproduces it exactly
// (plugins/common/fastmath.c).
//
//   nvcc -O2 -arch=sm_90 -o gen-rcp-table scripts/gen-rcp-table.cu
//   ./gen-rcp-table plugins/common/rcp_sm90.bin
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CHECK(x)                                                                                  \
    do {                                                                                          \
        cudaError_t e_ = (x);                                                                     \
        if (e_ != cudaSuccess) {                                                                  \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            exit(1);                                                                              \
        }                                                                                         \
    } while (0)

__global__ void differs_from_ieee(uint32_t exponent_bits, uint8_t *flag, int n)
{
    int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= n) return;
    float x = __uint_as_float(exponent_bits | (uint32_t)m);
    float approx;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(approx) : "f"(x));
    flag[m] = __float_as_uint(approx) != __float_as_uint(__frcp_rn(x));
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s OUT.bin\n", argv[0]);
        return 2;
    }
    const int n = 1 << 23;
    uint8_t *d;
    CHECK(cudaMalloc(&d, n));
    std::vector<uint8_t> one(n), other(n), bits(n / 8, 0);
    // [1, 2) and [2^-125, 2^-124): the pattern must not depend on the exponent
    differs_from_ieee<<<n / 256, 256>>>(0x3f800000u, d, n);
    CHECK(cudaGetLastError());
    CHECK(cudaMemcpy(one.data(), d, n, cudaMemcpyDeviceToHost));
    differs_from_ieee<<<n / 256, 256>>>(0x01000000u, d, n);
    CHECK(cudaGetLastError());
    CHECK(cudaMemcpy(other.data(), d, n, cudaMemcpyDeviceToHost));
    if (memcmp(one.data(), other.data(), n) != 0) {
        fprintf(stderr, "the pattern depends on the exponent on this GPU: a bit per mantissa is not enough\n");
        return 1;
    }
    long count = 0;
    for (int m = 0; m < n; m++)
        if (one[m]) {
            bits[m >> 3] |= (uint8_t)(1u << (m & 7));
            count++;
        }
    FILE *f = fopen(argv[1], "wb");
    if (!f || fwrite(bits.data(), 1, bits.size(), f) != bits.size() || fclose(f) != 0) {
        perror(argv[1]);
        return 1;
    }
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    printf("%s (sm_%d%d): %ld of %d mantissas differ from IEEE; wrote %s\n", prop.name, prop.major, prop.minor, count,
           n, argv[1]);
    return 0;
}
