/*
 * fuzz_spec: libFuzzer target for function specs (pw_spec_parse), the YAML a user hands
 * the CLI and the scaler reads back. Checks the contract of runtime/pw_spec.h beyond "no
 * crash": a failure leaves no spec and exactly one message line that starts with the
 * origin; a success renders to JSON that jansson accepts, the same bytes twice. Short
 * inputs also go through the size and duration value parsers on their own.
 *
 * The replay main() is tests/fuzz/fuzz_replay.c (ctest, label fuzz-smoke).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "pw_spec.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define ORIGIN "fuzz.yaml"

static void check_values(const uint8_t *data, size_t size)
{
    char s[65];
    uint64_t v;
    if (size >= sizeof(s))
        return;
    memcpy(s, data, size);
    s[size] = '\0';
    (void)pw_spec_parse_size(s, &v);
    (void)pw_spec_parse_duration_ms(s, &v);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct pw_spec *spec = (struct pw_spec *)1;
    char err[512];
    memset(err, 'x', sizeof(err));
    /* base_dir set: relative model.path values take the join path. */
    enum pw_err rc =
        pw_spec_parse((const char *)data, size, ORIGIN, "/srv/fns", &spec, err, sizeof(err));
    if (rc == PW_OK) {
        if (!spec || !spec->name || !spec->origin || strcmp(spec->origin, ORIGIN) != 0)
            abort();
        char *a = pw_spec_to_json(spec);
        char *b = pw_spec_to_json(spec);
        if (!a || !b || strcmp(a, b) != 0)
            abort();
        json_error_t je;
        json_t *j = json_loads(a, JSON_REJECT_DUPLICATES, &je);
        if (!j || !json_is_object(j))
            abort();
        json_decref(j);
        free(a);
        free(b);
        pw_spec_destroy(spec);
    } else {
        /* One line, "fuzz.yaml:LINE:COL: ...", NUL-terminated inside the buffer. */
        if (spec != NULL || !memchr(err, '\0', sizeof(err)))
            abort();
        if (strncmp(err, ORIGIN ":", strlen(ORIGIN ":")) != 0 || strchr(err, '\n'))
            abort();
    }
    check_values(data, size);
    return 0;
}
