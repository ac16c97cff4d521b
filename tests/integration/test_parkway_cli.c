/*
 * Integration tests of the `parkway` CLI as a real process: `fn validate` exit codes and
 * one-line errors, and `parkway up` starting its own redis-server, registering the specs,
 * storing only the key's hash, writing <state>/env, reusing the key on a second run and
 * stopping cleanly on SIGTERM; its supervision: a killed redis-server or router is started
 * again (Redis with its AOF data), and a child that keeps dying stops the stack with exit 1.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "pw_apikey.h"
#include "pw_test_proc.h"

#define PARKWAY PW_BINARY_DIR "/tools/parkway"

/* Runs argv, capturing stdout and stderr (each up to cap bytes); returns the exit code. */
static int run_capture(char *const argv[], char *out, size_t outcap, char *err, size_t errcap)
{
    int po[2], pe[2];
    assert_int_equal(pipe(po), 0);
    assert_int_equal(pipe(pe), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(po[1], 1);
        dup2(pe[1], 2);
        close(po[0]);
        close(pe[0]);
        execv(argv[0], argv);
        _exit(127);
    }
    close(po[1]);
    close(pe[1]);
    size_t no = 0, ne = 0;
    for (;;) {
        ssize_t a = read(po[0], out + no, outcap - 1 - no);
        if (a > 0)
            no += (size_t)a;
        if (a <= 0 || no == outcap - 1)
            break;
    }
    for (;;) {
        ssize_t b = read(pe[0], err + ne, errcap - 1 - ne);
        if (b > 0)
            ne += (size_t)b;
        if (b <= 0 || ne == errcap - 1)
            break;
    }
    out[no] = '\0';
    err[ne] = '\0';
    close(po[0]);
    close(pe[0]);
    int status;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static void test_fn_validate_good(void **state)
{
    (void)state;
    char out[4096], err[4096];
    char *argv[] = {PARKWAY, "fn", "validate", PW_SOURCE_DIR "/functions", NULL};
    assert_int_equal(run_capture(argv, out, sizeof out, err, sizeof err), 0);
    assert_non_null(strstr(out, "ok smollm2-135m"));
}

static void test_fn_validate_bad_is_exit_2_one_line(void **state)
{
    (void)state;
    static const char *const bad[] = {"alias.yaml", "bad_duration.yaml", "duplicate_key.yaml",
                                      "bad_sha.yaml"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char path[1024], out[4096], err[4096];
        snprintf(path, sizeof path, "%s/specs/bad/%s", PW_TEST_DATA_DIR, bad[i]);
        char *argv[] = {PARKWAY, "fn", "validate", path, NULL};
        assert_int_equal(run_capture(argv, out, sizeof out, err, sizeof err), 2);
        /* one line: "<file>:<line>:<col>: <key>: <message>\n" */
        assert_non_null(strstr(err, path));
        char *nl = strchr(err, '\n');
        assert_non_null(nl);
        assert_string_equal(nl + 1, "");
    }
}

static void test_unknown_command_is_exit_2(void **state)
{
    (void)state;
    char out[4096], err[4096];
    char *argv[] = {PARKWAY, "frobnicate", NULL};
    assert_int_equal(run_capture(argv, out, sizeof out, err, sizeof err), 2);
    assert_non_null(strstr(err, "unknown command"));
}

/* The running `parkway up`, killed by the teardown if a test fails half-way. */
static pid_t up_pid = -1;

/* Starts `parkway up`; waits until it prints that it is up (its last start-up step).
 * full: with the router and scaler (else --redis-only); stderr goes to log (NULL: dropped). */
static pid_t start_up_with(const char *state_dir, int redis_port, int router_port, bool full,
                           const char *log)
{
    char rp[16], hp[16];
    snprintf(rp, sizeof rp, "%d", redis_port);
    snprintf(hp, sizeof hp, "%d", router_port);
    int po[2];
    assert_int_equal(pipe(po), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(po[1], 1);
        close(po[0]);
        int errfd =
            log ? open(log, O_WRONLY | O_CREAT | O_APPEND, 0644) : open("/dev/null", O_WRONLY);
        dup2(errfd, 2);
        char *argv[] = {PARKWAY,
                        "up",
                        "--state-dir",
                        (char *)state_dir,
                        "--functions",
                        PW_SOURCE_DIR "/functions",
                        "--redis-port",
                        rp,
                        "--port",
                        hp,
                        full ? NULL : "--redis-only",
                        NULL};
        execv(argv[0], argv);
        _exit(127);
    }
    close(po[1]);
    up_pid = pid;
    char buf[4096];
    size_t n = 0;
    while (n < sizeof buf - 1) {
        ssize_t r = read(po[0], buf + n, sizeof buf - 1 - n);
        if (r <= 0)
            break;
        n += (size_t)r;
        buf[n] = '\0';
        if (strstr(buf, "Ctrl-C stops the stack."))
            break;
    }
    buf[n] = '\0';
    close(po[0]);
    if (!strstr(buf, "parkway is up"))
        fail_msg("parkway up did not come up; it printed: %s", buf);
    return pid;
}

/* The router and scaler are not part of most tests: they check up's own steps. */
static pid_t start_up(const char *state_dir, int redis_port, int router_port)
{
    return start_up_with(state_dir, redis_port, router_port, false, NULL);
}

static int teardown_up(void **state)
{
    (void)state;
    if (up_pid > 0) {
        kill(up_pid, SIGKILL);
        waitpid(up_pid, NULL, 0);
        up_pid = -1;
    }
    return 0;
}

static void stop_up(pid_t pid)
{
    kill(pid, SIGTERM);
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    up_pid = -1;
}

static void read_env_key(const char *state_dir, char *key, size_t cap, char *base, size_t bcap)
{
    char path[1024], line[512];
    snprintf(path, sizeof path, "%s/env", state_dir);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600); /* it holds a secret */
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    key[0] = base[0] = '\0';
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        if (strncmp(line, "OPENAI_API_KEY=", 15) == 0)
            snprintf(key, cap, "%s", line + 15);
        if (strncmp(line, "OPENAI_BASE_URL=", 16) == 0)
            snprintf(base, bcap, "%s", line + 16);
    }
    fclose(f);
}

