#!/usr/bin/env bash
# `docker run IMAGE train experiment=...`, `docker run IMAGE sample ckpt=... prompt=...`, or any command.
set -euo pipefail
home="${LDM_HOME:-/opt/ldm}"
case "${1:-}" in
  train) shift; exec python "$home/train.py" "$@" ;;
  sample) shift; exec python "$home/sample.py" "$@" ;;
  export) shift; exec python -m ldm.export "$@" ;;
  cache-latents) shift; exec python -m ldm.data.cache_latents "$@" ;;
  "") echo "usage: train|sample|export|cache-latents ARGS..., or any command" >&2; exit 2 ;;
  *) exec "$@" ;;
esac
