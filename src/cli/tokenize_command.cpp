// gpt2-finetune tokenize: text to token shards, optionally training a SentencePiece model first.
#include <fstream>
#include <memory>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "commands.h"
#include "gpt2ft/core/json.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/core/folder_lock.h"
#include "gpt2ft/data/tokenize_corpus.h"
#include "gpt2ft/tokenizer/byte_level_bpe.h"
#include "gpt2ft/tokenizer/chat_template.h"
#include "gpt2ft/tokenizer/sentencepiece_tokenizer.h"

namespace gpt2ft::cli {
namespace fs = std::filesystem;
namespace {

// SentencePiece trains on plain text: .jsonl inputs are flattened to their field's text.
std::vector<fs::path> sentencepiece_training_files(const TokenizeOptions& o, const fs::path& scratch) {
  std::vector<fs::path> files;
  for (const auto& in : o.inputs) {
    if (!is_jsonl_input(in)) {
      files.push_back(in);
      continue;
    }
    const fs::path flat = scratch / (in.filename().string() + ".txt");
    std::ifstream src(in);
    std::ofstream dst(flat);
    std::string line;
    while (std::getline(src, line)) {
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      nlohmann::json j;
      try {
        j = parse_json_limited(line, in.string());
      } catch (const nlohmann::json::exception&) {
        continue;  // the tokenizer pass reports it with its line number
      }
      const std::vector<std::string> fields =
          is_preference(o) ? std::vector<std::string>{o.prompt_field, o.chosen_field, o.rejected_field}
          : is_pairs(o)    ? std::vector<std::string>{o.prompt_field, o.completion_field}
                           : std::vector<std::string>{o.jsonl_field};
      for (const auto& field : fields) {
        if (j.is_object() && j.contains(field) && j[field].is_string()) dst << j[field].get<std::string>() << "\n";
      }
    }
    files.push_back(flat);
  }
  return files;
}

struct TokenizeArgs {
  std::string tokenizer;
  std::vector<std::string> inputs;
  TokenizeOptions options;
  bool no_progress = false;
  bool train_sentencepiece = false;
  SentencePieceTrainOptions sp;
};

void add_chat_options(CLI::App* cmd, TokenizeArgs& args) {
  TokenizeOptions& o = args.options;
  cmd->add_option("--chat-template", o.chat_template,
                  "Conversations: .jsonl lines holding a list of messages, rendered with this template: plain, "
                  "chatml, or a Jinja template file (docs/chat.md)");
  cmd->add_option("--messages-field", o.conversation_fields.messages, "Conversations: the field holding the messages")
      ->capture_default_str();
  cmd->add_option("--role-field", o.conversation_fields.role, "Conversations: a message's role field")
      ->capture_default_str();
  cmd->add_option("--content-field", o.conversation_fields.content, "Conversations: a message's text field")
      ->capture_default_str();
  cmd->add_option("--train-on", o.train_on,
                  "Conversations: the target tokens: the assistant's turns with their end-of-turn tokens, every token, "
                  "or the last assistant turn")
      ->check(CLI::IsMember({"assistant", "all", "last"}))
      ->capture_default_str();
  cmd->add_option("--max-length", o.max_length,
                  "Conversations: cut longer ones to this many tokens; preference pairs: cut a longer side's prompt "
                  "from its beginning first, then its continuation's end (0: keep whole)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 31));
}

void add_text_options(CLI::App* cmd, TokenizeArgs& args) {
  TokenizeOptions& o = args.options;
  cmd->add_option("--tokenizer", args.tokenizer,
                  "GPT-2 tokenizer folder (vocab.json + merges.txt, ...) or a SentencePiece .model");
  cmd->add_option("--input", args.inputs, "Input files: .txt (one document each) or .jsonl (one per line)")
      ->required()
      ->expected(1, -1);
  cmd->add_option("--output-dir", o.output_dir, "Folder for the shards and manifest.json")->required();
  cmd->add_option("--jsonl-field", o.jsonl_field, "Field holding the text in .jsonl inputs")->capture_default_str();
  cmd->add_option("--prompt-field", o.prompt_field,
                  "Prompt/completion pairs: the .jsonl field holding the prompt (with --completion-field); the loss "
                  "is then taken on the completions only. With --chat-template: the prompt's list of messages");
  cmd->add_option("--completion-field", o.completion_field,
                  "Prompt/completion pairs: the .jsonl field holding the completion the model learns to produce. "
                  "With --chat-template: the completion's list of messages");
  cmd->add_option("--chosen-field", o.chosen_field,
                  "Preference pairs (DPO, with --prompt-field and --rejected-field): the .jsonl field holding the "
                  "preferred continuation");
  cmd->add_option("--rejected-field", o.rejected_field,
                  "Preference pairs: the .jsonl field holding the continuation the model learns to rank below");
  cmd->add_flag("--skip-bad-lines", o.skip_bad_lines,
                "Pairs and conversations: skip (and count) bad lines instead of stopping at the first");
  cmd->add_option("--val-fraction", o.val_fraction, "Share of documents for val shards")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--shard-tokens", o.shard_tokens, "Tokens per shard")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 32));
  cmd->add_option("--workers", o.workers, "Tokenizer threads (0 = all cores)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1024));
  cmd->add_flag("--overwrite", o.overwrite, "Replace shards already in --output-dir");
  cmd->add_flag("--no-progress", args.no_progress, "No progress line");
  cmd->add_flag("--train-sentencepiece", args.train_sentencepiece,
                "Train a SentencePiece model on the inputs first (written to <output-dir>/tokenizer.model)");
  cmd->add_option("--vocab-size", args.sp.vocab_size, "Vocabulary size for --train-sentencepiece")->capture_default_str();
  cmd->add_option("--sp-model-type", args.sp.model_type, "bpe | unigram, for --train-sentencepiece")
      ->check(CLI::IsMember({"bpe", "unigram"}))
      ->capture_default_str();
}

// Trains the SentencePiece model the shards will be made with; returns its path.
fs::path train_sentencepiece_first(TokenizeArgs& args) {
  TokenizeOptions& o = args.options;
  // Everything is checked before the tokenizer is written: a refusal after it would leave
  // shards beside a tokenizer that did not make them.
  check_tokenize_output(o);
  if (fs::exists(o.output_dir / "tokenizer.model") && !o.overwrite) {
    throw Error(o.output_dir.string() + ": already holds a tokenizer.model; pass --overwrite to replace it (and "
                "the shards made with it), or choose another --output-dir");
  }
  const fs::path scratch = o.output_dir / ".sentencepiece-input";
  fs::create_directories(scratch);
  fs::path path;
  try {
    const auto files = sentencepiece_training_files(o, scratch);
    spdlog::info("training a {}-piece SentencePiece {} model on {} file(s)", args.sp.vocab_size, args.sp.model_type,
                 files.size());
    path = train_sentencepiece(files, o.output_dir / "tokenizer", args.sp);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(scratch, ec);  // nothing half-made stays behind
    throw;
  }
  fs::remove_all(scratch);
  spdlog::info("wrote {}", path.string());
  return path;
}

// The tokenizer, with a chat template's control tokens added when it lacks them.
std::unique_ptr<Tokenizer> tokenizer_for(const fs::path& path, const TokenizeOptions& o) {
  auto tokenizer = load_tokenizer(path);
  if (!is_chat(o)) return tokenizer;
  ByteLevelBpe* bpe = &chat_tokenizer(*tokenizer, "--chat-template");
  const auto missing = missing_control_tokens(load_chat_template(o.chat_template), *bpe);
  if (!missing.empty()) {
    std::string names;
    for (const auto& t : missing) names += (names.empty() ? "" : ", ") + t;
    spdlog::info("adding the template's control tokens {} as ids {}..{}; train resizes the model's vocabulary to fit",
                 names, bpe->vocab_size(), bpe->vocab_size() + static_cast<int64_t>(missing.size()) - 1);
    bpe->add_tokens(missing);
  }
  return tokenizer;
}

void log_summary(const TokenizeOptions& o, const TokenizeSummary& s) {
  // Conversational preference data is chat and preference both: it counts preference pairs.
  const char* unit = is_preference(o) ? "preference pairs" : is_chat(o) ? "conversations" : is_pairs(o) ? "pairs" : "documents";
  spdlog::info("{} {}, {} tokens in {} train shard(s); {} {}, {} tokens in {} val shard(s); "
               "{:.1f} MB in {:.1f}s ({:.1f} MB/s)",
               s.documents[0], unit, s.tokens[0], s.shards[0].size(), s.documents[1], unit, s.tokens[1],
               s.shards[1].size(), s.bytes_read / 1e6, s.seconds, s.bytes_read / 1e6 / std::max(s.seconds, 1e-9));
  const std::string skipped =
      s.skipped_lines ? fmt::format("; {} bad line(s) skipped (--skip-bad-lines)", s.skipped_lines) : "";
  if (is_chat(o) && !is_preference(o)) {
    spdlog::info("targets ({} turns): {} of {} train tokens, {} of {} val tokens; {} turns; {} conversation(s) cut to "
                 "--max-length{}",
                 o.train_on, s.target_tokens[0], s.tokens[0], s.target_tokens[1], s.tokens[1], s.turns[0] + s.turns[1],
                 s.truncated[0] + s.truncated[1], skipped);
  } else if (is_preference(o)) {
    spdlog::info("targets (chosen and rejected continuations + closing end-of-text): {} of {} train tokens, {} of {} "
                 "val tokens; {} example(s) cut to --max-length{}",
                 s.target_tokens[0], s.tokens[0], s.target_tokens[1], s.tokens[1], s.truncated[0] + s.truncated[1],
                 skipped);
  } else if (is_pairs(o)) {
    spdlog::info("targets (completions + closing end-of-text): {} of {} train tokens, {} of {} val tokens; prompts "
                 "{} and {} tokens{}",
                 s.target_tokens[0], s.tokens[0], s.target_tokens[1], s.tokens[1], s.prompt_tokens[0],
                 s.prompt_tokens[1], skipped);
  }
  if (o.val_fraction > 0 && s.documents[1] == 0) {
    spdlog::warn("no document went to validation: --val-fraction {} of {} document(s) rounds to none (a .txt input "
                 "is one document). A config with data.val \"{}/val_*.bin\" will find no shards: split the text "
                 "into several files or .jsonl lines, or leave data.val empty",
                 o.val_fraction, s.documents[0], o.output_dir.string());
  }
}

int run_tokenize(TokenizeArgs& args) {
  TokenizeOptions& o = args.options;
  o.inputs.assign(args.inputs.begin(), args.inputs.end());
  o.progress = !args.no_progress;
  if (is_chat(o) && is_pairs(o)) {  // the names of TRL's conversational prompt/completion lists
    o.conversation_fields.prompt = o.prompt_field;
    o.conversation_fields.completion = o.completion_field;
    o.prompt_field.clear();
    o.completion_field.clear();
  } else if (is_chat(o) && !is_preference(o) && o.prompt_field.empty() != o.completion_field.empty()) {
    throw Error("--prompt-field and --completion-field go together");
  }
  // A failed run leaves no folder it made (the lock below makes it at once).
  const bool made_output_dir = !fs::exists(o.output_dir);
  try {
    const FolderLock lock(o.output_dir, "--output-dir");  // two tokenize runs would lose one's shards
    const fs::path tokenizer_path = args.train_sentencepiece ? train_sentencepiece_first(args) : fs::path(args.tokenizer);
    const auto tokenizer = tokenizer_for(tokenizer_path, o);
    log_summary(o, tokenize_corpus(*tokenizer, o));
  } catch (...) {
    std::error_code ec;
    if (made_output_dir) fs::remove(o.output_dir, ec);  // only if left empty
    throw;
  }
  return kExitOk;
}

}  // namespace

void add_tokenize_command(CLI::App& app, Runner& run) {
  auto args = std::make_shared<TokenizeArgs>();
  CLI::App* cmd = app.add_subcommand("tokenize", "Turn text (.txt, .jsonl) or conversations into token shards and a "
                                                 "manifest.json");
  add_text_options(cmd, *args);
  add_chat_options(cmd, *args);
  cmd->callback([args, &run] {
    if (args->tokenizer.empty() == !args->train_sentencepiece) {
      throw CLI::ValidationError("tokenize", "give exactly one of --tokenizer PATH or --train-sentencepiece");
    }
    run = [args] { return run_tokenize(*args); };
  });
}

}  // namespace gpt2ft::cli
