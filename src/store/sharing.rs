//! Change detection from shared extents: which parts of a new point-in-time clone of an image
//! can differ from the parent snapshot's image, without reading either.
//!
//! A full capture of a regular file clones its long data runs into the delta (FICLONERANGE),
//! so the delta and the image then share physical extents. A later reflink clone of the image
//! still maps a block to the same physical location as the delta exactly when the block was
//! not rewritten since: while the delta references physical block P, a write to the image's
//! block at P must copy-on-write (P is shared), so only an untouched block can still map P, P
//! cannot be freed and reused while the delta holds it, and dedupe only ever shares identical
//! bytes. So a byte is *unchanged* when the parent's chain says it is payload of a delta at
//! file offset F and the clone maps its image offset to the very device address the delta
//! maps F to (both plain extents on one filesystem, see `Extent::is_plain`, both flagged
//! shared), or when the chain says it is zero (a zero record or never written) and the clone
//! reads zeros there without a doubt: a hole, or an unwritten extent (allocated, never written:
//! mkfs zeroing a journal through a loop device leaves those; the clone is never written and
//! its map is taken after a writeback, so no write can be pending on it). Everything else —
//! written (not cloned) records, unwritten or delayed extents where the parent has data,
//! anything not mapped — is *changed*, which only costs a read: the caller captures
//! the changed ranges with `capture_extents` (`DirtySet::Superset`), which re-hashes the blocks
//! around them and stores what differs.
//!
//! The comparison walks the image in windows of `WINDOW` bytes: per window one extent map of
//! the clone and one of each delta's file range that the window's pieces come from, so memory
//! follows the extents of one window (plus the chain's extent map and the changed ranges),
//! not the volume's size. The clone's map of a window is taken again after the deltas' and
//! must not have moved, so every match was true at one moment for both files.

use super::format::{IndexEntry, RECORD_HEADER_LEN};
use super::restore::{extent_map, Piece, Src};
use super::{file_key, Store, StoreError};
use crate::api::SnapshotId;
use crate::sys::fiemap::{fiemap, Extent, FiemapError};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;

/// Image bytes compared per round of extent maps.
const WINDOW: u64 = 256 << 20;
/// Changed ranges are widened to this (the page and filesystem block size).
const PIECE: u64 = 4096;

/// The outcome of `changed_by_sharing`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sharing {
    /// The ranges of the new image that may differ from the parent's image (sorted, merged,
    /// 4 KiB-aligned except at the end of the image); every other byte is the parent's.
    Changed(ChangedRanges),
    /// Shared extents cannot tell here; why, for a log line. Compare the data instead.
    Unsupported(String),
}

/// Ranges that may have changed, with counts for logs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChangedRanges {
    pub ranges: Vec<Range<u64>>,
    /// Bytes proved unchanged by a shared extent.
    pub shared_bytes: u64,
    /// Bytes proved unchanged because both read as zeros (zero in the chain; a hole or an
    /// unwritten extent in the clone).
    pub zero_bytes: u64,
}

impl ChangedRanges {
    /// Bytes inside `ranges`.
    pub fn changed_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// Adds `[s, e)` widened to whole pieces and clipped to `size`, merging with the last.
    fn push(&mut self, s: u64, e: u64, size: u64) {
        let s = s / PIECE * PIECE;
        let e = e.div_ceil(PIECE).saturating_mul(PIECE).min(size);
        if s >= e {
            return;
        }
        match self.ranges.last_mut() {
            Some(last) if s <= last.end => last.end = last.end.max(e),
            _ => self.ranges.push(s..e),
        }
    }
}

