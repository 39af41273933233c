// Host backend of MappedMemory: each allocation is a memfd; a mapping is a MAP_SHARED|MAP_FIXED
// view of part of it inside a PROT_NONE reservation, so one page can appear at several
// addresses.
#include "dist/mapped_memory.h"

#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "core/error.h"

namespace fluxtrain::dist {
namespace {

std::string sys_error(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

class HostMappedMemory : public MappedMemory {
 public:
  HostMappedMemory() : page_(static_cast<size_t>(sysconf(_SC_PAGESIZE))) {}
  ~HostMappedMemory() override {
    for (auto& [base, bytes] : reserved_) munmap(base, bytes);  // drops the mappings inside too
    for (int fd : fds_) close(fd);
  }

  c10::Device device() const override { return c10::Device(c10::kCPU); }
  size_t granularity() const override { return page_; }

  int create(size_t bytes) override {
    check_multiple(bytes, "create");
    const int fd = memfd_create("fluxtrain-weights", MFD_CLOEXEC);
    if (fd < 0) throw Error(sys_error("sharded weights: memfd_create"));
    if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
      close(fd);
      throw Error(sys_error(("sharded weights: sizing " + std::to_string(bytes) + " bytes of shared host memory").c_str()));
    }
    fds_.push_back(fd);
    return static_cast<int>(fds_.size()) - 1;
  }

  char* reserve(size_t bytes) override {
    check_multiple(bytes, "reserve");
    void* p = mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw Error(sys_error("sharded weights: reserving address space"));
    reserved_.emplace_back(static_cast<char*>(p), bytes);
    return static_cast<char*>(p);
  }

  void map(char* va, size_t bytes, int handle, size_t offset) override {
    if (bytes == 0) return;
    check_multiple(bytes, "map size");
    check_multiple(offset, "map offset");
    void* p = mmap(va, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fds_.at(handle), static_cast<off_t>(offset));
    if (p == MAP_FAILED) throw Error(sys_error("sharded weights: mapping shard memory"));
  }

 private:
  size_t page_;
  std::vector<int> fds_;
  std::vector<std::pair<char*, size_t>> reserved_;

  void check_multiple(size_t v, const char* what) const {
    if (v % page_ != 0)
      throw Error(std::string("mapped memory: ") + what + " " + std::to_string(v) + " is not a multiple of the page size",
                  ErrorKind::Internal);
  }
};

}  // namespace

std::unique_ptr<MappedMemory> make_host_mapped_memory() { return std::make_unique<HostMappedMemory>(); }

#ifndef FLUXTRAIN_WITH_CUDA
std::unique_ptr<MappedMemory> make_cuda_mapped_memory(int) {
  throw Error("sharded weights on CUDA need the GPU build (-DFLUXTRAIN_CUDA=ON)");
}
#endif

}  // namespace fluxtrain::dist
