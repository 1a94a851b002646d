//! Postgres wire protocol (`serve --pg-listen 127.0.0.1:5433`) for `psql` and BI tools.
//!
//! The same read-only DataFusion catalog as `POST /v1/sql`, reached through the `pgwire`
//! crate's simple and extended query protocols, so stock Postgres drivers (libpq/psql, JDBC,
//! pgx, psycopg) connect unchanged:
//!
//! ```text
//!  startup ─▶ tokens configured? ─▶ cleartext password = API token ─▶ sha256 ─▶ role
//!          │                          unknown → 28P01        ingest/creator → 42501
//!          └▶ none: open (loopback only, as for HTTP)
//!  Query / Parse+Bind+Execute ─▶ SET/BEGIN/COMMIT…: accepted, no effect
//!                              ─▶ read-only gate (25006) ─▶ DataFusion plan ─▶ rows streamed
//! ```
//!
//! Only `admin` and `analyst` tokens may log in (the roles that may run SQL over HTTP). Arrow
//! types map to the nearest Postgres type (integers to `int2/4/8`, floats and decimals to
//! `float4/8`, dates, timestamps with and without time zone, `bytea`, everything else `text`
//! in its display form). Rows stream batch by batch, so there is no row limit as over HTTP.
//! Bind parameters (`$1`) are refused with `0A000`: BI tools inline their values. The catalog
//! questions drivers ask on connect (`version()`, `current_schema()`, a few `SHOW`s, lookups in
//! `pg_catalog`) get fixed answers or no rows ([`compat_answer`]); `pg_catalog` itself is not
//! emulated, so schema browsers see no tables.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use futures::sink::Sink;
use futures::{stream, Stream, StreamExt};
use pgwire::api::auth::cleartext::CleartextPasswordAuth;
use pgwire::api::auth::driver::{AuthDriver, AuthOutcome};
use pgwire::api::auth::mechanism::AuthMechanismFactory;
use pgwire::api::auth::StartupHandler;
use pgwire::api::auth::{AuthSource, DefaultServerParameterProvider, LoginInfo, Password};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{
    DataRowEncoder, DescribePortalResponse, DescribeStatementResponse, FieldInfo, QueryResponse,
    Response, Tag,
};
use pgwire::api::stmt::{NoopQueryParser, StoredStatement};
use pgwire::api::{ClientInfo, PgWireServerHandlers, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::data::DataRow;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use reelhouse_lake::deltalake::arrow::array::{Array, AsArray, RecordBatch};
use reelhouse_lake::deltalake::arrow::compute::cast;
use reelhouse_lake::deltalake::arrow::datatypes::{
    DataType, Date32Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Schema,
    TimeUnit, TimestampMicrosecondType,
};
use reelhouse_lake::deltalake::arrow::util::display::{ArrayFormatter, FormatOptions};
use tokio_util::sync::CancellationToken;

use crate::auth::{Role, Tokens};
use reelhouse_engine::Engine;

/// Starts accepting Postgres connections on `listener` until `stop` changes.
pub fn spawn(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    tokens: Arc<Tokens>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let handlers = Arc::new(Handlers {
        backend: Arc::new(Backend {
            engine,
            tokens: Arc::clone(&tokens),
            parser: Arc::new(NoopQueryParser::new()),
        }),
        startup: Arc::new(TokenStartup::new(tokens)),
    });
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((socket, _)) => {
                        let h = Arc::clone(&handlers);
                        tokio::spawn(async move {
                            if let Err(e) = pgwire::tokio::process_socket(socket, None, h).await {
                                tracing::debug!(error = %e, "postgres connection ended with an error");
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot accept a postgres connection"),
                },
            }
        }
    })
}

struct Handlers {
    backend: Arc<Backend>,
    startup: Arc<TokenStartup>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        Arc::clone(&self.backend)
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        Arc::clone(&self.backend)
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::clone(&self.startup)
    }
}

/// An error with a SQLSTATE; `FATAL` ends the connection (login), `ERROR` only the statement.
fn pg_error(severity: &str, code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        severity.to_owned(),
        code.to_owned(),
        message.into(),
    )))
}

fn user_error(code: &str, message: impl Into<String>) -> PgWireError {
    pg_error("ERROR", code, message)
}

fn fatal(code: &str, message: impl Into<String>) -> PgWireError {
    pg_error("FATAL", code, message)
}

/// Checks the password as an API token; the identity is the token's role.
#[derive(Debug)]
struct TokenSource {
    tokens: Arc<Tokens>,
}

