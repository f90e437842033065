//! Just enough MQTT 3.1.1 for the benches' own publishers and probes: packets encoded and read
//! by hand, so that generating load costs a few instructions per message and leaves the CPU to
//! weir and the broker. Included by `e2e.rs` and `soak.rs` (each bench is a crate of its own).

// Each bench uses a different subset.
#![allow(dead_code)]

use std::io::Read;

/// Appends an MQTT variable-length integer (the remaining length of a packet).
pub fn push_len(buf: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        buf.push(byte);
        if n == 0 {
            break;
        }
    }
}

/// Appends a length-prefixed string.
pub fn push_str(buf: &mut Vec<u8>, s: &[u8]) {
    buf.extend_from_slice(&(s.len() as u16).to_be_bytes());
    buf.extend_from_slice(s);
}

/// Appends a PUBLISH; `pkid` is written only with QoS above 0.
pub fn push_publish(buf: &mut Vec<u8>, topic: &[u8], payload: &[u8], qos: u8, pkid: u16) {
    buf.push(0x30 | (qos << 1));
    push_len(
        buf,
        2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload.len(),
    );
    push_str(buf, topic);
    if qos > 0 {
        buf.extend_from_slice(&pkid.to_be_bytes());
    }
    buf.extend_from_slice(payload);
}

/// Reads one packet: its first byte and its body.
pub fn read_packet(reader: &mut impl Read, body: &mut Vec<u8>) -> std::io::Result<u8> {
    let mut byte = [0u8; 1];
    reader.read_exact(&mut byte)?;
    let kind = byte[0];
    let (mut len, mut shift) = (0usize, 0);
    loop {
        reader.read_exact(&mut byte)?;
        len |= usize::from(byte[0] & 0x7f) << shift;
        shift += 7;
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    body.resize(len, 0);
    reader.read_exact(body)?;
    Ok(kind)
}
