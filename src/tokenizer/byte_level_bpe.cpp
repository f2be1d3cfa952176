// GPT-2 byte-level BPE with a merge hash table and a per-thread piece cache.
#include "gpt2ft/tokenizer/byte_level_bpe.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <fstream>
#include <map>
#include <queue>
#include <sstream>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "gpt2ft/core/atomic_file.h"
#include "gpt2ft/core/json.h"
#include "gpt2ft/core/error.h"

namespace gpt2ft {
namespace fs = std::filesystem;
namespace {

constexpr uint32_t kNoRank = 0xFFFFFFFFu;
constexpr const char* kEndOfText = "<|endoftext|>";

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Per-thread cache of piece -> ids. Keys and values live in flat arenas; the table is
// open-addressed. Cleared when it grows past its budget.
class PieceCache {
 public:
  const uint32_t* find(uint64_t owner, std::string_view piece, uint64_t hash, uint32_t& count) {
    if (owner != owner_) reset(owner);
    for (size_t i = hash & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.key_len == kEmpty) return nullptr;
      if (s.hash == hash && s.key_len == piece.size() &&
          std::equal(piece.begin(), piece.end(), keys_.begin() + s.key_offset)) {
        count = s.ids_count;
        return ids_.data() + s.ids_offset;
      }
    }
  }

  void insert(std::string_view piece, uint64_t hash, const uint32_t* ids, uint32_t count) {
    if (used_ * 2 >= slots_.size() || keys_.size() > kMaxArenaBytes) reset(owner_);
    size_t i = hash & mask_;
    while (slots_[i].key_len != kEmpty) i = (i + 1) & mask_;
    slots_[i] = Slot{hash, static_cast<uint32_t>(keys_.size()), static_cast<uint32_t>(piece.size()),
                     static_cast<uint32_t>(ids_.size()), count};
    keys_.insert(keys_.end(), piece.begin(), piece.end());
    ids_.insert(ids_.end(), ids, ids + count);
    ++used_;
  }

 private:
  static constexpr uint32_t kEmpty = 0xFFFFFFFFu;
  static constexpr size_t kSlots = 1 << 18;
  static constexpr size_t kMaxArenaBytes = 16u << 20;
  struct Slot {
    uint64_t hash;
    uint32_t key_offset, key_len = kEmpty, ids_offset, ids_count;
  };

  void reset(uint64_t owner) {
    owner_ = owner;
    slots_.assign(kSlots, Slot{0, 0, kEmpty, 0, 0});
    mask_ = kSlots - 1;
    keys_.clear();
    ids_.clear();
    used_ = 0;
  }

  uint64_t owner_ = 0;
  std::vector<Slot> slots_;
  size_t mask_ = 0;
  std::vector<char> keys_;
  std::vector<uint32_t> ids_;
  size_t used_ = 0;
};

PieceCache& thread_cache() {
  thread_local PieceCache cache;
  return cache;
}

nlohmann::json parse_json_file(const fs::path& path) {
  try {
    return parse_json_limited(read_text_file(path), path.string());
  } catch (const nlohmann::json::exception& e) {
    throw Error(path.string() + ": not valid JSON (" + e.what() + ")");
  }
}

// Token ids index a table of the vocabulary's size: bounded as a model's vocab_size is.
constexpr uint64_t kMaxTokenIds = 1u << 24;

std::vector<std::pair<std::string, uint32_t>> vocab_from_json(const nlohmann::json& j, const std::string& where) {
  if (!j.is_object()) throw Error(where + ": expected a JSON object mapping tokens to ids");
  std::vector<std::pair<std::string, uint32_t>> vocab;
  vocab.reserve(j.size());
  for (const auto& [token, id] : j.items()) {
    if (!id.is_number_unsigned() || id.get<uint64_t>() >= kMaxTokenIds) {
      throw Error(where + ": the id of token \"" + token + "\" is " + id.dump() + ", expected an integer in [0, " +
                  std::to_string(kMaxTokenIds) + ")");
    }
    vocab.emplace_back(token, id.get<uint32_t>());
  }
  return vocab;
}

// "LEFT RIGHT", split at its one space; false when the line is not of that form.
bool split_merge(const std::string& line, std::pair<std::string, std::string>& merge) {
  const size_t space = line.find(' ');
  if (space == std::string::npos || space == 0 || space + 1 >= line.size() ||
      line.find(' ', space + 1) != std::string::npos) {
    return false;
  }
  merge = {line.substr(0, space), line.substr(space + 1)};
  return true;
}

std::pair<std::string, std::string> split_merge_line(const std::string& line, const std::string& where) {
  std::pair<std::string, std::string> merge;
  if (!split_merge(line, merge)) throw Error(where + ": expected a merge \"LEFT RIGHT\", got \"" + line + "\"");
  return merge;
}

std::vector<std::pair<std::string, std::string>> merges_from_text(const fs::path& path) {
  std::string text = read_text_file(path);
  // CR-only line endings (old Mac editors) would read as one "#version" line: 0 merges.
  std::string lf;
  lf.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '\r') lf += text[i];
    else if (i + 1 >= text.size() || text[i + 1] != '\n') lf += '\n';
  }
  text.swap(lf);
  std::istringstream in(text);
  std::vector<std::pair<std::string, std::string>> merges;
  std::string line;
  size_t line_no = 0;
  const std::string where = path.string() + ":";  // the line number is added only to an error
  while (std::getline(in, line)) {
    ++line_no;
    if (line.empty() || line.rfind("#version", 0) == 0) continue;
    if (!split_merge(line, merges.emplace_back())) split_merge_line(line, where + std::to_string(line_no));  // throws
  }
  return merges;
}

}  // namespace