static void test_up_registers_and_reuses_key(void **state)
{
    (void)state;
    if (access("/usr/bin/redis-server", X_OK) != 0)
        skip();
    char dir[] = "/tmp/pw-up-test-XXXXXX";
    assert_non_null(mkdtemp(dir));
    int redis_port = pw_test_free_port(), router_port = pw_test_free_port();

    pid_t pid = start_up(dir, redis_port, router_port);
    char key[512], base[512];
    read_env_key(dir, key, sizeof key, base, sizeof base);
    assert_true(pw_apikey_format_ok(key, strlen(key)));
    char want_base[64];
    snprintf(want_base, sizeof want_base, "http://127.0.0.1:%d/v1", router_port);
    assert_string_equal(base, want_base);

    redisContext *c = redisConnect("127.0.0.1", redis_port);
    assert_non_null(c);
    assert_int_equal(c->err, 0);
    redisReply *r = redisCommand(c, "HEXISTS pw:functions smollm2-135m");
    assert_int_equal(r->integer, 1);
    freeReplyObject(r);
    /* Only the hash of the key is stored, never the key. */
    uint8_t hash[PW_APIKEY_HASH_LEN];
    char hex[PW_APIKEY_HASH_HEX_LEN + 1];
    pw_apikey_hash(key, strlen(key), hash);
    pw_hex_encode(hash, sizeof hash, hex);
    r = redisCommand(c, "HEXISTS pw:keys %s", hex);
    assert_int_equal(r->integer, 1);
    freeReplyObject(r);
    r = redisCommand(c, "HEXISTS pw:keys %s", key);
    assert_int_equal(r->integer, 0);
    freeReplyObject(r);
    r = redisCommand(c, "CONFIG GET appendonly");
    assert_string_equal(r->element[1]->str, "yes");
    freeReplyObject(r);
    redisFree(c);
    stop_up(pid);

    /* Second run: same data directory, same key. */
    pid = start_up(dir, redis_port, router_port);
    char key2[512];
    read_env_key(dir, key2, sizeof key2, base, sizeof base);
    assert_string_equal(key, key2);
    stop_up(pid);

    char cmd[1100];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

/* ---- supervision ------------------------------------------------------------------- */

/* A child of parent whose command name is comm (from /proc), other than not_pid; -1 if none. */
static pid_t child_of(pid_t parent, const char *comm, pid_t not_pid)
{
    DIR *d = opendir("/proc");
    assert_non_null(d);
    pid_t found = -1;
    struct dirent *de;
    while (found < 0 && (de = readdir(d))) {
        char *end;
        long pid = strtol(de->d_name, &end, 10);
        if (*end || pid <= 0 || pid == not_pid)
            continue;
        char path[64], buf[512];
        snprintf(path, sizeof path, "/proc/%ld/stat", pid);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = '\0';
        char *open_p = strchr(buf, '('), *close_p = strrchr(buf, ')');
        if (!open_p || !close_p)
            continue;
        *close_p = '\0';
        char state_c;
        int ppid;
        if (sscanf(close_p + 2, "%c %d", &state_c, &ppid) == 2 && ppid == parent &&
            strcmp(open_p + 1, comm) == 0 && state_c != 'Z')
            found = (pid_t)pid;
    }
    closedir(d);
    return found;
}

/* Waits up to timeout_ms for child_of(parent, comm, not_pid); fails the test if none. */
static pid_t wait_child(pid_t parent, const char *comm, pid_t not_pid, int timeout_ms)
{
    for (int waited = 0; waited < timeout_ms; waited += 50) {
        pid_t p = child_of(parent, comm, not_pid);
        if (p > 0)
            return p;
        pw_test_sleep_ms(50);
    }
    fail_msg("no %s child of %d (other than %d) after %d ms", comm, (int)parent, (int)not_pid,
             timeout_ms);
    return -1;
}

/* Connects to the Redis on port, retrying up to timeout_ms (it may be restarting). */
static redisContext *redis_wait(int port, int timeout_ms)
{
    for (int waited = 0; waited < timeout_ms; waited += 100) {
        redisContext *c = redisConnect("127.0.0.1", port);
        if (c && !c->err) {
            redisReply *r = redisCommand(c, "PING");
            bool ok = r && r->type == REDIS_REPLY_STATUS;
            freeReplyObject(r);
            if (ok)
                return c;
        }
        redisFree(c);
        pw_test_sleep_ms(100);
    }
    fail_msg("redis on port %d does not answer", port);
    return NULL;
}

/* The HTTP status of GET path on the router, -1 when it does not answer. */
static int http_get_status(int port, const char *path, const char *key)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int status = -1;
    char req[1024], resp[256];
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0)
        goto out;
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
                     "Connection: close\r\n\r\n",
                     path, key);
    if (write(fd, req, (size_t)n) != n)
        goto out;
    ssize_t got = read(fd, resp, sizeof resp - 1);
    if (got <= 0)
        goto out;
    resp[got] = '\0';
    if (sscanf(resp, "HTTP/1.%*d %d", &status) != 1)
        status = -1;
