#!/usr/bin/env python3
"""Reference outputs of PyTorch + transformers + peft (+ bitsandbytes) for
tests/test_reference.c: logits, loss and LoRA gradients of stories260K.

Run on the GPU machine (scripts/gpu-check does it with --out): it writes
  OUT/reference.safetensors   inputs and outputs (see KEYS below)
  OUT/adapter/                the fixed adapter, as peft saves it
and, when --qlora-adapter DIR is given (an adapter written by `qlora train`),
peft's logits with that adapter, to show qlora's adapter files load in peft.
Everything runs in float32 with TF32 off and eager attention.

KEYS
  ids.{i} I32 [T], labels.{i} I32 [T] (-100 on masked positions)
  logits.{base}.{i}        F32 [T, V] base model, no adapter  (base: dense | nf4)
  logits.{base}.lora.{i}   F32 [T, V] with the fixed adapter
  loss.{base}              F32 []      mean CE over the batch's target tokens, with the adapter
  grad.{base}.{layer}.{module}.{A|B}  F32 dL/dA [r, in], dL/dB [out, r]
  logits.qlora_adapter.{base}.{i}     F32 [T, V] with --qlora-adapter
"""
import argparse
import math
import os

import torch
from safetensors.torch import save_file

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PATHS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# Three fixed sequences (stories260K token ids) and how many leading tokens are masked.
SEQUENCES = [  # stories260K ids of three short stories (tokenizers 0.23)
    ([1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 400, 428, 395, 392, 412, 444, 426, 346, 397, 355, 267, 352, 379,
      426], 0),
    ([1, 274, 287, 269, 301, 425, 411, 263, 377, 267, 265, 282, 295, 433, 426, 342, 394, 261, 370, 259, 276, 411, 269,
      261, 352, 266, 268, 388, 426], 5),
    ([1, 291, 262, 379, 286, 270, 309, 426, 317, 391, 266, 267, 262, 424, 288, 322, 265, 278, 412, 354, 335, 311, 357,
      269, 279, 380, 426], 9),
]
R, ALPHA = 4, 8.0


def load_model(model_dir, base):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    kw = dict(dtype=torch.float32, attn_implementation="eager", device_map="cuda")
    if base == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(model_dir, **kw).eval()


def fixed_adapter(model_cfg):
    """Deterministic non-zero A and B (B non-zero so both get gradients)."""
    H, I = model_cfg.hidden_size, model_cfg.intermediate_size
    hd = H // model_cfg.num_attention_heads
    qd, kvd = model_cfg.num_attention_heads * hd, model_cfg.num_key_value_heads * hd
    shapes = {"q_proj": (qd, H), "k_proj": (kvd, H), "v_proj": (kvd, H), "o_proj": (H, qd),
              "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    sd = {}
    for layer in range(model_cfg.num_hidden_layers):
        for mi, m in enumerate(MODULES):
            out, inn = shapes[m]
            ia = torch.arange(R * inn, dtype=torch.float64).reshape(R, inn)
            ib = torch.arange(out * R, dtype=torch.float64).reshape(out, R)
            a = 0.05 * torch.sin(0.37 * ia + 1.3 * layer + 0.7 * mi)
            b = 0.05 * torch.cos(0.23 * ib + 0.9 * layer + 0.5 * mi)
            key = f"base_model.model.model.layers.{layer}.{PATHS[m]}.{m}"
            sd[f"{key}.lora_A.weight"] = a.float().contiguous()
            sd[f"{key}.lora_B.weight"] = b.float().contiguous()
    return sd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="../shared/models/stories260K")
    ap.add_argument("--out", default="tests/reference/stories260K")
    ap.add_argument("--qlora-adapter", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

    out = {}
    for i, (ids, masked) in enumerate(SEQUENCES):
        out[f"ids.{i}"] = torch.tensor(ids, dtype=torch.int32)
        labels = torch.tensor(ids, dtype=torch.int32)
        labels[:masked] = -100
        out[f"labels.{i}"] = labels
    adapter_dir = os.path.join(args.out, "adapter")
    for base in ["dense", "nf4"]:
        model = load_model(args.model, base)
        with torch.no_grad():
            for i, (ids, _) in enumerate(SEQUENCES):
                x = torch.tensor([ids], device="cuda")
                out[f"logits.{base}.{i}"] = model(x).logits[0].float().cpu().contiguous()
        cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=MODULES, bias="none",
                         task_type="CAUSAL_LM")
        pm = get_peft_model(model, cfg)
        sd = fixed_adapter(model.config)
        res = set_peft_model_state_dict(pm, {k: v.cuda() for k, v in sd.items()})
        assert not res.unexpected_keys, res.unexpected_keys
        if base == "dense":
            pm.save_pretrained(adapter_dir, safe_serialization=True)
        pm.train()  # dropout is 0: train mode changes nothing but enables grads
        total_targets = sum(sum(1 for t in range(1, len(ids)) if t >= masked) for ids, masked in SEQUENCES)
        loss_sum = 0.0
        pm.zero_grad()
        for i, (ids, masked) in enumerate(SEQUENCES):
            x = torch.tensor([ids], device="cuda")
            logits = pm(x).logits[0].float()
            with torch.no_grad():
                out[f"logits.{base}.lora.{i}"] = logits.detach().cpu().contiguous()
            labels = torch.tensor(ids, device="cuda")
            labels[:masked] = -100
            ce = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")
            (ce / total_targets).backward()
            loss_sum += ce.item()
        out[f"loss.{base}"] = torch.tensor(loss_sum / total_targets, dtype=torch.float32)
        for name, p in pm.named_parameters():
            if "lora_" not in name or p.grad is None:
                continue
            # base_model.model.model.layers.{l}.{self_attn|mlp}.{m}.lora_{A|B}.default.weight
            parts = name.split(".")
            layer, module, which = parts[4], parts[6], parts[7][-1]
            out[f"grad.{base}.{layer}.{module}.{which}"] = p.grad.detach().float().cpu().contiguous()
        if args.qlora_adapter:
            pm2 = PeftModel.from_pretrained(load_model(args.model, base), args.qlora_adapter).eval()
            with torch.no_grad():
                for i, (ids, _) in enumerate(SEQUENCES):
                    x = torch.tensor([ids], device="cuda")
                    out[f"logits.qlora_adapter.{base}.{i}"] = pm2(x).logits[0].float().cpu().contiguous()
        del model, pm
    os.makedirs(args.out, exist_ok=True)
    save_file(out, os.path.join(args.out, "reference.safetensors"), metadata={
        "torch": torch.__version__, "device": torch.cuda.get_device_name(), "r": str(R), "alpha": str(ALPHA)})
    print(f"wrote {args.out}/reference.safetensors ({len(out)} tensors) and {adapter_dir}")
    print(f"loss dense {out['loss.dense'].item():.6f} nf4 {out['loss.nf4'].item():.6f}")


if __name__ == "__main__":
    main()
