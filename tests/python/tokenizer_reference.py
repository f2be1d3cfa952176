"""Reference encodings for the tokenizer tests, from Hugging Face `tokenizers` and tiktoken,
and the generator of adversarial test strings."""
import json
import os
import random
import struct
import subprocess
import unicodedata


def gpt2_bytes_to_unicode():
    """GPT-2's byte -> printable character table, as published with the original encoder."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def split_invalid_utf8(data: bytes):
    """Yields ('text', str) for maximal valid UTF-8 runs and ('byte', int) for each invalid byte."""
    pos = 0
    while pos < len(data):
        try:
            yield "text", data[pos:].decode("utf-8")
            return
        except UnicodeDecodeError as e:
            if e.start:
                yield "text", data[pos:pos + e.start].decode("utf-8")
            yield "byte", data[pos + e.start]
            pos += e.start + 1


def reference_encode(encode_text, byte_id, data: bytes):
    """encode_text(str) -> ids for valid runs; each invalid byte is its single-byte token."""
    ids = []
    for kind, value in split_invalid_utf8(data):
        ids.extend(encode_text(value) if kind == "text" else [byte_id[value]])
    return ids


def hf_bpe(vocab_file, merges_file):
    """A bare HF byte-level BPE (no special-token handling, like tiktoken's encode_ordinary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.BPE.from_file(vocab_file, merges_file))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


# Codepoint ranges to draw from: scripts and symbols of many kinds (all assigned in Unicode 14,
# the version PCRE2 10.42 and Python 3.11 share).
RANGES = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x530, 0x58F),
          (0x590, 0x5FF), (0x600, 0x6FF), (0x900, 0x97F), (0x980, 0x9FF), (0xE00, 0xE7F), (0x10A0, 0x10FF),
          (0x1100, 0x11FF), (0x1E00, 0x1EFF), (0x2000, 0x206F), (0x20A0, 0x20C0), (0x2100, 0x214F),
          (0x2190, 0x21FF), (0x2200, 0x22FF), (0x2460, 0x24FF), (0x3000, 0x303F), (0x3040, 0x30FF),
          (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFF00, 0xFFEF), (0x1F300, 0x1F64F), (0x1F900, 0x1F9FF),
          (0x1D400, 0x1D7FF), (0x10400, 0x1044F)]

WORDS = ["the", "The", "don't", "I'm", "we'll", "they've", "you're", "he'd", "it's", "IT'S", "o'clock",
         "naïve", "café", "Straße", "über", "日本語", "中文字符", "한국어", "Привет", "мир", "γειά", "σου",
         "مرحبا", "שלום", "नमस्ते", "สวัสดี", "ქართული", "hello", "world", "1234567", "3.14159", "1e-9",
         "🙂", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "e\u0301", "a\u0308\u0323", "ﬁ", "ℕ", "x²", "½", "Ⅻ", "٣٤٥", "१२३",
         "http://example.com/a?b=c&d=e", "foo_bar", "camelCaseWord", "<|endoftext|>", "'s", "'", "''",
         "--", "...", "!!!", "\t", "\u00a0", "\u2003", "\u3000", "\u200b", "\ufeff", "\r\n"]

SPACES = [" ", "  ", "   ", "\n", "\n\n", " \n", "\t", " \t ", "\u00a0", "\u2009", "\r\n", "\x0b", "\x0c", "\u0085",
          "\u2028"]


def random_char(rng):
    while True:
        lo, hi = rng.choice(RANGES)
        c = chr(rng.randint(lo, hi))
        if unicodedata.category(c) not in ("Cn", "Cs", "Co"):
            return c


def make_strings(seed=0, count=3000):
    """Adversarial strings (as bytes): words, scripts, emoji, combining marks, runs of spaces,
    digits and newlines, long words, and invalid UTF-8."""
    rng = random.Random(seed)
    out = [b"", b" ", b"  ", b"\n", b"a", b" a", b"a ", b"hello world", b"Hello, world!\n"]
    for n in (1, 2, 3, 7, 16, 49, 64, 300):
        out += [b" " * n + b"x", b"x" + b" " * n, b"\n" * n, b" \n" * n, b"9" * n, b"ab" * n, b"a" * n,
                ("é" * n).encode(), ("🙂" * n).encode(), b"\t" * n + b"y"]
    while len(out) < count:
        kind = rng.random()
        parts = []
        for _ in range(rng.randint(1, 30)):
            r = rng.random()
            if r < 0.45:
                parts.append(rng.choice(WORDS))
            elif r < 0.7:
                parts.append(rng.choice(SPACES))
            elif r < 0.9:
                parts.append("".join(random_char(rng) for _ in range(rng.randint(1, 6))))
            else:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 12))))
        data = "".join(parts).encode("utf-8")
        if kind < 0.12:  # splice in invalid bytes: stray continuation, truncated sequences, 0xFF
            for _ in range(rng.randint(1, 3)):
                pos = rng.randint(0, len(data))
                bad = rng.choice([b"\x80", b"\xff", b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98", b"\xed\xa0\x80", b"\xc0\xaf"])
                data = data[:pos] + bad + data[pos:]
        out.append(data)
    return out


def write_strings(path, strings):
    with open(path, "wb") as f:
        for s in strings:
            f.write(struct.pack("<I", len(s)))
            f.write(s)


def run_tool(tool, tokenizer, strings, workdir):
    """Our ids for each string, via the C++ tokenizer_tool."""
    src = os.path.join(workdir, "strings.bin")
    dst = os.path.join(workdir, "ids.jsonl")
    write_strings(src, strings)
    r = subprocess.run([tool, tokenizer, src, dst], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"tokenizer_tool failed: {r.stderr}")
    with open(dst) as f:
        rows = [json.loads(line) for line in f]
    return rows, json.loads(r.stdout.strip().splitlines()[-1])


def train_test_bpe(out_dir, vocab_size=3000, seed=11):
    """A byte-level BPE trained with HF `tokenizers` on generated multilingual text, saved as
    vocab.json + merges.txt in out_dir (no third-party vocabulary needed). Returns the bare
    HF tokenizer for reference encodings."""
    from tokenizers import ByteLevelBPETokenizer
    texts = []
    for s in make_strings(seed, 6000):
        try:
            texts.append(s.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    texts += [" ".join(WORDS)] * 20
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                                special_tokens=["<|endoftext|>"], show_progress=False)
    os.makedirs(out_dir, exist_ok=True)
    trainer.save_model(out_dir)
    return hf_bpe(os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt"))
