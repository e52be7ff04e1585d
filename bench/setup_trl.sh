#!/usr/bin/env bash
# A separate venv with TRL, for `python -m bench`'s GRPO comparison only (never the project's
# .venv, never CI). Same torch / transformers / accelerate / datasets versions as the project
# (requirements/cpu.txt), so both sides run the same model code and kernels.
# A second run sees the stamp and returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TRL_VENV:-bench/.trl-venv}
PY=${PYTHON:-python3}
TRL_VERSION=1.16.0   # needs transformers >= 4.56.2: works with the pinned 5.19
want=$(cat requirements/cpu.txt bench/setup_trl.sh | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "[setup_trl] creating $VENV (about 2 minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
log="$VENV/install.log"
trap 'rc=$?; if [ $rc -ne 0 ]; then tail -40 "$log"; echo "[setup_trl] FAILED (exit $rc); full log: $log"; fi' EXIT
"$VENV/bin/pip" install -q --upgrade pip >"$log" 2>&1
# reasoning-gym: the same verifier as the raylhf side scores TRL's completions; peft for `--lora`.
"$VENV/bin/pip" install -q -c requirements/cpu.txt "trl==$TRL_VERSION" torch transformers accelerate datasets \
  peft reasoning-gym psutil >>"$log" 2>&1
echo "$want" > "$VENV/.stamp"
echo "[setup_trl] done"
