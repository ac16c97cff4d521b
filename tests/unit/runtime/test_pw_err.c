/* Unit tests for pw_err: names come from the one list, exit codes follow the convention. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "pw_err.h"

static void test_names_unique_and_nonempty(void **state)
{
    (void)state;
    for (int i = 0; i < PW_ERR_COUNT_; i++) {
        const char *a = pw_err_name((enum pw_err)i);
        assert_non_null(a);
        assert_true(strlen(a) > 0);
        assert_true(strlen(pw_err_desc((enum pw_err)i)) > 0);
        for (int j = i + 1; j < PW_ERR_COUNT_; j++)
            assert_string_not_equal(a, pw_err_name((enum pw_err)j));
    }
    assert_string_equal(pw_err_name(PW_OK), "ok");
    assert_string_equal(pw_err_name(PW_ERR_NOMEM), "nomem");
}

static void test_out_of_range_is_unknown(void **state)
{
    (void)state;
    assert_string_equal(pw_err_name((enum pw_err)PW_ERR_COUNT_), "unknown");
    assert_string_equal(pw_err_name((enum pw_err) - 1), "unknown");
    assert_string_equal(pw_err_desc((enum pw_err)9999), "unknown error");
}

static void test_exit_codes(void **state)
{
    (void)state;
    assert_int_equal(pw_err_exit_code(PW_OK), 0);
    assert_int_equal(pw_err_exit_code(PW_ERR_CONFIG), 2);
    assert_int_equal(pw_err_exit_code(PW_ERR_PARSE), 2);
    assert_int_equal(pw_err_exit_code(PW_ERR_RANGE), 2);
    assert_int_equal(pw_err_exit_code(PW_ERR_IO), 1);
    assert_int_equal(pw_err_exit_code(PW_ERR_REDIS), 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_names_unique_and_nonempty),
        cmocka_unit_test(test_out_of_range_is_unknown),
        cmocka_unit_test(test_exit_codes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
