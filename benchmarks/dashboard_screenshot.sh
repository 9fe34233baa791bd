#!/usr/bin/env bash
# Screenshots of an experiment's feature dashboard (reports/<id>/features/, built by the report
# stage) with headless Chromium: the table of latents and the page of one feature.
#
#   benchmarks/dashboard_screenshot.sh [EXPERIMENT] [OUT_DIR] [FEATURE]
#
# EXPERIMENT defaults to minilm_sae_L2, OUT_DIR to docs/images, FEATURE to the highest-scoring
# latent inside the frequency band (read from runs/experiments/<id>/analysis/stats.safetensors).
# Writes OUT_DIR/<id>_features_table.png and OUT_DIR/<id>_feature_<n>.png. Run from the project root.
set -euo pipefail
EID="${1:-minilm_sae_L2}"
OUT="${2:-docs/images}"
PAGE="reports/$EID/features/index.html"
[ -f "$PAGE" ] || { echo "no $PAGE: run the analyze and report stages of $EID first" >&2; exit 1; }
BROWSER="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
[ -n "$BROWSER" ] || { echo "no Chromium on this machine (Debian: apt-get install chromium)" >&2; exit 1; }
FEATURE="${3:-$(python - "$EID" <<'PY'
import sys
from safetensors.torch import load_file
s = load_file(f"runs/experiments/{sys.argv[1]}/analysis/stats.safetensors")
score = s["score"].clone()
score[s["in_band"] == 0] = -1.0
print(int(score.argmax()))
PY
)}"
mkdir -p "$OUT"
URL="file://$(cd "$(dirname "$PAGE")" && pwd)/index.html"
shot() {  # shot FILE HEIGHT URL
  "$BROWSER" --headless --no-sandbox --disable-gpu --disable-background-networking --hide-scrollbars \
    --window-size="1400,$2" --virtual-time-budget=5000 --screenshot="$1" "$3" 2>/dev/null
  echo "wrote $1"
}
shot "$OUT/${EID}_features_table.png" 900 "$URL#band=in"
shot "$OUT/${EID}_feature_${FEATURE}.png" 1300 "$URL#feature=$FEATURE"
