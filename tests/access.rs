//! Who may call what, and what hostile ids and names can reach.
//!
//! - The control socket gets the configured mode and group; the NBD socket only lets root and
//!   `admin_group` in (it does not check peer credentials itself).
//! - Peer credentials, tested as other uids through `setpriv`: root and `admin_group` (primary
//!   or supplementary) may do everything, `reader_group` only `describe-*`, anyone else gets
//!   1400 — also for a malformed body and for `GET /metrics`. `owner` is the caller's name.
//! - Ids that try to leave the state dir (`../x`, `vol-../../etc`, `ss-%2e%2e`, absolute
//!   paths, NUL, 100 KB, look-alikes, ids of the wrong kind) get 1100 in every verb that takes
//!   ids, alone or beside a valid id, and nothing inside or outside the state dir changes.
//! - Names and descriptions are opaque labels: path-like and odd unicode ones are stored and
//!   returned byte for byte and never become a path; control characters (NUL included), lone
//!   surrogates and over-long ones get 1100.

mod common;

use common::{have_tool, root_or_skip, Daemon};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const ADMIN_GROUP: (&str, u32) = ("staff", 50);
const READER_GROUP: (&str, u32) = ("backup", 34);
const SOCKET_GROUP: (&str, u32) = ("users", 100);
/// A uid with a name (`nobody`) and one without.
const NAMED_UID: (&str, u32) = ("nobody", 65534);
const STRANGER: u32 = 4242;

/// The groups this test configures must exist with the gids it expects.
fn groups_exist() -> bool {
    for (name, gid) in [ADMIN_GROUP, READER_GROUP, SOCKET_GROUP, ("nogroup", 65534)] {
        let found = nix::unistd::Group::from_name(name)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw());
        if found != Some(gid) {
            assert!(
                std::env::var("BLOCKSNAP_REQUIRE_ROOT_TESTS").as_deref() != Ok("1"),
                "group {name} should have gid {gid}, has {found:?}"
            );
            eprintln!("SKIPPED: group {name} is not gid {gid} on this host");
            return false;
        }
    }
    true
}

/// Lets other uids reach the daemon's sockets (the temp dirs are 0700).
fn open_dirs(d: &Daemon) {
    for dir in [d.dir.path().to_path_buf(), d.dir.path().join("run")] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
}

/// One caller identity for `setpriv`.
struct As {
    uid: u32,
    gid: u32,
    groups: &'static [u32],
}

impl As {
    fn setpriv(&self) -> Command {
        let mut c = Command::new("setpriv");
        c.arg("--reuid")
            .arg(self.uid.to_string())
            .arg("--regid")
            .arg(self.gid.to_string());
        if self.groups.is_empty() {
            c.arg("--clear-groups");
        } else {
            let list: Vec<String> = self.groups.iter().map(u32::to_string).collect();
            c.arg("--groups").arg(list.join(","));
        }
        c
    }

