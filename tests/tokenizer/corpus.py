"""Deterministic tokenizer test corpus: a list of byte strings (valid and invalid UTF-8).

corpus() always returns the same list (fixed seed, no environment input). Every code point
it picks is assigned in the running Python's unicodedata, so the Unicode version of the
Hugging Face reference (newer) classifies it the same way as engine_unicode_tables.c.
Run directly to print a summary: python3 tests/tokenizer/corpus.py
"""
import random
import unicodedata

WORDS = (
    "the of and to in is you that it he was for on are as with his they I at be this have "
    "from or one had by word but not what all were we when your can said there use an each "
    "which she do how their if will up other about out many then them these so some her "
    "would make like him into time has look two more write go see number no way could people "
    "my than first water been call who oil its now find long down day did get come made may "
    "part tokenizer inference serverless kernel quantization transformer attention"
).split()

CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Ve", "'LL",
                "'D", "'M", "'x", "''", "\u2019s", "'", "'re'", "'ll've"]

CODE = [
    'int main(int argc, char **argv)\n{\n    printf("hello, %s\\n", argv[0]);\n    return 0;\n}\n',
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (let i = 0; i < arr.length; i++) { console.log(`${i}: ${arr[i]}`); }",
    'fn main() {\n\tlet v: Vec<u32> = (0..10).map(|x| x * x).collect();\n\tprintln!("{:?}", v);\n}',
    'package main\n\nimport "fmt"\n\nfunc main() {\n\tfmt.Println("héllo")\n}\n',
    "SELECT id, name FROM users WHERE age >= 21 AND name LIKE '%smith%' ORDER BY id DESC;",
    "#!/bin/sh\nset -eu\nfor f in *.txt; do\n  wc -l \"$f\" | awk '{print $1}'\ndone\n",
    '<div class="x"><a href="https://example.com/?q=1&r=2">link</a></div>\r\n',
    "x = {'a': [1, 2, 3], \"b\": None, 'c': 3.14e-10}\nprint(x['a'][::-1])",
    "    \t  if (a != b && c <= d || e >= f) { return a->b.c[0]; }",
    "template<typename T> struct S { T t; };  // comment\n/* block */",
    "  \n\n\n    def __init__(self):\n        self._x = 0x1F  # hex\n",
    "{\"key\": \"value\", \"n\": 12345678901234567890, \"f\": -0.000001}",
    "$ ls -la /usr/lib && echo $?\n",
    "matrix = [[1,2],[3,4]]\nλ = lambda x: x**2\n",
]

SCRIPTS = [
    "日本語のテキストを分割します。東京は晴れ。",
    "中文文本测试，包括标点符号。我们今天去公园！",
    "한국어 텍스트 토큰화 테스트입니다.",
    "Привет, мир! Как дела? Ёжик в тумане.",
    "Γειά σου Κόσμε· αλφάβητο",
    "مرحبا بالعالم، هذا اختبار ١٢٣٤٥ للأرقام",
    "שלום עולם, זה מבחן 123",
    "नमस्ते दुनिया १२३४ परीक्षण",
    "สวัสดีชาวโลก ๑๒๓",
    "Ελληνικά and English mixed with Русский и 中文",
    "ａｂｃ　ＡＢＣ　１２３４５　fullwidth",
    "Ⅻ Ⅷ ½ ¾ ² ³ ⁴ ₅ ① ② ⑳ numbers of other kinds",
    "e\u0301 a\u0300 o\u0308 n\u0303 Z\u0335\u0321a\u0336\u0322l\u0337g\u0338o combining",
    "\u0915\u094d\u0937 \u0e01\u0e34\u0e4a virama and tone marks",
    "emoji 😀😃😄 👍🏽 👩🏿‍💻 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇯🇵 1️⃣ #️⃣ ❤️ ✌🏻",
    "tab\there\tand\tthere",
    "zero\u200bwidth\u200cjoiner\u200dnon\u2060joiner",
    "bidi \u202eoverride\u202c and \u200fRLM",
]

SPACES = [" ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \n", "\t\t", "\u00a0", "\u3000",
          "\u2003", "\u2028", "\x0b", "\x0c", "\r", " \t ", "\n \n", "\x1c", "\x85"]

EMOJI = ["😀", "👍", "👍🏻", "👍🏿", "👨‍👩‍👧", "👩‍❤️‍💋‍👨", "🧑🏽‍🚀", "🇺🇸", "🏴󠁧󠁢󠁳󠁣󠁴󠁿",
         "❤️", "☺︎", "🫠", "🥲", "🦀", "🐍", "💯"]

INVALID = [
    b"\x80", b"\xbf", b"\xc0\xaf", b"\xc1\xbf", b"\xe0\x80\xaf", b"\xed\xa0\x80",
    b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xff", b"\xfe",
    b"\xe2\x82", b"\xf0\x9f\x98", b"\xc3", b"\xf0\x9f", b"\xe2", b"\x80\x80\x80",
    b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xf0\x28\x8c\xbc", b"\xf8\xa1\xa1\xa1\xa1",
]


def _assigned(cp):
    if 0xD800 <= cp <= 0xDFFF:
        return False
    return unicodedata.category(chr(cp)) not in ("Cn", "Co", "Cs")


