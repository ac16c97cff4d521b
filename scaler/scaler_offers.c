/*
 * scaler_offers: offer catalogs (strict YAML reader) and offer selection.
 *
 * The catalog reader walks libyaml's event stream directly: the schema is flat (a mapping
 * with `provider` and `offers`, a list of mappings of scalars), so no tree is built and
 * nothing is allocated per event beyond libyaml's own buffers. Every event is checked
 * for anchors, aliases and tags before it is used. Reentrant; no globals.
 */
#include "scaler_offers.h"

#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

#include "pw_yaml.h"

#define KEYPATH_MAX 96

struct rctx {
    const char *origin;
    char *errbuf;
    size_t errcap;
    enum pw_err err;
    yaml_parser_t parser;
};

__attribute__((format(printf, 5, 6))) static void
fail(struct rctx *c, yaml_mark_t m, const char *path, enum pw_err err, const char *fmt, ...)
{
    if (c->err)
        return;
    c->err = err;
    if (!c->errbuf || c->errcap == 0)
        return;
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    snprintf(c->errbuf, c->errcap, "%s:%u:%u: %s: %s", c->origin, (unsigned)m.line + 1,
             (unsigned)m.column + 1, path && path[0] ? path : "(document)", msg);
    for (char *p = c->errbuf; *p; p++) {
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            *p = '?';
    }
}

/* Next event, refusing aliases, anchors and explicit tags. False after an error. */
static bool next(struct rctx *c, yaml_event_t *ev, const char *path)
{
    if (!yaml_parser_parse(&c->parser, ev)) {
        yaml_parser_t *p = &c->parser;
        if (p->error == YAML_MEMORY_ERROR) {
            fail(c, p->problem_mark, path, PW_ERR_NOMEM, "out of memory");
        } else {
            fail(c, p->problem_mark, path, PW_ERR_CONFIG, "invalid YAML: %s",
                 p->problem ? p->problem : "unknown error");
        }
        return false;
    }
    const char *refused = pw_yaml_refusal(ev);
    if (refused) {
        fail(c, ev->start_mark, path, PW_ERR_CONFIG, "%s", refused);
        yaml_event_delete(ev);
        return false;
    }
    return true;
}

static const char *describe(const yaml_event_t *ev)
{
    switch (ev->type) {
    case YAML_MAPPING_START_EVENT:
        return "a mapping";
    case YAML_SEQUENCE_START_EVENT:
        return "a list";
    case YAML_SCALAR_EVENT:
        return "a scalar";
    default:
        return "nothing";
    }
}

/* ---- value parsers ---- */

/* "D+[.D+]" with at most `frac` fraction digits, scaled by 10^frac, whole string. */
static bool parse_fixed(const char *s, unsigned frac, uint64_t *out)
{
    uint64_t v = 0;
    unsigned nfrac = 0;
    bool dot = false, digit = false;
    if (!*s)
        return false;
    for (const char *p = s; *p; p++) {
        if (*p == '.') {
            if (dot || !digit || !p[1])
                return false;
            dot = true;
            continue;
        }
        if (*p < '0' || *p > '9')
            return false;
        if (dot && ++nfrac > frac)
            return false;
        if (v > (UINT64_MAX - 9) / 10)
            return false;
        v = v * 10 + (uint64_t)(*p - '0');
        digit = true;
    }
    for (unsigned i = nfrac; i < frac; i++) {
        if (v > UINT64_MAX / 10)
            return false;
        v *= 10;
    }
    *out = v;
    return true;
}

static bool parse_uint(const char *s, uint64_t max, uint64_t *out)
{
    if (!*s || (s[0] == '0' && s[1]))
        return false;
    uint64_t v;
    if (!parse_fixed(s, 0, &v) || strchr(s, '.') || v > max)
        return false;
    *out = v;
    return true;
}

static bool is_name(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > SCALER_OFFER_NAME_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                  (ch >= '0' && ch <= '9') || ch == '-' || ch == '_' || ch == '.';
        if (!ok)
            return false;
    }
    return true;
}

/* ---- the walker ---- */

