//! Discrete change (eKuiper's `changed_col`, Kapacitor's `stateChangesOnly`): emits `from`/`to`
//! when a string, bool or integer field changes, e.g. door `open` -> `closed`, mode `auto` ->
//! `manual`. Optional flapping suppression per field.

use super::flapping::{FlapState, Flapping, Verdict};
use super::{in_order, Operator, Output, RuleMeta};
use crate::config::ChangeConfig;
use crate::decode::{DiscreteValue, Reading};
use crate::model::event::EventBody;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A built change rule.
#[derive(Debug, Clone)]
pub struct Change {
    rule: RuleMeta,
    /// Field names and their slots among the input's discrete fields.
    fields: Vec<(Arc<str>, usize)>,
    emit_initial: bool,
    flapping: Option<Flapping>,
}

/// One field of one device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct FieldState {
    current: Option<DiscreteValue>,
    /// What consumers last saw (differs from `current` only while flapping).
    published: Option<DiscreteValue>,
    flap: FlapState,
}

/// Per-device state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChangeState {
    last_ts: Option<i64>,
    fields: Vec<FieldState>,
}

impl Change {
    /// Builds from validated config; `slots` are the fields' discrete slots.
    pub fn new(rule: RuleMeta, config: &ChangeConfig, slots: Vec<usize>) -> Self {
        Self {
            rule,
            fields: config
                .fields
                .iter()
                .map(|f| Arc::from(f.as_str()))
                .zip(slots)
                .collect(),
            emit_initial: config.emit_initial,
            flapping: config.flapping.as_ref().map(Flapping::new),
        }
    }

    fn change(
        &self,
        field: &Arc<str>,
        from: Option<DiscreteValue>,
        to: DiscreteValue,
        reading: &Reading<'_>,
        out: &mut Output,
    ) {
        let key = serde_json::to_vec(&to).unwrap_or_default();
        out.events.push(self.rule.event(
            reading.origin,
            reading.ts,
            &[field.as_bytes(), &key],
            EventBody::Change {
                field: field.clone(),
                from,
                to,
            },
            Some(reading),
        ));
    }

    fn flapping_event(
        &self,
        field: &Arc<str>,
        to: &'static str,
        current: &DiscreteValue,
        changes: u32,
        reading: &Reading<'_>,
        out: &mut Output,
    ) {
        let state = match current {
            DiscreteValue::Text(text) => Arc::from(text.as_str()),
            other => Arc::from(serde_json::to_string(other).unwrap_or_default()),
        };
        out.events.push(self.rule.event(
            reading.origin,
            reading.ts,
            &[field.as_bytes(), to.as_bytes()],
            EventBody::Flapping {
                metric: field.clone(),
                from: if to == "flapping" {
                    "settled"
                } else {
                    "flapping"
                },
                to,
                state,
                changes,
            },
            Some(reading),
        ));
    }
}

impl Operator for Change {
    type State = ChangeState;

