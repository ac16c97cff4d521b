#!/usr/bin/env python3
"""Independent numpy reference of the Llama forward pass, for checking the parkway engine.

It reads a GGUF file with the PyPI `gguf` package (GGUFReader), dequantizes every tensor
with gguf's own `gguf.quants.dequantize` and runs the model in numpy: no code is shared
with the C engine. See docs/internals/reference.md for conventions, precision, runtime
and the tolerances the engine tests should use.

Usage (the venv is /work/main/.venv; tests/requirements.txt pins the packages):

  llama_ref.py MODEL --tokens 1,2,3 [--steps 32] [--out FILE.json] [--logits-all]
  llama_ref.py MODEL --prompt-text "What is the capital of France?" --chat --steps 32
  llama_ref.py MODEL --make-fixture tests/data/reference/smollm2_fixture.json
  llama_ref.py MODEL --fixture-run [--out FILE.json] [--logits-bin FILE.f32]
  llama_ref.py --make-random-model OUT.gguf [--random-type Q4_1] [--random-shape ...]

Options that change the arithmetic: --f64 (float64 everywhere, the most exact reference),
--act-q8 (round each matmul input to Q8_0 blocks of 32, as an engine with 8-bit activation
dot products does), --kv-f16 (store K and V in float16, as an F16 KV cache does).
The default is float32 activations and float32 dequantized weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QT

REF_VERSION = 1

# ---------------------------------------------------------------------------------------
# GGUF loading
# ---------------------------------------------------------------------------------------


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


class LlamaHParams:
    """Hyperparameters read from the `{arch}.*` metadata keys."""

    def __init__(self, reader: gguf.GGUFReader):
        arch = _field(reader, "general.architecture", "llama")
        if arch != "llama":
            raise ValueError(f"unsupported architecture {arch!r} (only llama)")
        self.arch = arch

        def need(key):
            v = _field(reader, f"{arch}.{key}")
            if v is None:
                raise ValueError(f"missing metadata key {arch}.{key}")
            return v

        self.n_ctx_train = int(need("context_length"))
        self.n_embd = int(need("embedding_length"))
        self.n_layer = int(need("block_count"))
        self.n_ff = int(need("feed_forward_length"))
        self.n_head = int(need("attention.head_count"))
        self.n_head_kv = int(_field(reader, f"{arch}.attention.head_count_kv", self.n_head))
        self.rms_eps = float(need("attention.layer_norm_rms_epsilon"))
        self.rope_base = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
        self.head_dim = int(_field(reader, f"{arch}.attention.key_length", self.n_embd // self.n_head))
        self.head_dim_v = int(_field(reader, f"{arch}.attention.value_length", self.head_dim))
        if self.head_dim_v != self.head_dim:
            raise ValueError("key_length != value_length is not supported")
        self.n_rot = int(_field(reader, f"{arch}.rope.dimension_count", self.head_dim))
        if self.n_rot > self.head_dim or self.n_rot % 2:
            raise ValueError(f"bad rope.dimension_count {self.n_rot}")
        if self.n_head % self.n_head_kv:
            raise ValueError("head_count is not a multiple of head_count_kv")

        # RoPE scaling: none and linear are supported (theta *= 1/factor, as ggml's
        # freq_scale). YaRN and the rest change more than theta; refuse them.
        self.rope_freq_scale = 1.0
        stype = _field(reader, f"{arch}.rope.scaling.type")
        sfactor = _field(reader, f"{arch}.rope.scaling.factor")
        legacy = _field(reader, f"{arch}.rope.scale_linear")
        if stype in (None, "none"):
            if stype is None and legacy:
                self.rope_freq_scale = 1.0 / float(legacy)
        elif stype == "linear":
            if sfactor:
                self.rope_freq_scale = 1.0 / float(sfactor)
        else:
            raise ValueError(f"rope scaling type {stype!r} is not supported")
        self.rope_scaling_type = stype or "none"

        self.n_vocab = None  # filled from token_embd

    def as_dict(self):
        return {k: v for k, v in self.__dict__.items()}


def _dequant(t) -> np.ndarray:
    """Dequantize a ReaderTensor to float32 with gguf's own code; numpy shape is the
    GGUF ne reversed: ne=[n_in, n_out] -> (n_out, n_in)."""
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    # GGUFReader strips trailing size-1 dims; dequantize returns (rows, n_in)
    w = np.asarray(w, dtype=np.float32).reshape(shape)
    return w


class LlamaModel:
    def __init__(self, path: str, dtype=np.float32, act_q8=False, kv_f16=False, rope_style="normal"):
        self.path = path
        if rope_style not in ("normal", "neox"):
            raise ValueError("rope_style is normal or neox")
        self.rope_style = rope_style
        self.dtype = np.dtype(dtype)
        self.act_q8 = act_q8
        self.kv_f16 = kv_f16
        self.reader = gguf.GGUFReader(path, "r")
        self.hp = LlamaHParams(self.reader)
        hp = self.hp
        tensors = {t.name: t for t in self.reader.tensors}
        self.tensor_types = {n: t.tensor_type.name for n, t in tensors.items()}

        def get(name, shape):
            if name not in tensors:
                raise ValueError(f"missing tensor {name}")
            w = _dequant(tensors[name])
            if w.shape != shape:
                raise ValueError(f"tensor {name}: shape {w.shape}, want {shape}")
            return np.ascontiguousarray(w.astype(self.dtype, copy=False))

        d, hd = hp.n_embd, hp.head_dim
        emb = _dequant(tensors["token_embd.weight"])
        hp.n_vocab = emb.shape[0]
        meta_vocab = _field(self.reader, f"{hp.arch}.vocab_size")
        if meta_vocab is not None and int(meta_vocab) != hp.n_vocab:
            raise ValueError("vocab_size disagrees with token_embd")
        self.tok_embd = np.ascontiguousarray(emb.astype(self.dtype, copy=False))
        if emb.shape != (hp.n_vocab, d):
            raise ValueError(f"token_embd shape {emb.shape}")
        self.output_norm = get("output_norm.weight", (d,))
        if "output.weight" in tensors:
            self.output = get("output.weight", (hp.n_vocab, d))
            self.tied_output = False
        else:
            self.output = self.tok_embd
            self.tied_output = True
        self.output_type = self.tensor_types.get("output.weight", self.tensor_types["token_embd.weight"])
        self.rope_freqs = None
        if "rope_freqs.weight" in tensors:  # Llama 3.1 style per-frequency divisors
            self.rope_freqs = _dequant(tensors["rope_freqs.weight"]).astype(np.float64).reshape(-1)
            if self.rope_freqs.shape[0] != hp.n_rot // 2:
                raise ValueError("rope_freqs has the wrong length")

        self.layers = []
        for i in range(hp.n_layer):
            p = f"blk.{i}."
            self.layers.append(
                {
                    "attn_norm": get(p + "attn_norm.weight", (d,)),
                    "wq": get(p + "attn_q.weight", (hp.n_head * hd, d)),
                    "wk": get(p + "attn_k.weight", (hp.n_head_kv * hd, d)),
                    "wv": get(p + "attn_v.weight", (hp.n_head_kv * hd, d)),
                    "wo": get(p + "attn_output.weight", (d, hp.n_head * hd)),
                    "ffn_norm": get(p + "ffn_norm.weight", (d,)),
                    "w_gate": get(p + "ffn_gate.weight", (hp.n_ff, d)),
                    "w_up": get(p + "ffn_up.weight", (hp.n_ff, d)),
                    "w_down": get(p + "ffn_down.weight", (d, hp.n_ff)),
                }
            )

    # -- building blocks ------------------------------------------------------------------

    def _rmsnorm(self, x, w):
        ms = np.mean(x * x, axis=-1, keepdims=True)
        return (x / np.sqrt(ms + self.dtype.type(self.hp.rms_eps))) * w

    def _q8(self, x):
        """Round activations to Q8_0 (blocks of 32: d = amax/127 stored as fp16,
        q = round-half-away(x/d)) and back, with gguf's bit-exact ggml quantizer."""
        n = x.shape[-1]
        if n % 32:
            return x
        q = gguf.quants.quantize(x.astype(np.float32).reshape(-1, n), QT.Q8_0)
        return gguf.quants.dequantize(q, QT.Q8_0).reshape(x.shape).astype(self.dtype, copy=False)

    def _mm(self, x, w):
        """y = x @ W^T with W stored (n_out, n_in) as the GGUF ne=[n_in, n_out] tensor."""
        if self.act_q8:
            x = self._q8(x)
        return x @ w.T

    def _rope(self, x, positions):
        """ggml rope mode 0 (LLAMA / NORMAL): rotate adjacent pairs (x[2i], x[2i+1]) of the
        first n_rot dims of every head by theta = pos * freq_scale * base^(-2i/n_rot)
        (divided by rope_freqs[i] when the model has it). x: (n, heads, head_dim)."""
        hp = self.hp
        i = np.arange(hp.n_rot // 2, dtype=np.float64)
        inv = hp.rope_base ** (-2.0 * i / hp.n_rot)
        if self.rope_freqs is not None:
            inv = inv / self.rope_freqs
        theta = np.asarray(positions, dtype=np.float64)[:, None] * inv[None, :] * hp.rope_freq_scale
        cos = np.cos(theta).astype(self.dtype)[:, None, :]  # (n, 1, n_rot/2)
        sin = np.sin(theta).astype(self.dtype)[:, None, :]
        out = x.copy()
        if self.rope_style == "normal":
            i0, i1 = slice(0, hp.n_rot, 2), slice(1, hp.n_rot, 2)
        else:  # NeoX halves (x[i], x[i + n_rot/2]): wrong for llama GGUFs, kept to show it
            i0, i1 = slice(0, hp.n_rot // 2), slice(hp.n_rot // 2, hp.n_rot)
        x0, x1 = x[..., i0], x[..., i1]
        out[..., i0] = x0 * cos - x1 * sin
        out[..., i1] = x0 * sin + x1 * cos
        return out

    # -- forward ----------------------------------------------------------------------------

    def new_cache(self, n_ctx):
        hp = self.hp
        kdt = np.float16 if self.kv_f16 else self.dtype
        shape = (hp.n_layer, hp.n_head_kv, n_ctx, hp.head_dim)
        return {"k": np.zeros(shape, dtype=kdt), "v": np.zeros(shape, dtype=kdt), "n": 0}

    def forward(self, tokens, cache, all_logits=False):
        """Run `tokens` at positions cache['n']..; returns logits (n_tokens or 1, n_vocab)."""
        hp = self.hp
        tokens = np.asarray(tokens, dtype=np.int64)
        n = tokens.shape[0]
        p0 = cache["n"]
        if p0 + n > cache["k"].shape[2]:
            raise ValueError("KV cache is full")
        if tokens.min() < 0 or tokens.max() >= hp.n_vocab:
            raise ValueError("token id out of range")
        pos = np.arange(p0, p0 + n)
        T = p0 + n
        hd, nkv = hp.head_dim, hp.n_head_kv
        g = hp.n_head // nkv
        scale = self.dtype.type(1.0 / math.sqrt(hd))
        # causal mask: query i (position p0+i) sees keys 0..p0+i
        mask = np.arange(T)[None, :] > pos[:, None]  # (n, T)

        x = self.tok_embd[tokens]  # (n, d)
        for li, L in enumerate(self.layers):
            h = self._rmsnorm(x, L["attn_norm"])
            q = self._mm(h, L["wq"]).reshape(n, hp.n_head, hd)
            k = self._mm(h, L["wk"]).reshape(n, nkv, hd)
            v = self._mm(h, L["wv"]).reshape(n, nkv, hd)
            q = self._rope(q, pos)
            k = self._rope(k, pos)
            cache["k"][li, :, p0:T] = k.transpose(1, 0, 2)
            cache["v"][li, :, p0:T] = v.transpose(1, 0, 2)
            K = cache["k"][li, :, :T].astype(self.dtype, copy=False)  # (nkv, T, hd)
            V = cache["v"][li, :, :T].astype(self.dtype, copy=False)
            # query head h uses kv head h // g (ggml's broadcast)
            qg = q.reshape(n, nkv, g, hd).transpose(1, 2, 0, 3)  # (nkv, g, n, hd)
            s = (qg @ K[:, None].transpose(0, 1, 3, 2)) * scale  # (nkv, g, n, T)
            s = np.where(mask, self.dtype.type(-np.inf), s)
            s = s - s.max(axis=-1, keepdims=True)
            e = np.exp(s)
            pr = e / e.sum(axis=-1, keepdims=True)
            o = pr @ V[:, None]  # (nkv, g, n, hd)
            o = o.transpose(2, 0, 1, 3).reshape(n, hp.n_head * hd)
            x = x + self._mm(o, L["wo"])
            h = self._rmsnorm(x, L["ffn_norm"])
            gt = self._mm(h, L["w_gate"])
            up = self._mm(h, L["w_up"])
            act = gt / (self.dtype.type(1.0) + np.exp(-gt)) * up  # silu(gate) * up
            x = x + self._mm(act, L["w_down"])
        cache["n"] = T
        if not all_logits:
            x = x[-1:]
        x = self._rmsnorm(x, self.output_norm)
        return self._mm(x, self.output)

    def generate(self, prompt, steps, all_logits=False):
        """Greedy continuation (argmax, ties to the lowest id; never stops at EOS).
        Returns dict with last_logits (float32 array), greedy ids, per-step top-5 and
        margins, and optionally all prompt logits."""
        cache = self.new_cache(len(prompt) + max(steps, 1))
        out = self.forward(prompt, cache, all_logits=all_logits)
        res = {"all_logits": out if all_logits else None}
        logits = out[-1]
        res["last_logits"] = logits.astype(np.float32)
        greedy, top5, margins = [], [], []
        for s in range(steps):
            tok = int(np.argmax(logits))
            order = np.argsort(-logits, kind="stable")[:5]
            top5.append([[int(i), float(logits[i])] for i in order])
            margins.append(float(logits[order[0]] - logits[order[1]]))
            greedy.append(tok)
            if s + 1 < steps:
                logits = self.forward([tok], cache)[-1]
        res["greedy"] = greedy
        res["step_logits_top5"] = top5
        res["step_margin"] = margins
        return res


# ---------------------------------------------------------------------------------------
# Tokenizer (only for building prompts and decoding for humans; the C tests pass ids)
# ---------------------------------------------------------------------------------------


def build_tokenizer(reader: gguf.GGUFReader):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"tokenizer model {model!r}: only gpt2 (byte-level BPE) is built here")
    pre = _field(reader, "tokenizer.ggml.pre")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = _field(reader, "tokenizer.ggml.merges")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    if pre == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        # the plain GPT-2 split; good enough for sanity checks on other models
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False) for i in range(len(tokens)) if types[i] == 3]
    tk.add_special_tokens(special)
    return tk


