//! The time a node goes by where it matters across the fleet: the root's. Ships and rigs run
//! for weeks without NTP, or with a clock reset to 1970, while token expiries are set at the
//! root and the times a site reports are shown there. Every gateway answer carries the
//! parent's time (`Outpost-Time`, Unix milliseconds, itself the root's time as that node knows
//! it); a connected registry learns from it how far its own clock is off ([`learn`]) and goes
//! by the corrected time ([`now_ms`]) for password expiries and for every time it reports.
//! Until it has heard from its parent, and on a root, it is the system clock.
//!
//! What stays on the system clock: access tokens (issued and checked by the same node), the
//! ages of uploads and garbage, and the event log's own timestamps, each compared only with
//! this node's clock.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The header that carries the parent's time on gateway answers.
pub const HEADER: &str = "outpost-time";

/// Differences below this are the network's delay, not a wrong clock: ignored.
const NOISE_MS: i64 = 2_000;

/// From which difference a clock counts as wrong enough to say so.
pub const SKEW_WORTH_SAYING_MS: i64 = 60_000;

/// The parent's time minus this system's, as last learned.
static OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// Set when the offset changed enough to say so, until the sync reports it.
static CHANGED: AtomicBool = AtomicBool::new(false);

/// Whether the offset changed enough to say so since the last call: the sync then reports
/// its status details (with or without the `ClockSkew` notice) at its next contact.
pub fn take_changed() -> bool {
    CHANGED.swap(false, Ordering::Relaxed)
}

/// The report that was to say so did not go through: say it at the next one.
pub fn mark_changed() {
    CHANGED.store(true, Ordering::Relaxed);
}

/// The system clock, Unix milliseconds.
pub fn system_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        // A clock set before 1970.
        .unwrap_or_else(|e| -(e.duration().as_millis() as i64))
}

/// The fleet's time: the system clock corrected by what the parent last said.
pub fn now_ms() -> i64 {
    system_ms().saturating_add(OFFSET_MS.load(Ordering::Relaxed))
}

/// How far this system's clock is behind the parent's (negative: ahead), in milliseconds.
pub fn offset_ms() -> i64 {
    OFFSET_MS.load(Ordering::Relaxed)
}

/// Takes the parent's time, as an answer just received said it. Returns the previous and
/// the new offset when the difference changed by more than [`SKEW_WORTH_SAYING_MS`] (for
/// the caller to log), `None` otherwise.
pub fn learn(parent_ms: i64) -> Option<(i64, i64)> {
    let mut offset = parent_ms.saturating_sub(system_ms());
    if offset.saturating_abs() < NOISE_MS {
        offset = 0;
    }
    let before = OFFSET_MS.swap(offset, Ordering::Relaxed);
    let changed = offset.saturating_sub(before).saturating_abs() >= SKEW_WORTH_SAYING_MS;
    if changed {
        CHANGED.store(true, Ordering::Relaxed);
    }
    changed.then_some((before, offset))
}

/// The parent's time from an answer's [`HEADER`] value.
/// A time before 2024 (older than this software) or from 2200 on is not the root's time but
/// a broken clock or a hostile header: it is ignored, and the system clock stays the time.
pub fn parse_header(value: &[u8]) -> Option<i64> {
    const YEAR_2024_MS: i64 = 1_704_067_200_000;
    const YEAR_2200_MS: i64 = 7_258_118_400_000;
    let ms: i64 = std::str::from_utf8(value).ok()?.trim().parse().ok()?;
    (YEAR_2024_MS..YEAR_2200_MS).contains(&ms).then_some(ms)
}

/// A difference of clocks as a person reads it: `3d 0h 2m`, `45m 10s`, `12s`.
/// Rounded to the unit shown last (a clock three days off, measured across a network, is
/// three days off, not 2d 23h 59m).
pub fn human_offset(ms: i64) -> String {
    let s = (ms.unsigned_abs() + 500) / 1000;
    if s >= 3600 {
        let min = (s + 30) / 60;
        let (d, h, m) = (min / 1440, min / 60 % 24, min % 60);
        if d > 0 {
            format!("{d}d {h}h {m}m")
        } else {
            format!("{h}h {m}m")
        }
    } else if s >= 60 {
        format!("{}m {}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// What to say about a clock `offset` behind the parent's (negative: ahead).
pub fn describe_skew(offset: i64) -> String {
    format!(
        "this registry's clock is {} {} its parent's (the root's time, as passed down); it \
         goes by the parent's time for password expiries and the times it reports, but set \
         the system clock right (NTP): logs and local ages still use it",
        human_offset(offset),
        if offset > 0 { "behind" } else { "ahead of" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_the_parents_time_and_ignores_network_delay() {
        // One test touches the process-wide offset, so these run in order.
        assert_eq!(learn(system_ms() + 500), None);
        assert_eq!(
            offset_ms(),
            0,
            "half a second is the network, not the clock"
        );
        let three_days = 3 * 86_400_000;
        let (before, after) = learn(system_ms() + three_days).expect("a change worth saying");
        assert_eq!(before, 0);
        assert!((after - three_days).abs() < 1000, "{after}");
        assert!((now_ms() - system_ms() - three_days).abs() < 1000);
        // The same again: nothing to say.
        assert_eq!(learn(system_ms() + three_days), None);
        // Set right: said, and back to the system clock.
        assert!(learn(system_ms()).is_some());
        assert_eq!(offset_ms(), 0);
        assert_eq!(parse_header(b" 1795989769000 "), Some(1_795_989_769_000));
        assert_eq!(parse_header(b"soon"), None);
        // Hostile values: not a time, and no overflow.
        assert_eq!(parse_header(b"-9223372036854775808"), None);
        assert_eq!(parse_header(b"9223372036854775807"), None);
        assert_eq!(parse_header(b"-1"), None);
        assert_eq!(parse_header(b"0"), None, "1970");
        assert_eq!(parse_header(b"32503680000000"), None, "the year 3000");
        assert!(learn(i64::MIN).is_some() && learn(system_ms()).is_some());
        assert_eq!(offset_ms(), 0);
    }

    #[test]
    fn describes_a_skew_as_a_person_reads_it() {
        assert_eq!(human_offset(3 * 86_400_000 + 2 * 60_000), "3d 0h 2m");
        assert_eq!(human_offset(-(45 * 60_000 + 10_000)), "45m 10s");
        assert_eq!(human_offset(3 * 86_400_000 - 40), "3d 0h 0m", "rounded");
        assert_eq!(human_offset(59_700), "1m 0s");
        assert!(describe_skew(3 * 86_400_000).contains("3d 0h 0m behind its parent's"));
        assert!(describe_skew(-7_200_000).contains("2h 0m ahead of its parent's"));
    }
}
