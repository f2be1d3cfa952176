// Conversations to documents: a conversation read from one JSON line, rendered by a chat
// template and tokenized into ids and per-token targets, exactly as transformers'
// apply_chat_template(..., tokenize=True, return_assistant_tokens_mask=True) gives them,
// except that the conversation's own text never becomes a control token.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "gpt2ft/tokenizer/byte_level_bpe.h"
#include "gpt2ft/tokenizer/chat_template.h"

namespace gpt2ft {

// Which tokens are targets: the assistant's text and end-of-turn tokens (what the template
// marks with {% generation %}), every token, or the last assistant turn only.
enum class TrainOn { kAssistant, kAll, kLast };
TrainOn parse_train_on(const std::string& name);  // "assistant" | "all" | "last"

// Where a line keeps its conversation. The messages list (TRL's and OpenAI's "messages",
// ShareGPT's "conversations"), or TRL's conversational prompt/completion: two lists.
struct ConversationFields {
  std::string messages = "messages";
  std::string role = "role";
  std::string content = "content";
  std::string prompt = "prompt", completion = "completion";
};

struct Conversation {
  std::vector<ChatMessage> messages;
  size_t completion_start = 0;  // prompt/completion form: the first completion message
};

// The conversation of one parsed line. Roles are system, user and assistant (ShareGPT's
// human and gpt stand for user and assistant). An Error names `where` (file:line), the
// message's index and what is wrong: another role, content missing or not a string, no
// messages, no assistant turn (unless !require_assistant: a conversation to continue). The
// messages' text is moved out of `line`.
Conversation read_conversation(nlohmann::json& line, const ConversationFields& fields, const std::string& where,
                               bool require_assistant = true);

struct ChatDocument {
  std::vector<uint32_t> ids;
  std::vector<uint8_t> targets;  // per token: 1 = predicted and counted in the loss
};

// Renders and tokenizes conversations with one template and tokenizer (thread-safe).
class ChatEncoder {
 public:
  // Every control string the template writes must be a token of `tokenizer` (its
  // "<|endoftext|>" or an added token); assistant-only targets need {% generation %} tags.
  ChatEncoder(const ChatTemplate& chat_template, const ByteLevelBpe& tokenizer, TrainOn train_on);

  ChatDocument encode(const Conversation& conversation, bool add_generation_prompt = false) const;
  // The template's text as it renders a conversation (the strings a template reads besides
  // the messages: bos_token, eos_token).
  std::vector<ChatSpan> render(const Conversation& conversation, bool add_generation_prompt) const;

 private:
  const ChatTemplate& template_;
  const ByteLevelBpe& tokenizer_;
  TrainOn train_on_;
  std::vector<std::pair<std::string, uint32_t>> controls_;  // string -> id, longest first
};

// The tokenizer as GPT-2 byte-level BPE, which chat templates need; an Error naming `flag`
// (the option that asked for a template) and what the tokenizer is otherwise.
const ByteLevelBpe& chat_tokenizer(const Tokenizer& tokenizer, const std::string& flag);
ByteLevelBpe& chat_tokenizer(Tokenizer& tokenizer, const std::string& flag);

// The control token that ends an assistant turn: the last one the template writes inside
// {% generation %} ("<|im_end|>" for chatml, "<|endoftext|>" for plain); "" when none.
std::string end_of_turn_token(const ChatTemplate& chat_template);

// The control strings of `chat_template` the tokenizer lacks: the tokens to add.
std::vector<std::string> missing_control_tokens(const ChatTemplate& chat_template, const ByteLevelBpe& tokenizer);

}  // namespace gpt2ft
