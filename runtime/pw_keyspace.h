/*
 * pw_keyspace: the names of every Redis key parkway uses (DESIGN.md "Redis keyspace"), and
 * typed stream/hash/pub-sub helpers on the async client.
 *
 * Key names: every variable part is wrapped in literal braces, e.g. "pw:{chat}:q". For a
 * function's keys the braces are the Redis Cluster hash tag that keeps them in one slot; the
 * other keys use the same shape so one rule fits all. A variable part must be a "safe name":
 * 1..PW_KEY_NAME_MAX bytes of [A-Za-z0-9._-] (no braces, colons, spaces or control bytes),
 * so user input can never escape its key.
 *
 * Typed helpers run on the thread of the client's event loop, like pw_redis. Parsed entries
 * are copies: the callback receives ownership and frees them with pw_stream_entries_free()
 * (one free; every pointer inside points into the same block).
 */
#ifndef PW_KEYSPACE_H
#define PW_KEYSPACE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pw_err.h"
#include "pw_redis.h"

/* ---------------------------------------------------------------------------------------- */
/* Key names                                                                                */
/* ---------------------------------------------------------------------------------------- */

#define PW_KEY_NAME_MAX 128 /* longest function/router/request id, bytes */
#define PW_KEY_MAX 160      /* buffer that fits any key built here, with the NUL */

#define PW_KEY_KEYS "pw:keys"           /* hash: sha256(api key) -> KeyRecord */
#define PW_KEY_WAKE "pw:wake"           /* pub/sub channel: router -> scaler */
#define PW_KEY_EVENTS "pw:events"       /* stream: scaler decisions */
#define PW_GROUP_ENGINES "engines"      /* consumer group on pw:{fn}:q and pw:{fn}:b */
#define PW_KEY_FUNCTIONS "pw:functions" /* hash: function name -> spec JSON (pw_spec_to_json) */
/* The one field of every request and reply stream entry: a packed protobuf message
 * (InferenceRequest on pw:{fn}:q and pw:{fn}:b, ReplyChunk on pw:reply:{router}:{worker}). */
#define PW_STREAM_FIELD "m"

/* True when s is 1..PW_KEY_NAME_MAX bytes of [A-Za-z0-9._-]. */
bool pw_key_name_ok(const char *s);

/*
 * Each builder writes the key into buf (cap bytes) and returns PW_OK, PW_ERR_INVAL if the
 * name is not a safe name (or buf is NULL), or PW_ERR_TOOBIG if cap is too small.
 */
enum pw_err pw_key_queue(char *buf, size_t cap, const char *fn);          /* pw:{fn}:q */
enum pw_err pw_key_batch_lane(char *buf, size_t cap, const char *fn);     /* pw:{fn}:b */
enum pw_err pw_key_workers(char *buf, size_t cap, const char *fn);        /* pw:{fn}:workers */
enum pw_err pw_key_scale(char *buf, size_t cap, const char *fn);          /* pw:{fn}:scale */
enum pw_err pw_key_reply(char *buf, size_t cap, const char *router_id);   /* pw:reply:{id} */
enum pw_err pw_key_cancel(char *buf, size_t cap, const char *request_id); /* pw:cancel:{id} */
enum pw_err pw_key_batch(char *buf, size_t cap, const char *batch_id);    /* pw:batch:{id} */
enum pw_err pw_key_file(char *buf, size_t cap, const char *file_id);      /* pw:file:{id} */

/* pw:reply:{id}:N: the reply stream of one router worker thread (N = its index, decimal). */
enum pw_err pw_key_reply_worker(char *buf, size_t cap, const char *router_id, unsigned worker);

/* ---------------------------------------------------------------------------------------- */
/* Parsed stream entries                                                                    */
/* ---------------------------------------------------------------------------------------- */

#define PW_STREAM_ID_MAX 48         /* "18446744073709551615-18446744073709551615" + NUL */
#define PW_STREAM_MAX_FIELDS 256    /* field/value pairs accepted per entry */
#define PW_STREAM_MAX_ENTRIES 65536 /* entries accepted per reply */

/* A field or value: len bytes at ptr, followed by a NUL that len does not count. */
struct pw_slice {
    const char *ptr;
    size_t len;
};

struct pw_stream_field {
    struct pw_slice name;
    struct pw_slice value;
};

struct pw_stream_entry {
    char id[PW_STREAM_ID_MAX];      /* "1700000000000-0" */
    size_t n_fields;                /* 0 for an entry deleted while pending */
    struct pw_stream_field *fields; /* n_fields pairs, in stream order */
};

/* One allocation: entries, fields and bytes all live in the block this points to. */
struct pw_stream_entries {
    size_t n;                       /* entries */
    struct pw_stream_entry *v;      /* n entries */
    char next_id[PW_STREAM_ID_MAX]; /* XAUTOCLAIM: cursor for the next call ("0-0" = done) */
    size_t n_deleted;               /* XAUTOCLAIM (Redis 7): ids that no longer exist */
};

/* Frees what a parser or typed callback handed over; NULL is a no-op. */
void pw_stream_entries_free(struct pw_stream_entries *e);

/* Value of field name in entry, or NULL. Returns a borrowed pointer into the entries block. */
const struct pw_slice *pw_stream_entry_get(const struct pw_stream_entry *entry, const char *name);

