#!/usr/bin/env bash
# SimpleVGG (full width), L-DRL vs BP for the same short budget, made for one GPU lease:
# every run goes in parallel on the one GPU (each is launch-bound at batch 128) and is cut at
# LIMIT seconds; per-epoch records (test accuracy every epoch) survive a cut.
#
#   PART=1 OUT=results/tp/gpu_vgg_2ep EPOCHS=2 LIMIT=455 LOCALOPT_DATA=<archive> bash recipes/tp_vgg_gpu.sh
#   PART=2 OUT=results/tp/gpu_vgg_part2 EPOCHS=2 LIMIT=400 LOCALOPT_DATA=<archive> bash ...
#   PART=3 OUT=results/tp/gpu_vgg_ablation EPOCHS=2 STOP=1 LIMIT=230 LOCALOPT_DATA=<archive> bash ...
#   PART=4 OUT=results/tp/gpu_vgg_seed1 EPOCHS=2 LIMIT=165 LOCALOPT_DATA=<archive> bash ...
#   DRY=1 PART=2 OUT=/tmp/x bash recipes/tp_vgg_gpu.sh     # CPU smoke test: tiny net, 1,000 images
#
# PART=1 runs (config tp_vgg_ldrl: ScalingDTP's SGD 0.05, momentum 0.9, weight decay 1e-4, cosine over
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
# (all with switches="perturbed", then the l-drl default).
# PART=2 runs, l-drl with the clean switches (the default now, as ScalingDTP's final code):
#   ldrl_exact    ScalingDTP's final algorithm: ldrl above plus the feedback trained on the batch
#                 before its targets are computed (TargetProp retarget=True)
#   ldrl_adam     ldrl with Adam (lr 1e-3, no weight decay) as the forward optimizer
#   bp_adam       its BP baseline
#   ldrl_lr0.00875_it40   ldrl_it40 at 1/4 of the forward lr
#   bp_lr0.0125   BP at 1/4 of its lr
# PART=3 runs (epoch 1 of 2, lr 0.035, beta 89.6): ldrl_clean_noretarget (no retarget),
#   ldrl_perturbed_retarget (perturbed switches), ldrl_exact_it40 and ldrl_exact_it8 (fewer
#   feedback iterations).
# PART=4 runs: ldrl_exact (the tp_vgg_ldrl config as it is now) and bp with seed 1, epoch 1 of 2.
# Runs without retarget name it (retarget = false): it became the l-drl default after these ran.
# Output: $OUT/runs.jsonl (every record of every run, tagged), $OUT/stdout.log.
set -u
OUT=${OUT:?set OUT}
PART=${PART:?set PART to 1, 2, 3 or 4}
case "$PART" in 1|2|3|4) ;; *) echo "PART=$PART: choose 1, 2, 3 or 4" >&2; exit 2 ;; esac
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
if [ "$PART" = 1 ]; then  # first lease (results/tp/gpu_vgg_2ep)
  P='switches = "perturbed"'    # the l-drl defaults when it ran: these switches, no retarget
  N='retarget = false'
  run bp --rule bp --rule-options '{}' &
  run ldrl --rule-options "{beta = 89.6, $P}" --lr 0.035 \
    --feedback-options "{$FB, feedback_iters = [20, 30, 35, 55, 20], $N}" &
  run ldrl_it40 --rule-options "{beta = 89.6, $P}" --lr 0.035 \
    --feedback-options "{$FB, feedback_iters = [5, 7, 8, 13, 5], $N}" &
  run ldrl_it8 --rule-options "{beta = 89.6, $P}" --lr 0.035 \
    --feedback-options "{$FB, feedback_iters = [1, 1, 1, 2, 1], $N}" &
  run ldrl_b0.7 --rule-options "{beta = 0.7, $P}" --lr 0.035 \
    --feedback-options "{$FB, feedback_iters = [20, 30, 35, 55, 20], $N}" &
elif [ "$PART" = 2 ]; then  # second lease (results/tp/gpu_vgg_part2): clean switches (ScalingDTP's final code)
  R="{$FB, feedback_iters = [20, 30, 35, 55, 20]"
  run ldrl_exact --rule-options '{beta = 89.6}' --lr 0.035 --feedback-options "$R, retarget = true}" &
  run ldrl_adam --rule-options '{beta = 89.6}' --optimizer adam --lr 1e-3 --weight-decay 0 \
    --feedback-options "$R, retarget = false}" &
  run bp_adam --rule bp --rule-options '{}' --optimizer adam --lr 1e-3 --weight-decay 0 &
  run ldrl_lr0.00875_it40 --rule-options '{beta = 89.6}' --lr 0.00875 \
    --feedback-options "{$FB, feedback_iters = [5, 7, 8, 13, 5], retarget = false}" &
  run bp_lr0.0125 --rule bp --rule-options '{}' --lr 0.0125 &
elif [ "$PART" = 4 ]; then  # fourth lease (results/tp/gpu_vgg_seed1): seed 1, epoch 1 of 2
  C+=(--stop-after 1 --seed 1)
  run ldrl_exact_seed1 &   # the config as it is now: ScalingDTP's final algorithm
  run bp_seed1 --rule bp --rule-options '{}' --lr 0.05 &
elif [ "$PART" = 3 ]; then  # third lease (results/tp/gpu_vgg_ablation): what made ldrl_exact train; run with
      # EPOCHS=2 and STOP=1 (epoch 1 of the same 2-epoch schedule as ldrl_exact)
  C+=(--stop-after "${STOP:-1}" --lr 0.035)
  run ldrl_clean_noretarget --rule-options '{beta = 89.6}' \
    --feedback-options "{$FB, feedback_iters = [20, 30, 35, 55, 20], retarget = false}" &
  run ldrl_perturbed_retarget --rule-options '{beta = 89.6, switches = "perturbed"}' \
    --feedback-options "{$FB, feedback_iters = [20, 30, 35, 55, 20], retarget = true}" &
  run ldrl_exact_it40 --rule-options '{beta = 89.6}' \
    --feedback-options "{$FB, feedback_iters = [5, 7, 8, 13, 5], retarget = true}" &
  run ldrl_exact_it8 --rule-options '{beta = 89.6}' \
    --feedback-options "{$FB, feedback_iters = [1, 1, 1, 2, 1], retarget = true}" &
fi
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
