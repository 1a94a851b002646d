//! The HTTP API of reelhouse (axum): durable ingest, read-only SQL and health.
//!
//! This crate holds routes, auth, the Postgres listener and the web page only: every request
//! is answered by a `reelhouse_engine::Engine` (the pipeline, with no HTTP in it). Every
//! error leaves through the one `IntoResponse` impl of [`ApiError`] (see [`error`]), which
//! picks the status code and writes `{"error":{"code","message"}}` without payloads or
//! internal details.
//!
//! ```text
//!  POST /v1/events ─▶ body limit (413) ─▶ in-flight limit (429) ─▶ Engine::ingest ─▶ 200
//!  POST /v1/sql    ─▶ read-only gate (400) ─▶ Catalog (Delta ∪ pending) ─▶ {"columns","rows"}
//!  GET  /v1/health ─▶ counters
//!  GET  /v1/features/… ─▶ in-process feature store (see [`features`])
//!  GET  /              ─▶ the web creator dashboard (static page over the creator endpoints)
//!  --pg-listen         ─▶ the same read-only SQL over the Postgres wire protocol (see [`pg`])
//! ```

pub mod auth;
pub mod cascades;
pub mod dashboard;
pub mod error;
pub mod features;
pub mod metrics;
pub mod pg;
pub mod publish;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use reelhouse_engine::{Background, Engine, EngineConfig, ForgetMode, IngestPath};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;

/// Server settings.
#[derive(Clone)]
pub struct ServerConfig {
    pub engine: EngineConfig,
    pub listen: SocketAddr,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Ingest requests processed at once; more get 429.
    pub max_inflight: usize,
    /// Rows returned by `/v1/sql` at most.
    pub max_sql_rows: usize,
    /// Rebuild the warehouse this often while new events arrive (`None`: only on request).
    pub materialize_interval: Option<Duration>,
    /// API tokens (README.md, HTTP API); empty: open, and only a loopback address is allowed.
    pub tokens: Arc<auth::Tokens>,
    /// Also serve SQL over the Postgres wire protocol here (see [`pg`]).
    pub pg_listen: Option<SocketAddr>,
    /// Read records from a shared log instead of taking them over HTTP into a local WAL:
    /// the materializer (`writer`) or a read-only API replica (see `reelhouse_engine`'s
    /// `follow.rs`).
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
    pub fn new(engine: EngineConfig, listen: SocketAddr) -> Self {
        ServerConfig {
            engine,
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

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    inflight: Arc<Semaphore>,
    max_body_bytes: usize,
    max_sql_rows: usize,
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

/// The web creator dashboard (README.md, HTTP API): one static page that calls the dashboard API (and
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
    let outcome = s.engine.ingest(&body, IngestPath::Http).await?;
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
    let catalog = s.engine.catalog().await?;
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
        s.engine.materialize_full().await?
    } else {
        s.engine.materialize().await?
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
    reelhouse_event::Day::from_date(d).0
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
    Ok(Json(s.engine.restate(from, to).await?).into_response())
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
    Ok(Json(s.engine.upsert_dims(kind, &body).await?).into_response())
}

#[derive(serde::Deserialize)]
struct ForgetRequest {
    mode: ForgetMode,
}

async fn post_forget(
    State(s): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let user = reelhouse_event::UserId(features::parse_id("user", &id)?);
    let body = read_body(req.into_body(), 1 << 16).await?;
    let r: ForgetRequest = serde_json::from_slice(&body).map_err(|_| {
        ApiError::BadRequest(
            "body must be {\"mode\": \"erase\"} or {\"mode\": \"anonymize\"}".into(),
        )
    })?;
    let request_id = s.engine.forget(user, r.mode).await?;
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
    s.engine
        .privacy_request(&id)
        .map(|v| Json(v).into_response())
        .ok_or(ApiError::NotFoundWhat("no privacy request has this id"))
}

async fn get_lateness(State(s): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(s.engine.lateness().await?).into_response())
}

async fn get_dashboard(
    State(s): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    axum::extract::Query(params): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let body = dashboard::dashboard(&s.engine, &id, &params).await?;
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
    Ok(Json(dashboard::top_videos(&s.engine, &id, &params).await?).into_response())
}

async fn health(State(s): State<AppState>) -> Response {
    let log = s
        .engine
        .log_status()
        .map(|(log, position, lag)| json!({"log": log, "position": position, "lag": lag}));
    let role = match (&log, s.engine.is_writer()) {
        (None, _) => "all",
        (Some(_), true) => "materialize",
        (Some(_), false) => "serve",
    };
    Json(
        json!({"status": "ok", "version": env!("CARGO_PKG_VERSION"), "role": role,
               "ingest": s.engine.stats(), "features": s.engine.features().stats(),
               "online_store": s.engine.online_backend(), "shared_log": log}),
    )
    .into_response()
}

/// A server running in this process (for `serve`, the demo and tests).
pub struct RunningServer {
    pub addr: SocketAddr,
    /// Where the Postgres wire protocol listens, when asked for.
    pub pg_addr: Option<SocketAddr>,
    pub engine: Arc<Engine>,
    stop: CancellationToken,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    pg: Option<tokio::task::JoinHandle<()>>,
}

/// Errors of starting the server.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Engine(#[from] reelhouse_engine::Error),
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
}

