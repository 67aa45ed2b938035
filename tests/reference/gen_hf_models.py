#!/usr/bin/env python3
"""Small random models of every form qlora loads, built and saved by
transformers itself, with reference outputs of PyTorch + transformers + peft,
for tests/test_hf_models.c.  See tests/reference/README.md for how to
regenerate, the versions used and the errors observed.

    python tests/reference/gen_hf_models.py [--out tests/reference/hf_models] [--tf4 /work/tf4]
    python tests/reference/gen_hf_models.py --qlora-adapters build/core/qlora   # runs `qlora train`
    python tests/reference/gen_hf_models.py --qlora-adapter RUN_DIR [--name NAME]  # after `qlora train`

CPU, float32, eager attention.  Every folder OUT/NAME holds what
save_pretrained writes (config.json, generation_config.json,
model.safetensors in bfloat16), and, unless it is another folder's weights in
another config form (`same_as`), also
  adapter/                 the fixed LoRA adapter, as peft saves it
  reference.safetensors    the keys below
KEYS
  ids.{i} I32 [T], labels.{i} I32 [T] (-100 on masked positions)
  logits.{i}        F32 [T, V] base model
  logits.lora.{i}   F32 [T, V] with the fixed adapter
  loss              F32 []     mean CE over all target tokens of the batch, with the adapter
  grad.{layer}.{module}.{A|B}   F32 dL/dA [r, in], dL/dB [out, r]
  logits.qlora_adapter.{i}      F32 [T, V] peft with OUT/NAME/qlora_adapter, an adapter
                                written by `qlora train` on that folder (--qlora-adapters)
Every such folder carries a tokenizer so that `qlora train` runs on it: `llama`
a byte-level BPE of 300 ids (its vocab_size), the others a Metaspace BPE of
128 ids (the vocab_size of the rest), both trained here on TRAIN_TEXT.
Metadata: torch, transformers, peft versions, r, alpha, and `sensitivity`:
the relative L2 change of the base logits when the feature the folder is
about is dropped (rope scaling -> none, rope_theta -> 10000, sliding window
-> none, biases / q-k norms -> neutral), so a loader that ignores it fails
the 1e-5 bound by orders of magnitude.

BNB_FORMS are dense folders quantized by transformers + bitsandbytes (its CPU
backend) and saved with save_pretrained, with references computed by
transformers over the 4-bit checkpoint (float32; see bnb_generic_dequantize and
load for two bitsandbytes CPU details).

The weights are drawn once with a fixed seed; the tf4 forms are written by a
transformers 4.x installed beside (--tf4 DIR on PYTHONPATH, e.g.
`pip install --target /work/tf4 'transformers<5'`), loaded from the
transformers-5 folder's weights.
"""
import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PATHS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
R, ALPHA = 4, 8.0
# (length, leading masked tokens), ascending lengths: transformers' dynamic
# NTK rope keeps the longest length seen since the last sequence shorter than
# max_position_embeddings, so ascending order gives every sequence the
# frequencies of its own length (checked against a fresh model below).
LENGTHS = [(12, 0), (20, 5), (40, 9)]
SEED = 1234

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64,
             rms_norm_eps=1e-5, initializer_range=0.1, bos_token_id=1, eos_token_id=2)


def rope(theta, kind="default", **kw):
    return dict(rope_type=kind, rope_theta=theta, **kw)


