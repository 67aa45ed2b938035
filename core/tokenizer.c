/* BPE tokenizer that reproduces Hugging Face `tokenizers` (Rust) for
 * tokenizer.json files of the SentencePiece-BPE kind (LLaMA-2, Mistral) and of
 * the byte-level kind (GPT-2, LLaMA-3).
 *
 * The encode pipeline mirrors the library step by step, because its quirks are
 * what the ids depend on:
 *   1. added tokens that are not `normalized` are cut out of the raw text
 *      (leftmost-longest, honouring lstrip / rstrip / single_word);
 *   2. every other segment is normalized (Prepend, Replace), then added tokens
 *      that are `normalized` are cut out of the normalized text;
 *   3. the pre-tokenizer (Metaspace, Split, ByteLevel) splits the rest into words;
 *   4. each word goes through BPE: one symbol per character (or its <0xNN>
 *      bytes, or <unk>), then merges by rank with a heap exactly as
 *      tokenizers::models::bpe::Word::merge_all does;
 *   5. the post-processor adds BOS/EOS.
 * Source references are to huggingface/tokenizers, tokenizers/src/. */
#include "qlora/tokenizer.h"

#include <jansson.h>
#include <stdint.h>
#include <utf8proc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json_out.h"
#include "qlora/error.h"
#include "qlora/fs.h"

/* ------------------------------------------------------------------------ */
/* Growable buffers                                                          */

typedef struct sbuf {
    char *p;
    size_t len, cap;
} sbuf;

