#!/usr/bin/env python3
"""qlora's optq against IST-DASLab/gptq's own GPTQ class, on stories260K.

For each configuration, `qlora quantize --quantizer=optq:... --calib-data`
quantizes the model and saves the calibration windows it drew
(--calib-save).  This script then runs the reference's GPTQ and Quantizer
classes (gptq.py, quant.py of github.com/IST-DASLab/gptq, read from a
local clone at run time and never copied here) in float64 over the same
windows, layer by layer and group by group as the reference's llama.py
runs them with --true-sequential, and compares:

  * the share of identical integer codes (ours decoded from the GPTQ
    checkpoint; the reference's recorded as its quantize() computes them),
  * each linear's output error ||W X^T - Q X^T|| on the inputs the
    reference fed that linear, ours over the reference's,
  * the eval NLL of the float64 model with the reference's Q and with ours,
    and qlora eval's NLL of our checkpoint.

The reference casts to float32 with .float(); for the run, .float() means
.double(), so everything it computes is float64.  Writes
tests/reference/optq/compare.json and, per configuration, the reference's
codes (ref_codes_<name>.safetensors) that tests/test_optq.c checks a fresh
build against.

usage: gptq_compare.py [--gptq-git /work/.mirror/IST-DASLab+gptq/repo]
                       [--qlora build/core/qlora] [--shared ../shared]
"""
import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

CONFIGS = [
    # name, bits, groupsize, act_order, sym
    ("b4_g128", 4, 128, 0, 0),
    ("b3_g128", 3, 128, 0, 0),
    ("b3_gm1_act", 3, -1, 1, 0),
    ("b2_g32_sym", 2, 32, 0, 1),
]
SAMPLES, LEN, SEED, DAMP = 32, 128, 1, 0.01
EVAL_EXAMPLES = 200
GROUPS = [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.o_proj"],
          ["mlp.up_proj", "mlp.gate_proj"], ["mlp.down_proj"]]


def load_reference(git_dir, into):
    for f in ("gptq.py", "quant.py"):
        text = subprocess.run(["git", "--git-dir", git_dir, "show", "HEAD:" + f], check=True,
                              capture_output=True).stdout
        with open(os.path.join(into, f), "wb") as fh:
            fh.write(text)
    sys.path.insert(0, into)
    import gptq  # noqa: E402  (the reference)
    import quant  # noqa: E402
    return gptq, quant


@contextlib.contextmanager
def float64_reference():
    """The reference in float64: .float() is .double(); no CUDA sync."""
    saved_float, saved_sync, saved_dtype = torch.Tensor.float, torch.cuda.synchronize, torch.get_default_dtype()
    torch.Tensor.float = lambda self, *a, **k: self.double()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.Tensor.float, torch.cuda.synchronize = saved_float, saved_sync
        torch.set_default_dtype(saved_dtype)


def unpack_stream(words, bits, n):
    """Fields of a little-endian bit stream along axis 0 of words [w, m] (uint32)."""
    words = words.astype(np.uint64)
    out = np.zeros((n, words.shape[1]), dtype=np.int64)
    for k in range(n):
        bit = k * bits
        w, sh = bit // 32, bit % 32
        v = words[w] >> np.uint64(sh)
        if sh + bits > 32:
            v |= words[w + 1] << np.uint64(32 - sh)
        out[k] = (v & np.uint64((1 << bits) - 1)).astype(np.int64)
    return out


def ours(tensors, prefix, bits):
    """codes [out, in], dequantized weight [out, in] of one GPTQ layer."""
    qw = tensors[prefix + ".qweight"].view(np.uint32)
    qz = tensors[prefix + ".qzeros"].view(np.uint32)
    sc = tensors[prefix + ".scales"].astype(np.float64)
    g = tensors[prefix + ".g_idx"].astype(np.int64)
    cols, rows = g.shape[0], qw.shape[1]
    codes = unpack_stream(qw, bits, cols).T  # [rows, cols]
    zeros = (unpack_stream(qz.T, bits, rows).T + 1) & ((1 << bits) - 1)  # [groups, rows]
    w = sc[g].T * (codes - zeros[g].T)
    return codes, w


def causal_mask(T):
    return torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)[None, None]


