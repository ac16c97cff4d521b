/*
 * engine: the parkway-engine process. Read this first.
 *
 * One process serves one function (one model). It runs in one of two modes:
 *   offline  `parkway-engine --model F.gguf --prompt "..."`: generate once, print, exit;
 *   worker   `parkway-engine --spec functions/x.yaml --redis URL`: join the function's
 *            consumer group and serve InferenceRequests until SIGTERM (engine_worker.c).
 *            SIGUSR1 parks it (take nothing new, finish what runs, heartbeat PARKED, sleep
 *            with everything loaded), SIGUSR2 unparks it (reads again at once).
 * Both drive the same scheduler (engine_sched) over the same model and tokenizer.
 *
 * Threads: the main thread owns everything below; the CPU backend has its own compute
 * threads inside each op.
 */
#ifndef ENGINE_H
#define ENGINE_H

#include <stdbool.h>
#include <stdint.h>

#include "engine_sampler.h"
#include "engine_sched.h"
#include "pw_err.h"

struct kernel_backend;
struct engine_model;
struct engine_tokenizer;
struct engine_chat;

/* ---- command line ---- */
struct engine_opts {
    const char *model_path;    /* GGUF file (offline mode, or overrides the spec's model) */
    const char *spec_path;     /* function spec (worker mode) */
    const char *redis_url;     /* worker mode */
    const char *worker_id;     /* default: host-pid */
    uint32_t claim_idle_ms;    /* claim pending entries idle this long (dead worker); 0 = 15 s */
    bool start_parked;         /* worker mode: load, then wait parked until SIGUSR2 */
    const char *chat_template; /* override: chatml, llama2, llama3, mistral, zephyr */
    int threads;               /* compute threads; 0 = one per online CPU */
    bool gpu;                  /* use the CUDA backend when a device is present */
    uint32_t max_batch;        /* sequences decoded together */
    uint32_t max_tok;          /* token rows per step (prefill chunk) */
    uint32_t n_ctx;            /* context length served; 0 = the model's */
    uint32_t n_kv_blocks;      /* KV blocks; 0 = on a GPU what kv_mem_fraction of the free
                                  memory holds, on the CPU max_batch full contexts */
    float kv_mem_fraction;     /* GPU: share of the free memory for the KV cache; 0 = 0.9 */

    /* offline mode */
    const char *prompt;
    bool chat;           /* apply the chat template to --prompt as a user message */
    bool ignore_eos;     /* keep generating past end-of-text (benchmarks) */
    uint32_t max_tokens; /* 0 = until end of text or context */
    struct engine_sampler_params sampling;
};

/* ---- the process ---- */
struct engine {
    struct engine_opts opts;
    struct kernel_backend *be;    /* owned */
    struct engine_model *model;   /* owned; holds the mapped GGUF */
    struct engine_tokenizer *tok; /* owned */
    struct engine_chat *chat;     /* owned; the chat template */
    struct engine_sched *sched;   /* owned */
    uint64_t load_ns;             /* wall time from start to ready, ns */
};

/*
 * Creates backend, model, tokenizer, chat template and scheduler (with cb, whose userdata
 * fields are per sequence). On failure fills err with one line and returns the error;
 * engine_unload() is safe after a partial load.
 */
enum pw_err engine_load(struct engine *e, const struct engine_sched_cb *cb, char *err,
                        size_t errcap);
void engine_unload(struct engine *e);

/* Offline mode: returns the process exit code. */
int engine_offline_run(struct engine *e);

/* Worker mode: returns the process exit code. */
int engine_worker_run(struct engine *e);

#endif
