//! Snapshots: operator state of every device, the dedup horizon and the outbox, as of one LSN of
//! the input log. Written to a temp file, fsynced and renamed, so a crash leaves either the old or
//! the new snapshot; the previous one is kept as a fallback if the newest fails its checksum.
//!
//! File: `WEIRSNP1 | crc32(body): u32 LE | len: u64 LE | body (CBOR)`.

use super::sync_dir;
pub use crate::engine::snapshot::{DeviceSnapshot, Snapshot, StoredMessage};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"WEIRSNP1";
const CURRENT: &str = "snapshot.cbor";
const PREVIOUS: &str = "snapshot.prev.cbor";

/// Writes `snapshot` atomically into `dir`, keeping the previous one as a fallback.
///
/// # Errors
/// Encoding or I/O errors; the previous snapshot is intact in that case.
pub fn write(dir: &Path, snapshot: &Snapshot) -> anyhow::Result<()> {
    let mut body = Vec::new();
    ciborium::into_writer(snapshot, &mut body)?;
    let mut bytes = Vec::with_capacity(body.len() + 20);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&body);
    let temp = dir.join("snapshot.tmp");
    let written = (|| {
        use std::io::Write;
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(&bytes)?;
        file.sync_all()
    })();
    if let Err(err) = written {
        // A half-written temp file would only hold on to the space a full disk lacks.
        let _ = std::fs::remove_file(&temp);
        return Err(err.into());
    }
    let current = dir.join(CURRENT);
    if current.exists() {
        std::fs::rename(&current, dir.join(PREVIOUS))?;
    }
    std::fs::rename(&temp, &current)?;
    sync_dir(dir)?;
    Ok(())
}

fn read_file(path: &Path) -> Result<Snapshot, String> {
    let bytes = std::fs::read(path).map_err(|err| err.to_string())?;
    if bytes.len() < 20 || &bytes[..8] != MAGIC {
        return Err("not a weir snapshot (bad header)".into());
    }
    let crc = u32::from_le_bytes(bytes[8..12].try_into().map_err(|_| "short header")?);
    let len = u64::from_le_bytes(bytes[12..20].try_into().map_err(|_| "short header")?);
    let body = bytes
        .get(20..)
        .filter(|body| body.len() as u64 == len)
        .ok_or("truncated")?;
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch".into());
    }
    ciborium::from_reader(body).map_err(|err| format!("undecodable: {err}"))
}

/// What was loaded, and from where.
#[derive(Debug, Default)]
pub struct Loaded {
    pub snapshot: Option<Snapshot>,
    pub from: Option<PathBuf>,
    /// Notes on snapshots that were unusable.
    pub damage: Vec<String>,
}

/// Loads the newest valid snapshot: the current one, else the previous one. A bad file is moved
/// aside (never deleted) and reported, so a restart never crash-loops on it.
pub fn load(dir: &Path) -> Loaded {
    let mut loaded = Loaded::default();
    for name in [CURRENT, PREVIOUS] {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        match read_file(&path) {
            Ok(snapshot) => {
                loaded.snapshot = Some(snapshot);
                loaded.from = Some(path);
                return loaded;
            }
            Err(reason) => {
                let aside = dir.join(format!("{name}.corrupt"));
                let _ = std::fs::rename(&path, &aside);
                loaded.damage.push(format!(
                    "{}: {reason}; moved to {}",
                    path.display(),
                    aside.display()
                ));
            }
        }
    }
    loaded
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weir-snap-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn snapshot(lsn: u64) -> Snapshot {
        Snapshot {
            lsn,
            devices: vec![DeviceSnapshot {
                input: 0,
                device: "d1".into(),
                topic: "sensors/s1/d1/telemetry".into(),
                rules: vec![("overheat".into(), vec![1, 2, 3])],
                recent: Default::default(),
            }],
            outbox: vec![],
            rules: vec![("overheat".into(), 7)],
        }
    }

    #[test]
    fn an_outbox_entry_written_before_mqtt_5_properties_still_loads() {
        #[derive(serde::Serialize)]
        struct Before {
            topic: String,
            payload: Vec<u8>,
            qos: u8,
            retain: bool,
            rule: String,
        }
        let mut bytes = Vec::new();
        let before = Before {
            topic: "alerts/s1/d1/overheat".into(),
            payload: b"{}".to_vec(),
            qos: 1,
            retain: false,
            rule: "overheat".into(),
        };
        ciborium::into_writer(&before, &mut bytes).unwrap();
        let loaded: StoredMessage = ciborium::from_reader(bytes.as_slice()).unwrap();
        assert_eq!(loaded.topic, before.topic);
        assert_eq!((loaded.id, loaded.traceparent), (None, None));

        let now = StoredMessage {
            id: Some(0xabc),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            tracestate: None,
            ..loaded
        };
        let mut bytes = Vec::new();
        ciborium::into_writer(&now, &mut bytes).unwrap();
        let again: StoredMessage = ciborium::from_reader(bytes.as_slice()).unwrap();
        assert_eq!(again, now);
    }

    #[test]
    fn the_newest_snapshot_wins() {
        let dir = temp("newest");
        write(&dir, &snapshot(1)).unwrap();
        write(&dir, &snapshot(2)).unwrap();
        assert_eq!(load(&dir).snapshot.unwrap().lsn, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_corrupt_snapshot_falls_back_to_the_previous_one() {
        let dir = temp("corrupt");
        write(&dir, &snapshot(1)).unwrap();
        write(&dir, &snapshot(2)).unwrap();
        let current = dir.join(CURRENT);
        let mut bytes = std::fs::read(&current).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55;
        std::fs::write(&current, bytes).unwrap();
        let loaded = load(&dir);
        assert_eq!(loaded.snapshot.unwrap().lsn, 1);
        assert_eq!(loaded.damage.len(), 1);
        assert!(dir.join("snapshot.cbor.corrupt").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
