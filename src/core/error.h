// One exception type for everything fluxtrain reports to a user.
// main() prints what() as a single line and exits with exit_code():
//   2 = bad input (file, flag, shape), 1 = internal failure.
#pragma once
#include <stdexcept>
#include <string>

namespace fluxtrain {

enum class ErrorKind { BadInput = 2, Internal = 1 };

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg, ErrorKind kind = ErrorKind::BadInput)
      : std::runtime_error(msg), kind_(kind) {}
  int exit_code() const { return static_cast<int>(kind_); }
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

// Prefixes context onto an error as it travels up: "loading transformer: <inner>".
[[noreturn]] void rethrow_with_context(const std::string& context);

// Throws Error(msg) when cond is false.
inline void check_input(bool cond, const std::string& msg) {
  if (!cond) throw Error(msg, ErrorKind::BadInput);
}

}  // namespace fluxtrain
