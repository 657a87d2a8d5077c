//! The NBD server against raw protocol traffic: edge cases real clients never send
//! (out-of-range requests, bad flags, FAST_ZERO, removal while connected) and hostile
//! clients, which must be disconnected without disturbing anyone else.

mod nbd_support;

use std::io::Write;
use std::time::Duration;

use blocksnap::nbd::{Export, FileExport, TrackedExport};
use nbd_support::*;

const MIB: u64 = 1 << 20;

#[test]
fn structured_reads_writes_and_errors() {
    let s = Served::start(4 * MIB);
    fill(&s.image, MIB, 0x42, 8192);
    let (mut c, size, flags) = Raw::open(&s.sock, EXPORT, true, true);
    assert_eq!(size, 4 * MIB);
    assert_ne!(flags & (1 << 8), 0, "multi-conn advertised");

    // A read spanning a hole and data: chunks cover the range exactly once.
    c.request(CMD_READ, 0, 1, MIB - 8192, 16384, &[]);
    let mut covered = 0u64;
    let mut data = vec![0xffu8; 16384];
    loop {
        let ch = c.chunk();
        assert_eq!(ch.handle, 1);
        match ch.kind {
            1 => {
                let off = u64::from_be_bytes(ch.payload[..8].try_into().unwrap());
                let rel = (off - (MIB - 8192)) as usize;
                data[rel..rel + ch.payload.len() - 8].copy_from_slice(&ch.payload[8..]);
                covered += ch.payload.len() as u64 - 8;
            }
            2 => {
                let off = u64::from_be_bytes(ch.payload[..8].try_into().unwrap());
                let len = u32::from_be_bytes(ch.payload[8..12].try_into().unwrap()) as usize;
                let rel = (off - (MIB - 8192)) as usize;
                data[rel..rel + len].fill(0);
                covered += len as u64;
            }
            0 => {}
            k => panic!("unexpected chunk type {k:#x}"),
        }
        if ch.flags & 1 != 0 {
            break;
        }
    }
    assert_eq!(covered, 16384);
    assert!(data[..8192].iter().all(|&b| b == 0));
    assert!(data[8192..].iter().all(|&b| b == 0x42));

    // Out of range: read → EINVAL as an error chunk, write → ENOSPC; the session goes on.
    c.request(CMD_READ, 0, 2, 4 * MIB - 1, 2, &[]);
    let ch = c.chunk();
    assert_eq!((ch.kind, ch.flags & 1), (0x8001, 1));
    assert_eq!(
        u32::from_be_bytes(ch.payload[..4].try_into().unwrap()),
        EINVAL
    );
    c.request(CMD_WRITE, 0, 3, 4 * MIB - 100, 200, &[7u8; 200]);
    assert_eq!(c.status(), (ENOSPC, 3));
    c.request(CMD_WRITE, 0, 4, u64::MAX - 10, 200, &[7u8; 200]);
    assert_eq!(c.status(), (ENOSPC, 4));
    // Unknown command and a flag invalid for the command → EINVAL.
    c.request(42, 0, 5, 0, 0, &[]);
    assert_eq!(c.status(), (EINVAL, 5));
    c.request(CMD_WRITE, 1 << 3, 6, 0, 16, &[1u8; 16]);
    assert_eq!(c.status(), (EINVAL, 6));
    // FUA write, then flush, then block status, all on the same session.
    c.request(CMD_WRITE, FLAG_FUA, 7, 0, 4096, &[9u8; 4096]);
    assert_eq!(c.status(), (0, 7));
    c.request(CMD_FLUSH, 0, 8, 0, 0, &[]);
    assert_eq!(c.status(), (0, 8));
    assert!(read_range(&s.image, 0, 4096).iter().all(|&b| b == 9));
    c.request(CMD_BLOCK_STATUS, 0, 9, 0, (4 * MIB) as u32, &[]);
    let ch = c.chunk();
    assert_eq!((ch.kind, ch.flags & 1, ch.handle), (5, 1, 9));
    let total: u64 = ch.payload[4..]
        .chunks(8)
        .map(|d| u64::from(u32::from_be_bytes(d[..4].try_into().unwrap())))
        .sum();
    assert!(total > 0 && total <= 4 * MIB);
    // FAST_ZERO on a file that can punch holes succeeds; the range reads as zeroes.
    c.request(CMD_WRITE_ZEROES, FLAG_FAST_ZERO, 10, 0, 4096, &[]);
    assert_eq!(c.status(), (0, 10));
    assert!(read_range(&s.image, 0, 4096).iter().all(|&b| b == 0));
    c.request(CMD_DISC, 0, 11, 0, 0, &[]);
    assert!(c.closed_by_server());
}

