#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"

namespace fluxtrain::safetensors {
namespace {

struct DTypeInfo {
  const char* name;
  at::ScalarType type;
  size_t bytes;
};

const std::vector<DTypeInfo>& dtype_table() {
  static const std::vector<DTypeInfo> table = {
      {"F64", at::kDouble, 8},          {"F32", at::kFloat, 4},
      {"F16", at::kHalf, 2},            {"BF16", at::kBFloat16, 2},
      {"F8_E4M3", at::kFloat8_e4m3fn, 1}, {"F8_E5M2", at::kFloat8_e5m2, 1},
      {"I64", at::kLong, 8},            {"I32", at::kInt, 4},
      {"I16", at::kShort, 2},           {"I8", at::kChar, 1},
      {"U8", at::kByte, 1},             {"BOOL", at::kBool, 1},
  };
  return table;
}

const DTypeInfo* find_dtype(const std::string& name) {
  for (const auto& d : dtype_table())
    if (name == d.name) return &d;
  return nullptr;
}

const DTypeInfo& find_dtype(at::ScalarType t, const std::string& tensor_name) {
  for (const auto& d : dtype_table())
    if (d.type == t) return d;
  throw Error("safetensors: tensor " + tensor_name + " has dtype " + std::string(c10::toString(t)) +
              ", which safetensors cannot store");
}

// Returns the whole pages inside [p, p + n) to the kernel. They belong to one entry only
// (entries do not overlap, boundary pages are kept), whose one view is being freed or whose
// bytes were just copied out; a later read faults them in again from the file.
void drop_pages(const uint8_t* p, size_t n) {
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page;
  const uintptr_t z = (reinterpret_cast<uintptr_t>(p) + n) / page * page;
  if (z > a) ::madvise(reinterpret_cast<void*>(a), z - a, MADV_DONTNEED);
}

}  // namespace

struct File::Mapping {
  void* addr = nullptr;
  size_t size = 0;
  int fd = -1;  // kept open: copies of an entry already viewed are read from the file itself
  ~Mapping() {
    if (addr) ::munmap(addr, size);
    if (fd >= 0) ::close(fd);
  }
};

File::File(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error(path + ": cannot open (" + std::strerror(errno) + ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(path + ": not a regular file");
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    throw Error(path + ": truncated safetensors file (" + std::to_string(size) +
                " bytes, expected at least an 8-byte header length)");
  }
  // Private and writable: loaded views may be written to (copy-on-write), never the file.
  void* addr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  if (addr == MAP_FAILED) {
    ::close(fd);
    throw Error(path + ": mmap failed (" + std::strerror(errno) + ")");
  }
  map_ = std::make_shared<Mapping>();
  map_->addr = addr;
  map_->size = size;
  map_->fd = fd;
  const auto* bytes = static_cast<const uint8_t*>(addr);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];  // little-endian u64
  if (header_len > size - 8) {
    throw Error(path + ": header length " + std::to_string(header_len) +
                " runs past the end of the file (" + std::to_string(size) + " bytes)");
  }
  const uint64_t data_size = size - 8 - header_len;
  data_ = bytes + 8 + header_len;

  nlohmann::json header;
  try {
    header = nlohmann::json::parse(reinterpret_cast<const char*>(bytes + 8),
                                   reinterpret_cast<const char*>(bytes + 8 + header_len));
  } catch (const std::exception& e) {
    throw Error(path + ": header is not valid JSON (" + std::string(e.what()) + ")");
  }
  if (!header.is_object()) throw Error(path + ": header is not a JSON object");

  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const auto& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) throw Error(path + ": __metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string())
          throw Error(path + ": __metadata__ value of " + m.key() + " is not a string");
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = path + ": tensor " + name;
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets"))
      throw Error(where + ": entry needs dtype, shape and data_offsets");
    if (!v["dtype"].is_string()) throw Error(where + ": dtype is not a string");
    Entry e;
    e.dtype = v["dtype"].get<std::string>();
    const DTypeInfo* dt = find_dtype(e.dtype);
    if (!dt) throw Error(where + ": unknown dtype " + e.dtype);
    if (!v["shape"].is_array()) throw Error(where + ": shape is not an array");
    uint64_t numel = 1;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0)
        throw Error(where + ": shape has a non-integer or negative dimension");
      e.shape.push_back(d.get<int64_t>());
      numel *= static_cast<uint64_t>(d.get<int64_t>());
    }
    const auto& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      throw Error(where + ": data_offsets must be two non-negative integers");
    e.begin = off[0].get<uint64_t>();
    e.end = off[1].get<uint64_t>();
    if (e.begin > e.end || e.end > data_size)
      throw Error(where + ": data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
                  "] out of range (data section is " + std::to_string(data_size) + " bytes)");
    if (e.end - e.begin != numel * dt->bytes)
      throw Error(where + ": data_offsets span " + std::to_string(e.end - e.begin) + " bytes, shape and " +
                  e.dtype + " need " + std::to_string(numel * dt->bytes));
    ranges.emplace_back(e.begin, e.end);
    entries_.emplace(name, std::move(e));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first < ranges[i - 1].second && ranges[i].first != ranges[i].second)
      throw Error(path + ": tensors overlap in the data section");
}

