//! NCCL collectives on the CUDA backend: a world of one in this process, several ranks as child
//! processes (this test binary run again with `TESSERA_NCCL_TEST_CHILD` set), and deadlines: a
//! rank that never joins or stalls must make the others fail within their timeout, not hang.
//!
//! Where NCCL or a GPU is missing each test prints `SKIPPED: <reason>` and passes. Several ranks
//! need two GPUs, or one GPU and NCCL 2.30 or later: older NCCL refuses two ranks on one GPU
//! ("Duplicate GPU detected", across processes too), 2.30 allows it with
//! `NCCL_MULTI_RANK_GPU_ENABLE=1`, which the children then get. Two tests check something on a
//! machine without NCCL or a GPU: `no_nccl_is_a_typed_error` (the error names libnccl) and
//! `ids_need_no_gpu` (with NCCL on the loader's path, ids are made without a GPU).
//!
//! CI also runs them on the CPU emulator (`tests/cuda-emulator`: its libnccl.so.2 over loopback,
//! with `TESSERA_EMU_DEVICES=2` for a device per rank), where every test runs this module's code.
//!
//! Values are small integers, exact in f32, so results are compared exactly.
#![cfg(feature = "cuda")]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tessera_kernels::cuda::{
    CudaBackend, CudaTensor, NcclComm, NcclError, NcclId, NcclVersion, probe_nccl,
};
use tessera_kernels::{Backend, BackendError};

/// `rank,world,device,mode` for a child process; absent in the test run itself.
const CHILD_ENV: &str = "TESSERA_NCCL_TEST_CHILD";
/// The group's id, as hex, for a child process.
const ID_ENV: &str = "TESSERA_NCCL_TEST_ID";
/// How long a child group may take before the parent kills it (init on a cold GPU included).
const CHILDREN_LIMIT: Duration = Duration::from_secs(180);

/// NCCL's version and device 0, or `None` after printing why the test is skipped.
fn nccl_and_gpu(test: &str) -> Option<(NcclVersion, CudaBackend)> {
    let version = match probe_nccl() {
        Ok(v) => v,
        Err(BackendError::CudaNotAvailable(reason)) => {
            eprintln!("SKIPPED: {test}: {reason}");
            return None;
        }
        Err(e) => panic!("{test}: probing NCCL failed: {e}"),
    };
    match CudaBackend::new(0) {
        Ok(b) => Some((version, b)),
        Err(BackendError::CudaNotAvailable(reason)) => {
            eprintln!("SKIPPED: {test}: {reason}");
            None
        }
        Err(e) => panic!("{test}: opening the GPU failed: {e}"),
    }
}

fn tensor(b: &CudaBackend, rows: usize, cols: usize, f: impl Fn(usize) -> f32) -> CudaTensor {
    b.tensor_from_host((0..rows * cols).map(f).collect(), rows, cols)
        .unwrap()
}

/// Shape and values of a device tensor.
fn host(b: &CudaBackend, t: &CudaTensor) -> ((usize, usize), Vec<f32>) {
    (b.dims(t), b.tensor_to_host(t).unwrap())
}

/// Runs `body` on its own thread and fails the test if it has not finished within `limit`: a
/// hang inside NCCL (an abort that does not return, say) must fail, not stall the suite.
fn watchdog(test: &str, limit: Duration, body: impl FnOnce() + Send + 'static) {
    let (done, finished) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        body();
        let _ = done.send(());
    });
    match finished.recv_timeout(limit) {
        Ok(()) => worker.join().unwrap(),
        // The body panicked: report its panic.
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(worker.join().unwrap_err())
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{test}: still running after {limit:?}: NCCL hung")
        }
    }
}

#[test]
fn no_nccl_is_a_typed_error() {
    match probe_nccl() {
        Ok(v) => eprintln!("SKIPPED: no_nccl_is_a_typed_error: NCCL {v} is installed here"),
        Err(BackendError::CudaNotAvailable(msg)) => {
            assert!(msg.contains("libnccl.so.2 not found"), "{msg}");
            match NcclId::new() {
                Err(BackendError::CudaNotAvailable(m)) => assert!(m.contains("libnccl"), "{m}"),
                other => panic!("expected CudaNotAvailable, got {other:?}"),
            }
        }
        Err(e) => panic!("expected CudaNotAvailable, got {e}"),
    }
}

