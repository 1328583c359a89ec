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
    #[error("ParentEndpointProtocol must be http or https, not {0:?}")]
    Protocol(String),
    #[error(
        "connection string has no sync token password (it says {0:?}); generate one with `outpost connected-registry get-settings --generate-password 1`"
    )]
    NoPassword(String),
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
        fn round_trips(name in "[a-z][a-z0-9_-]{4,20}", pw in "[A-Za-z0-9+/=]{1,60}", host in "[a-z0-9.]{1,20}(:[0-9]{1,5})?") {
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
