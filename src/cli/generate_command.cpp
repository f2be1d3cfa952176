// gpt2-finetune generate: continue a prompt with a model folder and its tokenizer.
#include <algorithm>
#include <cstdio>
#include <iostream>
#include <limits>
#include <memory>
#include <sstream>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "gpt2ft/core/device.h"
#include "gpt2ft/core/error.h"
#include "gpt2ft/core/json.h"
#include "gpt2ft/data/chat_documents.h"
#include "gpt2ft/io/model_folder.h"
#include "gpt2ft/model/generate.h"
#include "gpt2ft/model/lora.h"
#include "gpt2ft/tokenizer/byte_level_bpe.h"
#include "gpt2ft/tokenizer/chat_template.h"
#include "gpt2ft/tokenizer/tokenizer.h"

namespace gpt2ft::cli {
namespace fs = std::filesystem;

namespace {

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    // Whole items only: std::stoll alone reads "1.5" as 1 and "0x10" as 0.
    const size_t first = item.find_first_not_of(' ');
    const size_t last = item.find_last_not_of(' ');
    const std::string digits = first == std::string::npos ? "" : item.substr(first, last - first + 1);
    if (digits.empty() || digits.size() > 12 || digits.find_first_not_of("0123456789") != std::string::npos) {
      throw Error("--prompt-ids: expected comma-separated token ids (non-negative integers), got \"" + item + "\"");
    }
    ids.push_back(std::stoll(digits));
  }
  return ids;
}
// A flag whose whole value is a number accepted by `ok` (NaN fails every comparison, so it
// is refused by a range test): CLI11's Range lets NaN through.
template <class Accept>
CLI::Validator number_in(Accept ok, const std::string& expected) {
  return CLI::Validator(
      [ok, expected](std::string& v) -> std::string {
        try {
          size_t used = 0;
          const double x = std::stod(v, &used);
          if (used == v.size() && ok(x)) return "";
        } catch (const std::exception&) {
        }
        return "expected " + expected + ", got " + v;
      },
      expected);
}

struct GenerateArgs {
  std::string model, adapter, prompt, prompt_ids, messages, device = "auto";
  GenerateOptions options;
  bool json = false, no_stop = false, chat = false;
};

// The folder whose tokenizer (and chat template) goes with the model: an adapter folder that
// carries tokenizer files (a chat template's added tokens live there), else the model's.
fs::path tokenizer_folder(const GenerateArgs& a) {
  if (!a.adapter.empty() && folder_has_tokenizer(a.adapter)) return a.adapter;
  return a.model;
}

// The chat template a model folder carries: chat_template.jinja, or tokenizer_config.json's
// "chat_template" string.
ChatTemplate folder_chat_template(const fs::path& dir) {
  if (fs::exists(dir / "chat_template.jinja")) return load_chat_template((dir / "chat_template.jinja").string());
  const fs::path config = dir / "tokenizer_config.json";
  if (fs::exists(config)) {
    const nlohmann::json j = read_json_file(config.string());
    if (j.is_object() && j.contains("chat_template") && j["chat_template"].is_string()) {
      return ChatTemplate(j["chat_template"].get<std::string>(), config.string() + " (chat_template)");
    }
  }
  throw Error(dir.string() + ": no chat template (chat_template.jinja or tokenizer_config.json's chat_template); "
              "a model trained on conversations (tokenize --chat-template) carries one. Drop --chat to continue "
              "plain text");
}

// --chat: the conversation (--messages FILE, or --prompt as one user message) rendered with
// the folder's template and its generation prompt; stops at the end of a turn too.
std::vector<int64_t> chat_prompt(const GenerateArgs& a, const Tokenizer& tokenizer, GenerateOptions& o) {
  const ByteLevelBpe* bpe = &chat_tokenizer(tokenizer, "--chat");
  const ChatTemplate chat_template = folder_chat_template(tokenizer_folder(a));
  Conversation conversation;
  if (!a.messages.empty()) {
    nlohmann::json j = read_json_file(a.messages);
    if (j.is_array()) j = nlohmann::json{{"messages", j}};
    conversation = read_conversation(j, ConversationFields{}, a.messages, /*require_assistant=*/false);
  } else {
    conversation.messages.push_back({"user", a.prompt});
  }
  const ChatEncoder encoder(chat_template, *bpe, TrainOn::kAll);
  const ChatDocument doc = encoder.encode(conversation, /*add_generation_prompt=*/true);
  if (const auto end = bpe->control_id(end_of_turn_token(chat_template)); end && !a.no_stop) {
    o.stop_tokens.push_back(*end);
  }
  return {doc.ids.begin(), doc.ids.end()};
}

