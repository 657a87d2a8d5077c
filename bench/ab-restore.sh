#!/usr/bin/env bash
# A/B of daemon restores: two (or more) builds restore the same full snapshot, alternated
# round by round on one rig, each next to a `cp` of the image (ratios within a round; not a
# timed test). The rig is bench/snapshot.sh's xfs state dir: an xfs image on a direct-I/O loop
# device. Run as root from the worktree root.
#
#   BINS="/path/to/old/release /path/to/new/release" bench/ab-restore.sh
#
# Each directory in BINS holds `blocksnapd` and `blocksnap`. Per round and binary: the daemon
# is started on the same state dir, the page cache dropped, `create-volume-from-snapshot
# --wait` timed, the new volume deleted, the daemon stopped; then `cp --sparse=always
# --reflink=never` of the image into the same filesystem is timed.
# Knobs (env): ROUNDS (3), DATA_MIB (2048), VOL_SIZE (4G), TMPBASE (/var/tmp), INCREMENTALS
# (0; N: after the full, N rounds of 1 % random 4 KiB writes each followed by an incremental,
# and the newest incremental is restored: a chain whose pieces interleave), KEEP_LOG (a path:
# the daemons' log is copied there at the end; with BLOCKSNAP_LOG=blocksnap=debug it holds each
# restore's stage times).
set -euo pipefail

BINS=${BINS:?set BINS to the release directories to compare}
ROUNDS=${ROUNDS:-3}
DATA_MIB=${DATA_MIB:-2048}
VOL_SIZE=${VOL_SIZE:-4G}
TMPBASE=${TMPBASE:-/var/tmp}

[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
for b in $BINS; do
    [ -x "$b/blocksnapd" ] && [ -x "$b/blocksnap" ] || { echo "no blocksnapd/blocksnap in $b" >&2; exit 1; }
done

WORK=$(mktemp -d "$TMPBASE/blocksnap-abrestore.XXXXXX")
XL=""
PID=""
cleanup() {
    set +e
    stop
    [ -n "${KEEP_LOG:-}" ] && cp "$WORK/daemon.log" "$KEEP_LOG"
    # loop devices backed by the daemon's volumes, then the rig's own
    losetup -l -n -O NAME,BACK-FILE | awk -v w="$WORK/mnt" 'index($2, w) == 1 {print $1}' |
        while read -r d; do losetup -d "$d"; done
    mountpoint -q "$WORK/mnt" && umount "$WORK/mnt"
    [ -n "$XL" ] && losetup -d "$XL"
    rm -rf "$WORK"
}
stop() {
    if [ -n "$PID" ]; then
        kill "$PID" 2>/dev/null
        wait "$PID" 2>/dev/null
        PID=""
    fi
}
trap cleanup EXIT INT TERM

truncate -s 16G "$WORK/xfs.img"
mkfs.xfs -q -m reflink=1 "$WORK/xfs.img"
XL=$(losetup -f --show --direct-io=on "$WORK/xfs.img")
mkdir "$WORK/mnt"
mount "$XL" "$WORK/mnt"
SD="$WORK/mnt/state"
SOCK="$WORK/blocksnap.sock"
: > "$WORK/blocksnap.toml"

start() {
    "$1/blocksnapd" --config "$WORK/blocksnap.toml" --state-dir "$SD" --socket "$SOCK" \
        >> "$WORK/daemon.log" 2>&1 < /dev/null &
    PID=$!
    for _ in $(seq 100); do "$1/blocksnap" --socket "$SOCK" describe-jobs > /dev/null 2>&1 && return; sleep 0.1; done
    echo "daemon in $1 did not start" >&2
    exit 1
}
now() { date +%s.%N; }
# timed CMD...: drops the page cache, runs it; sets T (seconds)
timed() {
    sync
    echo 3 > /proc/sys/vm/drop_caches
    local t0
    t0=$(now)
    "$@" > /dev/null
    T=$(awk -v a="$t0" -v b="$(now)" 'BEGIN{print b-a}')
}

set -- $BINS
B=$1
bs() { "$B/blocksnap" --socket "$SOCK" "$@"; }
start "$B"
vol=$(bs --wait create-volumes -s "$VOL_SIZE" -N ab-source | jq -r '.volumes[0]')
bs --wait attach-volumes -v "$vol" > /dev/null
dev=$(bs describe-volumes -v "$vol" | jq -r '.volume_set[0].device')
head -c $((DATA_MIB * 1048576)) /dev/urandom |
    dd of="$dev" bs=4M conv=fsync status=none iflag=fullblock
ss=$(bs --wait create-snapshots -r "$vol" -F 1 -N ab-full | jq -r '.snapshots[0]')
for i in $(seq "${INCREMENTALS:-0}"); do
    fio --name=ab-rewrite --filename="$dev" --rw=randwrite --bs=4k --size="${DATA_MIB}M" \
        --io_size=$(( (DATA_MIB * 256 + 99) / 100 * 4096 )) --direct=1 --refill_buffers \
        --randrepeat=0 --output=/dev/null
    ss=$(bs --wait create-snapshots -r "$vol" -F 0 -N "ab-inc$i" | jq -r '.snapshots[0]')
done
img="$SD/volumes/$vol.img"
stop

echo "date $(date -u +%FT%TZ), ${DATA_MIB} MiB of random data in a $VOL_SIZE volume, snapshot $ss (${INCREMENTALS:-0} incrementals on the full)"
for r in $(seq "$ROUNDS"); do
    for B in $BINS; do
        start "$B"
        timed bs --wait create-volume-from-snapshot -s "$ss" -N ab-restored
        echo "round $r $B restore $T s"
        v=$(bs describe-volumes -W ab-restored | jq -r '.volume_set[0].volume_id')
        bs --wait delete-volumes -v "$v" > /dev/null
        stop
    done
    timed cp --sparse=always --reflink=never "$img" "$WORK/mnt/cp.img"
    echo "round $r cp $T s"
    rm "$WORK/mnt/cp.img"
done
