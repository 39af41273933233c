# Locates LibTorch and defines the imported target fluxtrain::torch.
#
# Where torch lives: -DFLUXTRAIN_TORCH_ROOT=<dir holding include/ and lib/>, else the torch
# package of ${FLUXTRAIN_PYTHON} (default: python3 on PATH), found without importing it
# (importing the CUDA wheel needs its CUDA libraries, which the CPU build does not).
#
# CPU build: we do NOT call find_package(Torch). TorchConfig.cmake from the CUDA wheel would
# go looking for a CUDA toolkit and link torch_cuda; instead we link libtorch_cpu and libc10
# directly, which is all a CPU program needs.
# GPU build: the regular find_package(Torch) from <root>/share/cmake.

if(NOT FLUXTRAIN_TORCH_ROOT)
  if(NOT FLUXTRAIN_PYTHON)
    find_program(FLUXTRAIN_PYTHON NAMES python3 python REQUIRED)
  endif()
  execute_process(
    COMMAND ${FLUXTRAIN_PYTHON} -c "import importlib.util as u; s=u.find_spec('torch'); print(s.submodule_search_locations[0] if s else '')"
    OUTPUT_VARIABLE _torch_root OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _torch_root)
    message(FATAL_ERROR "LibTorch not found: ${FLUXTRAIN_PYTHON} has no 'torch' package. "
      "Run ./setup.sh (installs torch==2.11.0 into a virtual environment) or pass -DFLUXTRAIN_TORCH_ROOT=<dir>.")
  endif()
  set(FLUXTRAIN_TORCH_ROOT ${_torch_root} CACHE PATH "LibTorch root (include/, lib/, share/cmake)")
endif()
message(STATUS "fluxtrain: LibTorch at ${FLUXTRAIN_TORCH_ROOT}")

if(FLUXTRAIN_CUDA)
  list(APPEND CMAKE_PREFIX_PATH ${FLUXTRAIN_TORCH_ROOT}/share/cmake)
  find_package(Torch REQUIRED)
  add_library(fluxtrain::torch INTERFACE IMPORTED)
  target_link_libraries(fluxtrain::torch INTERFACE ${TORCH_LIBRARIES})
  target_include_directories(fluxtrain::torch INTERFACE ${TORCH_INCLUDE_DIRS})
else()
  find_library(_torch_cpu torch_cpu PATHS ${FLUXTRAIN_TORCH_ROOT}/lib NO_DEFAULT_PATH REQUIRED)
  find_library(_c10 c10 PATHS ${FLUXTRAIN_TORCH_ROOT}/lib NO_DEFAULT_PATH REQUIRED)
  add_library(fluxtrain::torch INTERFACE IMPORTED)
  target_include_directories(fluxtrain::torch SYSTEM INTERFACE
    ${FLUXTRAIN_TORCH_ROOT}/include ${FLUXTRAIN_TORCH_ROOT}/include/torch/csrc/api/include)
  # The wheel is built with the new C++11 ABI.
  target_compile_definitions(fluxtrain::torch INTERFACE _GLIBCXX_USE_CXX11_ABI=1)
  # --no-as-needed keeps libtorch_cpu's static registrations (operators) linked in.
  target_link_libraries(fluxtrain::torch INTERFACE -Wl,--no-as-needed ${_torch_cpu} ${_c10} -Wl,--as-needed)
  target_link_options(fluxtrain::torch INTERFACE "-Wl,-rpath,${FLUXTRAIN_TORCH_ROOT}/lib")
endif()
