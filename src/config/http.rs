//! `[http]`: where `/metrics`, `/healthz` and the API listen, and the bearer token the API asks for.

use super::Secret;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The HTTP endpoint for `/metrics` and `/healthz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// File holding a bearer token that `/api/*` requests must present
    /// (`Authorization: Bearer TOKEN`); `/metrics`, `/healthz` and `/readyz` stay open. The env
    /// var `WEIR_API_TOKEN` replaces it.
    pub api_token_file: Option<PathBuf>,
    /// From `WEIR_API_TOKEN` (set through [`Overrides`](super::Overrides), never from the file).
    #[serde(skip)]
    pub api_token_env: Option<Secret>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            api_token_file: None,
            api_token_env: None,
        }
    }
}

impl HttpConfig {
    /// The token `/api/*` requires, if any: `WEIR_API_TOKEN`, else the file's content (trimmed).
    ///
    /// # Errors
    /// The file cannot be read or is empty; the message names it.
    pub fn api_token(&self) -> anyhow::Result<Option<Secret>> {
        if let Some(token) = &self.api_token_env {
            return Ok(Some(token.clone()));
        }
        let Some(path) = &self.api_token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|err| {
            anyhow::anyhow!(
                "cannot read http.api_token_file {}: {err}; give weir read access or remove the key",
                path.display()
            )
        })?;
        let token = text.trim();
        if token.is_empty() {
            anyhow::bail!(
                "http.api_token_file {} is empty; write the token into it",
                path.display()
            );
        }
        Ok(Some(Secret::new(token)))
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}
