/*
 * engine_model: Llama forward pass on a kernel backend (see engine_model.h).
 *
 * One step, for the token rows of a batch (x is the residual stream):
 *   x = embed(tokens)
 *   per layer:  h = rmsnorm(x); q,k,v = h Wq, h Wk, h Wv; rope(q, k); cache k, v;
 *               x += attention(q, cache) Wo
 *               h = rmsnorm(x); x += (silu(h Wgate) * h Wup) Wdown
 *   logits = rmsnorm(x[rows needing logits]) Wout
 * Only rows that need logits (the last prompt token of a chunk, decode tokens) go through
 * the output projection: with a 49k vocabulary it costs more than a layer.
 */
#include "engine_model.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_gguf.h"
#include "pw_log.h"

struct engine_layer {
    struct kernel_weight *attn_norm, *wq, *wk, *wv, *wo;
    struct kernel_weight *ffn_norm, *w_gate, *w_up, *w_down;
};

struct engine_model {
    struct engine_gguf *gguf;  /* owned; weights may be views into its mapping */
    struct kernel_backend *be; /* borrowed */
    struct engine_hparams hp;
    struct engine_model_opts opts;

    struct kernel_weight *tok_embd, *output_norm, *output; /* output may be tok_embd */
    struct engine_layer *layers;                           /* (n_layer) */
    struct kernel_kv *kv;
    size_t kv_bytes;

    /* Device buffers, allocated at load. */
    float *x;      /* (max_tok, n_embd) residual stream */
    float *h;      /* (max_tok, n_embd) normed input of a block */
    float *q;      /* (max_tok, n_head * head_dim) */
    float *k;      /* (max_tok, n_head_kv * head_dim) */
    float *v;      /* (max_tok, n_head_kv * head_dim) */
    float *att;    /* (max_tok, n_head * head_dim) attention output */
    float *gate;   /* (max_tok, n_ff) */
    float *up;     /* (max_tok, n_ff) */
    float *lrows;  /* (max_logits, n_embd) rows that need logits */
    float *logits; /* (max_logits, n_vocab) */
};

static void set_err(char *err, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, cap, fmt, ap);
    va_end(ap);
}

static enum pw_err need_u32(const struct engine_gguf *g, const char *key, uint32_t *out, char *err,
                            size_t cap)
{
    if (!engine_gguf_get_u32(g, key, out)) {
        set_err(err, cap, "model: missing or invalid metadata %s", key);
        return PW_ERR_PARSE;
    }
    return PW_OK;
}

