#!/usr/bin/env python3
"""OPTQ against round-to-nearest on stories260K: eval NLL at 2, 3 and 4 bits,
groupsize 128 and -1 (one group a row), for docs/optq.md.

Eval: `qlora eval` on the first 200 stories of TinyStories validation.txt
(examples are separated by blank lines).  Calibration: 128 windows of 512
tokens (seed 0) drawn from the stories after those 200, so that no eval
story is calibrated on.  RTN is the same plugin with rtn=1: the same grid,
no calibration.  Writes tests/reference/optq/rtn_table.json and prints the
markdown table.

usage: optq_rtn_table.py [--qlora build/core/qlora] [--shared ../shared]
"""
import argparse
import json
import os
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
EVAL_EXAMPLES, SAMPLES, LEN, SEED = 200, 128, 512, 0


def split_after(path, n, out):
    """Write the text after the first n examples (blank-line separated) to out."""
    with open(path) as f:
        lines = f.read().split("\n")
    seen, in_example, start = 0, False, len(lines)
    for i, line in enumerate(lines):
        blank = line.strip() == ""
        if not blank and not in_example:
            if seen == n:
                start = i
                break
            seen += 1
        in_example = not blank
    with open(out, "w") as f:
        f.write("\n".join(lines[start:]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qlora", default=os.path.join(ROOT, "build", "core", "qlora"))
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    args = ap.parse_args()
    model = os.path.join(args.shared, "models", "stories260K")
    data = os.path.join(args.shared, "data", "tinystories", "validation.txt")
    tmp = tempfile.mkdtemp(prefix="optq-table-")
    calib = os.path.join(tmp, "calib.txt")
    split_after(data, EVAL_EXAMPLES, calib)

    def nll(folder):
        out = subprocess.run([args.qlora, "eval", "--model", folder, "--data", data, "--format", "text",
                              "--max-examples", str(EVAL_EXAMPLES), "--quiet"], check=True, capture_output=True,
                             text=True).stdout
        return json.loads(out.strip().splitlines()[-1])["nll"]

    rows = {"fp32": nll(model)}
    table = []
    for bits in (2, 3, 4):
        for gs in (128, -1):
            entry = {"bits": bits, "groupsize": gs}
            for mode, extra in (("optq", []), ("rtn", None)):
                spec = "optq:bits=%d,groupsize=%d%s" % (bits, gs, ",rtn=1" if extra is None else "")
                folder = os.path.join(tmp, "%s_b%d_g%d" % (mode, bits, gs))
                cmd = [args.qlora, "quantize", "--quantizer=" + spec, model, "-o", folder, "--quiet"]
                if extra is not None:
                    cmd += ["--calib-data", calib, "--calib-format", "text", "--calib-samples", str(SAMPLES),
                            "--calib-len", str(LEN), "--seed", str(SEED)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                bpp = float(out.split("matrix bits/param: ")[1].split()[0])
                entry[mode] = nll(folder)
                entry["matrix_bits_per_param"] = bpp
            table.append(entry)
            print("%d bits, groupsize %4d: OPTQ %.4f, RTN %.4f" % (bits, gs, entry["optq"], entry["rtn"]))
    result = {"model": "stories260K", "eval": {"file": "tinystories/validation.txt", "examples": EVAL_EXAMPLES},
              "calibration": {"file": "tinystories/validation.txt after the eval stories", "samples": SAMPLES,
                              "len": LEN, "seed": SEED}, "nll_fp32": rows["fp32"], "table": table}
    with open(os.path.join(HERE, "optq", "rtn_table.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print("\n| bits | groupsize | matrix bits/param | RTN NLL | OPTQ NLL | OPTQ - RTN |")
    print("|---|---|---|---|---|---|")
    for e in table:
        print("| %d | %s | %.3f | %.4f | %.4f | %+.4f |" % (e["bits"], "row" if e["groupsize"] < 0 else e["groupsize"],
                                                       e["matrix_bits_per_param"], e["rtn"], e["optq"],
                                                       e["optq"] - e["rtn"]))
    print("\nfp32: %.4f" % rows["fp32"])


if __name__ == "__main__":
    main()
