//! Device origins for the operator benches: `sensors/plant-1/dev-N/telemetry`, one per device.

use weir::decode::Origin;

/// `count` origins, the device numbers written with `width` digits.
pub fn origins(count: usize, width: usize) -> Vec<Origin> {
    (0..count)
        .map(|d| {
            let topic = format!("sensors/plant-1/dev-{d:0width$}/telemetry");
            // "sensors/plant-1/" is 16 bytes; the device segment is "dev-" and the digits.
            let captures = ["plant-1", &topic[16..20 + width]];
            Origin::new(
                vec!["site".to_owned(), "device".to_owned()].into(),
                1,
                &topic,
                &captures,
            )
        })
        .collect()
}
