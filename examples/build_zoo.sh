#!/usr/bin/env bash
# Build the backdoored model zoo into zoo/<arch>-<attack>/ (git-ignored), one model after another:
#   resnet x {badnets, blended, wanet, sig, bpp}, and badnets on vgg, preact, mobilenet.
# Each folder gets model.onnx, model.dynamo.onnx, attack.json, train.json and train.log
# (see examples/train_backdoored.py). A model whose train.json exists is skipped unless FORCE=1.
#
# Environment: PYTHON (default python), DATA (default ../shared/data/cifar10.npz), THREADS (default 2),
# EPOCHS (overrides every model's epochs), EXTRA (more arguments for every run), ONLY (e.g. "resnet-sig").
# On 2 idle CPU cores each model takes roughly 6-8 minutes (estimated from training-step throughput, docs/evaluate.md).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
DATA=${DATA:-../shared/data/cifar10.npz}
THREADS=${THREADS:-2}

train() {
    local arch=$1 attack=$2 epochs=$3
    local name="$arch-$attack" out="zoo/$arch-$attack"
    if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then
        return
    fi
    if [[ -f "$out/train.json" && -z "${FORCE:-}" ]]; then
        echo "skip $name (exists; FORCE=1 rebuilds it)"
        return
    fi
    mkdir -p "$out"
    echo "=== $name"
    # shellcheck disable=SC2086
    "$PYTHON" examples/train_backdoored.py --arch "$arch" --attack "$attack" --data "$DATA" \
        --threads "$THREADS" --epochs "${EPOCHS:-$epochs}" --out "$out" ${EXTRA:-} 2>&1 | tee "$out/train.log"
}

for attack in badnets blended wanet sig bpp; do
    train resnet "$attack" 8
done
# epochs chosen from training-step throughput on an idle 2-core machine (docs/evaluate.md): about 6-8 minutes each
train vgg badnets 12
train preact badnets 10
train mobilenet badnets 12
