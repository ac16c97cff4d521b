/*
 * parkway simulate: replay a request trace against the scaler policy with simulated
 * providers, or generate a synthetic trace (scaler/scaler_sim.h). Runs in one thread, no
 * network, no Redis.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "pw_spec.h"
#include "scaler_offers.h"
#include "scaler_sim.h"

#ifndef PW_SOURCE_DIR
#define PW_SOURCE_DIR "."
#endif

static void usage(FILE *f)
{
    fprintf(f, "usage: parkway simulate --spec FILE --trace FILE [--offers FILE|DIR]\n"
               "                        [--max-price USD] [--tokens-per-s N]\n"
               "                        [--latency-penalty MICROUSD_PER_S] [--json]\n"
               "       parkway simulate --generate diurnal|bursty|periodic|sparse [--seed N]\n"
               "                        [--hours H]   (writes a CSV trace to stdout)\n"
               "Compares always-on, fixed idle timeouts (60 s, 300 s) and parkway's policy:\n"
               "cost, cold starts, queue-wait percentiles; then the same as one JSON line.\n");
}

static bool parse_u64(const char *s, uint64_t *out)
{
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || !end || *end || end == s || s[0] == '-')
        return false;
    *out = v;
    return true;
}

int parkway_cmd_simulate(int argc, char **argv)
{
    const char *spec_path = NULL, *trace_path = NULL, *offers_path = NULL, *gen = NULL;
    const char *max_price = NULL;
    uint64_t seed = 1, hours = 24, tps = 0, penalty = 0;
    bool json_only = false;
    int rc = 2;
    char err[512] = "";
    struct pw_spec *spec = NULL;
    struct scaler_trace trace = {0};
    struct scaler_offer_catalog cat = {0};
    struct scaler_sim_config *cfg = NULL;
    struct scaler_sim_report *rep = NULL;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        bool ok = true;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--json") == 0) {
            json_only = true;
            continue;
        } else if (!v) {
            ok = false;
        } else if (strcmp(a, "--spec") == 0) {
            spec_path = v;
        } else if (strcmp(a, "--trace") == 0) {
            trace_path = v;
        } else if (strcmp(a, "--offers") == 0) {
            offers_path = v;
        } else if (strcmp(a, "--max-price") == 0) {
            max_price = v;
        } else if (strcmp(a, "--generate") == 0) {
            gen = v;
        } else if (strcmp(a, "--seed") == 0) {
            ok = parse_u64(v, &seed);
        } else if (strcmp(a, "--hours") == 0) {
            ok = parse_u64(v, &hours) && hours > 0 && hours <= 24 * 365;
        } else if (strcmp(a, "--latency-penalty") == 0) {
            ok = parse_u64(v, &penalty) && penalty > 0 && penalty <= 1000000000;
        } else if (strcmp(a, "--tokens-per-s") == 0) {
            ok = parse_u64(v, &tps) && tps > 0 && tps <= 1000000;
        } else {
            ok = false;
        }
        if (!ok) {
            fprintf(stderr, "parkway simulate: bad or incomplete option '%s'\n", a);
            usage(stderr);
            return 2;
        }
        i++;
    }

    if (gen) {
        enum scaler_trace_shape shape;
        if (!scaler_trace_shape_parse(gen, &shape)) {
            fprintf(stderr, "parkway simulate: unknown trace shape '%s'\n", gen);
            return 2;
        }
        enum pw_err e = scaler_trace_generate(shape, seed, (int64_t)hours * 3600 * 1000, &trace);
        if (!e)
            e = scaler_trace_write_csv(&trace, stdout);
        scaler_trace_deinit(&trace);
        if (e) {
            fprintf(stderr, "parkway simulate: %s\n", pw_err_desc(e));
            return pw_err_exit_code(e);
        }
        return 0;
    }
    if (!spec_path || !trace_path) {
        usage(stderr);
        return 2;
    }

    enum pw_err e = pw_spec_load_file(spec_path, &spec, err, sizeof err);
    if (e) {
        fprintf(stderr, "%s\n", err);
        rc = pw_err_exit_code(e);
        goto out;
    }
    e = scaler_trace_load_file(trace_path, &trace, err, sizeof err);
    if (e) {
        fprintf(stderr, "%s\n", err);
        rc = pw_err_exit_code(e);
        goto out;
    }
    if (!offers_path)
        offers_path = PW_SOURCE_DIR "/deploy/offers/example-cloud.yaml";
    struct stat stb;
    if (stat(offers_path, &stb) == 0 && S_ISDIR(stb.st_mode))
        e = scaler_offers_load_dir(offers_path, &cat, err, sizeof err);
    else
        e = scaler_offers_load_file(offers_path, &cat, err, sizeof err);
    if (e) {
        fprintf(stderr, "%s\n", err);
        rc = pw_err_exit_code(e);
        goto out;
    }
    cfg = calloc(1, sizeof *cfg);
    rep = calloc(1, sizeof *rep);
    if (!cfg || !rep) {
        fprintf(stderr, "parkway simulate: out of memory\n");
        rc = 1;
        goto out;
    }
    cfg->offers = cat.offers;
    cfg->n_offers = cat.count;
    cfg->decode_tokens_per_s = tps ? (double)tps : 0;
    cfg->prefill_tokens_per_s = tps ? (double)tps * 10 : 0;
    scaler_sim_default_policies(cfg, spec);

    /* Price cap: --max-price, else the spec's; a spec that allows only free machines is
     * simulated without a cap against a priced catalog (said on stderr). */
    uint64_t cap = spec->pricing.max_microusd_per_hour;
    if (max_price) {
        char tmp[64];
        snprintf(tmp, sizeof tmp, "%s", max_price);
        char *dot = strchr(tmp, '.');
        uint64_t whole = 0, frac = 0;
        size_t nf = dot ? strlen(dot + 1) : 0;
        if (dot)
            *dot = '\0';
        if (!parse_u64(tmp, &whole) || nf > 6 || (dot && (nf == 0 || !parse_u64(dot + 1, &frac)))) {
            fprintf(stderr, "parkway simulate: --max-price: not a decimal USD amount\n");
            goto out;
        }
        for (size_t k = nf; k < 6; k++)
            frac *= 10;
        cap = whole * 1000000 + frac;
    } else if (cap == 0) {
        struct scaler_offer_choice ch;
        if (scaler_offer_select(cat.offers, cat.count, &cfg->policies[0].spec.req, false, &ch) !=
            PW_OK) {
            fprintf(stderr,
                    "note: %s allows only free machines (max_price_per_hour: 0); simulating "
                    "without a price cap against %s\n",
                    spec_path, offers_path);
            cap = UINT64_MAX;
        }
    }
    for (size_t i = 0; i < cfg->n_policies; i++) {
        cfg->policies[i].spec.req.max_microusd_per_hour = cap;
        if (penalty)
            cfg->policies[i].spec.latency_penalty_microusd_per_s = penalty;
    }

    e = scaler_sim_run(&trace, cfg, rep);
    if (e) {
        fprintf(stderr, "parkway simulate: %s\n", pw_err_desc(e));
        rc = pw_err_exit_code(e);
        goto out;
    }
    if (!json_only) {
        printf("trace=%s requests=%zu spec=%s offers=%s\n", trace_path, trace.count, spec->name,
               offers_path);
        scaler_sim_report_print_table(rep, stdout);
    }
    scaler_sim_report_print_json(rep, stdout);
    rc = 0;
out:
    free(rep);
    free(cfg);
    scaler_offer_catalog_deinit(&cat);
    scaler_trace_deinit(&trace);
    pw_spec_destroy(spec);
    return rc;
}
