#!/usr/bin/env python3
"""Write tests/reference/tokenizers/<model>/: tokenizer.json, tokenizer_config.json and
config.json built like those of LLaMA-3, Qwen2, Qwen2.5, Qwen3, Mistral v0.1 and Mistral v0.3,
and expected.json, what the Hugging Face `tokenizers` library produces with them, for
tests/test_tokenizer.c to compare core/tokenizer.c against.

    /work/venv/bin/python tests/reference/gen_tokenizer_models.py [--shared ../shared]

The Hub is not reachable here, so the real files cannot be used.  Each fixture rebuilds its
model's pipeline as the model ships it (normalizer, pre-tokenizer, BPE flags, decoder,
post-processor, added tokens and their flags, tokenizer_config.json fields), with a small
BPE vocabulary (a few thousand tokens) trained here by `tokenizers`' BpeTrainer on the
bundled data sets, so that merges are realistic.  Training is deterministic for the same data.

expected.json holds
  tricky   hand-picked strings (NFC, CJK, emoji, numbers, whitespace runs, contractions,
           the model's special tokens) with ids with and without special tokens and both
           decodes;
  sets     for each data set (see examples()): count, tokens, per example the low 32 bits
           of FNV-1a 64 of its ids with special tokens (8 hex digits each), one FNV-1a 64
           chain over the ids of all examples without special tokens, chains over the
           decodes (skip_special true and false, each decode followed by a 0 byte), and
           the indices of the examples whose round trip decode(encode(x, no special),
           keep special) is not x;
  chat     the model's chat markup (three parts: before the input, between input and
           output, after the output) that the set "oasst1_chat" wraps around every
           oasst1 (input, output) pair.
Nothing from the shared folder is copied, only hashes and counts.
"""
import argparse
import csv
import io
import json
import os
import struct
import sys
import unicodedata

import tokenizers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gen_tokenizer_ref as ref  # noqa: E402  (TRICKY, read_datasets, fnv1a, regexes)

OUT = os.path.join(HERE, "tokenizers")
BIG = 1000000000000000019884624838656  # model_max_length as transformers writes "no limit"

TRICKY = ref.TRICKY + [
    "e\u0301", "cafe\u0301 re\u0301sume\u0301 na\u0308ive", "\u212b \u2126 \u00c5 A\u030a", "q\u0307\u0323 q\u0323\u0307",
    "\u1100\u1161\u11a8 \ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8", "A\u0308\u0304 \u0344 \u0958", "\ufb01 \ufb00 \u2460 \uff21",
    "中文测试，你好！这是一个句子。", "日本語とカタカナとひらがなの文", "Ελληνικά κείμενα", "Tiếng Việt có dấu",
    "👨‍👩‍👧‍👦 👍🏽 🇯🇵 ❤️‍🔥 🧑🏿‍💻", "1234567890 12,345.67 -0.5e10 2024-01-31 3:45pm", "٣٤٥ ١٢ ४२ 一二三",
    "a \n\n  b\t\t\n c    \n", "\r\n\r\n", "    indented\n        code()\n\treturn x;",
    "I'M YOU'RE WE'VE THEY'LL SHE'D IT'S DON'T", "it\u2019s curly \u2019s 'S 'Ll",
    "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "x<|im_end|>\u0301y",
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>",
    "<|reserved_special_token_3|> <|end_of_text|>", "[INST] hi [/INST]", "[INST]hi[/INST] ok</s>",
    "<s>[INST] a [/INST] b</s>", "[control_9][TOOL_CALLS] [AVAILABLE_TOOLS]", "<think>\nok\n</think>\n\nyes",
    "<tool_call>{\"a\": 1}</tool_call>", "<|fim_prefix|>def f():<|fim_suffix|><|fim_middle|>",
]


# ---- data sets ----

def mmlu_examples(shared):
    """Every question of mmlu/dev and the first 20 of each mmlu/test file (files in name
    order), as "question\\nA. c0\\nB. c1\\nC. c2\\nD. c3\\nAnswer:"."""
    out = []
    for part, limit in (("dev", None), ("test", 20)):
        d = os.path.join(shared, "data", "mmlu", part)
        for name in sorted(os.listdir(d)):
            if not name.endswith(".csv"):
                continue
            with open(os.path.join(d, name), encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f))
            assert rows[0] == ["question", "choice0", "choice1", "choice2", "choice3", "answer"], name
            for r in rows[1:1 + limit if limit else None]:
                out.append("%s\nA. %s\nB. %s\nC. %s\nD. %s\nAnswer:" % tuple(r[:5]))
    return out


