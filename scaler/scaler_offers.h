/*
 * scaler_offers: machine offers and offer selection.
 *
 * An offer is one kind of machine a provider can start (an instance type): its GPU, CPUs,
 * memory, prices (on-demand, spot, parked) and how long it takes to become ready. Catalogs
 * of offers are YAML files (deploy/offers/NAME.yaml, used by the exec provider; the local
 * provider builds its one offer in code). The catalog format is documented in
 * docs/internals/scaler-policy.md.
 *
 * Catalog files are untrusted input; the reader is strict in the same way as the spec
 * parser (runtime/pw_spec.h): unknown or duplicate keys, wrong types, anchors, aliases,
 * tags, more than one document and out-of-range values are errors, reported as one line
 *     deploy/offers/x.yaml:12:18: offers[2].price_per_hour: not a decimal with at most 6 places
 * Files are capped at SCALER_OFFERS_MAX_BYTES and SCALER_OFFERS_MAX offers.
 *
 * Prices are integers in micro-USD per hour (1 USD = 1000000). Everything here is pure and
 * reentrant; no global state.
 */
#ifndef SCALER_OFFERS_H
#define SCALER_OFFERS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pw_err.h"
#include "pw_spec.h"

/* Longest provider, instance type or GPU model name (bytes, without the NUL). */
#define SCALER_OFFER_NAME_MAX 63
/* Largest catalog file accepted, bytes. */
#define SCALER_OFFERS_MAX_BYTES (1024 * 1024)
/* Most offers in one catalog (and in one loaded directory). */
#define SCALER_OFFERS_MAX 1024

struct scaler_offer {
    char provider[SCALER_OFFER_NAME_MAX + 1];      /* "local", "example-cloud", ... */
    char instance_type[SCALER_OFFER_NAME_MAX + 1]; /* "g5.xlarge", "local-cpu" */
    char gpu_model[SCALER_OFFER_NAME_MAX + 1];     /* "a10g", "h100"; "" = no GPU */
    uint32_t gpu_count;                            /* GPUs per machine; 0 = CPU only */
    uint64_t gpu_memory_bytes;                     /* memory of ONE GPU, bytes */
    uint32_t cpu_millicores;                       /* 1000 = one core */
    uint64_t memory_bytes;                         /* host memory, bytes */
    uint64_t price_microusd_per_hour;              /* on-demand, while running */
    uint64_t spot_price_microusd_per_hour; /* spot, while running; valid if spot_available */
    bool spot_available;                   /* the provider sells this type as spot */
    uint64_t parked_microusd_per_hour;     /* while parked (disk, reserved memory...) */
    uint32_t provision_ms;                 /* expected: fresh start to engine ready */
    uint32_t unpark_ms;                    /* expected: parked to engine ready */
};

/* Offers loaded from one or more catalog files. Caller-owned; zero it, release with _deinit. */
struct scaler_offer_catalog {
    struct scaler_offer *offers; /* owned array */
    size_t count;
};

/*
 * Parses a catalog from text[0..len) and APPENDS its offers to cat (which must be zeroed
 * or hold earlier offers). origin names the file in messages (NULL: "<offers>"). On error
 * cat is unchanged and errbuf holds the one-line message. Returns PW_OK, PW_ERR_CONFIG
 * (bad content, over the caps) or PW_ERR_NOMEM.
 */
enum pw_err scaler_offers_parse(const char *text, size_t len, const char *origin,
                                struct scaler_offer_catalog *cat, char *errbuf, size_t errcap);

/* Reads one catalog file and appends it to cat. Adds PW_ERR_IO (cannot read). */
enum pw_err scaler_offers_load_file(const char *path, struct scaler_offer_catalog *cat,
                                    char *errbuf, size_t errcap);

/*
 * Appends every *.yaml / *.yml file of dir (not hidden), in file-name order. On error cat
 * is left as it was before the call. A missing directory is PW_ERR_IO.
 */
enum pw_err scaler_offers_load_dir(const char *dir, struct scaler_offer_catalog *cat, char *errbuf,
                                   size_t errcap);

/* Appends one offer (copied). PW_ERR_TOOBIG over SCALER_OFFERS_MAX, or PW_ERR_NOMEM. */
enum pw_err scaler_offers_add(struct scaler_offer_catalog *cat, const struct scaler_offer *offer);

/* Frees the offers and zeroes cat. */
void scaler_offer_catalog_deinit(struct scaler_offer_catalog *cat);

/* What one replica of a function needs and may cost: the spec's resources and pricing. */
struct scaler_offer_req {
    enum pw_spec_gpu gpu;           /* none, any, or the model in gpu_model */
    const char *gpu_model;          /* borrowed; used when gpu == PW_SPEC_GPU_MODEL */
    uint64_t gpu_memory_bytes;      /* minimum memory of one GPU; 0 = any */
    uint32_t cpu_millicores;        /* minimum */
    uint64_t memory_bytes;          /* minimum host memory */
    uint64_t max_microusd_per_hour; /* running price cap; 0 = free machines only */
    enum pw_spec_spot spot;         /* spot policy */
};

/* Fills req from a spec (borrows spec->resources.gpu_model for the spec's lifetime). */
void scaler_offer_req_from_spec(struct scaler_offer_req *req, const struct pw_spec *spec);

/* Result of scaler_offer_select. */
struct scaler_offer_choice {
    size_t index;                     /* into the offers array; valid on PW_OK */
    bool spot;                        /* buy it as spot */
    uint64_t price_microusd_per_hour; /* running price as bought (spot or on-demand) */
    char reason[256];                 /* why chosen, or why nothing fits (one line) */
};

/*
 * Chooses the cheapest (offer, purchase mode) that fits req: GPU (none: any machine; any:
 * at least one GPU; model: that GPU model, case-insensitive), GPU memory per GPU, cpu and
 * memory at least as asked, running price <= req->max_microusd_per_hour. Spot policy:
 * on-demand = on-demand prices only; spot = spot prices only (offers without spot are
 * skipped); auto = both, the cheaper wins (spot on a tie). Ties on price are broken by the
 * shorter provision_ms, then by catalog order.
 *
 * batch = true means the work is deferrable: only spot purchases and free (price 0)
 * machines are considered, whatever the spot policy says, except that a spec saying
 * `on-demand` gets free machines only. The policy retries with batch = false once batch
 * work has waited SCALER_BATCH_DEFER_MS (see scaler_policy.h).
 *
 * Returns PW_OK with *out filled, PW_ERR_NOTFOUND with out->reason saying what ruled the
 * offers out (e.g. "no offer fits: 3 too small, 2 over max price 0.5/h, 1 no spot"), or
 * PW_ERR_INVAL for NULL arguments.
 */
enum pw_err scaler_offer_select(const struct scaler_offer *offers, size_t n,
                                const struct scaler_offer_req *req, bool batch,
                                struct scaler_offer_choice *out);

/* Formats micro-USD as a decimal USD string ("1.006", "0", "0.000125") into buf. */
const char *scaler_format_usd(char *buf, size_t cap, uint64_t microusd);

#endif
