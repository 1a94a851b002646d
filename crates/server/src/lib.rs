//! The HTTP API of reelhouse (axum): durable ingest, read-only SQL and health.
//!
//! Requests enter through [`router`]; the ingest pipeline itself lives in [`ingest`] and is
//! shared with the bulk loader. Every error leaves through the one `IntoResponse` impl of
//! [`ApiError`], which picks the status code and writes `{"error":{"code","message"}}` without
//! payloads or internal details.
//!
//! ```text
//!  POST /v1/events ─▶ body limit (413) ─▶ in-flight limit (429) ─▶ Ingestor::ingest ─▶ 200
//!  POST /v1/sql    ─▶ read-only gate (400) ─▶ Catalog (Delta ∪ pending) ─▶ {"columns","rows"}
//!  GET  /v1/health ─▶ counters
//!  GET  /v1/features/… ─▶ in-process feature store (see [`features`])
//!  GET  /              ─▶ the web creator dashboard (static page over the creator endpoints)
//!  --pg-listen         ─▶ the same read-only SQL over the Postgres wire protocol (see [`pg`])
//! ```

pub mod auth;
pub mod cascades;
pub mod dashboard;
pub mod features;
pub mod ingest;
pub mod lateness;
pub mod metrics;
pub mod pg;
pub mod privacy;
pub mod publish;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::{watch, Semaphore};

pub use ingest::{BatchOutcome, IngestConfig, IngestError, IngestPath, Ingestor};

/// Server settings.
#[derive(Clone)]
pub struct ServerConfig {
    pub ingest: IngestConfig,
    pub listen: SocketAddr,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Ingest requests processed at once; more get 429.
    pub max_inflight: usize,
    /// Rows returned by `/v1/sql` at most.
    pub max_sql_rows: usize,
    /// Rebuild the warehouse this often while new events arrive (`None`: only on request).
    pub materialize_interval: Option<Duration>,
    /// API tokens (SPEC §8); empty: open, and only a loopback address is allowed.
    pub tokens: Arc<auth::Tokens>,
    /// Also serve SQL over the Postgres wire protocol here (see [`pg`]).
    pub pg_listen: Option<SocketAddr>,
    /// Read records from a shared log instead of taking them over HTTP into a local WAL:
    /// the materializer (`writer`) or a read-only API replica (see [`ingest::Ingestor::follow`]).
    pub follow: Option<Follow>,
}

/// How a process of a deployment with a shared log reads it.
#[derive(Clone)]
pub struct Follow {
    pub log: Arc<dyn reelhouse_log::EventLog>,
    /// The one materializer: commits to Delta, runs the warehouse and privacy requests.
    pub writer: bool,
    /// How often an API replica loads the table versions the materializer committed.
    pub refresh_interval: Duration,
}

impl ServerConfig {
    pub fn new(ingest: IngestConfig, listen: SocketAddr) -> Self {
        ServerConfig {
            ingest,
            listen,
            max_body_bytes: 16 << 20,
            max_inflight: 64,
            max_sql_rows: 100_000,
            materialize_interval: Some(Duration::from_secs(10)),
            tokens: Arc::new(auth::Tokens::default()),
            pg_listen: None,
            follow: None,
        }
    }
}

/// How often the writer copies changed feature records to Redis (`--online redis://`): a
/// bound on how much later a replica sees a change than the writer's own store.
pub const ONLINE_COPY_INTERVAL: Duration = Duration::from_millis(5);

