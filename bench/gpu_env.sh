# Environment of the GPU machine for the bench/gpu_*.sh scripts (sourced): Boost, nlohmann-json,
# SentencePiece, PCRE2, ICU and protobuf from the carried .deps/*.deb (Debian 12; fetch them with
#   cd .deps && apt-get download libboost-program-options1.74.0 libboost-program-options1.74-dev \
#     libboost1.74-dev nlohmann-json3-dev libsentencepiece-dev libsentencepiece0 libpcre2-dev \
#     libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3 libicu-dev libicu72 icu-devtools \
#     libprotobuf-dev libprotobuf32 libprotobuf-lite32 protobuf-compiler libprotoc32
# and run with carry [".deps"]); LibTorch and NCCL from the Python install.
if [ ! -f /tmp/deps/.unpacked ]; then
  mkdir -p /tmp/deps
  for f in .deps/*.deb; do dpkg -x "$f" /tmp/deps; done
  # The .pc files name /usr: point them at the unpacked tree so pkg-config finds headers there.
  sed -i -E 's#(= *)/usr(/|$)#\1/tmp/deps/usr\2#' /tmp/deps/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc /tmp/deps/usr/share/pkgconfig/*.pc 2>/dev/null || true
  touch /tmp/deps/.unpacked
fi
export PKG_CONFIG_PATH=/tmp/deps/usr/lib/x86_64-linux-gnu/pkgconfig:/tmp/deps/usr/share/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
export PATH=/tmp/deps/usr/bin:$PATH
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
