// The project's error type and helpers that add "where" context as an error travels up.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

namespace gpt2ft {

// Bad input or a failed operation the user can act on. The message says what went wrong,
// where (file, tensor, JSON path) and, where possible, what to do about it.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Documented process exit codes.
inline constexpr int kExitOk = 0;
inline constexpr int kExitError = 1;  // bad input or a failed operation
inline constexpr int kExitUsage = 2;  // bad command-line arguments
inline constexpr int kExitOomRestart = 75;  // out of GPU memory: checkpoint saved, rerun to continue
inline constexpr int kExitStopped = 76;     // stopped by a signal or train.time_limit: checkpoint saved
inline constexpr int kExitCannotFit = 77;   // out of GPU memory at the smallest micro batch: rerunning cannot help

// A deliberate stop with a documented exit code; the message says how to continue.
class ExitRequest : public Error {
 public:
  ExitRequest(int code, const std::string& message) : Error(message), code_(code) {}
  int code() const { return code_; }

 private:
  int code_;
};

// The message of any exception, without a C++ or torch stack trace.
std::string describe_exception(const std::exception& e);

// Runs f(); an exception escaping it is rethrown as Error("<context>: <message>").
template <class F>
auto with_context(const std::string& context, F&& f) -> decltype(f()) {
  try {
    return std::forward<F>(f)();
  } catch (const std::exception& e) {
    throw Error(context + ": " + describe_exception(e));
  }
}

}  // namespace gpt2ft
