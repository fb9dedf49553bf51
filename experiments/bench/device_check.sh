#!/usr/bin/env bash
# The device check: one script for the day an accelerator is lent (experiments/README.md, "Device check").
#
#   bash experiments/bench/device_check.sh          # one H100 / H200: under 8 minutes
#   bash experiments/bench/device_check.sh --tiny   # small shapes: a CPU, a few minutes
#   bash experiments/bench/device_check.sh --fetch-wheels   # here, with network: .whl/ for the device
#   bash experiments/bench/device_check.sh --only index,decode   # some parts (a rerun of one that failed)
#
# Three parts, each in its own process with its own time budget (a part that fails or runs out of
# time gets an error row and the next part runs; its finished rows are kept):
#   1. train  - the paper-size RAG-Token train step (BERT-base + BART-large, bf16, remat), measured MFU
#               beside the plan's estimate (rag_jax.planning) for the same program on the same device;
#   2. decode - BART-large RAG-Token generate, rag_jax vs transformers (torch) on the same device;
#   3. index  - ExactIndex queries/s over 21M x 768 bfloat16 embeddings generated on the device.
# Writes one markdown table to $OUT/device_check.md when OUT is set (and the parts' output to
# $OUT/device_check.log), else to experiments/results/device_check.md. Fetches nothing.
# Python: $PYTHON, else .venv/bin/python if the checkout has one, else python3. rag_jax's imports
# that a device image may lack (ml_collections, scann: requirements.txt's versions) are installed,
# without network, from .whl/ (made by --fetch-wheels; carried to the device as an ignored path)
# into a temporary folder when python cannot import them.
set -u
cd "$(dirname "$0")/../.."

TINY=0
FETCH=0
ONLY=train,decode,index
while (($#)); do
  arg=$1
  shift
  case "$arg" in
    --tiny) TINY=1 ;;
    --fetch-wheels) FETCH=1 ;;
    --only) ONLY=${1:?--only needs parts, e.g. --only train,index}; shift ;;
    --only=*) ONLY=${arg#--only=} ;;
    -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (expected --tiny, --only PARTS or --fetch-wheels)" >&2; exit 2 ;;
  esac
done
WHEELS=(ml_collections scann)  # imported by rag_jax, absent from the device image (KINDS.md's package list)

export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi

if ((FETCH)); then  # x86-64 CPython 3.12 wheels at requirements.txt's versions, without their dependencies
  pins=()
  for name in "${WHEELS[@]}"; do pins+=("$(grep -E "^${name}==" requirements.txt)"); done
  exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
fi

if [[ -n "${OUT:-}" ]]; then
  TABLE="$OUT/device_check.md"; LOG="$OUT/device_check.log"
else
  TABLE=experiments/results/device_check.md; LOG=/dev/null
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

START=$(date +%s)
if (( TINY )); then TOTAL=${DEVICE_CHECK_TOTAL_S:-900}; FLAGS=--tiny
else TOTAL=${DEVICE_CHECK_TOTAL_S:-465}; FLAGS=; fi

IMPORTS=$(IFS=,; echo "${WHEELS[*]}")
if ! "$PY" -c "import $IMPORTS" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "python lacks one of $IMPORTS: installing .whl/*.whl into $WORK/site (no network)" | tee -a "$LOG"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl 2>&1 | tee -a "$LOG"
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
  else
    echo "python lacks one of $IMPORTS and there is no .whl/: run --fetch-wheels where pip has network, carry .whl" | tee -a "$LOG"
  fi
fi

SMI=$(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null | head -n 4 | paste -sd ';' -)
echo "nvidia-smi: ${SMI:-(none)}" | tee -a "$LOG"
echo "python: $PY ($("$PY" --version 2>&1)); total budget ${TOTAL} s" | tee -a "$LOG"

# run_part NAME BUDGET_S RESERVE_S [VAR=VALUE ...]: at most BUDGET_S, and never into the RESERVE_S
# seconds kept for the parts after it.
run_part() {
  local name=$1 budget=$2 reserve=$3
  shift 3
  local now left limit started rc
  if [[ ",$ONLY," != *",$name,"* ]]; then
    echo "not run (--only $ONLY)" >"$WORK/$name.status"
    return
  fi
  now=$(date +%s)
  left=$((START + TOTAL - now - reserve))
  limit=$((budget < left ? budget : left))
  if ((limit < 20)); then
    echo "skipped $left" >"$WORK/$name.status"
    echo "== $name: skipped (${left} s left)" | tee -a "$LOG"
    return
  fi
  echo "== $name: budget ${limit} s" | tee -a "$LOG"
  started=$(date +%s)
  env "$@" timeout --kill-after=10 "$limit" "$PY" experiments/bench/device_check.py "$name" $FLAGS \
    --result "$WORK/$name.json" --deadline "$((started + limit - 5))" --cache-dir "$WORK/jax_cache" \
    2>&1 | tee "$WORK/$name.log" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "$rc $(($(date +%s) - started)) $limit" >"$WORK/$name.status"
  echo "== $name: exit $rc after $(($(date +%s) - started)) s" | tee -a "$LOG"
}

# jax preallocates 75% of a GPU: the decode part shares it with torch, the index part wants more
run_part train 210 150
run_part decode 180 60 XLA_PYTHON_CLIENT_PREALLOCATE=false
run_part index 120 0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9

"$PY" experiments/bench/device_check.py table $FLAGS --results "$WORK" --out "$TABLE" \
  --nvidia-smi "$SMI" --total-s "$(($(date +%s) - START))" | tee -a "$LOG"
echo "table: $TABLE"
