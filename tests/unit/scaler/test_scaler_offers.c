/* Unit tests of scaler_offers: the strict catalog reader and offer selection. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "scaler_offers.h"

#define GIB (1024ULL * 1024 * 1024)

static const char good[] = "provider: acme\n"
                           "offers:\n"
                           "  - instance_type: small\n"
                           "    cpu: 2\n"
                           "    memory: 8GiB\n"
                           "    price_per_hour: 0.1\n"
                           "    provision: 60s\n"
                           "  - instance_type: gpu.x1\n"
                           "    gpu: a10g\n"
                           "    gpu_memory: 24GiB\n"
                           "    cpu: 500m\n"
                           "    memory: 16GiB\n"
                           "    price_per_hour: 1.006\n"
                           "    spot_price_per_hour: 0.301\n"
                           "    parked_price_per_hour: 0.012\n"
                           "    provision: 2m\n"
                           "    unpark: 20s\n";

static void test_parse_good(void **unused)
{
    (void)unused;
    struct scaler_offer_catalog cat = {0};
    char err[256];
    assert_int_equal(scaler_offers_parse(good, strlen(good), "x.yaml", &cat, err, sizeof err),
                     PW_OK);
    assert_int_equal(cat.count, 2);
    const struct scaler_offer *a = &cat.offers[0], *b = &cat.offers[1];
    assert_string_equal(a->provider, "acme");
    assert_string_equal(a->instance_type, "small");
    assert_string_equal(a->gpu_model, "");
    assert_int_equal(a->gpu_count, 0);
    assert_int_equal(a->cpu_millicores, 2000);
    assert_int_equal(a->memory_bytes, 8 * GIB);
    assert_int_equal(a->price_microusd_per_hour, 100000);
    assert_false(a->spot_available);
    assert_int_equal(a->provision_ms, 60000);
    assert_int_equal(a->unpark_ms, 60000); /* default: as slow as a fresh start */
    assert_string_equal(b->gpu_model, "a10g");
    assert_int_equal(b->gpu_count, 1);
    assert_int_equal(b->gpu_memory_bytes, 24 * GIB);
    assert_int_equal(b->cpu_millicores, 500);
    assert_int_equal(b->price_microusd_per_hour, 1006000);
    assert_true(b->spot_available);
    assert_int_equal(b->spot_price_microusd_per_hour, 301000);
    assert_int_equal(b->parked_microusd_per_hour, 12000);
    assert_int_equal(b->provision_ms, 120000);
    assert_int_equal(b->unpark_ms, 20000);
    /* Appends. */
    assert_int_equal(scaler_offers_parse(good, strlen(good), "y.yaml", &cat, err, sizeof err),
                     PW_OK);
    assert_int_equal(cat.count, 4);
    scaler_offer_catalog_deinit(&cat);
    assert_null(cat.offers);
}

struct bad {
    const char *text;
    const char *want; /* exact message */
};

static const struct bad bads[] = {
    {"provider: a\noffers:\n  - instance_type: s\n    cpu: 2\n    memory: 1GiB\n"
     "    price_per_hour: 0.1\n    provision: 1s\n    colour: red\n",
     "b.yaml:8:5: offers[0].colour: unknown key (expected one of: instance_type, gpu, gpu_count, "
     "gpu_memory, cpu, memory, price_per_hour, spot_price_per_hour, parked_price_per_hour, "
     "provision, unpark)"},
    {"provider: a\noffers:\n  - instance_type: s\n    cpu: 2\n    cpu: 3\n",
     "b.yaml:5:5: offers[0].cpu: duplicate key"},
    {"provider: a\noffers:\n  - instance_type: s\n    cpu: 2\n    memory: 1GiB\n"
     "    price_per_hour: 0.1234567\n    provision: 1s\n",
     "b.yaml:6:21: offers[0].price_per_hour: must be USD per hour, a decimal with at most 6 "
     "places, 0..1000000"},
    {"provider: a\noffers:\n  - instance_type: s\n    cpu: 2\n    memory: 1GiB\n"
     "    price_per_hour: \"0.1\"\n    provision: 1s\n",
     "b.yaml:6:21: offers[0].price_per_hour: must be USD per hour, a decimal with at most 6 "
     "places, 0..1000000"},
    {"provider: a\noffers:\n  - instance_type: s\n    cpu: 2\n    memory: 1GiB\n"
     "    provision: 1s\n",
     "b.yaml:3:5: offers[0].price_per_hour: required key is missing"},
    {"provider: a\noffers:\n  - instance_type: s\n    gpu: a10g\n    cpu: 2\n    memory: 1GiB\n"
     "    price_per_hour: 1\n    provision: 1s\n",
     "b.yaml:3:5: offers[0].gpu_memory: required when gpu is set"},
    {"provider: a\noffers:\n  - &x\n    instance_type: s\n",
     "b.yaml:3:5: offers[0]: YAML anchors are not allowed"},
    {"provider: !!str a\noffers: []\n", "b.yaml:1:11: provider: YAML tags are not allowed"},
    {"offers: []\n", "b.yaml:1:1: provider: required key is missing"},
    {"provider: a\noffers: []\n---\nprovider: b\n",
     "b.yaml:3:1: (document): only one YAML document is allowed"},
    {"", "b.yaml:1:1: (document): the catalog is empty"},
    {"provider: a\noffers:\n  - instance_type: s\n    cpu: 2\n    memory: 1GiB\n"
     "    price_per_hour: 1\n    provision: 90\n",
     "b.yaml:7:16: offers[0].provision: must be a duration 0..24h such as 90s"},
    {"provider: a\nofers: []\n",
     "b.yaml:2:1: ofers: unknown key (expected one of: provider, offers)"},
};

