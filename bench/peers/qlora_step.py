#!/usr/bin/env python3
"""The peer of a qlora GPU training step: one QLoRA step as people run it with
transformers + peft + bitsandbytes (the path artidoro/qlora's qlora.py takes),
at the LLaMA shapes 7b, 13b, 33b, 65b and 70b, with random weights.

What is built, per shape:
  * LlamaForCausalLM from a LlamaConfig, constructed on the meta device, then
    one decoder layer at a time: each of its seven nn.Linear (q, k, v, o, gate,
    up, down) gets a bf16 weight drawn on the GPU (normal, std 0.02), is
    replaced by a bitsandbytes Linear4bit quantized from it (NF4, blocksize 64,
    compress_statistics=True i.e. double quant, compute dtype bf16, quant_storage
    uint8), and the bf16 weight is freed before the next layer; its RMSNorms get
    ones.  So the whole bf16 model (140 GB at 70b) is never held on the GPU or
    the host.  Embeddings and lm_head stay bf16 (std 0.02, untied), as in QLoRA.
  * The model is marked as transformers' bitsandbytes loader marks it
    (is_loaded_in_4bit, quantization_method), which is what makes peft pick its
    bitsandbytes LoRA layer.  Then peft's prepare_model_for_kbit_training as
    is, fp32 upcast included (it upcasts the bf16 embeddings, lm_head and norms:
    about 1 GB more at 70b, not skipped), with gradient checkpointing and
    use_reentrant=False; LoraConfig(r=--lora-r, lora_alpha=16, target_modules =
    all seven linear names, bias "none", task_type CAUSAL_LM) through
    get_peft_model; then qlora.py's own dtype pass with --bf16: LoRA layers to
    bf16, norms to fp32, embeddings and lm_head back to bf16 (--lora-dtype fp32
    keeps the adapters fp32 instead).  With fp32 norms the residual stream runs
    in fp32 and the matmuls in bf16, as in qlora.py.
  * lora_dropout: qlora.py's argparse default is 0.0, but its Guanaco scripts
    (and the QLoRA paper) use 0.1 up to 13b and 0.05 for 33b and 65b; "paper"
    (the default) picks that per shape (0.05 for 70b), a number overrides it.
  * Optimizer: bitsandbytes PagedAdamW32bit (what Trainer builds for
    optim=paged_adamw_32bit, qlora.py's default), or torch AdamW with --optim
    adamw; lr 2e-4, betas (0.9, 0.999), weight decay 0 (qlora.py's).  Gradients
    are clipped to --max-grad-norm 0.3 (qlora.py's default; 0 turns it off).
  * The step: a fixed random batch of token ids [batch, seq], labels = ids,
    forward under torch.autocast(bf16) (as Trainer does with --bf16), loss from
    the model, backward, clip, optimizer.step(), zero_grad.  TF32 matmuls on,
    as qlora.py sets.  Attention is transformers' sdpa.

Timing and memory: --warmup steps untimed, then --steps timed steps between
torch.cuda.synchronize() and time.perf_counter(); tokens/s is
batch*seq*steps over that time.  Peak memory is torch.cuda.max_memory_allocated
over the timed steps (reset_peak_memory_stats after the warmup, so the
optimizer states already exist); model_gib is what the built model holds.  The paged optimizer's states live in CUDA managed
memory outside PyTorch's allocator, so they are NOT in that peak: they are
reported apart (paged_state_gib), with the device's used memory from
cudaMemGetInfo after the timed steps (device_used_gib, which also holds the
CUDA context and the allocator's cache).

One JSON line per shape on stdout, then a blank line and a table.  Each shape
runs in its own child process (bitsandbytes never frees paged buffers, and an
out-of-memory or a CUDA error must not poison the next shape); an out-of-memory
is reported as a row with "error" and the run goes on.

Run on the GPU machine, bitsandbytes built from source on PYTHONPATH
(TASKS=step bash scripts/gpu-check does that), e.g.
  python3 bench/peers/qlora_step.py --shapes 7b,13b
  python3 bench/peers/qlora_step.py --shapes 70b --layers 8 --steps 3

--cpu-smoke is a SMOKE TEST, not a benchmark: a 2-layer, hidden-64 model on the
CPU, through the same build, peft and step code, with bitsandbytes' CPU backend
when it is importable and a stand-in Linear (plain bf16 weight) when it is not;
it checks the replacement, the modules peft wrapped and that the loss is finite
and falls, and exits 1 if any check fails.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

# (layers, hidden, intermediate, heads, kv heads, vocab)
SHAPES = {
    "7b": (32, 4096, 11008, 32, 32, 32000),
    "13b": (40, 5120, 13824, 40, 40, 32000),
    "33b": (60, 6656, 17920, 52, 52, 32000),
    "65b": (80, 8192, 22016, 64, 64, 32000),
    "70b": (80, 8192, 28672, 64, 8, 32000),
    "smoke": (2, 64, 172, 4, 2, 128),  # --cpu-smoke only: GQA on, every dimension a multiple of 2
}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TARGET_MODULES = [n.split(".")[-1] for n in LINEARS]
IMPL = "transformers+peft+bitsandbytes"
GiB = float(1 << 30)


def need_packages():
    """Fail with one clear line when the Python stack is not there."""
    for name in ("torch", "transformers", "peft"):
        try:
            __import__(name)
        except ImportError as e:
            sys.exit("qlora_step: %s is not importable (%s); this peer needs torch, transformers and peft "
                     "(and bitsandbytes, except for --cpu-smoke)" % (name, e))


def paper_dropout(shape):
    # QLoRA's Guanaco runs: 0.1 up to 13b, 0.05 from 33b on
    return 0.1 if shape in ("7b", "13b", "smoke") else 0.05


def versions():
    import torch
    v = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            v[name] = __import__(name).__version__
        except ImportError:
            v[name] = None
    return v


class StandIn4bit:
    """Built on first use (needs torch): a frozen bf16 nn.Linear standing in for
    Linear4bit in --cpu-smoke when bitsandbytes is not importable."""
    cls = None

    @classmethod
    def get(cls):
        if cls.cls is None:
            import torch

            class StandInLinear4bit(torch.nn.Linear):
                pass
            cls.cls = StandInLinear4bit
        return cls.cls


def make_quantized_linear(w, bnb, dev):
    """A Linear4bit (NF4, double quant, bf16 compute, uint8 storage) quantized
    from w (out, in) bf16, or the smoke stand-in when bnb is None."""
    import torch
    out_f, in_f = w.shape
    if bnb is None:
        lin = StandIn4bit.get()(in_f, out_f, bias=False, device="meta")
        lin.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
        return lin
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                            quant_type="nf4", quant_storage=torch.uint8, device="meta")
    # Params4bit quantizes on its first move to a real device (also when the
    # data is already there): the packed weight replaces w in .data
    p = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                          quant_storage=torch.uint8, module=lin)
    lin.weight = p.to(dev)
    if not lin.weight.bnb_quantized or lin.weight.dtype != torch.uint8:
        raise RuntimeError("qlora_step: Params4bit did not quantize (bnb_quantized=%s, dtype=%s): this "
                           "bitsandbytes build behaves unlike 0.4x/0.5x" % (lin.weight.bnb_quantized, lin.weight.dtype))
    return lin


def build_model(shape, a, dev, bnb):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    layers, hidden, inter, heads, kv, vocab = SHAPES[shape]
    if a.layers:
        layers = a.layers
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max(4096, a.seq),
                      rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa",
                      dtype=torch.bfloat16)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    bf16 = torch.bfloat16

    def randn(*shape_):
        return torch.empty(*shape_, dtype=bf16, device=dev).normal_(0.0, 0.02)

    def ones(n):
        return torch.nn.Parameter(torch.ones(n, dtype=bf16, device=dev))

    inner = model.model
    inner.embed_tokens.weight = torch.nn.Parameter(randn(vocab, hidden))
    model.lm_head.weight = torch.nn.Parameter(randn(vocab, hidden))
    inner.norm.weight = ones(hidden)
    for layer in inner.layers:
        for path in LINEARS:
            parent_name, attr = path.split(".")
            parent = getattr(layer, parent_name)
            old = getattr(parent, attr)
            if old.bias is not None:
                raise RuntimeError("qlora_step: %s has a bias; LLaMA's linears have none" % path)
            w = randn(old.out_features, old.in_features)
            setattr(parent, attr, make_quantized_linear(w, bnb, dev))
            del w  # the packed copy is all that stays
        layer.input_layernorm.weight = ones(hidden)
        layer.post_attention_layernorm.weight = ones(hidden)
    # the rotary tables were computed on meta: build the module again on the device
    with torch.device(dev):
        inner.rotary_emb = type(inner.rotary_emb)(config=cfg)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError("qlora_step: still on the meta device after the build: %s" % ", ".join(left[:8]))
    # what transformers' bitsandbytes quantizer marks on a 4-bit model, and what
    # peft reads to pick its bitsandbytes LoRA layer (dispatch_bnb_4bit)
    if bnb is not None:
        model.is_loaded_in_4bit = True
        model.quantization_method = "bitsandbytes"
    return model, cfg


def add_lora(model, shape, a):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from peft.tuners.lora import LoraLayer
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    if not model.is_gradient_checkpointing:
        # peft turns it on only for a model marked 4-bit: the smoke stand-in is not
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dropout = paper_dropout(shape) if a.lora_dropout == "paper" else float(a.lora_dropout)
    lcfg = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=dropout, target_modules=TARGET_MODULES,
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    # qlora.py's pass after get_peft_model (with --bf16)
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and a.lora_dtype == "bf16":
            module.to(torch.bfloat16)
        if "norm" in name:
            module.to(torch.float32)
        if ("lm_head" in name or "embed_tokens" in name) and hasattr(module, "weight"):
            if module.weight.dtype == torch.float32:
                module.to(torch.bfloat16)
    return model, dropout


def make_optimizer(params, a, bnb):
    import torch
    if a.optim == "paged_adamw_32bit":
        if bnb is None:
            raise RuntimeError("qlora_step: --optim paged_adamw_32bit needs bitsandbytes (or pass --optim adamw)")
        return bnb.optim.PagedAdamW32bit(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def paged_state_bytes(opt):
    n = 0
    for st in opt.state.values():
        for t in st.values():
            if hasattr(t, "is_paged") and getattr(t, "is_paged", False):
                n += t.numel() * t.element_size()
    return n


def state_bytes(opt):
    import torch
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


def run_shape(shape, a, dev, bnb, checks=None):
    """Build, wrap, step; returns the row (and fills checks for the smoke test)."""
    import torch
    cuda = dev.type == "cuda"
    layers = a.layers or SHAPES[shape][0]
    row = {"bench": "step", "impl": IMPL, "shape": shape, "layers": layers, "seq": a.seq, "batch": a.batch,
           "warmup": a.warmup, "steps": a.steps, "lora_r": a.lora_r, "lora_alpha": a.lora_alpha, "optim": a.optim, "lr": a.lr,
           "max_grad_norm": a.max_grad_norm, "lora_dtype": a.lora_dtype, "quant": "nf4+dq bs64 uint8",
           "grad_ckpt": "use_reentrant=False", "autocast": "bf16"}
    row.update(versions())
    row["gpu"] = torch.cuda.get_device_name(dev) if cuda else "cpu"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, cfg = build_model(shape, a, dev, bnb)
    model, dropout = add_lora(model, shape, a)
    row["lora_dropout"] = dropout
    row["attn"] = cfg._attn_implementation
    if cuda:
        torch.cuda.synchronize(dev)
    row["build_s"] = round(time.perf_counter() - t0, 2)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    row["trainable_params"] = sum(p.numel() for p in trainable)
    row["params_4bit"] = sum(m.in_features * m.out_features for m in model.modules()
                             if bnb is not None and isinstance(m, bnb.nn.Linear4bit))
    opt = make_optimizer(trainable, a, bnb)
    if cuda:
        row["model_gib"] = round(torch.cuda.memory_allocated(dev) / GiB, 3)
    if checks is not None:
        checks["model"] = model
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=g).to(dev)
    losses, step_s = [], []
    t_start = None
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            if cuda:
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            t_start = time.perf_counter()
        ts = time.perf_counter()
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        loss = out.loss
        loss.backward()
        del out
        if a.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, a.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        del loss
        if i >= a.warmup and a.per_step_sync:
            if cuda:
                torch.cuda.synchronize(dev)
            step_s.append(round(time.perf_counter() - ts, 4))
    if cuda:
        torch.cuda.synchronize(dev)
    total = time.perf_counter() - t_start
    row["s_per_step"] = round(total / a.steps, 4)
    row["tokens_per_s"] = round(a.batch * a.seq * a.steps / total, 1)
    if step_s:
        row["step_s"] = step_s
    row["loss"] = [round(float(x), 4) for x in losses]  # every step, the warmup ones first
    row["loss_finite"] = all(math.isfinite(x) for x in row["loss"])
    st = state_bytes(opt)
    row["optim_state_gib"] = round(st / GiB, 3)
    row["paged_state_gib"] = round(paged_state_bytes(opt) / GiB, 3)
    if cuda:
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(dev) / GiB, 3)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(dev) / GiB, 3)
        free, total_mem = torch.cuda.mem_get_info(dev)
        row["device_used_gib"] = round((total_mem - free) / GiB, 3)
    if checks is not None:
        checks["opt"] = opt
    return row


def child(a):
    """One shape in this process: prints its JSON row (or an error row)."""
    import torch
    if not torch.cuda.is_available():
        sys.exit("qlora_step: no CUDA device (torch %s, built for CUDA %s); run it on the GPU machine, "
                 "or pass --cpu-smoke for the CPU smoke test" % (torch.__version__, torch.version.cuda))
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        sys.exit("qlora_step: bitsandbytes is not importable (%s); put the source build on PYTHONPATH "
                 "(scripts/gpu-check does)" % e)
    torch.backends.cuda.matmul.allow_tf32 = True  # qlora.py does
    torch.backends.cudnn.allow_tf32 = True
    dev = torch.device("cuda", 0)
    shape = a.shapes
    try:
        row = run_shape(shape, a, dev, bnb)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        # bitsandbytes' own kernels report an allocation failure as a RuntimeError
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "out of memory" not in str(e).lower():
            raise
        row = {"bench": "step", "impl": IMPL, "shape": shape, "layers": a.layers or SHAPES[shape][0],
               "seq": a.seq, "batch": a.batch, "lora_r": a.lora_r, "optim": a.optim,
               "error": "out of memory: " + str(e).splitlines()[0],
               "gpu": torch.cuda.get_device_name(dev)}
        row.update(versions())
    print(json.dumps(row), flush=True)


def parent(a, argv):
    shapes = a.shapes.split(",")
    for s in shapes:
        if s not in SHAPES or s == "smoke":
            sys.exit("qlora_step: unknown shape %r in --shapes; known: %s" %
                     (s, ",".join(k for k in SHAPES if k != "smoke")))
    import torch
    if not torch.cuda.is_available():
        sys.exit("qlora_step: no CUDA device (torch %s, built for CUDA %s); run it on the GPU machine, "
                 "or pass --cpu-smoke for the CPU smoke test" % (torch.__version__, torch.version.cuda))
    rows = []
    for s in shapes:
        cmd = [sys.executable, os.path.abspath(__file__)] + argv + ["--shapes", s, "--child"]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr passes through
        got = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
        for line in p.stdout.splitlines():
            if not line.startswith("{") and line.strip():
                print(line, file=sys.stderr)
        if not got:
            got = [{"bench": "step", "impl": IMPL, "shape": s, "error": "child exited with status %d and no "
                    "row (its stderr is above)" % p.returncode}]
        for row in got:
            print(json.dumps(row), flush=True)
            rows.append(row)
    print_table(rows)
    return 0 if all("error" not in r for r in rows) else 1


def print_table(rows):
    v = versions()
    print("\n%-6s %6s %6s %10s %10s %9s %9s %9s   %s" % ("shape", "layers", "tokens", "s/step", "tokens/s",
                                                       "peak GiB", "paged", "dev GiB", "loss first -> last"))
    for r in rows:
        if "error" in r:
            print("%-6s %6s %6s   %s" % (r.get("shape"), r.get("layers", ""), "", r["error"]))
            continue
        print("%-6s %6d %6d %10.3f %10.1f %9.2f %9.2f %9s   %.4f -> %.4f" % (
            r["shape"], r["layers"], r["batch"] * r["seq"], r["s_per_step"], r["tokens_per_s"],
            r.get("peak_gib", float("nan")), r["paged_state_gib"], r.get("device_used_gib", "-"),
            r["loss"][0], r["loss"][-1]))
    print("(%s: torch %s, transformers %s, peft %s, bitsandbytes %s; peak = torch allocator, "
          "paged optimizer state outside it)" % (IMPL, v["torch"], v["transformers"], v["peft"], v["bitsandbytes"]))


def cpu_smoke(a):
    """SMOKE TEST on the CPU (not a benchmark): the build, peft and step code on
    a tiny model; exits 1 if a check fails."""
    import torch
    try:
        import bitsandbytes as bnb
        if not hasattr(bnb.nn, "Linear4bit"):
            bnb = None
    except ImportError:
        bnb = None
    a.layers = a.layers or 0
    a.seq, a.batch, a.lora_r = min(a.seq, 32), 2, min(a.lora_r, 8)
    a.steps, a.warmup = 4, 1
    a.lr = 1e-2  # big enough that the loss visibly falls in a few steps
    if bnb is None:
        a.optim = "adamw"
    dev = torch.device("cpu")
    checks = {}
    row = run_shape("smoke", a, dev, bnb, checks)
    model, opt = checks["model"], checks["opt"]
    from peft.tuners.lora import LoraLayer
    layers = a.layers or SHAPES["smoke"][0]
    q4_cls = bnb.nn.Linear4bit if bnb is not None else StandIn4bit.get()
    fails, passed = [], []

    def check(ok, what):
        print("smoke: %-4s %s" % ("ok" if ok else "FAIL", what))
        (passed if ok else fails).append(what)

    base = model.get_base_model()
    q4 = [n for n, m in base.named_modules() if isinstance(m, q4_cls)]
    check(len(q4) == 7 * layers, "%d %s modules (want 7 per layer x %d)" % (len(q4), q4_cls.__name__, layers))
    plain = [n for n, m in base.model.layers.named_modules() if type(m) is torch.nn.Linear
             and ".lora_" not in "." + n]
    check(not plain, "no plain nn.Linear left in the decoder layers (left: %s)" % plain[:4])
    lora = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    want = {"base_model.model.model.layers.%d.%s" % (i, p) for i in range(layers) for p in LINEARS}
    check(lora == want, "peft wrapped exactly q,k,v,o,gate,up,down of every layer (extra %s, missing %s)" %
          (sorted(lora - want)[:3], sorted(want - lora)[:3]))
    if bnb is not None:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
        kinds = {type(m).__name__ for n, m in model.named_modules() if n in want}
        check(all(isinstance(m, LoraLinear4bit) for n, m in model.named_modules() if n in want),
              "peft chose its bitsandbytes LoRA layer (lora.bnb.Linear4bit), got %s" % sorted(kinds))
        w = base.model.layers[0].self_attn.q_proj.weight
        check(w.dtype == torch.uint8 and w.numel() == 64 * 64 // 2 and w.quant_state.nested
              and w.quant_state.quant_type == "nf4",
              "q_proj weight packed NF4 with double quant (%s, %d bytes)" % (w.dtype, w.numel()))
    check(not any(isinstance(m, LoraLayer) for n, m in model.named_modules() if "lm_head" in n),
          "lm_head not wrapped")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    check(names and all(".lora_A." in n or ".lora_B." in n for n in names),
          "only LoRA A/B train (%d tensors, %d params)" % (len(names), row["trainable_params"]))
    r = a.lora_r
    h, inter, kvd = 64, 172, 32
    per_layer = r * ((h + h) * 2 + (h + kvd) * 2 + (h + inter) * 3)
    check(row["trainable_params"] == per_layer * layers,
          "trainable params %d = r * sum(in+out) = %d" % (row["trainable_params"], per_layer * layers))
    dt = {p.dtype for n, p in model.named_parameters() if p.requires_grad}
    check(dt == {torch.bfloat16 if a.lora_dtype == "bf16" else torch.float32}, "LoRA dtype %s" % dt)
    norms = {p.dtype for n, p in model.named_parameters() if "norm" in n}
    check(norms == {torch.float32}, "norms fp32 (qlora.py) %s" % norms)
    emb = {base.model.embed_tokens.weight.dtype, base.lm_head.weight.dtype}
    check(emb == {torch.bfloat16}, "embeddings and lm_head bf16 %s" % emb)
    check(base.is_gradient_checkpointing, "gradient checkpointing on")
    # B starts at zero: every one moving means the gradient reached every layer
    # through the checkpointed blocks
    moved = min(float(p.detach().float().abs().max()) for n, p in model.named_parameters() if ".lora_B." in n)
    check(moved > 0, "every LoRA B moved off zero (smallest max|B| %.3g)" % moved)
    check(row["loss_finite"], "losses finite %s" % row["loss"])
    check(row["loss"][-1] < row["loss"][0], "loss falls on the repeated batch (%.4f -> %.4f)" %
          (row["loss"][0], row["loss"][-1]))
    print("smoke: bitsandbytes %s, optimizer %s (%s)" % (
        "CPU backend " + bnb.__version__ if bnb else "absent: stand-in Linear", a.optim, type(opt).__name__))
    print(json.dumps(row))
    print("smoke test (not a benchmark): %d passed, %d failed" % (len(passed), len(fails)))
    return 1 if fails else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="7b", help="comma-separated: " + ",".join(k for k in SHAPES if k != "smoke"))
    ap.add_argument("--layers", type=int, default=0, help="override the layer count (quick runs)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--lora-dropout", default="paper", help="'paper' (0.1 to 13b, 0.05 above) or a number")
    ap.add_argument("--lora-dtype", choices=("bf16", "fp32"), default="bf16",
                    help="adapter dtype: bf16 is qlora.py with --bf16")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--optim", choices=("paged_adamw_32bit", "adamw"), default="paged_adamw_32bit")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-grad-norm", type=float, default=0.3, help="0: no clipping")
    ap.add_argument("--per-step-sync", action="store_true",
                    help="also synchronize after each timed step and report each step's seconds")
    ap.add_argument("--cpu-smoke", action="store_true", help="SMOKE TEST on the CPU, tiny model (not a benchmark)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    a = ap.parse_args(argv)
    if a.steps < 1 or a.warmup < 0 or a.seq < 2 or a.batch < 1 or a.lora_r < 1:
        ap.error("--steps >= 1, --warmup >= 0, --seq >= 2, --batch >= 1, --lora-r >= 1")
    if a.lora_dropout != "paper":
        try:
            float(a.lora_dropout)
        except ValueError:
            ap.error("--lora-dropout: 'paper' or a number, not %r" % a.lora_dropout)
    need_packages()
    if a.cpu_smoke:
        return cpu_smoke(a)
    if a.child:
        child(a)
        return 0
    return parent(a, argv)


if __name__ == "__main__":
    sys.exit(main())