static int sb_reserve(sbuf *b, size_t extra)
{
    if (b->len + extra + 1 <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static int sb_add(sbuf *b, const void *s, size_t n)
{
    if (sb_reserve(b, n)) return -1;
    if (n) memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

typedef struct ivec {
    int32_t *p;
    size_t len, cap;
} ivec;

static int iv_push(ivec *v, int32_t x)
{
    if (v->len == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 256;
        int32_t *p = realloc(v->p, cap * sizeof *p);
        if (!p) return -1;
        v->p = p;
        v->cap = cap;
    }
    v->p[v->len++] = x;
    return 0;
}

/* Grow an array of `elem`-sized items to hold at least `need`. */
static int grow(void **arr, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    void *p = realloc(*arr, c * elem);
    if (!p) return -1;
    *arr = p;
    *cap = c;
    return 0;
}

/* A list of strings kept in one buffer: pieces of text, or decoder tokens. */
typedef struct span {
    size_t off, len;
    int first; /* starts at original offset 0 (Metaspace prepend_scheme "first") */
} span;

typedef struct slist {
    sbuf text;
    span *it;
    size_t n, cap;
} slist;

static void sl_clear(slist *l)
{
    l->text.len = 0;
    l->n = 0;
}

static int sl_push(slist *l, const char *s, size_t n, int first)
{
    if (grow((void **)&l->it, &l->cap, l->n + 1, sizeof *l->it)) return -1;
    size_t off = l->text.len;
    if (sb_add(&l->text, s, n)) return -1;
    l->it[l->n++] = (span){off, n, first};
    return 0;
}

/* Start an empty item to be filled with sl_append. */
static int sl_open(slist *l, int first)
{
    if (grow((void **)&l->it, &l->cap, l->n + 1, sizeof *l->it)) return -1;
    if (sb_reserve(&l->text, 0)) return -1;
    l->it[l->n++] = (span){l->text.len, 0, first};
    return 0;
}

static int sl_append(slist *l, const char *s, size_t n)
{
    if (sb_add(&l->text, s, n)) return -1;
    l->it[l->n - 1].len += n;
    return 0;
}

static void sl_free(slist *l)
{
    free(l->text.p);
    free(l->it);
}

/* ------------------------------------------------------------------------ */
/* UTF-8 and Unicode classes                                                 */

/* Length of the well-formed UTF-8 sequence at s (Rust's str rules), or 0. */
static int utf8_len(const unsigned char *s, size_t n, uint32_t *cp)
{
    unsigned c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    if (c < 0xC2 || c > 0xF4) return 0;
    if (c < 0xE0) {
        if (n < 2 || (s[1] & 0xC0) != 0x80) return 0;
        *cp = ((c & 0x1Fu) << 6) | (s[1] & 0x3Fu);
        return 2;
    }
    unsigned lo = 0x80, hi = 0xBF;
    if (c == 0xE0) lo = 0xA0;
    else if (c == 0xED) hi = 0x9F;
    else if (c == 0xF0) lo = 0x90;
    else if (c == 0xF4) hi = 0x8F;
    if (n < 2 || s[1] < lo || s[1] > hi) return 0;
    if (c < 0xF0) {
        if (n < 3 || (s[2] & 0xC0) != 0x80) return 0;
        *cp = ((c & 0x0Fu) << 12) | ((s[1] & 0x3Fu) << 6) | (s[2] & 0x3Fu);
        return 3;
    }
    if (n < 4 || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80) return 0;
    *cp = ((c & 0x07u) << 18) | ((s[1] & 0x3Fu) << 12) | ((s[2] & 0x3Fu) << 6) | (s[3] & 0x3Fu);
    return 4;
}

/* Length of one character at s; an invalid byte counts as a 1-byte character
 * with code point UINT32_MAX. */
static int char_at(const char *s, size_t n, uint32_t *cp)
{
    int l = utf8_len((const unsigned char *)s, n, cp);
    if (l) return l;
    *cp = UINT32_MAX;
    return 1;
}

/* Length of the maximal ill-formed subpart at s (what from_utf8_lossy replaces
 * by one U+FFFD); s does not start a well-formed sequence. */
static int utf8_bad_len(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    if (c < 0xC2 || c > 0xF4) return 1;
    int need = c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    unsigned lo = 0x80, hi = 0xBF;
    if (c == 0xE0) lo = 0xA0;
    else if (c == 0xED) hi = 0x9F;
    else if (c == 0xF0) lo = 0x90;
    else if (c == 0xF4) hi = 0x8F;
    int k = 1;
    if ((size_t)k < n && s[k] >= lo && s[k] <= hi) {
        k++;
        while (k < need && (size_t)k < n && (s[k] & 0xC0) == 0x80) k++;
    }
    return k;
}

static int utf8_valid(const char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        int l = utf8_len((const unsigned char *)s + i, n - i, &cp);
        if (!l) return 0;
        i += (size_t)l;
    }
    return 1;
}

static int utf8_put(char *out, uint32_t cp)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

enum { UC_L = 1, UC_N = 2, UC_W = 4 };

/* Code points from U+0080 up with their classes: UC_L matches \p{L}, UC_N
 * \p{N}, UC_W \w.  Read out of the regex engine of tokenizers 0.23.3
 * (Oniguruma, Unicode 16) by matching those classes against every code point,
 * so letters new in recent Unicode versions split as the library splits them. */
static const struct uc_range {
    uint32_t lo, hi;
    uint8_t cls;
} uc_ranges[] = {
    {0xAA,0xAA,5},{0xB2,0xB3,2},{0xB5,0xB5,5},{0xB9,0xB9,2},{0xBA,0xBA,5},{0xBC,0xBE,2},{0xC0,0xD6,5},
    {0xD8,0xF6,5},{0xF8,0x2C1,5},{0x2C6,0x2D1,5},{0x2E0,0x2E4,5},{0x2EC,0x2EC,5},{0x2EE,0x2EE,5},{0x300,0x36F,4},
    {0x370,0x374,5},{0x376,0x377,5},{0x37A,0x37D,5},{0x37F,0x37F,5},{0x386,0x386,5},{0x388,0x38A,5},
    {0x38C,0x38C,5},{0x38E,0x3A1,5},{0x3A3,0x3F5,5},{0x3F7,0x481,5},{0x483,0x489,4},{0x48A,0x52F,5},
    {0x531,0x556,5},{0x559,0x559,5},{0x560,0x588,5},{0x591,0x5BD,4},{0x5BF,0x5BF,4},{0x5C1,0x5C2,4},
    {0x5C4,0x5C5,4},{0x5C7,0x5C7,4},{0x5D0,0x5EA,5},{0x5EF,0x5F2,5},{0x610,0x61A,4},{0x620,0x64A,5},
    {0x64B,0x65F,4},{0x660,0x669,6},{0x66E,0x66F,5},{0x670,0x670,4},{0x671,0x6D3,5},{0x6D5,0x6D5,5},
    {0x6D6,0x6DC,4},{0x6DF,0x6E4,4},{0x6E5,0x6E6,5},{0x6E7,0x6E8,4},{0x6EA,0x6ED,4},{0x6EE,0x6EF,5},
    {0x6F0,0x6F9,6},{0x6FA,0x6FC,5},{0x6FF,0x6FF,5},{0x710,0x710,5},{0x711,0x711,4},{0x712,0x72F,5},
    {0x730,0x74A,4},{0x74D,0x7A5,5},{0x7A6,0x7B0,4},{0x7B1,0x7B1,5},{0x7C0,0x7C9,6},{0x7CA,0x7EA,5},
    {0x7EB,0x7F3,4},{0x7F4,0x7F5,5},{0x7FA,0x7FA,5},{0x7FD,0x7FD,4},{0x800,0x815,5},{0x816,0x819,4},
    {0x81A,0x81A,5},{0x81B,0x823,4},{0x824,0x824,5},{0x825,0x827,4},{0x828,0x828,5},{0x829,0x82D,4},
    {0x840,0x858,5},{0x859,0x85B,4},{0x860,0x86A,5},{0x870,0x887,5},{0x889,0x88E,5},{0x897,0x89F,4},
    {0x8A0,0x8C9,5},{0x8CA,0x8E1,4},{0x8E3,0x903,4},{0x904,0x939,5},{0x93A,0x93C,4},{0x93D,0x93D,5},
    {0x93E,0x94F,4},{0x950,0x950,5},{0x951,0x957,4},{0x958,0x961,5},{0x962,0x963,4},{0x966,0x96F,6},
    {0x971,0x980,5},{0x981,0x983,4},{0x985,0x98C,5},{0x98F,0x990,5},{0x993,0x9A8,5},{0x9AA,0x9B0,5},
    {0x9B2,0x9B2,5},{0x9B6,0x9B9,5},{0x9BC,0x9BC,4},{0x9BD,0x9BD,5},{0x9BE,0x9C4,4},{0x9C7,0x9C8,4},
    {0x9CB,0x9CD,4},{0x9CE,0x9CE,5},{0x9D7,0x9D7,4},{0x9DC,0x9DD,5},{0x9DF,0x9E1,5},{0x9E2,0x9E3,4},
    {0x9E6,0x9EF,6},{0x9F0,0x9F1,5},{0x9F4,0x9F9,2},{0x9FC,0x9FC,5},{0x9FE,0x9FE,4},{0xA01,0xA03,4},
    {0xA05,0xA0A,5},{0xA0F,0xA10,5},{0xA13,0xA28,5},{0xA2A,0xA30,5},{0xA32,0xA33,5},{0xA35,0xA36,5},
    {0xA38,0xA39,5},{0xA3C,0xA3C,4},{0xA3E,0xA42,4},{0xA47,0xA48,4},{0xA4B,0xA4D,4},{0xA51,0xA51,4},
    {0xA59,0xA5C,5},{0xA5E,0xA5E,5},{0xA66,0xA6F,6},{0xA70,0xA71,4},{0xA72,0xA74,5},{0xA75,0xA75,4},
    {0xA81,0xA83,4},{0xA85,0xA8D,5},{0xA8F,0xA91,5},{0xA93,0xAA8,5},{0xAAA,0xAB0,5},{0xAB2,0xAB3,5},
    {0xAB5,0xAB9,5},{0xABC,0xABC,4},{0xABD,0xABD,5},{0xABE,0xAC5,4},{0xAC7,0xAC9,4},{0xACB,0xACD,4},
    {0xAD0,0xAD0,5},{0xAE0,0xAE1,5},{0xAE2,0xAE3,4},{0xAE6,0xAEF,6},{0xAF9,0xAF9,5},{0xAFA,0xAFF,4},
    {0xB01,0xB03,4},{0xB05,0xB0C,5},{0xB0F,0xB10,5},{0xB13,0xB28,5},{0xB2A,0xB30,5},{0xB32,0xB33,5},
    {0xB35,0xB39,5},{0xB3C,0xB3C,4},{0xB3D,0xB3D,5},{0xB3E,0xB44,4},{0xB47,0xB48,4},{0xB4B,0xB4D,4},
    {0xB55,0xB57,4},{0xB5C,0xB5D,5},{0xB5F,0xB61,5},{0xB62,0xB63,4},{0xB66,0xB6F,6},{0xB71,0xB71,5},
    {0xB72,0xB77,2},{0xB82,0xB82,4},{0xB83,0xB83,5},{0xB85,0xB8A,5},{0xB8E,0xB90,5},{0xB92,0xB95,5},
    {0xB99,0xB9A,5},{0xB9C,0xB9C,5},{0xB9E,0xB9F,5},{0xBA3,0xBA4,5},{0xBA8,0xBAA,5},{0xBAE,0xBB9,5},
    {0xBBE,0xBC2,4},{0xBC6,0xBC8,4},{0xBCA,0xBCD,4},{0xBD0,0xBD0,5},{0xBD7,0xBD7,4},{0xBE6,0xBEF,6},
    {0xBF0,0xBF2,2},{0xC00,0xC04,4},{0xC05,0xC0C,5},{0xC0E,0xC10,5},{0xC12,0xC28,5},{0xC2A,0xC39,5},
    {0xC3C,0xC3C,4},{0xC3D,0xC3D,5},{0xC3E,0xC44,4},{0xC46,0xC48,4},{0xC4A,0xC4D,4},{0xC55,0xC56,4},
    {0xC58,0xC5A,5},{0xC5D,0xC5D,5},{0xC60,0xC61,5},{0xC62,0xC63,4},{0xC66,0xC6F,6},{0xC78,0xC7E,2},
    {0xC80,0xC80,5},{0xC81,0xC83,4},{0xC85,0xC8C,5},{0xC8E,0xC90,5},{0xC92,0xCA8,5},{0xCAA,0xCB3,5},
    {0xCB5,0xCB9,5},{0xCBC,0xCBC,4},{0xCBD,0xCBD,5},{0xCBE,0xCC4,4},{0xCC6,0xCC8,4},{0xCCA,0xCCD,4},
    {0xCD5,0xCD6,4},{0xCDD,0xCDE,5},{0xCE0,0xCE1,5},{0xCE2,0xCE3,4},{0xCE6,0xCEF,6},{0xCF1,0xCF2,5},
    {0xCF3,0xCF3,4},{0xD00,0xD03,4},{0xD04,0xD0C,5},{0xD0E,0xD10,5},{0xD12,0xD3A,5},{0xD3B,0xD3C,4},
    {0xD3D,0xD3D,5},{0xD3E,0xD44,4},{0xD46,0xD48,4},{0xD4A,0xD4D,4},{0xD4E,0xD4E,5},{0xD54,0xD56,5},
    {0xD57,0xD57,4},{0xD58,0xD5E,2},{0xD5F,0xD61,5},{0xD62,0xD63,4},{0xD66,0xD6F,6},{0xD70,0xD78,2},
    {0xD7A,0xD7F,5},{0xD81,0xD83,4},{0xD85,0xD96,5},{0xD9A,0xDB1,5},{0xDB3,0xDBB,5},{0xDBD,0xDBD,5},
    {0xDC0,0xDC6,5},{0xDCA,0xDCA,4},{0xDCF,0xDD4,4},{0xDD6,0xDD6,4},{0xDD8,0xDDF,4},{0xDE6,0xDEF,6},
    {0xDF2,0xDF3,4},{0xE01,0xE30,5},{0xE31,0xE31,4},{0xE32,0xE33,5},{0xE34,0xE3A,4},{0xE40,0xE46,5},
    {0xE47,0xE4E,4},{0xE50,0xE59,6},{0xE81,0xE82,5},{0xE84,0xE84,5},{0xE86,0xE8A,5},{0xE8C,0xEA3,5},
    {0xEA5,0xEA5,5},{0xEA7,0xEB0,5},{0xEB1,0xEB1,4},{0xEB2,0xEB3,5},{0xEB4,0xEBC,4},{0xEBD,0xEBD,5},
    {0xEC0,0xEC4,5},{0xEC6,0xEC6,5},{0xEC8,0xECE,4},{0xED0,0xED9,6},{0xEDC,0xEDF,5},{0xF00,0xF00,5},
    {0xF18,0xF19,4},{0xF20,0xF29,6},{0xF2A,0xF33,2},{0xF35,0xF35,4},{0xF37,0xF37,4},{0xF39,0xF39,4},
    {0xF3E,0xF3F,4},{0xF40,0xF47,5},{0xF49,0xF6C,5},{0xF71,0xF84,4},{0xF86,0xF87,4},{0xF88,0xF8C,5},
    {0xF8D,0xF97,4},{0xF99,0xFBC,4},{0xFC6,0xFC6,4},{0x1000,0x102A,5},{0x102B,0x103E,4},{0x103F,0x103F,5},
    {0x1040,0x1049,6},{0x1050,0x1055,5},{0x1056,0x1059,4},{0x105A,0x105D,5},{0x105E,0x1060,4},{0x1061,0x1061,5},
    {0x1062,0x1064,4},{0x1065,0x1066,5},{0x1067,0x106D,4},{0x106E,0x1070,5},{0x1071,0x1074,4},{0x1075,0x1081,5},
    {0x1082,0x108D,4},{0x108E,0x108E,5},{0x108F,0x108F,4},{0x1090,0x1099,6},{0x109A,0x109D,4},{0x10A0,0x10C5,5},
    {0x10C7,0x10C7,5},{0x10CD,0x10CD,5},{0x10D0,0x10FA,5},{0x10FC,0x1248,5},{0x124A,0x124D,5},{0x1250,0x1256,5},
    {0x1258,0x1258,5},{0x125A,0x125D,5},{0x1260,0x1288,5},{0x128A,0x128D,5},{0x1290,0x12B0,5},{0x12B2,0x12B5,5},
    {0x12B8,0x12BE,5},{0x12C0,0x12C0,5},{0x12C2,0x12C5,5},{0x12C8,0x12D6,5},{0x12D8,0x1310,5},{0x1312,0x1315,5},
    {0x1318,0x135A,5},{0x135D,0x135F,4},{0x1369,0x137C,2},{0x1380,0x138F,5},{0x13A0,0x13F5,5},{0x13F8,0x13FD,5},
    {0x1401,0x166C,5},{0x166F,0x167F,5},{0x1681,0x169A,5},{0x16A0,0x16EA,5},{0x16EE,0x16F0,6},{0x16F1,0x16F8,5},
    {0x1700,0x1711,5},{0x1712,0x1715,4},{0x171F,0x1731,5},{0x1732,0x1734,4},{0x1740,0x1751,5},{0x1752,0x1753,4},
    {0x1760,0x176C,5},{0x176E,0x1770,5},{0x1772,0x1773,4},{0x1780,0x17B3,5},{0x17B4,0x17D3,4},{0x17D7,0x17D7,5},
    {0x17DC,0x17DC,5},{0x17DD,0x17DD,4},{0x17E0,0x17E9,6},{0x17F0,0x17F9,2},{0x180B,0x180D,4},{0x180F,0x180F,4},
    {0x1810,0x1819,6},{0x1820,0x1878,5},{0x1880,0x1884,5},{0x1885,0x1886,4},{0x1887,0x18A8,5},{0x18A9,0x18A9,4},
    {0x18AA,0x18AA,5},{0x18B0,0x18F5,5},{0x1900,0x191E,5},{0x1920,0x192B,4},{0x1930,0x193B,4},{0x1946,0x194F,6},
    {0x1950,0x196D,5},{0x1970,0x1974,5},{0x1980,0x19AB,5},{0x19B0,0x19C9,5},{0x19D0,0x19D9,6},{0x19DA,0x19DA,2},
    {0x1A00,0x1A16,5},{0x1A17,0x1A1B,4},{0x1A20,0x1A54,5},{0x1A55,0x1A5E,4},{0x1A60,0x1A7C,4},{0x1A7F,0x1A7F,4},
    {0x1A80,0x1A89,6},{0x1A90,0x1A99,6},{0x1AA7,0x1AA7,5},{0x1AB0,0x1ACE,4},{0x1B00,0x1B04,4},{0x1B05,0x1B33,5},
    {0x1B34,0x1B44,4},{0x1B45,0x1B4C,5},{0x1B50,0x1B59,6},{0x1B6B,0x1B73,4},{0x1B80,0x1B82,4},{0x1B83,0x1BA0,5},
    {0x1BA1,0x1BAD,4},{0x1BAE,0x1BAF,5},{0x1BB0,0x1BB9,6},{0x1BBA,0x1BE5,5},{0x1BE6,0x1BF3,4},{0x1C00,0x1C23,5},
    {0x1C24,0x1C37,4},{0x1C40,0x1C49,6},{0x1C4D,0x1C4F,5},{0x1C50,0x1C59,6},{0x1C5A,0x1C7D,5},{0x1C80,0x1C8A,5},
    {0x1C90,0x1CBA,5},{0x1CBD,0x1CBF,5},{0x1CD0,0x1CD2,4},{0x1CD4,0x1CE8,4},{0x1CE9,0x1CEC,5},{0x1CED,0x1CED,4},
    {0x1CEE,0x1CF3,5},{0x1CF4,0x1CF4,4},{0x1CF5,0x1CF6,5},{0x1CF7,0x1CF9,4},{0x1CFA,0x1CFA,5},{0x1D00,0x1DBF,5},
    {0x1DC0,0x1DFF,4},{0x1E00,0x1F15,5},{0x1F18,0x1F1D,5},{0x1F20,0x1F45,5},{0x1F48,0x1F4D,5},{0x1F50,0x1F57,5},
    {0x1F59,0x1F59,5},{0x1F5B,0x1F5B,5},{0x1F5D,0x1F5D,5},{0x1F5F,0x1F7D,5},{0x1F80,0x1FB4,5},{0x1FB6,0x1FBC,5},
    {0x1FBE,0x1FBE,5},{0x1FC2,0x1FC4,5},{0x1FC6,0x1FCC,5},{0x1FD0,0x1FD3,5},{0x1FD6,0x1FDB,5},{0x1FE0,0x1FEC,5},
    {0x1FF2,0x1FF4,5},{0x1FF6,0x1FFC,5},{0x203F,0x2040,4},{0x2054,0x2054,4},{0x2070,0x2070,2},{0x2071,0x2071,5},
    {0x2074,0x2079,2},{0x207F,0x207F,5},{0x2080,0x2089,2},{0x2090,0x209C,5},{0x20D0,0x20F0,4},{0x2102,0x2102,5},
    {0x2107,0x2107,5},{0x210A,0x2113,5},{0x2115,0x2115,5},{0x2119,0x211D,5},{0x2124,0x2124,5},{0x2126,0x2126,5},
    {0x2128,0x2128,5},{0x212A,0x212D,5},{0x212F,0x2139,5},{0x213C,0x213F,5},{0x2145,0x2149,5},{0x214E,0x214E,5},
    {0x2150,0x215F,2},{0x2160,0x2182,6},{0x2183,0x2184,5},{0x2185,0x2188,6},{0x2189,0x2189,2},{0x2460,0x249B,2},
    {0x24B6,0x24E9,4},{0x24EA,0x24FF,2},{0x2776,0x2793,2},{0x2C00,0x2CE4,5},{0x2CEB,0x2CEE,5},{0x2CEF,0x2CF1,4},
    {0x2CF2,0x2CF3,5},{0x2CFD,0x2CFD,2},{0x2D00,0x2D25,5},{0x2D27,0x2D27,5},{0x2D2D,0x2D2D,5},{0x2D30,0x2D67,5},
    {0x2D6F,0x2D6F,5},{0x2D7F,0x2D7F,4},{0x2D80,0x2D96,5},{0x2DA0,0x2DA6,5},{0x2DA8,0x2DAE,5},{0x2DB0,0x2DB6,5},
    {0x2DB8,0x2DBE,5},{0x2DC0,0x2DC6,5},{0x2DC8,0x2DCE,5},{0x2DD0,0x2DD6,5},{0x2DD8,0x2DDE,5},{0x2DE0,0x2DFF,4},
    {0x2E2F,0x2E2F,5},{0x3005,0x3006,5},{0x3007,0x3007,6},{0x3021,0x3029,6},{0x302A,0x302F,4},{0x3031,0x3035,5},
    {0x3038,0x303A,6},{0x303B,0x303C,5},{0x3041,0x3096,5},{0x3099,0x309A,4},{0x309D,0x309F,5},{0x30A1,0x30FA,5},
    {0x30FC,0x30FF,5},{0x3105,0x312F,5},{0x3131,0x318E,5},{0x3192,0x3195,2},{0x31A0,0x31BF,5},{0x31F0,0x31FF,5},
    {0x3220,0x3229,2},{0x3248,0x324F,2},{0x3251,0x325F,2},{0x3280,0x3289,2},{0x32B1,0x32BF,2},{0x3400,0x4DBF,5},
    {0x4E00,0xA48C,5},{0xA4D0,0xA4FD,5},{0xA500,0xA60C,5},{0xA610,0xA61F,5},{0xA620,0xA629,6},{0xA62A,0xA62B,5},
    {0xA640,0xA66E,5},{0xA66F,0xA672,4},{0xA674,0xA67D,4},{0xA67F,0xA69D,5},{0xA69E,0xA69F,4},{0xA6A0,0xA6E5,5},
    {0xA6E6,0xA6EF,6},{0xA6F0,0xA6F1,4},{0xA717,0xA71F,5},{0xA722,0xA788,5},{0xA78B,0xA7CD,5},{0xA7D0,0xA7D1,5},
    {0xA7D3,0xA7D3,5},{0xA7D5,0xA7DC,5},{0xA7F2,0xA801,5},{0xA802,0xA802,4},{0xA803,0xA805,5},{0xA806,0xA806,4},
    {0xA807,0xA80A,5},{0xA80B,0xA80B,4},{0xA80C,0xA822,5},{0xA823,0xA827,4},{0xA82C,0xA82C,4},{0xA830,0xA835,2},
    {0xA840,0xA873,5},{0xA880,0xA881,4},{0xA882,0xA8B3,5},{0xA8B4,0xA8C5,4},{0xA8D0,0xA8D9,6},{0xA8E0,0xA8F1,4},
    {0xA8F2,0xA8F7,5},{0xA8FB,0xA8FB,5},{0xA8FD,0xA8FE,5},{0xA8FF,0xA8FF,4},{0xA900,0xA909,6},{0xA90A,0xA925,5},
    {0xA926,0xA92D,4},{0xA930,0xA946,5},{0xA947,0xA953,4},{0xA960,0xA97C,5},{0xA980,0xA983,4},{0xA984,0xA9B2,5},
    {0xA9B3,0xA9C0,4},{0xA9CF,0xA9CF,5},{0xA9D0,0xA9D9,6},{0xA9E0,0xA9E4,5},{0xA9E5,0xA9E5,4},{0xA9E6,0xA9EF,5},
    {0xA9F0,0xA9F9,6},{0xA9FA,0xA9FE,5},{0xAA00,0xAA28,5},{0xAA29,0xAA36,4},{0xAA40,0xAA42,5},{0xAA43,0xAA43,4},
    {0xAA44,0xAA4B,5},{0xAA4C,0xAA4D,4},{0xAA50,0xAA59,6},{0xAA60,0xAA76,5},{0xAA7A,0xAA7A,5},{0xAA7B,0xAA7D,4},
    {0xAA7E,0xAAAF,5},{0xAAB0,0xAAB0,4},{0xAAB1,0xAAB1,5},{0xAAB2,0xAAB4,4},{0xAAB5,0xAAB6,5},{0xAAB7,0xAAB8,4},
    {0xAAB9,0xAABD,5},{0xAABE,0xAABF,4},{0xAAC0,0xAAC0,5},{0xAAC1,0xAAC1,4},{0xAAC2,0xAAC2,5},{0xAADB,0xAADD,5},
    {0xAAE0,0xAAEA,5},{0xAAEB,0xAAEF,4},{0xAAF2,0xAAF4,5},{0xAAF5,0xAAF6,4},{0xAB01,0xAB06,5},{0xAB09,0xAB0E,5},
    {0xAB11,0xAB16,5},{0xAB20,0xAB26,5},{0xAB28,0xAB2E,5},{0xAB30,0xAB5A,5},{0xAB5C,0xAB69,5},{0xAB70,0xABE2,5},
    {0xABE3,0xABEA,4},{0xABEC,0xABED,4},{0xABF0,0xABF9,6},{0xAC00,0xD7A3,5},{0xD7B0,0xD7C6,5},{0xD7CB,0xD7FB,5},
    {0xF900,0xFA6D,5},{0xFA70,0xFAD9,5},{0xFB00,0xFB06,5},{0xFB13,0xFB17,5},{0xFB1D,0xFB1D,5},{0xFB1E,0xFB1E,4},
    {0xFB1F,0xFB28,5},{0xFB2A,0xFB36,5},{0xFB38,0xFB3C,5},{0xFB3E,0xFB3E,5},{0xFB40,0xFB41,5},{0xFB43,0xFB44,5},
    {0xFB46,0xFBB1,5},{0xFBD3,0xFD3D,5},{0xFD50,0xFD8F,5},{0xFD92,0xFDC7,5},{0xFDF0,0xFDFB,5},{0xFE00,0xFE0F,4},
    {0xFE20,0xFE2F,4},{0xFE33,0xFE34,4},{0xFE4D,0xFE4F,4},{0xFE70,0xFE74,5},{0xFE76,0xFEFC,5},{0xFF10,0xFF19,6},
    {0xFF21,0xFF3A,5},{0xFF3F,0xFF3F,4},{0xFF41,0xFF5A,5},{0xFF66,0xFFBE,5},{0xFFC2,0xFFC7,5},{0xFFCA,0xFFCF,5},
    {0xFFD2,0xFFD7,5},{0xFFDA,0xFFDC,5},{0x10000,0x1000B,5},{0x1000D,0x10026,5},{0x10028,0x1003A,5},
    {0x1003C,0x1003D,5},{0x1003F,0x1004D,5},{0x10050,0x1005D,5},{0x10080,0x100FA,5},{0x10107,0x10133,2},
    {0x10140,0x10174,6},{0x10175,0x10178,2},{0x1018A,0x1018B,2},{0x101FD,0x101FD,4},{0x10280,0x1029C,5},
    {0x102A0,0x102D0,5},{0x102E0,0x102E0,4},{0x102E1,0x102FB,2},{0x10300,0x1031F,5},{0x10320,0x10323,2},
    {0x1032D,0x10340,5},{0x10341,0x10341,6},{0x10342,0x10349,5},{0x1034A,0x1034A,6},{0x10350,0x10375,5},
    {0x10376,0x1037A,4},{0x10380,0x1039D,5},{0x103A0,0x103C3,5},{0x103C8,0x103CF,5},{0x103D1,0x103D5,6},
    {0x10400,0x1049D,5},{0x104A0,0x104A9,6},{0x104B0,0x104D3,5},{0x104D8,0x104FB,5},{0x10500,0x10527,5},
    {0x10530,0x10563,5},{0x10570,0x1057A,5},{0x1057C,0x1058A,5},{0x1058C,0x10592,5},{0x10594,0x10595,5},
    {0x10597,0x105A1,5},{0x105A3,0x105B1,5},{0x105B3,0x105B9,5},{0x105BB,0x105BC,5},{0x105C0,0x105F3,5},
    {0x10600,0x10736,5},{0x10740,0x10755,5},{0x10760,0x10767,5},{0x10780,0x10785,5},{0x10787,0x107B0,5},
    {0x107B2,0x107BA,5},{0x10800,0x10805,5},{0x10808,0x10808,5},{0x1080A,0x10835,5},{0x10837,0x10838,5},
    {0x1083C,0x1083C,5},{0x1083F,0x10855,5},{0x10858,0x1085F,2},{0x10860,0x10876,5},{0x10879,0x1087F,2},
    {0x10880,0x1089E,5},{0x108A7,0x108AF,2},{0x108E0,0x108F2,5},{0x108F4,0x108F5,5},{0x108FB,0x108FF,2},
    {0x10900,0x10915,5},{0x10916,0x1091B,2},{0x10920,0x10939,5},{0x10980,0x109B7,5},{0x109BC,0x109BD,2},
    {0x109BE,0x109BF,5},{0x109C0,0x109CF,2},{0x109D2,0x109FF,2},{0x10A00,0x10A00,5},{0x10A01,0x10A03,4},
    {0x10A05,0x10A06,4},{0x10A0C,0x10A0F,4},{0x10A10,0x10A13,5},{0x10A15,0x10A17,5},{0x10A19,0x10A35,5},
    {0x10A38,0x10A3A,4},{0x10A3F,0x10A3F,4},{0x10A40,0x10A48,2},{0x10A60,0x10A7C,5},{0x10A7D,0x10A7E,2},
    {0x10A80,0x10A9C,5},{0x10A9D,0x10A9F,2},{0x10AC0,0x10AC7,5},{0x10AC9,0x10AE4,5},{0x10AE5,0x10AE6,4},
    {0x10AEB,0x10AEF,2},{0x10B00,0x10B35,5},{0x10B40,0x10B55,5},{0x10B58,0x10B5F,2},{0x10B60,0x10B72,5},
    {0x10B78,0x10B7F,2},{0x10B80,0x10B91,5},{0x10BA9,0x10BAF,2},{0x10C00,0x10C48,5},{0x10C80,0x10CB2,5},
    {0x10CC0,0x10CF2,5},{0x10CFA,0x10CFF,2},{0x10D00,0x10D23,5},{0x10D24,0x10D27,4},{0x10D30,0x10D39,6},
    {0x10D40,0x10D49,6},{0x10D4A,0x10D65,5},{0x10D69,0x10D6D,4},{0x10D6F,0x10D85,5},{0x10E60,0x10E7E,2},
    {0x10E80,0x10EA9,5},{0x10EAB,0x10EAC,4},{0x10EB0,0x10EB1,5},{0x10EC2,0x10EC4,5},{0x10EFC,0x10EFF,4},
    {0x10F00,0x10F1C,5},{0x10F1D,0x10F26,2},{0x10F27,0x10F27,5},{0x10F30,0x10F45,5},{0x10F46,0x10F50,4},
    {0x10F51,0x10F54,2},{0x10F70,0x10F81,5},{0x10F82,0x10F85,4},{0x10FB0,0x10FC4,5},{0x10FC5,0x10FCB,2},
    {0x10FE0,0x10FF6,5},{0x11000,0x11002,4},{0x11003,0x11037,5},{0x11038,0x11046,4},{0x11052,0x11065,2},
    {0x11066,0x1106F,6},{0x11070,0x11070,4},{0x11071,0x11072,5},{0x11073,0x11074,4},{0x11075,0x11075,5},
    {0x1107F,0x11082,4},{0x11083,0x110AF,5},{0x110B0,0x110BA,4},{0x110C2,0x110C2,4},{0x110D0,0x110E8,5},
    {0x110F0,0x110F9,6},{0x11100,0x11102,4},{0x11103,0x11126,5},{0x11127,0x11134,4},{0x11136,0x1113F,6},
    {0x11144,0x11144,5},{0x11145,0x11146,4},{0x11147,0x11147,5},{0x11150,0x11172,5},{0x11173,0x11173,4},
    {0x11176,0x11176,5},{0x11180,0x11182,4},{0x11183,0x111B2,5},{0x111B3,0x111C0,4},{0x111C1,0x111C4,5},
    {0x111C9,0x111CC,4},{0x111CE,0x111CF,4},{0x111D0,0x111D9,6},{0x111DA,0x111DA,5},{0x111DC,0x111DC,5},
    {0x111E1,0x111F4,2},{0x11200,0x11211,5},{0x11213,0x1122B,5},{0x1122C,0x11237,4},{0x1123E,0x1123E,4},
    {0x1123F,0x11240,5},{0x11241,0x11241,4},{0x11280,0x11286,5},{0x11288,0x11288,5},{0x1128A,0x1128D,5},
    {0x1128F,0x1129D,5},{0x1129F,0x112A8,5},{0x112B0,0x112DE,5},{0x112DF,0x112EA,4},{0x112F0,0x112F9,6},
    {0x11300,0x11303,4},{0x11305,0x1130C,5},{0x1130F,0x11310,5},{0x11313,0x11328,5},{0x1132A,0x11330,5},
    {0x11332,0x11333,5},{0x11335,0x11339,5},{0x1133B,0x1133C,4},{0x1133D,0x1133D,5},{0x1133E,0x11344,4},
    {0x11347,0x11348,4},{0x1134B,0x1134D,4},{0x11350,0x11350,5},{0x11357,0x11357,4},{0x1135D,0x11361,5},
    {0x11362,0x11363,4},{0x11366,0x1136C,4},{0x11370,0x11374,4},{0x11380,0x11389,5},{0x1138B,0x1138B,5},
    {0x1138E,0x1138E,5},{0x11390,0x113B5,5},{0x113B7,0x113B7,5},{0x113B8,0x113C0,4},{0x113C2,0x113C2,4},
    {0x113C5,0x113C5,4},{0x113C7,0x113CA,4},{0x113CC,0x113D0,4},{0x113D1,0x113D1,5},{0x113D2,0x113D2,4},
    {0x113D3,0x113D3,5},{0x113E1,0x113E2,4},{0x11400,0x11434,5},{0x11435,0x11446,4},{0x11447,0x1144A,5},
    {0x11450,0x11459,6},{0x1145E,0x1145E,4},{0x1145F,0x11461,5},{0x11480,0x114AF,5},{0x114B0,0x114C3,4},
    {0x114C4,0x114C5,5},{0x114C7,0x114C7,5},{0x114D0,0x114D9,6},{0x11580,0x115AE,5},{0x115AF,0x115B5,4},
    {0x115B8,0x115C0,4},{0x115D8,0x115DB,5},{0x115DC,0x115DD,4},{0x11600,0x1162F,5},{0x11630,0x11640,4},
    {0x11644,0x11644,5},{0x11650,0x11659,6},{0x11680,0x116AA,5},{0x116AB,0x116B7,4},{0x116B8,0x116B8,5},
    {0x116C0,0x116C9,6},{0x116D0,0x116E3,6},{0x11700,0x1171A,5},{0x1171D,0x1172B,4},{0x11730,0x11739,6},
    {0x1173A,0x1173B,2},{0x11740,0x11746,5},{0x11800,0x1182B,5},{0x1182C,0x1183A,4},{0x118A0,0x118DF,5},
    {0x118E0,0x118E9,6},{0x118EA,0x118F2,2},{0x118FF,0x11906,5},{0x11909,0x11909,5},{0x1190C,0x11913,5},
    {0x11915,0x11916,5},{0x11918,0x1192F,5},{0x11930,0x11935,4},{0x11937,0x11938,4},{0x1193B,0x1193E,4},
    {0x1193F,0x1193F,5},{0x11940,0x11940,4},{0x11941,0x11941,5},{0x11942,0x11943,4},{0x11950,0x11959,6},
    {0x119A0,0x119A7,5},{0x119AA,0x119D0,5},{0x119D1,0x119D7,4},{0x119DA,0x119E0,4},{0x119E1,0x119E1,5},
    {0x119E3,0x119E3,5},{0x119E4,0x119E4,4},{0x11A00,0x11A00,5},{0x11A01,0x11A0A,4},{0x11A0B,0x11A32,5},
    {0x11A33,0x11A39,4},{0x11A3A,0x11A3A,5},{0x11A3B,0x11A3E,4},{0x11A47,0x11A47,4},{0x11A50,0x11A50,5},
    {0x11A51,0x11A5B,4},{0x11A5C,0x11A89,5},{0x11A8A,0x11A99,4},{0x11A9D,0x11A9D,5},{0x11AB0,0x11AF8,5},
    {0x11BC0,0x11BE0,5},{0x11BF0,0x11BF9,6},{0x11C00,0x11C08,5},{0x11C0A,0x11C2E,5},{0x11C2F,0x11C36,4},
    {0x11C38,0x11C3F,4},{0x11C40,0x11C40,5},{0x11C50,0x11C59,6},{0x11C5A,0x11C6C,2},{0x11C72,0x11C8F,5},
    {0x11C92,0x11CA7,4},{0x11CA9,0x11CB6,4},{0x11D00,0x11D06,5},{0x11D08,0x11D09,5},{0x11D0B,0x11D30,5},
    {0x11D31,0x11D36,4},{0x11D3A,0x11D3A,4},{0x11D3C,0x11D3D,4},{0x11D3F,0x11D45,4},{0x11D46,0x11D46,5},
    {0x11D47,0x11D47,4},{0x11D50,0x11D59,6},{0x11D60,0x11D65,5},{0x11D67,0x11D68,5},{0x11D6A,0x11D89,5},
    {0x11D8A,0x11D8E,4},{0x11D90,0x11D91,4},{0x11D93,0x11D97,4},{0x11D98,0x11D98,5},{0x11DA0,0x11DA9,6},
    {0x11EE0,0x11EF2,5},{0x11EF3,0x11EF6,4},{0x11F00,0x11F01,4},{0x11F02,0x11F02,5},{0x11F03,0x11F03,4},
    {0x11F04,0x11F10,5},{0x11F12,0x11F33,5},{0x11F34,0x11F3A,4},{0x11F3E,0x11F42,4},{0x11F50,0x11F59,6},
    {0x11F5A,0x11F5A,4},{0x11FB0,0x11FB0,5},{0x11FC0,0x11FD4,2},{0x12000,0x12399,5},{0x12400,0x1246E,6},
    {0x12480,0x12543,5},{0x12F90,0x12FF0,5},{0x13000,0x1342F,5},{0x13440,0x13440,4},{0x13441,0x13446,5},
    {0x13447,0x13455,4},{0x13460,0x143FA,5},{0x14400,0x14646,5},{0x16100,0x1611D,5},{0x1611E,0x1612F,4},
    {0x16130,0x16139,6},{0x16800,0x16A38,5},{0x16A40,0x16A5E,5},{0x16A60,0x16A69,6},{0x16A70,0x16ABE,5},
    {0x16AC0,0x16AC9,6},{0x16AD0,0x16AED,5},{0x16AF0,0x16AF4,4},{0x16B00,0x16B2F,5},{0x16B30,0x16B36,4},
    {0x16B40,0x16B43,5},{0x16B50,0x16B59,6},{0x16B5B,0x16B61,2},{0x16B63,0x16B77,5},{0x16B7D,0x16B8F,5},
    {0x16D40,0x16D6C,5},{0x16D70,0x16D79,6},{0x16E40,0x16E7F,5},{0x16E80,0x16E96,2},{0x16F00,0x16F4A,5},
    {0x16F4F,0x16F4F,4},{0x16F50,0x16F50,5},{0x16F51,0x16F87,4},{0x16F8F,0x16F92,4},{0x16F93,0x16F9F,5},
    {0x16FE0,0x16FE1,5},{0x16FE3,0x16FE3,5},{0x16FE4,0x16FE4,4},{0x16FF0,0x16FF1,4},{0x17000,0x187F7,5},
    {0x18800,0x18CD5,5},{0x18CFF,0x18D08,5},{0x1AFF0,0x1AFF3,5},{0x1AFF5,0x1AFFB,5},{0x1AFFD,0x1AFFE,5},
    {0x1B000,0x1B122,5},{0x1B132,0x1B132,5},{0x1B150,0x1B152,5},{0x1B155,0x1B155,5},{0x1B164,0x1B167,5},
    {0x1B170,0x1B2FB,5},{0x1BC00,0x1BC6A,5},{0x1BC70,0x1BC7C,5},{0x1BC80,0x1BC88,5},{0x1BC90,0x1BC99,5},
    {0x1BC9D,0x1BC9E,4},{0x1CCF0,0x1CCF9,6},{0x1CF00,0x1CF2D,4},{0x1CF30,0x1CF46,4},{0x1D165,0x1D169,4},
    {0x1D16D,0x1D172,4},{0x1D17B,0x1D182,4},{0x1D185,0x1D18B,4},{0x1D1AA,0x1D1AD,4},{0x1D242,0x1D244,4},
    {0x1D2C0,0x1D2D3,2},{0x1D2E0,0x1D2F3,2},{0x1D360,0x1D378,2},{0x1D400,0x1D454,5},{0x1D456,0x1D49C,5},
    {0x1D49E,0x1D49F,5},{0x1D4A2,0x1D4A2,5},{0x1D4A5,0x1D4A6,5},{0x1D4A9,0x1D4AC,5},{0x1D4AE,0x1D4B9,5},
    {0x1D4BB,0x1D4BB,5},{0x1D4BD,0x1D4C3,5},{0x1D4C5,0x1D505,5},{0x1D507,0x1D50A,5},{0x1D50D,0x1D514,5},
    {0x1D516,0x1D51C,5},{0x1D51E,0x1D539,5},{0x1D53B,0x1D53E,5},{0x1D540,0x1D544,5},{0x1D546,0x1D546,5},
    {0x1D54A,0x1D550,5},{0x1D552,0x1D6A5,5},{0x1D6A8,0x1D6C0,5},{0x1D6C2,0x1D6DA,5},{0x1D6DC,0x1D6FA,5},
    {0x1D6FC,0x1D714,5},{0x1D716,0x1D734,5},{0x1D736,0x1D74E,5},{0x1D750,0x1D76E,5},{0x1D770,0x1D788,5},
    {0x1D78A,0x1D7A8,5},{0x1D7AA,0x1D7C2,5},{0x1D7C4,0x1D7CB,5},{0x1D7CE,0x1D7FF,6},{0x1DA00,0x1DA36,4},
    {0x1DA3B,0x1DA6C,4},{0x1DA75,0x1DA75,4},{0x1DA84,0x1DA84,4},{0x1DA9B,0x1DA9F,4},{0x1DAA1,0x1DAAF,4},
    {0x1DF00,0x1DF1E,5},{0x1DF25,0x1DF2A,5},{0x1E000,0x1E006,4},{0x1E008,0x1E018,4},{0x1E01B,0x1E021,4},
    {0x1E023,0x1E024,4},{0x1E026,0x1E02A,4},{0x1E030,0x1E06D,5},{0x1E08F,0x1E08F,4},{0x1E100,0x1E12C,5},
    {0x1E130,0x1E136,4},{0x1E137,0x1E13D,5},{0x1E140,0x1E149,6},{0x1E14E,0x1E14E,5},{0x1E290,0x1E2AD,5},
    {0x1E2AE,0x1E2AE,4},{0x1E2C0,0x1E2EB,5},{0x1E2EC,0x1E2EF,4},{0x1E2F0,0x1E2F9,6},{0x1E4D0,0x1E4EB,5},
    {0x1E4EC,0x1E4EF,4},{0x1E4F0,0x1E4F9,6},{0x1E5D0,0x1E5ED,5},{0x1E5EE,0x1E5EF,4},{0x1E5F0,0x1E5F0,5},
    {0x1E5F1,0x1E5FA,6},{0x1E7E0,0x1E7E6,5},{0x1E7E8,0x1E7EB,5},{0x1E7ED,0x1E7EE,5},{0x1E7F0,0x1E7FE,5},
    {0x1E800,0x1E8C4,5},{0x1E8C7,0x1E8CF,2},{0x1E8D0,0x1E8D6,4},{0x1E900,0x1E943,5},{0x1E944,0x1E94A,4},
    {0x1E94B,0x1E94B,5},{0x1E950,0x1E959,6},{0x1EC71,0x1ECAB,2},{0x1ECAD,0x1ECAF,2},{0x1ECB1,0x1ECB4,2},
    {0x1ED01,0x1ED2D,2},{0x1ED2F,0x1ED3D,2},{0x1EE00,0x1EE03,5},{0x1EE05,0x1EE1F,5},{0x1EE21,0x1EE22,5},
    {0x1EE24,0x1EE24,5},{0x1EE27,0x1EE27,5},{0x1EE29,0x1EE32,5},{0x1EE34,0x1EE37,5},{0x1EE39,0x1EE39,5},
    {0x1EE3B,0x1EE3B,5},{0x1EE42,0x1EE42,5},{0x1EE47,0x1EE47,5},{0x1EE49,0x1EE49,5},{0x1EE4B,0x1EE4B,5},
    {0x1EE4D,0x1EE4F,5},{0x1EE51,0x1EE52,5},{0x1EE54,0x1EE54,5},{0x1EE57,0x1EE57,5},{0x1EE59,0x1EE59,5},
    {0x1EE5B,0x1EE5B,5},{0x1EE5D,0x1EE5D,5},{0x1EE5F,0x1EE5F,5},{0x1EE61,0x1EE62,5},{0x1EE64,0x1EE64,5},
    {0x1EE67,0x1EE6A,5},{0x1EE6C,0x1EE72,5},{0x1EE74,0x1EE77,5},{0x1EE79,0x1EE7C,5},{0x1EE7E,0x1EE7E,5},
    {0x1EE80,0x1EE89,5},{0x1EE8B,0x1EE9B,5},{0x1EEA1,0x1EEA3,5},{0x1EEA5,0x1EEA9,5},{0x1EEAB,0x1EEBB,5},
    {0x1F100,0x1F10C,2},{0x1F130,0x1F149,4},{0x1F150,0x1F169,4},{0x1F170,0x1F189,4},{0x1FBF0,0x1FBF9,6},
    {0x20000,0x2A6DF,5},{0x2A700,0x2B739,5},{0x2B740,0x2B81D,5},{0x2B820,0x2CEA1,5},{0x2CEB0,0x2EBE0,5},
    {0x2EBF0,0x2EE5D,5},{0x2F800,0x2FA1D,5},{0x30000,0x3134A,5},{0x31350,0x323AF,5},{0xE0100,0xE01EF,4},
};

static unsigned uc_class(uint32_t cp)
{
    if (cp < 0x80) {
        if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return UC_L | UC_W;
        if (cp >= '0' && cp <= '9') return UC_N | UC_W;
        return cp == '_' ? UC_W : 0;
    }
    size_t lo = 0, hi = sizeof uc_ranges / sizeof uc_ranges[0];
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < uc_ranges[mid].lo) hi = mid;
        else if (cp > uc_ranges[mid].hi) lo = mid + 1;
        else return uc_ranges[mid].cls;
    }
    return 0;
}

