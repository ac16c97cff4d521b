/*
 * parkway-router: command line. Parses options into struct router_config, starts the HTTP
 * server and the gateway (router.h), runs until SIGINT/SIGTERM, then drains.
 * Exit codes: 0 ok, 2 bad input or configuration, 1 other failures.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pw_cli.h"
#include "pw_log.h"
#include "pw_storage.h"
#include "router.h"
#include "router_batch.h"
#include "router_files.h"

static struct router_http_server *g_http;

static void on_signal(int sig)
{
    (void)sig;
    if (g_http)
        router_http_server_stop(g_http); /* async-signal-safe */
}

static void usage(FILE *out)
{
    fprintf(out,
            "usage: parkway-router --redis URL [options]\n"
            "  --redis URL            redis://host:port[/db] or unix:///path\n"
            "                         (default $PARKWAY_REDIS_URL; one of them is required)\n"
            "  --listen ADDR          bind address (default 127.0.0.1)\n"
            "  --port N               port (default 8080)\n"
            "  --threads N            event-loop threads (default: one per CPU)\n"
            "  --router-id ID         names this router's reply stream (default host-pid)\n"
            "  --admin-key KEY        Bearer key for /metrics (default $PARKWAY_ADMIN_KEY)\n"
            "  --tls-cert FILE --tls-key FILE   serve HTTPS (TLS 1.2 or newer)\n"
            "  --request-timeout-ms N deadline of a request, queue included (default 600000);\n"
            "                         also the cap of a request's x-parkway-timeout-ms header\n"
            "  --key-cache-ms N       how long an API-key lookup is trusted (default 5000);\n"
            "                         a revoke (pw:keys:revoked) clears it at once\n"
            "  --max-queue N          requests a function's queue may hold unacknowledged\n"
            "                         before new ones get 503 (default 10000; 0 = unbounded)\n"
            "  --max-body-bytes N     (default 8388608)   --max-header-bytes N (default 16384)\n"
            "  --max-connections N    (default 10000)     --idle-timeout-ms N (default 60000)\n"
            "  --header-timeout-ms N  (default 10000)\n"
            "  --storage-dir DIR      Files API and batch outputs (default\n"
            "                         $PARKWAY_STATE_DIR/files or ~/.local/state/parkway/files)\n"
            "  --max-file-bytes N     largest upload to /v1/files (default 209715200); uploads\n"
            "                         are spooled to disk as they arrive, never held in memory\n"
            "  --spool-dir DIR        where upload bodies are spooled (default\n"
            "                         <storage-dir>/.spool; must be a disk, not tmpfs)\n");
}

