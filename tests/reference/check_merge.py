#!/usr/bin/env python3
"""`qlora merge` output loads in transformers and scores like base + adapter.

Usage (GPU machine, bitsandbytes importable):
  check_merge.py MODEL_DIR ADAPTER_DIR MERGED_F32_DIR [MERGED_BF16_DIR]
The reference is transformers' NF4 (double quant) base with the adapter
loaded by peft; the merged models were written by
  qlora merge --model MODEL_DIR --adapter ADAPTER_DIR --quantizer=nf4 -o DIR [--dtype bf16]
Prints the relative L2 error of the logits; exits 1 above 1e-5 (f32) / 2e-2 (bf16).
"""
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

torch.backends.cuda.matmul.allow_tf32 = False
model_dir, adapter_dir, merged = sys.argv[1], sys.argv[2], sys.argv[3:]
seq = torch.tensor([[1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 400, 428, 395, 392, 412, 444, 426]], device="cuda")
kw = dict(attn_implementation="eager", device_map="cuda")
base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.float32), **kw)
ref = PeftModel.from_pretrained(base, adapter_dir).eval()
ok = True
with torch.no_grad():
    want = ref(seq).logits.float()
    for d in merged:
        m = AutoModelForCausalLM.from_pretrained(d, dtype="auto", **kw).eval()
        got = m(seq).logits.float()
        rel = ((got - want).norm() / want.norm()).item()
        limit = 2e-2 if m.dtype == torch.bfloat16 else 1e-5
        ok &= rel < limit
        print(f"{'OK  ' if rel < limit else 'FAIL'} {d} ({m.dtype}): logits vs NF4 base + peft adapter, rel error {rel:.3g}")
sys.exit(0 if ok else 1)
