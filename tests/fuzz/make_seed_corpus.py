#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpus under tests/fuzz/corpus/<target>/: small valid inputs
of each format (written here with numpy, json and safetensors, independently of our writers)
and a few damaged ones. Rerun to regenerate; the files are committed so CI replays them."""
import json
import os
import struct
import sys

import numpy as np
from safetensors.numpy import save

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "scripts", "bench"))
from instruction_bench import document_shard_bytes  # noqa: E402  (the document shard writer in numpy)


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def shard(tokens, width=2):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240520, 1, len(tokens)) if width == 2 else (20240801, 7, len(tokens))
    return header.tobytes() + np.asarray(tokens, dtype=np.uint16 if width == 2 else np.uint32).tobytes()


def preference_seeds():
    """Preference shards (magic 20261206): a valid pair, one whose sides' prompts differ and one
    with an odd document count (both with valid checksums), and a damaged one."""
    kind = {"magic": 20261206, "version": 1}
    pair = document_shard_bytes([9, 1, 2, 5, 9, 9, 1, 2, 6, 7, 9], [0, 5], [0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1], **kind)
    yield "preference.bin", pair
    yield "preference_two_prompts.bin", document_shard_bytes([9, 1, 2, 5, 9, 9, 3, 2, 6, 9], [0, 5],
                                                             [0, 0, 0, 1, 1, 0, 0, 0, 1, 1], **kind)
    yield "preference_odd.bin", document_shard_bytes([9, 1, 5, 9], [0], [0, 0, 1, 1], **kind)
    yield "preference_bad_checksum.bin", pair[:-1] + bytes([pair[-1] ^ 2])


def chat_templates(here):
    """The built-in templates' kind of text, the test's templates, refused constructs and a few
    broken ones."""
    sys.path.insert(0, os.path.join(here, "..", "python"))
    from test_chat import REFUSED, TEMPLATES
    for name, source in TEMPLATES.items():
        put("chat_template", name + ".jinja", source)
    for name, (source, _, _) in REFUSED.items():
        put("chat_template", "refused_" + name + ".jinja", source)
    put("chat_template", "chatml.jinja", "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == "
        "'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n\n{% else %}{{ m['content'] }}"
        "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    put("chat_template", "deep_parens.jinja", "{{ " + "(" * 300 + "1" + ")" * 300 + " }}")
    put("chat_template", "deep_not.jinja", "{{ " + "not " * 300 + "true }}")
    put("chat_template", "deep_blocks.jinja", "{% if true %}" * 300 + "x" + "{% endif %}" * 300)
    put("chat_template", "unclosed_string.jinja", "{{ 'abc }}")
    put("chat_template", "unclosed_tag.jinja", "text {% if")
    put("chat_template", "stray_end.jinja", "{% endfor %}")
    put("chat_template", "slices.jinja", "{% for m in messages[1:-1] %}{{ loop.revindex }}{{ m.content | length }}"
        "{% endfor %}{{ messages[-1]['role'] | upper }}{{ messages[99] is defined }}{{ -3 + 2 ~ 'x' }}")
    put("chat_template", "raise.jinja", "{{ raise_exception('no ' ~ messages | length) }}")


def main():
    st = save({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, dtype=np.float16),
               "empty": np.zeros((0, 3), dtype=np.float32)}, metadata={"format": "pt"})
    put("safetensors_header", "valid.safetensors", st)
    n = struct.unpack("<Q", st[:8])[0]
    put("safetensors_header", "header_one_short.safetensors", struct.pack("<Q", n - 1) + st[8:])
    put("safetensors_header", "trailing.safetensors", st + b"\0" * 8)
    put("safetensors_header", "truncated.safetensors", st[: len(st) // 2])
    put("safetensors_header", "huge_shape.safetensors",
        (lambda h: struct.pack("<Q", len(h)) + h)(json.dumps(
            {"x": {"dtype": "F32", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 0]}}).encode()))

    put("shard_header", "u16.bin", shard([1, 2, 3, 50256, 7]))
    put("shard_header", "u32.bin", shard([1, 70000, 3], width=4))
    put("shard_header", "out_of_vocab.bin", shard([1, 60000, 3]))
    put("shard_header", "short.bin", shard([1, 2, 3, 4])[:-3])
    put("shard_header", "negative_count.bin", np.array([20240520, 1, -5] + [0] * 253, dtype=np.int32).tobytes())
    docs = document_shard_bytes([9, 1, 2, 3, 9, 9, 4, 9], [0, 5], [0, 0, 1, 1, 1, 0, 1, 1])
    put("shard_header", "documents.bin", docs)
    put("shard_header", "documents_bad_checksum.bin", docs[:-1] + bytes([docs[-1] ^ 1]))
    put("shard_header", "documents_cut.bin", docs[:-4])
    unordered = document_shard_bytes([9, 1, 2, 3, 9, 9, 4, 9], [0, 5, 3], [0] * 8)
    put("shard_header", "documents_unordered.bin", unordered)
    for name, data in preference_seeds():
        put("shard_header", name, data)

    gpt2 = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
            "n_head": 12, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "tie_word_embeddings": True,
            "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}}
    put("model_config", "gpt2.json", json.dumps(gpt2, indent=2))
    put("model_config", "tiny.json", json.dumps({"vocab_size": 97, "n_positions": 32, "n_embd": 32, "n_layer": 2,
                                                   "n_head": 2}))
    put("model_config", "huge.json", json.dumps(dict(gpt2, n_embd=2 ** 40)))
    put("model_config", "deep.json", '{"n_layer": 2, "x": ' + "[" * 200 + "]" * 200 + "}")

    run = {"model": {"init_from": "models/gpt2", "dropout": 0.0, "activation_checkpointing": "auto",
                     "lora": {"rank": 8, "targets": ["c_attn", "c_proj"]}},
           "data": {"train": "data/train_*.bin", "val": "data/val_*.bin", "seq_len": 1024},
           "train": {"micro_batch_size": "auto", "global_batch_size": 64, "max_steps": 1000, "lr": 3e-4,
                     "optimizer_offload": "cpu"},
           "amp": {"dtype": "bfloat16"}, "checkpoint": {"every_steps": 200}, "cuda": {"memory_limit": "24GiB"}}
    put("train_config", "full.json", json.dumps(run, indent=2))
    put("train_config", "comments.json", '// a comment\n{"model": {"preset": "gpt2"}, "data": {"train": "x"}, '
        '"train": {"max_steps": 1}}')
    put("train_config", "object_value.json", '{"model": {"preset": "gpt2"}, "data": {"train": "x"}, '
        '"train": {"max_steps": 1, "lr": {}}}')

    state = {"format_version": 2, "step": 120, "loader_epoch": 1, "loader_consumed": 48, "micro_batch": 4,
             "global_batch": 16, "micro_batch_from_oom": False, "world_size": 2, "scaler": False,
             "config": {"train": {"max_steps": 200}}, "checksums": {"model.safetensors": "0123456789abcdef"}}
    put("checkpoint_state", "valid.json", json.dumps(state, indent=2))
    put("checkpoint_state", "negative_step.json", json.dumps(dict(state, step=-1)))
    put("checkpoint_state", "float_step.json", json.dumps(dict(state, step=1.5e51)))  # found by fuzzing
    put("checkpoint_state", "no_world_size.json", json.dumps({k: v for k, v in state.items() if k != "world_size"}))
    put("checkpoint_state", "version1.json", json.dumps({k: v for k, v in dict(state, format_version=1).items()
                                                          if k != "checksums"}))

    adapter = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["c_attn", "c_proj"],
               "bias": "none", "fan_in_fan_out": True, "base_model_name_or_path": "models/gpt2", "task_type": "CAUSAL_LM",
               "layer_replication": None, "use_dora": False}
    put("adapter_config", "valid.json", json.dumps(adapter, indent=2))
    put("adapter_config", "no_targets.json", json.dumps(dict(adapter, target_modules=[])))
    put("adapter_config", "layer_replication.json", json.dumps(dict(adapter, layer_replication=[[0, 1]])))
    put("adapter_config", "regex_targets.json", json.dumps(dict(adapter, target_modules=".*attn.*")))
    put("adapter_config", "huge_rank.json", json.dumps(dict(adapter, r=2 ** 40)))

    # GPT-2's byte alphabet: printable bytes stand for themselves, the rest map to 256 + k.
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {chars[b]: b for b in range(256)}
    vocab.update({"he": 256, "\u0120w": 257, "<|endoftext|>": 258})
    tok = {"version": "1.0", "normalizer": None,
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                     "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": vocab, "merges": ["h e", "\u0120 w"]},
           "added_tokens": [{"id": 258, "content": "<|endoftext|>", "special": True}]}
    put("tokenizer_json", "valid.json", json.dumps(tok))
    put("tokenizer_json", "no_vocab.json", json.dumps(dict(tok, model={k: v for k, v in tok["model"].items()
                                                                        if k != "vocab"})))  # found by valgrind
    put("tokenizer_json", "normalizer.json", json.dumps(dict(tok, normalizer={"type": "NFC"})))
    put("tokenizer_json", "prefix_space.json", json.dumps(dict(tok, pre_tokenizer=dict(tok["pre_tokenizer"],
                                                                                       add_prefix_space=True))))
    put("tokenizer_json", "pair_merges.json", json.dumps(dict(tok, model=dict(tok["model"], merges=[["h", "e"]]))))
    chat_templates(HERE)


if __name__ == "__main__":
    main()