# name -> (model_type, config kwargs over SHAPE, how the sensitivity variant differs)
FIXTURES = {
    "llama": ("llama", dict(rope_parameters=rope(50000.0)), {"rope_parameters": rope(10000.0)}),
    "llama_tied": ("llama", dict(tie_word_embeddings=True, rope_parameters=rope(20000.0)),
                   {"rope_parameters": rope(10000.0)}),
    "llama_rope_linear": ("llama", dict(rope_parameters=rope(30000.0, "linear", factor=2.5)),
                          {"rope_parameters": rope(30000.0)}),
    # max_position_embeddings 32 < the 40-token sequence: the scaling engages there
    "llama_rope_dynamic": ("llama", dict(max_position_embeddings=32, rope_parameters=rope(10000.0, "dynamic",
                                                                                          factor=3.0)),
                           {"rope_parameters": rope(10000.0)}),
    # original 256 with head_dim 16 and theta 10000: dims 0..4 ramp between
    # extrapolation and interpolation, the rest interpolated
    "llama_rope_yarn": ("llama", dict(max_position_embeddings=1024, rope_parameters=rope(
        10000.0, "yarn", factor=4.0, original_max_position_embeddings=256, beta_fast=32.0, beta_slow=1.0)),
                        {"rope_parameters": rope(10000.0)}),
    # wavelengths 2*pi*500000^(i/8): i<=1 above high_freq_wavelen 64 unchanged, i=2
    # between (smoothed), i>=3 beyond low_freq_wavelen 256 divided by the factor
    "llama_rope_llama3": ("llama", dict(max_position_embeddings=1024, rope_parameters=rope(
        500000.0, "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=256)), {"rope_parameters": rope(500000.0)}),
    "mistral_sliding": ("mistral", dict(sliding_window=16, rope_parameters=rope(40000.0)), {"sliding_window": None}),
    "qwen2": ("qwen2", dict(rope_parameters=rope(100000.0)), "zero_bias"),
    "qwen3": ("qwen3", dict(head_dim=24, rope_parameters=rope(250000.0)), "unit_qk_norm"),
}
# name -> (folder whose weights it shares, the transformers-4 config kwargs)
TF4_FORMS = {
    "llama_tf4": ("llama", dict(rope_theta=50000.0, rope_scaling=None)),
    "llama_rope_llama3_tf4": ("llama_rope_llama3", dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=256))),
}
# name -> (dense folder it is quantized from, BitsAndBytesConfig kwargs): what
# from_pretrained(quantization_config=...) + save_pretrained write, bitsandbytes'
# CPU backend quantizing; float32 compute so that the references are exact
BNB_FORMS = {
    "qwen2_bnb_nf4_dq": ("qwen2", dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)),
    "qwen3_bnb_nf4": ("qwen3", dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False)),
    "mistral_sliding_bnb_fp4_dq": ("mistral_sliding", dict(bnb_4bit_quant_type="fp4",
                                                           bnb_4bit_use_double_quant=True)),
}
TOKENIZER_FOR = "llama"  # the folder whose tokenizer is byte-level with its own vocab_size (300)
TRAIN_TEXT = [
    "the small robot found a red ball in the garden and rolled it to the old dog.",
    "a girl named mia liked to draw boats. one day she drew a boat that could fly.",
    "the sun was warm, the river was slow, and the frog sang a song about rain.",
    "tom and his sister built a tower of blocks. it fell down, so they built it again.",
    "every morning the baker made bread shaped like stars for the children of the town.",
    "the cat looked at the moon and wondered if it was made of milk.",
]


def sequences(vocab):
    g = torch.Generator().manual_seed(SEED + 7)
    out = []
    for T, masked in LENGTHS:
        ids = torch.randint(3, vocab, (T,), generator=g, dtype=torch.int64)
        ids[0] = 1  # BOS
        out.append((ids.tolist(), masked))
    return out


def config_class(model_type):
    from transformers import AutoConfig
    return AutoConfig.for_model(model_type).__class__


def model_class(model_type):
    import transformers
    return getattr(transformers, {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type])


def build(name, out_dir, vocab):
    model_type, kw, _ = FIXTURES[name]
    cfg_kw = dict(SHAPE, vocab_size=vocab, architectures=[model_class(model_type).__name__], **kw)
    if model_type == "qwen2":
        cfg_kw.pop("head_dim")  # Qwen2's head dimension is always hidden / heads
    cfg = config_class(model_type)(**cfg_kw)
    torch.manual_seed(SEED)
    model = model_class(model_type)(cfg)
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            # transformers initializes norms to 1 and biases to 0; make them matter
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif pname.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    model = model.to(torch.bfloat16)
    model.save_pretrained(out_dir)
    return cfg


