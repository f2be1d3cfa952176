// The Jinja subset of chat templates: a lexer that applies Jinja's whitespace rules, a parser
// to a small tree, and an evaluator whose strings remember where each part came from.
#include "gpt2ft/tokenizer/chat_template.h"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <deque>
#include <string_view>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "gpt2ft/core/error.h"

namespace gpt2ft {
namespace {

// ---------------------------------------------------------------- values

// Part of a string value: from the template (a literal, bos_token) or from the conversation.
// A view: into the template's literals, the conversation, the caller's strings or the
// renderer's own storage, all of which outlive the rendering.
struct Segment {
  std::string_view text;
  bool from_template = true;
};

struct Value {
  enum Kind { kUndefined, kNone, kBool, kInt, kString, kMessages, kMessage, kLoop } kind = kUndefined;
  bool boolean = false;
  int64_t integer = 0;
  std::vector<Segment> segments;  // kString
  const std::vector<ChatMessage>* messages = nullptr;  // kMessages: [begin, end) of it
  size_t begin = 0, end = 0;
  const ChatMessage* message = nullptr;  // kMessage
  int64_t index0 = 0, length = 0;        // kLoop

  static Value none() { return with_kind(kNone); }
  static Value of(bool b) {
    Value v = with_kind(kBool);
    v.boolean = b;
    return v;
  }
  static Value of(int64_t i) {
    Value v = with_kind(kInt);
    v.integer = i;
    return v;
  }
  static Value text(std::string_view s, bool from_template) {
    Value v = with_kind(kString);
    v.segments.push_back({s, from_template});
    return v;
  }
  static Value with_kind(Kind k) {
    Value v;
    v.kind = k;
    return v;
  }
  std::string str() const {
    std::string out;
    for (const auto& s : segments) out += s.text;
    return out;
  }
  bool empty_text() const {
    for (const auto& s : segments) {
      if (!s.text.empty()) return false;
    }
    return true;
  }
};

// Whether two string values hold the same text (without joining the usual single segments).
bool same_text(const Value& a, const Value& b) {
  if (a.segments.size() <= 1 && b.segments.size() <= 1) {
    const std::string_view x = a.segments.empty() ? std::string_view() : a.segments[0].text;
    const std::string_view y = b.segments.empty() ? std::string_view() : b.segments[0].text;
    return x == y;
  }
  return a.str() == b.str();
}

const char* kind_name(const Value& v) {
  switch (v.kind) {
    case Value::kUndefined: return "undefined";
    case Value::kNone: return "none";
    case Value::kBool: return "a boolean";
    case Value::kInt: return "an integer";
    case Value::kString: return "a string";
    case Value::kMessages: return "the list of messages";
    case Value::kMessage: return "a message";
    case Value::kLoop: return "loop";
  }
  return "?";
}

bool truthy(const Value& v) {
  switch (v.kind) {
    case Value::kBool: return v.boolean;
    case Value::kInt: return v.integer != 0;
    case Value::kString: return !v.empty_text();
    case Value::kMessages: return v.end > v.begin;
    case Value::kMessage:
    case Value::kLoop: return true;
    default: return false;
  }
}

// Jinja's == between the kinds a chat template compares.
bool equal(const Value& a, const Value& b) {
  if (a.kind == Value::kString && b.kind == Value::kString) return same_text(a, b);
  if ((a.kind == Value::kInt || a.kind == Value::kBool) && (b.kind == Value::kInt || b.kind == Value::kBool)) {
    return (a.kind == Value::kInt ? a.integer : a.boolean) == (b.kind == Value::kInt ? b.integer : b.boolean);
  }
  if (a.kind == Value::kMessage && b.kind == Value::kMessage) return a.message == b.message;
  return (a.kind == Value::kNone && b.kind == Value::kNone) || (a.kind == Value::kUndefined && b.kind == Value::kUndefined);
}

// Strips Python's whitespace from the ends of a string value, across its segments.
void strip(std::vector<Segment>& segments, bool left, bool right) {
  const auto is_space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; };
  if (left) {
    for (auto it = segments.begin(); it != segments.end();) {
      while (!it->text.empty() && is_space(it->text.front())) it->text.remove_prefix(1);
      if (!it->text.empty()) break;
      it = segments.erase(it);
    }
  }
  if (right) {
    while (!segments.empty()) {
      std::string_view& t = segments.back().text;
      while (!t.empty() && is_space(t.back())) t.remove_suffix(1);
      if (!t.empty()) break;
      segments.pop_back();
    }
  }
}

// ---------------------------------------------------------------- expressions

struct Expr {
  enum Op {
    kLiteral, kName, kAttr, kIndex, kSlice, kFilter, kMethod, kCall, kTest,
    kNot, kNeg, kAnd, kOr, kEq, kNe, kLt, kLe, kGt, kGe, kIn, kNotIn, kAdd, kSub, kConcat, kTernary
  } op;
  Value literal;
  std::string literal_text;  // a string literal's characters, which `literal` views
  std::string name;  // kName, kAttr, kFilter, kMethod, kCall, kTest
  bool negated = false;  // kTest: "is not"
  std::vector<std::unique_ptr<Expr>> args;
  int line = 0;
};
using ExprPtr = std::unique_ptr<Expr>;

ExprPtr make(Expr::Op op, int line, std::vector<ExprPtr> args = {}, std::string name = {}) {
  auto e = std::make_unique<Expr>();
  e->op = op;
  e->line = line;
  e->args = std::move(args);
  e->name = std::move(name);
  return e;
}

std::vector<ExprPtr> two(ExprPtr a, ExprPtr b) {
  std::vector<ExprPtr> v;
  v.push_back(std::move(a));
  v.push_back(std::move(b));
  return v;
}

struct Token {
  enum Kind { kName, kString, kInt, kOp, kEnd } kind = kEnd;
  std::string text;
};

}  // namespace

