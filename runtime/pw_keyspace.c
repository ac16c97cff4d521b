/*
 * pw_keyspace: key names, stream/hash reply parsers and the typed helpers on pw_redis.
 *
 * Parsers copy what they keep into one block (header, entries, fields, then the bytes), sized
 * in a first pass that checks every shape and count against the caps before anything is
 * allocated. Typed helpers wrap their callback in a small `struct op` that lives from the call
 * until the reply; they run on the client's event loop thread.
 */
#include "pw_keyspace.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------- */
/* Key names                                                                                */
/* ---------------------------------------------------------------------------------------- */

bool pw_key_name_ok(const char *s)
{
    if (!s || !s[0])
        return false;
    size_t n = 0;
    for (; s[n]; n++) {
        char ch = s[n];
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                  (ch >= '0' && ch <= '9') || ch == '.' || ch == '_' || ch == '-';
        if (!ok || n >= PW_KEY_NAME_MAX)
            return false;
    }
    return true;
}

static enum pw_err build_key(char *buf, size_t cap, const char *prefix, const char *name,
                             const char *suffix)
{
    if (!buf || !pw_key_name_ok(name))
        return PW_ERR_INVAL;
    int n = snprintf(buf, cap, "%s{%s}%s", prefix, name, suffix);
    if (n < 0 || (size_t)n >= cap) {
        if (cap)
            buf[0] = '\0';
        return PW_ERR_TOOBIG;
    }
    return PW_OK;
}

enum pw_err pw_key_queue(char *buf, size_t cap, const char *fn)
{
    return build_key(buf, cap, "pw:", fn, ":q");
}

enum pw_err pw_key_batch_lane(char *buf, size_t cap, const char *fn)
{
    return build_key(buf, cap, "pw:", fn, ":b");
}

enum pw_err pw_key_workers(char *buf, size_t cap, const char *fn)
{
    return build_key(buf, cap, "pw:", fn, ":workers");
}

enum pw_err pw_key_scale(char *buf, size_t cap, const char *fn)
{
    return build_key(buf, cap, "pw:", fn, ":scale");
}

enum pw_err pw_key_reply(char *buf, size_t cap, const char *router_id)
{
    return build_key(buf, cap, "pw:reply:", router_id, "");
}

enum pw_err pw_key_reply_worker(char *buf, size_t cap, const char *router_id, unsigned worker)
{
    char suffix[16];
    snprintf(suffix, sizeof suffix, ":%u", worker);
    return build_key(buf, cap, "pw:reply:", router_id, suffix);
}

enum pw_err pw_key_cancel(char *buf, size_t cap, const char *request_id)
{
    return build_key(buf, cap, "pw:cancel:", request_id, "");
}

enum pw_err pw_key_batch(char *buf, size_t cap, const char *batch_id)
{
    return build_key(buf, cap, "pw:batch:", batch_id, "");
}

enum pw_err pw_key_file(char *buf, size_t cap, const char *file_id)
{
    return build_key(buf, cap, "pw:file:", file_id, "");
}

/* ---------------------------------------------------------------------------------------- */
/* Parsers                                                                                  */
/* ---------------------------------------------------------------------------------------- */

/* What the first pass found: enough to size the one block. */
struct sizing {
    size_t n_entries;
    size_t n_fields;
    size_t bytes;
};

static bool is_str(const redisReply *r)
{
    return r && (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS);
}

static enum pw_err add_bytes(struct sizing *s, size_t len)
{
    /* each string keeps a NUL; replies already sit in memory, this only guards the sum */
    if (len > ((size_t)1 << 40) || s->bytes > ((size_t)1 << 40))
        return PW_ERR_TOOBIG;
    s->bytes += len + 1;
    return PW_OK;
}

/* Pass one over [id, [f, v, ...] | nil]; a nil entry (deleted while pending) is skipped. */
static enum pw_err size_entry(const redisReply *e, struct sizing *s)
{
    if (e->type == REDIS_REPLY_NIL)
        return PW_OK;
    if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 || !is_str(e->element[0]))
        return PW_ERR_PROTO;
    if (e->element[0]->len == 0 || e->element[0]->len >= PW_STREAM_ID_MAX)
        return PW_ERR_PROTO;
    const redisReply *f = e->element[1];
    if (s->n_entries >= PW_STREAM_MAX_ENTRIES)
        return PW_ERR_TOOBIG;
    s->n_entries++;
    if (f->type == REDIS_REPLY_NIL)
        return PW_OK;
    if (f->type != REDIS_REPLY_ARRAY || f->elements % 2 != 0)
        return PW_ERR_PROTO;
    if (f->elements / 2 > PW_STREAM_MAX_FIELDS)
        return PW_ERR_TOOBIG;
    for (size_t i = 0; i < f->elements; i++) {
        if (!is_str(f->element[i]))
            return PW_ERR_PROTO;
        enum pw_err err = add_bytes(s, f->element[i]->len);
        if (err)
            return err;
    }
    s->n_fields += f->elements / 2;
    return PW_OK;
}

