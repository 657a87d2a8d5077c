#!/usr/bin/env bash
# "Incremental of an NBD volume" benchmark: full snapshot vs. incremental after 1 % random
# 4 KiB writes, for the nbd backend (changed-block tracking in the daemon's write path) and
# the loop backend (the whole image is read and hashed), printed side by side with the ratio
# incremental/full. Target: an nbd incremental takes <= 3 % of a full snapshot's time.
# Run as root from the worktree root after `cargo build --release`. See bench/README.md.
#
#   bench/nbd-incremental.sh
#
# Two workloads: the default writes 1 % of 2 GiB of data in a 4 GiB volume (half full), and
# `DATA_MIB=4096` fills the volume and writes 1 % of it (10,486 blocks: the issue's "1 % random
# 4 KiB writes on a 4 GiB volume"). Per-incremental costs that do not shrink with the data
# (CLI, commit, the volume's block-hash list) weigh twice as much in the first.
#
# Knobs (env): VOL_SIZE (4G), DATA_MIB (2048), RW_BLOCKS (1% of DATA_MIB in 4 KiB
# blocks, rounded up: 5243 by default), REPS (2), BACKENDS ("nbd loop"), COLD (1: drop the page cache before
# each timed snapshot; 0: keep it, as on a live system where recent writes are cached),
# TMPBASE (/var/tmp), BIN (target/release), KEEP_LOG (a path: keep the daemon's log there; with
# BLOCKSNAP_LOG=blocksnap=debug it has each capture's phases).
set -euo pipefail

BIN=${BIN:-$(pwd)/target/release}
VOL_SIZE=${VOL_SIZE:-4G}
DATA_MIB=${DATA_MIB:-2048}
RW_BLOCKS=${RW_BLOCKS:-$(( (DATA_MIB * 256 + 99) / 100 ))}
REPS=${REPS:-2}
BACKENDS=${BACKENDS:-"nbd loop"}
COLD=${COLD:-1}
TMPBASE=${TMPBASE:-/var/tmp}

[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
for t in jq fio nbdcopy losetup; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 1; }; done
fio --enghelp=nbd 2>/dev/null | grep -q '^uri' || { echo "fio has no nbd engine" >&2; exit 1; }
[ -x "$BIN/blocksnapd" ] && [ -x "$BIN/blocksnap" ] || { echo "build first: cargo build --release" >&2; exit 1; }

