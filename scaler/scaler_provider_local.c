/*
 * scaler_provider_local: engines as child processes on this machine (the embedded default).
 *
 *   provision  start `parkway-engine --spec F --redis URL --worker-id ID [extra args]`
 *              (extra args: the scaler's --engine-arg options, env.engine_args);
 *   drain      SIGUSR1: the engine stops reading its streams and claiming, finishes what it
 *              holds, then parks itself (engine_worker.c); reported at once;
 *   park       SIGUSR1 if the drain did not send it; completes when the engine's heartbeat
 *              says PARKED (written after the signal): the process stays, model mapped,
 *              tokenizer, KV cache and scheduler allocated, heartbeating every second,
 *              holding no stream entry and issuing no read;
 *   unpark     SIGUSR2: the engine reads at once; reported at once (READY comes from its
 *              heartbeat, as after a provision);
 *   terminate  SIGTERM (a parked engine exits at once), SIGKILL after LOCAL_KILL_MS.
 *
 * Fallback, parked without a process: when the engine exits during a park (killed by the
 * park deadline, LOCAL_PARK_KILL_MS, or stopped by someone else), the replica is parked
 * with the model file kept in the page cache by a "pin" process (mmap + MADV_WILLNEED +
 * mlock, then pause); unpark then starts a fresh engine, reading no disk.
 *
 * Why not SIGSTOP: a worker blocked in XREADGROUP BLOCK is registered with Redis; an entry
 * that arrives while the process is stopped is still delivered to it and stays pending on a
 * consumer that cannot run until another engine's stale-claim (15 s). The engine's own
 * parked mode issues no read while parked, and finishes whatever its last read returned
 * before it reports PARKED: a parked replica holds no entries (docs/internals/scaler.md).
 *
 * The park/unpark signals are only sent once the engine catches them (SigCgt of
 * /proc/PID/status), since their default action would kill an engine still starting.
 * Park completion is read from Redis (HGET of the heartbeat, every LOCAL_POLL_MS, on the
 * provider's own async client). Engines are in their own process group with
 * PR_SET_PDEATHSIG(SIGTERM): when the scaler dies, they drain and exit too. Runs on the
 * scaler's loop thread.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <event2/event.h>

#include "parkway.pb-c.h"
#include "pw_clock.h"
#include "pw_keyspace.h"
#include "pw_log.h"
#include "pw_proto.h"
#include "pw_redis.h"
#include "scaler_child.h"
#include "scaler_provider.h"

#define LOCAL_KILL_MS 30000       /* terminate: SIGKILL this long after SIGTERM */
#define LOCAL_PARK_KILL_MS 120000 /* park: the drain may finish a long answer first */
#define LOCAL_POLL_MS 50          /* park: heartbeat poll and pending-signal retry period */
#define LOCAL_ARGV_MAX 32         /* engine argv: 7 fixed, the env's extra ones, NULL */

enum local_op {
    LOCAL_OP_NONE = 0,
    LOCAL_OP_PROVISION,
    LOCAL_OP_DRAIN,
    LOCAL_OP_PARK,
    LOCAL_OP_UNPARK,
    LOCAL_OP_TERMINATE,
};

struct local_provider {
    struct scaler_provider base; /* first */
    struct scaler_offer offer;   /* the machine */
    struct pw_redis *redis;      /* owned: reads engine heartbeats (park completion) */
};

