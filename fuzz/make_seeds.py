#!/usr/bin/env python3
"""Build the seed corpora of the fuzz harnesses (docs/fuzzing.md).

    fuzz/make_seeds.py BUILD_DIR SHARED_DIR OUT_DIR

Writes OUT_DIR/<harness>/<seed> for every harness from ../shared (the
stories260K tokenizer and config, the data sets cut small), the test fixtures
(tests/reference) and files made here: the harnesses' tiny model (written by
BUILD_DIR/fuzz/fuzz_fixture), quantized with each shipped plugin and trained
for two steps with `qlora train` (adapter and checkpoint seeds).  Nothing big
is committed: every seed is made again from those sources.  Multi-file seeds
join their files with SEP, as the harnesses cut them (fuzz/fuzz_common.h).
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

SEP = b"\n#qlora-fuzz-next-file#\n"
SRC = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Kept equal to config_text in fuzz/fuzz_checkpoint.c.
CHECKPOINT_CONFIG = {
    "model": "tiny-model", "quantizer": "none", "data": "data.json", "format": "alpaca",
    "source_max_len": 1024, "target_max_len": 256, "max_len": 64, "max_examples": 0,
    "train_on_source": False, "lora_r": 2, "lora_alpha": 16.0, "lora_dropout": 0.0, "lora_modules": 127,
    "lr": 0.0002, "weight_decay": 0.0, "max_grad_norm": 0.3, "warmup_ratio": 0.03, "lr_scheduler": "constant",
    "batch_size": 1, "grad_accum": 1, "seed": 42, "shuffle": True, "group_by_length": False,
    "gradient_checkpointing": False,
}

DTYPES = {"F64": ("d", 8), "F32": ("f", 4), "F16": ("e", 2), "BF16": (None, 2), "I64": ("q", 8), "I32": ("i", 4),
          "I16": ("h", 2), "I8": ("b", 1), "U8": ("B", 1), "BOOL": ("?", 1), "U16": ("H", 2), "U32": ("I", 4),
          "U64": ("Q", 8)}


def read_st(path):
    """{name: (dtype, shape, bytes)} and the metadata of a safetensors file."""
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    meta = header.pop("__metadata__", {})
    out = {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        out[name] = (e["dtype"], e["shape"], body[b:end])
    return out, meta


def st_bytes(tensors, meta=None, pad_to=None, order=None):
    """A safetensors file: tensors {name: (dtype, shape, raw)} in the given order."""
    header, body = {}, b""
    for name in order or sorted(tensors):
        dtype, shape, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    if meta:
        header["__metadata__"] = meta
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad_to:
        text += b" " * (-len(text) % pad_to)
    return struct.pack("<Q", len(text)) + text + body


def cut_layer(tensors):
    """The tensors of layer 0's attention and the final norm: a model file in a few KB."""
    return {n: v for n, v in tensors.items()
            if n.startswith("model.layers.0.self_attn.") or n.startswith("model.layers.0.input_layernorm")
            or n == "model.norm.weight"}


def write(out, harness, name, data):
    d = os.path.join(out, harness)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def join(*parts):
    return SEP.join(p.encode() if isinstance(p, str) else p for p in parts)


def run(cmd, **kw):
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    if r.returncode != 0:
        sys.stderr.write(f"make_seeds: {' '.join(cmd)} failed:\n{r.stderr.decode(errors='replace')}\n")
        sys.exit(1)
    return r


def small_tensors():
    """One small tensor of every dtype, some at odd offsets."""
    t = {}
    for i, (dtype, (fmt, size)) in enumerate(DTYPES.items()):
        if dtype == "BF16":
            raw = b"\x80\x3f\x00\xc0\xc0\x7f"  # 1.0, -2.0, NaN
        else:
            vals = [1, 2, 3] if fmt not in "fde" else [1.5, -2.25, 0.0]
            if fmt == "?":
                vals = [True, False, True]
            raw = struct.pack("<3" + fmt, *vals)
        t[f"t{i:02d}.{dtype.lower()}"] = (dtype, [3], raw)
    return t