def layer_forward(model, layer, x, pos, mask):
    cos_sin = model.model.rotary_emb(x, pos)
    out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    return out[0] if isinstance(out, tuple) else out


def run_reference(model, gptq, quant, windows, bits, gs, act, sym, follow=None):
    """llama.py's true-sequential pass with the reference classes: codes,
    quantized weights and each linear's inputs.  follow: {prefix: weight}
    to put in place of each linear's reference Q once it is quantized, so
    that every later group sees the inputs our pass fed it."""
    T = windows.shape[1]
    pos = torch.arange(T)[None]
    mask = causal_mask(T)
    codes, qweights, inputs = {}, {}, {}
    with torch.no_grad():
        inps = [model.model.embed_tokens(windows[j:j + 1]) for j in range(windows.shape[0])]
        for i, layer in enumerate(model.model.layers):
            modules = dict(layer.named_modules())
            for names in GROUPS:
                g = {}
                for n in names:
                    g[n] = gptq.GPTQ(modules[n])
                    g[n].quantizer = quant.Quantizer()
                    g[n].quantizer.configure(bits, perchannel=True, sym=bool(sym), mse=False)
                seen = {n: [] for n in names}

                def hook(n):
                    def f(_, inp, out):
                        seen[n].append(inp[0].detach().reshape(-1, inp[0].shape[-1]).clone())
                        g[n].add_batch(inp[0].data, out.data)
                    return f
                handles = [modules[n].register_forward_hook(hook(n)) for n in names]
                for x in inps:
                    layer_forward(model, layer, x, pos, mask)
                for h in handles:
                    h.remove()
                for n in names:
                    prefix = "model.layers.%d.%s" % (i, n)
                    d = torch.diag(g[n].H).clone()
                    d[d == 0] = 1
                    perm = torch.argsort(d, descending=True) if act else torch.arange(d.shape[0])
                    calls = []
                    real_quantize = gptq.quantize

                    def recording(x, scale, zero, maxq):
                        q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
                        calls.append(q.flatten().to(torch.int64))
                        return real_quantize(x, scale, zero, maxq)
                    gptq.quantize = recording
                    W = modules[n].weight.data.clone()
                    with contextlib.redirect_stdout(open(os.devnull, "w")):
                        g[n].fasterquant(blocksize=128, percdamp=DAMP, groupsize=gs, actorder=bool(act))
                    gptq.quantize = real_quantize
                    c = torch.stack(calls, 1)  # [rows, cols] in the quantization order
                    full = torch.empty_like(c)
                    full[:, perm] = c
                    codes[prefix] = full.numpy()
                    qweights[prefix] = (W, modules[n].weight.data.clone())
                    inputs[prefix] = torch.cat(seen[n], 0)
                    g[n].free()
                    if follow is not None:
                        modules[n].weight.data = follow[prefix].clone()
            inps = [layer_forward(model, layer, x, pos, mask) for x in inps]
    return codes, qweights, inputs


