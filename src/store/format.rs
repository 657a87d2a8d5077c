//! The store's byte layout: delta files, block-hash files, manifests and the `format` file.
//!
//! Pure encode/decode over byte slices; it never touches a backend. Every integer is
//! little-endian. These layouts are locked by the golden test (`tests/fixtures/store/`);
//! changing a byte means a new version number.
//!
//! # `format` (store root)
//! The ASCII text `blocksnap-store\nversion 4\n`. A store still marked `version 1`, `2` or
//! `3` is opened and its marker rewritten to version 4 (every older file stays readable); a
//! directory holding anything else is refused. So a binary that knows only an older version
//! refuses a newer store ("unknown format file") instead of misreading what it holds: store
//! version 2 brought manifest version 2, version 3 delta version 2 (alignment gaps), version 4
//! "not known" entries in block-hash files (which an older binary would take for mismatches
//! and report as corruption).
//!
//! # Delta file `snapshots/<id>/delta.<generation>`
//! ```text
//! header  32 B : magic "BSNPDLT1" | version u32 (1 or 2) | reserved u32 = 0 | snapshot id, 16 B ASCII, 0-padded
//! gap          : version 2 only, see below: 0..4095 zero bytes
//! record* 32 B : magic "BREC" | kind u8 (1 data, 2 zero) | reserved 3 B = 0 | offset u64 | length u64
//!                | crc32 u32 | reserved u32 = 0
//!                followed by `length` payload bytes for a data record, nothing for a zero record
//! index   32 B per record : offset u64 | length u64 | file position of the record header u64
//!                | kind u8 | reserved 3 B = 0 | crc32 u32
//! footer  40 B : magic "BSNPEND1" | record count u64 | index position u64 | payload bytes u64
//!                | reserved u32 = 0 | crc32 u32 over (index bytes ‖ footer bytes 0..36)
//! ```
//! A record's CRC32 (IEEE polynomial, `crc32fast`) covers the 16-byte snapshot id, offset,
//! length, kind and payload, so a valid record copied to another offset or another snapshot fails.
//! Records are strictly ascending and non-overlapping; the index must describe exactly the records
//! laid out from byte 32 to the index position, and the footer ends the file, so truncation and
//! appended bytes are caught without scanning.
//!
//! **Alignment gaps (delta version 2).** Version 1 lays records back to back. Version 2 puts a
//! *data* record of at least [`ALIGN_MIN_RECORD`] (64 KiB) payload bytes after a gap of zero
//! bytes chosen so that its payload's file position is congruent to its image offset modulo
//! [`ALIGN`] (4 KiB): for a record at a 4 KiB-aligned image offset the payload starts on a 4 KiB
//! boundary of the file. That lets a reflink filesystem share extents between the image and
//! the delta (FICLONERANGE needs both offsets aligned) in capture and restore. The gap is a
//! function of the previous record's end and the record's kind, offset and length
//! ([`record_pos`]): there is no freedom in the layout, so the index check still pins every
//! record's position, and every gap byte must be zero (verify checks them, restore checks the
//! gaps inside the runs of records it reads). Zero records and short data records get no gap.
//!
//! Every byte of a delta is covered by a check of its own: header and record-header fields
//! (magic, version, reserved zeros, values against the index), gap bytes (zero), payloads by
//! their record's CRC32, index and footer by the footer CRC32.
//!
//! # Block-hash file `snapshots/<id>/hashes`
//! ```text
//! header 48 B : magic "BSNPHSH1" | version u32 = 1 | block size u32 | volume size u64
//!               | block count u64 | snapshot id 16 B
//! hashes      : block count × 32 B BLAKE3 of the block's bytes (the last block may be short);
//!               32 zero bytes mark an all-zero block; 32 0xff bytes a block whose hash
//!               is not known (an incremental stored only the dirty part of it)
//! trailer 32 B: BLAKE3 of everything before it
//! ```
//!
//! # Manifest `snapshots/<id>/manifest`
//! ```text
//! magic "BSNPMAN1" | version u32 = 2 | body length u32 | body (JSON of `Manifest`) | BLAKE3 of all before, 32 B
//! ```
//! Version 1 manifests (still read) always carry `delta_blake3`, the BLAKE3 of the whole delta
//! file, which verify compares. Version 2 writers leave it empty — hashing every delta byte a
//! second time cost about a third of a full capture's CPU, and the per-part checks above
//! already cover every byte — but a non-empty value is still compared. The per-block BLAKE3 of
//! restored images (block-hash file) is unchanged.

