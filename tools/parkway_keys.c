/*
 * parkway keys: create, list and revoke API keys (runtime/pw_apikey.h, docs/internals/router.md).
 *
 *     parkway keys create --tenant T [--name N] [--functions a,b] [--rpm N] [--tpm N]
 *                         [--expires-days D] [--redis URL]
 *     parkway keys list [--tenant T] [--redis URL]
 *     parkway keys revoke KEY_ID|HASH [--delete] [--redis URL]
 *
 * Only the SHA-256 of a key is stored: field = lowercase hex of the hash in hash pw:keys,
 * value = a packed KeyRecord. `create` prints the key itself once, on stdout, and never
 * again; everything else names a key by its public id ("key_" + 8 hex of the hash).
 * `revoke` writes the record (disabled, or deleted with --delete) before it publishes the
 * hash on pw:keys:revoked, so a router that drops its cache entry and asks again already
 * reads the new record. --redis defaults to $PARKWAY_REDIS_URL.
 * Exit codes: 0 ok, 2 bad input (options, unknown key id), 1 other failures (Redis).
 * Single-threaded; blocking hiredis; runs and exits.
 */
#include <errno.h>
#include <getopt.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "parkway.pb-c.h"
#include "parkway_cli.h"
#include "pw_apikey.h"
#include "pw_cli.h"
#include "pw_clock.h"
#include "pw_err.h"
#include "pw_keyspace.h"
#include "pw_proto.h"
#include "pw_redis.h"

#define KEYS_REVOKE_CHANNEL "pw:keys:revoked" /* the router subscribes to it */
#define KEYS_TIMEOUT_MS 5000
#define KEYS_SCAN_COUNT "1000"
#define KEYS_EXPIRES_DAYS_MAX 36500u

static void keys_usage(FILE *f)
{
    fputs("usage: parkway keys create --tenant T [--name N] [--functions a,b] [--rpm N]\n"
          "                           [--tpm N] [--expires-days D] [--redis URL]\n"
          "       parkway keys list [--tenant T] [--redis URL]\n"
          "       parkway keys revoke KEY_ID|HASH [--delete] [--redis URL]\n"
          "\n"
          "create  make a new API key; prints the key once on stdout (its id on stderr)\n"
          "list    one line per key: id, tenant, name, functions, limits, state, dates\n"
          "revoke  disable a key (or --delete it) and tell every router at once\n"
          "\n"
          "--redis defaults to $PARKWAY_REDIS_URL. --functions: names the key may use\n"
          "(default all). --rpm/--tpm: requests/tokens per minute (0 = unlimited).\n",
          f);
}

/* ---- small helpers ------------------------------------------------------------------- */