int run_generate(const GenerateArgs& a) {
  GPT2 model = load_model_folder(a.model, open_device(a.device));
  if (!a.adapter.empty()) attach_adapter_folder(model, a.adapter);
  std::unique_ptr<Tokenizer> tokenizer;
  if (folder_has_tokenizer(tokenizer_folder(a))) tokenizer = load_tokenizer(tokenizer_folder(a));
  GenerateOptions o = a.options;
  std::vector<int64_t> prompt;
  if (!a.prompt_ids.empty()) {
    prompt = parse_ids(a.prompt_ids);
  } else if (!tokenizer) {
    throw Error(a.model + ": the model folder has no tokenizer files for --prompt; copy them in "
                          "(vocab.json + merges.txt or tokenizer.model) or pass --prompt-ids");
  } else if (a.chat) {
    prompt = chat_prompt(a, *tokenizer, o);
  } else {
    for (uint32_t id : tokenizer->encode(a.prompt)) prompt.push_back(id);
  }
  if (tokenizer && !a.no_stop && tokenizer->eot_id()) o.stop_tokens.push_back(*tokenizer->eot_id());
  const std::vector<int64_t> out = generate(model, prompt, o);
  std::string text, reply;
  if (tokenizer) {
    std::vector<uint32_t> all(prompt.begin(), prompt.end());
    all.insert(all.end(), out.begin(), out.end());
    text = tokenizer->decode(all);
    std::vector<uint32_t> answer(out.begin(), out.end());
    if (!answer.empty() && std::find(o.stop_tokens.begin(), o.stop_tokens.end(), answer.back()) != o.stop_tokens.end()) {
      answer.pop_back();  // the end of the turn is not part of the reply
    }
    reply = tokenizer->decode(answer);
  }
  if (a.json) {
    nlohmann::json j = {{"prompt_ids", prompt}, {"ids", out}, {"text", text}};
    if (a.chat) j["reply"] = reply;
    std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
  } else if (tokenizer) {
    std::cout << (a.chat ? reply : text) << std::endl;
  } else {
    for (size_t i = 0; i < out.size(); ++i) std::cout << (i ? "," : "") << out[i];
    std::cout << std::endl;
  }
  return kExitOk;
}

}  // namespace

void add_generate_command(CLI::App& app, Runner& run) {
  using Args = GenerateArgs;
  auto args = std::make_shared<Args>();
  CLI::App* cmd = app.add_subcommand("generate", "Continue a prompt with a model (KV-cached sampling)");
  cmd->add_option("--model", args->model, "Model folder (with its tokenizer files for --prompt)")->required();
  cmd->add_option("--adapter", args->adapter, "A LoRA adapter folder (PEFT's format) to put on the model");
  auto* prompt = cmd->add_option("--prompt", args->prompt, "Prompt text");
  auto* ids = cmd->add_option("--prompt-ids", args->prompt_ids, "Prompt as token ids: 1,2,3");
  prompt->excludes(ids);
  cmd->add_option("--max-new-tokens", args->options.max_new_tokens, "Tokens to generate")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  cmd->add_option("--temperature", args->options.temperature, "Sampling temperature; 0 = greedy, else in [0.001, 100]")
      ->capture_default_str()
      // Below 1e-3 the logits divided by it overflow float32 and sampling turns to NaN.
      ->check(number_in([](double t) { return t == 0 || (t >= 1e-3 && t <= 100); },
                        "0 (greedy) or a number in [0.001, 100]"));
  cmd->add_option("--top-k", args->options.top_k, "Sample among the k most likely tokens; 0 = all")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--top-p", args->options.top_p, "Nucleus sampling mass in (0, 1]; 1 = off")
      ->capture_default_str()
      ->check(number_in([](double p) { return p > 0 && p <= 1; }, "a number in (0, 1]"));
  cmd->add_option("--seed", args->options.seed, "Sampling seed")
      ->capture_default_str()
      ->check(CLI::Range(uint64_t{0}, std::numeric_limits<uint64_t>::max() >> 1));  // 2^64 would wrap to 0
  cmd->add_option("--device", args->device, "auto | cpu | cuda | cuda:N")->capture_default_str();
  cmd->add_flag("--no-stop", args->no_stop, "Do not stop at the end-of-text token");
  cmd->add_flag("--json", args->json, "Print {\"prompt_ids\", \"ids\", \"text\"} as the last line");
  cmd->add_flag("--chat", args->chat,
                "Answer as the assistant: the conversation (--messages, or --prompt as one user message) rendered "
                "with the model's chat template; stops at the end of the turn and prints the reply");
  cmd->add_option("--messages", args->messages,
                  "With --chat: a JSON file holding the conversation ({\"messages\": [...]} or the list itself)");
  cmd->callback([args, &run] {
    if (args->prompt.empty() && args->prompt_ids.empty() && args->messages.empty()) {
      throw CLI::RequiredError("generate needs --prompt, --prompt-ids or (with --chat) --messages");
    }
    if (!args->messages.empty() && !args->chat) throw CLI::ValidationError("--messages", "goes with --chat");
    if (args->chat && !args->prompt_ids.empty()) throw CLI::ValidationError("--chat", "takes --prompt or --messages");
    if (args->chat && !args->prompt.empty() && !args->messages.empty()) {
      throw CLI::ValidationError("--chat", "takes --prompt or --messages, not both");
    }
    run = [args] { return run_generate(*args); };
  });
}

}  // namespace gpt2ft::cli
