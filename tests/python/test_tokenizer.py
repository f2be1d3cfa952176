"""Tokenizer parity: our GPT-2 byte-level BPE against Hugging Face `tokenizers` and tiktoken,
and our SentencePiece against the Python sentencepiece package. Run by ctest (`tokenizer`),
which sets GPT2FT_BIN and GPT2FT_TOKENIZER_TOOL."""
import json
import os
import random
import shutil
import subprocess
import unittest

import tokenizer_reference as ref
from common import WorkDirTest

BIN = os.environ.get("GPT2FT_BIN", "")
TOOL = os.environ.get("GPT2FT_TOKENIZER_TOOL", "")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def gpt2_vocab_dir():
    d = os.environ.get("GPT2FT_GPT2_VOCAB_DIR") or os.path.join(ROOT, "..", "shared", "data", "gpt2")
    ok = os.path.exists(os.path.join(d, "encoder.json")) and os.path.exists(os.path.join(d, "vocab.bpe"))
    return d if ok else None


def brown_lines(limit):
    p = os.environ.get("GPT2FT_BROWN") or os.path.join(ROOT, "..", "shared", "data", "corpora", "brown.txt")
    if not os.path.exists(p):
        return []
    with open(p, "rb") as f:
        paragraphs = f.read().split(b"\n\n")
    return paragraphs[:limit]


