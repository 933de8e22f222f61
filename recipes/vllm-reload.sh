#!/bin/sh
# dwsfs on_swap hook: a running vLLM reloads the whole model from the new
# step's folder (docs/inference.md).
#   vLLM:  VLLM_SERVER_DEV_MODE=1 vllm serve /mnt/model ...
#   dwsfs: -o on_swap=/usr/local/share/dwsfs/recipes/vllm-reload.sh
# VLLM_URL (default http://127.0.0.1:8000), VLLM_RELOAD_TIMEOUT seconds
# (default 1800), VLLM_RESUME_ON_ERROR=1 to resume even after a failed reload.
# shellcheck source-path=SCRIPTDIR
set -u
. "$(dirname "$0")/dwsfs-recipe-lib.sh"
dwsfs_need_hook_env
. "$(dirname "$0")/vllm-common.sh"

vllm_pause || exit 1
vllm_reload_and_resume
