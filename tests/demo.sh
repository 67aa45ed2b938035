#!/usr/bin/env bash
# scripts/demo: its closing summary (scripts/demo-summary) and its sample
# prompt, which stories260K must be able to continue.
set -euo pipefail
root="${QLORA_SOURCE_ROOT:?run through meson test}"
qlora="${QLORA_BIN:?}"
model="${QLORA_SHARED:?}/models/stories260K"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

# a run folder as qlora train leaves it
run="$dir/run one"
mkdir -p "$run/checkpoint-10" "$run/checkpoint-2" "$run/checkpoint-30"
touch "$run/adapter_model.safetensors" "$run/adapter_config.json"
cat > "$run/metrics.jsonl" <<'J'
{"event": "device", "device": "cpu"}
{"step": 1, "loss": 4.1, "lr": 0.002, "grad_norm": 1.5, "tokens": 1900, "tokens_per_s": 500.2, "epoch": 0.01}
{"step": 30, "loss": 3.2, "lr": 0.002, "grad_norm": 1.4, "tokens": 58351, "tokens_per_s": 604.8, "epoch": 0.25}
{"event": "eval", "step": 30, "eval_loss": 3.3}
J
got=$("$root/scripts/demo-summary" '{"examples": 196, "nll": 4.19928}' '{"examples": 196, "nll": 3.115335}' \
  build/core/qlora ../shared/models/stories260K "$run" "Once upon a time, there was a little")
want="
== summary
eval loss (mean per token): 4.1993 -> 3.1153 (dropped)
training: 30 steps, 58351 tokens, 605 tokens/s
adapter (PEFT format): $run/adapter_model.safetensors and adapter_config.json
checkpoints: checkpoint-2, checkpoint-10, checkpoint-30 in $run
generate with it:
  build/core/qlora generate --model ../shared/models/stories260K --adapter '$run' --prompt 'Once upon a time, there was a little' --max-new-tokens 48"
[ "$got" = "$want" ] || fail "demo-summary printed:
$got
expected:
$want"

# a loss that did not drop is said, and fails the demo
set +e
got=$("$root/scripts/demo-summary" '{"nll": 3.0}' '{"nll": 3.5}' qlora m "$run" p)
rc=$?
set -e
[ $rc = 1 ] || fail "demo-summary exit $rc when the loss rose"
grep -q '^eval loss (mean per token): 3.0000 -> 3.5000 (did NOT drop)$' <<<"$got" || fail "no 'did NOT drop' in: $got"

# the demo's sample prompt is a story opening that stories260K continues in
# words (greedy), not an instruction it answers with noise
story=$(sed -n 's/^story="\(.*\)"$/\1/p' "$root/scripts/demo")
[ -n "$story" ] || fail "no story=\"...\" line in scripts/demo"
grep -q -- '--prompt "$story"' "$root/scripts/demo" || fail "scripts/demo does not generate from \$story"
text=$("$qlora" generate --model "$model" --quantizer=nf4 --prompt "$story" --max-new-tokens 32 2>/dev/null)
python3 - "$story" "$text" <<'PY' || fail "stories260K does not continue the demo's prompt '$story' in words: '$text'"
import re, sys
story, text = sys.argv[1], sys.argv[2]
words = text.split()
# a continuation of the opening: it starts in lower case, mid-sentence, and
# goes on in plain words with at least one full sentence
ok = (len(words) >= 16 and words[0][0].islower()
      and all(re.fullmatch(r"[A-Za-z]+(['-][A-Za-z]+)*[,.!?\"]*", w) for w in words)
      and "." in text)
sys.exit(0 if ok else 1)
PY
echo ok
