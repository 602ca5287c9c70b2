// See aio_engine.h. Files are opened once per request: with O_DIRECT for the blocks whose buffer,
// offset and length are 4 KiB aligned, through the page cache for the rest (unaligned tails).
#include "aio_engine.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <stdexcept>
#include <sys/stat.h>
#include <unistd.h>

#include "io_uring_ring.h"

namespace dsk {

namespace {
constexpr int64_t kAlign = 4096;

std::string describe(int err, const char* what, int64_t off) {
  return std::string(what) + " at byte " + std::to_string(off) + ": " + std::strerror(err);
}
}  // namespace

void AioRequest::block_done(int error, const std::string& message) {
  std::lock_guard<std::mutex> lock(mu);
  if (error != 0 && err == 0) {
    err = error;
    msg = message;
  }
  if (--remaining == 0) {
    if (fd_direct >= 0) ::close(fd_direct);
    if (fd_buffered >= 0 && ::close(fd_buffered) != 0 && err == 0) {  // a deferred write error surfaces here
      err = errno;
      msg = describe(errno, "close", end);
    }
    fd_direct = fd_buffered = -1;
    done = true;
    cv.notify_all();
  }
}

AioEngine::AioEngine(int64_t block_size, int queue_depth, int threads, const std::string& engine)
    : engine_(engine), block_size_(block_size), queue_depth_(queue_depth) {
  if (block_size <= 0 || block_size % kAlign) throw std::invalid_argument("block_size must be a positive multiple of 4096");
  if (queue_depth < 1 || threads < 1) throw std::invalid_argument("queue_depth and threads must be >= 1");
  if (engine_ == "auto") engine_ = io_uring_supported() ? "io_uring" : "threads";
  if (engine_ == "io_uring" && !io_uring_supported()) throw std::runtime_error("io_uring is not available on this kernel");
  if (engine_ != "io_uring" && engine_ != "threads") throw std::invalid_argument("unknown aio engine: " + engine_);
  for (int i = 0; i < threads; ++i)
    workers_.emplace_back(engine_ == "io_uring" ? &AioEngine::uring_loop : &AioEngine::thread_loop, this);
}

AioEngine::~AioEngine() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

int64_t AioEngine::submit(bool write, uintptr_t ptr, int64_t nbytes, const std::string& path, int64_t offset) {
  auto req = std::make_shared<AioRequest>();
  req->path = path;
  req->write = write;
  req->end = offset + nbytes;
  int64_t id;
  {
    std::lock_guard<std::mutex> lock(req_mu_);
    id = next_id_++;
    requests_[id] = req;
  }
  const int flags = write ? (O_WRONLY | O_CREAT) : O_RDONLY;
  req->fd_buffered = ::open(path.c_str(), flags | O_CLOEXEC, 0644);
  if (req->fd_buffered < 0) {
    req->remaining = 1;
    req->block_done(errno, describe(errno, "open", offset));
    return id;
  }
  // O_DIRECT can be refused by the filesystem (tmpfs): then every block goes through the page cache.
  req->fd_direct = ::open(path.c_str(), flags | O_DIRECT | O_CLOEXEC, 0644);
  std::vector<AioBlock> blocks;
  char* base = reinterpret_cast<char*>(ptr);
  for (int64_t pos = 0; pos < nbytes; pos += block_size_) {
    size_t len = size_t(std::min<int64_t>(block_size_, nbytes - pos));
    bool aligned = ((ptr + pos) % kAlign == 0) && ((offset + pos) % kAlign == 0);
    size_t direct_len = aligned && req->fd_direct >= 0 ? len / kAlign * kAlign : 0;
    if (direct_len) blocks.push_back({req.get(), req->fd_direct, write, base + pos, direct_len, offset + pos});
    if (len > direct_len)
      blocks.push_back({req.get(), req->fd_buffered, write, base + pos + direct_len, len - direct_len,
                        offset + pos + int64_t(direct_len)});
  }
  if (blocks.empty()) {
    req->remaining = 1;
    req->block_done(0, "");
    return id;
  }
  req->remaining = int64_t(blocks.size());
  push_blocks(blocks);
  return id;
}

std::pair<int, std::string> AioEngine::wait(int64_t id) {
  std::shared_ptr<AioRequest> req;
  {
    std::lock_guard<std::mutex> lock(req_mu_);
    auto it = requests_.find(id);
    if (it == requests_.end()) return {EINVAL, "unknown or already waited request id " + std::to_string(id)};
    req = it->second;
  }
  {
    std::unique_lock<std::mutex> lock(req->mu);
    req->cv.wait(lock, [&] { return req->done; });
  }
  {
    std::lock_guard<std::mutex> lock(req_mu_);
    requests_.erase(id);
  }
  return {req->err, req->msg};
}

bool AioEngine::poll(int64_t id) {
  std::shared_ptr<AioRequest> req;
  {
    std::lock_guard<std::mutex> lock(req_mu_);
    auto it = requests_.find(id);
    if (it == requests_.end()) return true;  // already waited
    req = it->second;
  }
  std::lock_guard<std::mutex> lock(req->mu);
  return req->done;
}

void AioEngine::push_blocks(std::vector<AioBlock>& blocks) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& b : blocks) queue_.push_back(b);
  }
  cv_.notify_all();
}

