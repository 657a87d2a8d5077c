//! Measures how long `TrackedExport::finish_epoch` stalls concurrent writers:
//! `cargo run --release --example epoch_stall [DIR] [ROUNDS]`.
//!
//! Two writer threads write 64 KiB at pseudo-random offsets in the first 64 MiB of a 512 MiB
//! sparse image (in
//! DIR, default the system temp dir: use a real disk, the stall comes from `fdatasync`
//! under writeback load) while the main thread runs ROUNDS snapshot epochs: start, read a
//! few point-in-time blocks, finish (commit). For every finish it reports how long it took,
//! how long it held writers (the state lock, as `finish_epoch_timed` measures it) and the
//! longest write that overlapped it, and, as the noise floor, the longest write that
//! overlapped no epoch switch or finish.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blocksnap::nbd::{EpochScope, Export, FileExport, TrackedExport};

const SIZE: u64 = 512 << 20;
const WRITE: usize = 64 << 10;
/// Writes go to the first 64 MiB (64 intent regions), so after the first round writers
/// rarely need a write-intent sync of their own and the stall stands out from the floor.
const HOT: u64 = 64 << 20;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let base = args
        .get(1)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let rounds: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(30);
    let dir = tempfile::tempdir_in(&base)?;
    let image = FileExport::create(&dir.path().join("img"), SIZE)?;
    let t = Arc::new(TrackedExport::open(image, &dir.path().join("cbt"))?);
    let stop = Arc::new(AtomicBool::new(false));
    // (start, end) of every write, per writer.
    let spans: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (t, stop, spans) = (Arc::clone(&t), Arc::clone(&stop), Arc::clone(&spans));
            std::thread::spawn(move || -> std::io::Result<()> {
                let buf = vec![0x5a ^ w as u8; WRITE];
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ w;
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = (x % (HOT / WRITE as u64)) * WRITE as u64;
                    let s = Instant::now();
                    t.write_at(&buf, off, false)?;
                    mine.push((s, Instant::now()));
                }
                spans
                    .lock()
                    .map_err(|_| std::io::Error::other("poisoned"))?
                    .extend(mine);
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut busy: Vec<(Instant, Instant)> = Vec::new();
    let mut finishes: Vec<(Instant, Instant)> = Vec::new();
    let mut held = Vec::new();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for i in 0..rounds {
        let spill = dir.path().join(format!("spill{i}"));
        let s = Instant::now();
        let ranges = t.start_epoch(EpochScope::Dirty, &spill)?;
        busy.push((s, Instant::now()));
        for r in ranges.iter().take(16) {
            t.read_snapshot_block(r.offset)?;
        }
        std::thread::sleep(Duration::from_millis(100));
        let s = Instant::now();
        let (_, h) = t.finish_epoch_timed(true)?;
        let e = Instant::now();
        held.push(ms(h));
        busy.push((s, e));
        finishes.push((s, e));
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join()
            .map_err(|_| anyhow::anyhow!("a writer panicked"))??;
    }
    let spans = spans.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let overlaps = |a: &(Instant, Instant), b: &(Instant, Instant)| a.0 < b.1 && b.0 < a.1;
    let mut took = Vec::new();
    let mut stall = Vec::new();
    for f in &finishes {
        took.push(ms(f.1 - f.0));
        let worst = spans
            .iter()
            .filter(|w| overlaps(w, f))
            .map(|w| ms(w.1 - w.0))
            .fold(0.0, f64::max);
        stall.push(worst);
    }
    let floor = spans
        .iter()
        .filter(|w| !busy.iter().any(|b| overlaps(w, b)))
        .map(|w| ms(w.1 - w.0))
        .fold(0.0, f64::max);
    let summary = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        format!(
            "median {:.2} ms, p90 {:.2} ms, max {:.2} ms",
            v[v.len() / 2],
            v[v.len() * 9 / 10],
            v[v.len() - 1]
        )
    };
    println!("writes: {}, epochs: {rounds}", spans.len());
    println!(
        "finish_epoch duration:               {}",
        summary(&mut took)
    );
    println!(
        "writers held by finish_epoch:        {}",
        summary(&mut held)
    );
    println!(
        "longest write overlapping a finish:  {}",
        summary(&mut stall)
    );
    println!("longest write outside epoch switches: {floor:.2} ms");
    Ok(())
}
