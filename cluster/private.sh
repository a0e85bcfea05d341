# Sourced by the cluster scripts: their state (pid files, logs, tokens, sockets) lives in folders of their own, and
# a pid file is believed only when the process it names is the one the script started.

# private_dir DIR: DIR made ours alone (mode 0700), or refused when it already exists and another user could have
# planted something in it: a symbolic link, a folder of another owner, or one others may write to.
private_dir() {
    local d=$1 mode
    if [[ -L "$d" ]]; then
        echo "error: $d is a symbolic link: refusing to keep state there; remove it or point the script elsewhere" >&2
        exit 2
    fi
    if [[ -e "$d" ]]; then
        if [[ ! -d "$d" || ! -O "$d" ]]; then
            echo "error: $d exists and is not a folder of yours: remove it, or point the script elsewhere" >&2
            exit 2
        fi
        mode="$(stat -c %a "$d")"
        if (( (8#$mode & 8#022) != 0 )); then
            echo "error: $d may be written by others (mode $mode): chmod go-w it, or point the script elsewhere" >&2
            exit 2
        fi
    else
        (umask 077 && mkdir -p "$d")
    fi
}

# checked_pid FILE PATTERN: the pid FILE names, when that process runs as this user and its command line holds
# PATTERN; nothing otherwise (no file, a stale one, or a pid now used by another program).
checked_pid() {
    local f=$1 pattern=$2 pid
    [[ -f "$f" && ! -L "$f" ]] || return 0
    pid="$(head -c 32 "$f" | tr -dc '0-9')"
    [[ -n "$pid" && -O "/proc/$pid" ]] || return 0
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$pattern"; then
        echo "$pid"
    fi
}