/*
 * Parsers, pure (no I/O), used by the typed helpers and by tests.
 * XREAD/XREADGROUP reply: nil (timeout) or [[key, [[id, [f, v, ...]], ...]]] with one key.
 * XRANGE reply: [[id, [f, v, ...]], ...]. XAUTOCLAIM reply: [cursor, [entries], [deleted]].
 * On PW_OK *out is owned by the caller (never NULL; n may be 0). Malformed shapes give
 * PW_ERR_PROTO; counts over the caps above give PW_ERR_TOOBIG (checked before allocating).
 */
enum pw_err pw_stream_parse_read(const redisReply *reply, struct pw_stream_entries **out);
enum pw_err pw_stream_parse_range(const redisReply *reply, struct pw_stream_entries **out);
enum pw_err pw_stream_parse_autoclaim(const redisReply *reply, struct pw_stream_entries **out);

/* ---------------------------------------------------------------------------------------- */
/* Typed helpers on the async client                                                        */
/* ---------------------------------------------------------------------------------------- */

/*
 * Receives parsed entries. On PW_OK entries is non-NULL and owned by the callee (free with
 * pw_stream_entries_free); otherwise entries is NULL and errstr says why. errstr is borrowed
 * for the call. Same calling rules as pw_redis_reply_cb.
 */
typedef void (*pw_stream_entries_cb)(struct pw_redis *r, struct pw_stream_entries *entries,
                                     enum pw_err err, const char *errstr, void *userdata);

/*
 * XADD key [MAXLEN ~ maxlen] * f1 v1 ... : n_fields pairs; values are binary-safe slices.
 * maxlen 0 means no trimming. The reply (to cb) is the new id as a string.
 */
enum pw_err pw_stream_add(struct pw_redis *r, const char *key, uint64_t maxlen,
                          const struct pw_stream_field *fields, size_t n_fields,
                          pw_redis_reply_cb cb, void *userdata);

/*
 * XGROUP CREATE key group start_id MKSTREAM ("$" = only new entries, "0" = from the start).
 * A group that already exists (BUSYGROUP) counts as success: cb gets PW_OK and a NULL reply.
 */
enum pw_err pw_stream_group_create(struct pw_redis *r, const char *key, const char *group,
                                   const char *start_id, pw_redis_reply_cb cb, void *userdata);

/*
 * XREADGROUP GROUP group consumer COUNT count [BLOCK block_ms] STREAMS key id.
 * id ">" reads new entries; "0" re-reads this consumer's pending ones. block_ms < 0 means no
 * BLOCK argument; 0 blocks forever (the connection is then busy: give blocking reads a client
 * of their own). A timeout gives PW_OK with zero entries.
 */
enum pw_err pw_stream_read_group(struct pw_redis *r, const char *key, const char *group,
                                 const char *consumer, const char *id, uint32_t count,
                                 int64_t block_ms, pw_stream_entries_cb cb, void *userdata);

/* XREAD COUNT count [BLOCK block_ms] STREAMS key after_id. Same rules as read_group. */
enum pw_err pw_stream_read(struct pw_redis *r, const char *key, const char *after_id,
                           uint32_t count, int64_t block_ms, pw_stream_entries_cb cb,
                           void *userdata);

/* XACK key group id... ; the reply is the number acknowledged (integer). */
enum pw_err pw_stream_ack(struct pw_redis *r, const char *key, const char *group,
                          const char *const *ids, size_t n_ids, pw_redis_reply_cb cb,
                          void *userdata);

/*
 * XAUTOCLAIM key group consumer min_idle_ms start_id COUNT count: moves entries idle at least
 * min_idle_ms from any consumer to this one. entries->next_id is the cursor to pass next.
 */
enum pw_err pw_stream_autoclaim(struct pw_redis *r, const char *key, const char *group,
                                const char *consumer, uint64_t min_idle_ms, const char *start_id,
                                uint32_t count, pw_stream_entries_cb cb, void *userdata);

/* HSET key field value (binary-safe value); reply: integer, 1 when the field is new. */
enum pw_err pw_hash_set(struct pw_redis *r, const char *key, const char *field,
                        struct pw_slice value, pw_redis_reply_cb cb, void *userdata);

/* HGET key field; reply: string, or nil when absent. */
enum pw_err pw_hash_get(struct pw_redis *r, const char *key, const char *field,
                        pw_redis_reply_cb cb, void *userdata);

/*
 * HGETALL key, parsed into one entry (id "") whose fields are the hash's field/value pairs.
 * An absent key gives PW_OK with n == 1 and n_fields == 0. Caps: PW_STREAM_MAX_ENTRIES pairs.
 */
enum pw_err pw_hash_get_all(struct pw_redis *r, const char *key, pw_stream_entries_cb cb,
                            void *userdata);

/* HDEL key field; reply: integer, 1 when it existed. */
enum pw_err pw_hash_del(struct pw_redis *r, const char *key, const char *field,
                        pw_redis_reply_cb cb, void *userdata);

/* PUBLISH channel payload (binary-safe); reply: integer, number of receivers. */
enum pw_err pw_publish(struct pw_redis *r, const char *channel, struct pw_slice payload,
                       pw_redis_reply_cb cb, void *userdata);

/* Parser behind pw_hash_get_all (flat [f, v, f, v, ...] array), for tests. */
enum pw_err pw_hash_parse_all(const redisReply *reply, struct pw_stream_entries **out);

#endif
