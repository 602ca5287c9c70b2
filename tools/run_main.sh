#!/usr/bin/env bash
# The README's main command: train a small GPT-2 on the bundled Python docs with ZeRO-2 on 2 processes,
# save a checkpoint, resume from it, convert it to one fp32 file and check that file in plain transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash tools/setup_env.sh
PY=.venv/bin/python
RUN=${RUN_DIR:-runs/gpt_main}
STEPS1=${STEPS1:-60}
STEPS2=${STEPS2:-100}
rm -rf "$RUN"
export DS_LOG_LEVEL=${DS_LOG_LEVEL:-WARNING}

echo "== 1/4 train $STEPS1 steps (ZeRO-2, bf16, 2 processes), save a checkpoint"
LAUNCH="$PY -m ds_train.launcher.runner"
[ -x .venv/bin/ds-train-launch ] && LAUNCH=.venv/bin/ds-train-launch
$LAUNCH --num_procs 2 tools/train_gpt.py --steps "$STEPS2" --stop-at "$STEPS1" \
    --save-dir "$RUN" "$@"
echo "== 2/4 resume from $RUN/$(cat "$RUN/latest") and train to step $STEPS2"
$LAUNCH --num_procs 2 tools/train_gpt.py --steps "$STEPS2" --resume \
    --save-dir "$RUN" "$@"
echo "== 3/4 consolidate the ZeRO shards into one fp32 file (ds-zero-to-fp32)"
if [ -x .venv/bin/ds-zero-to-fp32 ]; then
  .venv/bin/ds-zero-to-fp32 "$RUN" "$RUN/model_fp32.safetensors"
else  # entry points appear once tools/setup_env.sh has (re)installed the packages
  $PY -c 'import sys; from ds_train.checkpoint.zero_to_fp32 import main; sys.exit(main())' \
      "$RUN" "$RUN/model_fp32.safetensors"
fi
echo "== 4/4 evaluate the fp32 file with plain transformers (no engine)"
$PY tools/train_gpt.py --check-fp32 "$RUN/model_fp32.safetensors" --save-dir "$RUN" "$@"
