//! Read-only SQL over the lake with DataFusion.
//!
//! A [`Catalog`] registers one provider per table. Each provider is the Delta table's own scan
//! unioned with batches that are durable in the write-ahead log but not yet committed to Delta
//! ([`BufferedTable`]), so a query sees every acknowledged event, not only flushed ones.
//!
//! Statements are checked twice before they run: the parsed AST must be a query, `EXPLAIN` of
//! one, or a `SHOW`; and DataFusion plans with DDL, DML and statements disabled. No table
//! functions that read files and no URL tables are registered, so SQL cannot reach any file
//! outside the registered tables.

use std::sync::Arc;

use deltalake::arrow::array::{Array, RecordBatch};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::{DataType, SchemaRef};
use deltalake::arrow::util::display::{ArrayFormatter, FormatOptions};
use deltalake::datafusion::catalog::{Session, TableProvider};
use deltalake::datafusion::common::Result as DfResult;
use deltalake::datafusion::datasource::memory::MemorySourceConfig;
use deltalake::datafusion::datasource::TableType;
use deltalake::datafusion::execution::context::{SQLOptions, SessionConfig, SessionContext};
use deltalake::datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use deltalake::datafusion::physical_plan::empty::EmptyExec;
use deltalake::datafusion::physical_plan::union::UnionExec;
use deltalake::datafusion::physical_plan::ExecutionPlan;
use deltalake::datafusion::sql::parser::{DFParser, Statement as DfStatement};
use deltalake::datafusion::sql::sqlparser::ast::Statement;
use serde_json::Value;

use deltalake::DeltaTable;

use crate::{Error, RawTable, Result};

/// A table provider: the Delta scan (if the table exists) ∪ in-memory batches.
#[derive(Debug)]
pub struct BufferedTable {
    schema: SchemaRef,
    base: Option<Arc<dyn TableProvider>>,
    buffered: Vec<RecordBatch>,
}

impl BufferedTable {
    /// `buffered` batches are cast to the base table's schema when they differ.
    pub fn try_new(
        schema: SchemaRef,
        base: Option<Arc<dyn TableProvider>>,
        buffered: Vec<RecordBatch>,
    ) -> Result<Self> {
        let schema = base.as_ref().map_or(schema, |b| b.schema());
        let buffered = buffered
            .into_iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| conform(&b, &schema))
            .collect::<Result<Vec<_>>>()?;
        Ok(BufferedTable {
            schema,
            base,
            buffered,
        })
    }
}

/// Casts `batch` column by column (matched by name) to `schema` (DataFusion may hand out
/// view types where a table stores plain strings).
pub fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch.clone());
    }
    let cols = schema
        .fields()
        .iter()
        .map(|f| {
            let c = batch
                .column_by_name(f.name())
                .ok_or_else(|| Error::ReadOnly(format!("column {} missing", f.name())))?;
            Ok(cast(c, f.data_type())?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

#[async_trait::async_trait]
impl TableProvider for BufferedTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // The Delta scan prunes with them; DataFusion re-applies them above the union.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let mut inputs: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
        if let Some(base) = &self.base {
            inputs.push(base.scan(state, projection, filters, limit).await?);
        }
        if !self.buffered.is_empty() {
            inputs.push(MemorySourceConfig::try_new_exec(
                std::slice::from_ref(&self.buffered),
                self.schema.clone(),
                projection.cloned(),
            )?);
        }
        if inputs.is_empty() {
            let schema = match projection {
                Some(p) => Arc::new(self.schema.project(p)?),
                None => self.schema.clone(),
            };
            return Ok(Arc::new(EmptyExec::new(schema)));
        }
        UnionExec::try_new(inputs)
    }
}

/// Tables registered for one query.
pub struct Catalog {
    ctx: SessionContext,
}

/// A query result: column names and rows of JSON values.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct JsonResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
    /// True when rows were cut at the row limit.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

impl Catalog {
    /// A catalog over the given raw table versions plus their not-yet-committed batches.
    pub async fn new(
        tables: Vec<(RawTable, Option<DeltaTable>, Vec<RecordBatch>)>,
    ) -> Result<Self> {
        Self::with_derived(tables, Vec::new()).await
    }

    /// As [`Catalog::new`], plus derived (warehouse) tables by name.
    pub async fn with_derived(
        tables: Vec<(RawTable, Option<DeltaTable>, Vec<RecordBatch>)>,
        derived: Vec<(String, DeltaTable)>,
    ) -> Result<Self> {
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_target_partitions(2);
        let ctx = SessionContext::new_with_config(config);
        for (t, table, buffered) in tables {
            let base = match table {
                Some(table) => {
                    table.update_datafusion_session(&ctx.state())?;
                    Some(table.table_provider().await?)
                }
                None => None,
            };
            let provider = BufferedTable::try_new(t.schema(), base, buffered)?;
            ctx.register_table(t.name(), Arc::new(provider))?;
        }
        for (name, table) in derived {
            table.update_datafusion_session(&ctx.state())?;
            ctx.register_table(name.as_str(), table.table_provider().await?)?;
        }
        Ok(Catalog { ctx })
    }

    /// The DataFusion context (the warehouse registers intermediate results in it).
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Runs one read-only statement.
    pub async fn query(&self, sql: &str) -> Result<Vec<RecordBatch>> {
        Ok(self.query_with_schema(sql).await?.1)
    }

    /// Runs one read-only statement; also returns the result schema (known even for 0 rows).
    pub async fn query_with_schema(&self, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let df = self.plan(sql).await?;
        let schema = Arc::new(df.schema().as_arrow().clone());
        Ok((schema, df.collect().await?))
    }

    /// Plans one read-only statement without running it (the Postgres wire protocol describes
    /// a statement's columns before executing it, and streams its rows).
    pub async fn plan(&self, sql: &str) -> Result<deltalake::datafusion::dataframe::DataFrame> {
        check_read_only(sql)?;
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        Ok(self.ctx.sql_with_options(sql, options).await?)
    }

    /// Runs one read-only statement and renders at most `max_rows` rows as JSON.
    pub async fn query_json(&self, sql: &str, max_rows: usize) -> Result<JsonResult> {
        let (schema, batches) = self.query_with_schema(sql).await?;
        let mut r = to_json(&batches, max_rows)?;
        r.columns = schema.fields().iter().map(|f| f.name().clone()).collect();
        Ok(r)
    }
}

/// Accepts only `SELECT`/`WITH`/`VALUES` queries, `EXPLAIN` of those, and `SHOW`.
pub fn check_read_only(sql: &str) -> Result<()> {
    // A syntax error is a query error (SQLSTATE 42601 over the Postgres protocol), not a write.
    let statements = DFParser::parse_sql(sql)?;
    if statements.len() != 1 {
        return Err(Error::ReadOnly(format!(
            "send exactly one statement (got {})",
            statements.len()
        )));
    }
    fn allowed(s: &DfStatement) -> bool {
        match s {
            DfStatement::Statement(s) => allowed_sql(s),
            DfStatement::Explain(e) => allowed(&e.statement),
            _ => false,
        }
    }
    fn allowed_sql(s: &Statement) -> bool {
        match s {
            Statement::Query(_)
            | Statement::ShowTables { .. }
            | Statement::ShowColumns { .. }
            | Statement::ShowVariable { .. } => true,
            Statement::Explain { statement, .. } => allowed_sql(statement),
            _ => false,
        }
    }
    if allowed(&statements[0]) {
        Ok(())
    } else {
        Err(Error::ReadOnly(
            "only read-only statements are allowed: SELECT, WITH, VALUES, EXPLAIN and SHOW".into(),
        ))
    }
}

/// Renders batches as JSON rows: numbers as numbers, everything else as its display string.
pub fn to_json(batches: &[RecordBatch], max_rows: usize) -> Result<JsonResult> {
    let columns = batches
        .first()
        .map(|b| {
            b.schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect()
        })
        .unwrap_or_default();
    let mut rows = Vec::new();
    let mut truncated = false;
    let opts = FormatOptions::default();
    'outer: for b in batches {
        let formatters = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts))
            .collect::<Result<Vec<_>, _>>()?;
        for r in 0..b.num_rows() {
            if rows.len() >= max_rows {
                truncated = true;
                break 'outer;
            }
            let row = b
                .columns()
                .iter()
                .zip(&formatters)
                .map(|(c, f)| cell(c.as_ref(), f, r))
                .collect();
            rows.push(row);
        }
    }
    Ok(JsonResult {
        columns,
        rows,
        truncated,
    })
}

