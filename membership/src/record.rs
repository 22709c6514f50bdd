//! What a worker says about itself in etcd. The record is JSON so that operators can read it with
//! `etcdctl get --prefix /tessera/default/workers/` and so that fields can be added later without
//! breaking older coordinators (unknown fields are ignored on read).

use serde::{Deserialize, Serialize};

use crate::error::MembershipError;

/// A worker's published identity, stored as the JSON value of `<prefix>/workers/<id>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Unique within the cluster prefix; the last segment of the key.
    pub id: String,
    /// Where the worker's gRPC control service listens (`host:port`).
    pub grpc_addr: String,
    /// Where the worker's collective (rank-to-rank) transport listens (`host:port`).
    pub collective_addr: String,
    /// The worker's build version, so a coordinator can refuse a mixed cluster.
    pub version: String,
}

/// Longest accepted id; keys stay short and log lines readable.
const MAX_ID_LEN: usize = 128;

fn invalid(field: &'static str, reason: impl Into<String>) -> MembershipError {
    MembershipError::InvalidRecord {
        field,
        reason: reason.into(),
    }
}

impl WorkerRecord {
    /// Checks that the record can be published: the id must be usable as one key segment.
    pub fn validate(&self) -> Result<(), MembershipError> {
        if self.id.is_empty() {
            return Err(invalid("id", "is empty"));
        }
        if self.id.len() > MAX_ID_LEN {
            return Err(invalid(
                "id",
                format!("is {} bytes long; at most {MAX_ID_LEN}", self.id.len()),
            ));
        }
        if self
            .id
            .chars()
            .any(|c| c == '/' || c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "id",
                format!(
                    "is {:?}; it must not contain '/', spaces or control characters",
                    self.id
                ),
            ));
        }
        if self.grpc_addr.trim().is_empty() {
            return Err(invalid("grpc_addr", "is empty"));
        }
        Ok(())
    }

    /// The JSON stored in etcd.
    pub(crate) fn to_json(&self) -> String {
        // Serialising a struct of four strings cannot fail; the fallback only keeps this
        // panic-free.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads a record from a key and value seen under `workers_prefix`. The id in the value must
    /// match the key, so that a record copied to the wrong key cannot impersonate another worker.
    pub(crate) fn from_kv(workers_prefix: &str, key: &[u8], value: &[u8]) -> Result<Self, String> {
        let key = std::str::from_utf8(key).map_err(|_| "the key is not UTF-8".to_owned())?;
        let key_id = key
            .strip_prefix(workers_prefix)
            .ok_or_else(|| format!("the key is not under {workers_prefix}"))?;
        let record: WorkerRecord = serde_json::from_slice(value)
            .map_err(|e| format!("the value is not a worker record: {e}"))?;
        if record.id != key_id {
            return Err(format!(
                "the record's id {:?} differs from the key's {key_id:?}",
                record.id
            ));
        }
        record.validate().map_err(|e| e.to_string())?;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> WorkerRecord {
        WorkerRecord {
            id: id.into(),
            grpc_addr: "127.0.0.1:7001".into(),
            collective_addr: "127.0.0.1:7101".into(),
            version: "0.1.0".into(),
        }
    }

    #[test]
    fn round_trips_through_json() {
        let r = rec("w0");
        let back = WorkerRecord::from_kv("/p/workers/", b"/p/workers/w0", r.to_json().as_bytes());
        assert_eq!(back.unwrap(), r);
    }

    #[test]
    fn ignores_unknown_fields_from_newer_workers() {
        let v =
            br#"{"id":"w0","grpc_addr":"a:1","collective_addr":"a:2","version":"9","gpu":"h100"}"#;
        assert!(WorkerRecord::from_kv("/p/workers/", b"/p/workers/w0", v).is_ok());
    }

    #[test]
    fn rejects_malformed_values_with_a_reason() {
        let p = "/p/workers/";
        let w0 = rec("w0").to_json();
        let bad: [(&[u8], &[u8], &str); 5] = [
            (b"/p/workers/w0", b"not json", "not a worker record"),
            (b"/p/workers/w0", br#"{"id":"w0"}"#, "not a worker record"),
            (b"/p/workers/w1", w0.as_bytes(), "differs"),
            (b"/q/workers/w0", w0.as_bytes(), "not under"),
            (b"/p/workers/\xff", b"{}", "UTF-8"),
        ];
        for (k, v, why) in bad {
            let err = WorkerRecord::from_kv(p, k, v).unwrap_err();
            assert!(err.contains(why), "{err:?} should mention {why:?}");
        }
    }

    #[test]
    fn validate_rejects_ids_that_are_not_one_key_segment() {
        for id in ["", "a/b", "a b", "x\n"] {
            assert!(matches!(
                rec(id).validate(),
                Err(MembershipError::InvalidRecord { field: "id", .. })
            ));
        }
        assert!(rec(&"x".repeat(200)).validate().is_err());
        let mut r = rec("w0");
        r.grpc_addr.clear();
        assert!(matches!(
            r.validate(),
            Err(MembershipError::InvalidRecord {
                field: "grpc_addr",
                ..
            })
        ));
    }
}