def _valid(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


class TokenizerParity(WorkDirTest):
    required_env = ("GPT2FT_BIN", "GPT2FT_TOKENIZER_TOOL")

    def compare(self, name, tokenizer_path, strings, reference_fns, reference_decode=None):
        """Our ids must equal every reference's. decode(encode(x)) must give x back, or, for
        normalising tokenizers, what reference_decode(ids) gives."""
        rows, info = ref.run_tool(TOOL, tokenizer_path, strings, self.tmp)
        self.assertEqual(len(rows), len(strings))
        for ref_name, fn in reference_fns.items():
            mismatches = []
            for s, row in zip(strings, rows):
                expected = fn(s)
                if row["ids"] != expected:
                    mismatches.append((s, row["ids"], expected))
            print(f"[tokenizer] {name} vs {ref_name}: {len(strings)} strings "
                  f"({sum(len(s) for s in strings)} bytes), {len(mismatches)} mismatches")
            for s, got, want in mismatches[:5]:
                print(f"  {s!r}\n    ours {got}\n    ref  {want}")
            self.assertEqual(len(mismatches), 0, f"{name} vs {ref_name}")
        if reference_decode is None:
            bad = [s for s, row in zip(strings, rows) if not row["round_trip"]]
        else:
            bad = [s for s, row in zip(strings, rows) if bytes.fromhex(row["decoded_hex"]) != reference_decode(row["ids"])]
        print(f"[tokenizer] {name}: {len(bad)} round-trip failures")
        self.assertEqual(bad[:3], [], "decode(encode(x)) differs")
        return info

    def test_model_folders_carry_tokenizer_files_that_transformers_loads(self):
        # A tokenizer given as OpenAI's encoder.json + vocab.bpe once went into model folders
        # under those names, which transformers does not read: it loaded a one-token vocabulary
        # and encoded "Hello world" as []. What `init --tokenizer` (and training's final/, the
        # same function) writes must load in transformers and give our ids.
        from transformers import AutoTokenizer
        d = os.path.join(self.tmp, "hf_names")
        ref.train_test_bpe(d)
        openai = os.path.join(self.tmp, "openai_names")
        os.makedirs(openai)
        shutil.copy(os.path.join(d, "vocab.json"), os.path.join(openai, "encoder.json"))
        shutil.copy(os.path.join(d, "merges.txt"), os.path.join(openai, "vocab.bpe"))
        cases = [("vocab.json + merges.txt", d), ("encoder.json + vocab.bpe", openai)]
        if gpt2_vocab_dir():
            cases.append(("GPT-2's own encoder.json + vocab.bpe", gpt2_vocab_dir()))
        strings = [s for s in ref.make_strings(seed=3, count=600) if _valid(s) and b"<|endoftext|>" not in s]
        strings += [b"Hello world", b" leading space", b"caf\xc3\xa9 \xe2\x82\xac 12345"]
        for name, src in cases:
            with self.subTest(tokenizer=name):
                vocab_file = os.path.join(src, "vocab.json" if name.startswith("vocab") else "encoder.json")
                with open(vocab_file, encoding="utf-8") as f:
                    vocab_size = len(json.load(f))
                shape = os.path.join(self.tmp, "shape.json")
                with open(shape, "w") as f:
                    json.dump({"n_layer": 1, "n_head": 1, "n_embd": 8, "vocab_size": vocab_size, "n_positions": 32}, f)
                model = os.path.join(self.tmp, "model_" + name.split()[0].replace("'", ""))
                r = subprocess.run([BIN, "init", "--config-json", shape, "--tokenizer", src, "--output", model],
                                   capture_output=True, text=True)
                self.assertEqual(r.returncode, 0, r.stderr)
                self.assertEqual(sorted(f for f in os.listdir(model) if f in ("encoder.json", "vocab.bpe")), [])
                rows, info = ref.run_tool(TOOL, src, strings, self.tmp)
                hf = AutoTokenizer.from_pretrained(model)
                mismatches = [(s, row["ids"]) for s, row in zip(strings, rows)
                              if hf(s.decode("utf-8"))["input_ids"] != row["ids"]]
                print(f"[tokenizer files] {name}: transformers loads {type(hf).__name__} with {len(hf)} tokens; "
                      f"{len(strings)} strings, {len(mismatches)} id mismatches; eos {hf.eos_token!r} = {hf.eos_token_id}")
                self.assertEqual(len(hf), vocab_size)
                self.assertEqual(mismatches[:3], [])
                self.assertEqual(hf.eos_token_id, info["eot_id"])

    def test_trained_byte_level_bpe_matches_hf_tokenizers(self):
        d = os.path.join(self.tmp, "trained")
        hf = ref.train_test_bpe(d)
        with open(os.path.join(d, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        byte_id = {b: vocab[c] for b, c in ref.gpt2_bytes_to_unicode().items()}
        strings = ref.make_strings(seed=1, count=4000)
        info = self.compare("trained BPE (vocab 3000)", d, strings,
                            {"HF tokenizers": lambda s: ref.reference_encode(lambda t: hf.encode(t).ids, byte_id, s)})
        self.assertEqual(info["eot_id"], vocab["<|endoftext|>"])
        self.assertEqual(info["vocab_size"], len(vocab))

    def test_real_gpt2_vocabulary_matches_tiktoken_and_hf(self):
        d = gpt2_vocab_dir()
        if d is None:
            self.skipTest("the GPT-2 vocabulary is not present (set GPT2FT_GPT2_VOCAB_DIR or provide ../shared/data/gpt2)")
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        ranks = data_gym_to_mergeable_bpe_ranks(os.path.join(d, "vocab.bpe"), os.path.join(d, "encoder.json"))
        enc = tiktoken.Encoding(name="gpt2-local",
                                pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
                                mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})
        # HF reads the same tables as vocab.json / merges.txt.
        hf_dir = os.path.join(self.tmp, "gpt2-hf")
        os.makedirs(hf_dir, exist_ok=True)
        shutil.copy(os.path.join(d, "encoder.json"), os.path.join(hf_dir, "vocab.json"))
        shutil.copy(os.path.join(d, "vocab.bpe"), os.path.join(hf_dir, "merges.txt"))
        hf = ref.hf_bpe(os.path.join(hf_dir, "vocab.json"), os.path.join(hf_dir, "merges.txt"))
        byte_id = {b: ranks[bytes([b])] for b in range(256)}
        strings = ref.make_strings(seed=2, count=4000) + brown_lines(2000)
        references = {
            "tiktoken": lambda s: ref.reference_encode(enc.encode_ordinary, byte_id, s),
            "HF tokenizers": lambda s: ref.reference_encode(lambda t: hf.encode(t).ids, byte_id, s),
        }
        info = self.compare("GPT-2 vocabulary (encoder.json + vocab.bpe)", d, strings, references)
        self.assertEqual(info["eot_id"], 50256)
        self.assertEqual(info["vocab_size"], 50257)
        # Both folder layouts give the same tokenizer.
        _, info_hf = ref.run_tool(TOOL, hf_dir, [b"x"], self.tmp)
        self.assertEqual(info_hf["identity"], info["identity"])

    def test_sentencepiece_trained_by_us_matches_python_sentencepiece(self):
        import sentencepiece as spm
        corpus = os.path.join(self.tmp, "sp_corpus.txt")
        rng = random.Random(3)
        with open(corpus, "w", encoding="utf-8") as f:  # sentences from a small alphabet of words
            for _ in range(4000):
                f.write(" ".join(rng.choice(ref.WORDS[:40]) for _ in range(rng.randint(3, 20))).replace("\r", "") + "\n")
        out = os.path.join(self.tmp, "sp_shards")
        r = subprocess.run([BIN, "tokenize", "--train-sentencepiece", "--vocab-size", "600", "--input", corpus,
                            "--output-dir", out, "--val-fraction", "0", "--no-progress"],
                           capture_output=True, text=True, timeout=600)
        self.assertEqual(r.returncode, 0, r.stderr)
        model = os.path.join(out, "tokenizer.model")
        sp = spm.SentencePieceProcessor(model_file=model)
        strings = [s for s in ref.make_strings(seed=5, count=2000) if _valid(s)]
        rng.shuffle(strings)
        info = self.compare("SentencePiece (trained here, 600 pieces)", model, strings,
                            {"python sentencepiece": lambda s: sp.encode(s.decode("utf-8"))},
                            reference_decode=lambda ids: sp.decode(ids).encode("utf-8"))
        self.assertEqual(info["vocab_size"], sp.get_piece_size())
        self.assertEqual(info["eot_id"], sp.eos_id())
        # A model initialised with it names its end-of-text id as GPT-2's config does (bos =
        # eos = the document separator), not GPT-2's 50256, which lies outside 600 pieces.
        shape = os.path.join(self.tmp, "sp_shape.json")
        with open(shape, "w") as f:
            json.dump({"n_layer": 1, "n_head": 2, "n_embd": 32, "vocab_size": sp.get_piece_size(), "n_positions": 32}, f)
        folder = os.path.join(self.tmp, "sp_model")
        r = subprocess.run([BIN, "init", "--config-json", shape, "--tokenizer", model, "--output", folder],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        from transformers import GPT2Config
        config = GPT2Config.from_pretrained(folder)
        self.assertEqual((config.bos_token_id, config.eos_token_id), (sp.eos_id(), sp.eos_id()))


if __name__ == "__main__":
    unittest.main()
