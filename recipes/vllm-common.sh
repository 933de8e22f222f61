# The vLLM calls of the recipes (sourced after dwsfs-recipe-lib.sh).

url=${VLLM_URL:-http://127.0.0.1:8000}

# Requests in flight are kept and go on with the new weights on resume; the
# KV cache, computed with the old ones, is dropped.
vllm_pause() {
	dwsfs_post "$url/pause?mode=keep&clear_cache=true" "" 60 >/dev/null
}

vllm_resume() {
	dwsfs_post "$url/resume" "" 60 >/dev/null
}

vllm_reload() {
	dwsfs_post "$url/collective_rpc" \
		"{\"method\":\"reload_weights\",\"kwargs\":{\"weights_path\":\"$(dwsfs_json_str "$DWSFS_STEP_DIR")\"}}" \
		"${VLLM_RELOAD_TIMEOUT:-1800}" >/dev/null
}

# Reload the whole model and resume; on failure see vllm_failed.
vllm_reload_and_resume() {
	if vllm_reload; then
		vllm_resume && echo "step $DWSFS_STEP: reloaded from $DWSFS_STEP_DIR"
		exit
	fi
	vllm_failed
}

# After a failed reload the weights are part old, part new: the server stays
# paused (the next step's run loads it whole and resumes) unless told.
vllm_failed() {
	if [ "${VLLM_RESUME_ON_ERROR:-0}" = 1 ]; then
		vllm_resume
		echo "step $DWSFS_STEP: reload failed; resumed anyway (VLLM_RESUME_ON_ERROR=1)" >&2
	else
		echo "step $DWSFS_STEP: reload failed; the server stays paused until a step loads" >&2
	fi
	exit 1
}
