//! Batch jobs: many requests submitted at once, run at batch priority (interactive requests
//! always go first), with status `queued → running → completed | failed | cancelled`.
//!
//! A job feeds the engine a bounded number of requests at a time, so a large job never fills
//! the waiting queue that interactive clients depend on. Results are kept in memory, in
//! submission order.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::lock;
use crate::scheduler::Priority;
use crate::serving::{EngineHandle, Event, GenerateParams, RawRequest, ServeError, Usage};

/// Requests of one job in the engine at once.
const JOB_CONCURRENCY: usize = 8;
/// Most requests in one job.
pub const MAX_JOB_REQUESTS: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    /// The name clients and metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobCounts {
    pub total: usize,
    pub completed: usize,
    pub failed: usize,
    pub cancelled: usize,
}

/// One request's outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct JobResult {
    pub custom_id: String,
    pub token_ids: Vec<u32>,
    pub text: String,
    /// Empty when the request failed.
    pub finish_reason: String,
    pub usage: Usage,
    pub error: Option<String>,
}

/// A job as clients see it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobInfo {
    pub id: String,
    pub label: String,
    pub status: JobStatus,
    pub counts: JobCounts,
    pub created_at: u64,
    pub error: Option<String>,
}

struct Job {
    info: Mutex<JobInfo>,
    results: Mutex<Vec<Option<JobResult>>>,
    cancelled: AtomicBool,
}

#[derive(Clone)]
pub struct JobManager {
    engine: EngineHandle,
    jobs: Arc<Mutex<BTreeMap<String, Arc<Job>>>>,
    next: Arc<AtomicU64>,
}

impl JobManager {
    pub fn new(engine: EngineHandle) -> Self {
        JobManager {
            engine,
            jobs: Arc::default(),
            next: Arc::default(),
        }
    }

    /// Validates every request (errors name `requests[i].field`) and starts the job.
    pub fn submit(
        &self,
        label: String,
        requests: Vec<(String, RawRequest)>,
    ) -> Result<JobInfo, ServeError> {
        self.start(label, requests)
            .inspect_err(|e| self.engine.metrics().error(e.kind()))
    }

