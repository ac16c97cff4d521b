/*
 * gguf_gen: random-weight Llama GGUF synthesis (see gguf_gen.h).
 *
 * Tokenizer: ids 0..2 are <|endoftext|>, <|im_start|>, <|im_end|>; ids 3..258 the 256
 * bytes in GPT-2's byte-to-unicode spelling; then merges, first learnt by a few hundred
 * steps of BPE training on a built-in English paragraph (so common words encode to few
 * tokens), then filler merges "token + letter" until the vocabulary has n_vocab entries.
 * Every merge "A B" yields the token AB, added in merge order, so the vocabulary is a
 * consistent byte-level BPE that HF tokenizers or our own tokenizer can load.
 */
#include "gguf_gen.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gguf_writer.h"
#include "kernel_quant.h"

#define GEN_ALIGN 32u
#define GEN_N_SPECIAL 3u
#define GEN_WEIGHT_STD 0.02f

static const char gen_text[] =
    "The quick brown fox jumps over the lazy dog. A serverless runtime starts a model when "
    "there is work and parks it when there is none. The engine reads the model file, checks "
    "every offset and size, and maps the weights into memory. Tokens are read from the "
    "queue, the batch runs on the device, and the answer is sent back to the client as soon "
    "as it is ready. In the morning the city was quiet, and the river ran slowly under the "
    "old stone bridge. She said that the weather would change in the afternoon, and that we "
    "should take the train to the coast before the rain came in from the sea. Hello, world! "
    "How are you today? I am fine, thank you. What is the capital of France? The capital of "
    "France is Paris. Numbers like 1, 2, 3, 10, 42 and 2024 appear in text too. def main(): "
    "return 0 # code is text as well, with (parentheses), [brackets] and {braces}.";

