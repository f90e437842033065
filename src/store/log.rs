//! The input log: an append-only sequence of segment files of CRC-framed records, one per input
//! message, in receive order. A record is durable once [`InputLog::sync`] returns; only then is the
//! message acknowledged to the broker.
//!
//! Frame: `len: u32 LE | crc32(body): u32 LE | body`, body = `lsn: u64 | arrival_ms: i64 |
//! input: u16 | topic_len: u16 | topic | [trace] | payload`. A torn or corrupt tail (power cut
//! mid-write) fails its length or CRC check: recovery keeps every record before it and says what
//! it dropped.
//!
//! `[trace]` (a message's W3C trace context) is present only when bit 15 of `input` is set:
//! `trace_id: 16 | span_id: 8 | flags: u8 | state_len: u16 LE | state`. Records written before
//! it existed never have that bit set (inputs are numbered from 0), so they read as before.

use super::sync_dir;
use crate::model::trace::TraceContext;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Set in a record's `input` when a trace context follows the topic.
const HAS_TRACE: u16 = 0x8000;

/// Records larger than this are refused as corrupt on read (no payload is near it: payloads are
/// capped by `max_payload_bytes`, which must be below the MQTT packet limit).
const MAX_RECORD_BYTES: u32 = 64 * 1024 * 1024;

/// One logged input message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Log sequence number: position in receive order, unique across restarts.
    pub lsn: u64,
    pub arrival_ms: i64,
    pub input: u16,
    pub topic: String,
    pub payload: Vec<u8>,
    pub trace: Option<TraceContext>,
}

/// The writer side of the input log.
pub struct InputLog {
    dir: PathBuf,
    writer: BufWriter<File>,
    /// First LSN of the open segment.
    segment_start: u64,
    unsynced: bool,
    /// Bytes appended to the open segment, buffered or not.
    appended: u64,
    /// Bytes of the open segment known to be written whole (flushed or synced): where a rewrite
    /// after a failed write starts, so a torn record never sits before good ones.
    written: u64,
}

fn segment_name(first_lsn: u64) -> String {
    format!("{first_lsn:020}.wal")
}

/// Segments in the log dir with their first LSN, oldest first.
fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let lsn = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".wal"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(lsn) = lsn {
            found.push((lsn, path));
        }
    }
    found.sort();
    Ok(found)
}

/// A record to append, borrowing its topic and payload.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    pub lsn: u64,
    pub arrival_ms: i64,
    pub input: u16,
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub trace: Option<&'a TraceContext>,
}

impl LogRecord {
    pub fn as_ref(&self) -> RecordRef<'_> {
        RecordRef {
            lsn: self.lsn,
            arrival_ms: self.arrival_ms,
            input: self.input,
            topic: &self.topic,
            payload: &self.payload,
            trace: self.trace.as_ref(),
        }
    }
}

fn encode(record: RecordRef<'_>, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&record.lsn.to_le_bytes());
    out.extend_from_slice(&record.arrival_ms.to_le_bytes());
    let flag = if record.trace.is_some() { HAS_TRACE } else { 0 };
    out.extend_from_slice(&(record.input | flag).to_le_bytes());
    let topic = record.topic.as_bytes();
    let topic_len = u16::try_from(topic.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&topic_len.to_le_bytes());
    out.extend_from_slice(&topic[..usize::from(topic_len)]);
    if let Some(trace) = record.trace {
        out.extend_from_slice(&trace.trace_id);
        out.extend_from_slice(&trace.span_id);
        out.push(trace.flags);
        // The source keeps at most 512 bytes of tracestate.
        let state = trace.state.as_deref().unwrap_or_default().as_bytes();
        let state_len = u16::try_from(state.len()).unwrap_or(0);
        out.extend_from_slice(&state_len.to_le_bytes());
        out.extend_from_slice(&state[..usize::from(state_len)]);
    }
    out.extend_from_slice(record.payload);
    let body_len = u32::try_from(out.len() - 8).unwrap_or(u32::MAX);
    let crc = crc32fast::hash(&out[8..]);
    out[0..4].copy_from_slice(&body_len.to_le_bytes());
    out[4..8].copy_from_slice(&crc.to_le_bytes());
}

