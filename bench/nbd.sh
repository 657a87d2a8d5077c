#!/usr/bin/env bash
# NBD benchmark: fio (ioengine=nbd, libnbd) against blocksnap's NBD export of a volume,
# qemu-nbd and nbdkit-file serving the same backing image one after the other.
# Run as root from the worktree root after `cargo build --release --examples`. See bench/README.md.
#
# Knobs (env): VOL_SIZE (4G), RUNTIME (10 s per workload), RAMP (2 s), TMPBASE (/var/tmp),
# BIN (target/release), NBD_SERVE (1 = also measure examples/nbd_serve, the bare server),
# ORDER ("blocksnapd nbd_serve qemu-nbd nbdkit": the order the servers are measured in),
# ONLY (workload names to run, e.g. "randread-4k randwrite-4k"; default all),
# REPS (3: each workload runs REPS times per server; the table shows the median run).
set -euo pipefail

BIN=${BIN:-$(pwd)/target/release}
VOL_SIZE=${VOL_SIZE:-4G}
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-2}
TMPBASE=${TMPBASE:-/var/tmp}
NBD_SERVE=${NBD_SERVE:-1}
ORDER=${ORDER:-"blocksnapd nbd_serve qemu-nbd nbdkit"}
REPS=${REPS:-3}

[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
for t in jq fio qemu-nbd nbdkit nbdinfo; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 1; }; done
[ -x "$BIN/blocksnapd" ] && [ -x "$BIN/blocksnap" ] || { echo "build first: cargo build --release" >&2; exit 1; }
fio --enghelp=nbd 2>/dev/null | grep -q '^uri' || { echo "fio has no nbd engine" >&2; exit 1; }

