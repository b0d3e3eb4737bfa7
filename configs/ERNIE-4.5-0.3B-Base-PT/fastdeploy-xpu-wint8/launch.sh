#!/usr/bin/env bash
# Start FastDeploy 2.3 serving ERNIE-4.5-0.3B-Base-PT on xpu (written by `ernie-paddle deploy`).
# MODEL and the exported variables may be overridden from the environment.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL="${MODEL:-baidu/ERNIE-4.5-0.3B-Base-PT}"
export XPU_VISIBLE_DEVICES="${XPU_VISIBLE_DEVICES:-0}"
exec python -m fastdeploy.entrypoints.openai.api_server --model "$MODEL" --config "$HERE/fastdeploy.yaml" "$@"