/// Finds which ranges of `clone` (the point-in-time clone of the image, `size` bytes) may
/// differ from the image of snapshot `parent`, from shared extents (see the module docs).
/// `Unsupported` when it cannot tell (no extent maps, another filesystem, another block size,
/// a shrunk volume, extents moving); errors for failures reading the store's metadata or
/// mapping the clone (callers fall back to comparing data on either).
#[tracing::instrument(skip_all, fields(parent = %parent))]
pub fn changed_by_sharing(
    store: &Store,
    parent: &SnapshotId,
    clone: &File,
    size: u64,
    block_size: u32,
) -> Result<Sharing, StoreError> {
    let unsupported = |why: String| Ok(Sharing::Unsupported(why));
    let chain = store.chain(parent)?;
    let Some(pm) = chain.last() else {
        return Err(StoreError::NotFound { id: parent.clone() });
    };
    if pm.block_size != block_size {
        return unsupported(format!(
            "the parent has block size {}, not {block_size}",
            pm.block_size
        ));
    }
    let psize = pm.volume_size;
    if size < psize {
        return unsupported(format!("the volume shrank from {psize} to {size} bytes"));
    }
    let image_err = |start: u64, end: u64| {
        move |source: std::io::Error| StoreError::Image {
            what: "point-in-time clone",
            start,
            end,
            source,
        }
    };
    let md = clone.metadata().map_err(image_err(0, size))?;
    if !md.is_file() {
        return unsupported("the image is not a regular file".into());
    }
    let device = md.dev();
    let layers = chain
        .iter()
        .map(|m| store.delta_index(m))
        .collect::<Result<Vec<_>, _>>()?;
    let keys: Vec<String> = chain
        .iter()
        .map(|m| file_key(&m.id, &m.delta_file))
        .collect();
    let pieces = extent_map(&layers, psize);
    let mut out = ChangedRanges::default();
    let mut first = 0usize;
    let mut w0 = 0u64;
    while w0 < psize {
        let w1 = w0.saturating_add(WINDOW).min(psize);
        let clone_map = |what| match fiemap(clone, w0, w1 - w0, true) {
            Ok(e) if sorted(&e) => Ok(Ok(e)),
            Ok(_) => Ok(Err(format!(
                "the clone's extent map is not in order ({what})"
            ))),
            Err(e @ FiemapError::NotSupported { .. }) => Ok(Err(format!("clone: {e}"))),
            Err(FiemapError::Fiemap { source, .. }) => {
                Err(image_err(w0, w1)(std::io::Error::from(source)))
            }
        };
        let before = match clone_map("before")? {
            Ok(e) => e,
            Err(why) => return unsupported(why),
        };
        // The window's pieces, and per layer the delta file range they come from.
        let last = first + pieces[first..].partition_point(|p| p.offset < w1);
        let window = &pieces[first..last];
        let mut deltas: Vec<Option<Vec<Extent>>> = vec![None; layers.len()];
        for (layer, span) in file_spans(window, &layers, w0, w1).into_iter().enumerate() {
            let Some(span) = span else { continue };
            let key = &keys[layer];
            let got = store
                .backend()
                .extents(key, span.start, span.end - span.start)
                .map_err(|e| StoreError::backend(key, e))?;
            let Some(got) = got else {
                return unsupported("the store's backend reports no extents".into());
            };
            if got.device != device {
                return unsupported(format!(
                    "{key} is on another filesystem than the image (device {} vs {device})",
                    got.device
                ));
            }
            if !sorted(&got.extents) {
                return unsupported(format!("the extent map of {key} is not in order"));
            }
            deltas[layer] = Some(got.extents);
        }
        compare_window(w0..w1, window, &layers, &before, &deltas, psize, &mut out);
        match clone_map("after")? {
            Ok(after) if after == before => {}
            Ok(_) => return unsupported("the clone's extents moved while compared".into()),
            Err(why) => return unsupported(why),
        }
        // A piece crossing the window's end is compared again from w1 in the next window.
        first += pieces[first..].partition_point(|p| p.offset + p.len <= w1);
        w0 = w1;
    }
    // Bytes the parent did not have (a grown volume) are changed.
    out.push(psize, size, size);
    Ok(Sharing::Changed(out))
}

/// True when extents are in file order and do not overlap.
fn sorted(extents: &[Extent]) -> bool {
    extents.windows(2).all(|w| w[0].end() <= w[1].logical)
}

/// Where a data record's byte at image offset `x` lies in its delta file.
fn file_pos(e: &IndexEntry, x: u64) -> u64 {
    e.file_pos
        .saturating_add(RECORD_HEADER_LEN)
        .saturating_add(x - e.offset)
}

