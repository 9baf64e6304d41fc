#!/usr/bin/env bash
# The GPU session of issue 8 (GPU speed), in parts that each fit one 10-minute device call:
#
#   bash tests/engine/gpu/session.sh tests   # GPU equivalence tests + report      (~5 min)
#   bash tests/engine/gpu/session.sh fast    # bench, 3 sizes, plain vs all paths  (~8 min)
#   bash tests/engine/gpu/session.sh bf16    # bench, bf16 + compile vs bare kernels (~6 min)
#   bash tests/engine/gpu/session.sh all     # the three, one after another
#   bash tests/engine/gpu/session.sh decode  # the VAE decode, eager vs compile_vae, both
#                                            # layouts; then the bench at 704x384 with it (~5 min)
#   bash tests/engine/gpu/session.sh ranks   # issue 9: one pipeline rank's share per run, on
#                                            # one GPU: peak memory per rank (~8 min)
#   bash tests/engine/gpu/session.sh ranks24 # only ranks' 24 GB-card settings (~3 min: for a
#                                            # session left with little device time)
#   bash tests/engine/gpu/session.sh serve   # issue 13: `avatar latency-run` on `avatar serve
#                                            # --random-weights` at 704x384, every speed path
#                                            # on; needs the server's wheels in .whl (~8 min)
#   bash tests/engine/gpu/session.sh pipeline  # issue 9 on a multi-GPU machine (x4 for "4",
#                                            # x8 for "4+vae"): a whole pipeline vs one GPU
#
# Everything lands in $OUT (default ./gpu-out): bench-*.jsonl (one JSON object per size),
# gpu-report.json (measured errors and tolerances), pytest and bench logs, nvidia-smi, versions.
# Runs with the machine's own python3 (its CUDA PyTorch); needs nothing of the server stack.
set -uo pipefail
cd "$(dirname "$0")/../../.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# compiled kernels survive between the parts while the machine stays warm
export TORCHINDUCTOR_CACHE_DIR="$PWD/build/inductor-cache"
PY="${PYTHON:-python3}"
LIMIT="${LIMIT:-560}"  # seconds per part: stop (keeping what is written) before the call's 600 s

info() {
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  "$PY" -c 'import torch, sys; print(sys.version); print("torch", torch.__version__, "cuda",
torch.version.cuda, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name())' \
    > "$OUT/versions.txt" 2>&1
}

bench() {  # name, args...
  local name="$1"; shift
  timeout "$LIMIT" "$PY" -m engine bench --steps 4 --blocks 8 --json "$@" \
    > "$OUT/bench-$name.jsonl" 2> "$OUT/bench-$name.log"
  echo "bench $name: exit $? ($(wc -l < "$OUT/bench-$name.jsonl") sizes)"
}

part_tests() {
  AVATAR_GPU_REPORT="$OUT/gpu-report.json" timeout "$LIMIT" "$PY" -m pytest -q -s -m gpu \
    -p no:cacheprovider tests/engine/gpu --junitxml="$OUT/gpu-tests.xml" \
    > "$OUT/gpu-tests.log" 2>&1
  echo "gpu tests: exit $?"; tail -5 "$OUT/gpu-tests.log"
}

part_fast() {  # the issue's command at the three sizes, every speed path on
  bench fast --size "704*384,576*320,448*256" --baseline --fp8 --compile --vae-compile
}

part_bf16() {  # bf16 alone (no FP8): the step against the bare GEMMs + attention, same run
  bench bf16 --size "704*384,576*320" --baseline --no-fp8 --compile
}

part_decode() {  # issue 8's slowest part: the fused VAE elementwise work, alone then in a bench
  timeout 300 "$PY" -m tests.engine.gpu.profile_decode --size "704*384" \
    > "$OUT/decode.log" 2>&1
  echo "profile_decode: exit $?"; grep "ms per block\|compile (" "$OUT/decode.log"
  bench vae --size "704*384" --baseline --fp8 --compile --vae-compile
}

part_ranks() {  # what each rank of layout 4 / 4+vae holds and runs, FP8, one GPU at a time
  local share
  for share in 4:0 4:1 4:3 4+vae:0 4+vae:4; do
    timeout 150 "$PY" -m engine bench --steps 4 --blocks 8 --json --fp8 \
      --size "448*256,704*384" --rank-share "$share" \
      >> "$OUT/bench-ranks.jsonl" 2>> "$OUT/bench-ranks.log"
    echo "rank share $share: exit $?"
  done
  part_ranks24
}

part_ranks24() {
  # the 24 GB-card question (docs/bench.md, "Rank shares"): no avatar cache (a small card's
  # memory plan leaves it none), the allocator's expandable segments, wav2vec2 in bfloat16
  # (on rank 1 of layout 4, the VAE rank of 4+vae); every rank of both layouts, then the
  # features rank of layout 4 with wav2vec2 in float32
  local share
  for share in 4+vae:0 4:0 4:1 4:2 4:3 4+vae:4 4:1/float32; do
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 90 "$PY" -m engine bench \
      --steps 4 --blocks 4 --json --fp8 --avatar-cache-mb 0 --size "448*256" \
      --audio-dtype "$( [[ $share == */float32 ]] && echo float32 || echo bfloat16 )" \
      --rank-share "${share%/*}" >> "$OUT/bench-ranks-24gb.jsonl" 2>> "$OUT/bench-ranks.log"
    echo "rank share $share (24 GB settings): exit $?"
  done
}

part_serve() {
  # the server's packages the GPU image lacks (aiortc, av, websockets, ...) travel as wheels:
  # docs/bench.md says how to fetch them into .whl and carry it
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "no wheels in .whl"; return 1; }
  PYTHONPATH="$PWD:$PWD/client/python:/tmp/site" timeout "$LIMIT" "$PY" -m stream.cli \
    latency-run --seconds "${RUN_SECONDS:-180}" --size "704*384" --ready-timeout 330 \
    --serve-arg=--random-weights --set engine.fp8=true --set engine.compile=true \
    --set engine.vae_compile=true --server-log "$OUT/serve.log" \
    --json "$OUT/latency-run.json" > "$OUT/latency-run.txt" 2>&1
  echo "latency-run: exit $?"; tail -8 "$OUT/latency-run.txt"
}

part_pipeline() {  # needs as many GPUs as the layout has ranks (nvidia-h200-x4 / -x8)
  local layout="${LAYOUT:-4}"
  timeout "$LIMIT" "$PY" -m engine bench --steps 4 --blocks 16 --json --fp8 --compile \
    --size "704*384" --layout "$layout" --baseline \
    > "$OUT/bench-pipeline-$layout.jsonl" 2> "$OUT/bench-pipeline-$layout.log"
  echo "pipeline $layout: exit $?"
}

info
case "${1:-all}" in
  tests) part_tests ;;
  fast) part_fast ;;
  bf16) part_bf16 ;;
  decode) part_decode ;;
  ranks) part_ranks ;;
  ranks24) part_ranks24 ;;
  serve) part_serve ;;
  pipeline) part_pipeline ;;
  all) part_tests; part_fast; part_bf16 ;;
  *) echo "usage: $0 tests|fast|bf16|decode|ranks|ranks24|serve|pipeline|all" >&2; exit 2 ;;
esac
ls -la "$OUT"
