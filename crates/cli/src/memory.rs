//! Gives heap memory that is free again back to the system. glibc's allocator keeps what a
//! burst of connections freed (each connection's buffers, tens of KiB) inside its arenas, and
//! trims by itself only the very top of a heap: after 8,000 concurrent pulls, 250 MiB stayed
//! resident with almost nothing in use, until the process restarted. `malloc_trim` hands
//! those pages back; it runs only when more than [`TRIM_ABOVE`] of resident heap is free, so
//! a steady server never pays for it. Other allocators (musl's) return memory themselves, and
//! there this does nothing.

use std::time::Duration;

/// How often the heap is looked at.
const TRIM_EVERY: Duration = Duration::from_secs(10);
/// How much resident but free heap is left alone.
const TRIM_ABOVE: u64 = 32 << 20;

/// Runs for as long as the server does.
pub async fn give_back_freed_memory() {
    loop {
        tokio::time::sleep(TRIM_EVERY).await;
        // Walking the arenas takes their locks: off the async threads.
        if let Ok(Some(freed)) = tokio::task::spawn_blocking(trim_if_worth_it).await {
            tracing::debug!(
                resident_mib_before = freed.0 >> 20,
                resident_mib_after = freed.1 >> 20,
                "gave freed heap memory back to the system"
            );
        }
    }
}

/// Trims when the resident anonymous memory exceeds what the allocator has in use by more
/// than [`TRIM_ABOVE`]; returns the resident anonymous memory before and after.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_if_worth_it() -> Option<(u64, u64)> {
    let before = resident_anonymous()?;
    // SAFETY: mallinfo2 only reads the allocator's statistics, under its own locks.
    let info = unsafe { libc::mallinfo2() };
    let in_use = (info.uordblks as u64).saturating_add(info.hblkhd as u64);
    if before.saturating_sub(in_use) <= TRIM_ABOVE {
        return None;
    }
    // SAFETY: malloc_trim releases free pages under the allocator's own locks; any thread may
    // call it at any time.
    unsafe { libc::malloc_trim(0) };
    Some((before, resident_anonymous()?))
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_if_worth_it() -> Option<(u64, u64)> {
    None
}

/// This process's resident anonymous memory (`RssAnon`), in bytes.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn resident_anonymous() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Many small blocks freed out of order (as connections end) stay resident until trimmed;
    /// a trim gives most of them back.
    #[test]
    fn freed_memory_goes_back_once_there_is_enough_of_it() {
        let mut blocks: Vec<Vec<u8>> = (0..20_000).map(|i| vec![i as u8; 16 << 10]).collect();
        // Keep every 16th block, so no heap can shrink from its top by itself.
        let kept: Vec<Vec<u8>> = blocks.iter().step_by(16).cloned().collect();
        blocks.clear();
        blocks.shrink_to_fit();
        let (before, after) = trim_if_worth_it().expect("over 32 MiB free: a trim");
        assert!(
            before - after > 128 << 20,
            "{} MiB before, {} MiB after",
            before >> 20,
            after >> 20
        );
        assert_eq!(kept.len(), 1250);
        assert!(trim_if_worth_it().is_none(), "nothing left worth a trim");
    }
}