    /// Runs `blocksnap ARGS` as this caller; the exit status must match `ret_code`.
    fn call(&self, d: &Daemon, args: &[&str]) -> Value {
        let out = self
            .setpriv()
            .arg(env!("CARGO_BIN_EXE_blocksnap"))
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .output()
            .expect("setpriv");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?}: not JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(out.status.success(), v["ret_code"] == 0, "{args:?}: {v}");
        v
    }

    fn code(&self, d: &Daemon, args: &[&str]) -> i64 {
        self.call(d, args)["ret_code"].as_i64().unwrap_or(-1)
    }

    /// `curl` as this caller: (HTTP status, body).
    fn curl(&self, socket: &Path, extra: &[&str], url: &str) -> (String, String) {
        let out = self
            .setpriv()
            .args(["curl", "-s", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(socket)
            .args(extra)
            .arg(url)
            .output()
            .expect("setpriv curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        (status.to_string(), body.to_string())
    }

    /// Whether this caller may connect to `socket` at all.
    fn can_connect(&self, socket: &Path) -> bool {
        let out = self
            .setpriv()
            .args(["/usr/bin/python3", "-c"])
            .arg("import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect(sys.argv[1]); print('ok')\nexcept PermissionError: print('denied')\n")
            .arg(socket)
            .output()
            .expect("setpriv python3");
        match String::from_utf8_lossy(&out.stdout).trim() {
            "ok" => true,
            "denied" => false,
            other => panic!(
                "cannot tell whether uid {} may connect to {}: {other}{}",
                self.uid,
                socket.display(),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
}

#[test]
fn sockets_get_the_configured_mode_and_group() {
    if !root_or_skip("sockets_get_the_configured_mode_and_group")
        || !have_tool("setpriv")
        || !have_tool("/usr/bin/python3")
        || !groups_exist()
    {
        return;
    }
    let d = Daemon::start(&format!(
        "socket_mode = \"0660\"\nsocket_group = \"{}\"\nadmin_group = \"{}\"\nreader_group = \"{}\"\n",
        SOCKET_GROUP.0, ADMIN_GROUP.0, READER_GROUP.0
    ));
    open_dirs(&d);
    let control = std::fs::metadata(&d.socket).expect("control socket");
    assert_eq!(control.permissions().mode() & 0o7777, 0o660);
    assert_eq!((control.uid(), control.gid()), (0, SOCKET_GROUP.1));
    let nbd_path = d.socket.with_file_name("nbd.sock");
    let nbd = std::fs::metadata(&nbd_path).expect("nbd socket");
    assert_eq!(nbd.permissions().mode() & 0o7777, 0o660);
    assert_eq!((nbd.uid(), nbd.gid()), (0, ADMIN_GROUP.1), "nbd.sock");

    // The socket's group decides who can connect at all...
    let outsider = As {
        uid: STRANGER,
        gid: STRANGER,
        groups: &[],
    };
    assert!(!outsider.can_connect(&d.socket));
    let v = outsider.call(&d, &["describe-volumes"]);
    assert_eq!(v["ret_code"], 1400, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("Permission denied"),
        "{v}"
    );
    // ...and being able to connect grants nothing by itself.
    let member = As {
        uid: STRANGER,
        gid: SOCKET_GROUP.1,
        groups: &[],
    };
    assert!(member.can_connect(&d.socket));
    assert_eq!(member.code(&d, &["describe-volumes"]), 1400);
    // A reader in the socket's group can describe but cannot reach volume data over NBD.
    let reader = As {
        uid: STRANGER,
        gid: STRANGER,
        groups: &[SOCKET_GROUP.1, READER_GROUP.1],
    };
    assert_eq!(reader.code(&d, &["describe-volumes"]), 0);
    assert!(!reader.can_connect(&nbd_path));
    assert!(!member.can_connect(&nbd_path));
    let admin = As {
        uid: STRANGER,
        gid: STRANGER,
        groups: &[SOCKET_GROUP.1, ADMIN_GROUP.1],
    };
    assert!(admin.can_connect(&nbd_path));
    assert!(admin.can_connect(&d.socket));
    drop(d);

    // Another mode, and a world-open control socket: the NBD socket never opens to others.
    let d = Daemon::start("socket_mode = \"0666\"\n");
    let control = std::fs::metadata(&d.socket).expect("control socket");
    assert_eq!(control.permissions().mode() & 0o7777, 0o666);
    let nbd = std::fs::metadata(d.socket.with_file_name("nbd.sock")).expect("nbd socket");
    assert_eq!(nbd.permissions().mode() & 0o7777, 0o660);
    assert_eq!((nbd.uid(), nbd.gid()), (0, 0), "no admin_group: root only");
    let d = Daemon::start("socket_mode = \"0600\"\n");
    let control = std::fs::metadata(&d.socket).expect("control socket");
    assert_eq!(control.permissions().mode() & 0o7777, 0o600);
}

#[test]
fn peer_credentials_decide_what_each_caller_may_do() {
    if !root_or_skip("peer_credentials_decide_what_each_caller_may_do")
        || !have_tool("setpriv")
        || !have_tool("curl")
        || !groups_exist()
    {
        return;
    }
    // The socket is open to everyone so that the daemon, not the file mode, decides.
    let d = Daemon::start(&format!(
        "socket_mode = \"0666\"\nadmin_group = \"{}\"\nreader_group = \"{}\"\n",
        ADMIN_GROUP.0, READER_GROUP.0
    ));
    open_dirs(&d);
    let vol = d.volume("4M", "root-vol");
    let snap = d.job(&["create-snapshots", "-r", &vol, "-F", "1", "-N", "root-snap"])["snapshots"]
        [0]
    .as_str()
    .expect("snapshot id")
    .to_string();
    let (vol, snap) = (vol.as_str(), snap.as_str());
    let before = (
        d.describe_volume(vol),
        d.describe_snapshot(snap),
        d.ok(&["describe-jobs"])["total_count"].clone(),
    );

    let stranger = As {
        uid: STRANGER,
        gid: STRANGER,
        groups: &[],
    };
    let reader_primary = As {
        uid: NAMED_UID.1,
        gid: READER_GROUP.1,
        groups: &[],
    };
    let reader_supplementary = As {
        uid: STRANGER,
        gid: STRANGER,
        groups: &[READER_GROUP.1],
    };
    let mutations: Vec<Vec<&str>> = vec![
        vec!["create-volumes", "-s", "4M"],
        vec!["attach-volumes", "-v", vol],
        vec!["detach-volumes", "-v", vol],
        vec!["resize-volumes", "-v", vol, "-s", "8M"],
        vec!["delete-volumes", "-v", vol],
        vec!["create-snapshots", "-r", vol],
        vec!["delete-snapshots", "-s", snap],
        vec!["create-volume-from-snapshot", "-s", snap],
        vec!["apply-snapshots", "-s", snap],
        vec!["modify-snapshot-attributes", "-s", snap, "-N", "pwned"],
        vec!["verify-snapshots", "-s", snap],
    ];
    let describes: [&[&str]; 4] = [
        &["describe-volumes"],
        &["describe-snapshots", "-V", "1"],
        &["describe-jobs"],
        &["describe-volumes", "-v", vol],
    ];

    // A stranger may do nothing: not describe, not mutate, not read metrics, and a malformed
    // body gets 1400 too (it is refused before being parsed).
    for args in describes
        .iter()
        .copied()
        .chain(mutations.iter().map(|a| &a[..]))
    {
        let v = stranger.call(&d, args);
        assert_eq!(v["ret_code"], 1400, "stranger {args:?}: {v}");
        assert!(v["message"].as_str().unwrap().contains("uid 4242"), "{v}");
    }
    for body in ["{not json", r#"{"action":"FormatEverything"}"#, ""] {
        let (status, text) = stranger.curl(
            &d.socket,
            &[
                "-H",
                "content-type: application/json",
                "--data-binary",
                body,
            ],
            "http://localhost/iaas/",
        );
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(
            (status.as_str(), &v["ret_code"]),
            ("200", &json!(1400)),
            "{body:?}: {v}"
        );
    }
    let (status, text) = stranger.curl(&d.socket, &[], "http://localhost/metrics");
    assert_eq!(status, "403", "{text}");
    assert!(!text.contains("blocksnap_volumes"), "{text}");
    assert!(text.contains("1400"), "{text}");

    // A reader (by primary or supplementary group) may describe, and nothing else.
    for reader in [&reader_primary, &reader_supplementary] {
        for args in describes {
            let v = reader.call(&d, args);
            assert_eq!(v["ret_code"], 0, "reader {args:?}: {v}");
        }
        assert_eq!(
            reader.call(&d, &["describe-volumes", "-v", vol])["volume_set"][0]["volume_id"],
            json!(vol)
        );
        for args in &mutations {
            let v = reader.call(&d, args);
            assert_eq!(v["ret_code"], 1400, "reader {args:?}: {v}");
        }
        let (status, text) = reader.curl(&d.socket, &[], "http://localhost/metrics");
        assert_eq!(status, "200", "{text}");
        assert!(text.contains("blocksnap_volumes"), "{text}");
    }
    // Nothing the refused calls asked for happened.
    let after = (
        d.describe_volume(vol),
        d.describe_snapshot(snap),
        d.ok(&["describe-jobs"])["total_count"].clone(),
    );
    assert_eq!(
        (
            &after.0["status"],
            &after.0["size_bytes"],
            &after.0["device"]
        ),
        (
            &before.0["status"],
            &before.0["size_bytes"],
            &before.0["device"]
        )
    );
    assert_eq!(
        (&after.1["snapshot_name"], &after.1["status"]),
        (&before.1["snapshot_name"], &before.1["status"])
    );
    assert_eq!(after.2, before.2, "no job was started");

    // Admins, by supplementary or primary group, may mutate; `owner` is the caller's name (or
    // its uid when it has none).
    let admin_named = As {
        uid: NAMED_UID.1,
        gid: NAMED_UID.1,
        groups: &[ADMIN_GROUP.1],
    };
    let admin_unnamed = As {
        uid: STRANGER,
        gid: ADMIN_GROUP.1,
        groups: &[],
    };
    let both = As {
        uid: STRANGER,
        gid: STRANGER,
        groups: &[READER_GROUP.1, ADMIN_GROUP.1],
    };
    for (who, owner) in [
        (&admin_named, NAMED_UID.0.to_string()),
        (&admin_unnamed, STRANGER.to_string()),
        (&both, STRANGER.to_string()),
    ] {
        let v = who.call(&d, &["create-volumes", "-s", "4M", "-N", "admin-vol"]);
        assert_eq!(v["ret_code"], 0, "{v}");
        let id = v["volumes"][0].as_str().expect("volume id").to_string();
        let job = d.wait_job(v["job_id"].as_str().expect("job id"));
        assert_eq!(job["status"], "successful", "{job}");
        assert_eq!(d.describe_volume(&id)["owner"], json!(owner));
        let v = who.call(&d, &["create-snapshots", "-r", &id, "--wait"]);
        assert_eq!(v["ret_code"], 0, "{v}");
        let sid = v["snapshots"][0].as_str().expect("snapshot id").to_string();
        assert_eq!(d.describe_snapshot(&sid)["owner"], json!(owner));
        for args in [
            vec!["modify-snapshot-attributes", "-s", &sid, "-N", "renamed"],
            vec!["verify-snapshots", "-s", &sid, "--wait"],
            vec!["delete-snapshots", "-s", &sid, "--wait"],
            vec!["delete-volumes", "-v", &id, "--wait"],
        ] {
            let v = who.call(&d, &args);
            assert_eq!(v["ret_code"], 0, "admin uid {} {args:?}: {v}", who.uid);
        }
    }
    // Root needs no group; what root creates is owned by root.
    let v = d.job(&["create-volumes", "-s", "4M"]);
    let id = v["volumes"][0].as_str().expect("volume id");
    assert_eq!(d.describe_volume(id)["owner"], "root");

    // The groups are read from the config at each call: SIGHUP can take admin rights away.
    std::fs::write(
        &d.config,
        format!(
            "socket_mode = \"0666\"\nreader_group = \"{}\"\n",
            READER_GROUP.0
        ),
    )
    .expect("rewrite config");
    let pid = d.pid().expect("daemon pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !d.log().contains("configuration reloaded") {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(admin_named.code(&d, &["create-volumes", "-s", "4M"]), 1400);
    assert_eq!(admin_named.code(&d, &["describe-volumes"]), 1400);
    assert_eq!(both.code(&d, &["describe-volumes"]), 0);
    assert_eq!(both.code(&d, &["create-volumes", "-s", "4M"]), 1400);
}

/// One request over the control socket as root; the JSON answer.
fn post(socket: &Path, body: &[u8]) -> Value {
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    let head = format!(
        "POST /iaas/ HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    s.write_all(body).expect("write");
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).expect("read");
    let at = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP header");
    serde_json::from_slice(&answer[at + 4..])
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&answer)))
}

fn post_json(d: &Daemon, body: &Value) -> Value {
    post(&d.socket, body.to_string().as_bytes())
}

/// Every entry under `root` (not following links): kind, length, and a hash of regular files'
/// contents; the catalog's files by name only (reads may touch them).
fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let rel = path.strip_prefix(root).expect("under root").to_path_buf();
            let meta = std::fs::symlink_metadata(&path).expect("stat");
            let name = e.file_name().to_string_lossy().into_owned();
            let what = if meta.is_dir() {
                walk(root, &path, out);
                format!("dir {:o}", meta.permissions().mode())
            } else if meta.file_type().is_symlink() {
                format!("link {:?}", std::fs::read_link(&path).ok())
            } else if name.starts_with("catalog.db") || name == "daemon.log" {
                "file (contents not compared)".into()
            } else if meta.is_file() {
                let data = std::fs::read(&path).expect("read");
                format!(
                    "file {:o} {} {}",
                    meta.permissions().mode(),
                    data.len(),
                    blake3::hash(&data)
                )
            } else {
                format!("other {:o}", meta.mode())
            };
            out.insert(rel, what);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Files outside the state dir at the places hostile ids point to.
fn plant_sentinels(d: &Daemon) -> Vec<PathBuf> {
    let base = d.dir.path();
    let mut planted = Vec::new();
    for rel in ["x", "etc/passwd", "etc/x", "outside/sentinel", "vol-x.img"] {
        let p = base.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, format!("sentinel {rel}\n")).expect("write sentinel");
        planted.push(p);
    }
    std::fs::create_dir_all(base.join("etc/x.img")).expect("mkdir");
    planted
}

#[test]
fn hostile_ids_are_refused_and_touch_nothing() {
    if !root_or_skip("hostile_ids_are_refused_and_touch_nothing") {
        return;
    }
    let d = Daemon::start("");
    let vol = d.volume("4M", "v");
    let snap = d.job(&["create-snapshots", "-r", &vol, "-F", "1"])["snapshots"][0]
        .as_str()
        .expect("snapshot id")
        .to_string();
    let planted = plant_sentinels(&d);
    let base = d.dir.path().to_path_buf();
    let abs_sentinel = base.join("outside/sentinel").display().to_string();
    let abs_image = d.image(&vol).display().to_string();
    let abs_snapshot_dir = d
        .state_dir
        .join("store/snapshots")
        .join(&snap)
        .display()
        .to_string();
    let long = format!("vol-{}", "a".repeat(100 * 1024));
    let long_ss = format!("ss-{}", "a".repeat(100 * 1024));
    let hostile: Vec<String> = vec![
        "../x".into(),
        "../../x".into(),
        "..".into(),
        ".".into(),
        "/".into(),
        "x".into(),
        abs_sentinel.clone(),
        abs_image,
        abs_snapshot_dir,
        "vol-../../etc".into(),
        "vol-../..".into(),
        "vol-../../x".into(),
        "ss-../../x".into(),
        "ss-%2e%2e".into(),
        "ss-%2e%2e%2fx".into(),
        "vol-%2e%2e%2fx".into(),
        "vol-..%2f..%2f".into(),
        "vol-1234\u{0}678".into(),
        format!("{vol}\u{0}../../x"),
        format!("{snap}\u{0}"),
        format!("{vol}/../../x"),
        format!("{snap}/../../x"),
        format!("{vol}/"),
        format!("../volumes/{vol}"),
        "vol-ABCDEFGH".into(),
        "vol-\u{430}bcdefgh".into(),
        "vol-\u{ff11}2345678".into(),
        "vol-aaaa\\aaa".into(),
        "vol-$(id)ab".into(),
        "vol-`id`abc".into(),
        "vol-aaaaaaa\n".into(),
        "vol-*".into(),
        "ss-????????".into(),
        long.clone(),
        long_ss.clone(),
        "j-../../../x".into(),
    ];
    // Verbs and where each puts an id; `kind` says which valid id may sit beside a hostile one.
    enum Kind {
        Volume,
        Snapshot,
        Job,
    }
    type ListVerb = Box<dyn Fn(Value) -> Value>;
    type SingleVerb = Box<dyn Fn(&str) -> Value>;
    let verbs: Vec<(Kind, ListVerb)> = vec![
        (
            Kind::Volume,
            Box::new(|ids| json!({"action": "DescribeVolumes", "volumes": ids})),
        ),
        (
            Kind::Volume,
            Box::new(|ids| json!({"action": "AttachVolumes", "volumes": ids})),
        ),
        (
            Kind::Volume,
            Box::new(|ids| json!({"action": "DetachVolumes", "volumes": ids})),
        ),
        (
            Kind::Volume,
            Box::new(|ids| json!({"action": "ResizeVolumes", "volumes": ids, "size": "8M"})),
        ),
        (
            Kind::Volume,
            Box::new(|ids| json!({"action": "DeleteVolumes", "volumes": ids})),
        ),
        (
            Kind::Volume,
            Box::new(|ids| json!({"action": "CreateSnapshots", "resources": ids, "is_full": 1})),
        ),
        (
            Kind::Snapshot,
            Box::new(|ids| json!({"action": "DescribeSnapshots", "snapshots": ids})),
        ),
        (
            Kind::Snapshot,
            Box::new(|ids| json!({"action": "DeleteSnapshots", "snapshots": ids})),
        ),
        (
            Kind::Snapshot,
            Box::new(|ids| json!({"action": "ApplySnapshots", "snapshots": ids})),
        ),
        (
            Kind::Snapshot,
            Box::new(|ids| json!({"action": "VerifySnapshots", "snapshots": ids})),
        ),
        (
            Kind::Job,
            Box::new(|ids| json!({"action": "DescribeJobs", "jobs": ids})),
        ),
    ];
    // Verbs that take a single id.
    let single: Vec<SingleVerb> = vec![
        Box::new(|id| json!({"action": "DescribeSnapshots", "resource_id": id})),
        Box::new(
            |id| json!({"action": "ModifySnapshotAttributes", "snapshot": id, "snapshot_name": "x"}),
        ),
        Box::new(
            |id| json!({"action": "ModifySnapshotAttributes", "snapshot": id, "description": "x"}),
        ),
        Box::new(|id| json!({"action": "CreateVolumeFromSnapshot", "snapshot": id})),
        Box::new(
            |id| json!({"action": "CreateVolumeFromSnapshot", "snapshot": id, "volume_name": "../x"}),
        ),
        Box::new(
            |id| json!({"action": "CreateVolumeFromSnapshot", "snapshot": id, "backend": "nbd", "lazy": true}),
        ),
    ];

    let state_before = tree(&d.state_dir);
    let outside_before = tree(&base);
    let jobs_before = d.ok(&["describe-jobs"])["total_count"].clone();
    let mut cases = 0;
    let mut check = |body: Value| {
        let v = post_json(&d, &body);
        let shown: String = body.to_string().chars().take(160).collect();
        assert_eq!(v["ret_code"], 1100, "{shown} → {v}");
        let message = v["message"].as_str().expect("message");
        assert!(
            message.len() < 1024,
            "message echoes the whole id: {}",
            message.len()
        );
        assert!(!message.chars().any(char::is_control), "{message:?}");
        cases += 1;
    };
    for id in &hostile {
        for (kind, verb) in &verbs {
            let valid = match kind {
                Kind::Volume => vol.clone(),
                Kind::Snapshot => snap.clone(),
                Kind::Job => "j-aaaaaaaaaaa".into(),
            };
            // Alone, after a valid id, before one, and inside a comma-separated string.
            check(verb(json!([id])));
            check(verb(json!([valid, id])));
            check(verb(json!([id, valid])));
            if !id.contains(',') {
                check(verb(json!(format!("{valid},{id}"))));
            }
        }
        for verb in &single {
            check(verb(id));
        }
    }
    // Ids of the other kind are not ids of this one.
    for (kind, verb) in &verbs {
        let other = match kind {
            Kind::Volume => snap.clone(),
            Kind::Snapshot | Kind::Job => vol.clone(),
        };
        check(verb(json!([other])));
    }
    check(json!({"action": "ModifySnapshotAttributes", "snapshot": vol, "snapshot_name": "x"}));
    check(json!({"action": "CreateVolumeFromSnapshot", "snapshot": vol}));
    check(json!({"action": "DescribeSnapshots", "resource_id": snap}));
    // The control command sends them as they are, and prints the same refusal.
    for args in [
        vec!["delete-snapshots", "-s", "../x"],
        vec!["delete-volumes", "-v", "vol-../../etc"],
        vec!["attach-volumes", "-v", &abs_sentinel],
        vec!["apply-snapshots", "-s", "ss-%2e%2e"],
        vec!["describe-volumes", "-v", "../../x"],
        vec!["create-volume-from-snapshot", "-s", "../x", "-N", "../y"],
    ] {
        let v = d.fails(&args, 1100);
        assert!(v["message"].as_str().unwrap().contains("is not a"), "{v}");
    }
    eprintln!("{cases} hostile-id requests, all 1100");

    // Nothing inside the state dir or beside it changed, no job started, and the volume and
    // snapshot the lists named beside hostile ids are untouched.
    assert_eq!(tree(&d.state_dir), state_before, "state dir changed");
    assert_eq!(
        tree(&base),
        outside_before,
        "something outside the state dir changed"
    );
    for p in &planted {
        assert!(p.is_file(), "{} is gone", p.display());
    }
    assert_eq!(d.ok(&["describe-jobs"])["total_count"], jobs_before);
    let v = d.describe_volume(&vol);
    assert_eq!(
        (&v["status"], &v["device"], &v["size_bytes"]),
        (&json!("available"), &json!(""), &json!(4 << 20))
    );
    assert_eq!(d.describe_snapshot(&snap)["status"], "available");
    // Well-formed ids that do not exist are "not found", not "bad".
    d.fails(&["delete-snapshots", "-s", "ss-zzzzzzzz"], 2100);
    d.fails(&["attach-volumes", "-v", "vol-zzzzzzzz"], 2100);
    assert_eq!(
        d.ok(&["describe-volumes", "-v", "vol-zzzzzzzz"])["total_count"],
        0
    );
    d.job(&["verify-snapshots", "-s", &snap]);
}

#[test]
fn names_are_opaque_labels_that_never_become_paths() {
    if !root_or_skip("names_are_opaque_labels_that_never_become_paths") {
        return;
    }
    let d = Daemon::start("");
    let vol = d.volume("4M", "v");
    let snap = d.job(&["create-snapshots", "-r", &vol, "-F", "1"])["snapshots"][0]
        .as_str()
        .expect("snapshot id")
        .to_string();
    let planted = plant_sentinels(&d);
    let base = d.dir.path().to_path_buf();
    let outside = |t: BTreeMap<PathBuf, String>| -> BTreeMap<PathBuf, String> {
        t.into_iter()
            .filter(|(p, _)| !p.starts_with("state"))
            .collect()
    };
    let outside_before = outside(tree(&base));

    let accepted: Vec<String> = vec![
        "../../x".into(),
        "../../../../../../../../etc/passwd".into(),
        "/etc/shadow".into(),
        "..".into(),
        ".".into(),
        "a/b/c".into(),
        format!("{}/outside/sentinel", base.display()),
        "vol-../../etc".into(),
        "ss-%2e%2e".into(),
        "%2e%2e%2f%2e%2e%2fx".into(),
        "C:\\Windows\\..\\x".into(),
        "ünïcødé ✓".into(),
        "名前のボリューム".into(),
        "\u{202e}gpj.exe".into(),
        "\u{200b}\u{feff}\u{2060}".into(),
        "e\u{301}\u{301}\u{301}".into(),
        "🦀💾🔥".into(),
        "\u{10ffff}\u{fffd}".into(),
        "$(touch /tmp/blocksnap-pwned)".into(),
        "'; DROP TABLE volumes; --".into(),
        "%s%n%x%p".into(),
        "x".repeat(256),
        "é".repeat(128),
    ];
    let refused: Vec<String> = vec![
        "a\u{0}b".into(),
        "\u{0}".into(),
        "../\u{0}/x".into(),
        "line\nbreak".into(),
        "tab\there".into(),
        "\u{1b}[31mred".into(),
        "\u{7f}".into(),
        "\u{85}next-line".into(),
        "x".repeat(257),
        "é".repeat(129),
        "x".repeat(100 * 1024),
    ];
    let volumes_before = d.ok(&["describe-volumes"])["total_count"].clone();

    // Volume names (create-volumes), snapshot names and descriptions (modify).
    let mut created = Vec::new();
    for name in &accepted {
        let v = post_json(
            &d,
            &json!({"action": "CreateVolumes", "size": "1M", "volume_name": name}),
        );
        assert_eq!(v["ret_code"], 0, "{name:?}: {v}");
        let id = v["volumes"][0].as_str().expect("volume id").to_string();
        let job = d.wait_job(v["job_id"].as_str().expect("job id"));
        assert_eq!(job["status"], "successful", "{job}");
        assert_eq!(
            d.describe_volume(&id)["volume_name"],
            json!(name),
            "{name:?}"
        );
        created.push(id);

        for field in ["snapshot_name", "description"] {
            let v = post_json(
                &d,
                &json!({"action": "ModifySnapshotAttributes", "snapshot": snap, field: name}),
            );
            assert_eq!(v["ret_code"], 0, "{field} {name:?}: {v}");
            assert_eq!(
                d.describe_snapshot(&snap)[field],
                json!(name),
                "{field} {name:?}"
            );
        }
    }
    // A few through the verbs that start jobs: create-snapshots and
    // create-volume-from-snapshot (the names travel into the store's manifests).
    for name in accepted.iter().take(4) {
        let v = post_json(
            &d,
            &json!({"action": "CreateSnapshots", "resources": [vol], "snapshot_name": name}),
        );
        assert_eq!(v["ret_code"], 0, "{name:?}: {v}");
        let sid = v["snapshots"][0].as_str().expect("snapshot id").to_string();
        assert_eq!(
            d.wait_job(v["job_id"].as_str().unwrap())["status"],
            "successful"
        );
        assert_eq!(d.describe_snapshot(&sid)["snapshot_name"], json!(name));
        let v = post_json(
            &d,
            &json!({"action": "CreateVolumeFromSnapshot", "snapshot": sid, "volume_name": name}),
        );
        assert_eq!(v["ret_code"], 0, "{name:?}: {v}");
        let vid = v["volume_id"].as_str().expect("volume id").to_string();
        assert_eq!(
            d.wait_job(v["job_id"].as_str().unwrap())["status"],
            "successful"
        );
        assert_eq!(d.describe_volume(&vid)["volume_name"], json!(name));
    }
    // Search words are opaque too.
    for word in ["..", "/", "\u{0}", "%", "_", "名前"] {
        let v = post_json(
            &d,
            &json!({"action": "DescribeVolumes", "search_word": word}),
        );
        assert_eq!(v["ret_code"], 0, "{word:?}: {v}");
    }

    let snapshot_name = d.describe_snapshot(&snap)["snapshot_name"].clone();
    let volumes_mid = d.ok(&["describe-volumes"])["total_count"].clone();
    for name in &refused {
        for body in [
            json!({"action": "CreateVolumes", "size": "1M", "volume_name": name}),
            json!({"action": "CreateSnapshots", "resources": [vol], "snapshot_name": name}),
            json!({"action": "ModifySnapshotAttributes", "snapshot": snap, "snapshot_name": name}),
            json!({"action": "ModifySnapshotAttributes", "snapshot": snap, "description": name}),
            json!({"action": "CreateVolumeFromSnapshot", "snapshot": snap, "volume_name": name}),
        ] {
            let v = post_json(&d, &body);
            let shown: String = body.to_string().chars().take(120).collect();
            assert_eq!(v["ret_code"], 1100, "{shown}: {v}");
        }
    }
    // A lone surrogate is not a string at all (malformed JSON).
    let raw = r#"{"action":"CreateVolumes","size":"1M","volume_name":"a\ud800b"}"#;
    assert_eq!(post(&d.socket, raw.as_bytes())["ret_code"], 1100);
    let raw = format!(
        r#"{{"action":"ModifySnapshotAttributes","snapshot":"{snap}","snapshot_name":"\udfff"}}"#
    );
    assert_eq!(post(&d.socket, raw.as_bytes())["ret_code"], 1100);
    assert_eq!(d.ok(&["describe-volumes"])["total_count"], volumes_mid);
    assert_eq!(d.describe_snapshot(&snap)["snapshot_name"], snapshot_name);
    assert_eq!(
        volumes_before.as_u64().unwrap() + accepted.len() as u64 + 4,
        volumes_mid.as_u64().unwrap()
    );

    // No label became a path: every name in the state dir is plain ASCII from ids and fixed
    // file names, nothing beside the state dir changed, and the sentinels are all there.
    for (path, what) in tree(&d.state_dir) {
        for part in path.components() {
            let part = part.as_os_str().to_string_lossy();
            assert!(
                part.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                    && part != ".."
                    && part != ".",
                "unexpected name in the state dir: {} ({what})",
                path.display()
            );
        }
    }
    assert_eq!(outside(tree(&base)), outside_before);
    for p in &planted {
        assert!(p.is_file(), "{} is gone", p.display());
    }
    assert!(!Path::new("/tmp/blocksnap-pwned").exists());
    for id in &created {
        assert!(d.image(id).is_file(), "{id}: image is where its id says");
    }
}