static int parse_num(const char *name, const char *s, unsigned long long max,
                     unsigned long long *out)
{
    if (!pw_cli_parse_uint(s, max, out)) {
        fprintf(stderr, "parkway-router: --%s: expected an integer 0..%llu, got '%s'\n", name, max,
                s);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    pw_log_init_from_env();
    struct router rt;
    memset(&rt, 0, sizeof rt);
    struct router_config *cfg = &rt.cfg;
    router_http_config_init(&cfg->http);
    cfg->http.port = 8080;
    cfg->request_timeout_ms = 600000;
    cfg->key_cache_ms = 5000;
    cfg->max_queue = 10000;
    cfg->admin_key = getenv("PARKWAY_ADMIN_KEY");

    enum {
        O_REDIS = 256,
        O_LISTEN,
        O_PORT,
        O_THREADS,
        O_ID,
        O_ADMIN,
        O_CERT,
        O_KEY,
        O_TIMEOUT,
        O_BODY,
        O_HEADER,
        O_CONNS,
        O_IDLE,
        O_HDR_TIMEOUT,
        O_KEY_CACHE,
        O_STORAGE,
        O_MAX_FILE,
        O_MAX_QUEUE,
        O_SPOOL,
        O_HELP,
    };
    static const struct option longopts[] = {
        {"redis", required_argument, NULL, O_REDIS},
        {"listen", required_argument, NULL, O_LISTEN},
        {"port", required_argument, NULL, O_PORT},
        {"threads", required_argument, NULL, O_THREADS},
        {"router-id", required_argument, NULL, O_ID},
        {"admin-key", required_argument, NULL, O_ADMIN},
        {"tls-cert", required_argument, NULL, O_CERT},
        {"tls-key", required_argument, NULL, O_KEY},
        {"request-timeout-ms", required_argument, NULL, O_TIMEOUT},
        {"max-body-bytes", required_argument, NULL, O_BODY},
        {"max-header-bytes", required_argument, NULL, O_HEADER},
        {"max-connections", required_argument, NULL, O_CONNS},
        {"idle-timeout-ms", required_argument, NULL, O_IDLE},
        {"header-timeout-ms", required_argument, NULL, O_HDR_TIMEOUT},
        {"key-cache-ms", required_argument, NULL, O_KEY_CACHE},
        {"storage-dir", required_argument, NULL, O_STORAGE},
        {"max-file-bytes", required_argument, NULL, O_MAX_FILE},
        {"max-queue", required_argument, NULL, O_MAX_QUEUE},
        {"spool-dir", required_argument, NULL, O_SPOOL},
        {"help", no_argument, NULL, O_HELP},
        {NULL, 0, NULL, 0},
    };
    const char *spool_dir = NULL;
    int opt, bad = 0;
    unsigned long long v = 0; /* read only after parse_num succeeded */
    while ((opt = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (opt) {
        case O_REDIS:
            cfg->redis_url = optarg;
            break;
        case O_LISTEN:
            cfg->http.host = optarg;
            break;
        case O_PORT:
            bad |= parse_num("port", optarg, 65535, &v);
            cfg->http.port = (uint16_t)v;
            break;
        case O_THREADS:
            bad |= parse_num("threads", optarg, 256, &v);
            cfg->http.threads = (unsigned)v;
            break;
        case O_ID:
            cfg->router_id = optarg;
            break;
        case O_ADMIN:
            cfg->admin_key = optarg;
            break;
        case O_CERT:
            cfg->http.tls_cert_file = optarg;
            break;
        case O_KEY:
            cfg->http.tls_key_file = optarg;
            break;
        case O_TIMEOUT:
            bad |= parse_num("request-timeout-ms", optarg, 86400000, &v);
            cfg->request_timeout_ms = (uint32_t)v;
            break;
        case O_BODY:
            bad |= parse_num("max-body-bytes", optarg, 1ull << 32, &v);
            cfg->http.max_body_bytes = (size_t)v;
            break;
        case O_HEADER:
            bad |= parse_num("max-header-bytes", optarg, 1u << 20, &v);
            cfg->http.max_header_bytes = (size_t)v;
            break;
        case O_CONNS:
            bad |= parse_num("max-connections", optarg, 1u << 20, &v);
            cfg->http.max_connections = (unsigned)v;
            break;
        case O_IDLE:
            bad |= parse_num("idle-timeout-ms", optarg, 86400000, &v);
            cfg->http.idle_timeout_ms = (uint32_t)v;
            break;
        case O_HDR_TIMEOUT:
            bad |= parse_num("header-timeout-ms", optarg, 86400000, &v);
            cfg->http.header_timeout_ms = (uint32_t)v;
            break;
        case O_KEY_CACHE:
            bad |= parse_num("key-cache-ms", optarg, 3600000, &v);
            cfg->key_cache_ms = (uint32_t)v;
            break;
        case O_STORAGE:
            cfg->storage_dir = optarg;
            break;
        case O_MAX_FILE:
            bad |= parse_num("max-file-bytes", optarg, 1ull << 40, &v);
            cfg->max_file_bytes = (size_t)v;
            break;
        case O_MAX_QUEUE:
            bad |= parse_num("max-queue", optarg, 100000000, &v);
            cfg->max_queue = (uint32_t)v;
            break;
        case O_SPOOL:
            spool_dir = optarg;
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
    if (!cfg->redis_url) {
        const char *env = getenv("PARKWAY_REDIS_URL");
        cfg->redis_url = env && *env ? env : NULL;
    }
    if (!cfg->redis_url || optind < argc) {
        usage(stderr);
        return 2;
    }
    if (!!cfg->http.tls_cert_file != !!cfg->http.tls_key_file) {
        fprintf(stderr, "parkway-router: --tls-cert and --tls-key go together\n");
        return 2;
    }
    if (cfg->router_id) {
        snprintf(rt.router_id, sizeof rt.router_id, "%s", cfg->router_id);
    } else {
        pw_cli_host_pid_id(rt.router_id, sizeof rt.router_id, "router");
    }

    /* Files and Batches: storage for the bytes; upload bodies spool beside it (same disk). */
    char storage_dir[4096], spool_buf[4200];
    if (!cfg->storage_dir) {
        const char *state = getenv("PARKWAY_STATE_DIR"), *home = getenv("HOME");
        if (state && *state)
            snprintf(storage_dir, sizeof storage_dir, "%s/files", state);
        else
            snprintf(storage_dir, sizeof storage_dir, "%s/.local/state/parkway/files",
                     home && *home ? home : ".");
        cfg->storage_dir = storage_dir;
    }
    if (!spool_dir) {
        const char *sd = cfg->storage_dir;
        snprintf(spool_buf, sizeof spool_buf, "%s/.spool",
                 strncmp(sd, "file://", 7) == 0 ? sd + 7 : sd);
        spool_dir = spool_buf;
    }
    cfg->http.body_spool.fn = router_files_spool_limit;
    cfg->http.body_spool.ud = &rt;
    cfg->http.body_spool.dir = spool_dir;

    char err[512] = "";
    enum pw_err e = router_http_server_create(&cfg->http, router_handle, &rt, &rt.http);
    if (e) {
        fprintf(stderr, "parkway-router: cannot listen on %s:%u: %s\n",
                cfg->http.host ? cfg->http.host : "127.0.0.1", cfg->http.port, pw_err_desc(e));
        return pw_err_exit_code(e) == 2 ? 2 : 1;
    }
    if ((e = router_start(&rt, err, sizeof err))) {
        fprintf(stderr, "parkway-router: %s\n", err[0] ? err : pw_err_desc(e));
        router_stop(&rt);
        router_http_server_destroy(rt.http);
        return pw_err_exit_code(e);
    }
    /* Files and Batches: the storage, and the coordinator that runs batches. */
    if ((e = pw_storage_open(cfg->storage_dir, &rt.storage, err, sizeof err)) ||
        (e = router_batch_coord_start(&rt, &rt.batch, err, sizeof err))) {
        fprintf(stderr, "parkway-router: %s\n", err[0] ? err : pw_err_desc(e));
        router_stop(&rt);
        router_http_server_destroy(rt.http);
        pw_storage_destroy(rt.storage);
        return pw_err_exit_code(e);
    }
    g_http = rt.http;
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    PW_LOG_INFO("event=router_ready port=%u threads=%u router_id=%s tls=%d",
                router_http_server_port(rt.http), rt.n_workers, rt.router_id,
                cfg->http.tls_cert_file != NULL);
    e = router_http_server_run(rt.http);
    g_http = NULL;
    router_batch_coord_stop(rt.batch);
    router_stop(&rt);
    pw_storage_destroy(rt.storage);
    router_http_server_destroy(rt.http);
    PW_LOG_INFO("event=router_stopped");
    return e ? 1 : 0;
}
