/*
 * scaler_provider_exec: machines managed by user hook programs (any cloud CLI).
 *
 * The provider config (YAML) names one program per operation, their timeouts and the
 * offers catalog:
 *
 *     hooks:                      # paths relative to this file's directory
 *       provision: provision.sh   # required
 *       park: park.sh             # required
 *       unpark: unpark.sh         # required
 *       terminate: terminate.sh   # required
 *       drain: drain.sh           # optional: without it DRAIN is bookkeeping only and
 *                                 #   park/terminate must drain the engine themselves
 *       status: status.sh         # optional
 *     timeouts:                   # durations ("30s", "2m"); default 60s
 *       default: 60s
 *       provision: 300s
 *     offers: ../offers/example-cloud.yaml   # catalog (scaler_offers.h format)
 *
 * A hook runs as `HOOK OPERATION` with one JSON object on stdin and must print one JSON
 * object on stdout and exit 0 (protocol in docs/internals/scaler.md). Its stderr goes to
 * the log line by line. Non-zero exit, timeout (SIGKILL to its process group), or output
 * that is not the expected JSON: the operation fails with a one-line reason, the instance
 * is FAILED, and the policy's crash-loop breaker counts it. Loop thread only.
 */
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>
#include <yaml.h>

#include "pw_clock.h"
#include "pw_log.h"
#include "scaler_child.h"
#include "scaler_provider.h"

#define EXEC_DEFAULT_TIMEOUT_MS 60000
#define EXEC_CONFIG_MAX_BYTES (64 * 1024)

enum exec_op {
    EXEC_PROVISION = 0,
    EXEC_DRAIN,
    EXEC_PARK,
    EXEC_UNPARK,
    EXEC_TERMINATE,
    EXEC_STATUS,
    EXEC_OP_COUNT
};

static const char *const op_names[EXEC_OP_COUNT] = {"provision", "drain",     "park",
                                                    "unpark",    "terminate", "status"};

static const enum scaler_provider_ev op_events[EXEC_OP_COUNT] = {
    SCALER_PROVIDER_EV_PROVISION, SCALER_PROVIDER_EV_DRAIN,     SCALER_PROVIDER_EV_PARK,
    SCALER_PROVIDER_EV_UNPARK,    SCALER_PROVIDER_EV_TERMINATE, SCALER_PROVIDER_EV_STATUS,
};

struct exec_provider {
    struct scaler_provider base;         /* first */
    char hooks[EXEC_OP_COUNT][PATH_MAX]; /* "" = not configured */
    uint32_t timeout_ms[EXEC_OP_COUNT];
    struct scaler_offer_catalog catalog;
};

struct exec_inst {
    struct scaler_instance base; /* first */
    struct exec_provider *ep;
    const struct pw_spec *spec; /* borrowed until release */
    unsigned gen;               /* bumped per hook run; stale results are ignored */
    unsigned hooks_running;     /* hook processes alive for this instance */
    struct scaler_child *hook;  /* the current one, or NULL */
    enum exec_op op;            /* the current operation */
    bool released;              /* release asked while a killed hook was still running */
};

/* One hook run; freed by its exit callback. */
struct exec_run {
    struct exec_inst *xi;
    enum exec_op op;
    unsigned gen;
};

/* ---- config ------------------------------------------------------------------------ */

/* dst = val if absolute, else dir/val. False when it does not fit. */
static bool join_path(char *dst, size_t cap, const char *dir, const char *val)
{
    size_t dl = val[0] == '/' ? 0 : strlen(dir), vl = strlen(val);
    if (dl + 1 + vl + 1 > cap)
        return false;
    if (dl) {
        memcpy(dst, dir, dl);
        dst[dl++] = '/';
    }
    memcpy(dst + dl, val, vl + 1);
    return true;
}