static enum pw_err size_entry_list(const redisReply *list, struct sizing *s)
{
    if (list->type != REDIS_REPLY_ARRAY)
        return PW_ERR_PROTO;
    if (list->elements > PW_STREAM_MAX_ENTRIES)
        return PW_ERR_TOOBIG;
    for (size_t i = 0; i < list->elements; i++) {
        enum pw_err err = size_entry(list->element[i], s);
        if (err)
            return err;
    }
    return PW_OK;
}

/* The block under construction during pass two. */
struct fill {
    struct pw_stream_entries *e;
    struct pw_stream_field *next_field;
    char *next_byte;
};

static enum pw_err alloc_block(const struct sizing *s, struct fill *f)
{
    /* header, entries and fields are pointer-aligned structs; bytes go last */
    size_t total = sizeof *f->e + s->n_entries * sizeof(struct pw_stream_entry) +
                   s->n_fields * sizeof(struct pw_stream_field) + s->bytes;
    char *block = calloc(1, total);
    if (!block)
        return PW_ERR_NOMEM;
    f->e = (struct pw_stream_entries *)block;
    f->e->v = (struct pw_stream_entry *)(block + sizeof *f->e);
    f->next_field = (struct pw_stream_field *)(f->e->v + s->n_entries);
    f->next_byte = (char *)(f->next_field + s->n_fields);
    return PW_OK;
}

static struct pw_slice copy_str(struct fill *f, const redisReply *r)
{
    struct pw_slice sl = {f->next_byte, r->len};
    if (r->len)
        memcpy(f->next_byte, r->str, r->len);
    f->next_byte[r->len] = '\0';
    f->next_byte += r->len + 1;
    return sl;
}

static void fill_entry(const redisReply *e, struct fill *f)
{
    if (e->type == REDIS_REPLY_NIL)
        return;
    struct pw_stream_entry *out = &f->e->v[f->e->n++];
    memcpy(out->id, e->element[0]->str, e->element[0]->len);
    out->id[e->element[0]->len] = '\0';
    const redisReply *fl = e->element[1];
    out->fields = f->next_field;
    if (fl->type != REDIS_REPLY_ARRAY)
        return;
    out->n_fields = fl->elements / 2;
    for (size_t i = 0; i < out->n_fields; i++) {
        out->fields[i].name = copy_str(f, fl->element[2 * i]);
        out->fields[i].value = copy_str(f, fl->element[2 * i + 1]);
    }
    f->next_field += out->n_fields;
}

static void fill_entry_list(const redisReply *list, struct fill *f)
{
    for (size_t i = 0; i < list->elements; i++)
        fill_entry(list->element[i], f);
}

void pw_stream_entries_free(struct pw_stream_entries *e)
{
    free(e);
}

const struct pw_slice *pw_stream_entry_get(const struct pw_stream_entry *entry, const char *name)
{
    if (!entry || !name)
        return NULL;
    size_t len = strlen(name);
    for (size_t i = 0; i < entry->n_fields; i++) {
        const struct pw_slice *n = &entry->fields[i].name;
        if (n->len == len && memcmp(n->ptr, name, len) == 0)
            return &entry->fields[i].value;
    }
    return NULL;
}

enum pw_err pw_stream_parse_read(const redisReply *reply, struct pw_stream_entries **out)
{
    struct sizing s = {0};
    struct fill f;
    enum pw_err err;
    if (!reply || !out)
        return PW_ERR_INVAL;
    *out = NULL;
    if (reply->type != REDIS_REPLY_NIL) {
        /* [[key, entries], ...]: one key in practice; several are merged in order */
        if (reply->type != REDIS_REPLY_ARRAY || reply->elements > 64)
            return PW_ERR_PROTO;
        for (size_t i = 0; i < reply->elements; i++) {
            const redisReply *kv = reply->element[i];
            if (kv->type != REDIS_REPLY_ARRAY || kv->elements != 2 || !is_str(kv->element[0]))
                return PW_ERR_PROTO;
            err = size_entry_list(kv->element[1], &s);
            if (err)
                return err;
        }
    }
    err = alloc_block(&s, &f);
    if (err)
        return err;
    if (reply->type != REDIS_REPLY_NIL) {
        for (size_t i = 0; i < reply->elements; i++)
            fill_entry_list(reply->element[i]->element[1], &f);
    }
    *out = f.e;
    return PW_OK;
}

