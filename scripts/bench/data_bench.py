#!/usr/bin/env python3
"""Tokenizer and loader benchmark (issue: data).

Tokenizer: MB/s of our GPT-2 BPE against tiktoken and Hugging Face `tokenizers` on the same
text, one thread and then all cores, median of --repeats runs each, all in this invocation.
Loader: tokens/s our DataLoader delivers on the CPU (T=1024) against what a GPT-2 124M
training step consumes on an H100.

Needs the GPT-2 vocabulary (../shared/data/gpt2 or GPT2FT_GPT2_VOCAB_DIR) and a text
(../shared/data/corpora/brown.txt or --text). Writes a JSON file and a markdown table.

  .venv/bin/python scripts/bench/data_bench.py [--repeats 5] [--out docs/bench-data.json]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("GPT2FT_BUILD_DIR", os.path.join(ROOT, "build"))


GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # GPT-2's pre-tokenizer, for tiktoken


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def corpus_arguments(doc):
    """An argument parser with --vocab (GPT-2's vocabulary) and --text (a corpus), the shared
    folder's by default."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", default=os.environ.get("GPT2FT_GPT2_VOCAB_DIR", os.path.join(ROOT, "..", "shared", "data", "gpt2")))
    ap.add_argument("--text", default=os.path.join(ROOT, "..", "shared", "data", "corpora", "brown.txt"))
    return ap


def parse_corpus_arguments(ap):
    """The arguments, after checking that the vocabulary and the corpus are there."""
    args = ap.parse_args()
    for p in (os.path.join(args.vocab, "encoder.json"), args.text):
        if not os.path.exists(p):
            sys.exit(f"missing {p}: the benchmark needs the GPT-2 vocabulary and a text corpus")
    return args


def init_model(exe, work, vocab, **shape):
    """A GPT-2-initialised model of `shape` (config.json fields) made by `gpt2-finetune init`
    under work/model, with the tokenizer files of `vocab`; returns its folder."""
    path = os.path.join(work, "shape.json")
    with open(path, "w") as f:
        json.dump(shape, f)
    model = os.path.join(work, "model")
    subprocess.run([exe, "init", "--config-json", path, "--tokenizer", vocab, "--output", model], check=True,
                   capture_output=True)
    return model


def print_table(headers, rows):
    """A markdown table of already formatted cells."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main():
    ap = corpus_arguments(__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "bench-data.json"))
    args = parse_corpus_arguments(ap)

    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tokenizers import Tokenizer, models, pre_tokenizers

    with open(args.text, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8")
    paragraphs = [p + "\n\n" for p in text.split("\n\n")]
    mb = len(raw) / 1e6

    ranks = data_gym_to_mergeable_bpe_ranks(os.path.join(args.vocab, "vocab.bpe"), os.path.join(args.vocab, "encoder.json"))
    enc = tiktoken.Encoding(name="gpt2-local",
                            pat_str=GPT2_PATTERN,
                            mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})
    hf_dir = tempfile.mkdtemp()
    shutil.copy(os.path.join(args.vocab, "encoder.json"), os.path.join(hf_dir, "vocab.json"))
    shutil.copy(os.path.join(args.vocab, "vocab.bpe"), os.path.join(hf_dir, "merges.txt"))

    def hf_tokenizer():  # fresh each run, so its cache starts cold like ours
        tok = Tokenizer(models.BPE.from_file(os.path.join(hf_dir, "vocab.json"), os.path.join(hf_dir, "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        return tok

    rows = []
    for threads in sorted({1, args.threads}):
        r = subprocess.run([os.path.join(BUILD, "bench_tokenizer"), args.vocab, args.text, str(threads), str(args.repeats)],
                           capture_output=True, text=True, check=True)
        ours = json.loads(r.stdout.strip().splitlines()[-1])
        if threads == 1:
            t_tik = median_time(lambda: [enc.encode_ordinary(p) for p in paragraphs], args.repeats)
            t_hf = median_time(lambda: (lambda tok: [tok.encode(p) for p in paragraphs])(hf_tokenizer()), args.repeats)
        else:
            t_tik = median_time(lambda: enc.encode_ordinary_batch(paragraphs, num_threads=threads), args.repeats)
            os.environ["RAYON_NUM_THREADS"] = str(threads)
            t_hf = median_time(lambda: hf_tokenizer().encode_batch(paragraphs), args.repeats)
        rows.append({"threads": threads, "gpt2-finetune": ours["mb_per_s"], "tiktoken": mb / t_tik,
                     "hf_tokenizers": mb / t_hf, "tokens": ours["tokens"]})

    # Loader: shards of the same text (via our tokenize), T=1024, B=16.
    shard_dir = tempfile.mkdtemp()
    subprocess.run([os.path.join(BUILD, "gpt2-finetune"), "tokenize", "--tokenizer", args.vocab, "--input", args.text,
                    "--output-dir", shard_dir, "--val-fraction", "0", "--no-progress"], check=True, capture_output=True)
    loader_rows = []
    for workers in sorted({1, 2, args.threads}):
        vals = []
        for _ in range(3):
            r = subprocess.run([os.path.join(BUILD, "bench_loader"), os.path.join(shard_dir, "train_*.bin"), "1024", "16",
                                str(workers), "400"], capture_output=True, text=True, check=True)
            vals.append(json.loads(r.stdout.strip().splitlines()[-1])["tokens_per_s"])
        loader_rows.append({"workers": workers, "tokens_per_s": statistics.median(vals)})
    shutil.rmtree(shard_dir, ignore_errors=True)
    shutil.rmtree(hf_dir, ignore_errors=True)

    # What one H100 consumes training GPT-2 124M at T=1024: model FLOPs per token
    # 6N + 12*L*C*T (PaLM's estimate), at 50% of the 989 TFLOP/s dense bf16 peak.
    n, L, C, T = 124_439_808, 12, 768, 1024
    h100_tokens_per_s = 0.5 * 989e12 / (6 * n + 12 * L * C * T)

    result = {"text_bytes": len(raw), "repeats": args.repeats, "tokenizer": rows, "loader": loader_rows,
              "h100_gpt2_124m_tokens_per_s_at_50pct_mfu": h100_tokens_per_s,
              "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
              "tiktoken": tiktoken.__version__ if hasattr(tiktoken, "__version__") else "?"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    print(f"Tokenizer, {mb:.2f} MB of text, GPT-2 vocabulary, median of {args.repeats} runs (MB/s):\n")
    print("| threads | gpt2-finetune | tiktoken | HF tokenizers | ours / tiktoken | ours / HF |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['gpt2-finetune']:.2f} | {r['tiktoken']:.2f} | {r['hf_tokenizers']:.2f} | "
              f"{r['gpt2-finetune'] / r['tiktoken']:.2f}x | {r['gpt2-finetune'] / r['hf_tokenizers']:.2f}x |")
    print(f"\nLoader, T=1024, micro batch 16, CPU (tokens/s; an H100 training GPT-2 124M at 50% MFU "
          f"consumes about {h100_tokens_per_s:,.0f}):\n")
    print("| workers | tokens/s | × H100 need |")
    print("|---|---|---|")
    for r in loader_rows:
        print(f"| {r['workers']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / h100_tokens_per_s:.1f}x |")


if __name__ == "__main__":
    main()