_generic = []


def bnb_generic_dequantize():
    """Route bitsandbytes' 4-bit dequantization on the CPU through its generic
    torch implementation (backends/default: the element order of the CUDA
    kernels and of the bytes quantize_4bit writes).  bitsandbytes 0.50.2's CPU
    C kernel (cdequantize_blockwise_cpu_*) takes each row's blocks from the row
    start, which misreads a matrix whose row length is not a multiple of the
    blocksize: Qwen3's o_proj here, [64, 96], dequantizes with a largest error
    of 0.20 against the original weights (their largest magnitude 0.38),
    against 0.043 through the generic code.  Real checkpoints have rows of
    multiples of 64, where both agree."""
    if _generic:
        return
    torch._dynamo.config.disable = True  # bitsandbytes' torch.compile'd helpers run eagerly
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute as compiled
    from bitsandbytes.backends.utils import _get_4bit_code
    _dequantize_4bit_compute = getattr(compiled, "_torchdynamo_orig_callable", compiled)  # not through dynamo

    @torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu")
    def _(A, absmax, blocksize, quant_type, shape, dtype):
        return _dequantize_4bit_compute(A.view(torch.uint8).reshape(-1), absmax.float(),
                                        _get_4bit_code(quant_type, A.device), blocksize, shape, dtype)
    _generic.append(_)


def load(model_dir, **cfg_override):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(model_dir)
    for k, v in cfg_override.items():
        setattr(cfg, k, v)
    if "rope_parameters" in cfg_override and hasattr(cfg, "standardize_rope_params"):
        cfg.standardize_rope_params()
    if not getattr(cfg, "quantization_config", None):
        return AutoModelForCausalLM.from_pretrained(model_dir, config=cfg, dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    import bitsandbytes
    bnb_generic_dequantize()
    m = AutoModelForCausalLM.from_pretrained(model_dir, config=cfg, dtype=torch.float32, attn_implementation="eager",
                                             device_map="cpu").eval()
    # bitsandbytes 0.50's CPU inference path repacks a 4-bit weight for an
    # AVX512-BF16 kernel and fails on rows not a multiple of 32 (Qwen3's k_proj,
    # 48); off, every 4-bit matmul dequantizes to float32 and multiplies, as in
    # training mode
    # And its backward (MatMul4Bit) dequantizes in the quant_state's dtype, the
    # bfloat16 the weights were quantized from, while its forward computes in
    # float32: the input gradients through the base would carry bfloat16
    # weights (LoRA gradients off by 2e-3).  float32 throughout, as qlora.
    for mod in m.modules():
        if isinstance(mod, bitsandbytes.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False
            mod.weight.quant_state.dtype = torch.float32
    # from_pretrained keeps a pre-quantized checkpoint's other weights in the
    # file's bfloat16 whatever dtype says: widen them (exact), as for the rest
    with torch.no_grad():
        for p in m.parameters():
            if p.dtype.is_floating_point and p.dtype != torch.float32:
                p.data = p.data.float()
        for b in m.buffers():
            assert not b.dtype.is_floating_point or b.dtype == torch.float32, b.dtype
    return m


def logits_of(model, seqs):
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].float().contiguous() for ids, _ in seqs]


def rel(a, b):
    return math.sqrt(sum(((x - y).double() ** 2).sum().item() for x, y in zip(a, b)) /
                     sum((y.double() ** 2).sum().item() for y in b))