static enum pw_err read_hparams(const struct engine_gguf *g, struct engine_hparams *hp, char *err,
                                size_t cap)
{
    struct engine_gguf_str arch;
    if (!engine_gguf_get_str(g, "general.architecture", &arch)) {
        set_err(err, cap, "model: missing general.architecture");
        return PW_ERR_PARSE;
    }
    if (arch.len != 5 || memcmp(arch.ptr, "llama", 5) != 0) {
        set_err(err, cap, "model: unsupported architecture %.*s (supported: llama)",
                (int)(arch.len > 64 ? 64 : arch.len), arch.ptr);
        return PW_ERR_UNSUPPORTED;
    }
    enum pw_err e;
    if ((e = need_u32(g, "llama.context_length", &hp->n_ctx_train, err, cap)) ||
        (e = need_u32(g, "llama.embedding_length", &hp->n_embd, err, cap)) ||
        (e = need_u32(g, "llama.block_count", &hp->n_layer, err, cap)) ||
        (e = need_u32(g, "llama.feed_forward_length", &hp->n_ff, err, cap)) ||
        (e = need_u32(g, "llama.attention.head_count", &hp->n_head, err, cap)))
        return e;
    if (!engine_gguf_get_u32(g, "llama.attention.head_count_kv", &hp->n_head_kv))
        hp->n_head_kv = hp->n_head;
    if (!engine_gguf_get_f32(g, "llama.attention.layer_norm_rms_epsilon", &hp->rms_eps))
        hp->rms_eps = 1e-5f;
    if (!engine_gguf_get_f32(g, "llama.rope.freq_base", &hp->rope_base))
        hp->rope_base = 10000.0f;
    struct engine_gguf_str scaling;
    if (engine_gguf_get_str(g, "llama.rope.scaling.type", &scaling) &&
        !(scaling.len == 4 && memcmp(scaling.ptr, "none", 4) == 0)) {
        set_err(err, cap, "model: unsupported rope scaling %.*s",
                (int)(scaling.len > 32 ? 32 : scaling.len), scaling.ptr);
        return PW_ERR_UNSUPPORTED;
    }
    if (hp->n_embd == 0 || hp->n_layer == 0 || hp->n_ff == 0 || hp->n_head == 0 ||
        hp->n_head_kv == 0 || hp->n_embd % hp->n_head != 0 || hp->n_head % hp->n_head_kv != 0 ||
        hp->n_layer > 1024 || hp->n_embd > 65536 || hp->n_ff > 262144 || hp->n_ctx_train == 0) {
        set_err(err, cap,
                "model: inconsistent shape (n_embd %u, n_layer %u, n_ff %u, n_head %u, "
                "n_head_kv %u)",
                hp->n_embd, hp->n_layer, hp->n_ff, hp->n_head, hp->n_head_kv);
        return PW_ERR_PARSE;
    }
    hp->head_dim = hp->n_embd / hp->n_head;
    if (!engine_gguf_get_u32(g, "llama.rope.dimension_count", &hp->rope_dim))
        hp->rope_dim = hp->head_dim;
    if (hp->rope_dim > hp->head_dim || hp->rope_dim % 2 || hp->head_dim % 2) {
        set_err(err, cap, "model: rope dimension %u does not fit head dim %u", hp->rope_dim,
                hp->head_dim);
        return PW_ERR_PARSE;
    }
    if (!(hp->rms_eps > 0 && hp->rms_eps < 1) || !(hp->rope_base > 1)) {
        set_err(err, cap, "model: bad rms epsilon %g or rope base %g", (double)hp->rms_eps,
                (double)hp->rope_base);
        return PW_ERR_PARSE;
    }
    const struct engine_gguf_tensor *emb = engine_gguf_find_tensor(g, "token_embd.weight");
    if (!emb || emb->n_dims != 2) {
        set_err(err, cap, "model: missing tensor token_embd.weight");
        return PW_ERR_PARSE;
    }
    if (emb->ne[1] > (1u << 24)) {
        set_err(err, cap, "model: vocabulary of %llu tokens is too large",
                (unsigned long long)emb->ne[1]);
        return PW_ERR_PARSE;
    }
    hp->n_vocab = (uint32_t)emb->ne[1];
    hp->tied_output = engine_gguf_find_tensor(g, "output.weight") == NULL;
    return PW_OK;
}

/* Registers tensor name, checking it is a (n_out x n_in) matrix or an n_in vector. */
static enum pw_err load_weight(struct engine_model *m, const char *name, uint32_t n_in,
                               uint32_t n_out, bool vector, struct kernel_weight **out, char *err,
                               size_t cap)
{
    const struct engine_gguf_tensor *t = engine_gguf_find_tensor(m->gguf, name);
    if (!t) {
        set_err(err, cap, "model: missing tensor %s", name);
        return PW_ERR_PARSE;
    }
    bool ok = vector ? (t->n_dims == 1 && t->ne[0] == n_in)
                     : (t->n_dims == 2 && t->ne[0] == n_in && t->ne[1] == n_out);
    if (!ok) {
        set_err(err, cap, "tensor %s: shape [%llu, %llu] where [%u, %u] was expected", name,
                (unsigned long long)t->ne[0], (unsigned long long)(t->n_dims > 1 ? t->ne[1] : 1),
                n_in, vector ? 1 : n_out);
        return PW_ERR_PARSE;
    }
    if (vector && t->type != KERNEL_DTYPE_F32) {
        set_err(err, cap, "tensor %s: norm weights must be f32, not %s", name,
                kernel_dtype_name(t->type));
        return PW_ERR_UNSUPPORTED;
    }
    enum pw_err e = m->be->ops->weight_create(m->be, (enum kernel_dtype)t->type, vector ? 1 : n_out,
                                              n_in, t->data, out);
    /* A backend that repacked quantized weights keeps its own copy: the file's pages are
     * dead weight in the resident set (peak RSS would be twice the model). */
    if (!e && (m->be->ops->caps(m->be) & KERNEL_CAP_REPACKS) &&
        (t->type == KERNEL_DTYPE_Q4_0 || t->type == KERNEL_DTYPE_Q4_1 ||
         t->type == KERNEL_DTYPE_Q8_0))
        engine_gguf_drop_tensor_pages(m->gguf, t);
    if (e)
        set_err(err, cap, "tensor %s: backend cannot load type %s: %s", name,
                kernel_dtype_name(t->type), pw_err_desc(e));
    return e;
}

