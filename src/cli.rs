//! The `blocksnap` control command: QingCloud's `iaas` verbs and short flags, turned into
//! typed `crate::api` requests, sent with `crate::client`, printed as JSON or a table.
//!
//! It depends on `api` and `client` only. The exit status is 0 exactly when the printed
//! response's `ret_code` is 0.

mod output;
mod wait;

pub use output::{exit_code, render_table};

use crate::api::{self, parse_size, split_list, Request, Size};
use crate::client;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// Where the daemon listens unless `--socket` or `BLOCKSNAP_SOCKET` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/blocksnap/blocksnap.sock";

/// The control command of the blocksnap snapshot daemon.
///
/// Verbs and flags are those of `qingcloud iaas <verb>`; lists are comma-separated; sizes
/// are a number of GiB or a number with a binary suffix (64M, 10G, 1T).
#[derive(Debug, Parser)]
#[command(name = "blocksnap", version, infer_long_args = true)]
pub struct Cli {
    /// The daemon's control socket.
    #[arg(long, env = "BLOCKSNAP_SOCKET", default_value = DEFAULT_SOCKET, global = true, help_heading = "Global options")]
    pub socket: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Json, global = true, help_heading = "Global options")]
    pub output: Output,
    /// Block until the job the call started has ended (progress on stderr when it is a
    /// terminal); a failed job makes the command exit non-zero.
    #[arg(long, global = true, help_heading = "Global options")]
    pub wait: bool,
    /// Zone, for QingCloud compatibility; must equal the daemon's zone if given.
    #[arg(
        short = 'z',
        long = "zone",
        global = true,
        help_heading = "Global options"
    )]
    pub zone: Option<String>,
    /// Accepted for QingCloud compatibility (its access-key file) and ignored: the socket's
    /// permissions decide who may do what.
    #[arg(
        short = 'f',
        long = "config",
        global = true,
        value_name = "CONF_FILE",
        help_heading = "Global options"
    )]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub verb: Verb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// The daemon's JSON response (for scripts and jq).
    Json,
    /// An aligned table of the result sets (for people).
    Table,
}

#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Create sparse volume image(s); starts a job and returns `volumes`.
    #[command(after_help = "Example: blocksnap create-volumes -s 64M -N test-snap --wait")]
    CreateVolumes(CreateVolumesArgs),
    /// List volumes (`volume_set`, `total_count`).
    #[command(after_help = "Example: blocksnap describe-volumes -v vol-kihuzzei -o table")]
    DescribeVolumes(DescribeVolumesArgs),
    /// Attach volumes: a /dev/loopN appears (loop) or the NBD export starts (nbd).
    #[command(after_help = "Example: blocksnap attach-volumes -v vol-kihuzzei --wait")]
    AttachVolumes(VolumesArgs),
    /// Detach volumes; refused while a filesystem from them is mounted.
    #[command(after_help = "Example: blocksnap detach-volumes -v vol-kihuzzei")]
    DetachVolumes(VolumesArgs),
    /// Grow volumes to a new size.
    #[command(after_help = "Example: blocksnap resize-volumes -v vol-kihuzzei -s 20G --wait")]
    ResizeVolumes(ResizeVolumesArgs),
    /// Delete volumes; refused while attached. Their snapshots survive.
    #[command(after_help = "Example: blocksnap delete-volumes -v vol-kihuzzei")]
    DeleteVolumes(VolumesArgs),
    /// Snapshot volumes (filesystem-consistent when mounted); starts a job, returns `snapshots`.
    #[command(
        after_help = "Example: blocksnap create-snapshots -r vol-df3m8oal -F 1 -N full-snap --wait"
    )]
    CreateSnapshots(CreateSnapshotsArgs),
    /// List snapshots (`snapshot_set`, `total_count`).
    #[command(after_help = "Example: blocksnap describe-snapshots -r vol-df3m8oal -o table")]
    DescribeSnapshots(DescribeSnapshotsArgs),
    /// Delete snapshots, also ones in the middle of a chain.
    #[command(after_help = "Example: blocksnap delete-snapshots -s ss-umocjmc3")]
    DeleteSnapshots(SnapshotsArgs),
    /// Create a new volume holding a snapshot's point-in-time image; returns `volume_id`.
    #[command(
        after_help = "Example: blocksnap create-volume-from-snapshot -s ss-umocjmc3 -N restore-2 --wait"
    )]
    CreateVolumeFromSnapshot(CreateVolumeFromSnapshotArgs),
    /// Roll volumes back in place to snapshots (the volume must not be mounted).
    #[command(after_help = "Example: blocksnap apply-snapshots -s ss-umocjmc3 --wait")]
    ApplySnapshots(SnapshotsArgs),
    /// Rename a snapshot or change its description.
    #[command(
        after_help = "Example: blocksnap modify-snapshot-attributes -s ss-umocjmc3 -N before-upgrade"
    )]
    ModifySnapshotAttributes(ModifySnapshotAttributesArgs),
    /// Re-read each snapshot's chain and check every checksum; starts a job.
    #[command(after_help = "Example: blocksnap verify-snapshots -s ss-umocjmc3 --wait")]
    VerifySnapshots(SnapshotsArgs),
    /// List jobs (`job_set`).
    #[command(after_help = "Example: blocksnap describe-jobs -j j-9ebq2zp5sm3 -o table")]
    DescribeJobs(DescribeJobsArgs),
    /// Print the daemon's Prometheus metrics (GET /metrics).
    #[command(after_help = "Example: blocksnap metrics")]
    Metrics,
}