/// Errors of the API, each with one status code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("request body exceeds {0} bytes; split the batch")]
    TooLarge(usize),
    #[error("server is at capacity; retry after the Retry-After delay")]
    Overloaded,
    #[error("{0}")]
    Sql(String),
    #[error("the server is shutting down")]
    Unavailable,
    #[error("internal error; see the server log")]
    Internal,
    #[error("no such endpoint")]
    NotFound,
    #[error("missing or unknown API token; send Authorization: Bearer <token>")]
    Unauthorized,
    #[error("this token's role may not call this endpoint")]
    Forbidden,
    #[error("{0}")]
    NotFoundWhat(&'static str),
    #[error("{0}")]
    WrongRole(&'static str),
    #[error("the shared log did not take the batch; retry after the Retry-After delay")]
    LogUnavailable,
    #[error("the online store (redis) did not answer; retry after the Retry-After delay")]
    OnlineUnavailable,
}

impl ApiError {
    fn status_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::Overloaded => (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
            ApiError::Sql(_) => (StatusCode::BAD_REQUEST, "invalid_sql"),
            ApiError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            ApiError::NotFound | ApiError::NotFoundWhat(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::WrongRole(_) => (StatusCode::MISDIRECTED_REQUEST, "wrong_role"),
            ApiError::LogUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "log_unavailable"),
            ApiError::OnlineUnavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, "online_store_unavailable")
            }
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::BadBody(m) => ApiError::BadRequest(m),
            IngestError::Overloaded => ApiError::Overloaded,
            IngestError::ShuttingDown => ApiError::Unavailable,
            IngestError::WrongRole(m) => ApiError::WrongRole(m),
            IngestError::Log(e) => {
                tracing::error!(error = %e, "shared log append failed");
                ApiError::LogUnavailable
            }
            IngestError::Online(e @ reelhouse_online::Error::Redis(_)) => e.into(),
            other => {
                tracing::error!(error = %other, "ingest failed");
                ApiError::Internal
            }
        }
    }
}

impl From<reelhouse_online::Error> for ApiError {
    fn from(e: reelhouse_online::Error) -> Self {
        tracing::error!(error = %e, "online store lookup failed");
        ApiError::OnlineUnavailable
    }
}

impl From<reelhouse_lake::Error> for ApiError {
    fn from(e: reelhouse_lake::Error) -> Self {
        use reelhouse_lake::Error as E;
        match e {
            E::ReadOnly(m) => ApiError::Sql(m),
            // Planning errors (unknown table or column, bad syntax) help the analyst and hold
            // no internals; execution errors are logged, not returned.
            E::DataFusion(d) => {
                use reelhouse_lake::deltalake::datafusion::error::DataFusionError as D;
                match d.find_root() {
                    D::Plan(_) | D::SQL(..) | D::SchemaError(..) | D::NotImplemented(_) => {
                        ApiError::Sql(d.find_root().to_string())
                    }
                    _ => {
                        tracing::error!(error = %d, "query failed");
                        ApiError::Sql("the query failed during execution".into())
                    }
                }
            }
            other => {
                tracing::error!(error = %other, "query failed");
                ApiError::Internal
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_code();
        let retry = matches!(
            self,
            ApiError::Overloaded | ApiError::LogUnavailable | ApiError::OnlineUnavailable
        );
        let body = Json(json!({"error": {"code": code, "message": self.to_string()}}));
        let mut resp = (status, body).into_response();
        if retry {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub ingestor: Arc<Ingestor>,
    inflight: Arc<Semaphore>,
    max_body_bytes: usize,
    max_sql_rows: usize,
    /// Feature-lookup latency, for `/metrics`.
    lookups: Arc<metrics::Histogram>,
}

/// The API routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/v1/events", post(post_events))
        .route("/v1/sql", post(post_sql))
        .route("/v1/health", get(health))
        .route("/v1/admin/materialize", post(post_materialize))
        .route("/v1/admin/restate", post(post_restate))
        .route("/v1/ingest/lateness", get(get_lateness))
        .route("/v1/creators/{id}/dashboard", get(get_dashboard))
        .route("/v1/creators/{id}/videos", get(get_creator_videos))
        .route(
            "/v1/creators/{id}/cascades",
            get(cascades::get_creator_cascades),
        )
        .merge(
            Router::new()
                .route("/v1/features/videos/{id}", get(features::get_video))
                .route(
                    "/v1/features/videos:batch",
                    post(features::post_video_batch),
                )
                .route("/v1/features/users/{id}", get(features::get_user))
                .route("/v1/features/creators/{id}", get(features::get_creator))
                .route_layer(axum::middleware::from_fn_with_state(
                    state.clone(),
                    metrics::time_lookups,
                )),
        )
        .route("/metrics", get(metrics::get_metrics))
        .route("/v1/health/live", get(metrics::live))
        .route("/v1/health/ready", get(metrics::ready))
        .route("/v1/admin/check", get(features::get_check))
        .route(
            "/v1/videos/{id}/cascades",
            get(cascades::get_video_cascades),
        )
        .route("/v1/cascades/{root}", get(cascades::get_cascade))
        .route("/v1/dims/{kind}", axum::routing::put(put_dims))
        .route("/v1/users/{id}/forget", post(post_forget))
        .route("/v1/privacy/requests/{id}", get(get_privacy_request))
        .fallback(|| async { ApiError::NotFound })
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// The web creator dashboard (SPEC §6): one static page that calls the dashboard API (and
/// SQL, for the retention curve) from the browser; it holds no data itself.
async fn index() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("../assets/dashboard.html"),
    )
        .into_response()
}

pub(crate) async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        // to_bytes reports the limit through a boxed LengthLimitError.
        let mut src: Option<&dyn std::error::Error> = Some(&e);
        while let Some(s) = src {
            if s.is::<http_body_util::LengthLimitError>() {
                return ApiError::TooLarge(limit);
            }
            src = s.source();
        }
        ApiError::BadRequest("could not read the request body".into())
    })
}

