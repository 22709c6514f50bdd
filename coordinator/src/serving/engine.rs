//! The serving loop: one thread owns the scheduler and the step runner (the worker group) and
//! runs steps back to back while there is work; front ends talk to it through an
//! [`EngineHandle`] (a channel), like TGI's router.
//!
//! Every accepted request ends with exactly one terminal event: `Finished` or `Failed`. A client
//! that goes away (its [`RequestStream`] dropped) is noticed before the next step and its blocks
//! are freed. When a step fails (a worker died or stalled past its deadline) every in-flight
//! request fails with `Unavailable`, the group is dropped, and the loop rebuilds it through the
//! [`RunnerFactory`] with backoff; meanwhile new requests are refused at once.
//!
//! A worker lost while nothing runs is noticed too: after [`IDLE_HEALTH_INTERVAL`] without a step
//! the loop asks the runner to check its workers ([`StepRunner::check_health`], a short-deadline
//! `Health` call to each) and handles a failure like a failed step. The check runs on the loop's
//! own thread, between steps, so it never overlaps one; a request arriving meanwhile waits at most
//! the check's deadline.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_common::PlacementMap;
use tessera_worker::WorkerError;
use tessera_worker::executor::StepRunner;
use tokio::sync::{mpsc, oneshot};

use crate::lock;
use crate::metrics::{ErrorKind, ServingMetrics};
use crate::scheduler::{Finish, Scheduler, SchedulerConfig, SchedulerStats, SeqOutput, SeqRequest};
use crate::serving::output::OutputState;
use crate::serving::request::{GenerateParams, ModelInfo, ServeError};

/// How long the group may sit idle before the loop checks that its workers are still there.
pub const IDLE_HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// Builds (or rebuilds, after a failure) the worker group.
pub type RunnerFactory = Box<dyn FnMut() -> Result<Box<dyn StepRunner + Send>, WorkerError> + Send>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TokenOut {
    pub token: u32,
    /// Text that may be shown now (possibly empty while a character or a possible stop string
    /// is incomplete).
    pub text: String,
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
    /// With the first token only, when asked for.
    pub prompt_logprobs: Option<Vec<Option<f32>>>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Token(TokenOut),
    /// Terminal. `text` is what was still held back.
    Finished {
        reason: FinishReason,
        text: String,
        usage: Usage,
    },
    /// Terminal.
    Failed(ServeError),
}

/// Events of one accepted request; dropping it aborts the request.
pub struct RequestStream {
    pub request_id: String,
    rx: mpsc::UnboundedReceiver<Event>,
}

impl RequestStream {
    /// The next event; `None` only after a terminal event was received.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

enum Command {
    Submit {
        request_id: String,
        params: GenerateParams,
        events: mpsc::UnboundedSender<Event>,
        arrived: Instant,
        reply: oneshot::Sender<Result<(), ServeError>>,
    },
    Abort {
        request_id: String,
        reply: oneshot::Sender<bool>,
    },
    SetPlacement {
        placement: PlacementMap,
        reply: oneshot::Sender<Result<(), ServeError>>,
    },
    Shutdown,
}

/// State shared between the loop and the front ends.
pub struct Shared {
    pub info: ModelInfo,
    /// `Some(reason)` while the worker group is not whole.
    degraded: Mutex<Option<String>>,
    stats: Mutex<SchedulerStats>,
    /// The expert placement the group runs, as JSON.
    placement: Mutex<String>,
    next_request: AtomicU64,
    stopped: AtomicBool,
    metrics: ServingMetrics,
    /// Where the ranks of the current group serve their metrics.
    metrics_addresses: Mutex<Vec<String>>,
    /// How many times the group was lost (a failed step or health check) since start.
    group_failures: AtomicU64,
}

#[derive(Clone)]
pub struct EngineHandle {
    // A std channel: the loop waits on it with a timeout between idle health checks.
    tx: Sender<Command>,
    shared: Arc<Shared>,
}

impl EngineHandle {
    pub fn info(&self) -> &ModelInfo {
        &self.shared.info
    }

    pub fn stats(&self) -> SchedulerStats {
        *lock(&self.shared.stats)
    }