def _rand_cp(rng):
    bands = [(0x20, 0x7E), (0x00, 0x20), (0xA0, 0x24F), (0x250, 0x36F), (0x370, 0x52F),
             (0x590, 0x6FF), (0x900, 0xDFF), (0x1100, 0x11FF), (0x1E00, 0x1FFF),
             (0x2000, 0x206F), (0x2070, 0x2BFF), (0x3000, 0x30FF), (0x4E00, 0x9FFF),
             (0xAC00, 0xD7A3), (0xFF00, 0xFFEF), (0x10000, 0x1FFFF), (0x1F300, 0x1FAFF),
             (0x20000, 0x2A6DF), (0xE0000, 0xE007F)]
    while True:
        lo, hi = rng.choice(bands)
        cp = rng.randint(lo, hi)
        if _assigned(cp):
            return chr(cp)


def _sentence(rng, n):
    out = []
    for i in range(n):
        w = rng.choice(WORDS)
        r = rng.random()
        if r < 0.1:
            w = w.capitalize()
        elif r < 0.15:
            w = w.upper()
        elif r < 0.22:
            w += rng.choice(CONTRACTIONS)
        out.append(w)
        if rng.random() < 0.12:
            out.append(rng.choice([",", ".", "!", "?", ";", ":", " -", "...", " (x)", '"']))
    sep = " "
    return sep.join(out)


def _number(rng):
    k = rng.randint(1, 40)
    digits = "".join(rng.choice("0123456789") for _ in range(k))
    forms = [
        digits,
        "-" + digits,
        digits[: max(1, k // 2)] + "." + digits[k // 2:],
        "{:,}".format(int(digits)),
        digits + "e-" + str(rng.randint(1, 300)),
        " " + digits,
        "v" + ".".join(digits[i:i + 2] for i in range(0, k, 2)),
        "x" + digits + "y",
        "$" + digits + ".00",
        digits + "%",
        "0x" + "".join(rng.choice("0123456789abcdef") for _ in range(k)),
    ]
    return rng.choice(forms)


def corpus():
    rng = random.Random(20240611)
    out = []

    def add(s):
        out.append(s.encode("utf-8") if isinstance(s, str) else s)

    # Fixed edge cases first.
    for s in ["", " ", "a", "  ", "\n", "hello", " hello", "hello world", "Hello, World!",
              "I'm", "you're", "it's", "'s", "'", "''", "don't 'LL 'Re", "a  b", "a   b",
              "a\n\nb", "a \n b", " \t\n\r\u00a0", "1", "12", "123", "1234", "12345",
              "1 2 3", "a1b2c3", "3.14159", "-42", "1,000,000", "<|im_end|>",
              "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>", "<repo_name>x",
              "trailing spaces   ", "   leading", "\n\n\n", "\r\n\r\n", "x\u3000y", "x\u00a0y",
              "a\x1cb", "\x00", "\x00\x01\x02", "\x7f", "\u0085", "\ufeffBOM", "\ufffd",
              "ſ's 'ſ", "Straße ǅ ǈ", "ﬁ ﬂ", "İstanbul", "A\u030a", "\U0001F600" * 3]:
        add(s)
    for s in CODE:
        add(s)
        add(s.replace("    ", "\t"))
    for s in SCRIPTS:
        add(s)
    for c in CONTRACTIONS:
        add("word" + c + " next")
        add(c.upper() + "x")
    for sp in SPACES:
        for w in ("word", "1", "!", "é", "中"):
            add(w + sp + w)
            add(sp + w)
            add(w + sp)
            add(sp * 3 + w + sp * 2)
    for e in EMOJI:
        add(e)
        add("hi " + e + " there" + e + e)
    for k in range(1, 41):
        add("".join(rng.choice("0123456789") for _ in range(k)))
        add(" " + "".join(rng.choice("0123456789") for _ in range(k)) + " ")
    for bad in INVALID:
        add(bad)
        add(b"ab" + bad + b"cd")
        add(b" " + bad + b" x " + bad + bad)
        add("héllo ".encode() + bad + "世界".encode())

    # Random mixtures.
    gens = [
        lambda: _sentence(rng, rng.randint(1, 30)),
        lambda: _number(rng),
        lambda: rng.choice(CODE)[rng.randint(0, 10):],
        lambda: rng.choice(SCRIPTS) + " " + _sentence(rng, 3),
        lambda: "".join(_rand_cp(rng) for _ in range(rng.randint(1, 30))),
        lambda: rng.choice(SPACES).join(_sentence(rng, 2) for _ in range(3)),
        lambda: "".join(rng.choice(SPACES + ["a", "1", "é", "!", "'s"])
                        for _ in range(rng.randint(1, 20))),
        lambda: " ".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 6))),
        lambda: _number(rng) + " " + _sentence(rng, 2) + " " + _number(rng),
        lambda: "".join(rng.choice("'sStTrReEvVlLmMdD \n") for _ in range(rng.randint(2, 16))),
    ]
    while len(out) < 2200:
        add(gens[rng.randrange(len(gens))]())
    # Random invalid UTF-8: valid text with bytes flipped.
    for _ in range(150):
        b = bytearray(_sentence(rng, 5).encode() + rng.choice(SCRIPTS).encode())
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randint(0x80, 0xFF)
        add(bytes(b))
    # Long inputs: the merge must stay O(n log n).
    add("a" * 20000)
    add(" " * 5000 + "x")
    add("".join(rng.choice("0123456789") for _ in range(10000)))
    add(_sentence(rng, 3000))
    add("中" * 3000)
    add("\n" * 1000 + "end")
    return out


if __name__ == "__main__":
    c = corpus()
    n_invalid = 0
    for s in c:
        try:
            s.decode("utf-8")
        except UnicodeDecodeError:
            n_invalid += 1
    print("strings=%d invalid_utf8=%d bytes=%d" % (len(c), n_invalid, sum(map(len, c))))