out:
    close(fd);
    return status;
}

static int wait_http_200(int port, const char *path, const char *key, int timeout_ms)
{
    int st = -1;
    for (int waited = 0; waited < timeout_ms && st != 200; waited += 100) {
        st = http_get_status(port, path, key);
        if (st != 200)
            pw_test_sleep_ms(100);
    }
    return st;
}

static bool file_contains(const char *path, const char *needle)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return false;
    static char buf[1 << 20];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    return strstr(buf, needle) != NULL;
}

static void test_up_restarts_killed_redis_with_its_data(void **state)
{
    (void)state;
    if (access("/usr/bin/redis-server", X_OK) != 0)
        skip();
    char dir[] = "/tmp/pw-up-test-XXXXXX", log[64];
    assert_non_null(mkdtemp(dir));
    snprintf(log, sizeof log, "%s.log", dir);
    int redis_port = pw_test_free_port(), router_port = pw_test_free_port();
    pid_t up = start_up_with(dir, redis_port, router_port, false, log);

    redisContext *c = redis_wait(redis_port, 5000);
    redisReply *r = redisCommand(c, "SET pw:test:marker kept");
    freeReplyObject(r);
    redisFree(c);
    pid_t redis = wait_child(up, "redis-server", -1, 5000);
    assert_int_equal(kill(redis, SIGKILL), 0);

    /* A new redis-server, under the same up, with what the AOF held. */
    wait_child(up, "redis-server", redis, 5000);
    c = redis_wait(redis_port, 10000);
    r = redisCommand(c, "GET pw:test:marker");
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    assert_string_equal(r->str, "kept");
    freeReplyObject(r);
    r = redisCommand(c, "HEXISTS pw:functions smollm2-135m");
    assert_int_equal(r->integer, 1);
    freeReplyObject(r);
    redisFree(c);
    assert_int_equal(waitpid(up, NULL, WNOHANG), 0); /* up is still running */
    stop_up(up);
    assert_true(file_contains(log, "event=child_restarted name=redis"));

    char cmd[1100];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s'", dir, log);
    assert_int_equal(system(cmd), 0);
}