def tokenizer_seeds(out, shared):
    tok = open(os.path.join(shared, "models/stories260K/tokenizer.json"), "rb").read()
    tcfg = open(os.path.join(shared, "models/stories260K/tokenizer_config.json"), "rb").read()
    cfg = open(os.path.join(shared, "models/stories260K/config.json"), "rb").read()
    write(out, "tokenizer", "stories260K.json", tok)
    write(out, "tokenizer", "stories260K-folder", join(tok, tcfg, cfg))
    write(out, "tokenizer", "stories260K-eos-array", join(tok, tcfg, json.dumps({"bos_token_id": 1, "eos_token_id": [2, 3]})))
    # a small byte-level BPE (GPT-2 style) with added tokens and a Split pre-tokenizer
    # the GPT-2 byte-to-unicode table
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {ch: i for i, ch in enumerate(chars)}
    merges = [["Ġ", "t"], ["h", "e"], ["Ġt", "he"], ["i", "n"], ["Ġ", "a"]]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    byte_level = {
        "version": "1.0",
        "added_tokens": [
            {"id": len(vocab), "content": "<|endoftext|>", "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True},
            {"id": len(vocab) + 1, "content": " hello", "single_word": True, "lstrip": True, "rstrip": True,
             "normalized": True, "special": False},
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"},
             "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    write(out, "tokenizer", "byte-level.json", json.dumps(byte_level, ensure_ascii=False))
    # a small SentencePiece-style BPE with byte fallback, merges as strings
    sp_vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        sp_vocab[f"<0x{b:02X}>"] = len(sp_vocab)
    for piece in ["▁", "a", "b", "c", "▁a", "ab", "▁ab", "é"]:
        sp_vocab[piece] = len(sp_vocab)
    sp = {
        "version": "1.0",
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for c, i in [("<unk>", 0), ("<s>", 1), ("</s>", 2)]],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                           {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                                    {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                                     {"type": "ByteFallback"}, {"type": "Fuse"},
                                                     {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": sp_vocab, "merges": ["▁ a", "a b", "▁a b"]},
    }
    write(out, "tokenizer", "sentencepiece-small.json", json.dumps(sp, ensure_ascii=False))
    sp_meta = dict(sp, pre_tokenizer={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False},
                   normalizer=None)
    write(out, "tokenizer", "metaspace-small.json", json.dumps(sp_meta, ensure_ascii=False))

    enc = "tokenizer_encode"
    write(out, enc, "ascii", "Once upon a time, there was a little girl named Lily.")
    write(out, enc, "unicode", "café 中文 😀 ▁ <s> </s> <unk>\n\ttabs  and   spaces ")
    write(out, enc, "invalid-utf8", b"\xff\xfe\xc3(\x80\xe2\x82 ok \xf0\x9f\x98")
    write(out, enc, "nul", b"a\x00b\x00\x00c")
    story = open(os.path.join(shared, "data/tinystories/validation.txt"), "rb").read(1500)
    write(out, enc, "story", story)


def dataset_seeds(out, shared):
    alpaca = json.load(open(os.path.join(shared, "data/alpaca/alpaca_en_demo.json")))[:4]
    for r in alpaca:
        r["output"] = r["output"][:300]
    write(out, "dataset_alpaca", "array.json", json.dumps(alpaca, indent=2))
    write(out, "dataset_alpaca", "lines.jsonl", "\n".join(json.dumps(r) for r in alpaca) + "\n\n")
    write(out, "dataset_alpaca", "no-input.jsonl", json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")

    si = []
    with open(os.path.join(shared, "data/self-instruct/user_oriented_instructions.jsonl")) as f:
        for _ in range(3):
            si.append(json.loads(f.readline()))
    si_text = "\n".join(json.dumps(r) for r in si) + "\n"
    write(out, "dataset_self_instruct", "records.jsonl", si_text)
    write(out, "dataset_self_instruct", "array.json", json.dumps(si[:2]))
    io = [{"input": "What is 2+2?", "output": "4"}, {"input": "", "output": "empty source"}]
    write(out, "dataset_input_output", "pairs.jsonl", "\n".join(json.dumps(r) for r in io) + "\n")
    write(out, "dataset_input_output", "array.json", json.dumps(io))
    write(out, "dataset_input_output", "self-instruct.jsonl", si_text)

    oa = []
    with open(os.path.join(shared, "data/oasst1/oasst1_validation.jsonl")) as f:
        for _ in range(3):
            r = json.loads(f.readline())
            oa.append({k: (v[:200] if isinstance(v, str) else v) for k, v in r.items()})
    write(out, "dataset_oasst1", "records.jsonl", "\n".join(json.dumps(r) for r in oa) + "\n")
    write(out, "dataset_oasst1", "text.jsonl", json.dumps({"text": "### Human: hi ### Assistant: hello"}) + "\n")
    write(out, "dataset_oasst1", "array.json", json.dumps(oa[:2], ensure_ascii=False))

    text = open(os.path.join(shared, "data/tinystories/validation.txt"), "rb").read(3000)
    write(out, "dataset_text", "stories.txt", text)
    write(out, "dataset_text", "crlf.txt", b"first line\r\nsecond\r\n\r\n  \r\nnext example\r\n")
    write(out, "dataset_text", "blank.txt", b"one\n\n\t \n\ntwo\nthree\n")


def mmlu_seeds(out, shared):
    d = os.path.join(shared, "data/mmlu")
    for subject in ["abstract_algebra", "high_school_geography", "marketing"]:
        dev = open(os.path.join(d, "dev", f"{subject}_dev.csv"), "rb").read()
        test_path = os.path.join(d, "test", f"{subject}_test.csv")
        test = open(test_path, "rb").read() if os.path.exists(test_path) else dev
        lines = test.split(b"\n")
        write(out, "mmlu", subject, join(dev[:2500], b"\n".join(lines[:5]) + b"\n"))
    write(out, "mmlu", "quoted", b'question,choice0,choice1,choice2,choice3,answer\n"a ""quoted""\nline",b,c,d,e,2\r\nq,1,2,3,4,0\n')


def config_seeds(out, c):
    """The config forms docs/models.md lists, over the tiny model's config
    (head_dim 8, max_position_embeddings 64) so that most load and run: the
    transformers-5 rope_parameters of every RoPE type, the 4.x rope_theta +
    rope_scaling (with `type` and `rope_type`), both forms at once, refused
    types and keys, Qwen2/Qwen3/Mistral fields; and the configs transformers
    wrote for tests/reference/hf_models, as they are."""
    base = {k: v for k, v in c.items() if k not in ("rope_theta", "torch_dtype")}
    rp = {
        "default": {"rope_type": "default", "rope_theta": 50000.0},
        "linear": {"rope_type": "linear", "rope_theta": 30000.0, "factor": 2.5},
        "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 3.0},
        "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
                 "beta_fast": 32.0, "beta_slow": 1.0},
        "yarn-mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": None,
                        "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 0.5,
                        "truncate": False, "attention_factor": None},
        "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                     "long_factor": [2.0] * 4},
        "partial": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    }
    for name, params in rp.items():
        write(out, "config", f"rope-parameters-{name}.json", json.dumps(dict(base, dtype="bfloat16",
                                                                               rope_parameters=params), indent=2))
    # 4.x: top-level rope_theta, rope_scaling with `type` (older) or `rope_type`
    write(out, "config", "rope-scaling-null.json", json.dumps(dict(base, rope_theta=50000.0, rope_scaling=None,
                                                                   torch_dtype="float32")))
    write(out, "config", "rope-scaling-linear-type.json",
          json.dumps(dict(base, rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 2.0})))
    write(out, "config", "rope-scaling-dynamic.json",
          json.dumps(dict(base, rope_theta=10000.0, rope_scaling={"rope_type": "dynamic", "factor": 2.0})))
    write(out, "config", "rope-scaling-llama3.json",
          json.dumps(dict(base, rope_theta=500000.0, torch_dtype="bfloat16", rope_scaling={
              "rope_type": "llama3", "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 16})))
    write(out, "config", "rope-scaling-yarn-top-original.json",
          json.dumps(dict(base, rope_theta=10000.0, original_max_position_embeddings=16,
                          rope_scaling={"rope_type": "yarn", "factor": 4.0})))
    # both forms: they must agree; rope_theta only fills in a missing one
    write(out, "config", "rope-both-agree.json",
          json.dumps(dict(base, rope_theta=20000.0, dtype="float32", torch_dtype="float32",
                          rope_parameters={"rope_type": "linear", "factor": 2.0},
                          rope_scaling={"type": "linear", "factor": 2.0})))
    write(out, "config", "rope-both-differ.json",
          json.dumps(dict(base, rope_theta=20000.0, rope_parameters=rp["default"],
                          rope_scaling={"rope_type": "linear", "factor": 2.0})))
    write(out, "config", "big-integer.json", json.dumps(dict(base, rope_parameters=rp["default"])).replace(
        '"max_position_embeddings": 64', '"max_position_embeddings": 1000000000000000019884624838656'))
    # architectures and their fields
    write(out, "config", "qwen2.json", json.dumps(dict(
        base, architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_parameters=rp["default"],
        use_sliding_window=False, sliding_window=None, max_window_layers=28, attention_dropout=0.0), indent=2))
    write(out, "config", "qwen2-sliding-layer-types.json", json.dumps(dict(
        base, architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1000000.0, use_sliding_window=True,
        sliding_window=8, max_window_layers=1, layer_types=["full_attention", "sliding_attention"])))
    write(out, "config", "qwen3.json", json.dumps(dict(
        base, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=8, attention_bias=False,
        rope_parameters=dict(rp["yarn"], rope_theta=1000000.0), use_sliding_window=False, sliding_window=None,
        layer_types=["full_attention", "full_attention"], dtype="bfloat16"), indent=2))
    write(out, "config", "mistral-no-window.json", json.dumps(dict(
        base, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None, head_dim=None,
        rope_parameters=rp["default"])))
    hf = os.path.join(SRC, "tests", "reference", "hf_models")
    for name in sorted(os.listdir(hf)):
        path = os.path.join(hf, name, "config.json")
        if os.path.isfile(path):
            write(out, "config", f"hf-{name}.json", open(path, "rb").read())


def model_seeds(out, build, shared, work):
    tiny = os.path.join(work, "tiny-model")
    run([os.path.join(build, "fuzz", "fuzz_fixture"), tiny])
    qlora = os.path.join(build, "core", "qlora")

    st_small = small_tensors()
    write(out, "safetensors", "dtypes.safetensors", st_bytes(st_small, {"format": "pt"}))
    write(out, "safetensors", "unaligned.safetensors",
          st_bytes({"a": ("U8", [1], b"\x01"), "b": ("F64", [2], struct.pack("<2d", 1.0, -0.5)),
                    "c": ("F16", [1], b"\x00\x3c")}, order=["a", "b", "c"]))
    write(out, "safetensors", "scalar.safetensors", st_bytes({"s": ("F32", [], struct.pack("<f", 2.0)),
                                                               "e": ("F32", [0, 4], b"")}))
    write(out, "safetensors", "empty.safetensors", st_bytes({}, {"k": "v"}, pad_to=8))
    # small seeds keep the harnesses fast: layer 0 of the tiny model, without the 32 KB embedding
    tiny_t, tiny_meta = read_st(os.path.join(tiny, "model.safetensors"))
    tiny_st = st_bytes(cut_layer(tiny_t), tiny_meta)
    write(out, "safetensors", "tiny-model.safetensors", tiny_st)
    write(out, "inspect", "tiny-model.safetensors", tiny_st)
    write(out, "inspect", "dtypes.safetensors", st_bytes(st_small))

    cfg_tiny = open(os.path.join(tiny, "config.json"), "rb").read()
    write(out, "config", "tiny.json", cfg_tiny)
    write(out, "config", "stories260K.json", open(os.path.join(shared, "models/stories260K/config.json"), "rb").read())
    c = json.loads(cfg_tiny)
    write(out, "config", "mistral.json", json.dumps(dict(c, architectures=["MistralForCausalLM"], model_type="mistral",
                                                         sliding_window=32, head_dim=8, eos_token_id=[2, 0])))
    write(out, "config", "model-type-only.json",
          json.dumps({k: v for k, v in c.items() if k != "architectures"}))
    config_seeds(out, c)

    # quantized tiny models: inspect, config and the plugin load() seeds
    specs = {"nf4": "nf4", "nf4-nodq": "nf4:double_quant=0,blocksize=128", "fp4": "fp4:blocksize=32", "int8": "int8"}
    for tag, spec in specs.items():
        qdir = os.path.join(work, "q-" + tag)
        run([qlora, "quantize", "--quiet", f"--quantizer={spec}", tiny, "-o", qdir])
        qst = os.path.join(qdir, "model.safetensors")
        qt, qmeta = read_st(qst)
        write(out, "inspect", f"{tag}.safetensors", st_bytes(cut_layer(qt), qmeta))
        write(out, "safetensors", f"{tag}.safetensors", st_bytes(cut_layer(qt), qmeta))
        write(out, "config", f"{tag}.json", open(os.path.join(qdir, "config.json"), "rb").read())
        tensors, _ = read_st(qst)
        plugin = tag.split("-")[0]
        for layer, rows, cols in [("model.layers.0.self_attn.q_proj", 16, 16), ("model.layers.1.mlp.down_proj", 16, 32),
                                  ("model.layers.0.self_attn.k_proj", 8, 16)]:
            sub = {n[len(layer) + 1:]: v for n, v in tensors.items() if n.startswith(layer + ".")}
            short = layer.split(".")[-1]
            write(out, f"plugin_{plugin}", f"{tag}-{short}", st_bytes(sub, {"rows": str(rows), "cols": str(cols)}))
            write(out, f"plugin_{plugin}", f"{tag}-{short}-noshape", st_bytes(sub))

    for opts in ["blocksize=64,double_quant=0", "double_quant=1", "blocksize=4096", "", "blocksize=32,double_quant=1",
                 "blocksize=128", "double_quant=0,blocksize=64,double_quant=1"]:
        write(out, "quantizer_options", opts.replace("=", "-").replace(",", "_") or "none", opts)

    # two training steps: an adapter and a checkpoint
    data = os.path.join(work, "data.json")
    with open(data, "w") as f:
        json.dump([{"instruction": f"Say {w}.", "input": "", "output": f"{w} {w}"} for w in ["one", "two", "three"]], f)
    rdir = os.path.join(work, "run")
    run([qlora, "train", "--model", tiny, "--quantizer", "none", "--data", data, "--format", "alpaca", "--output", rdir,
         "--steps", "2", "--save-steps", "1", "--lora-r", "2", "--lora-alpha", "16", "--lora-dropout", "0",
         "--lora-modules", "all", "--batch-size", "1", "--grad-accum", "1", "--source-max-len", "24",
         "--target-max-len", "16", "--max-len", "64", "--quiet"])
    ckpt = os.path.join(rdir, "checkpoint-1")
    ad_cfg = open(os.path.join(ckpt, "adapter_config.json"), "rb").read()
    ad_st = open(os.path.join(ckpt, "adapter_model.safetensors"), "rb").read()
    run_cfg = open(os.path.join(rdir, "run_config.json"), "rb").read()
    write(out, "adapter", "trained", join(ad_cfg, ad_st, run_cfg))
    write(out, "adapter", "no-run-config", join(ad_cfg, ad_st))
    write(out, "safetensors", "adapter.safetensors", ad_st)
    peft = json.loads(open(os.path.join(SRC, "tests/reference/stories260K/adapter/adapter_config.json")).read())
    peft["r"] = 2
    peft["lora_alpha"] = 16.0
    peft["base_model_name_or_path"] = "tiny-model"
    write(out, "adapter", "peft-config", join(json.dumps(peft, indent=2), ad_st))
    q_only = dict(json.loads(ad_cfg), target_modules=["q_proj", "v_proj"])
    ad_tensors, _ = read_st(os.path.join(ckpt, "adapter_model.safetensors"))
    qv = {n: v for n, v in ad_tensors.items() if ".q_proj." in n or ".v_proj." in n}
    write(out, "adapter", "q-v-only", join(json.dumps(q_only), st_bytes(qv)))
    f16 = {n: ("F16", s, struct.pack(f"<{len(r) // 4}e", *struct.unpack(f"<{len(r) // 4}f", r)))
           for n, (d, s, r) in ad_tensors.items()}
    write(out, "adapter", "f16-weights", join(ad_cfg, st_bytes(f16), json.dumps({"quantizer": "nf4"})))

    state = json.loads(open(os.path.join(ckpt, "trainer_state.json")).read())
    state["config"] = CHECKPOINT_CONFIG
    opt_st = open(os.path.join(ckpt, "optimizer.safetensors"), "rb").read()
    write(out, "checkpoint", "checkpoint-1", join(json.dumps(state, indent=2), ad_st, opt_st))
    write(out, "checkpoint", "no-optimizer", join(json.dumps(state), ad_st))
    write(out, "safetensors", "optimizer.safetensors", opt_st)
    state2 = dict(state, tokens_seen=float(state["tokens_seen"]), lora_parameters=state["lora_parameters"] + 1)
    write(out, "checkpoint", "wrong-count", join(json.dumps(state2), ad_st, opt_st))


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    build, shared, out = (os.path.abspath(a) for a in sys.argv[1:])
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    tokenizer_seeds(out, shared)
    dataset_seeds(out, shared)
    mmlu_seeds(out, shared)
    with tempfile.TemporaryDirectory(prefix="qlora-seeds.") as work:
        model_seeds(out, build, shared, work)
    total = sum(len(fs) for _, _, fs in os.walk(out))
    print(f"make_seeds: {total} seeds in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
