//! The API's errors and the one place that maps each to an HTTP status code and the
//! `{"error":{"code","message"}}` body (without payloads or internal details).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use reelhouse_engine::Error as EngineError;
use serde_json::json;

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

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::BadBody(m) | EngineError::NotReady(m) => ApiError::BadRequest(m),
            EngineError::Overloaded => ApiError::Overloaded,
            EngineError::ShuttingDown => ApiError::Unavailable,
            EngineError::WrongRole(m) => ApiError::WrongRole(m),
            EngineError::Log(e) => {
                tracing::error!(error = %e, "shared log append failed");
                ApiError::LogUnavailable
            }
            EngineError::Online(e @ reelhouse_online::Error::Redis(_)) => e.into(),
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
