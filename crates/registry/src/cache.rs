//! A small read-through cache of manifests by (repository, reference), so that the hottest
//! request a registry serves — "GET manifest by tag" from every pulling client — is answered
//! from memory. Every write to manifests or tags goes through `Registry`, which invalidates
//! the cache; a generation counter stops a read that raced a write from inserting a stale
//! entry after the invalidation.

use bytes::Bytes;
use outpost_oci::Digest;
use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// A manifest as served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedManifest {
    pub digest: Digest,
    pub media_type: String,
    pub content: Bytes,
}

pub(crate) struct ManifestCache {
    map: RwLock<Entries>,
    generation: AtomicU64,
    capacity: usize,
}

/// Manifests larger than this are not cached: pull clients fetch ordinary manifests (a few
/// KiB) over and over, while a client could otherwise fill memory with copies of a 4 MiB one
/// under thousands of tags.
const MAX_CACHED_MANIFEST: usize = 64 << 10;
/// The cache holds at most this many bytes of manifests (it is emptied when full).
const MAX_CACHED_BYTES: usize = 32 << 20;

#[derive(Default)]
struct Entries {
    map: HashMap<(String, String), CachedManifest>,
    /// Sum of the cached manifests' sizes.
    bytes: usize,
}

impl ManifestCache {
    pub(crate) fn new(capacity: usize) -> ManifestCache {
        ManifestCache {
            map: RwLock::new(Entries::default()),
            generation: AtomicU64::new(0),
            capacity,
        }
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn get(&self, repo: &str, reference: &str) -> Option<CachedManifest> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.map
            .get(&(repo.to_string(), reference.to_string()))
            .cloned()
    }

    /// Inserts unless a write happened since `generation` was read.
    pub(crate) fn insert(&self, generation: u64, repo: &str, reference: &str, m: CachedManifest) {
        if self.capacity == 0 {
            return;
        }
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if m.content.len() > MAX_CACHED_MANIFEST {
            return;
        }
        if map.map.len() >= self.capacity || map.bytes + m.content.len() > MAX_CACHED_BYTES {
            *map = Entries::default();
        }
        map.bytes += m.content.len();
        if let Some(old) = map.map.insert((repo.to_string(), reference.to_string()), m) {
            map.bytes -= old.content.len();
        }
    }

    /// Drops every entry of `repo` (called after any manifest or tag change in it).
    pub(crate) fn clear(&self) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        map.map.clear();
        map.bytes = 0;
    }

    pub(crate) fn invalidate(&self, repo: &str) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        map.map.retain(|(r, _), _| r != repo);
        map.bytes = map.map.values().map(|c| c.content.len()).sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> CachedManifest {
        CachedManifest {
            digest: Digest::sha256_of(s.as_bytes()),
            media_type: "x".into(),
            content: Bytes::from(s.to_string()),
        }
    }

    #[test]
    fn stale_read_is_not_inserted_after_invalidation() {
        let c = ManifestCache::new(10);
        let g = c.generation();
        c.invalidate("a"); // a write lands between the DB read and the insert
        c.insert(g, "a", "latest", m("old"));
        assert_eq!(c.get("a", "latest"), None);
        let g = c.generation();
        c.insert(g, "a", "latest", m("new"));
        assert_eq!(c.get("a", "latest"), Some(m("new")));
        c.invalidate("b");
        assert_eq!(
            c.get("a", "latest"),
            Some(m("new")),
            "other repositories stay cached"
        );
        c.invalidate("a");
        assert_eq!(c.get("a", "latest"), None);
    }

    #[test]
    fn bounded_in_bytes_and_large_manifests_are_not_cached() {
        let c = ManifestCache::new(100_000);
        let big = CachedManifest {
            content: Bytes::from(vec![b'x'; MAX_CACHED_MANIFEST + 1]),
            ..m("big")
        };
        c.insert(c.generation(), "a", "big", big);
        assert_eq!(c.get("a", "big"), None);
        let mid = CachedManifest {
            content: Bytes::from(vec![b'y'; MAX_CACHED_MANIFEST]),
            ..m("mid")
        };
        for i in 0..(MAX_CACHED_BYTES / MAX_CACHED_MANIFEST) * 3 {
            c.insert(c.generation(), "a", &i.to_string(), mid.clone());
            let entries = c.map.read().unwrap();
            let held: usize = entries.map.values().map(|e| e.content.len()).sum();
            assert_eq!(held, entries.bytes, "the running total matches");
            assert!(held <= MAX_CACHED_BYTES, "{held} bytes cached");
        }
        // Replacing an entry keeps the total right.
        let last = ((MAX_CACHED_BYTES / MAX_CACHED_MANIFEST) * 3 - 1).to_string();
        c.insert(c.generation(), "a", &last, m("small"));
        let entries = c.map.read().unwrap();
        let held: usize = entries.map.values().map(|e| e.content.len()).sum();
        assert_eq!(held, entries.bytes);
    }

    #[test]
    fn bounded() {
        let c = ManifestCache::new(2);
        for i in 0..5 {
            c.insert(c.generation(), "a", &i.to_string(), m("x"));
        }
        assert!(c.map.read().unwrap().map.len() <= 2);
    }
}
