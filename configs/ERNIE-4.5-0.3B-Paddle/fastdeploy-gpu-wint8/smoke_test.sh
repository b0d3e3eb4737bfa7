#!/usr/bin/env bash
# Wait until the server answers /health, then send one request to /v1/completions.
# Works against FastDeploy, vLLM and `ernie-paddle serve` alike.
set -euo pipefail
URL="${URL:-http://127.0.0.1:8180}"
TIMEOUT="${TIMEOUT:-900}"
waited=0
until curl -fsS -o /dev/null "$URL/health"; do
  if [ "$waited" -ge "$TIMEOUT" ]; then
    echo "smoke_test.sh: $URL/health not ready after ${TIMEOUT}s" >&2
    exit 1
  fi
  sleep 2
  waited=$((waited + 2))
done
reply="$(curl -fsS "$URL/v1/completions" -H 'Content-Type: application/json' -d '{"model": "ERNIE-4.5-0.3B-Paddle", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}')"
echo "$reply"
case "$reply" in
  *'"choices"'*) echo "smoke test passed" ;;
  *) echo "smoke_test.sh: no choices in the reply" >&2; exit 1 ;;
esac