def fixed_adapter(model):
    """Deterministic non-zero A and B (B non-zero so both get gradients)."""
    sd = {}
    for layer, block in enumerate(model.model.layers):
        for mi, m in enumerate(MODULES):
            lin = getattr(getattr(block, PATHS[m]), m)  # a 4-bit weight's shape is its packed bytes
            out, inn = lin.out_features, lin.in_features
            ia = torch.arange(R * inn, dtype=torch.float64).reshape(R, inn)
            ib = torch.arange(out * R, dtype=torch.float64).reshape(out, R)
            a = 0.05 * torch.sin(0.37 * ia + 1.3 * layer + 0.7 * mi)
            b = 0.05 * torch.cos(0.23 * ib + 0.9 * layer + 0.5 * mi)
            key = f"base_model.model.model.layers.{layer}.{PATHS[m]}.{m}"
            sd[f"{key}.lora_A.weight"] = a.float().contiguous()
            sd[f"{key}.lora_B.weight"] = b.float().contiguous()
    return sd


def sensitivity(name, model_dir, seqs, base):
    if name in BNB_FORMS:  # the quantization: against the dense source folder
        src = load_file(os.path.join(os.path.dirname(model_dir), BNB_FORMS[name][0], "reference.safetensors"))
        return rel([src[f"logits.{i}"] for i in range(len(seqs))], base)
    variant = FIXTURES[name][2]
    if isinstance(variant, dict):
        m = load(model_dir, **variant)
    else:
        m = load(model_dir)
        with torch.no_grad():
            for pname, p in m.named_parameters():
                if variant == "zero_bias" and pname.endswith(".bias"):
                    p.zero_()
                if variant == "unit_qk_norm" and (pname.endswith("q_norm.weight") or pname.endswith("k_norm.weight")):
                    p.fill_(1.0)
    return rel(logits_of(m, seqs), base)


def references(name, model_dir, seqs):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    out = {}
    for i, (ids, masked) in enumerate(seqs):
        out[f"ids.{i}"] = torch.tensor(ids, dtype=torch.int32)
        labels = torch.tensor(ids, dtype=torch.int32)
        labels[:masked] = -100
        out[f"labels.{i}"] = labels
    model = load(model_dir)
    base = logits_of(model, seqs)
    for i, l in enumerate(base):
        out[f"logits.{i}"] = l
    # each sequence alone in a fresh model gives the same logits (dynamic rope's state)
    fresh = [logits_of(load(model_dir), [s])[0] for s in seqs]
    assert rel(fresh, base) == 0.0, f"{name}: logits depend on the order of the sequences"
    sens = sensitivity(name, model_dir, seqs, base)
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=MODULES, bias="none",
                     task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    res = set_peft_model_state_dict(pm, fixed_adapter(model))
    assert not res.unexpected_keys, res.unexpected_keys
    pm.save_pretrained(os.path.join(model_dir, "adapter"), safe_serialization=True)
    os.remove(os.path.join(model_dir, "adapter", "README.md"))  # peft's model card template
    pm.train()  # dropout is 0: train mode changes nothing but enables grads
    total = sum(sum(1 for t in range(1, len(ids)) if t >= masked) for ids, masked in seqs)
    loss_sum = 0.0
    pm.zero_grad()
    for i, (ids, masked) in enumerate(seqs):
        logits = pm(torch.tensor([ids])).logits[0].float()
        out[f"logits.lora.{i}"] = logits.detach().contiguous()
        labels = torch.tensor(ids)
        labels[:masked] = -100
        ce = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")
        (ce / total).backward()
        loss_sum += ce.item()
    out["loss"] = torch.tensor(loss_sum / total, dtype=torch.float32)
    n_grads = 0
    for pname, p in pm.named_parameters():
        if "lora_" not in pname:
            continue
        # base_model.model.model.layers.{l}.{self_attn|mlp}.{m}.lora_{A|B}.default.weight
        parts = pname.split(".")
        out[f"grad.{parts[4]}.{parts[6]}.{parts[7][-1]}"] = p.grad.detach().float().contiguous()
        n_grads += 1
    assert n_grads == 2 * len(MODULES) * len(model.model.layers)
    lora_change = rel([out[f"logits.lora.{i}"] for i in range(len(seqs))], base)
    return out, sens, lora_change