static enum pw_err load_weights(struct engine_model *m, char *err, size_t cap)
{
    const struct engine_hparams *hp = &m->hp;
    uint32_t kv_dim = hp->n_head_kv * hp->head_dim;
    char name[96];
    enum pw_err e;
    if ((e = load_weight(m, "token_embd.weight", hp->n_embd, hp->n_vocab, false, &m->tok_embd, err,
                         cap)) ||
        (e = load_weight(m, "output_norm.weight", hp->n_embd, 1, true, &m->output_norm, err, cap)))
        return e;
    if (hp->tied_output)
        m->output = m->tok_embd;
    else if ((e = load_weight(m, "output.weight", hp->n_embd, hp->n_vocab, false, &m->output, err,
                              cap)))
        return e;

    m->layers = calloc(hp->n_layer, sizeof *m->layers);
    if (!m->layers)
        return PW_ERR_NOMEM;
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        struct engine_layer *L = &m->layers[l];
        struct {
            const char *suffix;
            uint32_t n_in, n_out;
            bool vector;
            struct kernel_weight **dst;
        } specs[] = {
            {"attn_norm", hp->n_embd, 1, true, &L->attn_norm},
            {"attn_q", hp->n_embd, hp->n_embd, false, &L->wq},
            {"attn_k", hp->n_embd, kv_dim, false, &L->wk},
            {"attn_v", hp->n_embd, kv_dim, false, &L->wv},
            {"attn_output", hp->n_embd, hp->n_embd, false, &L->wo},
            {"ffn_norm", hp->n_embd, 1, true, &L->ffn_norm},
            {"ffn_gate", hp->n_embd, hp->n_ff, false, &L->w_gate},
            {"ffn_up", hp->n_embd, hp->n_ff, false, &L->w_up},
            {"ffn_down", hp->n_ff, hp->n_embd, false, &L->w_down},
        };
        for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) {
            snprintf(name, sizeof name, "blk.%u.%s.weight", l, specs[i].suffix);
            if ((e = load_weight(m, name, specs[i].n_in, specs[i].n_out, specs[i].vector,
                                 specs[i].dst, err, cap)))
                return e;
        }
    }
    m->hp.weight_type = m->layers[0].wq->info.dtype;
    return PW_OK;
}

static enum pw_err alloc_buffers(struct engine_model *m)
{
    const struct engine_hparams *hp = &m->hp;
    struct kernel_backend *be = m->be;
    size_t T = m->opts.max_tok, L = m->opts.max_logits;
    size_t qd = (size_t)hp->n_head * hp->head_dim, kvd = (size_t)hp->n_head_kv * hp->head_dim;
    struct {
        float **p;
        size_t n;
    } bufs[] = {
        {&m->x, T * hp->n_embd},
        {&m->h, T * hp->n_embd},
        {&m->q, T * qd},
        {&m->k, T * kvd},
        {&m->v, T * kvd},
        {&m->att, T * qd},
        {&m->gate, T * hp->n_ff},
        {&m->up, T * hp->n_ff},
        {&m->lrows, L * hp->n_embd},
        {&m->logits, L * hp->n_vocab},
    };
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        enum pw_err e = be->ops->alloc(be, bufs[i].n * sizeof(float), (void **)bufs[i].p);
        if (e)
            return e;
    }
    uint32_t max_cols = hp->n_ff > hp->n_embd ? hp->n_ff : hp->n_embd;
    if (qd > max_cols)
        max_cols = (uint32_t)qd;
    return be->ops->reserve(
        be, m->opts.max_tok > m->opts.max_logits ? m->opts.max_tok : m->opts.max_logits, max_cols);
}

