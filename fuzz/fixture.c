/* fuzz_fixture DIR: write the harnesses' tiny model into DIR (used by
 * fuzz/make_seeds.py to build the adapter, checkpoint and plugin seeds). */
#include <stdio.h>

#include "fuzz_common.h"

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: fuzz_fixture DIR\n");
        return 2;
    }
    qf_write_tiny_model(argv[1]);
    return 0;
}