// ---------------------------------------------------------------- statements

struct ChatTemplate::Node {
  enum Kind { kText, kOutput, kIf, kFor, kSet, kGeneration } kind;
  std::string text;                      // kText
  ExprPtr expr;                          // kOutput, kFor (the sequence), kSet
  std::string name;                      // kFor (the variable), kSet
  std::vector<ExprPtr> conditions;       // kIf: one per branch (else: none)
  std::vector<std::vector<std::unique_ptr<Node>>> bodies;  // kIf: one per branch (+ else); others: one
  int line = 0;
};

namespace {

using Node = ChatTemplate::Node;
using Body = std::vector<std::unique_ptr<Node>>;

// ---------------------------------------------------------------- lexing

// A tag's inside as tokens: names, strings, integers and operators.
class ExprLexer {
 public:
  ExprLexer(const std::string& text, const std::string& where, int line) : where_(where), line_(line) {
    size_t i = 0;
    while (i < text.size()) {
      const char c = text[i];
      if (std::isspace(static_cast<unsigned char>(c))) {
        ++i;
      } else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t j = i;
        while (j < text.size() && (std::isalnum(static_cast<unsigned char>(text[j])) || text[j] == '_')) ++j;
        tokens_.push_back({Token::kName, text.substr(i, j - i)});
        i = j;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t j = i;
        while (j < text.size() && std::isdigit(static_cast<unsigned char>(text[j]))) ++j;
        tokens_.push_back({Token::kInt, text.substr(i, j - i)});
        i = j;
      } else if (c == '\'' || c == '"') {
        i = read_string(text, i);
      } else {
        static const char* kOps[] = {"==", "!=", "<=", ">=", "<", ">", "(", ")", "[", "]", ".", ",", ":",
                                     "|", "+", "-", "~", "="};
        const char* found = nullptr;
        for (const char* op : kOps) {
          if (text.compare(i, std::char_traits<char>::length(op), op) == 0) {
            found = op;
            break;
          }
        }
        if (!found) fail(std::string("the character '") + c + "'");
        tokens_.push_back({Token::kOp, found});
        i += std::char_traits<char>::length(found);
      }
    }
  }

  const Token& peek(size_t ahead = 0) const {
    static const Token end;
    return pos_ + ahead < tokens_.size() ? tokens_[pos_ + ahead] : end;
  }
  Token next() { return pos_ < tokens_.size() ? tokens_[pos_++] : Token{}; }
  bool accept(Token::Kind kind, const std::string& text) {
    if (peek().kind != kind || peek().text != text) return false;
    ++pos_;
    return true;
  }
  void expect(Token::Kind kind, const std::string& text) {
    if (!accept(kind, text)) fail("'" + peek().text + "' where '" + text + "' was expected");
  }
  bool at_end() const { return pos_ >= tokens_.size(); }
  [[noreturn]] void fail(const std::string& what) const {
    throw Error(where_ + ":" + std::to_string(line_) + ": " + what +
                " is outside the chat-template subset of Jinja gpt2-finetune reads (docs/chat.md lists it)");
  }
  int line() const { return line_; }

 private:
  size_t read_string(const std::string& text, size_t i) {
    const char quote = text[i++];
    std::string value;
    while (i < text.size() && text[i] != quote) {
      if (text[i] == '\\' && i + 1 < text.size()) {
        const char e = text[++i];
        const std::string known = "nt\\'\"r";
        if (known.find(e) == std::string::npos) fail(std::string("the escape \\") + e);
        value += e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
      } else {
        value += text[i];
      }
      ++i;
    }
    if (i >= text.size()) throw Error(where_ + ":" + std::to_string(line_) + ": a string that is never closed");
    tokens_.push_back({Token::kString, value});
    return i + 1;
  }

  std::string where_;
  int line_;
  std::vector<Token> tokens_;
  size_t pos_ = 0;
};

// One piece of the template: text, or a tag with its kind ('{', '%', '#') and its inside.
struct Piece {
  char tag = 0;  // 0 text
  std::string text;
  int line = 1;
};

