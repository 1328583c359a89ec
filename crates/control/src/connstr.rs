//! The connected-registry connection string, exactly as ACR prints it:
//! `ConnectedRegistryName=<n>;SyncTokenName=<t>;SyncTokenPassword=<p>;ParentGatewayEndpoint=<host[:port]>;ParentEndpointProtocol=<http|https>`.
//! Keys are split on `;` and each segment on its *first* `=`, so values (base64-ish passwords)
//! may themselves contain `=`.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionString {
    pub connected_registry_name: String,
    pub sync_token_name: String,
    pub sync_token_password: String,
    pub parent_gateway_endpoint: String,
    pub parent_endpoint_protocol: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionStringError {
    #[error(
        "connection string segment {0:?} is not Key=Value; the format is ConnectedRegistryName=…;SyncTokenName=…;SyncTokenPassword=…;ParentGatewayEndpoint=…;ParentEndpointProtocol=…"
    )]
    Malformed(String),
    #[error(
        "connection string has an unknown key {0:?}; the keys are ConnectedRegistryName, SyncTokenName, SyncTokenPassword, ParentGatewayEndpoint, ParentEndpointProtocol"
    )]
    UnknownKey(String),
    #[error(
        "connection string is missing {0}; copy it again from `outpost connected-registry get-settings`"
    )]
    MissingKey(&'static str),
    #[error("connection string gives {0} twice")]
    DuplicateKey(String),
    #[error("connection string's ParentEndpointProtocol must be http or https, not {0:?}")]
    Protocol(String),
    #[error(
        "connection string has no sync token password (it says {0:?}); generate one with `outpost connected-registry get-settings --generate-password 1`"
    )]
    NoPassword(String),
    #[error("connection string's ParentGatewayEndpoint: {0}")]
    Endpoint(String),
}

/// Checks that `s` is `host[:port]`: a DNS name or IPv4 address, or an IPv6 address in
/// brackets, and an optional port. No scheme, path, user, `;` or space: the value goes into
/// connection strings and URLs as it is. The error says what is wrong with it.
pub fn check_endpoint(s: &str) -> Result<(), String> {
    let fail = |why: &str| {
        Err(format!(
            "{s:?} is not host[:port] (e.g. registry.example:5000): {why}"
        ))
    };
    if s.is_empty() {
        return fail("it is empty");
    }
    if s.len() > 261 {
        return fail("it is longer than a host name and port can be");
    }
    if s.contains("://") {
        return fail("leave out the scheme (the protocol is given separately)");
    }
    if s.contains('/') {
        return fail("leave out any path");
    }
    if s.starts_with('<') {
        return fail("replace this placeholder with the address at which the parent is reached");
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return fail("an IPv6 address needs its closing ]");
        };
        // A link-local address may carry its zone (`fe80::1%eth0`), as a listener reports it.
        let v6 = v6.split_once('%').map_or(v6, |(a, zone)| {
            if zone.is_empty() || !zone.bytes().all(|b| b.is_ascii_alphanumeric()) {
                ""
            } else {
                a
            }
        });
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return fail("the part in brackets is not an IPv6 address");
        }
        match after {
            "" => (None, None),
            _ => match after.strip_prefix(':') {
                Some(p) => (None, Some(p)),
                None => return fail("only :port may follow an IPv6 address"),
            },
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(s), None),
        }
    };
    if let Some(host) = host {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if host.is_empty() || !host.trim_end_matches('.').split('.').all(label_ok) {
            return fail(
                "the host must be a DNS name or an IP address (letters, digits, '-', '.')",
            );
        }
    }
    if let Some(port) = port
        && !port.parse::<u16>().is_ok_and(|p| p > 0)
    {
        return fail("the port must be a number from 1 to 65535");
    }
    Ok(())
}

const KEYS: [&str; 5] = [
    "ConnectedRegistryName",
    "SyncTokenName",
    "SyncTokenPassword",
    "ParentGatewayEndpoint",
    "ParentEndpointProtocol",
];

impl ConnectionString {
    pub fn parse(s: &str) -> Result<ConnectionString, ConnectionStringError> {
        let mut values: [Option<String>; 5] = Default::default();
        for seg in s
            .trim()
            .split(';')
            .map(str::trim)
            .filter(|seg| !seg.is_empty())
        {
            let (k, v) = seg
                .split_once('=')
                .ok_or_else(|| ConnectionStringError::Malformed(seg.to_string()))?;
            let i = KEYS
                .iter()
                .position(|key| key.eq_ignore_ascii_case(k.trim()))
                .ok_or_else(|| ConnectionStringError::UnknownKey(k.trim().to_string()))?;
            if values[i].is_some() {
                return Err(ConnectionStringError::DuplicateKey(KEYS[i].to_string()));
            }
            values[i] = Some(v.trim().to_string());
        }
        let mut take = |i: usize| {
            values[i]
                .take()
                .filter(|v| !v.is_empty())
                .ok_or(ConnectionStringError::MissingKey(KEYS[i]))
        };
        let cs = ConnectionString {
            connected_registry_name: take(0)?,
            sync_token_name: take(1)?,
            sync_token_password: take(2)?,
            parent_gateway_endpoint: take(3)?,
            parent_endpoint_protocol: take(4)?.to_ascii_lowercase(),
        };
        if cs.parent_endpoint_protocol != "http" && cs.parent_endpoint_protocol != "https" {
            return Err(ConnectionStringError::Protocol(cs.parent_endpoint_protocol));
        }
        if cs.sync_token_password.starts_with('<') {
            return Err(ConnectionStringError::NoPassword(cs.sync_token_password));
        }
        check_endpoint(&cs.parent_gateway_endpoint).map_err(ConnectionStringError::Endpoint)?;
        Ok(cs)
    }