#[async_trait]
impl AuthSource<Role> for TokenSource {
    async fn get_password(&self, _login: &LoginInfo) -> PgWireResult<Password> {
        // Tokens are stored hashed; verify_password below checks them.
        Err(fatal("28P01", "password authentication failed"))
    }

    async fn verify_password(
        &self,
        _login: &LoginInfo,
        presented: &[u8],
    ) -> PgWireResult<Option<Role>> {
        let token = std::str::from_utf8(presented).unwrap_or("").trim();
        match self.tokens.role_of(token) {
            Some(role) => Ok(Some(role.clone())),
            None => Err(fatal(
                "28P01",
                "password authentication failed: the password must be a reelhouse API token",
            )),
        }
    }
}

/// Startup: open without tokens; otherwise cleartext password = token, admin or analyst only.
struct TokenStartup {
    tokens: Arc<Tokens>,
    driver: AuthDriver<DefaultServerParameterProvider, Role>,
    factory: CleartextPasswordAuth<TokenSource>,
}

impl TokenStartup {
    fn new(tokens: Arc<Tokens>) -> Self {
        let mut params = DefaultServerParameterProvider::default();
        params.server_version = format!("16.0 (reelhouse {})", env!("CARGO_PKG_VERSION"));
        params.is_superuser = false;
        params.default_transaction_read_only = true;
        TokenStartup {
            factory: CleartextPasswordAuth::new(Arc::new(TokenSource {
                tokens: Arc::clone(&tokens),
            })),
            tokens,
            driver: AuthDriver::new(params),
        }
    }

    /// Binds the role to the session, or refuses roles that may not run SQL.
    async fn finish<C>(&self, client: &mut C, outcome: AuthOutcome<Role>) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match outcome {
            AuthOutcome::InProgress => Ok(()),
            AuthOutcome::Authenticated {
                identity,
                final_message,
            } => {
                let role =
                    identity.ok_or_else(|| fatal("28P01", "password authentication failed"))?;
                if !matches!(role, Role::Admin | Role::Analyst) {
                    return Err(fatal(
                        "42501",
                        "this token's role may not run SQL (admin or analyst tokens only)",
                    ));
                }
                client.session_extensions().insert(role);
                self.driver
                    .complete_authentication(client, final_message)
                    .await
            }
        }
    }
}

#[async_trait]
impl StartupHandler for TokenStartup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                pgwire::api::auth::protocol_negotiation(client, startup).await?;
                pgwire::api::auth::save_startup_parameters_to_metadata(client, startup);
                if self.tokens.is_empty() {
                    // Open mode (loopback only): no password asked.
                    client.session_extensions().insert(Role::Admin);
                    return self.driver.complete_authentication(client, None).await;
                }
                let outcome = self
                    .driver
                    .begin_authentication(client, self.factory.create())
                    .await?;
                self.finish(client, outcome).await
            }
            PgWireFrontendMessage::PasswordMessageFamily(message) => {
                let outcome = self.driver.advance_authentication(client, message).await?;
                self.finish(client, outcome).await
            }
            _ => Ok(()),
        }
    }
}

/// Runs queries for authenticated sessions.
struct Backend {
    engine: Arc<Engine>,
    tokens: Arc<Tokens>,
    parser: Arc<NoopQueryParser>,
}

/// Session commands drivers send on their own (`SET extra_float_digits`, `BEGIN` …): accepted
/// with no effect, since every session is read-only.
fn session_command(sql: &str) -> Option<&'static str> {
    let first = sql
        .split(|c: char| c.is_whitespace() || c == ';')
        .find(|w| !w.is_empty())?
        .to_ascii_uppercase();
    Some(match first.as_str() {
        "SET" => "SET",
        "RESET" => "RESET",
        "BEGIN" | "START" => "BEGIN",
        "COMMIT" | "END" => "COMMIT",
        "ROLLBACK" | "ABORT" => "ROLLBACK",
        "DISCARD" => "DISCARD",
        "DEALLOCATE" => "DEALLOCATE",
        _ => return None,
    })
}