// Splits the source into text and tags with Jinja's whitespace rules: "-" strips all white
// space on its side, trim_blocks drops the newline after a block or comment tag (unless
// "+%}"), lstrip_blocks drops the spaces and tabs before one alone at a line's start
// (unless "{%+").
std::vector<Piece> lex(const std::string& source_in, const std::string& where) {
  static const char* kSpace = " \t\r\n\f\v";
  std::string source = source_in;
  if (!source.empty() && source.back() == '\n') source.pop_back();  // keep_trailing_newline off
  const auto line_at = [&](size_t pos) {
    return 1 + static_cast<int>(std::count(source.begin(), source.begin() + static_cast<std::ptrdiff_t>(pos), '\n'));
  };
  std::vector<Piece> pieces;
  size_t i = 0;
  bool line_starting = true;  // the text at i starts a line
  for (;;) {
    size_t open = i;
    while ((open = source.find('{', open)) != std::string::npos &&
           (open + 1 >= source.size() || std::string("{%#").find(source[open + 1]) == std::string::npos)) {
      ++open;
    }
    std::string text = source.substr(i, open == std::string::npos ? std::string::npos : open - i);
    if (open == std::string::npos) {
      if (!text.empty()) pieces.push_back({0, text, line_at(i)});
      return pieces;
    }
    const char kind = source[open + 1];
    size_t inner = open + 2;
    const char left = inner < source.size() ? source[inner] : 0;
    if (left == '-' || left == '+') ++inner;
    if (left == '-') {
      const size_t keep = text.find_last_not_of(kSpace);
      text.erase(keep == std::string::npos ? 0 : keep + 1);
    } else if (kind != '{' && left != '+') {
      const size_t from = text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1;
      if ((from > 0 || line_starting) && text.find_first_not_of(" \t", from) == std::string::npos) text.erase(from);
    }
    if (!text.empty()) pieces.push_back({0, text, line_at(i)});
    // The tag's end, outside strings for expressions and statements.
    const char close = kind == '{' ? '}' : kind;
    size_t j = inner;
    char quote = 0;
    for (; j + 1 < source.size(); ++j) {
      const char c = source[j];
      if (quote) {
        if (c == '\\') ++j;
        else if (c == quote) quote = 0;
      } else if (kind != '#' && (c == '\'' || c == '"')) {
        quote = c;
      } else if (c == close && source[j + 1] == '}') {
        break;
      }
    }
    if (j + 1 >= source.size()) {
      throw Error(where + ":" + std::to_string(line_at(open)) + ": the tag \"{" + std::string(1, kind) +
                  "\" opened here is never closed");
    }
    size_t inner_end = j;
    const char right = inner_end > inner ? source[inner_end - 1] : 0;
    if (right == '-' || right == '+') --inner_end;
    if (kind != '#') pieces.push_back({kind, source.substr(inner, inner_end - inner), line_at(open)});
    i = j + 2;
    const size_t after = i;
    if (right == '-') {
      while (i < source.size() && source[i] != '\0' && std::strchr(kSpace, source[i])) ++i;
    } else if (kind != '{' && right != '+' && i < source.size() && source[i] == '\n') {
      ++i;
    }
    line_starting = i > after && source[i - 1] == '\n';
  }
}

// ---------------------------------------------------------------- parsing

class Parser {
 public:
  Parser(const std::vector<Piece>& pieces, const std::string& where) : pieces_(pieces), where_(where) {}

  Body parse_all(bool& marks_generation) {
    Body body = parse_body({});
    if (pos_ < pieces_.size()) {
      const Piece& p = pieces_[pos_];
      throw Error(where_ + ":" + std::to_string(p.line) + ": {% " + first_word(p.text) + " %} has no block it closes");
    }
    marks_generation = marks_generation_;
    return body;
  }

 private:
  static std::string first_word(const std::string& s) {
    std::istringstream in(s);
    std::string w;
    in >> w;
    return w;
  }

  // Nodes up to (not including) a statement whose first word is in `stops`.
  Body parse_body(const std::vector<std::string>& stops) {
    Body body;
    while (pos_ < pieces_.size()) {
      const Piece& p = pieces_[pos_];
      if (p.tag == 0) {
        auto n = std::make_unique<Node>();
        n->kind = Node::kText;
        n->text = p.text;
        n->line = p.line;
        body.push_back(std::move(n));
        ++pos_;
        continue;
      }
      if (p.tag == '{') {
        ExprLexer lexer(p.text, where_, p.line);
        auto n = std::make_unique<Node>();
        n->kind = Node::kOutput;
        n->line = p.line;
        n->expr = parse_expr(lexer);
        if (!lexer.at_end()) lexer.fail("'" + lexer.peek().text + "' after the expression");
        body.push_back(std::move(n));
        ++pos_;
        continue;
      }
      const std::string word = first_word(p.text);
      if (std::find(stops.begin(), stops.end(), word) != stops.end()) return body;
      body.push_back(parse_statement(word));
    }
    if (!stops.empty()) {
      throw Error(where_ + ":" + std::to_string(open_line_) + ": the block opened here is never closed; {% " +
                  stops.back() + " %} is missing");
    }
    return body;
  }

