//! Local durability in the state dir: the input log ([`log`]) that makes a reading durable before
//! it is acknowledged to the broker, and [`snapshot`]s of operator state and the outbox that bound
//! how much of the log a restart replays.
//!
//! Recovery = the newest valid snapshot + every logged input after its LSN, replayed through the
//! same engine. Derived events are deterministic, so what a replay re-publishes carries the ids
//! consumers already saw.

pub mod log;
pub mod snapshot;
pub mod writer;

pub use log::{InputLog, LogRecord};
pub use snapshot::{DeviceSnapshot, Snapshot, StoredMessage};

use std::path::{Path, PathBuf};

/// The state dir and the files in it.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// Opens (creating if needed) the state dir.
    ///
    /// # Errors
    /// The directory cannot be created or written; the message says which and what to do.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path).map_err(|err| {
            anyhow::anyhow!(
                "cannot create the state dir {}: {err}; create it with write access for weir, or pass --state-dir",
                path.display()
            )
        })?;
        let probe = path.join(".write-test");
        std::fs::write(&probe, b"ok").map_err(|err| {
            anyhow::anyhow!(
                "the state dir {} is not writable: {err}; give weir write access or pass --state-dir",
                path.display()
            )
        })?;
        let _ = std::fs::remove_file(probe);
        Ok(Self {
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Directory of the input log segments.
    pub fn log_dir(&self) -> PathBuf {
        self.path.join("log")
    }
}

/// fsyncs a directory so a rename or a new file in it survives a power cut.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
