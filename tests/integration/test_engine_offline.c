/*
 * Integration tests of parkway-engine in offline mode as a real process: generated text on
 * stdout, one timing line on stderr (load_ms= prompt_tok_s= gen_tok_s=), deterministic
 * output for a seed, and exit code 2 with one error line for bad input (missing or corrupt
 * model, bad flag values, a prompt longer than the context).
 *
 * The child runs with PARKWAY_LOG_LEVEL=warn so stderr holds only what the mode itself
 * prints.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "gguf_gen.h"
#include "kernel.h"

#define ENGINE PW_BINARY_DIR "/engine/parkway-engine"
#define CAP 65536

static char dir[64];
static char model_path[128];
static char corrupt_path[128];

struct proc_out {
    int code;
    char out[CAP];
    char err[CAP];
};

static void read_all(const char *path, char *buf)
{
    FILE *f = fopen(path, "r");
    size_t n = 0;
    if (f) {
        n = fread(buf, 1, CAP - 1, f);
        fclose(f);
    }
    buf[n] = '\0';
}

/* Runs the engine with argv (NULL-terminated, without argv[0]); output into files first,
 * so a chatty child can never block on a full pipe. */
static void run_engine(const char *const *args, struct proc_out *po)
{
    char out_path[128], err_path[128];
    snprintf(out_path, sizeof out_path, "%s/stdout", dir);
    snprintf(err_path, sizeof err_path, "%s/stderr", dir);
    const char *argv[32];
    int argc = 0;
    argv[argc++] = ENGINE;
    for (; *args && argc < 31; args++)
        argv[argc++] = *args;
    argv[argc] = NULL;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        int fo = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int fe = open(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fo < 0 || fe < 0)
            _exit(126);
        dup2(fo, 1);
        dup2(fe, 2);
        setenv("PARKWAY_LOG_LEVEL", "warn", 1);
        execv(ENGINE, (char *const *)argv);
        _exit(127);
    }
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    po->code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    read_all(out_path, po->out);
    read_all(err_path, po->err);
}

