#!/bin/sh
# dwsfs on_swap hook: a running vLLM takes the catch-up patch in place
# (only the changed elements); a full reload when there is no patch or it
# fails (docs/inference.md).
#   vLLM:  PYTHONPATH=/usr/local/share/dwsfs/recipes VLLM_SERVER_DEV_MODE=1 \
#          vllm serve /mnt/model --worker-extension-cls dwsfs_vllm.DwsfsWorkerExtension
#   dwsfs: -o on_swap=/usr/local/share/dwsfs/recipes/vllm-patch.sh
# VLLM_URL, VLLM_RELOAD_TIMEOUT, VLLM_RESUME_ON_ERROR as vllm-reload.sh;
# VLLM_PATCH_TIMEOUT seconds (default 300).
# shellcheck source-path=SCRIPTDIR
set -u
. "$(dirname "$0")/dwsfs-recipe-lib.sh"
dwsfs_need_hook_env
. "$(dirname "$0")/vllm-common.sh"

vllm_pause || exit 1
if [ -n "${DWSFS_PATCH:-}" ]; then
	body="{\"method\":\"dwsfs_apply_patch\",\"args\":[\"$(dwsfs_json_str "$DWSFS_PATCH")\",\"$(dwsfs_json_str "$DWSFS_STEP_DIR")\"]}"
	if dwsfs_post "$url/collective_rpc" "$body" "${VLLM_PATCH_TIMEOUT:-300}" >/dev/null; then
		vllm_resume && echo "step $DWSFS_STEP: patched from step $DWSFS_PREV_STEP"
		exit
	fi
	echo "step $DWSFS_STEP: the patch from step $DWSFS_PREV_STEP failed; reloading the whole model" >&2
fi
vllm_reload_and_resume