    fn on_reading(&self, state: &mut ChangeState, reading: &Reading<'_>, out: &mut Output) {
        if self
            .fields
            .iter()
            .all(|(_, s)| reading.discrete[*s].get().is_none())
        {
            return;
        }
        // An older reading would report a change back to a stale value; ignored and counted.
        if !in_order(&mut state.last_ts, reading.ts, out) {
            return;
        }
        if state.fields.len() < self.fields.len() {
            state
                .fields
                .resize_with(self.fields.len(), Default::default);
        }
        for ((field, slot), fs) in self.fields.iter().zip(&mut state.fields) {
            let Some(value) = reading.discrete[*slot].get() else {
                continue;
            };
            if let Some(flapping) = &self.flapping {
                if flapping.settles(&mut fs.flap, reading.ts) {
                    if let Some(current) = fs.current.clone() {
                        self.flapping_event(field, "settled", &current, 0, reading, out);
                        if fs.published.as_ref() != Some(&current) {
                            self.change(field, fs.published.take(), current.clone(), reading, out);
                            fs.published = Some(current);
                        }
                    }
                }
            }
            let Some(current) = &fs.current else {
                // The first value of a device is its baseline.
                let value = DiscreteValue::from(value);
                fs.current = Some(value.clone());
                fs.published = Some(value.clone());
                if self.emit_initial {
                    self.change(field, None, value, reading, out);
                }
                continue;
            };
            if current.is(value) {
                continue;
            }
            let to = DiscreteValue::from(value);
            fs.current = Some(to.clone());
            let verdict = match &self.flapping {
                Some(flapping) => flapping.on_transition(&mut fs.flap, reading.ts),
                None => Verdict::Publish,
            };
            match verdict {
                Verdict::Publish => {
                    let from = fs.published.replace(to.clone());
                    self.change(field, from, to, reading, out);
                }
                Verdict::Started { changes } => {
                    self.flapping_event(field, "flapping", &to, changes, reading, out)
                }
                Verdict::Held => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FlappingConfig;
    use crate::decode::{Discrete, DiscreteSlot};
    use crate::operators::test_support::{discrete_reading, origin};
    use std::time::Duration;

    fn change(emit_initial: bool, flapping: Option<FlappingConfig>) -> Change {
        let config = ChangeConfig {
            fields: vec!["door".into(), "mode".into()],
            emit_initial,
            flapping,
        };
        let rule = RuleMeta {
            index: 0,
            name: "door".into(),
        };
        Change::new(rule, &config, vec![0, 1])
    }

    fn slot(value: Option<Discrete<'_>>) -> DiscreteSlot {
        value.map(DiscreteSlot::of).unwrap_or_default()
    }

    /// Every event as `field:from->to@ts` (JSON values) or `flapping:from->to@ts`.
    fn run(
        op: &Change,
        readings: &[(i64, Option<Discrete<'_>>, Option<Discrete<'_>>)],
    ) -> (Vec<String>, Output) {
        let origin = origin("d1");
        let mut state = ChangeState::default();
        let mut out = Output::default();
        for (ts, door, mode) in readings {
            let slots = [slot(*door), slot(*mode)];
            op.on_reading(
                &mut state,
                &discrete_reading(&origin, *ts, &slots),
                &mut out,
            );
        }
        let json = |v: &DiscreteValue| serde_json::to_string(v).unwrap();
        let events = out
            .events
            .iter()
            .map(|e| match &e.body {
                EventBody::Change { field, from, to } => format!(
                    "{field}:{}->{}@{}",
                    from.as_ref().map_or("none".into(), json),
                    json(to),
                    e.ts
                ),
                EventBody::Flapping { from, to, .. } => format!("flapping:{from}->{to}@{}", e.ts),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        (events, out)
    }

    use Discrete::{Bool, Int, Text};

    #[test]
    fn emits_from_and_to_when_a_field_changes() {
        let (events, _) = run(
            &change(false, None),
            &[
                (1, Some(Text("open")), Some(Text("auto"))),
                (2, Some(Text("open")), Some(Text("auto"))),
                (3, Some(Text("closed")), None),
                (4, None, Some(Text("manual"))),
                (5, Some(Bool(true)), Some(Int(3))),
            ],
        );
        assert_eq!(
            events,
            [
                r#"door:"open"->"closed"@3"#,
                r#"mode:"auto"->"manual"@4"#,
                r#"door:"closed"->true@5"#,
                r#"mode:"manual"->3@5"#,
            ]
        );
    }

    #[test]
    fn emit_initial_reports_the_first_value_without_from() {
        let (events, _) = run(&change(true, None), &[(1, Some(Int(1)), None)]);
        assert_eq!(events, ["door:none->1@1"]);
    }

    #[test]
    fn flapping_fields_are_held_back_until_they_settle() {
        let flapping = FlappingConfig {
            max_changes: 2,
            within: Duration::from_secs(10),
        };
        let (events, _) = run(
            &change(false, Some(flapping)),
            &[
                (0, Some(Bool(false)), None),
                (1_000, Some(Bool(true)), None),
                (2_000, Some(Bool(false)), None),
                (3_000, Some(Bool(true)), None),
                (4_000, Some(Bool(false)), None),
                (5_000, Some(Bool(true)), None),
                (15_000, Some(Bool(true)), None),
            ],
        );
        assert_eq!(
            events,
            [
                "door:false->true@1000",
                "door:true->false@2000",
                "flapping:settled->flapping@3000",
                "flapping:flapping->settled@15000",
                "door:false->true@15000",
            ]
        );
    }

    #[test]
    fn older_readings_are_ignored_and_counted() {
        let (events, out) = run(
            &change(false, None),
            &[
                (10, Some(Text("open")), None),
                (5, Some(Text("closed")), None),
                (11, Some(Text("open")), None),
            ],
        );
        assert!(events.is_empty());
        assert_eq!(out.out_of_order, 1);
    }
}
