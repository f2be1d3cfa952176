// `gpt2-finetune tokenize`: text files (.txt = one document, .jsonl = one document per line)
// to token shards and a manifest.json, streamed with bounded memory on all cores.
//
// Prompt/completion pairs (.jsonl with prompt_field and completion_field set): the prompt and
// the completion are encoded separately and joined, so the boundary is exact; each pair is one
// document of document shards (data/shard.h): end-of-text, prompt, completion, end-of-text,
// where the completion's tokens and the closing end-of-text are the targets. A document never
// straddles two shards.
//
// Preference pairs (.jsonl with prompt_field, chosen_field and rejected_field set): each line
// is one example of preference shards (data/shard.h), two documents: end-of-text, prompt,
// chosen, end-of-text; and end-of-text, prompt, rejected, end-of-text; the continuation and
// its closing end-of-text are the targets. Both documents always go to one shard.
//
// Conversations (.jsonl with chat_template set): each line's conversation is rendered by the
// template and tokenized (data/chat_documents.h) into one document of document shards; its
// targets are the assistant's text and end-of-turn tokens (train_on). The tokenizer must
// already hold the template's control tokens (missing_control_tokens).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "gpt2ft/data/chat_documents.h"
#include "gpt2ft/tokenizer/tokenizer.h"

namespace gpt2ft {

struct TokenizeOptions {
  std::vector<std::filesystem::path> inputs;
  std::filesystem::path output_dir;
  std::string jsonl_field = "text";
  std::string prompt_field, completion_field;  // both set: prompt/completion pairs
  std::string chosen_field, rejected_field;    // with prompt_field: preference pairs (DPO)
  std::string chat_template;          // set: conversations, rendered by this template ("chatml", a file)
  ConversationFields conversation_fields;
  std::string train_on = "assistant";  // conversations: "assistant" | "all" | "last"
  int64_t max_length = 0;              // conversations: cut longer ones to this many tokens (0: keep whole);
                                       // preference pairs: the prompt's beginning first (data/samples.h)
  bool skip_bad_lines = false;       // pairs, conversations: skip (and count) malformed lines instead of failing
  double val_fraction = 0.01;       // share of documents sent to val shards, spread evenly
  int64_t shard_tokens = 100000000;  // tokens per shard (the last one may be shorter)
  int workers = 0;                   // 0 = all cores
  bool overwrite = false;            // replace shards already in output_dir
  bool progress = true;              // a progress line on a terminal
};

struct TokenizeSummary {
  int64_t documents[2] = {0, 0};  // train, val
  int64_t tokens[2] = {0, 0};
  int64_t prompt_tokens[2] = {0, 0};  // pairs only
  int64_t target_tokens[2] = {0, 0};  // pairs and conversations
  int64_t turns[2] = {0, 0};          // conversations: messages
  int64_t truncated[2] = {0, 0};      // conversations (preference examples) cut to max_length
  int64_t skipped_lines = 0;
  std::vector<std::string> shards[2];
  int64_t bytes_read = 0;
  double seconds = 0;
};

bool is_pairs(const TokenizeOptions& options);
bool is_preference(const TokenizeOptions& options);
bool is_chat(const TokenizeOptions& options);

// Every document is preceded by the tokenizer's end-of-text id. Shards are written under a
// temporary folder and moved into output_dir only when all are complete; manifest.json last.
TokenizeSummary tokenize_corpus(const Tokenizer& tokenizer, const TokenizeOptions& options);

// The checks tokenize_corpus makes of output_dir before it writes anything (existing shards
// without --overwrite, files a shard glob would mix in), for steps that write before it.
void check_tokenize_output(const TokenizeOptions& options);

// A .jsonl input (any case: .JSONL too): one JSON document per line. Others are plain text.
bool is_jsonl_input(const std::filesystem::path& path);

// The safe place to cut a long text so that tokenizing the parts gives the same ids as the
// whole: before a '\n' that an ASCII non-space follows, or else before a ' ' that an ASCII
// non-space precedes and an ASCII letter or digit follows. Returns 0 when there is none.
size_t safe_text_cut(std::string_view text);

}  // namespace gpt2ft