static void test_up_restarts_killed_router(void **state)
{
    (void)state;
    if (access("/usr/bin/redis-server", X_OK) != 0 ||
        access(PW_BINARY_DIR "/router/parkway-router", X_OK) != 0 ||
        access(PW_BINARY_DIR "/scaler/parkway-scaler", X_OK) != 0)
        skip();
    char dir[] = "/tmp/pw-up-test-XXXXXX", log[64];
    assert_non_null(mkdtemp(dir));
    snprintf(log, sizeof log, "%s.log", dir);
    int redis_port = pw_test_free_port(), router_port = pw_test_free_port();
    /* The whole stack; no request for a model is made, so the scaler starts no engine. */
    pid_t up = start_up_with(dir, redis_port, router_port, true, log);
    char key[512], base[512];
    read_env_key(dir, key, sizeof key, base, sizeof base);
    assert_int_equal(wait_http_200(router_port, "/v1/models", key, 10000), 200);

    pid_t router = wait_child(up, "parkway-router", -1, 5000);
    assert_int_equal(kill(router, SIGKILL), 0);
    wait_child(up, "parkway-router", router, 5000);
    assert_int_equal(wait_http_200(router_port, "/v1/models", key, 10000), 200);
    assert_int_equal(waitpid(up, NULL, WNOHANG), 0);
    stop_up(up);
    assert_true(file_contains(log, "event=child_restarted name=router"));

    char cmd[1100];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s'", dir, log);
    assert_int_equal(system(cmd), 0);
}

static void test_up_crash_loop_stops_the_stack(void **state)
{
    (void)state;
    if (access("/usr/bin/redis-server", X_OK) != 0)
        skip();
    char dir[] = "/tmp/pw-up-test-XXXXXX", log[64];
    assert_non_null(mkdtemp(dir));
    snprintf(log, sizeof log, "%s.log", dir);
    int redis_port = pw_test_free_port(), router_port = pw_test_free_port();
    pid_t up = start_up_with(dir, redis_port, router_port, false, log);

    /* Six exits within a minute: five restarts (0.25 + 0.5 + 1 + 2 + 4 s apart), then up
     * gives up, stops the rest and exits 1. */
    pid_t redis = -1;
    for (int i = 0; i < 6; i++) {
        redis = wait_child(up, "redis-server", redis, 15000);
        assert_int_equal(kill(redis, SIGKILL), 0);
    }
    int status = 0;
    pid_t r = 0;
    for (int waited = 0; waited < 20000 && r == 0; waited += 50) {
        r = waitpid(up, &status, WNOHANG);
        if (r == 0)
            pw_test_sleep_ms(50);
    }
    assert_int_equal(r, up);
    up_pid = -1;
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 1);
    assert_true(file_contains(log, "giving up and stopping the stack"));
    assert_true(file_contains(log, "event=crash_loop name=redis"));

    char cmd[1100];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s'", dir, log);
    assert_int_equal(system(cmd), 0);
}

static void test_up_bad_spec_dir_is_exit_2(void **state)
{
    (void)state;
    char out[4096], err[4096];
    char *argv[] = {PARKWAY,       "up",
                    "--functions", PW_TEST_DATA_DIR "/specs/dup",
                    "--state-dir", "/tmp/pw-up-never-created",
                    NULL};
    assert_int_equal(run_capture(argv, out, sizeof out, err, sizeof err), 2);
    assert_non_null(strstr(err, "name"));
    assert_int_not_equal(access("/tmp/pw-up-never-created", F_OK), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fn_validate_good),
        cmocka_unit_test(test_fn_validate_bad_is_exit_2_one_line),
        cmocka_unit_test(test_unknown_command_is_exit_2),
        cmocka_unit_test_teardown(test_up_registers_and_reuses_key, teardown_up),
        cmocka_unit_test_teardown(test_up_restarts_killed_redis_with_its_data, teardown_up),
        cmocka_unit_test_teardown(test_up_restarts_killed_router, teardown_up),
        cmocka_unit_test_teardown(test_up_crash_loop_stops_the_stack, teardown_up),
        cmocka_unit_test(test_up_bad_spec_dir_is_exit_2),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