struct local_inst {
    struct scaler_instance base; /* first */
    struct local_provider *lp;
    const struct pw_spec *spec;   /* borrowed from the scaler until release */
    struct scaler_child *engine;  /* running engine process, or NULL */
    bool term_sent;               /* SIGTERM sent to the current engine */
    enum local_op op;             /* operation waiting for its report */
    enum pw_err op_err;           /* its result, for the deferred report */
    struct event *ev_report;      /* zero-delay timer: reports never run inside the call */
    struct event *ev_kill;        /* SIGKILL deadline after SIGTERM */
    struct event *ev_poll;        /* LOCAL_POLL_MS timer: pending signal, park completion */
    int sig_want;                 /* SIGUSR1/SIGUSR2 to send once the engine catches it; 0 */
    int64_t park_sent_ms;         /* wall time SIGUSR1 went to the current engine; 0 = not
                                     since its start or last unpark */
    bool hget_out;                /* a heartbeat HGET is in flight (its callback holds li) */
    bool released;                /* release came while hget_out: the callback frees li */
    pid_t pin_pid;                /* process holding the model in memory; 0 = none */
    char key_workers[PW_KEY_MAX]; /* pw:{fn}:workers */
    char model_path[PATH_MAX];    /* resolved like the engine does */
};

static enum scaler_provider_ev op_event(enum local_op op)
{
    switch (op) {
    case LOCAL_OP_PROVISION:
        return SCALER_PROVIDER_EV_PROVISION;
    case LOCAL_OP_DRAIN:
        return SCALER_PROVIDER_EV_DRAIN;
    case LOCAL_OP_PARK:
        return SCALER_PROVIDER_EV_PARK;
    case LOCAL_OP_UNPARK:
        return SCALER_PROVIDER_EV_UNPARK;
    case LOCAL_OP_TERMINATE:
        return SCALER_PROVIDER_EV_TERMINATE;
    case LOCAL_OP_NONE:
        break;
    }
    return SCALER_PROVIDER_EV_STATUS;
}

static void on_report(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct local_inst *li = arg;
    enum local_op op = li->op;
    li->op = LOCAL_OP_NONE;
    li->base.busy = false;
    li->base.last_op_ms = pw_clock_mono_ms() - li->base.op_started_ms;
    struct scaler_provider *p = &li->lp->base;
    p->env.on_event(p, &li->base, op_event(op), li->op_err, p->env.userdata);
}

/* Finishes the current operation: its report runs from the loop, after this returns. */
static void complete(struct local_inst *li, enum pw_err err)
{
    li->op_err = err;
    static const struct timeval zero = {0, 0};
    evtimer_add(li->ev_report, &zero);
}

static void begin(struct local_inst *li, enum local_op op)
{
    li->op = op;
    li->base.busy = true;
    li->base.op_started_ms = pw_clock_mono_ms();
}

/* ---- page-cache pin ---------------------------------------------------------------- */

/* The model file the engine will open: the spec's path, else the model cache. */
static void resolve_model(const struct pw_spec *s, char *path, size_t cap)
{
    if (s->model.path) {
        snprintf(path, cap, "%s", s->model.path);
        return;
    }
    const char *dir = getenv("PARKWAY_MODEL_DIR");
    const char *home = getenv("HOME");
    const char *file = s->model.source.file ? strrchr(s->model.source.file, '/') : NULL;
    file = file ? file + 1 : (s->model.source.file ? s->model.source.file : "");
    if (dir && *dir)
        snprintf(path, cap, "%s/%s", dir, file);
    else
        snprintf(path, cap, "%s/.cache/parkway/models/%s", home ? home : ".", file);
}

/*
 * Forks a process that maps the model, asks the kernel to read it in (MADV_WILLNEED),
 * locks it (mlock; best effort: without CAP_IPC_LOCK or enough RLIMIT_MEMLOCK the pages
 * are only mapped, which still keeps them recently used) and waits for SIGKILL. A process
 * and not the scaler itself, so a large mlock never blocks the event loop.
 */
static void pin_start(struct local_inst *li)
{
    if (li->pin_pid > 0 || !li->model_path[0])
        return;
    pid_t pid = fork();
    if (pid < 0) {
        PW_LOG_WARN("event=pin_failed replica=%s errno=%d", li->base.id, errno);
        return;
    }
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        int fd = open(li->model_path, O_RDONLY | O_CLOEXEC);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) != 0 || st.st_size <= 0)
            _exit(1);
        void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED)
            _exit(1);
        madvise(m, (size_t)st.st_size, MADV_WILLNEED);
        if (mlock(m, (size_t)st.st_size) != 0) {
            /* No lock: touch every page once so it is at least resident and recent. */
            volatile const unsigned char *b = m;
            unsigned sum = 0;
            for (off_t o = 0; o < st.st_size; o += 4096)
                sum += b[o];
            (void)sum;
        }
        for (;;)
            pause();
    }
    li->pin_pid = pid;
    PW_LOG_INFO("event=model_pinned replica=%s pid=%d model=%s", li->base.id, (int)pid,
                li->model_path);
}

