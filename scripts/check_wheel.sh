#!/usr/bin/env bash
# Checks the wheel rather than the checkout: builds a wheel of megatron_bliss, installs it (not editable) into a fresh
# venv and there, from a directory outside the checkout (so the source tree is not importable), checks that every
# file of the source package was installed, imports every module of the installed package, runs
# `python -m megatron_bliss.info` and `megatron-bliss pipeline --help`, and runs a tiny pretraining run end to end.
#   bash scripts/check_wheel.sh [WORK_DIR]     (default: a temporary directory, removed afterwards)
# Needs .venv from scripts/install.sh: its torch compiles the C++ extension into the wheel (no build isolation) and
# its tools prepare the tiny run's data. The fresh venv gets torch==2.13.0 (TORCH_SPEC to change it), then the wheel
# with its dependencies from the package index. CI runs it after the test suite; about 2 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
host_py="$repo/.venv/bin/python"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x "$host_py" ]; then
  echo "scripts/check_wheel.sh: $host_py not found; run bash scripts/install.sh first" >&2
  exit 2
fi
if ! git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  echo "scripts/check_wheel.sh: $repo is not a git checkout (the wheel is built from its tracked files)" >&2
  exit 2
fi
if [ -n "${1:-}" ]; then
  work="$(mkdir -p "$1" && cd "$1" && pwd)"
else
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
fi
src="$work/src" venv="$work/venv" outside="$work/outside"
rm -rf "$src" "$work/dist" "$venv" "$outside"
mkdir -p "$src" "$work/dist" "$outside" "$work/logs"
started=$SECONDS
step_start=$SECONDS
step() {  # step NAME: announces a step and starts its clock
  echo "check_wheel: $1"
  step_start=$SECONDS
}
done_step() {  # prints the time the step took
  echo "check_wheel:   ok ($((SECONDS - step_start)) s)"
}
logged() {  # logged NAME CMD...: runs CMD with its output in $work/logs/NAME.log, shown if it fails
  local log="$work/logs/$1.log"
  shift
  "$@" >"$log" 2>&1 || { tail -n 60 "$log" >&2; echo "check_wheel: failed: $* (log above, in $log)" >&2; return 1; }
}

step "build the wheel from a clean copy of the checkout's files"
# tracked and untracked-but-not-ignored files, as a clean clone holds them: no stale build/ or egg-info can add
# files that setup.py would not package
git -C "$repo" ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done \
  | tar --null -T - -cf - | tar -xf - -C "$src"
logged wheel "$host_py" -m pip wheel "$src" --no-build-isolation --no-deps -w "$work/dist"
wheel="$(ls "$work"/dist/megatron_bliss-*.whl)"
echo "check_wheel:   $(basename "$wheel")"
done_step

step "install it into a fresh venv ($torch_spec first, then the wheel and its dependencies)"
"$host_py" -m venv "$venv"
py="$venv/bin/python"
logged install_torch "$py" -m pip install "$torch_spec"
logged install_wheel "$py" -m pip install "$wheel"
done_step

# Every command below runs with the wheel's venv, outside the checkout and without PYTHONPATH.
in_venv() {
  (cd "$outside" && env -u PYTHONPATH "$@")
}

step "installed files and imports of every module (pkgutil.walk_packages over the installed package)"
in_venv env SOURCE_PACKAGE="$src/megatron_bliss" "$py" -I - <<'EOF'
"""Fails unless the installed megatron_bliss holds every file of the source package and all its modules import."""
import importlib
import os
import pkgutil
import sys
import traceback
import warnings

warnings.simplefilter("ignore")  # megatron-core's import-time notices about missing Transformer Engine / apex
import megatron_bliss  # noqa: E402

installed = os.path.dirname(os.path.abspath(megatron_bliss.__file__))
source = os.environ["SOURCE_PACKAGE"]
if not installed.startswith(sys.prefix):
    sys.exit(f"check_wheel: megatron_bliss imported from {installed}, not from the venv {sys.prefix}")
missing = []
for root, dirs, files in os.walk(source):
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    for name in files:
        rel = os.path.relpath(os.path.join(root, name), source)
        if not os.path.isfile(os.path.join(installed, rel)):
            missing.append(rel)
if missing:
    sys.exit("check_wheel: the wheel lacks these files of megatron_bliss/ (a directory without __init__.py, or "
             "package data not declared in setup.py):\n  " + "\n  ".join(sorted(missing)))
failed = []
found = list(pkgutil.walk_packages(megatron_bliss.__path__, "megatron_bliss.",
                                   onerror=lambda name: failed.append((name, traceback.format_exc()))))
