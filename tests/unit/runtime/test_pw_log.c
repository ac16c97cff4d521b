/* Unit tests for pw_log: level filter, line shape, sink, quoting, truncation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include "pw_log.h"

struct capture {
    int count;
    enum pw_log_level level;
    char line[PW_LOG_LINE_MAX + 1];
    size_t len;
};

static void capture_sink(void *ud, enum pw_log_level level, const char *line, size_t len)
{
    struct capture *c = ud;
    c->count++;
    c->level = level;
    memcpy(c->line, line, len + 1);
    c->len = len;
}

static int setup(void **state)
{
    struct capture *c = calloc(1, sizeof *c);
    pw_log_set_sink(capture_sink, c);
    pw_log_set_level(PW_LOG_LEVEL_INFO);
    *state = c;
    return 0;
}

static int teardown(void **state)
{
    pw_log_set_sink(NULL, NULL);
    free(*state);
    return 0;
}

static void test_line_shape(void **state)
{
    struct capture *c = *state;
    PW_LOG_WARN("event=connect host=%s port=%d", "127.0.0.1", 6379);
    assert_int_equal(c->count, 1);
    assert_int_equal(c->level, PW_LOG_LEVEL_WARN);
    assert_memory_equal(c->line, "ts=", 3);
    assert_non_null(strstr(c->line, " level=warn src=test_pw_log.c:"));
    assert_non_null(strstr(c->line, " event=connect host=127.0.0.1 port=6379"));
    assert_int_equal(strlen(c->line), c->len);
    assert_null(strchr(c->line, '\n'));
}

static void test_level_filter(void **state)
{
    struct capture *c = *state;
    PW_LOG_DEBUG("event=hidden");
    assert_int_equal(c->count, 0);
    pw_log_set_level(PW_LOG_LEVEL_DEBUG);
    PW_LOG_DEBUG("event=shown");
    assert_int_equal(c->count, 1);
    pw_log_set_level(PW_LOG_LEVEL_OFF);
    PW_LOG_ERROR("event=off");
    assert_int_equal(c->count, 1);
}

static void test_level_parse(void **state)
{
    (void)state;
    enum pw_log_level l;
    assert_true(pw_log_level_parse("DEBUG", &l));
    assert_int_equal(l, PW_LOG_LEVEL_DEBUG);
    assert_true(pw_log_level_parse("warning", &l));
    assert_int_equal(l, PW_LOG_LEVEL_WARN);
    assert_false(pw_log_level_parse("loud", &l));
    assert_false(pw_log_level_parse(NULL, &l));
}

static void test_newline_in_field_stays_one_line(void **state)
{
    struct capture *c = *state;
    PW_LOG_INFO("event=x msg=%s", "a\nb");
    assert_null(strchr(c->line, '\n'));
}

static void test_truncation(void **state)
{
    struct capture *c = *state;
    char big[PW_LOG_LINE_MAX * 2];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    PW_LOG_INFO("event=big v=%s", big);
    assert_int_equal(c->len, PW_LOG_LINE_MAX - 1);
    assert_string_equal(c->line + c->len - 3, "...");
}

static void test_quote(void **state)
{
    (void)state;
    char buf[64];
    assert_string_equal(pw_log_quote(buf, sizeof buf, "plain-value_1.2"), "plain-value_1.2");
    assert_string_equal(pw_log_quote(buf, sizeof buf, "two words"), "\"two words\"");
    assert_string_equal(pw_log_quote(buf, sizeof buf, "a\"b\\c\n"), "\"a\\\"b\\\\c\\n\"");
    assert_string_equal(pw_log_quote(buf, sizeof buf, ""), "\"\"");
    assert_string_equal(pw_log_quote(buf, sizeof buf, "\x01"), "\"\\x01\"");
    char small[12];
    assert_string_equal(pw_log_quote(small, sizeof small, "hello world again"), "\"hello ...\"");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_line_shape, setup, teardown),
        cmocka_unit_test_setup_teardown(test_level_filter, setup, teardown),
        cmocka_unit_test(test_level_parse),
        cmocka_unit_test_setup_teardown(test_newline_in_field_stays_one_line, setup, teardown),
        cmocka_unit_test_setup_teardown(test_truncation, setup, teardown),
        cmocka_unit_test(test_quote),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
