#!/bin/sh
# ihip-kv-init NAME [ihip-kv create options...]
#
# Init step of a pod (deploy/k8s): create the pod's kvstore segment NAME in $IHIP_KV_DIR with the
# given geometry and spill tier, unless it is already there (the pod's volumes outlive a restart
# of its containers and of its sandbox): then reap the processes that died with the old
# containers instead. The workers cannot create a spill tier themselves (their --kv-create /
# --kv-blocks make RAM-only segments), so the segment is made here, before they start.
set -eu
if [ $# -lt 1 ]; then
    echo "usage: ihip-kv-init NAME [ihip-kv create options...]" >&2
    exit 2
fi
name="$1"
shift
if ihip-kv stats "$name" >/dev/null 2>&1; then
    echo "ihip-kv-init: segment $name exists in ${IHIP_KV_DIR:-/dev/shm}; reaping dead processes" >&2
    exec ihip-kv gc "$name"
fi
ihip-kv create "$name" "$@"
exec ihip-kv stats "$name"
