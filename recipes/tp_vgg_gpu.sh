#!/usr/bin/env bash
# SimpleVGG (full width), L-DRL vs BP for the same short budget, made for one GPU lease:
# every run goes in parallel on the one GPU (each is launch-bound at batch 128) and is cut at
# LIMIT seconds; per-epoch records (test accuracy every epoch) survive a cut.
#
#   OUT=results/tp/gpu_vgg EPOCHS=2 LIMIT=470 LOCALOPT_DATA=<archive> bash recipes/tp_vgg_gpu.sh
#   DRY=1 OUT=/tmp/x bash recipes/tp_vgg_gpu.sh     # CPU smoke test: tiny net, 1,000 images
#
# Runs (config tp_vgg_ldrl: ScalingDTP's SGD 0.05, momentum 0.9, weight decay 1e-4, cosine over
# the budget, crop+flip augmentation, batch 128; its feedback lr/noise/iterations):
#   bp            the same optimizer and schedule with plain backprop
#   ldrl          ScalingDTP's targets and updates: beta 0.7 on the summed cross-entropy, i.e.
#                 beta = 0.7*128 on the mean one, forward lr 0.7*0.05 (recipes/tp_vgg_short.py
#                 explains the conversion); 160 feedback updates per batch
#   ldrl_it40     the same with the iterations /4 ([5, 7, 8, 13, 5], 38 per batch)
#   ldrl_it8      the same with the iterations /20 ([1, 1, 1, 2, 1], 6 per batch)
#   ldrl_b0.7     beta 0.7 on the mean cross-entropy (targets 128x closer to the forward pass,
#                 the feedback used in its linear regime), the same lr 0.035 (so the same
#                 updates to first order), 160 feedback updates per batch
# Output: $OUT/runs.jsonl (every record of every run, tagged), $OUT/stdout.log.
set -u
OUT=${OUT:?set OUT}
EPOCHS=${EPOCHS:-2}
LIMIT=${LIMIT:-470}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
RUNS=/tmp/tp_vgg_gpu_runs
rm -rf "$RUNS"
C=(--config tp_vgg_ldrl --epochs "$EPOCHS" --out-dir "$RUNS" --no-progress --test-every-epoch true
   --diagnostics-every 100)
if [ "${DRY:-0}" = 1 ]; then
  C+=(--val-size 49000 --model-options '{channels = [8, 8, 16, 16, 32]}' --device cpu --threads 1)
fi
FB='feedback_optimizer = "sgd", feedback_lr = [1e-4, 3.5e-4, 8e-3, 8e-3, 0.18], noise = [0.4, 0.4, 0.2, 0.2, 0.08], feedback_options = {momentum = 0.9}'
run() {  # name, extra args...
  local name=$1; shift
  timeout "$LIMIT" python -m recipes.train "${C[@]}" --name "$name" "$@" > "$RUNS.$name.log" 2>&1
  echo "[$name] exit $?" >> "$RUNS.$name.log"
}
mkdir -p "$RUNS"
run bp --rule bp --rule-options '{}' &
run ldrl --rule-options '{beta = 89.6}' --lr 0.035 &
run ldrl_it40 --rule-options '{beta = 89.6}' --lr 0.035 \
  --feedback-options "{$FB, feedback_iters = [5, 7, 8, 13, 5]}" &
run ldrl_it8 --rule-options '{beta = 89.6}' --lr 0.035 \
  --feedback-options "{$FB, feedback_iters = [1, 1, 1, 2, 1]}" &
run ldrl_b0.7 --rule-options '{beta = 0.7}' --lr 0.035 &
wait
for f in "$RUNS".*.log; do cat "$f"; done > "$OUT/stdout.log"
python - "$RUNS" "$OUT/runs.jsonl" <<'EOF'
import json, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
with out.open("w") as f:
    for log in sorted(runs.glob("*/log.jsonl")):
        for line in log.read_text().splitlines():
            f.write(json.dumps({"run": log.parent.name, **json.loads(line)}) + "\n")
EOF
tail -n 4 "$OUT/stdout.log"
