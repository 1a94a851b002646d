//! Access control (README.md, HTTP API): API tokens from a file, stored as SHA-256 hashes, each with one
//! role; one middleware decides every request.
//!
//! ```text
//!  request ─▶ no tokens configured? ─▶ open (the server only binds to loopback then)
//!          └▶ Authorization: Bearer <token> ─▶ sha256 ─▶ role ─▶ allowed(role, method, path)?
//!                 missing/unknown → 401          not allowed → 403
//! ```
//!
//! | role | may call |
//! |---|---|
//! | `admin` | everything |
//! | `ingest` | `POST /v1/events` |
//! | `analyst` | SQL, dashboards, features, cascades, lateness, `/metrics` |
//! | `creator:<id>` | `GET /v1/creators/<id>/{dashboard,videos,cascades}` (their own only) |
//!
//! Every role may read `GET /v1/health`; `GET /`, `/v1/health/live` and `/v1/health/ready` need
//! no token (they hold no data). The tokens file is JSON:
//! `{"tokens":[{"name":"…","sha256":"<hex of sha256(token)>","role":"analyst"}]}`;
//! `reelhouse token add` writes entries and prints the token once.

use std::collections::HashMap;
use std::path::Path;

use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::ApiError;

/// A role of README.md, HTTP API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Admin,
    Ingest,
    Analyst,
    Creator(u64),
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "ingest" => Some(Role::Ingest),
            "analyst" => Some(Role::Analyst),
            other => other
                .strip_prefix("creator:")
                .and_then(|id| id.parse().ok())
                .map(Role::Creator),
        }
    }
}

/// One entry of the tokens file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenEntry {
    pub name: String,
    pub sha256: String,
    pub role: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TokenFile {
    pub tokens: Vec<TokenEntry>,
}

/// Token hashes and their roles.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    by_hash: HashMap<String, Role>,
}

/// Hex SHA-256 of a token, as stored.
pub fn hash_token(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

impl Tokens {
    /// Loads a tokens file; every entry must have a valid role and a 64-hex-digit hash.
    pub fn load(path: &Path) -> Result<Tokens, String> {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read tokens file {}: {e}", path.display()))?;
        let file: TokenFile = serde_json::from_slice(&bytes)
            .map_err(|e| format!("tokens file {} is not valid: {e}", path.display()))?;
        let mut by_hash = HashMap::new();
        for t in file.tokens {
            let role = Role::parse(&t.role).ok_or_else(|| {
                format!(
                    "token {:?}: role must be admin, ingest, analyst or creator:<id>",
                    t.name
                )
            })?;
            if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("token {:?}: sha256 must be 64 hex digits", t.name));
            }
            by_hash.insert(t.sha256.to_ascii_lowercase(), role);
        }
        Ok(Tokens { by_hash })
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The role of a presented token (`None`: unknown).
    pub fn role_of(&self, token: &str) -> Option<&Role> {
        self.by_hash.get(&hash_token(token))
    }
}

/// May `role` call `method path`?
pub fn allowed(role: &Role, method: &Method, path: &str) -> bool {
    let seg: Vec<&str> = path.trim_matches('/').split('/').collect();
    if method == Method::GET && path == "/v1/health" {
        return true;
    }
    match role {
        Role::Admin => true,
        Role::Ingest => method == Method::POST && path == "/v1/events",
        Role::Analyst => matches!(
            (method.as_str(), seg.as_slice()),
            ("POST", ["v1", "sql"])
                | (
                    "GET",
                    ["v1", "creators", _, "dashboard" | "videos" | "cascades"]
                )
                | ("GET", ["v1", "features", ..])
                | ("POST", ["v1", "features", "videos:batch"])
                | ("GET", ["v1", "videos", _, "cascades"])
                | ("GET", ["v1", "cascades", _])
                | ("GET", ["v1", "ingest", "lateness"])
                | ("GET", ["metrics"])
        ),
        Role::Creator(id) => matches!(
            (method.as_str(), seg.as_slice()),
            ("GET", ["v1", "creators", c, "dashboard" | "videos" | "cascades"])
                if c.parse::<u64>().ok() == Some(*id)
        ),
    }
}

/// The middleware: open without tokens; otherwise 401 / 403 as the table above says.
pub async fn check(
    State(tokens): State<std::sync::Arc<Tokens>>,
    req: Request,
    next: Next,
) -> Response {
    // The dashboard page is static and holds no data; its API calls carry the token. Probes
    // (liveness, readiness) hold no data either.
    let public = req.method() == Method::GET
        && matches!(
            req.uri().path(),
            "/" | "/v1/health/live" | "/v1/health/ready"
        );
    if tokens.is_empty() || public {
        return next.run(req).await;
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(role) = bearer.and_then(|t| tokens.role_of(t)) else {
        return ApiError::Unauthorized.into_response();
    };
    if !allowed(role, req.method(), req.uri().path()) {
        return ApiError::Forbidden.into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_reach_only_their_endpoints() {
        let get = Method::GET;
        let post = Method::POST;
        assert!(allowed(&Role::Ingest, &post, "/v1/events"));
        assert!(!allowed(&Role::Ingest, &post, "/v1/sql"));
        assert!(allowed(&Role::Analyst, &post, "/v1/sql"));
        assert!(!allowed(&Role::Analyst, &post, "/v1/events"));
        assert!(!allowed(&Role::Analyst, &post, "/v1/users/5/forget"));
        assert!(!allowed(&Role::Analyst, &post, "/v1/admin/materialize"));
        assert!(allowed(&Role::Creator(7), &get, "/v1/creators/7/dashboard"));
        assert!(allowed(&Role::Creator(7), &get, "/v1/creators/7/videos"));
        assert!(allowed(&Role::Creator(7), &get, "/v1/creators/7/cascades"));
        assert!(!allowed(&Role::Creator(7), &get, "/v1/creators/8/cascades"));
        assert!(!allowed(&Role::Creator(7), &get, "/v1/videos/1/cascades"));
        assert!(!allowed(
            &Role::Creator(7),
            &get,
            "/v1/creators/8/dashboard"
        ));
        assert!(!allowed(&Role::Creator(7), &post, "/v1/sql"));
        assert!(allowed(&Role::Admin, &post, "/v1/users/5/forget"));
        assert!(allowed(&Role::Creator(7), &get, "/v1/health"));
        assert_eq!(Role::parse("creator:12"), Some(Role::Creator(12)));
        assert_eq!(Role::parse("creator:x"), None);
        assert_eq!(Role::parse("root"), None);
    }
}
