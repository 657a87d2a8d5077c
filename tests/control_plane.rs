//! The control plane under bad input, strangers, and bad configuration: clear answers with
//! the contract's codes, and a daemon that keeps serving.

mod common;

use common::{have_tool, root_or_skip, Daemon};
use std::io::{Read, Write};
use std::process::Command;

/// POSTs a raw body with curl and returns the JSON answer.
fn post(d: &Daemon, body: &[u8]) -> serde_json::Value {
    let file = d.dir.path().join("body.json");
    std::fs::write(&file, body).expect("write body");
    let out = Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(&d.socket)
        .args(["-H", "content-type: application/json", "--data-binary"])
        .arg(format!("@{}", file.display()))
        .arg("http://localhost/iaas/")
        .output()
        .expect("curl");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn bad_input_gets_the_contract_codes_and_the_daemon_keeps_serving() {
    if !root_or_skip("bad_input_gets_the_contract_codes_and_the_daemon_keeps_serving")
        || !have_tool("curl")
    {
        return;
    }
    let d = Daemon::start("");
    let cases: Vec<(Vec<u8>, i64)> = vec![
        (b"{not json".to_vec(), 1100),
        (b"".to_vec(), 1100),
        (br#"{"action":"FormatEverything"}"#.to_vec(), 1100),
        (br#"{"action":"CreateVolumes"}"#.to_vec(), 1100),
        (br#"{"action":"CreateVolumes","size":"ten"}"#.to_vec(), 1100),
        (br#"{"action":"CreateVolumes","size":-5}"#.to_vec(), 1100),
        (br#"{"action":"CreateVolumes","size":0}"#.to_vec(), 1100),
        (
            br#"{"action":"CreateVolumes","size":"1000000T"}"#.to_vec(),
            1100,
        ),
        (
            br#"{"action":"CreateVolumes","size":1,"count":0}"#.to_vec(),
            1100,
        ),
        (br#"{"action":"AttachVolumes","volumes":17}"#.to_vec(), 1100),
        (
            br#"{"action":"AttachVolumes","volumes":["vol-../../x"]}"#.to_vec(),
            1100,
        ),
        (
            br#"{"action":"AttachVolumes","volumes":["vol-nothere0"]}"#.to_vec(),
            2100,
        ),
        (
            br#"{"action":"DeleteSnapshots","snapshots":["ss-nothere0"]}"#.to_vec(),
            2100,
        ),
        (
            br#"{"action":"DescribeVolumes","zone":"elsewhere"}"#.to_vec(),
            1100,
        ),
    ];
    for (body, code) in &cases {
        let v = post(&d, body);
        assert_eq!(
            v["ret_code"],
            *code,
            "{} → {v}",
            String::from_utf8_lossy(body)
        );
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(
            v["action"]
                .as_str()
                .is_some_and(|a| a.ends_with("Response")),
            "{v}"
        );
    }
    let e = post(
        &d,
        br#"{"action":"DeleteSnapshots","snapshots":["ss-nothere0"]}"#,
    );
    assert_eq!(e["action"], "DeleteSnapshotsResponse");
    assert_eq!(e["message"], "snapshot ss-nothere0 not found");

    // Over 1 MiB.
    let mut big = br#"{"action":"DescribeVolumes","search_word":""#.to_vec();
    big.extend(std::iter::repeat_n(b'a', 1 << 20));
    big.extend(br#""}"#);
    assert_eq!(post(&d, &big)["ret_code"], 1100);

    // A client that connects and sends nothing, and one that sends half a request, do not
    // stop others from being served.
    let _silent = std::os::unix::net::UnixStream::connect(&d.socket).expect("connect");
    let mut half = std::os::unix::net::UnixStream::connect(&d.socket).expect("connect");
    half.write_all(b"POST /iaas/ HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"act")
        .expect("write");
    assert_eq!(d.ok(&["describe-volumes"])["total_count"], 0);
    let mut raw = std::os::unix::net::UnixStream::connect(&d.socket).expect("connect");
    raw.write_all(b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut answer = String::new();
    raw.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(answer.contains("1100"), "{answer}");

    // Metrics count what happened.
    let out = Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(&d.socket)
        .arg("http://localhost/metrics")
        .output()
        .expect("curl");
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(
        metrics.contains("blocksnap_requests_total{action=\"DescribeVolumes\",ret_code=\"0\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("blocksnap_volumes{status=\"available\"} 0"),
        "{metrics}"
    );
    assert!(d.log().contains("ready"));
}

#[test]
fn callers_outside_the_allowed_groups_get_1400() {
    if !root_or_skip("callers_outside_the_allowed_groups_get_1400") || !have_tool("setpriv") {
        return;
    }
    // The socket is opened to everyone so that the daemon, not the file mode, decides.
    let d = Daemon::start("socket_mode = \"0666\"\nreader_group = \"nogroup\"\n");
    std::fs::set_permissions(
        d.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    std::fs::set_permissions(
        d.dir.path().join("run"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let as_user = |uid: &str, gid: &str, args: &[&str]| -> serde_json::Value {
        let out = Command::new("setpriv")
            .args([
                "--reuid",
                uid,
                "--regid",
                gid,
                "--clear-groups",
                env!("CARGO_BIN_EXE_blocksnap"),
                "--socket",
            ])
            .arg(&d.socket)
            .args(args)
            .output()
            .expect("setpriv");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(out.status.success(), v["ret_code"] == 0, "{v}");
        v
    };
    // A stranger (uid 4242, no groups) may do nothing.
    assert_eq!(
        as_user("4242", "4242", &["describe-volumes"])["ret_code"],
        1400
    );
    assert_eq!(
        as_user("4242", "4242", &["create-volumes", "-s", "16M"])["ret_code"],
        1400
    );
    // A member of reader_group may describe, and nothing else.
    assert_eq!(
        as_user("4242", "65534", &["describe-volumes"])["ret_code"],
        0
    );
    assert_eq!(as_user("4242", "65534", &["describe-jobs"])["ret_code"], 0);
    let e = as_user("4242", "65534", &["create-volumes", "-s", "16M"]);
    assert_eq!(e["ret_code"], 1400, "{e}");
    assert!(e["message"].as_str().unwrap().contains("4242"), "{e}");
    assert_eq!(d.ok(&["describe-volumes"])["total_count"], 0);
}

#[test]
fn check_config_names_bad_keys_and_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |text: &str| {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).expect("write");
        Command::new(env!("CARGO_BIN_EXE_blocksnapd"))
            .arg("--config")
            .arg(&path)
            .arg("--check-config")
            .output()
            .expect("run")
    };
    let out = run("zone = \"lab\"\n[limits]\nsnapshots_per_volume = 20\n");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("zone = \"lab\"") && text.contains("snapshots_per_volume = 20"),
        "{text}"
    );
    assert!(
        text.contains("max_chain_length"),
        "effective config lists defaults too: {text}"
    );

    let out = run("zone = \"lab\"\n\n[limits]\nsnapshot_quota = 3\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("snapshot_quota") && err.contains("line 4"),
        "{err}"
    );

    let out = run("[limits]\nfreeze_timeout = -1\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("limits.freeze_timeout") && err.contains("line 2"),
        "{err}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_blocksnapd"))
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .arg("--check-config")
        .output()
        .expect("run");
    assert!(
        !out.status.success(),
        "an explicit missing config is an error"
    );
}

#[test]
fn socket_is_0660_root_and_sighup_reloads_the_config() {
    if !root_or_skip("socket_is_0660_root_and_sighup_reloads_the_config") {
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let d = Daemon::start("zone = \"lab-a\"\n");
    let meta = std::fs::metadata(&d.socket).expect("socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
    assert_eq!(d.ok(&["-z", "lab-a", "describe-volumes"])["ret_code"], 0);
    d.fails(&["-z", "lab-b", "describe-volumes"], 1100);

    std::fs::write(&d.config, "zone = \"lab-b\"\n").expect("rewrite config");
    let pid = nix::unistd::Pid::from_raw(d.pid().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while d.call(&["-z", "lab-b", "describe-volumes"])["ret_code"] != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "config not reloaded: {}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A bad config on reload is refused and the old one kept.
    std::fs::write(&d.config, "zone = \"lab-c\"\nbogus = 1\n").expect("rewrite config");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    while !d.log().contains("not reloaded") {
        assert!(
            std::time::Instant::now() < deadline,
            "bad config not reported: {}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(d.ok(&["-z", "lab-b", "describe-volumes"])["ret_code"], 0);
    let v = d.ok(&["describe-volumes"]);
    assert_eq!(v["total_count"], 0);
}