WORK=$(mktemp -d "$TMPBASE/blocksnap-nbdbench.XXXXXX")
DAEMON_PID=""
SERVER_PID=""
cleanup() {
    set +e
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID"; for _ in $(seq 50); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$DAEMON_PID" 2>/dev/null
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

bs() { "$BIN/blocksnap" --socket "$SOCK" "$@"; }
wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

echo "== environment"
echo "date:   $(date -u +%FT%TZ)"
echo "kernel: $(uname -r)"
echo "cpu:    $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') x $(nproc)"
echo "load:   $(cut -d' ' -f1-3 /proc/loadavg)"
echo "fs of $TMPBASE (state dir, image): $(findmnt -n -o FSTYPE,SOURCE -T "$TMPBASE")"
echo "tools:  $(fio --version), $(qemu-nbd --version | head -1), $(nbdkit --version)"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "plan:   one ${VOL_SIZE} image, pre-filled with random data; servers run one at a time on it;"
echo "        page cache warmed before each workload (this measures the servers, not the disk);"
echo "        fio --ioengine=nbd, 1 job, ${RUNTIME}s (+${RAMP}s ramp) per workload"
echo

SD="$WORK/state"; RD="$WORK/run"; mkdir -p "$SD" "$RD"
: > "$RD/blocksnap.toml"
SOCK="$RD/blocksnap.sock"
"$BIN/blocksnapd" --config "$RD/blocksnap.toml" --state-dir "$SD" --socket "$SOCK" > "$RD/daemon.log" 2>&1 < /dev/null &
DAEMON_PID=$!
for _ in $(seq 300); do bs describe-jobs >/dev/null 2>&1 && break; sleep 0.1; done

VOL=$(bs --wait create-volumes -s "$VOL_SIZE" -N nbdbench --backend nbd | jq -r '.volumes[0]')
IMG="$SD/volumes/$VOL.img"
[ -f "$IMG" ] || { echo "image of $VOL not found under $SD/volumes" >&2; ls -l "$SD/volumes" >&2; exit 1; }
SIZE_B=$(stat -c %s "$IMG")
echo "volume $VOL, image $IMG ($SIZE_B bytes); pre-filling with random data"
dd if=/dev/urandom of="$IMG" bs=4M count=$((SIZE_B / 4194304)) conv=notrunc,fsync status=none

# workloads: name rw bs iodepth
WORKLOADS=("randread-4k randread 4k 16" "randwrite-4k randwrite 4k 16" "seqread-1M read 1M 16" "seqwrite-1M write 1M 16")
if [ -n "${ONLY:-}" ]; then
    SEL=(); for w in "${WORKLOADS[@]}"; do [[ " $ONLY " == *" ${w%% *} "* ]] && SEL+=("$w"); done
    WORKLOADS=("${SEL[@]}")
fi
declare -A RES      # server,workload -> "iops bw clat" of the median repetition
declare -A RUNS     # server,workload -> one "iops bw clat" line per repetition

fio_once() {  # server uri workload
    local srv=$1 uri=$2 w=$3 name rw bsz qd out
    read -r name rw bsz qd <<<"$w"
    # The previous run's dirty pages must not be written back during this one, and every
    # server starts from the same warm page cache: this measures the servers, not the disk.
    sync
    cat "$IMG" > /dev/null
    fio --name="$name" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bsz" --iodepth="$qd" \
        --numjobs=1 --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --norandommap \
        --randrepeat=0 --output-format=json --output="$WORK/fio.json" > "$WORK/fio.out" 2>&1 ||
        { echo "fio failed ($srv $name):"; cat "$WORK/fio.out" "$WORK/fio.json"; exit 1; }
    out=$(sed -n '/^{/,$p' "$WORK/fio.json")
    local dir=read; [[ $rw == *write* ]] && dir=write
    local r; r=$(jq -r --arg d "$dir" '.jobs[0][$d] | "\(.iops) \(.bw_bytes) \(.clat_ns.mean)"' <<<"$out")
    RUNS[$srv,$name]+="$r"$'\n'
    echo "  $srv $name: $(awk '{printf "%.0f IOPS %.1f MiB/s clat %.0f us", $1, $2/1048576, $3/1000}' <<<"$r")"
}

SERVERS=()
have() { [[ " ${SERVERS[*]} " == *" $1 "* ]] || SERVERS+=("$1"); }

# Each bench_<server> serves the image, runs one workload against it and stops serving.
bench_blocksnapd() {
    if bs --wait attach-volumes -v "$VOL" > "$RD/attach.json" 2>&1; then
        URI=$(bs describe-volumes -v "$VOL" | jq -r '.volume_set[0].device')
        nbdinfo --size "$URI" >/dev/null
        have blocksnapd; fio_once blocksnapd "$URI" "$1"
        bs --wait detach-volumes -v "$VOL" >/dev/null
    else
        echo "attach-volumes of an nbd volume failed: $(cat "$RD/attach.json")"; exit 1
    fi
}
# the project's bare example server on the same file
bench_nbd_serve() {
    [ "$NBD_SERVE" = 1 ] && [ -x "$BIN/examples/nbd_serve" ] || return 0
    local S="$WORK/nbd_serve.sock"
    "$BIN/examples/nbd_serve" "$IMG" "$S" bench > "$WORK/nbd_serve.log" 2>&1 & SERVER_PID=$!
    wait_sock "$S"
    have nbd_serve; fio_once nbd_serve "nbd+unix:///bench?socket=$S" "$1"
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""; rm -f "$S"
}
bench_qemu-nbd() {
    local S="$WORK/qemu.sock"
    qemu-nbd -f raw --socket="$S" --persistent -x bench "$IMG" > "$WORK/qemu.log" 2>&1 & SERVER_PID=$!
    wait_sock "$S"
    have qemu-nbd; fio_once qemu-nbd "nbd+unix:///bench?socket=$S" "$1"
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""; rm -f "$S"
}
bench_nbdkit() {
    local S="$WORK/nbdkit.sock"
    nbdkit -f -U "$S" -e bench file file="$IMG" > "$WORK/nbdkit.log" 2>&1 & SERVER_PID=$!
    wait_sock "$S"
    have nbdkit; fio_once nbdkit "nbd+unix:///bench?socket=$S" "$1"
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""; rm -f "$S"
}

# Servers are interleaved per workload and the order rotates every repetition, so no server
# always runs first (warmest cache, least writeback behind it) or last.
echo "order:  $ORDER (rotated each repetition), $REPS repetition(s)"
read -r -a ORDER_A <<<"$ORDER"
for w in "${WORKLOADS[@]}"; do
    for ((rep = 0; rep < REPS; rep++)); do
        n=${#ORDER_A[@]}
        for ((i = 0; i < n; i++)); do "bench_${ORDER_A[(i + rep) % n]}" "$w"; done
    done
done
# the median repetition by the workload's metric (IOPS for 4k, bandwidth otherwise)
for s in "${SERVERS[@]}"; do
    for w in "${WORKLOADS[@]}"; do
        read -r name _ bsz _ <<<"$w"
        col=1; [[ $bsz == 4k ]] || col=2
        RES[$s,$name]=$(printf '%s' "${RUNS[$s,$name]}" | sed '/^$/d' | sort -g -k$col | awk '{a[NR]=$0} END{print a[int((NR+1)/2)]}')
    done
done

echo
echo "### NBD: fio ioengine=nbd, median of ${REPS} interleaved runs of ${RUNTIME}s per workload, iodepth 16, 1 connection, ${VOL_SIZE} pre-filled image (page cache warm)"
echo
hdr="| workload | metric |"; sep="|---|---|"
for s in "${SERVERS[@]}"; do hdr+=" $s |"; sep+="---|"; done
hdr+=" blocksnapd / best(qemu-nbd, nbdkit) |"; sep+="---|"
echo "$hdr"; echo "$sep"
for w in "${WORKLOADS[@]}"; do
    read -r name rw bsz qd <<<"$w"
    if [[ $bsz == 4k ]]; then metric=IOPS; col=1; else metric=MiB/s; col=2; fi
    row="| $name | $metric |"
    for s in "${SERVERS[@]}"; do
        row+=" $(awk -v c=$col '{ if (c == 1) printf "%.0f", $1; else printf "%.1f", $2/1048576 }' <<<"${RES[$s,$name]}") |"
    done
    if [ -n "${RES[blocksnapd,$name]:-}" ]; then
        row+=" $(awk -v c=$col -v a="${RES[blocksnapd,$name]}" -v q="${RES[qemu-nbd,$name]:-0 0 0}" -v k="${RES[nbdkit,$name]:-0 0 0}" 'BEGIN{
            split(a, A, " "); split(q, Q, " "); split(k, K, " "); best = (Q[c] > K[c]) ? Q[c] : K[c];
            printf "%.2fx", A[c] / best }') |"
    else row+=" n/a |"; fi
    echo "$row"
done
echo
echo "mean completion latency (us):"
for w in "${WORKLOADS[@]}"; do
    read -r name _ <<<"$w"; line="  $name:"
    for s in "${SERVERS[@]}"; do line+=" $s $(awk '{printf "%.0f", $3/1000}' <<<"${RES[$s,$name]}")"; done
    echo "$line"
done
