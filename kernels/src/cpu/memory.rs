//! How much host memory this process could still use: what bounds a CPU KV cache.
//!
//! Rust aborts the process when an allocation fails, and the KV cache's size comes from the
//! coordinator (`LoadShardRequest`) or a flag, so the worker checks it against this first. The
//! answer is the smaller of the kernel's `MemAvailable` (free memory plus reclaimable cache) and,
//! inside a container, the cgroup's limit minus its working set (usage less inactive file cache,
//! the figure the kubelet evicts on). `None` where neither can be read (not Linux).

use std::path::Path;

/// Bytes of host memory still available to this process, if known.
pub fn available() -> Option<u64> {
    let host = meminfo_available(&std::fs::read_to_string("/proc/meminfo").ok()?);
    match (host, cgroup_headroom()) {
        (Some(h), Some(c)) => Some(h.min(c)),
        (h, c) => h.or(c),
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn meminfo_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The cgroup's limit minus its working set, for cgroup v2 or v1 mounted at the usual place
/// (a container sees its own cgroup there). `None` without a limit.
fn cgroup_headroom() -> Option<u64> {
    let v2 = Path::new("/sys/fs/cgroup");
    let v1 = Path::new("/sys/fs/cgroup/memory");
    let layouts = [
        (v2, "memory.max", "memory.current", "inactive_file"),
        (
            v1,
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
            "total_inactive_file",
        ),
    ];
    for (dir, limit, usage, inactive) in layouts {
        let Ok(limit) = std::fs::read_to_string(dir.join(limit)) else {
            continue;
        };
        // "max" (v2) or a page-rounded i64::MAX (v1) mean no limit.
        let limit = limit.trim().parse::<u64>().ok().filter(|l| *l < 1 << 62)?;
        let usage: u64 = std::fs::read_to_string(dir.join(usage))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
        let cache = stat_value(&stat, inactive).unwrap_or(0);
        return Some(limit.saturating_sub(usage.saturating_sub(cache)));
    }
    None
}

/// The value of `key` in a `memory.stat` text.
fn stat_value(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kernels_figures() {
        let meminfo = "MemTotal:       24683656 kB\nMemFree:         9057360 kB\n\
                       MemAvailable:   23473804 kB\n";
        assert_eq!(meminfo_available(meminfo), Some(23473804 * 1024));
        assert_eq!(meminfo_available("MemTotal: 1 kB\n"), None);
        let stat = "anon 100\nfile 2000\ninactive_file 1500\n";
        assert_eq!(stat_value(stat, "inactive_file"), Some(1500));
        assert_eq!(stat_value(stat, "active_file"), None);
        if cfg!(target_os = "linux") {
            assert!(available().is_some_and(|b| b > 0));
        }
    }
}