/// Catalog questions that drivers and BI tools ask on connect (SQLAlchemy, hence Superset;
/// JDBC): `version()`, `current_schema()`, a few `SHOW`s, and lookups in `pg_catalog`
/// (`pg_type`, `pg_namespace`, …), which this server does not emulate. Answered with a fixed
/// row, or with no rows, so the connection proceeds; `None` for everything else.
fn compat_answer(sql: &str) -> Option<(Vec<&'static str>, Vec<String>)> {
    let q = sql
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .trim_end_matches(';')
        .to_ascii_lowercase();
    let one = |col: &'static str, v: &str| Some((vec![col], vec![v.to_string()]));
    match q.as_str() {
        "select version()" | "select pg_catalog.version()" => one(
            "version",
            &format!(
                "PostgreSQL 16.0 (reelhouse {}, read-only)",
                env!("CARGO_PKG_VERSION")
            ),
        ),
        "select current_schema()" | "select pg_catalog.current_schema()" => {
            one("current_schema", "public")
        }
        "select current_database()" => one("current_database", "reelhouse"),
        "show transaction isolation level" => one("transaction_isolation", "read committed"),
        "show standard_conforming_strings" => one("standard_conforming_strings", "on"),
        "show server_version" => one("server_version", "16.0"),
        _ if q.contains("pg_catalog.") || q.contains("pg_type") || q.contains("pg_namespace") => {
            Some((Vec::new(), Vec::new()))
        }
        _ => None,
    }
}

/// Text columns named `cols`, in the result formats the client asked for.
fn text_fields(cols: &[&str], format: &Format) -> Vec<FieldInfo> {
    cols.iter()
        .enumerate()
        .map(|(i, c)| FieldInfo::new(c.to_string(), None, None, Type::TEXT, format.format_for(i)))
        .collect()
}

fn compat_response(cols: Vec<&'static str>, values: Vec<String>, format: &Format) -> Response {
    let fields = Arc::new(text_fields(&cols, format));
    let rows = if cols.is_empty() {
        Vec::new()
    } else {
        let mut enc = DataRowEncoder::new(Arc::clone(&fields));
        let mut ok = true;
        for v in &values {
            ok &= enc.encode_field(&v.as_str()).is_ok();
        }
        if ok {
            vec![Ok(enc.take_row())]
        } else {
            Vec::new()
        }
    };
    Response::Query(QueryResponse::new(fields, stream::iter(rows)))
}

fn session_response(tag: &str) -> Response {
    match tag {
        "BEGIN" => Response::TransactionStart(Tag::new(tag)),
        "COMMIT" | "ROLLBACK" => Response::TransactionEnd(Tag::new(tag)),
        _ => Response::Execution(Tag::new(tag)),
    }
}

impl Backend {
    fn authorize<C: ClientInfo>(&self, client: &C) -> PgWireResult<()> {
        match client.session_extensions().get::<Role>() {
            Some(r) if matches!(*r, Role::Admin | Role::Analyst) => Ok(()),
            _ if self.tokens.is_empty() => Ok(()),
            _ => Err(user_error("42501", "this session may not run SQL")),
        }
    }

    async fn plan(
        &self,
        sql: &str,
    ) -> PgWireResult<reelhouse_lake::deltalake::datafusion::dataframe::DataFrame> {
        let catalog = self.engine.catalog().await.map_err(|e| {
            tracing::error!(error = %e, "cannot open the catalog for a postgres query");
            user_error("XX000", "internal error; see the server log")
        })?;
        catalog
            .plan(sql.trim().trim_end_matches(';'))
            .await
            .map_err(sql_error)
    }

    async fn run(&self, sql: &str, format: &Format) -> PgWireResult<Response> {
        if let Some(tag) = session_command(sql) {
            return Ok(session_response(tag));
        }
        if let Some((cols, values)) = compat_answer(sql) {
            return Ok(compat_response(cols, values, format));
        }
        let df = self.plan(sql).await?;
        let fields = Arc::new(fields(df.schema().as_arrow(), format));
        let batches = df.execute_stream().await.map_err(|e| sql_error(e.into()))?;
        let header = Arc::clone(&fields);
        let rows = batches.flat_map(
            move |batch| -> std::pin::Pin<Box<dyn Stream<Item = PgWireResult<DataRow>> + Send>> {
                match batch {
                    Ok(b) => Box::pin(stream::iter(encode(&b, &header))),
                    Err(e) => Box::pin(stream::once(async move { Err(sql_error(e.into())) })),
                }
            },
        );
        Ok(Response::Query(QueryResponse::new(fields, rows)))
    }

    async fn describe(&self, sql: &str, format: &Format) -> PgWireResult<Vec<FieldInfo>> {
        if session_command(sql).is_some() {
            return Ok(Vec::new());
        }
        if let Some((cols, _)) = compat_answer(sql) {
            return Ok(text_fields(&cols, format));
        }
        let df = self.plan(sql).await?;
        Ok(fields(df.schema().as_arrow(), format))
    }
}