const std::vector<std::string>& gpt2_byte_to_unicode() {
  static const std::vector<std::string> table = [] {
    std::vector<std::string> t(256);
    uint32_t extra = 0;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      append_utf8(t[b], printable ? b : 256 + extra++);
    }
    return t;
  }();
  return table;
}

bool try_gpt2_token_to_bytes(std::string_view token, std::string& bytes) {
  // GPT-2's alphabet is code points below U+0144 (one or two UTF-8 bytes): code point -> byte.
  static const std::array<int16_t, 0x144> reverse = [] {
    std::array<int16_t, 0x144> r;
    r.fill(-1);
    const auto& t = gpt2_byte_to_unicode();
    for (int b = 0; b < 256; ++b) {
      const auto lead = static_cast<uint8_t>(t[b][0]);
      const uint32_t cp = t[b].size() == 1 ? lead : ((lead & 0x1Fu) << 6) | (static_cast<uint8_t>(t[b][1]) & 0x3Fu);
      r[cp] = static_cast<int16_t>(b);
    }
    return r;
  }();
  bytes.clear();
  for (size_t i = 0; i < token.size();) {
    const auto c = static_cast<uint8_t>(token[i]);
    uint32_t cp = c;
    size_t len = 1;
    if (c >= 0x80) {  // only two-byte sequences can be in the alphabet
      if ((c & 0xE0) != 0xC0 || i + 1 >= token.size() || (static_cast<uint8_t>(token[i + 1]) & 0xC0) != 0x80) return false;
      cp = ((c & 0x1Fu) << 6) | (static_cast<uint8_t>(token[i + 1]) & 0x3Fu);
      if (cp < 0x80) return false;  // an overlong encoding
      len = 2;
    }
    if (cp >= reverse.size() || reverse[cp] < 0) return false;
    bytes += static_cast<char>(reverse[cp]);
    i += len;
  }
  return true;
}

std::string gpt2_token_to_bytes(const std::string& token, const std::string& where) {
  std::string bytes;
  if (!try_gpt2_token_to_bytes(token, bytes)) {
    throw Error(where + ": token \"" + token + "\" has a character outside GPT-2's byte alphabet");
  }
  return bytes;
}

// (left id, right id) -> (rank, merged id), open-addressed.
struct ByteLevelBpe::MergeTable {
  struct Slot {
    uint64_t key = ~0ull;
    uint32_t rank = kNoRank;
    uint32_t merged = 0;
  };
  std::vector<Slot> slots;
  size_t mask = 0;

