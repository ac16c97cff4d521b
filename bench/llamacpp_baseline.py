#!/usr/bin/env python3
"""llama.cpp baseline for bench/bench_engine.c: the same model, prompts and measurements.

Runs llama.cpp through llama-cpp-python's low-level API (llama_decode on explicit batches),
timing with time.perf_counter. Prints a table, then one JSON line with the keys of
bench_engine's JSON:
  {"bench":"llamacpp","prompt_tok_s_128":..,"prompt_tok_s_512":..,"decode_tok_s_pos0":..,
   "decode_tok_s_pos512":..,"agg_decode_tok_s_4":..,"agg_decode_tok_s_8":..,
   "agg_decode_tok_s_16":..,"load_ms":..,"peak_rss_mib":..,...}
Usage (benchmark-only venv, see tools/setup-bench-baseline.sh and bench/README.md):
  .venv-bench/bin/python bench/llamacpp_baseline.py [--model F.gguf] [--threads N] [--reps N]

What is measured, matching bench_engine:
  - Prompts are random token ids from the same xorshift64 generator, seed and call order as
    bench_engine (ids >= 256, every prompt distinct), so both benchmarks feed identical ids.
  - Generation is greedy (argmax of the logits) and ignores end-of-text.
  - prompt_tok_s_N: N prompt tokens in one llama_decode call (logits for the last row only,
    plus picking the first token), best of --reps, on an empty cache.
  - decode_tok_s_posP: a 1-token (pos0) or 512-token (pos512) prompt, then 128 generated
    tokens; the rate covers the 127 steps after the prompt step, as bench_engine counts only
    steps without prompt rows.
  - agg_decode_tok_s_S: S streams, each a distinct 128-token prompt (prefilled first, not
    timed), then 127 steps in which one llama_decode call carries one token of every stream
    (S sequence ids in one batch: llama.cpp batches several sequences natively).
  - load_ms: llama_model_load_from_file + llama_init_from_model (n_ctx 1024, 1 sequence),
    i.e. the wall time until the first llama_decode could run.
  - peak_rss_mib: getrusage ru_maxrss at the end, which includes the Python interpreter,
    numpy and the bindings (python_rss_mib says how much that was before the model loaded).
Contexts: single-stream tests use a context of n_ctx 1024 (one sequence); the aggregate tests
use a second context with --agg-ctx-per-seq cells per sequence (default 256 = 128 prompt +
128 generated) for 16 sequences and a per-sequence (non-unified) KV cache, so the KV cache
holds what the streams use, as bench_engine's paged cache does.
"""

import argparse
import ctypes
import json
import os
import resource
import sys
import time

try:
    import numpy as np
    import llama_cpp as lc
except ImportError as exc:  # pragma: no cover - environment problem
    sys.stderr.write(
        "llamacpp_baseline: %s\n  run tools/setup-bench-baseline.sh and use "
        ".venv-bench/bin/python\n" % exc
    )
    sys.exit(2)

MASK64 = (1 << 64) - 1
N_GEN = 128
MAX_STREAMS = 16


class TokenRng:
    """bench_engine's rand_token: xorshift64 with the same seed, ids in [256, n_vocab)."""

    def __init__(self, n_vocab):
        self.state = 0x2545F4914F6CDD1D
        self.n_vocab = n_vocab

    def token(self):
        s = self.state
        s ^= (s << 13) & MASK64
        s ^= s >> 7
        s ^= (s << 17) & MASK64
        self.state = s
        return 256 + s % (self.n_vocab - 256)

    def prompt(self, n):
        return [self.token() for _ in range(n)]


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def library_version():
    """llama-cpp-python's version and, where libggml exports them, ggml's version/commit."""
    info = {"llama_cpp_python": getattr(lc, "__version__", "?")}
    libdir = os.path.join(os.path.dirname(lc.__file__), "lib")
    for name in ("libggml-base.so", "libggml.so"):
        path = os.path.join(libdir, name)
        if not os.path.exists(path):
            continue
        try:
            lib = ctypes.CDLL(path)
            for sym in ("ggml_version", "ggml_commit"):
                fn = getattr(lib, sym, None)
                if fn is not None:
                    fn.restype = ctypes.c_char_p
                    info[sym] = fn().decode()
            break
        except OSError:
            pass
    return info


