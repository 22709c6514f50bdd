//! Ranks in separate processes joined over TCP, through rank 0 (a star: every rank sends its part
//! to rank 0, which combines or routes in rank order and sends each rank its result). Simple and
//! exact; NCCL replaces it on GPUs. All-to-all takes two hops (source → rank 0 → destination) and
//! broadcast from a root other than 0 goes through rank 0 too. Every socket has read and write
//! deadlines, so a stalled or dead peer turns into [`CollectiveError`] naming it instead of a
//! hang; when rank 0 fails an operation it tells the other ranks at once ([`wire`]).

#[cfg(test)]
mod tests;
mod wire;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tessera_kernels::cpu::{CpuBackend, CpuTensor};

use super::{
    Collective, CollectiveError, check_chunk_count, check_root, concat_cols, sum_in_rank_order,
};
use wire::{ALL_GATHER, ALL_REDUCE, ALL_TO_ALL, BROADCAST, Frame, MAGIC, op_name, read_u32};

enum Links {
    /// Rank 0: streams to ranks 1..world, in rank order.
    Root(Vec<TcpStream>),
    /// Other ranks: the stream to rank 0.
    Leaf(TcpStream),
}

/// What rank 0 sends back: the same parts to every rank, or each rank its own.
enum Outcome {
    Same(Vec<CpuTensor>),
    PerRank(Vec<Vec<CpuTensor>>),
}

/// One rank's handle on a TCP group.
pub struct TcpRank {
    rank: usize,
    world: usize,
    timeout: Duration,
    links: Mutex<Links>,
}

/// The error for a failed read or write between `rank` and `peer`.
fn io_error(
    (op, rank): (&'static str, usize),
    peer: usize,
    timeout: Duration,
    e: std::io::Error,
) -> CollectiveError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => CollectiveError::Timeout {
            op,
            rank,
            timeout,
            peers: vec![peer],
        },
        _ => CollectiveError::Peer {
            op,
            rank,
            peer,
            detail: e.to_string(),
        },
    }
}

fn configure(s: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))
}