enum pw_err engine_model_load(const char *path, struct kernel_backend *be,
                              const struct engine_model_opts *opts, struct engine_model **out,
                              char *err, size_t errcap)
{
    *out = NULL;
    struct engine_model *m = calloc(1, sizeof *m);
    if (!m)
        return PW_ERR_NOMEM;
    m->be = be;
    enum pw_err e = engine_gguf_open(path, &m->gguf, err, errcap);
    if (e)
        goto fail;
    if ((e = read_hparams(m->gguf, &m->hp, err, errcap)))
        goto fail;

    m->opts = *opts;
    if (m->opts.max_tok == 0)
        m->opts.max_tok = 256;
    if (m->opts.max_logits == 0)
        m->opts.max_logits = 16;
    if (m->opts.block_tokens == 0)
        m->opts.block_tokens = 16;
    if (m->opts.n_ctx == 0 || m->opts.n_ctx > m->hp.n_ctx_train)
        m->opts.n_ctx = m->hp.n_ctx_train;
    uint64_t per_seq = (m->opts.n_ctx + m->opts.block_tokens - 1) / m->opts.block_tokens;
    bool size_by_memory = m->opts.n_kv_blocks == 0 && be->ops->mem_info != NULL;
    if (m->opts.n_kv_blocks == 0 && !size_by_memory) {
        uint64_t n = per_seq * m->opts.max_logits;
        m->opts.n_kv_blocks = (uint32_t)(n > (1u << 24) ? (1u << 24) : n);
    }

    if ((e = load_weights(m, err, errcap)))
        goto fail;
    if ((e = alloc_buffers(m))) {
        set_err(err, errcap, "model: cannot allocate activation buffers: %s", pw_err_desc(e));
        goto fail;
    }
    if (size_by_memory) {
        /* what the resident weights and buffers left, so the cache gets the rest */
        size_t free_b = 0, total_b = 0;
        if ((e = be->ops->mem_info(be, &free_b, &total_b))) {
            set_err(err, errcap, "model: cannot read the device's free memory: %s", pw_err_desc(e));
            goto fail;
        }
        double frac = m->opts.kv_mem_fraction > 0.0f ? m->opts.kv_mem_fraction : 0.90;
        size_t block_bytes = (size_t)2 * m->hp.n_layer * m->opts.block_tokens * m->hp.n_head_kv *
                             m->hp.head_dim * sizeof(uint16_t);
        uint32_t n = engine_kv_blocks_for_memory(free_b, frac, block_bytes, 1u << 24);
        if (n < per_seq) {
            set_err(err, errcap,
                    "model: %.0f%% of the %zu MiB free after the weights holds %u KV blocks; "
                    "one %u-token context needs %llu",
                    frac * 100.0, free_b >> 20, n, m->opts.n_ctx, (unsigned long long)per_seq);
            e = PW_ERR_NOMEM;
            goto fail;
        }
        m->opts.n_kv_blocks = n;
        PW_LOG_INFO("event=engine_kv_sized free_mib=%zu total_mib=%zu fraction=%.2f blocks=%u "
                    "contexts=%llu",
                    free_b >> 20, total_b >> 20, frac, n, (unsigned long long)(n / per_seq));
    }
    struct kernel_kv_desc kd = {
        .n_layer = m->hp.n_layer,
        .n_kv_head = m->hp.n_head_kv,
        .head_dim = m->hp.head_dim,
        .block_tokens = m->opts.block_tokens,
        .n_blocks = m->opts.n_kv_blocks,
        .dtype = KERNEL_DTYPE_F16,
    };
    if ((e = be->ops->kv_create(be, &kd, &m->kv))) {
        set_err(err, errcap, "model: cannot allocate a KV cache of %u blocks: %s", kd.n_blocks,
                pw_err_desc(e));
        goto fail;
    }
    m->kv_bytes = (size_t)2 * kd.n_layer * kd.n_blocks * kd.block_tokens * kd.n_kv_head *
                  kd.head_dim * sizeof(uint16_t);
    *out = m;
    return PW_OK;
fail:
    engine_model_destroy(m);
    return e;
}

void engine_model_destroy(struct engine_model *m)
{
    if (!m)
        return;
    struct kernel_backend *be = m->be;
    if (m->kv)
        be->ops->kv_destroy(be, m->kv);
    float *bufs[] = {m->x, m->h, m->q, m->k, m->v, m->att, m->gate, m->up, m->lrows, m->logits};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        be->ops->free(be, bufs[i]);
    if (m->layers) {
        for (uint32_t l = 0; l < m->hp.n_layer; l++) {
            struct kernel_weight **ws = (struct kernel_weight **)&m->layers[l];
            for (size_t i = 0; i < sizeof m->layers[l] / sizeof *ws; i++)
                if (ws[i])
                    be->ops->weight_destroy(be, ws[i]);
        }
        free(m->layers);
    }
    if (m->output && m->output != m->tok_embd)
        be->ops->weight_destroy(be, m->output);
    if (m->tok_embd)
        be->ops->weight_destroy(be, m->tok_embd);
    if (m->output_norm)
        be->ops->weight_destroy(be, m->output_norm);
    engine_gguf_destroy(m->gguf);
    free(m);
}

const struct engine_hparams *engine_model_hparams(const struct engine_model *m)
{
    return &m->hp;
}

const struct engine_gguf *engine_model_gguf(const struct engine_model *m)
{
    return m->gguf;
}

const struct engine_model_opts *engine_model_opts(const struct engine_model *m)
{
    return &m->opts;
}

size_t engine_model_kv_bytes(const struct engine_model *m)
{
    return m->kv_bytes;
}

