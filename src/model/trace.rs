//! W3C trace context: a reading's `traceparent` / `tracestate` (MQTT 5 user properties), carried
//! to the events it causes with a new span id each.

use std::cell::Cell;
use std::sync::Arc;

/// The user property holding the W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// The user property holding the W3C `tracestate`.
pub const TRACESTATE: &str = "tracestate";

/// A `tracestate` longer than this is not passed on. W3C asks vendors to propagate at least
/// 512 characters; a longer one most likely is not a trace state at all.
const MAX_TRACESTATE_BYTES: usize = 512;

/// One position in a trace: which trace, which span, and the trace flags (bit 0: sampled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
    /// The `tracestate` that came with it, passed on untouched (shared, not copied, by the
    /// events of one reading).
    pub state: Option<Arc<str>>,
}

/// What a message's properties said about its trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// No `traceparent` (and always with MQTT 3.1.1, which has no properties).
    Absent,
    Valid(Arc<TraceContext>),
    /// A `traceparent` that is not valid W3C version 00: ignored, and counted.
    Invalid,
}

impl TraceContext {
    /// Parses a W3C `traceparent` of version 00 (`00-<32 hex>-<16 hex>-<2 hex>`, lowercase, the
    /// trace and parent ids not all zero); `None` when it is anything else. A `tracestate` is
    /// kept only with a valid `traceparent`, as W3C requires.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let bytes = traceparent.as_bytes();
        if bytes.len() != 55 || bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        if &bytes[..2] != b"00" {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        let mut flags = [0u8; 1];
        hex_decode(&bytes[3..35], &mut trace_id)?;
        hex_decode(&bytes[36..52], &mut span_id)?;
        hex_decode(&bytes[53..55], &mut flags)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        let state = tracestate
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE_BYTES)
            .filter(|s| s.bytes().all(|b| (0x20..0x7f).contains(&b)))
            .map(Arc::from);
        Some(Self {
            trace_id,
            span_id,
            flags: flags[0],
            state,
        })
    }

    /// Reads the trace context from MQTT 5 user properties. Two `traceparent`s make it invalid
    /// (W3C: a receiver cannot tell which one is meant).
    pub fn from_user_properties(properties: &[(String, String)]) -> Incoming {
        let mut parent = None;
        let mut state = None;
        for (key, value) in properties {
            if key == TRACEPARENT {
                if parent.is_some() {
                    return Incoming::Invalid;
                }
                parent = Some(value.as_str());
            } else if key == TRACESTATE && state.is_none() {
                state = Some(value.as_str());
            }
        }
        match parent {
            None => Incoming::Absent,
            Some(parent) => match Self::parse(parent, state) {
                Some(context) => Incoming::Valid(Arc::new(context)),
                None => Incoming::Invalid,
            },
        }
    }

    /// The span of an event this context caused: same trace, same flags and state, a new span id.
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id,
            span_id: new_span_id(),
            flags: self.flags,
            state: self.state.clone(),
        }
    }

    /// The first span of a new trace (sampled), for an event whose reading carried none.
    pub fn root() -> Self {
        let mut trace_id = [0u8; 16];
        while trace_id == [0; 16] {
            trace_id[..8].copy_from_slice(&random_u64().to_be_bytes());
            trace_id[8..].copy_from_slice(&random_u64().to_be_bytes());
        }
        Self {
            trace_id,
            span_id: new_span_id(),
            flags: 0x01,
            state: None,
        }
    }

    /// The W3C `traceparent` of this context.
    pub fn traceparent(&self) -> String {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        hex_encode(&self.trace_id, &mut out);
        out.push('-');
        hex_encode(&self.span_id, &mut out);
        out.push('-');
        hex_encode(&[self.flags], &mut out);
        out
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        let mut out = String::with_capacity(32);
        hex_encode(&self.trace_id, &mut out);
        out
    }
}

/// Appends `bytes` as lowercase hex.
pub fn hex_encode(bytes: &[u8], out: &mut String) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
}

/// Lowercase hex only: W3C refuses upper case in `traceparent`.
fn hex_decode(hex: &[u8], out: &mut [u8]) -> Option<()> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(())
}

/// A random span id, never all zero.
fn new_span_id() -> [u8; 8] {
    loop {
        let id = random_u64();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// A random u64 from a per-thread generator (SplitMix64). Span and trace ids must be unique, not
/// secret, and this runs once per traced event on the worker's hot path, so it is seeded once
/// per thread from std's randomly keyed hasher and never takes a lock or a system call after.
fn random_u64() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            use std::hash::{BuildHasher, Hasher};
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            hasher.finish()
        });
    }
    STATE.with(|state| {
        let next = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(next);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_w3c_traceparent_round_trips() {
        let context = TraceContext::parse(PARENT, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(context.traceparent(), PARENT);
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.flags, 1);
        assert_eq!(context.state.as_deref(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
        ] {
            assert_eq!(TraceContext::parse(bad, None), None, "{bad:?}");
        }
    }

    #[test]
    fn user_properties_give_absent_valid_or_invalid() {
        let props = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert_eq!(
            TraceContext::from_user_properties(&props(&[("x", "y")])),
            Incoming::Absent
        );
        assert!(matches!(
            TraceContext::from_user_properties(&props(&[(TRACEPARENT, PARENT)])),
            Incoming::Valid(_)
        ));
        assert_eq!(
            TraceContext::from_user_properties(&props(&[(TRACEPARENT, "00-zz")])),
            Incoming::Invalid
        );
        assert_eq!(
            TraceContext::from_user_properties(&props(&[
                (TRACEPARENT, PARENT),
                (TRACEPARENT, PARENT)
            ])),
            Incoming::Invalid
        );
    }

    #[test]
    fn a_child_keeps_trace_flags_and_state_with_a_new_nonzero_span() {
        let parent = TraceContext::parse(PARENT, Some("a=b")).unwrap();
        let first = parent.child();
        let second = parent.child();
        for child in [&first, &second] {
            assert_eq!(child.trace_id, parent.trace_id);
            assert_eq!(child.flags, parent.flags);
            assert_eq!(child.state, parent.state);
            assert_ne!(child.span_id, parent.span_id);
            assert_ne!(child.span_id, [0; 8]);
        }
        assert_ne!(first.span_id, second.span_id);
        let root = TraceContext::root();
        assert_ne!(root.trace_id, [0; 16]);
        assert_ne!(root.trace_id, TraceContext::root().trace_id);
    }
}
