/* pw_err: names and descriptions generated from PW_ERR_LIST. */
#include "pw_err.h"

#include <stdio.h>
#include <stdlib.h>

static const char *const err_names[] = {
#define PW_ERR_NAME(code, name, desc) [code] = name,
    PW_ERR_LIST(PW_ERR_NAME)
#undef PW_ERR_NAME
};

static const char *const err_descs[] = {
#define PW_ERR_DESC(code, name, desc) [code] = desc,
    PW_ERR_LIST(PW_ERR_DESC)
#undef PW_ERR_DESC
};

const char *pw_err_name(enum pw_err err)
{
    if ((unsigned)err >= PW_ERR_COUNT_)
        return "unknown";
    return err_names[err];
}

const char *pw_err_desc(enum pw_err err)
{
    if ((unsigned)err >= PW_ERR_COUNT_)
        return "unknown error";
    return err_descs[err];
}

int pw_err_exit_code(enum pw_err err)
{
    switch (err) {
    case PW_OK:
        return 0;
    case PW_ERR_PARSE:
    case PW_ERR_INVAL:
    case PW_ERR_RANGE:
    case PW_ERR_TOOBIG:
    case PW_ERR_CONFIG:
    case PW_ERR_UNSUPPORTED:
        return 2;
    default:
        return 1;
    }
}

void pw_assert_fail(const char *expr, const char *file, int line)
{
    fprintf(stderr, "assertion failed: %s at %s:%d\n", expr, file, line);
    fflush(stderr);
    abort();
}
