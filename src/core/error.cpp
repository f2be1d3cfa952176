// Error helpers: strip torch's backtraces so users see one line.
#include "gpt2ft/core/error.h"

#include <c10/util/Exception.h>

namespace gpt2ft {

std::string describe_exception(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) {
    return c10_error->what_without_backtrace();
  }
  return e.what();
}

}  // namespace gpt2ft