def chat_prompt(reader: gguf.GGUFReader, user: str) -> str:
    """ChatML with the template's default system prompt (SmolLM2 adds one when the first
    message is not a system message)."""
    tmpl = _field(reader, "tokenizer.chat_template") or ""
    system = None
    k = tmpl.find("<|im_start|>system\n")
    if k >= 0:
        end = tmpl.find("<|im_end|>", k)
        system = tmpl[k + len("<|im_start|>system\n") : end]
    s = ""
    if system:
        s += f"<|im_start|>system\n{system}<|im_end|>\n"
    s += f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return s


# ---------------------------------------------------------------------------------------
# Fixture
# ---------------------------------------------------------------------------------------

# (name, chat?, text). Lengths (SmolLM2 tokenizer) go from 5 to ~200 tokens.
FIXTURE_PROMPTS = [
    ("raw_short", False, "The capital of France is"),
    ("chat_capital", True, "What is the capital of France?"),
    ("raw_digits", False, "Counting: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,"),
    ("chat_haiku", True, "Write a haiku about the ocean at night."),
    (
        "raw_code",
        False,
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n",
    ),
    (
        "raw_long",
        False,
        "A lighthouse keeper's log, kept through the winter of a small northern island. "
        "The first storm arrived in early November, earlier than anyone on the island could "
        "remember. For three days the waves climbed the rocks below the tower and the wind "
        "pressed against the glass of the lantern room until it hummed. The keeper trimmed "
        "the wick every four hours, wound the clockwork that turned the lens, and wrote down "
        "the pressure, the direction of the wind and the ships he saw. On the second night a "
        "fishing boat lost its way in the rain; he watched its lights drift toward the reef "
        "and fired two rockets, and the boat turned back to open water. When the weather "
        "cleared, the supply ship brought flour, oil for the lamp, letters from the mainland "
        "and a newspaper three weeks old. He read every page twice, then began to repair the "
        "fence that the storm had torn from the ground. In his log for that week he wrote "
        "only one sentence that was not about the weather:",
    ),
]