static void pin_stop(struct local_inst *li)
{
    if (li->pin_pid <= 0)
        return;
    kill(li->pin_pid, SIGKILL);
    int status;
    while (waitpid(li->pin_pid, &status, 0) < 0 && errno == EINTR)
        ;
    li->pin_pid = 0;
}

/* ---- the engine process ------------------------------------------------------------ */

static void on_engine_exit(struct scaler_child *c, const struct scaler_child_result *res,
                           void *userdata);

static enum pw_err engine_start(struct local_inst *li)
{
    struct scaler_provider *p = &li->lp->base;
    char *argv[LOCAL_ARGV_MAX] = {(char *)p->env.engine_path,
                                  "--spec",
                                  (char *)li->spec->origin,
                                  "--redis",
                                  (char *)p->env.redis_url,
                                  "--worker-id",
                                  li->base.id};
    size_t argc = 7;
    for (size_t i = 0; i < p->env.n_engine_args && argc + 1 < LOCAL_ARGV_MAX; i++)
        argv[argc++] = (char *)p->env.engine_args[i];
    argv[argc] = NULL;
    struct scaler_child_opts o = {
        .name = li->base.id,
        .argv = argv,
        .cb = on_engine_exit,
        .userdata = li,
    };
    enum pw_err err = scaler_child_start(p->env.children, &o, &li->engine);
    if (err) {
        snprintf(li->base.detail, sizeof li->base.detail, "cannot start %s: %s", p->env.engine_path,
                 pw_err_desc(err));
        return err;
    }
    li->term_sent = false;
    li->sig_want = 0;
    li->park_sent_ms = 0;
    snprintf(li->base.address, sizeof li->base.address, "pid %d",
             (int)scaler_child_pid(li->engine));
    PW_LOG_INFO("event=engine_started replica=%s function=%s pid=%d", li->base.id,
                li->base.function, (int)scaler_child_pid(li->engine));
    return PW_OK;
}

static void on_kill_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct local_inst *li = arg;
    if (li->engine) {
        PW_LOG_WARN("event=engine_kill replica=%s reason=drain_timeout", li->base.id);
        scaler_child_signal(li->engine, SIGKILL, true);
    }
}

/* SIGTERM (the engine drains and exits), with a SIGKILL deadline. */
static void engine_stop(struct local_inst *li, uint32_t kill_after_ms)
{
    if (!li->engine)
        return;
    if (!li->term_sent) {
        scaler_child_signal(li->engine, SIGTERM, false);
        li->term_sent = true;
    }
    struct timeval tv = {kill_after_ms / 1000, (kill_after_ms % 1000) * 1000};
    evtimer_add(li->ev_kill, &tv);
}

/* ---- parked mode: signals and the heartbeat ----------------------------------------- */

/* True when pid has a handler for sig (SigCgt of /proc/PID/status). Without /proc, true:
 * the engine installs its handlers before it loads, long before any park. */
static bool engine_catches(pid_t pid, int sig)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return true;
    bool yes = false;
    unsigned long long mask = 0;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "SigCgt: %llx", &mask) == 1) {
            yes = (mask >> (sig - 1)) & 1u;
            break;
        }
    }
    fclose(f);
    return yes;
}

static void poll_arm(struct local_inst *li)
{
    static const struct timeval tv = {0, LOCAL_POLL_MS * 1000};
    evtimer_add(li->ev_poll, &tv);
}

