"""End-to-end: a 1,000-line batch survives restarts of every component of `parkway up`.

Starts the stack like test_openai_sdk.py (free loopback port, temporary state directory,
the real default model), submits a 1,000-line chat batch with the official OpenAI SDK and,
while it runs, stops each component in turn:

  router   SIGKILL          `parkway up` restarts it; its batch lock expires (30 s) and
                            the new router's coordinator takes the batch over;
  engine   SIGKILL          every engine the scaler runs (so that it must start a new one
                            whatever its policy wants for batch-only demand); their
                            unacknowledged lines are claimed by the new engine after the
                            stale time (15 s);
  scaler   SIGKILL          `parkway up` restarts it; its engines get SIGTERM (parent-death
                            signal), drain and exit; the new scaler starts new ones;
  redis    SIGTERM          `parkway up` restarts it; it reloads its AOF. SIGTERM and not
                            SIGKILL: with `appendfsync everysec` a SIGKILL can, while a
                            slow fsync postpones the AOF write, lose up to ~2 s of
                            acknowledged writes (see docs/internals/batch.md).
  all      all at once      router, scaler and engines SIGKILL, redis SIGTERM.

Then checks that the batch completed with exactly one result line per custom_id (none
missing, none twice) in OpenAI's batch output format, good lines in the output file and
the deliberately too-long prompts in the error file, both in input order; that `parkway up`
logged each restart and is still running; and that no engine of an earlier scaler was
left behind. Exit 77 = skipped (no openai package or no model).
"""
import argparse
import json
import os
import re
import signal
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_openai_sdk as stack  # noqa: E402  (exits 77 without the openai package)

import openai  # noqa: E402
from openai import OpenAI  # noqa: E402

MODEL = stack.MODEL
ENDPOINT = "/v1/chat/completions"
N_LINES = 1000
MAX_TOKENS = 2
BAD_EVERY = 200        # every 200th line's prompt is longer than the context (2048)
DONE_TIMEOUT_S = 420   # the whole batch, restarts included
BACK_TIMEOUT_S = 60    # a killed component is running again
# (fraction of lines finished, what to stop)
PHASES = [(0.10, "router"), (0.30, "engine"), (0.50, "scaler"), (0.65, "redis"), (0.80, "all")]


def line_ids(n):
    return ["req-%04d" % i for i in range(n)]


def is_bad(i):
    return i % BAD_EVERY == BAD_EVERY - 1


def batch_input(n):
    lines = []
    for i, cid in enumerate(line_ids(n)):
        if is_bad(i):
            content = "word " * 2500  # about 2500 tokens: context_length_exceeded
        else:
            content = "Say the number %d." % i
        lines.append(json.dumps({
            "custom_id": cid, "method": "POST", "url": ENDPOINT,
            "body": {"model": MODEL, "messages": [{"role": "user", "content": content}],
                     "max_tokens": MAX_TOKENS, "temperature": 0},
        }))
    return ("\n".join(lines) + "\n").encode()


# ---- processes, from /proc only ------------------------------------------------------

