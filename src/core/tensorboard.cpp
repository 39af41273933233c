// Built in the library fluxtrain_tensorboard (CMakeLists.txt), without LibTorch's include paths:
// the generated tensorboard_event.pb.h must meet the system protobuf headers it was made for.
#include "core/tensorboard.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include <boost/crc.hpp>

#include "core/error.h"
#if FLUXTRAIN_WITH_PROTOBUF
#include "src/core/tensorboard_event.pb.h"  // generated: build/proto/src/core/
#endif

namespace fluxtrain {

uint32_t crc32c(const void* data, size_t n) {
  // Castagnoli polynomial, reflected in and out, as TFRecord (and iSCSI) use it.
  boost::crc_optimal<32, 0x1EDC6F41, 0xFFFFFFFF, 0xFFFFFFFF, true, true> crc;
  crc.process_bytes(data, n);
  return crc.checksum();
}

uint32_t masked_crc32c(const void* data, size_t n) {
  const uint32_t c = crc32c(data, n);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

namespace {

void put_le(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

bool exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

}  // namespace

std::string tfrecord_frame(const std::string& data) {
  std::string out;
  out.reserve(data.size() + 16);
  put_le(out, data.size(), 8);
  put_le(out, masked_crc32c(out.data(), 8), 4);
  out += data;
  put_le(out, masked_crc32c(data.data(), data.size()), 4);
  return out;
}

#if FLUXTRAIN_WITH_PROTOBUF

bool tensorboard_available() { return true; }

TensorBoardWriter::TensorBoardWriter(const std::string& logdir) {
  if (!exists(logdir)) throw Error(logdir + ": TensorBoard log folder does not exist");
  char host[256] = {0};
  if (::gethostname(host, sizeof(host) - 1) != 0) std::strcpy(host, "localhost");
  const long t = static_cast<long>(now_seconds());
  path_ = logdir + "/events.out.tfevents." + std::to_string(t) + "." + host;
  // A run resumed within the same second must not append to (or replace) the earlier file.
  if (exists(path_)) path_ += "." + std::to_string(::getpid());
  f_ = std::fopen(path_.c_str(), "wb");
  if (!f_) throw Error(path_ + ": cannot create TensorBoard event file (" + std::strerror(errno) + ")");
  tb::Event e;
  e.set_wall_time(now_seconds());
  e.set_file_version("brain.Event:2");
  write_event(e.SerializeAsString());
}

TensorBoardWriter::~TensorBoardWriter() {
  if (f_) std::fclose(f_);
}

void TensorBoardWriter::write_event(const std::string& serialized) {
  const std::string rec = tfrecord_frame(serialized);
  // Flushed per record: TensorBoard shows a live run, and a crash leaves only whole records
  // (or one torn at the end, which readers skip).
  if (std::fwrite(rec.data(), 1, rec.size(), f_) != rec.size() || std::fflush(f_) != 0)
    throw Error(path_ + ": cannot write TensorBoard event (" + std::strerror(errno) + ")");
}

void TensorBoardWriter::add_scalars(int64_t step, const std::vector<std::pair<std::string, double>>& values) {
  if (values.empty()) return;
  tb::Event e;
  e.set_wall_time(now_seconds());
  e.set_step(step);
  for (const auto& [tag, v] : values) {
    tb::Summary::Value* sv = e.mutable_summary()->add_value();
    sv->set_tag(tag);
    sv->set_simple_value(static_cast<float>(v));
  }
  write_event(e.SerializeAsString());
}

void TensorBoardWriter::add_image_png(const std::string& tag, int64_t step, const std::string& png, int64_t height,
                                      int64_t width, int64_t channels) {
  tb::Event e;
  e.set_wall_time(now_seconds());
  e.set_step(step);
  tb::Summary::Value* sv = e.mutable_summary()->add_value();
  sv->set_tag(tag);
  tb::Summary::Image* im = sv->mutable_image();
  im->set_height(static_cast<int32_t>(height));
  im->set_width(static_cast<int32_t>(width));
  im->set_colorspace(static_cast<int32_t>(channels));
  im->set_encoded_image_string(png);
  write_event(e.SerializeAsString());
}

void TensorBoardWriter::add_session_start(int64_t step, const std::string& checkpoint_path) {
  tb::Event e;
  e.set_wall_time(now_seconds());
  e.set_step(step);
  e.mutable_session_log()->set_status(tb::SessionLog::START);
  e.mutable_session_log()->set_checkpoint_path(checkpoint_path);
  write_event(e.SerializeAsString());
}

#else  // built without protobuf

bool tensorboard_available() { return false; }
TensorBoardWriter::TensorBoardWriter(const std::string& logdir) {
  throw Error(logdir + ": this fluxtrain was built without protobuf, so it writes no TensorBoard event files "
                       "(install libprotobuf-dev and protobuf-compiler, and reconfigure)");
}
TensorBoardWriter::~TensorBoardWriter() = default;
void TensorBoardWriter::write_event(const std::string&) {}
void TensorBoardWriter::add_scalars(int64_t, const std::vector<std::pair<std::string, double>>&) {}
void TensorBoardWriter::add_image_png(const std::string&, int64_t, const std::string&, int64_t, int64_t, int64_t) {}
void TensorBoardWriter::add_session_start(int64_t, const std::string&) {}

#endif

}  // namespace fluxtrain
