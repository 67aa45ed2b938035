/* Tokenizer for Hugging Face tokenizer.json files of the BPE kind.
 *
 * Produces the ids the Hugging Face `tokenizers` library produces, and decodes
 * as it does, for:
 *  - SentencePiece-style BPE (LLaMA-2, Mistral v0.1 and v0.3, stories260K):
 *    normalizers Prepend / Replace(String) / Sequence, pre-tokenizer null or Metaspace,
 *    byte_fallback "<0xNN>" tokens, fuse_unk, decoders Replace / ByteFallback /
 *    Fuse / Strip / Metaspace;
 *  - byte-level BPE (GPT-2, LLaMA-3.x, Qwen2 / 2.5 / 3): pre-tokenizer ByteLevel,
 *    alone or after a Split with the GPT-2, LLaMA-3 or Qwen2 regex, the NFC
 *    normalizer (through utf8proc, Unicode 15; the library's tables are older,
 *    so marks added since Unicode 11 compose or reorder as utf8proc says),
 *    ignore_merges, and the ByteLevel decoder.
 * Added tokens (special or not, normalized or not, lstrip / rstrip /
 * single_word) are matched in the text as the library matches them.  Anything
 * else (Unigram, WordPiece, NFD / NFKC, arbitrary regexes, BPE dropout, and any
 * field of a component that is not one of its known fields) fails to load
 * with QL_ENOTSUP and a message naming the unsupported type or field.  The
 * file's "truncation" and "padding" settings are ignored (callers cut and pad).
 * tests/reference/tokenizers/ holds tokenizers built like those of LLaMA 3,
 * Qwen2 / 2.5 / 3 and Mistral v0.1 / v0.3, checked id for id on the bundled data.
 *
 * Loading reads tokenizer.json and, when present, tokenizer_config.json
 * (bos_token, eos_token, add_bos_token, add_eos_token; split_special_tokens
 * true and an add_prefix_space that differs from tokenizer.json's are refused,
 * as transformers would give other ids; clean_up_tokenization_spaces is a
 * transformers decode step that decode does not apply) and config.json
 * (bos_token_id, eos_token_id).  A loaded tokenizer is read-only: encode and
 * decode may run from several threads at once. */
#ifndef QLORA_TOKENIZER_H
#define QLORA_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ql_tokenizer ql_tokenizer;

/* `model_dir` is a folder holding tokenizer.json (plus the optional
 * tokenizer_config.json and config.json), or the path of a tokenizer.json
 * file itself (then no config files are read). */
int ql_tokenizer_load(const char *model_dir, ql_tokenizer **out);
void ql_tokenizer_destroy(ql_tokenizer *t); /* NULL ok */

/* Encode `len` bytes of UTF-8 text (NUL bytes are ordinary characters).
 * `add_special` adds what the post-processor adds (BOS for LLaMA); when
 * tokenizer_config.json sets add_bos_token / add_eos_token, those decide, as
 * transformers' LlamaTokenizerFast does.  Bytes that are not valid UTF-8 go
 * through byte fallback one by one (byte-level models take any byte); with a
 * model that has neither, such text is refused with QL_EINVAL.
 * On success *ids is malloc'ed (caller frees; non-NULL even when *n is 0). */
int ql_tokenizer_encode(const ql_tokenizer *t, const char *text, size_t len, int add_special, int32_t **ids,
                        size_t *n);

/* Decode ids to a malloc'ed, NUL-terminated string (caller frees).  Like the
 * library, ids that name no token are skipped and `skip_special` drops special
 * added tokens (<s>, </s>, ...). */
int ql_tokenizer_decode(const ql_tokenizer *t, const int32_t *ids, size_t n, int skip_special, char **text);
/* The same, also giving the length: the text holds a NUL byte where <0x00> was decoded. */
int ql_tokenizer_decode_len(const ql_tokenizer *t, const int32_t *ids, size_t n, int skip_special, char **text,
                            size_t *len);

/* -1 when unknown. */
int32_t ql_tokenizer_bos(const ql_tokenizer *t);
int32_t ql_tokenizer_eos(const ql_tokenizer *t);
/* One past the largest id of the model vocabulary and the added tokens. */
size_t ql_tokenizer_vocab_size(const ql_tokenizer *t);
/* The token text of `id` (an added token's content, else the model piece, for
 * example "▁the" or "<0x0A>"); NULL when `id` names no token. */
const char *ql_tokenizer_piece(const ql_tokenizer *t, int32_t id);
/* Id of a token text (added tokens first, then the model vocabulary); -1 if absent. */
int32_t ql_tokenizer_token_id(const ql_tokenizer *t, const char *piece);

#ifdef __cplusplus
}
#endif
#endif