static int parse_u32(const char *opt, const char *s, uint32_t max, uint32_t *out)
{
    unsigned long long v;
    if (!pw_cli_parse_uint(s, max, &v)) {
        fprintf(stderr, "parkway keys: --%s: expected an integer 0..%" PRIu32 ", got '%s'\n", opt,
                max, s);
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

/* A name shown in listings: printable ASCII or UTF-8, no control bytes. */
static bool label_ok(const char *s, size_t max)
{
    size_t n = strlen(s);
    if (n > max)
        return false;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if (*p < 0x20 || *p == 0x7f)
            return false;
    return true;
}

static bool hex64_ok(const char *s)
{
    if (strlen(s) != PW_APIKEY_HASH_HEX_LEN)
        return false;
    for (const char *p = s; *p; p++)
        if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f')))
            return false;
    return true;
}

static const char *redis_url_or_env(const char *url)
{
    if (url && *url)
        return url;
    const char *env = getenv("PARKWAY_REDIS_URL");
    return env && *env ? env : NULL;
}

/* Connects; on failure prints why and returns the exit code (2 bad URL, 1 otherwise). */
static int keys_connect(const char *url, redisContext **out)
{
    char err[256] = "";
    if (!url) {
        fprintf(stderr, "parkway keys: no Redis: give --redis URL or set PARKWAY_REDIS_URL\n");
        return 2;
    }
    enum pw_err e = pw_redis_sync_connect(url, KEYS_TIMEOUT_MS, out, err, sizeof err);
    if (e) {
        fprintf(stderr, "parkway keys: redis: %s\n", err[0] ? err : pw_err_desc(e));
        return pw_err_exit_code(e);
    }
    return 0;
}

/* One command; NULL (and a message) on a lost connection or an error reply. */
static redisReply *keys_cmd(redisContext *rc, int argc, const char **argv, const size_t *lens)
{
    redisReply *r = redisCommandArgv(rc, argc, argv, lens);
    if (!r) {
        fprintf(stderr, "parkway keys: redis %s: %s\n", argv[0], rc->errstr);
        return NULL;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        fprintf(stderr, "parkway keys: redis %s: %s\n", argv[0], r->str);
        freeReplyObject(r);
        return NULL;
    }
    return r;
}

/* Writes rec (checked by pw_proto) as the value of field hex. Returns an exit code. */
static int keys_store(redisContext *rc, const char *cmd, const char *hex,
                      const Parkway__KeyRecord *rec, long long *result)
{
    uint8_t buf[PW_PROTO_KEY_MAX_BYTES];
    size_t len = 0;
    const char *why = NULL;
    enum pw_err e = pw_proto_pack_key(rec, buf, sizeof buf, &len, &why);
    if (e) {
        fprintf(stderr, "parkway keys: bad key record: %s\n", why ? why : pw_err_desc(e));
        return 2;
    }
    const char *argv[] = {cmd, PW_KEY_KEYS, hex, (const char *)buf};
    size_t lens[] = {strlen(cmd), strlen(PW_KEY_KEYS), strlen(hex), len};
    redisReply *r = keys_cmd(rc, 4, argv, lens);
    if (!r)
        return 1;
    if (result)
        *result = r->type == REDIS_REPLY_INTEGER ? r->integer : -1;
    freeReplyObject(r);
    return 0;
}

/* "2024-05-01T12:00:00Z" or "-" for 0. */
static const char *fmt_time(int64_t unix_ms, char *buf, size_t cap)
{
    if (unix_ms <= 0)
        return "-";
    time_t t = (time_t)(unix_ms / 1000);
    struct tm tm;
    if (!gmtime_r(&t, &tm) || strftime(buf, cap, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
        return "?";
    return buf;
}

/*
 * Every (hash hex, record) pair of pw:keys, through HSCAN so a large table never arrives in
 * one reply. fn returns nonzero to stop. Records that do not decode are passed as NULL.
 */
typedef int (*keys_visit_fn)(const char *hex, const Parkway__KeyRecord *rec, void *arg);

static int keys_scan(redisContext *rc, keys_visit_fn fn, void *arg)
{
    char cursor[32] = "0";
    do {
        const char *argv[] = {"HSCAN", PW_KEY_KEYS, cursor, "COUNT", KEYS_SCAN_COUNT};
        redisReply *r = keys_cmd(rc, 5, argv, NULL);
        if (!r)
            return 1;
        if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
            r->element[0]->type != REDIS_REPLY_STRING || r->element[1]->type != REDIS_REPLY_ARRAY ||
            r->element[1]->elements % 2) {
            fprintf(stderr, "parkway keys: redis HSCAN: unexpected reply\n");
            freeReplyObject(r);
            return 1;
        }
        snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
        const redisReply *kv = r->element[1];
        int stop = 0;
        for (size_t i = 0; !stop && i + 1 < kv->elements; i += 2) {
            const redisReply *f = kv->element[i], *v = kv->element[i + 1];
            if (f->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING)
                continue;
            Parkway__KeyRecord *rec = NULL;
            if (pw_proto_unpack_key(v->str, v->len, 0, &rec) != PW_OK)
                rec = NULL;
            stop = fn(f->str, rec, arg);
            pw_proto_free_key(rec);
        }
        freeReplyObject(r);
        if (stop)
            break;
    } while (strcmp(cursor, "0") != 0);
    return 0;
}

/* ---- create -------------------------------------------------------------------------- */

/* Splits "a,b,c" into names (pointers into s, which is modified). Returns -1 on bad input. */
static int split_functions(char *s, char **names, size_t cap, size_t *n)
{
    *n = 0;
    for (char *tok = s;;) {
        char *comma = strchr(tok, ',');
        if (comma)
            *comma = '\0';
        if (!pw_key_name_ok(tok)) {
            fprintf(stderr,
                    "parkway keys: --functions: '%s' is not a function name "
                    "(1-128 of [A-Za-z0-9._-])\n",
                    tok);
            return -1;
        }
        bool dup = false;
        for (size_t i = 0; i < *n; i++)
            dup |= strcmp(names[i], tok) == 0;
        if (!dup) {
            if (*n == cap) {
                fprintf(stderr, "parkway keys: --functions: at most %zu names\n", cap);
                return -1;
            }
            names[(*n)++] = tok;
        }
        if (!comma)
            return 0;
        tok = comma + 1;
    }
}

static int keys_create(int argc, char **argv)
{
    enum { O_REDIS = 256, O_TENANT, O_NAME, O_FUNCTIONS, O_RPM, O_TPM, O_EXPIRES, O_HELP };
    static const struct option longopts[] = {
        {"redis", required_argument, NULL, O_REDIS},
        {"tenant", required_argument, NULL, O_TENANT},
        {"name", required_argument, NULL, O_NAME},
        {"functions", required_argument, NULL, O_FUNCTIONS},
        {"rpm", required_argument, NULL, O_RPM},
        {"tpm", required_argument, NULL, O_TPM},
        {"expires-days", required_argument, NULL, O_EXPIRES},
        {"help", no_argument, NULL, O_HELP},
        {NULL, 0, NULL, 0},
    };
    const char *url = NULL, *tenant = NULL, *name = "";
    char *functions = NULL;
    uint32_t rpm = 0, tpm = 0, days = 0;
    int opt, bad = 0, rc = 0;
    optind = 0;
    while ((opt = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (opt) {
        case O_REDIS:
            url = optarg;
            break;
        case O_TENANT:
            tenant = optarg;
            break;
        case O_NAME:
            name = optarg;
            break;
        case O_FUNCTIONS:
            functions = optarg;
            break;
        case O_RPM:
            bad |= parse_u32("rpm", optarg, UINT32_MAX, &rpm);
            break;
        case O_TPM:
            bad |= parse_u32("tpm", optarg, UINT32_MAX, &tpm);
            break;
        case O_EXPIRES:
            bad |= parse_u32("expires-days", optarg, KEYS_EXPIRES_DAYS_MAX, &days);
            if (!bad && days == 0) {
                fprintf(stderr, "parkway keys: --expires-days: at least 1\n");
                bad = 1;
            }
            break;
        case O_HELP:
            keys_usage(stdout);
            return 0;
        default:
            keys_usage(stderr);
            return 2;
        }
    }
    if (bad)
        return 2;
    if (optind < argc) {
        fprintf(stderr, "parkway keys create: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (!tenant || !pw_key_name_ok(tenant)) {
        fprintf(stderr, "parkway keys create: --tenant is required: 1-128 of [A-Za-z0-9._-]\n");
        return 2;
    }
    if (!label_ok(name, PW_PROTO_ID_MAX)) {
        fprintf(stderr, "parkway keys create: --name: at most %d bytes, no control characters\n",
                PW_PROTO_ID_MAX);
        return 2;
    }
    char *names[PW_PROTO_ALLOWED_FNS_MAX];
    size_t n_names = 0;
    if (functions && split_functions(functions, names, PW_PROTO_ALLOWED_FNS_MAX, &n_names))
        return 2;

    redisContext *redis = NULL;
    if ((rc = keys_connect(redis_url_or_env(url), &redis)))
        return rc;

    char key[PW_APIKEY_LEN + 1], hex[PW_APIKEY_HASH_HEX_LEN + 1], key_id[PW_APIKEY_ID_LEN + 1];
    uint8_t hash[PW_APIKEY_HASH_LEN];
    if (pw_apikey_generate(key) != PW_OK || pw_apikey_hash(key, strlen(key), hash) != PW_OK) {
        fprintf(stderr, "parkway keys: cannot generate a key (CSPRNG or SHA-256 failed)\n");
        rc = 1;
        goto out;
    }
    pw_hex_encode(hash, sizeof hash, hex);
    pw_apikey_id(hash, key_id);

    Parkway__KeyRecord rec = PARKWAY__KEY_RECORD__INIT;
    rec.key_id = key_id;
    rec.tenant = (char *)tenant;
    rec.name = (char *)name;
    rec.allowed_functions = names;
    rec.n_allowed_functions = n_names;
    rec.rpm_limit = rpm;
    rec.tpm_limit = tpm;
    rec.created_unix_ms = pw_clock_wall_ms();
    if (days)
        rec.expires_unix_ms = rec.created_unix_ms + (int64_t)days * 86400000;
    long long added = 0;
    /* HSETNX: a second key with the same hash is impossible in practice, never overwrite. */
    if ((rc = keys_store(redis, "HSETNX", hex, &rec, &added)))
        goto out;
    if (added != 1) {
        fprintf(stderr, "parkway keys: a key with this hash exists already; try again\n");
        rc = 1;
        goto out;
    }
    /* The key is printed here and nowhere else: it cannot be recovered from Redis. */
    printf("%s\n", key);
    fflush(stdout);
    fprintf(stderr, "created %s tenant=%s\n", key_id, tenant);
out:
    /* Wipe the secret from the stack before returning. */
    explicit_bzero(key, sizeof key);
    redisFree(redis);
    return rc;
}

/* ---- list ---------------------------------------------------------------------------- */

struct list_ctx {
    const char *tenant; /* filter; NULL = all */
    size_t shown;
};

static int list_one(const char *hex, const Parkway__KeyRecord *rec, void *arg)
{
    struct list_ctx *lc = arg;
    char created[32], expires[32];
    if (!rec) {
        printf("%-12s  (unreadable record for hash %.16s...)\n", "?", hex);
        lc->shown++;
        return 0;
    }
    if (lc->tenant && strcmp(lc->tenant, rec->tenant) != 0)
        return 0;
    char fns[512] = "*";
    if (rec->n_allowed_functions) {
        size_t off = 0;
        fns[0] = '\0';
        for (size_t i = 0; i < rec->n_allowed_functions && off < sizeof fns; i++)
            off += (size_t)snprintf(fns + off, sizeof fns - off, "%s%s", i ? "," : "",
                                    rec->allowed_functions[i]);
    }
    char rpm[16] = "-", tpm[16] = "-";
    if (rec->rpm_limit)
        snprintf(rpm, sizeof rpm, "%" PRIu32, rec->rpm_limit);
    if (rec->tpm_limit)
        snprintf(tpm, sizeof tpm, "%" PRIu32, rec->tpm_limit);
    const char *state = rec->disabled ? "disabled" : "active";
    if (!rec->disabled && rec->expires_unix_ms && rec->expires_unix_ms < pw_clock_wall_ms())
        state = "expired";
    printf("%-12s  %-16s  %-20s  %-24s  %8s  %8s  %-8s  %-20s  %s\n", rec->key_id, rec->tenant,
           rec->name[0] ? rec->name : "-", fns, rpm, tpm, state,
           fmt_time(rec->created_unix_ms, created, sizeof created),
           fmt_time(rec->expires_unix_ms, expires, sizeof expires));
    lc->shown++;
    return 0;
}

static int keys_list(int argc, char **argv)
{
    enum { O_REDIS = 256, O_TENANT, O_HELP };
    static const struct option longopts[] = {
        {"redis", required_argument, NULL, O_REDIS},
        {"tenant", required_argument, NULL, O_TENANT},
        {"help", no_argument, NULL, O_HELP},
        {NULL, 0, NULL, 0},
    };
    const char *url = NULL;
    struct list_ctx lc = {0};
    int opt, rc;
    optind = 0;
    while ((opt = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (opt) {
        case O_REDIS:
            url = optarg;
            break;
        case O_TENANT:
            lc.tenant = optarg;
            break;
        case O_HELP:
            keys_usage(stdout);
            return 0;
        default:
            keys_usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "parkway keys list: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    redisContext *redis = NULL;
    if ((rc = keys_connect(redis_url_or_env(url), &redis)))
        return rc;
    printf("%-12s  %-16s  %-20s  %-24s  %8s  %8s  %-8s  %-20s  %s\n", "KEY_ID", "TENANT", "NAME",
           "FUNCTIONS", "RPM", "TPM", "STATE", "CREATED", "EXPIRES");
    rc = keys_scan(redis, list_one, &lc);
    redisFree(redis);
    return rc;
}

/* ---- revoke -------------------------------------------------------------------------- */

struct find_ctx {
    const char *want; /* key id or full hash hex */
    char hex[PW_APIKEY_HASH_HEX_LEN + 1];
    size_t matches;
};

static int find_one(const char *hex, const Parkway__KeyRecord *rec, void *arg)
{
    struct find_ctx *fc = arg;
    if (strcmp(hex, fc->want) == 0 || (rec && strcmp(rec->key_id, fc->want) == 0)) {
        if (fc->matches++ == 0)
            snprintf(fc->hex, sizeof fc->hex, "%s", hex);
    }
    return 0;
}

static int keys_revoke(int argc, char **argv)
{
    enum { O_REDIS = 256, O_DELETE, O_HELP };
    static const struct option longopts[] = {
        {"redis", required_argument, NULL, O_REDIS},
        {"delete", no_argument, NULL, O_DELETE},
        {"help", no_argument, NULL, O_HELP},
        {NULL, 0, NULL, 0},
    };
    const char *url = NULL;
    bool del = false;
    int opt, rc;
    optind = 0;
    while ((opt = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (opt) {
        case O_REDIS:
            url = optarg;
            break;
        case O_DELETE:
            del = true;
            break;
        case O_HELP:
            keys_usage(stdout);
            return 0;
        default:
            keys_usage(stderr);
            return 2;
        }
    }
    if (argc - optind != 1) {
        fprintf(stderr, "parkway keys revoke: give exactly one KEY_ID (or key hash)\n");
        return 2;
    }
    const char *want = argv[optind];
    if (pw_apikey_format_ok(want, strlen(want))) {
        /* The user pasted the key itself: fine, revoke it, but never echo it back. */
        uint8_t hash[PW_APIKEY_HASH_LEN];
        static char hex_of_key[PW_APIKEY_HASH_HEX_LEN + 1];
        if (pw_apikey_hash(want, strlen(want), hash) != PW_OK)
            return 1;
        pw_hex_encode(hash, sizeof hash, hex_of_key);
        want = hex_of_key;
    }
    if (!hex64_ok(want) && !(strncmp(want, "key_", 4) == 0 && strlen(want) == PW_APIKEY_ID_LEN)) {
        fprintf(stderr, "parkway keys revoke: '%s' is not a key id (key_ + 8 hex) or a hash\n",
                want);
        return 2;
    }
    redisContext *redis = NULL;
    if ((rc = keys_connect(redis_url_or_env(url), &redis)))
        return rc;
    struct find_ctx fc = {.want = want};
    Parkway__KeyRecord *rec = NULL;
    redisReply *r = NULL;
    if ((rc = keys_scan(redis, find_one, &fc)))
        goto out;
    if (fc.matches == 0) {
        fprintf(stderr, "parkway keys revoke: no key %s\n", want);
        rc = 2;
        goto out;
    }
    if (fc.matches > 1) {
        fprintf(stderr,
                "parkway keys revoke: %zu keys have the id %s; give the hash instead "
                "(the first column of HKEYS pw:keys)\n",
                fc.matches, want);
        rc = 2;
        goto out;
    }
    const char *hget[] = {"HGET", PW_KEY_KEYS, fc.hex};
    if (!(r = keys_cmd(redis, 3, hget, NULL))) {
        rc = 1;
        goto out;
    }
    if (del || r->type != REDIS_REPLY_STRING ||
        pw_proto_unpack_key(r->str, r->len, 0, &rec) != PW_OK) {
        /* --delete, or a record nobody can read: removing it is the only safe revoke. */
        del = true;
        const char *hdel[] = {"HDEL", PW_KEY_KEYS, fc.hex};
        redisReply *d = keys_cmd(redis, 3, hdel, NULL);
        if (!d) {
            rc = 1;
            goto out;
        }
        freeReplyObject(d);
    } else {
        rec->disabled = 1;
        if ((rc = keys_store(redis, "HSET", fc.hex, rec, NULL)))
            goto out;
    }
    /* After the write: a router that drops its entry and asks again reads the new record. */
    const char *pub[] = {"PUBLISH", KEYS_REVOKE_CHANNEL, fc.hex};
    redisReply *p = keys_cmd(redis, 3, pub, NULL);
    if (!p) {
        fprintf(stderr,
                "parkway keys: the key is %s, but routers were not told: they keep it "
                "until their cache entry expires\n",
                del ? "deleted" : "disabled");
        rc = 1;
        goto out;
    }
    long long heard = p->type == REDIS_REPLY_INTEGER ? p->integer : 0;
    freeReplyObject(p);
    printf("%s %s\n", del ? "deleted" : "revoked", rec ? rec->key_id : want);
    fprintf(stderr, "routers notified: %lld subscriber(s)\n", heard);
out:
    pw_proto_free_key(rec);
    freeReplyObject(r);
    redisFree(redis);
    return rc;
}

/* ---- dispatch ------------------------------------------------------------------------ */

int parkway_cmd_keys(int argc, char **argv)
{
    if (argc < 2) {
        keys_usage(stderr);
        return 2;
    }
    const char *sub = argv[1];
    if (strcmp(sub, "--help") == 0 || strcmp(sub, "-h") == 0 || strcmp(sub, "help") == 0) {
        keys_usage(stdout);
        return 0;
    }
    if (strcmp(sub, "create") == 0)
        return keys_create(argc - 1, argv + 1);
    if (strcmp(sub, "list") == 0)
        return keys_list(argc - 1, argv + 1);
    if (strcmp(sub, "revoke") == 0)
        return keys_revoke(argc - 1, argv + 1);
    fprintf(stderr, "parkway keys: unknown subcommand '%s'\n", sub);
    keys_usage(stderr);
    return 2;
}
