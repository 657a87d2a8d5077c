//! How a response is shown: the exit-status rule, and `-o table`'s aligned tables of
//! `volume_set`, `snapshot_set` and `job_set` (other responses as `key: value` lines).

use serde_json::Value;

/// 0 exactly when the response's `ret_code` is 0; 1 otherwise (also when it has none).
pub fn exit_code(response: &Value) -> i32 {
    match response.get("ret_code").and_then(Value::as_i64) {
        Some(0) => 0,
        _ => 1,
    }
}

/// One column: its header and how a cell is made from an item.
struct Column {
    header: &'static str,
    cell: fn(&Value) -> String,
}

macro_rules! col {
    ($header:literal, $path:literal) => {
        Column {
            header: $header,
            cell: |item| text(lookup(item, $path)),
        }
    };
    ($header:literal, |$item:ident| $body:expr) => {
        Column {
            header: $header,
            cell: |$item| $body,
        }
    };
}

const VOLUME_COLUMNS: &[Column] = &[
    col!("VOLUME_ID", "volume_id"),
    col!("NAME", "volume_name"),
    col!("SIZE", |v| bytes(lookup(v, "size_bytes"))),
    col!("STATUS", "status"),
    col!("TRANSITION", "transition_status"),
    col!("BACKEND", "backend"),
    col!("DEVICE", "device"),
    col!("MOUNTPOINTS", "mountpoints"),
    col!("CREATED", "create_time"),
];

const SNAPSHOT_COLUMNS: &[Column] = &[
    col!("SNAPSHOT_ID", "snapshot_id"),
    col!("NAME", "snapshot_name"),
    col!("STATUS", "status"),
    col!(
        "TYPE",
        |s| match lookup(s, "snapshot_type").and_then(Value::as_i64) {
            Some(1) => "full".into(),
            Some(0) => "incremental".into(),
            _ => "-".into(),
        }
    ),
    col!("VOLUME", "resource.resource_id"),
    col!("PARENT", "parent_id"),
    col!("SIZE", |s| bytes(lookup(s, "size_bytes"))),
    col!("CHAIN_SIZE", |s| bytes(lookup(s, "total_size_bytes"))),
    col!("CONSISTENCY", "consistency"),
    col!("SNAPSHOT_TIME", "snapshot_time"),
];

const JOB_COLUMNS: &[Column] = &[
    col!("JOB_ID", "job_id"),
    col!("ACTION", "job_action"),
    col!("STATUS", "status"),
    col!("PROGRESS", |j| progress(j)),
    col!("RESOURCES", "resource_ids"),
    col!("ERROR", "error"),
];

/// `-o table`: the result set as an aligned table (with `total_count` under it), an error
/// or any other response as `key: value` lines.
pub fn render_table(response: &Value) -> String {
    let sets: [(&str, &[Column]); 3] = [
        ("volume_set", VOLUME_COLUMNS),
        ("snapshot_set", SNAPSHOT_COLUMNS),
        ("job_set", JOB_COLUMNS),
    ];
    if exit_code(response) == 0 {
        for (key, columns) in sets {
            if let Some(items) = response.get(key).and_then(Value::as_array) {
                let mut out = table(columns, items);
                if let Some(total) = response.get("total_count") {
                    out.push_str(&format!("total_count: {}\n", text(Some(total))));
                }
                return out;
            }
        }
    }
    key_values(response)
}

fn table(columns: &[Column], items: &[Value]) -> String {
    let mut rows: Vec<Vec<String>> = vec![columns.iter().map(|c| c.header.to_string()).collect()];
    rows.extend(
        items
            .iter()
            .map(|item| columns.iter().map(|c| (c.cell)(item)).collect()),
    );
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = widths[i].saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `action`, `ret_code` and `message` first, then the other keys in order.
fn key_values(response: &Value) -> String {
    let Some(map) = response.as_object() else {
        return format!("{response}\n");
    };
    let first = ["action", "ret_code", "message"];
    let mut out = String::new();
    for key in first.iter().copied().chain(
        map.keys()
            .map(String::as_str)
            .filter(|k| !first.contains(k)),
    ) {
        if let Some(v) = map.get(key) {
            out.push_str(&format!("{key}: {}\n", text(Some(v))));
        }
    }
    out
}

/// Follows a dotted path (`resource.resource_id`) into an item.
fn lookup<'a>(item: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(item, |v, key| v.get(key))
}

/// A cell: strings as they are, lists joined with commas, nothing as `-`.
fn text(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) if s.is_empty() => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.is_empty() => "-".into(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| text(Some(v)))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    }
}

/// A byte count for people: `64MiB`, `1.5GiB`.
fn bytes(value: Option<&Value>) -> String {
    match value.and_then(Value::as_u64) {
        Some(n) => human_bytes(n),
        None => "-".into(),
    }
}

pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let shown = format!("{value:.1}");
    let shown = shown.strip_suffix(".0").unwrap_or(&shown);
    format!("{shown}{}", UNITS[unit])
}

/// `done/total (pct%)` from a job's `progress`.
fn progress(job: &Value) -> String {
    let done = lookup(job, "progress.done_bytes").and_then(Value::as_u64);
    let total = lookup(job, "progress.total_bytes").and_then(Value::as_u64);
    match (done, total) {
        (Some(d), Some(t)) if t > 0 => format!(
            "{}/{} ({}%)",
            human_bytes(d),
            human_bytes(t),
            d.saturating_mul(100) / t
        ),
        (Some(d), _) => human_bytes(d),
        _ => "-".into(),
    }
}
