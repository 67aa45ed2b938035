#!/usr/bin/env python3
"""The CPU peer of qlora: transformers + peft on the same model, data and
threads as `qlora train/eval/generate` (bench/cpu-compare runs both).

  cpu_train.py make-model OUT_DIR --tokenizer TOKENIZER.json --stories FILE
      a LLaMA-shape model of SmolLM-135M's dimensions with random weights
      (transformers' own init, std 0.02), saved with save_pretrained (F32
      safetensors), plus a tokenizer and a text data file (blank-line
      separated examples of at least --seq-len tokens) in OUT_DIR
  cpu_train.py train|eval|generate MODEL_DIR [--threads N] ...
      one JSON line on stdout with tokens_per_s

The tokenizer is the 512-token SentencePiece BPE of stories260K, padded with
never-produced placeholder tokens to the model's vocabulary so that every id
decodes.  Only throughput is compared; the numbers the models compute do not
matter here (tests/test_reference.c checks those).
"""
import argparse
import json
import os
import sys
import time

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def shape_config(vocab):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1,
                       eos_token_id=2, hidden_act="silu", attention_bias=False, mlp_bias=False)


def make_model(a):
    import torch
    from transformers import LlamaForCausalLM
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(a.seed)
    model = LlamaForCausalLM(shape_config(a.vocab)).to(torch.float32)
    model.save_pretrained(a.out, safe_serialization=True)
    tok = json.load(open(a.tokenizer))
    vocab = tok["model"]["vocab"]
    for i in range(len(vocab), a.vocab):
        vocab["<extra_%d>" % i] = i
    json.dump(tok, open(os.path.join(a.out, "tokenizer.json"), "w"))
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
               "add_eos_token": False}, open(os.path.join(a.out, "tokenizer_config.json"), "w"))
    # examples of whole stories, joined until each holds more than seq_len tokens
    from tokenizers import Tokenizer
    t = Tokenizer.from_file(os.path.join(a.out, "tokenizer.json"))
    stories = [s.strip().replace("\n", " ") for s in open(a.stories).read().split("\n\n") if s.strip()]
    out, cur = [], ""
    for s in stories:
        cur = (cur + " " + s).strip()
        if len(t.encode(cur, add_special_tokens=False).ids) > a.seq_len:
            out.append(cur)
            cur = ""
        if len(out) == a.examples:
            break
    with open(os.path.join(a.out, "data.txt"), "w") as f:
        f.write("\n\n".join(out) + "\n")
    print(json.dumps({"model": a.out, "parameters": sum(p.numel() for p in model.parameters()),
                      "examples": len(out)}))


def load(a):
    import torch
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM
    from tokenizers import Tokenizer
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    texts = [s for s in open(os.path.join(a.model, "data.txt")).read().split("\n\n") if s.strip()]
    # as qlora's `text` format: BOS + text, cut at seq_len
    seqs = [([1] + tok.encode(s, add_special_tokens=False).ids)[:a.seq_len] for s in texts]
    return torch, model, seqs


def train(a):
    torch, model, seqs = load(a)
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=MODULES,
                                             bias="none", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    times, tokens = [], []
    for step in range(a.steps):
        x = torch.tensor([seqs[step % len(seqs)]])
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        tokens.append(x.shape[1])
    # the first step warms up (allocator, thread pool): left out, as for ours
    n = sum(tokens[1:]) if a.steps > 1 else tokens[0]
    t = sum(times[1:]) if a.steps > 1 else times[0]
    print(json.dumps({"what": "train", "steps": a.steps, "tokens_per_s": n / t, "s_per_step": t / max(1, a.steps - 1),
                      "last_loss": float(loss)}))


def evaluate(a):
    torch, model, seqs = load(a)
    model.eval()
    with torch.no_grad():
        x = torch.tensor([seqs[0]])
        model(input_ids=x, labels=x)  # warm-up
        n, nll, t0 = 0, 0.0, time.perf_counter()
        for s in seqs[:a.examples]:
            x = torch.tensor([s])
            nll += float(model(input_ids=x, labels=x).loss) * (len(s) - 1)
            n += len(s)
        t = time.perf_counter() - t0
    print(json.dumps({"what": "eval", "examples": a.examples, "tokens_per_s": n / t, "mean_nll": nll / max(1, n - a.examples)}))


def generate(a):
    torch, model, seqs = load(a)
    model.eval()
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    x = torch.tensor([[1] + tok.encode(a.prompt, add_special_tokens=False).ids])
    with torch.no_grad():
        model.generate(x, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        y = model.generate(x, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False)
        t = time.perf_counter() - t0
    n = y.shape[1] - x.shape[1]
    print(json.dumps({"what": "generate", "new_tokens": n, "tokens_per_s": n / t}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("out")
    m.add_argument("--tokenizer", required=True)
    m.add_argument("--stories", required=True)
    m.add_argument("--vocab", type=int, default=49152)
    m.add_argument("--seq-len", type=int, default=256)
    m.add_argument("--examples", type=int, default=64)
    m.add_argument("--seed", type=int, default=0)
    for name in ("train", "eval", "generate"):
        s = sub.add_parser(name)
        s.add_argument("model")
        s.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
        s.add_argument("--seq-len", type=int, default=256)
        s.add_argument("--steps", type=int, default=4)
        s.add_argument("--examples", type=int, default=8)
        s.add_argument("--new-tokens", type=int, default=64)
        s.add_argument("--prompt", default="Once upon a time")
    a = p.parse_args()
    {"make-model": make_model, "train": train, "eval": evaluate, "generate": generate}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