#[test]
fn simple_replies_without_structured_negotiation() {
    let s = Served::start(MIB);
    fill(&s.image, 0, 0x33, 512);
    let (mut c, _, flags) = Raw::open(&s.sock, EXPORT, false, false);
    assert_eq!(flags & (1 << 7), 0, "DF needs structured replies");
    c.request(CMD_READ, 0, 1, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (0, 1));
    let mut buf = vec![0u8; 512];
    std::io::Read::read_exact(&mut c.s, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x33));
    // A failed read gets an error header and no data; the next reply follows directly.
    c.request(CMD_READ, 0, 2, MIB, 512, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 2));
    c.request(CMD_BLOCK_STATUS, 0, 3, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 3));
    c.request(CMD_FLUSH, 0, 4, 0, 0, &[]);
    assert_eq!(c.simple_reply(), (0, 4));
}

#[test]
fn handshake_options_list_info_abort_and_unknown() {
    let s = Served::start(MIB);
    let mut c = Raw::connect(&s.sock);
    c.greet();
    c.send_option(3, &[]);
    let (k, d) = c.option_reply();
    assert_eq!(k, 2);
    assert_eq!(&d[4..], EXPORT.as_bytes());
    assert_eq!(c.option_reply().0, 1);
    // Unknown option → ERR_UNSUP; data is skipped and the session continues.
    c.send_option(999, b"whatever");
    assert_eq!(c.option_reply().0, (1 << 31) + 1);
    // INFO for a missing export → ERR_UNKNOWN; malformed INFO → ERR_INVALID.
    let mut d = 4u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"nope");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.send_option(6, &d);
    assert_eq!(c.option_reply().0, (1 << 31) + 6);
    c.send_option(6, &[0, 0, 0, 99]);
    assert_eq!(c.option_reply().0, (1 << 31) + 3);
    // SET_META_CONTEXT before structured replies → ERR_INVALID.
    c.send_option(10, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(c.option_reply().0, (1 << 31) + 3);
    // LIST_META_CONTEXT with no query lists base:allocation.
    c.send_option(8, &[]);
    assert_eq!(c.option_reply().0, 1);
    let mut d = (EXPORT.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(EXPORT.as_bytes());
    d.extend_from_slice(&0u32.to_be_bytes());
    c.send_option(9, &d);
    let (k, d) = c.option_reply();
    assert_eq!((k, &d[4..]), (4, &b"base:allocation"[..]));
    assert_eq!(c.option_reply().0, 1);
    c.send_option(2, &[]);
    assert_eq!(c.option_reply().0, 1);
    assert!(c.closed_by_server());
}

#[test]
fn hostile_clients_are_disconnected_and_others_keep_working() {
    let s = Served::start(4 * MIB);
    let (mut good, _, _) = Raw::open(&s.sock, EXPORT, true, false);

    // Garbage right after the handshake.
    let (mut c, _, _) = Raw::open(&s.sock, EXPORT, true, false);
    c.s.write_all(&[0xde; 200]).unwrap();
    assert!(c.closed_by_server(), "garbage request");

    // A write announcing more than the maximum payload.
    let (mut c, _, _) = Raw::open(&s.sock, EXPORT, true, false);
    c.request(CMD_WRITE, 0, 1, 0, u32::MAX, &[]);
    assert!(c.closed_by_server(), "huge write");

    // A huge read is refused with an error, not honoured and not fatal.
    let (mut c, _, _) = Raw::open(&s.sock, EXPORT, true, false);
    c.request(CMD_READ, 0, 1, 0, u32::MAX, &[]);
    assert_ne!(c.status().0, 0);

    // Half a request header, then the client hangs up.
    let (mut c, _, _) = Raw::open(&s.sock, EXPORT, true, false);
    c.s.write_all(&[0x25, 0x60, 0x95, 0x13, 0, 0]).unwrap();
    drop(c);

    // Bad client flags, a huge option, garbage instead of an option.
    let mut c = Raw::connect(&s.sock);
    let mut g = [0u8; 18];
    std::io::Read::read_exact(&mut c.s, &mut g).unwrap();
    c.s.write_all(&0xffff_ffffu32.to_be_bytes()).unwrap();
    assert!(c.closed_by_server(), "bad client flags");
    let mut c = Raw::connect(&s.sock);
    c.greet();
    let mut m = b"IHAVEOPT".to_vec();
    m.extend_from_slice(&7u32.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&m).unwrap();
    assert_eq!(c.option_reply().0, (1 << 31) + 9, "ERR_TOO_BIG");
    assert!(c.closed_by_server(), "huge option");
    let mut c = Raw::connect(&s.sock);
    c.greet();
    c.s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(c.closed_by_server(), "garbage option");
    // A client that connects and says nothing does not block anyone either.
    let _idle = Raw::connect(&s.sock);

    // Through all of that, the first session still works.
    good.request(CMD_WRITE, 0, 77, 4096, 4096, &[5u8; 4096]);
    assert_eq!(good.status(), (0, 77));
    good.request(CMD_READ, 0, 78, 4096, 4096, &[]);
    let ch = good.chunk();
    assert_eq!((ch.kind, ch.handle), (1, 78));
    assert!(ch.payload[8..].iter().all(|&b| b == 5));
    // And a real client can still connect.
    if have("qemu-io") {
        qemu_io(&s.uri(), &["read -P 5 4096 4096"]);
    }
}

#[test]
fn pipelined_requests_are_all_answered() {
    let s = Served::start(16 * MIB);
    let (mut c, _, _) = Raw::open(&s.sock, EXPORT, true, false);
    let n = 200u64;
    let mut batch = Vec::new();
    for h in 0..n {
        let mut m = 0x25609513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&CMD_WRITE.to_be_bytes());
        m.extend_from_slice(&h.to_be_bytes());
        m.extend_from_slice(&(h * 65536).to_be_bytes());
        m.extend_from_slice(&65536u32.to_be_bytes());
        m.extend_from_slice(&vec![h as u8; 65536]);
        batch.extend_from_slice(&m);
    }
    // Write everything from another thread while replies are read here.
    let mut w = c.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&batch).unwrap());
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n {
        let (errno, h) = c.status();
        assert_eq!(errno, 0);
        assert!(seen.insert(h));
    }
    writer.join().unwrap();
    for h in [0, 57, n - 1] {
        assert!(read_range(&s.image, h * 65536, 65536)
            .iter()
            .all(|&b| b == h as u8));
    }
}

