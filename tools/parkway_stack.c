/* parkway_stack: files and Redis steps of `parkway up` (see parkway_stack.h). */
#include "parkway_stack.h"

#include <errno.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "parkway.pb-c.h"
#include "pw_apikey.h"
#include "pw_clock.h"
#include "pw_keyspace.h"
#include "pw_redis.h"
#include "pw_log.h"

#define FUNCTIONS_KEY PW_KEY_FUNCTIONS

void parkway_stack_opts_default(struct parkway_stack_opts *o)
{
    memset(o, 0, sizeof *o);
    const char *s = getenv("PARKWAY_STATE_DIR");
    const char *home = getenv("HOME");
    if (s && *s)
        snprintf(o->state_dir, sizeof o->state_dir, "%s", s);
    else
        snprintf(o->state_dir, sizeof o->state_dir, "%s/.local/state/parkway",
                 home && *home ? home : "/tmp");
    snprintf(o->functions_dir, sizeof o->functions_dir, "functions");
    o->router_port = 8080;
    o->redis_port = 0;
}

static enum pw_err mkdir_p(const char *path, char *err, size_t errcap)
{
    char buf[PATH_MAX];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) {
        snprintf(err, errcap, "path too long: %s", path);
        return PW_ERR_CONFIG;
    }
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(buf, 0700) != 0 && errno != EEXIST)
            goto fail;
        *p = '/';
    }
    if (mkdir(buf, 0700) != 0 && errno != EEXIST)
        goto fail;
    return PW_OK;
fail:
    snprintf(err, errcap, "cannot create %s: %s", buf, strerror(errno));
    return PW_ERR_IO;
}

enum pw_err parkway_stack_prepare_dirs(struct parkway_stack_opts *o, char *err, size_t errcap)
{
    char path[PATH_MAX], dir[PATH_MAX];
    enum pw_err e = mkdir_p(o->state_dir, err, errcap);
    if (e)
        return e;
    snprintf(path, sizeof path, "%s/redis", o->state_dir);
    if ((e = mkdir_p(path, err, errcap)))
        return e;
    if (o->external_redis)
        return PW_OK;
    if (o->redis_port > 0) {
        snprintf(o->redis_url, sizeof o->redis_url, "redis://127.0.0.1:%d", o->redis_port);
        return PW_OK;
    }
    if (!realpath(o->state_dir, dir)) {
        snprintf(err, errcap, "%s: %s", o->state_dir, strerror(errno));
        return PW_ERR_IO;
    }
    /* sun_path holds 108 bytes: a deep state dir cannot host the socket. */
    if (strlen(dir) + sizeof "/redis/redis.sock" > 104) {
        snprintf(err, errcap,
                 "state dir %s is too long for a unix socket; use --redis-port N or a shorter "
                 "--state-dir",
                 dir);
        return PW_ERR_CONFIG;
    }
    snprintf(o->redis_url, sizeof o->redis_url, "unix://%s/redis/redis.sock", dir);
    return PW_OK;
}

enum pw_err parkway_stack_write_redis_conf(const struct parkway_stack_opts *o, char *path,
                                           size_t pathcap, char *err, size_t errcap)
{
    char dir[PATH_MAX];
    if (!realpath(o->state_dir, dir)) {
        snprintf(err, errcap, "%s: %s", o->state_dir, strerror(errno));
        return PW_ERR_IO;
    }
    snprintf(path, pathcap, "%s/redis/redis.conf", dir);
    FILE *f = fopen(path, "w");
    if (!f) {
        snprintf(err, errcap, "cannot write %s: %s", path, strerror(errno));
        return PW_ERR_IO;
    }
    fprintf(f, "# Written by `parkway up` on every start; edit deploy/redis.conf instead.\n");
    if (access(PW_SOURCE_DIR "/deploy/redis.conf", R_OK) == 0)
        fprintf(f, "include %s\n", PW_SOURCE_DIR "/deploy/redis.conf");
    else
        fprintf(f, "appendonly yes\nappendfsync everysec\nsave \"\"\n"
                   "maxmemory-policy noeviction\n");
    /* Private by default: a unix socket only the owner can open, no TCP port. */
    if (o->redis_port > 0)
        fprintf(f, "bind 127.0.0.1\nprotected-mode yes\nport %d\n", o->redis_port);
    else
        fprintf(f, "port 0\nunixsocket %s/redis/redis.sock\nunixsocketperm 700\n", dir);
    fprintf(f, "dir %s/redis\ndaemonize no\npidfile %s/redis/redis.pid\n", dir, dir);
    if (fclose(f) != 0) {
        snprintf(err, errcap, "cannot write %s: %s", path, strerror(errno));
        return PW_ERR_IO;
    }
    return PW_OK;
}