fn decode(body: &[u8]) -> Option<LogRecord> {
    let lsn = u64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
    let arrival_ms = i64::from_le_bytes(body.get(8..16)?.try_into().ok()?);
    let input = u16::from_le_bytes(body.get(16..18)?.try_into().ok()?);
    let topic_len = usize::from(u16::from_le_bytes(body.get(18..20)?.try_into().ok()?));
    let topic = std::str::from_utf8(body.get(20..20 + topic_len)?)
        .ok()?
        .to_owned();
    let mut at = 20 + topic_len;
    let trace = if input & HAS_TRACE != 0 {
        let fixed = body.get(at..at + 27)?;
        let state_len = usize::from(u16::from_le_bytes(fixed[25..27].try_into().ok()?));
        let state = std::str::from_utf8(body.get(at + 27..at + 27 + state_len)?).ok()?;
        at += 27 + state_len;
        Some(TraceContext {
            trace_id: fixed[0..16].try_into().ok()?,
            span_id: fixed[16..24].try_into().ok()?,
            flags: fixed[24],
            state: (!state.is_empty()).then(|| state.into()),
        })
    } else {
        None
    };
    let payload = body.get(at..)?.to_vec();
    Some(LogRecord {
        lsn,
        arrival_ms,
        input: input & !HAS_TRACE,
        topic,
        payload,
        trace,
    })
}

/// What recovery found in the log.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Valid records with `lsn >= from`, in LSN order.
    pub records: Vec<LogRecord>,
    /// The LSN after the last valid record seen (0 for an empty log).
    pub next_lsn: u64,
    /// Human-readable notes on corrupt or torn data that was skipped.
    pub damage: Vec<String>,
}

/// Reads every valid record with `lsn >= from`. Never fails on bad data: a torn or corrupt tail
/// ends that segment's records and is reported in [`Recovered::damage`].
///
/// # Errors
/// Only I/O errors listing or opening the log dir.
pub fn recover(dir: &Path, from: u64) -> std::io::Result<Recovered> {
    let mut recovered = Recovered::default();
    if !dir.exists() {
        return Ok(recovered);
    }
    for (_, path) in segments(dir)? {
        let mut bytes = Vec::new();
        File::open(&path)?.read_to_end(&mut bytes)?;
        let mut offset = 0usize;
        while offset < bytes.len() {
            let header = bytes.get(offset..offset + 8);
            let parsed = header.and_then(|h| {
                let len = u32::from_le_bytes(h[0..4].try_into().ok()?);
                let crc = u32::from_le_bytes(h[4..8].try_into().ok()?);
                if len > MAX_RECORD_BYTES {
                    return None;
                }
                let body = bytes.get(offset + 8..offset + 8 + len as usize)?;
                (crc32fast::hash(body) == crc).then_some(())?;
                decode(body).map(|record| (record, 8 + len as usize))
            });
            match parsed {
                Some((record, size)) => {
                    recovered.next_lsn = recovered.next_lsn.max(record.lsn + 1);
                    if record.lsn >= from {
                        recovered.records.push(record);
                    }
                    offset += size;
                }
                None => {
                    recovered.damage.push(format!(
                        "{}: {} bytes after offset {offset} are torn or corrupt and were skipped",
                        path.display(),
                        bytes.len() - offset
                    ));
                    break;
                }
            }
        }
    }
    recovered.records.sort_by_key(|r| r.lsn);
    recovered.records.dedup_by_key(|r| r.lsn);
    Ok(recovered)
}

impl InputLog {
    /// Opens a new segment starting at `next_lsn` (a restart never appends to an old segment, so
    /// a torn tail is never followed by new records in the same file).
    ///
    /// # Errors
    /// The log dir or segment cannot be created.
    pub fn open(dir: &Path, next_lsn: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let writer = Self::create_segment(dir, next_lsn)?;
        Ok(Self {
            dir: dir.to_owned(),
            writer,
            segment_start: next_lsn,
            unsynced: false,
            appended: 0,
            written: 0,
        })
    }

