#!/usr/bin/env bash
# A timm ImageNet model from a local checkpoint (nothing is downloaded):
#   CKPT: a DeiT/timm checkpoint (a state dict, or a dict with a 'model' key)
#   VAL:  an ImageNet-style folder of synset subfolders (n01440764/...), for eval and verify
# The paper's recipe (10K images x 2000 steps, 200 epochs) wants a GPU; spread it with torchrun.
set -euo pipefail
CKPT=${1:?path to deit_tiny_patch16_224 checkpoint}
VAL=${2:?ImageNet-style val folder}
RUN=${3:-runs/deit-tiny-w4a8}
mimiq-deploy eval --model deit_tiny_patch16_224 --checkpoint "$CKPT" --val-dir "$VAL"
torchrun --nproc_per_node "${NPROC:-1}" -m mimiq_deploy synthesize --model deit_tiny_patch16_224 \
    --checkpoint "$CKPT" --out "$RUN" --recipe calib/deit-imagenet.toml
torchrun --nproc_per_node "${NPROC:-1}" -m mimiq_deploy finetune --model deit_tiny_patch16_224 \
    --checkpoint "$CKPT" --data "$RUN" --bits w4a8 --recipe calib/deit-imagenet.toml
mimiq-deploy quantize --model deit_tiny_patch16_224 --checkpoint "$CKPT" --bits w4a8 \
    --recipe calib/deit-imagenet.toml --val-dir "$VAL" --out "$RUN"   # export, build, verify, bench, report