modules = [m.name for m in found]
packages = 1 + sum(m.ispkg for m in found)
for name in modules:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - every failure is reported
        failed.append((name, traceback.format_exc()))
if failed:
    sys.exit("check_wheel: modules of the installed package do not import:\n"
             + "\n".join(f"--- {name}\n{tb}" for name, tb in failed))
print(f"check_wheel:   {len(modules) + 1} modules in {packages} packages import from {installed}")
EOF
done_step

step "python -m megatron_bliss.info"
logged info in_venv "$py" -m megatron_bliss.info
sed 's/^/check_wheel:   /' "$work/logs/info.log" | grep -v -i "warn"
# the extension must load from the wheel wherever it loads from the editable install (same torch)
host_ext="$(in_venv "$host_py" -W ignore -c 'from megatron_bliss.info import collect_info
print(collect_info()["ext_loaded"])' 2>/dev/null | tail -n 1)"
if [ "$host_ext" = True ] && ! grep -Eq '^ext_loaded +True' "$work/logs/info.log"; then
  echo "check_wheel: the extension megatron_bliss._C loads in .venv but not from the wheel (see the report above)" >&2
  exit 1
fi
done_step

step "megatron-bliss pipeline --help"
logged pipeline_help in_venv "$venv/bin/megatron-bliss" pipeline --help
grep -q "usage: megatron-bliss pipeline" "$work/logs/pipeline_help.log" \
  || { echo "check_wheel: megatron-bliss pipeline --help printed no usage (see $work/logs)" >&2; exit 1; }
done_step

# ------------------------------------------------------------------------------------------------------------------
# TINY STAGE: the one block to update when the stages' command lines change.
# Data preparation uses the checkout's tools with .venv (tools put the checkout on sys.path, so they cannot test the
# wheel); the run itself uses only the wheel's venv. Written for the pretrain CLI of examples/configs/tiny_target.yaml
# (file paths under paths.*, e.g. --paths.train_prefixes) and tools/preprocess_c4.py --tokens-per-sequence.
tiny_stage() {  # tiny_stage PYTHON DIR: 4 steps of the tiny target on the embedded sample, checkpoints at 2 and 4
  local python="$1" dir="$2" tokenizer="$repo/megatron_bliss/data/assets/default_bpe_8k.model"
  logged tiny_data "$host_py" "$repo/tools/preprocess_c4.py" --input "$repo/tests/assets/c4_sample" \
    --output-prefix "$dir/data/c4" --tokenizer-model "$tokenizer" --tokens-per-sequence 129 --mode sequences \
    --workers 0 --no-progress
  logged tiny_valid "$host_py" "$repo/tools/prepare_validation.py" --input "$repo/tests/assets/lambada_sample.jsonl" \
    --output-prefix "$dir/data/lambada" --tokenizer-model "$tokenizer"
  logged tiny_pretrain in_venv "$python" -m megatron_bliss.pretrain --config "$repo/examples/configs/tiny_target.yaml" \
    --paths.train_prefixes="[$dir/data/c4]" --paths.valid_prefix="$dir/data/lambada" \
    --train.train_steps=4 --train.micro_batch_size=4 --train.global_batch_size=8 --train.eval_interval=2 \
    --schedule.warmup_steps=1 --paths.save_dir="$dir/run" --checkpoint.save_interval=2 \
    --logging.log_interval=1 --logging.progress_bar=false
  # what it must leave: 4 metric records, the last with a validation loss, and the step-4 checkpoint
  in_venv "$python" - "$dir/run" <<'EOF'
import json, os, sys
run = sys.argv[1]
records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
assert [r["step"] for r in records] == [1, 2, 3, 4], f"check_wheel: {run}/metrics.jsonl steps {records}"
assert "val_loss" in records[-1], f"check_wheel: {run}/metrics.jsonl: no val_loss at step 4"
latest = open(os.path.join(run, "latest_checkpointed_iteration.txt")).read().strip()
assert latest == "4", f"check_wheel: {run}/latest_checkpointed_iteration.txt says {latest}, not 4"
print(f"check_wheel:   4 steps, loss {records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}, "
      f"val_loss {records[-1]['val_loss']:.3f}, checkpoint iter 4")
EOF
}
# ------------------------------------------------------------------------------------------------------------------

step "tiny stage end to end (pretrain from the wheel's venv)"
mkdir -p "$work/tiny"
tiny_stage "$py" "$work/tiny"
done_step

echo "check_wheel: all checks passed in $((SECONDS - started)) s"