/// Without API tokens, every listening address must be loopback (README.md, HTTP API).
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

/// Serves `app` on `listener` until `stop` is cancelled (in-flight requests finish).
fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    })
}

/// Opens the data directory (replaying the WAL), starts the engine's background loops and
/// serves on `config.listen`.
pub async fn start(config: ServerConfig) -> Result<RunningServer, StartError> {
    require_tokens_off_loopback(&config)?;
    let engine = match &config.follow {
        None => {
            let engine = Engine::open(config.engine.clone()).await?;
            // Ready for the first request: the stored ids are read before any flusher or
            // retention task starts.
            engine.load_dedup().await?;
            engine
        }
        Some(f) => {
            Engine::open_following(config.engine.clone(), Arc::clone(&f.log), f.writer).await?
        }
    };
    let (listener, addr) = bind(config.listen).await?;
    let pg_listener = match config.pg_listen {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let state = AppState {
        engine: Arc::clone(&engine),
        inflight: Arc::new(Semaphore::new(config.max_inflight)),
        max_body_bytes: config.max_body_bytes,
        max_sql_rows: config.max_sql_rows,
    };
    let stop = CancellationToken::new();
    let app = with_layers(router(state), &config.tokens);
    let http = serve(listener, app, stop.clone());
    let pg_addr = pg_listener.as_ref().map(|(_, a)| *a);
    let pg = pg_listener.map(|(l, a)| {
        tracing::info!(addr = %a, "postgres wire protocol listening (read-only SQL)");
        pg::spawn(
            l,
            Arc::clone(&engine),
            Arc::clone(&config.tokens),
            stop.clone(),
        )
    });
    engine.start_background(&Background {
        materialize_interval: config.materialize_interval,
        refresh_interval: config.follow.as_ref().map(|f| f.refresh_interval),
    })?;
    if config.tokens.is_empty() {
        tracing::info!(%addr, "reelhouse listening (open: no API tokens, loopback only)");
    } else {
        tracing::info!(%addr, "reelhouse listening (API tokens required)");
    }
    Ok(RunningServer {
        addr,
        pg_addr,
        engine,
        stop,
        http,
        pg,
    })
}

/// The layers every router gets: token check, then a request id and a span per request in
/// the logs (`tower-http`; the id is also sent back as `x-request-id`).
fn with_layers(app: Router, tokens: &Arc<auth::Tokens>) -> Router {
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
    use tower_http::trace::TraceLayer;
    let request_id = axum::http::HeaderName::from_static("x-request-id");
    app.layer(axum::middleware::from_fn_with_state(
        Arc::clone(tokens),
        auth::check,
    ))
    .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
        // The route's template, never the path itself: paths carry user ids.
        let route = req
            .extensions()
            .get::<axum::extract::MatchedPath>()
            .map_or("-", |p| p.as_str());
        let id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        tracing::info_span!("request", method = %req.method(), route, request_id = %id)
    }))
    .layer(PropagateRequestIdLayer::new(request_id.clone()))
    .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}

/// An ingest node running in this process (`serve --role ingest`).
pub struct RunningIngestNode {
    pub addr: SocketAddr,
    pub publisher: Arc<reelhouse_engine::publish::Publisher>,
    stop: CancellationToken,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Starts an ingest node on `config.listen`: POST /v1/events appends to `log`.
pub async fn start_ingest_node(
    config: ServerConfig,
    log: Arc<dyn reelhouse_log::EventLog>,
) -> Result<RunningIngestNode, StartError> {
    require_tokens_off_loopback(&config)?;
    let (listener, addr) = bind(config.listen).await?;
    let publisher = Arc::new(reelhouse_engine::publish::Publisher::new(
        log,
        Arc::clone(&config.engine.clock),
        config.engine.dedup_window,
    ));
    let state = publish::NodeState {
        publisher: Arc::clone(&publisher),
        inflight: Arc::new(Semaphore::new(config.max_inflight)),
        max_body_bytes: config.max_body_bytes,
    };
    let app = with_layers(publish::router(state), &config.tokens);
    let stop = CancellationToken::new();
    let http = serve(listener, app, stop.clone());
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
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.http).await;
    }
}

impl RunningServer {
    /// Stops accepting requests, lets in-flight ones finish, stops the engine's background
    /// loops and waits for them, and flushes everything acknowledged to Delta.
    pub async fn shutdown(self) -> Result<usize, reelhouse_engine::Error> {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.http).await;
        if let Some(pg) = self.pg {
            let _ = pg.await;
        }
        self.engine.shutdown().await
    }
}