  std::unique_ptr<Node> parse_statement(const std::string& word) {
    const Piece& p = pieces_[pos_++];
    open_line_ = p.line;
    ExprLexer lexer(p.text, where_, p.line);
    const Deeper deeper(depth_, lexer);
    lexer.next();  // the word
    auto n = std::make_unique<Node>();
    n->line = p.line;
    if (word == "if") {
      n->kind = Node::kIf;
      n->conditions.push_back(parse_whole(lexer));
      for (;;) {
        n->bodies.push_back(parse_body({"elif", "else", "endif"}));
        const Piece& stop = pieces_[pos_++];
        const std::string w = first_word(stop.text);
        ExprLexer stop_lexer(stop.text, where_, stop.line);
        stop_lexer.next();
        if (w == "elif") {
          n->conditions.push_back(parse_whole(stop_lexer));
        } else if (w == "else") {
          n->bodies.push_back(parse_body({"endif"}));
          ++pos_;
          break;
        } else {
          break;
        }
      }
    } else if (word == "for") {
      n->kind = Node::kFor;
      const Token var = lexer.next();
      if (var.kind != Token::kName || lexer.peek().text == ",") lexer.fail("a for loop over anything but one name");
      n->name = var.text;
      lexer.expect(Token::kName, "in");
      n->expr = parse_whole(lexer);
      n->bodies.push_back(parse_body({"else", "endfor"}));
      if (first_word(pieces_[pos_].text) == "else") lexer.fail("{% else %} in a for loop");
      ++pos_;
    } else if (word == "set") {
      n->kind = Node::kSet;
      const Token var = lexer.next();
      if (var.kind != Token::kName || lexer.peek().text != "=") lexer.fail("{% set %} of anything but one name");
      n->name = var.text;
      lexer.expect(Token::kOp, "=");
      n->expr = parse_whole(lexer);
    } else if (word == "generation") {
      if (!lexer.at_end()) lexer.fail("arguments to {% generation %}");
      n->kind = Node::kGeneration;
      marks_generation_ = true;
      n->bodies.push_back(parse_body({"endgeneration"}));
      ++pos_;
    } else if (word == "endfor" || word == "endif" || word == "endgeneration" || word == "else" || word == "elif") {
      throw Error(where_ + ":" + std::to_string(p.line) + ": {% " + word + " %} closes no open block");
    } else {
      lexer.fail("{% " + word + " %}");
    }
    return n;
  }

  ExprPtr parse_whole(ExprLexer& lexer) {
    ExprPtr e = parse_expr(lexer);
    if (!lexer.at_end()) lexer.fail("'" + lexer.peek().text + "' after the expression");
    return e;
  }

  // Nesting beyond this (parentheses, "not not ...", blocks in blocks) is refused rather than
  // followed down the stack.
  static constexpr int kMaxDepth = 100;
  struct Deeper {
    Deeper(int& depth, const ExprLexer& lx) : depth_(depth) {
      if (++depth_ > kMaxDepth) lx.fail("nesting deeper than " + std::to_string(kMaxDepth) + " levels");
    }
    ~Deeper() { --depth_; }
    int& depth_;
  };

