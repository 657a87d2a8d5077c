//! Argument → request mapping for every verb, the table output and the exit-status rule.

use super::*;
use clap::CommandFactory;
use serde_json::{json, Value};

fn cli(args: &[&str]) -> Cli {
    Cli::try_parse_from(std::iter::once("blocksnap").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// The wire body for a command line; also checks the daemon's parser accepts it.
fn body(args: &[&str]) -> Value {
    let b = cli(args).to_body().expect("an API verb");
    Request::parse(b.to_string().as_bytes()).unwrap_or_else(|e| panic!("{b}: {e}"));
    b
}

fn rejected(args: &[&str]) -> clap::error::ErrorKind {
    Cli::try_parse_from(std::iter::once("blocksnap").chain(args.iter().copied()))
        .map(|c| panic!("{args:?} was accepted: {c:?}"))
        .unwrap_err()
        .kind()
}

#[test]
fn the_command_definition_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn every_verb_and_flag_has_help() {
    let cmd = Cli::command();
    for sub in cmd.get_subcommands() {
        assert!(sub.get_about().is_some(), "{} has no help", sub.get_name());
        for arg in sub.get_arguments() {
            assert!(
                arg.get_help().is_some() || arg.get_id() == "help",
                "{} --{} has no help",
                sub.get_name(),
                arg.get_id()
            );
        }
    }
    let names: Vec<&str> = cmd.get_subcommands().map(|s| s.get_name()).collect();
    for verb in [
        "create-volumes",
        "describe-volumes",
        "attach-volumes",
        "detach-volumes",
        "resize-volumes",
        "delete-volumes",
        "create-snapshots",
        "describe-snapshots",
        "delete-snapshots",
        "create-volume-from-snapshot",
        "apply-snapshots",
        "modify-snapshot-attributes",
        "verify-snapshots",
        "describe-jobs",
        "metrics",
    ] {
        assert!(names.contains(&verb), "{verb} missing from {names:?}");
    }
}

#[test]
fn create_volumes() {
    let expected = json!({"action": "CreateVolumes", "size": "64M", "volume_name": "test-snap",
                          "count": 2, "backend": "nbd", "zone": "ap2a"});
    assert_eq!(
        body(&[
            "-z",
            "ap2a",
            "create-volumes",
            "-s",
            "64M",
            "-N",
            "test-snap",
            "-c",
            "2",
            "--backend",
            "nbd"
        ]),
        expected
    );
    assert_eq!(
        body(&[
            "create-volumes",
            "--size",
            "64M",
            "--volume-name",
            "test-snap",
            "--count",
            "2",
            "--backend",
            "nbd",
            "--zone",
            "ap2a"
        ]),
        expected
    );
    // A bare number is GiB on the wire, so the size is sent exactly as typed.
    assert_eq!(
        body(&["create-volumes", "-s", "10"]),
        json!({"action": "CreateVolumes", "size": "10"})
    );
    let parsed = Request::parse(
        body(&["create-volumes", "-s", "64M"])
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    assert!(
        matches!(parsed, Request::CreateVolumes(api::CreateVolumes { size: Some(Size(n)), .. }) if n == 64 << 20)
    );
    assert_eq!(
        rejected(&["create-volumes", "-s", "ten"]),
        clap::error::ErrorKind::ValueValidation
    );
    assert_eq!(
        rejected(&["create-volumes", "-s", "1", "--backend", "tape"]),
        clap::error::ErrorKind::InvalidValue
    );
    assert_eq!(
        rejected(&["create-volumes"]),
        clap::error::ErrorKind::MissingRequiredArgument
    );
}

#[test]
fn describe_volumes() {
    assert_eq!(
        body(&[
            "describe-volumes",
            "-v",
            "vol-aaaaaaaa, vol-bbbbbbbb",
            "-v",
            "vol-cccccccc",
            "-s",
            "available,in-use",
            "-W",
            "test",
            "--offset",
            "1",
            "--limit",
            "2"
        ]),
        json!({"action": "DescribeVolumes", "volumes": ["vol-aaaaaaaa", "vol-bbbbbbbb", "vol-cccccccc"],
               "status": ["available", "in-use"], "search_word": "test", "offset": 1, "limit": 2})
    );
    assert_eq!(
        body(&[
            "describe-volumes",
            "--volumes",
            "vol-aaaaaaaa",
            "--status",
            "pending",
            "--search-word",
            "x"
        ]),
        json!({"action": "DescribeVolumes", "volumes": ["vol-aaaaaaaa"], "status": ["pending"], "search_word": "x"})
    );
    assert_eq!(
        body(&["describe-volumes"]),
        json!({"action": "DescribeVolumes"})
    );
}

#[test]
fn volume_list_verbs() {
    for (verb, action) in [
        ("attach-volumes", "AttachVolumes"),
        ("detach-volumes", "DetachVolumes"),
        ("delete-volumes", "DeleteVolumes"),
    ] {
        let expected = json!({"action": action, "volumes": ["vol-aaaaaaaa", "vol-bbbbbbbb"]});
        assert_eq!(body(&[verb, "-v", "vol-aaaaaaaa,vol-bbbbbbbb"]), expected);
        assert_eq!(
            body(&[verb, "--volumes", "vol-aaaaaaaa,vol-bbbbbbbb"]),
            expected
        );
        assert_eq!(
            rejected(&[verb]),
            clap::error::ErrorKind::MissingRequiredArgument
        );
    }
    let expected = json!({"action": "ResizeVolumes", "volumes": ["vol-aaaaaaaa"], "size": "2G"});
    assert_eq!(
        body(&["resize-volumes", "-v", "vol-aaaaaaaa", "-s", "2G"]),
        expected
    );
    assert_eq!(
        body(&[
            "resize-volumes",
            "--volumes",
            "vol-aaaaaaaa",
            "--size",
            "2G"
        ]),
        expected
    );
}

#[test]
fn create_snapshots() {
    let expected = json!({"action": "CreateSnapshots", "resources": ["vol-df3m8oal"], "is_full": 1,
                          "snapshot_name": "full-snap", "zone": "ap2a"});
    assert_eq!(
        body(&[
            "create-snapshots",
            "-z",
            "ap2a",
            "-r",
            "vol-df3m8oal",
            "-F",
            "1",
            "-N",
            "full-snap"
        ]),
        expected
    );
    assert_eq!(
        body(&[
            "create-snapshots",
            "--zone",
            "ap2a",
            "--resources",
            "vol-df3m8oal",
            "--is-full",
            "1",
            "--snapshot-name",
            "full-snap"
        ]),
        expected
    );
    assert_eq!(
        body(&[
            "create-snapshots",
            "-r",
            "vol-aaaaaaaa,vol-bbbbbbbb",
            "-F",
            "0",
            "--force"
        ]),
        json!({"action": "CreateSnapshots", "resources": ["vol-aaaaaaaa", "vol-bbbbbbbb"], "is_full": 0, "force": true})
    );
    assert_eq!(
        body(&["create-snapshots", "-r", "vol-aaaaaaaa", "-F"])["is_full"],
        1
    );
    assert_eq!(
        body(&["create-snapshots", "-r", "vol-aaaaaaaa", "-F=0"])["is_full"],
        0
    );
    assert!(body(&["create-snapshots", "-r", "vol-aaaaaaaa"])
        .get("is_full")
        .is_none());
    assert_eq!(
        rejected(&["create-snapshots", "-r", "vol-aaaaaaaa", "-F", "2"]),
        clap::error::ErrorKind::ValueValidation
    );
    assert_eq!(
        rejected(&["create-snapshots", "-F", "1"]),
        clap::error::ErrorKind::MissingRequiredArgument
    );
}

#[test]
fn describe_snapshots() {
    let expected = json!({"action": "DescribeSnapshots", "snapshots": ["ss-umocjmc3", "ss-aaaaaaaa"],
                          "resource_id": "vol-df3m8oal", "snapshot_type": 0, "status": ["available"],
                          "search_word": "snap", "verbose": 1, "offset": 0, "limit": 10});
    assert_eq!(
        body(&[
            "describe-snapshots",
            "-n",
            "ss-umocjmc3,ss-aaaaaaaa",
            "-r",
            "vol-df3m8oal",
            "-t",
            "0",
            "-s",
            "available",
            "-W",
            "snap",
            "-V",
            "1",
            "--offset",
            "0",
            "--limit",
            "10"
        ]),
        expected
    );
    assert_eq!(
        body(&[
            "describe-snapshots",
            "--snapshots",
            "ss-umocjmc3,ss-aaaaaaaa",
            "--resource",
            "vol-df3m8oal",
            "--snapshot-type",
            "0",
            "--status",
            "available",
            "--search-word",
            "snap",
            "--verbose",
            "1",
            "--offset",
            "0",
            "--limit",
            "10"
        ]),
        expected
    );
    assert_eq!(body(&["describe-snapshots", "-V"])["verbose"], 1);
    assert_eq!(
        body(&["describe-snapshots"]),
        json!({"action": "DescribeSnapshots"})
    );
    assert_eq!(
        rejected(&["describe-snapshots", "-t", "full"]),
        clap::error::ErrorKind::ValueValidation
    );
}

#[test]
fn snapshot_list_verbs() {
    for (verb, action) in [
        ("delete-snapshots", "DeleteSnapshots"),
        ("apply-snapshots", "ApplySnapshots"),
        ("verify-snapshots", "VerifySnapshots"),
    ] {
        let expected = json!({"action": action, "snapshots": ["ss-aaaaaaaa", "ss-bbbbbbbb"]});
        assert_eq!(body(&[verb, "-s", "ss-aaaaaaaa,ss-bbbbbbbb"]), expected);
        assert_eq!(
            body(&[
                verb,
                "--snapshots",
                "ss-aaaaaaaa",
                "--snapshots",
                "ss-bbbbbbbb"
            ]),
            expected
        );
        assert_eq!(
            rejected(&[verb]),
            clap::error::ErrorKind::MissingRequiredArgument
        );
    }
}

#[test]
fn create_volume_from_snapshot() {
    assert_eq!(
        body(&[
            "create-volume-from-snapshot",
            "-z",
            "ap2a",
            "-s",
            "ss-umocjmc3",
            "-N",
            "restore-2"
        ]),
        json!({"action": "CreateVolumeFromSnapshot", "snapshot": "ss-umocjmc3", "volume_name": "restore-2", "zone": "ap2a"})
    );
    assert_eq!(
        body(&[
            "create-volume-from-snapshot",
            "--snapshot",
            "ss-umocjmc3",
            "--volume-name",
            "r",
            "--backend",
            "nbd",
            "--lazy"
        ]),
        json!({"action": "CreateVolumeFromSnapshot", "snapshot": "ss-umocjmc3", "volume_name": "r",
               "backend": "nbd", "lazy": true})
    );
}

#[test]
fn modify_snapshot_attributes() {
    let expected = json!({"action": "ModifySnapshotAttributes", "snapshot": "ss-umocjmc3",
                          "snapshot_name": "before upgrade", "description": "kept until May"});
    assert_eq!(
        body(&[
            "modify-snapshot-attributes",
            "-s",
            "ss-umocjmc3",
            "-N",
            "before upgrade",
            "-D",
            "kept until May"
        ]),
        expected
    );
    assert_eq!(
        body(&[
            "modify-snapshot-attributes",
            "--snapshot",
            "ss-umocjmc3",
            "--snapshot-name",
            "before upgrade",
            "--description",
            "kept until May"
        ]),
        expected
    );
}

#[test]
fn describe_jobs() {
    let expected = json!({"action": "DescribeJobs", "jobs": ["j-9ebq2zp5sm3", "j-aaaaaaaaaaa"], "status": ["working"]});
    assert_eq!(
        body(&[
            "describe-jobs",
            "-j",
            "j-9ebq2zp5sm3,j-aaaaaaaaaaa",
            "-s",
            "working"
        ]),
        expected
    );
    assert_eq!(
        body(&[
            "describe-jobs",
            "--jobs",
            "j-9ebq2zp5sm3,j-aaaaaaaaaaa",
            "--status",
            "working"
        ]),
        expected
    );
}

#[test]
fn qingcloud_cli_spellings_are_accepted() {
    // qingcloud-cli's own long names, -O/-L on describe verbs, -f CONF_FILE (ignored).
    assert_eq!(
        body(&[
            "create-volumes",
            "-s",
            "1",
            "--volume_name",
            "a",
            "-f",
            "/root/.qingcloud/config.yaml"
        ]),
        json!({"action": "CreateVolumes", "size": "1", "volume_name": "a"})
    );
    assert_eq!(
        body(&["create-snapshots", "-r", "vol-aaaaaaaa", "--name", "s"])["snapshot_name"],
        "s"
    );
    assert_eq!(
        body(&[
            "modify-snapshot-attributes",
            "-s",
            "ss-aaaaaaaa",
            "--name",
            "s"
        ])["snapshot_name"],
        "s"
    );
    for verb in ["describe-volumes", "describe-snapshots", "describe-jobs"] {
        let b = body(&[verb, "-O", "20", "-L", "10"]);
        assert_eq!(
            (b["offset"].clone(), b["limit"].clone()),
            (json!(20), json!(10)),
            "{verb}"
        );
    }
    assert_eq!(
        body(&["describe-volumes", "--search_word", "x"])["search_word"],
        "x"
    );
    // argparse-style unambiguous abbreviations of long flags.
    assert_eq!(
        body(&["describe-snapshots", "--snapshot-t", "1"])["snapshot_type"],
        1
    );
}

#[test]
fn metrics_is_not_an_api_call() {
    assert_eq!(cli(&["metrics"]).to_body(), None);
}

#[test]
fn global_flags_go_before_or_after_the_verb() {
    let c = cli(&[
        "create-volumes",
        "-s",
        "64M",
        "-N",
        "test-snap",
        "--wait",
        "-o",
        "table",
        "--socket",
        "/tmp/x.sock",
    ]);
    assert!(c.wait);
    assert_eq!(c.output, Output::Table);
    assert_eq!(c.socket, PathBuf::from("/tmp/x.sock"));
    let c = cli(&["--wait", "-o", "json", "describe-jobs"]);
    assert!(c.wait);
    assert_eq!(c.output, Output::Json);
    assert_eq!(
        rejected(&["-o", "yaml", "describe-jobs"]),
        clap::error::ErrorKind::InvalidValue
    );
}

#[test]
fn exit_status_follows_ret_code() {
    assert_eq!(exit_code(&json!({"action": "X", "ret_code": 0})), 0);
    assert_eq!(
        exit_code(&json!({"action": "X", "ret_code": 2100, "message": "no"})),
        1
    );
    assert_eq!(exit_code(&json!({"action": "X", "ret_code": 5100})), 1);
    assert_eq!(exit_code(&json!({"action": "X"})), 1);
    assert_eq!(exit_code(&json!({"ret_code": "0"})), 1);
}

#[test]
fn volume_table_is_aligned() {
    let response = json!({"action": "DescribeVolumesResponse", "ret_code": 0, "total_count": 2, "volume_set": [
        {"volume_id": "vol-aaaaaaaa", "volume_name": "test-snap", "size_bytes": 67108864u64, "status": "in-use",
         "transition_status": "", "backend": "loop", "device": "/dev/loop7", "mountpoints": ["/mnt", "/srv"],
         "create_time": "2026-11-22T23:00:00Z"},
        {"volume_id": "vol-bbbbbbbb", "volume_name": "r", "size_bytes": 1610612736u64, "status": "pending",
         "transition_status": "creating", "backend": "nbd", "device": "", "mountpoints": [],
         "create_time": "2026-11-22T23:00:01Z"}
    ]});
    let table = render_table(&response);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(
        lines[0]
            .starts_with("VOLUME_ID     NAME       SIZE    STATUS   TRANSITION  BACKEND  DEVICE"),
        "{table}"
    );
    assert!(
        lines[1].starts_with(
            "vol-aaaaaaaa  test-snap  64MiB   in-use   -           loop     /dev/loop7  /mnt,/srv"
        ),
        "{table}"
    );
    assert!(
        lines[2].starts_with(
            "vol-bbbbbbbb  r          1.5GiB  pending  creating    nbd      -           -"
        ),
        "{table}"
    );
    assert_eq!(lines[3], "total_count: 2");
    // Every row's columns start at the header's offsets.
    let col = lines[0].find("STATUS").unwrap();
    assert!(lines[1..3].iter().all(|l| l[col - 2..col] == *"  "));
}

#[test]
fn snapshot_and_job_tables() {
    let snapshots = json!({"action": "DescribeSnapshotsResponse", "ret_code": 0, "total_count": 1, "snapshot_set": [
        {"snapshot_id": "ss-umocjmc3", "snapshot_name": "full-snap", "status": "available", "snapshot_type": 1,
         "resource": {"resource_id": "vol-df3m8oal"}, "parent_id": "self", "size_bytes": 1048576u64,
         "total_size_bytes": 1048576u64, "consistency": "filesystem", "snapshot_time": "2026-11-22T23:00:00Z"}
    ]});
    let table = render_table(&snapshots);
    assert!(table.contains("SNAPSHOT_ID"), "{table}");
    assert!(table.contains("ss-umocjmc3  full-snap  available  full  vol-df3m8oal  self    1MiB  1MiB        filesystem"), "{table}");

    let jobs = json!({"action": "DescribeJobsResponse", "ret_code": 0, "job_set": [
        {"job_id": "j-9ebq2zp5sm3", "job_action": "CreateSnapshots", "status": "working",
         "resource_ids": ["ss-umocjmc3"], "progress": {"done_bytes": 512, "total_bytes": 2048}, "error": null}
    ]});
    let table = render_table(&jobs);
    assert!(
        table.contains("j-9ebq2zp5sm3  CreateSnapshots  working  512B/2KiB (25%)  ss-umocjmc3  -"),
        "{table}"
    );
    assert!(!table.contains("total_count"));
}

#[test]
fn other_responses_are_key_value_lines() {
    let error = json!({"action": "DeleteSnapshotsResponse", "ret_code": 2100, "message": "snapshot ss-nothere0 not found"});
    assert_eq!(
        render_table(&error),
        "action: DeleteSnapshotsResponse\nret_code: 2100\nmessage: snapshot ss-nothere0 not found\n"
    );
    let created = json!({"action": "CreateSnapshotsResponse", "ret_code": 0, "job_id": "j-9ebq2zp5sm3",
                         "snapshots": ["ss-umocjmc3", "ss-aaaaaaaa"]});
    assert_eq!(
        render_table(&created),
        "action: CreateSnapshotsResponse\nret_code: 0\njob_id: j-9ebq2zp5sm3\nsnapshots: ss-umocjmc3,ss-aaaaaaaa\n"
    );
}

#[test]
fn human_sizes() {
    assert_eq!(output::human_bytes(0), "0B");
    assert_eq!(output::human_bytes(1023), "1023B");
    assert_eq!(output::human_bytes(64 << 20), "64MiB");
    assert_eq!(output::human_bytes(3 << 29), "1.5GiB");
    assert_eq!(output::human_bytes(1 << 40), "1TiB");
}
