// Asynchronous file I/O for tensors: requests split into blocks, executed by worker threads with
// pread/pwrite or by io_uring rings (raw syscalls, kernel headers only: no liburing needed).
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

namespace dsk {

bool io_uring_supported();

struct AioRequest;

struct AioBlock {
  AioRequest* req;
  int fd;
  bool write;
  char* buf;
  size_t len;
  int64_t off;
};

struct AioRequest {
  std::string path;
  bool write = false;
  int fd_direct = -1, fd_buffered = -1;
  int64_t end = 0;  // file offset one past the request, for error messages
  std::mutex mu;
  std::condition_variable cv;
  int64_t remaining = 0;
  bool done = false;
  int err = 0;
  std::string msg;
  void block_done(int error, const std::string& message);  // thread-safe; last block closes the files
};

class AioEngine {
 public:
  AioEngine(int64_t block_size, int queue_depth, int threads, const std::string& engine);
  ~AioEngine();
  AioEngine(const AioEngine&) = delete;
  AioEngine& operator=(const AioEngine&) = delete;

  const std::string& engine() const { return engine_; }
  int64_t submit(bool write, uintptr_t ptr, int64_t nbytes, const std::string& path, int64_t offset);
  std::pair<int, std::string> wait(int64_t id);  // (errno, message); 0 when every block succeeded
  bool poll(int64_t id);                          // finished (successfully or not), without blocking

 private:
  void thread_loop();
  void uring_loop();
  bool pop(AioBlock& out, bool block);
  void push_blocks(std::vector<AioBlock>& blocks);
  static void run_sync(AioBlock b);

  std::string engine_;
  int64_t block_size_;
  int queue_depth_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<AioBlock> queue_;
  bool stop_ = false;
  std::vector<std::thread> workers_;
  std::mutex req_mu_;
  int64_t next_id_ = 1;
  std::unordered_map<int64_t, std::shared_ptr<AioRequest>> requests_;
};

}  // namespace dsk