/* Unicode White_Space: what \s matches in the library's regexes. */
static int uc_space(uint32_t cp)
{
    if (cp <= 0x20) return cp == 0x20 || (cp >= 0x09 && cp <= 0x0D);
    if (cp < 0x85) return 0;
    return cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 ||
           cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

/* ------------------------------------------------------------------------ */
/* Hash tables                                                               */

static uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 0x100000001b3ULL;
    }
    return h | 1; /* 0 marks an empty slot */
}

/* String -> int32; keys are offsets into the tokenizer's string pool. */
typedef struct strslot {
    uint64_t hash;
    size_t off;
    uint32_t len;
    int32_t value;
} strslot;

typedef struct strmap {
    strslot *slots;
    size_t mask, count;
} strmap;

static int64_t sm_find(const strmap *m, const char *pool, const char *s, size_t n)
{
    if (!m->slots) return -1;
    uint64_t h = hash_bytes(s, n);
    for (size_t i = h & m->mask;; i = (i + 1) & m->mask) {
        const strslot *e = &m->slots[i];
        if (!e->hash) return -1;
        if (e->hash == h && e->len == n && memcmp(pool + e->off, s, n) == 0) return (int64_t)i;
    }
}

static int32_t sm_get(const strmap *m, const char *pool, const char *s, size_t n)
{
    int64_t i = sm_find(m, pool, s, n);
    return i < 0 ? -1 : m->slots[i].value;
}

static int sm_rehash(strmap *m, size_t cap)
{
    strslot *slots = calloc(cap, sizeof *slots);
    if (!slots) return -1;
    if (m->slots) {
        for (size_t i = 0; i <= m->mask; i++) {
            if (!m->slots[i].hash) continue;
            size_t j = m->slots[i].hash & (cap - 1);
            while (slots[j].hash) j = (j + 1) & (cap - 1);
            slots[j] = m->slots[i];
        }
    }
    free(m->slots);
    m->slots = slots;
    m->mask = cap - 1;
    return 0;
}

