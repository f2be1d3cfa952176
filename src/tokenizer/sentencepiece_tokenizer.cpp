// SentencePiece through libsentencepiece.
#include "gpt2ft/tokenizer/sentencepiece_tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <thread>

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

fs::path train_sentencepiece(const std::vector<fs::path>& inputs, const fs::path& output_prefix,
                             const SentencePieceTrainOptions& options) {
  if (inputs.empty()) throw Error("--train-sentencepiece: no input files");
  std::string input_list;
  for (const auto& in : inputs) {
    if (!fs::exists(in)) throw Error(in.string() + ": no such file");
    input_list += (input_list.empty() ? "" : ",") + in.string();
  }
  const int threads = options.threads > 0 ? options.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  // Written beside the target under a temporary prefix, then renamed into place.
  const fs::path temp = output_prefix.parent_path() / ("." + output_prefix.filename().string() + ".tmp");
  const std::string args = "--input=" + input_list + " --model_prefix=" + temp.string() +
                           " --vocab_size=" + std::to_string(options.vocab_size) +
                           " --model_type=" + options.model_type +
                           " --character_coverage=" + std::to_string(options.character_coverage) +
                           " --input_sentence_size=" + std::to_string(options.max_sentences) +
                           " --shuffle_input_sentence=true --num_threads=" + std::to_string(threads) +
                           " --byte_fallback=true --minloglevel=2";
  const auto status = sentencepiece::SentencePieceTrainer::Train(args);
  if (!status.ok()) throw Error("training SentencePiece on " + input_list + ": " + status.ToString());
  for (const char* ext : {".model", ".vocab"}) {
    fs::rename(temp.string() + ext, output_prefix.string() + ext);
  }
  fsync_directory(output_prefix.parent_path().empty() ? fs::path(".") : output_prefix.parent_path());
  return output_prefix.string() + ".model";
}

}  // namespace gpt2ft