    /// The parent's base URL, e.g. `http://10.0.0.5:5000`.
    pub fn parent_url(&self) -> String {
        format!(
            "{}://{}",
            self.parent_endpoint_protocol, self.parent_gateway_endpoint
        )
    }
}

impl fmt::Display for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ConnectedRegistryName={};SyncTokenName={};SyncTokenPassword={};ParentGatewayEndpoint={};ParentEndpointProtocol={}",
            self.connected_registry_name,
            self.sync_token_name,
            self.sync_token_password,
            self.parent_gateway_endpoint,
            self.parent_endpoint_protocol
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn endpoints_are_host_and_port_only() {
        for ok in [
            "registry.example",
            "registry.example:5000",
            "10.0.0.5:5000",
            "[::1]:5000",
            "[fe80::1]",
            "[fe80::1%2]:5000",
            "[fe80::1%eth0]",
            "site_one.local.",
        ] {
            assert_eq!(check_endpoint(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("http://cloud:5000", "scheme"),
            ("cloud:5000/v2", "path"),
            ("evil.example:1;SyncTokenName=admin", "port"),
            ("a;SyncTokenName=admin", "DNS name"),
            ("host name", "DNS name"),
            ("host\nX: y", "DNS name"),
            ("cloud:0", "port"),
            ("cloud:99999", "port"),
            ("[::1", "closing ]"),
            ("[not-v6]:5000", "IPv6"),
            ("[::1]x", "only :port"),
            ("<parent gateway endpoint>", "placeholder"),
            ("user@cloud:5000", "DNS name"),
        ] {
            let e = check_endpoint(bad).unwrap_err();
            assert!(e.contains(why) && e.contains("host[:port]"), "{bad}: {e}");
        }
        let e = ConnectionString::parse(
            "ConnectedRegistryName=a;SyncTokenName=a;SyncTokenPassword=p;\
             ParentGatewayEndpoint=http://cloud:5000;ParentEndpointProtocol=http",
        )
        .unwrap_err();
        assert!(e.to_string().contains("leave out the scheme"), "{e}");
    }

    #[test]
    fn parses_acr_example_and_values_with_equals() {
        let s = "ConnectedRegistryName=myconnectedregistry;SyncTokenName=myconnectedregistry;SyncTokenPassword==abc=def==;ParentGatewayEndpoint=contoso.example:5000;ParentEndpointProtocol=https";
        let c = ConnectionString::parse(s).unwrap();
        assert_eq!(c.sync_token_password, "=abc=def==");
        assert_eq!(c.parent_url(), "https://contoso.example:5000");
        assert_eq!(c.to_string(), s);
    }

    #[test]
    fn errors_say_what_to_fix() {
        use ConnectionStringError::*;
        assert!(matches!(
            ConnectionString::parse("garbage"),
            Err(Malformed(_))
        ));
        assert!(matches!(ConnectionString::parse("Foo=1"), Err(UnknownKey(k)) if k == "Foo"));
        assert!(matches!(
            ConnectionString::parse(
                "ConnectedRegistryName=a;SyncTokenName=b;ParentGatewayEndpoint=h;ParentEndpointProtocol=http"
            ),
            Err(MissingKey("SyncTokenPassword"))
        ));
        assert!(matches!(
            ConnectionString::parse("ConnectedRegistryName=a;ConnectedRegistryName=b"),
            Err(DuplicateKey(_))
        ));
        assert!(matches!(
            ConnectionString::parse(
                "ConnectedRegistryName=a;SyncTokenName=b;SyncTokenPassword=p;ParentGatewayEndpoint=h;ParentEndpointProtocol=ftp"
            ),
            Err(Protocol(_))
        ));
        assert!(matches!(
            ConnectionString::parse(
                "ConnectedRegistryName=a;SyncTokenName=b;SyncTokenPassword=<use --generate-password to generate a new password>;ParentGatewayEndpoint=h;ParentEndpointProtocol=http"
            ),
            Err(NoPassword(_))
        ));
    }

    proptest! {
        #[test]
        fn round_trips(name in "[a-z][a-z0-9_-]{4,20}", pw in "[A-Za-z0-9+/=]{1,60}", host in "[a-z0-9]{1,10}(\\.[a-z0-9]{1,10}){0,2}(:[1-9][0-9]{0,3})?") {
            let c = ConnectionString {
                connected_registry_name: name.clone(),
                sync_token_name: name,
                sync_token_password: pw,
                parent_gateway_endpoint: host,
                parent_endpoint_protocol: "http".into(),
            };
            prop_assert_eq!(ConnectionString::parse(&c.to_string()).unwrap(), c);
        }
    }
}