#[test]
fn ids_need_no_gpu() {
    if let Err(e) = probe_nccl() {
        eprintln!("SKIPPED: ids_need_no_gpu: {e}");
        return;
    }
    let (a, b) = (NcclId::new().unwrap(), NcclId::new().unwrap());
    assert_ne!(a, b, "two ids must differ");
    assert_eq!(NcclId::from_bytes(a.as_bytes()).unwrap(), a);
}

#[test]
fn a_world_of_one_goes_through_nccl() {
    const TEST: &str = "a_world_of_one_goes_through_nccl";
    let Some((_, b)) = nccl_and_gpu(TEST) else {
        return;
    };
    watchdog(TEST, Duration::from_secs(120), move || world_of_one(b));
}

fn world_of_one(b: CudaBackend) {
    let join = || NcclComm::new(&b, &NcclId::new().unwrap(), 0, 1, Duration::from_secs(30));
    let comm = join().unwrap();
    assert_eq!((comm.rank(), comm.world_size()), (0, 1));

    let mut t = tensor(&b, 3, 4, |i| i as f32);
    comm.all_reduce_sum(&b, &mut t).unwrap();
    assert_eq!(host(&b, &t), ((3, 4), (0..12).map(|i| i as f32).collect()));

    let g = comm.all_gather_cols(&b, t).unwrap();
    assert_eq!(host(&b, &g), ((3, 4), (0..12).map(|i| i as f32).collect()));

    let chunks = vec![tensor(&b, 2, 3, |i| 10.0 + i as f32)];
    let out = comm.all_to_all(&b, chunks).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(
        host(&b, &out[0]).1,
        (10..16).map(|i| i as f32).collect::<Vec<_>>()
    );
    let out = comm
        .all_to_all(&b, vec![tensor(&b, 0, 3, |_| 0.0)])
        .unwrap();
    assert_eq!(b.dims(&out[0]), (0, 3));

    let mut t = tensor(&b, 1, 5, |i| -(i as f32));
    comm.broadcast(&b, &mut t, 0).unwrap();
    assert_eq!(host(&b, &t).1, vec![0.0, -1.0, -2.0, -3.0, -4.0]);
    let mut empty = tensor(&b, 0, 0, |_| 0.0);
    comm.all_reduce_sum(&b, &mut empty).unwrap();
    assert!(comm.is_usable());

    // Arguments that cannot fit: every rank would see them, so the group is given up.
    let err = comm.broadcast(&b, &mut t, 1).unwrap_err();
    assert!(
        matches!(
            err,
            NcclError::Mismatch {
                op: "broadcast",
                ..
            }
        ) && err.to_string().contains("root 1"),
        "{err}"
    );
    assert!(!comm.is_usable());
    let err = comm.all_reduce_sum(&b, &mut t).unwrap_err();
    assert!(matches!(err, NcclError::Unusable { .. }), "{err}");

    let comm = join().unwrap();
    let two = vec![tensor(&b, 1, 1, |_| 1.0), tensor(&b, 1, 1, |_| 2.0)];
    let Err(err) = comm.all_to_all(&b, two) else {
        panic!("two chunks in a world of one were accepted");
    };
    assert!(
        err.to_string().contains("2 chunks for a world of 1"),
        "{err}"
    );
}

#[test]
fn init_times_out_when_a_rank_never_joins() {
    const TEST: &str = "init_times_out_when_a_rank_never_joins";
    let Some((_, b)) = nccl_and_gpu(TEST) else {
        return;
    };
    watchdog(TEST, Duration::from_secs(60), move || init_times_out(b));
}

/// Rank 0 of 2 alone: NCCL waits for rank 1 in its bootstrap until the deadline aborts it.
fn init_times_out(b: CudaBackend) {
    let timeout = Duration::from_secs(3);
    let start = Instant::now();
    let err = NcclComm::new(&b, &NcclId::new().unwrap(), 0, 2, timeout).unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(
            err,
            NcclError::Timeout {
                op: "init",
                rank: 0,
                ..
            }
        ),
        "expected an init timeout, got {err}"
    );
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(15),
        "took {took:?}"
    );
}

/// How several ranks run on this machine.
struct Plan {
    /// The device of each rank.
    devices: Vec<usize>,
    /// Extra environment for the children.
    env: Vec<(&'static str, &'static str)>,
}