File::~File() = default;  // views handed out keep the mapping

bool File::is_view(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw Error(path_ + ": no tensor named " + name);
  const Entry& e = it->second;
  std::lock_guard<std::mutex> lock(mutex_);
  return e.end > e.begin && reinterpret_cast<uintptr_t>(data_ + e.begin) % find_dtype(e.dtype)->bytes == 0 &&
         viewed_.count(name) == 0;
}

at::Tensor File::load(const std::string& name) const {
  bool view = is_view(name);
  if (view) {
    std::lock_guard<std::mutex> lock(mutex_);
    view = viewed_.insert(name).second;  // another thread may have taken the view meanwhile
  }
  const Entry& e = entries_.at(name);
  const auto opts = at::TensorOptions().dtype(find_dtype(e.dtype)->type);
  const uint8_t* src = data_ + e.begin;
  const size_t n = e.end - e.begin;
  if (view) {
    std::shared_ptr<Mapping> keep = map_;
    return at::from_blob(const_cast<uint8_t*>(src), e.shape,
                         [keep, src, n](void*) { drop_pages(src, n); }, opts);
  }
  at::Tensor t = at::empty(e.shape, opts);
  if (n == 0) return t;
  bool viewed;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    viewed = viewed_.count(name) != 0;
  }
  if (!viewed) {
    std::memcpy(t.data_ptr(), src, n);
    drop_pages(src, n);
    return t;
  }
  // The view may have been written to: read the bytes from the file, not the mapping.
  auto* dst = static_cast<char*>(t.data_ptr());
  const off_t file_offset = static_cast<off_t>(src - static_cast<const uint8_t*>(map_->addr));
  for (size_t done = 0; done < n;) {
    const ssize_t r = ::pread(map_->fd, dst + done, n - done, file_offset + static_cast<off_t>(done));
    if (r <= 0) throw Error(path_ + ": tensor " + name + ": read failed (" + std::strerror(errno) + ")");
    done += static_cast<size_t>(r);
  }
  return t;
}

TensorMap File::load_all() const {
  TensorMap out;
  for (const auto& kv : entries_) out.emplace(kv.first, load(kv.first));
  return out;
}

TensorMap load(const std::string& path) { return File(path).load_all(); }

void save(const std::string& path, const TensorMap& tensors,
          const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> blobs;
  uint64_t offset = 0;
  for (const auto& kv : tensors) {
    at::Tensor t = kv.second.detach().to(at::kCPU).contiguous();
    const DTypeInfo& dt = find_dtype(t.scalar_type(), kv.first);
    const uint64_t nbytes = static_cast<uint64_t>(t.numel()) * dt.bytes;
    header[kv.first] = {{"dtype", dt.name}, {"shape", t.sizes().vec()}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    blobs.push_back(t);
  }
  std::string h = header.dump();
  while ((h.size() + 8) % 8 != 0) h.push_back(' ');  // align the data section to 8 bytes
  AtomicFile out(path);
  uint8_t len[8];
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>((n >> (8 * i)) & 0xff);
  out.write(len, 8);
  out.write(h.data(), h.size());
  for (const auto& t : blobs) out.write(t.data_ptr(), t.numel() * t.element_size());
  out.commit();
}

}  // namespace fluxtrain::safetensors