enum pw_err pw_stream_parse_range(const redisReply *reply, struct pw_stream_entries **out)
{
    struct sizing s = {0};
    struct fill f;
    if (!reply || !out)
        return PW_ERR_INVAL;
    *out = NULL;
    enum pw_err err = size_entry_list(reply, &s);
    if (err)
        return err;
    err = alloc_block(&s, &f);
    if (err)
        return err;
    fill_entry_list(reply, &f);
    *out = f.e;
    return PW_OK;
}

enum pw_err pw_stream_parse_autoclaim(const redisReply *reply, struct pw_stream_entries **out)
{
    struct sizing s = {0};
    struct fill f;
    if (!reply || !out)
        return PW_ERR_INVAL;
    *out = NULL;
    /* Redis 7: [cursor, entries, deleted ids]; Redis 6.2 has no third element */
    if (reply->type != REDIS_REPLY_ARRAY || reply->elements < 2 || reply->elements > 3 ||
        !is_str(reply->element[0]) || reply->element[0]->len >= PW_STREAM_ID_MAX)
        return PW_ERR_PROTO;
    enum pw_err err = size_entry_list(reply->element[1], &s);
    if (err)
        return err;
    size_t n_deleted = 0;
    if (reply->elements == 3) {
        if (reply->element[2]->type != REDIS_REPLY_ARRAY)
            return PW_ERR_PROTO;
        n_deleted = reply->element[2]->elements;
    }
    err = alloc_block(&s, &f);
    if (err)
        return err;
    fill_entry_list(reply->element[1], &f);
    memcpy(f.e->next_id, reply->element[0]->str, reply->element[0]->len);
    f.e->next_id[reply->element[0]->len] = '\0';
    f.e->n_deleted = n_deleted;
    *out = f.e;
    return PW_OK;
}