  // expr := or [ "if" or "else" expr ]
  ExprPtr parse_expr(ExprLexer& lx) {
    const Deeper deeper(depth_, lx);
    ExprPtr value = parse_or(lx);
    if (!lx.accept(Token::kName, "if")) return value;
    ExprPtr condition = parse_or(lx);
    if (!lx.accept(Token::kName, "else")) lx.fail("an inline if without else");
    std::vector<ExprPtr> args;
    args.push_back(std::move(condition));
    args.push_back(std::move(value));
    args.push_back(parse_expr(lx));
    return make(Expr::kTernary, lx.line(), std::move(args));
  }
  ExprPtr parse_or(ExprLexer& lx) {
    ExprPtr e = parse_and(lx);
    while (lx.accept(Token::kName, "or")) e = make(Expr::kOr, lx.line(), two(std::move(e), parse_and(lx)));
    return e;
  }
  ExprPtr parse_and(ExprLexer& lx) {
    ExprPtr e = parse_not(lx);
    while (lx.accept(Token::kName, "and")) e = make(Expr::kAnd, lx.line(), two(std::move(e), parse_not(lx)));
    return e;
  }
  ExprPtr parse_not(ExprLexer& lx) {
    const Deeper deeper(depth_, lx);
    if (lx.accept(Token::kName, "not")) {
      std::vector<ExprPtr> a;
      a.push_back(parse_not(lx));
      return make(Expr::kNot, lx.line(), std::move(a));
    }
    return parse_compare(lx);
  }
  ExprPtr parse_compare(ExprLexer& lx) {
    ExprPtr e = parse_sum(lx);
    for (;;) {
      static const std::pair<const char*, Expr::Op> kOps[] = {{"==", Expr::kEq}, {"!=", Expr::kNe}, {"<=", Expr::kLe},
                                                              {">=", Expr::kGe}, {"<", Expr::kLt},  {">", Expr::kGt}};
      bool matched = false;
      for (const auto& [text, op] : kOps) {
        if (lx.accept(Token::kOp, text)) {
          e = make(op, lx.line(), two(std::move(e), parse_sum(lx)));
          matched = true;
          break;
        }
      }
      if (matched) continue;
      if (lx.accept(Token::kName, "in")) {
        e = make(Expr::kIn, lx.line(), two(std::move(e), parse_sum(lx)));
      } else if (lx.peek().text == "not" && lx.peek(1).text == "in") {
        lx.next();
        lx.next();
        e = make(Expr::kNotIn, lx.line(), two(std::move(e), parse_sum(lx)));
      } else if (lx.accept(Token::kName, "is")) {
        const bool negated = lx.accept(Token::kName, "not");
        const Token test = lx.next();
        static const std::vector<std::string> kTests = {"defined", "undefined", "none", "string", "number"};
        if (test.kind != Token::kName || std::find(kTests.begin(), kTests.end(), test.text) == kTests.end()) {
          lx.fail("the test \"is " + test.text + "\"");
        }
        std::vector<ExprPtr> a;
        a.push_back(std::move(e));
        e = make(Expr::kTest, lx.line(), std::move(a), test.text);
        e->negated = negated;
      } else {
        return e;
      }
    }
  }
  ExprPtr parse_sum(ExprLexer& lx) {
    ExprPtr e = parse_unary(lx);
    for (;;) {
      if (lx.accept(Token::kOp, "+")) e = make(Expr::kAdd, lx.line(), two(std::move(e), parse_unary(lx)));
      else if (lx.accept(Token::kOp, "-")) e = make(Expr::kSub, lx.line(), two(std::move(e), parse_unary(lx)));
      else if (lx.accept(Token::kOp, "~")) e = make(Expr::kConcat, lx.line(), two(std::move(e), parse_unary(lx)));
      else return e;
    }
  }
  ExprPtr parse_unary(ExprLexer& lx) {
    const Deeper deeper(depth_, lx);
    if (lx.accept(Token::kOp, "-")) {
      std::vector<ExprPtr> a;
      a.push_back(parse_unary(lx));
      return make(Expr::kNeg, lx.line(), std::move(a));
    }
    ExprPtr e = parse_postfix(lx);
    while (lx.accept(Token::kOp, "|")) {
      const Token filter = lx.next();
      static const std::vector<std::string> kFilters = {"trim", "length", "upper", "lower", "string"};
      if (filter.kind != Token::kName || std::find(kFilters.begin(), kFilters.end(), filter.text) == kFilters.end()) {
        lx.fail("the filter \"| " + filter.text + "\"");
      }
      if (lx.peek().text == "(") lx.fail("arguments to the filter \"| " + filter.text + "\"");
      std::vector<ExprPtr> a;
      a.push_back(std::move(e));
      e = make(Expr::kFilter, lx.line(), std::move(a), filter.text);
    }
    return e;
  }
  ExprPtr parse_postfix(ExprLexer& lx) {
    ExprPtr e = parse_primary(lx);
    for (;;) {
      if (lx.accept(Token::kOp, ".")) {
        const Token attr = lx.next();
        if (attr.kind != Token::kName) lx.fail("'." + attr.text + "'");
        if (lx.accept(Token::kOp, "(")) {
          static const std::vector<std::string> kMethods = {"strip", "lstrip", "rstrip", "upper", "lower"};
          if (std::find(kMethods.begin(), kMethods.end(), attr.text) == kMethods.end() || !lx.accept(Token::kOp, ")")) {
            lx.fail("the method call ." + attr.text + "(...)");
          }
          std::vector<ExprPtr> a;
          a.push_back(std::move(e));
          e = make(Expr::kMethod, lx.line(), std::move(a), attr.text);
        } else {
          std::vector<ExprPtr> a;
          a.push_back(std::move(e));
          e = make(Expr::kAttr, lx.line(), std::move(a), attr.text);
        }
      } else if (lx.accept(Token::kOp, "[")) {
        e = parse_subscript(lx, std::move(e));
      } else {
        return e;
      }
    }
  }
  ExprPtr parse_subscript(ExprLexer& lx, ExprPtr target) {
    std::vector<ExprPtr> a;
    a.push_back(std::move(target));
    ExprPtr first = lx.peek().text == ":" ? nullptr : parse_expr(lx);
    if (!lx.accept(Token::kOp, ":")) {
      lx.expect(Token::kOp, "]");
      a.push_back(std::move(first));
      return make(Expr::kIndex, lx.line(), std::move(a));
    }
    ExprPtr second = lx.peek().text == "]" ? nullptr : parse_expr(lx);
    if (lx.peek().text == ":") lx.fail("a slice with a step");
    lx.expect(Token::kOp, "]");
    a.push_back(std::move(first));
    a.push_back(std::move(second));
    return make(Expr::kSlice, lx.line(), std::move(a));
  }
  ExprPtr parse_primary(ExprLexer& lx) {
    const Token t = lx.next();
    auto literal = [&](Value v) {
      ExprPtr e = make(Expr::kLiteral, lx.line());
      e->literal = std::move(v);
      return e;
    };
    switch (t.kind) {
      case Token::kString: {
        ExprPtr e = make(Expr::kLiteral, lx.line());
        e->literal_text = t.text;
        e->literal = Value::text(e->literal_text, true);
        return e;
      }
      case Token::kInt: return literal(Value::of(static_cast<int64_t>(std::stoll(t.text))));
      case Token::kName:
        if (t.text == "true" || t.text == "True") return literal(Value::of(true));
        if (t.text == "false" || t.text == "False") return literal(Value::of(false));
        if (t.text == "none" || t.text == "None") return literal(Value::none());
        if (t.text == "raise_exception") {
          lx.expect(Token::kOp, "(");
          std::vector<ExprPtr> a;
          a.push_back(parse_expr(lx));
          lx.expect(Token::kOp, ")");
          return make(Expr::kCall, lx.line(), std::move(a), t.text);
        }
        if (lx.peek().text == "(") lx.fail("the function call " + t.text + "(...)");
        return make(Expr::kName, lx.line(), {}, t.text);
      case Token::kOp:
        if (t.text == "(") {
          ExprPtr e = parse_expr(lx);
          lx.expect(Token::kOp, ")");
          return e;
        }
        if (t.text == "[" || t.text == "{") lx.fail("a list or dict literal");
        lx.fail("'" + t.text + "' where a value was expected");
      case Token::kEnd: lx.fail("an expression that ends early");
    }
    lx.fail("'" + t.text + "'");
  }

