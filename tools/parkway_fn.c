/*
 * parkway fn: check and print function specs (runtime/pw_spec.h).
 *
 *     parkway fn validate FILE|DIR...   "ok NAME (FILE)" per spec on stdout; each error as
 *                                        one line on stderr; exit 2 on any bad spec
 *     parkway fn show FILE              the canonical JSON the spec is stored as
 *     parkway fn ls [--redis URL]       deployed functions: replicas by state, queue, cost,
 *                                        last request (from pw:{fn}:scale, which the scaler
 *                                        writes every tick)
 *     parkway fn events NAME [--follow] [--count N] [--redis URL]
 *                                        the scaler's decisions for NAME from pw:events
 *
 * A directory is read as pw_spec_load_dir() reads it (*.yaml and *.yml, sorted, names
 * unique). Names must also be unique across all the arguments, since they are meant to be
 * deployed together. --redis defaults to $PARKWAY_REDIS_URL. Exit codes: 0 ok, 2 bad input
 * (usage, unknown function, bad URL), 1 other failure (Redis unreachable or lost).
 * Single-threaded; runs and exits (events --follow runs until SIGINT/SIGTERM).
 */
#include <errno.h>
#include <getopt.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "parkway_cli.h"
#include "pw_clock.h"
#include "pw_err.h"
#include "pw_keyspace.h"
#include "pw_redis.h"
#include "pw_spec.h"

#define FN_ERRCAP 1024
/* Connect and per-command timeout, ms; longer than the follow loop's XREAD BLOCK. */
#define FN_REDIS_TIMEOUT_MS 5000
/* XREAD BLOCK of events --follow, ms: how soon a signal is noticed. */
#define FN_FOLLOW_BLOCK_MS "1000"
/* events: entries read per XREVRANGE page while looking for NAME's last N. */
#define FN_EVENTS_PAGE 500
/* events --count bound (pw:events is trimmed to about 10000 entries anyway). */
#define FN_EVENTS_COUNT_MAX 100000
/* fn ls: functions listed at most. */
#define FN_LS_MAX 4096
/* fn ls: pw:{fn}:scale older than this is flagged (the scaler writes it every tick), ms. */
#define FN_SCALE_STALE_MS 10000

static void fn_usage(FILE *f)
{
    fputs("usage: parkway fn validate FILE|DIR...\n"
          "       parkway fn show FILE\n"
          "       parkway fn ls [--redis URL]\n"
          "       parkway fn events NAME [--follow] [--count N] [--redis URL]\n"
          "\n"
          "validate  check function specs (YAML); prints \"ok NAME (FILE)\" for each good\n"
          "          one, and one line FILE:LINE:COL: KEY: MESSAGE for each error\n"
          "show      print a spec as the canonical JSON parkway stores\n"
          "ls        deployed functions: replicas by state, requests waiting and in flight,\n"
          "          cost per hour now and so far, time since the last request\n"
          "events    the scaler's decisions for NAME, oldest first (last N, default 20);\n"
          "          --follow keeps printing new ones until Ctrl-C\n"
          "--redis defaults to $PARKWAY_REDIS_URL.\n",
          f);
}

/* Keeps the worse of two exit codes (2, bad input, outranks 1). */
static int worse(int rc, int other)
{
    return other > rc ? other : rc;
}

/* Adds specs to all; reports a name already there. Takes ownership of the specs in set. */
static int fn_collect(struct pw_spec_set *all, struct pw_spec_set *set)
{
    int rc = 0;
    struct pw_spec **grown = realloc(all->specs, (all->count + set->count + 1) * sizeof *grown);
    if (!grown) {
        fprintf(stderr, "parkway fn: out of memory\n");
        pw_spec_set_deinit(set);
        return 1;
    }
    all->specs = grown;
    for (size_t i = 0; i < set->count; i++) {
        struct pw_spec *s = set->specs[i];
        const struct pw_spec *prev = pw_spec_set_find(all, s->name);
        if (prev) {
            fprintf(stderr, "%s:%u:%u: name: duplicate function name '%s' (also in %s)\n",
                    s->origin, (unsigned)s->name_mark.line, (unsigned)s->name_mark.col, s->name,
                    prev->origin);
            rc = 2;
        } else {
            printf("ok %s (%s)\n", s->name, s->origin);
        }
        all->specs[all->count++] = s;
    }
    free(set->specs);
    set->specs = NULL;
    set->count = 0;
    return rc;
}

