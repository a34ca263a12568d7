#!/usr/bin/env bash
# A timm ImageNet model from a local checkpoint (nothing is downloaded):
#   CKPT: a DeiT/timm checkpoint (a state dict, a dict with a 'model' key, or .safetensors)
#   VAL:  an ImageNet-style folder of synset subfolders (n01440764/...), for eval and verify
# The paper's recipe (10K images x 2000 steps, 200 epochs) wants a GPU; spread it with torchrun.
# Smaller runs (CI): RECIPE=tiny.toml, EXPORT_CONFIG=cfg.toml, MODEL=another timm ViT name.
set -euo pipefail
CKPT=${1:?path to deit_tiny_patch16_224 checkpoint}
VAL=${2:?ImageNet-style val folder}
RUN=${3:-runs/deit-tiny-w4a8}
MIMIQ=${MIMIQ:-mimiq-deploy}
TORCHRUN=${TORCHRUN:-torchrun}
MODEL=${MODEL:-deit_tiny_patch16_224}
RECIPE=${RECIPE:-$(dirname "$0")/../calib/deit-imagenet.toml}
$MIMIQ eval --model "$MODEL" --checkpoint "$CKPT" --val-dir "$VAL"
$TORCHRUN --nproc_per_node "${NPROC:-1}" -m mimiq_deploy synthesize --model "$MODEL" \
    --checkpoint "$CKPT" --out "$RUN" --recipe "$RECIPE"
$TORCHRUN --nproc_per_node "${NPROC:-1}" -m mimiq_deploy finetune --model "$MODEL" \
    --checkpoint "$CKPT" --data "$RUN" --bits w4a8 --recipe "$RECIPE"
$MIMIQ quantize --model "$MODEL" --checkpoint "$CKPT" --bits w4a8 ${EXPORT_CONFIG:+--export-config "$EXPORT_CONFIG"} \
    --recipe "$RECIPE" --val-dir "$VAL" --out "$RUN"   # export, build, verify, bench, report
