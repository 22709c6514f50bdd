//! Where etcd is, which cluster this is, and how patiently to talk to it. The defaults suit a
//! production cluster (10 s leases, a minute of start-up retries); tests shrink every duration.
//! Durations are written the humantime way in config files: `"10s"`, `"250ms"`, `"1m"`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::MembershipError;

/// How to reach etcd and how to behave when it is away.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MembershipConfig {
    /// etcd client URLs (`http://host:port`, or `host:port`). Default `["http://127.0.0.1:2379"]`.
    pub endpoints: Vec<String>,
    /// Key prefix of this cluster; worker records live under `<prefix>/workers/<id>`, so several
    /// clusters can share one etcd. Must start with `/` and not end with one.
    /// Default `/tessera/default`.
    pub prefix: String,
    /// Lifetime of a worker's lease: a worker that stops sending keep-alives (it died, or it is cut
    /// off from etcd) disappears this long after its last one. Whole seconds, at least 2 s
    /// (etcd's granularity is a second and keep-alives go out every third of it). Default 10 s.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Limit on opening a TCP connection to an endpoint. Default 3 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Limit on any single etcd request (grant, put, get, revoke). Default 5 s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// At start-up (`register`, `watch`), how many attempts to reach etcd before giving up.
    /// Default 10.
    pub max_start_retries: u32,
    /// At start-up, the overall time after which no further attempt starts, whichever of this and
    /// `max_start_retries` comes first. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub start_retry_deadline: Duration,
    /// First delay between retries; each further retry doubles it up to `backoff_max`, and each
    /// delay is jittered into its upper half so that workers cut off together do not come back in
    /// lock-step. Default 200 ms.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Cap on the delay between retries. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".to_owned()],
            prefix: "/tessera/default".to_owned(),
            lease_ttl: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            max_start_retries: 10,
            start_retry_deadline: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// The shortest lease accepted; below it a keep-alive every third of the TTL leaves too little
/// slack for one slow round trip.
const MIN_LEASE_TTL: Duration = Duration::from_secs(2);

/// The longest lease accepted: beyond an hour, a dead worker would linger too long to be useful.
const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);

/// Upper bound on every other duration, so deadline arithmetic cannot overflow.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

fn invalid(field: &'static str, reason: impl Into<String>) -> MembershipError {
    MembershipError::InvalidConfig {
        field,
        reason: reason.into(),
    }
}

impl MembershipConfig {
    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<(), MembershipError> {
        if self.endpoints.is_empty() {
            return Err(invalid("endpoints", "is empty; name at least one etcd URL"));
        }
        for e in &self.endpoints {
            if e.trim().is_empty() || e.chars().any(char::is_whitespace) {
                return Err(invalid("endpoints", format!("entry {e:?} is not a URL")));
            }
            if e.starts_with("https://") {
                return Err(invalid(
                    "endpoints",
                    format!("entry {e:?} uses https, but TLS to etcd is not supported yet"),
                ));
            }
            if e.contains("://") && !e.starts_with("http://") {
                return Err(invalid(
                    "endpoints",
                    format!("entry {e:?} has a scheme other than http://"),
                ));
            }
        }
        validate_prefix(&self.prefix)?;
        if self.lease_ttl < MIN_LEASE_TTL {
            return Err(invalid(
                "lease_ttl",
                format!(
                    "is {:?}; it must be at least {MIN_LEASE_TTL:?}",
                    self.lease_ttl
                ),
            ));
        }
        if self.lease_ttl > MAX_LEASE_TTL {
            return Err(invalid(
                "lease_ttl",
                format!(
                    "is {:?}; it must be at most {MAX_LEASE_TTL:?}",
                    self.lease_ttl
                ),
            ));
        }
        if self.lease_ttl.subsec_nanos() != 0 {
            return Err(invalid(
                "lease_ttl",
                format!("is {:?}; etcd leases are whole seconds", self.lease_ttl),
            ));
        }
        for (field, d) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("start_retry_deadline", self.start_retry_deadline),
            ("backoff_initial", self.backoff_initial),
            ("backoff_max", self.backoff_max),
        ] {
            if d.is_zero() {
                return Err(invalid(field, "must be greater than zero"));
            }
            if d > MAX_DURATION {
                return Err(invalid(
                    field,
                    format!("is {d:?}; it must be at most {MAX_DURATION:?}"),
                ));
            }
        }
        if self.max_start_retries == 0 {
            return Err(invalid("max_start_retries", "must be at least 1"));
        }
        if self.backoff_max < self.backoff_initial {
            return Err(invalid(
                "backoff_max",
                format!(
                    "is {:?}, below backoff_initial ({:?})",
                    self.backoff_max, self.backoff_initial
                ),
            ));
        }
        Ok(())
    }

    /// The key prefix under which worker records live, with its trailing slash.
    pub fn workers_prefix(&self) -> String {
        format!("{}/workers/", self.prefix)
    }

    /// The key of one worker's record.
    pub fn worker_key(&self, id: &str) -> String {
        format!("{}{id}", self.workers_prefix())
    }

    /// The endpoints as one string for log lines and errors.
    pub fn endpoints_display(&self) -> String {
        self.endpoints.join(",")
    }
}

