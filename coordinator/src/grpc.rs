//! The public gRPC API (`tessera.v1.Tessera`): streaming `Generate`, `Abort`, `GetModelInfo`
//! and batch jobs, plus `grpc.health.v1` (NOT_SERVING while the worker group is degraded) and
//! server reflection.

use tonic::service::interceptor::InterceptedService;

use crate::auth::ApiKeyAuth;
use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use tessera_proto::v1 as pb;
use tessera_proto::v1::tessera_server::{Tessera, TesseraServer};
use tonic::{Request, Response, Status};

use crate::jobs::{JobInfo, JobManager, JobStatus};
use crate::scheduler::Priority;
use crate::serving::{EngineHandle, Event, Prompt, RawRequest, ServeError};

/// Largest message accepted or sent.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Self {
        let msg = e.to_string();
        match e {
            ServeError::InvalidArgument { .. } => Status::invalid_argument(msg),
            ServeError::QueueFull(_) => Status::resource_exhausted(msg),
            ServeError::Unavailable(_) => Status::unavailable(msg),
            ServeError::NotFound(_) => Status::not_found(msg),
            ServeError::Internal(_) => Status::internal(msg),
        }
    }
}

/// The wire request as a [`RawRequest`] (validation happens afterwards, in one place).
pub fn raw_request(req: &pb::GenerateRequest) -> RawRequest {
    let s = req.sampling.clone().unwrap_or_default();
    let prompt = match &req.prompt {
        Some(pb::generate_request::Prompt::Text(t)) => Some(Prompt::Text(t.clone())),
        Some(pb::generate_request::Prompt::TokenIds(ids)) => Some(Prompt::Ids(ids.ids.clone())),
        None => None,
    };
    RawRequest {
        prompt,
        max_tokens: Some(req.max_tokens.unwrap_or(16) as u64),
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k.map(i64::from),
        min_p: s.min_p,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        repetition_penalty: s.repetition_penalty,
        seed: s.seed,
        logit_bias: s
            .logit_bias
            .into_iter()
            .map(|(k, v)| (i64::from(k), v))
            .collect(),
        stop_token_ids: req.stop_token_ids.iter().map(|&t| i64::from(t)).collect(),
        stop: req.stop.clone(),
        top_logprobs: Some(i64::from(req.top_logprobs)),
        prompt_logprobs: req.prompt_logprobs,
        ignore_eos: req.ignore_eos,
        add_special_tokens: true,
    }
}

fn job_proto(j: JobInfo) -> pb::Job {
    let status = match j.status {
        JobStatus::Queued => pb::JobStatus::Queued,
        JobStatus::Running => pb::JobStatus::Running,
        JobStatus::Completed => pb::JobStatus::Completed,
        JobStatus::Failed => pb::JobStatus::Failed,
        JobStatus::Cancelled => pb::JobStatus::Cancelled,
    };
    pb::Job {
        id: j.id,
        status: status as i32,
        counts: Some(pb::JobCounts {
            total: j.counts.total as u32,
            completed: j.counts.completed as u32,
            failed: j.counts.failed as u32,
            cancelled: j.counts.cancelled as u32,
        }),
        label: j.label,
        created_at: j.created_at,
        error: j.error.unwrap_or_default(),
    }
}

