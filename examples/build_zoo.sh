#!/usr/bin/env bash
# Build the backdoored model zoo into zoo/<arch>-<attack>/ (git-ignored), one model after another:
#   resnet x {badnets, blended, wanet, sig, bpp}, and badnets on vgg, preact, mobilenet.
# Each folder gets model.onnx, model.dynamo.onnx, attack.json, train.json and train.log
# (see examples/train_backdoored.py). A model whose train.json exists is skipped unless FORCE=1.
#
# Environment: PYTHON (default python), DATA (default ../shared/data/cifar10.npz), THREADS (default 2),
# EPOCHS (overrides every model's epochs), EXTRA (more arguments for every run), ONLY (e.g. "resnet-sig").
# Every model trains on all 50,000 CIFAR-10 training images. Measured on 2 CPU cores (train.json has each
# model's time): about 6-9 minutes for each ResNet-14 on an idle machine; see docs/results.md for the others.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
DATA=${DATA:-../shared/data/cifar10.npz}
THREADS=${THREADS:-2}

# run NAME EPOCHS ARGS...: train zoo/NAME with train_backdoored.py ARGS, unless ONLY excludes it or it exists.
run() {
    local name=$1 epochs=$2
    shift 2
    local out="zoo/$name"
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
    "$PYTHON" examples/train_backdoored.py "$@" --data "$DATA" --threads "$THREADS" --epochs "${EPOCHS:-$epochs}" \
        --out "$out" ${EXTRA:-} 2>&1 | tee "$out/train.log"
}

train() {  # train ARCH ATTACK EPOCHS [ARGS...]
    local arch=$1 attack=$2 epochs=$3
    shift 3
    run "$arch-$attack" "$epochs" --arch "$arch" --attack "$attack" "$@"
}

for attack in badnets blended sig bpp; do
    train resnet "$attack" 8
done
# WaNet with a 4x stronger warp than BackdoorBench's (s = 2: displacements of about 1 pixel instead of 1/4) and
# without its noise mode: measured here, the default (s = 0.5, --cross-ratio 2) reached 35 % ASR in 8 epochs and
# s = 0.5 without noise mode 20 % after 6 of 10; a CPU budget cannot train the subtler trigger.
train resnet wanet 10 --cross-ratio 0 --param s=2.0
train preact badnets 8
train mobilenet badnets 8
train vgg badnets 8

# Clean models, the null for `scan`'s model-level verdict (docs/detect.md): the same architectures and budgets,
# no poisoned image (--poison-rate 0; attack.json then records the BadNets trigger, so `evaluate` measures the
# natural rate at which the trigger flips a clean model's prediction). Several seeds of the ResNet.
train_clean() {  # train_clean ARCH SEED EPOCHS
    run "$1-clean-s$2" "$3" --arch "$1" --attack badnets --poison-rate 0 --seed "$2"
}

if [[ -z "${NO_CLEAN:-}" ]]; then
    for seed in 0 1 2; do
        train_clean resnet "$seed" 8
    done
    train_clean preact 0 8
    train_clean mobilenet 0 8
    train_clean vgg 0 8
fi