def proc_stat(pid):
    """(comm, ppid) of pid, or None when it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            s = f.read()
    except OSError:
        return None
    comm = s[s.index("(") + 1:s.rindex(")")]
    ppid = int(s[s.rindex(")") + 2:].split()[1])
    return comm, ppid


def all_pids():
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def children(ppid, comm):
    out = []
    for pid in all_pids():
        st = proc_stat(pid)
        if st and st[1] == ppid and st[0] == comm:
            out.append(pid)
    return out


def engines_of_stack(state):
    """[(pid, ppid)] of every parkway-engine whose command line names this state dir."""
    out = []
    for pid in all_pids():
        st = proc_stat(pid)
        if not st or st[0] != "parkway-engine":
            continue
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if state in cmd:
            out.append((pid, st[1]))
    return out


class BatchRestart(unittest.TestCase):
    client = None

    @classmethod
    def setUpClass(cls):
        cls.client = stack.start_stack()
        env = stack.STACK["env"]
        # Polls must not hang on a router that was just killed.
        cls.poller = OpenAI(base_url=env["OPENAI_BASE_URL"], api_key=env["OPENAI_API_KEY"],
                            max_retries=0, timeout=10)

    @classmethod
    def tearDownClass(cls):
        stack.stop_stack()

    # -- helpers --

    def up_pid(self):
        return stack.STACK["proc"].pid

    def retrieve(self, batch_id):
        """The batch, or None while the router or Redis is coming back."""
        try:
            return self.poller.batches.retrieve(batch_id)
        except (openai.APIConnectionError, openai.APITimeoutError, openai.APIStatusError):
            return None

    def wait_child(self, comm, not_pids=()):
        """Pid of up's child comm, once one runs that is not in not_pids."""
        deadline = time.time() + BACK_TIMEOUT_S
        while time.time() < deadline:
            self.assertIsNone(stack.STACK["proc"].poll(), "parkway up exited")
            got = [p for p in children(self.up_pid(), comm) if p not in not_pids]
            if got:
                return got[0]
            time.sleep(0.1)
        self.fail("%s did not come back within %d s" % (comm, BACK_TIMEOUT_S))

    def wait_engine(self, not_pids=()):
        """Pid of an engine of the current scaler that is not in not_pids."""
        deadline = time.time() + BACK_TIMEOUT_S
        while time.time() < deadline:
            scaler = self.wait_child("parkway-scaler")
            got = [p for p in children(scaler, "parkway-engine") if p not in not_pids]
            if got:
                return got[0]
            time.sleep(0.1)
        self.fail("no new engine within %d s" % BACK_TIMEOUT_S)

    def stop(self, what):
        up = self.up_pid()
        router = self.wait_child("parkway-router")
        scaler = self.wait_child("parkway-scaler")
        redis = self.wait_child("redis-server")
        engines = children(scaler, "parkway-engine")
        print("  stopping %s (router %d, scaler %d, redis %d, engines %s)"
              % (what, router, scaler, redis, engines), file=sys.stderr, flush=True)
        if what in ("router", "all"):
            os.kill(router, signal.SIGKILL)
        if what in ("engine", "all"):
            for e in engines:
                os.kill(e, signal.SIGKILL)
        if what in ("scaler", "all"):
            os.kill(scaler, signal.SIGKILL)
        if what in ("redis", "all"):
            os.kill(redis, signal.SIGTERM)
        # Everything stopped is running again before the next phase.
        if what in ("router", "all"):
            self.wait_child("parkway-router", (router,))
        if what in ("scaler", "all"):
            self.wait_child("parkway-scaler", (scaler,))
        if what in ("redis", "all"):
            self.wait_child("redis-server", (redis,))
        if what == "engine":
            self.wait_engine(engines)
        self.assertEqual(self.up_pid(), up)

    def read_lines(self, file_id):
        for _ in range(10):
            try:
                text = self.client.files.content(file_id).text
                return [json.loads(l) for l in text.splitlines() if l.strip()]
            except (openai.APIConnectionError, openai.APIStatusError):
                time.sleep(1)
        self.fail("cannot read file %s" % file_id)

    def check_line_shape(self, l, ok):
        self.assertEqual(set(l), {"id", "custom_id", "response", "error"}, l)
        self.assertTrue(l["id"].startswith("batch_req_"), l)
        resp = l["response"]
        self.assertEqual(set(resp), {"status_code", "request_id", "body"}, l)
        self.assertIsInstance(resp["request_id"], str)
        body = resp["body"]
        if ok:
            self.assertIsNone(l["error"])
            self.assertEqual(resp["status_code"], 200)
            self.assertEqual(body["object"], "chat.completion")
            self.assertEqual(body["model"], MODEL)
            self.assertEqual(body["choices"][0]["message"]["role"], "assistant")
            self.assertLessEqual(body["usage"]["completion_tokens"], MAX_TOKENS)
        else:
            self.assertEqual(resp["status_code"], 400, l)
            self.assertEqual(body["error"]["code"], "context_length_exceeded", l)
            self.assertTrue(body["error"]["message"])

    # -- the test --

    def test_batch_survives_restarts(self):
        n = ARGS.lines
        ids = line_ids(n)
        bad = [cid for i, cid in enumerate(ids) if is_bad(i)]
        good = [cid for i, cid in enumerate(ids) if not is_bad(i)]
        t0 = time.time()
        f = self.client.files.create(file=("restart.jsonl", batch_input(n), "application/jsonl"),
                                     purpose="batch")
        b = self.client.batches.create(input_file_id=f.id, endpoint=ENDPOINT,
                                       completion_window="24h")
        phases = [(frac, what) for frac, what in PHASES if what in ARGS.stop.split(",")]
        done_phases = []
        deadline = t0 + DONE_TIMEOUT_S
        last = None
        while True:
            got = self.retrieve(b.id)
            if got is not None:
                last = got
                if got.status in ("completed", "failed", "expired", "cancelled"):
                    break
                rc = got.request_counts
                finished = (rc.completed + rc.failed) if rc else 0
                if phases and finished >= phases[0][0] * n:
                    frac, what = phases.pop(0)
                    print("  %5.1f s: %d/%d lines finished" % (time.time() - t0, finished, n),
                          file=sys.stderr, flush=True)
                    self.stop(what)
                    done_phases.append(what)
            self.assertLess(time.time(), deadline, "batch not done in %d s: %s"
                            % (DONE_TIMEOUT_S, last))
            time.sleep(0.25)
        elapsed = time.time() - t0
        print("  batch %s in %.1f s after stopping %s" % (last.status, elapsed, done_phases),
              file=sys.stderr, flush=True)
        self.assertEqual(phases, [], "the batch ended before every restart ran")

        b = last
        self.assertEqual(b.status, "completed", b)
        self.assertEqual(b.request_counts.total, n)
        self.assertEqual(b.request_counts.completed, len(good))
        self.assertEqual(b.request_counts.failed, len(bad))
        self.assertEqual(b.request_counts.completed + b.request_counts.failed, n)

        out = self.read_lines(b.output_file_id)
        err = self.read_lines(b.error_file_id) if bad else []
        # Exactly one line per custom_id: none twice, none missing, each in input order.
        self.assertEqual([l["custom_id"] for l in out], good)
        self.assertEqual([l["custom_id"] for l in err], bad)
        self.assertEqual(len(out) + len(err), n)
        for l in out:
            self.check_line_shape(l, True)
        for l in err:
            self.check_line_shape(l, False)
        self.assertEqual(len({l["id"] for l in out + err}), n)
        self.assertEqual(self.client.files.retrieve(b.output_file_id).purpose, "batch_output")

        # parkway up restarted what it runs, and is still up.
        self.assertIsNone(stack.STACK["proc"].poll())
        with open(os.path.join(stack.STACK["state"], "up.log")) as fh:
            log = fh.read()
        for what in set(done_phases):
            for name in {"router": ["router"], "scaler": ["scaler"], "redis": ["redis"],
                         "all": ["router", "scaler", "redis"], "engine": []}[what]:
                self.assertRegex(log, r"event=child_restarted name=%s pid=\d+ exits=\d+"
                                 % re.escape(name))

        # The engines of a killed scaler drained and exited: every engine left is a child of
        # the scaler that runs now (none orphaned, none counted twice).
        scaler = self.wait_child("parkway-scaler")
        deadline = time.time() + 30
        while True:
            strays = [(p, pp) for p, pp in engines_of_stack(stack.STACK["state"]) if pp != scaler]
            if not strays or time.time() > deadline:
                break
            time.sleep(0.5)
        self.assertEqual(strays, [], "engines left by an earlier scaler")

        # The stack still serves interactive requests.
        r = self.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        self.assertEqual(r.object, "chat.completion")


ARGS = None


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--parkway", required=True)
    p.add_argument("--functions", required=True)
    p.add_argument("--lines", type=int, default=N_LINES)
    p.add_argument("--stop", default=",".join(w for _, w in PHASES),
                   help="comma-separated components to stop mid-batch")
    ARGS, rest = p.parse_known_args()
    stack.ARGS = ARGS
    if not os.path.exists(stack.model_path()):
        print("skip: the default model is not in the cache (tools/fetch-model.sh)", file=sys.stderr)
        sys.exit(77)
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()