def eval_nll(model, examples):
    tot, n = 0.0, 0
    with torch.no_grad():
        for ids in examples:
            t = torch.tensor([ids])
            logits = model(t).logits[0, :-1]
            lp = torch.log_softmax(logits, -1)
            tot -= lp[torch.arange(len(ids) - 1), t[0, 1:]].sum().item()
            n += len(ids) - 1
    return tot / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gptq-git", default="/work/.mirror/IST-DASLab+gptq/repo")
    ap.add_argument("--qlora", default=os.path.join(ROOT, "build", "core", "qlora"))
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    args = ap.parse_args()
    model_dir = os.path.join(args.shared, "models", "stories260K")
    data = os.path.join(args.shared, "data", "tinystories", "validation.txt")
    out_dir = os.path.join(HERE, "optq")
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="gptq-compare-")
    gptq, quant = load_reference(args.gptq_git, tmp)
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(data) as f:
        stories = [s for s in f.read().split("\n\n") if s.strip()][:EVAL_EXAMPLES]
    examples = [[tok.bos_token_id] + tok.encode(s, add_special_tokens=False) for s in stories]

    def fresh():
        m = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="eager").double().eval()
        return m

    base = fresh()
    result = {"model": "stories260K", "calibration": {"file": "tinystories/validation.txt", "samples": SAMPLES,
                                                      "len": LEN, "seed": SEED, "damp": DAMP},
              "eval": {"examples": EVAL_EXAMPLES, "nll_fp64": eval_nll(base, examples)}, "configs": {}}
    for name, bits, gs, act, sym in CONFIGS:
        spec = "optq:bits=%d,groupsize=%d,act_order=%d,sym=%d,damp=%g" % (bits, gs, act, sym, DAMP)
        qdir = os.path.join(tmp, name)
        windows_json = os.path.join(tmp, name + ".json")
        subprocess.run([args.qlora, "quantize", "--quantizer=" + spec, model_dir, "-o", qdir, "--calib-data", data,
                        "--calib-format", "text", "--calib-samples", str(SAMPLES), "--calib-len", str(LEN),
                        "--seed", str(SEED), "--calib-save", windows_json, "--quiet"], check=True,
                       stdout=subprocess.DEVNULL)
        with open(windows_json) as f:
            windows = torch.tensor(json.load(f)["tokens"])
        tensors = load_file(os.path.join(qdir, "model.safetensors"))
        ev = subprocess.run([args.qlora, "eval", "--model", qdir, "--data", data, "--format", "text",
                             "--max-examples", str(EVAL_EXAMPLES), "--quiet"], check=True, capture_output=True,
                            text=True).stdout
        qlora_nll = json.loads(ev.strip().splitlines()[-1])["nll"]
        our_codes, our_w = {}, {}
        for prefix in (k[:-len(".qweight")] for k in tensors if k.endswith(".qweight")):
            c, w = ours(tensors, prefix, bits)
            our_codes[prefix], our_w[prefix] = c, torch.from_numpy(w)
        entry = {"spec": spec}
        # per layer, on the inputs our pass fed it: the reference's GPTQ on
        # the same inputs (each later group sees our quantized weights)
        model = fresh()
        with float64_reference():
            codes, qweights, inputs = run_reference(model, gptq, quant, windows, bits, gs, act, sym, follow=our_w)
        same = total = 0
        layers = {}
        for prefix, ref_codes in codes.items():
            c = our_codes[prefix]
            same += int((c == ref_codes).sum())
            total += c.size
            W, Qref = qweights[prefix]
            X = inputs[prefix]
            e_ref = torch.linalg.norm((W - Qref) @ X.T).item()
            e_ours = torch.linalg.norm((W - our_w[prefix]) @ X.T).item()
            layers[prefix] = {"err_ref": e_ref, "err_ours": e_ours, "ratio": e_ours / e_ref,
                              "identical_codes": float((c == ref_codes).mean())}
        ratios = [v["ratio"] for v in layers.values()]
        entry.update({"same_inputs": {"identical_code_share": same / total, "codes": total,
                                      "max_abs_ratio_minus_1": max(abs(r - 1) for r in ratios), "layers": layers}})
        save_file({k: v.astype(np.uint8) for k, v in codes.items()},
                  os.path.join(out_dir, "ref_codes_%s.safetensors" % name))
        # the whole model: the reference's own pass, each block fed by its
        # own quantized blocks, against ours
        model = fresh()
        with float64_reference():
            codes_own, _, _ = run_reference(model, gptq, quant, windows, bits, gs, act, sym)
        ref_nll = eval_nll(model, examples)
        ours_model = fresh()
        for prefix, w in our_w.items():
            dict(ours_model.named_modules())[prefix].weight.data = w
        ours_nll = eval_nll(ours_model, examples)
        own_same = sum(int((our_codes[p] == c).sum()) for p, c in codes_own.items())
        entry["own_pass"] = {"identical_code_share": own_same / total, "nll_reference_fp64": ref_nll,
                             "nll_ours_fp64": ours_nll, "nll_qlora_eval": qlora_nll}
        result["configs"][name] = entry
        print("%-12s same inputs: identical codes %.5f, max |ours/ref - 1| %.5f; own passes: identical codes %.5f, "
              "NLL ref %.5f ours %.5f (qlora eval %.5f)" % (name, same / total, max(abs(r - 1) for r in ratios),
                                                            own_same / total, ref_nll, ours_nll, qlora_nll))
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
        f.write("\n")
    print("fp64 NLL %.5f; wrote %s" % (result["eval"]["nll_fp64"], out_dir))


if __name__ == "__main__":
    main()