def versions():
    import peft
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def write_reference(model_dir, out, extra):
    meta = dict(versions(), r=str(R), alpha=str(ALPHA), **{k: str(v) for k, v in extra.items()})
    save_file(out, os.path.join(model_dir, "reference.safetensors"), metadata=meta)


def write_tokenizer(model_dir, vocab=None):
    """A BPE tokenizer trained here (ids 0-2 <unk> <s> </s>), so the folder is
    a complete model for `qlora train`; returns its vocab size.  vocab None: a
    byte-level BPE of 300 ids (the llama folder); else a Metaspace BPE of at
    most `vocab` ids over TRAIN_TEXT's characters (unknown characters <unk>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    specials = ["<unk>", "<s>", "</s>"]
    if vocab is None:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(TRAIN_TEXT, trainer=trainer)
    assert vocab is None or tok.get_vocab_size() <= vocab, tok.get_vocab_size()
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
                   "add_eos_token": False, "model_max_length": 64}, f, indent=2)
    return tok.get_vocab_size()


TF4_CHILD = r"""
import json, sys, torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from safetensors.torch import load_file, save_file
src, dst, kw, seqs, logits_file = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
assert transformers.__version__.startswith("4."), transformers.__version__
base = json.load(open(src + "/config.json"))
keep = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "initializer_range", "bos_token_id",
        "eos_token_id", "tie_word_embeddings", "architectures"]
cfg = LlamaConfig(**{k: base[k] for k in keep if k in base}, **kw)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
model.load_state_dict(load_file(src + "/model.safetensors"), strict=False)
if cfg.tie_word_embeddings:
    model.tie_weights()
model = model.to(torch.bfloat16)
model.save_pretrained(dst)
model = LlamaForCausalLM.from_pretrained(dst, torch_dtype=torch.float32, attn_implementation="eager").eval()
with torch.no_grad():
    save_file({f"logits.{i}": model(torch.tensor([s])).logits[0].float().contiguous() for i, s in enumerate(seqs)},
              logits_file, metadata={"transformers": transformers.__version__})
"""


def write_tf4(name, out_root, tf4):
    src_name, kw = TF4_FORMS[name]
    src, dst = os.path.join(out_root, src_name), os.path.join(out_root, name)
    ref = load_file(os.path.join(src, "reference.safetensors"))
    seqs = [ref[f"ids.{i}"].tolist() for i in range(len(LENGTHS))]
    tmp = os.path.join(out_root, f".{name}.logits.safetensors")
    env = dict(os.environ, PYTHONPATH=tf4 + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", TF4_CHILD, src, dst, json.dumps(kw), json.dumps(seqs), tmp], env=env,
                   check=True)
    from safetensors import safe_open
    with safe_open(tmp, "pt") as f:
        v4 = f.metadata()["transformers"]
    tf4_logits = load_file(tmp)
    os.remove(tmp)
    want = [ref[f"logits.{i}"] for i in range(len(LENGTHS))]
    e4 = rel([tf4_logits[f"logits.{i}"] for i in range(len(LENGTHS))], want)
    e5 = rel(logits_of(load(dst), [(s, 0) for s in seqs]), want)
    print(f"{name}: written by transformers {v4}; its logits vs {src_name}'s: transformers {v4} {e4:.2g}, "
          f"transformers 5 reading it {e5:.2g}")
    assert e4 < 1e-6 and e5 < 1e-6
    for f in os.listdir(dst):
        assert f in ("config.json", "generation_config.json", "model.safetensors"), f
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))


def write_bnb(name, out_root):
    """NAME: the source folder quantized by transformers + bitsandbytes as a
    user does it (4-bit Linear layers, lm_head and the rest kept in bfloat16),
    saved with save_pretrained, then its references as for the dense folders."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    import bitsandbytes
    src_name, kw = BNB_FORMS[name]
    src, dst = os.path.join(out_root, src_name), os.path.join(out_root, name)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, **kw)
    m = AutoModelForCausalLM.from_pretrained(src, quantization_config=q, dtype=torch.bfloat16, device_map="cpu")
    n4 = sum(1 for mod in m.modules() if isinstance(mod, bitsandbytes.nn.Linear4bit))
    assert n4 == len(MODULES) * SHAPE["num_hidden_layers"], f"{name}: {n4} 4-bit layers"
    m.save_pretrained(dst)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, f), os.path.join(dst, f))
    seqs = sequences(SHAPE["vocab_size"])  # the source folder's
    out, sens, lora_change = references(name, dst, seqs)
    write_reference(dst, out, {"sensitivity": f"{sens:.3g}", "lora_change": f"{lora_change:.3g}",
                               "bitsandbytes": bitsandbytes.__version__})
    print(f"{name}: bitsandbytes {bitsandbytes.__version__} {kw}; loss {out['loss'].item():.6f}, the quantization "
          f"changes {src_name}'s logits by {sens:.3g}, the adapter by {lora_change:.3g}")
    assert sens > 1e-3, f"{name}: the quantization barely changes the logits"


