// Range checks for every integer and size that comes from a flag, an INI file or a file header,
// and a sanitiser for bytes from files that end up in messages.
//
// Why bounds at all: a value far past what makes sense (--num_threads 100000, --prefetch_batches
// 1e9, a checkpoint step of -5) otherwise starts thousands of threads, allocates without end or
// wraps around in a narrower type, and the user learns nothing. Each bound is the widest value
// that still makes sense for FLUX LoRA training; the list is in docs/training.md ("Limits").
#pragma once
#include <cstdint>
#include <string>

namespace fluxtrain {

namespace limits {

// Upper bounds (inclusive) shared by the checks below and by readers of files.
constexpr int64_t kMaxSteps = 1'000'000'000'000;   // updates, micro-batches, checkpoint steps
constexpr int64_t kMaxBatch = 65'536;               // samples per micro-batch (per rank)
constexpr int64_t kMaxAccumulation = 1'048'576;     // micro-batches per update
constexpr int64_t kMaxEpochs = 1'000'000;
constexpr int64_t kMaxPrefetch = 64;                // micro-batches read ahead
constexpr int64_t kMaxValidationSamples = 10'000;
constexpr int64_t kMaxValidationImages = 64;        // drawn at every validation, on the training GPUs
constexpr int64_t kMaxInferenceSteps = 1'000;
constexpr int64_t kMaxImageSize = 8'192;            // pixels per side (FLUX trains up to ~2 MP)
constexpr int64_t kMaxLoraRank = 4'096;             // above FLUX.1's hidden size 3072
constexpr int64_t kMaxLoraNum = 64;                 // conditions (EasyControl)
constexpr int64_t kMaxBlockIndex = 1'023;           // --lora_blocks (FLUX.1 has 57 blocks)
constexpr int64_t kMaxRanks = 1'048'576;            // MPI ranks (encoder_rank, debug ranks)
constexpr int64_t kMaxCheckpointsKept = 1'000'000;
constexpr int64_t kMaxSamples = 100'000'000;        // samples in a dataset file
constexpr double kMaxTimeoutSeconds = 7 * 24 * 3600.0;
// --num_threads: at most this many per hardware thread of the machine (and at least 16 allowed).
constexpr int64_t kThreadsPerHardwareThread = 4;
constexpr int64_t kMinThreadCap = 16;

// Throws Error("<what> must be in [lo, hi], got v<hint>") unless lo <= v <= hi.
void check_range(const std::string& what, int64_t v, int64_t lo, int64_t hi, const std::string& hint = "");
void check_range(const std::string& what, double v, double lo, double hi, const std::string& hint = "");

// Parses a decimal integer (the whole string) in [lo, hi]; anything else, including values past
// int64's range, is an Error naming the flag.
int64_t parse_int(const std::string& flag, const std::string& s, int64_t lo, int64_t hi);

// The largest --num_threads this machine accepts.
int64_t max_threads();


// --config must name a readable regular file (a directory opens "successfully" and reads as
// empty, which would silently run with the defaults).
void check_config_file(const std::string& path);

// Bytes from a file, safe to print in a one-line message: valid UTF-8 text stays as it is;
// control characters and bytes that are not valid UTF-8 become \xNN; longer than max_bytes:
// cut, with "..." appended.
std::string printable(const std::string& bytes, size_t max_bytes = 400);

}  // namespace limits
}  // namespace fluxtrain
