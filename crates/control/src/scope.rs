//! Scope-map rules as ACR defines them — `repositories/<repo>/<action>` and
//! `gateway/<name>/<action>` — and the permission decision "may this set of rules do action A
//! on repository R". Pure and exhaustively unit-tested; everything that authorizes a request
//! ends here.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;

/// The repository actions of a scope map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RepoAction {
    #[serde(rename = "content/read")]
    ContentRead,
    #[serde(rename = "content/write")]
    ContentWrite,
    #[serde(rename = "content/delete")]
    ContentDelete,
    #[serde(rename = "metadata/read")]
    MetadataRead,
    #[serde(rename = "metadata/write")]
    MetadataWrite,
}

impl RepoAction {
    pub const ALL: [RepoAction; 5] = [
        RepoAction::ContentDelete,
        RepoAction::ContentRead,
        RepoAction::ContentWrite,
        RepoAction::MetadataRead,
        RepoAction::MetadataWrite,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RepoAction::ContentRead => "content/read",
            RepoAction::ContentWrite => "content/write",
            RepoAction::ContentDelete => "content/delete",
            RepoAction::MetadataRead => "metadata/read",
            RepoAction::MetadataWrite => "metadata/write",
        }
    }

    pub fn parse(s: &str) -> Option<RepoAction> {
        RepoAction::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

impl fmt::Display for RepoAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The gateway actions of a scope map (used by connected registries' sync tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GatewayAction {
    ConfigRead,
    ConfigWrite,
    MessageRead,
    MessageWrite,
}

impl GatewayAction {
    pub const ALL: [GatewayAction; 4] = [
        GatewayAction::ConfigRead,
        GatewayAction::ConfigWrite,
        GatewayAction::MessageRead,
        GatewayAction::MessageWrite,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GatewayAction::ConfigRead => "config/read",
            GatewayAction::ConfigWrite => "config/write",
            GatewayAction::MessageRead => "message/read",
            GatewayAction::MessageWrite => "message/write",
        }
    }

    pub fn parse(s: &str) -> Option<GatewayAction> {
        GatewayAction::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// Which repositories a rule covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RepoPattern {
    /// `*`: every repository.
    All,
    /// `prefix/*`: every repository under `prefix/`.
    Prefix(String),
    /// One repository.
    Exact(String),
}

impl RepoPattern {
    pub fn parse(s: &str) -> Result<RepoPattern, ScopeError> {
        if s == "*" {
            return Ok(RepoPattern::All);
        }
        let (base, prefix) = match s.strip_suffix("/*") {
            Some(b) => (b, true),
            None => (s, false),
        };
        base.parse::<outpost_oci::RepoName>()
            .map_err(|_| ScopeError::InvalidRepository(s.to_string()))?;
        Ok(if prefix {
            RepoPattern::Prefix(base.to_string())
        } else {
            RepoPattern::Exact(base.to_string())
        })
    }

    pub fn matches(&self, repo: &str) -> bool {
        match self {
            RepoPattern::All => true,
            RepoPattern::Exact(r) => r == repo,
            RepoPattern::Prefix(p) => {
                repo.len() > p.len() + 1
                    && repo.starts_with(p.as_str())
                    && repo.as_bytes()[p.len()] == b'/'
            }
        }
    }
}

impl RepoPattern {
    /// Whether every repository `other` matches, this matches too.
    pub fn covers(&self, other: &RepoPattern) -> bool {
        match (self, other) {
            (RepoPattern::All, _) => true,
            (_, RepoPattern::All) => false,
            (RepoPattern::Exact(a), RepoPattern::Exact(b)) => a == b,
            (RepoPattern::Exact(_), RepoPattern::Prefix(_)) => false,
            (RepoPattern::Prefix(_), RepoPattern::Exact(b)) => self.matches(b),
            (RepoPattern::Prefix(a), RepoPattern::Prefix(b)) => a == b || self.matches(b),
        }
    }
}

impl fmt::Display for RepoPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RepoPattern::All => f.write_str("*"),
            RepoPattern::Prefix(p) => write!(f, "{p}/*"),
            RepoPattern::Exact(r) => f.write_str(r),
        }
    }
}

