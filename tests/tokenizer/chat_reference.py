#!/usr/bin/env python3
"""Independent reference for engine_chat: renders conversations with Jinja2 (as
transformers' apply_chat_template does: sandboxed, trim_blocks, lstrip_blocks) and
tokenizes the result with Hugging Face `tokenizers` over the GGUF's vocabulary, control
tokens registered as special added tokens.

Usage: chat_reference.py MODEL.gguf OUT.tsv

Families: "file" is the GGUF's own tokenizer.chat_template (SmolLM2: ChatML with a
default system prompt); llama2, llama3, mistral, zephyr are those models' Hugging Face
templates, rendered here with SmolLM2's vocabulary (their markers are plain text there,
bos/eos are <|im_start|>/<|im_end|>), which pins the C renderers' text exactly.
Line: family <TAB> add_generation_prompt <TAB> role:hex(content),... <TAB> ids
Contents hold no special-token text: Hugging Face would parse it (the C renderer never
does; test_engine_chat checks that separately).
"""
import os
import sys

import gguf
from jinja2.sandbox import ImmutableSandboxedEnvironment

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import build, read_vocab  # noqa: E402

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}"
    "{{ '[INST] ' + messages[0]['content'] + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}")
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}")

CONVS = [
    [("user", "Hello!")],
    [("system", "You are terse."), ("user", "What is 2+2?")],
    [("user", "hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke.")],
    [("user", "  spaces around  \n")],
    [("user", "multi\nline\n\ncontent with 中文 and emoji 👍🏽")],
    [],
    [("system", "only a system message")],
    [("user", ""), ("assistant", "")],
    [("user", "ends with newline\n"), ("assistant", "\n\nstarts with newlines")],
    [("system", "S"), ("user", "x"), ("assistant", " y "), ("user", "z 123456")],
    [("user", "code:\n```c\nint x = 1;\n```\n\tdone  ")],
]


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: chat_reference.py MODEL.gguf OUT.tsv")
    path = sys.argv[1]
    tokens, types, merges, _ = read_vocab(path)
    tok = build(tokens, types, merges, "smollm", True)
    r = gguf.GGUFReader(path)
    bos = tokens[int(r.fields["tokenizer.ggml.bos_token_id"].contents())]
    eos = tokens[int(r.fields["tokenizer.ggml.eos_token_id"].contents())]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    templates = {"file": r.fields["tokenizer.chat_template"].contents(), "llama2": LLAMA2,
                 "llama3": LLAMA3, "mistral": MISTRAL, "zephyr": ZEPHYR}
    lines = []
    for fam, text in templates.items():
        t = env.from_string(text)
        for conv in CONVS:
            for gen in (True, False):
                msgs = [{"role": a, "content": b} for a, b in conv]
                try:
                    s = t.render(messages=msgs, add_generation_prompt=gen, bos_token=bos,
                                 eos_token=eos)
                except Exception:  # e.g. llama2's messages[0] on an empty conversation
                    continue
                ids = tok.encode(s, add_special_tokens=False).ids
                lines.append("%s\t%d\t%s\t%s" % (
                    fam, int(gen), ",".join("%s:%s" % (a, b.encode().hex()) for a, b in conv),
                    " ".join(map(str, ids))))
    with open(sys.argv[2], "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
