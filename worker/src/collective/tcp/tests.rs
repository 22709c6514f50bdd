//! The TCP collective over loopback: every operation across three ranks, uneven and empty
//! all-to-all chunks, disagreements, and dead or stalled peers.

use std::sync::Arc;

use super::*;

fn t(v: f32, rows: usize, cols: usize) -> CpuTensor {
    CpuTensor {
        data: vec![v; rows * cols],
        rows,
        cols,
    }
}

fn group(world: usize, timeout: Duration) -> Vec<TcpRank> {
    group_with(&vec![timeout; world])
}

/// A group whose rank `r` has deadline `timeouts[r]`.
fn group_with(timeouts: &[Duration]) -> Vec<TcpRank> {
    let world = timeouts.len();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let leaves: Vec<_> = (1..world)
        .map(|r| {
            let timeout = timeouts[r];
            std::thread::spawn(move || TcpRank::join(r, world, addr, timeout).unwrap())
        })
        .collect();
    let mut ranks = vec![TcpRank::root(listener, world, timeouts[0]).unwrap()];
    ranks.extend(leaves.into_iter().map(|h| h.join().unwrap()));
    ranks
}

/// Runs `body` on every rank of a fresh group, each on its own thread; results by rank.
fn on_ranks<T: Send + 'static>(
    world: usize,
    timeout: Duration,
    body: impl Fn(TcpRank) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let body = Arc::new(body);
    let handles: Vec<_> = group(world, timeout)
        .into_iter()
        .map(|member| {
            let body = Arc::clone(&body);
            std::thread::spawn(move || body(member))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn all_reduce_and_all_gather_over_loopback() {
    on_ranks(3, Duration::from_secs(5), |member| {
        let r = member.rank() as f32;
        for round in 0..20 {
            let mut x = t(r + round as f32, 2, 3);
            member.all_reduce_sum(&CpuBackend, &mut x).unwrap();
            assert_eq!(x.data, vec![3.0 + 3.0 * round as f32; 6]);
            let g = member.all_gather_cols(&CpuBackend, t(r, 2, 1)).unwrap();
            assert_eq!(g.data, vec![0.0, 1.0, 2.0, 0.0, 1.0, 2.0]);
        }
    });
}

#[test]
fn all_to_all_routes_uneven_and_empty_chunks_between_every_pair() {
    let world = 3;
    on_ranks(world, Duration::from_secs(5), move |member| {
        let rank = member.rank();
        for round in 0..10 {
            // Rank s sends rank d (s + d + round) % 3 rows of 100 s + d: some chunks are empty,
            // and a rank's chunk to itself stays local on rank 0 but travels elsewhere.
            let rows = |s: usize, d: usize| (s + d + round) % 3;
            let chunks = (0..world)
                .map(|d| t((100 * rank + d) as f32, rows(rank, d), 4))
                .collect();
            let got = member.all_to_all(&CpuBackend, chunks).unwrap();
            assert_eq!(got.len(), world);
            for (s, c) in got.iter().enumerate() {
                assert_eq!((c.rows, c.cols), (rows(s, rank), 4), "from rank {s}");
                assert!(c.data.iter().all(|&v| v == (100 * s + rank) as f32));
            }
        }
        // Interleaved with the other operations, the streams stay in step.
        let mut x = t(1.0, 1, 1);
        member.all_reduce_sum(&CpuBackend, &mut x).unwrap();
        assert_eq!(x.data, vec![3.0]);
    });
}

#[test]
fn broadcast_from_every_root_over_loopback() {
    on_ranks(3, Duration::from_secs(5), |member| {
        let rank = member.rank();
        for root in [1, 0, 2, 2] {
            let mut x = if rank == root {
                t(root as f32 + 0.25, 3, 2)
            } else {
                t(-1.0, 0, 7)
            };
            member.broadcast(&CpuBackend, &mut x, root).unwrap();
            assert_eq!((x.rows, x.cols), (3, 2), "root {root} on rank {rank}");
            assert_eq!(x.data, vec![root as f32 + 0.25; 6]);
        }
    });
}

#[test]
fn disagreements_fail_every_rank_at_once() {
    let started = Instant::now();
    // Rank 2 passes two chunks for a world of three.
    let errs = on_ranks(3, Duration::from_secs(30), |member| {
        let n = if member.rank() == 2 { 2 } else { 3 };
        let chunks = (0..n).map(|_| t(1.0, 1, 1)).collect();
        member.all_to_all(&CpuBackend, chunks).unwrap_err()
    });
    for e in &errs {
        assert!(e.to_string().contains("rank 2 passed 2 chunks"), "{e}");
    }
    // Rank 1 names another root than the others.
    let errs = on_ranks(2, Duration::from_secs(30), |member| {
        let mut x = t(1.0, 1, 1);
        member
            .broadcast(&CpuBackend, &mut x, member.rank())
            .unwrap_err()
    });
    assert!(
        errs.iter().all(|e| e.to_string().contains("root 1")),
        "{errs:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_dead_or_stalled_peer_is_an_error_within_the_deadline() {
    let mut ranks = group(2, Duration::from_millis(300));
    let stalled = ranks.pop().unwrap();
    let root = ranks.pop().unwrap();
    let started = Instant::now();
    let mut x = t(1.0, 1, 1);
    let err = root.all_reduce_sum(&CpuBackend, &mut x).unwrap_err();
    assert!(
        matches!(err, CollectiveError::Timeout { ref peers, .. } if peers == &[1]),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(stalled);
    let err = root.all_reduce_sum(&CpuBackend, &mut x).unwrap_err();
    assert!(
        matches!(
            err,
            CollectiveError::Peer { peer: 1, .. } | CollectiveError::Timeout { .. }
        ),
        "{err}"
    );
}

#[test]
fn all_to_all_and_broadcast_time_out_naming_the_silent_peer() {
    // Rank 0 waits on rank 2, which never calls: rank 0 times out naming rank 2 and tells rank 1
    // (whose own deadline is longer, so what it reports is rank 0's word).
    let (short, long) = (Duration::from_millis(300), Duration::from_secs(5));
    let ranks = group_with(&[short, long, long]);
    let mut ranks = ranks.into_iter();
    let (root, one, _silent) = (
        ranks.next().unwrap(),
        ranks.next().unwrap(),
        ranks.next().unwrap(),
    );
    let started = Instant::now();
    let leaf = std::thread::spawn(move || {
        let chunks = (0..3).map(|_| t(1.0, 0, 4)).collect();
        one.all_to_all(&CpuBackend, chunks).unwrap_err()
    });
    let chunks = (0..3).map(|d| t(1.0, d, 4)).collect();
    let err = root.all_to_all(&CpuBackend, chunks).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("all_to_all on rank 0: timed out after 300ms waiting for rank 2"),
        "{err}"
    );
    let leaf_err = leaf.join().unwrap();
    assert!(
        matches!(leaf_err, CollectiveError::Peer { peer: 0, .. })
            && leaf_err.to_string().contains("waiting for rank 2"),
        "{leaf_err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    // A leaf whose root never answers a broadcast times out naming rank 0.
    let mut ranks = group(2, Duration::from_millis(300));
    let leaf = ranks.pop().unwrap();
    let mut x = t(0.0, 1, 1);
    let err = leaf.broadcast(&CpuBackend, &mut x, 0).unwrap_err();
    assert!(
        matches!(err, CollectiveError::Timeout { op: "broadcast", rank: 1, ref peers, .. } if peers == &[0]),
        "{err}"
    );
}

#[test]
fn nobody_joining_times_out_at_bootstrap() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let err = TcpRank::root(listener, 3, Duration::from_millis(100))
        .err()
        .unwrap();
    assert!(
        matches!(err, CollectiveError::Timeout { ref peers, .. } if peers == &[1, 2]),
        "{err}"
    );
}
