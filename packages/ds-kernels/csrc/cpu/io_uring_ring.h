// A minimal io_uring ring over the raw syscalls (only <linux/io_uring.h> is needed, not liburing):
// setup, mmap of the SQ/CQ rings and the SQE array, prep of read/write entries, enter and drain.
#pragma once
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace dsk {

class IoUring {
 public:
  explicit IoUring(unsigned entries) {
    io_uring_params p;
    std::memset(&p, 0, sizeof(p));
    fd_ = int(::syscall(__NR_io_uring_setup, entries, &p));
    if (fd_ < 0) return;
    sq_size_ = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    cq_size_ = p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe);
    single_ = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single_) sq_size_ = cq_size_ = sq_size_ > cq_size_ ? sq_size_ : cq_size_;
    sq_ptr_ = ::mmap(nullptr, sq_size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, IORING_OFF_SQ_RING);
    if (sq_ptr_ == MAP_FAILED) { sq_ptr_ = nullptr; close_fd(); return; }
    cq_ptr_ = single_ ? sq_ptr_
                      : ::mmap(nullptr, cq_size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, IORING_OFF_CQ_RING);
    if (cq_ptr_ == MAP_FAILED) { cq_ptr_ = nullptr; unmap(); close_fd(); return; }
    sqes_size_ = p.sq_entries * sizeof(io_uring_sqe);
    void* s = ::mmap(nullptr, sqes_size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, IORING_OFF_SQES);
    if (s == MAP_FAILED) { unmap(); close_fd(); return; }
    sqes_ = static_cast<io_uring_sqe*>(s);
    char* sq = static_cast<char*>(sq_ptr_);
    char* cq = static_cast<char*>(cq_ptr_);
    sq_tail_ = reinterpret_cast<unsigned*>(sq + p.sq_off.tail);
    sq_mask_ = *reinterpret_cast<unsigned*>(sq + p.sq_off.ring_mask);
    sq_array_ = reinterpret_cast<unsigned*>(sq + p.sq_off.array);
    cq_head_ = reinterpret_cast<unsigned*>(cq + p.cq_off.head);
    cq_tail_ = reinterpret_cast<unsigned*>(cq + p.cq_off.tail);
    cq_mask_ = *reinterpret_cast<unsigned*>(cq + p.cq_off.ring_mask);
    cqes_ = reinterpret_cast<io_uring_cqe*>(cq + p.cq_off.cqes);
    ok_ = true;
  }
  ~IoUring() {
    if (sqes_) ::munmap(sqes_, sqes_size_);
    unmap();
    close_fd();
  }
  IoUring(const IoUring&) = delete;
  IoUring& operator=(const IoUring&) = delete;

  bool ok() const { return ok_; }

  // Queues one read/write; the caller never has more entries outstanding than the ring holds.
  void prep(bool write, int fd, void* buf, unsigned len, uint64_t off, uint64_t user_data) {
    unsigned tail = *sq_tail_;
    unsigned idx = tail & sq_mask_;
    io_uring_sqe* e = &sqes_[idx];
    std::memset(e, 0, sizeof(*e));
    e->opcode = write ? IORING_OP_WRITE : IORING_OP_READ;
    e->fd = fd;
    e->addr = reinterpret_cast<uint64_t>(buf);
    e->len = len;
    e->off = off;
    e->user_data = user_data;
    sq_array_[idx] = idx;
    __atomic_store_n(sq_tail_, tail + 1, __ATOMIC_RELEASE);
  }

  // Submits `to_submit` entries and waits for at least `min_complete` completions; -errno on failure.
  int enter(unsigned to_submit, unsigned min_complete) {
    long rc = ::syscall(__NR_io_uring_enter, fd_, to_submit, min_complete, IORING_ENTER_GETEVENTS, nullptr, 0);
    return rc < 0 ? -errno : int(rc);
  }

  template <class F> void drain(F on_completion) {
    unsigned head = *cq_head_;
    unsigned tail = __atomic_load_n(cq_tail_, __ATOMIC_ACQUIRE);
    while (head != tail) {
      const io_uring_cqe& c = cqes_[head & cq_mask_];
      on_completion(c.user_data, c.res);
      ++head;
    }
    __atomic_store_n(cq_head_, head, __ATOMIC_RELEASE);
  }

 private:
  void unmap() {
    if (cq_ptr_ && !single_) ::munmap(cq_ptr_, cq_size_);
    if (sq_ptr_) ::munmap(sq_ptr_, sq_size_);
    sq_ptr_ = cq_ptr_ = nullptr;
  }
  void close_fd() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  int fd_ = -1;
  bool ok_ = false, single_ = false;
  void *sq_ptr_ = nullptr, *cq_ptr_ = nullptr;
  size_t sq_size_ = 0, cq_size_ = 0, sqes_size_ = 0;
  io_uring_sqe* sqes_ = nullptr;
  unsigned *sq_tail_ = nullptr, *sq_array_ = nullptr, *cq_head_ = nullptr, *cq_tail_ = nullptr;
  unsigned sq_mask_ = 0, cq_mask_ = 0;
  io_uring_cqe* cqes_ = nullptr;
};

inline bool io_uring_probe() {
  IoUring ring(2);
  return ring.ok();
}

}  // namespace dsk
