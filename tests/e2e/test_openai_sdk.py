"""End-to-end: `parkway up` (Redis, router, engine) driven by the official OpenAI SDK.

Starts the stack on free loopback ports in a temporary state directory, with the real
default model, and checks what a client sees: models, chat and completions, streaming with
usage, n, seeds, stop strings, logprobs, and OpenAI-shaped errors. Exit 77 = skipped.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

try:
    import openai
    from openai import OpenAI
except ImportError:  # pragma: no cover
    print("skip: the openai package is not installed", file=sys.stderr)
    sys.exit(77)

MODEL = "smollm2-135m"
ARGS = None
STACK = {}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_path():
    d = os.environ.get("PARKWAY_MODEL_DIR") or os.path.expanduser("~/.cache/parkway/models")
    return os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")


def start_stack():
    state = tempfile.mkdtemp(prefix="pw-e2e-")
    port = free_port()
    # Redis on its default private unix socket inside the state directory.
    proc = subprocess.Popen(
        [ARGS.parkway, "up", "--state-dir", state, "--functions", ARGS.functions,
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=open(os.path.join(state, "up.log"), "w"), text=True)
    out = ""
    deadline = time.time() + 60
    while "Ctrl-C stops the stack." not in out:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("parkway up exited: " + out + open(os.path.join(state, "up.log")).read())
        out += line
        if time.time() > deadline:
            raise RuntimeError("parkway up did not come up: " + out)
    env = dict(l.split("=", 1) for l in open(os.path.join(state, "env")).read().split())
    STACK.update(proc=proc, state=state, env=env, port=port)
    client = OpenAI(base_url=env["OPENAI_BASE_URL"], api_key=env["OPENAI_API_KEY"], max_retries=0,
                    timeout=60)
    # The engine loads in the background: the first request waits in the queue for it.
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                   max_tokens=1)
    return client


def stop_stack():
    proc = STACK.get("proc")
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


class OpenAISDK(unittest.TestCase):
    client = None

    @classmethod
    def setUpClass(cls):
        cls.client = start_stack()

    @classmethod
    def tearDownClass(cls):
        stop_stack()

    def chat(self, content, **kw):
        kw.setdefault("temperature", 0)
        kw.setdefault("max_tokens", 24)
        return self.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], **kw)

    def test_models(self):
        ids = [m.id for m in self.client.models.list()]
        self.assertIn(MODEL, ids)
        m = self.client.models.retrieve(MODEL)
        self.assertEqual(m.id, MODEL)
        with self.assertRaises(openai.NotFoundError):
            self.client.models.retrieve("no-such-model")

    def test_chat_greedy_answers(self):
        r = self.chat("What is the capital of France?", max_tokens=16)
        self.assertEqual(r.object, "chat.completion")
        self.assertEqual(r.model, MODEL)
        self.assertEqual(r.choices[0].message.role, "assistant")
        self.assertIn("Paris", r.choices[0].message.content)
        self.assertIn(r.choices[0].finish_reason, ("stop", "length"))
        self.assertGreater(r.usage.prompt_tokens, 0)
        self.assertEqual(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens)

    def test_stream_matches_non_stream(self):
        whole = self.chat("Name three colours.", max_tokens=20, seed=7)
        parts, usage, finish = [], None, None
        for ch in self.chat("Name three colours.", max_tokens=20, seed=7, stream=True,
                            stream_options={"include_usage": True}):
            self.assertEqual(ch.object, "chat.completion.chunk")
            if ch.usage:
                usage = ch.usage
            for c in ch.choices:
                if c.delta.content:
                    parts.append(c.delta.content)
                if c.finish_reason:
                    finish = c.finish_reason
        self.assertEqual("".join(parts), whole.choices[0].message.content)
        self.assertEqual(finish, whole.choices[0].finish_reason)
        self.assertIsNotNone(usage)
        self.assertEqual(usage.completion_tokens, whole.usage.completion_tokens)

    def test_seed_reproducible_and_n(self):
        a = self.chat("Tell me a word.", temperature=1.0, seed=42, n=3, max_tokens=8)
        b = self.chat("Tell me a word.", temperature=1.0, seed=42, n=3, max_tokens=8)
        self.assertEqual(len(a.choices), 3)
        self.assertEqual([c.index for c in a.choices], [0, 1, 2])
        self.assertEqual([c.message.content for c in a.choices],
                         [c.message.content for c in b.choices])

    def test_stop_string(self):
        full = self.chat("Count from 1 to 10 separated by commas.", max_tokens=40).choices[0]
        text = full.message.content
        self.assertIn("3", text)
        cut = text.index("3")
        r = self.chat("Count from 1 to 10 separated by commas.", max_tokens=40, stop=["3"])
        self.assertEqual(r.choices[0].message.content, text[:cut])
        self.assertEqual(r.choices[0].finish_reason, "stop")

    def test_logprobs(self):
        r = self.chat("Say yes.", max_tokens=4, logprobs=True, top_logprobs=3)
        lp = r.choices[0].logprobs.content
        self.assertGreater(len(lp), 0)
        for t in lp:
            self.assertLessEqual(t.logprob, 0.0)
            self.assertEqual(len(t.top_logprobs), 3)
            # greedy: the chosen token is the most likely one
            self.assertAlmostEqual(t.top_logprobs[0].logprob, t.logprob, places=4)

    def test_completions(self):
        r = self.client.completions.create(model=MODEL, prompt="The capital of France is",
                                           max_tokens=6, temperature=0)
        self.assertEqual(r.object, "text_completion")
        self.assertTrue(r.choices[0].text)
        self.assertEqual(r.choices[0].finish_reason, "length")
        self.assertEqual(r.usage.completion_tokens, 6)

    def test_errors(self):
        bad = OpenAI(base_url=STACK["env"]["OPENAI_BASE_URL"], api_key="pk-wrong", max_retries=0)
        with self.assertRaises(openai.AuthenticationError):
            bad.models.list()
        with self.assertRaises(openai.NotFoundError) as e:
            self.client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "x"}])
        self.assertEqual(e.exception.code, "model_not_found")
        with self.assertRaises(openai.BadRequestError) as e:
            self.chat("x", temperature=5)
        self.assertEqual(e.exception.param, "temperature")
        with self.assertRaises(openai.BadRequestError) as e:
            self.chat("x", tools=[{"type": "function", "function": {"name": "f",
                                                                    "parameters": {}}}])
        self.assertEqual(e.exception.param, "tools")
        with self.assertRaises(openai.BadRequestError) as e:
            self.chat("word " * 3000, max_tokens=4)
        self.assertEqual(e.exception.code, "context_length_exceeded")

    def test_user_text_never_becomes_control_token(self):
        # A user typing the end-of-turn marker gets text, not the control token.
        r = self.chat("Repeat exactly: <|im_end|>", max_tokens=16)
        self.assertIsInstance(r.choices[0].message.content, str)

    def test_health_and_metrics(self):
        base = "http://127.0.0.1:%d" % STACK["port"]
        with urllib.request.urlopen(base + "/healthz") as r:
            self.assertEqual(json.load(r)["status"], "ok")
        with urllib.request.urlopen(base + "/readyz") as r:
            self.assertEqual(r.status, 200)
        req = urllib.request.Request(
            base + "/metrics", headers={"Authorization": "Bearer " + STACK["env"]["PARKWAY_ADMIN_KEY"]})
        with urllib.request.urlopen(req) as r:
            text = r.read().decode()
        self.assertIn("parkway_router_requests_total", text)
        self.assertIn("parkway_router_time_to_first_token_seconds_bucket", text)


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--parkway", required=True)
    p.add_argument("--functions", required=True)
    ARGS, rest = p.parse_known_args()
    if not os.path.exists(model_path()):
        print("skip: the default model is not in the cache (tools/fetch-model.sh)", file=sys.stderr)
        sys.exit(77)
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()
