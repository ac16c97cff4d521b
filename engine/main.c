/*
 * parkway-engine: command line. Parses options into struct engine_opts and runs offline
 * or worker mode (see engine.h). Exit codes: 0 ok, 2 bad input or configuration, 1 other.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "pw_cli.h"
#include "pw_log.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: parkway-engine --model FILE.gguf --prompt TEXT [options]   (offline)\n"
            "       parkway-engine --spec SPEC.yaml --redis URL [options]      (worker)\n"
            "\n"
            "offline:\n"
            "  --prompt TEXT          text to continue (raw; --chat applies the chat template)\n"
            "  --chat                 treat --prompt as a user message\n"
            "  --max-tokens N         tokens to generate (default 128; 0 = to the context)\n"
            "  --temperature T        0 = greedy (default 0)\n"
            "  --top-k N --top-p P --min-p P --seed S\n"
            "  --presence-penalty X --frequency-penalty X --repetition-penalty X\n"
            "  --ignore-eos           do not stop at end of text\n"
            "worker:\n"
            "  --spec FILE            function spec\n"
            "  --redis URL            redis://host:port[/db] or unix:///path\n"
            "  --worker-id ID         default: host-pid\n"
            "  --claim-idle-ms N      take over requests pending this long on a silent\n"
            "                         worker (default 15000)\n"
            "  --start-parked         load, then wait parked (take no work) until SIGUSR2;\n"
            "                         SIGUSR1 parks a running worker (it finishes what it\n"
            "                         holds first), SIGUSR2 unparks it\n"
            "common:\n"
            "  --model FILE           GGUF model (overrides the spec's)\n"
            "  --threads N            compute threads (default: one per CPU)\n"
            "  --gpu                  use the CUDA backend if a device is present\n"
            "  --max-batch N          sequences decoded together (default 16)\n"
            "  --max-tok N            token rows per step / prefill chunk (default 256)\n"
            "  --ctx N                context length served (default: spec or model)\n"
            "  --kv-blocks N          KV cache blocks of 16 tokens (default: on a GPU, what\n"
            "                         --kv-mem-fraction of the free memory holds; on the CPU,\n"
            "                         max-batch full contexts)\n"
            "  --kv-mem-fraction F    GPU: share of the memory free after the weights for the\n"
            "                         KV cache, (0, 1] (default 0.9)\n"
            "  --chat-template NAME   chatml, llama2, llama3, mistral, zephyr\n");
}

static int parse_u32(const char *name, const char *s, uint32_t max, uint32_t *out)
{
    unsigned long long v;
    if (!pw_cli_parse_uint(s, max, &v)) {
        fprintf(stderr, "parkway-engine: --%s: expected an integer 0..%u, got '%s'\n", name, max,
                s);
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

static int parse_float(const char *name, const char *s, float *out)
{
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || *end || end == s || !isfinite(v)) {
        fprintf(stderr, "parkway-engine: --%s: expected a number, got '%s'\n", name, s);
        return -1;
    }
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    pw_log_init_from_env();
    struct engine e;
    memset(&e, 0, sizeof e);
    struct engine_opts *o = &e.opts;
    o->max_batch = 16;
    o->max_tok = 256;
    o->max_tokens = 128;
    engine_sampler_params_default(&o->sampling);
    o->sampling.temperature = 0.0f;

    enum {
        O_MODEL = 256,
        O_SPEC,
        O_REDIS,
        O_WORKER_ID,
        O_PROMPT,
        O_CHAT,
        O_MAX_TOKENS,
        O_TEMP,
        O_TOP_K,
        O_TOP_P,
        O_MIN_P,
        O_SEED,
        O_PRES,
        O_FREQ,
        O_REP,
        O_IGNORE_EOS,
        O_THREADS,
        O_MAX_BATCH,
        O_MAX_TOK,
        O_CTX,
        O_KV_BLOCKS,
        O_KV_FRACTION,
        O_TEMPLATE,
        O_HELP,
        O_CLAIM_IDLE,
        O_GPU,
        O_START_PARKED,
    };
    static const struct option longopts[] = {
        {"model", required_argument, NULL, O_MODEL},
        {"spec", required_argument, NULL, O_SPEC},
        {"redis", required_argument, NULL, O_REDIS},
        {"worker-id", required_argument, NULL, O_WORKER_ID},
        {"prompt", required_argument, NULL, O_PROMPT},
        {"chat", no_argument, NULL, O_CHAT},
        {"max-tokens", required_argument, NULL, O_MAX_TOKENS},
        {"temperature", required_argument, NULL, O_TEMP},
        {"top-k", required_argument, NULL, O_TOP_K},
        {"top-p", required_argument, NULL, O_TOP_P},
        {"min-p", required_argument, NULL, O_MIN_P},
        {"seed", required_argument, NULL, O_SEED},
        {"presence-penalty", required_argument, NULL, O_PRES},
        {"frequency-penalty", required_argument, NULL, O_FREQ},
        {"repetition-penalty", required_argument, NULL, O_REP},
        {"ignore-eos", no_argument, NULL, O_IGNORE_EOS},
        {"threads", required_argument, NULL, O_THREADS},
        {"max-batch", required_argument, NULL, O_MAX_BATCH},
        {"max-tok", required_argument, NULL, O_MAX_TOK},
        {"ctx", required_argument, NULL, O_CTX},
        {"kv-blocks", required_argument, NULL, O_KV_BLOCKS},
        {"kv-mem-fraction", required_argument, NULL, O_KV_FRACTION},
        {"chat-template", required_argument, NULL, O_TEMPLATE},
        {"help", no_argument, NULL, O_HELP},
        {"claim-idle-ms", required_argument, NULL, O_CLAIM_IDLE},
        {"gpu", no_argument, NULL, O_GPU},
        {"start-parked", no_argument, NULL, O_START_PARKED},
        {NULL, 0, NULL, 0},
    };
    int opt, bad = 0;
    uint32_t u;
    while ((opt = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (opt) {
        case O_MODEL:
            o->model_path = optarg;
            break;
        case O_SPEC:
            o->spec_path = optarg;
            break;
        case O_REDIS:
            o->redis_url = optarg;
            break;
        case O_WORKER_ID:
            o->worker_id = optarg;
            break;
        case O_PROMPT:
            o->prompt = optarg;
            break;
        case O_CHAT:
            o->chat = true;
            break;
        case O_START_PARKED:
            o->start_parked = true;
            break;
        case O_IGNORE_EOS:
            o->ignore_eos = true;
            break;
        case O_TEMPLATE:
            o->chat_template = optarg;
            break;
        case O_MAX_TOKENS:
            bad |= parse_u32("max-tokens", optarg, 1u << 24, &o->max_tokens);
            break;
        case O_TEMP:
            bad |= parse_float("temperature", optarg, &o->sampling.temperature);
            break;
        case O_TOP_K:
            bad |= parse_u32("top-k", optarg, 1u << 24, &u);
            o->sampling.top_k = (int32_t)u;
            break;
        case O_TOP_P:
            bad |= parse_float("top-p", optarg, &o->sampling.top_p);
            break;
        case O_MIN_P:
            bad |= parse_float("min-p", optarg, &o->sampling.min_p);
            break;
        case O_PRES:
            bad |= parse_float("presence-penalty", optarg, &o->sampling.presence_penalty);
            break;
        case O_FREQ:
            bad |= parse_float("frequency-penalty", optarg, &o->sampling.frequency_penalty);
            break;
        case O_REP:
            bad |= parse_float("repetition-penalty", optarg, &o->sampling.repetition_penalty);
            break;
        case O_SEED: {
            char *end;
            errno = 0;
            o->sampling.seed = strtoull(optarg, &end, 10);
            if (errno || *end || end == optarg) {
                fprintf(stderr, "parkway-engine: --seed: expected an integer, got '%s'\n", optarg);
                bad = 1;
            }
            break;
        }
        case O_THREADS:
            bad |= parse_u32("threads", optarg, 1024, &u);
            o->threads = (int)u;
            break;
        case O_MAX_BATCH:
            bad |= parse_u32("max-batch", optarg, 256, &o->max_batch);
            break;
        case O_MAX_TOK:
            bad |= parse_u32("max-tok", optarg, 8192, &o->max_tok);
            break;
        case O_CTX:
            bad |= parse_u32("ctx", optarg, 1u << 20, &o->n_ctx);
            break;
        case O_KV_BLOCKS:
            bad |= parse_u32("kv-blocks", optarg, 1u << 24, &o->n_kv_blocks);
            break;
        case O_KV_FRACTION:
            if (parse_float("kv-mem-fraction", optarg, &o->kv_mem_fraction) == 0 &&
                !(o->kv_mem_fraction > 0.0f && o->kv_mem_fraction <= 1.0f)) {
                fprintf(stderr, "parkway-engine: --kv-mem-fraction: expected (0, 1], got '%s'\n",
                        optarg);
                bad = 1;
            } else if (o->kv_mem_fraction == 0.0f) {
                bad = 1; /* parse_float said why */
            }
            break;
        case O_GPU:
            o->gpu = true;
            break;
        case O_CLAIM_IDLE:
            bad |= parse_u32("claim-idle-ms", optarg, 86400000, &o->claim_idle_ms);
            break;
        case O_HELP:
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (bad)
        return 2;
    if (optind < argc) {
        fprintf(stderr, "parkway-engine: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (o->max_batch == 0 || o->max_tok == 0) {
        fprintf(stderr, "parkway-engine: --max-batch and --max-tok must be at least 1\n");
        return 2;
    }
    if (o->redis_url || o->spec_path) {
        if (!o->redis_url || !o->spec_path) {
            fprintf(stderr, "parkway-engine: worker mode needs both --spec and --redis\n");
            return 2;
        }
        return engine_worker_run(&e);
    }
    if (!o->model_path || !o->prompt) {
        usage(stderr);
        return 2;
    }
    return engine_offline_run(&e);
}
