# Shared by the dwsfs on_swap recipes (sourced, not run). POSIX sh + curl.

# dwsfs_json_str S: S as a JSON string body (quotes and backslashes escaped);
# fails on control characters, which no path of ours has.
dwsfs_json_str() {
	case $1 in *[[:cntrl:]]*) echo "dwsfs recipe: control character in '$1'" >&2; return 1 ;; esac
	printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g'
}

# dwsfs_post URL BODY SECONDS: POST a JSON body (empty: none); the answer on
# stdout; one line on stderr and a failure on an HTTP error, a refused
# connection or SECONDS passing. $DWSFS_RECIPE_AUTH, if set, is sent as the
# Authorization header.
dwsfs_post() {
	_out=$(mktemp) || return 1
	set -- "$1" "$2" "$3" -sS -X POST --connect-timeout 5 --max-time "$3" -o "$_out" -w '%{http_code}'
	[ -n "$2" ] && set -- "$@" -H 'Content-Type: application/json' --data-binary "$2"
	[ -n "${DWSFS_RECIPE_AUTH:-}" ] && set -- "$@" -H "Authorization: $DWSFS_RECIPE_AUTH"
	_url=$1
	shift 3
	_code=$(curl "$@" "$_url" 2>"$_out.err") || {
		echo "POST $_url: no answer: $(sed 's/^curl: ([0-9]*) //' "$_out.err" | head -n 1)" >&2
		rm -f "$_out" "$_out.err"
		return 1
	}
	rm -f "$_out.err"
	_body=$(cat "$_out")
	rm -f "$_out"
	case $_code in
	2??) printf '%s\n' "$_body" ;;
	*) echo "POST $_url: HTTP $_code: $(printf '%s' "$_body" | head -c 300 | tr '\n' ' ')" >&2; return 1 ;;
	esac
}

# dwsfs_need_hook_env: the variables dwsfs sets for on_swap.
dwsfs_need_hook_env() {
	if [ -z "${DWSFS_STEP:-}" ] || [ -z "${DWSFS_STEP_DIR:-}" ]; then
		echo "$0: run me as dwsfs's on_swap hook (DWSFS_STEP and DWSFS_STEP_DIR unset)" >&2
		exit 2
	fi
}