static int fn_validate(int argc, char **argv)
{
    struct pw_spec_set all = {0};
    char errbuf[FN_ERRCAP];
    int rc = 0;

    if (argc < 2) {
        fn_usage(stderr);
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        struct pw_spec_set set = {0};
        struct stat st;
        enum pw_err err;
        if (stat(argv[i], &st) == 0 && S_ISDIR(st.st_mode)) {
            err = pw_spec_load_dir(argv[i], &set, errbuf, sizeof errbuf);
            if (!err && set.count == 0) {
                fprintf(stderr, "%s:1:1: (document): no function specs (*.yaml, *.yml) here\n",
                        argv[i]);
                rc = worse(rc, 2);
                continue;
            }
        } else {
            struct pw_spec *s = NULL;
            err = pw_spec_load_file(argv[i], &s, errbuf, sizeof errbuf);
            if (!err) {
                set.specs = malloc(sizeof *set.specs);
                if (!set.specs) {
                    pw_spec_destroy(s);
                    fprintf(stderr, "parkway fn: out of memory\n");
                    rc = worse(rc, 1);
                    continue;
                }
                set.specs[0] = s;
                set.count = 1;
            }
        }
        if (err) {
            fprintf(stderr, "%s\n", errbuf);
            rc = worse(rc, pw_err_exit_code(err));
            continue;
        }
        rc = worse(rc, fn_collect(&all, &set));
    }
    pw_spec_set_deinit(&all);
    fflush(stdout);
    return rc;
}

static int fn_show(int argc, char **argv)
{
    struct pw_spec *s = NULL;
    char errbuf[FN_ERRCAP];
    char *json = NULL;
    int rc = 0;

    if (argc != 2) {
        fn_usage(stderr);
        return 2;
    }
    enum pw_err err = pw_spec_load_file(argv[1], &s, errbuf, sizeof errbuf);
    if (err) {
        fprintf(stderr, "%s\n", errbuf);
        rc = pw_err_exit_code(err);
        goto out;
    }
    json = pw_spec_to_json(s);
    if (!json) {
        fprintf(stderr, "parkway fn: out of memory\n");
        rc = 1;
        goto out;
    }
    printf("%s\n", json);
    if (fflush(stdout) != 0)
        rc = 1;
out:
    free(json);
    pw_spec_destroy(s);
    return rc;
}

/* ---- ls and events: reading what the scaler writes ---------------------------------- */

/* Connects to url (or $PARKWAY_REDIS_URL); on failure prints why, returns the exit code. */
static int fn_connect(const char *url, redisContext **out)
{
    char err[256] = "";
    if (!url || !*url)
        url = getenv("PARKWAY_REDIS_URL");
    if (!url || !*url) {
        fprintf(stderr, "parkway fn: no Redis: give --redis URL or set PARKWAY_REDIS_URL\n");
        return 2;
    }
    enum pw_err e = pw_redis_sync_connect(url, FN_REDIS_TIMEOUT_MS, out, err, sizeof err);
    if (e) {
        fprintf(stderr, "parkway fn: redis: %s\n", err[0] ? err : pw_err_desc(e));
        return pw_err_exit_code(e);
    }
    return 0;
}

/* One command; NULL (and a message) on a lost connection or an error reply. */
static redisReply *fn_cmd(redisContext *rc, int argc, const char **argv)
{
    redisReply *r = redisCommandArgv(rc, argc, argv, NULL);
    if (!r) {
        fprintf(stderr, "parkway fn: redis %s: %s\n", argv[0], rc->errstr);
        return NULL;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        fprintf(stderr, "parkway fn: redis %s: %s\n", argv[0], r->str);
        freeReplyObject(r);
        return NULL;
    }
    return r;
}