/* Reads "a.b" = scalar pairs from a YAML mapping of at most two levels. */
static enum pw_err parse_config(struct exec_provider *ep, const char *path, char *errbuf,
                                size_t errcap)
{
    enum pw_err err = PW_ERR_CONFIG;
    FILE *f = fopen(path, "re");
    if (!f) {
        snprintf(errbuf, errcap, "%s: %s", path, strerror(errno));
        return PW_ERR_IO;
    }
    char *text = malloc(EXEC_CONFIG_MAX_BYTES + 1);
    size_t len = text ? fread(text, 1, EXEC_CONFIG_MAX_BYTES + 1, f) : 0;
    fclose(f);
    if (!text)
        return PW_ERR_NOMEM;
    if (len > EXEC_CONFIG_MAX_BYTES) {
        snprintf(errbuf, errcap, "%s: larger than %d bytes", path, EXEC_CONFIG_MAX_BYTES);
        free(text);
        return PW_ERR_CONFIG;
    }
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash)
        *slash = '\0';
    else
        snprintf(dir, sizeof dir, ".");

    yaml_parser_t p;
    yaml_document_t doc;
    yaml_parser_initialize(&p);
    yaml_parser_set_input_string(&p, (const unsigned char *)text, len);
    if (!yaml_parser_load(&p, &doc)) {
        snprintf(errbuf, errcap, "%s:%zu:%zu: %s", path, p.problem_mark.line + 1,
                 p.problem_mark.column + 1, p.problem ? p.problem : "bad YAML");
        yaml_parser_delete(&p);
        free(text);
        return PW_ERR_CONFIG;
    }
    char offers_path[PATH_MAX] = "";
    uint32_t explicit_ms[EXEC_OP_COUNT] = {0}, default_ms = EXEC_DEFAULT_TIMEOUT_MS;
    yaml_node_t *bad = NULL;
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (!root || root->type != YAML_MAPPING_NODE) {
        snprintf(errbuf, errcap, "%s:1:1: (document): expected a mapping", path);
        goto out;
    }
    for (yaml_node_pair_t *pr = root->data.mapping.pairs.start; pr < root->data.mapping.pairs.top;
         pr++) {
        yaml_node_t *k = yaml_document_get_node(&doc, pr->key);
        yaml_node_t *v = yaml_document_get_node(&doc, pr->value);
        bad = k;
        if (k->type != YAML_SCALAR_NODE)
            goto bad_key;
        const char *key = (const char *)k->data.scalar.value;
        if (strcmp(key, "offers") == 0 && v->type == YAML_SCALAR_NODE) {
            const char *val = (const char *)v->data.scalar.value;
            if (!join_path(offers_path, sizeof offers_path, dir, val)) {
                snprintf(errbuf, errcap, "%s: offers: path too long", path);
                goto out;
            }
            continue;
        }
        bool is_hooks = strcmp(key, "hooks") == 0, is_timeouts = strcmp(key, "timeouts") == 0;
        if ((!is_hooks && !is_timeouts) || v->type != YAML_MAPPING_NODE)
            goto bad_key;
        for (yaml_node_pair_t *q = v->data.mapping.pairs.start; q < v->data.mapping.pairs.top;
             q++) {
            yaml_node_t *k2 = yaml_document_get_node(&doc, q->key);
            yaml_node_t *v2 = yaml_document_get_node(&doc, q->value);
            if (k2->type != YAML_SCALAR_NODE || v2->type != YAML_SCALAR_NODE) {
                bad = k2;
                goto bad_key;
            }
            const char *name = (const char *)k2->data.scalar.value;
            const char *val = (const char *)v2->data.scalar.value;
            int op = -1;
            for (int i = 0; i < EXEC_OP_COUNT; i++)
                if (strcmp(name, op_names[i]) == 0)
                    op = i;
            if (op < 0 && !(is_timeouts && strcmp(name, "default") == 0)) {
                snprintf(errbuf, errcap, "%s:%zu:%zu: %s.%s: unknown key", path,
                         k2->start_mark.line + 1, k2->start_mark.column + 1, key, name);
                goto out;
            }
            if (is_hooks) {
                if (!join_path(ep->hooks[op], sizeof ep->hooks[op], dir, val) ||
                    access(ep->hooks[op], X_OK) != 0) {
                    snprintf(errbuf, errcap, "%s:%zu:%zu: hooks.%s: %s: %s", path,
                             v2->start_mark.line + 1, v2->start_mark.column + 1, name,
                             ep->hooks[op], strerror(errno));
                    goto out;
                }
            } else {
                uint64_t ms;
                if (pw_spec_parse_duration_ms(val, &ms) != PW_OK || ms == 0 || ms > 3600000) {
                    snprintf(errbuf, errcap, "%s:%zu:%zu: timeouts.%s: expected 1ms..1h", path,
                             v2->start_mark.line + 1, v2->start_mark.column + 1, name);
                    goto out;
                }
                if (op < 0)
                    default_ms = (uint32_t)ms;
                else
                    explicit_ms[op] = (uint32_t)ms;
            }
        }
    }
    for (int i = 0; i < EXEC_OP_COUNT; i++)
        ep->timeout_ms[i] = explicit_ms[i] ? explicit_ms[i] : default_ms;
    static const enum exec_op required[] = {EXEC_PROVISION, EXEC_PARK, EXEC_UNPARK, EXEC_TERMINATE};
    for (size_t i = 0; i < sizeof required / sizeof required[0]; i++) {
        if (!ep->hooks[required[i]][0]) {
            snprintf(errbuf, errcap, "%s:1:1: hooks.%s: required", path, op_names[required[i]]);
            goto out;
        }
    }
    if (!offers_path[0]) {
        snprintf(errbuf, errcap, "%s:1:1: offers: required (a catalog file)", path);
        goto out;
    }
    err = scaler_offers_load_file(offers_path, &ep->catalog, errbuf, errcap);
    if (err == PW_OK && ep->catalog.count == 0) {
        snprintf(errbuf, errcap, "%s: no offers", offers_path);
        err = PW_ERR_CONFIG;
    }
    goto out;