static const char gen_chat_template[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt "
    "%}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/* ---- presets --------------------------------------------------------------------------- */

struct preset {
    const char *name;
    uint32_t n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab, n_ctx;
    float rope_base;
};

static const struct preset presets[] = {
    {"tiny", 2, 64, 128, 4, 2, 384, 256, 10000.0f},
    {"custom", 2, 64, 128, 4, 2, 384, 256, 10000.0f},
    {"smollm2-135m", 30, 576, 1536, 9, 3, 49152, 8192, 100000.0f},
    {"llama-3.2-1b", 16, 2048, 8192, 32, 8, 128256, 131072, 500000.0f},
    {"llama-3-8b", 32, 4096, 14336, 32, 8, 128256, 8192, 500000.0f},
};

enum pw_err gguf_gen_preset(const char *shape, struct gguf_gen_opts *o)
{
    for (size_t i = 0; i < sizeof(presets) / sizeof(presets[0]); i++) {
        const struct preset *p = &presets[i];
        if (strcmp(p->name, shape) != 0)
            continue;
        memset(o, 0, sizeof(*o));
        o->shape = p->name;
        o->n_layer = p->n_layer;
        o->n_embd = p->n_embd;
        o->n_ff = p->n_ff;
        o->n_head = p->n_head;
        o->n_head_kv = p->n_head_kv;
        o->n_vocab = p->n_vocab;
        o->n_ctx = p->n_ctx;
        o->rope_base = p->rope_base;
        o->rms_eps = 1e-5f;
        o->type = KERNEL_DTYPE_F32;
        return PW_OK;
    }
    return PW_ERR_NOTFOUND;
}

bool gguf_gen_parse_type(const char *name, uint32_t *type)
{
    static const uint32_t ids[] = {KERNEL_DTYPE_F32,  KERNEL_DTYPE_F16,  KERNEL_DTYPE_BF16,
                                   KERNEL_DTYPE_Q8_0, KERNEL_DTYPE_Q4_0, KERNEL_DTYPE_Q4_1};
    for (size_t i = 0; i < sizeof(ids) / sizeof(ids[0]); i++) {
        if (strcmp(kernel_dtype_name(ids[i]), name) == 0) {
            *type = ids[i];
            return true;
        }
    }
    return false;
}

enum pw_err gguf_gen_check(const struct gguf_gen_opts *o, char *err, size_t errcap)
{
    const char *why = NULL;
    if (!kernel_dtype_supported(o->type))
        why = "unsupported weight type";
    else if (o->n_layer < 1 || o->n_embd < 1 || o->n_ff < 1 || o->n_head < 1 || o->n_head_kv < 1 ||
             o->n_ctx < 1)
        why = "every dimension must be at least 1";
    else if (o->n_vocab < GEN_N_SPECIAL + 256)
        why = "n_vocab must be at least 259 (3 specials + 256 bytes)";
    else if (o->n_vocab > (1u << 24))
        why = "n_vocab over 16777216";
    else if (o->n_embd % o->n_head != 0)
        why = "n_embd must be a multiple of n_head";
    else if (o->n_head % o->n_head_kv != 0)
        why = "n_head must be a multiple of n_head_kv";
    else if ((o->n_embd / o->n_head) % 2 != 0)
        why = "head dimension (n_embd / n_head) must be even for RoPE";
    else if (o->n_embd % kernel_dtype_block_elems(o->type) != 0 ||
             o->n_ff % kernel_dtype_block_elems(o->type) != 0)
        why = "n_embd and n_ff must be multiples of the type's block size (32)";
    else if (o->n_layer > 4096 || o->n_embd > (1u << 20) || o->n_ff > (1u << 22))
        why = "shape too large";
    if (why) {
        snprintf(err, errcap, "%s", why);
        return PW_ERR_INVAL;
    }
    return PW_OK;
}

/* ---- random numbers -------------------------------------------------------------------- */

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Roughly N(0, 1): Irwin-Hall sum of four 16-bit uniforms, one PRNG call per sample. */
static float gauss(uint64_t *s)
{
    uint64_t r = splitmix64(s);
    float sum = 0.0f;
    for (int i = 0; i < 4; i++) {
        sum += (float)(r & 0xffff) * (1.0f / 65536.0f);
        r >>= 16;
    }
    return (sum - 2.0f) * 1.7320508f; /* the sum has variance 1/3 */
}

/* ---- tokenizer ------------------------------------------------------------------------- */

struct vocab {
    char **tok; /* (n) NUL-terminated token strings, owned */
    size_t n, cap;
    char **merges; /* (n_merges) "A B", owned */
    size_t n_merges;
    char **set; /* open-addressing set of tok strings (borrowed), set_cap slots */
    size_t set_cap;
};

static uint64_t fnv(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static bool vocab_has(const struct vocab *v, const char *s)
{
    for (size_t i = fnv(s) & (v->set_cap - 1);; i = (i + 1) & (v->set_cap - 1)) {
        if (!v->set[i])
            return false;
        if (strcmp(v->set[i], s) == 0)
            return true;
    }
}

/* Takes ownership of s. */
static enum pw_err vocab_add(struct vocab *v, char *s)
{
    if (v->n == v->cap) {
        free(s);
        return PW_ERR_RANGE;
    }
    v->tok[v->n++] = s;
    size_t i = fnv(s) & (v->set_cap - 1);
    while (v->set[i])
        i = (i + 1) & (v->set_cap - 1);
    v->set[i] = s;
    return PW_OK;
}

/* Adds merge "tok[a] tok[b]" and the token tok[a]tok[b]. */
static enum pw_err vocab_merge(struct vocab *v, size_t a, size_t b, char *joined)
{
    size_t la = strlen(v->tok[a]), lb = strlen(v->tok[b]);
    char *m = malloc(la + lb + 2);
    if (!m) {
        free(joined);
        return PW_ERR_NOMEM;
    }
    memcpy(m, v->tok[a], la);
    m[la] = ' ';
    memcpy(m + la + 1, v->tok[b], lb + 1);
    v->merges[v->n_merges++] = m;
    return vocab_add(v, joined);
}

static char *concat(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    char *s = malloc(la + lb + 1);
    if (s) {
        memcpy(s, a, la);
        memcpy(s + la, b, lb + 1);
    }
    return s;
}

static void vocab_free(struct vocab *v)
{
    for (size_t i = 0; i < v->n; i++)
        free(v->tok[i]);
    for (size_t i = 0; i < v->n_merges; i++)
        free(v->merges[i]);
    free(v->tok);
    free(v->merges);
    free(v->set);
}

struct pair {
    uint32_t a, b;
};

static int cmp_pair(const void *x, const void *y)
{
    const struct pair *p = x, *q = y;
    if (p->a != q->a)
        return p->a < q->a ? -1 : 1;
    if (p->b != q->b)
        return p->b < q->b ? -1 : 1;
    return 0;
}

/* BPE training on gen_text. Symbols of one word are contiguous in sym; word boundaries
 * are marked by UINT32_MAX. */
static enum pw_err vocab_train(struct vocab *v)
{
    size_t len = sizeof(gen_text) - 1;
    uint32_t *sym = malloc((2 * len + 1) * sizeof(*sym));
    struct pair *pairs = malloc(2 * len * sizeof(*pairs));
    enum pw_err err = PW_OK;
    size_t n = 0;
    if (!sym || !pairs) {
        err = PW_ERR_NOMEM;
        goto out;
    }
    /* Words: an optional leading space and the non-space bytes after it. */
    for (size_t i = 0; i < len; i++) {
        if (gen_text[i] == ' ' && n > 0)
            sym[n++] = UINT32_MAX;
        sym[n++] = GGUF_GEN_FIRST_BYTE_TOKEN + (unsigned char)gen_text[i];
    }
    while (v->n < v->cap) {
        size_t np = 0;
        for (size_t i = 0; i + 1 < n; i++) {
            if (sym[i] != UINT32_MAX && sym[i + 1] != UINT32_MAX)
                pairs[np++] = (struct pair){sym[i], sym[i + 1]};
        }
        qsort(pairs, np, sizeof(*pairs), cmp_pair);
        size_t best = 0, best_count = 1;
        char *best_str = NULL;
        for (size_t i = 0; i < np;) {
            size_t j = i;
            while (j < np && cmp_pair(&pairs[i], &pairs[j]) == 0)
                j++;
            if (j - i > best_count) {
                char *s = concat(v->tok[pairs[i].a], v->tok[pairs[i].b]);
                if (!s) {
                    err = PW_ERR_NOMEM;
                    free(best_str);
                    goto out;
                }
                if (!vocab_has(v, s)) {
                    free(best_str);
                    best_str = s;
                    best = i;
                    best_count = j - i;
                } else {
                    free(s);
                }
            }
            i = j;
        }
        if (!best_str)
            break; /* no pair occurs twice any more */
        struct pair bp = pairs[best];
        uint32_t id = (uint32_t)v->n;
        err = vocab_merge(v, bp.a, bp.b, best_str);
        if (err)
            goto out;
        size_t w = 0;
        for (size_t i = 0; i < n; i++) {
            if (i + 1 < n && sym[i] == bp.a && sym[i + 1] == bp.b) {
                sym[w++] = id;
                i++;
            } else {
                sym[w++] = sym[i];
            }
        }
        n = w;
    }
out:
    free(sym);
    free(pairs);
    return err;
}

static enum pw_err vocab_build(struct vocab *v, uint32_t n_vocab)
{
    static const char *const specials[GEN_N_SPECIAL] = {"<|endoftext|>", "<|im_start|>",
                                                        "<|im_end|>"};
    enum pw_err err = PW_OK;
    memset(v, 0, sizeof(*v));
    v->cap = n_vocab;
    v->set_cap = 1;
    while (v->set_cap < 2 * (size_t)n_vocab)
        v->set_cap *= 2;
    v->tok = calloc(n_vocab, sizeof(*v->tok));
    v->merges = calloc(n_vocab, sizeof(*v->merges));
    v->set = calloc(v->set_cap, sizeof(*v->set));
    if (!v->tok || !v->merges || !v->set)
        return PW_ERR_NOMEM;
    for (size_t i = 0; i < GEN_N_SPECIAL; i++) {
        char *s = strdup(specials[i]);
        if (!s)
            return PW_ERR_NOMEM;
        if ((err = vocab_add(v, s)))
            return err;
    }
    /* GPT-2 byte-to-unicode: printable Latin-1 bytes stand for themselves, the others
     * take code points from U+0100 on, in byte order (so ' ' is U+0120 'Ġ'). */
    uint32_t extra = 0;
    for (uint32_t b = 0; b < 256; b++) {
        bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
        uint32_t cp = printable ? b : 256 + extra++;
        char *s = malloc(3);
        if (!s)
            return PW_ERR_NOMEM;
        if (cp < 0x80) {
            s[0] = (char)cp;
            s[1] = '\0';
        } else {
            s[0] = (char)(0xc0 | (cp >> 6));
            s[1] = (char)(0x80 | (cp & 0x3f));
            s[2] = '\0';
        }
        if ((err = vocab_add(v, s)))
            return err;
    }
    if ((err = vocab_train(v)))
        return err;
    /* Filler: token + letter, over tokens in id order (learnt merges first, so fillers
     * look like word pieces), until full. */
    size_t first_merge = GEN_N_SPECIAL + 256;
    for (size_t j = v->n > first_merge ? first_merge : GGUF_GEN_FIRST_BYTE_TOKEN; v->n < v->cap;
         j++) {
        for (char c = 'a'; c <= 'z' && v->n < v->cap; c++) {
            char *s = concat(v->tok[j], (char[]){c, '\0'});
            if (!s)
                return PW_ERR_NOMEM;
            if (vocab_has(v, s)) {
                free(s);
                continue;
            }
            if ((err = vocab_merge(v, j, GGUF_GEN_FIRST_BYTE_TOKEN + (size_t)c, s)))
                return err;
        }
    }
    return PW_OK;
}

/* ---- model ----------------------------------------------------------------------------- */

struct gen_tensor {
    char name[64];
    uint32_t n_dims;
    uint64_t ne[2];
    uint32_t type;
    bool norm; /* all ones, f32 */
};

static void tensor_set(struct gen_tensor *t, const char *name, uint64_t ne0, uint64_t ne1,
                       uint32_t type)
{
    snprintf(t->name, sizeof(t->name), "%s", name);
    t->ne[0] = ne0;
    t->ne[1] = ne1;
    t->n_dims = ne1 > 0 ? 2 : 1;
    t->norm = ne1 == 0;
    t->type = t->norm ? KERNEL_DTYPE_F32 : type;
}

/* The model's tensors in file order; *n gets the count. Caller frees. */
static struct gen_tensor *model_tensors(const struct gguf_gen_opts *o, size_t *n)
{
    size_t cap = 3 + 9 * (size_t)o->n_layer;
    struct gen_tensor *ts = calloc(cap, sizeof(*ts));
    if (!ts)
        return NULL;
    uint64_t e = o->n_embd, kv = (uint64_t)o->n_embd / o->n_head * o->n_head_kv;
    size_t k = 0;
    char nm[64];
    tensor_set(&ts[k++], "token_embd.weight", e, o->n_vocab, o->type);
    for (uint32_t l = 0; l < o->n_layer; l++) {
        static const char *const parts[] = {"attn_norm", "attn_q",      "attn_k",
                                            "attn_v",    "attn_output", "ffn_norm",
                                            "ffn_gate",  "ffn_up",      "ffn_down"};
        const uint64_t ne0[] = {e, e, e, e, e, e, e, e, o->n_ff};
        const uint64_t ne1[] = {0, e, kv, kv, e, 0, o->n_ff, o->n_ff, e};
        for (size_t p = 0; p < 9; p++) {
            snprintf(nm, sizeof(nm), "blk.%u.%s.weight", l, parts[p]);
            tensor_set(&ts[k++], nm, ne0[p], ne1[p], o->type);
        }
    }
    tensor_set(&ts[k++], "output_norm.weight", e, 0, o->type);
    if (!o->tied)
        tensor_set(&ts[k++], "output.weight", e, o->n_vocab, o->type);
    *n = k;
    return ts;
}

static uint32_t file_type(uint32_t type)
{
    switch (type) {
    case KERNEL_DTYPE_F32:
        return 0;
    case KERNEL_DTYPE_F16:
        return 1;
    case KERNEL_DTYPE_Q4_0:
        return 2;
    case KERNEL_DTYPE_Q4_1:
        return 3;
    case KERNEL_DTYPE_Q8_0:
        return 7;
    case KERNEL_DTYPE_BF16:
        return 32;
    default:
        return 0;
    }
}

static void put_metadata(struct gguf_writer *w, const struct gguf_gen_opts *o,
                         const struct vocab *v, const int32_t *token_type)
{
    char name[96];
    snprintf(name, sizeof(name), "parkway-gguf-gen %s", o->shape ? o->shape : "custom");
    gguf_writer_kv_str(w, "general.architecture", "llama");
    gguf_writer_kv_str(w, "general.name", name);
    gguf_writer_kv_u32(w, "general.file_type", file_type(o->type));
    gguf_writer_kv_u32(w, "general.quantization_version", 2);
    gguf_writer_kv_u64(w, "parkway.gen.seed", o->seed);
    gguf_writer_kv_u32(w, "llama.vocab_size", o->n_vocab);
    gguf_writer_kv_u32(w, "llama.context_length", o->n_ctx);
    gguf_writer_kv_u32(w, "llama.embedding_length", o->n_embd);
    gguf_writer_kv_u32(w, "llama.block_count", o->n_layer);
    gguf_writer_kv_u32(w, "llama.feed_forward_length", o->n_ff);
    gguf_writer_kv_u32(w, "llama.attention.head_count", o->n_head);
    gguf_writer_kv_u32(w, "llama.attention.head_count_kv", o->n_head_kv);
    gguf_writer_kv_f32(w, "llama.rope.freq_base", o->rope_base);
    gguf_writer_kv_f32(w, "llama.attention.layer_norm_rms_epsilon", o->rms_eps);
    gguf_writer_kv_u32(w, "llama.rope.dimension_count", o->n_embd / o->n_head);
    gguf_writer_kv_str(w, "tokenizer.ggml.model", "gpt2");
    gguf_writer_kv_str(w, "tokenizer.ggml.pre", "default");
    gguf_writer_kv_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)v->tok, v->n);
    gguf_writer_kv_arr_i32(w, "tokenizer.ggml.token_type", token_type, v->n);
    gguf_writer_kv_arr_str(w, "tokenizer.ggml.merges", (const char *const *)v->merges, v->n_merges);
    gguf_writer_kv_u32(w, "tokenizer.ggml.bos_token_id", GGUF_GEN_TOKEN_IM_START);
    gguf_writer_kv_u32(w, "tokenizer.ggml.eos_token_id", GGUF_GEN_TOKEN_IM_END);
    gguf_writer_kv_u32(w, "tokenizer.ggml.unknown_token_id", GGUF_GEN_TOKEN_EOT);
    gguf_writer_kv_u32(w, "tokenizer.ggml.padding_token_id", GGUF_GEN_TOKEN_IM_END);
    gguf_writer_kv_bool(w, "tokenizer.ggml.add_bos_token", false);
    gguf_writer_kv_bool(w, "tokenizer.ggml.add_space_prefix", false);
    gguf_writer_kv_str(w, "tokenizer.chat_template", gen_chat_template);
}

