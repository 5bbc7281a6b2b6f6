#!/usr/bin/env bash
# The runs behind results/pipeline/ (this 2-core CPU, one torch thread per process), in order;
# then README.md from the JSON files.  Run on a quiet machine (load average < 1.5).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=results/pipeline
uptime
# throughput: S = 2 processes, K = 2, 4, 8, every schedule; simulation of S = 4..32
python -m recipes.pipeline --model mlp3x1024 --stages 2 --microbatches 2,4,8 \
    --schedules gpipe,1f1b,zb,dfa,drtp --batch 128 --steps 60 --warmup 5 --threads 1 \
    --json $OUT/mlp3x1024_S2.json --timeline $OUT --simulate 4,8,16,32
python -m recipes.pipeline --model resnet20 --stages 2 --microbatches 2,4,8 \
    --schedules gpipe,1f1b,zb,dfa,drtp --batch 64 --steps 20 --warmup 3 --threads 1 \
    --json $OUT/resnet20_S2.json --timeline $OUT --simulate 4,8,16,32
# the same again (a second quiet-machine measurement, no figures), for the run-to-run spread
python -m recipes.pipeline --model mlp3x1024 --stages 2 --microbatches 2,4,8 \
    --schedules gpipe,1f1b,zb,dfa,drtp --batch 128 --steps 60 --warmup 5 --threads 1 \
    --json $OUT/mlp3x1024_S2_run2.json --simulate 4,8,16,32
python -m recipes.pipeline --model resnet20 --stages 2 --microbatches 2,4,8 \
    --schedules gpipe,1f1b,zb,dfa,drtp --batch 64 --steps 20 --warmup 3 --threads 1 \
    --json $OUT/resnet20_S2_run2.json --simulate 4,8,16,32
# accuracy: pipelined dfa vs the same loop in one process (MLP, 2 epochs; the committed files
# are of a run at 06:10-06:16 UTC on the shared machine, see their note); a short ResNet-20 run
python -m recipes.pipeline --model mlp3x1024 --stages 2 --schedules dfa --microbatches 4 \
    --epochs 2 --json $OUT/accuracy_mlp3x1024_S2.json
python -m recipes.pipeline --model mlp3x1024 --stages 1 --schedules dfa --microbatches 4 \
    --epochs 2 --json $OUT/accuracy_mlp3x1024_S1.json
python -m recipes.pipeline --model resnet20 --stages 2 --schedules dfa --microbatches 4 \
    --batch 64 --epochs 1 --max-steps 150 --json $OUT/accuracy_resnet20_S2.json
# the asynchronous direct schedule (<rule>-async), bytes per boundary, the bandwidth sweep; the
# uniform 8x1024 MLP (layer-wise dfa); each run with the background trainings paused
H8='{"hidden": [1024,1024,1024,1024,1024,1024,1024,1024]}'
python -m recipes.pipeline --model mlp3x1024 --model-options "$H8" --stages 2 --microbatches 4,8 \
    --schedules gpipe,1f1b,zb,dfa,dfa-async,drtp --batch 128 --steps 30 --warmup 5 --threads 1 \
    --json $OUT/mlp8x1024_S2.json --timeline $OUT --simulate 4,8,16,32
python -m recipes.pipeline --model resnet20 --stages 2 --microbatches 4,8 \
    --schedules gpipe,1f1b,zb,dfa,dfa-async,drtp --batch 64 --steps 15 --warmup 3 --threads 1 \
    --json $OUT/resnet20_S2_async.json --timeline $OUT --simulate 4,8,16,32
python -m recipes.pipeline --model mlp3x1024 --stages 2 --microbatches 4,8 \
    --schedules gpipe,1f1b,zb,dfa,dfa-async,drtp --batch 128 --steps 30 --warmup 5 --threads 1 \
    --json $OUT/mlp3x1024_S2_async.json --simulate 4,8,16,32
# time to accuracy: the same model, data order and epoch budget for every schedule, one
# invocation per schedule (each short enough to keep the background trainings paused)
for s in 1f1b dfa dfa-async drtp; do
  python -m recipes.pipeline --model mlp3x1024 --model-options "$H8" --stages 2 \
      --microbatches 4 --schedules $s --batch 128 --epochs 2 --eval-every 100 \
      --json $OUT/time_to_accuracy_mlp8x1024_S2_$s.json
done
for s in 1f1b dfa-async dfa drtp; do           # ResNet-20 (module-wise dfa): two epochs
  python -m recipes.pipeline --model resnet20 --stages 2 --microbatches 4 --schedules $s \
      --batch 64 --epochs 2 --eval-every 400 --json $OUT/time_to_accuracy_resnet20_S2_$s.json
done
# per-block costs on a CUDA GPU, simulated pipelines (DRY=1: a CPU smoke test)
# python -m recipes.pipeline_gpu --json $OUT/gpu_costs.json
# the current simulator on every throughput file's recorded costs (adds <rule>-async-wide: the
# asynchronous schedule with max_in_flight=S), then the report
python -m recipes.pipeline --resimulate $OUT/*.json
python -m recipes.pipeline --report $OUT    # and the blocks of the guide and the README
uptime
# memory per process: the 8x4096 MLP built on the meta device, each process its stage, against
# one process holding the whole model (Adam, 3 steps); then memory/README.md and the guide's table
python -m recipes.pipeline_memory --json $OUT/memory/mlp8x4096.json
python -m recipes.pipeline_memory --report $OUT/memory