/// A body announced larger than `max` is refused before it is read.
pub(crate) fn check_content_length(req: &Request, max: usize) -> Result<(), ApiError> {
    if let Some(len) = req.headers().get(header::CONTENT_LENGTH) {
        if len
            .to_str()
            .ok()
            .and_then(|l| l.parse::<usize>().ok())
            .is_some_and(|l| l > max)
        {
            return Err(ApiError::TooLarge(max));
        }
    }
    Ok(())
}

async fn post_events(State(s): State<AppState>, req: Request) -> Result<Response, ApiError> {
    check_content_length(&req, s.max_body_bytes)?;
    let _permit = s.inflight.try_acquire().map_err(|_| ApiError::Overloaded)?;
    let body = read_body(req.into_body(), s.max_body_bytes).await?;
    let outcome = s.ingestor.ingest(&body, IngestPath::Http).await?;
    Ok(Json(outcome).into_response())
}

#[derive(serde::Deserialize)]
struct SqlRequest {
    sql: String,
}

async fn post_sql(State(s): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let body = read_body(req.into_body(), 1 << 20).await?;
    let q: SqlRequest = serde_json::from_slice(&body)
        .map_err(|_| ApiError::BadRequest("body must be a JSON object {\"sql\": \"…\"}".into()))?;
    let catalog = s.ingestor.catalog().await?;
    let result = catalog.query_json(&q.sql, s.max_sql_rows).await?;
    Ok(Json(result).into_response())
}

async fn post_materialize(
    State(s): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let full = match q.get("full").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(ApiError::BadRequest("full must be true or false".into())),
    };
    let report = if full {
        s.ingestor.materialize_full().await?
    } else {
        s.ingestor.materialize().await?
    };
    Ok(Json(report).into_response())
}

#[derive(serde::Deserialize)]
struct RestateRequest {
    from: String,
    to: String,
}

/// Parses the `YYYY-MM-DD` date given as parameter `name`.
pub fn parse_date(name: &str, v: &str) -> Result<chrono::NaiveDate, ApiError> {
    chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d")
        .map_err(|_| ApiError::BadRequest(format!("{name} must be a date as YYYY-MM-DD")))
}

/// Parses an inclusive range of `YYYY-MM-DD` dates (query parameters or a request body).
pub fn parse_dates(
    from: Option<&str>,
    to: Option<&str>,
) -> Result<(chrono::NaiveDate, chrono::NaiveDate), ApiError> {
    let date = |name: &str, v: Option<&str>| {
        let v = v.ok_or_else(|| {
            ApiError::BadRequest(format!("missing query parameter {name}=YYYY-MM-DD"))
        })?;
        parse_date(name, v)
    };
    let (a, b) = (date("from", from)?, date("to", to)?);
    if b < a {
        return Err(ApiError::BadRequest("from must not be after to".into()));
    }
    Ok((a, b))
}