use crate::api::SnapshotId;

pub const FORMAT_FILE_CONTENT: &[u8] = b"blocksnap-store\nversion 4\n";
/// The markers of version-1 to version-3 stores: opened, and upgraded to `FORMAT_FILE_CONTENT`.
pub const FORMAT_FILE_V1: &[u8] = b"blocksnap-store\nversion 1\n";
pub const FORMAT_FILE_V2: &[u8] = b"blocksnap-store\nversion 2\n";
pub const FORMAT_FILE_V3: &[u8] = b"blocksnap-store\nversion 3\n";

pub const DELTA_MAGIC: &[u8; 8] = b"BSNPDLT1";
pub const RECORD_MAGIC: &[u8; 4] = b"BREC";
pub const FOOTER_MAGIC: &[u8; 8] = b"BSNPEND1";
pub const HASHES_MAGIC: &[u8; 8] = b"BSNPHSH1";
pub const MANIFEST_MAGIC: &[u8; 8] = b"BSNPMAN1";
/// Version of block-hash files (unchanged since version 1 of the store).
pub const VERSION: u32 = 1;
/// Version of delta files written now (alignment gaps); version 1 (back to back) is still read.
pub const DELTA_VERSION: u32 = 2;
/// Payload positions of long data records are congruent to their image offsets modulo this.
pub const ALIGN: u64 = 4096;
/// Data records with at least this many payload bytes are aligned (delta version 2).
pub const ALIGN_MIN_RECORD: u64 = 64 << 10;
/// Version of manifests written now; `decode_manifest_versioned` also reads version 1.
pub const MANIFEST_VERSION: u32 = 2;

pub const DELTA_HEADER_LEN: u64 = 32;
pub const RECORD_HEADER_LEN: u64 = 32;
pub const INDEX_ENTRY_LEN: u64 = 32;
pub const FOOTER_LEN: u64 = 40;
pub const HASHES_HEADER_LEN: u64 = 48;
pub const HASH_LEN: usize = 32;

/// Largest data record a reader accepts: bounds every allocation made from on-disk lengths.
pub const MAX_DATA_RECORD: u64 = 64 << 20;
/// Largest manifest body a reader accepts.
pub const MAX_MANIFEST_BODY: u32 = 1 << 20;

/// What a record says about its byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// The range holds the record's payload.
    Data,
    /// The range is all zeros; no payload.
    Zero,
}

impl RecordKind {
    pub fn to_byte(self) -> u8 {
        match self {
            RecordKind::Data => 1,
            RecordKind::Zero => 2,
        }
    }
    pub fn from_byte(b: u8) -> Option<RecordKind> {
        match b {
            1 => Some(RecordKind::Data),
            2 => Some(RecordKind::Zero),
            _ => None,
        }
    }
}

/// One index entry: where a record lies in the image and in the delta file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub offset: u64,
    pub length: u64,
    pub kind: RecordKind,
    pub file_pos: u64,
    pub crc: u32,
}

impl IndexEntry {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
    /// Payload bytes this record carries in the file.
    pub fn payload_len(&self) -> u64 {
        match self.kind {
            RecordKind::Data => self.length,
            RecordKind::Zero => 0,
        }
    }
}

/// Why bytes failed to decode; turned into `StoreError::Corrupt` with context by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError(pub String);

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad<T>(msg: impl Into<String>) -> Result<T, FormatError> {
    Err(FormatError(msg.into()))
}

/// The snapshot id as the fixed 16 bytes stored in headers and covered by CRCs.
pub fn id_bytes(id: &SnapshotId) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (o, b) in out.iter_mut().zip(id.as_str().bytes()) {
        *o = b;
    }
    out
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// CRC32 of a record: snapshot id ‖ offset ‖ length ‖ kind ‖ payload.
pub fn record_crc(
    id: &[u8; 16],
    offset: u64,
    length: u64,
    kind: RecordKind,
    payload: &[u8],
) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(id);
    h.update(&offset.to_le_bytes());
    h.update(&length.to_le_bytes());
    h.update(&[kind.to_byte()]);
    h.update(payload);
    h.finalize()
}

pub fn encode_delta_header(id: &SnapshotId) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[0..8].copy_from_slice(DELTA_MAGIC);
    h[8..12].copy_from_slice(&DELTA_VERSION.to_le_bytes());
    h[16..32].copy_from_slice(&id_bytes(id));
    h
}