def examples(shared, chat):
    sets = [(name, ex) for name, _, _, ex in ref.read_datasets(shared)]
    sets.append(("mmlu", mmlu_examples(shared)))
    oasst = dict(sets)["oasst1"]
    pre, mid, post = chat
    sets.append(("oasst1_chat", [pre + oasst[i] + mid + oasst[i + 1] + post for i in range(0, len(oasst), 2)]))
    return sets


# ---- pipelines ----

LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"] +
                   ["<|reserved_special_token_%d|>" % i for i in range(3, 248)])
QWEN2_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True)]
QWEN25_ADDED = QWEN2_ADDED + [(t, True) for t in (
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")] + [
    ("<tool_call>", False), ("</tool_call>", False)] + [(t, False) for t in (
        "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")]
QWEN3_ADDED = QWEN25_ADDED + [("<tool_response>", False), ("</tool_response>", False), ("<think>", False),
                              ("</think>", False)]
MISTRAL3_CONTROL = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                    "[TOOL_RESULTS]", "[/TOOL_RESULTS]"] + ["[control_%d]" % i for i in range(8, 24)]
BYTES = ["<0x%02X>" % b for b in range(256)]


def added(id_, content, special=True, normalized=False):
    return {"id": id_, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": normalized, "special": special}


def training_corpus(shared):
    sets = [ex for _, _, _, ex in ref.read_datasets(shared)]
    return sets[0][:2500] + sets[1][:1500] + sets[2] + sets[3]


def bpe_json(tok):
    j = json.loads(tok.to_str())
    m = j["model"]
    return m["vocab"], m["merges"]


def train_bytelevel(corpus, regex, nfc, vocab_size):
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return bpe_json(tok)


def train_sentencepiece(corpus, specials, vocab_size):
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False, limit_alphabet=160,
                                  special_tokens=specials + BYTES)
    tok.train_from_iterator(corpus, trainer)
    return bpe_json(tok)


def split_regex(regex):
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def unreachable_words(corpus, vocab, merges, regex, count):
    """The `count` most frequent pre-tokenized words that the merges split into several
    tokens: added to the vocabulary without a merge, they are reached only through
    ignore_merges, as many of LLaMA 3's (tiktoken) tokens are."""
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in merges]))
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    freq = {}
    for text in corpus[:3000]:
        for w, _ in pre.pre_tokenize_str(text):
            freq[w] = freq.get(w, 0) + 1
    words = [w for w, _ in sorted(freq.items(), key=lambda x: (-x[1], x[0]))
             if w not in vocab and len(bpe.model.tokenize(w)) > 1]
    return words[:count]


def llama3(corpus):
    vocab, merges = train_bytelevel(corpus, ref.LLAMA3_RE, False, 3000)
    for w in unreachable_words(corpus, vocab, merges, ref.LLAMA3_RE, 64):
        vocab[w] = len(vocab)
    base = len(vocab)
    specials = {s: base + i for i, s in enumerate(LLAMA3_SPECIALS)}
    tj = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [added(i, s) for s, i in specials.items()],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            split_regex(ref.LLAMA3_RE),
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                      {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                      {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>",
                                                      "ids": [specials["<|begin_of_text|>"]],
                                                      "tokens": ["<|begin_of_text|>"]}}}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges}}
    cfg = {"added_tokens_decoder": {str(i): {k: v for k, v in added(i, s).items() if k != "id"}
                                    for s, i in specials.items()},
           "bos_token": "<|begin_of_text|>", "chat_template": "{{ bos_token }}...",
           "clean_up_tokenization_spaces": True, "eos_token": "<|eot_id|>",
           "model_input_names": ["input_ids", "attention_mask"], "model_max_length": BIG,
           "tokenizer_class": "PreTrainedTokenizerFast"}
    mcfg = {"architectures": ["LlamaForCausalLM"], "bos_token_id": specials["<|begin_of_text|>"],
            "eos_token_id": [specials["<|end_of_text|>"], specials["<|eom_id|>"], specials["<|eot_id|>"]],
            "model_type": "llama", "vocab_size": base + 256}
    chat = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
            "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>")
    return tj, cfg, mcfg, chat


