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

}  // namespace

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
  map_size_ = size;
  map_ = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    throw Error(path + ": mmap failed (" + std::strerror(errno) + ")");
  }
  const auto* bytes = static_cast<const uint8_t*>(map_);
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

File::~File() {
  if (map_) ::munmap(map_, map_size_);
}

at::Tensor File::load(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw Error(path_ + ": no tensor named " + name);
  const Entry& e = it->second;
  at::Tensor t = at::empty(e.shape, at::TensorOptions().dtype(find_dtype(e.dtype)->type));
  if (e.end > e.begin) std::memcpy(t.data_ptr(), data_ + e.begin, e.end - e.begin);
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