def _stats(logits: np.ndarray):
    l64 = logits.astype(np.float64)
    m = l64.max()
    order = np.argsort(-logits, kind="stable")
    return {
        "argmax": int(order[0]),
        "top64": [[int(i), round(float(logits[i]), 5)] for i in order[:64]],
        "logsumexp": float(m + np.log(np.exp(l64 - m).sum())),
        "l2": float(np.sqrt((l64 * l64).sum())),
        "mean": float(l64.mean()),
        "std": float(l64.std()),
        "min": float(l64.min()),
        "max": float(m),
        "stride1024": [round(float(logits[i]), 5) for i in range(0, logits.shape[0], 1024)],
    }


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fixture_prompt_tokens(model: LlamaModel):
    tk = build_tokenizer(model.reader)
    out = []
    for name, chat, text in FIXTURE_PROMPTS:
        s = chat_prompt(model.reader, text) if chat else text
        ids = tk.encode(s, add_special_tokens=False).ids
        out.append((name, chat, text, ids))
    return out, tk


def run_fixture(model: LlamaModel, steps: int, compact: bool):
    prompts, tk = fixture_prompt_tokens(model)
    items = []
    t0 = time.perf_counter()
    for name, chat, text, ids in prompts:
        r = model.generate(ids, steps)
        item = {
            "name": name,
            "chat": chat,
            "text": text,
            "prompt_tokens": ids,
            "greedy": r["greedy"],
            "greedy_text": tk.decode(r["greedy"], skip_special_tokens=False),
            "step_logits_top5": [[[i, round(v, 5)] for i, v in s] for s in r["step_logits_top5"]],
            "step_margin": [round(m, 5) for m in r["step_margin"]],
        }
        if compact:
            item["last_logits_stats"] = _stats(r["last_logits"])
        else:
            item["last_logits"] = r["last_logits"]
        items.append(item)
    return items, time.perf_counter() - t0


