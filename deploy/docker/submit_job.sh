#!/bin/sh
# The compose `job` service: build and warm-start the tiny model once, into the working
# directory that `ray job submit` ships to every node, then run the experiment on the
# cluster against the compose Redis and wait for it. Extra arguments are config overrides.
set -eu
CONFIG=${RELAY_CONFIG:-configs/compose.yaml}
RUN_DIR=${RELAY_RUN_DIR:-runs/compose}
MODEL=${RELAY_MODEL:-models/tiny-warm}
: "${RELAY_REDIS_URL:?set RELAY_REDIS_URL to the buffer's redis:// URL}"
: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray head's dashboard, e.g. http://ray-head:8265}"

relay model init -c "$CONFIG"
test -f "$MODEL/config.json" || relay warmstart -c "$CONFIG" "warmstart.out_path=$MODEL"
exec ray job submit --address "$RAY_ADDRESS" --working-dir . \
    --runtime-env deploy/ray/runtime_env.yaml -- \
    relay run -c "$CONFIG" "run_dir=$RUN_DIR" "model.path=$MODEL" "buffer.url=$RELAY_REDIS_URL" "$@"