    /// `Err(reason)` while the worker group is not whole.
    pub fn health(&self) -> Result<(), String> {
        match &*lock(&self.shared.degraded) {
            Some(reason) => Err(reason.clone()),
            None if self.shared.stopped.load(Ordering::Relaxed) => {
                Err("the server is shutting down".into())
            }
            None => Ok(()),
        }
    }

    pub fn metrics(&self) -> &ServingMetrics {
        &self.shared.metrics
    }

    /// Where the ranks of the current group serve their Prometheus metrics.
    pub fn metrics_addresses(&self) -> Vec<String> {
        lock(&self.shared.metrics_addresses).clone()
    }

    /// How many times the worker group was lost since start (each loss is followed by a rebuild).
    pub fn group_failures(&self) -> u64 {
        self.shared.group_failures.load(Ordering::Relaxed)
    }

    /// Queues a validated request; refused at once when the group is degraded or the queue full.
    /// Front ends count refusals in the metrics (they also refuse before calling this).
    pub async fn submit(
        &self,
        request_id: Option<String>,
        params: GenerateParams,
    ) -> Result<RequestStream, ServeError> {
        let arrived = Instant::now();
        self.health().map_err(ServeError::Unavailable)?;
        let request_id = match request_id.filter(|s| !s.is_empty()) {
            Some(id) => id,
            None => format!(
                "req-{}",
                self.shared.next_request.fetch_add(1, Ordering::Relaxed)
            ),
        };
        let (events, rx) = mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Submit {
            request_id: request_id.clone(),
            params,
            events,
            arrived,
            reply,
        };
        let gone = || ServeError::Unavailable("the serving loop has stopped".into());
        self.tx.send(cmd).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())??;
        Ok(RequestStream { request_id, rx })
    }

    /// Aborts a running request by its id; false if none had it.
    pub async fn abort(&self, request_id: &str) -> bool {
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Abort {
            request_id: request_id.to_string(),
            reply,
        };
        self.tx.send(cmd).is_ok() && answer.await.unwrap_or(false)
    }

    /// The expert placement the group runs, as JSON.
    pub fn placement_json(&self) -> String {
        lock(&self.shared.placement).clone()
    }