WORK=$(mktemp -d "$TMPBASE/blocksnap-nbdinc.XXXXXX")
DAEMON_PID=""
SOCK=""
cleanup() {
    set +e
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID"; for _ in $(seq 100); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$DAEMON_PID" 2>/dev/null
    fi
    # loop devices backed by files under our work dir (the daemon's loop volumes)
    losetup -l -n -O NAME,BACK-FILE 2>/dev/null | awk -v w="$WORK" 'index($2, w) == 1 {print $1}' |
        while read -r d; do losetup -d "$d"; done
    if [ -n "${KEEP_LOG:-}" ] && [ -f "${RD:-}/daemon.log" ]; then cp "$RD/daemon.log" "$KEEP_LOG"; fi
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

now() { date +%s.%N; }
dropcaches() { sync; [ "$COLD" = 1 ] && echo 3 > /proc/sys/vm/drop_caches || true; }
bs() { "$BIN/blocksnap" --socket "$SOCK" "$@"; }
# timed CMD...: syncs and drops caches (COLD=1), runs it; sets T (seconds)
timed() { dropcaches; local t0; t0=$(now); "$@"; T=$(awk -v a="$t0" -v b="$(now)" 'BEGIN{print b-a}'); }

echo "== environment"
echo "date:   $(date -u +%FT%TZ)"
echo "kernel: $(uname -r)"
echo "cpu:    $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') x $(nproc)"
echo "load:   $(cut -d' ' -f1-3 /proc/loadavg)"
echo "fs of $TMPBASE (state dir): $(findmnt -n -o FSTYPE,SOURCE -T "$TMPBASE")"
echo "tools:  $(fio --version), $(nbdcopy --version | head -1)"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "plan:   ${VOL_SIZE} volume, ${DATA_MIB} MiB random data at offset 0, full snapshot, then"
echo "        ${RW_BLOCKS} distinct random 4 KiB writes within the data (fio randwrite: nbd engine"
echo "        on the export / direct psync on the loop device), incremental; sync$([ "$COLD" = 1 ] && echo " and drop caches")"
echo "        before each timed snapshot; default config (store block_size 16K); ${REPS} rep(s)"
echo

SD="$WORK/state"; RD="$WORK/run"; mkdir -p "$SD" "$RD"
: > "$RD/blocksnap.toml"
SOCK="$RD/blocksnap.sock"
"$BIN/blocksnapd" --config "$RD/blocksnap.toml" --state-dir "$SD" --socket "$SOCK" > "$RD/daemon.log" 2>&1 < /dev/null &
DAEMON_PID=$!
for _ in $(seq 300); do bs describe-jobs >/dev/null 2>&1 && break; kill -0 "$DAEMON_PID"; sleep 0.1; done

DATA="$WORK/data.bin"
head -c $((DATA_MIB * 1048576)) /dev/urandom > "$DATA"

# snapshot VOL FULL NAME: timed; prints "seconds size_bytes freeze_ms snapshot_type id"
snapshot() {
    local vol=$1 full=$2 name=$3 id
    timed bs --wait create-snapshots -r "$vol" -F "$full" -N "$name" >/dev/null
    id=$(bs describe-snapshots -r "$vol" | jq -r --arg n "$name" '.snapshot_set[] | select(.snapshot_name==$n) | .snapshot_id')
    echo "$T $(bs describe-snapshots -n "$id" | jq -r '.snapshot_set[0] | "\(.size_bytes) \(.freeze_ms) \(.snapshot_type)"') $id"
}

RESULTS=()
for rep in $(seq "$REPS"); do
    for backend in $BACKENDS; do
        vol=$(bs --wait create-volumes -s "$VOL_SIZE" -N "b-$backend-$rep" --backend "$backend" | jq -r '.volumes[0]')
        bs --wait attach-volumes -v "$vol" >/dev/null
        dev=$(bs describe-volumes -v "$vol" | jq -r '.volume_set[0].device')
        if [ "$backend" = nbd ]; then
            nbdcopy "$DATA" "$dev"
        else
            dd if="$DATA" of="$dev" bs=4M conv=fsync status=none
        fi
        read -r t_full sz_full fz_full ty_full id_full < <(snapshot "$vol" 1 "full-$rep")
        if [ "$backend" = nbd ]; then
            fio --name=rewrite --ioengine=nbd --uri="$dev" --rw=randwrite --bs=4k \
                --size=$((DATA_MIB))M --io_size=$((RW_BLOCKS * 4096)) --refill_buffers \
                --randrepeat=0 --output=/dev/null
        else
            fio --name=rewrite --filename="$dev" --rw=randwrite --bs=4k --direct=1 --ioengine=psync \
                --size=$((DATA_MIB))M --io_size=$((RW_BLOCKS * 4096)) --refill_buffers \
                --randrepeat=0 --output=/dev/null
        fi
        read -r t_inc sz_inc fz_inc ty_inc id_inc < <(snapshot "$vol" 0 "inc-$rep")
        [ "$ty_full" = 1 ] && [ "$ty_inc" = 0 ] || { echo "unexpected snapshot types $ty_full $ty_inc" >&2; exit 1; }
        echo "rep $rep $backend: full $t_full s ($sz_full B, freeze_ms $fz_full), incremental $t_inc s ($sz_inc B, freeze_ms $fz_inc)"
        RESULTS+=("$rep $backend $t_full $sz_full $fz_full $t_inc $sz_inc $fz_inc")
        bs --wait detach-volumes -v "$vol" >/dev/null
        bs --wait delete-volumes -v "$vol" >/dev/null
        # free the space: the incremental first, then the full
        bs --wait delete-snapshots -s "$id_inc" >/dev/null
        bs --wait delete-snapshots -s "$id_full" >/dev/null
    done
done

written=$((RW_BLOCKS * 4096))
echo
echo "### ${VOL_SIZE} volume, ${DATA_MIB} MiB data, ${RW_BLOCKS} random 4 KiB writes ($(awk -v b=$written 'BEGIN{printf "%.1f", b/1048576}') MiB written)"
echo
printf '| %-3s | %-7s | %-10s | %-14s | %-9s | %-13s | %-14s | %-9s | %-18s | %-24s |\n' \
    rep backend "full s" "full stored B" "full fz" "incremental s" "inc stored B" "inc fz" "inc/full time" "inc stored / written"
printf '|-----|---------|------------|----------------|-----------|---------------|----------------|-----------|--------------------|--------------------------|\n'
for r in "${RESULTS[@]}"; do
    read -r rep backend t_full sz_full fz_full t_inc sz_inc fz_inc <<<"$r"
    printf '| %-3s | %-7s | %-10s | %-14s | %-9s | %-13s | %-14s | %-9s | %-18s | %-24s |\n' \
        "$rep" "$backend" "$(printf '%.2f' "$t_full")" "$sz_full" "$fz_full ms" "$(printf '%.3f' "$t_inc")" "$sz_inc" "$fz_inc ms" \
        "$(awk -v a="$t_inc" -v b="$t_full" 'BEGIN{printf "%.2f %%", 100*a/b}')" \
        "$(awk -v a="$sz_inc" -v b="$written" 'BEGIN{printf "%.2fx", a/b}')"
done
echo
for backend in $BACKENDS; do
    # median over the repetitions of incremental/full (each pair is timed seconds apart, so
    # it shares the disk's mood; the disk of a cloud VM swings between runs)
    printf '%s\n' "${RESULTS[@]}" | awk -v b="$backend" '$2 == b {print 100 * $6 / $3}' | sort -g |
        awk -v b="$backend" '{v[NR] = $1} END {if (NR) printf "median inc/full, %s: %.2f %% over %d rep(s) (min %.2f, max %.2f)\n", b, (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2), NR, v[1], v[NR]}'
done
echo "target: nbd incremental time <= 3 % of its full snapshot's"