/* Insert or overwrite (the last value for a key wins, as in a Rust HashMap collect). */
static int sm_put(strmap *m, const char *pool, size_t off, size_t n, int32_t value)
{
    if (!m->slots || (m->count + 1) * 2 > m->mask + 1)
        if (sm_rehash(m, m->slots ? (m->mask + 1) * 2 : 64)) return -1;
    uint64_t h = hash_bytes(pool + off, n);
    size_t i = h & m->mask;
    for (;; i = (i + 1) & m->mask) {
        strslot *e = &m->slots[i];
        if (!e->hash) break;
        if (e->hash == h && e->len == n && memcmp(pool + e->off, pool + off, n) == 0) {
            e->value = value;
            return 0;
        }
    }
    m->slots[i] = (strslot){h, off, (uint32_t)n, value};
    m->count++;
    return 0;
}

/* (left id, right id) -> (rank, merged id). */
typedef struct pairslot {
    uint64_t key; /* UINT64_MAX: empty */
    uint32_t rank;
    int32_t new_id;
} pairslot;

typedef struct pairmap {
    pairslot *slots;
    size_t mask;
    int shift;
} pairmap;

static inline size_t pm_home(const pairmap *m, uint64_t key)
{
    return (size_t)((key * 0x9E3779B97F4A7C15ULL) >> m->shift);
}

static inline const pairslot *pm_get(const pairmap *m, int32_t a, int32_t b)
{
    if (!m->slots) return NULL;
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    for (size_t i = pm_home(m, key);; i = (i + 1) & m->mask) {
        const pairslot *e = &m->slots[i];
        if (e->key == key) return e;
        if (e->key == UINT64_MAX) return NULL;
    }
}

static int pm_init(pairmap *m, size_t n)
{
    size_t cap = 16;
    int bits = 4;
    while (cap < n * 2 + 16) {
        cap *= 2;
        bits++;
    }
    m->slots = malloc(cap * sizeof *m->slots);
    if (!m->slots) return -1;
    for (size_t i = 0; i < cap; i++) m->slots[i].key = UINT64_MAX;
    m->mask = cap - 1;
    m->shift = 64 - bits;
    return 0;
}

static void pm_put(pairmap *m, int32_t a, int32_t b, uint32_t rank, int32_t new_id)
{
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    size_t i = pm_home(m, key);
    while (m->slots[i].key != UINT64_MAX && m->slots[i].key != key) i = (i + 1) & m->mask;
    m->slots[i] = (pairslot){key, rank, new_id};
}

/* ------------------------------------------------------------------------ */
/* The tokenizer                                                             */

typedef struct added_token {
    size_t content, content_len; /* pool */
    size_t pattern, pattern_len; /* pool: what is matched (normalized content if `normalized`) */
    int32_t id;
    uint8_t special, normalized, lstrip, rstrip, single_word;
} added_token;

/* Byte trie over added-token patterns, for leftmost-longest matching. */
typedef struct trie_node {
    int32_t child, sibling, token; /* token: index into added[], -1 */
    uint8_t byte;
} trie_node;

typedef struct trie {
    trie_node *nodes;
    size_t n, cap;
    uint8_t first[256]; /* bytes that start some pattern */
} trie;

typedef enum { NORM_PREPEND, NORM_REPLACE, NORM_NFC } norm_kind;
typedef struct norm_op {
    norm_kind kind;
    size_t a, alen, b, blen; /* pool: prepend text, or pattern and content */
} norm_op;

typedef enum { PRE_METASPACE, PRE_SPLIT, PRE_BYTELEVEL } pre_kind;
typedef enum { SCHEME_ALWAYS, SCHEME_FIRST, SCHEME_NEVER } prepend_scheme;
typedef enum { RE_GPT2, RE_LLAMA3, RE_QWEN2 } regex_kind;
typedef enum { SPLIT_ISOLATED, SPLIT_REMOVED } split_behavior;
typedef struct pre_op {
    pre_kind kind;
    size_t repl, repl_len; /* pool: Metaspace replacement (one character) */
    prepend_scheme scheme;
    int split;             /* Metaspace: split on the replacement */
    regex_kind regex;      /* Split; ByteLevel with use_regex uses RE_GPT2 */
    split_behavior behavior;
    int add_prefix_space, use_regex;
} pre_op;

typedef enum { DEC_REPLACE, DEC_BYTEFALLBACK, DEC_FUSE, DEC_STRIP, DEC_METASPACE, DEC_BYTELEVEL } dec_kind;
typedef struct dec_op {
    dec_kind kind;
    size_t a, alen, b, blen; /* pool: Replace pattern and content */
    uint32_t ch;             /* Strip content, Metaspace replacement */
    size_t start, stop;      /* Strip */
    prepend_scheme scheme;   /* Metaspace */
} dec_op;

struct ql_tokenizer {
    sbuf pool; /* every string, NUL-terminated, addressed by offset */

    /* model */
    strmap vocab;         /* piece -> id */
    size_t vocab_count;   /* entries in the model vocabulary */
    pairmap merges;
    int32_t byte_id[256]; /* "<0xNN>" tokens, -1 if absent */
    int32_t char_id[0x800]; /* single-character pieces below U+0800, -1 if absent */
    int has_unk, unk_id;  /* unk_id -1: unk_token names no vocabulary entry */
    size_t unk_name;      /* pool */
    int byte_fallback, fuse_unk, ignore_merges;
    size_t prefix, prefix_len, suffix, suffix_len; /* continuing_subword_prefix, end_of_word_suffix */
    int byte_level;       /* a ByteLevel pre-tokenizer is present */
    int byte_prefix_space; /* that ByteLevel's add_prefix_space (the first one's) */

    /* ids -> strings; SIZE_MAX offset: no token */
    size_t n_ids;
    size_t *piece_off;   /* piece() text */
    uint32_t *piece_len;
    size_t *dec_off;     /* what decode() feeds the decoder */
    uint32_t *dec_len;
    uint8_t *dec_special;

    /* added tokens */
    added_token *added;
    size_t n_added;
    strmap added_map;    /* content -> id */
    strmap special_set;  /* contents of special tokens */
    trie raw_trie, norm_trie;

    norm_op *norm;
    size_t n_norm;
    pre_op *pre;
    size_t n_pre;
    dec_op *dec;
    size_t n_dec;
    int has_decoder;

    ivec prefix_ids, suffix_ids; /* added around the sequence by add_special */
    int32_t bos, eos;
};

static const char *pool_str(const ql_tokenizer *t, size_t off) { return t->pool.p + off; }

static int pool_add(ql_tokenizer *t, const char *s, size_t n, size_t *off)
{
    *off = t->pool.len;
    if (sb_add(&t->pool, s, n)) return -1;
    t->pool.len++; /* keep the NUL */
    return 0;
}

static int32_t vocab_get(const ql_tokenizer *t, const char *s, size_t n)
{
    return sm_get(&t->vocab, t->pool.p, s, n);
}

/* ------------------------------------------------------------------------ */
/* Added-token matching (tokenizer/added_vocabulary.rs, find_matches)        */

static int trie_insert(trie *tr, const char *s, size_t n, int32_t token)
{
    if (!tr->nodes) {
        if (grow((void **)&tr->nodes, &tr->cap, 1, sizeof *tr->nodes)) return -1;
        tr->nodes[0] = (trie_node){-1, -1, -1, 0};
        tr->n = 1;
    }
    int32_t node = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t b = (uint8_t)s[i];
        int32_t c = tr->nodes[node].child;
        while (c >= 0 && tr->nodes[c].byte != b) c = tr->nodes[c].sibling;
        if (c < 0) {
            if (grow((void **)&tr->nodes, &tr->cap, tr->n + 1, sizeof *tr->nodes)) return -1;
            c = (int32_t)tr->n++;
            tr->nodes[c] = (trie_node){-1, tr->nodes[node].child, -1, b};
            tr->nodes[node].child = c;
        }
        node = c;
    }
    if (tr->nodes[node].token < 0) tr->nodes[node].token = token;
    tr->first[(uint8_t)s[0]] = 1;
    return 0;
}

typedef struct split {
    size_t off, len;
    int32_t id; /* added token id, or -1 for text */
} split;

typedef struct splits {
    split *p;
    size_t n, cap;
} splits;

static int splits_push(splits *v, size_t off, size_t len, int32_t id)
{
    if (grow((void **)&v->p, &v->cap, v->n + 1, sizeof *v->p)) return -1;
    v->p[v->n++] = (split){off, len, id};
    return 0;
}

static uint32_t char_before(const char *s, size_t end, size_t *start)
{
    size_t b = end - 1;
    while (b > 0 && end - b < 4 && ((unsigned char)s[b] & 0xC0) == 0x80) b--;
    uint32_t cp;
    int l = char_at(s + b, end - b, &cp);
    if ((size_t)l != end - b) { /* not a whole character: the last byte alone */
        b = end - 1;
        cp = UINT32_MAX;
    }
    *start = b;
    return cp;
}

static int is_word_char(uint32_t cp) { return cp != UINT32_MAX && (uc_class(cp) & UC_W); }

