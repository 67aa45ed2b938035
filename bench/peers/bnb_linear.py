#!/usr/bin/env python3
"""The peer of qlora's 4-bit linear forward: y = x W^T with W held by
bitsandbytes as NF4 (blocksize 64, double quant, uint8 storage, bf16 compute,
i.e. what QLoRA trains on), beside torch's bf16 F.linear with the dense bf16
weight of the same shape.

For each shape OUTxIN (default 4096x4096, 11008x4096, 4096x11008, 28672x8192:
LLaMA-7b's attention, up/gate and down projections, and LLaMA-2-70b's up/gate)
and x = randn(--tokens, IN) bf16, each of the two is timed with CUDA events
around one call, --warmup calls first, and the median of --reps is reported,
with TFLOP/s (2*T*IN*OUT per call) and the ratio 4-bit / bf16.  The 4-bit call
is bitsandbytes' Linear4bit.forward (so whichever path the installed
bitsandbytes takes for this shape, bnb.matmul_4bit underneath), under
torch.no_grad() unless --requires-grad, which times the training forward
(autograd through bitsandbytes' MatMul4Bit).  Each row also has the largest
difference between the 4-bit output and F.linear with the dequantized weight,
relative to that output's largest magnitude (a sanity check, not a bench).

Prints one JSON line per shape, then a blank line and a table.  Run on the GPU
machine against bitsandbytes built from source on PYTHONPATH
(TASKS=linear bash scripts/gpu-check does both in one call):
  python3 bench/peers/bnb_linear.py [--shapes 4096x4096,...] [--tokens 4096]

--cpu-smoke is a SMOKE TEST, not a benchmark: tiny shapes on the CPU through
bitsandbytes' CPU backend, timed with time.perf_counter, to check the code
runs; its numbers mean nothing.
"""
import argparse
import json
import sys
import time


def parse_shapes(text):
    out = []
    for s in text.split(","):
        try:
            r, c = (int(x) for x in s.lower().split("x"))
        except ValueError:
            sys.exit("bnb_linear: --shapes wants OUTxIN[,OUTxIN...], e.g. 4096x11008; got %r" % s)
        if r <= 0 or c <= 0:
            sys.exit("bnb_linear: shape %r: both sides must be > 0" % s)
        out.append((r, c))
    return out


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def time_ms(fn, args, reps, warmup, cuda):
    import torch
    for _ in range(warmup):
        fn(*args)
    ms = []
    if cuda:
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(reps):
            e0.record()
            fn(*args)
            e1.record()
            e1.synchronize()
            ms.append(e0.elapsed_time(e1))
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn(*args)
            ms.append((time.perf_counter() - t) * 1e3)
    return median(ms)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,28672x8192", help="OUTxIN,...")
    ap.add_argument("--tokens", type=int, default=4096, help="rows of x (batch*seq)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--requires-grad", action="store_true",
                    help="x requires grad: time the training forward (autograd through MatMul4Bit)")
    ap.add_argument("--cpu-smoke", action="store_true", help="SMOKE TEST on the CPU (not a benchmark)")
    a = ap.parse_args()
    if a.tokens < 1 or a.reps < 1 or a.warmup < 0:
        ap.error("--tokens >= 1, --reps >= 1, --warmup >= 0")
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        sys.exit("bnb_linear: torch is not importable (%s)" % e)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF
    except ImportError as e:
        sys.exit("bnb_linear: bitsandbytes is not importable (%s); put the source build on PYTHONPATH "
                 "(scripts/gpu-check does)" % e)
    if a.cpu_smoke and a.shapes == ap.get_default("shapes"):
        a.shapes = "128x64,64x192"
    shapes = parse_shapes(a.shapes)
    if a.cpu_smoke:
        dev, cuda = torch.device("cpu"), False
        a.tokens, a.reps, a.warmup = min(a.tokens, 16), min(a.reps, 3), min(a.warmup, 1)
        gpu = "cpu (SMOKE TEST, not a benchmark)"
    else:
        if not torch.cuda.is_available():
            sys.exit("bnb_linear: no CUDA device (torch %s, built for CUDA %s); run it on the GPU machine, "
                     "or pass --cpu-smoke" % (torch.__version__, torch.version.cuda))
        dev, cuda = torch.device("cuda", 0), True
        gpu = torch.cuda.get_device_name(dev)
    bf16 = torch.bfloat16
    ver = {"torch": torch.__version__, "cuda": torch.version.cuda, "bitsandbytes": bnb.__version__}
    rows = []
    for out_f, in_f in shapes:
        torch.manual_seed(0)
        w = torch.empty(out_f, in_f, dtype=bf16, device=dev).normal_(0.0, 0.02)
        lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=bf16, compress_statistics=True,
                                quant_type="nf4", quant_storage=torch.uint8, device="meta")
        lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4",
                                       quant_storage=torch.uint8, module=lin).to(dev)
        if not lin.weight.bnb_quantized:
            sys.exit("bnb_linear: Params4bit did not quantize on its move to %s" % dev)
        x = torch.randn(a.tokens, in_f, dtype=bf16, device=dev)
        if a.requires_grad:
            x.requires_grad_(True)
        grad_ctx = torch.enable_grad if a.requires_grad else torch.no_grad
        with grad_ctx():
            y4 = lin(x)
            w_dq = bnbF.dequantize_4bit(lin.weight.data, lin.weight.quant_state).to(bf16)
            ref = F.linear(x, w_dq)
            rel = float((y4.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))
            del y4, ref, w_dq
            ms4 = time_ms(lin, (x,), a.reps, a.warmup, cuda)
            ms16 = time_ms(F.linear, (x, w), a.reps, a.warmup, cuda)
        flop = 2.0 * a.tokens * in_f * out_f
        row = {"bench": "linear", "impl": "bitsandbytes Linear4bit.forward", "baseline": "torch F.linear bf16",
               "quant": "nf4+dq bs64 uint8", "out": out_f, "in": in_f, "tokens": a.tokens,
               "requires_grad": a.requires_grad, "reps": a.reps, "ms_4bit": round(ms4, 5), "ms_bf16": round(ms16, 5),
               "ratio": round(ms4 / ms16, 3), "tflops_4bit": round(flop / ms4 / 1e9, 2),
               "tflops_bf16": round(flop / ms16 / 1e9, 2), "max_rel_diff_vs_dequant": round(rel, 5), "gpu": gpu}
        row.update(ver)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del lin, w, x
        if cuda:
            torch.cuda.empty_cache()
    print("\n%-12s %6s %10s %10s %8s %10s %10s   (bitsandbytes %s nf4+dq vs torch %s bf16, %s%s)" % (
        "out x in", "T", "4bit ms", "bf16 ms", "ratio", "4bit TF/s", "bf16 TF/s", bnb.__version__, torch.__version__,
        gpu, ", requires_grad" if a.requires_grad else ""))
    for r in rows:
        print("%-12s %6d %10.4f %10.4f %8.2f %10.1f %10.1f" % (
            "%dx%d" % (r["out"], r["in"]), r["tokens"], r["ms_4bit"], r["ms_bf16"], r["ratio"],
            r["tflops_4bit"], r["tflops_bf16"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