  const std::vector<Piece>& pieces_;
  std::string where_;
  size_t pos_ = 0;
  int depth_ = 0;
  int open_line_ = 1;  // of the block being parsed, for a missing end tag
  bool marks_generation_ = false;
};

// ---------------------------------------------------------------- rendering

class Renderer {
 public:
  Renderer(const std::string& where, std::vector<ChatSpan>& out) : where_(where), out_(out) {}

  std::map<std::string, Value> scope;

  void run(const Body& body) {
    for (const auto& n : body) run(*n);
  }

 private:
  void run(const Node& n) {
    switch (n.kind) {
      case Node::kText: return emit(n.text, true);
      case Node::kOutput: {
        const Value v = eval(*n.expr);
        if (v.kind == Value::kString) {
          for (const auto& s : v.segments) emit(s.text, s.from_template);
        } else if (v.kind != Value::kUndefined) {
          emit(to_string(v, n.line), true);
        }
        return;
      }
      case Node::kIf:
        for (size_t b = 0; b < n.bodies.size(); ++b) {
          if (b >= n.conditions.size() || truthy(eval(*n.conditions[b]))) return run(n.bodies[b]);
        }
        return;
      case Node::kFor: return run_for(n);
      case Node::kSet: scope[n.name] = eval(*n.expr); return;
      case Node::kGeneration: {
        const int outer = block_;
        if (outer < 0) block_ = blocks_++;
        run(n.bodies[0]);
        block_ = outer;
        return;
      }
    }
  }

  void run_for(const Node& n) {
    const Value seq = eval(*n.expr);
    if (seq.kind != Value::kMessages) fail(n.line, std::string("a for loop over ") + kind_name(seq) + ", not messages");
    const std::map<std::string, Value> outer = scope;  // what the body sets stays in the loop, as in Jinja
    for (size_t i = seq.begin; i < seq.end; ++i) {
      Value item = Value::with_kind(Value::kMessage);
      item.message = &(*seq.messages)[i];
      Value loop = Value::with_kind(Value::kLoop);
      loop.index0 = static_cast<int64_t>(i - seq.begin);
      loop.length = static_cast<int64_t>(seq.end - seq.begin);
      scope[n.name] = item;
      scope["loop"] = loop;
      run(n.bodies[0]);
    }
    scope = outer;
  }

  void emit(std::string_view text, bool from_template) {
    if (text.empty()) return;
    if (!out_.empty() && out_.back().from_template == from_template && out_.back().block == block_) {
      out_.back().text.append(text);
    } else {
      out_.push_back({std::string(text), from_template, block_});
    }
  }

  // A string the rendering computed (a number written out, an upper-cased copy), kept for
  // the values that view it.
  Value own(std::string text, bool from_template) {
    owned_.push_back(std::move(text));
    return Value::text(owned_.back(), from_template);
  }

  // An operand: a literal in place, anything else evaluated into `scratch`.
  const Value& operand(const Expr& x, Value& scratch) {
    if (x.op == Expr::kLiteral) return x.literal;
    scratch = eval(x);
    return scratch;
  }

  [[noreturn]] void fail(int line, const std::string& what) const {
    throw Error(where_ + ":" + std::to_string(line) + ": " + what);
  }

  std::string to_string(const Value& v, int line) const {
    switch (v.kind) {
      case Value::kString: return v.str();
      case Value::kInt: return std::to_string(v.integer);
      case Value::kBool: return v.boolean ? "True" : "False";
      case Value::kNone: return "None";
      case Value::kUndefined: return "";
      default: fail(line, std::string("cannot write ") + kind_name(v) + " as text");
    }
  }

  Value eval(const Expr& e) {
    switch (e.op) {
      case Expr::kLiteral: return e.literal;  // (binary and index read literals in place: operand())
      case Expr::kName: {
        const auto it = scope.find(e.name);
        return it == scope.end() ? Value() : it->second;
      }
      case Expr::kAttr: return attribute(eval(*e.args[0]), e.name, e.line);
      case Expr::kIndex: {
        Value scratch;
        return index(eval(*e.args[0]), operand(*e.args[1], scratch), e.line);
      }
      case Expr::kSlice: return slice(e);
      case Expr::kFilter:
      case Expr::kMethod: return transform(eval(*e.args[0]), e.name, e.line);
      case Expr::kCall: fail(e.line, "raise_exception: " + to_string(eval(*e.args[0]), e.line));
      case Expr::kTest: return Value::of(test(eval(*e.args[0]), e.name) != e.negated);
      case Expr::kNot: return Value::of(!truthy(eval(*e.args[0])));
      case Expr::kNeg: return Value::of(-integer(eval(*e.args[0]), e.line));
      case Expr::kAnd: {
        Value a = eval(*e.args[0]);
        return truthy(a) ? eval(*e.args[1]) : a;
      }
      case Expr::kOr: {
        Value a = eval(*e.args[0]);
        return truthy(a) ? a : eval(*e.args[1]);
      }
      case Expr::kTernary: return truthy(eval(*e.args[0])) ? eval(*e.args[1]) : eval(*e.args[2]);
      default: return binary(e);
    }
  }