enum pw_err pw_hash_parse_all(const redisReply *reply, struct pw_stream_entries **out)
{
    struct sizing s = {.n_entries = 1};
    struct fill f;
    if (!reply || !out)
        return PW_ERR_INVAL;
    *out = NULL;
    if (reply->type != REDIS_REPLY_ARRAY || reply->elements % 2 != 0)
        return PW_ERR_PROTO;
    if (reply->elements / 2 > PW_STREAM_MAX_ENTRIES)
        return PW_ERR_TOOBIG;
    for (size_t i = 0; i < reply->elements; i++) {
        if (!is_str(reply->element[i]))
            return PW_ERR_PROTO;
        enum pw_err err = add_bytes(&s, reply->element[i]->len);
        if (err)
            return err;
    }
    s.n_fields = reply->elements / 2;
    enum pw_err err = alloc_block(&s, &f);
    if (err)
        return err;
    struct pw_stream_entry *e = &f.e->v[0];
    f.e->n = 1;
    e->fields = f.next_field;
    e->n_fields = s.n_fields;
    for (size_t i = 0; i < s.n_fields; i++) {
        e->fields[i].name = copy_str(&f, reply->element[2 * i]);
        e->fields[i].value = copy_str(&f, reply->element[2 * i + 1]);
    }
    *out = f.e;
    return PW_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Typed helpers                                                                            */
/* ---------------------------------------------------------------------------------------- */

enum op_kind {
    OP_READ,      /* XREAD / XREADGROUP -> entries */
    OP_AUTOCLAIM, /* XAUTOCLAIM -> entries */
    OP_HGETALL,   /* HGETALL -> one entry */
    OP_GROUP,     /* XGROUP CREATE -> reply, BUSYGROUP is success */
};

/* Lives from the call until op_reply_cb; owned by the pending command. */
struct op {
    enum op_kind kind;
    pw_stream_entries_cb ecb;
    pw_redis_reply_cb rcb;
    void *userdata;
};

static void op_reply_cb(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                        const char *errstr, void *userdata)
{
    struct op *op = userdata;
    if (op->kind == OP_GROUP) {
        if (err == PW_ERR_REDIS && reply && reply->str && strncmp(reply->str, "BUSYGROUP", 9) == 0)
            op->rcb(r, NULL, PW_OK, NULL, op->userdata);
        else
            op->rcb(r, reply, err, errstr, op->userdata);
        free(op);
        return;
    }
    struct pw_stream_entries *e = NULL;
    if (!err) {
        switch (op->kind) {
        case OP_READ:
            err = pw_stream_parse_read(reply, &e);
            break;
        case OP_AUTOCLAIM:
            err = pw_stream_parse_autoclaim(reply, &e);
            break;
        case OP_HGETALL:
            err = pw_hash_parse_all(reply, &e);
            break;
        case OP_GROUP:
            break;
        }
        if (err)
            errstr = err == PW_ERR_TOOBIG ? "redis reply over the entry/field caps"
                                          : "unexpected redis reply shape";
    }
    op->ecb(r, e, err, errstr, op->userdata);
    free(op);
}

static enum pw_err op_send(struct pw_redis *r, enum op_kind kind, pw_stream_entries_cb ecb,
                           pw_redis_reply_cb rcb, void *userdata, int argc, const char *const *argv,
                           const size_t *argvlen)
{
    struct op *op = calloc(1, sizeof *op);
    if (!op)
        return PW_ERR_NOMEM;
    *op = (struct op){kind, ecb, rcb, userdata};
    enum pw_err err = pw_redis_command_argv(r, argc, argv, argvlen, op_reply_cb, op);
    if (err)
        free(op);
    return err;
}

enum pw_err pw_stream_add(struct pw_redis *r, const char *key, uint64_t maxlen,
                          const struct pw_stream_field *fields, size_t n_fields,
                          pw_redis_reply_cb cb, void *userdata)
{
    if (!r || !key || (!fields && n_fields) || n_fields == 0 || n_fields > PW_STREAM_MAX_FIELDS)
        return PW_ERR_INVAL;
    size_t argc = 3 + (maxlen ? 3 : 0) + 2 * n_fields;
    const char **argv = malloc(argc * sizeof *argv);
    size_t *lens = malloc(argc * sizeof *lens);
    enum pw_err err = PW_ERR_NOMEM;
    char maxbuf[24];
    if (!argv || !lens)
        goto out;
    size_t i = 0;
    argv[i] = "XADD";
    lens[i++] = 4;
    argv[i] = key;
    lens[i++] = strlen(key);
    if (maxlen) {
        snprintf(maxbuf, sizeof maxbuf, "%llu", (unsigned long long)maxlen);
        argv[i] = "MAXLEN";
        lens[i++] = 6;
        argv[i] = "~";
        lens[i++] = 1;
        argv[i] = maxbuf;
        lens[i++] = strlen(maxbuf);
    }
    argv[i] = "*";
    lens[i++] = 1;
    for (size_t f = 0; f < n_fields; f++) {
        argv[i] = fields[f].name.ptr;
        lens[i++] = fields[f].name.len;
        argv[i] = fields[f].value.ptr ? fields[f].value.ptr : "";
        lens[i++] = fields[f].value.ptr ? fields[f].value.len : 0;
    }
    err = pw_redis_command_argv(r, (int)argc, argv, lens, cb, userdata);
out:
    free(argv);
    free(lens);
    return err;
}

enum pw_err pw_stream_group_create(struct pw_redis *r, const char *key, const char *group,
                                   const char *start_id, pw_redis_reply_cb cb, void *userdata)
{
    if (!key || !group || !start_id || !cb)
        return PW_ERR_INVAL;
    const char *argv[] = {"XGROUP", "CREATE", key, group, start_id, "MKSTREAM"};
    return op_send(r, OP_GROUP, NULL, cb, userdata, 6, argv, NULL);
}

enum pw_err pw_stream_read_group(struct pw_redis *r, const char *key, const char *group,
                                 const char *consumer, const char *id, uint32_t count,
                                 int64_t block_ms, pw_stream_entries_cb cb, void *userdata)
{
    if (!key || !group || !consumer || !id || !cb || count == 0)
        return PW_ERR_INVAL;
    char cnt[16], blk[24];
    snprintf(cnt, sizeof cnt, "%u", count);
    snprintf(blk, sizeof blk, "%lld", (long long)block_ms);
    const char *argv[11] = {"XREADGROUP", "GROUP", group, consumer, "COUNT", cnt};
    int argc = 6;
    if (block_ms >= 0) {
        argv[argc++] = "BLOCK";
        argv[argc++] = blk;
    }
    argv[argc++] = "STREAMS";
    argv[argc++] = key;
    argv[argc++] = id;
    return op_send(r, OP_READ, cb, NULL, userdata, argc, argv, NULL);
}

enum pw_err pw_stream_read(struct pw_redis *r, const char *key, const char *after_id,
                           uint32_t count, int64_t block_ms, pw_stream_entries_cb cb,
                           void *userdata)
{
    if (!key || !after_id || !cb || count == 0)
        return PW_ERR_INVAL;
    char cnt[16], blk[24];
    snprintf(cnt, sizeof cnt, "%u", count);
    snprintf(blk, sizeof blk, "%lld", (long long)block_ms);
    const char *argv[8] = {"XREAD", "COUNT", cnt};
    int argc = 3;
    if (block_ms >= 0) {
        argv[argc++] = "BLOCK";
        argv[argc++] = blk;
    }
    argv[argc++] = "STREAMS";
    argv[argc++] = key;
    argv[argc++] = after_id;
    return op_send(r, OP_READ, cb, NULL, userdata, argc, argv, NULL);
}

enum pw_err pw_stream_ack(struct pw_redis *r, const char *key, const char *group,
                          const char *const *ids, size_t n_ids, pw_redis_reply_cb cb,
                          void *userdata)
{
    if (!key || !group || !ids || n_ids == 0 || n_ids > PW_REDIS_MAX_ARGC - 3)
        return PW_ERR_INVAL;
    const char **argv = malloc((n_ids + 3) * sizeof *argv);
    if (!argv)
        return PW_ERR_NOMEM;
    argv[0] = "XACK";
    argv[1] = key;
    argv[2] = group;
    memcpy(argv + 3, ids, n_ids * sizeof *ids);
    enum pw_err err = pw_redis_command_argv(r, (int)(n_ids + 3), argv, NULL, cb, userdata);
    free(argv);
    return err;
}

enum pw_err pw_stream_autoclaim(struct pw_redis *r, const char *key, const char *group,
                                const char *consumer, uint64_t min_idle_ms, const char *start_id,
                                uint32_t count, pw_stream_entries_cb cb, void *userdata)
{
    if (!key || !group || !consumer || !start_id || !cb || count == 0)
        return PW_ERR_INVAL;
    char idle[24], cnt[16];
    snprintf(idle, sizeof idle, "%llu", (unsigned long long)min_idle_ms);
    snprintf(cnt, sizeof cnt, "%u", count);
    const char *argv[] = {"XAUTOCLAIM", key, group, consumer, idle, start_id, "COUNT", cnt};
    return op_send(r, OP_AUTOCLAIM, cb, NULL, userdata, 8, argv, NULL);
}

enum pw_err pw_hash_set(struct pw_redis *r, const char *key, const char *field,
                        struct pw_slice value, pw_redis_reply_cb cb, void *userdata)
{
    if (!key || !field || (!value.ptr && value.len))
        return PW_ERR_INVAL;
    const char *argv[] = {"HSET", key, field, value.ptr ? value.ptr : ""};
    size_t lens[] = {4, strlen(key), strlen(field), value.len};
    return pw_redis_command_argv(r, 4, argv, lens, cb, userdata);
}

enum pw_err pw_hash_get(struct pw_redis *r, const char *key, const char *field,
                        pw_redis_reply_cb cb, void *userdata)
{
    if (!key || !field)
        return PW_ERR_INVAL;
    const char *argv[] = {"HGET", key, field};
    return pw_redis_command_argv(r, 3, argv, NULL, cb, userdata);
}

enum pw_err pw_hash_get_all(struct pw_redis *r, const char *key, pw_stream_entries_cb cb,
                            void *userdata)
{
    if (!key || !cb)
        return PW_ERR_INVAL;
    const char *argv[] = {"HGETALL", key};
    return op_send(r, OP_HGETALL, cb, NULL, userdata, 2, argv, NULL);
}

enum pw_err pw_hash_del(struct pw_redis *r, const char *key, const char *field,
                        pw_redis_reply_cb cb, void *userdata)
{
    if (!key || !field)
        return PW_ERR_INVAL;
    const char *argv[] = {"HDEL", key, field};
    return pw_redis_command_argv(r, 3, argv, NULL, cb, userdata);
}

enum pw_err pw_publish(struct pw_redis *r, const char *channel, struct pw_slice payload,
                       pw_redis_reply_cb cb, void *userdata)
{
    if (!channel || (!payload.ptr && payload.len))
        return PW_ERR_INVAL;
    const char *argv[] = {"PUBLISH", channel, payload.ptr ? payload.ptr : ""};
    size_t lens[] = {7, strlen(channel), payload.len};
    return pw_redis_command_argv(r, 3, argv, lens, cb, userdata);
}
