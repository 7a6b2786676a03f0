#!/usr/bin/env bash
# The GPU check (issue 21; `make gpu-check`): on a CUDA machine, lora-exp against the plain Trainer + PEFT
# reference on the check's workloads (benchmarks/workloads.py: gpu_check_workloads), interleaved, and every
# seed replayed at full shape (QLoRA nf4 and ZeRO-3 among them), each output checked. Results under $OUT.
#
#   scripts/gpu-check.sh [bench|seeds|all]        (default all)
#
# Environment:
#   OUT=DIR       where results go (default outputs/gpu-check): bench.md/json (the harness's report),
#                 seeds.md (the replay's report), steps.txt (what ran, when, exit codes) and results.tgz (all
#                 logs and profiles). Few files on purpose: a lent machine returns at most 8.
#   STEPS=N       training steps per bench workload (default 60); SEED_STEPS=N steps per seed run (default 5)
#   REPS=N        repetitions per side (default 1); VARIANTS="name=JSON ..." extra lora-exp variants
#   ONLY="..."    bench workload labels to run (default: all); SEEDS=000,001,... (default: all five)
#   PARALLEL_SEEDS=1  replay the seeds as concurrent processes (their speed figures then share the GPU)
#   PROFILE=1     an operator profile of 3 steady steps of each measurement (in results.tgz)
#   BUNDLE=DIR    wheels to install first where packages are missing: DIR/whl/*.whl and DIR/whl-bnb/*.whl
#                 (`make gpu-bundle` builds them; default .gpu), installed into $SITE (default /tmp/lora-exp-site)
#   DRY=1         rehearse the same steps on this CPU with tiny shapes (make test runs this)
#   PY=python3    the interpreter (default: .venv/bin/python where it exists, else python3)
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PART=${1:-all}
OUT=${OUT:-$ROOT/outputs/gpu-check}
W=${W:-$(mktemp -d /tmp/lora-exp-gpu-check.XXXXXX)}
BUNDLE=${BUNDLE:-$ROOT/.gpu}
SITE=${SITE:-/tmp/lora-exp-site}
STEPS=${STEPS:-60}; SEED_STEPS=${SEED_STEPS:-5}; REPS=${REPS:-1}
SEEDS=${SEEDS:-000,001,002,003,004}
if [ -z "${PY:-}" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MPLBACKEND=Agg
T0=$(date +%s)
trap 'pack; exit 143' TERM INT  # a `timeout` around this script still leaves the logs packed
t() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/steps.txt"; }
pack() { tar czf "$OUT/results.tgz" -C "$W" --exclude=models --exclude='*.safetensors' --exclude='*.bin' \
           --exclude='*.pt' --exclude='*.db' --exclude='tokenizer*' --exclude='*.jinja' --exclude=mlartifacts --exclude=data --exclude='checkpoint-*' \
           . 2>/dev/null; }

BENCH_TIMEOUT=${BENCH_TIMEOUT:-240}
if [ "${DRY:-0}" = 1 ]; then
  SHAPE=tiny; TINY=--tiny; STEPS=${DRY_STEPS:-5}; SEED_STEPS=2; SEEDS=${DRY_SEEDS:-000}
else
  SHAPE=full; TINY=
  [ -d "$SITE" ] && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  if [ -d "$BUNDLE/whl" ] && ! $PY -c "import mlflow, datasets, pydantic, optuna" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$BUNDLE"/whl/*.whl $(ls "$BUNDLE"/whl-bnb/*.whl 2>/dev/null) || { t "wheel install failed"; exit 9; }
    t "installed $(ls "$BUNDLE"/whl/*.whl "$BUNDLE"/whl-bnb/*.whl 2>/dev/null | wc -l) wheels into $SITE"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/steps.txt" 2>&1
fi
export PYTHONPATH=$ROOT/jobs${PYTHONPATH:+:$PYTHONPATH}
$PY - <<'EOF' 2>&1 | tee -a "$OUT/steps.txt"
import importlib.metadata as md, torch
names = ("torch", "transformers", "peft", "accelerate", "datasets", "mlflow", "deepspeed", "bitsandbytes", "liger-kernel")
def version(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return "-"
print("versions:", ", ".join(f"{n} {version(n)}" for n in names), "| cuda:", torch.cuda.is_available())
EOF
# The tokenizer the random-weight models take: the offline SmolLM2's, else the one shipped in the repo's tests.
TOK=${TOK:-}
for c in "$ROOT/.cache/models/smollm2-135m-instruct" "$ROOT/.gpu/tok"; do
  [ -z "$TOK" ] && [ -f "$c/tokenizer.json" ] && TOK=$c
done
[ -n "$TOK" ] || { t "no tokenizer: run make model (or put SmolLM2's tokenizer files in .gpu/tok)"; exit 2; }

if [ "$PART" = bench ] || [ "$PART" = all ]; then
  t "bench start ($SHAPE, $STEPS steps, $REPS reps)"
  # The report is rewritten after each workload and progress lines reach steps.txt as they come: a run stopped
  # by the machine's time limit still returns what it measured.
  args=(--gpu-check $TINY --model "$TOK" --reps "$REPS" --steps "$STEPS" --work "$W/bench" --out "$OUT/bench.md"
        --timeout "$BENCH_TIMEOUT")
  [ "${PROFILE:-0}" = 1 ] && args+=(--profile "$W/profiles")
  for v in ${VARIANTS:-}; do args+=(--variant "$v"); done
  [ -n "${ONLY:-}" ] && { IFS=',' read -ra only <<< "$ONLY"; args+=(--only "${only[@]}"); }
  $PY benchmarks/harness.py "${args[@]}" 2>&1 | tee "$W/bench.log" | grep --line-buffered -E "rep [0-9]+ " \
    >> "$OUT/steps.txt"
  rc=${PIPESTATUS[0]}
  t "bench rc=$rc"
  pack
fi

if [ "$PART" = seeds ] || [ "$PART" = all ]; then
  t "seeds start ($SEEDS, shape $SHAPE, $SEED_STEPS steps)"
  SEED_TIMEOUT=${SEED_TIMEOUT:-540}
  if [ "${PARALLEL_SEEDS:-0}" = 1 ]; then
    for s in ${SEEDS//,/ }; do
      timeout "$SEED_TIMEOUT" $PY -m lora_exp replay --seeds "$s" --shape $SHAPE --steps "$SEED_STEPS" \
        --out "$W/seeds-$s" > "$W/seeds-$s.log" 2>&1 &
    done
    wait
    for s in ${SEEDS//,/ }; do cat "$W/seeds-$s/report.md" 2>/dev/null; done > "$OUT/seeds.md"
    for s in ${SEEDS//,/ }; do t "seed $s: $(tail -n 1 "$W/seeds-$s.log")"; done
  else
    timeout "$SEED_TIMEOUT" $PY -m lora_exp replay --seeds "$SEEDS" --shape $SHAPE --steps "$SEED_STEPS" \
      --out "$W/seeds" > "$W/seeds.log" 2>&1
    t "seeds rc=$? $(tail -n 1 "$W/seeds.log")"
    cp "$W/seeds/report.md" "$OUT/seeds.md" 2>/dev/null
  fi
  pack
fi
[ "${DRY:-0}" = 1 ] || nvidia-smi --query-gpu=memory.used --format=csv,noheader >> "$OUT/steps.txt" 2>/dev/null
t "done"