impl TcpRank {
    /// Rank 0: accepts the other `world - 1` ranks on `listener` within `timeout`.
    pub fn root(
        listener: TcpListener,
        world: usize,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let op = "bootstrap";
        // Before a peer announced its rank, a failure is blamed on whoever is still missing.
        let err = |e| io_error((op, 0), 0, timeout, e);
        let deadline = Instant::now() + timeout;
        listener.set_nonblocking(true).map_err(err)?;
        let mut peers: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        while peers.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    configure(&s, timeout).map_err(err)?;
                    let mut magic = [0u8; 4];
                    s.read_exact(&mut magic).map_err(err)?;
                    let (rank, their_world) = (
                        read_u32(&mut s).map_err(err)? as usize,
                        read_u32(&mut s).map_err(err)? as usize,
                    );
                    let slot = (rank >= 1).then(|| peers.get_mut(rank - 1)).flatten();
                    match slot {
                        Some(slot @ None) if &magic == MAGIC && their_world == world => {
                            s.write_all(b"OK").map_err(err)?;
                            *slot = Some(s);
                        }
                        _ => {
                            return Err(CollectiveError::Mismatch {
                                op,
                                rank: 0,
                                detail: format!(
                                    "a peer announced rank {rank} of world {their_world} (expected a new rank of {world})"
                                ),
                            });
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    return Err(CollectiveError::Timeout {
                        op,
                        rank: 0,
                        timeout,
                        peers: (1..world).filter(|r| peers[r - 1].is_none()).collect(),
                    });
                }
                Err(e) => return Err(err(e)),
            }
        }
        let peers = peers.into_iter().flatten().collect();
        Ok(TcpRank {
            rank: 0,
            world,
            timeout,
            links: Mutex::new(Links::Root(peers)),
        })
    }

    /// Rank `rank > 0`: connects to rank 0 at `root`, retrying until `timeout` (rank 0 may start
    /// listening later).
    pub fn join(
        rank: usize,
        world: usize,
        root: SocketAddr,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let op = "bootstrap";
        let err = |e| io_error((op, rank), 0, timeout, e);
        let deadline = Instant::now() + timeout;
        let mut s = loop {
            match TcpStream::connect_timeout(&root, timeout) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(err(e)),
            }
        };
        configure(&s, timeout).map_err(err)?;
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(world as u32).to_le_bytes());
        s.write_all(&hello).map_err(err)?;
        let mut ok = [0u8; 2];
        s.read_exact(&mut ok).map_err(err)?;
        Ok(TcpRank {
            rank,
            world,
            timeout,
            links: Mutex::new(Links::Leaf(s)),
        })
    }

    /// Sends `mine` to rank 0 and returns what rank 0 `route`s to this rank from everyone's parts
    /// (by rank). `root` is the broadcast root (0 otherwise); ranks must agree on it and on `op`.
    fn exchange(
        &self,
        (op, root): (u8, usize),
        mine: Vec<CpuTensor>,
        route: impl FnOnce(Vec<Vec<CpuTensor>>) -> Result<Outcome, CollectiveError>,
    ) -> Result<Vec<CpuTensor>, CollectiveError> {
        let name = op_name(op);
        let mut links = self.links.lock().map_err(|_| CollectiveError::Poisoned {
            op: name,
            rank: self.rank,
        })?;
        match &mut *links {
            Links::Root(peers) => {
                let result = self.gather_and_route(peers, (op, root), mine, route);
                if let Err(e) = &result {
                    // Best effort: the others fail now instead of at their deadlines.
                    let reason = e.to_string();
                    for p in peers.iter_mut() {
                        let _ = wire::send_error(p, &reason);
                    }
                }
                result
            }
            Links::Leaf(to_root) => {
                let err = |e| io_error((name, self.rank), 0, self.timeout, e);
                wire::send(to_root, op, root as u32, &mine).map_err(err)?;
                match wire::recv(to_root).map_err(err)? {
                    Frame::Parts { parts, .. } => Ok(parts),
                    Frame::Failed(reason) => Err(CollectiveError::Peer {
                        op: name,
                        rank: self.rank,
                        peer: 0,
                        detail: format!("rank 0 failed the operation: {reason}"),
                    }),
                }
            }
        }
    }

    /// Rank 0's side of [`TcpRank::exchange`].
    fn gather_and_route(
        &self,
        peers: &mut [TcpStream],
        (op, root): (u8, usize),
        mine: Vec<CpuTensor>,
        route: impl FnOnce(Vec<Vec<CpuTensor>>) -> Result<Outcome, CollectiveError>,
    ) -> Result<Vec<CpuTensor>, CollectiveError> {
        let name = op_name(op);
        let err = |peer, e| io_error((name, 0), peer, self.timeout, e);
        let mut all = vec![mine];
        for (i, p) in peers.iter_mut().enumerate() {
            let peer = i + 1;
            match wire::recv(p).map_err(|e| err(peer, e))? {
                Frame::Parts {
                    op: theirs,
                    root: their_root,
                    parts,
                } if theirs == op && their_root as usize == root => all.push(parts),
                Frame::Parts {
                    op: theirs,
                    root: their_root,
                    ..
                } => {
                    return Err(CollectiveError::Mismatch {
                        op: name,
                        rank: 0,
                        detail: format!(
                            "rank {peer} called {} (root {their_root}) while this rank called {name} (root {root})",
                            op_name(theirs)
                        ),
                    });
                }
                Frame::Failed(_) => {
                    return Err(CollectiveError::Mismatch {
                        op: name,
                        rank: 0,
                        detail: format!("rank {peer} sent an error frame (only rank 0 may)"),
                    });
                }
            }
        }
        match route(all)? {
            Outcome::Same(result) => {
                for (i, p) in peers.iter_mut().enumerate() {
                    wire::send(p, op, root as u32, &result).map_err(|e| err(i + 1, e))?;
                }
                Ok(result)
            }
            Outcome::PerRank(mut each) => {
                for (i, p) in peers.iter_mut().enumerate() {
                    wire::send(p, op, root as u32, &each[i + 1]).map_err(|e| err(i + 1, e))?;
                }
                Ok(each.swap_remove(0))
            }
        }
    }

    /// The single part a rank sent for `op` (all-reduce, all-gather, a broadcast's root).
    fn one_part(
        &self,
        op: &'static str,
        from: usize,
        mut parts: Vec<CpuTensor>,
    ) -> Result<CpuTensor, CollectiveError> {
        match parts.len() {
            1 => Ok(parts.swap_remove(0)),
            n => Err(CollectiveError::Mismatch {
                op,
                rank: self.rank,
                detail: format!("rank {from} sent {n} parts where one was expected"),
            }),
        }
    }
}