    /// Moves experts between ranks at runtime (e.g. from a load balancer). Running sequences are
    /// preempted and recomputed under the new placement, so clients see no difference.
    pub async fn set_placement(&self, placement: PlacementMap) -> Result<(), ServeError> {
        self.health().map_err(ServeError::Unavailable)?;
        let (reply, answer) = oneshot::channel();
        let gone = || ServeError::Unavailable("the serving loop has stopped".into());
        self.tx
            .send(Command::SetPlacement { placement, reply })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Starts draining: new requests are refused (503 / UNAVAILABLE, health reports it) while
    /// those in flight run on. Returns how many are still running or waiting.
    pub fn begin_drain(&self) -> usize {
        self.shared.stopped.store(true, Ordering::Relaxed);
        self.in_flight()
    }

    /// Requests running or waiting.
    pub fn in_flight(&self) -> usize {
        let stats = self.stats();
        stats.running + stats.waiting
    }

    /// Stops the loop: in-flight requests end with `Failed(Unavailable)`.
    pub fn shutdown(&self) {
        self.shared.stopped.store(true, Ordering::Relaxed);
        let _ = self.tx.send(Command::Shutdown);
    }
}

/// A running request as the loop tracks it.
struct Live {
    request_id: String,
    events: mpsc::UnboundedSender<Event>,
    output: OutputState,
    usage: Usage,
    arrived: Instant,
    /// When the previous token was delivered (`None` before the first).
    last_token: Option<Instant>,
}

struct Loop {
    rx: Receiver<Command>,
    shared: Arc<Shared>,
    sched: Scheduler,
    runner: Option<Box<dyn StepRunner + Send>>,
    factory: RunnerFactory,
    live: HashMap<u64, Live>,
    by_request: HashMap<String, u64>,
    next_seq: u64,
    /// Ranks the group needs.
    world_size: usize,
    /// When the workers last proved alive (a step or a health check).
    last_health: Instant,
}

/// Starts the serving loop on its own thread with an already built worker group.
pub fn start(
    info: ModelInfo,
    scheduler: SchedulerConfig,
    runner: Box<dyn StepRunner + Send>,
    factory: RunnerFactory,
) -> Result<EngineHandle, ServeError> {
    let cfg = SchedulerConfig {
        num_blocks: runner.num_blocks(),
        block_size: runner.block_size(),
        ..scheduler
    };
    cfg.validate().map_err(ServeError::Internal)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let placement = info.placement_json.clone();
    let metrics = ServingMetrics::new(&info.name)
        .map_err(|e| ServeError::Internal(format!("cannot register the serving metrics: {e}")))?;
    let metrics_addresses = Mutex::new(runner.metrics_addresses());
    let world_size = runner.world_size();
    let shared = Arc::new(Shared {
        info,
        degraded: Mutex::new(None),
        stats: Mutex::new(SchedulerStats {
            num_blocks: cfg.num_blocks,
            ..Default::default()
        }),
        placement: Mutex::new(placement),
        next_request: AtomicU64::new(0),
        stopped: AtomicBool::new(false),
        metrics,
        metrics_addresses,
        group_failures: AtomicU64::new(0),
    });
    let mut lp = Loop {
        rx,
        shared: Arc::clone(&shared),
        sched: Scheduler::new(cfg),
        runner: Some(runner),
        factory,
        live: HashMap::new(),
        by_request: HashMap::new(),
        next_seq: 0,
        world_size,
        last_health: Instant::now(),
    };
    std::thread::Builder::new()
        .name("tessera-serving".into())
        .spawn(move || lp.run())
        .map_err(|e| ServeError::Internal(format!("cannot start the serving thread: {e}")))?;
    Ok(EngineHandle { tx, shared })
}

impl Loop {
    fn run(&mut self) {
        loop {
            if !self.sched.has_work() {
                let due = self.last_health + IDLE_HEALTH_INTERVAL;
                match self
                    .rx
                    .recv_timeout(due.saturating_duration_since(Instant::now()))
                {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            return self.stop();
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        self.check_idle_health();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return self.stop(),
                }
            }
            while let Ok(cmd) = self.rx.try_recv() {
                if !self.handle(cmd) {
                    return self.stop();
                }
            }
            self.drop_disconnected();
            if self.sched.has_work() {
                self.step();
            }
            self.publish_stats();
        }
    }

