#!/usr/bin/env python3
"""The peer of bench/bench_materialize.c: bitsandbytes' dequantize_4bit
(NF4 / FP4, blocksize 64, double quant as QLoRA uses it) to bfloat16 at the
same shapes, timed the same way (CUDA events around one launch on each of
several weight copies, median of --reps samples), beside a device copy of the
same bytes.  Prints one JSON line per (type, shape), then a table.
Run on the GPU machine against bitsandbytes built from source
(scripts/gpu-check does both in one call)."""
import argparse
import json

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--types", default="nf4,fp4")
    ap.add_argument("--shapes", default="4096x4096,11008x4096,28672x8192")
    a = ap.parse_args()
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows_out = []
    for qt in a.types.split(","):
        for shape in a.shapes.split(","):
            r, c = (int(x) for x in shape.split("x"))
            torch.manual_seed(0)
            w = (torch.randn(r, c, device=dev) * 0.02).to(torch.bfloat16)
            q, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=qt,
                                    quant_storage=torch.uint8)
            in_bytes = q.numel() + st.absmax.numel() * st.absmax.element_size() + \
                st.state2.absmax.numel() * 4
            out_bytes = r * c * 2
            copies = min(8, 4 * l2 // (in_bytes + out_bytes) + 1)
            qs = [(q.clone(), st) for _ in range(copies)]
            outs = [torch.empty(r, c, dtype=torch.bfloat16, device=dev) for _ in range(copies)]
            half = (in_bytes + out_bytes) // 2
            src = [torch.empty(half, dtype=torch.uint8, device=dev).fill_(0x3c) for _ in range(copies)]
            dst = [torch.empty(half, dtype=torch.uint8, device=dev) for _ in range(copies)]
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ms, cms = [], []
            for rep in range(-3, a.reps):
                e0.record()
                for k in range(copies):
                    F.dequantize_4bit(qs[k][0], qs[k][1], out=outs[k])
                e1.record()
                e1.synchronize()
                t = e0.elapsed_time(e1) / copies
                e0.record()
                for k in range(copies):
                    dst[k].copy_(src[k])
                e1.record()
                e1.synchronize()
                ct = e0.elapsed_time(e1) / copies
                if rep >= 0:
                    ms.append(t)
                    cms.append(ct)
            ms.sort()
            cms.sort()
            tm, tc = ms[len(ms) // 2], cms[len(cms) // 2]
            row = {"bench": "materialize", "peer": "bitsandbytes " + bnb.__version__, "type": qt, "rows": r,
                   "cols": c, "out": "bf16", "ms": round(tm, 5), "gb_per_s": round((in_bytes + out_bytes) / tm / 1e6, 1),
                   "copy_ms": round(tc, 5), "x_copy": round(tm / tc, 3), "gpu": torch.cuda.get_device_name(0)}
            print(json.dumps(row), flush=True)
            rows_out.append(row)
    print(f"\n{'peer':<6} {'shape':<12} {'ms':>10} {'GB/s':>10} {'x copy':>8}   (bitsandbytes {bnb.__version__})")
    for row in rows_out:
        print(f"{row['type']:<6} {str(row['rows']) + 'x' + str(row['cols']):<12} {row['ms']:>10.4f} "
              f"{row['gb_per_s']:>10.0f} {row['x_copy']:>8.2f}")


if __name__ == "__main__":
    main()