static redisContext *connect_redis(const struct parkway_stack_opts *o, char *err, size_t errcap)
{
    redisContext *c = NULL;
    if (pw_redis_sync_connect(o->redis_url, 2000, &c, err, errcap) != PW_OK)
        return NULL;
    return c;
}

/* Runs one command; a NULL or error reply becomes a message in err. */
static redisReply *command_argv(redisContext *c, int argc, const char **argv, const size_t *lens,
                                char *err, size_t errcap)
{
    redisReply *r = redisCommandArgv(c, argc, argv, lens);
    if (!r) {
        snprintf(err, errcap, "redis %s: %s", argv[0], c->errstr);
        return NULL;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        snprintf(err, errcap, "redis %s: %s", argv[0], r->str);
        freeReplyObject(r);
        return NULL;
    }
    return r;
}

enum pw_err parkway_stack_wait_redis(const struct parkway_stack_opts *o, int timeout_ms, char *err,
                                     size_t errcap)
{
    uint64_t until = pw_clock_mono_ms() + (uint64_t)timeout_ms;
    for (;;) {
        redisContext *c = connect_redis(o, err, errcap);
        if (c) {
            const char *argv[] = {"PING"};
            redisReply *r = command_argv(c, 1, argv, NULL, err, errcap);
            bool ok = r && r->type == REDIS_REPLY_STATUS;
            freeReplyObject(r);
            redisFree(c);
            if (ok)
                return PW_OK;
        }
        if (pw_clock_mono_ms() > until) {
            snprintf(err + strlen(err), errcap - strlen(err),
                     " (redis-server did not answer within %d ms; see %s/redis/redis.log)",
                     timeout_ms, o->state_dir);
            return PW_ERR_TIMEOUT;
        }
        struct timespec ts = {0, 50 * 1000000L};
        nanosleep(&ts, NULL);
    }
}

enum pw_err parkway_stack_register_functions(const struct parkway_stack_opts *o,
                                             const struct pw_spec_set *specs, char *err,
                                             size_t errcap)
{
    redisContext *c = connect_redis(o, err, errcap);
    if (!c)
        return PW_ERR_REDIS;
    enum pw_err e = PW_OK;
    /* Replace the whole registry in one MULTI so routers never see a half-written one. */
    const char *multi[] = {"MULTI"}, *exec[] = {"EXEC"}, *del[] = {"DEL", FUNCTIONS_KEY};
    redisReply *r = command_argv(c, 1, multi, NULL, err, errcap);
    if (!r) {
        e = PW_ERR_REDIS;
        goto out;
    }
    freeReplyObject(r);
    r = command_argv(c, 2, del, NULL, err, errcap);
    if (!r) {
        e = PW_ERR_REDIS;
        goto out;
    }
    freeReplyObject(r);
    for (size_t i = 0; i < specs->count; i++) {
        char *json = pw_spec_to_json(specs->specs[i]);
        if (!json) {
            e = PW_ERR_NOMEM;
            goto out;
        }
        const char *argv[] = {"HSET", FUNCTIONS_KEY, specs->specs[i]->name, json};
        r = command_argv(c, 4, argv, NULL, err, errcap);
        free(json);
        if (!r) {
            e = PW_ERR_REDIS;
            goto out;
        }
        freeReplyObject(r);
    }
    r = command_argv(c, 1, exec, NULL, err, errcap);
    if (!r) {
        e = PW_ERR_REDIS;
        goto out;
    }
    freeReplyObject(r);
out:
    redisFree(c);
    return e;
}

/* The value of `name=` in state_dir/env, if any. */
static bool read_saved(const struct parkway_stack_opts *o, const char *name, char *val, size_t cap)
{
    char path[PATH_MAX], line[512];
    snprintf(path, sizeof path, "%s/env", o->state_dir);
    FILE *f = fopen(path, "r");
    if (!f)
        return false;
    bool found = false;
    size_t n = strlen(name);
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, name, n) == 0 && line[n] == '=') {
            line[strcspn(line, "\r\n")] = '\0';
            snprintf(val, cap, "%s", line + n + 1);
            found = val[0] != '\0';
        }
    }
    fclose(f);
    return found;
}