  explicit MergeTable(size_t n) {
    size_t cap = 16;
    while (cap < n * 2) cap <<= 1;
    slots.assign(cap, Slot{});
    mask = cap - 1;
  }
  static uint64_t key(uint32_t a, uint32_t b) { return (static_cast<uint64_t>(a) << 32) | b; }
  static size_t hash(uint64_t k) { return static_cast<size_t>((k * 0x9E3779B97F4A7C15ull) >> 17); }
  bool insert(uint32_t a, uint32_t b, uint32_t rank, uint32_t merged) {
    const uint64_t k = key(a, b);
    for (size_t i = hash(k) & mask;; i = (i + 1) & mask) {
      if (slots[i].key == k) return false;  // duplicate merge: the first (lower rank) wins
      if (slots[i].rank == kNoRank) {
        slots[i] = Slot{k, rank, merged};
        return true;
      }
    }
  }
  const Slot* find(uint32_t a, uint32_t b) const {
    const uint64_t k = key(a, b);
    for (size_t i = hash(k) & mask;; i = (i + 1) & mask) {
      if (slots[i].key == k) return &slots[i];
      if (slots[i].rank == kNoRank) return nullptr;
    }
  }
};

ByteLevelBpe::ByteLevelBpe(const std::vector<std::pair<std::string, uint32_t>>& vocab,
                           const std::vector<std::pair<std::string, std::string>>& merges,
                           fs::path source)
    : source_(std::move(source)) {
  static std::atomic<uint64_t> instances{0};
  instance_ = ++instances;
  const std::string where = source_.string();
  uint32_t max_id = 0;
  for (const auto& [token, id] : vocab) max_id = std::max(max_id, id);
  id_to_bytes_.assign(vocab.empty() ? 0 : max_id + 1, std::string());
  std::vector<bool> seen(id_to_bytes_.size(), false);
  std::unordered_map<std::string, uint32_t> bytes_to_id;
  bytes_to_id.reserve(vocab.size());
  for (const auto& [token, id] : vocab) {
    if (seen[id]) throw Error(where + ": id " + std::to_string(id) + " is given to two tokens");
    seen[id] = true;
    if (token == kEndOfText) {
      eot_id_ = id;
      id_to_bytes_[id] = token;  // decodes to its text
      continue;
    }
    id_to_bytes_[id] = gpt2_token_to_bytes(token, where);
    bytes_to_id.emplace(id_to_bytes_[id], id);
  }
  for (size_t id = 0; id < seen.size(); ++id) {
    if (!seen[id]) throw Error(where + ": the vocabulary has no token with id " + std::to_string(id) + " (ids must be 0..N-1)");
  }
  for (int b = 0; b < 256; ++b) {
    const auto it = bytes_to_id.find(std::string(1, static_cast<char>(b)));
    if (it == bytes_to_id.end()) {
      throw Error(where + ": the vocabulary lacks the single-byte token for byte " + std::to_string(b) +
                  " (" + gpt2_byte_to_unicode()[b] + "); byte-level BPE needs all 256");
    }
    byte_to_id_[b] = it->second;
  }
  merges_ = std::make_unique<MergeTable>(merges.size());
  // The identity hashes each token's bytes and a NUL, then each merge as "left right\n" (FNV-1a
  // runs over the pieces as over their concatenation).
  uint64_t hash = fnv1a64("gpt2-bpe");
  for (size_t id = 0; id < id_to_bytes_.size(); ++id) hash = fnv1a64(std::string_view("\0", 1), fnv1a64(id_to_bytes_[id], hash));
  std::string lb, rb, both;
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [left, right] = merges[rank];
    const auto at = [&, &left = left, &right = right] {
      return where + ": merge " + std::to_string(rank + 1) + " \"" + left + " " + right + "\"";
    };
    if (!try_gpt2_token_to_bytes(left, lb)) gpt2_token_to_bytes(left, at());  // throws, naming the merge
    if (!try_gpt2_token_to_bytes(right, rb)) gpt2_token_to_bytes(right, at());
    both.assign(lb).append(rb);
    const auto l = bytes_to_id.find(lb), r = bytes_to_id.find(rb), m = bytes_to_id.find(both);
    if (l == bytes_to_id.end() || r == bytes_to_id.end() || m == bytes_to_id.end()) {
      throw Error(at() + ": refers to a token that is not in the vocabulary");
    }
    merges_->insert(l->second, r->second, static_cast<uint32_t>(rank), m->second);
    hash = fnv1a64("\n", fnv1a64(rb, fnv1a64(" ", fnv1a64(lb, hash))));
  }
  identity_ = "gpt2-bpe:" + hex64(hash);
  for (const auto& bytes : id_to_bytes_) token_lengths_.push_back(static_cast<uint32_t>(bytes.size()));
}