/* Value of field key in a flat [k, v, ...] HGETALL reply, or NULL. */
static const char *hash_get(const redisReply *h, const char *key)
{
    for (size_t i = 0; h && h->type == REDIS_REPLY_ARRAY && i + 1 < h->elements; i += 2) {
        const redisReply *k = h->element[i], *v = h->element[i + 1];
        if (k->type == REDIS_REPLY_STRING && v->type == REDIS_REPLY_STRING &&
            strcmp(k->str, key) == 0)
            return v->str;
    }
    return NULL;
}

static uint64_t hash_u64(const redisReply *h, const char *key)
{
    const char *v = hash_get(h, key);
    return v ? strtoull(v, NULL, 10) : 0;
}

/* "12s", "5m", "3h", "2d" for a duration in ms; "-" when unknown. */
static const char *fmt_age(int64_t ms, char *buf, size_t cap)
{
    if (ms < 0)
        return "-";
    int64_t s = ms / 1000;
    if (s < 120)
        snprintf(buf, cap, "%" PRId64 "s", s);
    else if (s < 2 * 3600)
        snprintf(buf, cap, "%" PRId64 "m", s / 60);
    else if (s < 2 * 86400)
        snprintf(buf, cap, "%" PRId64 "h", s / 3600);
    else
        snprintf(buf, cap, "%" PRId64 "d", s / 86400);
    return buf;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Replicas by state, the non-zero ones: "1 ready, 1 parked"; "none" when all are zero. */
static void fmt_replicas(const redisReply *h, char *buf, size_t cap)
{
    static const char *const states[] = {"ready",    "starting", "provisioning",
                                         "draining", "parked",   "failed"};
    size_t off = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < sizeof states / sizeof states[0]; i++) {
        uint64_t n = hash_u64(h, states[i]);
        if (n == 0)
            continue;
        int w = snprintf(buf + off, cap - off, "%s%" PRIu64 " %s", off ? ", " : "", n, states[i]);
        if (w < 0 || (size_t)w >= cap - off)
            break;
        off += (size_t)w;
    }
    if (off == 0)
        snprintf(buf, cap, "none");
}

