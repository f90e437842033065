//! `weir record`: captures live MQTT traffic into the JSON-lines format that replay reads, each
//! message stamped with its arrival time (`received`, ms), so a replay sees the same clock.

use super::base64_encode;
use crate::config::BrokerConfig;
use crate::metrics::Metrics;
use crate::model::port::{Delivery, Source};
use crate::source::mqtt::MqttSource;
use rumqttc::QoS;
use std::future::Future;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

/// What to record, and when to stop (the first of `count`, `duration` and the shutdown future).
#[derive(Debug, Clone)]
pub struct RecordOptions {
    pub broker: BrokerConfig,
    /// Topic filters to subscribe to (`+` and `#` allowed).
    pub filters: Vec<String>,
    pub count: Option<u64>,
    pub duration: Option<Duration>,
}

/// One message as a JSON line: `payload` when it is JSON on one line (kept byte for byte),
/// `payload_text` when it is other UTF-8 text, `payload_b64` otherwise (CBOR, binary).
pub fn line(topic: &str, payload: &[u8], received: i64) -> String {
    let topic = serde_json::to_string(topic).unwrap_or_default();
    let is_json = !payload.iter().any(|b| matches!(b, b'\n' | b'\r'))
        && serde_json::from_slice::<&serde_json::value::RawValue>(payload)
            .is_ok_and(|raw| raw.get().len() == payload.len());
    let body = if is_json {
        format!(r#""payload":{}"#, String::from_utf8_lossy(payload))
    } else if let Ok(text) = std::str::from_utf8(payload) {
        format!(
            r#""payload_text":{}"#,
            serde_json::to_string(text).unwrap_or_default()
        )
    } else {
        format!(r#""payload_b64":"{}""#, base64_encode(payload))
    };
    format!(r#"{{"topic":{topic},"received":{received},{body}}}"#)
}

/// Subscribes and writes every message to `out` as a line, flushed per message (so a recording
/// cut short keeps what it has), until a stop condition. Returns the messages written.
///
/// # Errors
/// The connection options are invalid (a bad url or unreadable TLS file), or writing failed.
pub async fn record(
    options: RecordOptions,
    out: &mut impl Write,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<u64> {
    if options.filters.is_empty() {
        anyhow::bail!("nothing to record: give --topic, or --config with inputs");
    }
    // A client id of its own and a clean session: recording must neither take over weir's
    // session nor leave one behind on the broker.
    let mut mqtt = crate::mqtt::connection_options(&options.broker, "-record")?;
    mqtt.set_clean_session(true);
    let filters = options
        .filters
        .iter()
        .map(|f| (f.clone(), QoS::AtLeastOnce))
        .collect();
    // Through the same source port as intake: reconnects with backoff, resubscribes, and
    // speaks the broker.protocol the config names.
    let mut source = MqttSource::new(mqtt, false, filters, Arc::new(Metrics::new()));
    let deadline = async {
        match options.duration {
            Some(duration) => tokio::time::sleep(duration).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(shutdown);
    tokio::pin!(deadline);
    let mut written = 0u64;
    if options.count == Some(0) {
        return Ok(0);
    }
    loop {
        let delivery = tokio::select! {
            () = &mut shutdown => break,
            () = &mut deadline => break,
            delivery = source.next() => delivery,
        };
        if let Delivery::Message(message) = delivery {
            let received = crate::model::time::wall_clock_ms();
            writeln!(out, "{}", line(&message.topic, &message.payload, received))?;
            out.flush()?;
            written += 1;
            if options.count.is_some_and(|count| written >= count) {
                break;
            }
        }
    }
    source.close(None).await;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_keep_json_text_and_binary_payloads_exactly() {
        for payload in [
            &br#"{"ts": 1, "temperature": 21.50}"#[..],
            b"offline",
            b"{\"a\":\n1}",
            &[0xa1, 0x61, 0x74, 0xf9, 0x3c, 0x00],
            b"",
        ] {
            let text = line("sensors/s1/d1/telemetry", payload, 42);
            assert!(!text.contains('\n'), "{text}");
            let record = super::super::parse_line(&text).expect("parses");
            assert_eq!(&record.payload[..], payload, "{text}");
            assert_eq!(record.received, Some(42));
            assert_eq!(record.topic, "sensors/s1/d1/telemetry");
        }
        assert!(line("t", br#"{"a":1}"#, 1).contains(r#""payload":{"a":1}"#));
    }
}
