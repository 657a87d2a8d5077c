#!/usr/bin/env bash
# "Snapshot chains" benchmark: blocksnap vs. reference tools on the same backing image,
# printed side by side (ratios, not a timed test). Run as root from the worktree root after
# `cargo build --release`. See bench/README.md.
#
#   bench/snapshot.sh            # both state-dir filesystems: ext4 (root fs) and xfs (loop image)
#   FSLIST=ext4 bench/snapshot.sh
#
# Knobs (env): VOL_SIZE (4G), DATA_MIB (2048), RW_PCT_BLOCKS (5243 = 1% of DATA_MIB in 4 KiB
# blocks, rounded up), XFS_IMG_GIB (16), TMPBASE (/var/tmp), BIN (target/release),
# RESTIC (1; 0 skips the restic reference steps for quicker repeated runs), REPS (1: how many
# times each filesystem's suite runs; with more, a summary of the medians follows the tables;
# cold reads on a VM's virtual disk vary a lot from one minute to the next), XFS_DIO (1: the
# loop device under the xfs state dir uses direct I/O, so reading it costs no second page-cache
# copy in the loop driver's kworker, as on a real disk; 0: buffered, as runs before 2026-11-23
# 11:00 UTC, where that copy took ~0.9 of the 2 cores during a full snapshot).
set -euo pipefail

BIN=${BIN:-$(pwd)/target/release}
VOL_SIZE=${VOL_SIZE:-4G}
DATA_MIB=${DATA_MIB:-2048}
RW_BLOCKS=${RW_BLOCKS:-$(( (DATA_MIB * 256 + 99) / 100 ))}   # 1% of the data in 4 KiB blocks
XFS_IMG_GIB=${XFS_IMG_GIB:-16}
FSLIST=${FSLIST:-"ext4 xfs"}
TMPBASE=${TMPBASE:-/var/tmp}
FREEZE_VOL=${FREEZE_VOL:-1G}
FREEZE_MIB=${FREEZE_MIB:-256}
FREEZE_REPS=${FREEZE_REPS:-3}
RESTIC=${RESTIC:-1}
REPS=${REPS:-1}
XFS_DIO=${XFS_DIO:-1}

[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
for t in jq fio b3sum restic mkfs.xfs mkfs.ext4 losetup; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 1; }; done
[ -x "$BIN/blocksnapd" ] && [ -x "$BIN/blocksnap" ] || { echo "build first: cargo build --release" >&2; exit 1; }

WORK=$(mktemp -d "$TMPBASE/blocksnap-bench.XXXXXX")
DAEMON_PID=""
SAMPLER_PID=""
SOCK=""
MOUNTS=()      # mountpoints we created, unmounted in reverse order
XFS_LOOP=""