/// Writes of every size around the ones received into buffers of their own (256 KiB to
/// 4 MiB, written by another thread, buffers reused for smaller payloads), all in flight
/// together with inline ones and a rejected one, then NBD_CMD_DISC at once: every write is
/// answered before the server closes, each lands exactly where it was sent, and nothing
/// else changes. Against a plain file and a tracked export (whose first writes to a region
/// wait for their write intents).
#[test]
fn large_writes_in_flight_together_land_exactly() {
    large_writes_land_exactly(Served::start(32 * MIB));
    large_writes_land_exactly(Served::start_with(32 * MIB, |image| {
        let bitmap = image.with_extension("cbt");
        let t = TrackedExport::open(FileExport::open(image).unwrap(), &bitmap).unwrap();
        std::sync::Arc::new(t) as std::sync::Arc<dyn Export>
    }));
}

fn large_writes_land_exactly(s: Served) {
    use std::os::unix::fs::FileExt;
    const FLAG_FUA: u16 = 1;
    const KIB: u64 = 1024;
    let size = 32 * MIB;
    let before: Vec<u8> = (0..size).map(|i| (i % 253) as u8 ^ 0xee).collect();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&s.image)
        .unwrap();
    f.write_all_at(&before, 0).unwrap();
    // Lengths, from large to small so that reused buffers are longer than their payload.
    let lens: [u64; 12] = [
        4 * MIB,
        4 * MIB + 4 * KIB,
        2 * MIB,
        MIB + 512,
        MIB,
        300 * KIB,
        512 * KIB,
        256 * KIB,
        256 * KIB - 4 * KIB,
        256 * KIB,
        64 * KIB,
        256 * KIB + 1,
    ];
    let mut want = before.clone();
    let mut batch = Vec::new();
    let mut off = 4096 + 7;
    let request = |kind: u16, flags: u16, h: u64, off: u64, len: u64, data: &[u8]| {
        let mut m = 0x25609513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&h.to_be_bytes());
        m.extend_from_slice(&off.to_be_bytes());
        m.extend_from_slice(&(len as u32).to_be_bytes());
        m.extend_from_slice(data);
        m
    };
    for (h, &len) in lens.iter().enumerate() {
        let data: Vec<u8> = (0..len)
            .map(|i| ((i * 7 + h as u64 * 13) % 251) as u8)
            .collect();
        let flags = if h % 3 == 1 { FLAG_FUA } else { 0 };
        batch.extend_from_slice(&request(CMD_WRITE, flags, h as u64, off, len, &data));
        want[off as usize..(off + len) as usize].copy_from_slice(&data);
        // A gap the writes must leave alone.
        off += len + 8 * KIB + 3;
    }
    assert!(off < size);
    // A large write past the end is refused, its payload skipped, and the next served.
    let refused = lens.len() as u64;
    let past_end = request(
        CMD_WRITE,
        0,
        refused,
        size - 4096,
        512 * KIB,
        &[9; 512 * 1024],
    );
    batch.extend_from_slice(&past_end);
    let last = refused + 1;
    batch.extend_from_slice(&request(CMD_WRITE, 0, last, 0, 4096, &[3; 4096]));
    want[..4096].fill(3);
    batch.extend_from_slice(&request(CMD_DISC, 0, 99, 0, 0, &[]));
    let (mut c, _, _) = Raw::open(&s.sock, EXPORT, true, false);
    let mut w = c.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&batch).unwrap());
    let mut seen = std::collections::HashSet::new();
    for _ in 0..=last {
        let (errno, h) = c.status();
        assert_eq!(errno != 0, h == refused, "reply {errno} to request {h}");
        assert!(seen.insert(h), "two replies to {h}");
    }
    writer.join().unwrap();
    assert!(
        c.closed_by_server(),
        "the server did not close after NBD_CMD_DISC"
    );
    let got = read_range(&s.image, 0, size as usize);
    let first_bad = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(first_bad, None, "the image differs from what was written");
}

