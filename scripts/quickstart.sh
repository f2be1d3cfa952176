#!/usr/bin/env bash
# The main job on a fresh machine, on the CPU, in a few minutes: build, train a SentencePiece
# tokenizer on text every Debian system ships (/usr/share/common-licenses), tokenize it into
# shards, create a small GPT-2-shaped model, train it (loss falls), evaluate before and after,
# save it in Hugging Face format and print a generated sample.
# With a real Hugging Face GPT-2 folder you would skip the tokenizer and init steps and set
# model.init_from (see configs/gpt2-124m-1gpu.json).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh gpt2-finetune  # the command line only; scripts/test.sh builds the rest
bin=build/gpt2-finetune
work=runs/quickstart
corpus=/usr/share/common-licenses
mkdir -p "$work/corpus"
# One document per licence (symlinks are duplicates).
find "$corpus" -maxdepth 1 -type f -exec cp {} "$work/corpus/" \;
for f in "$work"/corpus/*; do [[ "$f" == *.txt ]] || mv "$f" "$f.txt"; done

echo "== tokenizer and shards"
$bin tokenize --train-sentencepiece --vocab-size 2000 --input "$work"/corpus/*.txt \
  --output-dir "$work/data" --val-fraction 0.15 --overwrite --no-progress

echo "== a small model"
$bin init --config-json configs/quickstart-model.json --tokenizer "$work/data/tokenizer.model" \
  --output "$work/init" --seed 1337 --overwrite
echo -n "before training: " && $bin eval --model "$work/init" --data "$work/data/val_*.bin" --seq-len 128 --device cpu

echo "== training"
rm -rf "$work/run"  # this script's own earlier run: a new run never writes among another's checkpoints
start=$(date +%s)
$bin --config configs/quickstart.json --set checkpoint.resume=none
echo "trained in $(( $(date +%s) - start ))s"
echo -n "after training:  " && $bin eval --model "$work/run/final" --data "$work/data/val_*.bin" --seq-len 128 --device cpu

echo "== a sample from the trained model"
$bin generate --model "$work/run/final" --prompt "This License" --max-new-tokens 60 --temperature 0.8 --top-k 40 --device cpu
echo
echo "Model (Hugging Face format): $work/run/final   metrics: $work/run/metrics.jsonl"
