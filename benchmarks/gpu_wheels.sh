#!/usr/bin/env bash
# Wheels for the GPU check (benchmarks/gpu_check.py) on a lent GPU machine that has no package index.
#
# That machine's python3 is CPython 3.12.3 with torch 2.11 (CUDA), transformers 5.17, huggingface_hub
# 1.33, numpy 2.5, accelerate, datasets' own needs (pyarrow, pandas, fsspec, xxhash), typer, ... but
# not pydantic (which saeclt needs) nor the peers that gpu_check.py compares against. This script,
# run here (where PyPI is reachable) from the repo root as `bash benchmarks/gpu_wheels.sh`, downloads
# the missing packages as cp312 manylinux x86_64 wheels, pinned, without their dependencies:
#
#   .gpu/wheels-base/   what `import sae_clt.cli, sae_clt.training.step` needs there (about 2.8 MB):
#                       pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions
#                       (pydantic 2.14 needs typing-extensions >= 4.16, newer than the image may have)
#   .gpu/wheels-peers/  what `import schedulefree, sparsify` (eai-sparsify 1.3.3) and `import sae_lens`
#                       (sae-lens 6.54.12: TopKTrainingSAE, SAETrainerConfig, SAETrainer) need there
#                       beyond the image and the base set (about 23 MB). wandb is most of it: SAELens
#                       imports it at module level (sae_lens.config, sae_lens.training.sae_trainer) though
#                       it only calls it when logging to W&B, which gpu_check.py does not; platformdirs
#                       and opentelemetry-api are there only for `import wandb` (it works with the
#                       image's protobuf if that is 5.26+, 6.x or 7.x).
#
# .gpu/ is kept out of git (this script adds /.gpu/ to .git/info/exclude). On the GPU machine, carry
# the two folders by name (the device tool's `carry: [".gpu/wheels-base", ".gpu/wheels-peers"]`, not
# all of .gpu/, which may hold other things: 64 MiB a call in all, the ~3.5 MB work tree included) and
# begin the command with:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .gpu/wheels-base/*.whl .gpu/wheels-peers/*.whl && export PYTHONPATH=/tmp/site || exit
#   set -o pipefail; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log
#
# (only .gpu/wheels-base/*.whl for a saeclt-only run). The pins are the versions that worked together
# with sparsify 1.3.3 and SAELens 6.54.12 on the CPU, checked against the image's transformers 5.17 /
# huggingface_hub 1.33 (datasets 5.2 wants huggingface_hub >= 1.31, transformer-lens 3.9 transformers >= 5.9).
# Set PYTHON to use another interpreter for pip (default python3; any Python works, the target is fixed).

set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

BASE=(
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
)

PEERS=(
    eai-sparsify==1.3.3
    schedulefree==1.4.1
    simple-parsing==0.1.9
    docstring-parser==0.18.0
    natsort==8.4.0
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
    sae-lens==6.54.12
    transformer-lens==3.9.0
    better-abc==0.0.3
    wandb==0.31.0
    platformdirs==4.14.9
    opentelemetry-api==1.45.2
)

TARGET=(
    --only-binary=:all: --no-deps --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64
)

die() {
    echo "gpu_wheels.sh: $*" >&2
    exit 1
}

"$PYTHON" -m pip --version >/dev/null 2>&1 || die "no pip for $PYTHON (set PYTHON=...)"
mkdir -p .gpu

# Keep the wheels out of git: /.gpu/ in this checkout's info/exclude (not in .gitignore).
if exclude=$(git rev-parse --git-path info/exclude 2>/dev/null); then
    mkdir -p "$(dirname "$exclude")"
    if ! grep -qxF '/.gpu/' "$exclude" 2>/dev/null; then
        [ -s "$exclude" ] && [ -n "$(tail -c1 "$exclude")" ] && echo >>"$exclude"  # end its last line first
        echo '/.gpu/' >>"$exclude"
    fi
fi

# download FOLDER SPEC...: every SPEC into a fresh folder, which replaces FOLDER only when all arrived
# (so a failed run leaves no half set, and a rerun no stale second version of a package).
download() {
    local dest=$1
    shift
    local tmp log spec name count
    tmp=$(mktemp -d ".gpu/.partial.XXXXXX")
    log="$tmp/.pip.log"
    for spec in "$@"; do
        if ! "$PYTHON" -m pip download -q "${TARGET[@]}" -d "$tmp" "$spec" >"$log" 2>&1; then
            grep -v "is ignored: it is neither a file nor a directory" "$log" >&2 || true
            rm -rf "$tmp"
            die "could not download $spec (cp312 manylinux x86_64 wheel) for $dest"
        fi
        name=${spec%%==*}
        name=${name//-/_}
        count=$(find "$tmp" -maxdepth 1 -iname "${name}-*.whl" | wc -l)
        [ "$count" -eq 1 ] || { rm -rf "$tmp"; die "expected one wheel for $spec in $dest, found $count"; }
    done
    rm -f "$log"
    count=$(find "$tmp" -maxdepth 1 -name '*.whl' | wc -l)
    [ "$count" -eq $# ] || { rm -rf "$tmp"; die "$dest: $count wheels for $# pinned packages"; }
    chmod 755 "$tmp"
    rm -rf "$dest"
    mv "$tmp" "$dest"
}

download .gpu/wheels-base "${BASE[@]}"
download .gpu/wheels-peers "${PEERS[@]}"

for dir in .gpu/wheels-base .gpu/wheels-peers; do
    echo "$dir: $(du -sh "$dir" | cut -f1) in $(find "$dir" -name '*.whl' | wc -l) wheels"
    (cd "$dir" && ls -1s --block-size=K ./*.whl | sed 's|\./||; s/^/    /')
done
echo "together: $(du -shc .gpu/wheels-base .gpu/wheels-peers | tail -1 | cut -f1) (the device tool carries 64 MiB a call, work tree included)"
