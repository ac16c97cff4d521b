/* Unit tests for pw_cli: strict unsigned parsing and host-pid identities. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "pw_cli.h"
#include "pw_keyspace.h"

static void test_parse_uint(void **state)
{
    (void)state;
    unsigned long long v = 7;
    assert_true(pw_cli_parse_uint("0", 10, &v));
    assert_int_equal(v, 0);
    assert_true(pw_cli_parse_uint("65535", 65535, &v));
    assert_int_equal(v, 65535);
    static const char *const bad[] = {
        "", "-1", "+1", " 1", "1 ", "12x", "65536", "0x10", "99999999999999999999999"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        v = 7;
        assert_false(pw_cli_parse_uint(bad[i], 65535, &v));
        assert_int_equal(v, 7); /* untouched on failure */
    }
    assert_false(pw_cli_parse_uint(NULL, 1, &v));
}

static void test_host_pid_id_is_a_key_name(void **state)
{
    (void)state;
    char id[PW_KEY_NAME_MAX + 1];
    pw_cli_host_pid_id(id, sizeof id, "x");
    assert_true(pw_key_name_ok(id));
    char pid[16];
    snprintf(pid, sizeof pid, "-%d", (int)getpid());
    assert_string_equal(id + strlen(id) - strlen(pid), pid);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_uint),
        cmocka_unit_test(test_host_pid_id_is_a_key_name),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