bool AioEngine::pop(AioBlock& out, bool block) {
  std::unique_lock<std::mutex> lock(mu_);
  if (block) cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
  if (queue_.empty()) return false;
  out = queue_.front();
  queue_.pop_front();
  return true;
}

// One block with pread/pwrite, retrying short transfers; a transfer that makes no progress is an error.
void AioEngine::run_sync(AioBlock b) {
  size_t done = 0;
  while (done < b.len) {
    ssize_t n = b.write ? ::pwrite(b.fd, b.buf + done, b.len - done, b.off + int64_t(done))
                        : ::pread(b.fd, b.buf + done, b.len - done, b.off + int64_t(done));
    if (n < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      b.req->block_done(e, describe(e, b.write ? "write" : "read", b.off + int64_t(done)));
      return;
    }
    if (n == 0) {
      b.req->block_done(b.write ? EIO : ENODATA,
                        std::string(b.write ? "short write" : "short read (file ends)") + " at byte " +
                            std::to_string(b.off + int64_t(done)) + " of " + std::to_string(b.req->end));
      return;
    }
    done += size_t(n);
    // After a short O_DIRECT transfer the rest is unaligned: finish it through the page cache.
    b.fd = b.req->fd_buffered;
  }
  b.req->block_done(0, "");
}

void AioEngine::thread_loop() {
  AioBlock b;
  while (pop(b, true)) run_sync(b);
}

void AioEngine::uring_loop() {
  IoUring ring{unsigned(queue_depth_)};
  if (!ring.ok()) {  // could not set up this thread's ring: serve blocks synchronously instead
    thread_loop();
    return;
  }
  std::vector<AioBlock> slots;
  slots.resize(size_t(queue_depth_));
  std::vector<int> free_slots;
  for (int i = queue_depth_ - 1; i >= 0; --i) free_slots.push_back(i);
  int inflight = 0;
  for (;;) {
    unsigned to_submit = 0;
    AioBlock b;
    while (!free_slots.empty() && pop(b, inflight == 0 && to_submit == 0)) {
      int s = free_slots.back();
      free_slots.pop_back();
      slots[size_t(s)] = b;
      ring.prep(b.write, b.fd, b.buf, unsigned(b.len), uint64_t(b.off), uint64_t(s));
      ++to_submit;
      ++inflight;
    }
    if (inflight == 0) return;  // stopping and nothing left
    int rc = ring.enter(to_submit, 1);
    if (rc < 0 && rc != -EINTR && rc != -EBUSY && rc != -EAGAIN) {
      // The ring itself failed (not an I/O error): fail what it holds, serve the rest without it.
      std::vector<bool> is_free(size_t(queue_depth_), false);
      for (int s : free_slots) is_free[size_t(s)] = true;
      for (int s = 0; s < queue_depth_; ++s)
        if (!is_free[size_t(s)]) slots[size_t(s)].req->block_done(-rc, describe(-rc, "io_uring_enter", slots[size_t(s)].off));
      thread_loop();
      return;
    }
    ring.drain([&](uint64_t user, int res) {
      AioBlock& blk = slots[size_t(user)];
      if (res < 0) {
        if (res == -EAGAIN || res == -EINTR) {
          run_sync(blk);  // the kernel asked us to retry: do it here, synchronously
        } else {
          blk.req->block_done(-res, describe(-res, blk.write ? "write" : "read", blk.off));
        }
      } else if (size_t(res) < blk.len) {
        // Short transfer: retry the rest synchronously, which reports EOF / ENOSPC precisely.
        AioBlock rest{blk.req, blk.req->fd_buffered, blk.write, blk.buf + res, blk.len - size_t(res), blk.off + res};
        run_sync(rest);
      } else {
        blk.req->block_done(0, "");
      }
      free_slots.push_back(int(user));
      --inflight;
    });
  }
}

}  // namespace dsk

namespace dsk {
bool io_uring_supported() {
  static const bool ok = io_uring_probe();  // setup can be blocked by seccomp or kernel.io_uring_disabled
  return ok;
}
}  // namespace dsk