/// Checks a delta header; returns the delta's version (1 or 2).
pub fn decode_delta_header(b: &[u8], id: &SnapshotId) -> Result<u32, FormatError> {
    if b.len() != 32 || &b[0..8] != DELTA_MAGIC {
        return bad("delta header has no delta magic");
    }
    let version = u32_at(b, 8);
    if version != 1 && version != DELTA_VERSION {
        return bad(format!("delta version {version} is unknown"));
    }
    if b[12..16] != [0, 0, 0, 0] {
        return bad("delta header reserved bytes are not zero");
    }
    if b[16..32] != id_bytes(id) {
        return bad("delta header belongs to another snapshot");
    }
    Ok(version)
}

/// Where the header of the next record lies in a delta of `version` whose previous record (or
/// the delta header) ends at `pos`: `pos` itself, except in version 2 for a data record of at
/// least `ALIGN_MIN_RECORD` bytes, which follows a gap of zeros that makes its payload position
/// congruent to `offset` modulo `ALIGN`. Saturates instead of overflowing (absurd positions
/// then fail the index check).
pub fn record_pos(version: u32, pos: u64, kind: RecordKind, offset: u64, length: u64) -> u64 {
    if version < 2 || kind != RecordKind::Data || length < ALIGN_MIN_RECORD {
        return pos;
    }
    let payload = pos.saturating_add(RECORD_HEADER_LEN);
    let gap = (offset % ALIGN + ALIGN - payload % ALIGN) % ALIGN;
    pos.saturating_add(gap)
}

pub fn encode_record_header(e: &IndexEntry) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[0..4].copy_from_slice(RECORD_MAGIC);
    h[4] = e.kind.to_byte();
    h[8..16].copy_from_slice(&e.offset.to_le_bytes());
    h[16..24].copy_from_slice(&e.length.to_le_bytes());
    h[24..28].copy_from_slice(&e.crc.to_le_bytes());
    h
}

/// Checks a record header read from `e.file_pos` against its index entry.
pub fn check_record_header(b: &[u8], e: &IndexEntry) -> Result<(), FormatError> {
    if b.len() != 32 || &b[0..4] != RECORD_MAGIC {
        return bad("record header has no record magic");
    }
    if b[5..8] != [0, 0, 0] || b[28..32] != [0, 0, 0, 0] {
        return bad("record header reserved bytes are not zero");
    }
    if b[4] != e.kind.to_byte()
        || u64_at(b, 8) != e.offset
        || u64_at(b, 16) != e.length
        || u32_at(b, 24) != e.crc
    {
        return bad("record header disagrees with the index");
    }
    Ok(())
}

pub fn encode_index_entry(e: &IndexEntry) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0..8].copy_from_slice(&e.offset.to_le_bytes());
    b[8..16].copy_from_slice(&e.length.to_le_bytes());
    b[16..24].copy_from_slice(&e.file_pos.to_le_bytes());
    b[24] = e.kind.to_byte();
    b[28..32].copy_from_slice(&e.crc.to_le_bytes());
    b
}

/// The decoded footer of a delta file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    pub record_count: u64,
    pub index_pos: u64,
    pub payload_bytes: u64,
}

