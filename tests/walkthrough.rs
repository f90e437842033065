//! The README's "Scaling out" walk-through, run from the README's own text: its shell blocks
//! in order, with only what a test must change (its own temp dir for /tmp/hub, free loopback
//! ports for the hub's, this build's weir binary, and `mosquitto_sub` told to stop after 40
//! alerts). A real nats-server, three `weir run` processes, the simulator and the SIGKILL of
//! one instance: if the README's commands stop working, this fails.

mod common;

use common::{free_port, temp_dir};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};

/// The text between two headings of the README.
fn section(readme: &str, from: &str, to: &str) -> String {
    let start = readme.find(from).expect("the walk-through heading");
    let end = start + readme[start..].find(to).expect("the heading after it");
    readme[start..end].to_owned()
}

/// The fenced code blocks of `text` whose opening fence is exactly "```" + `lang`.
fn blocks(text: &str, lang: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in text.lines() {
        match current.as_mut() {
            None if line == format!("```{lang}") => current = Some(Vec::new()),
            Some(lines) if line == "```" => {
                found.push(lines.join("\n"));
                current = None;
            }
            Some(lines) => lines.push(line),
            None => {}
        }
    }
    found
}

/// Kills every process a script started (they share its process group) when dropped.
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0)])
            .status();
    }
}

/// Runs `script` as a file with bash, as a shell would run it pasted (no `-e`: the last
/// command's status is the block's), in the process group of the first block; returns stdout.
fn run(script: &str, file: &Path, group: &mut Option<Group>) -> String {
    // From a file, so that `pkill -f PATH` in the README does not match this bash's own
    // command line.
    std::fs::write(file, script).expect("write the block");
    let mut command = Command::new("bash");
    command
        .arg(file)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    command.process_group(group.as_ref().map_or(0, |g| g.0 as i32));
    let child = command.spawn().expect("run bash");
    if group.is_none() {
        *group = Some(Group(child.id()));
    }
    let output = child.wait_with_output().expect("wait for bash");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "a walk-through block failed ({}):\n{script}\n--- stdout ---\n{stdout}",
        output.status
    );
    stdout
}

#[test]
fn the_scaling_out_walk_through_works_as_pasted() {
    for tool in ["curl", "mosquitto_sub", "pgrep"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            common::not_installed(
                tool,
                match tool {
                    "curl" => "curl",
                    "pgrep" => "procps",
                    _ => "mosquitto-clients",
                },
            );
        }
    }
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("read README.md");
    let walk = section(&readme, "### Walk-through", "### `[cluster]`");
    let shell = blocks(&walk, "sh");
    assert_eq!(shell.len(), 3, "the walk-through has three shell blocks");

    let dir = temp_dir("walkthrough");
    let hub = dir.join("hub");
    let (nats, mqtt) = (free_port(), free_port());
    let http: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let adapt = |block: &str| {
        block
            .replace("/tmp/hub", hub.to_str().expect("utf-8 temp dir"))
            .replace("./target/release/weir", env!("CARGO_BIN_EXE_weir"))
            .replace("14222", &nats.to_string())
            .replace("11883", &mqtt.to_string())
            .replace("127.0.0.1:946$i", "127.0.0.1:${HTTP[$i]}")
            .replace("127.0.0.1:9461", &format!("127.0.0.1:{}", http[0]))
            .replace("127.0.0.1:9462", &format!("127.0.0.1:{}", http[1]))
            .replace("mosquitto_sub -p", "mosquitto_sub -C 40 -W 90 --quiet -p")
    };
    let ports = format!("HTTP=(none {} {} {})\n", http[0], http[1], http[2]);
    let mut group = None;
    // The hub's config and the server, then `weir cluster init`.
    let init = run(&adapt(&shell[0]), &dir.join("1.sh"), &mut group);
    assert!(
        init.contains("created the readings stream WEIR_READINGS"),
        "{init}"
    );
    // The mapping, three instances, the simulator, and the first 40 alerts (about 8 s: time
    // for the three instances to settle, as a reader watching them would give it).
    let alerts = run(&(ports + &adapt(&shell[1])), &dir.join("2.sh"), &mut group);
    let lines: Vec<&str> = alerts.lines().collect();
    assert_eq!(lines.len(), 40, "40 alerts within 90 s:\n{alerts}");
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("alerts/") && l.contains("\"rule\":\"overheat\"")),
        "{alerts}"
    );
    // The cluster view, the SIGKILL of the third instance, and the view 15 s later.
    let after = run(&adapt(&shell[2]), &dir.join("3.sh"), &mut group);
    let views: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&after)
        .into_iter::<serde_json::Value>()
        .map_while(Result::ok)
        .collect();
    assert_eq!(views.len(), 2, "two /api/cluster views:\n{after}");
    let holders = |view: &serde_json::Value| -> Vec<(String, usize)> {
        view["assignment"]
            .as_object()
            .map(|by_member| {
                by_member
                    .iter()
                    .map(|(member, partitions)| {
                        (member.clone(), partitions.as_array().map_or(0, Vec::len))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let (before, later) = (holders(&views[0]), holders(&views[1]));
    println!("before the kill: {before:?}; 15 s after: {later:?}");
    assert_eq!(
        before.len(),
        3,
        "three members share the partitions: {before:?}"
    );
    assert_eq!(
        before.iter().map(|(_, n)| n).sum::<usize>(),
        64,
        "{before:?}"
    );
    assert_eq!(later.len(), 2, "two members are left: {later:?}");
    assert_eq!(later.iter().map(|(_, n)| n).sum::<usize>(), 64, "{later:?}");
    assert!(
        after.contains("weir_cluster_partitions_owned"),
        "the metrics of instance 2:\n{after}"
    );
    // The README's own clean-up line ends the rest.
    let cleanup = section(&walk, "When done: `", ".\n");
    let cleanup = cleanup
        .trim_start_matches("When done: `")
        .trim_end_matches('`')
        .replace('\n', " ");
    run(&adapt(&cleanup), &dir.join("4.sh"), &mut group);
}
