//! Secrets in the config and in what weir prints: [`Secret`] holds a password or token, and
//! [`redact_url`] is the one place that hides the credentials a URL may carry, for every error,
//! log line and API answer that echoes a URL.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Cow;
use std::fmt;

/// A value that must never reach a log, an error or an API answer: `Debug`, `Display` and
/// `Serialize` all give `***`. Read it with [`Secret::expose`], only where it is handed to the
/// broker connection or compared with a presented token.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; for the connection options and the token check only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// What every printed form of a secret shows.
pub const REDACTED: &str = "***";

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

/// Accepts a string only. serde's own type error quotes the value (``invalid type: integer
/// `123456`, expected a string``), and a password written without quotes would then be printed
/// by `weir check`, the service log and a refused reload.
impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        fn not_a_string<E: serde::de::Error>(found: &str) -> E {
            E::custom(format!(
                "expected a string in quotes, found {found} (not repeated here: it is a secret); write e.g. password = \"...\""
            ))
        }

        impl serde::de::Visitor<'_> for Visitor {
            type Value = Secret;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string in quotes")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Secret, E> {
                Ok(Secret::new(value))
            }

            fn visit_string<E: serde::de::Error>(self, value: String) -> Result<Secret, E> {
                Ok(Secret(value))
            }

            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Secret, E> {
                Err(not_a_string("a boolean"))
            }

            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Secret, E> {
                Err(not_a_string("a number"))
            }

            fn visit_i128<E: serde::de::Error>(self, _: i128) -> Result<Secret, E> {
                Err(not_a_string("a number"))
            }

            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Secret, E> {
                Err(not_a_string("a number"))
            }

            fn visit_u128<E: serde::de::Error>(self, _: u128) -> Result<Secret, E> {
                Err(not_a_string("a number"))
            }

            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Secret, E> {
                Err(not_a_string("a number"))
            }

            fn visit_bytes<E: serde::de::Error>(self, _: &[u8]) -> Result<Secret, E> {
                Err(not_a_string("bytes"))
            }
        }
        deserializer.deserialize_string(Visitor)
    }
}

/// Query parameters whose value is hidden: a name containing one of these (case-insensitive),
/// so `access_token`, `api_key`, `X-Amz-Signature` and `client_secret` count too.
const SECRET_PARAMETERS: [&str; 9] = [
    "pass",
    "pwd",
    "token",
    "secret",
    "key",
    "auth",
    "sig",
    "credential",
    "session",
];

/// `url` as it may be printed: the password of its userinfo (`user:***@host`; a userinfo
/// without a colon, often a token, becomes `***@host`) and the values of secret-looking query
/// parameters (`?token=***`) hidden. Takes one URL, with or without a scheme, or a piece of one
/// (a port with a query after it); anything else comes back as it was.
///
/// The userinfo ends at the *last* `@`: a password typed with a `/` or `@` in it is hidden
/// whole, at the price of hiding a little more of an odd URL with an `@` in its path.
pub fn redact_url(url: &str) -> Cow<'_, str> {
    let (scheme, rest) = match url.find("://") {
        Some(at)
            if url[..at]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
        {
            url.split_at(at + 3)
        }
        _ => ("", url),
    };
    let (userinfo, after) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let (before_query, query) = match after.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (after, None),
    };
    let (query, fragment) = match query.map(|q| q.split_once('#')) {
        Some(Some((query, fragment))) => (Some(query), Some(fragment)),
        Some(None) => (query, None),
        None => (None, None),
    };
    let query_is_secret = query.is_some_and(|q| q.split('&').any(secret_parameter));
    if userinfo.is_none() && !query_is_secret {
        return Cow::Borrowed(url);
    }
    let mut shown = String::with_capacity(url.len());
    shown.push_str(scheme);
    if let Some(userinfo) = userinfo {
        if let Some((user, _)) = userinfo.split_once(':') {
            shown.push_str(user);
            shown.push(':');
        }
        shown.push_str(REDACTED);
        shown.push('@');
    }
    shown.push_str(before_query);
    if let Some(query) = query {
        shown.push('?');
        for (i, parameter) in query.split('&').enumerate() {
            if i > 0 {
                shown.push('&');
            }
            match parameter.split_once('=') {
                Some((name, _)) if secret_parameter(parameter) => {
                    shown.push_str(name);
                    shown.push('=');
                    shown.push_str(REDACTED);
                }
                _ => shown.push_str(parameter),
            }
        }
    }
    if let Some(fragment) = fragment {
        shown.push('#');
        shown.push_str(fragment);
    }
    Cow::Owned(shown)
}

/// Whether `name=value` names a secret (and has a value to hide).
fn secret_parameter(parameter: &str) -> bool {
    parameter.split_once('=').is_some_and(|(name, value)| {
        let name = name.to_ascii_lowercase();
        !value.is_empty() && SECRET_PARAMETERS.iter().any(|word| name.contains(word))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_prints_as_stars_every_way() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?} {secret} {secret:#?}"), "*** *** ***");
        assert_eq!(serde_json::to_string(&secret).unwrap(), "\"***\"");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[derive(Debug, Deserialize)]
    struct Broker {
        #[allow(dead_code)]
        password: Secret,
    }

    #[test]
    fn a_password_that_is_not_a_string_is_refused_without_its_value() {
        for value in [
            "73194628501",
            "7319462.8501",
            "-73194628501",
            "true",
            "0x73194628501",
        ] {
            let err = toml::from_str::<Broker>(&format!("password = {value}")).unwrap_err();
            let message = err.message();
            assert!(message.contains("string in quotes"), "{message}");
            let digits = value.trim_start_matches(['-', '0', 'x']);
            assert!(!message.contains(digits), "{value}: {message}");
        }
        let ok: Broker = toml::from_str("password = \"s3cret\"").unwrap();
        assert_eq!(ok.password.expose(), "s3cret");
    }

    #[test]
    fn userinfo_passwords_are_hidden() {
        for (url, shown) in [
            (
                "mqtt://weir:s3cret@127.0.0.1:1883",
                "mqtt://weir:***@127.0.0.1:1883",
            ),
            ("mqtts://TOKEN@broker:8883/", "mqtts://***@broker:8883/"),
            ("weir:s3cret@127.0.0.1:1883", "weir:***@127.0.0.1:1883"),
            ("mqtt://weir:p@ss/w:rd@host", "mqtt://weir:***@host"),
            (
                "http://u:s3cret@[::1]:4318/otlp",
                "http://u:***@[::1]:4318/otlp",
            ),
            ("pa55@host", "***@host"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn secret_query_parameters_are_hidden_and_others_kept() {
        assert_eq!(
            redact_url("http://h:4318/v1?token=abc&tenant=t1&X-Amz-Signature=ff#top"),
            "http://h:4318/v1?token=***&tenant=t1&X-Amz-Signature=***#top"
        );
        assert_eq!(
            redact_url("mqtt://h:1883?password=s3cret"),
            "mqtt://h:1883?password=***"
        );
        assert_eq!(redact_url("1883?api_key=s3cret"), "1883?api_key=***");
        assert_eq!(
            redact_url("mqtt://u:p@h?access_token=t"),
            "mqtt://u:***@h?access_token=***"
        );
    }

    #[test]
    fn a_url_without_secrets_is_borrowed_unchanged() {
        for url in [
            "mqtt://127.0.0.1:1883",
            "http://collector:4318/otlp?tenant=t1",
            "tcp://x",
            "",
            "not a url",
        ] {
            assert!(matches!(redact_url(url), Cow::Borrowed(u) if u == url));
        }
    }
}