enum okey {
    K_INSTANCE_TYPE,
    K_GPU,
    K_GPU_COUNT,
    K_GPU_MEMORY,
    K_CPU,
    K_MEMORY,
    K_PRICE,
    K_SPOT_PRICE,
    K_PARKED_PRICE,
    K_PROVISION,
    K_UNPARK,
    K_COUNT
};
static const char *const okey_names[K_COUNT] = {
    "instance_type",
    "gpu",
    "gpu_count",
    "gpu_memory",
    "cpu",
    "memory",
    "price_per_hour",
    "spot_price_per_hour",
    "parked_price_per_hour",
    "provision",
    "unpark",
};
#define OKEY_LIST                                                                                  \
    "instance_type, gpu, gpu_count, gpu_memory, cpu, memory, price_per_hour, "                     \
    "spot_price_per_hour, parked_price_per_hour, provision, unpark"

/* Max price one offer may have: one million USD per hour. */
#define PRICE_MAX (1000000ULL * 1000000ULL)

static bool set_value(struct rctx *c, struct scaler_offer *o, enum okey k, const yaml_event_t *ev,
                      const char *path)
{
    const char *v = (const char *)ev->data.scalar.value;
    bool plain = ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
    uint64_t u = 0;
    yaml_mark_t m = ev->start_mark;
    if (strlen(v) != ev->data.scalar.length) {
        fail(c, m, path, PW_ERR_CONFIG, "NUL byte in value");
        return false;
    }
    if (plain && (v[0] == '\0' || strcmp(v, "~") == 0 || strcasecmp(v, "null") == 0)) {
        fail(c, m, path, PW_ERR_CONFIG, "a value is required");
        return false;
    }
    switch (k) {
    case K_INSTANCE_TYPE:
        if (!is_name(v)) {
            fail(c, m, path, PW_ERR_CONFIG, "must be 1..63 of [A-Za-z0-9._-]");
            return false;
        }
        snprintf(o->instance_type, sizeof o->instance_type, "%s", v);
        return true;
    case K_GPU:
        if (strcmp(v, "none") == 0) {
            o->gpu_model[0] = '\0';
            return true;
        }
        if (!is_name(v) || !((v[0] >= 'a' && v[0] <= 'z') || (v[0] >= 'A' && v[0] <= 'Z')) ||
            strcasecmp(v, "true") == 0 || strcasecmp(v, "false") == 0 ||
            strcasecmp(v, "yes") == 0 || strcasecmp(v, "no") == 0 || strcasecmp(v, "on") == 0 ||
            strcasecmp(v, "off") == 0) {
            fail(c, m, path, PW_ERR_CONFIG, "must be none or a GPU model name (e.g. a10g)");
            return false;
        }
        snprintf(o->gpu_model, sizeof o->gpu_model, "%s", v);
        return true;
    case K_GPU_COUNT:
        if (!plain || !parse_uint(v, 64, &u)) {
            fail(c, m, path, PW_ERR_CONFIG, "must be a whole number 0..64");
            return false;
        }
        o->gpu_count = (uint32_t)u;
        return true;
    case K_GPU_MEMORY:
    case K_MEMORY:
        if (pw_spec_parse_size(v, &u) != PW_OK) {
            fail(c, m, path, PW_ERR_CONFIG, "must be a size such as 24GiB");
            return false;
        }
        if (k == K_MEMORY)
            o->memory_bytes = u;
        else
            o->gpu_memory_bytes = u;
        return true;
    case K_CPU: {
        size_t n = strlen(v);
        bool milli = n > 1 && v[n - 1] == 'm';
        char buf[32];
        if (n >= sizeof buf) {
            fail(c, m, path, PW_ERR_CONFIG, "must be cores (4, 0.5) or millicores (500m)");
            return false;
        }
        memcpy(buf, v, n + 1);
        if (milli)
            buf[n - 1] = '\0';
        if (!(milli ? parse_uint(buf, 1000000000, &u) : parse_fixed(buf, 3, &u)) || u == 0 ||
            u > 1000000000) {
            fail(c, m, path, PW_ERR_CONFIG, "must be cores (4, 0.5) or millicores (500m)");
            return false;
        }
        o->cpu_millicores = (uint32_t)u;
        return true;
    }
    case K_PRICE:
    case K_SPOT_PRICE:
    case K_PARKED_PRICE:
        if (!plain || !parse_fixed(v, 6, &u) || u > PRICE_MAX) {
            fail(c, m, path, PW_ERR_CONFIG,
                 "must be USD per hour, a decimal with at most 6 places, 0..1000000");
            return false;
        }
        if (k == K_PRICE) {
            o->price_microusd_per_hour = u;
        } else if (k == K_SPOT_PRICE) {
            o->spot_price_microusd_per_hour = u;
            o->spot_available = true;
        } else {
            o->parked_microusd_per_hour = u;
        }
        return true;
    case K_PROVISION:
    case K_UNPARK:
        if (pw_spec_parse_duration_ms(v, &u) != PW_OK || u > 24ULL * 3600 * 1000) {
            fail(c, m, path, PW_ERR_CONFIG, "must be a duration 0..24h such as 90s");
            return false;
        }
        if (k == K_PROVISION)
            o->provision_ms = (uint32_t)u;
        else
            o->unpark_ms = (uint32_t)u;
        return true;
    case K_COUNT:
        break;
    }
    return false;
}