/* Sends the wanted park/unpark signal if the engine catches it yet; else the poll retries. */
static void deliver(struct local_inst *li)
{
    if (!li->sig_want || !li->engine)
        return;
    if (!engine_catches(scaler_child_pid(li->engine), li->sig_want)) {
        poll_arm(li);
        return;
    }
    scaler_child_signal(li->engine, li->sig_want, false);
    if (li->sig_want == SIGUSR1)
        li->park_sent_ms = pw_clock_wall_ms();
    PW_LOG_INFO("event=engine_signal replica=%s signal=%s", li->base.id,
                li->sig_want == SIGUSR1 ? "park" : "unpark");
    li->sig_want = 0;
}

/* Asks the engine to park (it drains first), once per park. */
static void want_park(struct local_inst *li)
{
    if (li->park_sent_ms || li->sig_want == SIGUSR1)
        return;
    li->sig_want = SIGUSR1;
    deliver(li);
}

static void local_inst_free(struct local_inst *li);

/* HGET of the engine's heartbeat while a park runs: PARKED, written after our SIGUSR1,
 * completes it (the engine writes it once nothing it took is left unacknowledged). */
static void on_heartbeat(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                         const char *errstr, void *ud)
{
    (void)r;
    (void)errstr;
    struct local_inst *li = ud;
    li->hget_out = false;
    if (li->released) {
        local_inst_free(li);
        return;
    }
    if (err != PW_OK || !reply || reply->type != REDIS_REPLY_STRING || li->op != LOCAL_OP_PARK ||
        !li->engine || !li->park_sent_ms)
        return;
    Parkway__WorkerStatus *ws = NULL;
    if (pw_proto_unpack_worker(reply->str, reply->len, 0, &ws) != PW_OK)
        return;
    bool parked = ws->state == PARKWAY__WORKER_STATE__WORKER_STATE_PARKED &&
                  ws->last_heartbeat_unix_ms >= li->park_sent_ms &&
                  ws->pid == (uint32_t)scaler_child_pid(li->engine);
    pw_proto_free_worker(ws);
    if (!parked)
        return;
    evtimer_del(li->ev_poll);
    li->base.state = SCALER_INST_PARKED;
    snprintf(li->base.address, sizeof li->base.address, "pid %d (parked)",
             (int)scaler_child_pid(li->engine));
    complete(li, PW_OK);
}

static void on_poll(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct local_inst *li = arg;
    deliver(li);
    if (li->op != LOCAL_OP_PARK || !li->engine)
        return;
    if (pw_clock_mono_ms() - li->base.op_started_ms > LOCAL_PARK_KILL_MS) {
        /* Never parked (a stuck answer): stop it; its exit completes the park without a
         * process, and its unacknowledged entries go to the next engine's stale-claim. */
        PW_LOG_WARN("event=park_timeout replica=%s", li->base.id);
        engine_stop(li, LOCAL_KILL_MS);
        return;
    }
    if (li->park_sent_ms && !li->hget_out &&
        pw_redis_command(li->lp->redis, on_heartbeat, li, "HGET", li->key_workers, li->base.id,
                         NULL) == PW_OK)
        li->hget_out = true;
    poll_arm(li);
}