    /// Creates the segment whose first record is `first_lsn`. A file of that name can only
    /// exist if recovery found no valid record in it (else the next LSN would be past it): it
    /// is a torn first write, and is emptied, since records appended after a torn one would be
    /// unreadable.
    fn create_segment(dir: &Path, first_lsn: u64) -> std::io::Result<BufWriter<File>> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(segment_name(first_lsn)))?;
        file.set_len(0)?;
        sync_dir(dir)?;
        Ok(BufWriter::with_capacity(256 * 1024, file))
    }

    /// Appends a record (buffered; durable after [`sync`](Self::sync)).
    ///
    /// # Errors
    /// Write errors (disk full): the caller must not acknowledge the record.
    pub fn append(&mut self, record: RecordRef<'_>, scratch: &mut Vec<u8>) -> std::io::Result<()> {
        encode(record, scratch);
        self.unsynced = true;
        self.appended += scratch.len() as u64;
        self.writer.write_all(scratch)
    }

    /// Hands what was appended to the OS (it survives a crash of weir, not a power cut).
    ///
    /// # Errors
    /// Write errors.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()?;
        self.written = self.appended;
        Ok(())
    }

    /// Flushes and fsyncs what was appended.
    ///
    /// # Errors
    /// Write or sync errors: what was appended since the last sync is not durable.
    pub fn sync(&mut self) -> std::io::Result<()> {
        if self.unsynced {
            self.writer.flush()?;
            self.writer.get_ref().sync_data()?;
            self.unsynced = false;
            self.written = self.appended;
        }
        Ok(())
    }

    /// After a failed append, flush or sync: drops what the failed attempt may have left (the
    /// write buffer, and the open segment past its last whole write), writes `records` again
    /// and syncs them. Called with every record appended since the last successful
    /// [`flush`](Self::flush) or [`sync`](Self::sync), in order.
    ///
    /// A sync that failed once is never trusted to have written anything: after an fsync error
    /// the kernel may have dropped the dirty pages, so they are written again.
    ///
    /// # Errors
    /// The disk still refuses (full, or failing): call again later with the same records.
    pub fn rewrite<'a>(
        &mut self,
        records: impl IntoIterator<Item = RecordRef<'a>>,
        scratch: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        let placeholder = BufWriter::new(self.writer.get_ref().try_clone()?);
        let (file, _unwritten) = std::mem::replace(&mut self.writer, placeholder).into_parts();
        file.set_len(self.written)?;
        self.writer = BufWriter::with_capacity(256 * 1024, file);
        self.appended = self.written;
        self.unsynced = true;
        for record in records {
            self.append(record, scratch)?;
        }
        self.sync()
    }

    /// Starts a new segment at `next_lsn`, so segments before a snapshot can be deleted whole.
    ///
    /// # Errors
    /// As [`sync`](Self::sync) and [`open`](Self::open).
    pub fn rotate(&mut self, next_lsn: u64) -> std::io::Result<()> {
        if next_lsn == self.segment_start {
            return Ok(());
        }
        self.sync()?;
        self.writer = Self::create_segment(&self.dir, next_lsn)?;
        self.segment_start = next_lsn;
        self.appended = 0;
        self.written = 0;
        Ok(())
    }

    /// Deletes segments whose records all precede `lsn` (they are covered by a snapshot).
    ///
    /// # Errors
    /// Listing or deleting fails.
    pub fn truncate_before(&mut self, lsn: u64) -> std::io::Result<()> {
        let all = segments(&self.dir)?;
        for (i, (start, path)) in all.iter().enumerate() {
            let next_start = all.get(i + 1).map(|(s, _)| *s);
            let wholly_before = next_start.is_some_and(|next| next <= lsn);
            if wholly_before && *start != self.segment_start {
                std::fs::remove_file(path)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weir-log-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn record(lsn: u64) -> LogRecord {
        LogRecord {
            lsn,
            arrival_ms: 1000 + lsn as i64,
            input: 0,
            topic: format!("sensors/s1/d{lsn}/telemetry"),
            payload: format!("{{\"v\":{lsn}}}").into_bytes(),
            trace: None,
        }
    }

    #[test]
    fn a_trace_context_round_trips_and_records_without_one_keep_the_old_layout() {
        let traced = LogRecord {
            trace: TraceContext::parse(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Some("congo=t61rcWkgMzE"),
            ),
            input: 3,
            ..record(7)
        };
        let mut bytes = Vec::new();
        encode(traced.as_ref(), &mut bytes);
        assert_eq!(decode(&bytes[8..]), Some(traced.clone()));
        let stateless = LogRecord {
            trace: traced
                .trace
                .clone()
                .map(|t| TraceContext { state: None, ..t }),
            ..traced
        };
        encode(stateless.as_ref(), &mut bytes);
        assert_eq!(decode(&bytes[8..]), Some(stateless));

        // A body as weir wrote it before trace contexts existed.
        let mut old = Vec::new();
        old.extend_from_slice(&5u64.to_le_bytes());
        old.extend_from_slice(&1005i64.to_le_bytes());
        old.extend_from_slice(&0u16.to_le_bytes());
        let topic = b"sensors/s1/d5/telemetry";
        old.extend_from_slice(&(topic.len() as u16).to_le_bytes());
        old.extend_from_slice(topic);
        old.extend_from_slice(b"{\"v\":5}");
        assert_eq!(decode(&old), Some(record(5)));
        encode(record(5).as_ref(), &mut bytes);
        assert_eq!(&bytes[8..], &old[..]);
    }

    #[test]
    fn records_round_trip_across_segments() {
        let dir = temp("roundtrip");
        let mut log = InputLog::open(&dir, 0).unwrap();
        let mut scratch = Vec::new();
        for lsn in 0..5 {
            log.append(record(lsn).as_ref(), &mut scratch).unwrap();
        }
        log.rotate(5).unwrap();
        for lsn in 5..8 {
            log.append(record(lsn).as_ref(), &mut scratch).unwrap();
        }
        log.sync().unwrap();
        let recovered = recover(&dir, 3).unwrap();
        assert_eq!(recovered.records, (3..8).map(record).collect::<Vec<_>>());
        assert_eq!(recovered.next_lsn, 8);
        assert!(recovered.damage.is_empty());
        log.truncate_before(5).unwrap();
        assert_eq!(recover(&dir, 0).unwrap().records.len(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_rewrite_after_a_failed_write_replaces_the_torn_part_and_keeps_the_rest() {
        let dir = temp("rewrite");
        let mut log = InputLog::open(&dir, 0).unwrap();
        let mut scratch = Vec::new();
        for lsn in 0..3 {
            log.append(record(lsn).as_ref(), &mut scratch).unwrap();
        }
        log.sync().unwrap();
        log.append(record(3).as_ref(), &mut scratch).unwrap();
        // What a write cut short by a full disk leaves: part of a record past the good ones.
        let path = dir.join(segment_name(0));
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[0xAB; 11]).unwrap();
        drop(file);
        log.rewrite([record(3).as_ref(), record(4).as_ref()], &mut scratch)
            .unwrap();
        log.append(record(5).as_ref(), &mut scratch).unwrap();
        log.sync().unwrap();
        let recovered = recover(&dir, 0).unwrap();
        assert_eq!(recovered.records, (0..6).map(record).collect::<Vec<_>>());
        assert!(recovered.damage.is_empty(), "{:?}", recovered.damage);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_segment_torn_at_its_first_record_is_emptied_before_it_is_written_again() {
        let dir = temp("torn-first");
        std::fs::create_dir_all(&dir).unwrap();
        // A power cut during the first write of segment 4: recovery finds nothing valid in it,
        // so the next start opens segment 4 again.
        std::fs::write(dir.join(segment_name(4)), [0xCD; 7]).unwrap();
        let mut log = InputLog::open(&dir, 4).unwrap();
        let mut scratch = Vec::new();
        log.append(record(4).as_ref(), &mut scratch).unwrap();
        log.sync().unwrap();
        let recovered = recover(&dir, 0).unwrap();
        assert_eq!(recovered.records, vec![record(4)]);
        assert!(recovered.damage.is_empty(), "{:?}", recovered.damage);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_torn_tail_keeps_every_record_before_it() {
        let dir = temp("torn");
        let mut log = InputLog::open(&dir, 0).unwrap();
        let mut scratch = Vec::new();
        for lsn in 0..3 {
            log.append(record(lsn).as_ref(), &mut scratch).unwrap();
        }
        log.sync().unwrap();
        drop(log);
        let path = dir.join(segment_name(0));
        let len = std::fs::metadata(&path).unwrap().len();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len - 5).unwrap();
        let recovered = recover(&dir, 0).unwrap();
        assert_eq!(recovered.records, vec![record(0), record(1)]);
        assert_eq!(recovered.damage.len(), 1, "{:?}", recovered.damage);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_flipped_byte_is_caught_by_the_crc() {
        let dir = temp("crc");
        let mut log = InputLog::open(&dir, 0).unwrap();
        let mut scratch = Vec::new();
        for lsn in 0..3 {
            log.append(record(lsn).as_ref(), &mut scratch).unwrap();
        }
        log.sync().unwrap();
        drop(log);
        let path = dir.join(segment_name(0));
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let recovered = recover(&dir, 0).unwrap();
        assert_eq!(recovered.records.len(), 2);
        assert_eq!(recovered.damage.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