/* Reads one offer mapping (its MAPPING_START already consumed). */
static bool read_offer(struct rctx *c, yaml_mark_t start, size_t idx, struct scaler_offer *o)
{
    char base[32], path[KEYPATH_MAX];
    bool seen[K_COUNT] = {false};
    yaml_event_t ev;
    snprintf(base, sizeof base, "offers[%zu]", idx);
    for (;;) {
        if (!next(c, &ev, base))
            return false;
        if (ev.type == YAML_MAPPING_END_EVENT) {
            yaml_event_delete(&ev);
            break;
        }
        if (ev.type != YAML_SCALAR_EVENT) {
            fail(c, ev.start_mark, base, PW_ERR_CONFIG, "keys must be scalars");
            yaml_event_delete(&ev);
            return false;
        }
        const char *key = (const char *)ev.data.scalar.value;
        int k = -1;
        for (int i = 0; i < K_COUNT; i++) {
            if (strcmp(key, okey_names[i]) == 0)
                k = i;
        }
        snprintf(path, sizeof path, "%s.%.40s", base, key);
        if (k < 0) {
            fail(c, ev.start_mark, path, PW_ERR_CONFIG, "unknown key (expected one of: %s)",
                 OKEY_LIST);
            yaml_event_delete(&ev);
            return false;
        }
        if (seen[k]) {
            fail(c, ev.start_mark, path, PW_ERR_CONFIG, "duplicate key");
            yaml_event_delete(&ev);
            return false;
        }
        seen[k] = true;
        yaml_event_delete(&ev);
        if (!next(c, &ev, path))
            return false;
        if (ev.type != YAML_SCALAR_EVENT) {
            fail(c, ev.start_mark, path, PW_ERR_CONFIG, "expected a scalar, got %s", describe(&ev));
            yaml_event_delete(&ev);
            return false;
        }
        bool ok = set_value(c, o, (enum okey)k, &ev, path);
        yaml_event_delete(&ev);
        if (!ok)
            return false;
    }
    static const enum okey required[] = {K_INSTANCE_TYPE, K_CPU, K_MEMORY, K_PRICE, K_PROVISION};
    for (size_t i = 0; i < sizeof required / sizeof required[0]; i++) {
        if (!seen[required[i]]) {
            snprintf(path, sizeof path, "%s.%s", base, okey_names[required[i]]);
            fail(c, start, path, PW_ERR_CONFIG, "required key is missing");
            return false;
        }
    }
    /* Cross-field rules and defaults. */
    if (o->gpu_model[0]) {
        if (!seen[K_GPU_COUNT])
            o->gpu_count = 1;
        if (o->gpu_count == 0) {
            snprintf(path, sizeof path, "%s.gpu_count", base);
            fail(c, start, path, PW_ERR_CONFIG, "must be >= 1 when gpu is set");
            return false;
        }
        if (!seen[K_GPU_MEMORY]) {
            snprintf(path, sizeof path, "%s.gpu_memory", base);
            fail(c, start, path, PW_ERR_CONFIG, "required when gpu is set");
            return false;
        }
    } else if ((seen[K_GPU_COUNT] && o->gpu_count) || (seen[K_GPU_MEMORY] && o->gpu_memory_bytes)) {
        snprintf(path, sizeof path, "%s.gpu", base);
        fail(c, start, path, PW_ERR_CONFIG, "gpu_count and gpu_memory need a gpu model");
        return false;
    }
    if (!seen[K_UNPARK])
        o->unpark_ms = o->provision_ms;
    return true;
}