bad_key:
    snprintf(errbuf, errcap,
             "%s:%zu:%zu: unknown key or wrong type (expected hooks, timeouts, "
             "offers)",
             path, bad->start_mark.line + 1, bad->start_mark.column + 1);
out:
    yaml_document_delete(&doc);
    yaml_parser_delete(&p);
    free(text);
    return err;
}

/* ---- running hooks ----------------------------------------------------------------- */

static void xi_free(struct exec_inst *xi)
{
    free(xi);
}

static json_t *offer_json(const struct scaler_offer *o, bool spot)
{
    return json_pack(
        "{s:s, s:s, s:s, s:I, s:I, s:I, s:I, s:I, s:I, s:b}", "provider", o->provider,
        "instance_type", o->instance_type, "gpu_model", o->gpu_model, "gpu_count",
        (json_int_t)o->gpu_count, "gpu_memory_bytes", (json_int_t)o->gpu_memory_bytes,
        "cpu_millicores", (json_int_t)o->cpu_millicores, "memory_bytes",
        (json_int_t)o->memory_bytes, "price_microusd_per_hour",
        (json_int_t)(spot ? o->spot_price_microusd_per_hour : o->price_microusd_per_hour),
        "parked_microusd_per_hour", (json_int_t)o->parked_microusd_per_hour, "spot", spot);
}

