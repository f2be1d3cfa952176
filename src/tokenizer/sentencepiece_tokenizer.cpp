// SentencePiece through libsentencepiece.
#include "gpt2ft/tokenizer/sentencepiece_tokenizer.h"

#include <cstdio>
#include <fmt/format.h>
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <fstream>
#include <thread>
#include <unordered_map>

#include "gpt2ft/core/atomic_file.h"
#include "gpt2ft/core/error.h"

namespace gpt2ft {
namespace fs = std::filesystem;

SentencePieceTokenizer::SentencePieceTokenizer(const fs::path& model_file)
    : processor_(std::make_unique<sentencepiece::SentencePieceProcessor>()), source_(model_file) {
  const std::string bytes = read_text_file(model_file);
  const auto status = processor_->LoadFromSerializedProto(bytes);
  if (!status.ok()) {
    throw Error(model_file.string() + ": not a SentencePiece model (" + status.ToString() + ")");
  }
  identity_ = "sentencepiece:" + hex64(fnv1a64(bytes));
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

void SentencePieceTokenizer::encode(std::string_view text, std::vector<uint32_t>& out) const {
  std::vector<int> ids;
  const auto status = processor_->Encode(absl::string_view(text.data(), text.size()), &ids);
  if (!status.ok()) throw Error(source_.string() + ": encoding failed (" + status.ToString() + ")");
  out.insert(out.end(), ids.begin(), ids.end());
}

std::string SentencePieceTokenizer::decode(const std::vector<uint32_t>& ids) const {
  std::vector<int> signed_ids(ids.begin(), ids.end());
  for (int id : signed_ids) {
    if (id < 0 || id >= processor_->GetPieceSize()) {
      throw Error("decode: token id " + std::to_string(id) + " is outside the vocabulary of " +
                  std::to_string(processor_->GetPieceSize()));
    }
  }
  std::string text;
  const auto status = processor_->Decode(signed_ids, &text);
  if (!status.ok()) throw Error(source_.string() + ": decoding failed (" + status.ToString() + ")");
  return text;
}

int64_t SentencePieceTokenizer::vocab_size() const { return processor_->GetPieceSize(); }

std::optional<uint32_t> SentencePieceTokenizer::eot_id() const {
  const int id = processor_->eos_id();
  return id < 0 ? std::nullopt : std::optional<uint32_t>(static_cast<uint32_t>(id));
}

namespace {

// The inputs' lines, one sentence each (as SentencePiece's own file reader takes them), fed
// through its iterator interface: file paths never enter its flag parser, where a comma or a
// space in a path would name other files or inject flags.
class LinesOfFiles : public sentencepiece::SentenceIterator {
 public:
  explicit LinesOfFiles(const std::vector<fs::path>& files) : files_(files) { advance(); }
  bool done() const override { return done_; }
  void Next() override { advance(); }
  const std::string& value() const override { return line_; }
  sentencepiece::util::Status status() const override { return status_; }

 private:
  void advance() {
    while (!done_) {
      if (in_.is_open() && std::getline(in_, line_)) {
        if (!line_.empty() && line_.back() == '\r') line_.pop_back();
        return;
      }
      in_.close();
      if (next_ == files_.size()) {
        done_ = true;
        return;
      }
      in_.open(files_[next_], std::ios::binary);
      if (!in_) {
        status_ = sentencepiece::util::Status(sentencepiece::util::StatusCode::kNotFound,
                                              files_[next_].string() + ": cannot open");
        done_ = true;
        return;
      }
      ++next_;
    }
  }

  std::vector<fs::path> files_;
  size_t next_ = 0;
  std::ifstream in_;
  std::string line_;
  bool done_ = false;
  sentencepiece::util::Status status_;
};

}  // namespace

fs::path train_sentencepiece(const std::vector<fs::path>& inputs, const fs::path& output_prefix,
                             const SentencePieceTrainOptions& options) {
  if (inputs.empty()) throw Error("--train-sentencepiece: no input files");
  std::string input_list;
  for (const auto& in : inputs) {
    if (!fs::is_regular_file(in)) throw Error(in.string() + ": no such file");
    input_list += (input_list.empty() ? "" : ", ") + in.string();
  }
  const int threads = options.threads > 0 ? options.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  // Written beside the target under a temporary prefix, then renamed into place.
  const fs::path temp = output_prefix.parent_path() / ("." + output_prefix.filename().string() + ".tmp");
  const std::unordered_map<std::string, std::string> args = {
      {"model_prefix", temp.string()},
      {"vocab_size", std::to_string(options.vocab_size)},
      {"model_type", options.model_type},
      {"character_coverage", std::to_string(options.character_coverage)},
      {"input_sentence_size", std::to_string(options.max_sentences)},
      {"shuffle_input_sentence", "true"},
      {"num_threads", std::to_string(threads)},
      {"byte_fallback", "true"},
      {"minloglevel", "2"}};
  LinesOfFiles lines(inputs);
  const auto status = sentencepiece::SentencePieceTrainer::Train(args, &lines);
  if (!status.ok()) {
    // Its best-known refusal in our words (the text comes with SentencePiece's source line and check).
    const std::string text = status.ToString();
    long long asked = 0, needed = 0;
    const size_t at = text.find("Vocabulary size is smaller than required_chars.");
    if (at != std::string::npos && std::sscanf(text.c_str() + at, "Vocabulary size is smaller than required_chars. %lld vs %lld",
                                               &asked, &needed) == 2) {
      throw Error(fmt::format("--vocab-size {} is too small for this text: its characters and the special pieces "
                              "need {} pieces (with byte fallback's 256 bytes); use --vocab-size {} or more",
                              asked, needed, needed));
    }
    throw Error("training SentencePiece on " + input_list + ": " + text);
  }
  for (const char* ext : {".model", ".vocab"}) {
    fs::rename(temp.string() + ext, output_prefix.string() + ext);
  }
  fsync_directory(output_prefix.parent_path().empty() ? fs::path(".") : output_prefix.parent_path());
  return output_prefix.string() + ".model";
}

}  // namespace gpt2ft