/// A size as typed, checked on the command line and sent as typed for the daemon to parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeArg {
    pub text: String,
    pub bytes: u64,
}

fn size_arg(text: &str) -> Result<SizeArg, String> {
    Ok(SizeArg {
        text: text.trim().to_string(),
        bytes: parse_size(text)?,
    })
}

/// A comma-separated list; the flag may also be repeated.
fn list(values: &[String]) -> Vec<String> {
    values.iter().flat_map(|v| split_list(v)).collect()
}

#[derive(Debug, Args)]
pub struct CreateVolumesArgs {
    /// Size: GiB, or a number with a suffix (64M, 10G, 1T).
    #[arg(short = 's', long, value_parser = size_arg)]
    pub size: SizeArg,
    /// Name of the new volume(s).
    #[arg(short = 'N', long, alias = "volume_name")]
    pub volume_name: Option<String>,
    /// How many volumes to create (default 1).
    #[arg(short = 'c', long)]
    pub count: Option<u32>,
    /// How the volume is exposed (default from the daemon's config).
    #[arg(long, value_parser = ["loop", "nbd"])]
    pub backend: Option<String>,
}

#[derive(Debug, Args)]
pub struct DescribeVolumesArgs {
    /// Volume ids, comma-separated.
    #[arg(short = 'v', long)]
    pub volumes: Vec<String>,
    /// Only volumes in these states (pending, available, in-use, deleted).
    #[arg(short = 's', long)]
    pub status: Vec<String>,
    /// Only volumes whose id or name contains this.
    #[arg(short = 'W', long, alias = "search_word")]
    pub search_word: Option<String>,
    /// Skip this many results.
    #[arg(short = 'O', long)]
    pub offset: Option<u64>,
    /// Return at most this many results.
    #[arg(short = 'L', long)]
    pub limit: Option<u64>,
}

#[derive(Debug, Args)]
pub struct VolumesArgs {
    /// Volume ids, comma-separated.
    #[arg(short = 'v', long, required = true)]
    pub volumes: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ResizeVolumesArgs {
    /// Volume ids, comma-separated.
    #[arg(short = 'v', long, required = true)]
    pub volumes: Vec<String>,
    /// New size: GiB, or a number with a suffix (64M, 10G, 1T). Grow only.
    #[arg(short = 's', long, value_parser = size_arg)]
    pub size: SizeArg,
}

#[derive(Debug, Args)]
pub struct CreateSnapshotsArgs {
    /// Volume ids to snapshot, comma-separated.
    #[arg(short = 'r', long, required = true)]
    pub resources: Vec<String>,
    /// 1: full snapshot; 0: the daemon decides (incremental on the active chain).
    #[arg(short = 'F', long, value_parser = clap::value_parser!(u8).range(0..=1),
          num_args = 0..=1, default_missing_value = "1")]
    pub is_full: Option<u8>,
    /// Name of the new snapshot(s).
    #[arg(short = 'N', long, alias = "name")]
    pub snapshot_name: Option<String>,
    /// Take a crash-consistent snapshot even while processes hold the device open for writing.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct DescribeSnapshotsArgs {
    /// Snapshot ids, comma-separated.
    #[arg(short = 'n', long)]
    pub snapshots: Vec<String>,
    /// Only snapshots of this volume.
    #[arg(short = 'r', long)]
    pub resource: Option<String>,
    /// 1: full snapshots only; 0: incremental only.
    #[arg(short = 't', long, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub snapshot_type: Option<u8>,
    /// Only snapshots in these states (pending, available, deleted).
    #[arg(short = 's', long)]
    pub status: Vec<String>,
    /// Only snapshots whose id or name contains this.
    #[arg(short = 'W', long)]
    pub search_word: Option<String>,
    /// 1: verbose output.
    #[arg(short = 'V', long, value_parser = clap::value_parser!(u8).range(0..=1),
          num_args = 0..=1, default_missing_value = "1")]
    pub verbose: Option<u8>,
    /// Skip this many results.
    #[arg(short = 'O', long)]
    pub offset: Option<u64>,
    /// Return at most this many results.
    #[arg(short = 'L', long)]
    pub limit: Option<u64>,
}