/// Per layer, the delta file range holding the data pieces of `window` inside `[w0, w1)`.
fn file_spans(
    window: &[Piece],
    layers: &[Vec<IndexEntry>],
    w0: u64,
    w1: u64,
) -> Vec<Option<Range<u64>>> {
    let mut spans: Vec<Option<Range<u64>>> = vec![None; layers.len()];
    for p in window {
        let Src::Data { layer, rec } = p.src else {
            continue;
        };
        let (s, e) = (p.offset.max(w0), (p.offset + p.len).min(w1));
        if s >= e {
            continue;
        }
        let entry = &layers[layer][rec];
        let (fs, fe) = (file_pos(entry, s), file_pos(entry, e));
        let span = spans[layer].get_or_insert(fs..fe);
        span.start = span.start.min(fs);
        span.end = span.end.max(fe);
    }
    spans
}

/// The extent holding `at`, or the start of the next one (`u64::MAX` when none follows).
fn find(extents: &[Extent], at: u64) -> Result<&Extent, u64> {
    let i = extents.partition_point(|x| x.end() <= at);
    match extents.get(i) {
        Some(x) if x.logical <= at => Ok(x),
        Some(x) => Err(x.logical),
        None => Err(u64::MAX),
    }
}

/// Whether two extents' mappings put bytes `x` (in `a`) and `y` (in `b`) at one device address,
/// both plain and shared.
fn same_place(a: &Extent, x: u64, b: &Extent, y: u64) -> bool {
    a.is_plain()
        && b.is_plain()
        && a.is_shared()
        && b.is_shared()
        && a.physical.checked_add(x - a.logical) == b.physical.checked_add(y - b.logical)
}

/// Compares `[w.start, w.end)` of the image: `window` are the chain's pieces overlapping it
/// (gaps between them read as zeros), `clone` the clone's extents there, `deltas[layer]` the
/// extents of that layer's delta file range the pieces come from. Appends changed ranges.
fn compare_window(
    w: Range<u64>,
    window: &[Piece],
    layers: &[Vec<IndexEntry>],
    clone: &[Extent],
    deltas: &[Option<Vec<Extent>>],
    size: u64,
    out: &mut ChangedRanges,
) {
    let mut pos = w.start;
    let mut pi = 0usize;
    while pos < w.end {
        while pi < window.len() && window[pi].offset + window[pi].len <= pos {
            pi += 1;
        }
        let (end, src) = match window.get(pi) {
            Some(p) if p.offset <= pos => ((p.offset + p.len).min(w.end), p.src),
            Some(p) => (p.offset.min(w.end), Src::Zero),
            None => (w.end, Src::Zero),
        };
        match src {
            Src::Zero => compare_zero(pos, end, clone, size, out),
            Src::Data { layer, rec } => {
                let delta = deltas.get(layer).and_then(Option::as_deref).unwrap_or(&[]);
                compare_data(pos, end, &layers[layer][rec], clone, delta, size, out)
            }
        }
        pos = end;
    }
}

/// `[s, e)` reads as zeros in the parent: unchanged where the clone has a hole or an
/// unwritten extent.
fn compare_zero(s: u64, e: u64, clone: &[Extent], size: u64, out: &mut ChangedRanges) {
    let mut cur = s;
    while cur < e {
        match find(clone, cur) {
            Ok(c) if c.reads_as_zero() => {
                let t = c.end().min(e);
                out.zero_bytes += t - cur;
                cur = t;
            }
            Ok(c) => {
                let t = c.end().min(e);
                out.push(cur, t, size);
                cur = t;
            }
            Err(next) => {
                let t = next.min(e);
                out.zero_bytes += t - cur;
                cur = t;
            }
        }
    }
}

