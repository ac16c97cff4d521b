/*
 * engine_chat: template families written out in C, rendered to fragments (special ids and
 * text runs) and tokenized with engine_tokenizer_encode_frags().
 *
 * A render builds one text buffer; a marker that is a special token closes the current
 * text run, so each run is exactly the text Hugging Face would see between two special
 * tokens of the rendered string. Contents only ever go into text runs.
 */
#include "engine_chat.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_gguf.h"
#include "engine_unicode.h"
#include "pw_log.h"

struct engine_chat {
    enum engine_chat_family family;
    char *default_system; /* NUL-terminated, or NULL */
    size_t default_system_len;
};

static void errf(char *buf, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void errf(char *buf, size_t cap, const char *fmt, ...)
{
    if (!buf || cap == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, cap, fmt, ap);
    va_end(ap);
}

static const char *const family_names[] = {"chatml", "llama2", "llama3", "mistral", "zephyr"};

const char *engine_chat_family_name(enum engine_chat_family f)
{
    if ((unsigned)f < sizeof family_names / sizeof family_names[0])
        return family_names[f];
    return "unknown";
}

bool engine_chat_family_parse(const char *name, enum engine_chat_family *out)
{
    for (size_t i = 0; i < sizeof family_names / sizeof family_names[0]; i++) {
        if (strcmp(name, family_names[i]) == 0) {
            *out = (enum engine_chat_family)i;
            return true;
        }
    }
    return false;
}

static const char *find(const char *hay, size_t n, const char *needle)
{
    size_t k = strlen(needle);
    if (!hay || k > n)
        return NULL;
    for (size_t i = 0; i + k <= n; i++)
        if (hay[i] == needle[0] && memcmp(hay + i, needle, k) == 0)
            return hay + i;
    return NULL;
}

bool engine_chat_detect(const char *tmpl, size_t len, enum engine_chat_family *out)
{
    /* Order matters: Llama 2 templates also say [INST]. */
    static const struct {
        const char *marker;
        enum engine_chat_family f;
    } rules[] = {
        {"<|im_start|>", ENGINE_CHAT_CHATML}, {"<|start_header_id|>", ENGINE_CHAT_LLAMA3},
        {"<<SYS>>", ENGINE_CHAT_LLAMA2},      {"[INST]", ENGINE_CHAT_MISTRAL},
        {"<|user|>", ENGINE_CHAT_ZEPHYR},
    };
    for (size_t i = 0; i < sizeof rules / sizeof rules[0]; i++) {
        if (find(tmpl, len, rules[i].marker)) {
            *out = rules[i].f;
            return true;
        }
    }
    *out = ENGINE_CHAT_CHATML;
    return false;
}

/*
 * A ChatML template that injects a system message when the first message is not one:
 * it tests messages[0]['role'] != 'system' and has the literal
 * '<|im_start|>system\n...<|im_end|>'. The literal's text is taken only if it holds no
 * template syntax; \n escapes are undone.
 */
static char *extract_default_system(const char *t, size_t n, size_t *out_len)
{
    if (!find(t, n, "!= 'system'") && !find(t, n, "!= \"system\""))
        return NULL;
    const char *m = find(t, n, "<|im_start|>system");
    if (!m)
        return NULL;
    const char *p = m + strlen("<|im_start|>system");
    const char *end = t + n;
    if (p < end && *p == '\n')
        p++;
    else if (end - p >= 2 && p[0] == '\\' && p[1] == 'n')
        p += 2;
    else
        return NULL;
    const char *q = find(p, (size_t)(end - p), "<|im_end|>");
    if (!q || q == p || (size_t)(q - p) > ENGINE_CHAT_MAX_SYSTEM)
        return NULL;
    char *s = malloc((size_t)(q - p) + 1);
    if (!s)
        return NULL;
    size_t k = 0;
    for (const char *r = p; r < q; r++) {
        char c = *r;
        if (c == '\'' || c == '"' || c == '{' || c == '}') {
            free(s); /* not a plain literal: an expression we cannot evaluate */
            return NULL;
        }
        if (c == '\\' && r + 1 < q) {
            char e = *++r;
            c = e == 'n' ? '\n' : e == 't' ? '\t' : e;
        }
        s[k++] = c;
    }
    s[k] = '\0';
    *out_len = k;
    return s;
}

enum pw_err engine_chat_create(const struct engine_tokenizer *tok, const char *tmpl,
                               size_t tmpl_len, const char *override, struct engine_chat **out,
                               char *errbuf, size_t errcap)
{
    (void)tok;
    *out = NULL;
    struct engine_chat *c = calloc(1, sizeof *c);
    if (!c) {
        errf(errbuf, errcap, "chat: out of memory");
        return PW_ERR_NOMEM;
    }
    bool known = engine_chat_detect(tmpl, tmpl ? tmpl_len : 0, &c->family);
    if (override && *override) {
        if (!engine_chat_family_parse(override, &c->family)) {
            errf(errbuf, errcap,
                 "chat template \"%.64s\" is unknown (chatml, llama2, llama3, mistral, zephyr)",
                 override);
            free(c);
            return PW_ERR_CONFIG;
        }
    } else if (!known) {
        PW_LOG_WARN("event=chat_template_unknown template_bytes=%zu fallback=chatml",
                    tmpl ? tmpl_len : 0);
    }
    if (c->family == ENGINE_CHAT_CHATML && tmpl)
        c->default_system = extract_default_system(tmpl, tmpl_len, &c->default_system_len);
    PW_LOG_INFO("event=chat_template family=%s default_system=%s",
                engine_chat_family_name(c->family), c->default_system ? "yes" : "no");
    *out = c;
    return PW_OK;
}

enum pw_err engine_chat_from_gguf(const struct engine_gguf *g, const struct engine_tokenizer *tok,
                                  const char *override, struct engine_chat **out, char *errbuf,
                                  size_t errcap)
{
    struct engine_gguf_str s = {NULL, 0};
    if (!engine_gguf_get_str(g, "tokenizer.chat_template", &s))
        s = (struct engine_gguf_str){NULL, 0};
    return engine_chat_create(tok, s.ptr, (size_t)s.len, override, out, errbuf, errcap);
}

void engine_chat_destroy(struct engine_chat *c)
{
    if (!c)
        return;
    free(c->default_system);
    free(c);
}

enum engine_chat_family engine_chat_family(const struct engine_chat *c)
{
    return c->family;
}

struct engine_tok_str engine_chat_default_system(const struct engine_chat *c)
{
    return (struct engine_tok_str){c->default_system, c->default_system_len};
}

/* ------------------------------------------------------------------------------------- */
/* Rendering                                                                               */

struct frag_at {
    int32_t id; /* >= 0 special */
    size_t off; /* text: into buf */
    size_t len;
};

struct render {
    const struct engine_tokenizer *tok;
    char *buf;
    size_t len, cap;
    struct frag_at *frags;
    size_t n_frags, cap_frags;
    size_t run_start; /* start of the open text run in buf */
    bool oom;
};

static void r_text(struct render *r, const char *s, size_t n)
{
    if (r->oom || n == 0)
        return;
    if (r->len + n > r->cap) {
        size_t cap = r->cap ? r->cap : 256;
        while (cap < r->len + n)
            cap *= 2;
        char *b = realloc(r->buf, cap);
        if (!b) {
            r->oom = true;
            return;
        }
        r->buf = b;
        r->cap = cap;
    }
    memcpy(r->buf + r->len, s, n);
    r->len += n;
}

static void r_str(struct render *r, const char *s)
{
    r_text(r, s, strlen(s));
}

static void r_frag(struct render *r, struct frag_at f)
{
    if (r->oom)
        return;
    if (r->n_frags == r->cap_frags) {
        size_t cap = r->cap_frags ? r->cap_frags * 2 : 16;
        struct frag_at *p = realloc(r->frags, cap * sizeof *p);
        if (!p) {
            r->oom = true;
            return;
        }
        r->frags = p;
        r->cap_frags = cap;
    }
    r->frags[r->n_frags++] = f;
}

static void r_close_run(struct render *r)
{
    if (r->len > r->run_start)
        r_frag(r, (struct frag_at){.id = -1, .off = r->run_start, .len = r->len - r->run_start});
    r->run_start = r->len;
}

static void r_special(struct render *r, int32_t id)
{
    if (id < 0)
        return;
    r_close_run(r);
    r_frag(r, (struct frag_at){.id = id});
}

/* A template marker: its special token if the vocabulary has one, else text. */
static void r_marker(struct render *r, const char *m)
{
    int32_t id = engine_tokenizer_special_id(r->tok, m, strlen(m));
    if (id >= 0)
        r_special(r, id);
    else
        r_str(r, m);
}

/* Python's str.strip(): White_Space at both ends. */
static void strip(const char **s, size_t *n)
{
    const uint8_t *p = (const uint8_t *)*s;
    size_t a = 0, b = *n;
    while (a < b) {
        uint32_t cp;
        size_t k = engine_utf8_next(p + a, b - a, &cp, NULL);
        if (!(engine_unicode_class(cp) & ENGINE_UCLASS_SPACE))
            break;
        a += k;
    }
    while (b > a) {
        size_t k = 1; /* find the start of the last character */
        while (k < 4 && k < b - a && (p[b - k] & 0xC0) == 0x80)
            k++;
        uint32_t cp;
        size_t got = engine_utf8_next(p + b - k, k, &cp, NULL);
        if (got != k || !(engine_unicode_class(cp) & ENGINE_UCLASS_SPACE))
            break;
        b -= k;
    }
    *s += a;
    *n = b - a;
}

enum role { ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT };

static bool parse_role(const char *s, enum role *out)
{
    if (!s)
        return false;
    if (strcmp(s, "system") == 0)
        *out = ROLE_SYSTEM;
    else if (strcmp(s, "user") == 0)
        *out = ROLE_USER;
    else if (strcmp(s, "assistant") == 0)
        *out = ROLE_ASSISTANT;
    else
        return false;
    return true;
}

static void render_chatml(const struct engine_chat *c, struct render *r,
                          const struct engine_chat_msg *m, size_t n, bool gen)
{
    for (size_t i = 0; i < n; i++) {
        if (i == 0 && c->default_system && strcmp(m[0].role, "system") != 0) {
            r_marker(r, "<|im_start|>");
            r_str(r, "system\n");
            r_text(r, c->default_system, c->default_system_len);
            r_marker(r, "<|im_end|>");
            r_str(r, "\n");
        }
        r_marker(r, "<|im_start|>");
        r_str(r, m[i].role);
        r_str(r, "\n");
        r_text(r, m[i].content, m[i].content_len);
        r_marker(r, "<|im_end|>");
        r_str(r, "\n");
    }
    if (gen) {
        r_marker(r, "<|im_start|>");
        r_str(r, "assistant\n");
    }
}

/* HF Llama 2 chat: the system prompt is wrapped into the first user turn. */
static void render_llama2(struct render *r, const struct engine_chat_msg *m, size_t n)
{
    size_t first = 0;
    const struct engine_chat_msg *sys = NULL;
    if (n > 0 && strcmp(m[0].role, "system") == 0) {
        sys = &m[0];
        first = 1;
    }
    int32_t bos = engine_tokenizer_bos(r->tok), eos = engine_tokenizer_eos(r->tok);
    for (size_t i = first; i < n; i++) {
        /* content = ('<<SYS>>\n' + system + '\n<</SYS>>\n\n' if first) + content, stripped */
        const char *s = m[i].content;
        size_t len = m[i].content_len;
        bool with_sys = i == first && sys;
        if (strcmp(m[i].role, "user") == 0) {
            r_special(r, bos);
            r_marker(r, "[INST]");
            r_str(r, " ");
            if (with_sys) {
                r_marker(r, "<<SYS>>");
                r_str(r, "\n");
                r_text(r, sys->content, sys->content_len);
                r_str(r, "\n");
                r_marker(r, "<</SYS>>");
                r_str(r, "\n\n");
                /* only the end is stripped: the start is the <<SYS>> block */
                const char *t = s;
                size_t tl = len;
                strip(&t, &tl);
                size_t lead = (size_t)(t - s);
                r_text(r, s, lead + tl);
            } else {
                strip(&s, &len);
                r_text(r, s, len);
            }
            r_str(r, " ");
            r_marker(r, "[/INST]");
        } else {
            r_str(r, " ");
            if (with_sys) {
                r_marker(r, "<<SYS>>");
                r_str(r, "\n");
                r_text(r, sys->content, sys->content_len);
                r_str(r, "\n");
                r_marker(r, "<</SYS>>");
                r_str(r, "\n\n");
                const char *t = s;
                size_t tl = len;
                strip(&t, &tl);
                r_text(r, s, (size_t)(t - s) + tl);
            } else {
                strip(&s, &len);
                r_text(r, s, len);
            }
            r_str(r, " ");
            r_special(r, eos);
        }
    }
}

static void render_llama3(struct render *r, const struct engine_chat_msg *m, size_t n, bool gen)
{
    int32_t bot = engine_tokenizer_special_id(r->tok, "<|begin_of_text|>", 17);
    if (n > 0) /* the HF template puts BOS on the first message */
        r_special(r, bot >= 0 ? bot : engine_tokenizer_bos(r->tok));
    for (size_t i = 0; i < n; i++) {
        r_marker(r, "<|start_header_id|>");
        r_str(r, m[i].role);
        r_marker(r, "<|end_header_id|>");
        r_str(r, "\n\n");
        const char *s = m[i].content;
        size_t len = m[i].content_len;
        strip(&s, &len);
        r_text(r, s, len);
        r_marker(r, "<|eot_id|>");
    }
    if (gen) {
        r_marker(r, "<|start_header_id|>");
        r_str(r, "assistant");
        r_marker(r, "<|end_header_id|>");
        r_str(r, "\n\n");
    }
}

/* Mistral v0.1: no system role, so a system message is prepended to the first user turn. */
static void render_mistral(struct render *r, const struct engine_chat_msg *m, size_t n)
{
    const struct engine_chat_msg *sys = NULL;
    size_t first = 0;
    if (n > 0 && strcmp(m[0].role, "system") == 0) {
        sys = &m[0];
        first = 1;
    }
    r_special(r, engine_tokenizer_bos(r->tok));
    bool sys_done = false;
    for (size_t i = first; i < n; i++) {
        if (strcmp(m[i].role, "user") == 0) {
            r_marker(r, "[INST]");
            r_str(r, " ");
            if (sys && !sys_done) {
                r_text(r, sys->content, sys->content_len);
                r_str(r, "\n\n");
                sys_done = true;
            }
            r_text(r, m[i].content, m[i].content_len);
            r_str(r, " ");
            r_marker(r, "[/INST]");
        } else {
            r_text(r, m[i].content, m[i].content_len);
            r_special(r, engine_tokenizer_eos(r->tok));
        }
    }
}

static void render_zephyr(struct render *r, const struct engine_chat_msg *m, size_t n, bool gen)
{
    for (size_t i = 0; i < n; i++) {
        char marker[32];
        snprintf(marker, sizeof marker, "<|%s|>", m[i].role);
        r_marker(r, marker);
        r_str(r, "\n");
        r_text(r, m[i].content, m[i].content_len);
        r_special(r, engine_tokenizer_eos(r->tok));
        r_str(r, "\n");
    }
    if (gen && n > 0) { /* the HF template adds it after the last message */
        r_marker(r, "<|assistant|>");
        r_str(r, "\n");
    }
}

enum pw_err engine_chat_render(const struct engine_chat *c, const struct engine_tokenizer *tok,
                               const struct engine_chat_msg *msgs, size_t n,
                               bool add_generation_prompt, int32_t *ids, size_t cap, size_t *n_out,
                               char *errbuf, size_t errcap)
{
    enum pw_err err = PW_OK;
    struct render r = {.tok = tok};
    struct engine_tok_frag *frags = NULL;
    *n_out = 0;
    if (n > ENGINE_CHAT_MAX_MESSAGES) {
        errf(errbuf, errcap, "chat: %zu messages, over the cap of %u", n, ENGINE_CHAT_MAX_MESSAGES);
        return PW_ERR_INVAL;
    }
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        enum role role;
        if (!parse_role(msgs[i].role, &role)) {
            errf(errbuf, errcap, "chat: message %zu has unknown role \"%.32s\"", i,
                 msgs[i].role ? msgs[i].role : "(null)");
            return PW_ERR_INVAL;
        }
        if (role == ROLE_SYSTEM && i != 0) {
            errf(errbuf, errcap, "chat: a system message is allowed only first (message %zu)", i);
            return PW_ERR_INVAL;
        }
        if (msgs[i].content_len && !msgs[i].content) {
            errf(errbuf, errcap, "chat: message %zu has no content", i);
            return PW_ERR_INVAL;
        }
        total += msgs[i].content_len;
        if (total > ENGINE_TOK_MAX_INPUT) {
            errf(errbuf, errcap, "chat: conversation over %zu bytes", ENGINE_TOK_MAX_INPUT);
            return PW_ERR_TOOBIG;
        }
    }
    switch (c->family) {
    case ENGINE_CHAT_LLAMA2:
        render_llama2(&r, msgs, n);
        break;
    case ENGINE_CHAT_LLAMA3:
        render_llama3(&r, msgs, n, add_generation_prompt);
        break;
    case ENGINE_CHAT_MISTRAL:
        render_mistral(&r, msgs, n);
        break;
    case ENGINE_CHAT_ZEPHYR:
        render_zephyr(&r, msgs, n, add_generation_prompt);
        break;
    case ENGINE_CHAT_CHATML:
    default:
        render_chatml(c, &r, msgs, n, add_generation_prompt);
        break;
    }
    r_close_run(&r);
    if (r.oom) {
        err = PW_ERR_NOMEM;
        goto out;
    }
    frags = malloc((r.n_frags ? r.n_frags : 1) * sizeof *frags);
    if (!frags) {
        err = PW_ERR_NOMEM;
        goto out;
    }
    for (size_t i = 0; i < r.n_frags; i++)
        frags[i] = (struct engine_tok_frag){
            .id = r.frags[i].id, .text = r.buf + r.frags[i].off, .len = r.frags[i].len};
    err = engine_tokenizer_encode_frags(tok, frags, r.n_frags, 0, ids, cap, n_out);
out:
    if (err == PW_ERR_NOMEM)
        errf(errbuf, errcap, "chat: out of memory");
    else if (err == PW_ERR_TOOBIG)
        errf(errbuf, errcap, "chat: the rendered conversation is over %zu tokens", cap);
    else if (err)
        errf(errbuf, errcap, "chat: cannot tokenize: %s", pw_err_desc(err));
    free(frags);
    free(r.frags);
    free(r.buf);
    return err;
}