#[derive(Debug, Args)]
pub struct SnapshotsArgs {
    /// Snapshot ids, comma-separated.
    #[arg(short = 's', long, required = true)]
    pub snapshots: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CreateVolumeFromSnapshotArgs {
    /// The snapshot whose point-in-time image the new volume holds.
    #[arg(short = 's', long)]
    pub snapshot: String,
    /// Name of the new volume.
    #[arg(short = 'N', long)]
    pub volume_name: Option<String>,
    /// How the new volume is exposed (default from the daemon's config).
    #[arg(long, value_parser = ["loop", "nbd"])]
    pub backend: Option<String>,
    /// Fill the new volume from the store on first read instead of copying it up front.
    #[arg(long)]
    pub lazy: bool,
}

#[derive(Debug, Args)]
pub struct ModifySnapshotAttributesArgs {
    /// The snapshot to change.
    #[arg(short = 's', long)]
    pub snapshot: String,
    /// New name.
    #[arg(short = 'N', long, alias = "name")]
    pub snapshot_name: Option<String>,
    /// New description.
    #[arg(short = 'D', long)]
    pub description: Option<String>,
}

#[derive(Debug, Args)]
pub struct DescribeJobsArgs {
    /// Job ids, comma-separated.
    #[arg(short = 'j', long)]
    pub jobs: Vec<String>,
    /// Only jobs in these states (pending, working, successful, failed).
    #[arg(short = 's', long)]
    pub status: Vec<String>,
    /// Skip this many results.
    #[arg(short = 'O', long)]
    pub offset: Option<u64>,
    /// Return at most this many results.
    #[arg(short = 'L', long)]
    pub limit: Option<u64>,
}

impl Verb {
    /// The typed request for this verb (`None` for `metrics`, which is not an API action).
    pub fn to_request(&self, zone: Option<String>) -> Option<Request> {
        Some(match self {
            Verb::CreateVolumes(a) => Request::CreateVolumes(api::CreateVolumes {
                zone,
                size: Some(Size(a.size.bytes)),
                volume_name: a.volume_name.clone(),
                count: a.count,
                backend: a.backend.clone(),
            }),
            Verb::DescribeVolumes(a) => Request::DescribeVolumes(api::DescribeVolumes {
                zone,
                volumes: list(&a.volumes),
                status: list(&a.status),
                search_word: a.search_word.clone(),
                offset: a.offset,
                limit: a.limit,
            }),
            Verb::AttachVolumes(a) => Request::AttachVolumes(api::AttachVolumes {
                zone,
                volumes: list(&a.volumes),
            }),
            Verb::DetachVolumes(a) => Request::DetachVolumes(api::DetachVolumes {
                zone,
                volumes: list(&a.volumes),
            }),
            Verb::ResizeVolumes(a) => Request::ResizeVolumes(api::ResizeVolumes {
                zone,
                volumes: list(&a.volumes),
                size: Some(Size(a.size.bytes)),
            }),
            Verb::DeleteVolumes(a) => Request::DeleteVolumes(api::DeleteVolumes {
                zone,
                volumes: list(&a.volumes),
            }),
            Verb::CreateSnapshots(a) => Request::CreateSnapshots(api::CreateSnapshots {
                zone,
                resources: list(&a.resources),
                is_full: a.is_full,
                snapshot_name: a.snapshot_name.clone(),
                force: a.force,
            }),
            Verb::DescribeSnapshots(a) => Request::DescribeSnapshots(api::DescribeSnapshots {
                zone,
                snapshots: list(&a.snapshots),
                resource_id: a.resource.clone(),
                snapshot_type: a.snapshot_type,
                status: list(&a.status),
                search_word: a.search_word.clone(),
                verbose: a.verbose,
                offset: a.offset,
                limit: a.limit,
            }),
            Verb::DeleteSnapshots(a) => Request::DeleteSnapshots(api::DeleteSnapshots {
                zone,
                snapshots: list(&a.snapshots),
            }),
            Verb::CreateVolumeFromSnapshot(a) => {
                Request::CreateVolumeFromSnapshot(api::CreateVolumeFromSnapshot {
                    zone,
                    snapshot: Some(a.snapshot.clone()),
                    volume_name: a.volume_name.clone(),
                    backend: a.backend.clone(),
                    lazy: a.lazy,
                })
            }
            Verb::ApplySnapshots(a) => Request::ApplySnapshots(api::ApplySnapshots {
                zone,
                snapshots: list(&a.snapshots),
            }),
            Verb::ModifySnapshotAttributes(a) => {
                Request::ModifySnapshotAttributes(api::ModifySnapshotAttributes {
                    zone,
                    snapshot: Some(a.snapshot.clone()),
                    snapshot_name: a.snapshot_name.clone(),
                    description: a.description.clone(),
                })
            }
            Verb::VerifySnapshots(a) => Request::VerifySnapshots(api::VerifySnapshots {
                zone,
                snapshots: list(&a.snapshots),
            }),
            Verb::DescribeJobs(a) => Request::DescribeJobs(api::DescribeJobs {
                zone,
                jobs: list(&a.jobs),
                status: list(&a.status),
                offset: a.offset,
                limit: a.limit,
            }),
            Verb::Metrics => return None,
        })
    }