static int find_matches(const ql_tokenizer *t, const trie *tr, const char *s, size_t n, splits *out)
{
    out->n = 0;
    size_t start_offset = 0, i = 0;
    if (tr->nodes) {
        while (i < n) {
            if (!tr->first[(uint8_t)s[i]]) {
                i++;
                continue;
            }
            int32_t node = 0, best = -1;
            size_t best_len = 0;
            for (size_t j = i; j < n; j++) {
                int32_t c = tr->nodes[node].child;
                while (c >= 0 && tr->nodes[c].byte != (uint8_t)s[j]) c = tr->nodes[c].sibling;
                if (c < 0) break;
                node = c;
                if (tr->nodes[node].token >= 0) {
                    best = tr->nodes[node].token;
                    best_len = j - i + 1;
                }
            }
            if (best < 0) {
                i++;
                continue;
            }
            const added_token *a = &t->added[best];
            size_t start = i, stop = i + best_len;
            i = stop;
            if (a->single_word) {
                size_t b;
                uint32_t cp;
                int start_space = start == 0 || !is_word_char(char_before(s, start, &b));
                int stop_space = stop == n || (char_at(s + stop, n - stop, &cp), !is_word_char(cp));
                if (!start_space || !stop_space) continue;
            }
            if (a->lstrip) {
                size_t newstart = start;
                while (newstart > 0) {
                    size_t b;
                    uint32_t cp = char_before(s, newstart, &b);
                    if (cp == UINT32_MAX || !uc_space(cp)) break;
                    newstart = b;
                }
                start = newstart > start_offset ? newstart : start_offset;
            }
            if (a->rstrip) {
                while (stop < n) {
                    uint32_t cp;
                    int l = char_at(s + stop, n - stop, &cp);
                    if (cp == UINT32_MAX || !uc_space(cp)) break;
                    stop += (size_t)l;
                }
                i = stop;
            }
            if (start_offset < start && splits_push(out, start_offset, start - start_offset, -1)) return -1;
            if (splits_push(out, start, stop - start, a->id)) return -1;
            start_offset = stop;
        }
    }
    if (start_offset != n && splits_push(out, start_offset, n - start_offset, -1)) return -1;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Normalizers (normalizers/prepend.rs, replace.rs)                          */

/* Offset of the first occurrence of pat (non-empty) in s[from..n), or SIZE_MAX. */
static size_t find_bytes(const char *s, size_t n, size_t from, const char *pat, size_t plen)
{
    while (from + plen <= n) {
        const char *p = memchr(s + from, pat[0], n - plen + 1 - from);
        if (!p) return SIZE_MAX;
        size_t k = (size_t)(p - s);
        if (memcmp(p, pat, plen) == 0) return k;
        from = k + 1;
    }
    return SIZE_MAX;
}

static int replace_all(sbuf *out, const char *s, size_t n, const char *pat, size_t plen, const char *with,
                       size_t wlen)
{
    size_t i = 0;
    while (i < n) {
        size_t k = find_bytes(s, n, i, pat, plen);
        if (k == SIZE_MAX) break;
        if (sb_add(out, s + i, k - i) || sb_add(out, with, wlen)) return -1;
        i = k + plen;
    }
    return sb_add(out, s + i, n - i);
}

/* Unicode NFC (normalizers/unicode.rs) of s, appended to out.  utf8proc
 * composes; bytes that are not UTF-8 (only byte-level and byte-fallback
 * models take them) stay as they are and split the text into runs that are
 * normalized one by one. */
static int nfc(sbuf *out, const char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        size_t j = i;
        while (j < n) {
            uint32_t cp;
            int l = utf8_len((const unsigned char *)s + j, n - j, &cp);
            if (!l) break;
            j += (size_t)l;
        }
        if (j > i) {
            utf8proc_uint8_t *dst = NULL;
            utf8proc_ssize_t m = utf8proc_map((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(j - i), &dst,
                                              UTF8PROC_STABLE | UTF8PROC_COMPOSE);
            if (m < 0) return -1; /* only UTF8PROC_ERROR_NOMEM: the run is valid UTF-8 */
            int rc = sb_add(out, dst, (size_t)m);
            free(dst);
            if (rc) return -1;
            i = j;
        }
        if (i < n) {
            uint32_t cp;
            if (!utf8_len((const unsigned char *)s + i, n - i, &cp)) {
                if (sb_add(out, s + i, 1)) return -1;
                i++;
            }
        }
    }
    return 0;
}

/* Normalize s into out (cleared first); tmp is scratch. */
static int normalize(const ql_tokenizer *t, const char *s, size_t n, sbuf *out, sbuf *tmp)
{
    out->len = 0;
    if (sb_add(out, s, n)) return -1;
    for (size_t k = 0; k < t->n_norm; k++) {
        const norm_op *op = &t->norm[k];
        tmp->len = 0;
        if (op->kind == NORM_PREPEND) {
            if (out->len == 0) continue;
            if (sb_add(tmp, pool_str(t, op->a), op->alen) || sb_add(tmp, out->p, out->len)) return -1;
        } else if (op->kind == NORM_NFC) {
            if (sb_reserve(tmp, out->len) || nfc(tmp, out->p, out->len)) return -1;
        } else {
            if (replace_all(tmp, out->p, out->len, pool_str(t, op->a), op->alen, pool_str(t, op->b), op->blen))
                return -1;
        }
        sbuf x = *out;
        *out = *tmp;
        *tmp = x;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Pre-tokenizers (pre_tokenizers/metaspace.rs, split.rs, byte_level.rs)     */

/* GPT-2 byte -> character map (byte_level.rs, bytes_char): printable bytes
 * stand for themselves, the other 68 take U+0100.. in byte order. */
static uint32_t byte_char(uint8_t b)
{
    if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE) return b;
    if (b <= 0x20) return 256u + b;
    if (b <= 0xA0) return 256u + 33u + (b - 0x7Fu);
    return 256u + 67u; /* 0xAD */
}

/* Inverse of byte_char; -1 for characters outside the byte alphabet. */
static int char_byte(uint32_t cp)
{
    if (cp < 256) return byte_char((uint8_t)cp) == cp ? (int)cp : -1;
    if (cp < 256 + 33) return (int)(cp - 256);
    if (cp < 256 + 67) return (int)(0x7F + (cp - 256 - 33));
    return cp == 256 + 67 ? 0xAD : -1;
}

typedef struct cinfo {
    size_t off;
    uint32_t cp; /* UINT32_MAX: invalid byte */
    int len;
    unsigned cls; /* UC_* bits */
    int space;
} cinfo;

static cinfo ch_at(const char *s, size_t n, size_t off)
{
    cinfo c;
    c.off = off;
    c.len = off < n ? char_at(s + off, n - off, &c.cp) : 0;
    if (off >= n) c.cp = UINT32_MAX;
    c.cls = (off < n && c.cp != UINT32_MAX) ? uc_class(c.cp) : 0;
    c.space = off < n && c.cp != UINT32_MAX && uc_space(c.cp);
    return c;
}

static int is_other(cinfo c) { return c.len > 0 && !c.space && !(c.cls & (UC_L | UC_N)); }

static size_t run_of(const char *s, size_t n, size_t i, int (*pred)(cinfo))
{
    while (i < n) {
        cinfo c = ch_at(s, n, i);
        if (!pred(c)) break;
        i += (size_t)c.len;
    }
    return i;
}

static int is_letter(cinfo c) { return (c.cls & UC_L) != 0; }
static int is_number(cinfo c) { return (c.cls & UC_N) != 0; }
static int is_space(cinfo c) { return c.space; }

static int ascii_lower(uint32_t cp) { return cp < 0x80 && cp >= 'A' && cp <= 'Z' ? (int)(cp + 32) : (int)cp; }

/* Length of the contraction ('s 't 're 've 'm 'll 'd) at i, 0 if none. */
static size_t contraction(const char *s, size_t n, size_t i, int ignore_case)
{
    if (s[i] != '\'' || i + 1 >= n) return 0;
    cinfo c1 = ch_at(s, n, i + 1);
    uint32_t a = c1.cp;
    if (ignore_case) {
        if (a == 0x17F) a = 's'; /* LATIN SMALL LETTER LONG S folds to s */
        a = (uint32_t)ascii_lower(a);
    }
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 1 + (size_t)c1.len;
    if (a == 'r' || a == 'v' || a == 'l') {
        if (i + 2 >= n) return 0;
        uint32_t b = (uint32_t)s[i + 2];
        if (ignore_case) b = (uint32_t)ascii_lower(b);
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    }
    return 0;
}

/* \s+(?!\S)|\s+ at i (i is whitespace): the whole run if it ends the text or
 * leaves one space for the next word, else one character. */
static size_t space_tail(const char *s, size_t n, size_t i)
{
    size_t end = run_of(s, n, i, is_space);
    if (end == n) return end - i;
    size_t b;
    char_before(s, end, &b);
    if (b > i) return b - i;
    return end - i;
}

/* Length of the regex match at i (the patterns always match something). */
static size_t regex_match(regex_kind kind, const char *s, size_t n, size_t i)
{
    cinfo c0 = ch_at(s, n, i);
    if (kind == RE_GPT2) {
        /* 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
        size_t k = contraction(s, n, i, 0);
        if (k) return k;
        size_t j = i;
        if (s[i] == ' ' && i + 1 < n) {
            cinfo c1 = ch_at(s, n, i + 1);
            if (is_letter(c1) || is_number(c1) || is_other(c1)) {
                j = i + 1;
                c0 = c1;
            }
        }
        if (is_letter(c0)) return run_of(s, n, j, is_letter) - i;
        if (is_number(c0)) return run_of(s, n, j, is_number) - i;
        if (is_other(c0)) return run_of(s, n, j, is_other) - i;
        return space_tail(s, n, i);
    }
    /* (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
     * \s*[\r\n]+|\s+(?!\S)|\s+          (Qwen2: \p{N} instead of \p{N}{1,3}) */
    size_t k = contraction(s, n, i, 1);
    if (k) return k;
    if (is_letter(c0)) return run_of(s, n, i, is_letter) - i;
    if (!is_number(c0) && c0.cp != '\r' && c0.cp != '\n' && i + (size_t)c0.len < n) {
        cinfo c1 = ch_at(s, n, i + (size_t)c0.len);
        if (is_letter(c1)) return run_of(s, n, c1.off, is_letter) - i;
    }
    if (is_number(c0)) {
        size_t j = i;
        int max = kind == RE_LLAMA3 ? 3 : 1;
        for (int d = 0; d < max && j < n; d++) {
            cinfo c = ch_at(s, n, j);
            if (!is_number(c)) break;
            j += (size_t)c.len;
        }
        return j - i;
    }
    {
        size_t j = i;
        cinfo c = c0;
        if (s[i] == ' ' && i + 1 < n && is_other(ch_at(s, n, i + 1))) {
            j = i + 1;
            c = ch_at(s, n, j);
        }
        if (is_other(c)) {
            j = run_of(s, n, j, is_other);
            while (j < n && (s[j] == '\r' || s[j] == '\n')) j++;
            return j - i;
        }
    }
    /* c0 is whitespace here */
    size_t end = run_of(s, n, i, is_space);
    size_t last_nl = SIZE_MAX;
    for (size_t j = i; j < end; j++)
        if (s[j] == '\r' || s[j] == '\n') last_nl = j;
    if (last_nl != SIZE_MAX) return last_nl + 1 - i;
    return space_tail(s, n, i);
}

static int pre_tokenize_one(const ql_tokenizer *t, const pre_op *op, const char *s, size_t n, int first, slist *out,
                            sbuf *tmp)
{
    if (op->kind == PRE_METASPACE) {
        const char *rep = pool_str(t, op->repl);
        size_t rl = op->repl_len;
        tmp->len = 0;
        int starts = n >= rl && memcmp(s, rep, rl) == 0;
        if (n > 0 && s[0] == ' ') starts = 1; /* becomes the replacement */
        int prepend = n > 0 && !starts &&
                      (op->scheme == SCHEME_ALWAYS || (op->scheme == SCHEME_FIRST && first));
        if (prepend && sb_add(tmp, rep, rl)) return -1;
        if (replace_all(tmp, s, n, " ", 1, rep, rl)) return -1;
        if (!op->split) return tmp->len ? sl_push(out, tmp->p, tmp->len, first) : 0;
        /* SplitDelimiterBehavior::MergedWithNext: every replacement starts a piece */
        size_t startp = 0;
        for (size_t i = 0; i + rl <= tmp->len;) {
            if (memcmp(tmp->p + i, rep, rl) == 0) {
                if (i > startp && sl_push(out, tmp->p + startp, i - startp, first && startp == 0)) return -1;
                if (i > startp) startp = i;
                i += rl;
            } else {
                i++;
            }
        }
        if (tmp->len > startp && sl_push(out, tmp->p + startp, tmp->len - startp, first && startp == 0)) return -1;
        return 0;
    }
    if (op->kind == PRE_SPLIT) {
        for (size_t i = 0; i < n;) {
            size_t k = regex_match(op->regex, s, n, i);
            if (op->behavior == SPLIT_ISOLATED && sl_push(out, s + i, k, first && i == 0)) return -1;
            i += k;
        }
        return 0;
    }
    /* PRE_BYTELEVEL */
    const char *src = s;
    size_t len = n;
    if (op->add_prefix_space && !(n > 0 && s[0] == ' ')) {
        tmp->len = 0;
        if (sb_add(tmp, " ", 1) || sb_add(tmp, s, n)) return -1;
        src = tmp->p;
        len = tmp->len;
    }
    for (size_t i = 0; i < len;) {
        size_t k = op->use_regex ? regex_match(RE_GPT2, src, len, i) : len - i;
        if (sl_open(out, first && i == 0)) return -1;
        for (size_t j = i; j < i + k; j++) {
            char u[4];
            int l = utf8_put(u, byte_char((uint8_t)src[j]));
            if (sl_append(out, u, (size_t)l)) return -1;
        }
        i += k;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* BPE (models/bpe/model.rs merge_word, word.rs merge_all)                   */

typedef struct sym {
    int32_t c;
    int32_t prev, next;
    uint32_t len; /* 0: merged away */
} sym;

typedef struct heap_entry {
    uint32_t rank, pos;
    int32_t new_id;
} heap_entry;

typedef struct enc_ctx {
    ivec out;
    splits raw, norm;
    sbuf nbuf, tmp, tmp2, word;
    slist pa, pb;
    sym *sym;
    size_t sym_cap, nsym;
    heap_entry *heap;
    size_t heap_cap, heap_n;
} enc_ctx;

static inline int heap_less(const heap_entry *a, const heap_entry *b)
{
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static int heap_push(enc_ctx *c, uint32_t rank, uint32_t pos, int32_t new_id)
{
    if (grow((void **)&c->heap, &c->heap_cap, c->heap_n + 1, sizeof *c->heap)) return -1;
    size_t i = c->heap_n++;
    heap_entry e = {rank, pos, new_id};
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(&e, &c->heap[p])) break;
        c->heap[i] = c->heap[p];
        i = p;
    }
    c->heap[i] = e;
    return 0;
}

static heap_entry heap_pop(enc_ctx *c)
{
    heap_entry top = c->heap[0];
    heap_entry last = c->heap[--c->heap_n];
    size_t i = 0, n = c->heap_n;
    for (;;) {
        size_t l = 2 * i + 1;
        if (l >= n) break;
        size_t m = l + 1 < n && heap_less(&c->heap[l + 1], &c->heap[l]) ? l + 1 : l;
        if (!heap_less(&c->heap[m], &last)) break;
        c->heap[i] = c->heap[m];
        i = m;
    }
    if (n) c->heap[i] = last;
    return top;
}

static int sym_add(enc_ctx *c, int32_t id, uint32_t len)
{
    if (grow((void **)&c->sym, &c->sym_cap, c->nsym + 1, sizeof *c->sym)) return -1;
    int32_t k = (int32_t)c->nsym;
    if (k > 0) c->sym[k - 1].next = k;
    c->sym[c->nsym++] = (sym){id, k - 1, -1, len};
    return 0;
}

static int32_t char_piece_id(const ql_tokenizer *t, const char *s, int len, uint32_t cp)
{
    if (cp < 0x800) return t->char_id[cp];
    return vocab_get(t, s, (size_t)len);
}

static int bpe_word(const ql_tokenizer *t, enc_ctx *c, const char *w, size_t n)
{
    if (n == 0) return QL_OK;
    if (t->ignore_merges) {
        int32_t id = vocab_get(t, w, n);
        if (id >= 0) return iv_push(&c->out, id) ? ql_error(QL_ENOMEM, "out of memory") : QL_OK;
    }
    c->nsym = 0;
    c->heap_n = 0;
    int32_t unk = -1;
    uint32_t unk_len = 0;
    int affix = t->prefix_len || t->suffix_len;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        int len = char_at(w + i, n - i, &cp);
        const char *s = w + i;
        size_t slen = (size_t)len;
        int32_t id;
        if (affix && ((i > 0 && t->prefix_len) || (i + (size_t)len == n && t->suffix_len))) {
            c->word.len = 0;
            if ((i > 0 && sb_add(&c->word, pool_str(t, t->prefix), t->prefix_len)) ||
                sb_add(&c->word, s, slen) ||
                (i + (size_t)len == n && sb_add(&c->word, pool_str(t, t->suffix), t->suffix_len)))
                return ql_error(QL_ENOMEM, "out of memory");
            s = c->word.p;
            slen = c->word.len;
            id = vocab_get(t, s, slen);
        } else {
            id = cp == UINT32_MAX ? -1 : char_piece_id(t, s, len, cp);
        }
        i += (size_t)len;
        if (id >= 0) {
            if (unk >= 0) {
                if (sym_add(c, unk, unk_len)) return ql_error(QL_ENOMEM, "out of memory");
                unk = -1;
            }
            if (sym_add(c, id, (uint32_t)len)) return ql_error(QL_ENOMEM, "out of memory");
            continue;
        }
        if (t->byte_fallback) {
            size_t k = 0;
            while (k < slen && t->byte_id[(uint8_t)s[k]] >= 0) k++;
            if (k == slen) {
                /* like the library, a pending <unk> is not flushed here */
                for (k = 0; k < slen; k++)
                    if (sym_add(c, t->byte_id[(uint8_t)s[k]], 1)) return ql_error(QL_ENOMEM, "out of memory");
                continue;
            }
        }
        if (!t->has_unk) continue; /* no unk token: the character is dropped */
        if (t->unk_id < 0)
            return ql_error(QL_EFORMAT, "unk_token '%s' is not in the vocabulary", pool_str(t, t->unk_name));
        if (unk >= 0 && t->fuse_unk) {
            unk_len += (uint32_t)len;
        } else {
            if (unk >= 0 && sym_add(c, unk, unk_len)) return ql_error(QL_ENOMEM, "out of memory");
            unk = t->unk_id;
            unk_len = (uint32_t)len;
        }
    }
    if (unk >= 0 && sym_add(c, unk, unk_len)) return ql_error(QL_ENOMEM, "out of memory");

    sym *S = c->sym;
    for (size_t k = 0; k + 1 < c->nsym; k++) {
        const pairslot *m = pm_get(&t->merges, S[k].c, S[k + 1].c);
        if (m && heap_push(c, m->rank, (uint32_t)k, m->new_id)) return ql_error(QL_ENOMEM, "out of memory");
    }
    while (c->heap_n) {
        heap_entry top = heap_pop(c);
        S = c->sym;
        sym *cur = &S[top.pos];
        if (cur->len == 0 || cur->next < 0) continue;
        int32_t next_pos = cur->next;
        sym right = S[next_pos];
        const pairslot *m = pm_get(&t->merges, cur->c, right.c);
        if (!m || m->new_id != top.new_id) continue; /* stale entry */
        cur->c = top.new_id;
        cur->len += right.len;
        cur->next = right.next;
        S[next_pos].len = 0;
        if (right.next >= 0) S[right.next].prev = (int32_t)top.pos;
        if (cur->prev >= 0) {
            const pairslot *p = pm_get(&t->merges, S[cur->prev].c, cur->c);
            if (p && heap_push(c, p->rank, (uint32_t)cur->prev, p->new_id)) return ql_error(QL_ENOMEM, "out of memory");
            S = c->sym;
            cur = &S[top.pos];
        }
        if (cur->next >= 0) {
            const pairslot *p = pm_get(&t->merges, cur->c, S[cur->next].c);
            if (p && heap_push(c, p->rank, top.pos, p->new_id)) return ql_error(QL_ENOMEM, "out of memory");
        }
    }
    for (size_t k = 0; k < c->nsym; k++)
        if (c->sym[k].len && iv_push(&c->out, c->sym[k].c)) return ql_error(QL_ENOMEM, "out of memory");
    return QL_OK;
}

/* ------------------------------------------------------------------------ */
/* Encode                                                                    */

static int encode_piece(const ql_tokenizer *t, enc_ctx *c, const char *s, size_t n, int first)
{
    if (t->n_pre == 0) return bpe_word(t, c, s, n);
    slist *in = &c->pa, *out = &c->pb;
    sl_clear(in);
    if (sl_push(in, s, n, first)) return ql_error(QL_ENOMEM, "out of memory");
    for (size_t k = 0; k < t->n_pre; k++) {
        sl_clear(out);
        for (size_t j = 0; j < in->n; j++) {
            const span *p = &in->it[j];
            if (pre_tokenize_one(t, &t->pre[k], in->text.p + p->off, p->len, p->first, out, &c->tmp2))
                return ql_error(QL_ENOMEM, "out of memory");
        }
        slist *x = in;
        in = out;
        out = x;
    }
    for (size_t j = 0; j < in->n; j++) {
        int rc = bpe_word(t, c, in->text.p + in->it[j].off, in->it[j].len);
        if (rc) return rc;
    }
    return QL_OK;
}

static int encode_segment(const ql_tokenizer *t, enc_ctx *c, const char *s, size_t n, int first)
{
    const char *text = s;
    size_t len = n;
    if (t->n_norm) {
        if (normalize(t, s, n, &c->nbuf, &c->tmp)) return ql_error(QL_ENOMEM, "out of memory");
        text = c->nbuf.p;
        len = c->nbuf.len;
    }
    if (len == 0) return QL_OK;
    if (!t->norm_trie.nodes) return encode_piece(t, c, text, len, first);
    if (find_matches(t, &t->norm_trie, text, len, &c->norm)) return ql_error(QL_ENOMEM, "out of memory");
    for (size_t k = 0; k < c->norm.n; k++) {
        const split *p = &c->norm.p[k];
        if (p->id >= 0) {
            if (iv_push(&c->out, p->id)) return ql_error(QL_ENOMEM, "out of memory");
            continue;
        }
        int rc = encode_piece(t, c, text + p->off, p->len, first && p->off == 0);
        if (rc) return rc;
    }
    return QL_OK;
}

static void enc_free(enc_ctx *c)
{
    free(c->out.p);
    free(c->raw.p);
    free(c->norm.p);
    free(c->nbuf.p);
    free(c->tmp.p);
    free(c->tmp2.p);
    free(c->word.p);
    sl_free(&c->pa);
    sl_free(&c->pb);
    free(c->sym);
    free(c->heap);
}

int ql_tokenizer_encode(const ql_tokenizer *t, const char *text, size_t len, int add_special, int32_t **ids,
                        size_t *n)
{
    if (ids) *ids = NULL;
    if (n) *n = 0;
    if (!t || !ids || !n || (!text && len)) return ql_error(QL_EINVAL, "ql_tokenizer_encode: NULL argument");
    if (!t->byte_fallback && !t->byte_level) {
        for (size_t i = 0; i < len;) {
            uint32_t cp;
            int l = utf8_len((const unsigned char *)text + i, len - i, &cp);
            if (!l)
                return ql_error(QL_EINVAL,
                                "text is not valid UTF-8 (byte 0x%02X at offset %zu) and the tokenizer has no "
                                "byte fallback",
                                (unsigned char)text[i], i);
            i += (size_t)l;
        }
    }
    enc_ctx c;
    memset(&c, 0, sizeof c);
    int rc = QL_OK;
    if (iv_push(&c.out, 0)) { /* allocate, so *ids is never NULL */
        rc = ql_error(QL_ENOMEM, "out of memory");
        goto done;
    }
    c.out.len = 0;
    if (add_special)
        for (size_t k = 0; k < t->prefix_ids.len; k++)
            if (iv_push(&c.out, t->prefix_ids.p[k])) {
                rc = ql_error(QL_ENOMEM, "out of memory");
                goto done;
            }
    if (find_matches(t, &t->raw_trie, text ? text : "", len, &c.raw)) {
        rc = ql_error(QL_ENOMEM, "out of memory");
        goto done;
    }
    for (size_t k = 0; k < c.raw.n && !rc; k++) {
        const split *p = &c.raw.p[k];
        if (p->id >= 0) {
            if (iv_push(&c.out, p->id)) rc = ql_error(QL_ENOMEM, "out of memory");
        } else {
            rc = encode_segment(t, &c, text + p->off, p->len, p->off == 0);
        }
    }
    if (rc) goto done;
    if (add_special)
        for (size_t k = 0; k < t->suffix_ids.len; k++)
            if (iv_push(&c.out, t->suffix_ids.p[k])) {
                rc = ql_error(QL_ENOMEM, "out of memory");
                goto done;
            }
    *ids = c.out.p;
    *n = c.out.len;
    c.out.p = NULL;
done:
    enc_free(&c);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Decode (decoders/ *.rs)                                                   */

/* Rust's String::from_utf8_lossy. */
static int push_lossy(sbuf *out, const char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        int l = utf8_len((const unsigned char *)s + i, n - i, &cp);
        if (l) {
            if (sb_add(out, s + i, (size_t)l)) return -1;
            i += (size_t)l;
        } else {
            if (sb_add(out, "\xEF\xBF\xBD", 3)) return -1;
            i += (size_t)utf8_bad_len((const unsigned char *)s + i, n - i);
        }
    }
    return 0;
}

static int hexval(char ch)
{
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* u8::from_str_radix(token[3..5], 16) on "<0xNN>" */
static int byte_token(const char *s, size_t n)
{
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
    int a = hexval(s[3]), b = hexval(s[4]);
    if (s[3] == '+' && b >= 0) return b;
    if (a < 0 || b < 0) return -1;
    return a * 16 + b;
}

static int flush_bytes(slist *out, sbuf *bytes)
{
    if (!bytes->len) return 0;
    int rc = 0;
    if (utf8_valid(bytes->p, bytes->len)) {
        rc = sl_push(out, bytes->p, bytes->len, 0);
    } else {
        for (size_t k = 0; k < bytes->len && !rc; k++) rc = sl_push(out, "\xEF\xBF\xBD", 3, 0);
    }
    bytes->len = 0;
    return rc;
}

static int decode_step(const ql_tokenizer *t, const dec_op *op, const slist *in, slist *out, sbuf *tmp)
{
    sl_clear(out);
    tmp->len = 0;
    switch (op->kind) {
    case DEC_REPLACE:
        for (size_t k = 0; k < in->n; k++) {
            tmp->len = 0;
            if (replace_all(tmp, in->text.p + in->it[k].off, in->it[k].len, pool_str(t, op->a), op->alen,
                            pool_str(t, op->b), op->blen) ||
                sl_push(out, tmp->p, tmp->len, 0))
                return -1;
        }
        return 0;
    case DEC_BYTEFALLBACK:
        for (size_t k = 0; k < in->n; k++) {
            const char *s = in->text.p + in->it[k].off;
            int b = byte_token(s, in->it[k].len);
            if (b >= 0) {
                char ch = (char)b;
                if (sb_add(tmp, &ch, 1)) return -1;
            } else if (flush_bytes(out, tmp) || sl_push(out, s, in->it[k].len, 0)) {
                return -1;
            }
        }
        return flush_bytes(out, tmp);
    case DEC_FUSE:
        if (sl_open(out, 0)) return -1;
        for (size_t k = 0; k < in->n; k++)
            if (sl_append(out, in->text.p + in->it[k].off, in->it[k].len)) return -1;
        return 0;
    case DEC_STRIP:
        for (size_t k = 0; k < in->n; k++) {
            const char *s = in->text.p + in->it[k].off;
            size_t n = in->it[k].len, a = 0, z = n;
            for (size_t i = 0; i < op->start && a < n; i++) {
                uint32_t cp;
                int l = char_at(s + a, n - a, &cp);
                if (cp != op->ch) break;
                a += (size_t)l;
            }
            for (size_t i = 0; i < op->stop && z > a; i++) {
                size_t b;
                if (char_before(s, z, &b) != op->ch) break;
                z = b;
            }
            if (sl_push(out, s + a, z - a, 0)) return -1;
        }
        return 0;
    case DEC_METASPACE:
        for (size_t k = 0; k < in->n; k++) {
            const char *s = in->text.p + in->it[k].off;
            size_t n = in->it[k].len;
            if (sl_open(out, 0)) return -1;
            for (size_t i = 0; i < n;) {
                uint32_t cp;
                int l = char_at(s + i, n - i, &cp);
                if (cp == op->ch) {
                    if (!(k == 0 && op->scheme != SCHEME_NEVER) && sl_append(out, " ", 1)) return -1;
                } else if (sl_append(out, s + i, (size_t)l)) {
                    return -1;
                }
                i += (size_t)l;
            }
        }
        return 0;
    case DEC_BYTELEVEL:
        for (size_t k = 0; k < in->n; k++) {
            const char *s = in->text.p + in->it[k].off;
            size_t n = in->it[k].len, mark = tmp->len, i = 0;
            while (i < n) {
                uint32_t cp;
                int l = char_at(s + i, n - i, &cp);
                int byte = char_byte(cp);
                if (byte < 0) break;
                char ch = (char)byte;
                if (sb_add(tmp, &ch, 1)) return -1;
                i += (size_t)l;
            }
            if (i < n) { /* a character outside the byte alphabet: the token's own bytes */
                tmp->len = mark;
                if (sb_add(tmp, s, n)) return -1;
            }
        }
        if (sl_open(out, 0)) return -1;
        {
            sbuf lossy = {0};
            int rc = push_lossy(&lossy, tmp->p ? tmp->p : "", tmp->len);
            if (!rc) rc = sl_append(out, lossy.p ? lossy.p : "", lossy.len);
            free(lossy.p);
            return rc;
        }
    }
    return -1;
}

int ql_tokenizer_decode(const ql_tokenizer *t, const int32_t *ids, size_t n, int skip_special, char **text)
{
    return ql_tokenizer_decode_len(t, ids, n, skip_special, text, NULL);
}

int ql_tokenizer_decode_len(const ql_tokenizer *t, const int32_t *ids, size_t n, int skip_special, char **text,
                            size_t *len)
{
    if (text) *text = NULL;
    if (len) *len = 0;
    if (!t || !text || (!ids && n)) return ql_error(QL_EINVAL, "ql_tokenizer_decode: NULL argument");
    slist a = {0}, b = {0};
    sbuf tmp = {0}, res = {0};
    int rc = QL_OK;
    for (size_t k = 0; k < n; k++) {
        int32_t id = ids[k];
        if (id < 0 || (size_t)id >= t->n_ids || t->dec_off[id] == SIZE_MAX) continue;
        if (skip_special && t->dec_special[id]) continue;
        if (sl_push(&a, pool_str(t, t->dec_off[id]), t->dec_len[id], 0)) goto oom;
    }
    slist *in = &a, *out = &b;
    if (t->has_decoder) {
        for (size_t k = 0; k < t->n_dec; k++) {
            if (decode_step(t, &t->dec[k], in, out, &tmp)) goto oom;
            slist *x = in;
            in = out;
            out = x;
        }
    }
    if (sb_add(&res, "", 0)) goto oom;
    for (size_t k = 0; k < in->n; k++) {
        if (!t->has_decoder && k > 0 && sb_add(&res, " ", 1)) goto oom;
        if (sb_add(&res, in->text.p + in->it[k].off, in->it[k].len)) goto oom;
    }
    *text = res.p;
    if (len) *len = res.len;
    res.p = NULL;
    goto done;
oom:
    rc = ql_error(QL_ENOMEM, "out of memory");
done:
    sl_free(&a);
    sl_free(&b);
    free(tmp.p);
    free(res.p);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Accessors                                                                 */

int32_t ql_tokenizer_bos(const ql_tokenizer *t) { return t ? t->bos : -1; }
int32_t ql_tokenizer_eos(const ql_tokenizer *t) { return t ? t->eos : -1; }
size_t ql_tokenizer_vocab_size(const ql_tokenizer *t) { return t ? t->n_ids : 0; }

const char *ql_tokenizer_piece(const ql_tokenizer *t, int32_t id)
{
    if (!t || id < 0 || (size_t)id >= t->n_ids || t->piece_off[id] == SIZE_MAX) return NULL;
    return pool_str(t, t->piece_off[id]);
}

int32_t ql_tokenizer_token_id(const ql_tokenizer *t, const char *piece)
{
    if (!t || !piece) return -1;
    size_t n = strlen(piece);
    int32_t id = sm_get(&t->added_map, t->pool.p, piece, n);
    return id >= 0 ? id : vocab_get(t, piece, n);
}

/* ------------------------------------------------------------------------ */
/* Loading                                                                   */

void ql_tokenizer_destroy(ql_tokenizer *t)
{
    if (!t) return;
    free(t->pool.p);
    free(t->vocab.slots);
    free(t->merges.slots);
    free(t->piece_off);
    free(t->piece_len);
    free(t->dec_off);
    free(t->dec_len);
    free(t->dec_special);
    free(t->added);
    free(t->added_map.slots);
    free(t->special_set.slots);
    free(t->raw_trie.nodes);
    free(t->norm_trie.nodes);
    free(t->norm);
    free(t->pre);
    free(t->dec);
    free(t->prefix_ids.p);
    free(t->suffix_ids.p);
    free(t);
}

#define OOM() ql_error(QL_ENOMEM, "out of memory")

/* The string value of `key`, or NULL (absent or null). Not a string: error. */
static int get_str(const char *where, json_t *o, const char *key, const char **s, size_t *n)
{
    json_t *v = json_object_get(o, key);
    *s = NULL;
    if (n) *n = 0;
    if (!v || json_is_null(v)) return QL_OK;
    if (!json_is_string(v)) return ql_error(QL_EFORMAT, "%s: \"%s\" must be a string", where, key);
    *s = json_string_value(v);
    if (n) *n = json_string_length(v);
    return QL_OK;
}

static int get_bool(const char *where, json_t *o, const char *key, int def, int *out)
{
    json_t *v = json_object_get(o, key);
    *out = def;
    if (!v || json_is_null(v)) return QL_OK;
    if (!json_is_boolean(v)) return ql_error(QL_EFORMAT, "%s: \"%s\" must be true or false", where, key);
    *out = json_is_true(v);
    return QL_OK;
}

static const char *type_of(json_t *o)
{
    json_t *v = json_object_get(o, "type");
    return json_is_string(v) ? json_string_value(v) : NULL;
}

/* Refuse a field the library would read but this tokenizer does not know:
 * every component's fields are listed (`keys`, NULL-terminated), so a file
 * written by a newer library, or a hand-edited one, is not silently read
 * differently. */
static int check_keys(const char *path, const char *what, json_t *o, const char *const *keys)
{
    const char *key;
    json_t *v;
    json_object_foreach(o, key, v)
    {
        size_t k = 0;
        while (keys[k] && strcmp(keys[k], key) != 0) k++;
        if (!keys[k]) return ql_error(QL_ENOTSUP, "%s: %s field \"%s\" is not supported", path, what, key);
    }
    return QL_OK;
}

#define KEYS(...) ((const char *const[]){__VA_ARGS__, NULL})

/* The one character of a Metaspace replacement / Strip content. */
static int single_char(const char *where, const char *key, const char *s, size_t n, uint32_t *cp)
{
    int l = s && n ? utf8_len((const unsigned char *)s, n, cp) : 0;
    if (!l || (size_t)l != n) return ql_error(QL_EFORMAT, "%s: \"%s\" must be exactly one character", where, key);
    return QL_OK;
}

static int load_model(ql_tokenizer *t, const char *path, json_t *model)
{
    if (!json_is_object(model)) return ql_error(QL_EFORMAT, "%s: \"model\" must be an object", path);
    const char *type = type_of(model);
    json_t *vocab = json_object_get(model, "vocab");
    json_t *merges = json_object_get(model, "merges");
    if (type && strcmp(type, "BPE") != 0)
        return ql_error(QL_ENOTSUP, "%s: tokenizer model type '%s' is not supported (only BPE)", path, type);
    if (!type && (!vocab || !merges))
        return ql_error(QL_ENOTSUP, "%s: tokenizer model without a type and without vocab/merges is not supported",
                        path);
    if (!json_is_object(vocab) || !json_is_array(merges))
        return ql_error(QL_EFORMAT, "%s: BPE model needs a \"vocab\" object and a \"merges\" array", path);
    char where[64];
    snprintf(where, sizeof where, "model");
    int rc = check_keys(path, "model BPE", model,
                        KEYS("type", "dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix",
                             "fuse_unk", "byte_fallback", "ignore_merges", "vocab", "merges"));
    if (rc) return rc;
    json_t *dropout = json_object_get(model, "dropout");
    if (dropout && !json_is_null(dropout)) {
        if (!json_is_number(dropout)) return ql_error(QL_EFORMAT, "%s: model.dropout must be a number or null", path);
        double p = json_number_value(dropout);
        if (!(p >= 0.0 && p <= 1.0)) return ql_error(QL_EFORMAT, "%s: model.dropout %g is not in [0, 1]", path, p);
        if (p > 0.0)
            return ql_error(QL_ENOTSUP, "%s: BPE dropout %g makes encoding random and is not supported; set it to null",
                            path, p);
    }
    const char *s;
    size_t n;
    if ((rc = get_bool(where, model, "byte_fallback", 0, &t->byte_fallback)) ||
        (rc = get_bool(where, model, "fuse_unk", 0, &t->fuse_unk)) ||
        (rc = get_bool(where, model, "ignore_merges", 0, &t->ignore_merges)))
        return ql_error_context("%s", path);
    if ((rc = get_str(where, model, "continuing_subword_prefix", &s, &n))) return ql_error_context("%s", path);
    if (s && pool_add(t, s, n, &t->prefix)) return OOM();
    t->prefix_len = s ? n : 0;
    if ((rc = get_str(where, model, "end_of_word_suffix", &s, &n))) return ql_error_context("%s", path);
    if (s && pool_add(t, s, n, &t->suffix)) return OOM();
    t->suffix_len = s ? n : 0;

    /* vocabulary */
    size_t count = json_object_size(vocab);
    t->vocab_count = count;
    if (sm_rehash(&t->vocab, 64)) return OOM();
    while ((t->vocab.mask + 1) < count * 2 + 2)
        if (sm_rehash(&t->vocab, (t->vocab.mask + 1) * 2)) return OOM();
    const char *key;
    size_t klen;
    json_t *val;
    size_t max_id = 0;
    json_object_keylen_foreach(vocab, key, klen, val)
    {
        if (!json_is_integer(val) || json_integer_value(val) < 0 || json_integer_value(val) > INT32_MAX)
            return ql_error(QL_EFORMAT, "%s: model.vocab[\"%s\"] must be an id between 0 and 2^31-1", path, key);
        size_t off;
        if (pool_add(t, key, klen, &off) || sm_put(&t->vocab, t->pool.p, off, klen, (int32_t)json_integer_value(val)))
            return OOM();
        if ((size_t)json_integer_value(val) > max_id) max_id = (size_t)json_integer_value(val);
    }
    /* ids index tables of max_id + 1 entries.  The library allows holes (a
     * vocabulary with deleted entries), but at most as many holes as entries
     * here, which keeps memory proportional to the file. */
    if (count && max_id / 2 >= count)
        return ql_error(QL_EFORMAT,
                        "%s: model.vocab uses id %zu but has only %zu entries; ids must be below twice the entry count",
                        path, max_id, count);
    t->n_ids = count ? max_id + 1 : 0;

    /* unk */
    if ((rc = get_str(where, model, "unk_token", &s, &n))) return ql_error_context("%s", path);
    t->has_unk = s != NULL;
    t->unk_id = -1;
    if (s) {
        if (pool_add(t, s, n, &t->unk_name)) return OOM();
        t->unk_id = vocab_get(t, s, n);
    }

    /* merges: ["a", "b"] pairs or legacy "a b" strings (models/bpe/serialization.rs) */
    size_t nm = json_array_size(merges);
    if (pm_init(&t->merges, nm)) return OOM();
    sbuf cat = {0};
    size_t rank = 0;
    rc = QL_OK;
    for (size_t i = 0; i < nm && !rc; i++) {
        json_t *m = json_array_get(merges, i);
        const char *a, *b;
        size_t al, bl;
        if (json_is_string(m)) {
            a = json_string_value(m);
            size_t len = json_string_length(m);
            if (len >= 8 && memcmp(a, "#version", 8) == 0) continue;
            const char *sp = memchr(a, ' ', len);
            if (!sp || memchr(sp + 1, ' ', len - (size_t)(sp + 1 - a))) {
                rc = ql_error(QL_EFORMAT, "%s: model.merges[%zu] \"%s\" is not two tokens separated by one space", path,
                              i, a);
                break;
            }
            al = (size_t)(sp - a);
            b = sp + 1;
            bl = len - al - 1;
        } else if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
                   json_is_string(json_array_get(m, 1))) {
            a = json_string_value(json_array_get(m, 0));
            al = json_string_length(json_array_get(m, 0));
            b = json_string_value(json_array_get(m, 1));
            bl = json_string_length(json_array_get(m, 1));
        } else {
            rc = ql_error(QL_EFORMAT, "%s: model.merges[%zu] must be a [\"left\", \"right\"] pair or a \"left right\" string",
                          path, i);
            break;
        }
        int32_t ia = vocab_get(t, a, al), ib = vocab_get(t, b, bl);
        if (ia < 0 || ib < 0) {
            rc = ql_error(QL_EFORMAT, "%s: model.merges[%zu] names token '%.*s' that is not in the vocabulary", path, i,
                          (int)(ia < 0 ? al : bl), ia < 0 ? a : b);
            break;
        }
        if (bl < t->prefix_len) {
            rc = ql_error(QL_EFORMAT, "%s: model.merges[%zu]: '%.*s' is shorter than continuing_subword_prefix", path,
                          i, (int)bl, b);
            break;
        }
        cat.len = 0;
        if (sb_add(&cat, a, al) || sb_add(&cat, b + t->prefix_len, bl - t->prefix_len)) {
            rc = OOM();
            break;
        }
        int32_t inew = vocab_get(t, cat.p, cat.len);
        if (inew < 0) {
            rc = ql_error(QL_EFORMAT, "%s: model.merges[%zu]: merged token '%s' is not in the vocabulary", path, i,
                          cat.p);
            break;
        }
        pm_put(&t->merges, ia, ib, (uint32_t)rank++, inew);
    }
    free(cat.p);
    if (rc) return rc;

    /* fast tables */
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        t->byte_id[b] = vocab_get(t, name, 6);
    }
    for (uint32_t cp = 0; cp < 0x800; cp++) {
        char u[4];
        int l = utf8_put(u, cp);
        t->char_id[cp] = (cp >= 0xD800 && cp < 0xE000) ? -1 : vocab_get(t, u, (size_t)l);
    }
    return QL_OK;
}

static int add_norm(ql_tokenizer *t, const char *path, json_t *n, size_t *cap)
{
    if (!n || json_is_null(n)) return QL_OK;
    const char *type = type_of(n);
    if (!json_is_object(n) || !type) return ql_error(QL_EFORMAT, "%s: normalizer without a \"type\"", path);
    if (!strcmp(type, "Sequence")) {
        json_t *list = json_object_get(n, "normalizers");
        if (!json_is_array(list)) return ql_error(QL_EFORMAT, "%s: Sequence normalizer needs \"normalizers\"", path);
        int rc = check_keys(path, "normalizer Sequence", n, KEYS("type", "normalizers"));
        if (rc) return rc;
        for (size_t i = 0; i < json_array_size(list); i++) {
            int rc = add_norm(t, path, json_array_get(list, i), cap);
            if (rc) return rc;
        }
        return QL_OK;
    }
    norm_op op;
    memset(&op, 0, sizeof op);
    const char *a, *b;
    size_t al, bl;
    int rc;
    if (!strcmp(type, "Prepend")) {
        op.kind = NORM_PREPEND;
        if ((rc = check_keys(path, "normalizer Prepend", n, KEYS("type", "prepend")))) return rc;
        if ((rc = get_str("normalizer Prepend", n, "prepend", &a, &al))) return ql_error_context("%s", path);
        if (!a) return ql_error(QL_EFORMAT, "%s: Prepend normalizer needs \"prepend\"", path);
        if (pool_add(t, a, al, &op.a)) return OOM();
        op.alen = al;
    } else if (!strcmp(type, "Replace")) {
        op.kind = NORM_REPLACE;
        json_t *pat = json_object_get(n, "pattern");
        if ((rc = check_keys(path, "normalizer Replace", n, KEYS("type", "pattern", "content"))) ||
            (rc = check_keys(path, "normalizer Replace pattern", pat, KEYS("String", "Regex"))))
            return rc;
        if (json_is_object(pat) && json_object_get(pat, "Regex"))
            return ql_error(QL_ENOTSUP, "%s: normalizer Replace with a Regex pattern is not supported", path);
        if ((rc = get_str("normalizer Replace pattern", pat, "String", &a, &al)) ||
            (rc = get_str("normalizer Replace", n, "content", &b, &bl)))
            return ql_error_context("%s", path);
        if (!a || !al || !b) return ql_error(QL_EFORMAT, "%s: Replace normalizer needs a non-empty pattern.String and a content", path);
        if (pool_add(t, a, al, &op.a) || pool_add(t, b, bl, &op.b)) return OOM();
        op.alen = al;
        op.blen = bl;
    } else if (!strcmp(type, "NFC")) {
        op.kind = NORM_NFC;
        if ((rc = check_keys(path, "normalizer NFC", n, KEYS("type")))) return rc;
    } else {
        return ql_error(QL_ENOTSUP, "%s: normalizer type '%s' is not supported (NFC, Prepend, Replace, Sequence are)",
                        path, type);
    }
    if (grow((void **)&t->norm, cap, t->n_norm + 1, sizeof *t->norm)) return OOM();
    t->norm[t->n_norm++] = op;
    return QL_OK;
}

static int parse_scheme(const char *path, json_t *o, prepend_scheme *out)
{
    const char *s;
    int rc = get_str("Metaspace", o, "prepend_scheme", &s, NULL);
    if (rc) return ql_error_context("%s", path);
    int explicit_scheme = s != NULL;
    *out = SCHEME_ALWAYS;
    if (s) {
        if (!strcmp(s, "always")) *out = SCHEME_ALWAYS;
        else if (!strcmp(s, "first")) *out = SCHEME_FIRST;
        else if (!strcmp(s, "never")) *out = SCHEME_NEVER;
        else return ql_error(QL_EFORMAT, "%s: Metaspace prepend_scheme '%s' is not always, first or never", path, s);
    }
    json_t *aps = json_object_get(o, "add_prefix_space");
    if (json_is_false(aps)) {
        /* the library's check: the default scheme is "always" */
        if (*out != SCHEME_NEVER)
            return ql_error(QL_EFORMAT, "%s: Metaspace add_prefix_space does not match declared prepend_scheme%s", path,
                            explicit_scheme ? "" : " (default \"always\")");
        *out = SCHEME_NEVER;
    }
    return QL_OK;
}

static int add_pre(ql_tokenizer *t, const char *path, json_t *p, size_t *cap)
{
    if (!p || json_is_null(p)) return QL_OK;
    const char *type = type_of(p);
    if (!json_is_object(p) || !type) return ql_error(QL_EFORMAT, "%s: pre_tokenizer without a \"type\"", path);
    if (!strcmp(type, "Sequence")) {
        json_t *list = json_object_get(p, "pretokenizers");
        if (!json_is_array(list)) return ql_error(QL_EFORMAT, "%s: Sequence pre_tokenizer needs \"pretokenizers\"", path);
        int rc = check_keys(path, "pre_tokenizer Sequence", p, KEYS("type", "pretokenizers"));
        if (rc) return rc;
        for (size_t i = 0; i < json_array_size(list); i++) {
            int rc = add_pre(t, path, json_array_get(list, i), cap);
            if (rc) return rc;
        }
        return QL_OK;
    }
    pre_op op;
    memset(&op, 0, sizeof op);
    int rc;
    if (!strcmp(type, "Metaspace")) {
        op.kind = PRE_METASPACE;
        if ((rc = check_keys(path, "pre_tokenizer Metaspace", p,
                             KEYS("type", "replacement", "prepend_scheme", "split", "add_prefix_space", "str_rep"))))
            return rc;
        const char *r;
        size_t rl;
        uint32_t cp;
        if ((rc = get_str("pre_tokenizer Metaspace", p, "replacement", &r, &rl))) return ql_error_context("%s", path);
        if ((rc = single_char("pre_tokenizer Metaspace", "replacement", r, rl, &cp))) return ql_error_context("%s", path);
        if (pool_add(t, r, rl, &op.repl)) return OOM();
        op.repl_len = rl;
        if ((rc = parse_scheme(path, p, &op.scheme))) return rc;
        if ((rc = get_bool("pre_tokenizer Metaspace", p, "split", 1, &op.split))) return ql_error_context("%s", path);
    } else if (!strcmp(type, "ByteLevel")) {
        op.kind = PRE_BYTELEVEL;
        if ((rc = check_keys(path, "pre_tokenizer ByteLevel", p, KEYS("type", "add_prefix_space", "trim_offsets", "use_regex"))))
            return rc;
        if ((rc = get_bool("pre_tokenizer ByteLevel", p, "add_prefix_space", 1, &op.add_prefix_space)) ||
            (rc = get_bool("pre_tokenizer ByteLevel", p, "use_regex", 1, &op.use_regex)))
            return ql_error_context("%s", path);
        if (!t->byte_level) t->byte_prefix_space = op.add_prefix_space;
        t->byte_level = 1;
    } else if (!strcmp(type, "Split")) {
        op.kind = PRE_SPLIT;
        json_t *pat = json_object_get(p, "pattern");
        if ((rc = check_keys(path, "pre_tokenizer Split", p, KEYS("type", "pattern", "behavior", "invert"))))
            return rc;
        const char *re = NULL, *behavior = NULL;
        if (json_is_object(pat) && json_is_string(json_object_get(pat, "Regex")))
            re = json_string_value(json_object_get(pat, "Regex"));
        if (!re)
            return ql_error(QL_ENOTSUP, "%s: pre_tokenizer Split is supported only with the GPT-2, LLaMA-3 or Qwen2 Regex",
                            path);
        static const char gpt2[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
        static const char llama3[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
                                     "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
        static const char qwen2[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
                                    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
        if (!strcmp(re, gpt2)) op.regex = RE_GPT2;
        else if (!strcmp(re, llama3)) op.regex = RE_LLAMA3;
        else if (!strcmp(re, qwen2)) op.regex = RE_QWEN2;
        else
            return ql_error(QL_ENOTSUP, "%s: pre_tokenizer Split regex '%s' is not supported (only the GPT-2, LLaMA-3 and Qwen2 ones)",
                            path, re);
        if ((rc = get_str("pre_tokenizer Split", p, "behavior", &behavior, NULL))) return ql_error_context("%s", path);
        if (behavior && !strcmp(behavior, "Isolated")) op.behavior = SPLIT_ISOLATED;
        else if (behavior && !strcmp(behavior, "Removed")) op.behavior = SPLIT_REMOVED;
        else
            return ql_error(QL_ENOTSUP, "%s: pre_tokenizer Split behavior '%s' is not supported (Isolated, Removed are)",
                            path, behavior ? behavior : "(none)");
        int invert;
        if ((rc = get_bool("pre_tokenizer Split", p, "invert", 0, &invert))) return ql_error_context("%s", path);
        if (invert) return ql_error(QL_ENOTSUP, "%s: pre_tokenizer Split with invert true is not supported", path);
    } else {
        return ql_error(QL_ENOTSUP,
                        "%s: pre_tokenizer type '%s' is not supported (Metaspace, ByteLevel, Split, Sequence are)", path,
                        type);
    }
    if (grow((void **)&t->pre, cap, t->n_pre + 1, sizeof *t->pre)) return OOM();
    t->pre[t->n_pre++] = op;
    return QL_OK;
}

static int add_dec(ql_tokenizer *t, const char *path, json_t *d, size_t *cap)
{
    const char *type = type_of(d);
    if (!json_is_object(d) || !type) return ql_error(QL_EFORMAT, "%s: decoder without a \"type\"", path);
    if (!strcmp(type, "Sequence")) {
        json_t *list = json_object_get(d, "decoders");
        if (!json_is_array(list)) return ql_error(QL_EFORMAT, "%s: Sequence decoder needs \"decoders\"", path);
        int rc = check_keys(path, "decoder Sequence", d, KEYS("type", "decoders"));
        if (rc) return rc;
        for (size_t i = 0; i < json_array_size(list); i++) {
            int rc = add_dec(t, path, json_array_get(list, i), cap);
            if (rc) return rc;
        }
        return QL_OK;
    }
    dec_op op;
    memset(&op, 0, sizeof op);
    int rc;
    const char *a, *b;
    size_t al, bl;
    if (!strcmp(type, "Replace")) {
        op.kind = DEC_REPLACE;
        json_t *pat = json_object_get(d, "pattern");
        if ((rc = check_keys(path, "decoder Replace", d, KEYS("type", "pattern", "content"))) ||
            (rc = check_keys(path, "decoder Replace pattern", pat, KEYS("String", "Regex"))))
            return rc;
        if (json_is_object(pat) && json_object_get(pat, "Regex"))
            return ql_error(QL_ENOTSUP, "%s: decoder Replace with a Regex pattern is not supported", path);
        if ((rc = get_str("decoder Replace pattern", pat, "String", &a, &al)) ||
            (rc = get_str("decoder Replace", d, "content", &b, &bl)))
            return ql_error_context("%s", path);
        if (!a || !al || !b) return ql_error(QL_EFORMAT, "%s: Replace decoder needs a non-empty pattern.String and a content", path);
        if (pool_add(t, a, al, &op.a) || pool_add(t, b, bl, &op.b)) return OOM();
        op.alen = al;
        op.blen = bl;
    } else if (!strcmp(type, "ByteFallback")) {
        op.kind = DEC_BYTEFALLBACK;
        if ((rc = check_keys(path, "decoder ByteFallback", d, KEYS("type")))) return rc;
    } else if (!strcmp(type, "Fuse")) {
        op.kind = DEC_FUSE;
        if ((rc = check_keys(path, "decoder Fuse", d, KEYS("type")))) return rc;
    } else if (!strcmp(type, "Strip")) {
        op.kind = DEC_STRIP;
        if ((rc = check_keys(path, "decoder Strip", d, KEYS("type", "content", "start", "stop")))) return rc;
        json_t *start = json_object_get(d, "start"), *stop = json_object_get(d, "stop");
        if ((rc = get_str("decoder Strip", d, "content", &a, &al)) ||
            (rc = single_char("decoder Strip", "content", a, al, &op.ch)))
            return ql_error_context("%s", path);
        if (!json_is_integer(start) || !json_is_integer(stop) || json_integer_value(start) < 0 ||
            json_integer_value(stop) < 0)
            return ql_error(QL_EFORMAT, "%s: Strip decoder needs non-negative \"start\" and \"stop\"", path);
        op.start = (size_t)json_integer_value(start);
        op.stop = (size_t)json_integer_value(stop);
    } else if (!strcmp(type, "Metaspace")) {
        op.kind = DEC_METASPACE;
        if ((rc = check_keys(path, "decoder Metaspace", d,
                             KEYS("type", "replacement", "prepend_scheme", "split", "add_prefix_space", "str_rep"))))
            return rc;
        if ((rc = get_str("decoder Metaspace", d, "replacement", &a, &al)) ||
            (rc = single_char("decoder Metaspace", "replacement", a, al, &op.ch)))
            return ql_error_context("%s", path);
        if ((rc = parse_scheme(path, d, &op.scheme))) return rc;
    } else if (!strcmp(type, "ByteLevel")) {
        op.kind = DEC_BYTELEVEL;
        if ((rc = check_keys(path, "decoder ByteLevel", d, KEYS("type", "add_prefix_space", "trim_offsets", "use_regex"))))
            return rc;
    } else {
        return ql_error(QL_ENOTSUP,
                        "%s: decoder type '%s' is not supported (Replace, ByteFallback, Fuse, Strip, Metaspace, "
                        "ByteLevel, Sequence are)",
                        path, type);
    }
    if (grow((void **)&t->dec, cap, t->n_dec + 1, sizeof *t->dec)) return OOM();
    t->dec[t->n_dec++] = op;
    return QL_OK;
}

/* The ids of special-token name `name` in a TemplateProcessing. */
static int template_special(const char *path, json_t *specials, const char *name, ivec *out)
{
    json_t *sp = json_object_get(specials, name);
    json_t *ids = sp ? json_object_get(sp, "ids") : NULL;
    if (!json_is_array(ids))
        return ql_error(QL_EFORMAT, "%s: post_processor template names special token '%s' without ids", path, name);
    for (size_t i = 0; i < json_array_size(ids); i++) {
        json_t *v = json_array_get(ids, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > INT32_MAX)
            return ql_error(QL_EFORMAT, "%s: post_processor special token '%s' has a bad id", path, name);
        if (iv_push(out, (int32_t)json_integer_value(v))) return OOM();
    }
    return QL_OK;
}

static int add_post(ql_tokenizer *t, const char *path, json_t *p)
{
    if (!p || json_is_null(p)) return QL_OK;
    const char *type = type_of(p);
    if (!json_is_object(p) || !type) return ql_error(QL_EFORMAT, "%s: post_processor without a \"type\"", path);
    if (!strcmp(type, "Sequence")) {
        json_t *list = json_object_get(p, "processors");
        if (!json_is_array(list)) return ql_error(QL_EFORMAT, "%s: Sequence post_processor needs \"processors\"", path);
        int rc = check_keys(path, "post_processor Sequence", p, KEYS("type", "processors"));
        if (rc) return rc;
        for (size_t i = 0; i < json_array_size(list); i++) {
            int rc = add_post(t, path, json_array_get(list, i));
            if (rc) return rc;
        }
        return QL_OK;
    }
    if (!strcmp(type, "ByteLevel")) /* only trims offsets */
        return check_keys(path, "post_processor ByteLevel", p, KEYS("type", "add_prefix_space", "trim_offsets", "use_regex"));
    if (!strcmp(type, "TemplateProcessing")) {
        json_t *single = json_object_get(p, "single"), *specials = json_object_get(p, "special_tokens");
        int krc = check_keys(path, "post_processor TemplateProcessing", p, KEYS("type", "single", "pair", "special_tokens"));
        if (krc) return krc;
        if (!json_is_array(single))
            return ql_error(QL_EFORMAT, "%s: TemplateProcessing needs a \"single\" template", path);
        int seen_seq = 0;
        for (size_t i = 0; i < json_array_size(single); i++) {
            json_t *piece = json_array_get(single, i);
            json_t *st = json_object_get(piece, "SpecialToken"), *sq = json_object_get(piece, "Sequence");
            if (json_is_object(sq)) {
                if (seen_seq)
                    return ql_error(QL_ENOTSUP, "%s: a single-sequence template that repeats the sequence", path);
                seen_seq = 1;
            } else if (json_is_object(st) && json_is_string(json_object_get(st, "id"))) {
                int rc = template_special(path, specials, json_string_value(json_object_get(st, "id")),
                                          seen_seq ? &t->suffix_ids : &t->prefix_ids);
                if (rc) return rc;
            } else {
                return ql_error(QL_EFORMAT, "%s: TemplateProcessing single[%zu] is neither SpecialToken nor Sequence",
                                path, i);
            }
        }
        if (!seen_seq) return ql_error(QL_EFORMAT, "%s: TemplateProcessing single template has no Sequence", path);
        return QL_OK;
    }
    if (!strcmp(type, "BertProcessing") || !strcmp(type, "RobertaProcessing")) {
        int krc = !strcmp(type, "BertProcessing")
                      ? check_keys(path, "post_processor BertProcessing", p, KEYS("type", "sep", "cls"))
                      : check_keys(path, "post_processor RobertaProcessing", p,
                                   KEYS("type", "sep", "cls", "trim_offsets", "add_prefix_space"));
        if (krc) return krc;
        json_t *cls = json_object_get(p, "cls"), *sep = json_object_get(p, "sep");
        json_t *c1 = json_array_get(cls, 1), *s1 = json_array_get(sep, 1);
        if (!json_is_integer(c1) || !json_is_integer(s1) || json_integer_value(c1) < 0 ||
            json_integer_value(c1) > INT32_MAX || json_integer_value(s1) < 0 || json_integer_value(s1) > INT32_MAX)
            return ql_error(QL_EFORMAT, "%s: %s needs \"cls\" and \"sep\" as [token, id] with ids from 0 to 2^31-1", path,
                            type);
        if (iv_push(&t->prefix_ids, (int32_t)json_integer_value(c1)) ||
            iv_push(&t->suffix_ids, (int32_t)json_integer_value(s1)))
            return OOM();
        return QL_OK;
    }
    return ql_error(QL_ENOTSUP,
                    "%s: post_processor type '%s' is not supported (TemplateProcessing, ByteLevel, BertProcessing, "
                    "RobertaProcessing, Sequence are)",
                    path, type);
}

/* Added tokens (tokenizer/serialization.rs + added_vocabulary.rs add_tokens):
 * the id is the token's id in the vocabulary, else the next free one; the
 * "id" written in the file is not used. */
static int load_added(ql_tokenizer *t, const char *path, json_t *list)
{
    if (!list || json_is_null(list)) return QL_OK;
    if (!json_is_array(list)) return ql_error(QL_EFORMAT, "%s: \"added_tokens\" must be an array", path);
    size_t n = json_array_size(list);
    t->added = calloc(n ? n : 1, sizeof *t->added);
    if (!t->added) return OOM();
    int64_t next_id = (int64_t)t->vocab_count; /* computed once, before any token is added */
    sbuf norm = {0}, tmp = {0};
    int rc = QL_OK;
    for (size_t i = 0; i < n && !rc; i++) {
        json_t *o = json_array_get(list, i);
        char where[64];
        snprintf(where, sizeof where, "added_tokens[%zu]", i);
        const char *content;
        size_t clen;
        int flags[5];
        if (!json_is_object(o)) {
            rc = ql_error(QL_EFORMAT, "%s: %s must be an object", path, where);
            break;
        }
        if ((rc = check_keys(path, where, o, KEYS("id", "content", "single_word", "lstrip", "rstrip", "normalized", "special"))))
            break;
        if ((rc = get_str(where, o, "content", &content, &clen)) || (rc = get_bool(where, o, "special", 0, &flags[0])) ||
            (rc = get_bool(where, o, "normalized", !flags[0], &flags[1])) ||
            (rc = get_bool(where, o, "lstrip", 0, &flags[2])) || (rc = get_bool(where, o, "rstrip", 0, &flags[3])) ||
            (rc = get_bool(where, o, "single_word", 0, &flags[4]))) {
            rc = ql_error_context("%s", path);
            break;
        }
        if (!content) {
            rc = ql_error(QL_EFORMAT, "%s: %s has no \"content\"", path, where);
            break;
        }
        if (clen == 0) continue;
        int32_t existing = sm_get(&t->added_map, t->pool.p, content, clen);
        int32_t id = existing >= 0 ? existing : vocab_get(t, content, clen);
        if (id < 0) {
            if (next_id >= ((int64_t)1 << 26)) {
                rc = ql_error(QL_EFORMAT, "%s: too many added tokens", path);
                break;
            }
            id = (int32_t)next_id++;
        }
        added_token a;
        memset(&a, 0, sizeof a);
        a.id = id;
        a.special = flags[0] != 0;
        a.normalized = flags[1] != 0;
        a.lstrip = flags[2] != 0;
        a.rstrip = flags[3] != 0;
        a.single_word = flags[4] != 0;
        if (pool_add(t, content, clen, &a.content)) {
            rc = OOM();
            break;
        }
        a.content_len = clen;
        a.pattern = a.content;
        a.pattern_len = clen;
        if (a.normalized && t->n_norm) {
            if (normalize(t, content, clen, &norm, &tmp) || pool_add(t, norm.p ? norm.p : "", norm.len, &a.pattern)) {
                rc = OOM();
                break;
            }
            a.pattern_len = norm.len;
        }
        if (sm_put(&t->added_map, t->pool.p, a.content, clen, id)) {
            rc = OOM();
            break;
        }
        if (a.special && sm_put(&t->special_set, t->pool.p, a.content, clen, 1)) {
            rc = OOM();
            break;
        }
        /* one entry per id: a later token with the same content replaces the earlier one */
        size_t k = 0;
        while (k < t->n_added && t->added[k].id != id) k++;
        t->added[k] = a;
        if (k == t->n_added) t->n_added++;
        if ((size_t)id + 1 > t->n_ids) t->n_ids = (size_t)id + 1;
    }
    free(norm.p);
    free(tmp.p);
    if (rc) return rc;
    for (size_t k = 0; k < t->n_added; k++) {
        const added_token *a = &t->added[k];
        if (!a->pattern_len) continue;
        if (trie_insert(a->normalized ? &t->norm_trie : &t->raw_trie, pool_str(t, a->pattern), a->pattern_len,
                        (int32_t)k))
            return OOM();
    }
    return QL_OK;
}

static int build_id_tables(ql_tokenizer *t)
{
    size_t n = t->n_ids ? t->n_ids : 1;
    t->piece_off = malloc(n * sizeof *t->piece_off);
    t->piece_len = calloc(n, sizeof *t->piece_len);
    t->dec_off = malloc(n * sizeof *t->dec_off);
    t->dec_len = calloc(n, sizeof *t->dec_len);
    t->dec_special = calloc(n, 1);
    if (!t->piece_off || !t->piece_len || !t->dec_off || !t->dec_len || !t->dec_special) return OOM();
    for (size_t i = 0; i < n; i++) t->piece_off[i] = t->dec_off[i] = SIZE_MAX;
    for (size_t i = 0; i <= t->vocab.mask; i++) {
        const strslot *e = &t->vocab.slots[i];
        if (!e->hash) continue;
        /* several pieces with one id: keep the first in file order (smallest pool offset) */
        if (t->piece_off[e->value] != SIZE_MAX && t->piece_off[e->value] < e->off) continue;
        t->piece_off[e->value] = t->dec_off[e->value] = e->off;
        t->piece_len[e->value] = t->dec_len[e->value] = e->len;
    }
    for (size_t k = 0; k < t->n_added; k++) {
        const added_token *a = &t->added[k];
        t->piece_off[a->id] = a->content;
        t->piece_len[a->id] = (uint32_t)a->content_len;
        /* decode() sees the normalized form of normalized tokens (simple_id_to_token) */
        t->dec_off[a->id] = a->pattern;
        t->dec_len[a->id] = (uint32_t)a->pattern_len;
    }
    for (size_t i = 0; i < t->n_ids; i++)
        if (t->dec_off[i] != SIZE_MAX)
            t->dec_special[i] = sm_get(&t->special_set, t->pool.p, pool_str(t, t->dec_off[i]), t->dec_len[i]) >= 0;
    return QL_OK;
}

/* A JSON file read through ql_read_file, which refuses what is not a regular file. */
static int read_json(const char *path, size_t flags, json_t **out)
{
    *out = NULL;
    char *text;
    size_t len;
    int rc = ql_read_file(path, &text, &len);
    if (rc) return rc;
    json_error_t err;
    *out = ql_json_loadb(text, len, flags, &err);
    free(text);
    if (!*out)
        return ql_error(QL_EFORMAT, "%s is not valid JSON: %s (line %d, column %d)", path, err.text, err.line, err.column);
    return QL_OK;
}

/* Optional JSON object file; *out NULL when absent. */
static int load_optional(const char *dir, const char *name, json_t **out)
{
    *out = NULL;
    char *path = ql_path_join(dir, name);
    if (!path) return OOM();
    int rc = QL_OK;
    if (ql_path_exists(path)) {
        json_t *j = NULL;
        rc = read_json(path, 0, &j);
        if (rc == QL_OK && !json_is_object(j)) {
            json_decref(j);
            rc = ql_error(QL_EFORMAT, "%s is not a JSON object", path);
        } else if (rc == QL_OK) {
            *out = j;
        }
    }
    free(path);
    return rc;
}

/* bos_token / eos_token of tokenizer_config.json: a string or {"content": ...};
 * *id -1 when absent, null or not a token. */
static int config_token(const ql_tokenizer *t, const char *dir, json_t *cfg, const char *key, int32_t *id)
{
    *id = -1;
    json_t *v = json_object_get(cfg, key);
    if (!v || json_is_null(v)) return QL_OK;
    if (json_is_object(v)) v = json_object_get(v, "content");
    if (!json_is_string(v))
        return ql_error(QL_EFORMAT, "%s/tokenizer_config.json: \"%s\" must be a string or {\"content\": string}", dir,
                        key);
    *id = ql_tokenizer_token_id(t, json_string_value(v));
    return QL_OK;
}

/* bos_token_id / eos_token_id of config.json: absent or null leaves *id -1;
 * an id (or for eos a list of ids, the first used) must be a token of the
 * vocabulary, anything else is an error naming the file and the field. */
static int config_id(const ql_tokenizer *t, const char *dir, json_t *cfg, const char *key, int allow_list, int32_t *id)
{
    *id = -1;
    json_t *v = json_object_get(cfg, key);
    if (!v || json_is_null(v)) return QL_OK;
    size_t n = allow_list && json_is_array(v) ? json_array_size(v) : 1;
    if (allow_list && json_is_array(v) && n == 0)
        return ql_error(QL_EFORMAT, "%s/config.json: \"%s\" is an empty list", dir, key);
    for (size_t i = 0; i < n; i++) {
        json_t *e = allow_list && json_is_array(v) ? json_array_get(v, i) : v;
        if (!json_is_integer(e))
            return ql_error(QL_EFORMAT, "%s/config.json: \"%s\" must be an integer token id%s", dir, key,
                            allow_list ? " or a list of them" : "");
        if (json_integer_value(e) < 0 || (json_int_t)json_integer_value(e) >= (json_int_t)t->n_ids)
            return ql_error(QL_EFORMAT, "%s/config.json: \"%s\" %lld is not an id of the tokenizer (%zu ids)", dir, key,
                            (long long)json_integer_value(e), t->n_ids);
        if (i == 0) *id = (int32_t)json_integer_value(e);
    }
    return QL_OK;
}

static int load_configs(ql_tokenizer *t, const char *dir)
{
    json_t *tc = NULL, *mc = NULL;
    int rc = QL_OK;
    if (dir) {
        if ((rc = load_optional(dir, "tokenizer_config.json", &tc))) return rc;
        if ((rc = load_optional(dir, "config.json", &mc))) {
            json_decref(tc);
            return rc;
        }
    }
    int32_t bos_id, eos_id;
    if ((rc = config_id(t, dir, mc, "bos_token_id", 0, &bos_id)) || (rc = config_id(t, dir, mc, "eos_token_id", 1, &eos_id)) ||
        (rc = config_token(t, dir, tc, "bos_token", &t->bos)) || (rc = config_token(t, dir, tc, "eos_token", &t->eos))) {
        json_decref(tc);
        json_decref(mc);
        return rc;
    }
    if (t->bos < 0) t->bos = bos_id;
    if (t->eos < 0) t->eos = eos_id;
    if (t->bos < 0 && t->prefix_ids.len) t->bos = t->prefix_ids.p[0];
    if (t->eos < 0 && t->suffix_ids.len) t->eos = t->suffix_ids.p[t->suffix_ids.len - 1];

    /* transformers' LlamaTokenizerFast.update_post_processor: these flags rebuild the template */
    json_t *ab = json_object_get(tc, "add_bos_token"), *ae = json_object_get(tc, "add_eos_token");
    /* fields with which transformers gives other ids than tokenizer.json alone */
    json_t *sst = json_object_get(tc, "split_special_tokens"), *aps = json_object_get(tc, "add_prefix_space");
    const char *bad = NULL;
    if (ab && !json_is_null(ab) && !json_is_boolean(ab)) bad = "add_bos_token";
    else if (ae && !json_is_null(ae) && !json_is_boolean(ae)) bad = "add_eos_token";
    else if (sst && !json_is_null(sst) && !json_is_boolean(sst)) bad = "split_special_tokens";
    else if (aps && !json_is_null(aps) && !json_is_boolean(aps)) bad = "add_prefix_space";
    if (bad) rc = ql_error(QL_EFORMAT, "%s/tokenizer_config.json: \"%s\" must be true, false or null", dir, bad);
    else if (json_is_true(sst))
        rc = ql_error(QL_ENOTSUP,
                      "%s/tokenizer_config.json: \"split_special_tokens\": true (special tokens in the text encoded as "
                      "plain text) is not supported",
                      dir);
    else if (json_is_boolean(aps) && (!t->byte_level || json_is_true(aps) != t->byte_prefix_space))
        rc = ql_error(QL_ENOTSUP,
                      "%s/tokenizer_config.json: \"add_prefix_space\": %s makes transformers rebuild the pre-tokenizer; "
                      "only null%s is supported",
                      dir, json_is_true(aps) ? "true" : "false",
                      t->byte_level ? (t->byte_prefix_space ? " or true (as tokenizer.json's ByteLevel)"
                                                            : " or false (as tokenizer.json's ByteLevel)")
                                    : "");
    if (rc) {
        json_decref(tc);
        json_decref(mc);
        return rc;
    }
    if (json_is_boolean(ab) || json_is_boolean(ae)) {
        int add_bos = json_is_boolean(ab) ? json_is_true(ab) : t->prefix_ids.len > 0;
        int add_eos = json_is_boolean(ae) ? json_is_true(ae) : t->suffix_ids.len > 0;
        if (add_bos && t->bos < 0) rc = ql_error(QL_EFORMAT, "%s: add_bos_token is true but no bos token is known", dir);
        else if (add_eos && t->eos < 0) rc = ql_error(QL_EFORMAT, "%s: add_eos_token is true but no eos token is known", dir);
        else {
            t->prefix_ids.len = t->suffix_ids.len = 0;
            if ((add_bos && iv_push(&t->prefix_ids, t->bos)) || (add_eos && iv_push(&t->suffix_ids, t->eos)))
                rc = OOM();
        }
    }
    json_decref(tc);
    json_decref(mc);
    return rc;
}

static int load_tokenizer_json(ql_tokenizer *t, const char *path)
{
    if (!ql_path_exists(path)) return ql_error(QL_ENOTFOUND, "%s is missing", path);
    json_t *root;
    int rc = read_json(path, JSON_ALLOW_NUL, &root);
    if (rc) return rc;
    size_t cap;
    const char *version;
    if (!json_is_object(root)) {
        rc = ql_error(QL_EFORMAT, "%s is not a JSON object", path);
        goto done;
    }
    if ((rc = check_keys(path, "top-level", root,
                         KEYS("version", "truncation", "padding", "added_tokens", "normalizer", "pre_tokenizer", "model",
                              "post_processor", "decoder"))))
        goto done;
    if ((rc = get_str("tokenizer.json", root, "version", &version, NULL))) {
        rc = ql_error_context("%s", path);
        goto done;
    }
    if (version && strcmp(version, "1.0") != 0) {
        rc = ql_error(QL_ENOTSUP, "%s: unknown tokenizer.json version '%s' (expected 1.0)", path, version);
        goto done;
    }
    if (!json_object_get(root, "model") || json_is_null(json_object_get(root, "model"))) {
        rc = ql_error(QL_EFORMAT, "%s has no \"model\"", path);
        goto done;
    }
    if ((rc = load_model(t, path, json_object_get(root, "model")))) goto done;
    cap = 0;
    if ((rc = add_norm(t, path, json_object_get(root, "normalizer"), &cap))) goto done;
    cap = 0;
    if ((rc = add_pre(t, path, json_object_get(root, "pre_tokenizer"), &cap))) goto done;
    cap = 0;
    json_t *dec = json_object_get(root, "decoder");
    t->has_decoder = dec && !json_is_null(dec);
    if (t->has_decoder && (rc = add_dec(t, path, dec, &cap))) goto done;
    if ((rc = add_post(t, path, json_object_get(root, "post_processor")))) goto done;
    if ((rc = load_added(t, path, json_object_get(root, "added_tokens")))) goto done;
    if ((rc = build_id_tables(t))) goto done;
    for (size_t k = 0; k < t->prefix_ids.len + t->suffix_ids.len; k++) {
        int32_t id = k < t->prefix_ids.len ? t->prefix_ids.p[k] : t->suffix_ids.p[k - t->prefix_ids.len];
        if ((size_t)id >= t->n_ids) {
            rc = ql_error(QL_EFORMAT, "%s: post_processor adds id %d, outside the vocabulary", path, id);
            goto done;
        }
    }
done:
    json_decref(root);
    return rc;
}

int ql_tokenizer_load(const char *model_dir, ql_tokenizer **out)
{
    if (out) *out = NULL;
    if (!model_dir || !out) return ql_error(QL_EINVAL, "ql_tokenizer_load: NULL argument");
    ql_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return OOM();
    t->bos = t->eos = -1;
    int is_dir = ql_is_dir(model_dir);
    char *path = is_dir ? ql_path_join(model_dir, "tokenizer.json") : strdup(model_dir);
    int rc;
    if (!path) {
        rc = OOM();
        goto fail;
    }
    if (!is_dir && !ql_path_exists(model_dir)) {
        rc = ql_error(QL_ENOTFOUND, "tokenizer folder %s does not exist", model_dir);
        goto fail;
    }
    if ((rc = load_tokenizer_json(t, path))) goto fail;
    if ((rc = load_configs(t, is_dir ? model_dir : NULL))) goto fail;
    free(path);
    *out = t;
    return QL_OK;
fail:
    free(path);
    ql_tokenizer_destroy(t);
    return rc;
}
