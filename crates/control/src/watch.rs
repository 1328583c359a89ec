//! Turns the connected registries' health, as `connected-registry list` shows it, into the
//! log lines an operator on call looks for: a registry that went `Offline` or `Unhealthy`
//! (and why), and one that is back. The state is derived when asked (nothing at this node
//! changes when a child falls silent), so `serve` looks every few seconds and hands each list
//! to [`FleetWatch::observe`], which remembers what it saw and returns only the changes.
//!
//! Only activated registries are watched: one never activated, or deactivated at the root,
//! is `Offline` by definition and says nothing about the fleet's health.

use crate::connected::{ConnectedRegistryView, NOTICE};
use std::collections::HashMap;

/// What one registry looked like at the last look.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    state: String,
    /// The codes of the details that make it unhealthy, sorted.
    problems: Vec<String>,
}

/// A change worth a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetChange {
    /// Went `Offline` (or was at the first look): nothing heard from it for too long.
    Offline {
        name: String,
        last_heard: Option<String>,
        schedule: String,
    },
    /// Went `Unhealthy`, or is still and reports other problems now.
    Unhealthy { name: String, problems: String },
    /// `Online` or `Syncing` after one of the above.
    Recovered { name: String, state: String },
}

impl FleetChange {
    /// Whether the change is bad news (logged as a warning) or good news (info).
    pub fn is_problem(&self) -> bool {
        !matches!(self, FleetChange::Recovered { .. })
    }
}

impl std::fmt::Display for FleetChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FleetChange::Offline {
                name,
                last_heard,
                schedule,
            } => {
                write!(f, "connected registry {name} is Offline: ")?;
                match last_heard {
                    Some(t) => write!(f, "nothing heard from it since {t}")?,
                    None => write!(f, "nothing heard from it since it was activated")?,
                }
                write!(
                    f,
                    " (sync schedule {schedule:?}); check that it runs and can reach this \
                     registry, and its own log"
                )
            }
            FleetChange::Unhealthy { name, problems } => write!(
                f,
                "connected registry {name} is Unhealthy: {problems} (`outpost connected-registry \
                 show -n {name}` shows the details)"
            ),
            FleetChange::Recovered { name, state } => {
                write!(f, "connected registry {name} is {state} again")
            }
        }
    }
}

/// Remembers the fleet's health between looks.
#[derive(Debug, Default)]
pub struct FleetWatch {
    seen: HashMap<String, Seen>,
}

impl FleetWatch {
    /// Compares `list` (every connected registry below this node) with the last look and
    /// returns what changed. At the first look, every activated registry that is not healthy
    /// is reported: a fleet that was broken before this process started is still broken.
    pub fn observe(&mut self, list: &[ConnectedRegistryView]) -> Vec<FleetChange> {
        let mut changes = Vec::new();
        let mut now = HashMap::new();
        for v in list.iter().filter(|v| v.activation_status == "Active") {
            let mut problems: Vec<String> = v
                .status_details
                .iter()
                .filter(|d| d.kind != NOTICE)
                .map(|d| d.code.clone())
                .collect();
            problems.sort();
            problems.dedup();
            let seen = Seen {
                state: v.connection_state.clone(),
                problems,
            };
            let before = self.seen.get(&v.name);
            let healthy = |s: &Seen| matches!(s.state.as_str(), "Online" | "Syncing");
            match seen.state.as_str() {
                "Offline" if before.is_none_or(|b| b.state != "Offline") => {
                    changes.push(FleetChange::Offline {
                        name: v.name.clone(),
                        last_heard: v.last_activity_time.clone(),
                        schedule: v.sync_schedule.clone(),
                    })
                }
                "Unhealthy"
                    if before
                        .is_none_or(|b| b.state != "Unhealthy" || b.problems != seen.problems) =>
                {
                    changes.push(FleetChange::Unhealthy {
                        name: v.name.clone(),
                        problems: describe(v),
                    })
                }
                _ if healthy(&seen) && before.is_some_and(|b| !healthy(b)) => {
                    changes.push(FleetChange::Recovered {
                        name: v.name.clone(),
                        state: seen.state.clone(),
                    })
                }
                _ => {}
            }
            now.insert(v.name.clone(), seen);
        }
        self.seen = now;
        changes
    }
}

