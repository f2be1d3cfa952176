#!/usr/bin/env python3
"""The whole `gpt2-finetune tokenize` command against tiktoken (issue: fast by default).

On the Brown corpus repeated --copies times (60 MB at 10), one worker: the wall time of the
whole command (start, tokenizer load, reading, tokenizing, shard writing with fsync, the
manifest), our tokenizer alone in-process (bench_tokenizer), and tiktoken's encode_ordinary
on the same text in memory, one thread. Also the command's start time (--version). Median
of --repeats runs each, all in this invocation; ratios are against tiktoken's median.

  .venv/bin/python scripts/bench/tokenize_bench.py [--copies 10] [--repeats 5]
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_bench import BUILD, GPT2_PATTERN, corpus_arguments, median_time, parse_corpus_arguments  # noqa: E402


def main():
    ap = corpus_arguments(__doc__)
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    args = parse_corpus_arguments(ap)
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    work = tempfile.mkdtemp(prefix="gpt2ft-tokenize-bench-")
    try:
        with open(args.text, "rb") as f:
            raw = f.read() * args.copies
        corpus = os.path.join(work, "corpus.txt")
        with open(corpus, "wb") as f:
            f.write(raw)
        mb = len(raw) / 1e6
        text = raw.decode("utf-8")
        ranks = data_gym_to_mergeable_bpe_ranks(os.path.join(args.vocab, "vocab.bpe"),
                                                os.path.join(args.vocab, "encoder.json"))
        enc = tiktoken.Encoding(name="gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                special_tokens={"<|endoftext|>": 50256})
        t_tiktoken = median_time(lambda: enc.encode_ordinary(text), args.repeats)

        exe = os.path.join(BUILD, "gpt2-finetune")
        out = os.path.join(work, "shards")

        def whole_command():
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run([exe, "tokenize", "--tokenizer", args.vocab, "--input", corpus, "--output-dir", out,
                            "--workers", "1", "--val-fraction", "0", "--no-progress"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        t_command = median_time(whole_command, args.repeats)
        t_start = median_time(lambda: subprocess.run([exe, "--version"], check=True, stdout=subprocess.DEVNULL),
                                 args.repeats)
        r = subprocess.run([os.path.join(BUILD, "bench_tokenizer"), args.vocab, corpus, "1", str(args.repeats)],
                           check=True, capture_output=True, text=True)
        alone = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [("tiktoken encode_ordinary, one thread, in memory", mb / t_tiktoken),
            ("bench_tokenizer, our tokenizer alone in-process", alone["mb_per_s"]),
            ("gpt2-finetune tokenize --workers 1, the whole command", mb / t_command)]
    print(f"{mb:.1f} MB ({args.copies} x {os.path.basename(args.text)}), median of {args.repeats} runs; "
          f"gpt2-finetune --version starts in {t_start * 1000:.0f} ms\n")
    print("| what | MB/s | vs tiktoken |")
    print("|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {rate / rows[0][1]:.2f}x |")


if __name__ == "__main__":
    main()