enum pw_err scaler_offers_add(struct scaler_offer_catalog *cat, const struct scaler_offer *offer)
{
    if (!cat || !offer)
        return PW_ERR_INVAL;
    if (cat->count >= SCALER_OFFERS_MAX)
        return PW_ERR_TOOBIG;
    struct scaler_offer *grown = realloc(cat->offers, (cat->count + 1) * sizeof *grown);
    if (!grown)
        return PW_ERR_NOMEM;
    cat->offers = grown;
    cat->offers[cat->count++] = *offer;
    return PW_OK;
}

enum pw_err scaler_offers_parse(const char *text, size_t len, const char *origin,
                                struct scaler_offer_catalog *cat, char *errbuf, size_t errcap)
{
    struct rctx c = {.origin = origin ? origin : "<offers>", .errbuf = errbuf, .errcap = errcap};
    struct scaler_offer_catalog tmp = {0};
    char provider[SCALER_OFFER_NAME_MAX + 1] = "";
    bool seen_provider = false, seen_offers = false;
    yaml_event_t ev;
    yaml_mark_t zero = {0, 0, 0};

    if (errbuf && errcap)
        errbuf[0] = '\0';
    if (!text || !cat) {
        if (errbuf && errcap)
            snprintf(errbuf, errcap, "%s:1:1: (document): invalid argument", c.origin);
        return PW_ERR_INVAL;
    }
    if (len > SCALER_OFFERS_MAX_BYTES) {
        fail(&c, zero, "", PW_ERR_CONFIG, "the catalog is larger than %d bytes",
             SCALER_OFFERS_MAX_BYTES);
        return c.err;
    }
    if (memchr(text, '\0', len)) {
        fail(&c, zero, "", PW_ERR_CONFIG, "NUL byte in the file");
        return c.err;
    }
    if (!yaml_parser_initialize(&c.parser)) {
        fail(&c, zero, "", PW_ERR_NOMEM, "out of memory");
        return c.err;
    }
    yaml_parser_set_input_string(&c.parser, (const unsigned char *)text, len);

