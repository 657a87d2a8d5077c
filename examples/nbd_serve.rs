//! Serves one file over NBD on a unix socket until Ctrl-C: `nbd_serve IMAGE SOCKET NAME`.
//! For manual testing and benchmarks with real clients.

use std::sync::Arc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 4, "usage: nbd_serve IMAGE SOCKET NAME");
    let export = blocksnap::nbd::FileExport::open(std::path::Path::new(&args[1]))?;
    let server = blocksnap::nbd::NbdServer::new();
    server.add_export(&args[3], Arc::new(export))?;
    let _ = std::fs::remove_file(&args[2]);
    let listener = tokio::net::UnixListener::bind(&args[2])?;
    eprintln!(
        "{}",
        blocksnap::nbd::nbd_uri(&args[3], std::path::Path::new(&args[2]))
    );
    server
        .serve_unix(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    Ok(())
}