impl Collective<CpuBackend> for TcpRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, _: &CpuBackend, t: &mut CpuTensor) -> Result<(), CollectiveError> {
        let (op, rank) = ("all_reduce", self.rank);
        let mut shape = t.clone();
        let result = self.exchange((ALL_REDUCE, 0), vec![t.clone()], |all| {
            let all = all
                .into_iter()
                .enumerate()
                .map(|(from, parts)| self.one_part(op, from, parts))
                .collect::<Result<Vec<_>, _>>()?;
            sum_in_rank_order(op, rank, &mut shape, &all)?;
            Ok(Outcome::Same(vec![shape]))
        })?;
        *t = self.one_part(op, 0, result)?;
        Ok(())
    }

    fn all_gather_cols(&self, _: &CpuBackend, t: CpuTensor) -> Result<CpuTensor, CollectiveError> {
        let (op, rank) = ("all_gather", self.rank);
        let result = self.exchange((ALL_GATHER, 0), vec![t], |all| {
            let all = all
                .into_iter()
                .enumerate()
                .map(|(from, parts)| self.one_part(op, from, parts))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Outcome::Same(vec![concat_cols(op, rank, &all)?]))
        })?;
        self.one_part(op, 0, result)
    }

    fn all_to_all(
        &self,
        _: &CpuBackend,
        chunks: Vec<CpuTensor>,
    ) -> Result<Vec<CpuTensor>, CollectiveError> {
        let (op, rank, world) = ("all_to_all", self.rank, self.world);
        // Sent even when malformed: rank 0 then fails the operation for everyone at once.
        let received = self.exchange((ALL_TO_ALL, 0), chunks, |all| {
            for (from, parts) in all.iter().enumerate() {
                check_chunk_count(op, rank, from, parts.len(), world)?;
            }
            // Transpose: destination d receives every source's chunk d, in source order.
            let mut each: Vec<Vec<CpuTensor>> = (0..world).map(|_| Vec::new()).collect();
            for parts in all {
                for (d, chunk) in parts.into_iter().enumerate() {
                    each[d].push(chunk);
                }
            }
            Ok(Outcome::PerRank(each))
        })?;
        check_chunk_count(op, rank, 0, received.len(), world)?;
        Ok(received)
    }

    fn broadcast(
        &self,
        _: &CpuBackend,
        t: &mut CpuTensor,
        root: usize,
    ) -> Result<(), CollectiveError> {
        let op = "broadcast";
        check_root(op, self.rank, root, self.world)?;
        // Only the root's tensor travels; the others send an empty frame (their view of the
        // root, checked by rank 0) and receive the root's.
        let mine = if self.rank == root {
            vec![t.clone()]
        } else {
            Vec::new()
        };
        let result = self.exchange((BROADCAST, root), mine, |mut all| {
            let theirs = std::mem::take(&mut all[root]);
            Ok(Outcome::Same(vec![self.one_part(op, root, theirs)?]))
        })?;
        if self.rank != root {
            *t = self.one_part(op, 0, result)?;
        }
        Ok(())
    }
}
