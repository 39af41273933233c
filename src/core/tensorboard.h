// TensorBoard event files: what `tensorboard --logdir` and its EventAccumulator read.
//
// A file is a sequence of TFRecords, each
//   uint64 length (little-endian) | uint32 masked CRC32C of those 8 bytes | data | uint32 masked CRC32C of data
// where data is a serialized Event (core/tensorboard_event.proto, TensorBoard's field numbers).
// The first record holds file_version "brain.Event:2"; the others a Summary of scalars or images.
// Every write is flushed, so a crashed run keeps all whole records and readers stop at a torn one.
// A run that resumes opens a new file in the same folder; TensorBoard merges the files of a folder.
//
// This file knows nothing of FLUX or tensors: images come in already encoded (PNG bytes; see
// data/image_io.h encode_png). protobuf stays inside tensorboard.cpp, built in its own small
// library so that LibTorch's bundled protobuf headers never meet the system's.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

namespace fluxtrain {

// CRC-32C (Castagnoli, reflected, init and final xor 0xFFFFFFFF): "123456789" -> 0xE3069283.
uint32_t crc32c(const void* data, size_t n);
// TFRecord's masking: rotate right by 15 bits, add 0xa282ead8.
uint32_t masked_crc32c(const void* data, size_t n);
// One TFRecord around `data`.
std::string tfrecord_frame(const std::string& data);

// False in a build without protobuf; the writer's constructor then throws saying so.
bool tensorboard_available();

class TensorBoardWriter {
 public:
  // Creates `logdir` if needed and opens logdir/events.out.tfevents.<unix seconds>.<host>
  // (".<pid>" appended if that name exists), writing the file_version record.
  explicit TensorBoardWriter(const std::string& logdir);
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  // One Event at `step` holding a simple_value per (tag, value); non-finite values are kept
  // (TensorBoard plots NaN as a gap).
  void add_scalars(int64_t step, const std::vector<std::pair<std::string, double>>& values);
  void add_scalar(const std::string& tag, int64_t step, double value) { add_scalars(step, {{tag, value}}); }
  // An image summary: `png` is a whole PNG file; height, width, channels describe it.
  void add_image_png(const std::string& tag, int64_t step, const std::string& png, int64_t height, int64_t width,
                     int64_t channels);
  // A SessionLog START at `step`: TensorBoard drops earlier events at or after `step` (those a
  // crashed run wrote after the checkpoint a resumed run continues from).
  void add_session_start(int64_t step, const std::string& checkpoint_path);
  const std::string& path() const { return path_; }

 private:
  void write_event(const std::string& serialized);
  std::string path_;
  std::FILE* f_ = nullptr;
};

}  // namespace fluxtrain
