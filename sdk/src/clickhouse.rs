//! ClickHouse helpers over the host's ClickHouse capability.

use crate::{CapabilityError, Host};

/// Inserts JSON objects as rows of `database.table` (one `JSONEachRow` request) through
/// `host` ([`Host::clickhouse_insert_json_rows`] takes rows already as text).
pub fn insert_json_rows(
    host: &(impl Host + ?Sized),
    database: &str,
    table: &str,
    rows: &[serde_json::Value],
) -> Result<(), CapabilityError> {
    let rows: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    host.clickhouse_insert_json_rows(database, table, &rows)
}

/// Inserts the rows whose key is not in `database.table` yet: the exactly-once primitive of
/// ClickHouse, deduplicating by a declared key column (`key_column`, an integer such as
/// `event_id`). Rows are `(key, JSON object text)`; a key repeated in `rows` is inserted once
/// (its last row). One `SELECT` of the keys already present, then one insert of the rest;
/// returns how many rows were inserted.
///
/// Two writers racing on the same keys can both insert: declare the table
/// `ReplacingMergeTree ORDER BY <key_column>` so such rows collapse, and query with `FINAL`
/// (or `argMax`) where an exact count matters, as the clickhouse plugin does.
pub fn insert_new_rows(
    host: &(impl Host + ?Sized),
    database: &str,
    table: &str,
    key_column: &str,
    rows: &[(i64, String)],
) -> Result<usize, CapabilityError> {
    let mut last: std::collections::HashMap<i64, usize> = std::collections::HashMap::new();
    for (i, (key, _)) in rows.iter().enumerate() {
        last.insert(*key, i);
    }
    if last.is_empty() {
        return Ok(0);
    }
    let mut keys: Vec<i64> = last.keys().copied().collect();
    keys.sort_unstable();
    let list = keys
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let sql = format!(
        "SELECT {col} FROM {db}.{t} WHERE {col} IN ({list}) FORMAT TabSeparated",
        col = quote_ident(key_column),
        db = quote_ident(database),
        t = quote_ident(table),
    );
    let present: std::collections::HashSet<i64> = host
        .clickhouse_execute(&sql)?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let new: Vec<String> = rows
        .iter()
        .enumerate()
        .filter(|(i, (key, _))| last.get(key) == Some(i) && !present.contains(key))
        .map(|(_, (_, row))| row.clone())
        .collect();
    if new.is_empty() {
        return Ok(0);
    }
    host.clickhouse_insert_json_rows(database, table, &new)?;
    Ok(new.len())
}

/// Quotes an identifier for ClickHouse SQL with back-quotes.
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Call, MockHost};

    #[test]
    fn only_keys_not_present_are_inserted_once() {
        let host = MockHost::new();
        // 2 is stored already; 3 comes twice in the batch (its last row wins).
        host.push_clickhouse_execute(Ok("2\n".into()));
        let rows = vec![
            (1, r#"{"event_id":1}"#.to_string()),
            (2, r#"{"event_id":2}"#.to_string()),
            (3, r#"{"event_id":3,"v":"old"}"#.to_string()),
            (3, r#"{"event_id":3,"v":"new"}"#.to_string()),
        ];
        assert_eq!(insert_new_rows(&host, "db", "t", "event_id", &rows), Ok(2));
        let calls = host.calls();
        assert_eq!(
            calls[0],
            Call::ClickhouseExecute(
                "SELECT `event_id` FROM `db`.`t` WHERE `event_id` IN (1,2,3) FORMAT TabSeparated"
                    .into()
            )
        );
        assert_eq!(
            calls[1],
            Call::ClickhouseInsert {
                database: "db".into(),
                table: "t".into(),
                rows: vec![
                    r#"{"event_id":1}"#.into(),
                    r#"{"event_id":3,"v":"new"}"#.into()
                ],
            }
        );
        // The replay: every key present, nothing inserted.
        host.push_clickhouse_execute(Ok("1\n2\n3\n".into()));
        assert_eq!(insert_new_rows(&host, "db", "t", "event_id", &rows), Ok(0));
        assert_eq!(host.calls().len(), 3);
    }

    #[test]
    fn quotes() {
        assert_eq!(quote_ident("events"), "`events`");
        assert_eq!(quote_ident("a`b"), "`a\\`b`");
    }
}
