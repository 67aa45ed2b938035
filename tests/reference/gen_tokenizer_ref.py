#!/usr/bin/env python3
"""Write tests/reference/tokenizer_stories260K.json: what the Hugging Face `tokenizers`
library (Rust) produces, for tests/test_tokenizer.c to compare core/tokenizer.c against.

    pip install tokenizers
    python3 tests/reference/gen_tokenizer_ref.py [--shared ../shared] [--out FILE]

The file holds
  tricky    hand-picked strings with their ids (with and without special tokens) and
            decodes, for stories260K's tokenizer.json;
  datasets  for every example of the bundled data sets (see read_datasets for how each
            set is cut into examples): the FNV-1a 64 hash of its ids (with special
            tokens; bytes of the little-endian int32 ids) and its token count, plus one
            FNV-1a 64 hash of all decodes (skip_special_tokens, each decode followed by
            a 0 byte);
  variants  tokenizer.json files derived from stories260K's (Metaspace pre-tokenizers,
            string merges, unk without byte fallback, extra added tokens, ...) and from
            a small byte-level BPE trained here (GPT-2 / LLaMA-3 / Qwen2 regexes), each
            described as a patch (see apply_patch), with the tricky strings' ids and one
            hash over all data-set examples;
  bytelevel_tokenizer  that trained byte-level tokenizer.json.
Nothing from the shared folder is copied, only hashes and counts.
"""
import argparse
import copy
import json
import os
import struct
import sys

import tokenizers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = os.path.dirname(os.path.abspath(__file__))

TRICKY = [
    "", " ", "  ", "   ", "hello", " hello", "hello ", "  hello  world  ", "a  b", "a\tb", "\n", "\t",
    "line one\nline two\n\nline four\r\n", "tab\tsep\tvalues\t", "é", "café crème brûlée", "日本語",
    "日本語のテキスト", "😀", "I ❤️ emoji 👍🏽 🇫🇷", "<s>", "</s>", "<unk>", "<s>hello</s>", "hi<s>there",
    "hi </s> there", " <s> ", "<<s>>", "</s", "<s", "<s><s></s>", "0123456789", "3.14159 2,718 1e-9 42%",
    "!!!???...,,,;;;", "--==++**&&^^%%$$##@@", "\"quoted\" 'single' `back`", "(a[b{c}d]e)",
    "Supercalifragilisticexpialidocious" * 3, "Once upon a time, there was a little girl named Lily.",
    "don't I'm we'll you've they're it's he'd", "DON'T I'M WE'LL", "Ж щ Привет мир", "مرحبا بالعالم",
    "नमस्ते", "a\u00a0b\u3000c\u2028d", "zero\u200dwidth\u200cjoin", "\u2581", "\u2581\u2581a", "a\u2581",
    "a\x00b", "x\x7fy", "[INST] hi [/INST] ok", "x   [/INST]   y", "the cat sat", "hot dog", "hotdog",
    "abcd", "a <|pad|> b", "<|begin_of_text|>Hi<|eot_id|>", "ſ 's 'ſ 'S", "ǅ ʰ ² ½ Ⅻ ٣ २",
    "\U0001B132 \U00011F04 \U0001E030", "end with spaces   ", "   start with spaces",
]

# ---- FNV-1a over little-endian int32 ids ----

FNV_OFFSET, FNV_PRIME, MASK = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1


def fnv1a(data, h=FNV_OFFSET):
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & MASK
    return h


def ids_bytes(ids):
    return struct.pack("<%di" % len(ids), *ids)


# ---- the bundled data sets, cut into examples exactly as the C test does ----

ASCII_SPACE = " \t\r\n\v\f"


def text_examples(text):
    """Runs of lines separated by blank lines (as core/dataset.c reads text files), each stripped."""
    examples, cur = [], []
    for line in text.split("\n") + [""]:
        if line.strip(ASCII_SPACE):
            cur.append(line)
        elif cur:
            examples.append("\n".join(cur).strip(ASCII_SPACE))
            cur = []
    return examples


