#!/usr/bin/env bash
# The embedded default end to end: synthesize -> finetune -> export -> build -> verify -> bench.
# CPU-sized (--preset fast); drop --preset for the full recipe in calib/fmnist-vit.toml.
set -euo pipefail
RUN=${1:-runs/fmnist-w4a8}
mimiq-deploy quantize --model fmnist-vit --bits w4a8 --preset fast --out "$RUN"
# Reuse the same synthetic set for another bit setting, stage by stage:
mimiq-deploy finetune --model fmnist-vit --data "$RUN" --bits w8a8 --recipe calib/fmnist-vit-fast.toml --out "$RUN-w8a8"
mimiq-deploy export "$RUN-w8a8"
mimiq-deploy build "$RUN-w8a8"
mimiq-deploy verify "$RUN-w8a8"
mimiq-deploy bench "$RUN-w8a8" --batch 1,32
