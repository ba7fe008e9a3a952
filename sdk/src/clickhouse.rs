//! ClickHouse helpers over the host's ClickHouse capability.

use crate::{CapabilityError, Host, WasmHost};

/// Inserts JSON objects as rows of `database.table` (one `JSONEachRow` request) through the
/// real host.
pub fn insert_json_rows(
    database: &str,
    table: &str,
    rows: &[serde_json::Value],
) -> Result<(), CapabilityError> {
    insert_json_rows_on(&WasmHost, database, table, rows)
}

/// [`insert_json_rows`] on any [`Host`].
pub fn insert_json_rows_on(
    host: &(impl Host + ?Sized),
    database: &str,
    table: &str,
    rows: &[serde_json::Value],
) -> Result<(), CapabilityError> {
    let rows: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    host.clickhouse_insert_json_rows(database, table, &rows)
}

/// Runs a statement (DDL or a query) through the real host; returns the response body.
pub fn execute(sql: &str) -> Result<String, CapabilityError> {
    WasmHost.clickhouse_execute(sql)
}

/// Quotes an identifier for ClickHouse SQL with back-quotes.
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn quotes() {
        assert_eq!(super::quote_ident("events"), "`events`");
        assert_eq!(super::quote_ident("a`b"), "`a\\`b`");
    }
}