  Value binary(const Expr& e) {
    Value scratch_a, scratch_b;
    const Value& a = operand(*e.args[0], scratch_a);
    const Value& b = operand(*e.args[1], scratch_b);
    switch (e.op) {
      case Expr::kEq: return Value::of(equal(a, b));
      case Expr::kNe: return Value::of(!equal(a, b));
      case Expr::kIn:
      case Expr::kNotIn: return Value::of(contains(b, a, e.line) == (e.op == Expr::kIn));
      case Expr::kConcat: return concat(stringify(a, e.line), stringify(b, e.line));
      case Expr::kAdd:
        if (a.kind == Value::kString && b.kind == Value::kString) return concat(a, b);
        return Value::of(integer(a, e.line) + integer(b, e.line));
      case Expr::kSub: return Value::of(integer(a, e.line) - integer(b, e.line));
      default: break;
    }
    int c = 0;
    if (a.kind == Value::kString && b.kind == Value::kString) {
      c = a.str().compare(b.str());
    } else {
      const int64_t x = integer(a, e.line), y = integer(b, e.line);
      c = x < y ? -1 : x > y ? 1 : 0;
    }
    switch (e.op) {
      case Expr::kLt: return Value::of(c < 0);
      case Expr::kLe: return Value::of(c <= 0);
      case Expr::kGt: return Value::of(c > 0);
      default: return Value::of(c >= 0);
    }
  }

  int64_t integer(const Value& v, int line) const {
    if (v.kind == Value::kInt) return v.integer;
    if (v.kind == Value::kBool) return v.boolean;
    fail(line, std::string("expected a number, found ") + kind_name(v));
  }
  Value stringify(const Value& v, int line) {
    return v.kind == Value::kString ? v : own(to_string(v, line), true);
  }
  static Value concat(Value a, const Value& b) {
    a.segments.insert(a.segments.end(), b.segments.begin(), b.segments.end());
    return a;
  }

  bool contains(const Value& haystack, const Value& needle, int line) const {
    if (haystack.kind == Value::kString && needle.kind == Value::kString) {
      return haystack.str().find(needle.str()) != std::string::npos;
    }
    if (haystack.kind == Value::kMessage && needle.kind == Value::kString) {
      return needle.str() == "role" || needle.str() == "content";
    }
    fail(line, std::string("\"in\" with ") + kind_name(needle) + " and " + kind_name(haystack));
  }

  static bool test(const Value& v, const std::string& name) {
    if (name == "defined") return v.kind != Value::kUndefined;
    if (name == "undefined") return v.kind == Value::kUndefined;
    if (name == "none") return v.kind == Value::kNone;
    if (name == "string") return v.kind == Value::kString;
    return v.kind == Value::kInt;  // number
  }

  Value attribute(const Value& v, std::string_view name, int line) const {
    if (v.kind == Value::kMessage) {
      if (name == "role") return Value::text(v.message->role, false);
      if (name == "content") return Value::text(v.message->content, false);
      return Value();  // a field the conversation does not carry: undefined, as in Jinja
    }
    if (v.kind == Value::kLoop) {
      if (name == "index0") return Value::of(v.index0);
      if (name == "index") return Value::of(v.index0 + 1);
      if (name == "revindex0") return Value::of(v.length - 1 - v.index0);
      if (name == "revindex") return Value::of(v.length - v.index0);
      if (name == "first") return Value::of(v.index0 == 0);
      if (name == "last") return Value::of(v.index0 == v.length - 1);
      if (name == "length") return Value::of(v.length);
      fail(line, "loop." + std::string(name) + " is outside the subset (index, index0, revindex, revindex0, first, last, "
                 "length)");
    }
    if (v.kind == Value::kUndefined) fail(line, "." + std::string(name) + " of an undefined value");
    return Value();
  }

  Value index(const Value& v, const Value& key, int line) const {
    if (key.kind == Value::kString) {
      if (key.segments.size() == 1) return attribute(v, key.segments[0].text, line);
      return attribute(v, key.str(), line);
    }
    if (v.kind != Value::kMessages) fail(line, std::string("indexing ") + kind_name(v) + " by a number");
    int64_t i = integer(key, line);
    const auto n = static_cast<int64_t>(v.end - v.begin);
    if (i < 0) i += n;
    if (i < 0 || i >= n) return Value();  // out of range: undefined
    Value item = Value::with_kind(Value::kMessage);
    item.message = &(*v.messages)[v.begin + static_cast<size_t>(i)];
    return item;
  }

