//! Ranks in separate processes joined over TCP, through rank 0 (a star: every rank sends its part
//! to rank 0, which combines in rank order and sends the result back). Simple and exact; NCCL
//! replaces it on GPUs. Every socket has read and write deadlines, so a stalled or dead peer turns
//! into [`CollectiveError`] instead of a hang.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tessera_kernels::cpu::{CpuBackend, CpuTensor};

use super::{Collective, CollectiveError, concat_cols, sum_in_rank_order};

const MAGIC: &[u8; 4] = b"TSRA";
const ALL_REDUCE: u8 = 1;
const ALL_GATHER: u8 = 2;
/// Refuse frames beyond this many values (1 GiB of f32): a corrupt header must not allocate wildly.
const MAX_VALUES: usize = 1 << 28;

enum Links {
    /// Rank 0: streams to ranks 1..world, in rank order.
    Root(Vec<TcpStream>),
    /// Other ranks: the stream to rank 0.
    Leaf(TcpStream),
}

/// One rank's handle on a TCP group.
pub struct TcpRank {
    rank: usize,
    world: usize,
    timeout: Duration,
    links: Mutex<Links>,
}

fn io_error(
    op: &'static str,
    rank: usize,
    timeout: Duration,
    e: std::io::Error,
) -> CollectiveError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            CollectiveError::Timeout { op, rank, timeout }
        }
        _ => CollectiveError::Peer {
            op,
            rank,
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

fn read_u32(s: &mut TcpStream) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn send(s: &mut TcpStream, op: u8, t: &CpuTensor) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(9 + t.data.len() * 4);
    buf.push(op);
    buf.extend_from_slice(&(t.rows as u32).to_le_bytes());
    buf.extend_from_slice(&(t.cols as u32).to_le_bytes());
    buf.extend(t.data.iter().flat_map(|v| v.to_le_bytes()));
    s.write_all(&buf)
}

fn recv(s: &mut TcpStream, op: u8) -> std::io::Result<CpuTensor> {
    let mut tag = [0u8; 1];
    s.read_exact(&mut tag)?;
    let (rows, cols) = (read_u32(s)? as usize, read_u32(s)? as usize);
    if tag[0] != op || rows.saturating_mul(cols) > MAX_VALUES {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!(
                "unexpected frame (op {}, {rows}x{cols}) while expecting op {op}",
                tag[0]
            ),
        ));
    }
    let mut bytes = vec![0u8; rows * cols * 4];
    s.read_exact(&mut bytes)?;
    let data = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(CpuTensor { data, rows, cols })
}

impl TcpRank {
    /// Rank 0: accepts the other `world - 1` ranks on `listener` within `timeout`.
    pub fn root(
        listener: TcpListener,
        world: usize,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let op = "bootstrap";
        let err = |e| io_error(op, 0, timeout, e);
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
        let err = |e| io_error(op, rank, timeout, e);
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

    /// Sends `mine` to rank 0 and returns what rank 0 computes from everyone's parts with `combine`.
    fn exchange(
        &self,
        op: (&'static str, u8),
        mine: CpuTensor,
        combine: impl FnOnce(Vec<CpuTensor>) -> Result<CpuTensor, CollectiveError>,
    ) -> Result<CpuTensor, CollectiveError> {
        let (name, tag) = op;
        let err = |e| io_error(name, self.rank, self.timeout, e);
        let mut links = self.links.lock().map_err(|_| CollectiveError::Peer {
            op: name,
            rank: self.rank,
            detail: "poisoned".into(),
        })?;
        match &mut *links {
            Links::Root(peers) => {
                let mut all = vec![mine];
                for p in peers.iter_mut() {
                    all.push(recv(p, tag).map_err(err)?);
                }
                let result = combine(all)?;
                for p in peers.iter_mut() {
                    send(p, tag, &result).map_err(err)?;
                }
                Ok(result)
            }
            Links::Leaf(root) => {
                send(&mut *root, tag, &mine).map_err(err)?;
                recv(root, tag).map_err(err)
            }
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
        let rank = self.rank;
        let mut shape = t.clone();
        *t = self.exchange(("all_reduce", ALL_REDUCE), t.clone(), |all| {
            sum_in_rank_order("all_reduce", rank, &mut shape, &all)?;
            Ok(shape)
        })?;
        Ok(())
    }

    fn all_gather_cols(&self, _: &CpuBackend, t: CpuTensor) -> Result<CpuTensor, CollectiveError> {
        let rank = self.rank;
        self.exchange(("all_gather", ALL_GATHER), t, |all| {
            concat_cols("all_gather", rank, &all)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(world: usize, timeout: Duration) -> Vec<TcpRank> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let leaves: Vec<_> = (1..world)
            .map(|r| std::thread::spawn(move || TcpRank::join(r, world, addr, timeout).unwrap()))
            .collect();
        let mut ranks = vec![TcpRank::root(listener, world, timeout).unwrap()];
        ranks.extend(leaves.into_iter().map(|h| h.join().unwrap()));
        ranks
    }

    #[test]
    fn all_reduce_and_all_gather_over_loopback() {
        let handles: Vec<_> = group(3, Duration::from_secs(5))
            .into_iter()
            .map(|member| {
                std::thread::spawn(move || {
                    let r = member.rank() as f32;
                    for round in 0..20 {
                        let mut x = CpuTensor {
                            data: vec![r + round as f32; 6],
                            rows: 2,
                            cols: 3,
                        };
                        member.all_reduce_sum(&CpuBackend, &mut x).unwrap();
                        assert_eq!(x.data, vec![3.0 + 3.0 * round as f32; 6]);
                        let g = member
                            .all_gather_cols(
                                &CpuBackend,
                                CpuTensor {
                                    data: vec![r, r],
                                    rows: 2,
                                    cols: 1,
                                },
                            )
                            .unwrap();
                        assert_eq!(g.data, vec![0.0, 1.0, 2.0, 0.0, 1.0, 2.0]);
                    }
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
    }

    #[test]
    fn a_dead_or_stalled_peer_is_an_error_within_the_deadline() {
        let mut ranks = group(2, Duration::from_millis(300));
        let stalled = ranks.pop().unwrap();
        let root = ranks.pop().unwrap();
        let started = Instant::now();
        let mut x = CpuTensor {
            data: vec![1.0],
            rows: 1,
            cols: 1,
        };
        let err = root.all_reduce_sum(&CpuBackend, &mut x).unwrap_err();
        assert!(matches!(err, CollectiveError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(stalled);
        let err = root.all_reduce_sum(&CpuBackend, &mut x).unwrap_err();
        assert!(
            matches!(
                err,
                CollectiveError::Peer { .. } | CollectiveError::Timeout { .. }
            ),
            "{err}"
        );
    }

    #[test]
    fn nobody_joining_times_out_at_bootstrap() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let err = TcpRank::root(listener, 2, Duration::from_millis(100))
            .err()
            .unwrap();
        assert!(matches!(err, CollectiveError::Timeout { .. }), "{err}");
    }
}
