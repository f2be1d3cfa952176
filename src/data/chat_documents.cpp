// Conversations to documents.
#include "gpt2ft/data/chat_documents.h"

#include <algorithm>

#include <nlohmann/json.hpp>

#include "gpt2ft/core/error.h"

namespace gpt2ft {
namespace {

// GPT-2's end of text doubles as the template's bos_token and eos_token, as transformers
// passes them from GPT-2's tokenizer.
const std::map<std::string, std::string> kTemplateStrings = {{"bos_token", "<|endoftext|>"},
                                                             {"eos_token", "<|endoftext|>"}};

// Appends the messages of a JSON list; `what` names the list in errors ("messages").
void read_messages(nlohmann::json& list, const std::string& what, const ConversationFields& f,
                   const std::string& where, std::vector<ChatMessage>& out) {
  if (!list.is_array()) {
    throw Error(where + ": \"" + what + "\" is " + list.type_name() + ", expected a list of messages");
  }
  for (size_t i = 0; i < list.size(); ++i) {
    const std::string at = where + ": " + what + "[" + std::to_string(i) + "]";
    nlohmann::json& m = list[i];
    if (!m.is_object()) throw Error(at + " is " + m.type_name() + ", expected an object with \"" + f.role + "\" and \"" + f.content + "\"");
    if (!m.contains(f.role) || !m[f.role].is_string()) {
      throw Error(at + ": no \"" + f.role + "\" string" + (m.contains(f.role) ? std::string(" (it is ") + m[f.role].type_name() + ")" : "") +
                  "; name the role field with --role-field");
    }
    std::string role = m[f.role].get<std::string>();
    if (role == "human") role = "user";  // ShareGPT's names
    if (role == "gpt") role = "assistant";
    if (role != "system" && role != "user" && role != "assistant") {
      // Echoed as JSON (a newline as \n): the error stays one line.
      throw Error(at + ": the role " + m[f.role].dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) +
                  " is not one of system, user, assistant (ShareGPT's human and gpt are read as user and assistant)");
    }
    if (!m.contains(f.content)) throw Error(at + ": no \"" + f.content + "\" field; name it with --content-field");
    if (!m[f.content].is_string()) {
      throw Error(at + ": \"" + f.content + "\" is " + m[f.content].type_name() + ", expected a string");
    }
    out.push_back({std::move(role), std::move(m[f.content].get_ref<std::string&>())});
  }
}

bool has_assistant(const std::vector<ChatMessage>& messages, size_t from) {
  return std::any_of(messages.begin() + static_cast<std::ptrdiff_t>(from), messages.end(),
                     [](const ChatMessage& m) { return m.role == "assistant"; });
}

}  // namespace

TrainOn parse_train_on(const std::string& name) {
  if (name == "assistant") return TrainOn::kAssistant;
  if (name == "all") return TrainOn::kAll;
  if (name == "last") return TrainOn::kLast;
  throw Error("--train-on: expected assistant, all or last, got \"" + name + "\"");
}

Conversation read_conversation(nlohmann::json& line, const ConversationFields& f, const std::string& where,
                               bool require_assistant) {
  Conversation c;
  if (line.is_object() && line.contains(f.messages)) {
    read_messages(line[f.messages], f.messages, f, where, c.messages);
  } else if (line.is_object() && line.contains(f.prompt) && line.contains(f.completion)) {
    read_messages(line[f.prompt], f.prompt, f, where, c.messages);
    c.completion_start = c.messages.size();
    read_messages(line[f.completion], f.completion, f, where, c.messages);
    if (!has_assistant(c.messages, c.completion_start)) {
      throw Error(where + ": \"" + f.completion + "\" has no assistant message; there would be nothing to learn");
    }
  } else {
    throw Error(where + ": expected an object with a \"" + f.messages + "\" list (or \"" + f.prompt + "\" and \"" +
                f.completion + "\" lists), found " +
                (line.is_object() ? "the fields " + [&] {
                  std::string keys;
                  for (const auto& [k, v] : line.items()) keys += (keys.empty() ? "\"" : ", \"") + k + "\"";
                  return keys.empty() ? std::string("none") : keys;
                }() : std::string(line.type_name())) +
                "; name the list with --messages-field");
  }
  if (c.messages.empty()) throw Error(where + ": \"" + f.messages + "\" is an empty conversation");
  if (require_assistant && !has_assistant(c.messages, 0)) {
    throw Error(where + ": the conversation has no assistant message; there would be nothing to learn");
  }
  return c;
}

const ByteLevelBpe& chat_tokenizer(const Tokenizer& tokenizer, const std::string& flag) {
  const auto* bpe = dynamic_cast<const ByteLevelBpe*>(&tokenizer);
  if (!bpe) {
    throw Error(flag + ": chat templates need a GPT-2 byte-level BPE tokenizer (vocab.json + merges.txt); " +
                tokenizer.source().string() + " is " + tokenizer.kind());
  }
  return *bpe;
}

ByteLevelBpe& chat_tokenizer(Tokenizer& tokenizer, const std::string& flag) {
  return const_cast<ByteLevelBpe&>(chat_tokenizer(static_cast<const Tokenizer&>(tokenizer), flag));
}

