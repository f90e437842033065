//! Telemetry that leaves the process: the HTTP endpoints ([`http`]: `/metrics`, health, the
//! rules API, the live tap, reloads) and, with the `otlp` cargo feature, the span exporter
//! (`otlp`). The handles the stages record into live in `metrics`.

pub mod http;
#[cfg(feature = "otlp")]
pub mod otlp;

use std::sync::Arc;

/// The span exporter of a running weir: an OTLP exporter when built with the `otlp` feature and
/// `observability.otlp_endpoint` is set, else nothing.
pub struct Export {
    #[cfg(feature = "otlp")]
    exporter: Option<otlp::Exporter>,
}

impl Export {
    /// Starts exporting the spans recorded in `metrics.spans`, if configured.
    ///
    /// # Errors
    /// The endpoint is invalid (validation catches that first).
    pub fn start(
        config: &crate::config::Config,
        metrics: &Arc<crate::metrics::Metrics>,
    ) -> anyhow::Result<Self> {
        #[cfg(feature = "otlp")]
        {
            let exporter = match &config.observability.otlp_endpoint {
                Some(url) => {
                    let endpoint = crate::config::endpoint::OtlpEndpoint::parse(url)
                        .map_err(anyhow::Error::msg)?;
                    otlp::start(endpoint, &config.broker.client_id, metrics)
                }
                None => None,
            };
            Ok(Self { exporter })
        }
        #[cfg(not(feature = "otlp"))]
        {
            let _ = (config, metrics);
            Ok(Self {})
        }
    }

    /// Sends the spans still queued and stops; call it once the workers have ended.
    pub async fn stop(self) {
        #[cfg(feature = "otlp")]
        if let Some(exporter) = self.exporter {
            exporter.stop().await;
        }
    }
}