enum pw_err parkway_stack_admin_key(const struct parkway_stack_opts *o, char *key, size_t cap)
{
    if (read_saved(o, "PARKWAY_ADMIN_KEY", key, cap) && pw_apikey_format_ok(key, strlen(key)))
        return PW_OK;
    if (cap < PW_APIKEY_LEN + 1)
        return PW_ERR_INVAL;
    return pw_apikey_generate(key);
}

enum pw_err parkway_stack_ensure_key(const struct parkway_stack_opts *o, bool force_new, char *key,
                                     size_t keycap, char *err, size_t errcap)
{
    redisContext *c = connect_redis(o, err, errcap);
    if (!c)
        return PW_ERR_REDIS;
    enum pw_err e = PW_OK;
    uint8_t hash[PW_APIKEY_HASH_LEN];
    char hex[PW_APIKEY_HASH_LEN * 2 + 1];
    redisReply *r = NULL;
    uint8_t *packed = NULL;

    if (!force_new && read_saved(o, "OPENAI_API_KEY", key, keycap)) {
        pw_apikey_hash(key, strlen(key), hash);
        pw_hex_encode(hash, sizeof hash, hex);
        const char *argv[] = {"HEXISTS", PW_KEY_KEYS, hex};
        r = command_argv(c, 3, argv, NULL, err, errcap);
        if (!r) {
            e = PW_ERR_REDIS;
            goto out;
        }
        if (r->type == REDIS_REPLY_INTEGER && r->integer == 1)
            goto out; /* still registered: reuse it */
        freeReplyObject(r);
        r = NULL;
    }

    if (keycap < PW_APIKEY_LEN + 1) {
        e = PW_ERR_INVAL;
        goto out;
    }
    e = pw_apikey_generate(key);
    if (e) {
        snprintf(err, errcap, "cannot generate an API key: %s", pw_err_desc(e));
        goto out;
    }
    pw_apikey_hash(key, strlen(key), hash);
    pw_hex_encode(hash, sizeof hash, hex);

    char key_id[PW_APIKEY_ID_LEN + 1];
    pw_apikey_id(hash, key_id);
    Parkway__KeyRecord rec = PARKWAY__KEY_RECORD__INIT;
    rec.key_id = key_id;
    rec.tenant = "local";
    rec.name = "parkway up";
    rec.created_unix_ms = pw_clock_wall_ms();
    size_t len = parkway__key_record__get_packed_size(&rec);
    packed = malloc(len ? len : 1);
    if (!packed) {
        e = PW_ERR_NOMEM;
        goto out;
    }
    parkway__key_record__pack(&rec, packed);
    const char *argv[] = {"HSET", PW_KEY_KEYS, hex, (const char *)packed};
    size_t lens[] = {4, strlen(PW_KEY_KEYS), strlen(hex), len};
    r = command_argv(c, 4, argv, lens, err, errcap);
    if (!r)
        e = PW_ERR_REDIS;
    else
        PW_LOG_INFO("event=key_created key_id=%s tenant=local", key_id);
out:
    free(packed);
    freeReplyObject(r);
    redisFree(c);
    return e;
}

enum pw_err parkway_stack_write_env(const struct parkway_stack_opts *o, const char *key,
                                    const char *admin_key, char *err, size_t errcap)
{
    char path[PATH_MAX], tmp[PATH_MAX + 8];
    snprintf(path, sizeof path, "%s/env", o->state_dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    /* 0600 from the start: the file holds a secret. Renamed into place atomically. */
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (!f) {
        if (fd >= 0)
            close(fd);
        snprintf(err, errcap, "cannot write %s: %s", tmp, strerror(errno));
        return PW_ERR_IO;
    }
    fprintf(f,
            "OPENAI_BASE_URL=http://127.0.0.1:%d/v1\nOPENAI_API_KEY=%s\n"
            "PARKWAY_REDIS_URL=%s\nPARKWAY_ADMIN_KEY=%s\n",
            o->router_port, key, o->redis_url, admin_key);
    if (fclose(f) != 0 || rename(tmp, path) != 0) {
        snprintf(err, errcap, "cannot write %s: %s", path, strerror(errno));
        unlink(tmp);
        return PW_ERR_IO;
    }
    return PW_OK;
}
