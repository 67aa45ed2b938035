#!/usr/bin/env python3
"""qlora's GPTQ layout against GPTQModel's own pack and unpack code.

GPTQModel (github.com/ModelCloud/GPTQModel) is read from a local clone at
run time; its functions are taken out of its source files by name and run
here with PyTorch (the package itself, with its many dependencies, is not
imported), and none of its code is copied into this repository.  Used:

  * PackableQuantLinear.pack_original (gptqmodel/nn_modules/qlinear): the
    writer, from dense weights, scales, zero points and g_idx, with zero
    points in its internal v2 form;
  * _revert_gptq_v1_qzeros_correction (utils/model_dequant.py): what its
    save does to v2 zero points of 3-bit layers (per field, -1), and the
    packed-word subtraction its save does for 2, 4 and 8 bits;
  * convert_gptq_file (utils/model_dequant.py): its reader of a GPTQ v1
    safetensors file, dequantizing every layer.

Checks, written to tests/reference/optq/gptqmodel_check.json:

  1. qlora's checkpoints (optq at 2, 3, 4 and 8 bits, act_order, g32, of the
     hf_models/llama model, whose shapes are multiples of 32 as GPTQModel
     requires): GPTQModel's reader gives the weights qlora's codes say, and
     GPTQModel's writer, given those weights, scales, zero points and
     g_idx, writes qlora's qweight and qzeros byte for byte.
  2. a model folder written by GPTQModel's writer (tests/reference/optq/
     gptqmodel_llama/: the 3-bit codes of check 1, packed by GPTQModel) and
     its reader's dequantized weights beside it (dequant.safetensors), which
     tests/test_optq.c loads with qlora and compares exactly.
  3. checkpoint format gptq_v2 (qzeros hold the zero points, not zero - 1):
     qlora's optq with format=gptq_v2 at each width against GPTQModel's
     reader told "gptq_v2" and its pack_original's own (v2) qzeros; and a
     v2 model folder packed by GPTQModel (gptqmodel_llama_v2/: check 2's
     3-bit codes), whose weights GPTQModel's reader gives as check 2's
     dequant.safetensors, so that the C test compares it against that file.

usage: gptqmodel_pack_check.py [--gptqmodel-git /work/.mirror/ModelCloud+GPTQModel/repo]
"""
import __future__
import argparse
import ast
import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import types
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn.modules.conv import _ConvNd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MODEL = os.path.join(HERE, "hf_models", "llama")
BITS = [2, 3, 4, 8]


def functions_from(git_dir, path, names, namespace, cls=None):
    """The named function definitions of one GPTQModel source file (of class
    cls, when given), compiled into namespace."""
    src = subprocess.run(["git", "--git-dir", git_dir, "show", "HEAD:" + path], check=True,
                         capture_output=True, text=True).stdout
    tree = ast.parse(src)
    body = tree.body
    if cls:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == cls).body
    found = [n for n in body if isinstance(n, ast.FunctionDef) and n.name in names]
    missing = set(names) - {n.name for n in found}
    if missing:
        raise SystemExit("%s: %s not found" % (path, sorted(missing)))
    mod = ast.Module(body=found, type_ignores=[])
    exec(compile(mod, "GPTQModel:" + path, "exec", flags=__future__.annotations.compiler_flag), namespace)


def gptqmodel(git_dir):
    ns = {"torch": torch, "t": torch, "np": np, "math": math, "Path": Path, "defaultdict": defaultdict,
          "safe_open": safe_open, "LOG": logging.getLogger("gptqmodel"), "PLANAR_BITS": (5, 6, 7),
          "Iterable": Iterable, "Dict": Dict, "Optional": Optional, "Tuple": Tuple, "transformers": transformers,
          "_ConvNd": _ConvNd,
          "THREADPOOLCTL": types.SimpleNamespace(threadpool_limits=lambda *a, **k: contextlib.nullcontext())}
    functions_from(git_dir, "gptqmodel/utils/model_dequant.py",
                   ["finalize_for_save", "_tensor_key_matches_ignored_layer", "_is_quant_auxiliary_tensor_key",
                    "_handle_ignored_tensor", "unpack_cols", "pack_cols", "unpack_rows",
                    "_require_int32_words_for_3bit", "_unpack_cols_3bit", "_pack_cols_3bit", "_unpack_rows_3bit",
                    "_uses_gptq_v1_qzeros", "_shift_gptq_qzeros", "_correct_gptq_v1_qzeros",
                    "_revert_gptq_v1_qzeros_correction", "convert_gptq_file"], ns)
    functions_from(git_dir, "gptqmodel/nn_modules/qlinear/__init__.py", ["pack_original"], ns,
                   cls="PackableQuantLinear")
    return ns


