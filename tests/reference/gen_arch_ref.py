#!/usr/bin/env python3
"""Tiny random Qwen2, Qwen3, Mistral and Llama (with biases) models and
transformers' outputs on them, for tests/test_arch.c.

  /work/venv/bin/python tests/reference/gen_arch_ref.py [--out tests/reference/arch]

For each model NAME it writes OUT/NAME/ with
  config.json, model.safetensors     save_pretrained of the random model (float32)
  adapter/                           a fixed LoRA adapter (r 4, alpha 8, all seven modules), as peft saves it
  reference.safetensors              KEYS below
Runs on the CPU in float32 with eager attention.  Every model's test sequence
(T = 24) is longer than its sliding window, and the attention windows differ
per layer where the architecture allows it:
  mistral  sliding_window 7 on every layer
  qwen2    use_sliding_window, sliding_window 6, max_window_layers 1: layer 1 slides, layer 0 does not;
           q/k/v biases; tied embeddings
  qwen3    use_sliding_window, sliding_window 5, layer_types [sliding, full]; head_dim 12 (hidden 32, 4 heads);
           q_norm/k_norm; attention_bias (q, k, v, o biases)
  llama    attention_bias and mlp_bias (biases on every linear), no window

KEYS
  ids I32 [T], labels I32 [T] (-100 on the first MASKED positions)
  logits F32 [T, V]        base model
  logits.lora F32 [T, V]   with the adapter
  loss F32 []              mean CE over the target tokens, with the adapter
  grad.{layer}.{module}.{A|B}  F32 dL/dA [r, in], dL/dB [out, r] of that loss
"""
import argparse
import os

import torch
from safetensors.torch import save_file

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, T, MASKED, VOCAB = 4, 8.0, 24, 3, 512

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
              rope_theta=10000.0)

MODELS = {
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=7, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(use_sliding_window=True, sliding_window=6, max_window_layers=1, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(use_sliding_window=True, sliding_window=5, layer_types=["sliding_attention", "full_attention"],
                   head_dim=12, attention_bias=True, tie_word_embeddings=False)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),
}


def randomize(model, seed):
    """Weights large enough that attention is far from uniform, norms around 1, every bias non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def fixed_adapter(model):
    """Deterministic non-zero A and B (B non-zero so both get gradients)."""
    sd = {}
    for name, mod in model.named_modules():
        last = name.split(".")[-1]
        if last not in MODULES or not hasattr(mod, "weight"):
            continue
        layer, mi = int(name.split(".")[2]), MODULES.index(last)
        out, inn = mod.weight.shape
        ia = torch.arange(R * inn, dtype=torch.float64).reshape(R, inn)
        ib = torch.arange(out * R, dtype=torch.float64).reshape(out, R)
        sd[f"base_model.model.{name}.lora_A.weight"] = (0.3 * torch.sin(0.37 * ia + 1.3 * layer + 0.7 * mi)).float()
        sd[f"base_model.model.{name}.lora_B.weight"] = (0.3 * torch.cos(0.23 * ib + 0.9 * layer + 0.5 * mi)).float()
    return sd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/reference/arch")
    args = ap.parse_args()
    import transformers
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    torch.manual_seed(0)
    for seed, (name, (cfg_cls, model_cls, extra)) in enumerate(MODELS.items()):
        cfg = getattr(transformers, cfg_cls)(**COMMON, **extra)
        cfg._attn_implementation = "eager"
        model = getattr(transformers, model_cls)(cfg).float().eval()
        randomize(model, 1000 + seed)
        d = os.path.join(args.out, name)
        os.makedirs(d, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        g = torch.Generator().manual_seed(7 + seed)
        ids = torch.randint(3, VOCAB, (T,), generator=g)
        ids[0] = 1
        labels = ids.clone()
        labels[:MASKED] = -100
        out = {"ids": ids.to(torch.int32), "labels": labels.to(torch.int32)}
        with torch.no_grad():
            out["logits"] = model(ids[None]).logits[0].float().contiguous()
        pm = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=MODULES,
                                              bias="none", task_type="CAUSAL_LM"))
        res = set_peft_model_state_dict(pm, fixed_adapter(model))
        assert not res.unexpected_keys, res.unexpected_keys
        pm.save_pretrained(os.path.join(d, "adapter"), safe_serialization=True)
        pm.train()  # dropout is 0: train mode only enables the LoRA gradients
        pm.zero_grad()
        logits = pm(ids[None]).logits[0].float()
        loss = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)
        loss.backward()
        out["logits.lora"] = logits.detach().contiguous()
        out["loss"] = loss.detach().float()
        for pname, p in pm.named_parameters():
            if "lora_" not in pname or p.grad is None:
                continue
            # base_model.model.model.layers.{l}.{self_attn|mlp}.{m}.lora_{A|B}.default.weight
            parts = pname.split(".")
            out[f"grad.{parts[4]}.{parts[6]}.{parts[7][-1]}"] = p.grad.detach().float().contiguous()
        for extra_file in ("generation_config.json", "adapter/README.md"):  # not read by the tests
            if os.path.exists(os.path.join(d, extra_file)):
                os.remove(os.path.join(d, extra_file))
        save_file(out, os.path.join(d, "reference.safetensors"),
                  metadata={"torch": torch.__version__, "transformers": transformers.__version__})
        print(f"{name}: loss {loss.item():.6f}, layer types {getattr(model.config, 'layer_types', None)}, "
              f"sliding_window {model.config.sliding_window if hasattr(model.config, 'sliding_window') else None}")


if __name__ == "__main__":
    main()