class Bench:
    def __init__(self, args):
        self.args = args
        self.model = None
        self.ctx = None
        self.batch = None
        self.n_vocab = 0

    # -- setup ------------------------------------------------------------------------------
    def new_context(self, n_ctx, n_seq, unified):
        p = lc.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = 512
        p.n_ubatch = 512
        p.n_seq_max = n_seq
        p.n_threads = self.args.threads
        p.n_threads_batch = self.args.threads
        p.no_perf = True
        if hasattr(p, "kv_unified"):
            p.kv_unified = unified
        if self.args.flash_attn != "auto":
            p.flash_attn_type = (
                lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
                if self.args.flash_attn == "on"
                else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        ctx = lc.llama_init_from_model(self.model, p)
        if not ctx:
            raise RuntimeError("llama_init_from_model failed (n_ctx %d, n_seq %d)" % (n_ctx, n_seq))
        return ctx

    def load(self):
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        t0 = time.perf_counter()
        self.model = lc.llama_model_load_from_file(self.args.model.encode(), mp)
        if not self.model:
            raise RuntimeError("cannot load %s" % self.args.model)
        self.ctx = self.new_context(1024, 1, True)
        load_ms = (time.perf_counter() - t0) * 1e3
        vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(vocab)
        self.batch = lc.llama_batch_init(512, 0, 1)
        return load_ms

    def switch_context(self, n_ctx, n_seq, unified):
        lc.llama_free(self.ctx)
        self.ctx = None
        self.ctx = self.new_context(n_ctx, n_seq, unified)

    def close(self):
        if self.batch is not None:
            lc.llama_batch_free(self.batch)
        if self.ctx:
            lc.llama_free(self.ctx)
        if self.model:
            lc.llama_model_free(self.model)

    # -- primitives ---------------------------------------------------------------------------
    def clear(self):
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)

    def fill(self, rows):
        """rows: list of (token, pos, seq, want_logits)."""
        b = self.batch
        for i, (tok, pos, seq, out) in enumerate(rows):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if out else 0
        b.n_tokens = len(rows)

    def decode(self):
        rc = lc.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError("llama_decode returned %d" % rc)

    def argmax(self, n_out):
        """Greedy pick for each of the n_out output rows of the last decode."""
        ptr = lc.llama_get_logits(self.ctx)
        logits = np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))
        return logits.argmax(axis=1).tolist()

    def prefill(self, prompt, seq):
        n = len(prompt)
        self.fill([(t, i, seq, i == n - 1) for i, t in enumerate(prompt)])
        self.decode()
        return self.argmax(1)[0]

    # -- measurements ---------------------------------------------------------------------------
    def prompt_rate(self, rng, n):
        best = 0.0
        for _ in range(self.args.reps):
            prompt = rng.prompt(n)
            self.clear()
            self.fill([(t, i, 0, i == n - 1) for i, t in enumerate(prompt)])
            t0 = time.perf_counter()
            self.decode()
            self.argmax(1)
            dt = time.perf_counter() - t0
            best = max(best, n / dt)
        return best

    def decode_rate(self, rng, streams, n_prompt):
        """Best over reps of generated tokens/s in the N_GEN-1 steps after the prompt step."""
        best = 0.0
        for _ in range(self.args.reps):
            prompts = [rng.prompt(n_prompt) for _ in range(streams)]
            self.clear()
            last = [self.prefill(p, s) for s, p in enumerate(prompts)]
            tokens = 0
            t0 = time.perf_counter()
            for step in range(N_GEN - 1):
                pos = n_prompt + step
                self.fill([(last[s], pos, s, True) for s in range(streams)])
                self.decode()
                last = self.argmax(streams)
                tokens += streams
            dt = time.perf_counter() - t0
            best = max(best, tokens / dt)
        return best