    /// The size exactly as the user typed it, for verbs that take one.
    fn size_text(&self) -> Option<&str> {
        match self {
            Verb::CreateVolumes(a) => Some(&a.size.text),
            Verb::ResizeVolumes(a) => Some(&a.size.text),
            _ => None,
        }
    }
}

impl Cli {
    /// The wire body for this command line (`None` for `metrics`).
    ///
    /// Sizes go on the wire as the string the user typed: a bare number on the wire means
    /// GiB, so sending the parsed byte count would be misread.
    pub fn to_body(&self) -> Option<serde_json::Value> {
        let mut body = self.verb.to_request(self.zone.clone())?.to_body();
        if let (Some(text), serde_json::Value::Object(map)) = (self.verb.size_text(), &mut body) {
            map.insert("size".into(), text.into());
        }
        Some(body)
    }
}

/// What the command prints and how it exits.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A QingCloud-shaped response (from the daemon, or made here for a client-side error).
    Response(serde_json::Value),
    /// Raw text (metrics), exit 0.
    Text(String),
}

/// Runs a parsed command line to its outcome.
pub async fn run(cli: &Cli) -> Outcome {
    let Some(body) = cli.to_body() else {
        return match client::get(&cli.socket, "/metrics").await {
            Ok(text) => Outcome::Text(text),
            Err(e) => Outcome::Response(e.to_response("Metrics")),
        };
    };
    let action = body["action"].as_str().unwrap_or_default().to_string();
    let response = match client::call(&cli.socket, &body).await {
        Ok(r) => r,
        Err(e) => return Outcome::Response(e.to_response(&action)),
    };
    if cli.wait && exit_code(&response) == 0 {
        if let Some(job_id) = response.get("job_id").and_then(|j| j.as_str()) {
            let job_id = job_id.to_string();
            if let Err(failure) = wait::wait_for_job(cli, &action, &job_id).await {
                return Outcome::Response(failure);
            }
        }
    }
    Outcome::Response(response)
}

/// The `blocksnap` program: parse, run, print, exit.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let failure = api::ApiError::internal(format!("Cannot start the async runtime: {e}"));
            emit(&failure.to_response("").to_string());
            return ExitCode::FAILURE;
        }
    };
    let (text, success) = match runtime.block_on(run(&cli)) {
        Outcome::Text(text) => (text, true),
        Outcome::Response(value) => {
            let text = match cli.output {
                Output::Json => {
                    serde_json::to_string_pretty(&value).unwrap_or_else(|_| value.to_string())
                }
                Output::Table => render_table(&value),
            };
            (text, exit_code(&value) == 0)
        }
    };
    // A reader that went away (`| head`) is not worth a panic, but the output was lost.
    if emit(&text) && success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Writes `text` and a final newline to stdout; false when stdout is gone.
fn emit(text: &str) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", text.trim_end())
        .and_then(|()| out.flush())
        .is_ok()
}

#[cfg(test)]
mod tests;