def qwen(corpus, trained, added_list, think, max_len):
    vocab, merges = trained
    base = len(vocab)
    ids = {s: base + i for i, (s, _) in enumerate(added_list)}
    tj = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [added(ids[s], s, special=sp) for s, sp in added_list],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            split_regex(ref.QWEN2_RE),
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges}}
    cfg = {"add_bos_token": False, "add_prefix_space": False,
           "added_tokens_decoder": {str(ids[s]): {k: v for k, v in added(ids[s], s, special=sp).items() if k != "id"}
                                    for s, sp in added_list},
           "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
           "chat_template": "...", "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
           "errors": "replace", "model_max_length": max_len, "pad_token": "<|endoftext|>",
           "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    mcfg = {"architectures": ["Qwen2ForCausalLM"], "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"], "model_type": "qwen2", "vocab_size": base + len(added_list)}
    chat = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
            "<|im_end|>\n<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if think else ""), "<|im_end|>\n")
    return tj, cfg, mcfg, chat


SP_DECODER = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
    {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}


def mistral(corpus, v3):
    specials = ["<unk>", "<s>", "</s>"] + (MISTRAL3_CONTROL if v3 else [])
    vocab, merges = train_sentencepiece(corpus, specials, 3000)
    tj = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [added(vocab[s], s) for s in specials],
        "normalizer": None if v3 else {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
                          "split": False} if v3 else None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": SP_DECODER,  # transformers' LlamaConverter writes this one for legacy and non-legacy
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges}}
    cfg = {"add_bos_token": True, "add_eos_token": False, "add_prefix_space": None,
           "added_tokens_decoder": {str(vocab[s]): {k: v for k, v in added(vocab[s], s).items() if k != "id"}
                                    for s in specials},
           "additional_special_tokens": [], "bos_token": "<s>", "chat_template": "...",
           "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": not v3,
           "model_max_length": BIG, "pad_token": None, "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
           "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False}
    mcfg = {"architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "model_type": "mistral",
            "vocab_size": len(vocab)}
    chat = ("<s>[INST] ", "[/INST] " if v3 else " [/INST]", "</s>")
    return tj, cfg, mcfg, chat


# ---- reference ----

def fnv_chain(h, data):
    return ref.fnv1a(data, h)


def expected(tok, sets, chat, note):
    out = {"generator": "tests/reference/gen_tokenizer_models.py", "tokenizers_version": tokenizers.__version__,
           "pipeline": note, "hash": "FNV-1a 64 over the bytes of the little-endian int32 ids", "chat": list(chat)}
    out["tricky"] = []
    for s in TRICKY:
        e = tok.encode(s, add_special_tokens=True)
        out["tricky"].append({"text": s, "ids": e.ids, "ids_plain": tok.encode(s, add_special_tokens=False).ids,
                              "decoded": tok.decode(e.ids, skip_special_tokens=True),
                              "decoded_special": tok.decode(e.ids, skip_special_tokens=False)})
    out["sets"] = []
    for name, ex in sets:
        encs = tok.encode_batch(ex, add_special_tokens=True)
        plain = tok.encode_batch(ex, add_special_tokens=False)
        hp = dh = dsh = ref.FNV_OFFSET
        differs = []
        for i, (e, p) in enumerate(zip(encs, plain)):
            hp = fnv_chain(hp, ref.ids_bytes(p.ids))
            dh = fnv_chain(dh, tok.decode(e.ids, skip_special_tokens=True).encode("utf-8") + b"\0")
            dsh = fnv_chain(dsh, tok.decode(e.ids, skip_special_tokens=False).encode("utf-8") + b"\0")
            if tok.decode(p.ids, skip_special_tokens=False) != ex[i]:
                differs.append(i)
        out["sets"].append({
            "name": name, "count": len(ex), "tokens": sum(len(e.ids) for e in encs),
            "hashes": "".join("%08x" % (ref.fnv1a(ref.ids_bytes(e.ids)) & 0xFFFFFFFF) for e in encs),
            "hash_plain": "%016x" % hp, "decode_hash": "%016x" % dh, "decode_special_hash": "%016x" % dsh,
            "roundtrip_differs": differs})
    return out


def check_transformers(dirname, tok):
    """transformers' AutoTokenizer on the fixture folder gives the library's ids (a check of the
    tokenizer_config.json fields, not written anywhere)."""
    try:
        from transformers import AutoTokenizer
    except Exception as e:  # pragma: no cover
        print("  (transformers not available: %s)" % e, file=sys.stderr)
        return
    hf = AutoTokenizer.from_pretrained(dirname)
    bad = 0
    for s in TRICKY:
        if hf(s)["input_ids"] != tok.encode(s).ids:
            bad += 1
    print("  transformers %s: %d of %d tricky strings differ" % (type(hf).__name__, bad, len(TRICKY)),
          file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=os.path.join(HERE, "..", "..", "..", "shared"))
    ap.add_argument("--only", help="one fixture name")
    args = ap.parse_args()
    corpus = training_corpus(args.shared)
    qwen_trained = None

    fixtures = {
        "llama3": lambda: llama3(corpus),
        "qwen2": lambda: qwen(corpus, qwen_vocab(), QWEN2_ADDED, False, 32768),
        "qwen2.5": lambda: qwen(corpus, qwen_vocab(), QWEN25_ADDED, False, 131072),
        "qwen3": lambda: qwen(corpus, qwen_vocab(), QWEN3_ADDED, True, 131072),
        "mistral-v0.1": lambda: mistral(corpus, False),
        "mistral-v0.3": lambda: mistral(corpus, True),
    }

    def qwen_vocab():
        nonlocal qwen_trained
        if qwen_trained is None:
            qwen_trained = train_bytelevel(corpus, ref.QWEN2_RE, True, 3000)
        return qwen_trained

    notes = {
        "llama3": "LLaMA 3.x: no normalizer; Split(LLaMA-3 regex, Isolated) + ByteLevel(no prefix, no regex); BPE "
                  "ignore_merges (64 vocabulary words no merge reaches); post Sequence[ByteLevel, Template <|begin_of_text|> $A]; decoder ByteLevel",
        "qwen2": "Qwen2: NFC; Split(Qwen2 regex, Isolated) + ByteLevel; BPE; post and decoder ByteLevel",
        "qwen2.5": "Qwen2.5: as Qwen2, with the Qwen2.5 added tokens (some not special)",
        "qwen3": "Qwen3: as Qwen2.5, plus <think> </think> <tool_response> (not special)",
        "mistral-v0.1": "Mistral v0.1 / LLaMA 2: normalizer Prepend(\u2581) + Replace(' ' -> \u2581); no pre-tokenizer; "
                        "BPE byte_fallback fuse_unk; decoder Replace/ByteFallback/Fuse/Strip; Template <s> $A",
        "mistral-v0.3": "Mistral v0.3: no normalizer; Metaspace(prepend first, no split); decoder as v0.1; control tokens "
                        "[INST] ... as special added tokens; BPE byte_fallback fuse_unk; Template <s> $A",
    }
    for name, build in fixtures.items():
        if args.only and name != args.only:
            continue
        tj, cfg, mcfg, chat = build()
        d = os.path.join(OUT, name)
        os.makedirs(d, exist_ok=True)
        text = json.dumps(tj, ensure_ascii=False, separators=(",", ":"))
        with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(text + "\n")
        for fn, obj in (("tokenizer_config.json", cfg), ("config.json", mcfg)):
            with open(os.path.join(d, fn), "w", encoding="utf-8") as f:
                json.dump(obj, f, ensure_ascii=False, indent=1)
                f.write("\n")
        tok = Tokenizer.from_str(text)
        sets = examples(args.shared, chat)
        exp = expected(tok, sets, chat, notes[name])
        with open(os.path.join(d, "expected.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(exp, ensure_ascii=False, separators=(",", ":")) + "\n")
        print("%-13s vocab %d + %d added; %s" % (name, len(tj["model"]["vocab"]), len(tj["added_tokens"]),
              ", ".join("%s %d/%d tok, %d rt-diff" % (s["name"], s["count"], s["tokens"], len(s["roundtrip_differs"]))
                        for s in exp["sets"])), file=sys.stderr)
        check_transformers(d, tok)


if __name__ == "__main__":
    main()