/// One rule of a scope map.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    Repository(RepoPattern, RepoAction),
    Gateway(String, GatewayAction),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error(
        "invalid scope-map rule {0:?}: use repositories/<repository>/<action> or gateway/<connected-registry>/<action>"
    )]
    InvalidRule(String),
    #[error(
        "invalid repository {0:?} in a scope-map rule: use a repository name (lowercase letters, digits and . _ - / separators, as on /v2/), a name ending in /*, or *"
    )]
    InvalidRepository(String),
    #[error(
        "invalid action {0:?}: repository actions are content/read, content/write, content/delete, metadata/read, metadata/write"
    )]
    InvalidRepoAction(String),
    #[error(
        "invalid action {0:?}: gateway actions are config/read, config/write, message/read, message/write"
    )]
    InvalidGatewayAction(String),
    #[error("invalid gateway name {0:?}: use lowercase letters, digits, '-' and '_'")]
    InvalidGateway(String),
}

impl Rule {
    /// Parses `repositories/<repo>/<a>/<b>` or `gateway/<name>/<a>/<b>` (lower-cased, as ACR does).
    pub fn parse(s: &str) -> Result<Rule, ScopeError> {
        let lower = s.trim().to_ascii_lowercase();
        if let Some(rest) = lower.strip_prefix("repositories/") {
            // the action is the last two segments
            let mut parts = rest.rsplitn(3, '/');
            let (b, a, repo) = (parts.next(), parts.next(), parts.next());
            let (Some(b), Some(a), Some(repo)) = (b, a, repo) else {
                return Err(ScopeError::InvalidRule(s.to_string()));
            };
            let action = format!("{a}/{b}");
            let action = RepoAction::parse(&action).ok_or(ScopeError::InvalidRepoAction(action))?;
            return Ok(Rule::Repository(RepoPattern::parse(repo)?, action));
        }
        if let Some(rest) = lower.strip_prefix("gateway/") {
            let parts: Vec<&str> = rest.split('/').collect();
            if parts.len() != 3 {
                return Err(ScopeError::InvalidRule(s.to_string()));
            }
            let name = parts[0];
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                return Err(ScopeError::InvalidGateway(name.to_string()));
            }
            let action = format!("{}/{}", parts[1], parts[2]);
            let action =
                GatewayAction::parse(&action).ok_or(ScopeError::InvalidGatewayAction(action))?;
            return Ok(Rule::Gateway(name.to_string(), action));
        }
        Err(ScopeError::InvalidRule(s.to_string()))
    }

    pub fn is_repository(&self) -> bool {
        matches!(self, Rule::Repository(..))
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Repository(p, a) => write!(f, "repositories/{p}/{a}"),
            Rule::Gateway(g, a) => write!(f, "gateway/{g}/{}", a.as_str()),
        }
    }
}

/// The permissions granted by a set of rules. Permissions add up across rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    rules: BTreeSet<Rule>,
    admin: bool,
}

impl Permissions {
    pub fn new(rules: impl IntoIterator<Item = Rule>) -> Permissions {
        Permissions {
            rules: rules.into_iter().collect(),
            admin: false,
        }
    }

    /// Everything, including the management API.
    pub fn admin() -> Permissions {
        Permissions {
            rules: BTreeSet::new(),
            admin: true,
        }
    }

    /// Pull-only on every repository (anonymous pull when the operator enables it).
    pub fn anonymous_pull() -> Permissions {
        Permissions::new([
            Rule::Repository(RepoPattern::All, RepoAction::ContentRead),
            Rule::Repository(RepoPattern::All, RepoAction::MetadataRead),
        ])
    }

    pub fn is_admin(&self) -> bool {
        self.admin
    }

    pub fn allows(&self, repo: &str, action: RepoAction) -> bool {
        self.admin
            || self.rules.iter().any(|r| match r {
                Rule::Repository(p, a) => *a == action && p.matches(repo),
                Rule::Gateway(..) => false,
            })
    }

    pub fn allows_gateway(&self, name: &str, action: GatewayAction) -> bool {
        self.admin
            || self
                .rules
                .contains(&Rule::Gateway(name.to_string(), action))
    }

    /// The actions granted on `repo`.
    pub fn actions_on(&self, repo: &str) -> BTreeSet<RepoAction> {
        RepoAction::ALL
            .into_iter()
            .filter(|a| self.allows(repo, *a))
            .collect()
    }

    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perms(rules: &[&str]) -> Permissions {
        Permissions::new(rules.iter().map(|r| Rule::parse(r).unwrap()))
    }

