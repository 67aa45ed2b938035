#!/bin/bash
# MMLU scoring speed with and without the few-shot prefix reuse and the
# batching of the questions after it (qlora eval --mmlu), on a random LLaMA
# of real width with stories260K's tokenizer (a model that scores at chance:
# the figure is the time, the scores only have to agree).
# usage: [MMLU_MODES='--batch-size 1|--batch-size 8'] bench/mmlu_batch_bench.sh MMLU_DIR [DEVICE] [QUANTIZER]
# (PyTorch and transformers make the model)
set -euo pipefail
mmlu=$1; dev=${2:-cuda}; qz=${3:-nf4}
shared=${QLORA_SHARED:-../shared}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
python3 - "$dir" "$shared/models/stories260K" <<'PY'
import sys, shutil, torch, transformers
out, tok = sys.argv[1], sys.argv[2]
cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                               num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
torch.manual_seed(0)
m = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained(out)
for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
    try: shutil.copy(f"{tok}/{f}", out)
    except FileNotFoundError: pass
PY
TIMEFORMAT='%R s (user %U s, sys %S s)'
# MMLU_MODES: the runs, separated by |
IFS='|' read -r -a modes <<< "${MMLU_MODES:---mmlu-no-reuse|--batch-size 1|--batch-size 8|--batch-size 16}"
for mode in "${modes[@]}"; do
  t=$( { time ./build/core/qlora eval --model "$dir" --quantizer=$qz --mmlu "$mmlu" --shots 5 --max-examples 20 \
           --device $dev $mode --quiet > "$dir/out.json" 2>/dev/null; } 2>&1 )
  echo "$dev $qz $mode: $t  $(python3 -c 'import json,sys,hashlib; j=json.load(open(sys.argv[1])); print("accuracy", j["accuracy"], "tokens_run", j["tokens_run"], "per_subject", hashlib.md5(json.dumps(j["per_subject"], sort_keys=True).encode()).hexdigest()[:8])' "$dir/out.json")"
done
# MMLU_PROFILE=1: per-kernel GPU time (Nsight Compute) of 4 questions of 2 subjects, each mode
if [ "${MMLU_PROFILE:-0}" = 1 ]; then
  mkdir -p "$dir/small/dev" "$dir/small/test"
  for sub in abstract_algebra anatomy; do
    cp "$mmlu/dev/${sub}_dev.csv" "$dir/small/dev/"; cp "$mmlu/test/${sub}_test.csv" "$dir/small/test/"
  done
  for mode in "${modes[@]}"; do
    ncu --metrics gpu__time_duration.sum --csv --log-file "$dir/ncu.csv" ./build/core/qlora eval --model "$dir" \
      --quantizer=$qz --mmlu "$dir/small" --shots 5 --max-examples 4 --device $dev $mode --quiet >/dev/null 2>&1 || true
    echo "== kernels, $mode (8 questions)"
    python3 bench/ncu_summary.py "$dir/ncu.csv" --top 12 || true
  done
fi