ByteLevelBpe::~ByteLevelBpe() = default;

bool ByteLevelBpe::folder_has_files(const fs::path& dir) {
  return (fs::exists(dir / "vocab.json") && fs::exists(dir / "merges.txt")) ||
         (fs::exists(dir / "encoder.json") && fs::exists(dir / "vocab.bpe")) || fs::exists(dir / "tokenizer.json");
}

static std::unique_ptr<ByteLevelBpe> from_tokenizer_json(const nlohmann::json& j, const std::string& where,
                                                         const fs::path& dir);

// The tokens tokenizer_config.json adds after the BPE vocabulary (its added_tokens_decoder
// entries from `base_size` on), in id order; they must follow it without a gap.
static std::vector<std::string> added_tokens_from_config(const fs::path& dir, size_t base_size) {
  const fs::path file = dir / "tokenizer_config.json";
  if (!fs::exists(file)) return {};
  const nlohmann::json j = parse_json_file(file);
  if (!j.is_object() || !j.contains("added_tokens_decoder") || !j["added_tokens_decoder"].is_object()) return {};
  std::map<uint64_t, std::string> added;
  for (const auto& [key, entry] : j["added_tokens_decoder"].items()) {
    uint64_t id = 0;
    try {
      id = std::stoull(key);
    } catch (const std::exception&) {
      throw Error(file.string() + ": added_tokens_decoder key \"" + key + "\" is not a token id");
    }
    if (!entry.is_object() || !entry.contains("content") || !entry["content"].is_string()) {
      throw Error(file.string() + ": added_tokens_decoder[\"" + key + "\"] has no \"content\" string");
    }
    if (id >= base_size) added[id] = entry["content"].get<std::string>();
  }
  std::vector<std::string> out;
  for (const auto& [id, content] : added) {
    if (id != base_size + out.size()) {
      throw Error(file.string() + ": added token " + std::to_string(id) + " (\"" + content + "\") leaves a gap after " +
                  "the vocabulary of " + std::to_string(base_size + out.size()) + "; added tokens must follow it in order");
    }
    out.push_back(content);
  }
  return out;
}

std::unique_ptr<ByteLevelBpe> ByteLevelBpe::from_folder(const fs::path& dir) {
  if (fs::exists(dir / "vocab.json") && fs::exists(dir / "merges.txt")) {
    const auto vocab = vocab_from_json(parse_json_file(dir / "vocab.json"), (dir / "vocab.json").string());
    auto bpe = std::make_unique<ByteLevelBpe>(vocab, merges_from_text(dir / "merges.txt"), dir);
    bpe->add_tokens(added_tokens_from_config(dir, bpe->id_to_bytes_.size()));
    return bpe;
  }
  if (fs::exists(dir / "encoder.json") && fs::exists(dir / "vocab.bpe")) {
    const auto vocab = vocab_from_json(parse_json_file(dir / "encoder.json"), (dir / "encoder.json").string());
    return std::make_unique<ByteLevelBpe>(vocab, merges_from_text(dir / "vocab.bpe"), dir);
  }
  const fs::path file = dir / "tokenizer.json";
  if (!fs::exists(file)) {
    throw Error(dir.string() + ": no tokenizer files (expected vocab.json + merges.txt, encoder.json + vocab.bpe, "
                               "or tokenizer.json)");
  }
  const nlohmann::json j = parse_json_file(file);
  const std::string where = file.string();
  try {
    return from_tokenizer_json(j, where, dir);
  } catch (const nlohmann::json::exception& e) {  // a field of another type than the format's
    throw Error(where + ": not a tokenizer.json of the expected layout (" + e.what() + ")");
  }
}