/// Days since 1970-01-01.
pub fn day_number(d: chrono::NaiveDate) -> i32 {
    (d - chrono::NaiveDate::default()).num_days() as i32
}

/// Parses an inclusive `YYYY-MM-DD` range into days since 1970-01-01.
pub fn parse_range(from: &str, to: &str) -> Result<(i32, i32), ApiError> {
    let (a, b) = parse_dates(Some(from), Some(to))?;
    Ok((day_number(a), day_number(b)))
}

async fn post_restate(State(s): State<AppState>, req: Request) -> Result<Response, ApiError> {
    // The range as a JSON body, or as `?from=…&to=…` (as the dashboard takes it) when the
    // body is empty.
    let query = req
        .uri()
        .query()
        .is_some()
        .then(|| axum::extract::Query::<RestateRequest>::try_from_uri(req.uri()).map(|q| q.0));
    let body = read_body(req.into_body(), 1 << 16).await?;
    let r: RestateRequest = match query {
        Some(q) if body.iter().all(u8::is_ascii_whitespace) => q.ok(),
        _ => serde_json::from_slice(&body).ok(),
    }
    .ok_or_else(|| {
        ApiError::BadRequest(
            "give the range as a body {\"from\":\"YYYY-MM-DD\",\"to\":\"YYYY-MM-DD\"} \
             or as ?from=YYYY-MM-DD&to=YYYY-MM-DD"
                .into(),
        )
    })?;
    let (from, to) = parse_range(&r.from, &r.to)?;
    Ok(Json(s.ingestor.restate(from, to).await?).into_response())
}

async fn put_dims(
    State(s): State<AppState>,
    axum::extract::Path(kind): axum::extract::Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let kind = reelhouse_warehouse::dims::DimKind::parse(&kind).ok_or(ApiError::NotFoundWhat(
        "dimensions are users, videos and creators: PUT /v1/dims/{kind}",
    ))?;
    let body = read_body(req.into_body(), s.max_body_bytes).await?;
    Ok(Json(s.ingestor.upsert_dims(kind, &body).await?).into_response())
}

#[derive(serde::Deserialize)]
struct ForgetRequest {
    mode: privacy::Mode,
}

async fn post_forget(
    State(s): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let user = features::parse_id("user", &id)? as i64;
    let body = read_body(req.into_body(), 1 << 16).await?;
    let r: ForgetRequest = serde_json::from_slice(&body).map_err(|_| {
        ApiError::BadRequest(
            "body must be {\"mode\": \"erase\"} or {\"mode\": \"anonymize\"}".into(),
        )
    })?;
    let request_id = s.ingestor.forget(user, r.mode).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"request_id": request_id, "status": "pending"})),
    )
        .into_response())
}

async fn get_privacy_request(
    State(s): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    s.ingestor
        .privacy_request(&id)
        .map(|v| Json(v).into_response())
        .ok_or(ApiError::NotFoundWhat("no privacy request has this id"))
}

async fn get_lateness(State(s): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(lateness::lateness(&s.ingestor).await?).into_response())
}

async fn get_dashboard(
    State(s): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    axum::extract::Query(params): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let body = dashboard::dashboard(&s.ingestor, &id, &params).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

async fn get_creator_videos(
    State(s): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    axum::extract::Query(params): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Result<Response, ApiError> {
    Ok(Json(dashboard::top_videos(&s.ingestor, &id, &params).await?).into_response())
}

async fn health(State(s): State<AppState>) -> Response {
    let log = s
        .ingestor
        .log_status()
        .map(|(log, position, lag)| json!({"log": log, "position": position, "lag": lag}));
    let role = match (&log, s.ingestor.is_writer()) {
        (None, _) => "all",
        (Some(_), true) => "materialize",
        (Some(_), false) => "serve",
    };
    Json(
        json!({"status": "ok", "version": env!("CARGO_PKG_VERSION"), "role": role,
               "ingest": s.ingestor.stats(), "features": s.ingestor.features().stats(),
               "online_store": s.ingestor.online_backend(), "shared_log": log}),
    )
    .into_response()
}

/// A server running in this process (for `serve`, the demo and tests).
pub struct RunningServer {
    pub addr: SocketAddr,
    /// Where the Postgres wire protocol listens, when asked for.
    pub pg_addr: Option<SocketAddr>,
    pub ingestor: Arc<Ingestor>,
    stop: watch::Sender<bool>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    pg: Option<tokio::task::JoinHandle<()>>,
    /// `None` on an API replica, which commits nothing.
    flusher: Option<std::thread::JoinHandle<()>>,
    materializer: Option<std::thread::JoinHandle<()>>,
    follower: Option<tokio::task::JoinHandle<()>>,
}

/// Errors of starting the server.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "refusing to listen on non-loopback address {0} without API tokens; \
         bind to 127.0.0.1 or pass --tokens FILE (see `reelhouse token add --help`)"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot start the background materializer: {0}")]
    Runtime(std::io::Error),
}