def main():
    home = os.environ.get("HOME", ".")
    model_dir = os.environ.get(
        "PARKWAY_MODEL_DIR", os.path.join(home, ".cache", "parkway", "models")
    )
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(model_dir, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto")
    ap.add_argument(
        "--agg-ctx-per-seq",
        type=int,
        default=256,
        help="KV cells per sequence in the multi-stream context (default 256)",
    )
    ap.add_argument("--verbose", action="store_true", help="keep llama.cpp's log on stderr")
    args = ap.parse_args()
    args.reps = max(1, args.reps)
    if not os.path.exists(args.model):
        sys.stderr.write("llamacpp_baseline: no model at %s\n" % args.model)
        return 2

    if not args.verbose:
        # Keep a reference: llama.cpp calls it for as long as the process lives.
        global _quiet_log
        _quiet_log = lc.llama_log_callback(lambda level, text, ud: None)
        lc.llama_log_set(_quiet_log, None)
    lc.llama_backend_init()
    python_rss = rss_mib()
    load_before = os.getloadavg()

    b = Bench(args)
    try:
        load_ms = b.load()
        rng = TokenRng(b.n_vocab)
        # Same order of measurements (and so of random ids) as bench_engine.
        p128 = b.prompt_rate(rng, 128)
        p512 = b.prompt_rate(rng, 512)
        d0 = b.decode_rate(rng, 1, 1)
        d512 = b.decode_rate(rng, 1, 512)
        rss_single = rss_mib()
        per_seq = max(args.agg_ctx_per_seq, 128 + N_GEN)
        b.switch_context(per_seq * MAX_STREAMS, MAX_STREAMS, False)
        a4 = b.decode_rate(rng, 4, 128)
        a8 = b.decode_rate(rng, 8, 128)
        a16 = b.decode_rate(rng, 16, 128)
    finally:
        b.close()
    peak = rss_mib()
    ver = library_version()
    sysinfo = lc.llama_print_system_info().decode(errors="replace").strip()
    load_avg = os.getloadavg()

    print(
        "llama.cpp benchmark: %s, llama-cpp-python %s (ggml %s, commit %s), %d threads, "
        "flash attention %s, best of %d"
        % (
            args.model,
            ver["llama_cpp_python"],
            ver.get("ggml_version", "?"),
            ver.get("ggml_commit", "?"),
            args.threads,
            args.flash_attn,
            args.reps,
        )
    )
    print("  system: %s" % sysinfo)
    print(
        "  load average (1/5/15 min) before: %.2f %.2f %.2f, after: %.2f %.2f %.2f"
        % (load_before + load_avg)
    )
    rows = [
        ("load to ready (ms)", load_ms),
        ("prompt, 128 tokens (tok/s)", p128),
        ("prompt, 512 tokens (tok/s)", p512),
        ("decode, 1 stream from pos 0 (tok/s)", d0),
        ("decode, 1 stream from pos 512 (tok/s)", d512),
        ("decode, 4 streams, aggregate (tok/s)", a4),
        ("decode, 8 streams, aggregate (tok/s)", a8),
        ("decode, 16 streams, aggregate (tok/s)", a16),
        ("peak RSS (MiB)", peak),
        ("  of which Python before the model (MiB)", python_rss),
        ("  peak RSS after 1-stream tests (MiB)", rss_single),
    ]
    for name, val in rows:
        print("  %-44s %10.1f" % (name, val))
    out = {
        "bench": "llamacpp",
        "backend": "llama.cpp-cpu",
        "prompt_tok_s_128": round(p128, 1),
        "prompt_tok_s_512": round(p512, 1),
        "decode_tok_s_pos0": round(d0, 1),
        "decode_tok_s_pos512": round(d512, 1),
        "agg_decode_tok_s_4": round(a4, 1),
        "agg_decode_tok_s_8": round(a8, 1),
        "agg_decode_tok_s_16": round(a16, 1),
        "load_ms": round(load_ms, 1),
        "peak_rss_mib": round(peak, 1),
        "python_rss_mib": round(python_rss, 1),
        "threads": args.threads,
        "flash_attn": args.flash_attn,
        "llama_cpp_python": ver["llama_cpp_python"],
        "ggml_commit": ver.get("ggml_commit", "?"),
        "loadavg_1m_before": round(load_before[0], 2),
        "loadavg_1m_after": round(load_avg[0], 2),
    }
    print(json.dumps(out, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
