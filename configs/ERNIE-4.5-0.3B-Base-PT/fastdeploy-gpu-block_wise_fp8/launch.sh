#!/usr/bin/env bash
# Start FastDeploy 2.3 serving ERNIE-4.5-0.3B-Base-PT on gpu (written by `ernie-paddle deploy`).
# MODEL and the visible-devices variable may be overridden from the environment.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL="${MODEL:-baidu/ERNIE-4.5-0.3B-Base-PT}"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1)"
if [ "${cap%%.*}" -lt 9 ]; then
  echo "launch.sh: block_wise_fp8 needs a Hopper GPU (compute capability 9.x), found $cap; redeploy with --quantization wint8" >&2
  exit 2
fi
exec python -m fastdeploy.entrypoints.openai.api_server --model "$MODEL" --config "$HERE/fastdeploy.yaml" "$@"
