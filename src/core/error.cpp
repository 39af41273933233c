#include "core/error.h"

#include <exception>

namespace fluxtrain {

void rethrow_with_context(const std::string& context) {
  try {
    throw;
  } catch (const Error& e) {
    throw Error(context + ": " + e.what(), e.kind());
  } catch (const std::exception& e) {
    throw Error(context + ": " + e.what(), ErrorKind::Internal);
  }
}

}  // namespace fluxtrain
