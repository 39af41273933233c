# Environment of the GPU machine for the bench/gpu_*.sh scripts (sourced): Boost and
# nlohmann-json from the carried .deps/*.deb, LibTorch and NCCL from the Python install.
mkdir -p /tmp/deps
for f in .deps/*.deb; do dpkg -x "$f" /tmp/deps; done
TORCH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')
NCCL_LIB=$(python3 - <<'PY'
import glob, os, site
for d in site.getsitepackages():
    hits = glob.glob(os.path.join(d, "nvidia", "nccl", "lib", "libnccl.so*"))
    if hits: print(os.path.dirname(os.path.dirname(hits[0]))); break
PY
)
export LD_LIBRARY_PATH=/tmp/deps/usr/lib/x86_64-linux-gnu:${NCCL_LIB:+$NCCL_LIB/lib:}${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
