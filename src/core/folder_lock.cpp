// Folder locks with flock(2).
#include "gpt2ft/core/folder_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <fstream>
#include <sstream>

#include <spdlog/spdlog.h>

#include "gpt2ft/core/error.h"

namespace gpt2ft {
namespace fs = std::filesystem;

namespace {

std::string command_line() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  std::string raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  for (char& c : raw) c = c == '\0' ? ' ' : c;
  while (!raw.empty() && raw.back() == ' ') raw.pop_back();
  return raw.size() > 300 ? raw.substr(0, 300) + "..." : raw;
}

std::string host_name() {
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  return host;
}

}  // namespace

FolderLock::FolderLock(const fs::path& dir, const std::string& what) : file_(dir / kFileName) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw Error(what + " " + dir.string() + ": cannot create directory (" + ec.message() + ")");
  // The holder unlinks the file when it lets go, so a lock taken on a file that was unlinked
  // meanwhile guards nothing: retry on the file now at the path.
  for (int attempt = 0;; ++attempt) {
    fd_ = ::open(file_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd_ < 0) throw Error(file_.string() + ": cannot open the folder's lock file (" + std::strerror(errno) + ")");
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      if (err != EWOULDBLOCK) {  // a filesystem without locks (some network mounts): go on unguarded
        spdlog::warn("{}: cannot lock ({}); nothing stops a second process from writing into {} at the same time",
                     file_.string(), std::strerror(err), dir.string());
        ::close(fd_);
        fd_ = -1;
        return;
      }
      char buffer[1024] = {};
      const ssize_t n = ::pread(fd_, buffer, sizeof(buffer) - 1, 0);
      ::close(fd_);
      fd_ = -1;
      std::string holder = n > 0 ? std::string(buffer, static_cast<size_t>(n)) : "";
      while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
      throw Error(what + " " + dir.string() + " is in use by another gpt2-finetune process (" +
                  (holder.empty() ? "unknown" : holder) +
                  "); two processes writing one folder would mix their files. Wait for it to finish, stop it, or use "
                  "another " + what);
    }
    struct stat held {}, now {};
    if (::fstat(fd_, &held) == 0 && ::stat(file_.c_str(), &now) == 0 && held.st_ino == now.st_ino &&
        held.st_dev == now.st_dev) {
      break;
    }
    ::close(fd_);
    fd_ = -1;
    if (attempt == 10) throw Error(file_.string() + ": the lock file keeps being replaced; is another process racing?");
  }
  std::ostringstream me;
  const std::time_t now = std::time(nullptr);
  char when[64] = {};
  std::strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S", std::localtime(&now));
  me << "pid " << ::getpid() << " on " << host_name() << ", started " << when << ": " << command_line() << "\n";
  const std::string text = me.str();
  if (::ftruncate(fd_, 0) == 0) {
    [[maybe_unused]] const ssize_t written = ::pwrite(fd_, text.data(), text.size(), 0);
  }
}

FolderLock::~FolderLock() {
  if (fd_ < 0) return;
  ::unlink(file_.c_str());  // while still held: a waiting process then retries on a new file
  ::close(fd_);             // releases the lock
}

}  // namespace gpt2ft