def add_qlora_adapter(out_root, run_dir, name="llama"):
    """Copy the adapter `qlora train` wrote in run_dir to OUT/NAME/qlora_adapter
    and record peft's logits with it over NAME's transformers model."""
    from peft import PeftModel
    model_dir = os.path.join(out_root, name)
    dst = os.path.join(model_dir, "qlora_adapter")
    if os.path.abspath(run_dir) != os.path.abspath(dst):
        os.makedirs(dst, exist_ok=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(os.path.join(run_dir, f), os.path.join(dst, f))
    from safetensors import safe_open
    path = os.path.join(model_dir, "reference.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    ref = load_file(path)
    seqs = [(ref[f"ids.{i}"].tolist(), 0) for i in range(len(LENGTHS))]
    pm = PeftModel.from_pretrained(load(model_dir), dst).eval()
    n_lora = sum(1 for n, _ in pm.named_parameters() if "lora_" in n)
    assert n_lora == 2 * len(MODULES) * SHAPE["num_hidden_layers"], f"{name}: peft loaded {n_lora} LoRA tensors"
    logits = logits_of(pm, seqs)
    for i, l in enumerate(logits):
        ref[f"logits.qlora_adapter.{i}"] = l
    change = rel(logits, [ref[f"logits.{i}"] for i in range(len(seqs))])
    meta["qlora_adapter_change"] = f"{change:.3g}"
    save_file(ref, path, metadata=meta)
    print(f"{name}: peft logits with {dst} recorded (relative change from the base logits {change:.3g})")
    assert change > 1e-2, f"{name}: the trained adapter barely changes the logits"


# `qlora train` as a user runs it on a folder: r 8 over all seven modules,
# dropout on, a few steps at a high rate so that A and B move far from init
QLORA_TRAIN = ["--format", "text", "--quantizer=none", "--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0.1",
               "--lr", "1e-2", "--batch-size", "2", "--grad-accum", "1", "--steps", "6", "--warmup-ratio", "0",
               "--no-shuffle", "--seed", "7", "--quiet"]


def train_qlora_adapters(out_root, qlora, names):
    """For each folder: a tokenizer if it has none, `qlora train` on it, and
    peft's logits with the adapter it wrote."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="hf_qlora_") as tmp:
        text = os.path.join(tmp, "train.txt")
        with open(text, "w") as f:
            f.write("\n\n".join(TRAIN_TEXT) + "\n")
        for name in names:
            d = os.path.join(out_root, name)
            if not os.path.exists(os.path.join(d, "tokenizer.json")):
                write_tokenizer(d, SHAPE["vocab_size"])
            run = os.path.join(tmp, name)
            subprocess.run([qlora, "train", "--model", d, "--data", text, "--output", run, *QLORA_TRAIN],
                           env=dict(os.environ, OMP_NUM_THREADS="1"), check=True)
            add_qlora_adapter(out_root, run, name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/reference/hf_models")
    ap.add_argument("--tf4", default="/work/tf4", help="a transformers 4.x installed with pip --target")
    ap.add_argument("--qlora-adapter", default=None,
                    help="record peft's logits with this adapter written by `qlora train` on --name (only)")
    ap.add_argument("--name", default="llama", help="the folder --qlora-adapter's adapter was trained on")
    ap.add_argument("--qlora-adapters", default=None, metavar="QLORA",
                    help="run this qlora's `train` on every folder without qlora_adapter/ (or on --only's) "
                         "and record peft's logits with each adapter (only)")
    ap.add_argument("--train-text", default=None, help="write the text `qlora train` uses here and exit")
    ap.add_argument("--only", nargs="*", default=None, help="regenerate only these folders")
    args = ap.parse_args()
    import transformers
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)  # bit-reproducible
    if args.train_text:
        with open(args.train_text, "w") as f:
            f.write("\n\n".join(TRAIN_TEXT) + "\n")
        return
    if args.qlora_adapter:
        add_qlora_adapter(args.out, args.qlora_adapter, args.name)
        return
    if args.qlora_adapters:
        names = args.only if args.only is not None else [
            n for n in [*FIXTURES, *BNB_FORMS] if not os.path.isdir(os.path.join(args.out, n, "qlora_adapter"))]
        train_qlora_adapters(args.out, args.qlora_adapters, names)
        return
    print(versions())
    for name in FIXTURES:
        if args.only is not None and name not in args.only:
            continue
        d = os.path.join(args.out, name)
        keep_qlora = None
        if os.path.isdir(os.path.join(d, "qlora_adapter")):
            keep_qlora = os.path.join(args.out, ".qlora_adapter")
            shutil.rmtree(keep_qlora, ignore_errors=True)
            shutil.move(os.path.join(d, "qlora_adapter"), keep_qlora)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        if name == TOKENIZER_FOR:
            vocab = write_tokenizer(d)
        else:
            write_tokenizer(d, SHAPE["vocab_size"])
            vocab = SHAPE["vocab_size"]
        build(name, d, vocab)
        seqs = sequences(vocab)
        out, sens, lora_change = references(name, d, seqs)
        write_reference(d, out, {"sensitivity": f"{sens:.3g}", "lora_change": f"{lora_change:.3g}"})
        print(f"{name}: vocab {vocab}, loss {out['loss'].item():.6f}, sensitivity {sens:.3g}, "
              f"adapter changes the logits by {lora_change:.3g}")
        assert sens > 1e-2, f"{name}: the feature under test barely changes the logits"
        if keep_qlora:
            shutil.move(keep_qlora, os.path.join(d, "qlora_adapter"))
            add_qlora_adapter(args.out, os.path.join(d, "qlora_adapter"), name)
    for name in TF4_FORMS:
        if args.only is not None and name not in args.only and TF4_FORMS[name][0] not in args.only:
            continue
        shutil.rmtree(os.path.join(args.out, name), ignore_errors=True)
        write_tf4(name, args.out, args.tf4)
    for name in BNB_FORMS:
        if args.only is not None and name not in args.only and BNB_FORMS[name][0] not in args.only:
            continue
        d = os.path.join(args.out, name)
        keep_qlora = None
        if os.path.isdir(os.path.join(d, "qlora_adapter")):
            keep_qlora = os.path.join(args.out, ".qlora_adapter")
            shutil.rmtree(keep_qlora, ignore_errors=True)
            shutil.move(os.path.join(d, "qlora_adapter"), keep_qlora)
        shutil.rmtree(d, ignore_errors=True)
        write_bnb(name, args.out)
        if keep_qlora:
            shutil.move(keep_qlora, os.path.join(d, "qlora_adapter"))
            add_qlora_adapter(args.out, os.path.join(d, "qlora_adapter"), name)


if __name__ == "__main__":
    main()