/// The SQLSTATE and message of a query error: writes `25006`, bad SQL `42601`/`42000`, and
/// execution failures a generic message (details go to the log, not the client).
fn sql_error(e: reelhouse_lake::Error) -> PgWireError {
    use reelhouse_lake::deltalake::datafusion::error::DataFusionError as D;
    match e {
        reelhouse_lake::Error::ReadOnly(m) => user_error("25006", m),
        reelhouse_lake::Error::DataFusion(d) => match d.find_root() {
            D::SQL(..) => user_error("42601", d.find_root().to_string()),
            D::Plan(_) | D::SchemaError(..) | D::NotImplemented(_) => {
                user_error("42000", d.find_root().to_string())
            }
            _ => {
                tracing::error!(error = %d, "postgres query failed");
                user_error("XX000", "the query failed during execution")
            }
        },
        other => {
            tracing::error!(error = %other, "postgres query failed");
            user_error("XX000", "internal error; see the server log")
        }
    }
}

/// The Postgres type each Arrow type is sent as, and the Arrow type it is cast to first.
fn pg_type(dt: &DataType) -> (Type, DataType) {
    use DataType as A;
    match dt {
        A::Boolean => (Type::BOOL, A::Boolean),
        A::Int8 | A::Int16 | A::UInt8 => (Type::INT2, A::Int16),
        A::Int32 | A::UInt16 => (Type::INT4, A::Int32),
        A::Int64 | A::UInt32 | A::UInt64 => (Type::INT8, A::Int64),
        A::Float16 | A::Float32 => (Type::FLOAT4, A::Float32),
        A::Float64 | A::Decimal128(..) | A::Decimal256(..) => (Type::FLOAT8, A::Float64),
        A::Date32 | A::Date64 => (Type::DATE, A::Date32),
        A::Timestamp(_, Some(tz)) => (
            Type::TIMESTAMPTZ,
            A::Timestamp(TimeUnit::Microsecond, Some(tz.clone())),
        ),
        A::Timestamp(_, None) => (Type::TIMESTAMP, A::Timestamp(TimeUnit::Microsecond, None)),
        A::Binary | A::LargeBinary | A::BinaryView | A::FixedSizeBinary(_) => {
            (Type::BYTEA, A::Binary)
        }
        _ => (Type::TEXT, A::Utf8),
    }
}

fn fields(schema: &Schema, format: &Format) -> Vec<FieldInfo> {
    schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            FieldInfo::new(
                f.name().clone(),
                None,
                None,
                pg_type(f.data_type()).0,
                format.format_for(i),
            )
        })
        .collect()
}

/// One batch as Postgres data rows.
fn encode(batch: &RecordBatch, fields: &Arc<Vec<FieldInfo>>) -> Vec<PgWireResult<DataRow>> {
    let columns: Result<Vec<Arc<dyn Array>>, PgWireError> = batch
        .columns()
        .iter()
        .map(|c| {
            let target = pg_type(c.data_type()).1;
            if target == DataType::Utf8
                && !matches!(
                    c.data_type(),
                    DataType::Utf8View | DataType::Utf8 | DataType::LargeUtf8
                )
            {
                // Lists, structs, maps …: their display form.
                let f = ArrayFormatter::try_new(c.as_ref(), &FormatOptions::default())
                    .map_err(|e| user_error("XX000", e.to_string()))?;
                let strings: reelhouse_lake::deltalake::arrow::array::StringArray = (0..c.len())
                    .map(|r| (!c.is_null(r)).then(|| f.value(r).to_string()))
                    .collect();
                return Ok(Arc::new(strings) as Arc<dyn Array>);
            }
            cast(c, &target).map_err(|e| user_error("XX000", e.to_string()))
        })
        .collect();
    let columns = match columns {
        Ok(c) => c,
        Err(e) => return vec![Err(e)],
    };
    let mut encoder = DataRowEncoder::new(Arc::clone(fields));
    let mut rows = Vec::with_capacity(batch.num_rows());
    for r in 0..batch.num_rows() {
        for c in &columns {
            if let Err(e) = encode_cell(&mut encoder, c.as_ref(), r) {
                return vec![Err(e)];
            }
        }
        rows.push(Ok(encoder.take_row()));
    }
    rows
}