fn validate_prefix(prefix: &str) -> Result<(), MembershipError> {
    if !prefix.starts_with('/') || prefix.len() < 2 {
        return Err(invalid(
            "prefix",
            format!(
                "is {prefix:?}; it must start with '/' and name something, e.g. \"/tessera/prod\""
            ),
        ));
    }
    if prefix.ends_with('/') {
        return Err(invalid(
            "prefix",
            format!("is {prefix:?}; drop the trailing '/'"),
        ));
    }
    if prefix.contains("//") || prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            "prefix",
            format!(
                "is {prefix:?}; it must not contain empty segments, spaces or control characters"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = MembershipConfig::default();
        c.validate().unwrap();
        assert_eq!(c.prefix, "/tessera/default");
        assert_eq!(c.lease_ttl, Duration::from_secs(10));
        assert_eq!(c.worker_key("w0"), "/tessera/default/workers/w0");
    }

    #[test]
    fn parses_humantime_and_fills_defaults() {
        let c: MembershipConfig = serde_json::from_str(
            r#"{"endpoints": ["http://10.0.0.5:2379"], "lease_ttl": "3s", "backoff_initial": "50ms"}"#,
        )
        .unwrap();
        assert_eq!(c.lease_ttl, Duration::from_secs(3));
        assert_eq!(c.backoff_initial, Duration::from_millis(50));
        assert_eq!(c.prefix, "/tessera/default");
        c.validate().unwrap();
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let r: Result<MembershipConfig, _> = serde_json::from_str(r#"{"lease_tll": "3s"}"#);
        assert!(r.unwrap_err().to_string().contains("lease_tll"));
    }

    #[test]
    fn validate_names_the_bad_field() {
        type Mutation = fn(&mut MembershipConfig);
        let cases: [(&str, Mutation); 12] = [
            ("endpoints", |c| c.endpoints.clear()),
            ("endpoints", |c| c.endpoints = vec!["https://x:2379".into()]),
            ("prefix", |c| c.prefix = "tessera".into()),
            ("prefix", |c| c.prefix = "/tessera/".into()),
            ("prefix", |c| c.prefix = "/a//b".into()),
            ("lease_ttl", |c| c.lease_ttl = Duration::from_secs(1)),
            ("lease_ttl", |c| c.lease_ttl = Duration::from_millis(2500)),
            ("lease_ttl", |c| c.lease_ttl = Duration::MAX),
            ("start_retry_deadline", |c| {
                c.start_retry_deadline = Duration::from_secs(u64::MAX)
            }),
            ("request_timeout", |c| c.request_timeout = Duration::ZERO),
            ("max_start_retries", |c| c.max_start_retries = 0),
            ("backoff_max", |c| c.backoff_max = Duration::from_millis(1)),
        ];
        for (field, mutate) in cases {
            let mut c = MembershipConfig::default();
            mutate(&mut c);
            match c.validate() {
                Err(MembershipError::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected {field} to be rejected, got {other:?}"),
            }
        }
    }
}
