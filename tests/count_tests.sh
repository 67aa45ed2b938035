#!/usr/bin/env bash
# scripts/count-tests: the closing line of scripts/test counts each Check
# test, not each suite.
set -euo pipefail
root="${QLORA_SOURCE_ROOT:?run through meson test}"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat > "$dir/a.json" <<'J'
{"name": "ops", "result": "OK", "stdout": "Running suite(s): ops\n100%: Checks: 40, Failures: 0, Errors: 0\n"}
{"name": "train", "result": "FAIL", "stdout": "Running suite(s): train\n80%: Checks: 10, Failures: 1, Errors: 1\n"}
{"name": "install", "result": "OK", "stdout": "installed\n"}
J
cat > "$dir/b.json" <<'J'
{"name": "cli", "result": "TIMEOUT", "stdout": "Running suite(s): cli\n"}
{"name": "leaky", "result": "FAIL", "stdout": "100%: Checks: 3, Failures: 0, Errors: 0\n==1==ERROR: LeakSanitizer\n"}
{"name": "gpu", "result": "SKIP", "stdout": ""}
J
got=$(python3 "$root/scripts/count-tests" "$dir/a.json" "$dir/b.json")
want="52 passed, 4 failed, 1 skipped (individual tests, from 6 test programs)"
if [ "$got" != "$want" ]; then
  echo "count-tests printed: $got"
  echo "expected:            $want"
  exit 1
fi
echo ok
