// Small helpers shared by dist/ sources (not part of the public interface).
#pragma once
#include <exception>
#include <string>

namespace fluxtrain::dist::detail {

// MPI_Init has run and MPI_Finalize has not: safe to call MPI (e.g. from destructors).
bool mpi_alive();
// An exception's message on one line (c10::Error without its backtrace, newlines flattened).
std::string one_line(const std::exception& e);

}  // namespace fluxtrain::dist::detail
