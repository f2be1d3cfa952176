// Stop-signal handlers.
#include "gpt2ft/train/stop_signals.h"

#include <atomic>
#include <csignal>

namespace gpt2ft {
namespace {

std::atomic<int> g_stop_signal{0};

void on_stop_signal(int signum) {
  if (g_stop_signal.load() != 0) {  // a second stop request (Ctrl-C twice, TERM after TERM): stop now
    std::signal(signum, SIG_DFL);
    std::raise(signum);
  }
  g_stop_signal.store(signum);
}

}  // namespace

StopSignals::StopSignals() {
  g_stop_signal.store(0);
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  for (int i = 0; i < 3; ++i) sigaction(kSignals[i], &sa, &previous_[i]);
}

StopSignals::~StopSignals() {
  for (int i = 0; i < 3; ++i) sigaction(kSignals[i], &previous_[i], nullptr);
}

int StopSignals::requested() { return g_stop_signal.load(); }

}  // namespace gpt2ft
