#!/usr/bin/env python3
"""`qlora merge` output of a Qwen2 / Qwen3 / Mistral model loads in
transformers and scores like the base with the adapter in peft.

Usage (CPU is enough; full-precision base):
  check_arch_merge.py MODEL_DIR ADAPTER_DIR MERGED_DIR [T]
where the adapter was trained by `qlora train --quantizer=none` on MODEL_DIR and
  qlora merge --model MODEL_DIR --adapter ADAPTER_DIR -o MERGED_DIR
Runs a T-token sequence (default 40: past the fixtures' sliding windows) in
float32 with eager attention; prints the relative L2 errors of the logits
(merged vs base + peft adapter, and qlora's adapter vs no adapter, which must
differ) and exits 1 when the first is above 1e-5.
"""
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

model_dir, adapter_dir, merged_dir = sys.argv[1:4]
T = int(sys.argv[4]) if len(sys.argv) > 4 else 40
kw = dict(attn_implementation="eager", dtype=torch.float32)
seq = torch.arange(T).mul(37).remainder(500).add(3)[None]
with torch.no_grad():
    base = AutoModelForCausalLM.from_pretrained(model_dir, **kw).eval()
    plain = base(seq).logits.float()
    ref = PeftModel.from_pretrained(base, adapter_dir).eval()
    want = ref(seq).logits.float()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, **kw).eval()
    got = merged(seq).logits.float()
rel = ((got - want).norm() / want.norm()).item()
moved = ((want - plain).norm() / plain.norm()).item()
print(f"{type(merged).__name__} {merged_dir}: merged vs base + peft adapter rel error {rel:.3g}; "
      f"adapter moved the logits by {moved:.3g}; layer types {getattr(merged.config, 'layer_types', None)}")
sys.exit(0 if rel < 1e-5 and moved > 1e-4 else 1)