static void test_parse_bad(void **unused)
{
    (void)unused;
    for (size_t i = 0; i < sizeof bads / sizeof bads[0]; i++) {
        struct scaler_offer_catalog cat = {0};
        char err[512] = "";
        enum pw_err e = scaler_offers_parse(bads[i].text, strlen(bads[i].text), "b.yaml", &cat, err,
                                            sizeof err);
        if (e != PW_ERR_CONFIG || strcmp(err, bads[i].want) != 0) {
            fprintf(stderr, "case %zu: err=%s\n  got  '%s'\n  want '%s'\n", i, pw_err_name(e), err,
                    bads[i].want);
            fail();
        }
        assert_int_equal(cat.count, 0);
        scaler_offer_catalog_deinit(&cat);
    }
}

static void test_shipped_catalogs(void **unused)
{
    (void)unused;
    struct scaler_offer_catalog cat = {0};
    char err[512] = "";
    enum pw_err e = scaler_offers_load_dir(PW_SOURCE_DIR "/deploy/offers", &cat, err, sizeof err);
    if (e)
        fprintf(stderr, "%s\n", err);
    assert_int_equal(e, PW_OK);
    assert_true(cat.count >= 5);
    bool local = false;
    for (size_t i = 0; i < cat.count; i++)
        local |= strcmp(cat.offers[i].provider, "local") == 0 &&
                 cat.offers[i].price_microusd_per_hour == 0;
    assert_true(local);
    scaler_offer_catalog_deinit(&cat);
    assert_int_equal(scaler_offers_load_file("/nonexistent/x.yaml", &cat, err, sizeof err),
                     PW_ERR_IO);
}

/* ---- selection ---- */

static const struct scaler_offer sel[] = {
    /* 0 */ {.provider = "p",
             .instance_type = "cpu-a",
             .cpu_millicores = 4000,
             .memory_bytes = 16 * GIB,
             .price_microusd_per_hour = 200000,
             .spot_price_microusd_per_hour = 80000,
             .spot_available = true,
             .provision_ms = 60000},
    /* 1 */
    {.provider = "p",
     .instance_type = "cpu-b",
     .cpu_millicores = 2000,
     .memory_bytes = 8 * GIB,
     .price_microusd_per_hour = 100000,
     .provision_ms = 90000},
    /* 2 */
    {.provider = "p",
     .instance_type = "cpu-c",
     .cpu_millicores = 2000,
     .memory_bytes = 8 * GIB,
     .price_microusd_per_hour = 100000,
     .provision_ms = 30000},
    /* 3 */
    {.provider = "p",
     .instance_type = "a10g",
     .gpu_model = "a10g",
     .gpu_count = 1,
     .gpu_memory_bytes = 24 * GIB,
     .cpu_millicores = 8000,
     .memory_bytes = 32 * GIB,
     .price_microusd_per_hour = 1000000,
     .spot_price_microusd_per_hour = 400000,
     .spot_available = true,
     .provision_ms = 120000},
    /* 4 */
    {.provider = "p",
     .instance_type = "a100",
     .gpu_model = "A100-80GB",
     .gpu_count = 1,
     .gpu_memory_bytes = 80 * GIB,
     .cpu_millicores = 12000,
     .memory_bytes = 96 * GIB,
     .price_microusd_per_hour = 3600000,
     .provision_ms = 240000},
};

struct srow {
    const char *name;
    enum pw_spec_gpu gpu;
    const char *gpu_model;
    uint64_t gpu_mem_gib;
    uint32_t cpu;
    uint64_t mem_gib;
    uint64_t max_price;
    enum pw_spec_spot spot;
    bool batch;
    int want; /* index, -1 = none */
    bool want_spot;
    const char *reason; /* substring */
};

