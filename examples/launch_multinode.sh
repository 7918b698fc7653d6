#!/usr/bin/env bash
# Launch `megamath train` on several nodes with torchrun's c10d rendezvous. Run this same command once
# per node (by hand, pdsh, or `srun --ntasks-per-node=1 --cpus-per-task=N` under SLURM: since Slurm 22.05
# srun does not inherit --cpus-per-task, and the ranks would share one CPU):
#
#   NNODES=32 NODE_RANK=<0..31> MASTER_ADDR=<node 0's hostname> \
#       bash examples/launch_multinode.sh examples/llemma_7b.yaml [dotted.key=value ...]
#
# Environment (SLURM's values are used when set):
#   NNODES         nodes in the job                     (SLURM_NNODES, else 1)
#   NODE_RANK      this node's rank                     (SLURM_NODEID, else 0)
#   GPUS_PER_NODE  processes per node, one per GPU      (8)
#   MASTER_ADDR    rendezvous host, node 0              (first host of SLURM_JOB_NODELIST; else needed
#                                                        when NNODES > 1, localhost on one node)
#   MASTER_PORT    rendezvous port                      (29500)
#   RDZV_ID        job id shared by all nodes           (SLURM_JOB_ID, else megamath)
# Checkpoints go to the config's run_dir, which every node must see (a shared filesystem).
#
# Preemption: SIGTERM or SIGUSR1 to the training processes makes them finish the current step, save a
# checkpoint and exit 0; relaunching the same command resumes from RUN_DIR/checkpoints/latest. torchrun
# forwards its own SIGTERM to the workers but kills them about 30 s later, so for large models signal
# the workers directly, early (e.g. SLURM's `--signal=USR1@300` delivered to the training processes).
set -euo pipefail
CONFIG=${1:?usage: launch_multinode.sh CONFIG [dotted.key=value ...]}
shift

NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
if [[ -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
    # The first line of the whole list, not `| head -n 1`: under pipefail, scontrol killed by SIGPIPE once head
    # has left (a list longer than the pipe holds) would stop this script without a word.
    HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
    MASTER_ADDR=${HOSTS%%$'\n'*}
fi
if [[ -z "${MASTER_ADDR:-}" && "$NNODES" != 1 ]]; then  # else every node waits on its own localhost store
    echo "launch_multinode.sh: error: NNODES=$NNODES needs MASTER_ADDR, the hostname of node 0 (every node must use" \
         "the same; under SLURM it is read from SLURM_JOB_NODELIST)" >&2
    exit 2
fi
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-megamath}}
# CPU threads per rank for data and host work; NCCL settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA) are the site's.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

exec torchrun \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID" \
    -m megamath.cli train --config "$CONFIG" "$@"
