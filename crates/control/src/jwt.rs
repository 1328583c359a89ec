//! Short-lived access tokens: compact JWS with HS256 (HMAC-SHA-256) over a 256-bit key kept in
//! the data directory. Written by hand (≈80 lines) because we need exactly one algorithm and a
//! strict verifier — the header must say `HS256`, so `alg: none` and algorithm-confusion
//! tokens are refused — and general JWT crates make us pick a crypto backend that brings RSA and
//! elliptic-curve stacks we would never call. Each node verifies only the tokens it issued.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};

type HmacSha256 = Hmac<sha2::Sha256>;

/// One `access` entry of the distribution token spec, with our fine-grained scope-map actions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    pub nbf: i64,
    pub iat: i64,
    pub jti: String,
    pub access: Vec<Access>,
    /// The issuing token's credential version: a token whose passwords changed since no
    /// longer honours access tokens issued before (absent in tokens of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cv: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("access token is malformed")]
    Malformed,
    #[error(
        "access token uses algorithm {0:?}; only HS256 tokens issued by this registry are accepted"
    )]
    Algorithm(String),
    #[error("access token signature is invalid")]
    Signature,
    #[error("access token has expired; request a new one")]
    Expired,
    /// Issued in this node's future: its clock went back since.
    #[error(
        "access token is not valid yet: it was issued at a later time than this registry's \
         clock now reads (the clock was set back since); request a new one"
    )]
    NotYetValid,
    #[error("access token is for {0:?}, not this registry")]
    Audience(String),
    #[error(
        "access token was issued for a password of the token that was generated again or deleted since; request a new one"
    )]
    CredentialsChanged,
    #[error("access token was issued for token {0:?}, which no longer exists; log in again")]
    TokenDeleted(String),
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: Option<String>,
}

pub struct Signer {
    key: Vec<u8>,
}

impl Signer {
    pub fn new(key: Vec<u8>) -> Signer {
        Signer { key }
    }

    fn mac(&self, data: &[u8]) -> Vec<u8> {
        // HMAC accepts keys of any length; this cannot fail.
        let mut m = <HmacSha256 as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        m.update(data);
        m.finalize().into_bytes().to_vec()
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let header = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = B64.encode(serde_json::to_vec(claims).unwrap_or_default());
        let signing_input = format!("{header}.{payload}");
        let sig = B64.encode(self.mac(signing_input.as_bytes()));
        format!("{signing_input}.{sig}")
    }

    /// Verifies signature, algorithm, audience and time window (`now` in Unix seconds).
    pub fn verify(&self, token: &str, audience: &str, now: i64) -> Result<Claims, JwtError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header: Header = B64
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(JwtError::Malformed)?;
        if header.alg != "HS256" {
            return Err(JwtError::Algorithm(header.alg));
        }
        let sig = B64.decode(s).map_err(|_| JwtError::Malformed)?;
        let mut m =
            <HmacSha256 as Mac>::new_from_slice(&self.key).map_err(|_| JwtError::Signature)?;
        m.update(format!("{h}.{p}").as_bytes());
        m.verify_slice(&sig).map_err(|_| JwtError::Signature)?;
        let claims: Claims = B64
            .decode(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(JwtError::Malformed)?;
        if claims.aud != audience {
            return Err(JwtError::Audience(claims.aud));
        }
        if now + 60 < claims.nbf {
            return Err(JwtError::NotYetValid);
        }
        if now >= claims.exp {
            return Err(JwtError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> Claims {
        Claims {
            iss: "reg".into(),
            sub: "tok".into(),
            aud: "reg".into(),
            exp,
            nbf: 0,
            iat: 0,
            jti: "1".into(),
            access: vec![Access {
                kind: "repository".into(),
                name: "app".into(),
                actions: vec!["pull".into()],
            }],
            cv: None,
        }
    }

    #[test]
    fn round_trip_and_rejections() {
        let s = Signer::new(vec![7; 32]);
        let t = s.sign(&claims(1000));
        assert_eq!(s.verify(&t, "reg", 10).unwrap(), claims(1000));
        assert_eq!(s.verify(&t, "reg", 1000), Err(JwtError::Expired));
        // Issued at 500 by a clock that has since gone back an hour.
        let later = s.sign(&Claims {
            nbf: 500,
            iat: 500,
            ..claims(5000)
        });
        assert_eq!(
            s.verify(&later, "reg", 450).map(|c| c.nbf),
            Ok(500),
            "a minute of leeway"
        );
        assert_eq!(
            s.verify(&later, "reg", 500 - 3600),
            Err(JwtError::NotYetValid)
        );
        assert_eq!(
            s.verify(&t, "other", 10),
            Err(JwtError::Audience("reg".into()))
        );
        // wrong key
        assert_eq!(
            Signer::new(vec![8; 32]).verify(&t, "reg", 10),
            Err(JwtError::Signature)
        );
        // tampered payload: grant push
        let parts: Vec<&str> = t.split('.').collect();
        let mut c = claims(1000);
        c.access[0].actions.push("push".into());
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(serde_json::to_vec(&c).unwrap()),
            parts[2]
        );
        assert_eq!(s.verify(&forged, "reg", 10), Err(JwtError::Signature));
        // alg: none
        let none = format!("{}.{}.", B64.encode(br#"{"alg":"none"}"#), parts[1]);
        assert_eq!(
            s.verify(&none, "reg", 10),
            Err(JwtError::Algorithm("none".into()))
        );
        for junk in ["", "a.b", "a.b.c.d", "!!!.###.$$$"] {
            assert!(s.verify(junk, "reg", 10).is_err());
        }
    }
}