/* The step's ops, up to the logits in m->logits (device memory). */
static void forward_ops(struct engine_model *m, const struct kernel_batch *b,
                        const int32_t *logit_rows, uint32_t n_logits)
{
    const struct engine_hparams *hp = &m->hp;
    struct kernel_backend *be = m->be;
    const struct kernel_ops *ops = be->ops;
    uint32_t n = b->n_tok;
    float scale = 1.0f / sqrtf((float)hp->head_dim);

    ops->embed(be, m->tok_embd, b, m->x);
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        const struct engine_layer *L = &m->layers[l];
        ops->rmsnorm(be, m->x, L->attn_norm, m->h, n, hp->n_embd, hp->rms_eps);
        struct kernel_mm qkv[3] = {
            {.w = L->wq, .y = m->q}, {.w = L->wk, .y = m->k}, {.w = L->wv, .y = m->v}};
        ops->matmul(be, m->h, n, qkv, 3);
        ops->rope(be, m->q, b, hp->n_head, hp->head_dim, hp->rope_dim, hp->rope_base);
        ops->rope(be, m->k, b, hp->n_head_kv, hp->head_dim, hp->rope_dim, hp->rope_base);
        ops->kv_write(be, m->kv, l, b, m->k, m->v);
        ops->attention(be, m->kv, l, b, m->q, m->att, hp->n_head, scale);
        kernel_matmul1(be, L->wo, m->att, n, m->x, true);

        ops->rmsnorm(be, m->x, L->ffn_norm, m->h, n, hp->n_embd, hp->rms_eps);
        struct kernel_mm ffn[2] = {{.w = L->w_gate, .y = m->gate}, {.w = L->w_up, .y = m->up}};
        ops->matmul(be, m->h, n, ffn, 2);
        ops->swiglu(be, m->gate, m->up, m->gate, (size_t)n * hp->n_ff);
        kernel_matmul1(be, L->w_down, m->gate, n, m->x, true);
    }
    if (n_logits == 0)
        return;
    ops->copy_rows(be, m->lrows, m->x, logit_rows, n_logits, hp->n_embd);
    ops->rmsnorm(be, m->lrows, m->output_norm, m->lrows, n_logits, hp->n_embd, hp->rms_eps);
    kernel_matmul1(be, m->output, m->lrows, n_logits, m->logits, false);
}

/* Runs the step's ops, as one recorded launch where the backend records steps. */
static void forward_run(struct engine_model *m, const struct kernel_batch *b,
                        const int32_t *logit_rows, uint32_t n_logits)
{
    struct kernel_backend *be = m->be;
    const struct kernel_ops *ops = be->ops;
    PW_ASSERT(b->n_tok > 0 && b->n_tok <= m->opts.max_tok && n_logits <= m->opts.max_logits);
    enum kernel_step st = KERNEL_STEP_EAGER;
    if (ops->step_begin)
        st = ops->step_begin(be, m->kv, b, logit_rows, n_logits);
    if (st == KERNEL_STEP_REPLAYED)
        return;
    forward_ops(m, b, logit_rows, n_logits);
    if (st == KERNEL_STEP_RECORD && ops->step_end(be) != PW_OK)
        forward_ops(m, b, logit_rows, n_logits); /* the recording failed and nothing ran */
}

void engine_model_forward(struct engine_model *m, const struct kernel_batch *b,
                          const int32_t *logit_rows, uint32_t n_logits, float *logits)
{
    forward_run(m, b, logit_rows, n_logits);
    if (n_logits)
        m->be->ops->download(m->be, logits, m->logits,
                             (size_t)n_logits * m->hp.n_vocab * sizeof(float));
}

uint32_t engine_kv_blocks_for_memory(size_t free_bytes, double fraction, size_t block_bytes,
                                     uint32_t cap)
{
    if (block_bytes == 0 || !(fraction > 0.0) || fraction > 1.0)
        return 0;
    double n = (double)free_bytes * fraction / (double)block_bytes;
    return n >= (double)cap ? cap : (uint32_t)n;
}

const float *engine_model_logits_device(const struct engine_model *m)
{
    return m->logits;
}

bool engine_model_has_topk(const struct engine_model *m)
{
    return m->be->ops->topk != NULL;
}

void engine_model_forward_topk(struct engine_model *m, const struct kernel_batch *b,
                               const int32_t *logit_rows, uint32_t n_logits, uint32_t k,
                               float *vals, int32_t *idx, float *lse)
{
    PW_ASSERT(m->be->ops->topk && n_logits >= 1 && k >= 1 && k <= KERNEL_TOPK_MAX &&
              k <= m->hp.n_vocab);
    forward_run(m, b, logit_rows, n_logits);
    m->be->ops->topk(m->be, m->logits, n_logits, m->hp.n_vocab, k, vals, idx, lse);
}