#[test]
fn removing_an_export_disconnects_its_clients() {
    let s = Served::start(MIB);
    let (mut c, _, _) = Raw::open(&s.sock, EXPORT, true, false);
    c.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(s.server.export_names(), vec![EXPORT.to_string()]);
    s.server.remove_export(EXPORT).unwrap();
    assert!(c.closed_by_server());
    assert!(s.server.export_names().is_empty());
    assert!(s.server.remove_export(EXPORT).is_err());
    // A new client is told the export is unknown.
    let mut c = Raw::connect(&s.sock);
    c.greet();
    let mut d = (EXPORT.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(EXPORT.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    c.send_option(7, &d);
    assert_eq!(c.option_reply().0, (1 << 31) + 6);
}

/// A file export whose writes take `delay` each: requests a connection has read are
/// still being written well after the client sees the first replies.
struct SlowWrites {
    inner: FileExport,
    delay: Duration,
}

impl Export for SlowWrites {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> std::io::Result<()> {
        std::thread::sleep(self.delay);
        self.inner.write_at(buf, offset, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> std::io::Result<()> {
        self.inner.write_zeroes(offset, len, may_trim)
    }
    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<Vec<blocksnap::nbd::Extent>> {
        self.inner.block_status(offset, len)
    }
}

#[test]
fn removing_an_export_returns_once_its_connections_stopped_writing() {
    const WRITES: u64 = 20;
    let s = Served::start_with(MIB, |path| {
        std::sync::Arc::new(SlowWrites {
            inner: FileExport::open(path).unwrap(),
            delay: Duration::from_millis(20),
        }) as std::sync::Arc<dyn Export>
    });
    let (mut c, _, _) = Raw::open(&s.sock, EXPORT, false, false);
    c.s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // Writes of 4 KiB to one place, each with its own byte, sent at once: the server has
    // read them all when the export is removed after the first reply, and each one still
    // to be written changes the image.
    let mut batch = Vec::new();
    for h in 0..WRITES {
        batch.extend_from_slice(&0x25609513u32.to_be_bytes());
        batch.extend_from_slice(&0u16.to_be_bytes());
        batch.extend_from_slice(&CMD_WRITE.to_be_bytes());
        batch.extend_from_slice(&h.to_be_bytes());
        batch.extend_from_slice(&0u64.to_be_bytes());
        batch.extend_from_slice(&4096u32.to_be_bytes());
        batch.extend(std::iter::repeat_n(h as u8 + 1, 4096));
    }
    c.s.write_all(&batch).unwrap();
    assert_eq!(c.simple_reply(), (0, 0));
    s.server.remove_export(EXPORT).unwrap();
    let at_return = read_range(&s.image, 0, 4096);
    // Every write read before the removal is answered, then the server closes.
    for h in 1..WRITES {
        assert_eq!(c.simple_reply(), (0, h));
    }
    assert!(c.closed_by_server());
    assert_eq!(
        at_return,
        vec![WRITES as u8; 4096],
        "remove_export returned before the writes its connection had read were done"
    );
}

#[test]
fn shutdown_answers_in_flight_requests_then_disconnects() {
    let mut s = Served::start(MIB);
    let (mut c, _, _) = Raw::open(&s.sock, EXPORT, true, false);
    let mut idle = Raw::connect(&s.sock);
    idle.greet();
    c.request(CMD_WRITE, 0, 1, 0, 4096, &[3u8; 4096]);
    assert_eq!(c.status(), (0, 1));
    let started = std::time::Instant::now();
    s.stop();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "serve_unix returned promptly"
    );
    assert!(c.closed_by_server());
    assert!(idle.closed_by_server());
    assert!(std::os::unix::net::UnixStream::connect(&s.sock)
        .map(|mut x| {
            let mut b = [0u8; 1];
            matches!(std::io::Read::read(&mut x, &mut b), Ok(0) | Err(_))
        })
        .unwrap_or(true));
}

#[test]
fn a_hundred_sessions_at_once() {
    let s = Served::start(16 * MIB);
    let sock = s.sock.clone();
    // All connected before any of them does I/O, so they really overlap.
    let sessions: Vec<Raw> = (0..100)
        .map(|_| Raw::open(&sock, EXPORT, true, false).0)
        .collect();
    let workers: Vec<_> = sessions
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            std::thread::spawn(move || {
                let off = i as u64 * 65536;
                c.request(CMD_WRITE, FLAG_FUA, 1, off, 65536, &vec![i as u8; 65536]);
                assert_eq!(c.status(), (0, 1));
                c.request(CMD_READ, 0, 2, off, 65536, &[]);
                let mut got = Vec::new();
                loop {
                    let ch = c.chunk();
                    if ch.kind == 1 {
                        got.extend_from_slice(&ch.payload[8..]);
                    }
                    if ch.flags & 1 != 0 {
                        break;
                    }
                }
                assert!(got.len() == 65536 && got.iter().all(|&b| b == i as u8));
                c.request(CMD_DISC, 0, 3, 0, 0, &[]);
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

#[test]
fn read_only_export_answers_eperm() {
    let s = Served::start_with(MIB, |image| {
        std::sync::Arc::new(blocksnap::nbd::FileExport::open_read_only(image).unwrap())
    });
    let (mut c, _, flags) = Raw::open(&s.sock, EXPORT, true, false);
    assert_ne!(flags & 2, 0, "NBD_FLAG_READ_ONLY");
    c.request(CMD_WRITE, 0, 1, 0, 512, &[1u8; 512]);
    assert_eq!(c.status(), (1, 1));
    c.request(CMD_WRITE_ZEROES, 0, 2, 0, 512, &[]);
    assert_eq!(c.status(), (1, 2));
    c.request(CMD_FLUSH, 0, 3, 0, 0, &[]);
    assert_eq!(c.status(), (0, 3));
}

/// Large reads are sent by splice, straight from the page cache: simple and structured
/// replies (with and without DF), page-aligned or not, over data, over a hole (which a
/// structured reply without DF describes with hole chunks) and larger than the splice pipe,
/// all pipelined on one connection. Every reply is whole and every byte the image's.
#[test]
fn large_reads_are_exact_in_every_reply_form() {
    use std::os::unix::fs::FileExt;
    const FLAG_DF: u16 = 1 << 2;
    let s = Served::start(8 * MIB);
    let image: Vec<u8> = (0..6 * MIB).map(|i| (i * 31 % 251) as u8).collect();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&s.image)
        .unwrap();
    f.write_all_at(&image, 0).unwrap();
    let want = |off: u64, len: u64| -> Vec<u8> {
        (off..off + len)
            .map(|i| image.get(i as usize).copied().unwrap_or(0))
            .collect()
    };
    let cases: [(u64, u64); 6] = [
        (0, MIB),
        (3 * 4096 + 5, MIB - 7),
        (65536, 65536),
        (5 * MIB + MIB / 2, MIB),
        (7 * MIB, MIB),
        (0, 4 * MIB),
    ];
    let offsets: Vec<u64> = cases.iter().map(|c| c.0).collect();
    for (structured, df) in [(false, false), (true, false), (true, true)] {
        let (mut c, _, _) = Raw::open(&s.sock, EXPORT, structured, false);
        let flags = if df { FLAG_DF } else { 0 };
        for (h, &(off, len)) in cases.iter().enumerate() {
            c.request(CMD_READ, flags, h as u64, off, len as u32, &[]);
        }
        // Replies come in any order, each whole.
        let mut seen = vec![false; cases.len()];
        for _ in 0..cases.len() {
            let (handle, got) = if structured {
                read_structured(&mut c, df, &offsets)
            } else {
                let (errno, handle) = c.simple_reply();
                assert_eq!(errno, 0);
                let len = cases[handle as usize].1 as usize;
                let mut got = vec![0u8; len];
                std::io::Read::read_exact(&mut c.s, &mut got).unwrap();
                (handle, got)
            };
            let (off, len) = cases[handle as usize];
            assert!(!seen[handle as usize], "two replies to {handle}");
            seen[handle as usize] = true;
            assert!(
                got == want(off, len),
                "read {len} at {off} (structured {structured}, df {df}): other bytes"
            );
        }
        c.request(CMD_DISC, 0, 99, 0, 0, &[]);
    }
}

/// The chunks of one structured READ reply, assembled: (handle, bytes from `offsets[handle]`).
fn read_structured(c: &mut Raw, df: bool, offsets: &[u64]) -> (u64, Vec<u8>) {
    let mut got: Vec<u8> = Vec::new();
    let mut handle = None;
    loop {
        let ch = c.chunk();
        assert_eq!(
            *handle.get_or_insert(ch.handle),
            ch.handle,
            "interleaved replies"
        );
        let rel = || {
            let off = u64::from_be_bytes(ch.payload[..8].try_into().unwrap());
            (off - offsets[ch.handle as usize]) as usize
        };
        let (rel, data) = match ch.kind {
            1 => (rel(), &ch.payload[8..]),
            2 => {
                assert!(!df, "a hole chunk despite DF");
                let len = u32::from_be_bytes(ch.payload[8..12].try_into().unwrap()) as usize;
                if got.len() < rel() + len {
                    got.resize(rel() + len, 0);
                }
                (0, &[][..])
            }
            0 => (0, &[][..]),
            k => panic!("unexpected chunk type {k:#x}"),
        };
        if got.len() < rel + data.len() {
            got.resize(rel + data.len(), 0);
        }
        got[rel..rel + data.len()].copy_from_slice(data);
        if ch.flags & 1 != 0 {
            return (handle.unwrap_or_default(), got);
        }
    }
}