def pack_with_gptqmodel(ns, bits, weight, scales, zeros, g_idx):
    """GPTQModel's writer: pack_original on a layer, then its v2 -> v1 save step."""
    layer = types.SimpleNamespace(bits=bits, maxq=2 ** bits - 1, pack_dtype_bits=32, pack_factor=32 // bits,
                                  pack_np_dtype=np.int32, pack_np_math_dtype=np.uint32, planar=False, bias=None)
    layer.register_buffer = lambda name, value: setattr(layer, name, value)
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    ns["pack_original"](layer, linear, scales, zeros, g_idx)  # scales, zeros: [out, groups]
    v2 = layer.qzeros.clone()
    per_field = ns["_revert_gptq_v1_qzeros_correction"](v2, bits)
    word = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}.get(bits)
    if word is None:
        word_sub = per_field  # 3 bits: GPTQModel's save shifts per field
    else:
        word_sub = (v2.to(torch.int64) - word).remainder(1 << 32)
        word_sub = torch.where(word_sub >= 1 << 31, word_sub - (1 << 32), word_sub).to(torch.int32)
    return layer.qweight, per_field, word_sub, layer.scales, v2


def decode_ours(t, prefix, bits, zero_off=1):
    qw = t[prefix + ".qweight"].numpy().view(np.uint32).astype(np.uint64)
    qz = t[prefix + ".qzeros"].numpy().view(np.uint32).astype(np.uint64)
    g = t[prefix + ".g_idx"].numpy().astype(np.int64)
    sc = t[prefix + ".scales"].numpy()
    cols, rows = g.shape[0], qw.shape[1]

    def stream(words, n):
        out = np.zeros((n, words.shape[1]), dtype=np.int64)
        for k in range(n):
            b = k * bits
            v = words[b // 32] >> np.uint64(b % 32)
            if b % 32 + bits > 32:
                v |= words[b // 32 + 1] << np.uint64(32 - b % 32)
            out[k] = (v & np.uint64((1 << bits) - 1)).astype(np.int64)
        return out
    codes = stream(qw, cols).T
    zeros = (stream(qz.T, rows).T + zero_off) & ((1 << bits) - 1)
    return codes, zeros, sc, g


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gptqmodel-git", default="/work/.mirror/ModelCloud+GPTQModel/repo")
    ap.add_argument("--qlora", default=os.path.join(ROOT, "build", "core", "qlora"))
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    args = ap.parse_args()
    ns = gptqmodel(args.gptqmodel_git)
    data = os.path.join(args.shared, "data", "tinystories", "validation.txt")
    tmp = tempfile.mkdtemp(prefix="gptqmodel-check-")
    out_dir = os.path.join(HERE, "optq")
    report = {"gptqmodel_commit": subprocess.run(["git", "--git-dir", args.gptqmodel_git, "rev-parse", "HEAD"],
                                                 capture_output=True, text=True).stdout.strip(), "ours": {},
              "ours_v2": {}}
    v2_packed = None
    for bits, v2 in [(b, f) for f in (False, True) for b in BITS]:
        spec = "optq:bits=%d,groupsize=32,act_order=1%s" % (bits, ",format=gptq_v2" if v2 else "")
        qdir = os.path.join(tmp, "b%d%s" % (bits, "v2" if v2 else ""))
        subprocess.run([args.qlora, "quantize", "--quantizer=" + spec, MODEL, "-o", qdir, "--calib-data", data,
                        "--calib-format", "text", "--calib-samples", "16", "--calib-len", "64", "--quiet"],
                       check=True, stdout=subprocess.DEVNULL)
        path = os.path.join(qdir, "model.safetensors")
        with open(os.path.join(qdir, "config.json")) as f:
            qc = json.load(f)["quantization_config"]
        t = load_file(path)
        deq = ns["convert_gptq_file"](Path(path), torch.float32, qc, "cpu")
        res = {"layers": 0, "reader_exact": 0, "qweight_identical": 0, "qzeros_identical": 0,
               "zero_points_0": 0}
        if not v2:
            res["qzeros_identical_word_subtraction"] = 0
        packed = {}
        for prefix in sorted(k[:-len(".qweight")] for k in t if k.endswith(".qweight")):
            codes, zeros, sc, g = decode_ours(t, prefix, bits, 0 if v2 else 1)
            w = torch.from_numpy(sc.astype(np.float32)[g].T * (codes - zeros[g].T).astype(np.float32))
            res["layers"] += 1
            res["reader_exact"] += int(torch.equal(deq[prefix + ".weight"], w))
            qweight, qz_field, qz_word, scales, qz_v2 = pack_with_gptqmodel(
                ns, bits, w.double(), torch.from_numpy(sc.astype(np.float64)).T, torch.from_numpy(zeros).T,
                torch.from_numpy(g).to(torch.int32))
            res["qweight_identical"] += int(torch.equal(qweight, t[prefix + ".qweight"]))
            if v2:
                res["qzeros_identical"] += int(torch.equal(qz_v2, t[prefix + ".qzeros"]))
            else:
                res["qzeros_identical"] += int(torch.equal(qz_field, t[prefix + ".qzeros"]))
                res["qzeros_identical_word_subtraction"] += int(torch.equal(qz_word, t[prefix + ".qzeros"]))
            res["zero_points_0"] += int((zeros == 0).sum())
            packed[prefix] = (qweight, qz_v2 if v2 else qz_field, scales, g)
        if v2:
            assert qc["checkpoint_format"] == "gptq_v2", qc
        report["ours_v2" if v2 else "ours"]["%d" % bits] = res
        print("%d bits%s: %s" % (bits, " (gptq_v2)" if v2 else "", res))
        if bits == 3 and v2:
            v2_packed = packed
        if bits == 3 and not v2:
            # a model folder written by GPTQModel's writer, and its reader's weights
            folder = os.path.join(out_dir, "gptqmodel_llama")
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            tensors = {k: v for k, v in t.items() if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
            for prefix, (qweight, qz, scales, g) in packed.items():
                tensors[prefix + ".qweight"] = qweight.to(torch.int32).contiguous()
                tensors[prefix + ".qzeros"] = qz.to(torch.int32).contiguous()
                tensors[prefix + ".scales"] = scales.to(torch.float16).contiguous()
                tensors[prefix + ".g_idx"] = torch.from_numpy(g).to(torch.int32)
            save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
            with open(os.path.join(MODEL, "config.json")) as f:
                cfg = json.load(f)
            cfg["quantization_config"] = {"bits": 3, "group_size": 32, "desc_act": True, "sym": False,
                                          "quant_method": "gptq", "checkpoint_format": "gptq",
                                          "pack_dtype": "int32", "damp_percent": 0.01, "true_sequential": True,
                                          "static_groups": False, "meta": {"quantizer": ["gptqmodel:pack_original"]}}
            with open(os.path.join(folder, "config.json"), "w") as f:
                json.dump(cfg, f, indent=2)
                f.write("\n")
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(os.path.join(MODEL, name), folder)
            deq2 = ns["convert_gptq_file"](Path(os.path.join(folder, "model.safetensors")), torch.float32,
                                           cfg["quantization_config"], "cpu")
            save_file({k: v.contiguous() for k, v in deq2.items() if k.endswith("_proj.weight")},
                      os.path.join(out_dir, "gptqmodel_llama_dequant.safetensors"))
    # 3: the v2 folder, packed by GPTQModel, read back by GPTQModel
    folder = os.path.join(out_dir, "gptqmodel_llama_v2")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    v1 = load_file(os.path.join(out_dir, "gptqmodel_llama", "model.safetensors"))
    tensors = {k: v for k, v in v1.items() if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    for prefix, (qweight, qz, scales, g) in v2_packed.items():
        tensors[prefix + ".qweight"] = qweight.to(torch.int32).contiguous()
        tensors[prefix + ".qzeros"] = qz.to(torch.int32).contiguous()
        tensors[prefix + ".scales"] = scales.to(torch.float16).contiguous()
        tensors[prefix + ".g_idx"] = torch.from_numpy(g).to(torch.int32)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "gptqmodel_llama", "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"]["checkpoint_format"] = "gptq_v2"
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(MODEL, name), folder)
    deq_v2 = ns["convert_gptq_file"](Path(os.path.join(folder, "model.safetensors")), torch.float32,
                                     cfg["quantization_config"], "cpu")
    want = load_file(os.path.join(out_dir, "gptqmodel_llama_dequant.safetensors"))
    report["v2_folder_reader_equals_v1_dequant"] = all(torch.equal(deq_v2[k], v) for k, v in want.items())
    report["v2_folder_qzeros_differ_from_v1"] = sum(
        int(not torch.equal(tensors[k], v1[k])) for k in tensors if k.endswith(".qzeros"))
    print("v2 folder: reader equals the v1 dequant: %s; qzeros differing from v1: %d layers" %
          (report["v2_folder_reader_equals_v1_dequant"], report["v2_folder_qzeros_differ_from_v1"]))
    with open(os.path.join(out_dir, "gptqmodel_check.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
