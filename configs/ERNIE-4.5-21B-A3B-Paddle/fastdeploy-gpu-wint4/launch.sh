#!/usr/bin/env bash
# Start FastDeploy 2.3 serving ERNIE-4.5-21B-A3B-Paddle on gpu (written by `ernie-paddle deploy`).
# MODEL and the exported variables may be overridden from the environment.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL="${MODEL:-baidu/ERNIE-4.5-21B-A3B-Paddle}"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
exec python -m fastdeploy.entrypoints.openai.api_server --model "$MODEL" --config "$HERE/fastdeploy.yaml" "$@"
