#!/usr/bin/env bash
# The whole test suite, as root: installs the tools the tests drive (once), then runs every
# unit and integration test on real loop devices, filesystems and NBD clients.
set -euo pipefail
cd "$(dirname "$0")"
need=(mkfs.ext4 mkfs.xfs mkfs.btrfs losetup qemu-io nbdinfo nbdcopy nbdfuse nbdkit fio jq curl b3sum setpriv)
missing=()
for t in "${need[@]}"; do command -v "$t" >/dev/null || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing test tools (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        e2fsprogs xfsprogs btrfs-progs util-linux mount fuse3 \
        libnbd-bin nbdkit nbdfuse qemu-utils fio jq curl b3sum restic >/dev/null
fi
export BLOCKSNAP_REQUIRE_ROOT_TESTS="${BLOCKSNAP_REQUIRE_ROOT_TESTS:-1}"
exec cargo test --release --features failpoints "$@"