std::string end_of_turn_token(const ChatTemplate& chat_template) {
  std::vector<std::string> controls = chat_template.control_strings();
  for (const auto& [name, value] : kTemplateStrings) controls.push_back(value);
  const std::vector<ChatSpan> spans =
      chat_template.render({{"user", "Hi"}, {"assistant", "Hello"}}, false, kTemplateStrings);
  std::string last;
  for (const ChatSpan& span : spans) {
    if (span.block < 0 || !span.from_template) continue;
    size_t best = std::string::npos;
    for (const auto& c : controls) {  // the one that ends last in this span
      const size_t at = span.text.rfind(c);
      if (at != std::string::npos && (best == std::string::npos || at + c.size() > best)) best = at + c.size(), last = c;
    }
  }
  return last;
}

std::vector<std::string> missing_control_tokens(const ChatTemplate& chat_template, const ByteLevelBpe& tokenizer) {
  std::vector<std::string> missing;
  for (const auto& s : chat_template.control_strings()) {
    if (!tokenizer.control_id(s)) missing.push_back(s);
  }
  return missing;
}

ChatEncoder::ChatEncoder(const ChatTemplate& chat_template, const ByteLevelBpe& tokenizer, TrainOn train_on)
    : template_(chat_template), tokenizer_(tokenizer), train_on_(train_on) {
  for (const auto& s : chat_template.control_strings()) {
    const auto id = tokenizer.control_id(s);
    if (!id) {
      throw Error(chat_template.where() + ": writes the control token " + s + ", which the tokenizer " +
                  tokenizer.source().string() + " does not have");
    }
    controls_.push_back({s, *id});
  }
  for (const auto& [name, value] : kTemplateStrings) {  // bos_token and eos_token: one string, once
    const bool listed = std::any_of(controls_.begin(), controls_.end(), [&](const auto& c) { return c.first == value; });
    if (const auto id = tokenizer.control_id(value); id && !listed) controls_.push_back({value, *id});
  }
  std::sort(controls_.begin(), controls_.end(), [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  if (train_on != TrainOn::kAll && !chat_template.marks_generation()) {
    throw Error(chat_template.where() + ": marks no assistant text with {% generation %} ... {% endgeneration %}, so "
                "assistant-only targets would be empty; add the tags around each assistant turn's content and end of "
                "turn (docs/chat.md), or pass --train-on all");
  }
}

std::vector<ChatSpan> ChatEncoder::render(const Conversation& conversation, bool add_generation_prompt) const {
  return template_.render(conversation.messages, add_generation_prompt, kTemplateStrings);
}

ChatDocument ChatEncoder::encode(const Conversation& conversation, bool add_generation_prompt) const {
  const std::vector<ChatSpan> spans = render(conversation, add_generation_prompt);
  // The {% generation %} blocks whose tokens are targets: all, the last, or in the
  // prompt/completion form those of the completion (block k is the k-th assistant turn).
  int first_block = 0;
  if (train_on_ == TrainOn::kLast) {
    for (const auto& s : spans) first_block = std::max(first_block, s.block);
  } else if (conversation.completion_start > 0) {
    first_block = static_cast<int>(std::count_if(conversation.messages.begin(),
                                                 conversation.messages.begin() + static_cast<std::ptrdiff_t>(conversation.completion_start),
                                                 [](const ChatMessage& m) { return m.role == "assistant"; }));
  }
  const bool all = train_on_ == TrainOn::kAll;
  ChatDocument doc;
  std::string run;                                   // text since the last control token
  std::vector<std::pair<size_t, size_t>> marked;     // its byte ranges that are targets
  const auto flush = [&] {  // a token is a target when its bytes overlap a marked range
    const size_t first = doc.ids.size();
    tokenizer_.encode(run, doc.ids);
    size_t offset = 0, r = 0;
    for (size_t t = first; t < doc.ids.size(); ++t) {
      const size_t end = offset + tokenizer_.token_length(doc.ids[t]);
      while (r < marked.size() && marked[r].second <= offset) ++r;
      doc.targets.push_back(all || (r < marked.size() && marked[r].first < end));
      offset = end;
    }
    run.clear();
    marked.clear();
  };
  const auto add_text = [&](std::string_view text, bool target) {
    if (target && !text.empty()) {
      if (!marked.empty() && marked.back().second == run.size()) marked.back().second += text.size();
      else marked.push_back({run.size(), run.size() + text.size()});
    }
    run += text;
  };
  for (const ChatSpan& span : spans) {
    const bool target = span.block >= 0 && span.block >= first_block;
    if (!span.from_template) {  // the conversation's text: never a control token
      add_text(span.text, target);
      continue;
    }
    std::string_view text = span.text;
    while (!text.empty()) {
      size_t at = std::string_view::npos;
      const std::pair<std::string, uint32_t>* control = nullptr;
      for (const auto& c : controls_) {  // leftmost, then longest
        const size_t found = text.find(c.first);
        if (found < at) at = found, control = &c;
      }
      add_text(text.substr(0, at), target);
      if (!control) break;
      flush();
      doc.ids.push_back(control->second);
      doc.targets.push_back(all || target);
      text.remove_prefix(at + control->first.size());
    }
  }
  flush();
  if (!doc.targets.empty()) doc.targets[0] = 0;  // nothing comes before the first token to predict it
  return doc;
}

}  // namespace gpt2ft