/// The problems of an unhealthy registry in one line: each detail's code and text.
fn describe(v: &ConnectedRegistryView) -> String {
    let problems: Vec<String> = v
        .status_details
        .iter()
        .filter(|d| d.kind != NOTICE)
        .map(|d| format!("{}: {}", d.code, d.description))
        .collect();
    if problems.is_empty() {
        "it last reported a failed sync".into()
    } else {
        problems.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connected::{GarbageCollection, StatusDetail};

    fn view(
        name: &str,
        activation: &str,
        state: &str,
        details: &[(&str, &str)],
    ) -> ConnectedRegistryView {
        ConnectedRegistryView {
            name: name.into(),
            mode: "ReadOnly".into(),
            parent: None,
            repositories: vec![],
            sync_token: format!("{name}-sync-token"),
            client_tokens: vec![],
            sync_schedule: "* * * * *".into(),
            sync_window: None,
            sync_message_ttl: "P2D".into(),
            log_level: "Information".into(),
            notifications: vec![],
            garbage_collection: GarbageCollection {
                enabled: true,
                schedule: "0 0 * * *".into(),
            },
            activation_status: activation.into(),
            connection_state: state.into(),
            status_details: details
                .iter()
                .map(|(kind, code)| StatusDetail {
                    kind: (*kind).into(),
                    code: (*code).into(),
                    description: format!("what {code} means"),
                    timestamp: None,
                    correlation_id: None,
                })
                .collect(),
            last_activity_time: Some("2026-11-29T03:00:00Z".into()),
            last_sync_time: None,
            last_sync_result: None,
            sync_state: "Succeeded".into(),
            version: None,
            login_server: None,
            cursor_lag: None,
            outbox_depth: None,
            creation_date: "2026-11-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn reports_each_change_once_and_the_recovery() {
        let mut w = FleetWatch::default();
        // First look: the broken one is reported, the healthy and the never-activated not.
        let first = w.observe(&[
            view("ship", "Active", "Online", &[]),
            view("rig", "Active", "Offline", &[]),
            view("spare", "Inactive", "Offline", &[]),
        ]);
        assert_eq!(first.len(), 1, "{first:?}");
        let line = first[0].to_string();
        assert!(
            line.contains("rig is Offline") && line.contains("2026-11-29T03:00:00Z"),
            "{line}"
        );
        // Nothing changed: nothing said.
        assert!(
            w.observe(&[
                view("ship", "Active", "Online", &[]),
                view("rig", "Active", "Offline", &[]),
            ])
            .is_empty()
        );
        // The ship gets a problem; a notice alone does not count.
        let ch = w.observe(&[
            view(
                "ship",
                "Active",
                "Unhealthy",
                &[("Notice", "TagConflict"), ("Storage", "DiskFull")],
            ),
            view("rig", "Active", "Online", &[]),
        ]);
        assert_eq!(ch.len(), 2, "{ch:?}");
        let ship = ch[0].to_string();
        assert!(
            ship.contains("ship is Unhealthy: DiskFull: what DiskFull means")
                && !ship.contains("TagConflict")
                && ch[0].is_problem(),
            "{ship}"
        );
        assert_eq!(ch[1].to_string(), "connected registry rig is Online again");
        assert!(!ch[1].is_problem());
        // Still unhealthy for the same reason: quiet; for another reason: said again.
        let same = [view(
            "ship",
            "Active",
            "Unhealthy",
            &[("Storage", "DiskFull")],
        )];
        assert!(w.observe(&same).is_empty());
        let other = w.observe(&[view(
            "ship",
            "Active",
            "Unhealthy",
            &[("Storage", "DiskFull"), ("Sync", "OutboxEntryRefused")],
        )]);
        assert_eq!(other.len(), 1, "{other:?}");
        // Deactivated, then activated again while healthy: no recovery line for a registry
        // that was not watched in between.
        assert!(
            w.observe(&[view("ship", "Inactive", "Offline", &[])])
                .is_empty()
        );
        assert!(
            w.observe(&[view("ship", "Active", "Online", &[])])
                .is_empty()
        );
    }
}
