//! The `--etcd` flags shared by `tessera worker` and `tessera coordinator`.

use std::time::Duration;

use clap::Args;
use tessera_membership::MembershipConfig;

#[derive(Args, Debug, Clone)]
pub struct EtcdArgs {
    /// etcd endpoint(s), comma-separated (e.g. http://127.0.0.1:2379). Workers register there and
    /// the coordinator forms its group from the workers it finds. Needs a build with
    /// `--features etcd`.
    #[arg(long, env = "TESSERA_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Cluster name: workers and coordinator of one cluster share it (keys live under
    /// /tessera/<cluster>/).
    #[arg(long, default_value = "default", env = "TESSERA_CLUSTER")]
    pub cluster: String,
    /// Lease time-to-live in seconds: a worker that stops renewing it disappears after this long.
    #[arg(long, default_value_t = 10, env = "TESSERA_ETCD_LEASE_TTL")]
    pub etcd_lease_ttl: u64,
}

impl EtcdArgs {
    /// The membership settings, or `None` without `--etcd`.
    pub fn config(&self) -> anyhow::Result<Option<MembershipConfig>> {
        if self.etcd.is_empty() {
            return Ok(None);
        }
        let cfg = MembershipConfig {
            endpoints: self.etcd.clone(),
            prefix: format!("/tessera/{}", self.cluster),
            lease_ttl: Duration::from_secs(self.etcd_lease_ttl),
            ..Default::default()
        };
        cfg.validate()?;
        Ok(Some(cfg))
    }
}