pub struct TesseraService {
    engine: EngineHandle,
    jobs: JobManager,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Tessera for TesseraService {
    type GenerateStream = BoxStream<pb::GenerateResponse>;
    type GetJobResultsStream = BoxStream<pb::JobResult>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let req = request.into_inner();
        let started = async {
            let params = (self.engine.info()).validate(raw_request(&req), Priority::Interactive)?;
            (self.engine.submit(Some(req.request_id.clone()), params)).await
        };
        let rs = started
            .await
            .inspect_err(|e| self.engine.metrics().error(e.kind()))?;
        let stream = futures_util::stream::unfold(Some(rs), |state| async move {
            let mut rs = state?;
            let request_id = rs.request_id.clone();
            let item = match rs.recv().await? {
                Event::Token(t) => Ok(pb::GenerateResponse {
                    request_id,
                    token_ids: vec![t.token],
                    text: t.text,
                    logprobs: vec![t.logprob],
                    top_logprobs: vec![pb::TopLogprobs {
                        entries: t
                            .top_logprobs
                            .into_iter()
                            .map(|(token_id, logprob)| pb::TokenLogprob { token_id, logprob })
                            .collect(),
                    }],
                    prompt_logprobs: t
                        .prompt_logprobs
                        .unwrap_or_default()
                        .into_iter()
                        .map(|v| v.unwrap_or(f32::NAN))
                        .collect(),
                    ..Default::default()
                }),
                Event::Finished {
                    reason,
                    text,
                    usage,
                } => {
                    let last = pb::GenerateResponse {
                        request_id,
                        text,
                        finish_reason: reason.as_str().into(),
                        usage: Some(pb::Usage {
                            prompt_tokens: usage.prompt_tokens as u32,
                            completion_tokens: usage.completion_tokens as u32,
                        }),
                        ..Default::default()
                    };
                    return Some((Ok(last), None));
                }
                Event::Failed(e) => return Some((Err(Status::from(e)), None)),
            };
            Some((item, Some(rs)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn abort(
        &self,
        request: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        let found = self.engine.abort(&request.into_inner().request_id).await;
        Ok(Response::new(pb::AbortResponse { found }))
    }

    async fn get_model_info(
        &self,
        _: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let i = self.engine.info();
        let stats = self.engine.stats();
        Ok(Response::new(pb::ModelInfo {
            name: i.name.clone(),
            architecture: i.architecture.clone(),
            vocab_size: i.vocab_size as u32,
            max_context: i.max_context as u32,
            world_size: i.world_size as u32,
            backend: i.backend.clone(),
            kv_blocks: stats.num_blocks as u64,
            block_size: i.block_size as u32,
            placement_json: self.engine.placement_json(),
            eos_token_ids: i.eos_token_ids.clone(),
        }))
    }

    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let req = request.into_inner();
        let requests = req
            .requests
            .iter()
            .map(|r| {
                let raw = r.request.as_ref().map(raw_request).unwrap_or_default();
                (r.custom_id.clone(), raw)
            })
            .collect();
        Ok(Response::new(job_proto(
            self.jobs.submit(req.label, requests)?,
        )))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        Ok(Response::new(job_proto(
            self.jobs.get(&request.into_inner().id)?,
        )))
    }

    async fn list_jobs(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let jobs = self.jobs.list().into_iter().map(job_proto).collect();
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        Ok(Response::new(job_proto(
            self.jobs.cancel(&request.into_inner().id).await?,
        )))
    }

    async fn get_job_results(
        &self,
        request: Request<pb::GetJobResultsRequest>,
    ) -> Result<Response<Self::GetJobResultsStream>, Status> {
        let results = self.jobs.results(&request.into_inner().id)?;
        let items = results.into_iter().map(|r| {
            Ok(pb::JobResult {
                custom_id: r.custom_id,
                token_ids: r.token_ids,
                text: r.text,
                finish_reason: r.finish_reason,
                usage: Some(pb::Usage {
                    prompt_tokens: r.usage.prompt_tokens as u32,
                    completion_tokens: r.usage.completion_tokens as u32,
                }),
                error: r.error.unwrap_or_default(),
            })
        });
        Ok(Response::new(Box::pin(futures_util::stream::iter(items))))
    }
}

/// What the public gRPC listener serves.
pub struct GrpcApi {
    pub engine: EngineHandle,
    pub jobs: JobManager,
    pub auth: ApiKeyAuth,
    /// Serve TLS with this (`--tls-cert`); plain HTTP/2 when `None`.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Serves the public API, health and reflection on `listener` until `shutdown` completes.
pub async fn serve(
    api: GrpcApi,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let GrpcApi {
        engine,
        jobs,
        auth,
        tls,
    } = api;
    let (reporter, health) = tonic_health::server::health_reporter();
    let watched = engine.clone();
    // grpc.health.v1 follows the worker group's state.
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let ok = watched.health().is_ok();
            if last != Some(ok) {
                let status = if ok {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter
                    .set_service_status("tessera.v1.Tessera", status)
                    .await;
                reporter.set_service_status("", status).await;
                last = Some(ok);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tessera_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| {
            tracing::error!("reflection: {e}");
            e
        })
        .ok();
    let service = TesseraServer::new(TesseraService { engine, jobs })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let guarded = |name: &str| auth.enabled() && !auth.is_exempt(name);
    let mut server = tonic::transport::Server::builder();
    let mut router = if guarded("grpc.health.v1.Health") {
        server.add_service(InterceptedService::new(health, auth.interceptor()))
    } else {
        server.add_service(health)
    };
    if let Some(reflection) = reflection {
        router = if guarded("grpc.reflection.v1.ServerReflection") {
            router.add_service(InterceptedService::new(reflection, auth.interceptor()))
        } else {
            router.add_service(reflection)
        };
    }
    router = if guarded("tessera.v1.Tessera") {
        router.add_service(InterceptedService::new(service, auth.interceptor()))
    } else {
        router.add_service(service)
    };
    match tls {
        None => {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        Some(acceptor) => {
            let quiet = crate::tls::incoming::FailureLog::Quiet;
            let incoming = crate::tls::incoming::accept(listener, acceptor, "gRPC API", quiet);
            router
                .serve_with_incoming_shutdown(incoming.into_stream(), shutdown)
                .await
        }
    }
}
