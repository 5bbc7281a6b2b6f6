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
python -m recipes.pipeline --report $OUT        # and docs/guide/model-parallel.md's block
uptime
# memory per process: the 8x4096 MLP built on the meta device, each process its stage, against
# one process holding the whole model (Adam, 3 steps); then memory/README.md and the guide's table
python -m recipes.pipeline_memory --json $OUT/memory/mlp8x4096.json
python -m recipes.pipeline_memory --report $OUT/memory
