// Host memory checks.
#include "gpt2ft/core/host_memory.h"

#include <fstream>
#include <sstream>

#include "gpt2ft/core/error.h"

namespace gpt2ft {

int64_t host_available_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string key, unit;
  int64_t kib = 0;
  while (in >> key >> kib >> unit) {
    if (key == "MemAvailable:") return kib * 1024;
  }
  return 0;
}

void require_host_memory(double bytes, const std::string& what, const std::string& advice) {
  const int64_t available = host_available_bytes();
  if (available <= 0 || bytes <= 0.9 * static_cast<double>(available)) return;
  std::ostringstream msg;
  msg.precision(3);
  msg << what << " needs " << bytes / double(1ll << 30) << " GiB of host memory but the host has "
      << available / double(1ll << 30) << " GiB available; " << advice;
  throw Error(msg.str());
}

}  // namespace gpt2ft