static std::unique_ptr<ByteLevelBpe> from_tokenizer_json(const nlohmann::json& j, const std::string& where,
                                                         const fs::path& dir) {
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object() || j["model"].value("type", "") != "BPE") {
    throw Error(where + ": model.type: expected \"BPE\" (a byte-level BPE tokenizer)");
  }
  const nlohmann::json& model = j["model"];
  if (!model.contains("vocab") || !model["vocab"].is_object()) {
    throw Error(where + ": model.vocab: expected an object mapping tokens to ids");
  }
  // What this tokenizer implements is GPT-2's pipeline exactly: no normalizer, the byte-level
  // pre-tokenizer with GPT-2's regex and no prefix space, plain BPE. A tokenizer.json asking
  // for anything else would give other ids than Hugging Face's: refused, not approximated.
  const auto refuse = [&](const std::string& what, const nlohmann::json& value) {
    throw Error(where + ": " + what + " " + value.dump() + " is not supported (GPT-2's byte-level BPE only: no "
                "normalizer, a ByteLevel pre-tokenizer without add_prefix_space); its ids would differ from Hugging "
                "Face's");
  };
  if (j.contains("normalizer") && !j["normalizer"].is_null()) refuse("normalizer", j["normalizer"]);
  if (j.contains("pre_tokenizer") && !j["pre_tokenizer"].is_null()) {
    const nlohmann::json& pre = j["pre_tokenizer"];
    if (!pre.is_object() || pre.value("type", "") != "ByteLevel" ||
        (pre.contains("add_prefix_space") && pre["add_prefix_space"] != false) ||
        (pre.contains("use_regex") && pre["use_regex"] != true)) {
      refuse("pre_tokenizer", pre);
    }
  }
  for (const char* key : {"dropout", "unk_token"}) {
    if (model.contains(key) && !model[key].is_null()) refuse(std::string("model.") + key, model[key]);
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(key) && !model[key].is_null() && model[key] != "") refuse(std::string("model.") + key, model[key]);
  }
  for (const char* key : {"byte_fallback", "ignore_merges"}) {
    if (model.contains(key) && model[key] != false) refuse(std::string("model.") + key, model[key]);
  }
  auto vocab = vocab_from_json(model["vocab"], where + ": model.vocab");
  if (j.contains("added_tokens")) {
    for (const auto& t : j["added_tokens"]) {
      const std::string content = t.value("content", "");
      const bool known = std::any_of(vocab.begin(), vocab.end(), [&](const auto& v) { return v.first == content; });
      if (content == kEndOfText && !known) {
        const auto one = vocab_from_json(nlohmann::json{{content, t.value("id", nlohmann::json(0))}}, where + ": added_tokens");
        vocab.push_back(one.front());
      }
    }
  }
  std::vector<std::pair<std::string, std::string>> merges;
  if (!model.contains("merges") || !model["merges"].is_array()) {  // transformers refuses such a file too
    throw Error(where + ": model.merges: expected a list of merges, found " +
                (model.contains("merges") ? std::string(model["merges"].type_name()) : std::string("none")));
  }
  for (const auto& m : model["merges"]) {
    if (m.is_string()) {
      merges.push_back(split_merge_line(m.get<std::string>(), where + ": model.merges"));
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
    } else {
      throw Error(where + ": model.merges: expected \"A B\" strings or [A, B] pairs");
    }
  }
  return std::make_unique<ByteLevelBpe>(vocab, merges, dir);
}

void ByteLevelBpe::merge_short(std::vector<uint32_t>& s) const {
  // Repeatedly merge the leftmost pair of lowest rank: fine for the short pieces of real text.
  while (s.size() > 1) {
    uint32_t best_rank = kNoRank, merged = 0;
    size_t best = 0;
    for (size_t i = 0; i + 1 < s.size(); ++i) {
      const auto* m = merges_->find(s[i], s[i + 1]);
      if (m && m->rank < best_rank) best_rank = m->rank, merged = m->merged, best = i;
    }
    if (best_rank == kNoRank) break;
    s[best] = merged;
    s.erase(s.begin() + static_cast<std::ptrdiff_t>(best) + 1);
  }
}