    if (!next(&c, &ev, "")) /* stream start */
        goto out;
    yaml_event_delete(&ev);
    if (!next(&c, &ev, ""))
        goto out;
    if (ev.type != YAML_DOCUMENT_START_EVENT) {
        fail(&c, zero, "", PW_ERR_CONFIG, "the catalog is empty");
        yaml_event_delete(&ev);
        goto out;
    }
    yaml_event_delete(&ev);
    if (!next(&c, &ev, ""))
        goto out;
    if (ev.type != YAML_MAPPING_START_EVENT) {
        fail(&c, ev.start_mark, "", PW_ERR_CONFIG, "expected a mapping, got %s", describe(&ev));
        yaml_event_delete(&ev);
        goto out;
    }
    yaml_mark_t root_mark = ev.start_mark;
    yaml_event_delete(&ev);
    for (;;) {
        if (!next(&c, &ev, ""))
            goto out;
        if (ev.type == YAML_MAPPING_END_EVENT) {
            yaml_event_delete(&ev);
            break;
        }
        if (ev.type != YAML_SCALAR_EVENT) {
            fail(&c, ev.start_mark, "", PW_ERR_CONFIG, "keys must be scalars");
            yaml_event_delete(&ev);
            goto out;
        }
        char key[48];
        snprintf(key, sizeof key, "%.40s", (const char *)ev.data.scalar.value);
        bool is_provider = strcmp(key, "provider") == 0, is_offers = strcmp(key, "offers") == 0;
        if (!is_provider && !is_offers) {
            fail(&c, ev.start_mark, key, PW_ERR_CONFIG,
                 "unknown key (expected one of: provider, offers)");
            yaml_event_delete(&ev);
            goto out;
        }
        if ((is_provider && seen_provider) || (is_offers && seen_offers)) {
            fail(&c, ev.start_mark, key, PW_ERR_CONFIG, "duplicate key");
            yaml_event_delete(&ev);
            goto out;
        }
        yaml_event_delete(&ev);
        if (!next(&c, &ev, key))
            goto out;
        if (is_provider) {
            seen_provider = true;
            const char *v = ev.type == YAML_SCALAR_EVENT ? (const char *)ev.data.scalar.value : "";
            if (ev.type != YAML_SCALAR_EVENT || !is_name(v)) {
                fail(&c, ev.start_mark, key, PW_ERR_CONFIG,
                     "must be a name, 1..63 of [A-Za-z0-9._-]");
                yaml_event_delete(&ev);
                goto out;
            }
            snprintf(provider, sizeof provider, "%s", v);
            yaml_event_delete(&ev);
            continue;
        }
        seen_offers = true;
        if (ev.type != YAML_SEQUENCE_START_EVENT) {
            fail(&c, ev.start_mark, key, PW_ERR_CONFIG, "expected a list, got %s", describe(&ev));
            yaml_event_delete(&ev);
            goto out;
        }
        yaml_event_delete(&ev);
        for (size_t idx = 0;; idx++) {
            char ipath[32];
            snprintf(ipath, sizeof ipath, "offers[%zu]", idx);
            if (!next(&c, &ev, ipath))
                goto out;
            if (ev.type == YAML_SEQUENCE_END_EVENT) {
                yaml_event_delete(&ev);
                break;
            }
            if (ev.type != YAML_MAPPING_START_EVENT) {
                fail(&c, ev.start_mark, ipath, PW_ERR_CONFIG, "expected a mapping, got %s",
                     describe(&ev));
                yaml_event_delete(&ev);
                goto out;
            }
            yaml_mark_t om = ev.start_mark;
            yaml_event_delete(&ev);
            if (cat->count + tmp.count >= SCALER_OFFERS_MAX) {
                fail(&c, om, ipath, PW_ERR_CONFIG, "more than %d offers", SCALER_OFFERS_MAX);
                goto out;
            }
            struct scaler_offer o;
            memset(&o, 0, sizeof o);
            if (!read_offer(&c, om, idx, &o))
                goto out;
            enum pw_err e = scaler_offers_add(&tmp, &o);
            if (e) {
                fail(&c, om, ipath, e, "out of memory");
                goto out;
            }
        }
    }
    if (!seen_provider || !seen_offers) {
        fail(&c, root_mark, seen_provider ? "offers" : "provider", PW_ERR_CONFIG,
             "required key is missing");
        goto out;
    }
    if (!next(&c, &ev, "")) /* document end */
        goto out;
    yaml_event_delete(&ev);
    if (!next(&c, &ev, ""))
        goto out;
    if (ev.type != YAML_STREAM_END_EVENT) {
        fail(&c, ev.start_mark, "", PW_ERR_CONFIG, "only one YAML document is allowed");
        yaml_event_delete(&ev);
        goto out;
    }
    yaml_event_delete(&ev);
    /* Commit: stamp the provider, append to cat in one step. */
    for (size_t i = 0; i < tmp.count; i++)
        snprintf(tmp.offers[i].provider, sizeof tmp.offers[i].provider, "%s", provider);
    if (tmp.count) {
        struct scaler_offer *grown = realloc(cat->offers, (cat->count + tmp.count) * sizeof *grown);
        if (!grown) {
            fail(&c, zero, "", PW_ERR_NOMEM, "out of memory");
            goto out;
        }
        memcpy(grown + cat->count, tmp.offers, tmp.count * sizeof *grown);
        cat->offers = grown;
        cat->count += tmp.count;
    }
out:
    yaml_parser_delete(&c.parser);
    scaler_offer_catalog_deinit(&tmp);
    return c.err;
}