cleanup() {
    set +e
    [ -n "$SAMPLER_PID" ] && kill "$SAMPLER_PID" 2>/dev/null
    for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do
        m=${MOUNTS[i]}
        if mountpoint -q "$m"; then fsfreeze -u "$m" 2>/dev/null; umount "$m" || umount -l "$m"; fi
    done
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID"; for _ in $(seq 50); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$DAEMON_PID" 2>/dev/null
    fi
    # loop devices backed by files under our work dir (the daemon's volumes), then the xfs image
    losetup -l -n -O NAME,BACK-FILE 2>/dev/null | awk -v w="$WORK" 'index($2, w) == 1 {print $1}' |
        while read -r d; do losetup -d "$d"; done
    for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do mountpoint -q "${MOUNTS[i]}" && umount "${MOUNTS[i]}"; done
    [ -n "$XFS_LOOP" ] && losetup -d "$XFS_LOOP" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

now() { date +%s.%N; }
dropcaches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
bs() { "$BIN/blocksnap" --socket "$SOCK" "$@"; }
fmt() { printf '%.2f' "$1"; }
mib() { awk -v b="$1" 'BEGIN{printf "%.1f", b/1048576}'; }
# bytes in use on the filesystem holding $1 (after a sync): what a step really allocated,
# shared (reflinked) extents counted once
fs_used() { sync -f "$1"; df -B1 --output=used "$1" | tail -1 | tr -d ' '; }

echo "== environment"
echo "date:   $(date -u +%FT%TZ)"
echo "kernel: $(uname -r)"
echo "cpu:    $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') x $(nproc)"
echo "load:   $(cut -d' ' -f1-3 /proc/loadavg)"
echo "mem:    $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
echo "root fs for $TMPBASE: $(findmnt -n -o FSTYPE,SOURCE -T "$TMPBASE")"
echo "tools:  $(fio --version) $(b3sum --version) $(restic version | cut -d' ' -f1-2) $(cp --version | head -1)"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "plan:   ${VOL_SIZE} volume, ${DATA_MIB} MiB random data at offset 0, rewrite ${RW_BLOCKS} random distinct 4 KiB blocks (fio randwrite, direct, within the data)"
echo

# one random data file, reused for every filesystem so both runs see identical data
DATA="$WORK/data.bin"
head -c $((DATA_MIB * 1048576)) /dev/urandom > "$DATA"

# RSS sampler: "epoch kB" lines every 0.2 s while the daemon lives
start_sampler() {
    local out=$1
    ( while [ -r /proc/$DAEMON_PID/status ]; do
          r=$(awk '/^VmRSS/{print $2}' /proc/$DAEMON_PID/status 2>/dev/null) || break
          [ -n "$r" ] && echo "$(date +%s.%N) $r"
          sleep 0.2
      done ) > "$out" 2>/dev/null &
    SAMPLER_PID=$!
}
max_rss_between() {  # file t0 t1 -> MiB
    awk -v a="$2" -v b="$3" '$1 >= a && $1 <= b && $2 > m {m = $2} END {printf "%.1f", m/1024}' "$1"
}

start_daemon() {  # state_dir rundir
    local sd=$1 rd=$2
    mkdir -p "$sd" "$rd"
    : > "$rd/blocksnap.toml"
    SOCK="$rd/blocksnap.sock"
    "$BIN/blocksnapd" --config "$rd/blocksnap.toml" --state-dir "$sd" --socket "$SOCK" \
        > "$rd/daemon.log" 2>&1 < /dev/null &
    DAEMON_PID=$!
    for _ in $(seq 300); do
        bs describe-jobs >/dev/null 2>&1 && return 0
        kill -0 "$DAEMON_PID" || { cat "$rd/daemon.log"; exit 1; }
        sleep 0.1
    done
    echo "daemon did not come up" >&2; exit 1
}
stop_daemon() {
    kill -TERM "$DAEMON_PID"
    for _ in $(seq 100); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
    wait "$DAEMON_PID" 2>/dev/null || true
    DAEMON_PID=""
    kill "$SAMPLER_PID" 2>/dev/null || true; wait "$SAMPLER_PID" 2>/dev/null || true; SAMPLER_PID=""
}

# timed STEP: runs "$@" after dropping caches; sets T (seconds), T0, T1
timed() { dropcaches; T0=$(now); "$@"; T1=$(now); T=$(awk -v a="$T0" -v b="$T1" 'BEGIN{print b-a}'); }

run_suite() {
    local fs=$1 base="$WORK/$fs" sd rd
    rd="$base/run"
    if [ "$fs" = xfs ]; then
        mkdir -p "$base/mnt"
        truncate -s "${XFS_IMG_GIB}G" "$base/xfs.img"
        mkfs.xfs -q -m reflink=1 "$base/xfs.img"
        if [ "$XFS_DIO" = 1 ]; then dio=on; else dio=off; fi
        XFS_LOOP=$(losetup -f --show --direct-io="$dio" "$base/xfs.img")
        mount "$XFS_LOOP" "$base/mnt"; MOUNTS+=("$base/mnt")
        sd="$base/mnt/state"
    else
        sd="$base/state"
    fi
    # cp's copies go to the state dir's filesystem, where a restore writes its volume
    local cpdst; cpdst="$(dirname "$sd")/cp-copy.img"
    mkdir -p "$rd"
    start_daemon "$sd" "$rd"
    start_sampler "$rd/rss.txt"
    local rss="$rd/rss.txt"
    echo "== [$fs] state dir $sd: $(findmnt -n -o FSTYPE,SOURCE -T "$sd" | tr -s ' ')   daemon pid $DAEMON_PID${XFS_LOOP:+, loop direct-io $(cat /sys/block/$(basename "$XFS_LOOP")/loop/dio 2>/dev/null)}"

    local vol dev img
    vol=$(bs --wait create-volumes -s "$VOL_SIZE" -N bench | jq -r '.volumes[0]')
    bs --wait attach-volumes -v "$vol" >/dev/null
    dev=$(bs describe-volumes -v "$vol" | jq -r '.volume_set[0].device')
    img="$sd/volumes/$vol.img"
    [ -f "$img" ] || img=$(ls "$sd"/volumes/"$vol"* | head -1)
    echo "volume $vol on $dev, image $img"
    dd if="$DATA" of="$dev" bs=4M conv=fsync status=none

    # -- full snapshot vs cp / b3sum / restic
    local used0; used0=$(fs_used "$sd")
    timed bs --wait create-snapshots -r "$vol" -F 1 -N full >/dev/null
    local t_full=$T rss_full; rss_full=$(max_rss_between "$rss" "$T0" "$T1")
    local used_full; used_full=$(( $(fs_used "$sd") - used0 ))
    local ss_full; ss_full=$(bs describe-snapshots -r "$vol" | jq -r '.snapshot_set[] | select(.snapshot_name=="full") | .snapshot_id')
    timed cp --sparse=always --reflink=never "$img" "$cpdst"
    local t_cp=$T; rm -f "$cpdst"
    # the same copy made durable (our snapshot fsyncs what it stores; plain cp does not)
    timed sh -c 'cp --sparse=always --reflink=never "$1" "$2" && sync -f "$2"' cp "$img" "$cpdst"
    local t_cps=$T; rm -f "$cpdst"
    timed b3sum --no-names "$img" >/dev/null
    local t_b3_1=$T
    export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR="$base/restic-cache"
    local t_restic1=0 r_sz1=0
    if [ "$RESTIC" = 1 ]; then
        restic init -q -r "$base/restic" >/dev/null
        timed restic -q -r "$base/restic" backup "$img" >/dev/null
        t_restic1=$T; r_sz1=$(du -sb "$base/restic" | cut -f1)
    fi

    # -- 1% rewrite: RW_BLOCKS distinct random 4 KiB blocks within the data (fio random map)
    fio --name=rewrite --filename="$dev" --rw=randwrite --bs=4k --direct=1 --ioengine=psync \
        --size=$((DATA_MIB))M --io_size=$((RW_BLOCKS * 4096)) --refill_buffers --randrepeat=0 \
        --output=/dev/null
    sync

    timed bs --wait create-snapshots -r "$vol" -F 0 -N incr >/dev/null
    local t_inc=$T rss_inc; rss_inc=$(max_rss_between "$rss" "$T0" "$T1")
    local ss_inc; ss_inc=$(bs describe-snapshots -r "$vol" | jq -r '.snapshot_set[] | select(.snapshot_name=="incr") | .snapshot_id')
    timed b3sum --no-names "$img" >/dev/null
    local t_b3=$T
    local t_restic2=0 r_sz2=0
    if [ "$RESTIC" = 1 ]; then
        timed restic -q -r "$base/restic" backup --force "$img" >/dev/null
        t_restic2=$T; r_sz2=$(du -sb "$base/restic" | cut -f1)
    fi

    # -- restore
    local vol2
    used0=$(fs_used "$sd")
    timed bs --wait create-volume-from-snapshot -s "$ss_inc" -N restored >/dev/null
    local t_rest=$T rss_rest; rss_rest=$(max_rss_between "$rss" "$T0" "$T1")
    local used_rest; used_rest=$(( $(fs_used "$sd") - used0 ))
    vol2=$(bs describe-volumes -W restored | jq -r '.volume_set[0].volume_id')
    # correctness spot check: restored image == volume image (the volume has had no writes since)
    local img2="$sd/volumes/$vol2.img"
    timed cmp "$img" "$img2"
    local t_cmp=$T
    timed cp --sparse=always --reflink=never "$img" "$cpdst"
    local t_cp2=$T; rm -f "$cpdst"
    timed sh -c 'cp --sparse=always --reflink=never "$1" "$2" && sync -f "$2"' cp "$img" "$cpdst"
    local t_cps2=$T; rm -f "$cpdst"

    local js; js=$(bs describe-snapshots -r "$vol")
    local sz_full sz_inc inc_type
    sz_full=$(jq -r --arg s "$ss_full" '.snapshot_set[] | select(.snapshot_id==$s) | .size_bytes' <<<"$js")
    sz_inc=$(jq -r --arg s "$ss_inc" '.snapshot_set[] | select(.snapshot_id==$s) | .size_bytes' <<<"$js")
    inc_type=$(jq -r --arg s "$ss_inc" '.snapshot_set[] | select(.snapshot_id==$s) | .snapshot_type' <<<"$js")

    bs --wait detach-volumes -v "$vol" >/dev/null

    # -- freeze_ms of a mounted ext4 on a volume
    local fvol fdev fmnt="$base/fmnt" freezes="" i
    fvol=$(bs --wait create-volumes -s "$FREEZE_VOL" -N freeze | jq -r '.volumes[0]')
    bs --wait attach-volumes -v "$fvol" >/dev/null
    fdev=$(bs describe-volumes -v "$fvol" | jq -r '.volume_set[0].device')
    mkfs.ext4 -q -F "$fdev"
    mkdir -p "$fmnt"; mount "$fdev" "$fmnt"; MOUNTS+=("$fmnt")
    head -c $((FREEZE_MIB * 1048576)) "$DATA" > "$fmnt/f0"; sync
    local fr_t="" fr_c="" fr_t0; fr_t0=$(now)
    for i in $(seq "$FREEZE_REPS"); do
        dd if=/dev/urandom of="$fmnt/f$i" bs=1M count=16 conv=fsync status=none
        local fs_id fj
        fs_id=$(bs --wait create-snapshots -r "$fvol" -F $([ "$i" = 1 ] && echo 1 || echo 0) -N "frz$i" | jq -r '.snapshots[0]')
        fj=$(bs describe-snapshots -n "$fs_id" | jq -r '.snapshot_set[0] | "\(.freeze_ms) \(.consistency) \(.snapshot_type)"')
        freezes+="$(cut -d' ' -f1 <<<"$fj") "
        fr_c="$(cut -d' ' -f2 <<<"$fj")"
        fr_t+="$(cut -d' ' -f3 <<<"$fj")"
    done
    local rss_frz; rss_frz=$(max_rss_between "$rss" "$fr_t0" "$(now)")
    umount "$fmnt"
    bs --wait detach-volumes -v "$fvol" >/dev/null

    local hwm rss_all
    hwm=$(awk '/^VmHWM/{printf "%.1f", $2/1024}' /proc/$DAEMON_PID/status)
    rss_all=$(awk '$2 > m {m = $2} END {printf "%.1f", m/1024}' "$rss")
    local nsamp; nsamp=$(wc -l < "$rss")
    stop_daemon

    local data_b=$((DATA_MIB * 1048576))
    echo "$fs $t_full $t_cp $t_cps $t_inc $t_b3 $t_rest $t_cp2 $t_cps2 $rss_all" >> "$WORK/summary.txt"
    echo
    echo "### [$fs] state dir on $fs  (data ${DATA_MIB} MiB in a ${VOL_SIZE} volume; rewrite ${RW_BLOCKS} x 4 KiB = $(mib $((RW_BLOCKS*4096))) MiB; page cache dropped before every timed step)"
    echo
    printf '| %-34s | %-14s | %-38s | %-50s | %-16s | %s |\n' step "blocksnap" reference "ratio" "stored bytes" "max RSS MiB"
    printf '|%s|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..36})" "$(printf -- '-%.0s' {1..16})" "$(printf -- '-%.0s' {1..40})" "$(printf -- '-%.0s' {1..52})" "$(printf -- '-%.0s' {1..18})" "-------------"
    local r
    r=$(awk -v a="$t_cp" -v b="$t_full" 'BEGIN{printf "%.2fx cp throughput", a/b}')
    printf '| %-34s | %-14s | %-38s | %-50s | %-16s | %s |\n' "full snapshot (-F 1)" "$(fmt "$t_full") s" "cp $(fmt "$t_cp") s; cp+sync $(fmt "$t_cps") s" "$r; $(awk -v a="$t_cps" -v b="$t_full" 'BEGIN{printf "%.2fx", a/b}') vs cp+sync (target >= 0.9)" "$sz_full" "$rss_full"
    r=$(awk -v a="$t_inc" -v b="$t_b3" 'BEGIN{printf "%.2fx b3sum time", a/b}')
    printf '| %-34s | %-14s | %-38s | %-50s | %-16s | %s |\n' "incremental snapshot (-F 0, type $inc_type)" "$(fmt "$t_inc") s" "b3sum $(fmt "$t_b3") s (before rewrite $(fmt "$t_b3_1") s)" "$r (target <= 1.1)" "$sz_inc" "$rss_inc"
    r=$(awk -v a="$t_cp2" -v b="$t_rest" 'BEGIN{printf "%.2fx cp throughput", a/b}')
    printf '| %-34s | %-14s | %-38s | %-50s | %-16s | %s |\n' "restore (create-volume-from-snapshot)" "$(fmt "$t_rest") s" "cp $(fmt "$t_cp2") s; cp+sync $(fmt "$t_cps2") s" "$r; $(awk -v a="$t_cps2" -v b="$t_rest" 'BEGIN{printf "%.2fx", a/b}') vs cp+sync (target >= 0.9)" "-" "$rss_rest"
    [ "$RESTIC" = 1 ] && printf '| %-34s | %-14s | %-38s | %-50s | %-16s | %s |\n' "restic full backup" "-" "restic $(fmt "$t_restic1") s" "$(awk -v a="$t_restic1" -v b="$t_full" 'BEGIN{printf "blocksnap %.2fx faster", a/b}')" "$r_sz1 (repo)" "-"
    [ "$RESTIC" = 1 ] && printf '| %-34s | %-14s | %-38s | %-50s | %-16s | %s |\n' "restic 2nd backup (--force)" "-" "restic $(fmt "$t_restic2") s" "$(awk -v a="$t_restic2" -v b="$t_inc" 'BEGIN{printf "blocksnap %.2fx faster", a/b}')" "+$((r_sz2 - r_sz1)) (repo)" "-"
    printf '| %-34s | %-14s | %-38s | %-50s | %-16s | %s |\n' "cmp volume vs restored (check)" "$(fmt "$t_cmp") s" "identical" "" "" ""
    echo
    echo "[$fs] throughput: full $(awk -v b=$data_b -v t=$t_full 'BEGIN{printf "%.0f", b/t/1048576}') MiB/s of data, cp $(awk -v b=$data_b -v t=$t_cp 'BEGIN{printf "%.0f", b/t/1048576}') MiB/s, restore $(awk -v b=$data_b -v t=$t_rest 'BEGIN{printf "%.0f", b/t/1048576}') MiB/s, b3sum $(awk -v t=$t_b3 -v s="$(stat -c %s "$img")" 'BEGIN{printf "%.0f", s/t/1048576}') MiB/s of image"
    echo "[$fs] daemon RSS: max sampled VmRSS ${rss_all} MiB ($nsamp samples @0.2 s), VmHWM at end ${hwm} MiB (target <= 64)"
    if [ "$fs" = xfs ]; then
        echo "[$fs] filesystem space allocated (df used, after sync): full snapshot $(mib "$used_full") MiB, restore $(mib "$used_rest") MiB (for $DATA_MIB MiB of data; extents shared by reflink count once)"
    else
        echo "[$fs] filesystem space allocated: not measured (the root filesystem has other writers; df deltas would be theirs too)"
    fi
    echo "[$fs] freeze_ms of mounted ext4 on a ${FREEZE_VOL} volume (${FREEZE_MIB} MiB + 16 MiB/rep written; types $fr_t; consistency $fr_c): $freezes  (max VmRSS during these ${rss_frz} MiB)"
    echo
    if [ "$fs" = xfs ]; then
        umount "$base/mnt"
        losetup -d "$XFS_LOOP"; XFS_LOOP=""
    fi
    rm -rf "$base"
}

for rep in $(seq "$REPS"); do
    for fs in $FSLIST; do
        [ "$REPS" = 1 ] || echo "== rep $rep of $REPS: $fs"
        run_suite "$fs"
    done
done

# median of the numbers on stdin
median() { sort -g | awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
if [ "$REPS" -gt 1 ]; then
    echo "### medians of $REPS runs (ratios: median of each run's ratio)"
    echo
    printf '| %-5s | %-24s | %-24s | %-28s | %-24s | %-24s | %-28s | %s |\n' fs "full s" "cp / cp+sync s" "full vs cp / cp+sync" "incremental s" "restore s" "restore vs cp / cp+sync" "max RSS MiB"
    printf '|-------|--------------------------|--------------------------|------------------------------|--------------------------|--------------------------|------------------------------|-------------|\n'
    for fs in $FSLIST; do
        col() { awk -v f="$fs" -v c="$1" '$1 == f {print $c}' "$WORK/summary.txt" | median; }
        # ratio A/B of columns, per run, then the median
        rat() { awk -v f="$fs" -v a="$1" -v b="$2" '$1 == f {print $a / $b}' "$WORK/summary.txt" | median; }
        printf '| %-5s | %-24s | %-24s | %-28s | %-24s | %-24s | %-28s | %s |\n' "$fs" \
            "$(fmt "$(col 2)")" "$(fmt "$(col 3)") / $(fmt "$(col 4)")" "$(fmt "$(rat 3 2)")x / $(fmt "$(rat 4 2)")x" \
            "$(fmt "$(col 5)") ($(fmt "$(rat 5 6)")x b3sum $(fmt "$(col 6)"))" "$(fmt "$(col 7)")" \
            "$(fmt "$(rat 8 7)")x / $(fmt "$(rat 9 7)")x" "$(awk -v f="$fs" '$1 == f && $10 > m {m = $10} END {print m}' "$WORK/summary.txt")"
    done
    echo
    echo "targets: full and restore >= 0.9x cp's throughput; incremental <= 1.1x b3sum's time; RSS <= 64 MiB"
fi