void ByteLevelBpe::merge_long(std::vector<uint32_t>& s) const {
  // The same order of merges (lowest rank, then leftmost) with a heap over a linked list:
  // O(n log n) for long runs of spaces, digits or letters.
  const size_t n = s.size();
  std::vector<int64_t> prev(n), next(n);
  std::vector<bool> alive(n, true);
  for (size_t i = 0; i < n; ++i) prev[i] = static_cast<int64_t>(i) - 1, next[i] = i + 1 < n ? i + 1 : -1;
  struct Candidate {
    uint32_t rank;
    size_t left;
    uint32_t left_id, right_id;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
  auto push = [&](int64_t left) {
    if (left < 0 || next[left] < 0) return;
    if (const auto* m = merges_->find(s[left], s[next[left]])) {
      heap.push({m->rank, static_cast<size_t>(left), s[left], s[next[left]]});
    }
  };
  for (size_t i = 0; i + 1 < n; ++i) push(static_cast<int64_t>(i));
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    const int64_t right = next[c.left];
    if (!alive[c.left] || right < 0 || s[c.left] != c.left_id || s[right] != c.right_id) continue;  // stale
    s[c.left] = merges_->find(c.left_id, c.right_id)->merged;
    alive[right] = false;
    next[c.left] = next[right];
    if (next[right] >= 0) prev[next[right]] = static_cast<int64_t>(c.left);
    push(prev[c.left]);
    push(static_cast<int64_t>(c.left));
  }
  size_t w = 0;
  for (int64_t i = 0; i >= 0; i = next[i]) s[w++] = s[i];
  s.resize(w);
}

void ByteLevelBpe::encode_piece(std::string_view piece, std::vector<uint32_t>& out) const {
  PieceCache& cache = thread_cache();
  const uint64_t hash = fnv1a64(piece);
  uint32_t count = 0;
  if (const uint32_t* ids = cache.find(instance_, piece, hash, count)) {
    if (count == 1) out.push_back(ids[0]);  // most pieces are one token
    else out.insert(out.end(), ids, ids + count);
    return;
  }
  thread_local std::vector<uint32_t> symbols;
  symbols.resize(piece.size());
  for (size_t i = 0; i < piece.size(); ++i) symbols[i] = byte_to_id_[static_cast<uint8_t>(piece[i])];
  if (symbols.size() <= 48) merge_short(symbols);
  else merge_long(symbols);
  cache.insert(piece, hash, symbols.data(), static_cast<uint32_t>(symbols.size()));
  out.insert(out.end(), symbols.begin(), symbols.end());
}

void ByteLevelBpe::encode(std::string_view text, std::vector<uint32_t>& out) const {
  thread_local std::vector<std::string_view> pieces;
  pretokenizer_.split(text, pieces);
  // About one token per piece; growing geometrically, as callers appending several texts to
  // one vector (a conversation's runs between control tokens) would otherwise copy it each time.
  if (out.capacity() < out.size() + pieces.size()) out.reserve(std::max(2 * out.capacity(), out.size() + pieces.size()));
  for (const auto& piece : pieces) encode_piece(piece, out);
}

void ByteLevelBpe::add_tokens(const std::vector<std::string>& tokens) {
  for (const auto& token : tokens) {
    if (control_id(token)) throw Error("the token \"" + token + "\" is already in the vocabulary of " + source_.string());
    id_to_bytes_.push_back(token);
    token_lengths_.push_back(static_cast<uint32_t>(token.size()));
    added_.push_back(token);
  }
}

std::optional<uint32_t> ByteLevelBpe::control_id(std::string_view token) const {
  for (size_t i = 0; i < added_.size(); ++i) {
    if (added_[i] == token) return static_cast<uint32_t>(id_to_bytes_.size() - added_.size() + i);
  }
  if (eot_id_ && token == id_to_bytes_[*eot_id_]) return eot_id_;
  return std::nullopt;
}

std::string ByteLevelBpe::decode(const std::vector<uint32_t>& ids) const {
  std::string text;
  for (uint32_t id : ids) {
    if (id >= id_to_bytes_.size()) {
      throw Error("decode: token id " + std::to_string(id) + " is outside the vocabulary of " +
                  std::to_string(id_to_bytes_.size()));
    }
    text += id_to_bytes_[id];
  }
  return text;
}

}  // namespace gpt2ft