/// Several ranks on this machine's GPUs, or `None` after printing why not.
fn multi_rank_plan(test: &str, version: NcclVersion) -> Option<Plan> {
    let devices = cudarc::driver::CudaContext::device_count()
        .unwrap_or(0)
        .max(0) as usize;
    if devices >= 2 {
        return Some(Plan {
            devices: (0..devices.min(4)).collect(),
            env: Vec::new(),
        });
    }
    let multi_rank_gpu = NcclVersion {
        major: 2,
        minor: 30,
        patch: 0,
    };
    if version >= multi_rank_gpu {
        return Some(Plan {
            devices: vec![0, 0],
            env: vec![("NCCL_MULTI_RANK_GPU_ENABLE", "1")],
        });
    }
    eprintln!(
        "SKIPPED: {test}: one GPU, and NCCL {version} refuses two ranks on one GPU (\"Duplicate \
         GPU detected\"); needs two GPUs or NCCL 2.30+ (NCCL_MULTI_RANK_GPU_ENABLE=1)"
    );
    None
}

/// Runs one child process per rank (`devices[r]` for rank r) in `mode`, waits for all of them
/// within [`CHILDREN_LIMIT`] and returns each one's exit success and output.
fn run_children(mode: &str, devices: &[usize], env: &[(&str, &str)]) -> Vec<(bool, String)> {
    let id = NcclId::new().unwrap();
    let world = devices.len();
    let dir = std::env::temp_dir().join(format!("tessera-nccl-{}-{mode}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<(Child, PathBuf)> = devices
        .iter()
        .enumerate()
        .map(|(rank, device)| {
            let log = dir.join(format!("rank{rank}.log"));
            let out = std::fs::File::create(&log).unwrap();
            let child = Command::new(&exe)
                .args(["nccl_child", "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD_ENV, format!("{rank},{world},{device},{mode}"))
                .env(ID_ENV, id.to_hex())
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap();
            (child, log)
        })
        .collect();
    let deadline = Instant::now() + CHILDREN_LIMIT;
    let mut status = vec![None; world];
    while status.iter().any(Option::is_none) && Instant::now() < deadline {
        for (r, (child, _)) in children.iter_mut().enumerate() {
            if status[r].is_none() {
                status[r] = child.try_wait().unwrap().map(|s| s.success());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (child, _) in &mut children {
        // Still running past the limit: a hang, which is what these tests exist to rule out.
        let _ = child.kill();
        let _ = child.wait();
    }
    let results = children
        .iter()
        .zip(status)
        .map(|((_, log), s)| {
            let out = std::fs::read_to_string(log).unwrap_or_default();
            (s.unwrap_or(false), out)
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    results
}

fn assert_children_passed(results: &[(bool, String)]) {
    for (rank, (ok, out)) in results.iter().enumerate() {
        assert!(
            *ok && out.contains(&format!("RANK {rank} OK")),
            "rank {rank} failed or hung:\n{out}"
        );
    }
}

#[test]
fn ranks_in_separate_processes() {
    const TEST: &str = "ranks_in_separate_processes";
    let Some((version, _)) = nccl_and_gpu(TEST) else {
        return;
    };
    let Some(plan) = multi_rank_plan(TEST, version) else {
        return;
    };
    assert_children_passed(&run_children("ops", &plan.devices, &plan.env));
}

#[test]
fn a_stalled_rank_is_a_timeout_not_a_hang() {
    const TEST: &str = "a_stalled_rank_is_a_timeout_not_a_hang";
    let Some((version, _)) = nccl_and_gpu(TEST) else {
        return;
    };
    let Some(plan) = multi_rank_plan(TEST, version) else {
        return;
    };
    assert_children_passed(&run_children("stall", &plan.devices[..2], &plan.env));
}

/// The body of a child rank; does nothing in a normal test run.
#[test]
fn nccl_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split(',').collect();
    let [rank, world, device, mode] = parts[..] else {
        panic!("bad {CHILD_ENV}={spec}");
    };
    let (rank, world, device): (usize, usize, usize) = (
        rank.parse().unwrap(),
        world.parse().unwrap(),
        device.parse().unwrap(),
    );
    let id = NcclId::from_hex(&std::env::var(ID_ENV).unwrap()).unwrap();
    let b = CudaBackend::new(device).unwrap();
    match mode {
        "ops" => child_ops(&b, &id, rank, world),
        "stall" => child_stall(&b, &id, rank, world),
        other => panic!("unknown child mode {other}"),
    }
    println!("RANK {rank} OK");
}

/// Each rank's column count in an all-gather case.
type Cols = fn(usize) -> usize;

/// Every collective with shapes that exercise each path, checked exactly.
fn child_ops(b: &CudaBackend, id: &NcclId, me: usize, world: usize) {
    let comm = NcclComm::new(b, id, me, world, Duration::from_secs(60)).unwrap();

    // All-reduce: rank r holds (r+1)·(i+1); the sum is (i+1)·world(world+1)/2.
    let mut t = tensor(b, 3, 5, |i| ((me + 1) * (i + 1)) as f32);
    comm.all_reduce_sum(b, &mut t).unwrap();
    let tri = (world * (world + 1) / 2) as f32;
    assert_eq!(
        host(b, &t).1,
        (0..15).map(|i| (i + 1) as f32 * tri).collect::<Vec<_>>()
    );

    // All-gather: even columns (one ncclAllGather), uneven (broadcasts), one row and several.
    let value = |r: usize, row: usize, c: usize| (100 * r + 10 * row + c) as f32;
    let cases: [(usize, Cols); 4] = [
        (3, |_| 2),
        (3, |r| r + 1),
        (1, |r| 2 * r + 1),
        (4, |r| if r == 0 { 0 } else { 3 }),
    ];
    for (rows, cols_of) in cases {
        let cols = cols_of(me);
        let t = tensor(b, rows, cols, |i| {
            value(me, i / cols.max(1), i % cols.max(1))
        });
        let g = comm.all_gather_cols(b, t).unwrap();
        let want: Vec<f32> = (0..rows)
            .flat_map(|row| {
                (0..world).flat_map(move |r| (0..cols_of(r)).map(move |c| value(r, row, c)))
            })
            .collect();
        let total = (0..world).map(cols_of).sum();
        assert_eq!(host(b, &g), ((rows, total), want), "all_gather rows {rows}");
    }

    // All-to-all: rank s sends rank d a ((s+d) % 3)-row chunk (zero rows included).
    let chunk = |s: usize, d: usize| {
        ((s + d) % 3, 2, move |i: usize| {
            (1000 * s + 100 * d + i) as f32
        })
    };
    let chunks = (0..world)
        .map(|d| {
            let (rows, cols, f) = chunk(me, d);
            tensor(b, rows, cols, f)
        })
        .collect();
    let got = comm.all_to_all(b, chunks).unwrap();
    assert_eq!(got.len(), world);
    for (s, t) in got.iter().enumerate() {
        let (rows, cols, f) = chunk(s, me);
        assert_eq!(
            host(b, t),
            ((rows, cols), (0..rows * cols).map(f).collect()),
            "from {s}"
        );
    }

    // Broadcast from the last rank: the others' tensors take the root's shape.
    let root = world - 1;
    let mut t = if me == root {
        tensor(b, 2, 3, |i| 7.0 + i as f32)
    } else {
        tensor(b, 1, 1, |_| 0.0)
    };
    comm.broadcast(b, &mut t, root).unwrap();
    assert_eq!(host(b, &t), ((2, 3), (7..13).map(|i| i as f32).collect()));
    assert!(comm.is_usable());
}

/// Rank 1 joins and then never calls the all-reduce rank 0 waits in: rank 0 must fail with a
/// timeout at its deadline, and its communicator must refuse further work.
fn child_stall(b: &CudaBackend, id: &NcclId, me: usize, world: usize) {
    let timeout = Duration::from_secs(4);
    let comm = NcclComm::new(b, id, me, world, timeout).unwrap();
    if me != 0 {
        std::thread::sleep(timeout * 3);
        // Exit without tearing down: a finalize would wait for rank 0, which has aborted.
        println!("RANK {me} OK");
        std::process::exit(0);
    }
    let mut t = tensor(b, 2, 2, |i| i as f32);
    let start = Instant::now();
    let err = comm.all_reduce_sum(b, &mut t).unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(
            err,
            NcclError::Timeout {
                op: "all_reduce",
                rank: 0,
                ..
            }
        ),
        "expected a timeout, got {err}"
    );
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(10),
        "took {took:?}"
    );
    let err = comm.all_reduce_sum(b, &mut t).unwrap_err();
    assert!(matches!(err, NcclError::Unusable { .. }), "{err}");
}
