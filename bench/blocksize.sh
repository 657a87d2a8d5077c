#!/usr/bin/env bash
# Chooses the store's block size by measurement: for each candidate, a full snapshot of a
# volume holding random data, then 1% of the data rewritten with 4 KiB random writes and an
# incremental snapshot. Prints times, stored bytes and the per-snapshot hash list size.
# Usage (root): bench/blocksize.sh [VOLUME_SIZE_MIB] [DATA_MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
vol_mib=${1:-1024}
data_mib=${2:-512}
cargo build --release -q
bin=$PWD/target/release
work=$(mktemp -d /var/tmp/blocksnap-bs.XXXXXX)
pid=""
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    losetup -l -n -O NAME,BACK-FILE | awk -v p="$work" 'index($2,p)==1 {print $1}' | xargs -r -n1 losetup -d
    rm -rf "$work"
}
trap cleanup EXIT
writes=$((data_mib * 1024 / 4 / 100))   # 1% of the data, in 4 KiB writes
printf 'volume %d MiB, %d MiB random data, %d random 4 KiB rewrites (1%%); state dir on %s\n' \
    "$vol_mib" "$data_mib" "$writes" "$(findmnt -no FSTYPE -T /var/tmp)"
printf '%-10s %10s %14s %12s %14s %12s\n' block full_s full_stored inc_s inc_stored hashes_bytes
for bs in 16K 64K 256K 1M; do
    dir=$work/$bs; mkdir -p "$dir"
    printf '[store]\nblock_size = "%s"\n' "$bs" > "$dir/c.toml"
    "$bin/blocksnapd" --config "$dir/c.toml" --state-dir "$dir/state" --socket "$dir/s.sock" 2>"$dir/log" &
    pid=$!
    until [ -S "$dir/s.sock" ]; do sleep 0.05; done
    bs_cmd() { "$bin/blocksnap" --socket "$dir/s.sock" "$@"; }
    vol=$(bs_cmd create-volumes -s "${vol_mib}M" --wait | jq -r '.volumes[0]')
    bs_cmd attach-volumes -v "$vol" >/dev/null
    dev=$(bs_cmd describe-volumes -v "$vol" | jq -r '.volume_set[0].device')
    dd if=/dev/urandom of="$dev" bs=1M count="$data_mib" oflag=direct status=none
    sync; echo 3 > /proc/sys/vm/drop_caches
    t0=$(date +%s.%N); full=$(bs_cmd create-snapshots -r "$vol" -F 1 --wait | jq -r '.snapshots[0]'); t1=$(date +%s.%N)
    python3 - "$dev" "$writes" "$data_mib" <<'PY'
import os, random, sys
dev, n, data = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(dev, os.O_WRONLY)
rnd = random.Random(7)
for _ in range(n):
    os.pwrite(fd, os.urandom(4096), rnd.randrange(data * 256) * 4096)
os.fsync(fd); os.close(fd)
PY
    sync; echo 3 > /proc/sys/vm/drop_caches
    t2=$(date +%s.%N); inc=$(bs_cmd create-snapshots -r "$vol" -F 0 --wait | jq -r '.snapshots[0]'); t3=$(date +%s.%N)
    fs=$(bs_cmd describe-snapshots -n "$full" | jq -r '.snapshot_set[0].size_bytes')
    is=$(bs_cmd describe-snapshots -n "$inc" | jq -r '.snapshot_set[0].size_bytes')
    hs=$(stat -c %s "$dir/state/store/snapshots/$inc/hashes")
    printf '%-10s %10.2f %14d %12.2f %14d %12d\n' "$bs" "$(echo "$t1 - $t0" | bc)" "$fs" "$(echo "$t3 - $t2" | bc)" "$is" "$hs"
    bs_cmd detach-volumes -v "$vol" >/dev/null
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
done
