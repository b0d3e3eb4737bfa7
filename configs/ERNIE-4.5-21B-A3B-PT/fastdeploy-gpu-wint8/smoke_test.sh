#!/usr/bin/env bash
# Wait until /health answers 200 (FastDeploy answers 304 when its workers are dead, 404 while
# loading; vLLM 503), then send one request to /v1/completions.
# Works against FastDeploy, vLLM and `ernie-paddle serve` alike.
set -euo pipefail
URL="${URL:-http://127.0.0.1:8180}"
TIMEOUT="${TIMEOUT:-900}"
waited=0
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/health")" = 200 ]; do
  if [ "$waited" -ge "$TIMEOUT" ]; then
    echo "smoke_test.sh: $URL/health did not answer 200 within ${TIMEOUT}s" >&2
    exit 1
  fi
  sleep 2
  waited=$((waited + 2))
done
reply="$(curl -fsS "$URL/v1/completions" -H 'Content-Type: application/json' -d '{"model": "ERNIE-4.5-21B-A3B-PT", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}')"
echo "$reply"
case "$reply" in
  *'"choices"'*) echo "smoke test passed" ;;
  *) echo "smoke_test.sh: no choices in the reply" >&2; exit 1 ;;
esac