static void on_engine_exit(struct scaler_child *c, const struct scaler_child_result *res,
                           void *userdata)
{
    (void)c;
    struct local_inst *li = userdata;
    li->engine = NULL;
    li->sig_want = 0;
    li->park_sent_ms = 0;
    evtimer_del(li->ev_kill);
    evtimer_del(li->ev_poll);
    PW_LOG_INFO("event=engine_exited replica=%s code=%d ms=%llu", li->base.id, res->exit_code,
                (unsigned long long)res->elapsed_ms);
    switch (li->op) {
    case LOCAL_OP_PARK:
        /* Parked without a process (see the top of the file). */
        pin_start(li);
        li->base.state = SCALER_INST_PARKED;
        snprintf(li->base.address, sizeof li->base.address, "parked");
        complete(li, PW_OK);
        return;
    case LOCAL_OP_TERMINATE:
        li->base.state = SCALER_INST_TERMINATED;
        complete(li, PW_OK);
        return;
    default:
        break;
    }
    if (li->base.state == SCALER_INST_DRAINING && res->exit_code == 0)
        return; /* stopped while draining; the park (without a process) or terminate follows */
    /* Unasked: the engine crashed or gave up (bad model, lost Redis). */
    li->base.state = SCALER_INST_FAILED;
    snprintf(li->base.detail, sizeof li->base.detail, "engine exited with %s %d%s",
             WIFSIGNALED(res->status) ? "signal" : "code",
             WIFSIGNALED(res->status) ? WTERMSIG(res->status) : res->exit_code,
             res->exit_code == 2 ? " (bad spec, model or flags)" : "");
    if (li->op != LOCAL_OP_NONE) {
        complete(li, PW_ERR_IO);
        return;
    }
    struct scaler_provider *p = &li->lp->base;
    p->env.on_event(p, &li->base, SCALER_PROVIDER_EV_EXIT, PW_ERR_IO, p->env.userdata);
}

/* ---- operations -------------------------------------------------------------------- */

static const struct scaler_offer *local_offers(struct scaler_provider *p, size_t *n)
{
    *n = 1;
    return &((struct local_provider *)p)->offer;
}

static enum pw_err local_provision(struct scaler_provider *p, const struct scaler_offer *offer,
                                   bool spot, const struct pw_spec *spec, const char *replica_id,
                                   struct scaler_instance **out)
{
    struct local_provider *lp = (struct local_provider *)p;
    if (strlen(replica_id) > SCALER_REPLICA_ID_MAX)
        return PW_ERR_INVAL;
    struct local_inst *li = calloc(1, sizeof *li);
    if (!li)
        return PW_ERR_NOMEM;
    li->lp = lp;
    li->spec = spec;
    li->ev_report = evtimer_new(p->env.base, on_report, li);
    li->ev_kill = evtimer_new(p->env.base, on_kill_timer, li);
    li->ev_poll = evtimer_new(p->env.base, on_poll, li);
    if (!li->ev_report || !li->ev_kill || !li->ev_poll ||
        pw_key_workers(li->key_workers, sizeof li->key_workers, spec->name) != PW_OK) {
        local_inst_free(li);
        return PW_ERR_NOMEM;
    }
    snprintf(li->base.id, sizeof li->base.id, "%s", replica_id);
    snprintf(li->base.function, sizeof li->base.function, "%s", spec->name);
    li->base.offer = offer ? *offer : lp->offer;
    li->base.spot = spot;
    resolve_model(spec, li->model_path, sizeof li->model_path);
    li->base.state = SCALER_INST_PROVISIONING;
    begin(li, LOCAL_OP_PROVISION);
    enum pw_err err = engine_start(li);
    if (err) {
        local_inst_free(li);
        return err;
    }
    li->base.state = SCALER_INST_RUNNING;
    complete(li, PW_OK);
    *out = &li->base;
    return PW_OK;
}

static enum pw_err local_drain(struct scaler_provider *p, struct scaler_instance *inst)
{
    (void)p;
    struct local_inst *li = (struct local_inst *)inst;
    if (inst->busy || (inst->state != SCALER_INST_RUNNING && inst->state != SCALER_INST_DRAINING))
        return PW_ERR_AGAIN;
    begin(li, LOCAL_OP_DRAIN);
    inst->state = SCALER_INST_DRAINING;
    /* The engine's park drains: it takes nothing new, finishes, then parks itself. */
    if (li->engine && !li->term_sent)
        want_park(li);
    complete(li, PW_OK);
    return PW_OK;
}

