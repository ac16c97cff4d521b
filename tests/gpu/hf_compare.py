#!/usr/bin/env python3
"""Runs a parkway GGUF model as transformers' LlamaForCausalLM and compares its logits with
the CUDA backend's (written by `bench_gpu compare --dump PREFIX`); then times
`generate` at batch 1 and 32 as the side-by-side baseline. Used by tests/gpu/check.sh.

  hf_compare.py MODEL.gguf PREFIX [--max-rel 0.05] [--min-top1 0.9] [--no-generate]

Needs torch, transformers and numpy only: the GGUF reader below is self-contained (no
`gguf` package, no network), for the types parkway-gguf-gen writes (F32, F16, BF16, Q8_0,
Q4_0, Q4_1). GGUF stores attn_q/attn_k rows permuted for "normal" (adjacent-pair) RoPE;
they are permuted back to transformers' rotate-half order, as llama.cpp's converter
documents. The model runs in float32 on the GPU. Prints one `hf_compare:` line; exit 1
when the worst relative error or the top-1 agreement is outside the limits.
"""

import argparse
import struct
import sys
import time

import numpy as np

GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                10: "<Q", 11: "<q", 12: "<d"}


class Reader:
    def __init__(self, path):
        self.buf = np.memmap(path, dtype=np.uint8, mode="r")
        self.off = 0
        if bytes(self.buf[:4]) != b"GGUF":
            raise ValueError("not a GGUF file")
        self.off = 4
        version, n_tensors, n_kv = self.u32(), self.u64(), self.u64()
        if version < 2:
            raise ValueError("GGUF v1 is not supported")
        self.kv = {}
        for _ in range(n_kv):
            key = self.string()
            self.kv[key] = self.value(self.u32())
        infos = []
        for _ in range(n_tensors):
            name = self.string()
            dims = [self.u64() for _ in range(self.u32())]
            infos.append((name, dims, self.u32(), self.u64()))
        align = int(self.kv.get("general.alignment", 32))
        base = (self.off + align - 1) // align * align
        self.tensors = {n: (d, t, base + o) for n, d, t, o in infos}

    def take(self, fmt):
        n = struct.calcsize(fmt)
        v = struct.unpack(fmt, bytes(self.buf[self.off:self.off + n]))[0]
        self.off += n
        return v

    def u32(self):
        return self.take("<I")

    def u64(self):
        return self.take("<Q")

    def string(self):
        n = self.u64()
        s = bytes(self.buf[self.off:self.off + n]).decode("utf-8", "replace")
        self.off += n
        return s

    def value(self, t):
        if t in GGUF_SCALARS:
            return self.take(GGUF_SCALARS[t])
        if t == 8:
            return self.string()
        if t == 9:
            et, n = self.u32(), self.u64()
            return [self.value(et) for _ in range(n)]
        raise ValueError(f"unknown GGUF value type {t}")

    def tensor(self, name):
        dims, t, off = self.tensors[name]
        n = int(np.prod(dims))
        shape = tuple(reversed(dims))  # ggml ne[0] is the fastest dimension
        if t == 0:
            return np.frombuffer(self.buf, np.float32, n, off).reshape(shape)
        if t == 1:
            return np.frombuffer(self.buf, np.float16, n, off).astype(np.float32).reshape(shape)
        if t == 30:
            u = np.frombuffer(self.buf, np.uint16, n, off).astype(np.uint32) << 16
            return u.view(np.float32).reshape(shape)
        nb = n // 32
        if t == 8:  # Q8_0: f16 d, int8 qs[32]
            blk = np.frombuffer(self.buf, np.uint8, nb * 34, off).reshape(nb, 34)
            d = blk[:, :2].copy().view(np.float16).astype(np.float32)
            q = blk[:, 2:].copy().view(np.int8).astype(np.float32)
            return (d * q).reshape(shape)
        if t in (2, 3):  # Q4_0 (18 B) / Q4_1 (20 B)
            bb = 18 if t == 2 else 20
            blk = np.frombuffer(self.buf, np.uint8, nb * bb, off).reshape(nb, bb)
            d = blk[:, :2].copy().view(np.float16).astype(np.float32)
            qs = blk[:, bb - 16:]
            q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
            if t == 2:
                w = d * (q - 8.0)
            else:
                m = blk[:, 2:4].copy().view(np.float16).astype(np.float32)
                w = d * q + m
            return w.reshape(shape)
        raise ValueError(f"{name}: unsupported tensor type {t}")


