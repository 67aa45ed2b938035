#!/usr/bin/env bash
# replay.sh HARNESS DIR: run every file in DIR through HARNESS once (libFuzzer
# runs the files it is given as inputs).  No files: skipped (exit 77).
set -euo pipefail
harness="$1" dir="$2"
files=()
if [ -d "$dir" ]; then
  while IFS= read -r -d '' f; do files+=("$f"); done < <(find "$dir" -maxdepth 1 -type f ! -name '.*' ! -name '*.md' -print0 | sort -z)
fi
if [ ${#files[@]} -eq 0 ]; then
  echo "no regression inputs in $dir"
  exit 77
fi
# a small memory limit: regression inputs are small, and some were bugs because they took 1 GB
exec "$harness" -rss_limit_mb=512 -malloc_limit_mb=512 "${files[@]}"
