//! Repository names, tags and manifest references, validated exactly as the distribution spec's
//! grammar says. A `RepoName` can only hold lowercase alphanumeric path components joined by `/`
//! with `.`, `_`, `__` or runs of `-` as separators, so it can never contain `..`, a leading `/`
//! or any character that could escape a directory.

use crate::digest::{Digest, DigestError};
use std::fmt;
use std::str::FromStr;

/// Longest repository name accepted (distribution's limit).
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag the grammar allows.
pub const MAX_TAG_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "repository name {0:?} is invalid: use lowercase letters, digits and separators (. _ __ -) in components joined by '/'"
    )]
    InvalidName(String),
    #[error("repository name is {0} characters long; the limit is {MAX_NAME_LEN}")]
    NameTooLong(usize),
    #[error(
        "tag {0:?} is invalid: a tag is 1 to 128 characters of letters, digits, '_', '.' and '-', not starting with '.' or '-'"
    )]
    InvalidTag(String),
    #[error(transparent)]
    Digest(#[from] DigestError),
}

/// A validated repository name such as `library/alpine`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

fn valid_component(c: &str) -> bool {
    // [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*
    let b = c.as_bytes();
    if b.is_empty() {
        return false;
    }
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    // first run of alphanumerics
    if !alnum(b[0]) {
        return false;
    }
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // separator
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        // a separator must be followed by an alphanumeric
        if i >= b.len() || !alnum(b[i]) || i == start {
            return false;
        }
    }
    true
}

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for RepoName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::NameTooLong(s.len()));
        }
        if s.split('/').all(valid_component) {
            Ok(RepoName(s.to_string()))
        } else {
            Err(NameError::InvalidName(s.to_string()))
        }
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A validated tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_TAG_LEN
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..]
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-');
        if ok {
            Ok(Tag(s.to_string()))
        } else {
            Err(NameError::InvalidTag(s.to_string()))
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// What a manifest URL points at: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl FromStr for Reference {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        if s.contains(':') {
            Ok(Reference::Digest(s.parse()?))
        } else {
            Ok(Reference::Tag(s.parse()?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_spec_names() {
        for ok in [
            "a",
            "alpine",
            "library/alpine",
            "a/b/c/d/e",
            "my-app",
            "my--app",
            "my_app",
            "my__app",
            "my.app",
            "0",
            "app/v1.2_x-y",
        ] {
            assert!(ok.parse::<RepoName>().is_ok(), "{ok:?} rejected");
        }
    }

    #[test]
    fn rejects_bad_names() {
        for bad in [
            "", "/", "a/", "/a", "a//b", "A", "Alpine", "..", "a/../b", "a/./b", ".a", "a.",
            "a..b", "a___b", "a_-b", "-a", "a-", "a b", "a%2fb", "a\\b", "a\0b", "ä",
        ] {
            assert!(bad.parse::<RepoName>().is_err(), "{bad:?} accepted");
        }
        let long = "a".repeat(256);
        assert_eq!(long.parse::<RepoName>(), Err(NameError::NameTooLong(256)));
    }

    #[test]
    fn tags() {
        for ok in ["latest", "v1.0", "_x", "A-b_c.d", &"x".repeat(128)] {
            assert!(ok.parse::<Tag>().is_ok(), "{ok:?} rejected");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", "a b", &"x".repeat(129), ".."] {
            assert!(bad.parse::<Tag>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn references() {
        assert!(matches!(
            "latest".parse::<Reference>(),
            Ok(Reference::Tag(_))
        ));
        assert!(matches!(
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
                .parse::<Reference>(),
            Ok(Reference::Digest(_))
        ));
        assert!("sha256:nothex".parse::<Reference>().is_err());
    }

    proptest! {
        #[test]
        fn accepted_names_never_escape(s in "[a-z0-9./_-]{1,40}") {
            if let Ok(n) = s.parse::<RepoName>() {
                prop_assert!(!n.as_str().split('/').any(|c| c == ".." || c == "." || c.is_empty()));
                prop_assert!(!n.as_str().starts_with('/'));
            }
        }

        #[test]
        fn generated_valid_names_are_accepted(parts in proptest::collection::vec("[a-z0-9]{1,4}([._-][a-z0-9]{1,4}){0,2}", 1..5)) {
            let s = parts.join("/");
            prop_assert!(s.parse::<RepoName>().is_ok(), "{} rejected", s);
        }
    }
}