/* Checks the hook's answer; fills xi->base from it. Returns false with detail set. */
static bool take_answer(struct exec_inst *xi, enum exec_op op, const char *out, size_t len)
{
    struct scaler_instance *in = &xi->base;
    json_error_t jerr;
    json_t *root = json_loadb(out, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root || !json_is_object(root)) {
        char q[160];
        snprintf(in->detail, sizeof in->detail, "hook %s returned invalid JSON (%s): %s",
                 op_names[op], root ? "not an object" : jerr.text,
                 pw_log_quote(q, sizeof q, len ? out : "(nothing)"));
        json_decref(root);
        return false;
    }
    const char *state = json_string_value(json_object_get(root, "state"));
    const char *pid = json_string_value(json_object_get(root, "provider_id"));
    const char *addr = json_string_value(json_object_get(root, "address"));
    const char *detail = json_string_value(json_object_get(root, "detail"));
    enum scaler_inst_state st = SCALER_INST_FAILED;
    bool known = true;
    if (!state)
        known = false;
    else if (strcmp(state, "running") == 0)
        st = SCALER_INST_RUNNING;
    else if (strcmp(state, "draining") == 0)
        st = SCALER_INST_DRAINING;
    else if (strcmp(state, "parked") == 0)
        st = SCALER_INST_PARKED;
    else if (strcmp(state, "terminated") == 0)
        st = SCALER_INST_TERMINATED;
    else if (strcmp(state, "failed") == 0)
        st = SCALER_INST_FAILED;
    else if (strcmp(state, "provisioning") == 0)
        st = SCALER_INST_PROVISIONING;
    else
        known = false;
    bool ok = known;
    if (!known) {
        snprintf(in->detail, sizeof in->detail,
                 "hook %s: \"state\" missing or not one of running, draining, parked, "
                 "terminated, failed",
                 op_names[op]);
    } else {
        static const enum scaler_inst_state want[EXEC_OP_COUNT] = {
            SCALER_INST_RUNNING, SCALER_INST_DRAINING,   SCALER_INST_PARKED,
            SCALER_INST_RUNNING, SCALER_INST_TERMINATED, SCALER_INST_RUNNING};
        if (op != EXEC_STATUS && st != want[op] &&
            !(op == EXEC_DRAIN && st == SCALER_INST_RUNNING)) {
            snprintf(in->detail, sizeof in->detail, "hook %s answered state %s%s%s", op_names[op],
                     state, detail ? ": " : "", detail ? detail : "");
            ok = false;
            st = SCALER_INST_FAILED;
        }
        if (op == EXEC_DRAIN)
            st = SCALER_INST_DRAINING;
        in->state = st;
    }
    if (ok) {
        if (pid)
            snprintf(in->provider_id, sizeof in->provider_id, "%s", pid);
        if (addr)
            snprintf(in->address, sizeof in->address, "%s", addr);
        if (detail)
            snprintf(in->detail, sizeof in->detail, "%s", detail);
        else
            in->detail[0] = '\0';
    }
    json_decref(root);
    return ok;
}

static void on_hook_exit(struct scaler_child *c, const struct scaler_child_result *res,
                         void *userdata)
{
    (void)c;
    struct exec_run *run = userdata;
    struct exec_inst *xi = run->xi;
    enum exec_op op = run->op;
    bool current = run->gen == xi->gen;
    free(run);
    xi->hooks_running--;
    if (!current || xi->released) {
        if (xi->released && xi->hooks_running == 0)
            xi_free(xi);
        return; /* superseded by terminate: its own report comes */
    }
    xi->hook = NULL;
    struct scaler_instance *in = &xi->base;
    enum pw_err err = PW_OK;
    if (res->timed_out) {
        snprintf(in->detail, sizeof in->detail, "hook %s timed out after %u ms", op_names[op],
                 xi->ep->timeout_ms[op]);
        err = PW_ERR_TIMEOUT;
    } else if (res->exit_code != 0) {
        snprintf(in->detail, sizeof in->detail, "hook %s exited with code %d%s%s", op_names[op],
                 res->exit_code, res->last_err[0] ? ": " : "", res->last_err);
        err = PW_ERR_IO;
    } else if (res->out_truncated) {
        snprintf(in->detail, sizeof in->detail, "hook %s printed more than %d bytes", op_names[op],
                 SCALER_CHILD_STDOUT_MAX);
        err = PW_ERR_TOOBIG;
    } else if (!take_answer(xi, op, res->out, res->out_len)) {
        err = PW_ERR_PROTO;
    }
    if (err)
        in->state = SCALER_INST_FAILED;
    in->busy = false;
    in->last_op_ms = res->elapsed_ms;
    PW_LOG_INFO("event=hook_done op=%s replica=%s code=%d ms=%llu result=%s", op_names[op], in->id,
                res->exit_code, (unsigned long long)res->elapsed_ms, pw_err_name(err));
    struct scaler_provider *p = &xi->ep->base;
    p->env.on_event(p, in, op_events[op], err, p->env.userdata);
}

