#!/usr/bin/env bash
# Start vllm 0.32.0 serving ERNIE-4.5-0.3B-PT on gpu (written by `ernie-paddle deploy`).
# MODEL and the exported variables may be overridden from the environment.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL="${MODEL:-baidu/ERNIE-4.5-0.3B-PT}"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
exec vllm serve "$MODEL" --config "$HERE/vllm.yaml" "$@"
