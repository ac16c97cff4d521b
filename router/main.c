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

#include "pw_log.h"
#include "router.h"

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
            "  --redis URL            redis://host:port[/db] or unix:///path (required)\n"
            "  --listen ADDR          bind address (default 127.0.0.1)\n"
            "  --port N               port (default 8080)\n"
            "  --threads N            event-loop threads (default: one per CPU)\n"
            "  --router-id ID         names this router's reply stream (default host-pid)\n"
            "  --admin-key KEY        Bearer key for /metrics (default $PARKWAY_ADMIN_KEY)\n"
            "  --tls-cert FILE --tls-key FILE   serve HTTPS (TLS 1.2 or newer)\n"
            "  --request-timeout-ms N deadline of a request, queue included (default 600000)\n"
            "  --max-body-bytes N     (default 8388608)   --max-header-bytes N (default 16384)\n"
            "  --max-connections N    (default 10000)     --idle-timeout-ms N (default 60000)\n"
            "  --header-timeout-ms N  (default 10000)\n");
}

static int parse_num(const char *name, const char *s, unsigned long long max,
                     unsigned long long *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || end == s || s[0] == '-' || v > max) {
        fprintf(stderr, "parkway-router: --%s: expected an integer 0..%llu, got '%s'\n", name, max,
                s);
        return -1;
    }
    *out = v;
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
        {"help", no_argument, NULL, O_HELP},
        {NULL, 0, NULL, 0},
    };
    int opt, bad = 0;
    unsigned long long v;
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
        char host[64] = "router";
        gethostname(host, sizeof host - 1);
        for (char *p = host; *p; p++)
            if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
                  (*p >= '0' && *p <= '9') || *p == '-' || *p == '.'))
                *p = '-';
        snprintf(rt.router_id, sizeof rt.router_id, "%s-%d", host, (int)getpid());
    }

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
    router_stop(&rt);
    router_http_server_destroy(rt.http);
    PW_LOG_INFO("event=router_stopped");
    return e ? 1 : 0;
}
