// Chat templates: a conversation rendered to text the way transformers' apply_chat_template
// renders it, in a small, checked subset of Jinja.
//
// The subset (docs/chat.md has it with examples), with Jinja's trim_blocks and lstrip_blocks
// on, as transformers sets them:
//   text, {{ expr }}, {# comment #}, "-" and "+" whitespace control on any tag;
//   {% for NAME in expr %} ... {% endfor %}     loop.index, index0, revindex, revindex0,
//                                               first, last, length
//   {% if expr %} ... {% elif expr %} ... {% else %} ... {% endif %}
//   {% set NAME = expr %}
//   {% generation %} ... {% endgeneration %}    marks the text the assistant writes
// Expressions: 'strings' and "strings" (\n \t \\ \' \" escapes), integers, true/false/none,
// names, x.attr, x['key'], x[i] (negative counts from the end), x[a:b], ( ), A if C else B,
// or, and, not, == != < <= > >=, in, not in, + (strings, integers), ~, -,
// is [not] defined/none/string/number, filters | trim | length | upper | lower | string,
// methods .strip() .lstrip() .rstrip() .upper() .lower(), and raise_exception('why').
// Variables: messages (each with role and content), add_generation_prompt, and the strings a
// caller passes (bos_token, eos_token). Anything else is refused when the template is read,
// with its line and the construct named; nothing outside the subset is rendered approximately.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace gpt2ft {

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

// A stretch of rendered text. from_template: written by the template itself (its literals,
// bos_token, ...), where a control token's string is that token; otherwise it came from the
// conversation and is text whatever it holds. block: which {% generation %} block it is in
// (0, 1, ... in rendering order), -1 outside them.
struct ChatSpan {
  std::string text;
  bool from_template = true;
  int block = -1;
};

class ChatTemplate {
 public:
  // Parses a template; `where` names it in errors (a file, or a built-in's name).
  ChatTemplate(std::string source, std::string where);
  ~ChatTemplate();
  ChatTemplate(ChatTemplate&&) noexcept;
  ChatTemplate& operator=(ChatTemplate&&) noexcept;

  // The conversation as the template renders it, in order; adjacent spans of the same kind
  // are merged. Errors (raise_exception, a type mismatch) name the template and its line.
  std::vector<ChatSpan> render(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                               const std::map<std::string, std::string>& strings = {}) const;

  const std::string& source() const { return source_; }
  const std::string& where() const { return where_; }
  // Whether it marks assistant text with {% generation %} (assistant-only targets need it).
  bool marks_generation() const { return marks_generation_; }
  // The "<|...|>" strings the template writes (control tokens), in order of first appearance.
  std::vector<std::string> control_strings() const;

  struct Node;

 private:
  std::string source_, where_;
  bool marks_generation_ = false;
  std::vector<std::unique_ptr<Node>> body_;
};

// "plain" or "chatml" (built in), or the path of a template file.
ChatTemplate load_chat_template(const std::string& name_or_file);

// The built-in template's source, or nullptr for another name.
const char* builtin_chat_template(const std::string& name);

}  // namespace gpt2ft
