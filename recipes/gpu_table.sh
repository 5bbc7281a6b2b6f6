#!/usr/bin/env bash
# The gpu protocol of the CIFAR-10 table (recipes/table.toml) on one GPU job: every run not
# done yet, JOBS processes at a time on the one GPU (each is launch-bound at batch 128, so they
# share it well), each with the CIFAR-10 arrays resident on the GPU, each cut at LIMIT seconds.
#
#   OUT=/tmp/out LIMIT=540 bash recipes/gpu_table.sh                     # every row, every seed
#   OUT=/tmp/out MODELS=resnet20 RULES=bp,fa,dfa SEEDS=0 LIMIT=300 bash recipes/gpu_table.sh
#   DRY=1 OUT=/tmp/dry bash recipes/gpu_table.sh    # the same on the CPU: 1 epoch of tiny
#                                                   # synthetic data per run (smoke test)
#
# TABLE=recipes/quality.toml runs the training-quality track's rows instead (its gpu protocol).
# Settings (environment): OUT (required), TABLE (recipes/table.toml), PROTOCOL (gpu), MODELS, RULES, SEEDS (comma lists;
# default: the whole table), JOBS (parallel runs, default 16; DRY: 2), LIMIT (seconds per run,
# default 540), RUNS (scratch folder, default /tmp/table_runs).
# Data: CIFAR-10 as recipes.train finds it (LOCALOPT_DATA, then data/cifar10-jpeg75.tar.gz in
# the checkout, ...).  For a lent device machine: copy the archive into the checkout's
# git-ignored data/ folder (cp ../shared/data/cifar10-jpeg75.tar.gz data/) and name "data" in
# the call's carry list; it is decoded once, before the runs start.
# Output in $OUT (few files, as a GPU job returns at most 8): table.tar.gz (results/<model>/
# <protocol>/<row>-s<seed>/ of every finished run: log.jsonl, curves.png, alignment.png),
# missing.txt (the runs that did not finish), stdout.log (the end of each run's output),
# RESULTS.md (a preview of the table from these runs alone).  Then, in the checkout:
#   tar -xzf table.tar.gz && python -m recipes.report && git add results RESULTS.md README.md
# A run cut at LIMIT is lost (its checkpoint stays on the machine): size MODELS/RULES/SEEDS and
# LIMIT to the GPU job.
#
# PLAN=FILE runs the recipes.train runs of a plan file instead of the table, the same way (one
# line per run: NAME then its recipes.train flags, shell-quoted; "@common FLAGS" for every run,
# "@dry FLAGS" added under DRY=1; # comments), e.g. the SimpleVGG target-propagation GPU jobs:
#   PLAN=results/simple_vgg/tp/gpu_vgg_part2/plan.txt OUT=/tmp/out LIMIT=400 bash recipes/gpu_table.sh
# Output in $OUT: runs.jsonl (every record of every run, tagged with its name; the table:
# python -m recipes.report --runs-table $OUT/runs.jsonl) and stdout.log.
set -u
OUT=${OUT:?set OUT to the output folder}
PROTOCOL=${PROTOCOL:-gpu}
LIMIT=${LIMIT:-540}
RUNS=${RUNS:-/tmp/table_runs}
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1
SEL=(--protocol "$PROTOCOL" --out-dir "$RUNS/runs" --results "$RUNS/results")
[ -n "${TABLE:-}" ] && SEL+=(--table "$TABLE")
[ -n "${MODELS:-}" ] && SEL+=(--models "$MODELS")
[ -n "${RULES:-}" ] && SEL+=(--rules "$RULES")
[ -n "${SEEDS:-}" ] && SEL+=(--seeds "$SEEDS")
COMMON=()
EXTRA=()
if [ -n "${PLAN:-}" ]; then  # the plan's @common and @dry flags
  while read -r line; do
    eval "w=($line)"
    case "${w[0]}" in
      @common) COMMON+=("${w[@]:1}") ;;
      @dry) [ "${DRY:-0}" = 1 ] && EXTRA+=("${w[@]:1}") ;;
    esac
  done < <(grep '^@' "$PLAN")
fi
if [ "${DRY:-0}" = 1 ]; then
  JOBS=${JOBS:-2}
  python -m recipes.synthetic "$RUNS/tiny.tar.gz" > /dev/null || exit 1
  SEL+=(--settings "{epochs = 1, val_size = 20, batch_size = 16, eval_batch_size = 40, device = \"cpu\", threads = 1, data = \"$RUNS/tiny.tar.gz\"}")
  EXTRA+=(--epochs 1 --val-size 20 --batch-size 16 --eval-batch-size 40 --device cpu --threads 1
          --data "$RUNS/tiny.tar.gz")
  DATA="$RUNS/tiny.tar.gz"
else
  JOBS=${JOBS:-16}
  DATA=""
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
fi
# decode the data once (cached), so that the parallel runs only load the cached arrays
python -c "import sys; from localopt.recipes.data import load_cifar10; a = load_cifar10(sys.argv[1] or None); print(a.description, len(a.train_y), 'train images')" "$DATA" || exit 1
if [ -n "${PLAN:-}" ]; then
  grep -v '^[[:space:]]*\(#\|@\|$\)' "$PLAN" > "$RUNS/todo.txt"
else
  python -m recipes.table_runs "${SEL[@]}" --missing > "$RUNS/todo.txt" || exit 1
fi
echo "$(wc -l < "$RUNS/todo.txt") runs, $JOBS at a time, $LIMIT s each at most"
run_one() {  # a line of todo.txt: a table run's id, or a plan's NAME FLAGS...
  eval "w=($1)"
  local log="$RUNS/$(echo "${w[0]}" | tr / _).log"
  if [ -n "${PLAN:-}" ]; then
    timeout "$LIMIT" python -m recipes.train "${COMMON[@]}" "${w[@]:1}" "${EXTRA[@]}" \
      --out-dir "$RUNS/runs" --name "${w[0]}" --no-progress > "$log" 2>&1
  else
    timeout "$LIMIT" python -m recipes.table_runs "${SEL[@]}" --resume --no-progress \
      --only "${w[0]}" > "$log" 2>&1
  fi
  echo "[${w[0]}] exit $?" >> "$log"
}
while read -r line; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  run_one "$line" &
done < "$RUNS/todo.txt"
wait
for f in "$RUNS"/*.log; do [ -f "$f" ] && tail -n 3 "$f"; done > "$OUT/stdout.log"
if [ -n "${PLAN:-}" ]; then
  python - "$RUNS/runs" "$OUT/runs.jsonl" <<'EOF'
import json, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
with out.open("w") as f:
    for log in sorted(runs.glob("*/log.jsonl")):
        for line in log.read_text().splitlines():
            f.write(json.dumps({"run": log.parent.name, **json.loads(line)}) + "\n")
EOF
  echo "finished: $(grep -c '"event": "final"' "$OUT/runs.jsonl") of" \
    "$(wc -l < "$RUNS/todo.txt") runs in $OUT/runs.jsonl"
  exit 0
fi
python -m recipes.table_runs "${SEL[@]}" --missing > "$OUT/missing.txt"
mkdir -p "$RUNS/results"
tar -czf "$OUT/table.tar.gz" -C "$RUNS" results
python -m recipes.report --results "$RUNS/results" --out "$OUT/RESULTS.md" --readme '' \
  --no-figures > /dev/null
echo "finished: $(find "$RUNS/results" -name log.jsonl | wc -l) runs in $OUT/table.tar.gz;" \
  "not finished: $(wc -l < "$OUT/missing.txt")"
