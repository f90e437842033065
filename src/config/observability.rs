//! `[observability]`: what weir reports beyond `/metrics` and its logs (OTLP trace export).

use super::validate::Problems;
use serde::Deserialize;

/// Where weir reports what it does beyond `/metrics` and its logs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservabilityConfig {
    /// OTLP/HTTP collector base URL, e.g. `http://127.0.0.1:4318`: one span per derived event is
    /// POSTed (JSON) to `<url>/v1/traces`. Needs a weir built with the `otlp` cargo feature.
    pub otlp_endpoint: Option<String>,
}

pub(super) fn check_observability(observability: &ObservabilityConfig, problems: &mut Problems) {
    let Some(endpoint) = &observability.otlp_endpoint else {
        return;
    };
    if let Err(message) = super::endpoint::OtlpEndpoint::parse(endpoint) {
        problems.add("observability.otlp_endpoint", message);
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::line_of;
    use crate::config::{parse, Overrides, EXAMPLE};
    use std::path::Path;

    #[test]
    fn the_otlp_endpoint_is_plain_http_and_needs_the_feature() {
        let text =
            format!("{EXAMPLE}\n[observability]\notlp_endpoint = \"https://collector:4318\"\n");
        let err = parse(&text, Path::new("example.toml"), &Overrides::default()).unwrap_err();
        let problems = err.problems();
        assert!(
            problems
                .iter()
                .all(|p| p.path == "observability.otlp_endpoint"
                    && p.line_col.map(|lc| lc.0)
                        == Some(line_of(&text, "otlp_endpoint = \"https"))),
            "{err}"
        );
        assert!(
            problems.iter().any(|p| p.message.contains("plain HTTP")),
            "{err}"
        );
        assert_eq!(problems.len(), if cfg!(feature = "otlp") { 1 } else { 2 });

        let text =
            format!("{EXAMPLE}\n[observability]\notlp_endpoint = \"http://127.0.0.1:4318\"\n");
        let parsed = parse(&text, Path::new("example.toml"), &Overrides::default());
        if cfg!(feature = "otlp") {
            parsed.unwrap();
        } else {
            let err = parsed.unwrap_err();
            assert!(err.to_string().contains("--features otlp"), "{err}");
        }
    }
}