    fn start(
        &self,
        label: String,
        requests: Vec<(String, RawRequest)>,
    ) -> Result<JobInfo, ServeError> {
        if requests.is_empty() {
            return Err(ServeError::invalid(
                "requests",
                "a job needs at least one request",
            ));
        }
        if requests.len() > MAX_JOB_REQUESTS {
            return Err(ServeError::invalid(
                "requests",
                format!(
                    "at most {MAX_JOB_REQUESTS} requests per job, got {}",
                    requests.len()
                ),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        let mut work = Vec::with_capacity(requests.len());
        for (i, (custom_id, raw)) in requests.into_iter().enumerate() {
            if !seen.insert(custom_id.clone()) {
                return Err(ServeError::invalid(
                    &format!("requests[{i}].custom_id"),
                    format!("{custom_id:?} appears twice"),
                ));
            }
            let params =
                self.engine
                    .info()
                    .validate(raw, Priority::Batch)
                    .map_err(|e| match e {
                        ServeError::InvalidArgument { field, message } => {
                            ServeError::InvalidArgument {
                                field: format!("requests[{i}].{field}"),
                                message,
                            }
                        }
                        other => other,
                    })?;
            work.push((custom_id, params));
        }
        let id = format!("job-{}", self.next.fetch_add(1, Ordering::Relaxed));
        let info = JobInfo {
            id: id.clone(),
            label,
            status: JobStatus::Queued,
            counts: JobCounts {
                total: work.len(),
                ..Default::default()
            },
            created_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            error: None,
        };
        let job = Arc::new(Job {
            info: Mutex::new(info.clone()),
            results: Mutex::new(vec![None; work.len()]),
            cancelled: AtomicBool::new(false),
        });
        lock(&self.jobs).insert(id.clone(), Arc::clone(&job));
        (self.engine.metrics()).job_status(None, JobStatus::Queued.as_str());
        tokio::spawn(run(self.engine.clone(), id, job, work));
        Ok(info)
    }

    pub fn get(&self, id: &str) -> Result<JobInfo, ServeError> {
        Ok(lock(&self.job(id)?.info).clone())
    }

    pub fn list(&self) -> Vec<JobInfo> {
        lock(&self.jobs)
            .values()
            .map(|j| lock(&j.info).clone())
            .collect()
    }

    /// Cancels a job: running requests are aborted, the rest never start.
    pub async fn cancel(&self, id: &str) -> Result<JobInfo, ServeError> {
        let job = self.job(id)?;
        if !lock(&job.info).status.is_terminal() {
            job.cancelled.store(true, Ordering::Relaxed);
            let n = lock(&job.results).len();
            for i in 0..n {
                self.engine.abort(&request_id(id, i)).await;
            }
        }
        // The runner marks the job cancelled once its in-flight requests have ended.
        for _ in 0..100 {
            let info = lock(&job.info).clone();
            if info.status.is_terminal() {
                return Ok(info);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(lock(&job.info).clone())
    }

    /// Results of the requests finished so far, in submission order.
    pub fn results(&self, id: &str) -> Result<Vec<JobResult>, ServeError> {
        Ok(lock(&self.job(id)?.results)
            .iter()
            .flatten()
            .cloned()
            .collect())
    }

    fn job(&self, id: &str) -> Result<Arc<Job>, ServeError> {
        lock(&self.jobs)
            .get(id)
            .cloned()
            .ok_or_else(|| ServeError::NotFound(format!("no job with id {id:?}")))
    }
}

fn request_id(job: &str, i: usize) -> String {
    format!("{job}/{i}")
}

async fn run(engine: EngineHandle, id: String, job: Arc<Job>, work: Vec<(String, GenerateParams)>) {
    lock(&job.info).status = JobStatus::Running;
    let metrics = engine.metrics();
    metrics.job_status(
        Some(JobStatus::Queued.as_str()),
        JobStatus::Running.as_str(),
    );
    let mut tasks = tokio::task::JoinSet::new();
    let mut queue = work.into_iter().enumerate();
    loop {
        while tasks.len() < JOB_CONCURRENCY && !job.cancelled.load(Ordering::Relaxed) {
            let Some((i, (custom_id, params))) = queue.next() else {
                break;
            };
            let engine = engine.clone();
            let rid = request_id(&id, i);
            let job = Arc::clone(&job);
            tasks.spawn(async move { (i, one(engine, job, rid, custom_id, params).await) });
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        let Ok((i, result)) = joined else { continue };
        metrics.job_request_done();
        let mut info = lock(&job.info);
        match (&result.error, result.finish_reason.as_str()) {
            (Some(_), _) => info.counts.failed += 1,
            (None, "abort") => info.counts.cancelled += 1,
            (None, _) => info.counts.completed += 1,
        }
        lock(&job.results)[i] = Some(result);
    }
    let mut info = lock(&job.info);
    let left =
        info.counts.total - info.counts.completed - info.counts.failed - info.counts.cancelled;
    info.counts.cancelled += left;
    info.status = if job.cancelled.load(Ordering::Relaxed) {
        JobStatus::Cancelled
    } else if info.counts.completed == 0 && info.counts.failed > 0 {
        info.error = lock(&job.results)
            .iter()
            .flatten()
            .find_map(|r| r.error.clone());
        JobStatus::Failed
    } else {
        JobStatus::Completed
    };
    metrics.job_status(Some(JobStatus::Running.as_str()), info.status.as_str());
    tracing::info!(job = %id, status = ?info.status, counts = ?info.counts, "job finished");
}

/// Runs one request to its end; a full queue is waited out, other errors are the result.
async fn one(
    engine: EngineHandle,
    job: Arc<Job>,
    rid: String,
    custom_id: String,
    params: GenerateParams,
) -> JobResult {
    let mut result = JobResult {
        custom_id,
        token_ids: vec![],
        text: String::new(),
        finish_reason: String::new(),
        usage: Usage::default(),
        error: None,
    };
    let mut stream = loop {
        if job.cancelled.load(Ordering::Relaxed) {
            result.finish_reason = "abort".into();
            return result;
        }
        match engine.submit(Some(rid.clone()), params.clone()).await {
            // A cancel that raced with the submission: abort what was just started.
            Ok(s) if job.cancelled.load(Ordering::Relaxed) => {
                engine.abort(&rid).await;
                break s;
            }
            Ok(s) => break s,
            Err(ServeError::QueueFull(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => {
                result.error = Some(e.to_string());
                return result;
            }
        }
    };
    while let Some(ev) = stream.recv().await {
        match ev {
            Event::Token(t) => {
                result.token_ids.push(t.token);
                result.text.push_str(&t.text);
            }
            Event::Finished {
                reason,
                text,
                usage,
            } => {
                result.text.push_str(&text);
                result.finish_reason = reason.as_str().to_string();
                result.usage = usage;
                return result;
            }
            Event::Failed(e) => {
                result.error = Some(e.to_string());
                return result;
            }
        }
    }
    result.error = Some("the request ended without an answer".into());
    result
}