static enum pw_err local_park(struct scaler_provider *p, struct scaler_instance *inst)
{
    (void)p;
    struct local_inst *li = (struct local_inst *)inst;
    if (inst->busy || (inst->state != SCALER_INST_RUNNING && inst->state != SCALER_INST_DRAINING))
        return PW_ERR_AGAIN;
    begin(li, LOCAL_OP_PARK);
    inst->state = SCALER_INST_DRAINING;
    if (li->engine && !li->term_sent) {
        want_park(li);
        poll_arm(li); /* the PARKED heartbeat completes the park */
        return PW_OK;
    }
    if (li->engine) {
        engine_stop(li, LOCAL_KILL_MS); /* already stopping: the exit completes the park */
        return PW_OK;
    }
    pin_start(li);
    inst->state = SCALER_INST_PARKED;
    snprintf(inst->address, sizeof inst->address, "parked");
    complete(li, PW_OK);
    return PW_OK;
}

static enum pw_err local_unpark(struct scaler_provider *p, struct scaler_instance *inst)
{
    (void)p;
    struct local_inst *li = (struct local_inst *)inst;
    if (inst->busy || inst->state != SCALER_INST_PARKED)
        return PW_ERR_AGAIN;
    begin(li, LOCAL_OP_UNPARK);
    if (li->engine) {
        /* A parked engine has its handlers: it reads again at once. */
        li->sig_want = SIGUSR2;
        li->park_sent_ms = 0;
        deliver(li);
        inst->state = SCALER_INST_RUNNING;
        inst->detail[0] = '\0';
        snprintf(inst->address, sizeof inst->address, "pid %d", (int)scaler_child_pid(li->engine));
        complete(li, PW_OK);
        return PW_OK;
    }
    enum pw_err err = engine_start(li);
    if (err) {
        li->op = LOCAL_OP_NONE;
        inst->busy = false;
        return err;
    }
    /* The engine maps the file at once; the pages are resident, the pin can go. */
    pin_stop(li);
    inst->state = SCALER_INST_RUNNING;
    inst->detail[0] = '\0';
    complete(li, PW_OK);
    return PW_OK;
}

static enum pw_err local_terminate(struct scaler_provider *p, struct scaler_instance *inst)
{
    (void)p;
    struct local_inst *li = (struct local_inst *)inst;
    if (li->op == LOCAL_OP_TERMINATE)
        return PW_OK; /* already on its way */
    /* Supersede whatever runs: its report is replaced by the terminate report. */
    evtimer_del(li->ev_report);
    evtimer_del(li->ev_poll);
    li->sig_want = 0;
    begin(li, LOCAL_OP_TERMINATE);
    pin_stop(li);
    if (li->engine) {
        engine_stop(li, LOCAL_KILL_MS); /* the exit completes the terminate */
        return PW_OK;
    }
    inst->state = SCALER_INST_TERMINATED;
    complete(li, PW_OK);
    return PW_OK;
}

static void local_release(struct scaler_provider *p, struct scaler_instance *inst)
{
    (void)p;
    if (!inst)
        return;
    struct local_inst *li = (struct local_inst *)inst;
    if (li->engine) {
        /* Only on the exit path of --leave-instances: the engine drains and exits when
         * the scaler goes (SIGTERM now, and its parent-death signal). */
        scaler_child_signal(li->engine, SIGTERM, false);
        PW_LOG_WARN("event=engine_abandoned replica=%s", inst->id);
    }
    pin_stop(li);
    evtimer_del(li->ev_report);
    evtimer_del(li->ev_kill);
    evtimer_del(li->ev_poll);
    li->engine = NULL;
    if (li->hget_out) {
        li->released = true; /* the heartbeat callback frees it */
        return;
    }
    local_inst_free(li);
}

static void local_inst_free(struct local_inst *li)
{
    if (li->ev_report)
        event_free(li->ev_report);
    if (li->ev_kill)
        event_free(li->ev_kill);
    if (li->ev_poll)
        event_free(li->ev_poll);
    free(li);
}

static void local_destroy(struct scaler_provider *p)
{
    if (!p)
        return;
    /* Outstanding heartbeat reads are cancelled here: their callbacks free released
     * instances. */
    pw_redis_destroy(((struct local_provider *)p)->redis);
    free(p);
}