enum pw_err scaler_offers_load_file(const char *path, struct scaler_offer_catalog *cat,
                                    char *errbuf, size_t errcap)
{
    enum pw_err err = PW_OK;
    char *buf = NULL;
    size_t len = 0;
    FILE *f = fopen(path, "rb");
    if (!f) {
        if (errbuf && errcap)
            snprintf(errbuf, errcap, "%s:1:1: (document): cannot read: %s", path, strerror(errno));
        return PW_ERR_IO;
    }
    buf = malloc(SCALER_OFFERS_MAX_BYTES + 1);
    if (!buf) {
        err = PW_ERR_NOMEM;
        goto out;
    }
    len = fread(buf, 1, SCALER_OFFERS_MAX_BYTES + 1, f);
    if (ferror(f)) {
        if (errbuf && errcap)
            snprintf(errbuf, errcap, "%s:1:1: (document): cannot read: %s", path, strerror(errno));
        err = PW_ERR_IO;
        goto out;
    }
    err = scaler_offers_parse(buf, len, path, cat, errbuf, errcap);
out:
    free(buf);
    fclose(f);
    return err;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static bool has_yaml_suffix(const char *n)
{
    size_t l = strlen(n);
    return (l > 5 && strcmp(n + l - 5, ".yaml") == 0) || (l > 4 && strcmp(n + l - 4, ".yml") == 0);
}

enum pw_err scaler_offers_load_dir(const char *dir, struct scaler_offer_catalog *cat, char *errbuf,
                                   size_t errcap)
{
    enum pw_err err = PW_OK;
    char **names = NULL;
    size_t n = 0;
    size_t before = cat->count;
    DIR *d = opendir(dir);
    if (!d) {
        if (errbuf && errcap)
            snprintf(errbuf, errcap, "%s:1:1: (document): cannot read: %s", dir, strerror(errno));
        return PW_ERR_IO;
    }
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.' || !has_yaml_suffix(de->d_name))
            continue;
        if (n >= 4096) {
            err = PW_ERR_TOOBIG;
            goto out;
        }
        char **grown = realloc(names, (n + 1) * sizeof *grown);
        if (!grown) {
            err = PW_ERR_NOMEM;
            goto out;
        }
        names = grown;
        if (asprintf(&names[n], "%s/%s", dir, de->d_name) < 0) {
            err = PW_ERR_NOMEM;
            goto out;
        }
        n++;
    }
    if (n)
        qsort(names, n, sizeof *names, cmp_str);
    for (size_t i = 0; i < n && !err; i++)
        err = scaler_offers_load_file(names[i], cat, errbuf, errcap);
out:
    if (err && cat->count > before)
        cat->count = before; /* drop what this call appended */
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    closedir(d);
    return err;
}

void scaler_offer_catalog_deinit(struct scaler_offer_catalog *cat)
{
    if (!cat)
        return;
    free(cat->offers);
    cat->offers = NULL;
    cat->count = 0;
}

void scaler_offer_req_from_spec(struct scaler_offer_req *req, const struct pw_spec *spec)
{
    memset(req, 0, sizeof *req);
    req->gpu = spec->resources.gpu;
    req->gpu_model = spec->resources.gpu_model;
    req->gpu_memory_bytes = spec->resources.gpu_memory_bytes;
    req->cpu_millicores = spec->resources.cpu_millicores;
    req->memory_bytes = spec->resources.memory_bytes;
    req->max_microusd_per_hour = spec->pricing.max_microusd_per_hour;
    req->spot = spec->pricing.spot;
}

/* ---- selection ---- */

static bool fits(const struct scaler_offer *o, const struct scaler_offer_req *r)
{
    if (r->gpu != PW_SPEC_GPU_NONE) {
        if (!o->gpu_model[0] || o->gpu_count == 0)
            return false;
        if (r->gpu == PW_SPEC_GPU_MODEL &&
            (!r->gpu_model || strcasecmp(r->gpu_model, o->gpu_model) != 0))
            return false;
        if (o->gpu_memory_bytes < r->gpu_memory_bytes)
            return false;
    }
    return o->cpu_millicores >= r->cpu_millicores && o->memory_bytes >= r->memory_bytes;
}

