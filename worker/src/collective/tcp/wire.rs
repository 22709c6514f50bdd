//! The TCP collective's frames: a hello at bootstrap, then one frame per rank and operation.
//!
//! A frame is `op: u8, root: u32, parts: u32`, then per part `rows: u32, cols: u32` and
//! `rows * cols` little-endian f32 values. `root` is the broadcast root (0 otherwise); rank 0
//! compares it and `op` with its own so ranks that disagree fail at once. An `ERROR` frame carries
//! rank 0's reason (UTF-8) instead of parts: a failure on rank 0 reaches the other ranks at once
//! instead of after their deadlines.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;

use tessera_kernels::cpu::CpuTensor;

pub(super) const MAGIC: &[u8; 4] = b"TSRA";
pub(super) const ALL_REDUCE: u8 = 1;
pub(super) const ALL_GATHER: u8 = 2;
pub(super) const ALL_TO_ALL: u8 = 3;
pub(super) const BROADCAST: u8 = 4;
const ERROR: u8 = 0xFF;
/// Refuse parts beyond this many values (1 GiB of f32): a corrupt header must not allocate wildly.
const MAX_VALUES: usize = 1 << 28;
/// Refuse frames with more parts than this (all-to-all sends one per rank).
const MAX_PARTS: usize = 1 << 16;
/// Longest error text rank 0 sends.
const MAX_ERROR_BYTES: usize = 4096;

/// What a peer sent: its parts, or (from rank 0) why the operation failed.
pub(super) enum Frame {
    Parts {
        op: u8,
        root: u32,
        parts: Vec<CpuTensor>,
    },
    Failed(String),
}

pub(super) fn op_name(op: u8) -> &'static str {
    match op {
        ALL_REDUCE => "all_reduce",
        ALL_GATHER => "all_gather",
        ALL_TO_ALL => "all_to_all",
        BROADCAST => "broadcast",
        _ => "an unknown operation",
    }
}

pub(super) fn read_u32(s: &mut TcpStream) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn invalid(detail: String) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidData, detail)
}

/// Sends one frame (in one write, so small frames leave in one segment).
pub(super) fn send(
    s: &mut TcpStream,
    op: u8,
    root: u32,
    parts: &[CpuTensor],
) -> std::io::Result<()> {
    let values: usize = parts.iter().map(|t| t.data.len()).sum();
    let mut buf = Vec::with_capacity(9 + parts.len() * 8 + values * 4);
    buf.push(op);
    buf.extend_from_slice(&root.to_le_bytes());
    buf.extend_from_slice(&(parts.len() as u32).to_le_bytes());
    for t in parts {
        buf.extend_from_slice(&(t.rows as u32).to_le_bytes());
        buf.extend_from_slice(&(t.cols as u32).to_le_bytes());
        buf.extend(t.data.iter().flat_map(|v| v.to_le_bytes()));
    }
    s.write_all(&buf)
}

/// Sends an `ERROR` frame carrying `reason` (cut to [`MAX_ERROR_BYTES`]).
pub(super) fn send_error(s: &mut TcpStream, reason: &str) -> std::io::Result<()> {
    let mut end = reason.len().min(MAX_ERROR_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut buf = vec![ERROR];
    buf.extend_from_slice(&(end as u32).to_le_bytes());
    buf.extend_from_slice(&reason.as_bytes()[..end]);
    s.write_all(&buf)
}

/// Reads one frame; an unreadable header is `InvalidData`.
pub(super) fn recv(s: &mut TcpStream) -> std::io::Result<Frame> {
    let mut op = [0u8; 1];
    s.read_exact(&mut op)?;
    if op[0] == ERROR {
        let len = read_u32(s)? as usize;
        if len > MAX_ERROR_BYTES {
            return Err(invalid(format!("an error frame of {len} bytes")));
        }
        let mut text = vec![0u8; len];
        s.read_exact(&mut text)?;
        return Ok(Frame::Failed(String::from_utf8_lossy(&text).into_owned()));
    }
    let root = read_u32(s)?;
    let count = read_u32(s)? as usize;
    if count > MAX_PARTS {
        return Err(invalid(format!("a frame of {count} parts (op {})", op[0])));
    }
    let mut parts = Vec::with_capacity(count);
    for _ in 0..count {
        let (rows, cols) = (read_u32(s)? as usize, read_u32(s)? as usize);
        if rows.saturating_mul(cols) > MAX_VALUES {
            return Err(invalid(format!("a {rows}x{cols} part (op {})", op[0])));
        }
        let mut bytes = vec![0u8; rows * cols * 4];
        s.read_exact(&mut bytes)?;
        let data = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        parts.push(CpuTensor { data, rows, cols });
    }
    Ok(Frame::Parts {
        op: op[0],
        root,
        parts,
    })
}
