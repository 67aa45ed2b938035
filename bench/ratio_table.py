#!/usr/bin/env python3
"""Ours beside the peer's, from the JSON lines of one scripts/gpu-check call.

Reads the lines of `qlora bench` (impl "qlora") and of the peer scripts in
bench/peers/ (qlora_step.py, bnb_materialize.py, bnb_linear.py, sdpa_attention.py) on stdin or
from the files named, and prints one table a kind of row that both sides
measured: the training step (s/step, tokens/s, memory, speed-up), the
materialize (ms and times a copy, speed-up) and the 4-bit linear forward
(its time over the bf16 product's on each side).  A shape only one side has
is left out.  Lines that are not JSON objects are skipped.
  python3 bench/ratio_table.py LOG...
"""
import json
import sys


def rows(lines):
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and "bench" in r and "error" not in r:
            yield r


def ours(r):
    return r.get("impl") == "qlora"


def main(argv):
    lines = []
    if len(argv) > 1:
        for p in argv[1:]:
            with open(p, encoding="utf-8", errors="replace") as f:
                lines += f.readlines()
    else:
        lines = sys.stdin.readlines()
    step, mat, lin, att = {}, {}, {}, {}
    for r in rows(lines):
        side = "ours" if ours(r) else "peer"
        if r["bench"] == "step" and "s_per_step" in r:
            step.setdefault((r["shape"], r.get("layers"), r.get("seq")), {})[side] = r
        elif r["bench"] == "materialize":
            q = r.get("quantizer", "").split(":")[0] if side == "ours" else r.get("type", "")
            mat.setdefault((q, r["rows"], r["cols"]), {})[side] = r
        elif r["bench"] == "linear":
            key = (r["rows"], r["cols"], r["tokens"]) if side == "ours" else (r["out"], r["in"], r["tokens"])
            lin.setdefault(key, {})[side] = r
        elif r["bench"] == "attention" and (side == "peer" or r.get("variant") == "fused"):
            att.setdefault((r["shape"], r["seq"]), {})[side] = r
    out = []
    both = [(k, v) for k, v in step.items() if len(v) == 2]
    if both:
        out.append("%-6s %6s %6s %10s %10s %9s %9s %9s" % ("step", "layers", "seq", "ours s", "peer s", "speed-up",
                                                           "ours GiB", "peer GiB"))
        for (k, layers, seq), v in both:
            o, p = v["ours"], v["peer"]
            out.append("%-6s %6s %6s %10.3f %10.3f %8.2fx %9.2f %9.2f" % (k, layers, seq, o["s_per_step"], p["s_per_step"],
                                                               p["s_per_step"] / o["s_per_step"], o["plan_gib"],
                                                               p.get("peak_gib", float("nan"))))
        out.append("")
    both = [(k, v) for k, v in sorted(mat.items()) if len(v) == 2]
    if both:
        out.append("%-5s %-12s %9s %9s %9s %9s %9s" % ("mat", "shape", "ours ms", "peer ms", "speed-up", "ours xcp",
                                                      "peer xcp"))
        for (q, rr, cc), v in both:
            o, p = v["ours"], v["peer"]
            out.append("%-5s %-12s %9.4f %9.4f %8.2fx %9.2f %9.2f" % (q, "%dx%d" % (rr, cc), o["ms"], p["ms"],
                                                                      p["ms"] / o["ms"], o["x_copy"], p["x_copy"]))
        out.append("")
    both = [(k, v) for k, v in sorted(lin.items()) if len(v) == 2]
    if both:
        out.append("%-12s %6s %11s %11s %12s %12s" % ("linear", "T", "ours 4b/bf16", "peer 4b/bf16", "ours 4b ms",
                                                      "peer 4b ms"))
        for (rr, cc, t), v in both:
            o, p = v["ours"], v["peer"]
            out.append("%-12s %6d %11.2f %12.2f %12.4f %12.4f" % ("%dx%d" % (rr, cc), t, o["x_bf16"], p["ratio"],
                                                                  o["ms_4bit"], p["ms_4bit"]))
    both = [(k, v) for k, v in sorted(att.items()) if len(v) == 2]
    if both:
        out.append("")
        out.append("%-9s %6s %9s %9s %9s %9s %9s" % ("attention", "T", "ours fwd", "peer fwd", "ours bwd", "peer bwd",
                                                   "fwd+bwd"))
        for (shape, t), v in both:
            o, p = v["ours"], v["peer"]
            out.append("%-9s %6d %9.3f %9.3f %9.3f %9.3f %8.2fx" % (shape, t, o["fwd_ms"], p["fwd_ms"], o["bwd_ms"],
                                                                    p["bwd_ms"], (p["fwd_ms"] + p["bwd_ms"]) /
                                                                    (o["fwd_ms"] + o["bwd_ms"])))
    print("\n".join(out) if out else "ratio_table: no row measured by both sides")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