/// Runs the periodic materializer on its own single-threaded runtime, so background rebuilds
/// use at most one core and never take the HTTP workers' threads: on a 2-core machine, ingest
/// (parse, WAL, feature updates) keeps the other core. On-demand rebuilds
/// (`POST /v1/admin/materialize`) run on the request's runtime as before.
/// Runs `work` on a thread of its own with a one-thread runtime. Delta writes (flushes of up to
/// a million rows, warehouse rebuilds) are seconds of CPU inside async code; on the request
/// runtime they would hold its workers and stall what must stay quick: HTTP answers, reading
/// the shared log, copying features to Redis (a flush there delayed freshness through Redis by
/// up to 2.3 s in `bench scaleout`).
fn spawn_own_thread(
    name: &str,
    work: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, StartError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || rt.block_on(work))
        .map_err(StartError::Runtime)
}

/// Without API tokens, every listening address must be loopback (SPEC §8).
fn require_tokens_off_loopback(config: &ServerConfig) -> Result<(), StartError> {
    for addr in std::iter::once(config.listen).chain(config.pg_listen) {
        if !addr.ip().is_loopback() && config.tokens.is_empty() {
            return Err(StartError::NotLoopback(addr));
        }
    }
    Ok(())
}

/// Binds `addr` (port 0: any free one) and says which address it got.
async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let listen_error = |source| StartError::Listen { addr, source };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(listen_error)?;
    let local = listener.local_addr().map_err(listen_error)?;
    Ok((listener, local))
}

