//! TEMP STUB
#![allow(dead_code, unused_variables)]
use std::path::Path;
use std::sync::Arc;
pub trait Export: Send + Sync + 'static {}
pub struct FileExport;
impl FileExport {
    pub fn open(p: &Path) -> std::io::Result<FileExport> {
        Ok(FileExport)
    }
}
impl Export for FileExport {}
#[derive(Clone)]
pub struct NbdServer;
impl NbdServer {
    pub fn new() -> NbdServer {
        NbdServer
    }
    pub fn add_export(&self, n: &str, e: Arc<dyn Export>) {}
    pub fn remove_export(&self, n: &str) {}
    pub async fn serve_unix(
        &self,
        l: tokio::net::UnixListener,
        s: impl std::future::Future<Output = ()>,
    ) {
        s.await
    }
}
pub fn nbd_uri(export: &str, socket: &Path) -> String {
    String::new()
}
