//! The parts of the NCCL API that are the same in every build: the group's unique id (plain bytes
//! that travel over gRPC), NCCL's version and the errors of its operations.
//!
//! They live outside `nccl/` (feature `cuda`) and `nccl_stub.rs` so that code handling ids and
//! errors, a coordinator that forwards an id included, compiles once for both builds; only the
//! constructors that need the library ([`NcclId::new`], `NcclComm::new`) differ.

use std::fmt;
use std::time::Duration;

use thiserror::Error;

use crate::{BackendError, Result};

/// Bytes of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES` in `nccl.h`).
pub const NCCL_ID_BYTES: usize = 128;

/// Names one NCCL group: made once by [`NcclId::new`] (`ncclGetUniqueId`), sent to every rank as
/// bytes ([`NcclId::as_bytes`]) and read back there ([`NcclId::from_bytes`]).
///
/// The process that calls [`NcclId::new`] hosts the group's bootstrap root: NCCL starts a thread
/// in it listening on a TCP port of the interface NCCL picks (`NCCL_SOCKET_IFNAME` chooses), and
/// every rank connects there while it joins. That process must stay alive, and reachable from
/// every rank, until all of them have joined; it needs `libnccl.so.2` but no GPU. An id serves one
/// group formation only: a new group needs a new id.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId(pub(crate) [u8; NCCL_ID_BYTES]);

impl NcclId {
    /// The id in `bytes` (exactly [`NCCL_ID_BYTES`] of them, as [`NcclId::as_bytes`] gave).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let id: [u8; NCCL_ID_BYTES] = bytes.try_into().map_err(|_| {
            BackendError::invalid(
                "NcclId::from_bytes",
                format!("an NCCL id is {NCCL_ID_BYTES} bytes, got {}", bytes.len()),
            )
        })?;
        Ok(NcclId(id))
    }

    /// The bytes to send to the other ranks.
    pub fn as_bytes(&self) -> &[u8; NCCL_ID_BYTES] {
        &self.0
    }

    /// Lower-case hex (256 characters), for environment variables and command lines.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The id written by [`NcclId::to_hex`].
    pub fn from_hex(hex: &str) -> Result<Self> {
        let bad = || {
            BackendError::invalid(
                "NcclId::from_hex",
                format!(
                    "expected {} hex digits, got {:?}",
                    2 * NCCL_ID_BYTES,
                    hex.get(..16).unwrap_or(hex)
                ),
            )
        };
        if hex.len() != 2 * NCCL_ID_BYTES || !hex.is_ascii() {
            return Err(bad());
        }
        let bytes = (0..NCCL_ID_BYTES)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad()))
            .collect::<Result<Vec<u8>>>()?;
        Self::from_bytes(&bytes)
    }
}

impl fmt::Debug for NcclId {
    // The whole id is 256 hex digits of mostly an address and padding; the start tells ids apart
    // in logs (it holds the random magic NCCL puts first).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NcclId({}…)", &self.to_hex()[..16])
    }
}

/// A version of NCCL, as `ncclGetVersion` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NcclVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl NcclVersion {
    /// Decodes `ncclGetVersion`'s integer: `major*10000 + minor*100 + patch` since NCCL 2.9,
    /// `major*1000 + minor*100 + patch` before.
    pub fn from_code(code: u32) -> Self {
        if code >= 10_000 {
            NcclVersion {
                major: code / 10_000,
                minor: code % 10_000 / 100,
                patch: code % 100,
            }
        } else {
            NcclVersion {
                major: code / 1000,
                minor: code % 1000 / 100,
                patch: code % 100,
            }
        }
    }
}

impl fmt::Display for NcclVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Why an NCCL operation failed. After any error other than [`NcclError::Backend`] from
/// `NcclComm::new`'s argument checks, the communicator has been aborted and every later operation
/// returns [`NcclError::Unusable`]: the group must be formed again, with a new id.
#[derive(Debug, Error)]
pub enum NcclError {
    /// NCCL, the driver or a GPU is missing ([`BackendError::CudaNotAvailable`], e.g.
    /// "libnccl.so.2 not found ..."), or an argument was refused before anything was sent.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The operation (or joining the group, `op` = "init") did not finish within the deadline:
    /// some rank never joined, stalled or died. NCCL does not say which.
    #[error("{op} on rank {rank}: timed out after {timeout:?} (the communicator was aborted)")]
    Timeout {
        op: &'static str,
        rank: usize,
        timeout: Duration,
    },
    /// The ranks called different operations, or the same one with arguments that do not fit
    /// together (row counts, chunk counts, roots). Every rank that exchanged its arguments sees
    /// the same disagreement, so they all fail at once.
    #[error("{op} on rank {rank}: {detail}")]
    Mismatch {
        op: &'static str,
        rank: usize,
        detail: String,
    },
    /// NCCL or the device reported an error (a peer's failure arrives as NCCL's "remote error").
    #[error("{op} on rank {rank}: {detail} (the communicator was aborted)")]
    Failed {
        op: &'static str,
        rank: usize,
        detail: String,
    },
    /// An earlier operation failed and aborted the communicator.
    #[error("{op} on rank {rank}: the communicator is unusable after an earlier failure: {cause}")]
    Unusable {
        op: &'static str,
        rank: usize,
        cause: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_bytes_and_hex() {
        let mut raw = [0u8; NCCL_ID_BYTES];
        raw.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i * 7) as u8);
        let id = NcclId(raw);
        assert_eq!(NcclId::from_bytes(id.as_bytes()).unwrap(), id);
        assert_eq!(NcclId::from_hex(&id.to_hex()).unwrap(), id);
        assert!(format!("{id:?}").starts_with("NcclId(00070e15"));
        let err = NcclId::from_bytes(&raw[..5]).unwrap_err();
        assert!(err.to_string().contains("128 bytes, got 5"), "{err}");
        assert!(NcclId::from_hex("zz").is_err());
        assert!(NcclId::from_hex(&"g".repeat(256)).is_err());
    }

    #[test]
    fn versions_decode_both_encodings() {
        assert_eq!(NcclVersion::from_code(22809).to_string(), "2.28.9");
        assert_eq!(NcclVersion::from_code(23203).to_string(), "2.32.3");
        assert_eq!(NcclVersion::from_code(2804).to_string(), "2.8.4");
        assert!(NcclVersion::from_code(21800) < NcclVersion::from_code(23000));
    }
}