/// Opens the data directory (replaying the WAL) and starts serving on `config.listen`.
pub async fn start(config: ServerConfig) -> Result<RunningServer, StartError> {
    require_tokens_off_loopback(&config)?;
    let ingestor = match &config.follow {
        None => {
            let ingestor = Ingestor::open(config.ingest.clone()).await?;
            // Ready for the first request, as before the set was loaded lazily: before any
            // flusher or retention task starts.
            ingestor.load_dedup().await?;
            ingestor
        }
        Some(f) => {
            Ingestor::open_following(config.ingest.clone(), Arc::clone(&f.log), f.writer).await?
        }
    };
    let writer = ingestor.is_writer();
    let (listener, addr) = bind(config.listen).await?;
    let pg_listener = match config.pg_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .map_err(|source| StartError::Listen { addr: a, source })?,
        ),
        None => None,
    };
    let pg_addr = pg_listener.as_ref().and_then(|l| l.local_addr().ok());
    let state = AppState {
        ingestor: Arc::clone(&ingestor),
        inflight: Arc::new(Semaphore::new(config.max_inflight)),
        max_body_bytes: config.max_body_bytes,
        max_sql_rows: config.max_sql_rows,
        lookups: Arc::new(metrics::Histogram::default()),
    };
    let (stop, rx) = watch::channel(false);
    let mut http_stop = rx.clone();
    let app = router(state).layer(axum::middleware::from_fn_with_state(
        Arc::clone(&config.tokens),
        auth::check,
    ));
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = http_stop.changed().await;
            })
            .await
    });
    let pg = pg_listener.map(|l| {
        pg::spawn(
            l,
            Arc::clone(&ingestor),
            Arc::clone(&config.tokens),
            rx.clone(),
        )
    });
    if let Some(a) = pg_addr {
        tracing::info!(addr = %a, "postgres wire protocol listening (read-only SQL)");
    }
    let flusher = match writer {
        true => Some(spawn_own_thread(
            "reelhouse-flush",
            Arc::clone(&ingestor).run_flusher(rx.clone()),
        )?),
        false => None,
    };
    if writer {
        // Daily retention; it ends with the stop signal.
        tokio::spawn(Arc::clone(&ingestor).run_retention(rx.clone()));
    }
    if writer && config.ingest.tables.is_some() {
        tokio::spawn(Arc::clone(&ingestor).run_state_mirror(Duration::from_secs(1), rx.clone()));
        tokio::spawn(Arc::clone(&ingestor).run_lease_renewal(rx.clone()));
    }
    if writer && config.ingest.online.is_some() {
        tokio::spawn(Arc::clone(&ingestor).run_online_copier(ONLINE_COPY_INTERVAL, rx.clone()));
    }
    let follower = config
        .follow
        .as_ref()
        .map(|_| tokio::spawn(Arc::clone(&ingestor).follow(rx.clone())));
    if let Some(f) = config.follow.as_ref().filter(|f| !f.writer) {
        tokio::spawn(Arc::clone(&ingestor).run_refresher(f.refresh_interval, rx.clone()));
    }
    let materializer = match config.materialize_interval.filter(|_| writer) {
        Some(i) => Some(spawn_own_thread(
            "reelhouse-materialize",
            Arc::clone(&ingestor).run_materializer(i, rx),
        )?),
        None => None,
    };
    if config.tokens.is_empty() {
        tracing::info!(%addr, "reelhouse listening (open: no API tokens, loopback only)");
    } else {
        tracing::info!(%addr, "reelhouse listening (API tokens required)");
    }
    Ok(RunningServer {
        addr,
        pg_addr,
        ingestor,
        stop,
        http,
        pg,
        flusher,
        materializer,
        follower,
    })
}

/// An ingest node running in this process (`serve --role ingest`).
pub struct RunningIngestNode {
    pub addr: SocketAddr,
    pub publisher: Arc<publish::Publisher>,
    stop: watch::Sender<bool>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Starts an ingest node on `config.listen`: POST /v1/events appends to `log`.
pub async fn start_ingest_node(
    config: ServerConfig,
    log: Arc<dyn reelhouse_log::EventLog>,
) -> Result<RunningIngestNode, StartError> {
    require_tokens_off_loopback(&config)?;
    let (listener, addr) = bind(config.listen).await?;
    let publisher = Arc::new(publish::Publisher::new(
        log,
        Arc::clone(&config.ingest.clock),
        config.ingest.dedup_window,
    ));
    let state = publish::NodeState {
        publisher: Arc::clone(&publisher),
        inflight: Arc::new(Semaphore::new(config.max_inflight)),
        max_body_bytes: config.max_body_bytes,
    };
    let app = publish::router(state).layer(axum::middleware::from_fn_with_state(
        Arc::clone(&config.tokens),
        auth::check,
    ));
    let (stop, mut rx) = watch::channel(false);
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.changed().await;
            })
            .await
    });
    tracing::info!(%addr, log = %publisher.log().describe(), "ingest node listening");
    Ok(RunningIngestNode {
        addr,
        publisher,
        stop,
        http,
    })
}

impl RunningIngestNode {
    /// Stops accepting requests and lets in-flight ones finish (their appends complete).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(30), self.http).await;
    }
}

impl RunningServer {
    /// Stops accepting requests, lets in-flight ones finish, and flushes everything
    /// acknowledged to Delta.
    pub async fn shutdown(self) -> Result<usize, IngestError> {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(30), self.http).await;
        if let Some(pg) = self.pg {
            let _ = pg.await;
        }
        if let Some(f) = self.flusher {
            let _ = tokio::task::spawn_blocking(move || f.join()).await;
        }
        if let Some(f) = self.follower {
            let _ = f.await;
        }
        if let Some(m) = self.materializer {
            let _ = tokio::task::spawn_blocking(move || m.join()).await;
        }
        let flushed = self.ingestor.flush().await;
        self.ingestor.close().await;
        flushed
    }
}
