#!/bin/sh
# Every GPU speed check of issues 7 and 10 in one command (about 9 minutes on one H100, 2 of them the compile
# attempt):
#   1. the PHP training step at batch 64, paper size (ViT-B/16, 384x128, text 77), modes fp32, bf16, fp16 and
#      half (the reference's .half()), with the model FLOPs and the achieved TFLOP/s;
#   2. real training (train.py, php_cuhk preset on a generated Demo-PEDES at 384x128, 2 epochs, 8 workers) as a
#      plain process and as one process under torchrun: samples/s of the last epoch;
#   3. the data pipeline with 8 workers against the step of 1;
#   4. batch 128 in bf16 with and without grad_checkpointing (peak memory: does 128 fit in 24 GB?);
#   5. torch.compile of the bf16 step (each backbone block compiled in place: the whole model did not compile
#      within 120 s on an H100 in the first try).
# Usage (from the repository root):  sh benchmarks/gpu_all.sh
# Writes the JSON of each part and gpu_all.log to $OUT (default ./benchmark_out); DATA (default
# /tmp/php_bench_data) receives the generated set. DRY=1 runs the same sequence on the CPU with a tiny model
# and tiny images, to check the script itself in a minute or two.
set -u
HERE=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
OUT=${OUT:-./benchmark_out}
DATA=${DATA:-/tmp/php_bench_data}
if [ "${DRY:-0}" = 1 ]; then
    DEVICE=cpu; ARCH=ViT-Tiny; H=64; W=32; B=8; B2=16; STEPS=2; WORKERS=2; EPOCHS=2
else
    DEVICE=cuda; ARCH=ViT-B-16; H=384; W=128; B=64; B2=128; STEPS=20; WORKERS=8; EPOCHS=2
fi
mkdir -p "$OUT"
LOG="$OUT/gpu_all.log"
STEP="$PYTHON $HERE/benchmarks/train_step.py --device $DEVICE --arch $ARCH --img_size $H $W --mode_timeout 240"

run() {
    echo "+ $*"
    start=$(date +%s)
    "$@" || echo "(exit code $?)"
    echo "($(($(date +%s) - start)) s)"
}

{
    date
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cpus', __import__('os').cpu_count())"
    # The data set first, not in the background: with the generation running alongside, bf16 at batch 64 gave
    # 395 samples/s on an H100, and 616 in a run without it (the step at this size waits on the host thread
    # that launches its kernels, so CPU contention shows).
    "$PYTHON" -c "import sys; sys.path.insert(0, '$HERE/benchmarks'); import data_pipeline; \
data_pipeline.ensure_demo('$DATA', [$H, $W])"
    run $STEP --batch_size $B --steps $STEPS --warmup 3 --repeats 3 --modes fp32,bf16,fp16,half \
        --json "$OUT/train_step_b$B.json"
    run "$PYTHON" "$HERE/benchmarks/ddp_smoke.py" --config "$HERE/configs/php_cuhk.yaml" --device $DEVICE --nproc 1 \
        --repeats 1 --variants plain,torchrun --root_dir "$DATA" --json "$OUT/torchrun_vs_plain.json" \
        --set dataset_name=Demo-PEDES --set pretrain_choice=$ARCH --set "img_size=$H $W" \
        --set batch_size=$B --set num_workers=$WORKERS --set num_epoch=$EPOCHS --set eval_period=$EPOCHS \
        --set tensorboard=false --set warmup_epochs=1
    run "$PYTHON" "$HERE/benchmarks/data_pipeline.py" --workers $WORKERS --batch_size $B --batches 20 --repeats 2 \
        --root_dir "$DATA" --demo_image_size $H $W --step_json "$OUT/train_step_b$B.json" --json "$OUT/data_pipeline.json"
    run $STEP --batch_size $B2 --steps 5 --warmup 2 --repeats 2 --modes bf16 --no_flops \
        --json "$OUT/train_step_b$B2.json"
    run $STEP --batch_size $B2 --steps 5 --warmup 2 --repeats 2 --modes bf16 --no_flops --grad_checkpointing \
        --json "$OUT/train_step_b${B2}_ckpt.json"
    # Last, since compilation time is the least predictable part.
    run $STEP --batch_size $B --steps $STEPS --warmup 3 --repeats 3 --modes compile --compile_precision bf16 \
        --no_flops --mode_timeout 120 --json "$OUT/train_step_b${B}_compile.json"
    date
} 2>&1 | tee "$LOG"
