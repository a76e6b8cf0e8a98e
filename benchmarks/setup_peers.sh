#!/usr/bin/env bash
# Installs the benchmark's peers from the package registries (nothing by hand). Peers are optional: one that fails to
# install is reported by the harness as skipped.
#
#   bash benchmarks/setup_peers.sh [all|main|llamacpp|llamaserver|optimum] [PEERS_DIR]
#
# - main:     matplotlib (plots), sentencepiece (GGUF converter) and onnxruntime-genai (peer; same onnxruntime as qgraph) into the current venv
# - llamacpp: llama-cpp-python with its [server] extra, compiled from source (~9 min on 2 cores, niced), in its own venv; plus llama.cpp's
#             convert_hf_to_gguf.py and gguf-py taken from the same sdist, to make f32 GGUF files from HF weights
# - llamaserver: llama.cpp's C++ `llama-server` (and `llama-quantize`), built with CMake from the llama.cpp sources
#             vendored in the same llama-cpp-python sdist (Release, curl off, niced; ~10 min on 2 cores) into
#             PEERS_DIR/llama.cpp-build/bin: the serving peer of benchmarks/serve_load.py. Not part of `all`.
# - optimum:  optimum-onnx in its own venv (it pins transformers 4.57)
# Venvs live in PEERS_DIR (default /work/peers), outside the repository; give the same directory to
# `python -m benchmarks.run --peers-dir`.
set -uo pipefail
PEERS="${2:-/work/peers}"
PY="${PYTHON:-python3}"
LLAMA_CPP_PYTHON="llama-cpp-python[server]==0.3.36"
OPTIMUM_ONNX="optimum-onnx==0.1.0"
GENAI="onnxruntime-genai==0.18.*"
what="${1:-all}"
mkdir -p "$PEERS"

main_env() {
  echo "== main venv: matplotlib, $GENAI"
  pip install -q matplotlib sentencepiece "$GENAI"  # sentencepiece: llama.cpp's converter imports it
}

llamacpp_env() {
  echo "== llama.cpp: $LLAMA_CPP_PYTHON in $PEERS/llamacpp (compiles from source, several minutes)"
  [ -x "$PEERS/llamacpp/bin/python" ] || "$PY" -m venv "$PEERS/llamacpp"
  if ! "$PEERS/llamacpp/bin/python" -c "import llama_cpp" 2>/dev/null; then
    CMAKE_BUILD_PARALLEL_LEVEL="${JOBS:-2}" nice -n 19 "$PEERS/llamacpp/bin/pip" install -q "$LLAMA_CPP_PYTHON"
  fi
  if [ ! -f "$PEERS/llama.cpp-convert/convert_hf_to_gguf.py" ]; then
    tmp="$(mktemp -d)"
    pip download -q --no-deps --no-binary :all: "llama-cpp-python==${LLAMA_CPP_PYTHON##*==}" -d "$tmp"
    mkdir -p "$PEERS/llama.cpp-convert"
    tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
    src="$(ls -d "$tmp"/llama_cpp_python-*/vendor/llama.cpp)"
    cp "$src/convert_hf_to_gguf.py" "$PEERS/llama.cpp-convert/"
    cp -r "$src/gguf-py" "$PEERS/llama.cpp-convert/"
    [ -d "$src/conversion" ] && cp -r "$src/conversion" "$PEERS/llama.cpp-convert/"
    rm -rf "$tmp"
  fi
}

llamaserver_build() {
  echo "== llama.cpp's llama-server from the sources vendored in llama-cpp-python ${LLAMA_CPP_PYTHON##*==} (CMake, several minutes)"
  out="$PEERS/llama.cpp-build"
  if [ -x "$out/bin/llama-server" ]; then echo "$out/bin/llama-server exists"; return 0; fi
  cmake_bin="$(command -v cmake || true)"
  if [ -z "$cmake_bin" ]; then
    [ -x "$PEERS/cmake/bin/cmake" ] || { "$PY" -m venv "$PEERS/cmake" && "$PEERS/cmake/bin/pip" install -q cmake; } || return 1
    cmake_bin="$PEERS/cmake/bin/cmake"
  fi
  tmp="$(mktemp -d)"
  pip download -q --no-deps --no-binary :all: "llama-cpp-python==${LLAMA_CPP_PYTHON##*==}" -d "$tmp" || { rm -rf "$tmp"; return 1; }
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  src="$(ls -d "$tmp"/llama_cpp_python-*/vendor/llama.cpp)"
  mkdir -p "$out"
  # no network use: curl/openssl off (the model is a local file), no web UI (neither npm nor its download)
  nice -n 19 "$cmake_bin" -S "$src" -B "$out/cmake" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
      -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >/dev/null \
    && nice -n 19 "$cmake_bin" --build "$out/cmake" --config Release -j "${JOBS:-2}" --target llama-server llama-quantize \
    || { rm -rf "$tmp"; return 1; }
  mkdir -p "$out/bin"
  cp "$out/cmake/bin/llama-server" "$out/cmake/bin/llama-quantize" "$out/bin/"
  rm -rf "$tmp" "$out/cmake"
  "$out/bin/llama-server" --version 2>&1 | tail -2
}

optimum_env() {
  echo "== optimum-onnx: $OPTIMUM_ONNX in $PEERS/optimum"
  [ -x "$PEERS/optimum/bin/python" ] || "$PY" -m venv "$PEERS/optimum"
  "$PEERS/optimum/bin/pip" install -q "torch==2.13.0" "$OPTIMUM_ONNX" "onnxruntime==1.32.*"
}

status=0
case "$what" in
  all) main_env || status=1; optimum_env || status=1; llamacpp_env || status=1 ;;
  main) main_env || status=1 ;;
  llamacpp) llamacpp_env || status=1 ;;
  llamaserver) llamaserver_build || status=1 ;;
  optimum) optimum_env || status=1 ;;
  *) echo "usage: $0 [all|main|llamacpp|llamaserver|optimum]"; exit 2 ;;
esac
[ $status -eq 0 ] || echo "some peers failed to install; the harness reports them as skipped"
exit $status
