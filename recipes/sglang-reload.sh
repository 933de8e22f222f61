#!/bin/sh
# dwsfs on_swap hook: a running SGLang reloads the model from the new step's
# folder, tagged with the step as its weight_version (docs/inference.md).
#   dwsfs: -o on_swap=/usr/local/share/dwsfs/recipes/sglang-reload.sh
# SGLANG_URL (default http://127.0.0.1:30000), SGLANG_RELOAD_TIMEOUT seconds
# (default 1800).
# shellcheck source-path=SCRIPTDIR
set -u
. "$(dirname "$0")/dwsfs-recipe-lib.sh"
dwsfs_need_hook_env
url=${SGLANG_URL:-http://127.0.0.1:30000}

body="{\"model_path\":\"$(dwsfs_json_str "$DWSFS_STEP_DIR")\",\"weight_version\":\"$DWSFS_STEP\"}"
answer=$(dwsfs_post "$url/update_weights_from_disk" "$body" "${SGLANG_RELOAD_TIMEOUT:-1800}") || exit 1
if ! printf '%s' "$answer" | grep -Eq '"success" *: *true'; then
	echo "step $DWSFS_STEP: SGLang refused the update: $(printf '%s' "$answer" | head -c 300)" >&2
	exit 1
fi
echo "step $DWSFS_STEP: SGLang reloaded from $DWSFS_STEP_DIR"
