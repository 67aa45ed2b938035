#!/usr/bin/env python3
"""End-to-end check of qlora's rotary embedding against transformers on tiny
random LlamaForCausalLM models, one per rope_type.

For each model: transformers (float32, eager attention) computes the logits of
one sequence in one call, then again with a KV cache (a prompt, then one token
per call: what generation does); a small C driver linked to the build's
libqlora does the same calls in the same order through ql_llama_forward.  The
sequence is longer than max_position_embeddings, so dynamic rope recomputes
its frequencies during the cached calls.  Prints the largest absolute logit
difference and the mean-NLL difference per model.

    /work/venv/bin/python tests/reference/check_rope_e2e.py [BUILD_DIR]
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build")
T, PROMPT, V = 100, 40, 512

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0},
    "yarn_mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "mscale": 1.0,
                    "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2, "rope_theta": 50000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 10000.0},
}

DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include "qlora/error.h"
#include "qlora/llama.h"
/* argv: model_dir ids.bin T prompt out.bin: writes full logits [T, V], then cached logits [T, V] */
int main(int argc, char **argv) {
    int T = atoi(argv[3]), P = atoi(argv[4]);
    int32_t *ids = malloc(T * 4);
    FILE *f = fopen(argv[2], "rb");
    if (fread(ids, 4, T, f) != (size_t)T) return 2;
    fclose(f);
    ql_llama *m;
    ql_kv_cache *c;
    if (ql_llama_load(argv[1], NULL, &m) || ql_kv_cache_create(m, T, &c)) { fprintf(stderr, "%s\n", ql_error_message()); return 1; }
    int V = ql_llama_get_config(m)->vocab;
    float *lg = malloc((size_t)T * V * 4);
    FILE *o = fopen(argv[5], "wb");
    if (ql_llama_forward(m, c, ids, T, lg, 0)) return 1;
    fwrite(lg, 4, (size_t)T * V, o);
    ql_kv_cache_reset(c);
    if (ql_llama_forward(m, c, ids, P, lg, 0)) return 1;
    for (int t = P; t < T; t++)
        if (ql_llama_forward(m, c, ids + t, 1, lg + (size_t)t * V, 0)) return 1;
    fwrite(lg, 4, (size_t)T * V, o);
    fclose(o);
    return 0;
}
"""


def nll(logits, ids):
    lp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), -1)
    return float(-lp[:-1].gather(1, torch.as_tensor(ids[1:], dtype=torch.long)[:, None]).mean())


def main():
    tmp = tempfile.mkdtemp(prefix="rope_e2e_")
    drv = os.path.join(tmp, "driver")
    subprocess.run(["cc", "-O1", "-o", drv, "-x", "c", "-", "-I" + os.path.join(ROOT, "include"),
                    "-L" + os.path.join(BUILD, "core"), "-lqlora", "-Wl,-rpath," + os.path.join(BUILD, "core")],
                   input=DRIVER.encode(), check=True)
    torch.manual_seed(0)
    ids = torch.randint(3, V, (T,), dtype=torch.int32)
    ids[0] = 1
    ids_path = os.path.join(tmp, "ids.bin")
    ids.numpy().tofile(ids_path)
    worst = 0.0
    for name, rope in ROPES.items():
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=V, max_position_embeddings=64, rms_norm_eps=1e-5,
                          rope_parameters=dict(rope), attn_implementation="eager")
        torch.manual_seed(1)
        model = LlamaForCausalLM(cfg).float().eval()
        with torch.no_grad():  # larger weights than the init so position matters in the logits
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(8.0)
        d = os.path.join(tmp, name)
        model.save_pretrained(d)
        ii = ids.long()[None]
        with torch.no_grad():
            full = model(ii).logits[0].numpy()
            out = model(ii[:, :PROMPT], use_cache=True)
            steps, past = [out.logits[0]], out.past_key_values
            for t in range(PROMPT, T):
                out = model(ii[:, t:t + 1], past_key_values=past, use_cache=True)
                steps.append(out.logits[0])
                past = out.past_key_values
            cached = torch.cat(steps).numpy()
        out_path = os.path.join(tmp, name + ".bin")
        r = subprocess.run([drv, d, ids_path, str(T), str(PROMPT), out_path], capture_output=True, text=True)
        if r.returncode:
            print(f"{name}: qlora failed: {r.stderr.strip()}")
            worst = float("inf")
            continue
        q = np.fromfile(out_path, dtype=np.float32).reshape(2, T, V)
        d_full = float(np.abs(q[0] - full).max())
        d_cached = float(np.abs(q[1] - cached).max())
        scale = float(np.abs(full).max())
        print(f"{name:12s} saved rope_parameters {json.dumps(json.load(open(os.path.join(d, 'config.json')))['rope_parameters'])}")
        print(f"{'':12s} max |logit| {scale:.3f}  max abs diff: one call {d_full:.3g}, cached calls {d_cached:.3g};"
              f"  mean NLL qlora {nll(q[0], ids.numpy()):.7f} transformers {nll(full, ids.numpy()):.7f}")
        worst = max(worst, d_full, d_cached)
    print(f"worst abs logit difference {worst:.3g}")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
