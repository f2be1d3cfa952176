// Streaming corpus tokenization into shards.
#include "gpt2ft/data/tokenize_corpus.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <mutex>
#include <set>
#include <thread>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "gpt2ft/core/atomic_file.h"
#include "gpt2ft/core/channel.h"
#include "gpt2ft/core/json.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/data/shard.h"
#include "gpt2ft/tokenizer/byte_level_bpe.h"

namespace gpt2ft {
namespace fs = std::filesystem;
namespace {

constexpr size_t kBlockBytes = 1 << 20;        // a long document is tokenized in ~1 MiB parts
constexpr size_t kMaxBlockBytes = 64u << 20;   // ... unless no safe cut exists within this
constexpr size_t kBatchBytes = 4u << 20;       // text handed from stage to stage (at least a MiB per worker)
constexpr size_t kMaxBatchBytes = 32u << 20;

bool is_ascii_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }
bool is_ascii_alnum(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

// A piece of one document; starts_document marks the first piece. A prompt/completion pair
// is one unit: text is the prompt, completion the completion.
// A conversation is one unit too: its line's place (for errors) and its messages.
struct Unit {
  std::string text;
  bool starts_document = false;
  int split = 0;  // 0 train, 1 val
  std::vector<uint32_t> ids;
  bool pair = false;
  std::string completion;
  std::vector<uint32_t> completion_ids;
  bool chat = false;
  size_t line_bytes = 0;  // chat: its line's length, which stands for its text in batch sizes
  std::string where;
  Conversation conversation;
  std::vector<uint8_t> targets;  // chat: per token of ids
  bool truncated = false;
  bool preference = false;       // completion is the chosen continuation, rejected the other
  std::string rejected;
  std::vector<uint32_t> rejected_ids;
  Conversation rejected_conversation;     // chat preference: conversation is prompt + chosen
  std::vector<uint8_t> rejected_targets;  // chat preference: per token of rejected_ids
};

// One split's tokens, streamed into shards of shard_tokens in a folder: plain text shards
// (append), or document shards (append_document) whose documents are never split. Tokens are
// staged and handed to the shard's writer ~1M at a time.
class ShardSink {
 public:
  ShardSink(fs::path dir, std::string prefix, int token_bytes, int64_t shard_tokens)
      : dir_(std::move(dir)), prefix_(std::move(prefix)), token_bytes_(token_bytes), shard_tokens_(shard_tokens) {}

  // One whole document and its per-token targets. Starts a new shard first when the document
  // would not fit in this one.
  void append_document(const std::vector<uint32_t>& ids, const std::vector<uint8_t>& targets) {
    if (count_ > 0 && count_ + ids.size() > static_cast<size_t>(shard_tokens_)) flush();
    documents_.starts.push_back(static_cast<uint32_t>(count_));
    put(ids.data(), ids.size());
    documents_.targets.insert(documents_.targets.end(), targets.begin(), targets.end());
    has_documents_ = true;
    if (count_ >= static_cast<size_t>(shard_tokens_)) flush();
  }

  // A preference example's two documents, always in one shard.
  void append_pair(const std::vector<uint32_t> (&ids)[2], const std::vector<uint8_t> (&targets)[2]) {
    if (count_ > 0 && count_ + ids[0].size() + ids[1].size() > static_cast<size_t>(shard_tokens_)) flush();
    for (int side = 0; side < 2; ++side) {
      documents_.starts.push_back(static_cast<uint32_t>(count_));
      put(ids[side].data(), ids[side].size());
      documents_.targets.insert(documents_.targets.end(), targets[side].begin(), targets[side].end());
    }
    has_documents_ = true;
    documents_.pairs = true;
    if (count_ >= static_cast<size_t>(shard_tokens_)) flush();
  }

  void append(const std::vector<uint32_t>& ids) {
    size_t i = 0;
    while (i < ids.size()) {
      const size_t n = std::min(static_cast<size_t>(shard_tokens_) - count_, ids.size() - i);
      put(ids.data() + i, n);
      i += n;
      if (count_ == static_cast<size_t>(shard_tokens_)) flush();
    }
  }
  void flush() {
    if (count_ == 0) return;
    drain();
    writer_->finish(has_documents_ ? &documents_ : nullptr);
    files_.push_back({name_, static_cast<int64_t>(count_)});
    writer_.reset();
    count_ = 0;
    documents_ = {};
  }
  const std::vector<std::pair<std::string, int64_t>>& files() const { return files_; }

 private:
  static constexpr size_t kStagedTokens = size_t{1} << 20;

  void put(const uint32_t* ids, size_t n) {
    staged_.insert(staged_.end(), ids, ids + n);
    count_ += n;
    if (staged_.size() >= kStagedTokens) drain();
  }
  void drain() {
    if (!writer_) {  // the shard's file starts with its first tokens
      char name[64];
      std::snprintf(name, sizeof(name), "%s_%06zu.bin", prefix_.c_str(), files_.size());
      name_ = name;
      writer_ = std::make_unique<ShardWriter>(dir_ / name_, token_bytes_);
    }
    writer_->append(staged_.data(), staged_.size());
    staged_.clear();
  }

  fs::path dir_;
  std::string prefix_;
  int token_bytes_;
  int64_t shard_tokens_;
  std::unique_ptr<ShardWriter> writer_;  // of the shard being written
  std::string name_;
  size_t count_ = 0;                     // its tokens, written and staged
  std::vector<uint32_t> staged_;
  bool has_documents_ = false;
  ShardDocuments documents_;  // of the shard being written
  std::vector<std::pair<std::string, int64_t>> files_;
};

// Reads documents from the inputs in order and hands them out in parts.
class DocumentReader {
 public:
  DocumentReader(const TokenizeOptions& options) : options_(options) {}

  // Fills `units` with about `batch_bytes` of text; false when the inputs are exhausted.
  bool next_batch(std::vector<Unit>& units, size_t batch_bytes) {
    units.clear();
    size_t bytes = 0;
    while (bytes < batch_bytes) {
      Unit unit;
      if (!next_unit(unit)) break;
      bytes += unit.chat ? unit.line_bytes : unit.text.size();
      units.push_back(std::move(unit));
    }
    return !units.empty();
  }

  int64_t bytes_read() const { return bytes_read_; }
  int64_t skipped_lines() const { return skipped_lines_; }
  // Whether anything but white space was read (a pair, or text).
  bool saw_text() const { return saw_text_; }

 private:
  bool open_next_file() {
    while (file_index_ < options_.inputs.size()) {
      path_ = options_.inputs[file_index_++];
      in_.close();
      in_.clear();
      in_.open(path_, std::ios::binary);
      if (!in_) throw Error(path_.string() + ": cannot open for reading");
      jsonl_ = is_jsonl_input(path_);
      line_no_ = 0;
      pending_.clear();
      in_document_ = false;
      eof_ = false;
      return true;
    }
    return false;
  }

  int assign_split() {
    const double f = options_.val_fraction;
    const int64_t d = documents_++;
    return std::floor((d + 1) * f) > std::floor(d * f) ? 1 : 0;
  }

  bool next_unit(Unit& unit) {
    for (;;) {
      if (!in_.is_open() && !open_next_file()) return false;
      if (jsonl_) {
        std::string line;
        if (!std::getline(in_, line)) {
          in_.close();
          continue;
        }
        ++line_no_;
        bytes_read_ += static_cast<int64_t>(line.size()) + 1;
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        const std::string where = path_.string() + ":" + std::to_string(line_no_);
        if (line.find('\0') != std::string::npos) {  // not text; JSON around it would be read as if it were
          if (skip_bad_line(where + ": holds a NUL byte at column " + std::to_string(line.find('\0') + 1))) continue;
        }
        nlohmann::json j;
        try {
          j = parse_json_limited(line, where);
        } catch (const nlohmann::json::exception& e) {
          if (skip_bad_line(where + ": not valid JSON (" + e.what() + ")")) continue;
        }
        if (is_pairs(options_) || is_preference(options_)) {  // preference pairs may be conversations
          if (!read_pair(j, where, unit)) continue;
          unit.line_bytes = line.size();
          unit.split = assign_split();
          saw_text_ = true;
          return true;
        }
        if (is_chat(options_)) {
          if (!read_chat(j, where, unit, line.size())) continue;
          unit.split = assign_split();
          saw_text_ = true;
          return true;
        }
        if (!j.is_object() || !j.contains(options_.jsonl_field) || !j[options_.jsonl_field].is_string()) {
          throw Error(where + ": expected an object with a string field \"" + options_.jsonl_field +
                      "\" (set another with --jsonl-field)");
        }
        unit.text = j[options_.jsonl_field].get<std::string>();
        note_text(unit.text);
        unit.starts_document = true;
        unit.split = assign_split();
        return true;
      }
      // A text file is one document, read in blocks cut where tokenization is unaffected.
      while (pending_.size() < kBlockBytes && read_block()) {
      }
      if (pending_.empty()) {  // end of file
        const bool empty_file = !in_document_;
        in_.close();
        if (!empty_file) continue;
        unit.starts_document = true;  // an empty file is still a document
        unit.split = assign_split();
        return true;
      }
      size_t cut = pending_.size();
      if (!eof_) {
        cut = safe_text_cut(pending_);
        while (cut == 0 && pending_.size() < kMaxBlockBytes && read_block()) cut = safe_text_cut(pending_);
        if (eof_) {
          cut = pending_.size();
        } else if (cut == 0) {
          spdlog::warn("{}: no safe place to split {} MiB of text; the ids at this cut may differ from "
                       "tokenizing the whole file at once",
                       path_.string(), pending_.size() >> 20);
          cut = pending_.size() - 1;  // start of the last (maybe incomplete) character
          while (cut > 0 && (static_cast<uint8_t>(pending_[cut]) & 0xC0) == 0x80) --cut;
          if (cut == 0) cut = pending_.size();
        }
      }
      unit.text = pending_.substr(0, cut);
      note_text(unit.text);
      pending_.erase(0, cut);
      unit.starts_document = !in_document_;
      if (!in_document_) {
        in_document_ = true;
        current_split_ = assign_split();
      }
      unit.split = current_split_;
      return true;
    }
  }

  // A bad line: an Error, or with --skip-bad-lines a warning (the first few) and a count.
  bool skip_bad_line(const std::string& why) {
    const bool skippable = is_pairs(options_) || is_chat(options_) || is_preference(options_);
    if (!options_.skip_bad_lines || !skippable) {
      throw Error(why + (skippable ? "; fix the line, or pass --skip-bad-lines to skip and count such lines" : ""));
    }
    if (++skipped_lines_ <= 5) spdlog::warn("skipped {}", why);
    return true;
  }

  // The prompt and completion of a pair's line; false when the line is skipped.
  // Whether the line holds each of `fields` (the option's value, what it is) as a string; a
  // line without is an error, or false when it is skipped.
  bool has_string_fields(const nlohmann::json& j, const std::string& where,
                         std::initializer_list<std::pair<const std::string*, const char*>> fields) {
    for (const auto& [field, what] : fields) {
      if (!j.is_object() || !j.contains(*field)) {
        return !skip_bad_line(where + ": no " + what + " field \"" + *field + "\"" +
                              (j.is_object() ? "" : " (the line is not a JSON object)"));
      }
      if (!j[*field].is_string()) {
        return !skip_bad_line(where + ": the " + what + " field \"" + *field + "\" is " + j[*field].type_name() +
                              ", expected a string" +
                              (j[*field].is_array() ? " (a list of messages is read with --chat-template)" : ""));
      }
    }
    return true;
  }

  bool read_pair(nlohmann::json& j, const std::string& where, Unit& unit) {
    if (is_preference(options_)) return read_preference(j, where, unit);
    if (!has_string_fields(j, where, {{&options_.prompt_field, "prompt"}, {&options_.completion_field, "completion"}})) {
      return false;
    }
    unit.text = j[options_.prompt_field].get<std::string>();
    unit.completion = j[options_.completion_field].get<std::string>();
    if (unit.completion.empty()) {
      return !skip_bad_line(where + ": the completion field \"" + options_.completion_field +
                            "\" is empty; there would be nothing to learn but the end of text");
    }
    unit.pair = true;
    unit.starts_document = true;
    return true;
  }

  // The prompt, chosen and rejected of a preference line; false when the line is skipped.
  bool read_preference(nlohmann::json& j, const std::string& where, Unit& unit) {
    if (is_chat(options_)) return read_chat_preference(j, where, unit);
    if (!has_string_fields(j, where, {{&options_.prompt_field, "prompt"}, {&options_.chosen_field, "chosen"},
                                      {&options_.rejected_field, "rejected"}})) {
      return false;
    }
    for (const auto& [field, what] : {std::pair<const std::string*, const char*>{&options_.chosen_field, "chosen"},
                                      {&options_.rejected_field, "rejected"}}) {
      if (j[*field].get_ref<const std::string&>().empty()) {
        return !skip_bad_line(where + ": the " + what + " field \"" + *field +
                              "\" is empty; there would be nothing to compare but the end of text");
      }
    }
    unit.text = j[options_.prompt_field].get<std::string>();
    unit.completion = j[options_.chosen_field].get<std::string>();
    unit.rejected = j[options_.rejected_field].get<std::string>();
    if (unit.completion == unit.rejected) {
      return !skip_bad_line(where + ": the chosen field \"" + options_.chosen_field + "\" and the rejected field \"" +
                            options_.rejected_field + "\" hold the same text; the pair teaches no preference");
    }
    unit.preference = true;
    unit.starts_document = true;
    return true;
  }

  // TRL's conversational preference form: the prompt's messages, then the chosen and the
  // rejected assistant messages, as two prompt/completion conversations.
  bool read_chat_preference(nlohmann::json& j, const std::string& where, Unit& unit) {
    ConversationFields fields = options_.conversation_fields;
    fields.prompt = "prompt";
    fields.completion = "completion";
    Conversation sides[2];
    for (int side = 0; side < 2; ++side) {
      const std::string& field = side == 0 ? options_.chosen_field : options_.rejected_field;
      if (!j.is_object() || !j.contains(options_.prompt_field) || !j.contains(field)) {
        return !skip_bad_line(where + ": no " + (j.is_object() && j.contains(options_.prompt_field)
                                                     ? std::string(side == 0 ? "chosen" : "rejected") + " field \"" + field
                                                     : "prompt field \"" + options_.prompt_field) +
                              "\"" + (j.is_object() ? "" : " (the line is not a JSON object)"));
      }
      nlohmann::json conversation = {{"prompt", j[options_.prompt_field]}, {"completion", j[field]}};
      try {
        sides[side] = read_conversation(conversation, fields, where + " (" + field + ")");
      } catch (const Error& e) {
        return !skip_bad_line(e.what());
      }
    }
    const auto same = [](const ChatMessage& x, const ChatMessage& y) { return x.role == y.role && x.content == y.content; };
    if (std::equal(sides[0].messages.begin(), sides[0].messages.end(), sides[1].messages.begin(), sides[1].messages.end(),
                   same)) {
      return !skip_bad_line(where + ": the chosen field \"" + options_.chosen_field + "\" and the rejected field \"" +
                            options_.rejected_field + "\" hold the same messages; the pair teaches no preference");
    }
    unit.conversation = std::move(sides[0]);
    unit.rejected_conversation = std::move(sides[1]);
    unit.chat = true;
    unit.preference = true;
    unit.where = where;
    unit.starts_document = true;
    return true;
  }

  // The conversation of a line; false when the line is skipped. The text it stands for in
  // batch sizes is the line's length.
  bool read_chat(nlohmann::json& j, const std::string& where, Unit& unit, size_t line_bytes) {
    try {
      unit.conversation = read_conversation(j, options_.conversation_fields, where);
    } catch (const Error& e) {
      return !skip_bad_line(e.what());
    }
    unit.chat = true;
    unit.where = where;
    unit.starts_document = true;
    unit.line_bytes = line_bytes;
    return true;
  }

  // Appends up to kBlockBytes to pending_; false at the end of the file.
  bool read_block() {
    if (eof_) return false;
    std::string block(kBlockBytes, '\0');
    in_.read(block.data(), static_cast<std::streamsize>(block.size()));
    block.resize(static_cast<size_t>(in_.gcount()));
    bytes_read_ += static_cast<int64_t>(block.size());
    pending_ += block;
    if (!in_) eof_ = true;
    return !block.empty();
  }

  const TokenizeOptions& options_;
  bool eof_ = false;
  size_t file_index_ = 0;
  fs::path path_;
  std::ifstream in_;
  bool jsonl_ = false;
  int64_t line_no_ = 0;
  std::string pending_;
  bool in_document_ = false;
  int current_split_ = 0;
  int64_t documents_ = 0;
  int64_t bytes_read_ = 0;
  int64_t skipped_lines_ = 0;
  bool saw_text_ = false;
  void note_text(const std::string& text) {
    saw_text_ = saw_text_ || text.find_first_not_of(" \t\r\n\f\v") != std::string::npos;
  }
};

class Progress {
 public:
  Progress(int64_t total_bytes, bool enabled)
      : total_(total_bytes), enabled_(enabled && ::isatty(STDERR_FILENO)), start_(Clock::now()) {}
  void update(int64_t bytes, int64_t tokens) {
    if (!enabled_) return;
    const auto now = Clock::now();
    if (now - last_ < std::chrono::milliseconds(200)) return;
    last_ = now;
    const double secs = std::chrono::duration<double>(now - start_).count();
    const double rate = bytes / std::max(secs, 1e-9);
    const double pct = total_ > 0 ? 100.0 * bytes / total_ : 100.0;
    const double eta = rate > 0 ? (total_ - bytes) / rate : 0;
    std::fprintf(stderr, "\r[tokenize] %5.1f%%  %.1f/%.1f MB  %.1f MB/s  %lld tokens  ETA %.0fs   ", pct,
                 bytes / 1e6, total_ / 1e6, rate / 1e6, static_cast<long long>(tokens), eta);
    std::fflush(stderr);
  }
  void finish() {
    if (enabled_) std::fprintf(stderr, "\n");
  }

 private:
  using Clock = std::chrono::steady_clock;
  int64_t total_;
  bool enabled_;
  Clock::time_point start_, last_{};
};

std::string lowercase_extension(const fs::path& path) {
  std::string ext = path.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext;
}

// What a config's data.train / data.val glob ("train_*.bin", "val_*.bin") would read as a shard.
bool matches_shard_glob(const std::string& name) {
  return (name.rfind("train_", 0) == 0 || name.rfind("val_", 0) == 0) && fs::path(name).extension() == ".bin";
}

// The shards an earlier tokenize recorded in the folder's manifest.json (none without one).
std::set<std::string> recorded_shards(const fs::path& dir) {
  std::set<std::string> out;
  const fs::path manifest = dir / "manifest.json";
  if (!fs::exists(manifest)) return out;
  nlohmann::json j;
  try {
    j = read_json_file(manifest.string());
  } catch (const std::exception& e) {
    throw Error(manifest.string() + ": not a manifest tokenize can read (" + describe_exception(e) +
                "); move the folder's contents away or choose another --output-dir");
  }
  if (!j.is_object() || !j.contains("shards") || !j["shards"].is_object()) return out;
  for (const char* split : {"train", "val"}) {
    if (!j["shards"].contains(split) || !j["shards"][split].is_array()) continue;
    for (const auto& s : j["shards"][split]) {
      if (s.is_object() && s.contains("file") && s["file"].is_string()) out.insert(s["file"].get<std::string>());
    }
  }
  return out;
}

}  // namespace

size_t safe_text_cut(std::string_view text) {
  // Before the '\n' that ends a whitespace run followed by a non-space: in the whole text that
  // '\n' is a piece of its own (the run's lookahead (?!\S) fails there), and what precedes it
  // splits the same at the end of a text as before a whitespace character.
  for (size_t p = text.size(); p-- > 2;) {
    if (text[p - 1] == '\n' && static_cast<uint8_t>(text[p]) < 0x80 && !is_ascii_space(text[p])) return p - 1;
  }
  for (size_t p = text.size() - (text.empty() ? 0 : 1); p-- > 1;) {
    if (text[p] == ' ' && is_ascii_alnum(text[p + 1]) && static_cast<uint8_t>(text[p - 1]) < 0x80 &&
        !is_ascii_space(text[p - 1])) {
      return p;
    }
  }
  return 0;
}

namespace {

// Checks the options and inputs; returns the inputs' total size in bytes.
int64_t check_inputs(const TokenizeOptions& options) {
  if (options.inputs.empty()) throw Error("--input: no input files");
  if (!(options.val_fraction >= 0 && options.val_fraction <= 1)) {
    throw Error("--val-fraction: expected a number in [0, 1], got " + std::to_string(options.val_fraction));
  }
  if (options.shard_tokens < 1) throw Error("--shard-tokens: expected an integer >= 1");
  if (options.chosen_field.empty() != options.rejected_field.empty() ||
      (is_preference(options) && (options.prompt_field.empty() || !options.completion_field.empty()))) {
    throw Error("preference pairs take --prompt-field, --chosen-field and --rejected-field together (and no "
                "--completion-field)");
  }
  if (is_preference(options) && (options.chosen_field == options.rejected_field || options.prompt_field == options.chosen_field ||
                                 options.prompt_field == options.rejected_field)) {
    throw Error("--prompt-field, --chosen-field and --rejected-field must name three different fields");
  }
  if (!is_preference(options) && options.prompt_field.empty() != options.completion_field.empty()) {
    throw Error("--prompt-field and --completion-field go together: give both for prompt/completion pairs, or "
                "neither for text");
  }
  if (is_pairs(options) && options.prompt_field == options.completion_field) {
    throw Error("--prompt-field and --completion-field both name \"" + options.prompt_field + "\"; give two fields");
  }
  if (options.skip_bad_lines && !is_pairs(options) && !is_chat(options) && !is_preference(options)) {
    throw Error("--skip-bad-lines applies to prompt/completion pairs (--prompt-field, --completion-field) and "
                "conversations (--chat-template)");
  }
  if (!is_chat(options) && !is_preference(options) && options.max_length > 0) {
    throw Error("--max-length applies to conversations (--chat-template) and preference pairs (--chosen-field)");
  }
  if (is_preference(options) && options.max_length == 1) {
    throw Error("--max-length 1 leaves a preference pair no continuation token; give 2 or more");
  }
  if (options.max_length < 0) throw Error("--max-length: expected 0 (keep whole) or a number of tokens");
  int64_t total_bytes = 0;
  for (const auto& in : options.inputs) {
    if (!fs::is_regular_file(in)) throw Error(in.string() + ": no such file (--input)");
    if (lowercase_extension(in) == ".json") {  // tokenizing its raw text (braces, keys and all) is never what was meant
      throw Error(in.string() + ": a .json file; give .jsonl (one JSON object per line, --jsonl-field naming the "
                                "text), or rename it to .txt to tokenize its raw text");
    }
    if (is_chat(options) && !is_jsonl_input(in)) {
      throw Error(in.string() + ": conversations are read from .jsonl files (one JSON object per line with a \"" +
                  options.conversation_fields.messages + "\" list of messages)");
    }
    if ((is_pairs(options) || is_preference(options)) && !is_chat(options) && !is_jsonl_input(in)) {
      throw Error(in.string() + ": prompt/completion pairs are read from .jsonl files (one JSON object per line with "
                                "the fields \"" + options.prompt_field + "\" and \"" + options.completion_field + "\")");
    }
    total_bytes += static_cast<int64_t>(fs::file_size(in));
  }
  return total_bytes;
}

// The shards and manifest already in the output folder (refused without --overwrite).
std::vector<fs::path> existing_outputs(const TokenizeOptions& options) {
  if (!fs::exists(options.output_dir)) return {};  // made when the shards are written
  if (!fs::is_directory(options.output_dir)) {
    throw Error(options.output_dir.string() + ": exists and is not a folder (--output-dir)");
  }
  // --overwrite replaces only what an earlier tokenize recorded writing. Any other file that a
  // train_*.bin / val_*.bin glob would read is the user's: never deleted, and never left to be
  // mixed silently into the new shards either.
  const std::set<std::string> recorded = recorded_shards(options.output_dir);
  std::vector<fs::path> existing;
  for (const auto& entry : fs::directory_iterator(options.output_dir)) {
    const std::string name = entry.path().filename().string();
    if (name == "manifest.json" || (matches_shard_glob(name) && recorded.count(name))) {
      existing.push_back(entry.path());
    } else if (matches_shard_glob(name)) {
      throw Error(options.output_dir.string() + ": holds " + name + ", which is not a shard its manifest.json records "
                  "and which a train_*.bin / val_*.bin glob would read with the new shards; move it away or choose "
                  "another --output-dir");
    }
  }
  if (!existing.empty() && !options.overwrite) {
    throw Error(options.output_dir.string() + ": already holds shards or a manifest.json; pass --overwrite to "
                                              "replace them, or choose another --output-dir");
  }
  return existing;
}

// A conversation's document, cut to max_length tokens (0: whole).
void encode_conversation(const ChatEncoder& chat, int64_t max_length, Unit& unit) {
  ChatDocument doc = chat.encode(unit.conversation);
  if (max_length > 0 && doc.ids.size() > static_cast<size_t>(max_length)) {
    doc.ids.resize(static_cast<size_t>(max_length));
    doc.targets.resize(static_cast<size_t>(max_length));
    unit.truncated = true;
  }
  unit.ids = std::move(doc.ids);
  unit.targets = std::move(doc.targets);
  if (std::find(unit.targets.begin(), unit.targets.end(), 1) == unit.targets.end() && !unit.truncated) {
    throw Error(unit.where + ": the template gives this conversation no target token (it marks none of its text "
                "with {% generation %})");
  }
}

// Tokenizes every unit's text on `workers` threads (one: the calling thread), results in
// unit order.
void encode_units(const Tokenizer& tokenizer, const ChatEncoder* chat, int64_t max_length, std::vector<Unit>& units,
                  int workers) {
  const auto encode_every = [&](size_t first, size_t step) {
    for (size_t i = first; i < units.size(); i += step) {
      if (units[i].chat && units[i].preference) {  // cut later, as a pair
        ChatDocument chosen = chat->encode(units[i].conversation), rejected = chat->encode(units[i].rejected_conversation);
        units[i].ids = std::move(chosen.ids);
        units[i].targets = std::move(chosen.targets);
        units[i].rejected_ids = std::move(rejected.ids);
        units[i].rejected_targets = std::move(rejected.targets);
        continue;
      }
      if (units[i].chat) {
        encode_conversation(*chat, max_length, units[i]);
        continue;
      }
      units[i].ids.clear();
      tokenizer.encode(units[i].text, units[i].ids);
      if (units[i].pair || units[i].preference) {
        units[i].completion_ids.clear();
        tokenizer.encode(units[i].completion, units[i].completion_ids);
      }
      if (units[i].preference) {
        units[i].rejected_ids.clear();
        tokenizer.encode(units[i].rejected, units[i].rejected_ids);
      }
    }
  };
  if (workers == 1) return encode_every(0, 1);
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(workers));
  for (int w = 0; w < workers; ++w) {
    threads.emplace_back([&, w] {
      try {
        encode_every(static_cast<size_t>(w), static_cast<size_t>(workers));
      } catch (...) {
        errors[static_cast<size_t>(w)] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

// A preference example's two documents, end-of-text, prompt, continuation, end-of-text (the
// last two the targets), cut to max_length as training cuts (data/samples.h): the prompt's
// beginning first, keeping its last token, then each continuation's end.
// A conversational example is its two rendered conversations, whose targets the template
// marks; their prompts (the tokens before the first target) must be the same.
void append_preference(const Unit& u, uint32_t eot, int64_t max_length, ShardSink& sink, TokenizeSummary& summary) {
  std::vector<uint32_t> ids[2];
  std::vector<uint8_t> targets[2];
  int64_t prompt = static_cast<int64_t>(u.ids.size()) + 1;
  int64_t longest = 0;
  if (u.chat) {
    ids[0] = u.ids, ids[1] = u.rejected_ids;
    targets[0] = u.targets, targets[1] = u.rejected_targets;
    int64_t prompts[2];
    for (int side = 0; side < 2; ++side) {
      prompts[side] = std::find(targets[side].begin(), targets[side].end(), 1) - targets[side].begin();
      if (prompts[side] == static_cast<int64_t>(targets[side].size())) {
        throw Error(u.where + ": the template gives the " + (side == 0 ? "chosen" : "rejected") +
                    " conversation no target token (it marks none of its text with {% generation %})");
      }
      longest = std::max<int64_t>(longest, static_cast<int64_t>(ids[side].size()));
    }
    if (prompts[0] != prompts[1] || prompts[0] == 0 ||
        !std::equal(ids[0].begin(), ids[0].begin() + prompts[0], ids[1].begin())) {
      throw Error(u.where + ": the template renders the prompt differently before the chosen and the rejected "
                  "messages (or renders none), so the pair has no common prompt; check the template");
    }
    prompt = prompts[0];
  }
  for (int side = 0; side < 2 && !u.chat; ++side) {
    const std::vector<uint32_t>& continuation = side == 0 ? u.completion_ids : u.rejected_ids;
    ids[side].reserve(static_cast<size_t>(prompt) + continuation.size() + 1);
    ids[side].push_back(eot);
    ids[side].insert(ids[side].end(), u.ids.begin(), u.ids.end());
    ids[side].insert(ids[side].end(), continuation.begin(), continuation.end());
    ids[side].push_back(eot);
    targets[side].assign(ids[side].size(), 1);
    std::fill(targets[side].begin(), targets[side].begin() + prompt, 0);
    longest = std::max<int64_t>(longest, static_cast<int64_t>(ids[side].size()));
  }
  const int64_t excess = max_length > 0 ? std::max<int64_t>(0, longest - max_length) : 0;
  if (excess > 0) {
    const int64_t cut = std::min(excess, prompt - 1);
    for (int side = 0; side < 2; ++side) {
      ids[side].erase(ids[side].begin(), ids[side].begin() + cut);
      targets[side].erase(targets[side].begin(), targets[side].begin() + cut);
      if (static_cast<int64_t>(ids[side].size()) > max_length) {
        ids[side].resize(static_cast<size_t>(max_length));
        targets[side].resize(static_cast<size_t>(max_length));
      }
    }
    ++summary.truncated[u.split];
  }
  sink.append_pair(ids, targets);
  ++summary.documents[u.split];
  summary.prompt_tokens[u.split] += prompt - std::min(excess, prompt - 1);
  for (int side = 0; side < 2; ++side) {
    summary.tokens[u.split] += static_cast<int64_t>(ids[side].size());
    summary.target_tokens[u.split] += static_cast<int64_t>(std::count(targets[side].begin(), targets[side].end(), 1));
  }
}

// Appends a tokenized batch to the splits' shards, in input order, and counts it.
void append_batch(const std::vector<Unit>& units, uint32_t eot, int64_t max_length, ShardSink (&sinks)[2],
                  TokenizeSummary& summary) {
  for (const Unit& u : units) {
    if (u.preference) {
      append_preference(u, eot, max_length, sinks[u.split], summary);
      continue;
    }
    if (u.chat) {
      const auto targets = static_cast<int64_t>(std::count(u.targets.begin(), u.targets.end(), 1));
      if (u.truncated) ++summary.truncated[u.split];
      if (targets == 0) continue;  // cut before its first target: nothing to learn from
      sinks[u.split].append_document(u.ids, u.targets);
      ++summary.documents[u.split];
      summary.tokens[u.split] += static_cast<int64_t>(u.ids.size());
      summary.target_tokens[u.split] += targets;
      summary.turns[u.split] += static_cast<int64_t>(u.conversation.messages.size());
      continue;
    }
    if (u.pair) {  // end-of-text, prompt, completion, end-of-text; the last two are the targets
      std::vector<uint32_t> ids;
      ids.reserve(u.ids.size() + u.completion_ids.size() + 2);
      ids.push_back(eot);
      ids.insert(ids.end(), u.ids.begin(), u.ids.end());
      ids.insert(ids.end(), u.completion_ids.begin(), u.completion_ids.end());
      ids.push_back(eot);
      std::vector<uint8_t> targets(ids.size(), 1);
      std::fill(targets.begin(), targets.begin() + static_cast<std::ptrdiff_t>(u.ids.size() + 1), 0);
      sinks[u.split].append_document(ids, targets);
      ++summary.documents[u.split];
      summary.tokens[u.split] += static_cast<int64_t>(u.ids.size() + u.completion_ids.size() + 2);
      summary.prompt_tokens[u.split] += static_cast<int64_t>(u.ids.size());
      summary.target_tokens[u.split] += static_cast<int64_t>(u.completion_ids.size() + 1);
      continue;
    }
    if (u.starts_document) {
      sinks[u.split].append({eot});
      ++summary.documents[u.split];
      ++summary.tokens[u.split];
    }
    sinks[u.split].append(u.ids);
    summary.tokens[u.split] += static_cast<int64_t>(u.ids.size());
  }
}

// A preference manifest's fields and counts (beside a conversational one's chat entry).
void add_preference_counts(const TokenizeOptions& options, const TokenizeSummary& summary, nlohmann::json& m) {
  m["kind"] = "preference";
  m["fields"] = {{"prompt", options.prompt_field}, {"chosen", options.chosen_field}, {"rejected", options.rejected_field}};
  m["examples"] = {{"train", summary.documents[0]}, {"val", summary.documents[1]}};
  // Each example is two documents of the shard (prompt + chosen, prompt + rejected; with a
  // template, two rendered conversations): the counts say what the shards hold.
  const nlohmann::json documents = {{"train", 2 * summary.documents[0]}, {"val", 2 * summary.documents[1]}};
  m["documents"] = documents;
  if (m.contains("conversations")) m["conversations"] = documents;
  m["prompt_tokens"] = {{"train", summary.prompt_tokens[0]}, {"val", summary.prompt_tokens[1]}};
  m["target_tokens"] = {{"train", summary.target_tokens[0]}, {"val", summary.target_tokens[1]}};
  m["max_length"] = options.max_length;
  m["truncated"] = {{"train", summary.truncated[0]}, {"val", summary.truncated[1]}};
  m["skipped_lines"] = summary.skipped_lines;
}

// Moves the complete shards from `temp` into the output folder, removes stale ones, and
// writes the manifest last. chat_template: the conversations' (nullptr for text and pairs).
void publish(const Tokenizer& tokenizer, const TokenizeOptions& options, const ChatTemplate* chat_template,
             const fs::path& temp, const std::vector<fs::path>& existing, const TokenizeSummary& summary,
             const nlohmann::json& shards, int token_bytes) {
  for (int s = 0; s < 2; ++s) {
    for (const auto& name : summary.shards[s]) fs::rename(temp / name, options.output_dir / name);
  }
  for (const auto& old : existing) {
    const std::string name = old.filename().string();
    const bool kept = std::find(summary.shards[0].begin(), summary.shards[0].end(), name) != summary.shards[0].end() ||
                      std::find(summary.shards[1].begin(), summary.shards[1].end(), name) != summary.shards[1].end();
    if (!kept && name != "manifest.json") fs::remove(old);
  }
  fsync_directory(options.output_dir);
  nlohmann::json inputs = nlohmann::json::array();
  for (const auto& in : options.inputs) inputs.push_back(in.string());
  nlohmann::json manifest = {
      {"format", "gpt2ft-shards"},
      {"version", 1},
      {"tokenizer", {{"kind", tokenizer.kind()}, {"identity", tokenizer.identity()},
                     {"vocab_size", tokenizer.vocab_size()}, {"eot_id", tokenizer.require_eot_id()},
                     {"source", fs::absolute(tokenizer.source()).string()}}},
      {"token_bytes", token_bytes},
      {"inputs", inputs},
      {"val_fraction", options.val_fraction},
      {"documents", {{"train", summary.documents[0]}, {"val", summary.documents[1]}}},
      {"tokens", {{"train", summary.tokens[0]}, {"val", summary.tokens[1]}}},
      {"shards", shards}};
  nlohmann::json& m = manifest;
  if (chat_template) {  // document shards of conversations
    const ByteLevelBpe& bpe = chat_tokenizer(tokenizer, "--chat-template");
    const ConversationFields& f = options.conversation_fields;
    m["kind"] = is_preference(options) ? "preference" : "chat";
    m["tokenizer"]["base_vocab_size"] = bpe.base_vocab_size();
    m["tokenizer"]["added_tokens"] = bpe.added_tokens();
    m["chat"] = {{"template", options.chat_template},
                 {"template_source", chat_template->source()},
                 {"train_on", options.train_on},
                 {"max_length", options.max_length},
                 {"fields", {{"messages", f.messages}, {"role", f.role}, {"content", f.content},
                             {"prompt", f.prompt}, {"completion", f.completion}}}};
    m["conversations"] = {{"train", summary.documents[0]}, {"val", summary.documents[1]}};
    m["turns"] = {{"train", summary.turns[0]}, {"val", summary.turns[1]}};
    m["target_tokens"] = {{"train", summary.target_tokens[0]}, {"val", summary.target_tokens[1]}};
    m["truncated"] = {{"train", summary.truncated[0]}, {"val", summary.truncated[1]}};
    m["skipped_lines"] = summary.skipped_lines;
    if (is_preference(options)) add_preference_counts(options, summary, m);
  } else if (is_preference(options)) {  // preference shards
    add_preference_counts(options, summary, m);
  } else if (is_pairs(options)) {  // document shards
    m["kind"] = "prompt_completion";
    m["prompt_field"] = options.prompt_field;
    m["completion_field"] = options.completion_field;
    m["pairs"] = {{"train", summary.documents[0]}, {"val", summary.documents[1]}};
    m["prompt_tokens"] = {{"train", summary.prompt_tokens[0]}, {"val", summary.prompt_tokens[1]}};
    m["target_tokens"] = {{"train", summary.target_tokens[0]}, {"val", summary.target_tokens[1]}};
    m["skipped_lines"] = summary.skipped_lines;
  } else {
    m["kind"] = "text";
    m["jsonl_field"] = options.jsonl_field;
  }
  write_file_atomic(options.output_dir / "manifest.json", manifest.dump(2) + "\n");
}

// Three stages overlap: a thread reads batches of text, the calling thread tokenizes them (on
// `workers` threads), a third streams the ids into shards, in input order throughout. The
// first stage to fail stops the others and its error is rethrown.
void run_stages(const Tokenizer& tokenizer, const ChatEncoder* chat, const TokenizeOptions& options,
                DocumentReader& reader, ShardSink (&sinks)[2], Progress& progress, TokenizeSummary& summary) {
  const uint32_t eot = tokenizer.require_eot_id();
  const int workers = options.workers > 0 ? options.workers
                                          : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  struct Batch {
    std::vector<Unit> units;
    int64_t bytes_read = 0;  // of the inputs, after this batch
  };
  Channel<Batch> to_encode(2), to_write(2);
  std::exception_ptr failure;
  std::mutex failure_mutex;
  std::atomic<bool> failed{false};
  const auto fail = [&] {
    {
      std::lock_guard<std::mutex> lock(failure_mutex);
      if (!failure) failure = std::current_exception();  // the first stage to fail says why
    }
    failed = true;
    to_encode.abort();
    to_write.abort();
  };
  const size_t batch_bytes = std::min(kMaxBatchBytes, std::max(kBatchBytes, (size_t{1} << 20) * workers));
  std::thread read_stage([&] {
    try {
      Batch batch;
      while (reader.next_batch(batch.units, batch_bytes)) {
        batch.bytes_read = reader.bytes_read();
        if (!to_encode.push(std::move(batch))) return;
        batch = Batch{};
      }
      to_encode.close();
    } catch (...) {
      fail();
    }
  });
  std::thread write_stage([&] {
    try {
      Batch batch;
      while (to_write.pop(batch)) {
        append_batch(batch.units, eot, options.max_length, sinks, summary);
        progress.update(batch.bytes_read, summary.tokens[0] + summary.tokens[1]);
      }
      if (!failed) {
        for (auto& sink : sinks) sink.flush();
      }
    } catch (...) {
      fail();
    }
  });
  try {
    Batch batch;
    while (to_encode.pop(batch)) {
      encode_units(tokenizer, chat, options.max_length, batch.units, workers);
      if (!to_write.push(std::move(batch))) break;
    }
    to_write.close();
  } catch (...) {
    fail();
  }
  read_stage.join();
  write_stage.join();
  if (failure) std::rethrow_exception(failure);
}

// Never exit 0 having written nothing.
void check_wrote_something(const TokenizeOptions& options, const TokenizeSummary& summary, bool saw_text) {
  if (summary.documents[0] + summary.documents[1] > 0 && saw_text) return;
  std::string names;
  for (const auto& p : options.inputs) names += (names.empty() ? "" : ", ") + p.string();
  throw Error(fmt::format("no document to write: {} ({} bytes) hold{}. Nothing was written", names, summary.bytes_read,
                          summary.skipped_lines > 0
                              ? fmt::format(" no good line: {} bad line(s) skipped (--skip-bad-lines), the rest blank",
                                            summary.skipped_lines)
                              : summary.bytes_read == 0 ? " nothing" : " only blank lines"));
}

// The conversations' encoder (nullptr for text and pairs); `chat_template` holds its template.
std::unique_ptr<ChatEncoder> chat_encoder(const Tokenizer& tokenizer, const TokenizeOptions& options,
                                          std::optional<ChatTemplate>& chat_template) {
  if (!is_chat(options)) return nullptr;
  const ByteLevelBpe& bpe = chat_tokenizer(tokenizer, "--chat-template");
  chat_template.emplace(load_chat_template(options.chat_template));
  return std::make_unique<ChatEncoder>(*chat_template, bpe, parse_train_on(options.train_on));
}

}  // namespace

void check_tokenize_output(const TokenizeOptions& options) { existing_outputs(options); }

bool is_jsonl_input(const fs::path& path) { return lowercase_extension(path) == ".jsonl"; }

bool is_pairs(const TokenizeOptions& options) { return !options.completion_field.empty(); }

bool is_preference(const TokenizeOptions& options) { return !options.chosen_field.empty(); }

bool is_chat(const TokenizeOptions& options) { return !options.chat_template.empty(); }

TokenizeSummary tokenize_corpus(const Tokenizer& tokenizer, const TokenizeOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  const int64_t total_bytes = check_inputs(options);
  tokenizer.require_eot_id();
  const int token_bytes = shard_token_bytes(tokenizer.vocab_size());
  const std::vector<fs::path> existing = existing_outputs(options);
  std::optional<ChatTemplate> chat_template;
  const std::unique_ptr<ChatEncoder> chat = chat_encoder(tokenizer, options, chat_template);
  const fs::path temp = options.output_dir / (".tokenize-tmp-" + std::to_string(::getpid()));
  fs::remove_all(temp);
  std::error_code made;
  fs::create_directories(temp, made);
  if (made) throw Error(options.output_dir.string() + ": cannot create the folder (" + made.message() + ")");

  TokenizeSummary summary;
  std::error_code ec;
  try {
    ShardSink sinks[2] = {{temp, "train", token_bytes, options.shard_tokens},
                          {temp, "val", token_bytes, options.shard_tokens}};
    DocumentReader reader(options);
    Progress progress(total_bytes, options.progress);
    run_stages(tokenizer, chat.get(), options, reader, sinks, progress, summary);
    progress.finish();
    summary.bytes_read = reader.bytes_read();
    summary.skipped_lines = reader.skipped_lines();
    check_wrote_something(options, summary, reader.saw_text());
    nlohmann::json shards = {{"train", nlohmann::json::array()}, {"val", nlohmann::json::array()}};
    for (int s = 0; s < 2; ++s) {
      for (const auto& [name, count] : sinks[s].files()) {
        shards[s == 0 ? "train" : "val"].push_back({{"file", name}, {"tokens", count}});
        summary.shards[s].push_back(name);
      }
    }
    publish(tokenizer, options, chat_template ? &*chat_template : nullptr, temp, existing, summary, shards,
            token_bytes);
  } catch (...) {
    fs::remove_all(temp, ec);
    throw;
  }
  fs::remove_all(temp, ec);
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return summary;
}

}  // namespace gpt2ft