    #[test]
    fn a_pattern_covers_what_it_matches() {
        let p = |s: &str| RepoPattern::parse(s).unwrap();
        assert!(p("*").covers(&p("a/*")));
        assert!(p("fleet/*").covers(&p("fleet/g01/app")));
        assert!(p("fleet/*").covers(&p("fleet/g01/*")));
        assert!(p("fleet/*").covers(&p("fleet/*")));
        assert!(!p("fleet/*").covers(&p("fleet")));
        assert!(!p("fleet/*").covers(&p("fleetx/a")));
        assert!(!p("fleet/g01/*").covers(&p("fleet/*")));
        assert!(!p("a").covers(&p("a/*")));
        assert!(!p("a/*").covers(&p("*")));
        assert!(p("a").covers(&p("a")));
    }

    #[test]
    fn parses_acr_rule_strings() {
        assert_eq!(
            Rule::parse("repositories/hello-world/content/read").unwrap(),
            Rule::Repository(
                RepoPattern::Exact("hello-world".into()),
                RepoAction::ContentRead
            )
        );
        assert_eq!(
            Rule::parse("repositories/a/b/c/metadata/write").unwrap(),
            Rule::Repository(
                RepoPattern::Exact("a/b/c".into()),
                RepoAction::MetadataWrite
            )
        );
        assert_eq!(
            Rule::parse("repositories/team/*/content/write").unwrap(),
            Rule::Repository(RepoPattern::Prefix("team".into()), RepoAction::ContentWrite)
        );
        assert_eq!(
            Rule::parse("Repositories/*/Content/Delete").unwrap(),
            Rule::Repository(RepoPattern::All, RepoAction::ContentDelete)
        );
        assert_eq!(
            Rule::parse("gateway/myconnectedregistry/message/write").unwrap(),
            Rule::Gateway("myconnectedregistry".into(), GatewayAction::MessageWrite)
        );
        for r in [
            "repositories/hello-world/content/read",
            "repositories/team/*/content/write",
            "repositories/*/metadata/read",
            "gateway/edge_01/config/read",
        ] {
            assert_eq!(Rule::parse(r).unwrap().to_string(), r);
        }
    }

    #[test]
    fn rejects_bad_rules_with_named_errors() {
        assert!(
            matches!(Rule::parse("repositories/x/content/pull"), Err(ScopeError::InvalidRepoAction(a)) if a == "content/pull")
        );
        assert!(matches!(
            Rule::parse("repositories/x"),
            Err(ScopeError::InvalidRule(_))
        ));
        assert!(matches!(
            Rule::parse("repositories/../content/read"),
            Err(ScopeError::InvalidRepository(_))
        ));
        assert!(matches!(
            Rule::parse("repositories/a*/content/read"),
            Err(ScopeError::InvalidRepository(_))
        ));
        assert!(matches!(
            Rule::parse("repositories/*/x/content/read"),
            Err(ScopeError::InvalidRepository(_))
        ));
        assert!(matches!(
            Rule::parse("gateway/x/config/delete"),
            Err(ScopeError::InvalidGatewayAction(_))
        ));
        assert!(matches!(
            Rule::parse("gateway/x/y/config/read"),
            Err(ScopeError::InvalidRule(_))
        ));
        assert!(matches!(
            Rule::parse("registry/x/content/read"),
            Err(ScopeError::InvalidRule(_))
        ));
    }

    #[test]
    fn patterns_match_exactly_what_they_say() {
        let p = RepoPattern::parse("team/*").unwrap();
        assert!(p.matches("team/app"));
        assert!(p.matches("team/a/b"));
        assert!(!p.matches("team"));
        assert!(!p.matches("teams/app"));
        assert!(!p.matches("other/team/app"));
        assert!(RepoPattern::parse("*").unwrap().matches("anything/at/all"));
        let e = RepoPattern::parse("app").unwrap();
        assert!(e.matches("app") && !e.matches("app/x") && !e.matches("ap"));
    }

    #[test]
    fn permissions_add_up() {
        let p = perms(&[
            "repositories/app/content/read",
            "repositories/team/*/content/write",
            "repositories/*/metadata/read",
        ]);
        assert!(p.allows("app", RepoAction::ContentRead));
        assert!(!p.allows("app", RepoAction::ContentWrite));
        assert!(p.allows("team/x", RepoAction::ContentWrite));
        assert!(!p.allows("team/x", RepoAction::ContentRead));
        assert!(p.allows("zzz", RepoAction::MetadataRead));
        assert!(!p.allows("zzz", RepoAction::ContentDelete));
        assert_eq!(
            p.actions_on("app").into_iter().collect::<Vec<_>>(),
            vec![RepoAction::ContentRead, RepoAction::MetadataRead]
        );
        assert!(!p.allows_gateway("x", GatewayAction::ConfigRead));
        assert!(Permissions::admin().allows("any", RepoAction::ContentDelete));
    }
}
