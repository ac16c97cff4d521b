/*
 * Integration tests of the `parkway` CLI as a real process: `fn validate` exit codes and
 * one-line errors, and `parkway up` starting its own redis-server, registering the specs,
 * storing only the key's hash, writing <state>/env, reusing the key on a second run and
 * stopping cleanly on SIGTERM.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
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

/* Starts `parkway up`; waits until it prints that it is up (its last start-up step). */
static pid_t start_up(const char *state_dir, int redis_port, int router_port)
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
        int null = open("/dev/null", O_WRONLY);
        dup2(null, 2);
        /* The router and scaler are not part of this test: it checks up's own steps. */
        char *argv[] = {PARKWAY,
                        "up",
                        "--redis-only",
                        "--state-dir",
                        (char *)state_dir,
                        "--functions",
                        PW_SOURCE_DIR "/functions",
                        "--redis-port",
                        rp,
                        "--port",
                        hp,
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
        cmocka_unit_test(test_up_bad_spec_dir_is_exit_2),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
