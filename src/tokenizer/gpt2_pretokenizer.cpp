// GPT-2 pre-tokenizer on PCRE2.
#define PCRE2_CODE_UNIT_WIDTH 8
#include "gpt2ft/tokenizer/gpt2_pretokenizer.h"

#include <pcre2.h>

#include <cstdint>
#include <string>

#include "gpt2ft/core/error.h"

namespace gpt2ft {
namespace {

constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Match data and JIT stack belong to a thread; the compiled pattern is shared.
struct ThreadMatchState {
  pcre2_match_data* data = pcre2_match_data_create(1, nullptr);
  pcre2_jit_stack* stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
  pcre2_match_context* context = pcre2_match_context_create(nullptr);
  ThreadMatchState() { pcre2_jit_stack_assign(context, nullptr, stack); }
  ~ThreadMatchState() {
    pcre2_match_context_free(context);
    pcre2_jit_stack_free(stack);
    pcre2_match_data_free(data);
  }
};

ThreadMatchState& thread_state() {
  thread_local ThreadMatchState state;
  return state;
}

}  // namespace

struct Gpt2Pretokenizer::Impl {
  pcre2_code* code = nullptr;
  bool jit = false;
};

Gpt2Pretokenizer::Gpt2Pretokenizer() : impl_(std::make_unique<Impl>()) {
  int error = 0;
  PCRE2_SIZE offset = 0;
  impl_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(kGpt2Pattern), PCRE2_ZERO_TERMINATED,
                              PCRE2_UTF | PCRE2_UCP, &error, &offset, nullptr);
  if (!impl_->code) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error, message, sizeof(message));
    throw Error(std::string("compiling the GPT-2 pre-tokenizer pattern: ") + reinterpret_cast<char*>(message));
  }
  impl_->jit = pcre2_jit_compile(impl_->code, PCRE2_JIT_COMPLETE) == 0;
}

Gpt2Pretokenizer::~Gpt2Pretokenizer() { pcre2_code_free(impl_->code); }

void Gpt2Pretokenizer::split(std::string_view text, std::vector<std::string_view>& pieces) const {
  pieces.clear();
  ThreadMatchState& state = thread_state();
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t valid_end = valid_utf8_end(text, pos);
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data() + pos);
    const size_t length = valid_end - pos;
    size_t offset = 0;
    while (offset < length) {
      // The run is valid UTF-8, so PCRE2's own UTF check can be skipped.
      const int rc = impl_->jit ? pcre2_jit_match(impl_->code, subject, length, offset, 0, state.data, state.context)
                                : pcre2_match(impl_->code, subject, length, offset, PCRE2_NO_UTF_CHECK,
                                              state.data, state.context);
      if (rc < 0) {  // cannot happen (every character matches some branch); keep the bytes anyway
        pieces.emplace_back(text.data() + pos + offset, length - offset);
        break;
      }
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(state.data);
      if (ovector[0] > offset) pieces.emplace_back(text.data() + pos + offset, ovector[0] - offset);
      pieces.emplace_back(text.data() + pos + ovector[0], ovector[1] - ovector[0]);
      offset = ovector[1];
    }
    pos = valid_end;
    if (pos < text.size()) pieces.emplace_back(text.data() + pos++, 1);  // an invalid byte alone
  }
}

size_t valid_utf8_end(std::string_view text, size_t begin) {
  const auto* s = reinterpret_cast<const uint8_t*>(text.data());
  const size_t n = text.size();
  size_t i = begin;
  while (i < n) {
    const uint8_t c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp, min;
    if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F, min = 0x80;
    else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F, min = 0x800;
    else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07, min = 0x10000;
    else break;
    if (i + len > n) break;
    bool ok = true;
    for (size_t k = 1; k < len; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) {
        ok = false;
        break;
      }
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    if (!ok || cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) break;
    i += len;
  }
  return i;
}

}  // namespace gpt2ft