static int fn_ls(int argc, char **argv)
{
    const char *url = NULL;
    static const struct option longopts[] = {
        {"redis", required_argument, NULL, 'r'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int opt;
    optind = 1;
    while ((opt = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        if (opt == 'r') {
            url = optarg;
        } else if (opt == 'h') {
            fn_usage(stdout);
            return 0;
        } else {
            fn_usage(stderr);
            return 2;
        }
    }
    if (optind != argc) {
        fn_usage(stderr);
        return 2;
    }
    redisContext *rc = NULL;
    redisReply *names = NULL;
    const char **sorted = NULL;
    int rc_exit = fn_connect(url, &rc);
    if (rc_exit)
        return rc_exit;
    rc_exit = 1;
    const char *hk[] = {"HKEYS", PW_KEY_FUNCTIONS};
    if (!(names = fn_cmd(rc, 2, hk)))
        goto out;
    if (names->type != REDIS_REPLY_ARRAY) {
        fprintf(stderr, "parkway fn: redis HKEYS: unexpected reply\n");
        goto out;
    }
    size_t n = names->elements < FN_LS_MAX ? names->elements : FN_LS_MAX;
    sorted = calloc(n ? n : 1, sizeof *sorted);
    if (!sorted) {
        fprintf(stderr, "parkway fn: out of memory\n");
        goto out;
    }
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (names->element[i]->type == REDIS_REPLY_STRING && pw_key_name_ok(names->element[i]->str))
            sorted[m++] = names->element[i]->str;
    qsort(sorted, m, sizeof *sorted, cmp_str);
    if (m == 0) {
        printf("no functions deployed (pw:functions is empty: is the scaler running?)\n");
        rc_exit = 0;
        goto out;
    }
    printf("%-24s %-32s %7s %9s %10s %10s %s\n", "FUNCTION", "REPLICAS", "WAITING", "IN_FLIGHT",
           "$/HOUR", "$ SO FAR", "LAST_REQUEST");
    int64_t now = pw_clock_wall_ms();
    for (size_t i = 0; i < m; i++) {
        char key[PW_KEY_MAX];
        pw_key_scale(key, sizeof key, sorted[i]);
        const char *hg[] = {"HGETALL", key};
        redisReply *h = fn_cmd(rc, 2, hg);
        if (!h)
            goto out;
        bool have = h->type == REDIS_REPLY_ARRAY && h->elements > 0;
        char reps[128], rate[32], total[32], age[32];
        if (!have) {
            printf("%-24s %-32s %7s %9s %10s %10s %s\n", sorted[i], "(no scaler data)", "-", "-",
                   "-", "-", "-");
            freeReplyObject(h);
            continue;
        }
        fmt_replicas(h, reps, sizeof reps);
        snprintf(rate, sizeof rate, "$%.4f", (double)hash_u64(h, "rate_microusd_per_hour") / 1e6);
        snprintf(total, sizeof total, "$%.6f", (double)hash_u64(h, "cost_microusd") / 1e6);
        int64_t last = (int64_t)hash_u64(h, "last_request_ms");
        char last_s[48];
        if (last <= 0)
            snprintf(last_s, sizeof last_s, "never");
        else
            snprintf(last_s, sizeof last_s, "%s ago",
                     fmt_age(now - last > 0 ? now - last : 0, age, sizeof age));
        printf("%-24s %-32s %7" PRIu64 " %9" PRIu64 " %10s %10s %s\n", sorted[i], reps,
               hash_u64(h, "queue_lag"), hash_u64(h, "in_flight"), rate, total, last_s);
        int64_t updated = (int64_t)hash_u64(h, "updated_ms");
        if (updated > 0 && now - updated > FN_SCALE_STALE_MS)
            printf("  note: scaler data is %s old (is the scaler running?)\n",
                   fmt_age(now - updated, age, sizeof age));
        const char *e = hash_get(h, "error");
        if (e && *e)
            printf("  error: %s\n", e);
        freeReplyObject(h);
    }
    rc_exit = fflush(stdout) == 0 ? 0 : 1;
out:
    free(sorted);
    freeReplyObject(names);
    if (rc)
        redisFree(rc);
    return rc_exit;
}

/* "2024-05-01T12:00:00.123Z" from a stream id's milliseconds. */
static const char *fmt_ts(const char *id, char *buf, size_t cap)
{
    long long ms = strtoll(id, NULL, 10);
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    char base[32];
    if (!gmtime_r(&t, &tm) || strftime(base, sizeof base, "%Y-%m-%dT%H:%M:%S", &tm) == 0)
        return "?";
    snprintf(buf, cap, "%s.%03lldZ", base, ms % 1000);
    return buf;
}

static bool event_is(const struct pw_stream_entry *en, const char *fn)
{
    const struct pw_slice *f = pw_stream_entry_get(en, "function");
    return f && f->len == strlen(fn) && memcmp(f->ptr, fn, f->len) == 0;
}

static void print_event(const struct pw_stream_entry *en)
{
    const struct pw_slice *a = pw_stream_entry_get(en, "action");
    const struct pw_slice *r = pw_stream_entry_get(en, "replica");
    const struct pw_slice *why = pw_stream_entry_get(en, "reason");
    char ts[48];
    printf("%s  %-14.*s %-28.*s %.*s\n", fmt_ts(en->id, ts, sizeof ts), a ? (int)a->len : 1,
           a ? a->ptr : "-", r && r->len ? (int)r->len : 1, r && r->len ? r->ptr : "-",
           why ? (int)why->len : 0, why ? why->ptr : "");
}

static volatile sig_atomic_t fn_stop;

static void on_fn_signal(int sig)
{
    (void)sig;
    fn_stop = 1;
}

/*
 * The last `count` events of fn, printed oldest first. Pages back through pw:events with
 * XREVRANGE (the stream mixes every function). *top gets the newest id of the stream
 * ("0-0" when empty): where --follow goes on from. Returns an exit code.
 */
static int events_last(redisContext *rc, const char *fn, unsigned long count, char *top,
                       size_t top_cap)
{
    struct pw_stream_entries **pages = NULL;
    size_t n_pages = 0, found = 0;
    int rc_exit = 1;
    char end[PW_STREAM_ID_MAX + 1] = "+";
    snprintf(top, top_cap, "0-0");
    do { /* at least one page, for *top even when count is 0 */
        char page[16];
        snprintf(page, sizeof page, "%d", FN_EVENTS_PAGE);
        const char *argv[] = {"XREVRANGE", PW_KEY_EVENTS, end, "-", "COUNT", page};
        redisReply *r = fn_cmd(rc, 6, argv);
        if (!r)
            goto out;
        struct pw_stream_entries *es = NULL;
        enum pw_err e = pw_stream_parse_range(r, &es);
        freeReplyObject(r);
        if (e) {
            fprintf(stderr, "parkway fn: redis XREVRANGE: unexpected reply\n");
            goto out;
        }
        if (es->n == 0) {
            pw_stream_entries_free(es);
            break;
        }
        if (n_pages == 0)
            snprintf(top, top_cap, "%s", es->v[0].id);
        struct pw_stream_entries **grown = realloc(pages, (n_pages + 1) * sizeof *grown);
        if (!grown) {
            pw_stream_entries_free(es);
            fprintf(stderr, "parkway fn: out of memory\n");
            goto out;
        }
        pages = grown;
        pages[n_pages++] = es;
        for (size_t i = 0; i < es->n && found < count; i++)
            found += event_is(&es->v[i], fn);
        /* Next page: strictly before the oldest id of this one. */
        snprintf(end, sizeof end, "(%s", es->v[es->n - 1].id);
        if (es->n < FN_EVENTS_PAGE)
            break;
    } while (found < count);
    /* Oldest first: walk the pages backwards, skipping the surplus of the oldest page. */
    size_t skip = 0, total = 0;
    for (size_t p = 0; p < n_pages; p++)
        for (size_t i = 0; i < pages[p]->n; i++)
            total += event_is(&pages[p]->v[i], fn);
    if (total > count)
        skip = total - count;
    for (size_t p = n_pages; p-- > 0;) {
        for (size_t i = pages[p]->n; i-- > 0;) {
            if (!event_is(&pages[p]->v[i], fn))
                continue;
            if (skip) {
                skip--;
                continue;
            }
            print_event(&pages[p]->v[i]);
        }
    }
    rc_exit = 0;
out:
    for (size_t p = 0; p < n_pages; p++)
        pw_stream_entries_free(pages[p]);
    free(pages);
    return rc_exit;
}

/* New events of fn after id `from` until a signal; XREAD BLOCK in short rounds. */
static int events_follow(redisContext *rc, const char *fn, const char *from)
{
    char cursor[PW_STREAM_ID_MAX + 1];
    snprintf(cursor, sizeof cursor, "%s", from);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_fn_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    while (!fn_stop) {
        const char *argv[] = {"XREAD",   "COUNT",       "100", "BLOCK", FN_FOLLOW_BLOCK_MS,
                              "STREAMS", PW_KEY_EVENTS, cursor};
        redisReply *r = redisCommandArgv(rc, 8, argv, NULL);
        if (!r) {
            if (fn_stop || (rc->err == REDIS_ERR_IO && errno == EINTR))
                break;
            fprintf(stderr, "parkway fn: redis XREAD: %s\n", rc->errstr);
            return 1;
        }
        if (r->type == REDIS_REPLY_ERROR) {
            fprintf(stderr, "parkway fn: redis XREAD: %s\n", r->str);
            freeReplyObject(r);
            return 1;
        }
        struct pw_stream_entries *es = NULL;
        if (r->type == REDIS_REPLY_ARRAY && pw_stream_parse_read(r, &es) == PW_OK) {
            for (size_t i = 0; i < es->n; i++) {
                snprintf(cursor, sizeof cursor, "%s", es->v[i].id);
                if (event_is(&es->v[i], fn))
                    print_event(&es->v[i]);
            }
            fflush(stdout);
        }
        pw_stream_entries_free(es);
        freeReplyObject(r);
    }
    return 0;
}

static int fn_events(int argc, char **argv)
{
    const char *url = NULL;
    bool follow = false;
    unsigned long count = 20;
    static const struct option longopts[] = {
        {"redis", required_argument, NULL, 'r'},
        {"follow", no_argument, NULL, 'f'},
        {"count", required_argument, NULL, 'n'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int opt;
    optind = 1;
    while ((opt = getopt_long(argc, argv, "fn:", longopts, NULL)) != -1) {
        switch (opt) {
        case 'r':
            url = optarg;
            break;
        case 'f':
            follow = true;
            break;
        case 'n': {
            char *end;
            errno = 0;
            count = strtoul(optarg, &end, 10);
            if (errno || *end || end == optarg || count > FN_EVENTS_COUNT_MAX) {
                fprintf(stderr, "parkway fn events: --count: expected 0..%d, got '%s'\n",
                        FN_EVENTS_COUNT_MAX, optarg);
                return 2;
            }
            break;
        }
        case 'h':
            fn_usage(stdout);
            return 0;
        default:
            fn_usage(stderr);
            return 2;
        }
    }
    if (optind + 1 != argc) {
        fn_usage(stderr);
        return 2;
    }
    const char *name = argv[optind];
    if (!pw_key_name_ok(name)) {
        fprintf(stderr, "parkway fn events: '%s' is not a function name\n", name);
        return 2;
    }
    redisContext *rc = NULL;
    int rc_exit = fn_connect(url, &rc);
    if (rc_exit)
        return rc_exit;
    const char *he[] = {"HEXISTS", PW_KEY_FUNCTIONS, name};
    redisReply *r = fn_cmd(rc, 3, he);
    if (!r) {
        rc_exit = 1;
        goto out;
    }
    bool known = r->type == REDIS_REPLY_INTEGER && r->integer == 1;
    freeReplyObject(r);
    if (!known) {
        fprintf(stderr, "parkway fn events: no function '%s' in %s\n", name, PW_KEY_FUNCTIONS);
        rc_exit = 2;
        goto out;
    }
    char top[PW_STREAM_ID_MAX + 1];
    if ((rc_exit = events_last(rc, name, count, top, sizeof top)))
        goto out;
    fflush(stdout);
    if (follow)
        rc_exit = events_follow(rc, name, top);
    if (fflush(stdout) != 0)
        rc_exit = 1;
out:
    redisFree(rc);
    return rc_exit;
}

int parkway_cmd_fn(int argc, char **argv)
{
    if (argc < 2) {
        fn_usage(stderr);
        return 2;
    }
    const char *sub = argv[1];
    if (strcmp(sub, "validate") == 0)
        return fn_validate(argc - 1, argv + 1);
    if (strcmp(sub, "show") == 0)
        return fn_show(argc - 1, argv + 1);
    if (strcmp(sub, "ls") == 0)
        return fn_ls(argc - 1, argv + 1);
    if (strcmp(sub, "events") == 0)
        return fn_events(argc - 1, argv + 1);
    if (strcmp(sub, "help") == 0 || strcmp(sub, "-h") == 0 || strcmp(sub, "--help") == 0) {
        fn_usage(stdout);
        return 0;
    }
    fprintf(stderr, "parkway fn: unknown command '%s'\n", sub);
    fn_usage(stderr);
    return 2;
}
