#include "core/hdf5_io.h"

#include <hdf5.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>

#include <ATen/ATen.h>

#include "core/error.h"
#include "core/fs.h"

namespace fluxtrain::h5 {
namespace {

enum Kind { kNone = 0, kFile = 1, kGroup = 2, kDataset = 3 };

// Serialises all HDF5 calls and silences HDF5's stderr error stacks (a per-thread setting in
// thread-safe builds, hence once per thread).
struct Guard {
  std::lock_guard<std::recursive_mutex> g{lock()};
  Guard() {
    // No library shutdown at exit (before HDF5's first call, or it has no effect): after a
    // failed write (a full disk) H5Fclose fails and leaves the file half-open, and HDF5's atexit
    // clean-up then crashed in H5F__close_cb (exit 139 after the error message). Every file we
    // open is closed by its Object; the process's exit releases the rest.
    static const bool no_atexit = (H5dont_atexit(), true);
    (void)no_atexit;
    thread_local bool silenced = false;
    if (!silenced) {
      H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
      silenced = true;
    }
  }
};

// Closes a plain hid_t (types, spaces, property lists, attributes) at scope exit.
struct Hid {
  hid_t id;
  herr_t (*fn)(hid_t);
  Hid(hid_t i, herr_t (*f)(hid_t)) : id(i), fn(f) {}
  ~Hid() {
    if (id >= 0) fn(id);
  }
  Hid(const Hid&) = delete;
  Hid& operator=(const Hid&) = delete;
  operator hid_t() const { return id; }
};

hid_t mem_type(at::ScalarType t, const std::string& where) {
  switch (t) {
    case at::kFloat: return H5T_NATIVE_FLOAT;
    case at::kDouble: return H5T_NATIVE_DOUBLE;
    case at::kLong: return H5T_NATIVE_INT64;
    case at::kInt: return H5T_NATIVE_INT32;
    case at::kShort: return H5T_NATIVE_INT16;
    case at::kByte: return H5T_NATIVE_UINT8;
    case at::kBool: return H5T_NATIVE_UINT8;
    case at::kBFloat16: return H5T_NATIVE_UINT16;
    case at::kHalf: return H5T_NATIVE_UINT16;
    default: throw Error(where + ": cannot store dtype " + std::string(c10::toString(t)), ErrorKind::Internal);
  }
}

// Our dtype for a dataset's file type (+ its "dtype" attribute for 16-bit floats).
at::ScalarType tensor_type(hid_t dset, const std::string& where) {
  Hid type(H5Dget_type(dset), H5Tclose);
  if (type < 0) throw Error(where + ": cannot read dataset type");
  const H5T_class_t cls = H5Tget_class(type);
  const size_t size = H5Tget_size(type);
  if (cls == H5T_FLOAT) {
    if (size == 4) return at::kFloat;
    if (size == 8) return at::kDouble;
  } else if (cls == H5T_INTEGER) {
    const bool is_signed = H5Tget_sign(type) == H5T_SGN_2;
    if (size == 8 && is_signed) return at::kLong;
    if (size == 4 && is_signed) return at::kInt;
    if (size == 2 && is_signed) return at::kShort;
    if (size == 1 && !is_signed) return at::kByte;
    if (size == 2 && !is_signed) {
      if (H5Aexists(dset, "dtype") > 0) {
        Hid a(H5Aopen(dset, "dtype", H5P_DEFAULT), H5Aclose);
        Hid atype(H5Aget_type(a), H5Tclose);
        std::string s;
        if (H5Tis_variable_str(atype) > 0) {
          char* p = nullptr;
          Hid mt(H5Tcopy(H5T_C_S1), H5Tclose);
          H5Tset_size(mt, H5T_VARIABLE);
          if (H5Aread(a, mt, &p) >= 0 && p) {
            s = p;
            H5free_memory(p);
          }
        } else {
          std::string buf(H5Tget_size(atype), '\0');
          if (H5Aread(a, atype, buf.data()) >= 0) s = buf.c_str();
        }
        if (s == "bfloat16") return at::kBFloat16;
        if (s == "float16") return at::kHalf;
      }
    }
  }
  throw Error(where + ": unsupported element type (class " + std::to_string(cls) + ", " + std::to_string(size) +
              " bytes)");
}

std::vector<hsize_t> to_hs(const std::vector<int64_t>& v) { return std::vector<hsize_t>(v.begin(), v.end()); }

void write_string_attr(hid_t obj, const std::string& name, const std::string& v, const std::string& where) {
  if (H5Aexists(obj, name.c_str()) > 0) H5Adelete(obj, name.c_str());
  Hid type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type, std::max<size_t>(1, v.size() + 1));
  H5Tset_strpad(type, H5T_STR_NULLTERM);
  H5Tset_cset(type, H5T_CSET_UTF8);
  Hid space(H5Screate(H5S_SCALAR), H5Sclose);
  Hid a(H5Acreate2(obj, name.c_str(), type, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  std::string buf = v;
  buf.push_back('\0');
  if (a < 0 || H5Awrite(a, type, buf.data()) < 0) throw Error(where + ": cannot write attribute " + name);
}

// The name an in-memory file has inside HDF5: the core driver refuses a name that exists on
// disk (even without a backing store) and one already open, so each gets its own name that no
// file has; messages use the caller's name.
std::string in_memory_name() {
  static std::atomic<uint64_t> n{0};
  return "/nonexistent/fluxtrain-in-memory-" + std::to_string(::getpid()) + "-" + std::to_string(n++);
}

// " (reason)" for a message, or "".
std::string because() {
  const std::string r = error_reason();
  return r.empty() ? "" : " (" + r + ")";
}

}  // namespace

std::string error_reason() {
  // HDF5's file drivers record the system error in the description of their stack entry:
  // "... errno = 28, error message = 'No space left on device', ...". Prefer that; otherwise
  // the innermost entry's own description.
  struct Found {
    std::string system, innermost;
  } found;
  auto walk = [](unsigned n, const H5E_error2_t* e, void* data) -> herr_t {
    auto* f = static_cast<Found*>(data);
    const std::string desc = e->desc ? e->desc : "";
    const std::string key = "error message = '";
    const size_t at = desc.find(key);
    if (at != std::string::npos && f->system.empty()) {
      const size_t end = desc.find('\'', at + key.size());
      f->system = desc.substr(at + key.size(), end == std::string::npos ? std::string::npos : end - at - key.size());
    }
    if (n == 0) f->innermost = desc;
    return 0;
  };
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, walk, &found);
  return !found.system.empty() ? found.system : found.innermost;
}

std::recursive_mutex& lock() {
  static std::recursive_mutex m;
  return m;
}

// ---------------------------------------------------------------------------------------------
Object::Object(hid id, int kind, std::string file, std::string path)
    : id_(id), kind_(kind), file_(std::move(file)), path_(std::move(path)) {}

Object::~Object() { close(); }

Object::Object(Object&& o) noexcept : id_(o.id_), kind_(o.kind_), file_(std::move(o.file_)), path_(std::move(o.path_)) {
  o.id_ = -1;
}

Object& Object::operator=(Object&& o) noexcept {
  if (this != &o) {
    close();
    id_ = o.id_;
    kind_ = o.kind_;
    file_ = std::move(o.file_);
    path_ = std::move(o.path_);
    o.id_ = -1;
  }
  return *this;
}

void Object::close() {
  if (id_ < 0) return;
  Guard g;
  if (kind_ == kFile) H5Fclose(id_);
  else if (kind_ == kGroup) H5Gclose(id_);
  else if (kind_ == kDataset) H5Dclose(id_);
  id_ = -1;
}

std::string Object::where(const std::string& child) const {
  std::string p = path_;
  if (!child.empty()) p = (p == "/" ? "/" : p + "/") + child;
  return file_ + ": " + p;
}

// ---------------------------------------------------------------------------------------------
bool Location::has(const std::string& name) const {
  Guard g;
  // H5Lexists fails (rather than returning 0) when an intermediate group is missing: walk it.
  std::string prefix;
  size_t start = 0;
  while (true) {
    const size_t slash = name.find('/', start);
    prefix = name.substr(0, slash);
    if (H5Lexists(id_, prefix.c_str(), H5P_DEFAULT) <= 0) return false;
    if (slash == std::string::npos) return true;
    start = slash + 1;
  }
}

Location Location::group(const std::string& name) const {
  Guard g;
  if (!has(name)) throw Error(where(name) + ": missing group");
  hid_t id = H5Gopen2(id_, name.c_str(), H5P_DEFAULT);
  if (id < 0) throw Error(where(name) + ": not a group");
  return Location(id, kGroup, file_, (path_ == "/" ? "/" : path_ + "/") + name);
}

Location Location::create_group(const std::string& name) const {
  Guard g;
  hid_t id = H5Gcreate2(id_, name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  if (id < 0) throw Error(where(name) + ": cannot create group");
  return Location(id, kGroup, file_, (path_ == "/" ? "/" : path_ + "/") + name);
}

std::vector<std::string> Location::children() const {
  Guard g;
  std::vector<std::string> names;
  auto cb = [](hid_t, const char* name, const H5L_info_t*, void* data) -> herr_t {
    static_cast<std::vector<std::string>*>(data)->push_back(name);
    return 0;
  };
  if (H5Literate(id_, H5_INDEX_NAME, H5_ITER_INC, nullptr, cb, &names) < 0)
    throw Error(where() + ": cannot list children");
  std::sort(names.begin(), names.end());
  return names;
}

bool Location::has_attr(const std::string& name) const {
  Guard g;
  return H5Aexists(id_, name.c_str()) > 0;
}

void Location::set_attr(const std::string& name, int64_t v) const { set_attr(name, std::vector<int64_t>{v}); }

void Location::set_attr(const std::string& name, double v) const {
  Guard g;
  if (H5Aexists(id_, name.c_str()) > 0) H5Adelete(id_, name.c_str());
  Hid space(H5Screate(H5S_SCALAR), H5Sclose);
  Hid a(H5Acreate2(id_, name.c_str(), H5T_IEEE_F64LE, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  if (a < 0 || H5Awrite(a, H5T_NATIVE_DOUBLE, &v) < 0) throw Error(where() + ": cannot write attribute " + name);
}

void Location::set_attr(const std::string& name, const std::string& v) const {
  Guard g;
  write_string_attr(id_, name, v, where());
}

void Location::set_attr(const std::string& name, const std::vector<int64_t>& v) const {
  Guard g;
  if (H5Aexists(id_, name.c_str()) > 0) H5Adelete(id_, name.c_str());
  hsize_t n = v.size();
  Hid space(v.size() == 1 ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, &n, nullptr), H5Sclose);
  Hid a(H5Acreate2(id_, name.c_str(), H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  if (a < 0 || (!v.empty() && H5Awrite(a, H5T_NATIVE_INT64, v.data()) < 0))
    throw Error(where() + ": cannot write attribute " + name);
}

std::vector<int64_t> Location::attr_ints(const std::string& name) const {
  Guard g;
  if (H5Aexists(id_, name.c_str()) <= 0) throw Error(where() + ": missing attribute " + name);
  Hid a(H5Aopen(id_, name.c_str(), H5P_DEFAULT), H5Aclose);
  Hid space(H5Aget_space(a), H5Sclose);
  Hid type(H5Aget_type(a), H5Tclose);
  if (H5Tget_class(type) != H5T_INTEGER) throw Error(where() + ": attribute " + name + " is not an integer");
  const hssize_t n = H5Sget_simple_extent_npoints(space);
  std::vector<int64_t> v(static_cast<size_t>(std::max<hssize_t>(n, 0)));
  if (!v.empty() && H5Aread(a, H5T_NATIVE_INT64, v.data()) < 0)
    throw Error(where() + ": cannot read attribute " + name);
  return v;
}

int64_t Location::attr_int(const std::string& name) const {
  auto v = attr_ints(name);
  if (v.size() != 1) throw Error(where() + ": attribute " + name + " is not a single integer");
  return v[0];
}

double Location::attr_double(const std::string& name) const {
  Guard g;
  if (H5Aexists(id_, name.c_str()) <= 0) throw Error(where() + ": missing attribute " + name);
  Hid a(H5Aopen(id_, name.c_str(), H5P_DEFAULT), H5Aclose);
  Hid space(H5Aget_space(a), H5Sclose);
  if (H5Sget_simple_extent_npoints(space) != 1) throw Error(where() + ": attribute " + name + " is not a scalar");
  double v = 0;
  if (H5Aread(a, H5T_NATIVE_DOUBLE, &v) < 0) throw Error(where() + ": attribute " + name + " is not a number");
  return v;
}

std::string Location::attr_string(const std::string& name) const {
  Guard g;
  if (H5Aexists(id_, name.c_str()) <= 0) throw Error(where() + ": missing attribute " + name);
  Hid a(H5Aopen(id_, name.c_str(), H5P_DEFAULT), H5Aclose);
  Hid type(H5Aget_type(a), H5Tclose);
  if (H5Tget_class(type) != H5T_STRING) throw Error(where() + ": attribute " + name + " is not a string");
  if (H5Tis_variable_str(type) > 0) {
    char* p = nullptr;
    Hid mt(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(mt, H5T_VARIABLE);
    if (H5Aread(a, mt, &p) < 0) throw Error(where() + ": cannot read attribute " + name);
    std::string s = p ? p : "";
    if (p) H5free_memory(p);
    return s;
  }
  std::string buf(H5Tget_size(type), '\0');
  if (H5Aread(a, type, buf.data()) < 0) throw Error(where() + ": cannot read attribute " + name);
  return std::string(buf.c_str());
}

// ---------------------------------------------------------------------------------------------
void Location::write_tensor(const std::string& name, const at::Tensor& tensor, const WriteOptions& o) const {
  Guard g;
  const std::string w = where(name);
  at::Tensor t = tensor.detach().cpu().contiguous();
  const at::ScalarType st = t.scalar_type();
  if (st == at::kBool) t = t.to(at::kByte);
  const hid_t mt = mem_type(st, w);
  const hid_t ft = (st == at::kBFloat16 || st == at::kHalf) ? H5T_STD_U16LE : mt;
  const std::vector<hsize_t> dims = to_hs(t.sizes().vec());
  Hid space(dims.empty() ? H5Screate(H5S_SCALAR) : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
            H5Sclose);
  Hid dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  if (!dims.empty() && t.numel() > 0) {
    // Chunks of whole rows along dim 0, about chunk_bytes each: a row read touches few chunks.
    std::vector<hsize_t> chunk = dims;
    const int64_t row_bytes = std::max<int64_t>(1, t.numel() / t.size(0) * t.element_size());
    chunk[0] = static_cast<hsize_t>(std::clamp<int64_t>(o.chunk_bytes / row_bytes, 1, t.size(0)));
    H5Pset_chunk(dcpl, static_cast<int>(chunk.size()), chunk.data());
    if (o.deflate > 0) {
      H5Pset_shuffle(dcpl);
      H5Pset_deflate(dcpl, static_cast<unsigned>(o.deflate));
    }
  }
  if (H5Lexists(id_, name.c_str(), H5P_DEFAULT) > 0) H5Ldelete(id_, name.c_str(), H5P_DEFAULT);
  Hid ds(H5Dcreate2(id_, name.c_str(), ft, space, H5P_DEFAULT, dcpl, H5P_DEFAULT), H5Dclose);
  if (ds < 0) throw Error(w + ": cannot create dataset" + because());
  if (t.numel() > 0 && H5Dwrite(ds, mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data_ptr()) < 0)
    throw Error(w + ": write failed" + because());
  if (st == at::kBFloat16) write_string_attr(ds, "dtype", "bfloat16", w);
  if (st == at::kHalf) write_string_attr(ds, "dtype", "float16", w);
  if (st == at::kBool) write_string_attr(ds, "dtype", "bool", w);
}

std::vector<int64_t> Location::shape(const std::string& name) const {
  Guard g;
  if (!has(name)) throw Error(where(name) + ": missing dataset");
  Hid ds(H5Dopen2(id_, name.c_str(), H5P_DEFAULT), H5Dclose);
  if (ds < 0) throw Error(where(name) + ": not a dataset");
  Hid space(H5Dget_space(ds), H5Sclose);
  const int nd = H5Sget_simple_extent_ndims(space);
  if (nd < 0) throw Error(where(name) + ": cannot read shape");
  std::vector<hsize_t> dims(static_cast<size_t>(nd));
  H5Sget_simple_extent_dims(space, dims.data(), nullptr);
  return std::vector<int64_t>(dims.begin(), dims.end());
}

at::Tensor Location::read_tensor(const std::string& name) const {
  Guard g;
  auto dims = shape(name);
  if (dims.empty()) {
    // Scalar dataset: one element.
    Hid ds(H5Dopen2(id_, name.c_str(), H5P_DEFAULT), H5Dclose);
    const at::ScalarType st = tensor_type(ds, where(name));
    at::Tensor t = at::empty({}, at::TensorOptions().dtype(st));
    if (H5Dread(ds, mem_type(st, where(name)), H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data_ptr()) < 0)
      throw Error(where(name) + ": read failed (corrupt file?)");
    return t;
  }
  return read_rows(name, 0, dims[0]);
}

at::Tensor Location::read_rows(const std::string& name, int64_t begin, int64_t count) const {
  Guard g;
  const std::string w = where(name);
  auto dims = shape(name);
  if (dims.empty()) throw Error(w + ": expected an array, found a scalar");
  if (begin < 0 || count < 0 || begin + count > dims[0])
    throw Error(w + ": rows [" + std::to_string(begin) + ", " + std::to_string(begin + count) +
                ") out of range (dataset has " + std::to_string(dims[0]) + ")");
  Hid ds(H5Dopen2(id_, name.c_str(), H5P_DEFAULT), H5Dclose);
  const at::ScalarType st = tensor_type(ds, w);
  std::vector<int64_t> out_dims = dims;
  out_dims[0] = count;
  at::Tensor t = at::empty(out_dims, at::TensorOptions().dtype(st));
  if (t.numel() == 0) return t;
  Hid fspace(H5Dget_space(ds), H5Sclose);
  std::vector<hsize_t> start(dims.size(), 0), cnt = to_hs(out_dims);
  start[0] = static_cast<hsize_t>(begin);
  H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start.data(), nullptr, cnt.data(), nullptr);
  Hid mspace(H5Screate_simple(static_cast<int>(cnt.size()), cnt.data(), nullptr), H5Sclose);
  if (H5Dread(ds, mem_type(st, w), mspace, fspace, H5P_DEFAULT, t.data_ptr()) < 0)
    throw Error(w + ": read failed (corrupt or truncated file?)");
  return t;
}

void Location::write_strings(const std::string& name, const std::vector<std::string>& s, bool fixed_length) const {
  Guard g;
  const std::string w = where(name);
  Hid type(H5Tcopy(H5T_C_S1), H5Tclose);
  size_t longest = 1;
  for (const auto& x : s) longest = std::max(longest, x.size() + 1);
  H5Tset_size(type, fixed_length ? longest : H5T_VARIABLE);
  if (fixed_length) H5Tset_strpad(type, H5T_STR_NULLTERM);
  H5Tset_cset(type, H5T_CSET_UTF8);
  hsize_t n = s.size();
  Hid space(H5Screate_simple(1, &n, nullptr), H5Sclose);
  if (H5Lexists(id_, name.c_str(), H5P_DEFAULT) > 0) H5Ldelete(id_, name.c_str(), H5P_DEFAULT);
  Hid ds(H5Dcreate2(id_, name.c_str(), type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
  if (ds < 0) throw Error(w + ": cannot create dataset");
  if (fixed_length) {
    std::string buf(longest * s.size(), '\0');
    for (size_t i = 0; i < s.size(); ++i) buf.replace(i * longest, s[i].size(), s[i]);
    if (!s.empty() && H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()) < 0)
      throw Error(w + ": write failed" + because());
    return;
  }
  std::vector<const char*> ptrs;
  for (const auto& x : s) ptrs.push_back(x.c_str());
  if (!ptrs.empty() && H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, ptrs.data()) < 0)
    throw Error(w + ": write failed" + because());
}

std::vector<std::string> Location::read_strings(const std::string& name, bool allow_variable) const {
  Guard g;
  const std::string w = where(name);
  auto dims = shape(name);
  if (dims.size() != 1) throw Error(w + ": expected a 1-d string array");
  Hid ds(H5Dopen2(id_, name.c_str(), H5P_DEFAULT), H5Dclose);
  Hid ftype(H5Dget_type(ds), H5Tclose);
  if (H5Tget_class(ftype) != H5T_STRING) throw Error(w + ": not a string array");
  std::vector<std::string> out;
  if (dims[0] == 0) return out;
  if (H5Tis_variable_str(ftype) > 0 && !allow_variable)
    throw Error(w + ": variable-length strings where fixed-length ones were written (damaged or foreign file)");
  // Everything below is sized from the file's shape: the result (one std::string per element),
  // plus the read buffer (a pointer or the fixed size per element), at most 1 GiB.
  const size_t elem = H5Tis_variable_str(ftype) > 0 ? sizeof(char*) : H5Tget_size(ftype);
  if (static_cast<double>(elem + sizeof(std::string)) * static_cast<double>(dims[0]) > (1u << 30))
    throw Error(w + ": string array of " + std::to_string(dims[0]) + " x " + std::to_string(elem) +
                " bytes is implausible (damaged file?)");
  if (H5Tis_variable_str(ftype) > 0) {
    Hid mt(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(mt, H5T_VARIABLE);
    H5Tset_cset(mt, H5Tget_cset(ftype));
    std::vector<char*> ptrs(static_cast<size_t>(dims[0]), nullptr);
    if (H5Dread(ds, mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, ptrs.data()) < 0) throw Error(w + ": read failed");
    for (char* p : ptrs) out.emplace_back(p ? p : "");
    Hid space(H5Dget_space(ds), H5Sclose);
#if H5_VERSION_GE(1, 12, 0)
    H5Treclaim(mt, space, H5P_DEFAULT, ptrs.data());
#else
    H5Dvlen_reclaim(mt, space, H5P_DEFAULT, ptrs.data());
#endif
  } else {
    const size_t sz = H5Tget_size(ftype);
    if (sz == 0)
      throw Error(w + ": string array of " + std::to_string(dims[0]) + " x " + std::to_string(sz) +
                  " bytes is implausible (damaged file?)");
    std::string buf(sz * static_cast<size_t>(dims[0]), '\0');
    if (H5Dread(ds, ftype, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()) < 0) throw Error(w + ": read failed");
    for (int64_t i = 0; i < dims[0]; ++i) out.emplace_back(std::string(buf.data() + i * sz, sz).c_str());
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
File File::open(const std::string& path, bool writable) {
  Guard g;
  if (!path_exists(path)) throw Error(path + ": no such file");
  if (is_directory(path)) throw Error(path + ": is a directory, expected an HDF5 file");
  const htri_t is = H5Fis_hdf5(path.c_str());
  if (is <= 0) throw Error(path + ": not an HDF5 file (corrupt, truncated or another format)");
  hid_t id = H5Fopen(path.c_str(), writable ? H5F_ACC_RDWR : H5F_ACC_RDONLY, H5P_DEFAULT);
  if (id < 0) throw Error(path + ": cannot open HDF5 file (corrupt or truncated?)");
  return File(id, kFile, path, "/");
}

File File::create(const std::string& path) {
  Guard g;
  hid_t id = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  if (id < 0) throw Error(path + ": cannot create HDF5 file" + because());
  return File(id, kFile, path, "/");
}

void File::flush() const {
  Guard g;
  if (H5Fflush(id_, H5F_SCOPE_GLOBAL) < 0) throw Error(file_ + ": flush failed" + because());
}

File File::create_in_memory(const std::string& name) {
  Guard g;
  Hid fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  // 1 MiB growth steps; backing_store = 0: the image stays in memory.
  if (fapl < 0 || H5Pset_fapl_core(fapl, 1 << 20, 0) < 0)
    throw Error(name + ": cannot set up an in-memory HDF5 file" + because(), ErrorKind::Internal);
  hid_t id = H5Fcreate(in_memory_name().c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
  if (id < 0) throw Error(name + ": cannot create an in-memory HDF5 file" + because(), ErrorKind::Internal);
  return File(id, kFile, name, "/");
}

std::string File::image() const {
  Guard g;
  if (H5Fflush(id_, H5F_SCOPE_GLOBAL) < 0) throw Error(file_ + ": flush failed" + because());
  const ssize_t n = H5Fget_file_image(id_, nullptr, 0);
  if (n < 0) throw Error(file_ + ": cannot get the file image" + because(), ErrorKind::Internal);
  std::string bytes(static_cast<size_t>(n), '\0');
  if (n > 0 && H5Fget_file_image(id_, bytes.data(), bytes.size()) != n)
    throw Error(file_ + ": cannot get the file image" + because(), ErrorKind::Internal);
  return bytes;
}

File File::open_image(const std::string& name, const std::string& bytes) {
  Guard g;
  // The same signature test as H5Fis_hdf5 (at 0, 512, 1024, ...), without a file to look at:
  // anything else makes the core driver fail with a less useful message.
  static const char kSig[8] = {'\x89', 'H', 'D', 'F', '\r', '\n', '\x1a', '\n'};
  bool sig = false;
  for (size_t at = 0; at + 8 <= bytes.size() && !sig; at = at ? at * 2 : 512)
    sig = bytes.compare(at, 8, kSig, 8) == 0;
  if (!sig) throw Error(name + ": not an HDF5 file (corrupt, truncated or another format)");
  Hid fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  if (fapl < 0 || H5Pset_fapl_core(fapl, 1 << 20, 0) < 0 ||
      H5Pset_file_image(fapl, const_cast<char*>(bytes.data()), bytes.size()) < 0)
    throw Error(name + ": cannot set up an in-memory HDF5 file" + because(), ErrorKind::Internal);
  hid_t id = H5Fopen(in_memory_name().c_str(), H5F_ACC_RDONLY, fapl);
  if (id < 0) throw Error(name + ": cannot open HDF5 file (corrupt or truncated?)");
  return File(id, kFile, name, "/");
}

// ---------------------------------------------------------------------------------------------
Appendable::Appendable(const Location& parent, const std::string& name, at::ScalarType dtype,
                       std::vector<int64_t> inner_shape, int64_t chunk_rows, int deflate)
    : dtype_(dtype), inner_(std::move(inner_shape)) {
  Guard g;
  const std::string w = parent.where(name);
  std::vector<hsize_t> dims{0}, maxdims{H5S_UNLIMITED}, chunk{static_cast<hsize_t>(std::max<int64_t>(1, chunk_rows))};
  for (int64_t d : inner_) {
    dims.push_back(static_cast<hsize_t>(d));
    maxdims.push_back(static_cast<hsize_t>(d));
    chunk.push_back(static_cast<hsize_t>(std::max<int64_t>(1, d)));
  }
  Hid space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), maxdims.data()), H5Sclose);
  Hid dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  H5Pset_chunk(dcpl, static_cast<int>(chunk.size()), chunk.data());
  if (deflate > 0) {
    H5Pset_shuffle(dcpl);
    H5Pset_deflate(dcpl, static_cast<unsigned>(deflate));
  }
  const hid_t mt = mem_type(dtype, w);
  const hid_t ft = (dtype == at::kBFloat16 || dtype == at::kHalf) ? H5T_STD_U16LE : mt;
  hid_t id = H5Dcreate2(parent.id(), name.c_str(), ft, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
  if (id < 0) throw Error(w + ": cannot create dataset");
  ds_ = Object(id, kDataset, parent.file(), (parent.path() == "/" ? "/" : parent.path() + "/") + name);
  if (dtype == at::kBFloat16) write_string_attr(id, "dtype", "bfloat16", w);
  if (dtype == at::kHalf) write_string_attr(id, "dtype", "float16", w);
}

void Appendable::append(const at::Tensor& rows) {
  Guard g;
  const std::string w = ds_.where();
  at::Tensor t = rows.detach().cpu().to(dtype_).contiguous();
  std::vector<int64_t> expect_inner(t.sizes().begin() + std::min<int64_t>(1, t.dim()), t.sizes().end());
  if (t.dim() != static_cast<int64_t>(inner_.size()) + 1 || expect_inner != inner_)
    throw Error(w + ": appended rows have the wrong shape", ErrorKind::Internal);
  const int64_t n = t.size(0);
  if (n == 0) return;
  std::vector<hsize_t> newdims{static_cast<hsize_t>(rows_ + n)}, start{static_cast<hsize_t>(rows_)},
      cnt{static_cast<hsize_t>(n)};
  for (int64_t d : inner_) {
    newdims.push_back(static_cast<hsize_t>(d));
    start.push_back(0);
    cnt.push_back(static_cast<hsize_t>(d));
  }
  if (H5Dset_extent(ds_.id(), newdims.data()) < 0) throw Error(w + ": cannot extend dataset" + because());
  Hid fspace(H5Dget_space(ds_.id()), H5Sclose);
  H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start.data(), nullptr, cnt.data(), nullptr);
  Hid mspace(H5Screate_simple(static_cast<int>(cnt.size()), cnt.data(), nullptr), H5Sclose);
  if (H5Dwrite(ds_.id(), mem_type(dtype_, w), mspace, fspace, H5P_DEFAULT, t.data_ptr()) < 0)
    throw Error(w + ": write failed" + because());
  rows_ += n;
}

}  // namespace fluxtrain::h5