pub fn encode_footer(f: &Footer, index_bytes: &[u8]) -> [u8; 40] {
    let mut b = [0u8; 40];
    b[0..8].copy_from_slice(FOOTER_MAGIC);
    b[8..16].copy_from_slice(&f.record_count.to_le_bytes());
    b[16..24].copy_from_slice(&f.index_pos.to_le_bytes());
    b[24..32].copy_from_slice(&f.payload_bytes.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(index_bytes);
    h.update(&b[0..36]);
    b[36..40].copy_from_slice(&h.finalize().to_le_bytes());
    b
}

/// Decodes the footer of a delta file of `file_len` bytes; checks that the index fits exactly.
pub fn decode_footer(b: &[u8], file_len: u64) -> Result<Footer, FormatError> {
    if b.len() != 40 || &b[0..8] != FOOTER_MAGIC {
        return bad("delta footer has no footer magic (truncated or appended bytes?)");
    }
    let f = Footer {
        record_count: u64_at(b, 8),
        index_pos: u64_at(b, 16),
        payload_bytes: u64_at(b, 24),
    };
    if b[32..36] != [0, 0, 0, 0] {
        return bad("delta footer reserved bytes are not zero");
    }
    let index_len = f.record_count.checked_mul(INDEX_ENTRY_LEN);
    let expected = index_len
        .and_then(|l| l.checked_add(f.index_pos))
        .and_then(|l| l.checked_add(FOOTER_LEN));
    if expected != Some(file_len) || f.index_pos < DELTA_HEADER_LEN {
        return bad("delta footer does not match the file length");
    }
    Ok(f)
}

/// Checks the footer CRC and decodes the index of a current-version delta; validates the
/// record layout it describes.
pub fn decode_index(
    index_bytes: &[u8],
    footer_bytes: &[u8],
    footer: &Footer,
    volume_size: u64,
) -> Result<Vec<IndexEntry>, FormatError> {
    decode_index_versioned(
        DELTA_VERSION,
        index_bytes,
        footer_bytes,
        footer,
        volume_size,
    )
}

/// `decode_index` for a delta of `version` (from `decode_delta_header`).
pub fn decode_index_versioned(
    version: u32,
    index_bytes: &[u8],
    footer_bytes: &[u8],
    footer: &Footer,
    volume_size: u64,
) -> Result<Vec<IndexEntry>, FormatError> {
    let mut h = crc32fast::Hasher::new();
    h.update(index_bytes);
    h.update(&footer_bytes[0..36]);
    if h.finalize() != u32_at(footer_bytes, 36) {
        return bad("delta index or footer checksum mismatch");
    }
    let mut out = Vec::with_capacity(index_bytes.len() / 32);
    let mut pos = DELTA_HEADER_LEN;
    let mut prev_end = 0u64;
    let mut payload = 0u64;
    for chunk in index_bytes.chunks_exact(32) {
        let Some(kind) = RecordKind::from_byte(chunk[24]) else {
            return bad("index entry has an unknown kind");
        };
        let e = IndexEntry {
            offset: u64_at(chunk, 0),
            length: u64_at(chunk, 8),
            file_pos: u64_at(chunk, 16),
            kind,
            crc: u32_at(chunk, 28),
        };
        if chunk[25..28] != [0, 0, 0] {
            return bad("index entry reserved bytes are not zero");
        }
        let end = e.offset.checked_add(e.length);
        if e.length == 0 || end.is_none_or(|end| end > volume_size) {
            return bad(format!(
                "index entry at offset {} length {} lies outside the volume",
                e.offset, e.length
            ));
        }
        if !out.is_empty() && e.offset < prev_end {
            return bad(format!(
                "index entry at offset {} is out of order",
                e.offset
            ));
        }
        if e.kind == RecordKind::Data && e.length > MAX_DATA_RECORD {
            return bad(format!("data record at offset {} is too long", e.offset));
        }
        pos = record_pos(version, pos, e.kind, e.offset, e.length);
        if e.file_pos != pos {
            return bad(format!(
                "index entry at offset {} has a wrong file position",
                e.offset
            ));
        }
        // Saturating: absurd lengths must fail the check below, never overflow.
        pos = pos.saturating_add(RECORD_HEADER_LEN + e.payload_len());
        payload = payload.saturating_add(e.payload_len());
        prev_end = e.end();
        out.push(e);
    }
    if pos != footer.index_pos || payload != footer.payload_bytes {
        return bad("delta index does not describe the records up to the index");
    }
    Ok(out)
}

pub fn encode_hashes_header(
    id: &SnapshotId,
    block_size: u32,
    volume_size: u64,
    count: u64,
) -> [u8; 48] {
    let mut b = [0u8; 48];
    b[0..8].copy_from_slice(HASHES_MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&block_size.to_le_bytes());
    b[16..24].copy_from_slice(&volume_size.to_le_bytes());
    b[24..32].copy_from_slice(&count.to_le_bytes());
    b[32..48].copy_from_slice(&id_bytes(id));
    b
}

/// Decodes a block-hash file header: returns (block size, volume size, block count).
pub fn decode_hashes_header(b: &[u8], id: &SnapshotId) -> Result<(u32, u64, u64), FormatError> {
    if b.len() != HASHES_HEADER_LEN as usize || &b[0..8] != HASHES_MAGIC {
        return bad("block-hash file has no magic or is truncated");
    }
    if u32_at(b, 8) != VERSION {
        return bad("block-hash file version is unknown");
    }
    if b[32..48] != id_bytes(id) {
        return bad("block-hash file belongs to another snapshot");
    }
    let block_size = u32_at(b, 12);
    let volume_size = u64_at(b, 16);
    let count = u64_at(b, 24);
    if block_size == 0 || count != volume_size.div_ceil(u64::from(block_size)) {
        return bad("block-hash file block count does not match its volume size");
    }
    Ok((block_size, volume_size, count))
}

/// The length a block-hash file of `count` blocks must have.
pub fn hashes_file_len(count: u64) -> Option<u64> {
    count
        .checked_mul(HASH_LEN as u64)?
        .checked_add(HASHES_HEADER_LEN + HASH_LEN as u64)
}

/// Decodes a whole block-hash file: returns (block size, volume size, hashes).
pub fn decode_hashes(
    b: &[u8],
    id: &SnapshotId,
) -> Result<(u32, u64, Vec<[u8; HASH_LEN]>), FormatError> {
    let hdr = HASHES_HEADER_LEN as usize;
    if b.len() < hdr + HASH_LEN {
        return bad("block-hash file is truncated");
    }
    let body_end = b.len() - HASH_LEN;
    if blake3::hash(&b[..body_end]).as_bytes() != &b[body_end..] {
        return bad("block-hash file checksum mismatch");
    }
    let (block_size, volume_size, count) = decode_hashes_header(&b[..hdr], id)?;
    if hashes_file_len(count) != Some(b.len() as u64) {
        return bad("block-hash file length does not match its block count");
    }
    let hashes = b[hdr..body_end]
        .chunks_exact(HASH_LEN)
        .map(|c| {
            let mut a = [0u8; HASH_LEN];
            a.copy_from_slice(c);
            a
        })
        .collect();
    Ok((block_size, volume_size, hashes))
}

/// Wraps a manifest body (JSON) in its envelope.
pub fn encode_manifest(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 48);
    out.extend_from_slice(MANIFEST_MAGIC);
    out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Unwraps a manifest envelope and returns the body.
pub fn decode_manifest(b: &[u8]) -> Result<&[u8], FormatError> {
    decode_manifest_versioned(b).map(|(_, body)| body)
}

/// Unwraps a manifest envelope: returns its version (1 or 2) and the body.
pub fn decode_manifest_versioned(b: &[u8]) -> Result<(u32, &[u8]), FormatError> {
    if b.len() < 16 + HASH_LEN || &b[0..8] != MANIFEST_MAGIC {
        return bad("manifest has no manifest magic or is truncated");
    }
    let len = u32_at(b, 12);
    if len > MAX_MANIFEST_BODY || b.len() != 16 + len as usize + HASH_LEN {
        return bad("manifest length does not match its header");
    }
    let end = 16 + len as usize;
    if blake3::hash(&b[..end]).as_bytes() != &b[end..] {
        return bad("manifest checksum mismatch");
    }
    let version = u32_at(b, 8);
    if version != 1 && version != MANIFEST_VERSION {
        return bad("manifest version is unknown");
    }
    Ok((version, &b[16..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid() -> SnapshotId {
        "ss-abcdefgh".parse().unwrap()
    }

    #[test]
    fn record_crc_binds_snapshot_and_offset() {
        let a = record_crc(&id_bytes(&sid()), 0, 4, RecordKind::Data, b"abcd");
        let moved = record_crc(&id_bytes(&sid()), 4096, 4, RecordKind::Data, b"abcd");
        let other: SnapshotId = "ss-zzzzzzzz".parse().unwrap();
        let foreign = record_crc(&id_bytes(&other), 0, 4, RecordKind::Data, b"abcd");
        assert_ne!(a, moved);
        assert_ne!(a, foreign);
    }

    #[test]
    fn manifest_envelope_round_trips_and_catches_flips() {
        let enc = encode_manifest(b"{\"x\":1}");
        assert_eq!(decode_manifest(&enc).unwrap(), b"{\"x\":1}");
        for i in 0..enc.len() {
            let mut bad = enc.clone();
            bad[i] ^= 0x10;
            assert!(decode_manifest(&bad).is_err(), "flip at {i}");
        }
        assert!(decode_manifest(&enc[..enc.len() - 1]).is_err());
    }

    #[test]
    fn old_manifests_still_decode_and_unknown_versions_do_not() {
        let mut enc = encode_manifest(b"{}");
        assert_eq!(decode_manifest_versioned(&enc).unwrap(), (2, &b"{}"[..]));
        let reseal = |e: &mut Vec<u8>, v: u32| {
            e[8..12].copy_from_slice(&v.to_le_bytes());
            let end = e.len() - HASH_LEN;
            let sum = blake3::hash(&e[..end]);
            e[end..].copy_from_slice(sum.as_bytes());
        };
        reseal(&mut enc, 1);
        assert_eq!(decode_manifest_versioned(&enc).unwrap(), (1, &b"{}"[..]));
        reseal(&mut enc, 3);
        assert!(decode_manifest(&enc).is_err());
    }

    #[test]
    fn delta_header_reserved_bytes_are_checked() {
        let mut h = encode_delta_header(&sid());
        assert!(decode_delta_header(&h, &sid()).is_ok());
        h[13] = 1;
        assert!(decode_delta_header(&h, &sid()).is_err());
    }

    #[test]
    fn long_data_records_are_placed_so_their_payload_matches_the_image_offset_mod_4k() {
        let long = ALIGN_MIN_RECORD;
        // Short data records and zero records never get a gap; nor does anything in version 1.
        assert_eq!(record_pos(2, 100, RecordKind::Data, 0, long - 1), 100);
        assert_eq!(record_pos(2, 100, RecordKind::Zero, 0, long * 4), 100);
        assert_eq!(record_pos(1, 100, RecordKind::Data, 0, long), 100);
        // Aligned image offset: payload on a 4 KiB boundary of the file.
        assert_eq!(record_pos(2, 32, RecordKind::Data, 8192, long), 4064);
        assert_eq!(record_pos(2, 4064, RecordKind::Data, 0, long), 4064);
        // Unaligned image offset: payload position congruent to it.
        let at = record_pos(2, 5000, RecordKind::Data, 4096 * 7 + 123, long);
        assert_eq!((at + 32) % ALIGN, 123);
        assert!((5000..5000 + ALIGN).contains(&at));
        // No overflow on absurd positions.
        let _ = record_pos(2, u64::MAX - 3, RecordKind::Data, u64::MAX, u64::MAX);
    }

    /// A version-2 index is accepted only with the gaps `record_pos` demands: a record moved
    /// by a single byte, or laid out back to back as in version 1, is refused; a version-1
    /// index with gaps is refused too.
    #[test]
    fn index_positions_must_follow_the_gap_rule_of_the_version() {
        let entries = |v: u32| {
            let mut pos = DELTA_HEADER_LEN;
            let mut out = Vec::new();
            for (offset, length) in [(0u64, 4096u64), (65536, ALIGN_MIN_RECORD), (200_000, 10)] {
                let file_pos = record_pos(v, pos, RecordKind::Data, offset, length);
                out.push(IndexEntry {
                    offset,
                    length,
                    kind: RecordKind::Data,
                    file_pos,
                    crc: 7,
                });
                pos = file_pos + RECORD_HEADER_LEN + length;
            }
            (out, pos)
        };
        let decode = |v: u32, es: &[IndexEntry], end: u64| {
            let mut ib = Vec::new();
            for e in es {
                ib.extend_from_slice(&encode_index_entry(e));
            }
            let f = Footer {
                record_count: es.len() as u64,
                index_pos: end,
                payload_bytes: es.iter().map(|e| e.length).sum(),
            };
            let fb = encode_footer(&f, &ib);
            decode_index_versioned(v, &ib, &fb, &f, 1 << 30)
        };
        let (v2, end2) = entries(2);
        assert_eq!((v2[1].file_pos + 32) % ALIGN, 0);
        assert_eq!(decode(2, &v2, end2).unwrap(), v2);
        let (v1, end1) = entries(1);
        assert_eq!(decode(1, &v1, end1).unwrap(), v1);
        assert!(
            decode(2, &v1, end1).is_err(),
            "back to back is not version 2"
        );
        assert!(decode(1, &v2, end2).is_err(), "gaps are not version 1");
        let mut moved = v2.clone();
        moved[1].file_pos += 1;
        moved[2].file_pos += 1;
        assert!(decode(2, &moved, end2 + 1).is_err());
        assert!(decode(2, &v2, end2 + ALIGN).is_err());
        // Unknown delta versions are refused by the header.
        let mut h = encode_delta_header(&sid());
        assert_eq!(decode_delta_header(&h, &sid()).unwrap(), DELTA_VERSION);
        h[8] = 3;
        assert!(decode_delta_header(&h, &sid()).is_err());
        h[8] = 1;
        assert_eq!(decode_delta_header(&h, &sid()).unwrap(), 1);
    }

    #[test]
    fn footer_rejects_wrong_length() {
        let f = Footer {
            record_count: 0,
            index_pos: 32,
            payload_bytes: 0,
        };
        let b = encode_footer(&f, &[]);
        assert!(decode_footer(&b, 72).is_ok());
        assert!(decode_footer(&b, 73).is_err());
    }
}
