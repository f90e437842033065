//! CPU time of a child process from /proc/PID/stat, for the benches. Included by `e2e.rs` and
//! `cluster.rs`.

use std::process::Command;
use std::time::Duration;

/// The state letter (`R`, `S`, `Z`, ...) and CPU time (user + system) of a process, from
/// /proc/PID/stat. A zombie (exited, not yet reaped) still shows its final times.
pub fn proc_stat(pid: u32) -> Option<(char, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    let state = fields.first()?.chars().next()?;
    // Fields 14 and 15 of stat(5), counted from after the command name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((state, Duration::from_millis(ticks * 1000 / clock_ticks())))
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100)
    })
}