fn cell(col: &dyn Array, f: &ArrayFormatter<'_>, row: usize) -> Value {
    use deltalake::arrow::array::AsArray;
    use deltalake::arrow::datatypes as t;
    if col.is_null(row) {
        return Value::Null;
    }
    match col.data_type() {
        DataType::Boolean => Value::Bool(col.as_boolean().value(row)),
        DataType::Int8 => col.as_primitive::<t::Int8Type>().value(row).into(),
        DataType::Int16 => col.as_primitive::<t::Int16Type>().value(row).into(),
        DataType::Int32 => col.as_primitive::<t::Int32Type>().value(row).into(),
        DataType::Int64 => col.as_primitive::<t::Int64Type>().value(row).into(),
        DataType::UInt8 => col.as_primitive::<t::UInt8Type>().value(row).into(),
        DataType::UInt16 => col.as_primitive::<t::UInt16Type>().value(row).into(),
        DataType::UInt32 => col.as_primitive::<t::UInt32Type>().value(row).into(),
        DataType::UInt64 => col.as_primitive::<t::UInt64Type>().value(row).into(),
        DataType::Float32 => float(col.as_primitive::<t::Float32Type>().value(row) as f64),
        DataType::Float64 => float(col.as_primitive::<t::Float64Type>().value(row)),
        DataType::Decimal128(_, _) => f
            .value(row)
            .to_string()
            .parse::<f64>()
            .map_or(Value::Null, float),
        DataType::Timestamp(_, _) => {
            // RFC 3339 with a `Z`, as the event contract accepts it.
            let s = f.value(row).to_string();
            Value::String(s.replace("+00:00", "Z"))
        }
        _ => Value::String(f.value(row).to_string()),
    }
}

fn float(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_gate() {
        for ok in [
            "SELECT 1",
            "select count(*) from events",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "EXPLAIN SELECT 1",
            "SHOW TABLES",
            "SHOW COLUMNS FROM events",
        ] {
            assert!(check_read_only(ok).is_ok(), "{ok}");
        }
        for bad in [
            "INSERT INTO events VALUES (1)",
            "DELETE FROM events",
            "DROP TABLE events",
            "CREATE TABLE x AS SELECT 1",
            "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'",
            "COPY events TO '/tmp/x.parquet'",
            "EXPLAIN COPY events TO '/tmp/x'",
            "SET datafusion.execution.batch_size = 1",
            "SELECT 1; DROP TABLE events",
            "UPDATE events SET user_id = 1",
        ] {
            assert!(check_read_only(bad).is_err(), "{bad}");
        }
    }
}
