#!/usr/bin/env bash
# One prepared command that proves and measures the GPU paths (issue 27): every CUDA test, the step of ViT-S/16
# against the original (compile off and on), ViT-B/16's MFU, msn_vitl7's largest batch with and without activation
# checkpointing, ViT-L/16 under strategy=ddp and fsdp (2 GPUs or more), the loader and the trainer end to end on
# generated JPEGs, and a shortened fmnist_gpu with its
# k-NN / low-shot figures; the loader and e2e sections run with data.decode_on=device and =cpu side by side. About
# 9 minutes on one H200 with 16 cores.
#
#   bash scripts/gpu_check.sh OUT_DIR            # on a CUDA machine: OUT_DIR/results.jsonl, summary.md, log.txt
#   bash scripts/gpu_check.sh --smoke OUT_DIR    # the same sections on the CPU at tiny sizes (< 2 minutes)
#   bash scripts/gpu_check.sh OUT_DIR --budget S # start no section after S seconds (default 450; 110 with --smoke)
#   bash scripts/gpu_check.sh OUT_DIR --only step_vits16,fit_plan  # these sections only (a rerun of one that failed)
#
# OUT_DIR is taken from the folder you run it in, and the last line says where it wrote and how many sections were
# ok, failed and skipped. Exit code: 0 all ran (sections that cannot run on this machine, such as --max-batch on the
# CPU, are skipped and said), 1 a section failed, 2 a requirement is missing or an argument is wrong, 3 none failed
# but sections were skipped past the time budget (rerun with a larger --budget).
#
# A GPU machine that reaches no package registry and lacks hydra-core, omegaconf or webdataset: on a machine that
# has pip and a registry, in the repository's root,
#   pip install --no-deps --target .gpu-site hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 \
#       webdataset braceexpand
#   echo /.gpu-site/ >> .git/info/exclude
# copy the repository (with .gpu-site) there and run
#   export PYTHONPATH=$PWD/.gpu-site; pip install --no-deps --no-build-isolation --no-index -e .
# before this script (wandb is not needed). For the Fashion-MNIST section copy the four idx files
# (Debian's dataset-fashion-mnist puts them in /usr/share/datasets/fashion-mnist) to .gpu-data/fashion-mnist/
# or set MSN_FASHION_MNIST=DIR; without them that section is reported as skipped.
set -uo pipefail
# no cd: OUT_DIR is relative to the caller's folder (gpu_check.py resolves it, then works from the repository)
REPO="$(cd "$(dirname "$0")/.." && pwd)"
if [ "$#" -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
command -v python > /dev/null || { echo "gpu_check: python is not on PATH" >&2; exit 2; }
command -v msn-pretrain > /dev/null || {
    echo "gpu_check: msn is not installed here: pip install -e . (see the header of $0)" >&2; exit 2; }
exec python "$REPO/scripts/gpu_check.py" "$@"