  Value slice(const Expr& e) {
    Value v = eval(*e.args[0]);
    if (v.kind != Value::kMessages) fail(e.line, std::string("slicing ") + kind_name(v));
    const auto n = static_cast<int64_t>(v.end - v.begin);
    const auto bound = [&](const ExprPtr& x, int64_t fallback) {
      if (!x) return fallback;
      int64_t i = integer(eval(*x), e.line);
      if (i < 0) i += n;
      return std::clamp<int64_t>(i, 0, n);
    };
    const int64_t from = bound(e.args[1], 0), to = std::max(from, bound(e.args[2], n));
    const size_t base = v.begin;
    v.begin = base + static_cast<size_t>(from);
    v.end = base + static_cast<size_t>(to);
    return v;
  }

  Value transform(Value v, const std::string& name, int line) {
    if (name == "length") {
      if (v.kind == Value::kMessages) return Value::of(static_cast<int64_t>(v.end - v.begin));
      if (v.kind == Value::kString) return Value::of(static_cast<int64_t>(v.str().size()));
      fail(line, std::string("| length of ") + kind_name(v));
    }
    if (name == "string") return stringify(v, line);
    if (v.kind != Value::kString) fail(line, name + " of " + kind_name(v) + ", expected a string");
    if (name == "trim" || name == "strip") strip(v.segments, true, true);
    else if (name == "lstrip") strip(v.segments, true, false);
    else if (name == "rstrip") strip(v.segments, false, true);
    else {
      for (auto& s : v.segments) {
        std::string cased(s.text);
        for (char& c : cased) c = static_cast<char>(name == "upper" ? std::toupper(static_cast<unsigned char>(c))
                                                                    : std::tolower(static_cast<unsigned char>(c)));
        s.text = own(std::move(cased), s.from_template).segments[0].text;
      }
    }
    return v;
  }

  std::string where_;
  std::vector<ChatSpan>& out_;
  int block_ = -1, blocks_ = 0;
  std::deque<std::string> owned_;  // strings values view (a deque keeps them in place)
};

// Built-in templates. Both mark the assistant's text and its end-of-turn token with
// {% generation %}; "plain" adds no token to GPT-2's vocabulary.
const char* kPlainTemplate =
    "{% for message in messages %}\n"
    "{% if message['role'] == 'system' %}\n"
    "System:\n"
    "{{ message['content'] }}<|endoftext|>{% elif message['role'] == 'user' %}\n"
    "User:\n"
    "{{ message['content'] }}<|endoftext|>{% else %}\n"
    "Assistant:\n"
    "{% generation %}{{ message['content'] }}<|endoftext|>{% endgeneration %}\n"
    "{% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "Assistant:\n"
    "{% endif %}\n";

const char* kChatmlTemplate =
    "{% for message in messages %}\n"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}\n"
    "{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}\n"
    "\n"
    "{% else %}\n"
    "{{ message['content'] }}<|im_end|>\n"
    "{% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "<|im_start|>assistant\n"
    "{% endif %}\n";

}  // namespace

ChatTemplate::ChatTemplate(std::string source, std::string where) : source_(std::move(source)), where_(std::move(where)) {
  const std::vector<Piece> pieces = lex(source_, where_);
  Parser parser(pieces, where_);
  body_ = parser.parse_all(marks_generation_);
}

ChatTemplate::~ChatTemplate() = default;
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;

std::vector<ChatSpan> ChatTemplate::render(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                                           const std::map<std::string, std::string>& strings) const {
  std::vector<ChatSpan> out;
  Renderer renderer(where_, out);
  Value list = Value::with_kind(Value::kMessages);
  list.messages = &messages;
  list.end = messages.size();
  renderer.scope["messages"] = list;
  renderer.scope["add_generation_prompt"] = Value::of(add_generation_prompt);
  for (const auto& [name, value] : strings) renderer.scope[name] = Value::text(value, true);
  renderer.run(body_);
  return out;
}

std::vector<std::string> ChatTemplate::control_strings() const {
  std::vector<std::string> out;
  for (size_t i = source_.find("<|"); i != std::string::npos; i = source_.find("<|", i + 2)) {
    const size_t end = source_.find("|>", i + 2);
    if (end == std::string::npos) break;
    const std::string s = source_.substr(i, end + 2 - i);
    if (s.find_first_of(" \t\n\r'\"{}") != std::string::npos) continue;
    if (std::find(out.begin(), out.end(), s) == out.end()) out.push_back(s);
  }
  return out;
}

const char* builtin_chat_template(const std::string& name) {
  if (name == "plain") return kPlainTemplate;
  if (name == "chatml") return kChatmlTemplate;
  return nullptr;
}

ChatTemplate load_chat_template(const std::string& name_or_file) {
  if (const char* source = builtin_chat_template(name_or_file)) return ChatTemplate(source, name_or_file);
  namespace fs = std::filesystem;
  if (!fs::is_regular_file(name_or_file)) {
    throw Error("--chat-template " + name_or_file + ": neither a built-in template (plain, chatml) nor a file");
  }
  std::ifstream in(name_or_file, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  if (!in) throw Error(name_or_file + ": cannot read the chat template");
  return ChatTemplate(text.str(), name_or_file);
}

}  // namespace gpt2ft
