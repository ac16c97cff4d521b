"""End-to-end: the Files and Batches APIs of `parkway up`, driven by the official OpenAI SDK.

Starts the stack like test_openai_sdk.py (free loopback ports, temporary state directory,
the real default model) and checks what a Batch API client sees: upload, batch creation,
polling to `completed`, the output file in input order, listing, a batch that fails
validation with its line numbers, and tenancy (another tenant's key gets 404). Exit 77 =
skipped (no openai package or no model).
"""
import argparse
import json
import os
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_openai_sdk as stack  # noqa: E402  (exits 77 without the openai package)

import openai  # noqa: E402
from openai import OpenAI  # noqa: E402

MODEL = stack.MODEL
ENDPOINT = "/v1/chat/completions"
POLL_TIMEOUT_S = 120
PROMPTS = [
    ("alpha", "What is the capital of France?"),
    ("bravo", "Name a colour."),
    ("charlie", "Say hello."),
    ("delta", "Count to three."),
    ("echo", "What is 2 + 2?"),
]


def chat_line(custom_id, content, max_tokens=8):
    return json.dumps({
        "custom_id": custom_id, "method": "POST", "url": ENDPOINT,
        "body": {"model": MODEL, "messages": [{"role": "user", "content": content}],
                 "max_tokens": max_tokens, "temperature": 0},
    })


def jsonl(lines):
    return ("\n".join(lines) + "\n").encode()