/// `[s, e)` is payload of record `entry` in the parent: unchanged where the clone maps it to
/// the device address the delta maps the payload to, or where both read as zeros without a
/// doubt (holes or unwritten extents on both sides: a record's zero tail cloned from a hole).
fn compare_data(
    s: u64,
    e: u64,
    entry: &IndexEntry,
    clone: &[Extent],
    delta: &[Extent],
    size: u64,
    out: &mut ChangedRanges,
) {
    let zero = |x: Option<&Extent>| x.is_none_or(Extent::reads_as_zero);
    let mut cur = s;
    while cur < e {
        let f = file_pos(entry, cur);
        let (c, c_end) = match find(clone, cur) {
            Ok(c) => (Some(c), c.end()),
            Err(next) => (None, next),
        };
        let (d, d_end) = match find(delta, f) {
            Ok(d) => (Some(d), d.end()),
            Err(next) => (None, next),
        };
        // The stretch where neither side's mapping changes.
        let t = e.min(c_end).min(cur.saturating_add(d_end - f));
        match (c, d) {
            (Some(c), Some(d)) if same_place(c, cur, d, f) => out.shared_bytes += t - cur,
            (c, d) if zero(c) && zero(d) => out.zero_bytes += t - cur,
            _ => out.push(cur, t, size),
        }
        cur = t;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::format::RecordKind;
    use crate::sys::fiemap::{EXTENT_ENCODED, EXTENT_SHARED, EXTENT_UNWRITTEN};

    const K: u64 = 4096;

    fn ext(logical: u64, physical: u64, length: u64, flags: u32) -> Extent {
        Extent {
            logical,
            physical,
            length,
            flags,
        }
    }

    fn data(offset: u64, length: u64, file_pos: u64) -> IndexEntry {
        IndexEntry {
            offset,
            length,
            kind: RecordKind::Data,
            file_pos,
            crc: 0,
        }
    }

    fn run(
        size: u64,
        layers: &[Vec<IndexEntry>],
        clone: &[Extent],
        deltas: &[Option<Vec<Extent>>],
    ) -> ChangedRanges {
        let pieces = extent_map(layers, size);
        let mut out = ChangedRanges::default();
        compare_window(0..size, &pieces, layers, clone, deltas, size, &mut out);
        out
    }

    #[test]
    fn shared_blocks_are_unchanged_and_everything_else_changed() {
        // One record of 64 KiB at image 0, payload at file offset 4096 (header at 4064).
        let layers = vec![vec![data(0, 16 * K, 4096 - RECORD_HEADER_LEN)]];
        let delta = vec![Some(vec![ext(0, 1000 * K, 32 * K, EXTENT_SHARED)])];
        // The clone: blocks 0..4 at the delta's place, block 4 rewritten elsewhere, 5..8
        // shared again, 8..12 a hole, 12..16 unwritten at the right place; then 16..20 data
        // where the parent had nothing, 20..24 a hole where the parent had nothing, 24..26
        // unwritten where the parent had nothing, 26..28 unwritten but also encoded.
        let clone = vec![
            ext(0, 1001 * K, 4 * K, EXTENT_SHARED),
            ext(4 * K, 5000 * K, K, 0),
            ext(5 * K, 1006 * K, 3 * K, EXTENT_SHARED),
            ext(12 * K, 1013 * K, 4 * K, EXTENT_SHARED | EXTENT_UNWRITTEN),
            ext(16 * K, 7000 * K, 4 * K, 0),
            ext(24 * K, 8000 * K, 2 * K, EXTENT_UNWRITTEN),
            ext(26 * K, 8002 * K, 2 * K, EXTENT_UNWRITTEN | EXTENT_ENCODED),
        ];
        let out = run(28 * K, &layers, &clone, &delta);
        assert_eq!(
            out.ranges,
            vec![4 * K..5 * K, 8 * K..20 * K, 26 * K..28 * K],
            "{out:?}"
        );
        assert_eq!(out.shared_bytes, 7 * K);
        assert_eq!(out.zero_bytes, 6 * K);
    }

    #[test]
    fn zeros_on_both_sides_are_unchanged() {
        // A 16 KiB record whose payload (file 4096..20480) is data, then a hole, then
        // unwritten, then data again.
        let layers = vec![vec![data(0, 4 * K, 4096 - RECORD_HEADER_LEN)]];
        let delta = vec![Some(vec![
            ext(0, 1000 * K, 2 * K, EXTENT_SHARED),
            ext(3 * K, 1003 * K, K, EXTENT_UNWRITTEN),
            ext(4 * K, 1004 * K, K, EXTENT_SHARED),
        ])];
        // Image block 0 is shared; block 1 a hole over the delta's hole (zero); block 2
        // unwritten over the delta's unwritten extent (zero); block 3 a hole over the delta's
        // data (changed: zeroed).
        let clone = vec![
            ext(0, 1001 * K, K, EXTENT_SHARED),
            ext(2 * K, 50 * K, K, EXTENT_UNWRITTEN),
        ];
        let out = run(4 * K, &layers, &clone, &delta);
        assert_eq!(out.ranges, vec![3 * K..4 * K], "{out:?}");
        assert_eq!((out.shared_bytes, out.zero_bytes), (K, 2 * K));
        // Data over the delta's hole is changed; holes over unwritten extents are zeros.
        let clone = vec![ext(0, 1001 * K, K, EXTENT_SHARED), ext(K, 60 * K, K, 0)];
        let delta = vec![Some(vec![
            ext(0, 1000 * K, 2 * K, EXTENT_SHARED),
            ext(3 * K, 1003 * K, 2 * K, EXTENT_UNWRITTEN),
        ])];
        let out = run(4 * K, &layers, &clone, &delta);
        assert_eq!(out.ranges, vec![K..2 * K], "{out:?}");
        assert_eq!(out.zero_bytes, 2 * K);
    }

    #[test]
    fn same_address_without_the_shared_flag_or_off_by_one_is_changed() {
        let layers = vec![vec![data(0, 8 * K, 4096 - RECORD_HEADER_LEN)]];
        let delta = vec![Some(vec![ext(0, 1000 * K, 16 * K, 0)])];
        let clone = vec![ext(0, 1001 * K, 8 * K, EXTENT_SHARED)];
        assert_eq!(run(8 * K, &layers, &clone, &delta).ranges, vec![0..8 * K]);
        let delta = vec![Some(vec![ext(0, 1000 * K, 16 * K, EXTENT_SHARED)])];
        let clone = vec![ext(0, 1000 * K, 8 * K, EXTENT_SHARED)];
        assert_eq!(run(8 * K, &layers, &clone, &delta).ranges, vec![0..8 * K]);
        // No map of the delta at all (e.g. a layer on another backend): changed.
        let clone = vec![ext(0, 1001 * K, 8 * K, EXTENT_SHARED)];
        assert_eq!(run(8 * K, &layers, &clone, &[None]).ranges, vec![0..8 * K]);
    }

    #[test]
    fn newest_layer_wins_and_unaligned_pieces_widen() {
        // Layer 0 holds 0..32K cloned; layer 1 (an incremental) wrote 100 bytes at 5000.
        let layers = vec![
            vec![data(0, 8 * K, 4096 - RECORD_HEADER_LEN)],
            vec![data(5000, 100, 32)],
        ];
        let deltas = vec![
            Some(vec![ext(0, 1000 * K, 12 * K, EXTENT_SHARED)]),
            Some(vec![ext(0, 9000 * K, K, 0)]),
        ];
        let clone = vec![ext(0, 1001 * K, 8 * K, EXTENT_SHARED)];
        let out = run(8 * K, &layers, &clone, &deltas);
        // The clone still maps 5000..5100 to layer 0's place, but the chain says layer 1's
        // bytes are there: changed, widened to the 4 KiB piece.
        assert_eq!(out.ranges, vec![K..2 * K], "{out:?}");
    }

    #[test]
    fn pushes_merge_and_clip() {
        let mut c = ChangedRanges::default();
        c.push(10, 20, 100_000);
        c.push(4096, 5000, 100_000);
        c.push(9000, 9001, 10_000);
        assert_eq!(c.ranges, vec![0..10_000]);
        c.push(20_000, 30_000, 100_000);
        assert_eq!(c.ranges, vec![0..10_000, 16_384..32_768]);
        assert_eq!(c.changed_bytes(), 10_000 + 16_384);
    }
}
