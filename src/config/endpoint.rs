//! Endpoint URLs parsed at config load, so validation can report a bad one with its line: the
//! broker (`mqtt://host:port`, `mqtts://`) and the OTLP collector (`http://host:port/path`).
//! Every message quotes the URL through [`redact_url`], so credentials never show.

use super::redact_url;

/// Host, port and transport parsed from `mqtt://host:port` or `mqtts://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerEndpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerEndpoint {
    /// # Errors
    /// A sentence saying what is wrong with the URL and what a valid one looks like. The URL is
    /// quoted through [`redact_url`]: a URL refused for carrying credentials must not print them.
    pub fn parse(url: &str) -> Result<Self, String> {
        let shown = redact_url(url);
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            return Err(format!(
                "`{shown}` is not a broker URL; write mqtt://host:port, or mqtts://host:port for TLS"
            ));
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.contains('@') {
            return Err(format!(
                "`{shown}` has a path or credentials; give only host and port, and put credentials in broker.username / broker.password"
            ));
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            // [::1]:1883
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("`{shown}`: an IPv6 host needs a closing `]`"))?;
            let port = match after.strip_prefix(':') {
                Some(port) => parse_port(&shown, port)?,
                None if after.is_empty() => default_port,
                None => return Err(format!("`{shown}`: expected `:port` after `]`")),
            };
            (host.to_owned(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host.to_owned(), parse_port(&shown, port)?),
                None => (rest.to_owned(), default_port),
            }
        };
        if host.is_empty() {
            return Err(format!(
                "`{shown}` has no host; write e.g. mqtt://127.0.0.1:1883"
            ));
        }
        Ok(Self { host, port, tls })
    }
}

/// `shown` is the URL as it may be printed; the port is redacted too, since whatever follows
/// the last colon (`1883?token=...`) lands in it.
fn parse_port(shown: &str, port: &str) -> Result<u16, String> {
    port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
        format!(
            "`{shown}`: `{}` is not a port number (1-65535)",
            redact_url(port)
        )
    })
}

/// An OTLP/HTTP collector address: `http://host:port` with an optional base path, to which
/// `/v1/traces` is appended (as the OTLP spec's `OTEL_EXPORTER_OTLP_ENDPOINT` does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpEndpoint {
    pub host: String,
    pub port: u16,
    /// The path spans are POSTed to, e.g. `/v1/traces`.
    pub path: String,
}

impl OtlpEndpoint {
    /// # Errors
    /// A sentence saying what is wrong and what a valid endpoint looks like; the URL is quoted
    /// through [`redact_url`], so a refused endpoint with credentials does not print them.
    pub fn parse(url: &str) -> Result<Self, String> {
        let shown = redact_url(url);
        if url.starts_with("https://") {
            return Err(format!(
                "`{shown}`: weir sends OTLP over plain HTTP; run a collector on this gateway (e.g. http://127.0.0.1:4318) and let it forward over TLS"
            ));
        }
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(format!(
                "`{shown}` is not an OTLP/HTTP endpoint; write http://host:port, e.g. http://127.0.0.1:4318"
            ));
        };
        let (authority, base) = match rest.find('/') {
            Some(at) => (&rest[..at], rest[at..].trim_end_matches('/')),
            None => (rest, ""),
        };
        // Before the port is parsed: with credentials, the text after the last colon is not one.
        if authority.contains('@') {
            return Err(format!(
                "`{shown}` needs a host and no credentials; write e.g. http://127.0.0.1:4318"
            ));
        }
        let port_of = |port: &str| {
            port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                format!(
                    "`{shown}`: `{}` is not a port number (1-65535)",
                    redact_url(port)
                )
            })
        };
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("`{shown}`: an IPv6 host needs a closing `]`"))?;
            match after.strip_prefix(':') {
                Some(port) => (host, port_of(port)?),
                None if after.is_empty() => (host, 80),
                None => return Err(format!("`{shown}`: expected `:port` after `]`")),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, port_of(port)?),
                None => (authority, 80),
            }
        };
        if host.is_empty() {
            return Err(format!(
                "`{shown}` needs a host and no credentials; write e.g. http://127.0.0.1:4318"
            ));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            path: format!("{base}/v1/traces"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_ports_and_schemes() {
        assert_eq!(
            BrokerEndpoint::parse("mqtt://127.0.0.1:1884").unwrap(),
            BrokerEndpoint {
                host: "127.0.0.1".into(),
                port: 1884,
                tls: false
            }
        );
        assert_eq!(BrokerEndpoint::parse("mqtts://broker").unwrap().port, 8883);
        assert_eq!(
            BrokerEndpoint::parse("mqtt://[::1]:1883").unwrap().host,
            "::1"
        );
        assert!(BrokerEndpoint::parse("tcp://x:1").is_err());
        assert!(BrokerEndpoint::parse("mqtt://x:99999").is_err());
        assert!(BrokerEndpoint::parse("mqtt://:1883").is_err());
    }

    #[test]
    fn a_refused_url_does_not_print_its_password() {
        for url in [
            "mqtt://weir:s3cret@127.0.0.1:1883",
            "mqtts://weir:s3cret@broker/path",
            "weir:s3cret@127.0.0.1:1883",
            "mqtt://127.0.0.1:1883?password=s3cret",
            "mqtt://[::1]:1883?token=s3cret",
        ] {
            let err = BrokerEndpoint::parse(url).unwrap_err();
            assert!(!err.contains("s3cret"), "{url}: {err}");
            assert!(err.contains("***"), "{url}: {err}");
        }
        let err = BrokerEndpoint::parse("mqtt://weir:s3cret@127.0.0.1:1883").unwrap_err();
        assert!(err.contains("`mqtt://weir:***@127.0.0.1:1883` has a path or credentials"));
    }

    #[test]
    fn otlp_endpoints_are_http_with_an_optional_base_path() {
        let endpoint = OtlpEndpoint::parse("http://127.0.0.1:4318").unwrap();
        assert_eq!(
            (
                endpoint.host.as_str(),
                endpoint.port,
                endpoint.path.as_str()
            ),
            ("127.0.0.1", 4318, "/v1/traces")
        );
        let endpoint = OtlpEndpoint::parse("http://collector/otlp/").unwrap();
        assert_eq!(
            (
                endpoint.host.as_str(),
                endpoint.port,
                endpoint.path.as_str()
            ),
            ("collector", 80, "/otlp/v1/traces")
        );
        assert_eq!(
            OtlpEndpoint::parse("http://[::1]:4318").unwrap().host,
            "::1"
        );
        assert!(OtlpEndpoint::parse("https://x:4318").is_err());
        assert!(OtlpEndpoint::parse("grpc://x:4317").is_err());
        assert!(OtlpEndpoint::parse("http://:4318").is_err());
        assert!(OtlpEndpoint::parse("http://x:0").is_err());
    }

    #[test]
    fn a_refused_otlp_endpoint_does_not_print_its_credentials() {
        for url in [
            "http://weir:s3cret@127.0.0.1:4318",
            "http://weir:s3cret@collector",
            "https://weir:s3cret@collector:4318",
            "http://collector:4318?token=s3cret",
            "otlp://weir:s3cret@collector",
        ] {
            let err = OtlpEndpoint::parse(url).unwrap_err();
            assert!(!err.contains("s3cret"), "{url}: {err}");
            assert!(err.contains("***"), "{url}: {err}");
        }
    }
}
