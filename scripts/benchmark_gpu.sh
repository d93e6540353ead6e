#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md: run from the repository root on a GPU machine with JAX.
#   bash scripts/benchmark_gpu.sh [EXTRA BENCHMARK FLAGS...]
# Extra flags are appended to every jaxcap run (the tests pass tiny sizes to run it on a CPU);
# ONLY=REGEX runs only the runs whose names match. Each row's PyTorch peer runs beside it
# (`peer_*` runs: the scripts in ${PEERS:-../shared/peers}, with torch and torchvision; copy that
# folder into the checkout to take it to a GPU machine), run by ${PEER_PYTHON:-python3} on
# ${PEER_DEVICE:-cuda}, with PEER_EXTRA's flags appended. Results are printed and written as
# JSON (and each run's log) under ${OUT:-/tmp/jaxcap_bench}; the exit code is 1 if any run
# failed.
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
PEERS=${PEERS:-../shared/peers}
PEER_DEVICE=${PEER_DEVICE:-cuda}
PEER_PYTHON=${PEER_PYTHON:-python3}
read -r -a PEER_EXTRA <<< "${PEER_EXTRA:-}"
KEYS='"(steps_per_sec|examples_per_sec|achieved_tflops|peak_tflops|mfu|tokens_per_sec|scores_per_sec|captions_per_sec|reward_share)"'
selected() { [[ -z "${ONLY:-}" || "$1" =~ $ONLY ]]; }
report() {  # name, exit code of the run
  if [[ $2 == 0 ]]; then
    grep -oE "$KEYS: [0-9.e+-]+" "$OUT/$1.json" | tr '\n' ' '; echo
  else
    echo "FAILED: see $OUT/$1.log"; tail -3 "$OUT/$1.log"; FAILED=1
  fi
}
run() {  # name, benchmark.py flags
  name=$1; shift
  selected "$name" || return 0
  echo "== $name"
  timeout 150 $B --json "$OUT/$name.json" "$@" "${EXTRA[@]}" > "$OUT/$name.log" 2>&1
  report "$name" $?
}
peer() {  # name, peer script, its flags: the script prints one JSON line last
  name=$1 script=$2; shift 2
  selected "$name" || return 0
  echo "== $name"
  timeout 150 "$PEER_PYTHON" "$PEERS/$script" --device "$PEER_DEVICE" "$@" "${PEER_EXTRA[@]}" \
    > "$OUT/$name.log" 2>&1
  local code=$?
  tail -1 "$OUT/$name.log" > "$OUT/$name.json"
  report "$name" $code
}
run encoder_bf16_b256 $COCO --mode encoder --config.model.dtype=bfloat16
peer peer_torch_inception_eager_b256 torch_inception.py --batch_size 256
peer peer_torch_inception_compile_b256 torch_inception.py --batch_size 256 --compile
run train_frozen_bf16_b256 $COCO --mode train --config.model.dtype=bfloat16
run train_finetune_bf16_b128 --config configs/coco_finetune.py --config.model.encoder_weights=None --batch_size 128 --mode train --config.model.dtype=bfloat16
run decode_greedy_bf16_b256 $COCO --mode decode --config.model.dtype=bfloat16
run demo_train_f32_b64 --config configs/demo.py --mode train --batch_size 64 --vocab_size 128
DEC="--config configs/coco.py --config.model.encoder_weights=None"
run decoder_f32_b256 $DEC --batch_size 256 --mode decoder
run decoder_resident_f32_b256 $DEC --batch_size 256 --mode decoder_resident
run decoder_bf16_b1024 $DEC --batch_size 1024 --mode decoder --config.model.dtype=bfloat16
run decoder_resident_bf16_b1024 $DEC --batch_size 1024 --mode decoder_resident --config.model.dtype=bfloat16
run decoder_bf16_b4096 $DEC --batch_size 4096 --mode decoder --config.model.dtype=bfloat16
run decoder_resident_bf16_b4096 $DEC --batch_size 4096 --mode decoder_resident --config.model.dtype=bfloat16
for b in 1024 4096; do
  peer peer_torch_show_tell_eager_bf16_b$b torch_show_tell.py --batch_size $b --bf16
  peer peer_torch_show_tell_compile_bf16_b$b torch_show_tell.py --batch_size $b --bf16 --compile
done
# Up-Down at the peer's sizes (configs/coco_updown.py: embedding, LSTMs and attention 512,
# bfloat16; grid 8 x 8 x 2048), without dropout as the peer.
UPDOWN="--config configs/coco_updown.py --config.model.encoder_weights=None --config.model.dropout=0 --batch_size 1024"
run updown_decoder_bf16_b1024 $UPDOWN --mode decoder
run updown_decoder_resident_bf16_b1024 $UPDOWN --mode decoder_resident
peer peer_torch_updown_eager_bf16_b1024 torch_updown.py --batch_size 1024 --bf16
peer peer_torch_updown_compile_bf16_b1024 torch_updown.py --batch_size 1024 --bf16 --compile
# A COCO-sized epoch: 405 batches of 1024 = 414,720 captions resident; epoch seconds = 405 / steps_per_sec.
run decoder_resident_coco_epoch_bf16_b1024 $DEC --batch_size 1024 --mode decoder_resident --num_batches 405 --steps 405 --config.resident.steps_per_call=405 --config.model.dtype=bfloat16
# Self-critical training: the device CIDEr-D alone (5,000 candidates, 5 references each), then
# SCST steps (5 samples per image) with the reward's share of the step.
SCST="--config configs/coco_scst.py --config.model.encoder_weights=None --config.resident.steps_per_call=10"
run cider_5000 $SCST --mode cider --batch_size 5000
run scst_f32_b256 $SCST --mode scst --batch_size 256
run scst_f32_b1024 $SCST --mode scst --batch_size 1024
exit $FAILED