    /// False when the loop must stop.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit {
                request_id,
                params,
                events,
                arrived,
                reply,
            } => {
                let _ = reply.send(self.admit(request_id, params, events, arrived));
            }
            Command::Abort { request_id, reply } => {
                let found = match self.by_request.get(&request_id).copied() {
                    Some(seq) => {
                        self.abort(seq);
                        true
                    }
                    None => false,
                };
                let _ = reply.send(found);
            }
            Command::SetPlacement { placement, reply } => {
                let _ = reply.send(self.set_placement(placement));
            }
            Command::Shutdown => return false,
        }
        true
    }

    fn admit(
        &mut self,
        request_id: String,
        params: GenerateParams,
        events: mpsc::UnboundedSender<Event>,
        arrived: Instant,
    ) -> Result<(), ServeError> {
        if self.runner.is_none() {
            return Err(ServeError::Unavailable(
                "the worker group is being rebuilt".into(),
            ));
        }
        if self.by_request.contains_key(&request_id) {
            return Err(ServeError::invalid(
                "request_id",
                format!("{request_id:?} is already running"),
            ));
        }
        let seq = self.next_seq;
        let usage = Usage {
            prompt_tokens: params.prompt.len(),
            completion_tokens: 0,
        };
        let output = OutputState::new(params.stop_strings.clone());
        let req = SeqRequest {
            prompt: params.prompt,
            max_tokens: params.max_tokens,
            sampling: params.sampling,
            top_logprobs: params.top_logprobs,
            prompt_logprobs: params.prompt_logprobs,
            stop_token_ids: params.stop_token_ids,
            priority: params.priority,
        };
        self.sched.add(seq, req).map_err(|e| match e {
            crate::scheduler::AdmitError::QueueFull { .. } => ServeError::QueueFull(e.to_string()),
            _ => ServeError::invalid("max_tokens", e.to_string()),
        })?;
        self.next_seq += 1;
        self.by_request.insert(request_id.clone(), seq);
        self.live.insert(
            seq,
            Live {
                request_id,
                events,
                output,
                usage,
                arrived,
                last_token: None,
            },
        );
        Ok(())
    }

    fn set_placement(&mut self, placement: PlacementMap) -> Result<(), ServeError> {
        let Some(runner) = self.runner.as_mut() else {
            return Err(ServeError::Unavailable(
                "the worker group is being rebuilt".into(),
            ));
        };
        let json =
            serde_json::to_string(&placement).map_err(|e| ServeError::Internal(e.to_string()))?;
        let preempted = self.sched.preempt_all();
        runner.release(&preempted);
        match runner.set_placement(&placement) {
            Ok(()) => {
                self.sched.resize(runner.num_blocks());
                *lock(&self.shared.placement) = json;
                tracing::info!(
                    preempted = preempted.len(),
                    "new expert placement in effect"
                );
                Ok(())
            }
            // Refused before any worker changed (a map that does not fit the model).
            Err(e @ (WorkerError::Plan(_) | WorkerError::Config(_))) => {
                Err(ServeError::invalid("placement", e.to_string()))
            }
            Err(e) => {
                let msg = e.to_string();
                self.fail_group(e);
                Err(ServeError::Unavailable(msg))
            }
        }
    }

    fn drop_disconnected(&mut self) {
        let gone: Vec<u64> = self
            .live
            .iter()
            .filter(|(_, l)| l.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for seq in gone {
            tracing::debug!(seq, "client went away; aborting");
            self.abort(seq);
        }
    }

    /// Ends a request with `Finished(Abort)` and frees everything it held.
    fn abort(&mut self, seq: u64) {
        self.sched.remove(seq);
        if let Some(runner) = self.runner.as_mut() {
            runner.release(&[seq]);
        }
        if let Some(live) = self.live.remove(&seq) {
            self.by_request.remove(&live.request_id);
            let reason = FinishReason::Abort.as_str();
            self.shared.metrics.finished(reason, live.arrived.elapsed());
            let _ = live.events.send(Event::Finished {
                reason: FinishReason::Abort,
                text: String::new(),
                usage: live.usage,
            });
        }
    }

    fn step(&mut self) {
        let plan = self.sched.schedule();
        // Published before the step runs, so a client that has its first token sees itself
        // counted as running.
        self.publish_stats();
        let Some(runner) = self.runner.as_mut() else {
            return;
        };
        if !plan.preempted.is_empty() {
            tracing::debug!(preempted = ?plan.preempted, "KV cache full; preempting");
            runner.release(&plan.preempted);
        }
        if plan.steps.is_empty() {
            return;
        }
        let started = Instant::now();
        let outcome = runner.step(&plan.steps);
        self.last_health = Instant::now();
        let tokens = plan.steps.iter().map(|s| s.tokens.len()).sum();
        match outcome {
            Ok(result) => {
                let counts = &result.expert_counts;
                (self.shared.metrics).step(started.elapsed(), tokens, counts);
                let outputs = self.sched.complete(&result);
                let mut finished = Vec::new();
                for out in outputs {
                    if let Some(done) = self.deliver(out) {
                        finished.push(done);
                    }
                }
                if let Some(runner) = self.runner.as_mut()
                    && !finished.is_empty()
                {
                    runner.release(&finished);
                }
            }
            Err(e) => self.fail_group(e),
        }
    }

    /// Sends one token to its client; returns the sequence id if the request ended.
    fn deliver(&mut self, out: SeqOutput) -> Option<u64> {
        let tok = self.shared.info.tokenizer.clone();
        let live = self.live.get_mut(&out.id)?;
        live.usage.completion_tokens += 1;
        let now = Instant::now();
        match live.last_token.replace(now) {
            None => (self.shared.metrics).first_token(now - live.arrived, live.usage.prompt_tokens),
            Some(prev) => self.shared.metrics.next_token(now - prev),
        }
        let (text, stopped) = live
            .output
            .push(tok.as_deref(), out.token)
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "detokenising failed");
                (String::new(), false)
            });
        let _ = live.events.send(Event::Token(TokenOut {
            token: out.token,
            text,
            logprob: out.logprob,
            top_logprobs: out.top_logprobs,
            prompt_logprobs: out.prompt_logprobs,
        }));
        let reason = match (stopped, out.finish) {
            (true, _) | (_, Some(Finish::Stop)) => FinishReason::Stop,
            (_, Some(Finish::Length)) => FinishReason::Length,
            (false, None) => return None,
        };
        if stopped {
            // The scheduler may still hold it (a stop string is not a stop token).
            self.sched.remove(out.id);
        }
        let live = self.live.remove(&out.id)?;
        self.by_request.remove(&live.request_id);
        let mut live = live;
        let rest = if stopped {
            String::new()
        } else {
            live.output.finish(tok.as_deref()).unwrap_or_default()
        };
        (self.shared.metrics).finished(reason.as_str(), live.arrived.elapsed());
        let _ = live.events.send(Event::Finished {
            reason,
            text: rest,
            usage: live.usage,
        });
        Some(out.id)
    }

    /// Idle: checks the workers are still there; a lost one is handled like a failed step.
    fn check_idle_health(&mut self) {
        self.last_health = Instant::now();
        let Some(runner) = self.runner.as_mut() else {
            return;
        };
        if let Err(e) = runner.check_health() {
            tracing::error!(error = %e, "lost a worker while idle");
            self.fail_group(e);
        }
    }

    /// A step or health check failed: every request in flight fails, the group is rebuilt.
    fn fail_group(&mut self, e: WorkerError) {
        self.shared.group_failures.fetch_add(1, Ordering::Relaxed);
        let reason = format!("the worker group failed: {e}");
        tracing::error!(
            "{reason}; failing {} requests and rebuilding",
            self.live.len()
        );
        self.set_degraded(Some(reason.clone()));
        for (_, live) in self.live.drain() {
            (self.shared.metrics).failed(ErrorKind::Unavailable, live.arrived.elapsed());
            let _ = live
                .events
                .send(Event::Failed(ServeError::Unavailable(reason.clone())));
        }
        self.by_request.clear();
        self.sched.clear();
        // Dropping the group kills processes the coordinator started.
        self.runner = None;
        self.publish_stats();
        self.rebuild();
    }

    fn rebuild(&mut self) {
        let mut delay = Duration::from_millis(250);
        loop {
            let started = Instant::now();
            match (self.factory)() {
                Ok(runner) => {
                    let cfg = SchedulerConfig {
                        num_blocks: runner.num_blocks(),
                        block_size: runner.block_size(),
                        ..self.sched.config().clone()
                    };
                    self.sched = Scheduler::new(cfg);
                    *lock(&self.shared.metrics_addresses) = runner.metrics_addresses();
                    self.runner = Some(runner);
                    self.last_health = Instant::now();
                    // A rebuilt group runs the placement it was built with.
                    *lock(&self.shared.placement) = self.shared.info.placement_json.clone();
                    tracing::info!(
                        secs = started.elapsed().as_secs_f32(),
                        "worker group is whole again; serving"
                    );
                    self.set_degraded(None);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "rebuilding the worker group failed");
                    self.set_degraded(Some(format!("rebuilding the worker group: {e}")));
                }
            }
            // Answer whatever arrived meanwhile (refusing new work) while waiting.
            let until = Instant::now() + delay;
            while Instant::now() < until {
                match self.rx.try_recv() {
                    Ok(Command::Shutdown) => {
                        self.shared.stopped.store(true, Ordering::Relaxed);
                        return;
                    }
                    Ok(cmd) => {
                        self.handle(cmd);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    fn set_degraded(&self, reason: Option<String>) {
        *lock(&self.shared.degraded) = reason;
    }

    fn publish_stats(&self) {
        let stats = self.sched.stats();
        *lock(&self.shared.stats) = stats;
        let metrics = &self.shared.metrics;
        metrics.set_scheduler(&stats);
        let up = self.runner.as_ref().map_or(0, |r| r.world_size());
        metrics.set_workers(up, self.world_size);
    }

    fn stop(&mut self) {
        self.shared.stopped.store(true, Ordering::Relaxed);
        for (_, live) in self.live.drain() {
            (self.shared.metrics).failed(ErrorKind::Unavailable, live.arrived.elapsed());
            let _ = live.events.send(Event::Failed(ServeError::Unavailable(
                "the server is shutting down".into(),
            )));
        }
        self.runner = None;
    }
}
