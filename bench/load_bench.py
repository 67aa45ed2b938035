#!/usr/bin/env python3
"""Quantize on load from a sharded bf16 checkpoint: qlora beside transformers +
bitsandbytes, in one call on the GPU machine (scripts/gpu-check TASKS=load).

The checkpoint: a LlamaForCausalLM of --shape (default "1b": TinyLlama's
hidden 2048, intermediate 5632, 22 layers, 32 query / 4 key-value heads; the
vocabulary is stories260K's 512 tokens so that its tokenizer serves), random
bf16 weights (normal, std 0.02) drawn on the GPU, written by transformers'
save_pretrained in shards of --shard-size (default 500MB).  It is made once
in --dir and reused.

Measured, each in a fresh process (wall time and the process's peak resident
set, from wait4):
  * qlora: `qlora train --dry-run --quantizer nf4 --device cuda` (and --device
    cpu): loads the checkpoint, quantizing every block linear (NF4 + double
    quant) on the GPU (or the CPU), reads the tokenizer and the data, makes the
    memory plan, and exits;
  * the peer: AutoModelForCausalLM.from_pretrained(dir, quantization_config=
    BitsAndBytesConfig(load_in_4bit, nf4, double quant, bf16 compute),
    device_map="cuda", dtype=bfloat16), then torch.cuda.synchronize().
One JSON line a measurement ("bench": "load"), then a table.
  python3 bench/load_bench.py --qlora build/core/qlora --model-dir ../shared/models/stories260K \
      --data ../shared/data/alpaca/alpaca_en_demo.json [--dir /tmp/qlora-load-bench] [--repeat 2]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads
    "1b": (2048, 5632, 22, 32, 4),
    "3b": (3072, 8192, 28, 24, 8),
    "7b": (4096, 11008, 32, 32, 32),
}


def make_checkpoint(d, shape, shard_size, tokenizer_dir):
    if os.path.exists(os.path.join(d, "config.json")):
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, n, nh, nkv = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=nh,
                      num_key_value_heads=nkv, vocab_size=512, max_position_embeddings=2048, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    tmp = d + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    m.save_pretrained(tmp, max_shard_size=shard_size)
    for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"):
        if os.path.exists(os.path.join(tokenizer_dir, f)):
            shutil.copy(os.path.join(tokenizer_dir, f), tmp)
    os.replace(tmp, d)
    del m
    torch.cuda.empty_cache()


def run_measured(argv, env=None):
    """argv in a child whose own peak RSS we read with wait4."""
    t0 = time.perf_counter()
    r, w = os.pipe()
    e_r, e_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.close(e_r)
        os.dup2(w, 1)
        os.dup2(e_w, 2)
        try:
            os.execvpe(argv[0], argv, env or os.environ)
        finally:
            os._exit(127)
    os.close(w)
    os.close(e_w)
    chunks, echunks = [], []
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(r, selectors.EVENT_READ, chunks)
    sel.register(e_r, selectors.EVENT_READ, echunks)
    open_fds = 2
    while open_fds:
        for key, _ in sel.select():
            data = os.read(key.fd, 65536)
            if not data:
                sel.unregister(key.fd)
                os.close(key.fd)
                open_fds -= 1
            else:
                key.data.append(data)
    _, status, ru = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    return rc, wall, ru.ru_maxrss * 1024, b"".join(chunks).decode(errors="replace"), b"".join(echunks).decode(errors="replace")


PEER = r"""
import sys, time, json, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
t0 = time.perf_counter()
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.bfloat16)
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=q, device_map="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize()
print(json.dumps({"load_s": time.perf_counter() - t0, "device_gib": torch.cuda.max_memory_allocated() / 2**30}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qlora", default="build/core/qlora")
    ap.add_argument("--model-dir", required=True, help="stories260K, for its tokenizer")
    ap.add_argument("--data", required=True)
    ap.add_argument("--dir", default="/tmp/qlora-load-bench")
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--shard-size", default="500MB")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-cpu", action="store_true", help="leave out qlora's --device cpu")
    a = ap.parse_args()
    d = os.path.join(a.dir, a.shape)
    os.makedirs(a.dir, exist_ok=True)
    make_checkpoint(d, a.shape, a.shard_size, a.model_dir)
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
    shards = sum(1 for f in os.listdir(d) if f.endswith(".safetensors"))
    largest = max(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
    rows = []
    # the page cache warm for every side: read the shards once
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with open(os.path.join(d, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass
    sides = [("qlora", "cuda")] + ([] if a.no_cpu else [("qlora", "cpu")]) + [("transformers+bitsandbytes", "cuda")]
    for rep in range(a.repeat):
        for impl, dev in sides:
            if impl == "qlora":
                out = os.path.join(a.dir, "run")
                argv = [a.qlora, "train", "--model", d, "--quantizer=nf4", "--data", a.data, "--format", "alpaca",
                        "--device", dev, "--dry-run", "--output", out]
                rc, wall, rss, so, se = run_measured(argv)
                r = {"bench": "load", "impl": "qlora", "device": dev, "shape": a.shape, "checkpoint_bytes": size,
                     "shards": shards, "largest_shard_bytes": largest, "s": round(wall, 3), "peak_rss_bytes": rss}
                if rc != 0:
                    r["error"] = (se.strip().splitlines() or ["exit %d" % rc])[-1]
            else:
                rc, wall, rss, so, se = run_measured([sys.executable, "-c", PEER, d])
                r = {"bench": "load", "impl": impl, "device": dev, "shape": a.shape, "checkpoint_bytes": size,
                     "shards": shards, "largest_shard_bytes": largest, "s": round(wall, 3), "peak_rss_bytes": rss}
                if rc != 0:
                    r["error"] = (se.strip().splitlines() or ["exit %d" % rc])[-1]
                else:
                    j = json.loads(so.strip().splitlines()[-1])
                    r["load_s"] = round(j["load_s"], 3)
                    r["device_gib"] = round(j["device_gib"], 3)
            r["round"] = rep + 1
            rows.append(r)
            print(json.dumps(r), flush=True)
    print()
    print("quantize on load, %s shape, %.2f GB bf16 in %d shards (largest %.0f MB), NF4 + double quant" %
          (a.shape, size / 1e9, shards, largest / 1e6))
    print("%-28s %-5s %9s %9s %14s" % ("who", "dev", "wall s", "load s", "peak RSS GiB"))
    for impl, dev in sides:
        rs = [r for r in rows if r["impl"] == impl and r["device"] == dev and "error" not in r]
        if not rs:
            print("%-28s %-5s %9s %9s %14s" % (impl, dev, "failed", "-", "-"))
            continue
        best = min(rs, key=lambda r: r["s"])
        load = "%.2f" % best["load_s"] if "load_s" in best else "-"
        print("%-28s %-5s %9.2f %9s %14.2f" % (impl, dev, best["s"], load, max(r["peak_rss_bytes"] for r in rs) / 2**30))
    print("wall s: the whole process (qlora's is its load: the checkpoint quantized, tokenizer, data, plan); load s: "
          "from_pretrained alone, without Python's and torch's start")


if __name__ == "__main__":
    main()