static enum pw_err write_tensor(struct gguf_writer *w, FILE *f, const struct gen_tensor *t,
                                uint64_t seed, float *row, void *qrow)
{
    uint64_t s = seed;
    size_t ne0 = (size_t)t->ne[0];
    uint64_t rows = t->n_dims > 1 ? t->ne[1] : 1;
    size_t rb = kernel_dtype_row_bytes((enum kernel_dtype)t->type, ne0);
    for (uint64_t r = 0; r < rows; r++) {
        for (size_t i = 0; i < ne0; i++)
            row[i] = t->norm ? 1.0f : GEN_WEIGHT_STD * gauss(&s);
        kernel_quantize_row((enum kernel_dtype)t->type, row, qrow, ne0);
        enum pw_err err = gguf_writer_write(w, f, qrow, rb);
        if (err)
            return err;
    }
    return gguf_writer_end_tensor(w, f);
}

enum pw_err gguf_gen_write(const struct gguf_gen_opts *o, FILE *f, char *err, size_t errcap)
{
    enum pw_err e = gguf_gen_check(o, err, errcap);
    struct vocab v;
    struct gguf_writer *w = NULL;
    struct gen_tensor *ts = NULL;
    int32_t *token_type = NULL;
    float *row = NULL;
    void *qrow = NULL;
    size_t n_t = 0;
    memset(&v, 0, sizeof(v));
    if (e)
        return e;
    e = vocab_build(&v, o->n_vocab);
    if (e) {
        snprintf(err, errcap, "building the vocabulary: %s", pw_err_desc(e));
        goto out;
    }
    token_type = malloc(v.n * sizeof(*token_type));
    ts = model_tensors(o, &n_t);
    w = gguf_writer_create(GEN_ALIGN);
    size_t width = o->n_embd > o->n_ff ? o->n_embd : o->n_ff;
    row = malloc(width * sizeof(*row));
    qrow = malloc(width * sizeof(float));
    if (!token_type || !ts || !w || !row || !qrow) {
        e = PW_ERR_NOMEM;
        snprintf(err, errcap, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < v.n; i++)
        token_type[i] = i < GEN_N_SPECIAL ? 3 : 1; /* CONTROL : NORMAL */
    put_metadata(w, o, &v, token_type);
    for (size_t i = 0; i < n_t; i++) {
        uint64_t ne[2] = {ts[i].ne[0], ts[i].ne[1]};
        gguf_writer_add_tensor(w, ts[i].name, ts[i].n_dims, ne, ts[i].type);
    }
    e = gguf_writer_write_header(w, f);
    for (size_t i = 0; !e && i < n_t; i++) {
        uint64_t seed = o->seed ^ (0xd1b54a32d192ed03ull * (i + 1));
        e = write_tensor(w, f, &ts[i], seed, row, qrow);
    }
    if (!e && fflush(f) != 0)
        e = PW_ERR_IO;
    if (e)
        snprintf(err, errcap, "writing: %s",
                 gguf_writer_error(w)[0] ? gguf_writer_error(w) : pw_err_desc(e));
out:
    free(qrow);
    free(row);
    free(token_type);
    free(ts);
    gguf_writer_destroy(w);
    vocab_free(&v);
    return e;
}
