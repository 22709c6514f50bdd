//! `tessera serve --tp 2` leaves no worker process behind, whether it is stopped with Ctrl-C
//! (SIGINT), SIGTERM, or killed outright (SIGKILL: the workers notice their stdin pipe close).

mod common;

use std::time::{Duration, Instant};

use common::server::Server;

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by a dead parent's init) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn stop_and_check(signal: &str) {
    let mut server = Server::start(&common::fixtures_dir().join("qwen3_moe"), &["--tp", "2"]);
    let workers = server.worker_pids();
    assert_eq!(workers.len(), 2, "{workers:?}");
    std::process::Command::new("kill")
        .args([signal, &server.child.id().to_string()])
        .status()
        .unwrap();
    let status = server.child.wait().unwrap();
    if signal != "-KILL" {
        assert!(status.success(), "{signal} is a clean shutdown: {status:?}");
    }
    let start = Instant::now();
    while workers.iter().any(|p| alive(*p)) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "workers {workers:?} outlived the server after {signal}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigint_leaves_no_workers() {
    stop_and_check("-INT");
}

#[test]
fn sigterm_leaves_no_workers() {
    stop_and_check("-TERM");
}

#[test]
fn sigkill_of_the_server_leaves_no_workers() {
    stop_and_check("-KILL");
}