def read_datasets(shared):
    data = os.path.join(shared, "data")
    sets = []
    with open(os.path.join(data, "tinystories", "validation.txt"), encoding="utf-8", newline="") as f:
        text = f.read()
    sets.append(("tinystories", "data/tinystories/validation.txt",
                 "runs of lines between blank (empty or whitespace-only) lines, joined by \\n, stripped; "
                 "whitespace = ' \\t\\r\\n\\v\\f'", text_examples(text)))
    with open(os.path.join(data, "alpaca", "alpaca_en_demo.json"), encoding="utf-8") as f:
        rows = json.load(f)
    sets.append(("alpaca", "data/alpaca/alpaca_en_demo.json",
                 "per record: instruction, input, output (as they are, empty ones included)",
                 [r[k] for r in rows for k in ("instruction", "input", "output")]))
    with open(os.path.join(data, "oasst1", "oasst1_validation.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(l) for l in f if l.strip()]
    sets.append(("oasst1", "data/oasst1/oasst1_validation.jsonl", "per line: input, output",
                 [r[k] for r in rows for k in ("input", "output")]))
    with open(os.path.join(data, "self-instruct", "user_oriented_instructions.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(l) for l in f if l.strip()]
    ex = []
    for r in rows:
        ex.append(r["instruction"])
        for inst in r["instances"]:
            ex += [inst["input"], inst["output"]]
    sets.append(("self-instruct", "data/self-instruct/user_oriented_instructions.jsonl",
                 "per line: instruction, then input and output of every instance", ex))
    return sets


def decode_hash(tok, encodings):
    h = FNV_OFFSET
    for e in encodings:
        h = fnv1a(tok.decode(e.ids, skip_special_tokens=True).encode("utf-8") + b"\0", h)
    return h


# ---- variants ----

def added(content, special=False, normalized=None, lstrip=False, rstrip=False, single_word=False):
    return {"id": 0, "content": content, "single_word": single_word, "lstrip": lstrip, "rstrip": rstrip,
            "normalized": (not special) if normalized is None else normalized, "special": special}


SP_DECODER = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
    {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def meta(scheme, split, legacy=False):
    if legacy:
        return {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True}
    return {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": scheme, "split": split}


VARIANTS = [
    # LLaMA-2 (recent exports) and Mistral: no normalizer, Metaspace "first" without split
    {"name": "metaspace_first", "base": "stories260K",
     "set": {"normalizer": None, "pre_tokenizer": meta("first", False), "decoder": SP_DECODER}},
    {"name": "metaspace_always_split", "base": "stories260K",
     "set": {"normalizer": None, "pre_tokenizer": meta("always", True), "decoder": meta("always", True)}},
    {"name": "metaspace_legacy", "base": "stories260K",
     "set": {"normalizer": None, "pre_tokenizer": meta(None, None, True), "decoder": meta(None, None, True)}},
    {"name": "metaspace_never", "base": "stories260K",
     "set": {"normalizer": None, "pre_tokenizer": meta("never", True), "decoder": meta("never", True)}},
    {"name": "string_merges", "base": "stories260K", "merges_as_strings": True},
    {"name": "unk_fused", "base": "stories260K", "model": {"byte_fallback": False}, "set": {"decoder": None}},
    {"name": "unk_unfused", "base": "stories260K", "model": {"byte_fallback": False, "fuse_unk": False}},
    {"name": "no_unk", "base": "stories260K", "model": {"byte_fallback": False, "unk_token": None, "dropout": 0.0}},
    {"name": "partial_bytes", "base": "stories260K", "vocab_delete": ["<0xE6>", "<0xC3>"]},
    {"name": "partial_bytes_unfused", "base": "stories260K", "vocab_delete": ["<0xE6>"],
     "model": {"fuse_unk": False}},
    {"name": "ignore_merges", "base": "stories260K", "model": {"ignore_merges": True}},
    {"name": "added_tokens", "base": "stories260K", "added_tokens_append": [
        added("[INST]", special=True), added("[/INST]", special=True, lstrip=True, rstrip=True),
        added("the cat"), added("dog", normalized=False, single_word=True),
        added("<|pad|>", special=True, normalized=True), added("ab", normalized=False),
        added("abc", normalized=False)]},
    {"name": "eos_template", "base": "stories260K", "set": {"post_processor": {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "</s>", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
                           "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}}}},
    {"name": "bare", "base": "stories260K", "set": {"decoder": None, "post_processor": None}},
    {"name": "bytelevel_llama3", "base": "bytelevel"},
    {"name": "bytelevel_qwen2", "base": "bytelevel", "set": {"pre_tokenizer": {
        "type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_RE}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}}},
    {"name": "bytelevel_gpt2", "base": "bytelevel", "model": {"ignore_merges": False},
     "set": {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                               "use_regex": True},
             "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                                "use_regex": True}}},
    {"name": "bytelevel_gpt2_split_prefix", "base": "bytelevel", "model": {"ignore_merges": False},
     "set": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
         {"type": "Split", "pattern": {"Regex": GPT2_RE}, "behavior": "Isolated", "invert": False},
         {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": False}]}}},
]


def apply_patch(base, v):
    """The patch format test_tokenizer.c applies too."""
    j = copy.deepcopy(base)
    for k, val in v.get("set", {}).items():
        j[k] = val
    for k, val in v.get("model", {}).items():
        j["model"][k] = val
    for tok in v.get("vocab_delete", []):
        del j["model"]["vocab"][tok]
    if v.get("merges_as_strings"):
        j["model"]["merges"] = [a + " " + b for a, b in j["model"]["merges"]]
    j["added_tokens"] = j.get("added_tokens", []) + v.get("added_tokens_append", [])
    return j


def train_bytelevel(sets):
    """A small LLaMA-3-style byte-level BPE (deterministic for the same data)."""
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_RE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=specials, show_progress=False)
    corpus = sets[0][3][:1500] + sets[2][3][1:1200:2]  # stories + oasst1 answers (many languages)
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    return json.loads(tok.to_str())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=os.path.join(HERE, "..", "..", "..", "shared"))
    ap.add_argument("--out", default=os.path.join(HERE, "tokenizer_stories260K.json"))
    args = ap.parse_args()

    tj_path = os.path.join(args.shared, "models", "stories260K", "tokenizer.json")
    tok = Tokenizer.from_file(tj_path)
    with open(tj_path, encoding="utf-8") as f:
        sp_base = json.load(f)
    sets = read_datasets(args.shared)

    ref = {"generator": "tests/reference/gen_tokenizer_ref.py", "tokenizers_version": tokenizers.__version__,
           "tokenizer": "models/stories260K/tokenizer.json",
           "hash": "FNV-1a 64 over the bytes of the little-endian int32 ids, as 16 hex digits"}

    ref["tricky"] = []
    for s in TRICKY:
        e = tok.encode(s, add_special_tokens=True)
        ref["tricky"].append({
            "text": s, "ids": e.ids, "ids_plain": tok.encode(s, add_special_tokens=False).ids,
            "decoded": tok.decode(e.ids, skip_special_tokens=True),
            "decoded_special": tok.decode(e.ids, skip_special_tokens=False)})

    ref["datasets"] = []
    for name, path, how, examples in sets:
        encs = tok.encode_batch(examples, add_special_tokens=True)
        ref["datasets"].append({
            "name": name, "path": path, "examples_are": how, "count": len(examples),
            "hashes": "".join("%016x" % fnv1a(ids_bytes(e.ids)) for e in encs),
            "lengths": [len(e.ids) for e in encs],
            "decode_hash": "%016x" % decode_hash(tok, encs)})
        print("%-14s %5d examples, %8d tokens" % (name, len(examples), sum(len(e.ids) for e in encs)),
              file=sys.stderr)

    bl_base = train_bytelevel(sets)
    ref["bytelevel_tokenizer"] = bl_base
    all_examples = [x for s in sets for x in s[3]]
    ref["variants"] = []
    for v in VARIANTS:
        j = apply_patch(sp_base if v["base"] == "stories260K" else bl_base, v)
        vt = Tokenizer.from_str(json.dumps(j))
        out = dict(v)
        out["tricky"] = []
        for s in TRICKY:
            e = vt.encode(s, add_special_tokens=True)
            out["tricky"].append({"ids": e.ids, "decoded": vt.decode(e.ids, skip_special_tokens=True)})
        encs = vt.encode_batch(all_examples, add_special_tokens=True)
        h = FNV_OFFSET
        for e in encs:
            h = fnv1a(ids_bytes(e.ids), h)
        out["data"] = {"examples": len(encs), "tokens": sum(len(e.ids) for e in encs), "hash": "%016x" % h,
                       "decode_hash": "%016x" % decode_hash(vt, encs)}
        ref["variants"].append(out)
        print("variant %-28s %8d tokens" % (v["name"], out["data"]["tokens"]), file=sys.stderr)

    text = json.dumps(ref, ensure_ascii=False, separators=(",", ":"))
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print("wrote %s (%d bytes)" % (args.out, len(text.encode("utf-8")) + 1), file=sys.stderr)


if __name__ == "__main__":
    main()