def _log_softmax(v):
    v = np.asarray(v, dtype=np.float64)
    m = v.max(axis=-1, keepdims=True)
    return v - m - np.log(np.exp(v - m).sum(axis=-1, keepdims=True))


def compare_logits(ref, got):
    """Metrics of `got` against `ref` (1-D logit vectors), as the engine tests use them."""
    a, b = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    d = b - a
    dc = d - d.mean()  # a constant shift does not change the distribution
    la, lb = _log_softmax(a), _log_softmax(b)
    top = np.argsort(-a, kind="stable")[:64]
    return {
        "max_abs": float(np.abs(d).max()),
        "max_abs_over_std": float(np.abs(d).max() / a.std()),
        "rms": float(np.sqrt((d * d).mean())),
        "mean_shift": float(d.mean()),
        "centered_max_abs": float(np.abs(dc).max()),
        "top64_logprob_max_abs": float(np.abs(la[top] - lb[top]).max()),
        "kl": float((np.exp(la) * (la - lb)).sum()),
        "top1_same": bool(a.argmax() == b.argmax()),
    }


def measure_variants(path: str, steps: int, out=sys.stderr):
    """Compare arithmetic variants on the fixture prompts: (variant, baseline) pairs of
    float32 / float64 / Q8_0 activations / F16 KV cache. Per prompt: last-position logit
    metrics (compare_logits), free-running greedy agreement (common prefix length) and a
    teacher-forced check along the baseline's greedy path (steps whose argmax differs,
    with the baseline's own logit margin between the two tokens)."""
    configs = {
        "f32": dict(),
        "f64": dict(dtype=np.float64),
        "act_q8": dict(act_q8=True),
        "act_q8_f64": dict(dtype=np.float64, act_q8=True),
        "act_q8_kv_f16": dict(act_q8=True, kv_f16=True),
    }
    pairs = [("f64", "f32"), ("act_q8", "f32"), ("act_q8_kv_f16", "f32"), ("act_q8_f64", "act_q8")]
    tok_model = LlamaModel(path)
    prompts, _ = fixture_prompt_tokens(tok_model)
    del tok_model
    cache_runs = {}

    def runs(cfg):
        if cfg not in cache_runs:
            m = LlamaModel(path, **configs[cfg])
            res = {}
            for name, _, _, ids in prompts:
                r = m.generate(ids, steps)
                c = m.new_cache(len(ids) + steps)
                tf = m.forward(ids + r["greedy"][:-1], c, all_logits=True)[len(ids) - 1 :]
                res[name] = (ids, r, tf, m)
            cache_runs[cfg] = res
        return cache_runs[cfg]

    results = {}
    for var, base in pairs:
        rb, rv = runs(base), runs(var)
        rows = []
        for name in rb:
            ids, r, tf, _ = rb[name]
            _, r2, _, m = rv[name]
            common = 0
            while common < steps and r["greedy"][common] == r2["greedy"][common]:
                common += 1
            c = m.new_cache(len(ids) + steps)
            tfv = m.forward(ids + r["greedy"][:-1], c, all_logits=True)[len(ids) - 1 :]
            mism = []
            worst = {"max_abs": 0.0, "centered_max_abs": 0.0, "max_abs_over_std": 0.0, "kl": 0.0}
            for s_ in range(steps):
                cm = compare_logits(tf[s_], tfv[s_])
                for k in worst:
                    worst[k] = max(worst[k], cm[k])
                want, got = r["greedy"][s_], int(np.argmax(tfv[s_]))
                if want != got:
                    mism.append([s_, want, got, round(float(tf[s_, want] - tf[s_, got]), 5)])
            row = {"prompt": name, "n_prompt": len(ids), "last": compare_logits(r["last_logits"], r2["last_logits"]),
                   "greedy_common_prefix": common, "teacher_forced_worst": worst, "teacher_forced_mismatches": mism,
                   "baseline_min_margin": float(min(r["step_margin"]))}
            rows.append(row)
            print(f"{var} vs {base}", json.dumps(row), file=out)
        results[f"{var} vs {base}"] = rows
    return results