class BatchSDK(unittest.TestCase):
    client = None
    other = None  # a key of another tenant
    _done = None  # (input file, completed batch), made once by completed_batch()

    @classmethod
    def setUpClass(cls):
        cls.client = stack.start_stack()
        env = stack.STACK["env"]
        r = subprocess.run(
            [stack.ARGS.parkway, "keys", "create", "--tenant", "other", "--redis",
             env["PARKWAY_REDIS_URL"]], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError("parkway keys create failed: " + r.stderr)
        cls.other = OpenAI(base_url=env["OPENAI_BASE_URL"], api_key=r.stdout.strip(),
                           max_retries=0, timeout=60)

    @classmethod
    def tearDownClass(cls):
        stack.stop_stack()

    def upload(self, data, name="batch.jsonl"):
        return self.client.files.create(file=(name, data, "application/jsonl"), purpose="batch")

    def wait(self, batch_id, final=("completed", "failed", "expired", "cancelled")):
        deadline = time.time() + POLL_TIMEOUT_S
        while True:
            b = self.client.batches.retrieve(batch_id)
            if b.status in final:
                return b
            if time.time() > deadline:
                self.fail("batch %s still %s after %d s: %s" % (batch_id, b.status,
                                                                POLL_TIMEOUT_S, b))
            time.sleep(0.5)

    def completed_batch(self):
        """Upload the PROMPTS file, run a batch on it to the end (once for the class)."""
        if BatchSDK._done is None:
            f = self.upload(jsonl([chat_line(cid, text) for cid, text in PROMPTS]))
            b = self.client.batches.create(input_file_id=f.id, endpoint=ENDPOINT,
                                           completion_window="24h",
                                           metadata={"suite": "e2e"})
            self.assertEqual(b.object, "batch")
            self.assertIn(b.status, ("validating", "in_progress", "finalizing", "completed"))
            self.assertEqual(b.input_file_id, f.id)
            self.assertEqual(b.endpoint, ENDPOINT)
            self.assertEqual(b.completion_window, "24h")
            BatchSDK._done = (f, self.wait(b.id))
        return BatchSDK._done

    def test_upload_file_object(self):
        data = jsonl([chat_line("only", "hi", 2)])
        f = self.upload(data, name="one.jsonl")
        self.assertEqual(f.object, "file")
        self.assertTrue(f.id.startswith("file-"))
        self.assertEqual(f.bytes, len(data))
        self.assertEqual(f.filename, "one.jsonl")
        self.assertEqual(f.purpose, "batch")
        self.assertEqual(f.status, "processed")
        self.assertEqual(self.client.files.content(f.id).content, data)
        g = self.client.files.retrieve(f.id)
        self.assertEqual((g.id, g.bytes, g.filename, g.purpose), (f.id, f.bytes, f.filename,
                                                                   f.purpose))
        d = self.client.files.delete(f.id)
        self.assertTrue(d.deleted)
        with self.assertRaises(openai.NotFoundError):
            self.client.files.retrieve(f.id)

    def test_batch_completes_in_input_order(self):
        f, b = self.completed_batch()
        self.assertEqual(b.status, "completed", b)
        self.assertEqual(b.request_counts.total, len(PROMPTS))
        self.assertEqual(b.request_counts.completed, len(PROMPTS))
        self.assertEqual(b.request_counts.failed, 0)
        self.assertIsNone(b.error_file_id)
        self.assertIsNotNone(b.output_file_id)
        for ts in ("created_at", "in_progress_at", "finalizing_at", "completed_at"):
            self.assertIsNotNone(getattr(b, ts), ts)
        self.assertLessEqual(b.created_at, b.completed_at)
        self.assertEqual(b.metadata, {"suite": "e2e"})

        out = self.client.files.retrieve(b.output_file_id)
        self.assertEqual(out.purpose, "batch_output")
        text = self.client.files.content(b.output_file_id).text
        lines = [json.loads(l) for l in text.splitlines() if l.strip()]
        self.assertEqual([l["custom_id"] for l in lines], [cid for cid, _ in PROMPTS])
        ids = set()
        for l in lines:
            self.assertIsNone(l["error"])
            ids.add(l["id"])
            resp = l["response"]
            self.assertEqual(resp["status_code"], 200)
            body = resp["body"]
            self.assertEqual(body["object"], "chat.completion")
            self.assertEqual(body["model"], MODEL)
            msg = body["choices"][0]["message"]
            self.assertEqual(msg["role"], "assistant")
            self.assertIsInstance(msg["content"], str)
            self.assertIn(body["choices"][0]["finish_reason"], ("stop", "length"))
            self.assertLessEqual(body["usage"]["completion_tokens"], 8)
            self.assertGreater(body["usage"]["prompt_tokens"], 0)
        self.assertEqual(len(ids), len(lines))  # batch_req ids are distinct

    def test_batch_answer_matches_interactive(self):
        # temperature 0: the batch lane gives the interactive answer.
        _, b = self.completed_batch()
        text = self.client.files.content(b.output_file_id).text
        first = json.loads(text.splitlines()[0])
        r = self.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPTS[0][1]}], max_tokens=8,
            temperature=0)
        self.assertEqual(first["response"]["body"]["choices"][0]["message"]["content"],
                         r.choices[0].message.content)

    def test_lists(self):
        f, b = self.completed_batch()
        file_ids = [x.id for x in self.client.files.list()]
        self.assertIn(f.id, file_ids)
        self.assertIn(b.output_file_id, file_ids)
        batch_files = [x.id for x in self.client.files.list(purpose="batch")]
        self.assertIn(f.id, batch_files)
        self.assertNotIn(b.output_file_id, batch_files)
        batches = list(self.client.batches.list(limit=100))
        self.assertIn(b.id, [x.id for x in batches])
        got = self.client.batches.retrieve(b.id)
        self.assertEqual((got.id, got.status, got.output_file_id),
                         (b.id, "completed", b.output_file_id))

    def test_invalid_line_fails_batch(self):
        data = jsonl([
            chat_line("ok-1", "hi", 2),
            "{this is not json",
            json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings",
                        "body": {"model": MODEL, "input": "x"}}),
            chat_line("ok-1", "duplicate id", 2),
        ])
        f = self.upload(data)
        b = self.client.batches.create(input_file_id=f.id, endpoint=ENDPOINT,
                                       completion_window="24h")
        b = self.wait(b.id)
        self.assertEqual(b.status, "failed", b)
        self.assertIsNotNone(b.failed_at)
        self.assertIsNone(b.output_file_id)
        errs = {e.line: e for e in b.errors.data}
        self.assertEqual(sorted(errs), [2, 3, 4], b.errors)
        self.assertEqual(errs[2].code, "invalid_json_line")
        self.assertEqual(errs[3].code, "invalid_url")
        self.assertEqual(errs[4].code, "duplicate_custom_id")
        for e in errs.values():
            self.assertTrue(e.message)

    def test_bad_batch_requests(self):
        f, _ = self.completed_batch()
        with self.assertRaises(openai.NotFoundError):
            self.client.batches.create(input_file_id="file-000000000000000000000000",
                                       endpoint=ENDPOINT, completion_window="24h")
        with self.assertRaises(openai.BadRequestError):
            self.client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings",
                                       completion_window="24h")
        with self.assertRaises(openai.NotFoundError):
            self.client.batches.retrieve("batch_nosuchbatch")
        with self.assertRaises(openai.BadRequestError):
            self.client.files.create(file=("empty.jsonl", b"\n\n", "application/jsonl"),
                                     purpose="batch")

    def test_other_tenant_gets_404(self):
        f, b = self.completed_batch()
        with self.assertRaises(openai.NotFoundError):
            self.other.batches.retrieve(b.id)
        with self.assertRaises(openai.NotFoundError):
            self.other.batches.cancel(b.id)
        for fid in (f.id, b.output_file_id):
            with self.assertRaises(openai.NotFoundError):
                self.other.files.retrieve(fid)
            with self.assertRaises(openai.NotFoundError):
                self.other.files.content(fid)
            with self.assertRaises(openai.NotFoundError):
                self.other.files.delete(fid)
        with self.assertRaises(openai.NotFoundError):
            self.other.batches.create(input_file_id=f.id, endpoint=ENDPOINT,
                                      completion_window="24h")
        self.assertNotIn(b.id, [x.id for x in self.other.batches.list()])
        self.assertNotIn(f.id, [x.id for x in self.other.files.list()])
        # The owner still sees both after the other tenant's attempts.
        self.assertEqual(self.client.files.retrieve(f.id).id, f.id)
        self.assertEqual(self.client.batches.retrieve(b.id).status, "completed")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--parkway", required=True)
    p.add_argument("--functions", required=True)
    stack.ARGS, rest = p.parse_known_args()
    if not os.path.exists(stack.model_path()):
        print("skip: the default model is not in the cache (tools/fetch-model.sh)", file=sys.stderr)
        sys.exit(77)
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()
