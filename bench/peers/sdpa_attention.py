#!/usr/bin/env python3
"""The peer of bench/bench_attention.c: PyTorch's scaled_dot_product_attention
(causal, bf16; FlashAttention-2 inside on sm_80+), what transformers uses for
LLaMA attention by default, forward and backward of one layer's attention at
the same shapes.  One JSON line a shape, then a table.
  python3 bench/peers/sdpa_attention.py [--reps N] [--shapes 7b,13b,70b,1b] [--seq T]
Times are medians, each the wall time of 10 calls and a sync over 10; FLOPs counted as bench_attention's."""
import argparse
import json
import time

import torch
import torch.nn.functional as F

SHAPES = {"7b": (32, 32, 128), "13b": (40, 40, 128), "70b": (64, 8, 128), "1b": (32, 8, 64)}


def timed(fn, reps):
    # as bench_attention times ours: wall time of 10 calls and a sync, over 10
    ts = []
    for r in range(reps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        if r >= 2:
            ts.append((time.perf_counter() - t0) * 1e3 / 10)
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shapes", default="7b,13b,70b,1b")
    ap.add_argument("--seq", type=int, default=2048)
    a = ap.parse_args()
    T, table = a.seq, []
    for name in a.shapes.split(","):
        nh, nkv, hd = SHAPES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, nh, T, hd, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        k = torch.randn(1, nkv, T, hd, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        v = torch.randn(1, nkv, T, hd, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        do = torch.randn(1, nh, T, hd, device="cuda", dtype=torch.bfloat16, generator=g)
        gqa = nkv != nh

        def fwd():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

        o = fwd()
        fwd_ms = timed(fwd, a.reps)

        def bwd():
            torch.autograd.grad(o, (q, k, v), do, retain_graph=True)

        bwd_ms = timed(bwd, a.reps)
        flop = 4.0 * nh * T * T * hd / 2
        r = {"bench": "attention", "impl": "torch-sdpa", "torch": torch.__version__, "shape": name,
             "gpu": torch.cuda.get_device_name(), "seq": T, "heads": nh, "kv_heads": nkv, "head_dim": hd,
             "fwd_ms": round(fwd_ms, 4), "bwd_ms": round(bwd_ms, 4), "fwd_tflops": round(flop / fwd_ms / 1e9, 1),
             "bwd_tflops": round(2.5 * flop / bwd_ms / 1e9, 1)}
        print(json.dumps(r), flush=True)
        table.append("%-5s %-6s %9.3f %9.3f %8.1f %8.1f" % (name, "sdpa", fwd_ms, bwd_ms, r["fwd_tflops"],
                                                          r["bwd_tflops"]))
    print("\n%-5s %-6s %9s %9s %8s %8s   (T %d, torch %s)" % ("shape", "path", "fwd ms", "bwd ms", "fwd TF/s",
                                                            "bwd TF/s", T, torch.__version__))
    print("\n".join(table))


if __name__ == "__main__":
    main()
