#!/usr/bin/env python3
"""Independent reference for engine_tokenizer: Hugging Face `tokenizers` built from the
vocabulary and merges read out of the same GGUF file with the `gguf` package.

Usage: reference.py MODEL.gguf OUT.tsv

Writes one line per (pre-tokenizer, string):
    pre <TAB> flags <TAB> hex(input) <TAB> ids or "-" <TAB> hex(detok text) <TAB> hex(raw)
  pre    the tokenizer.ggml.pre rules the C side must use (smollm = the file's own; gpt2,
         llama3, qwen2 = the same vocabulary under those pre-tokenizers, to pin the
         splitters; they use the Hugging Face shapes of those models' tokenizer.json)
  flags  0 = plain text, 2 = ENGINE_TOK_PARSE_SPECIAL (control tokens are added tokens)
  ids    Hugging Face's ids; "-" for invalid UTF-8, which a Python str cannot hold (the C
         test then checks the byte round trip and the lossy detokenization only)
  text   Hugging Face's decode for valid input; bytes.decode("utf-8", "replace") for
         invalid input (maximal-subpart U+FFFD, what the ByteLevel decoder's
         from_utf8_lossy does), of the input less the bytes the vocabulary has no token for
  raw    what the byte round trip decode(encode(s)) gives: the input less those bytes
         (SmolLM2 has no token for 21 byte values; BPE without unk_token drops them)
"""
import os
import sys

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from corpus import corpus  # noqa: E402

GPT2_RE = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
             r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
            r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def read_vocab(path):
    r = gguf.GGUFReader(path)
    f = r.fields
    tokens = f["tokenizer.ggml.tokens"].contents()
    types = f["tokenizer.ggml.token_type"].contents()
    merges = f["tokenizer.ggml.merges"].contents()
    assert f["tokenizer.ggml.model"].contents() == "gpt2"
    return tokens, types, merges, f["tokenizer.ggml.pre"].contents()


def byte_alphabet():
    """GPT-2's byte -> character table (printable Latin-1 as itself, the rest from U+0100)."""
    bs = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or b >= 174]
    table, n = {}, 0
    for b in range(256):
        if b in bs:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def build(tokens, types, merges, pre, with_specials):
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(vocab=vocab, merges=pairs, byte_fallback=False,
                     ignore_merges=(pre == "llama3"))
    tok = Tokenizer(bpe)
    if pre == "smollm":
        # SmolLM2's tokenizer.json: Digits(individual) then ByteLevel(use_regex).
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        rx = LLAMA3_RE if pre == "llama3" else QWEN2_RE
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(rx), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    if with_specials:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == 3])
    return tok


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: reference.py MODEL.gguf OUT.tsv")
    tokens, types, merges, file_pre = read_vocab(sys.argv[1])
    assert file_pre == "smollm", file_pre
    strings = corpus()
    alphabet = byte_alphabet()
    have = set(tokens)
    kept = bytes(b for b in range(256) if alphabet[b] in have)
    lines = []
    for pre in ("smollm", "gpt2", "llama3", "qwen2"):
        tok = build(tokens, types, merges, pre, False)
        for b in strings:
            raw = bytes(c for c in b if c in kept)
            try:
                s = b.decode("utf-8")
            except UnicodeDecodeError:
                lines.append("%s\t0\t%s\t-\t%s\t%s" % (
                    pre, b.hex(), raw.decode("utf-8", "replace").encode().hex(), raw.hex()))
                continue
            ids = tok.encode(s, add_special_tokens=False).ids
            dec = tok.decode(ids, skip_special_tokens=False)
            lines.append("%s\t0\t%s\t%s\t%s\t%s" % (pre, b.hex(), " ".join(map(str, ids)),
                                                    dec.encode().hex(), raw.hex()))
    tok = build(tokens, types, merges, "smollm", True)
    for s in ["<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
              "a<|endoftext|>b", "<|im_end|><|im_end|>", "x <|im_start|> y", "<|im_start",
              "<repo_name>foo<file_sep>bar", "1<|im_end|>2"]:
        ids = tok.encode(s, add_special_tokens=False).ids
        lines.append("smollm\t2\t%s\t%s\t%s\t-" % (
            s.encode().hex(), " ".join(map(str, ids)),
            tok.decode(ids, skip_special_tokens=True).encode().hex()))
    with open(sys.argv[2], "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
