#!/usr/bin/env bash
# The embedded default end to end: synthesize -> finetune -> export -> build -> verify -> bench.
# CPU-sized (--preset fast); drop --preset for the full recipe in calib/fmnist-vit.toml.
# Smaller runs (CI): RECIPE=tiny.toml replaces the preset, EXPORT_CONFIG=cfg.toml the deployment
# config, VERIFY_LIMIT=N verifies on N images, BATCHES=1 benches batch 1 only.
set -euo pipefail
RUN=${1:-runs/fmnist-w4a8}
MIMIQ=${MIMIQ:-mimiq-deploy}
if [[ -n "${RECIPE:-}" ]]; then PLAN=(--recipe "$RECIPE"); else
    PLAN=(--preset fast); RECIPE="$(dirname "$0")/../calib/fmnist-vit-fast.toml"; fi
$MIMIQ quantize --model fmnist-vit --bits w4a8 "${PLAN[@]}" --out "$RUN" \
    ${EXPORT_CONFIG:+--export-config "$EXPORT_CONFIG"} ${VERIFY_LIMIT:+--verify-limit "$VERIFY_LIMIT"}
# Reuse the same synthetic set for another bit setting, stage by stage:
$MIMIQ finetune --model fmnist-vit --data "$RUN" --bits w8a8 --recipe "$RECIPE" --out "$RUN-w8a8"
$MIMIQ export "$RUN-w8a8" ${EXPORT_CONFIG:+--config "$EXPORT_CONFIG"}
$MIMIQ build "$RUN-w8a8"
$MIMIQ verify "$RUN-w8a8" ${VERIFY_LIMIT:+--limit "$VERIFY_LIMIT"}
$MIMIQ bench "$RUN-w8a8" --batch "${BATCHES:-1,32}"
