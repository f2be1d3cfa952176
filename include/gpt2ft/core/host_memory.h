// How much memory the host can still give (for refusing, with a message, what cannot fit
// instead of aborting in the allocator).
#pragma once

#include <cstdint>
#include <string>

namespace gpt2ft {

// MemAvailable from /proc/meminfo, in bytes; 0 when unknown.
int64_t host_available_bytes();

// An Error saying `what` needs `bytes` of host memory and how much is available, unless
// `bytes` fits in 90% of it (or the amount is unknown). `advice` ends the message.
void require_host_memory(double bytes, const std::string& what, const std::string& advice);

}  // namespace gpt2ft