fn encode_cell(enc: &mut DataRowEncoder, col: &dyn Array, r: usize) -> PgWireResult<()> {
    if col.is_null(r) {
        return enc.encode_field(&None::<i32>);
    }
    match col.data_type() {
        DataType::Boolean => enc.encode_field(&col.as_boolean().value(r)),
        DataType::Int16 => enc.encode_field(&col.as_primitive::<Int16Type>().value(r)),
        DataType::Int32 => enc.encode_field(&col.as_primitive::<Int32Type>().value(r)),
        DataType::Int64 => enc.encode_field(&col.as_primitive::<Int64Type>().value(r)),
        DataType::Float32 => enc.encode_field(&col.as_primitive::<Float32Type>().value(r)),
        DataType::Float64 => enc.encode_field(&col.as_primitive::<Float64Type>().value(r)),
        DataType::Date32 => {
            let days = col.as_primitive::<Date32Type>().value(r);
            enc.encode_field(&reelhouse_event::Day(days).date())
        }
        DataType::Timestamp(_, tz) => {
            let us = col.as_primitive::<TimestampMicrosecondType>().value(r);
            let t = chrono::DateTime::from_timestamp_micros(us)
                .ok_or_else(|| user_error("22008", "timestamp out of range"))?;
            if tz.is_some() {
                enc.encode_field(&t)
            } else {
                enc.encode_field(&t.naive_utc())
            }
        }
        DataType::Binary => enc.encode_field(&col.as_binary::<i32>().value(r)),
        _ => enc.encode_field(&col.as_string::<i32>().value(r)),
    }
}

#[async_trait]
impl SimpleQueryHandler for Backend {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        self.authorize(client)?;
        Ok(vec![self.run(query, &Format::UnifiedText).await?])
    }
}

#[async_trait]
impl ExtendedQueryHandler for Backend {
    type Statement = String;
    type QueryParser = NoopQueryParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        Arc::clone(&self.parser)
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        self.authorize(client)?;
        if portal.parameter_len() > 0 {
            return Err(user_error(
                "0A000",
                "bind parameters are not supported; inline the values in the SQL",
            ));
        }
        self.run(&portal.statement.statement, &portal.result_column_format)
            .await
    }

    async fn do_describe_statement<C>(
        &self,
        client: &mut C,
        stmt: &StoredStatement<Self::Statement>,
    ) -> PgWireResult<DescribeStatementResponse>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        self.authorize(client)?;
        let params = stmt
            .parameter_types
            .iter()
            .map(|t| t.clone().unwrap_or(Type::UNKNOWN))
            .collect();
        let fields = self.describe(&stmt.statement, &Format::UnifiedText).await?;
        Ok(DescribeStatementResponse::new(params, fields))
    }

    async fn do_describe_portal<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
    ) -> PgWireResult<DescribePortalResponse>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        self.authorize(client)?;
        let fields = self
            .describe(&portal.statement.statement, &portal.result_column_format)
            .await?;
        Ok(DescribePortalResponse::new(fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_commands_are_recognised_and_nothing_else() {
        assert_eq!(session_command("SET extra_float_digits = 3"), Some("SET"));
        assert_eq!(session_command("  begin;"), Some("BEGIN"));
        assert_eq!(session_command("SELECT 1"), None);
        assert_eq!(session_command("INSERT INTO events VALUES (1)"), None);
        assert_eq!(session_command(""), None);
    }

    #[test]
    fn connect_time_catalog_questions_get_fixed_answers() {
        assert_eq!(
            compat_answer("select pg_catalog.version()").unwrap().0,
            vec!["version"]
        );
        assert_eq!(
            compat_answer("SHOW  transaction isolation level;")
                .unwrap()
                .1,
            vec!["read committed".to_string()]
        );
        assert!(compat_answer("SELECT typname FROM pg_type WHERE false")
            .unwrap()
            .0
            .is_empty());
        assert!(compat_answer("SELECT count(*) FROM events").is_none());
        assert!(compat_answer("DELETE FROM events").is_none());
    }

    #[test]
    fn arrow_types_map_to_postgres_types() {
        assert_eq!(pg_type(&DataType::Int64).0, Type::INT8);
        assert_eq!(pg_type(&DataType::UInt8).0, Type::INT2);
        assert_eq!(pg_type(&DataType::Utf8View).0, Type::TEXT);
        assert_eq!(
            pg_type(&DataType::Timestamp(
                TimeUnit::Millisecond,
                Some("UTC".into())
            ))
            .0,
            Type::TIMESTAMPTZ
        );
        assert_eq!(pg_type(&DataType::Decimal128(10, 2)).0, Type::FLOAT8);
    }
}