def unpermute(w, n_head):
    """GGUF (adjacent pairs) -> transformers (rotate-half) row order of attn_q/attn_k."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def build_model(r, torch, transformers):
    kv = r.kv
    a = kv.get("general.architecture", "llama")
    n_embd = int(kv[f"{a}.embedding_length"])
    n_head = int(kv[f"{a}.attention.head_count"])
    n_head_kv = int(kv.get(f"{a}.attention.head_count_kv", n_head))
    n_layer = int(kv[f"{a}.block_count"])
    emb = r.tensor("token_embd.weight")
    tied = "output.weight" not in r.tensors
    theta = float(kv.get(f"{a}.rope.freq_base", 10000.0))
    ckw = dict(
        vocab_size=emb.shape[0], hidden_size=n_embd,
        intermediate_size=int(kv[f"{a}.feed_forward_length"]), num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=n_head_kv,
        head_dim=n_embd // n_head,
        rms_norm_eps=float(kv[f"{a}.attention.layer_norm_rms_epsilon"]),
        max_position_embeddings=int(kv.get(f"{a}.context_length", 4096)),
        tie_word_embeddings=tied, attention_bias=False, mlp_bias=False)
    # transformers 5 keeps the RoPE base in rope_parameters; 4.x in rope_theta.
    if int(transformers.__version__.split(".")[0]) >= 5:
        ckw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:
        ckw["rope_theta"] = theta
    cfg = transformers.LlamaConfig(**ckw)
    got = getattr(cfg, "rope_theta", None)
    if got is None:
        got = cfg.rope_parameters["rope_theta"]
    if abs(float(got) - theta) > 1e-6 * theta:
        raise ValueError(f"config kept rope_theta={got}, wanted {theta}")
    sd = {"model.embed_tokens.weight": emb, "model.norm.weight": r.tensor("output_norm.weight")}
    if not tied:
        sd["lm_head.weight"] = r.tensor("output.weight")
    for i in range(n_layer):
        p, g = f"model.layers.{i}.", f"blk.{i}."
        sd[p + "self_attn.q_proj.weight"] = unpermute(r.tensor(g + "attn_q.weight"), n_head)
        sd[p + "self_attn.k_proj.weight"] = unpermute(r.tensor(g + "attn_k.weight"), n_head_kv)
        sd[p + "self_attn.v_proj.weight"] = r.tensor(g + "attn_v.weight")
        sd[p + "self_attn.o_proj.weight"] = r.tensor(g + "attn_output.weight")
        sd[p + "mlp.gate_proj.weight"] = r.tensor(g + "ffn_gate.weight")
        sd[p + "mlp.up_proj.weight"] = r.tensor(g + "ffn_up.weight")
        sd[p + "mlp.down_proj.weight"] = r.tensor(g + "ffn_down.weight")
        sd[p + "input_layernorm.weight"] = r.tensor(g + "attn_norm.weight")
        sd[p + "post_attention_layernorm.weight"] = r.tensor(g + "ffn_norm.weight")
    # Built on the GPU (not on "meta"): buffers computed at init, such as the rotary
    # frequencies, are not in the state dict and must exist for real.
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in sd.items()}
    res = model.load_state_dict(sd, strict=False)
    missing = [k for k in res.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or res.unexpected_keys:
        raise ValueError(f"state dict mismatch: missing={missing} "
                         f"unexpected={res.unexpected_keys}")
    if tied:
        model.tie_weights()
    return model.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("prefix")
    ap.add_argument("--max-rel", type=float, default=0.05)
    ap.add_argument("--min-top1", type=float, default=0.9)
    ap.add_argument("--no-generate", action="store_true")
    args = ap.parse_args()
    import torch
    import transformers

    with open(args.prefix + ".tokens") as f:
        lines = f.read().split()
    tokens = [int(t) for t in lines[0].split(",")]
    n_prompt = int(lines[1])
    r = Reader(args.model)
    model = build_model(r, torch, transformers)
    n_vocab = model.config.vocab_size
    ours = np.fromfile(args.prefix + ".f32", dtype=np.float32).reshape(-1, n_vocab)
    with torch.no_grad():
        ids = torch.tensor([tokens], device="cuda")
        hf = model(ids).logits[0].float().cpu().numpy()
    rows = hf[n_prompt - 1:n_prompt - 1 + ours.shape[0]]
    n = min(len(rows), ours.shape[0])
    rel = [float(np.max(np.abs(rows[i] - ours[i])) / max(np.max(np.abs(rows[i])), 1e-30))
           for i in range(n)]
    agree = sum(int(np.argmax(rows[i]) == np.argmax(ours[i])) for i in range(n))
    ok = max(rel) <= args.max_rel and agree >= args.min_top1 * n
    gen = ""
    if not args.no_generate:
        model16 = model.to(torch.bfloat16)
        for bs in (1, 32):
            inp = torch.tensor([tokens[:n_prompt]] * bs, device="cuda")
            model16.generate(inp, max_new_tokens=4, do_sample=False, min_new_tokens=4,
                             pad_token_id=0)
            torch.cuda.synchronize()
            t0 = time.time()
            model16.generate(inp, max_new_tokens=32, do_sample=False, min_new_tokens=32,
                             pad_token_id=0)
            torch.cuda.synchronize()
            gen += f" hf_bf16_tok_s_b{bs}={bs * 32 / (time.time() - t0):.0f}"
    print(f"hf_compare: steps={n} max_rel={max(rel):.3g} top1={agree}/{n}{gen} "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
