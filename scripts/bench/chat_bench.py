#!/usr/bin/env python3
"""Tokenizing conversations against tokenizing the same text as plain documents (issue: chat
data; the aim is within 1.5x).

The Brown corpus, repeated --copies times, is cut into conversations of 2 to 6 turns of one
to three sentences each (a system prompt in every third). The same turns' text is written a
second time as plain .jsonl documents ({"text": all the turns joined with newlines}), one per
conversation. Both go through the whole `gpt2-finetune tokenize` command, --workers 1 and
then all cores, median of --repeats runs each, in this invocation: conversations with the
built-in chatml template, the documents as text.

  .venv/bin/python scripts/bench/chat_bench.py [--copies 4] [--repeats 5]
"""
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_bench import BUILD, corpus_arguments, median_time, parse_corpus_arguments, print_table  # noqa: E402


def conversations(text, seed=0):
    """Turns cut from the corpus' sentences, alternating user and assistant."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    rng = random.Random(seed)
    at = 0
    while at < len(sentences):
        msgs = []
        if rng.random() < 1 / 3:
            msgs.append({"role": "system", "content": sentences[at]})
            at += 1
        for turn in range(rng.randint(1, 3) * 2):
            n = rng.randint(1, 3)
            msgs.append({"role": "user" if turn % 2 == 0 else "assistant", "content": " ".join(sentences[at:at + n])})
            at += n
        if msgs[-1]["role"] == "assistant" and msgs[-1]["content"]:
            yield msgs


def main():
    ap = corpus_arguments(__doc__)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = parse_corpus_arguments(ap)
    work = tempfile.mkdtemp(prefix="gpt2ft-chat-bench-")
    try:
        with open(args.text, encoding="utf-8") as f:
            text = f.read() * args.copies
        chats, docs = os.path.join(work, "chats.jsonl"), os.path.join(work, "docs.jsonl")
        count = turns = 0
        with open(chats, "w", encoding="utf-8") as c, open(docs, "w", encoding="utf-8") as d:
            for msgs in conversations(text):
                c.write(json.dumps({"messages": msgs}) + "\n")
                d.write(json.dumps({"text": "\n".join(m["content"] for m in msgs)}) + "\n")
                count += 1
                turns += len(msgs)
        exe = os.path.join(BUILD, "gpt2-finetune")
        out = os.path.join(work, "shards")

        def tokenize(path, workers, *extra):
            def once():
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run([exe, "tokenize", "--tokenizer", args.vocab, "--input", path, "--output-dir", out,
                                "--workers", str(workers), "--val-fraction", "0", "--no-progress", *extra],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return median_time(once, args.repeats)

        rows = []
        for workers in (1, os.cpu_count()):
            t_docs = tokenize(docs, workers)
            t_chat = tokenize(chats, workers, "--chat-template", "chatml")
            rows.append((workers, t_docs, t_chat))
        mb = os.path.getsize(docs) / 1e6
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{count} conversations, {turns} turns ({args.copies} x {os.path.basename(args.text)}; the documents' "
          f".jsonl is {mb:.1f} MB), whole command, median of {args.repeats} runs\n")
    print_table(("workers", "plain documents", "conversations (chatml)", "ratio"),
                [(str(w), f"{d:.2f} s", f"{c:.2f} s", f"{c / d:.2f}x") for w, d, c in rows])


if __name__ == "__main__":
    main()