const char *scaler_format_usd(char *buf, size_t cap, uint64_t microusd)
{
    uint64_t whole = microusd / 1000000, frac = microusd % 1000000;
    if (frac == 0) {
        snprintf(buf, cap, "%llu", (unsigned long long)whole);
        return buf;
    }
    char f[8];
    snprintf(f, sizeof f, "%06llu", (unsigned long long)frac);
    for (int i = 5; i > 0 && f[i] == '0'; i--)
        f[i] = '\0';
    snprintf(buf, cap, "%llu.%s", (unsigned long long)whole, f);
    return buf;
}

enum pw_err scaler_offer_select(const struct scaler_offer *offers, size_t n,
                                const struct scaler_offer_req *req, bool batch,
                                struct scaler_offer_choice *out)
{
    if (!out)
        return PW_ERR_INVAL;
    memset(out, 0, sizeof *out);
    if ((!offers && n) || !req) {
        snprintf(out->reason, sizeof out->reason, "invalid arguments");
        return PW_ERR_INVAL;
    }
    size_t too_small = 0, over_price = 0, no_spot = 0, batch_wait = 0;
    bool found = false;
    for (size_t i = 0; i < n; i++) {
        const struct scaler_offer *o = &offers[i];
        if (!fits(o, req)) {
            too_small++;
            continue;
        }
        /* Candidate purchases: (price, spot). */
        struct {
            uint64_t price;
            bool spot;
            bool ok;
        } cand[2] = {{o->price_microusd_per_hour, false, false},
                     {o->spot_price_microusd_per_hour, true, false}};
        cand[0].ok = req->spot != PW_SPEC_SPOT_SPOT;
        cand[1].ok = req->spot != PW_SPEC_SPOT_ON_DEMAND && o->spot_available;
        if (req->spot == PW_SPEC_SPOT_SPOT && !o->spot_available && o->price_microusd_per_hour == 0)
            cand[0].ok = true; /* a free machine is never worse than spot */
        if (!cand[0].ok && !cand[1].ok) {
            no_spot++;
            continue;
        }
        bool any_price_ok = false, any_batch_ok = false;
        for (int k = 0; k < 2; k++) {
            if (!cand[k].ok)
                continue;
            if (cand[k].price > req->max_microusd_per_hour)
                continue;
            any_price_ok = true;
            /* Deferrable work: spot or free only. */
            if (batch && !cand[k].spot && cand[k].price != 0)
                continue;
            any_batch_ok = true;
            bool better = !found || cand[k].price < out->price_microusd_per_hour ||
                          (cand[k].price == out->price_microusd_per_hour &&
                           o->provision_ms < offers[out->index].provision_ms) ||
                          (cand[k].price == out->price_microusd_per_hour &&
                           o->provision_ms == offers[out->index].provision_ms && i == out->index &&
                           cand[k].spot && !out->spot);
            if (better) {
                found = true;
                out->index = i;
                out->spot = cand[k].spot;
                out->price_microusd_per_hour = cand[k].price;
            }
        }
        if (!any_price_ok)
            over_price++;
        else if (!any_batch_ok)
            batch_wait++;
    }
    char p1[32], p2[32];
    if (found) {
        const struct scaler_offer *o = &offers[out->index];
        snprintf(out->reason, sizeof out->reason,
                 "offer=%.40s/%.40s price=%s/h spot=%d ready_s=%u max_price=%s/h%s", o->provider,
                 o->instance_type, scaler_format_usd(p1, sizeof p1, out->price_microusd_per_hour),
                 out->spot ? 1 : 0, (unsigned)((o->provision_ms + 999) / 1000),
                 scaler_format_usd(p2, sizeof p2, req->max_microusd_per_hour),
                 batch ? " batch=1" : "");
        return PW_OK;
    }
    snprintf(out->reason, sizeof out->reason,
             "no offer fits: offers=%zu too_small=%zu over_max_price=%zu (max %s/h) "
             "no_spot=%zu%s%s",
             n, too_small, over_price, scaler_format_usd(p1, sizeof p1, req->max_microusd_per_hour),
             no_spot, batch ? " batch_needs_spot_or_free=" : "", "");
    if (batch) {
        size_t l = strlen(out->reason);
        snprintf(out->reason + l, sizeof out->reason - l, "%zu", batch_wait);
    }
    return PW_ERR_NOTFOUND;
}