static enum pw_err run_hook(struct exec_inst *xi, enum exec_op op)
{
    struct exec_provider *ep = xi->ep;
    struct scaler_provider *p = &ep->base;
    if (!ep->hooks[op][0])
        return PW_ERR_UNSUPPORTED;
    struct exec_run *run = calloc(1, sizeof *run);
    if (!run)
        return PW_ERR_NOMEM;
    char *spec_json = pw_spec_to_json(xi->spec);
    json_t *spec = spec_json ? json_loads(spec_json, 0, NULL) : NULL;
    free(spec_json);
    json_t *msg =
        json_pack("{s:s, s:s, s:s, s:s, s:o, s:s, s:o, s:s, s:s}", "operation", op_names[op],
                  "instance_id", xi->base.id, "provider_id", xi->base.provider_id, "function",
                  xi->base.function, "spec", spec ? spec : json_null(), "spec_path",
                  xi->spec->origin, "offer", offer_json(&xi->base.offer, xi->base.spot),
                  "redis_url", p->env.redis_url, "engine", p->env.engine_path);
    char *text = msg ? json_dumps(msg, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    json_decref(msg);
    if (!text) {
        free(run);
        return PW_ERR_NOMEM;
    }
    char e_op[64], e_id[128], e_pid[192], e_fn[128], e_spec[PATH_MAX + 32], e_redis[600],
        e_engine[PATH_MAX + 32], e_type[128];
    snprintf(e_op, sizeof e_op, "PARKWAY_HOOK_OP=%s", op_names[op]);
    snprintf(e_id, sizeof e_id, "PARKWAY_INSTANCE_ID=%s", xi->base.id);
    snprintf(e_pid, sizeof e_pid, "PARKWAY_PROVIDER_ID=%s", xi->base.provider_id);
    snprintf(e_fn, sizeof e_fn, "PARKWAY_FUNCTION=%s", xi->base.function);
    snprintf(e_spec, sizeof e_spec, "PARKWAY_SPEC=%s", xi->spec->origin);
    snprintf(e_redis, sizeof e_redis, "PARKWAY_REDIS_URL=%s", p->env.redis_url);
    snprintf(e_engine, sizeof e_engine, "PARKWAY_ENGINE=%s", p->env.engine_path);
    snprintf(e_type, sizeof e_type, "PARKWAY_INSTANCE_TYPE=%s", xi->base.offer.instance_type);
    char *env[] = {e_op, e_id, e_pid, e_fn, e_spec, e_redis, e_engine, e_type, NULL};
    char *argv[] = {ep->hooks[op], (char *)op_names[op], NULL};
    char name[96];
    snprintf(name, sizeof name, "hook-%s-%s", op_names[op], xi->base.id);
    run->xi = xi;
    run->op = op;
    run->gen = ++xi->gen;
    struct scaler_child_opts o = {
        .name = name,
        .argv = argv,
        .env_add = env,
        .stdin_data = text,
        .stdin_len = strlen(text),
        .capture_stdout = true,
        .log_stderr = true,
        .timeout_ms = ep->timeout_ms[op],
        .cb = on_hook_exit,
        .userdata = run,
    };
    enum pw_err err = scaler_child_start(p->env.children, &o, &xi->hook);
    free(text);
    if (err) {
        free(run);
        snprintf(xi->base.detail, sizeof xi->base.detail, "cannot run hook %s: %s", op_names[op],
                 pw_err_desc(err));
        return err;
    }
    xi->hooks_running++;
    xi->op = op;
    xi->base.busy = true;
    xi->base.op_started_ms = pw_clock_mono_ms();
    PW_LOG_INFO("event=hook_started op=%s replica=%s hook=%s", op_names[op], xi->base.id,
                ep->hooks[op]);
    return PW_OK;
}

/* ---- operations -------------------------------------------------------------------- */

static const struct scaler_offer *exec_offers(struct scaler_provider *p, size_t *n)
{
    struct exec_provider *ep = (struct exec_provider *)p;
    *n = ep->catalog.count;
    return ep->catalog.offers;
}

static enum pw_err exec_provision(struct scaler_provider *p, const struct scaler_offer *offer,
                                  bool spot, const struct pw_spec *spec, const char *replica_id,
                                  struct scaler_instance **out)
{
    struct exec_provider *ep = (struct exec_provider *)p;
    if (!offer || strlen(replica_id) > SCALER_REPLICA_ID_MAX)
        return PW_ERR_INVAL;
    struct exec_inst *xi = calloc(1, sizeof *xi);
    if (!xi)
        return PW_ERR_NOMEM;
    xi->ep = ep;
    xi->spec = spec;
    snprintf(xi->base.id, sizeof xi->base.id, "%s", replica_id);
    snprintf(xi->base.function, sizeof xi->base.function, "%s", spec->name);
    xi->base.offer = *offer;
    xi->base.spot = spot;
    xi->base.state = SCALER_INST_PROVISIONING;
    enum pw_err err = run_hook(xi, EXEC_PROVISION);
    if (err) {
        snprintf(p->errstr, sizeof p->errstr, "%s", xi->base.detail);
        free(xi);
        return err;
    }
    *out = &xi->base;
    return PW_OK;
}

static enum pw_err exec_simple(struct scaler_provider *p, struct scaler_instance *inst,
                               enum exec_op op)
{
    (void)p;
    struct exec_inst *xi = (struct exec_inst *)inst;
    if (inst->busy)
        return PW_ERR_AGAIN;
    return run_hook(xi, op);
}

static enum pw_err exec_drain(struct scaler_provider *p, struct scaler_instance *inst)
{
    struct exec_provider *ep = (struct exec_provider *)p;
    if (!ep->hooks[EXEC_DRAIN][0]) {
        inst->state = SCALER_INST_DRAINING; /* park/terminate hooks drain themselves */
        return PW_ERR_UNSUPPORTED;
    }
    return exec_simple(p, inst, EXEC_DRAIN);
}

static enum pw_err exec_park(struct scaler_provider *p, struct scaler_instance *inst)
{
    return exec_simple(p, inst, EXEC_PARK);
}

static enum pw_err exec_unpark(struct scaler_provider *p, struct scaler_instance *inst)
{
    return exec_simple(p, inst, EXEC_UNPARK);
}

static enum pw_err exec_status(struct scaler_provider *p, struct scaler_instance *inst)
{
    return exec_simple(p, inst, EXEC_STATUS);
}

static enum pw_err exec_terminate(struct scaler_provider *p, struct scaler_instance *inst)
{
    (void)p;
    struct exec_inst *xi = (struct exec_inst *)inst;
    if (inst->busy && xi->op == EXEC_TERMINATE)
        return PW_OK;
    if (inst->busy && xi->hook) {
        /* Supersede: the old hook is killed and its result ignored (gen changes). */
        scaler_child_signal(xi->hook, SIGKILL, true);
        xi->hook = NULL;
    }
    inst->busy = false;
    return run_hook(xi, EXEC_TERMINATE);
}

static void exec_release(struct scaler_provider *p, struct scaler_instance *inst)
{
    (void)p;
    if (!inst)
        return;
    struct exec_inst *xi = (struct exec_inst *)inst;
    if (xi->hooks_running > 0) {
        if (xi->hook)
            scaler_child_signal(xi->hook, SIGKILL, true);
        xi->released = true; /* freed by the last hook's exit callback */
        return;
    }
    xi_free(xi);
}

static void exec_destroy(struct scaler_provider *p)
{
    struct exec_provider *ep = (struct exec_provider *)p;
    scaler_offer_catalog_deinit(&ep->catalog);
    free(ep);
}

static const struct scaler_provider_ops exec_ops = {
    .name = "exec",
    .offers = exec_offers,
    .provision = exec_provision,
    .drain = exec_drain,
    .park = exec_park,
    .unpark = exec_unpark,
    .terminate = exec_terminate,
    .status = exec_status,
    .release = exec_release,
    .destroy = exec_destroy,
};

enum pw_err scaler_provider_exec_create(const struct scaler_provider_env *env,
                                        const char *config_path, struct scaler_provider **out,
                                        char *errbuf, size_t errcap)
{
    if (!env || !env->base || !env->children || !env->on_event || !config_path) {
        snprintf(errbuf, errcap, "exec provider: incomplete environment");
        return PW_ERR_INVAL;
    }
    struct exec_provider *ep = calloc(1, sizeof *ep);
    if (!ep)
        return PW_ERR_NOMEM;
    ep->base.ops = &exec_ops;
    ep->base.env = *env;
    enum pw_err err = parse_config(ep, config_path, errbuf, errcap);
    if (err) {
        scaler_offer_catalog_deinit(&ep->catalog);
        free(ep);
        return err;
    }
    *out = &ep->base;
    return PW_OK;
}
