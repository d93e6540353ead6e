#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md: run from the repository root on a GPU machine with JAX.
#   bash scripts/benchmark_gpu.sh [EXTRA BENCHMARK FLAGS...]
# Extra flags are appended to every run (the tests pass tiny sizes to run it on a CPU);
# ONLY=REGEX runs only the runs whose names match. Results
# are printed and written as JSON (and each run's log) under ${OUT:-/tmp/jaxcap_bench}; the exit
# code is 1 if any run failed.
set -u
OUT=${OUT:-/tmp/jaxcap_bench}; mkdir -p "$OUT"
EXTRA=("$@")
FAILED=0
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
else
  echo "no nvidia-smi: running on $(python3 -c 'import jax; print(jax.devices()[0].device_kind)')"
fi
B="python3 scripts/benchmark.py --steps 20 --warmup 3 --peak_matmul_size 8192"
COCO="--config configs/coco.py --config.model.encoder_weights=None --batch_size 256"
run() {
  name=$1; shift
  if [[ -n "${ONLY:-}" && ! "$name" =~ $ONLY ]]; then return; fi
  echo "== $name"
  if timeout 150 $B --json "$OUT/$name.json" "$@" "${EXTRA[@]}" > "$OUT/$name.log" 2>&1; then
    grep -E '"(steps_per_sec|examples_per_sec|achieved_tflops|peak_tflops|mfu|tokens_per_sec|scores_per_sec|captions_per_sec|reward_share)"' "$OUT/$name.json" | tr -d '\n '; echo
  else
    echo "FAILED: see $OUT/$name.log"; tail -3 "$OUT/$name.log"; FAILED=1
  fi
}
run encoder_bf16_b256 $COCO --mode encoder --config.model.dtype=bfloat16
run train_frozen_bf16_b256 $COCO --mode train --config.model.dtype=bfloat16
run decode_greedy_bf16_b256 $COCO --mode decode --config.model.dtype=bfloat16
run demo_train_f32_b64 --config configs/demo.py --mode train --batch_size 64 --vocab_size 128
DEC="--config configs/coco.py --config.model.encoder_weights=None"
run decoder_f32_b256 $DEC --batch_size 256 --mode decoder
run decoder_resident_f32_b256 $DEC --batch_size 256 --mode decoder_resident
run decoder_bf16_b1024 $DEC --batch_size 1024 --mode decoder --config.model.dtype=bfloat16
run decoder_resident_bf16_b1024 $DEC --batch_size 1024 --mode decoder_resident --config.model.dtype=bfloat16
# A COCO-sized epoch: 405 batches of 1024 = 414,720 captions resident; epoch seconds = 405 / steps_per_sec.
run decoder_resident_coco_epoch_bf16_b1024 $DEC --batch_size 1024 --mode decoder_resident --num_batches 405 --steps 405 --config.resident.steps_per_call=405 --config.model.dtype=bfloat16
# Self-critical training: the device CIDEr-D alone (5,000 candidates, 5 references each), then
# SCST steps (5 samples per image) with the reward's share of the step.
SCST="--config configs/coco_scst.py --config.model.encoder_weights=None --config.resident.steps_per_call=10"
run cider_5000 $SCST --mode cider --batch_size 5000
run scst_f32_b256 $SCST --mode scst --batch_size 256
run scst_f32_b1024 $SCST --mode scst --batch_size 1024
exit $FAILED
