#!/usr/bin/env python3
"""Compare `qlora quantize` output with bitsandbytes, tensor by tensor, bit for bit.

Runs on a machine with a CUDA GPU, PyTorch, safetensors, transformers and a
bitsandbytes build.  Two kinds of input:
  1. a real checkpoint (default ../shared/models/stories260K), quantized by
     transformers + bitsandbytes (from_pretrained with a BitsAndBytesConfig,
     then save_pretrained) and by qlora;
  2. synthetic checkpoints with awkward shapes and values (odd element counts,
     172-wide rows, sizes not divisible by 64 or 256, all-zero blocks, huge and
     tiny magnitudes, F16 and BF16 sources), quantized by
     bitsandbytes.functional directly and by qlora.
Every tensor must be byte-identical and every quant_state JSON equal field by
field.  Prints one line per case and a summary; exits non-zero on any mismatch.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def qlora(args, *cmd):
    r = subprocess.run([args.qlora, *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"qlora {' '.join(cmd)} failed: {r.stderr.strip()}")


def tensor_bytes(t):
    t = t.contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def compare_state_dicts(ours, theirs, keys, label):
    """Byte-compare the listed keys; quant_state JSON field by field."""
    problems = []
    for k in keys:
        if k not in ours:
            problems.append(f"{k}: missing in qlora output")
            continue
        if k not in theirs:
            problems.append(f"{k}: missing in bitsandbytes output")
            continue
        a, b = ours[k], theirs[k]
        if ".quant_state." in k:
            ja = json.loads(bytes(a.tolist()).decode())
            jb = json.loads(bytes(b.tolist()).decode())
            if ja != jb:
                problems.append(f"{k}: JSON differs: qlora {ja} bnb {jb}")
            elif tensor_bytes(a) != tensor_bytes(b):
                problems.append(f"{k}: JSON equal field by field but bytes differ")
            continue
        if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
            problems.append(f"{k}: dtype/shape {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
            continue
        ba, bb = tensor_bytes(a), tensor_bytes(b)
        if ba != bb:
            n = sum(1 for x, y in zip(ba, bb) if x != y)
            first = next(i for i, (x, y) in enumerate(zip(ba, bb)) if x != y)
            problems.append(f"{k}: {n} of {len(ba)} bytes differ (first at byte {first}: {ba[first]} vs {bb[first]})")
    for p in problems[:12]:
        print(f"    {label}: {p}")
    return problems


def bnb_config(kind, dq):
    from transformers import BitsAndBytesConfig
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=dq,
                              bnb_4bit_compute_dtype=torch.float32)


def check_checkpoint(args, model_dir, kind, dq, work):
    from transformers import AutoModelForCausalLM
    label = f"{os.path.basename(model_dir.rstrip('/'))} {kind}{' dq' if dq else ''} (transformers)"
    spec = kind if kind == "int8" else f"{kind}:double_quant={int(dq)}"
    ours_dir = os.path.join(work, f"ours-{kind}-{int(dq)}")
    qlora(args, "quantize", f"--quantizer={spec}", model_dir, "-o", ours_dir, "--force", "--quiet")
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config(kind, dq),
                                                 device_map="cuda", dtype=torch.float32)
    theirs_dir = os.path.join(work, f"bnb-{kind}-{int(dq)}")
    model.save_pretrained(theirs_dir)
    del model
    ours = load_file(os.path.join(ours_dir, "model.safetensors"))
    theirs = load_file(os.path.join(theirs_dir, "model.safetensors"))
    keys = sorted(set(ours) | set(theirs))
    problems = compare_state_dicts(ours, theirs, keys, label)
    # config.json: quantization_config field by field
    qa = json.load(open(os.path.join(ours_dir, "config.json")))["quantization_config"]
    qb = json.load(open(os.path.join(theirs_dir, "config.json")))["quantization_config"]
    cfg_diff = {k: (qa.get(k), qb.get(k)) for k in set(qa) | set(qb) if qa.get(k) != qb.get(k)}
    if cfg_diff:
        print(f"    {label}: quantization_config differs: {cfg_diff}")
        problems.append("config")
    print(f"{'OK  ' if not problems else 'FAIL'} {label}: {len(keys)} tensors compared")
    return not problems


def synthetic_cases(seed):
    g = torch.Generator().manual_seed(seed)
    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale
    cases = {}
    cases["awkward"] = {
        "0.mlp.down_proj": randn(64, 172, scale=0.02),
        "0.mlp.up_proj": randn(172, 64, scale=0.05),
        "0.self_attn.q_proj": randn(3, 5),            # 15 elements: odd, one short block
        "0.self_attn.k_proj": randn(1, 63),           # odd, < 64
        "0.self_attn.v_proj": randn(7, 129),          # 903: odd, crosses rows
        "0.self_attn.o_proj": randn(33, 65),          # 2145
        "0.mlp.gate_proj": randn(100, 257, scale=3.0),  # 25700: not a multiple of 64 or 256
        "1.mlp.down_proj": randn(512, 300, scale=0.01),  # 2400 blocks: 10 nested blocks
        "1.mlp.up_proj": randn(1, 1),
    }
    zeros = randn(16, 64)
    zeros[2:5] = 0.0   # three all-zero 64-blocks
    zeros[7, :] = 0.0
    zeros[9, 10:30] = 0.0
    mags = randn(8, 256)
    mags[0] *= 1e30
    mags[1] *= 1e-30
    mags[2] = mags[2] * 0 + 3e38
    mags[3] *= 1e-39   # subnormal
    mags[4, ::3] = 1e-45
    mags[5] = mags[5].abs() * 1e20
    mags[6] = -mags[6].abs()
    cases["values"] = {
        "0.self_attn.q_proj": zeros,
        "0.self_attn.k_proj": mags,
        "0.self_attn.v_proj": torch.full((4, 64), 0.3),   # constant blocks
        "0.mlp.up_proj": randn(64, 172).to(torch.bfloat16),
        "0.mlp.down_proj": randn(172, 64).to(torch.float16),
    }
    cases["large"] = {"0.mlp.down_proj": randn(4096, 4096, scale=0.02)}  # 262144 blocks: multi-block mean
    return cases


def write_fake_model(path, tensors):
    os.makedirs(path, exist_ok=True)
    sd = {f"model.layers.{k}.weight": v.contiguous() for k, v in tensors.items()}
    sd["model.embed_tokens.weight"] = torch.randn(8, 4)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, open(os.path.join(path, "config.json"), "w"))


def check_synthetic(args, name, tensors, work):
    import bitsandbytes.functional as F
    model_dir = os.path.join(work, f"synthetic-{name}")
    write_fake_model(model_dir, tensors)
    ok = True
    configs = [("nf4", 1, 64), ("nf4", 0, 64), ("fp4", 1, 64), ("fp4", 0, 64), ("nf4", 1, 32), ("nf4", 1, 128),
               ("fp4", 0, 256), ("nf4", 1, 4096), ("int8", 0, 0)]
    for kind, dq, bs in configs:
        label = f"synthetic-{name} {kind}" + ("" if kind == "int8" else f" blocksize={bs}{' dq' if dq else ''}")
        if kind == "int8" and name == "values":
            tensors_used = {k: v for k, v in tensors.items() if k != "0.self_attn.k_proj"}  # 3e38 overflows fp16
        else:
            tensors_used = tensors
        spec = "int8" if kind == "int8" else f"{kind}:blocksize={bs},double_quant={dq}"
        out = os.path.join(work, f"ours-{name}-{kind}-{bs}-{dq}")
        if tensors_used is not tensors:
            md = model_dir + "-int8"
            write_fake_model(md, tensors_used)
        else:
            md = model_dir
        qlora(args, "quantize", f"--quantizer={spec}", md, "-o", out, "--force", "--quiet")
        ours = load_file(os.path.join(out, "model.safetensors"))
        theirs = {}
        for k, w in tensors_used.items():
            p = f"model.layers.{k}"
            wc = w.cuda()
            if kind == "int8":
                cb, scb, _ = F.int8_vectorwise_quant(wc.to(torch.float16))
                theirs[f"{p}.weight"] = cb.cpu()
                theirs[f"{p}.SCB"] = scb.cpu()
                theirs[f"{p}.weight_format"] = torch.tensor(0, dtype=torch.uint8)
            else:
                q, st = F.quantize_4bit(wc, blocksize=bs, compress_statistics=bool(dq), quant_type=kind)
                theirs[f"{p}.weight"] = q.cpu()
                for sk, sv in st.as_dict(packed=True).items():
                    theirs[f"{p}.weight.{sk}"] = sv.cpu()
        keys = sorted(k for k in set(ours) | set(theirs) if k.startswith("model.layers."))
        problems = compare_state_dicts(ours, theirs, keys, label)
        print(f"{'OK  ' if not problems else 'FAIL'} {label}: {len(keys)} tensors compared")
        ok &= not problems
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qlora", default="build/core/qlora")
    ap.add_argument("--model", default="../shared/models/stories260K")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--skip-large", action="store_true")
    args = ap.parse_args()
    import bitsandbytes
    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, device {torch.cuda.get_device_name()}")
    work = tempfile.mkdtemp(prefix="qlora-bnb-")
    results = []
    try:
        if os.path.isdir(args.model):
            for kind, dq in [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False), ("int8", False)]:
                results.append(check_checkpoint(args, args.model, kind, dq, work))
        else:
            print(f"skip: no model at {args.model}")
        for name, tensors in synthetic_cases(args.seed).items():
            if name == "large" and args.skip_large:
                continue
            results.append(check_synthetic(args, name, tensors, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    passed = sum(results)
    print(f"bnb-compare: {passed} passed, {len(results) - passed} failed")
    sys.exit(0 if passed == len(results) else 1)


if __name__ == "__main__":
    main()