# ---------------------------------------------------------------------------------------
# Random-weight models (for kernel / CUDA tests of any Llama shape)
# ---------------------------------------------------------------------------------------


def make_random_model(path, n_vocab=512, n_embd=128, n_layer=2, n_ff=256, n_head=4, n_head_kv=2,
                      n_ctx=256, qtype="Q4_1", seed=1234, tied=True, rope_base=10000.0, eps=1e-5):
    """Write a small Llama GGUF with random weights. Norm weights are F32; every matrix is
    `qtype` (F32, F16, BF16, Q8_0, Q4_0, Q4_1); token_embd too. tied=False adds output.weight."""
    rng = np.random.default_rng(seed)
    qt = QT[qtype]
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("parkway-random")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(eps)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_vocab_size(n_vocab)
    ftype = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
             "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1"}.get(qtype)
    if ftype is None:
        raise ValueError(f"random model type {qtype} is not one of F32 F16 BF16 Q8_0 Q4_0 Q4_1")
    w.add_file_type(int(gguf.LlamaFileType[ftype]))
    w.add_tokenizer_model("gpt2")
    # a byte-ish vocab so the file is complete; merges empty
    w.add_token_list([f"<t{i}>" for i in range(n_vocab)])
    w.add_token_types([1] * n_vocab)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def mat(name, n_out, n_in, scale):
        a = (rng.standard_normal((n_out, n_in)) * scale).astype(np.float32)
        data = gguf.quants.quantize(a, qt)
        w.add_tensor(name, data, raw_shape=gguf.quants.quant_shape_to_byte_shape((n_out, n_in), qt)
                     if qt not in (QT.F32, QT.F16) else None, raw_dtype=qt)

    def vec(name, n):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    hd = n_embd // n_head
    # a small embedding keeps a tied model from just repeating its input token
    mat("token_embd.weight", n_vocab, n_embd, 0.25)
    vec("output_norm.weight", n_embd)
    if not tied:
        mat("output.weight", n_vocab, n_embd, 1.0 / math.sqrt(n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", n_embd)
        mat(p + "attn_q.weight", n_head * hd, n_embd, 1.0 / math.sqrt(n_embd))
        mat(p + "attn_k.weight", n_head_kv * hd, n_embd, 1.0 / math.sqrt(n_embd))
        mat(p + "attn_v.weight", n_head_kv * hd, n_embd, 1.0 / math.sqrt(n_embd))
        mat(p + "attn_output.weight", n_embd, n_head * hd, 1.0 / math.sqrt(n_head * hd))
        vec(p + "ffn_norm.weight", n_embd)
        mat(p + "ffn_gate.weight", n_ff, n_embd, 1.0 / math.sqrt(n_embd))
        mat(p + "ffn_up.weight", n_ff, n_embd, 1.0 / math.sqrt(n_embd))
        mat(p + "ffn_down.weight", n_embd, n_ff, 1.0 / math.sqrt(n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def self_test(out=sys.stderr) -> int:
    """Random models of every supported type (tied and untied, GQA, partial n_rot is not
    generated): the KV-cache path must equal the one-shot path, float32 must match float64,
    and greedy must equal the argmax of the one-shot logits. Returns the number of failures."""
    import tempfile

    fails = 0
    with tempfile.TemporaryDirectory() as td:
        for qt in ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]:
            for tied in (True, False):
                p = os.path.join(td, f"r_{qt}_{tied}.gguf")
                make_random_model(p, 320, 96, 3, 160, 6, 2, qtype=qt, tied=tied, seed=11)
                m32, m64 = LlamaModel(p), LlamaModel(p, np.float64)
                toks = [5, 17, 300, 2, 99, 100, 319, 0, 42]
                r = m32.generate(toks, 6)
                seq = toks + r["greedy"][:-1]
                one32 = m32.forward(seq, m32.new_cache(len(seq)), all_logits=True)
                one64 = m64.forward(seq, m64.new_cache(len(seq)), all_logits=True)
                n = len(toks)
                inc_vs_batch = float(np.abs(one32[n - 1] - r["last_logits"]).max())
                f32_vs_f64 = float(np.abs(one32 - one64).max())
                greedy_ok = [int(np.argmax(one32[n - 1 + i])) for i in range(6)] == r["greedy"]
                step_ok = all(abs(float(one32[n - 1 + i][t[0][0]]) - t[0][1]) < 1e-4
                              for i, t in enumerate(r["step_logits_top5"]))
                ok = inc_vs_batch < 1e-4 and f32_vs_f64 < 1e-3 and greedy_ok and step_ok
                fails += not ok
                print(f"self-test {qt:5s} tied={tied!s:5s} inc_vs_batch={inc_vs_batch:.2e} "
                      f"f32_vs_f64={f32_vs_f64:.2e} greedy_ok={greedy_ok} step_ok={step_ok} "
                      f"{'ok' if ok else 'FAIL'}", file=out)
    return fails


def write_text_out(path, items):
    """Plain text for C tests, one block per prompt, in the order of --logits-bin rows:
    `prompt NAME N id...`, `greedy N id...`, `margin N m...` (one line each)."""
    with open(path, "w") as f:
        for it in items:
            f.write(f"prompt {it['name']} {len(it['prompt_tokens'])} {' '.join(map(str, it['prompt_tokens']))}\n")
            f.write(f"greedy {len(it['greedy'])} {' '.join(map(str, it['greedy']))}\n")
            f.write(f"margin {len(it['step_margin'])} {' '.join(f'{m:.6g}' for m in it['step_margin'])}\n")


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def _fmt_logits(a):
    # %.9g round-trips a float32 exactly
    return [float(f"{float(v):.9g}") for v in a]


def _top5_json(steps):
    return [[[i, float(f"{v:.9g}")] for i, v in s] for s in steps]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="GGUF file (llama architecture)")
    ap.add_argument("--tokens", help="comma-separated prompt token ids")
    ap.add_argument("--prompt-text", help="prompt text, tokenized with the GGUF's vocab + merges")
    ap.add_argument("--chat", action="store_true", help="wrap --prompt-text in the ChatML template")
    ap.add_argument("--steps", type=int, default=32, help="greedy steps (default 32)")
    ap.add_argument("--out", help="write JSON here instead of stdout")
    ap.add_argument("--logits-all", action="store_true", help="also output logits of every prompt position")
    ap.add_argument("--logits-bin", help="also write last-position logits as raw little-endian float32 "
                    "(one row of n_vocab per prompt)")
    ap.add_argument("--f64", action="store_true", help="compute in float64 (most exact; default float32)")
    ap.add_argument("--act-q8", action="store_true", help="round matmul inputs to Q8_0 blocks of 32")
    ap.add_argument("--kv-f16", action="store_true", help="store K and V in float16")
    ap.add_argument("--rope-style", default="normal", choices=["normal", "neox"],
                    help="normal = ggml mode 0, right for llama; neox only to demonstrate the wrong one")
    ap.add_argument("--make-fixture", metavar="FILE", help="write the compact fixture for the fixed prompts")
    ap.add_argument("--fixture-run", action="store_true", help="run the fixed prompts with full logits")
    ap.add_argument("--make-random-model", metavar="OUT", help="write a random-weight llama GGUF and exit")
    ap.add_argument("--random-type", default="Q4_1", help="tensor type of the random model's matrices")
    ap.add_argument("--random-shape", default="512,128,2,256,4,2",
                    help="n_vocab,n_embd,n_layer,n_ff,n_head,n_head_kv of the random model")
    ap.add_argument("--random-untied", action="store_true", help="random model gets its own output.weight")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--self-test", action="store_true", help="random-model checks of every type; exit 1 on failure")
    ap.add_argument("--text-out", help="also write prompts, greedy ids and margins as plain text (for C tests)")
    ap.add_argument("--measure-variants", action="store_true",
                    help="compare float64, --act-q8 and --act-q8 --kv-f16 with float32 on the fixed prompts")
    args = ap.parse_args(argv)

    if args.make_random_model:
        v, e, nl, ff, nh, nkv = (int(x) for x in args.random_shape.split(","))
        make_random_model(args.make_random_model, v, e, nl, ff, nh, nkv, qtype=args.random_type,
                          seed=args.seed, tied=not args.random_untied)
        return 0
    if args.self_test:
        return 1 if self_test() else 0
    if not args.model:
        ap.error("MODEL is required")

    if args.measure_variants:
        res = measure_variants(args.model, args.steps)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
        return 0

    t0 = time.perf_counter()
    model = LlamaModel(args.model, np.float64 if args.f64 else np.float32, act_q8=args.act_q8, kv_f16=args.kv_f16,
                        rope_style=args.rope_style)
    t_load = time.perf_counter() - t0
    print(f"llama_ref: loaded {args.model} in {t_load:.2f}s", file=sys.stderr)
    precision = {"dtype": "float64" if args.f64 else "float32", "act_q8": args.act_q8, "kv_f16": args.kv_f16,
                 "rope_style": args.rope_style}

    def dump(obj):
        text = json.dumps(obj, separators=(",", ":"))
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                f.write(text + "\n")
        else:
            sys.stdout.write(text + "\n")

    if args.make_fixture or args.fixture_run:
        items, t_run = run_fixture(model, args.steps, compact=bool(args.make_fixture))
        head = {
            "ref_version": REF_VERSION,
            "model": os.path.basename(args.model),
            "model_sha256": _sha256(args.model),
            "hparams": model.hp.as_dict(),
            "precision": precision,
            "steps": args.steps,
            "greedy_rule": "argmax, ties to the lowest id, EOS not special",
        }
        if not args.make_fixture:  # keep the committed fixture byte-stable
            head["seconds_load"] = round(t_load, 2)
            head["seconds_run"] = round(t_run, 2)
        print(f"llama_ref: {len(items)} prompts x {args.steps} steps in {t_run:.2f}s", file=sys.stderr)
        if args.logits_bin and not args.make_fixture:
            np.stack([it["last_logits"] for it in items]).astype("<f4").tofile(args.logits_bin)
        if args.text_out:
            write_text_out(args.text_out, items)
        if args.make_fixture:
            head["prompts"] = items
            os.makedirs(os.path.dirname(os.path.abspath(args.make_fixture)), exist_ok=True)
            with open(args.make_fixture, "w") as f:
                json.dump(head, f, indent=1)
                f.write("\n")
            return 0
        for it in items:
            it["last_logits"] = _fmt_logits(it["last_logits"])
        head["prompts"] = items
        dump(head)
        return 0

    if args.tokens:
        ids = [int(x) for x in args.tokens.split(",") if x.strip()]
    elif args.prompt_text is not None:
        tk = build_tokenizer(model.reader)
        s = chat_prompt(model.reader, args.prompt_text) if args.chat else args.prompt_text
        ids = tk.encode(s, add_special_tokens=False).ids
    else:
        ap.error("give --tokens, --prompt-text, --make-fixture or --fixture-run")
    if not ids:
        ap.error("empty prompt")

    t0 = time.perf_counter()
    r = model.generate(ids, args.steps, all_logits=args.logits_all)
    t_run = time.perf_counter() - t0
    print(f"llama_ref: {len(ids)} prompt tokens + {args.steps} steps in {t_run:.2f}s", file=sys.stderr)
    obj = {
        "prompt_tokens": ids,
        "precision": precision,
        "last_logits": _fmt_logits(r["last_logits"]),
        "greedy": r["greedy"],
        "step_logits_top5": _top5_json(r["step_logits_top5"]),
        "step_margin": r["step_margin"],
    }
    if args.logits_all:
        obj["all_logits"] = [_fmt_logits(row.astype(np.float32)) for row in r["all_logits"]]
    if args.prompt_text is not None:
        try:
            obj["greedy_text"] = build_tokenizer(model.reader).decode(r["greedy"], skip_special_tokens=False)
        except Exception:  # noqa: BLE001 - decoding is a convenience
            pass
    if args.logits_bin:
        r["last_logits"].astype("<f4").tofile(args.logits_bin)
    if args.text_out:
        write_text_out(args.text_out, [{"name": "cli", "prompt_tokens": ids, "greedy": r["greedy"],
                                        "step_margin": r["step_margin"]}])
    dump(obj)
    return 0


if __name__ == "__main__":
    sys.exit(main())
