#!/usr/bin/env bash
# Start a jaxinterp program on every worker of a Cloud TPU VM slice.
#
#   tpu_configs/launch_tpu.sh TPU_NAME ZONE TARGET_YAML [--setup] -- python -m MODULE ARGS...
#
# e.g.
#   tpu_configs/launch_tpu.sh my-v5e us-west4-a tpu_configs/v5e-16.yaml --setup -- \
#       python -m jaxinterp.sharding patch-sweep --config tpu_configs/v5e-16.yaml --model gpt2:small \
#       --prompts 1000 --out results/patching_v5e16
#
# Every worker runs the same command; on TPU VMs jax.distributed.initialize() finds the
# coordinator, process count and process id from the TPU metadata, which jaxinterp requests
# with JAXINTERP_DISTRIBUTED=auto. --setup first copies this checkout to every worker and
# installs it (pip install -e .). The dry-run validates the target before anything starts.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,14p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; TARGET=$3; shift 3
SETUP=0
if [[ ${1:-} == "--setup" ]]; then SETUP=1; shift; fi
[[ ${1:-} == "--" ]] && shift
REMOTE_DIR=${JAXINTERP_REMOTE_DIR:-jaxinterp}
CMD=$(printf '%q ' "$@")

python -m jaxinterp.sharding dry-run --config "$TARGET" --model "${JAXINTERP_DRYRUN_MODEL:-gpt2:small}" >/dev/null

gssh() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }
if [[ $SETUP == 1 ]]; then
  tar czf /tmp/jaxinterp_src.tgz --exclude=.git --exclude=results --exclude='*.ckpt' .
  gcloud compute tpus tpu-vm scp /tmp/jaxinterp_src.tgz "$TPU_NAME":/tmp/ --zone "$ZONE" --worker=all
  gssh "mkdir -p $REMOTE_DIR && tar xzf /tmp/jaxinterp_src.tgz -C $REMOTE_DIR && cd $REMOTE_DIR && \
        pip install -q -e . && pip install -q 'jax[tpu]'"
fi
gssh "cd $REMOTE_DIR && JAXINTERP_DISTRIBUTED=auto JAXINTERP_TARGET=$TARGET $CMD"