static const struct srow srows[] = {
    {"cheapest on-demand, tie broken by time to ready", PW_SPEC_GPU_NONE, NULL, 0, 1000, 4, 1000000,
     PW_SPEC_SPOT_ON_DEMAND, false, 2, false, "offer=p/cpu-c"},
    {"auto takes spot when cheaper", PW_SPEC_GPU_NONE, NULL, 0, 1000, 4, 1000000, PW_SPEC_SPOT_AUTO,
     false, 0, true, "spot=1"},
    {"spot only", PW_SPEC_GPU_NONE, NULL, 0, 1000, 4, 1000000, PW_SPEC_SPOT_SPOT, false, 0, true,
     NULL},
    {"too big for the cpu offers", PW_SPEC_GPU_NONE, NULL, 0, 3000, 12, 1000000,
     PW_SPEC_SPOT_ON_DEMAND, false, 0, false, NULL},
    {"max price rules out", PW_SPEC_GPU_NONE, NULL, 0, 3000, 12, 150000, PW_SPEC_SPOT_ON_DEMAND,
     false, -1, false, "over_max_price=3"},
    {"max price: spot still fits under auto", PW_SPEC_GPU_NONE, NULL, 0, 3000, 12, 150000,
     PW_SPEC_SPOT_AUTO, false, 0, true, NULL},
    {"free only (max 0)", PW_SPEC_GPU_NONE, NULL, 0, 1000, 1, 0, PW_SPEC_SPOT_AUTO, false, -1,
     false, "no offer fits"},
    {"any gpu", PW_SPEC_GPU_ANY, NULL, 16 * 1, 1000, 4, 10000000, PW_SPEC_SPOT_ON_DEMAND, false, 3,
     false, NULL},
    {"gpu memory rules out the a10g", PW_SPEC_GPU_ANY, NULL, 40, 1000, 4, 10000000,
     PW_SPEC_SPOT_AUTO, false, 4, false, NULL},
    {"gpu model, case-insensitive", PW_SPEC_GPU_MODEL, "a100-80gb", 0, 1000, 4, 10000000,
     PW_SPEC_SPOT_AUTO, false, 4, false, NULL},
    {"gpu model absent", PW_SPEC_GPU_MODEL, "h100", 0, 1000, 4, 10000000, PW_SPEC_SPOT_AUTO, false,
     -1, false, "too_small=5"},
    {"spot policy with no spot offer", PW_SPEC_GPU_MODEL, "a100-80gb", 0, 1000, 4, 10000000,
     PW_SPEC_SPOT_SPOT, false, -1, false, "no_spot=1"},
    {"batch: spot only even when on-demand is cheaper to run", PW_SPEC_GPU_NONE, NULL, 0, 1000, 4,
     1000000, PW_SPEC_SPOT_AUTO, true, 0, true, "batch=1"},
    {"batch with an on-demand spec: nothing free", PW_SPEC_GPU_NONE, NULL, 0, 1000, 4, 1000000,
     PW_SPEC_SPOT_ON_DEMAND, true, -1, false, "batch_needs_spot_or_free=4"},
};

static void test_select(void **unused)
{
    (void)unused;
    for (size_t i = 0; i < sizeof srows / sizeof srows[0]; i++) {
        const struct srow *r = &srows[i];
        struct scaler_offer_req req = {.gpu = r->gpu,
                                       .gpu_model = r->gpu_model,
                                       .gpu_memory_bytes = r->gpu_mem_gib * GIB,
                                       .cpu_millicores = r->cpu,
                                       .memory_bytes = r->mem_gib * GIB,
                                       .max_microusd_per_hour = r->max_price,
                                       .spot = r->spot};
        struct scaler_offer_choice ch;
        enum pw_err e = scaler_offer_select(sel, sizeof sel / sizeof sel[0], &req, r->batch, &ch);
        bool ok = r->want < 0
                      ? e == PW_ERR_NOTFOUND
                      : e == PW_OK && ch.index == (size_t)r->want && ch.spot == r->want_spot;
        if (ok && r->reason && !strstr(ch.reason, r->reason))
            ok = false;
        if (!ok) {
            fprintf(stderr, "row '%s': err=%s index=%zu spot=%d reason=%s\n", r->name,
                    pw_err_name(e), ch.index, ch.spot, ch.reason);
            fail();
        }
    }
    /* Free machine beats everything, also for batch. */
    static const struct scaler_offer local = {.provider = "local",
                                              .instance_type = "cpu",
                                              .cpu_millicores = 2000,
                                              .memory_bytes = 4 * GIB,
                                              .provision_ms = 1500,
                                              .unpark_ms = 300};
    struct scaler_offer_req req = {
        .cpu_millicores = 1000, .memory_bytes = GIB, .spot = PW_SPEC_SPOT_ON_DEMAND};
    struct scaler_offer_choice ch;
    assert_int_equal(scaler_offer_select(&local, 1, &req, true, &ch), PW_OK);
    assert_int_equal(ch.price_microusd_per_hour, 0);
    assert_int_equal(scaler_offer_select(NULL, 0, &req, false, &ch), PW_ERR_NOTFOUND);
}

static void test_format_usd(void **unused)
{
    (void)unused;
    char b[32];
    assert_string_equal(scaler_format_usd(b, sizeof b, 0), "0");
    assert_string_equal(scaler_format_usd(b, sizeof b, 1006000), "1.006");
    assert_string_equal(scaler_format_usd(b, sizeof b, 125), "0.000125");
    assert_string_equal(scaler_format_usd(b, sizeof b, 3000000), "3");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_good),       cmocka_unit_test(test_parse_bad),
        cmocka_unit_test(test_shipped_catalogs), cmocka_unit_test(test_select),
        cmocka_unit_test(test_format_usd),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
