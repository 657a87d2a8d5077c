//! Serves one file over NBD on a unix socket until Ctrl-C, for manual tests and benchmarks:
//! `nbd_serve IMAGE SOCKET NAME [BITMAP]` — with BITMAP, writes are tracked by a
//! `TrackedExport` whose write-intent bitmap lives there.

use std::path::Path;
use std::sync::Arc;

use blocksnap::nbd::{Export, FileExport, NbdServer, TrackedExport};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 4 || args.len() == 5,
        "usage: nbd_serve IMAGE SOCKET NAME [BITMAP]"
    );
    let file = FileExport::open(Path::new(&args[1]))?;
    let mut tracked = None;
    let export: Arc<dyn Export> = match args.get(4) {
        Some(bitmap) => {
            let t = Arc::new(TrackedExport::open(file, Path::new(bitmap))?);
            eprintln!("bitmap recovery: {:?}", t.recovery());
            tracked = Some(Arc::clone(&t));
            t
        }
        None => Arc::new(file),
    };
    let server = NbdServer::new();
    server.add_export(&args[3], export)?;
    let _ = std::fs::remove_file(&args[2]);
    let listener = tokio::net::UnixListener::bind(&args[2])?;
    eprintln!("{}", blocksnap::nbd::nbd_uri(&args[3], Path::new(&args[2])));
    server
        .serve_unix(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    server.remove_export(&args[3])?;
    if let Some(t) = tracked {
        t.close()?;
    }
    Ok(())
}