static size_t count_lines(const char *s)
{
    size_t n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

/* Exit 2, nothing on stdout, exactly one line on stderr that contains want. */
static void expect_one_line_error(const char *const *args, const char *want)
{
    static struct proc_out po;
    run_engine(args, &po);
    if (po.code != 2 || count_lines(po.err) != 1 || !strstr(po.err, want))
        fail_msg("exit %d, stderr '%s' (want exit 2 and one line with '%s')", po.code, po.err,
                 want);
    assert_string_equal(po.out, "");
}

static int setup(void **state)
{
    (void)state;
    snprintf(dir, sizeof dir, "/tmp/pw_test_offline_XXXXXX");
    if (!mkdtemp(dir))
        return -1;
    snprintf(model_path, sizeof model_path, "%s/tiny.gguf", dir);
    snprintf(corrupt_path, sizeof corrupt_path, "%s/corrupt.gguf", dir);
    struct gguf_gen_opts o;
    gguf_gen_preset("tiny", &o);
    o.type = KERNEL_DTYPE_Q8_0;
    o.seed = 5;
    FILE *f = fopen(model_path, "wb");
    char err[256];
    if (!f || gguf_gen_write(&o, f, err, sizeof err) != PW_OK || fclose(f) != 0)
        return -1;
    /* the same file cut in the middle of its tensor data */
    struct stat sb;
    if (stat(model_path, &sb) != 0)
        return -1;
    FILE *in = fopen(model_path, "rb"), *out = fopen(corrupt_path, "wb");
    if (!in || !out)
        return -1;
    size_t keep = (size_t)sb.st_size * 2 / 3;
    char *buf = malloc(keep);
    if (!buf || fread(buf, 1, keep, in) != keep || fwrite(buf, 1, keep, out) != keep)
        return -1;
    free(buf);
    fclose(in);
    return fclose(out) == 0 ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

static const char *timing_line(const char *err)
{
    const char *t = strstr(err, "load_ms=");
    assert_non_null(t);
    assert_true(t == err || t[-1] == '\n'); /* starts a line */
    return t;
}

static void test_prompt_prints_text_and_timing(void **state)
{
    (void)state;
    static struct proc_out po;
    const char *args[] = {"--model",      model_path, "--prompt",     "The quick brown fox",
                          "--max-tokens", "12",       "--ignore-eos", NULL};
    run_engine(args, &po);
    if (po.code != 0)
        fail_msg("exit %d: %s", po.code, po.err);
    assert_true(strlen(po.out) > 1); /* the text and a final newline */
    assert_int_equal(po.out[strlen(po.out) - 1], '\n');
    const char *t = timing_line(po.err);
    assert_non_null(strstr(t, "prompt_tok_s="));
    assert_non_null(strstr(t, "gen_tok_s="));
    assert_non_null(strstr(t, "gen_tokens=12"));
    assert_non_null(strstr(t, "finish=length"));
    double load_ms = -1;
    assert_int_equal(sscanf(t, "load_ms=%lf", &load_ms), 1);
    assert_true(load_ms >= 0 && load_ms < 60000);
    assert_int_equal(count_lines(po.err), 1); /* only the timing line at log level warn */
}

static void test_same_seed_same_output(void **state)
{
    (void)state;
    static struct proc_out a, b, c;
    const char *args[] = {"--model",      model_path, "--prompt",     "Hello, world!",
                          "--max-tokens", "20",       "--ignore-eos", "--temperature",
                          "0.8",          "--seed",   "42",           NULL};
    run_engine(args, &a);
    run_engine(args, &b);
    assert_int_equal(a.code, 0);
    assert_int_equal(b.code, 0);
    assert_string_equal(a.out, b.out);
    const char *greedy[] = {"--model",      model_path, "--prompt",     "Hello, world!",
                            "--max-tokens", "20",       "--ignore-eos", NULL};
    run_engine(greedy, &c);
    assert_int_equal(c.code, 0);
    assert_string_not_equal(a.out, c.out);
}

static void test_chat_flag(void **state)
{
    (void)state;
    static struct proc_out po;
    const char *args[] = {"--model", model_path,     "--prompt", "What is the capital of France?",
                          "--chat",  "--max-tokens", "5",        "--ignore-eos",
                          NULL};
    run_engine(args, &po);
    if (po.code != 0)
        fail_msg("exit %d: %s", po.code, po.err);
    const char *t = timing_line(po.err);
    /* the ChatML wrapping makes the prompt longer than the raw text's tokens */
    unsigned n_prompt = 0;
    const char *p = strstr(t, "prompt_tokens=");
    assert_non_null(p);
    assert_int_equal(sscanf(p, "prompt_tokens=%u", &n_prompt), 1);
    assert_true(n_prompt > 8);
}

static void test_missing_model_file(void **state)
{
    (void)state;
    char path[160];
    snprintf(path, sizeof path, "%s/no-such-model.gguf", dir);
    const char *args[] = {"--model", path, "--prompt", "hi", NULL};
    expect_one_line_error(args, "no-such-model.gguf");
}

static void test_corrupt_model_file(void **state)
{
    (void)state;
    const char *args[] = {"--model", corrupt_path, "--prompt", "hi", NULL};
    expect_one_line_error(args, "parkway-engine: ");
}

static void test_bad_temperature_value(void **state)
{
    (void)state;
    const char *args[] = {"--model", model_path, "--prompt", "hi", "--temperature", "abc", NULL};
    expect_one_line_error(args, "--temperature");
}

static void test_temperature_out_of_range(void **state)
{
    (void)state;
    const char *args[] = {"--model", model_path, "--prompt", "hi", "--temperature", "7", NULL};
    expect_one_line_error(args, "temperature");
}

static void test_max_batch_zero(void **state)
{
    (void)state;
    const char *args[] = {"--model", model_path, "--prompt", "hi", "--max-batch", "0", NULL};
    expect_one_line_error(args, "--max-batch");
}

static void test_prompt_longer_than_context(void **state)
{
    (void)state;
    const char *args[] = {"--model",
                          model_path,
                          "--ctx",
                          "16",
                          "--prompt",
                          "this prompt is certainly longer than sixteen tokens of a tiny "
                          "vocabulary, byte by byte and word by word",
                          NULL};
    expect_one_line_error(args, "context");
}

int main(void)
{
    if (access(ENGINE, X_OK) != 0) {
        printf("skipped: %s is not built\n", ENGINE);
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_prompt_prints_text_and_timing),
        cmocka_unit_test(test_same_seed_same_output),
        cmocka_unit_test(test_chat_flag),
        cmocka_unit_test(test_missing_model_file),
        cmocka_unit_test(test_corrupt_model_file),
        cmocka_unit_test(test_bad_temperature_value),
        cmocka_unit_test(test_temperature_out_of_range),
        cmocka_unit_test(test_max_batch_zero),
        cmocka_unit_test(test_prompt_longer_than_context),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
