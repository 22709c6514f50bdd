//! Without the `etcd` feature the API still exists, validates its input, and says how to rebuild.
#![cfg(not(feature = "etcd"))]

use tessera_membership::{MembershipConfig, MembershipError, WorkerRecord, register, watch};

#[tokio::test]
async fn register_and_watch_report_not_built() {
    const { assert!(!tessera_membership::ETCD_SUPPORTED) };
    let cfg = MembershipConfig::default();
    let rec = WorkerRecord {
        id: "w0".into(),
        grpc_addr: "127.0.0.1:7000".into(),
        collective_addr: "127.0.0.1:8000".into(),
        version: "0".into(),
    };
    let err = register(&cfg, rec).await.unwrap_err();
    assert!(matches!(err, MembershipError::NotBuilt));
    assert!(err.to_string().contains("--features etcd"), "{err}");
    assert!(matches!(watch(&cfg).await, Err(MembershipError::NotBuilt)));
}
