use super::*;
use fanout_sdk::testing::{batch, event, Call, MockHost};

fn sink() -> ClickHouseSink {
    ClickHouseSink::new(Config::from_json(serde_json::json!({})).unwrap())
}

#[test]
fn config_defaults_and_validation() {
    let c = Config::from_json(serde_json::json!({})).unwrap();
    assert_eq!(c.qualified(), "`engagement`.`events_enriched`");
    assert!(Config::from_json(serde_json::json!({"table": "x; DROP TABLE y"})).is_err());
    assert!(Config::from_json(serde_json::json!({"tabel": "x"})).is_err());
    let c = Config::from_json(serde_json::json!({"database": "e2e_1", "table": "t"})).unwrap();
    assert_eq!(c.qualified(), "`e2e_1`.`t`");
}

#[test]
fn ddl_is_replacing_merge_tree_with_nullable_columns() {
    let ddl = Config::default().ddl();
    assert_eq!(ddl[0], "CREATE DATABASE IF NOT EXISTS `engagement`");
    assert!(ddl[1].starts_with("CREATE TABLE IF NOT EXISTS `engagement`.`events_enriched` ("));
    assert!(ddl[1].contains("event_id Int64,"));
    assert!(ddl[1].contains("event_ts DateTime('UTC'),"));
    assert!(ddl[1].contains("engagement_pct Nullable(Float64)\n"));
    assert!(ddl[1].ends_with(
        "ENGINE = ReplacingMergeTree() ORDER BY event_id PARTITION BY toYYYYMM(event_ts)"
    ));
}

#[test]
fn dedups_within_batch_keeping_last_copy() {
    let mut late = event(1, Some(9), 0);
    late.device = Some("ios".into());
    let b = batch(vec![event(1, Some(1), 0), event(2, None, 0), late]);
    let d = dedup_by_event_id(&b.events);
    assert_eq!(d.len(), 2);
    assert_eq!(d[0].device(), Some("ios"));
    assert_eq!(d[1].event_id(), 2);
}

#[test]
fn first_batch_creates_schema_then_skips_existing_and_inserts_once() {
    let host = MockHost::new();
    host.push_clickhouse_execute(Ok(String::new())); // CREATE DATABASE
    host.push_clickhouse_execute(Ok(String::new())); // CREATE TABLE
    host.push_clickhouse_execute(Ok("2\n".into())); // lookup: 2 exists
    let mut s = sink();
    let b = batch(vec![
        event(1, Some(1), 0),
        event(2, Some(1), 0),
        event(3, None, 0),
    ]);
    assert!(matches!(s.write_with(&host, &b), WriteOutcome::Accepted));
    let calls = host.service_calls();
    assert_eq!(calls.len(), 4);
    assert_eq!(
        calls[2],
        Call::ClickhouseExecute(
            "SELECT DISTINCT event_id FROM `engagement`.`events_enriched` WHERE event_id IN (1,2,3) FORMAT TabSeparated".into()
        )
    );
    match &calls[3] {
        Call::ClickhouseInsert {
            database,
            table,
            rows,
        } => {
            assert_eq!(
                (database.as_str(), table.as_str()),
                ("engagement", "events_enriched")
            );
            assert_eq!(rows.len(), 2);
            assert!(rows[0].starts_with(r#"{"event_id":1,"#));
            assert!(rows[1].starts_with(r#"{"event_id":3,"content_id":null,"#));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(host.counter("rows_inserted"), 2);
    assert_eq!(host.counter("rows_skipped_duplicate"), 1);

    // Second batch: no DDL again; everything exists: no insert at all.
    let host = MockHost::new();
    host.push_clickhouse_execute(Ok("1\n2\n3\n".into()));
    assert!(matches!(s.write_with(&host, &b), WriteOutcome::Accepted));
    assert_eq!(host.service_calls().len(), 1);
}

#[test]
fn failures_are_retry_later() {
    let mut s = sink();
    let host = MockHost::new();
    host.push_clickhouse_execute(Err(CapabilityError::Failed("connection refused".into())));
    let b = batch(vec![event(1, Some(1), 0)]);
    match s.write_with(&host, &b) {
        WriteOutcome::RetryLater(r) => assert!(r.contains("connection refused"), "{r}"),
        other => panic!("{other:?}"),
    }
    let host = MockHost::new();
    host.push_clickhouse_insert(Err(CapabilityError::Failed("Code: 241".into())));
    match s.write_with(&host, &b) {
        WriteOutcome::RetryLater(r) => assert!(r.contains("Code: 241"), "{r}"),
        other => panic!("{other:?}"),
    }
    let host = MockHost::new();
    host.push_clickhouse_execute(Ok(String::new())); // CREATE DATABASE (again after a failure)
    host.push_clickhouse_execute(Ok(String::new())); // CREATE TABLE
    host.push_clickhouse_execute(Ok("garbage\n".into()));
    assert!(matches!(
        s.write_with(&host, &b),
        WriteOutcome::RetryLater(_)
    ));
}

#[test]
fn the_retry_after_a_failure_creates_the_table_again() {
    let mut s = sink();
    let b = batch(vec![event(1, Some(1), 0)]);
    assert!(matches!(
        s.write_with(&MockHost::new(), &b),
        WriteOutcome::Accepted
    ));
    // The table was dropped under the running instance: the lookup fails.
    let host = MockHost::new();
    host.push_clickhouse_execute(Err(CapabilityError::Failed(
        "Code: 60, Table doesn't exist".into(),
    )));
    assert!(matches!(
        s.write_with(&host, &b),
        WriteOutcome::RetryLater(_)
    ));
    assert_eq!(
        host.service_calls().len(),
        1,
        "no DDL while the schema was believed ready"
    );
    // The retry runs the DDL first, then looks up and inserts.
    let host = MockHost::new();
    assert!(matches!(s.write_with(&host, &b), WriteOutcome::Accepted));
    let calls = host.service_calls();
    assert!(
        matches!(&calls[0], Call::ClickhouseExecute(sql) if sql.starts_with("CREATE DATABASE")),
        "{calls:?}"
    );
    assert!(
        matches!(&calls[1], Call::ClickhouseExecute(sql) if sql.starts_with("CREATE TABLE")),
        "{calls:?}"
    );
    assert!(
        matches!(calls.last(), Some(Call::ClickhouseInsert { .. })),
        "{calls:?}"
    );
}

#[test]
fn parses_lookup_answers() {
    assert_eq!(parse_ids("").unwrap(), HashSet::new());
    assert_eq!(parse_ids("5\n7\n").unwrap(), HashSet::from([5, 7]));
    assert!(parse_ids("x").is_err());
}