static const struct scaler_provider_ops local_ops = {
    .name = "local",
    .offers = local_offers,
    .provision = local_provision,
    .drain = local_drain,
    .park = local_park,
    .unpark = local_unpark,
    .terminate = local_terminate,
    .status = NULL,
    .release = local_release,
    .destroy = local_destroy,
};

/* ---- the machine as an offer ------------------------------------------------------- */

static uint64_t meminfo_total(void)
{
    FILE *f = fopen("/proc/meminfo", "re");
    if (!f)
        return 0;
    char line[256];
    unsigned long long kb = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemTotal: %llu kB", &kb) == 1)
            break;
    fclose(f);
    return (uint64_t)kb * 1024;
}

/* Name and memory of GPU 0 from nvidia-smi; false when absent or it fails. */
static bool nvidia_smi(char *name, size_t cap, uint64_t *mem_bytes)
{
    FILE *f = popen("nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits "
                    "2>/dev/null",
                    "re");
    if (!f)
        return false;
    char line[256] = "";
    bool ok = fgets(line, sizeof line, f) != NULL;
    pclose(f);
    char *comma = ok ? strrchr(line, ',') : NULL;
    if (!comma)
        return false;
    *comma = '\0';
    unsigned long long mib = strtoull(comma + 1, NULL, 10);
    *mem_bytes = (uint64_t)mib << 20;
    size_t j = 0;
    for (const char *s = line; *s && j + 1 < cap; s++) {
        char ch = *s;
        if (ch >= 'A' && ch <= 'Z')
            ch = (char)(ch - 'A' + 'a');
        name[j++] = (ch == ' ') ? '-' : ch;
    }
    name[j] = '\0';
    return mib > 0;
}

void scaler_provider_local_offer(struct scaler_offer *o)
{
    memset(o, 0, sizeof *o);
    snprintf(o->provider, sizeof o->provider, "local");
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    o->cpu_millicores = (uint32_t)(cpus > 0 ? cpus : 1) * 1000;
    o->memory_bytes = meminfo_total();
    if (access("/dev/nvidia0", F_OK) == 0) {
        o->gpu_count = 1;
        if (!nvidia_smi(o->gpu_model, sizeof o->gpu_model, &o->gpu_memory_bytes))
            snprintf(o->gpu_model, sizeof o->gpu_model, "nvidia");
        snprintf(o->instance_type, sizeof o->instance_type, "local-gpu");
    } else {
        snprintf(o->instance_type, sizeof o->instance_type, "local-cpu");
    }
    /* Measured on the 2-core dev machine with the default model (docs/internals/scaler.md):
     * unpark is a signal to a loaded engine. */
    o->provision_ms = 1500;
    o->unpark_ms = 50;
}

enum pw_err scaler_provider_local_create(const struct scaler_provider_env *env,
                                         struct scaler_provider **out, char *errbuf, size_t errcap)
{
    if (!env || !env->base || !env->children || !env->on_event || !env->engine_path ||
        !env->redis_url) {
        snprintf(errbuf, errcap, "local provider: incomplete environment");
        return PW_ERR_INVAL;
    }
    if (access(env->engine_path, X_OK) != 0) {
        snprintf(errbuf, errcap, "local provider: engine %s: %s", env->engine_path,
                 strerror(errno));
        return PW_ERR_CONFIG;
    }
    struct local_provider *lp = calloc(1, sizeof *lp);
    if (!lp)
        return PW_ERR_NOMEM;
    lp->base.ops = &local_ops;
    lp->base.env = *env;
    struct pw_redis_opts ro = {.name = "local-provider"};
    enum pw_err err = pw_redis_create(env->base, env->redis_url, &ro, &lp->redis, errbuf, errcap);
    if (err) {
        free(lp);
        return err;
    }
    scaler_provider_local_offer(&lp->offer);
    *out = &lp->base;
    return PW_OK;
}
