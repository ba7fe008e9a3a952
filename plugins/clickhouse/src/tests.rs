use super::*;
use fanout_sdk::testing::{batch, event, Call, MockHost};

/// The config of `json` as the host passes it, through `init`'s checks.
fn config(json: serde_json::Value) -> Result<Config, String> {
    fanout_sdk::config::parse::<Config>(&json.to_string())?.validated()
}

/// A sink whose schema is not created yet (as after an `init` that found ClickHouse down).
fn sink() -> ClickHouseSink {
    ClickHouseSink::new(config(serde_json::json!({})).unwrap())
}

#[test]
fn config_defaults_and_validation() {
    let c = config(serde_json::json!({})).unwrap();
    assert_eq!(c.qualified(), "`engagement`.`events_enriched`");
    assert!(config(serde_json::json!({"table": "x; DROP TABLE y"})).is_err());
    let e = config(serde_json::json!({"tabel": "x"})).unwrap_err();
    assert!(e.contains("unknown field `tabel`"), "{e}");
    let e = config(serde_json::json!({"lookup_chunk": -1})).unwrap_err();
    assert!(e.starts_with("config: lookup_chunk: invalid value"), "{e}");
    let c = config(serde_json::json!({"database": "e2e_1", "table": "t"})).unwrap();
    assert_eq!(c.qualified(), "`e2e_1`.`t`");
}

#[test]
fn init_creates_the_schema_refuses_without_a_grant_and_waits_for_a_service_that_is_down() {
    let host = MockHost::new();
    let mut s = ClickHouseSink::init(Config::default(), &host).unwrap();
    let ddl: Vec<_> = host.service_calls();
    assert_eq!(ddl.len(), 2, "{ddl:?}");
    assert!(matches!(&ddl[1], Call::ClickhouseExecute(sql) if sql.starts_with("CREATE TABLE")));
    // The first batch runs no DDL again.
    let host = MockHost::new();
    assert_eq!(
        s.write(&host, &batch(vec![event(1, None, 0)])),
        WriteOutcome::Accepted
    );
    assert!(
        !matches!(&host.service_calls()[0], Call::ClickhouseExecute(sql) if sql.starts_with("CREATE"))
    );

    let host = MockHost::new();
    host.push_clickhouse_execute(Err(CapabilityError::NotGranted(
        "database engagement".into(),
    )));
    assert!(ClickHouseSink::init(Config::default(), &host)
        .err()
        .is_some_and(|e| e.contains("not granted")));

    let host = MockHost::new();
    host.push_clickhouse_execute(Err(CapabilityError::Failed("connection refused".into())));
    let mut s = ClickHouseSink::init(Config::default(), &host).unwrap();
    let host = MockHost::new();
    assert_eq!(
        s.write(&host, &batch(vec![event(1, None, 0)])),
        WriteOutcome::Accepted
    );
    assert!(
        matches!(&host.service_calls()[0], Call::ClickhouseExecute(sql) if sql.starts_with("CREATE DATABASE"))
    );
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
    let d = b.events.unique_by_event_id();
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
    assert!(matches!(s.write(&host, &b), WriteOutcome::Accepted));
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
    assert!(matches!(s.write(&host, &b), WriteOutcome::Accepted));
    assert_eq!(host.service_calls().len(), 1);
}

#[test]
fn failures_are_retry_later() {
    let mut s = sink();
    let host = MockHost::new();
    host.push_clickhouse_execute(Err(CapabilityError::Failed("connection refused".into())));
    let b = batch(vec![event(1, Some(1), 0)]);
    match s.write(&host, &b) {
        WriteOutcome::RetryLater(r) => assert!(r.contains("connection refused"), "{r}"),
        other => panic!("{other:?}"),
    }
    let host = MockHost::new();
    host.push_clickhouse_insert(Err(CapabilityError::Failed("Code: 241".into())));
    match s.write(&host, &b) {
        WriteOutcome::RetryLater(r) => assert!(r.contains("Code: 241"), "{r}"),
        other => panic!("{other:?}"),
    }
    let host = MockHost::new();
    host.push_clickhouse_execute(Ok(String::new())); // CREATE DATABASE (again after a failure)
    host.push_clickhouse_execute(Ok(String::new())); // CREATE TABLE
    host.push_clickhouse_execute(Ok("garbage\n".into()));
    assert!(matches!(s.write(&host, &b), WriteOutcome::RetryLater(_)));
}

#[test]
fn the_retry_after_a_failure_creates_the_table_again() {
    let mut s = sink();
    let b = batch(vec![event(1, Some(1), 0)]);
    assert!(matches!(
        s.write(&MockHost::new(), &b),
        WriteOutcome::Accepted
    ));
    // The table was dropped under the running instance: the lookup fails.
    let host = MockHost::new();
    host.push_clickhouse_execute(Err(CapabilityError::Failed(
        "Code: 60, Table doesn't exist".into(),
    )));
    assert!(matches!(s.write(&host, &b), WriteOutcome::RetryLater(_)));
    assert_eq!(
        host.service_calls().len(),
        1,
        "no DDL while the schema was believed ready"
    );
    // The retry runs the DDL first, then looks up and inserts.
    let host = MockHost::new();
    assert!(matches!(s.write(&host, &b), WriteOutcome::Accepted));
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
    assert_eq!(parse_ids("").unwrap(), FxHashSet::default());
    assert_eq!(parse_ids("5\n7\n").unwrap(), FxHashSet::from_iter([5, 7]));
    assert!(parse_ids("x").is_err());
}

#[test]
fn lookup_sql_lists_every_id() {
    let c = Config::default();
    assert_eq!(
        c.lookup_sql(&[i64::MIN, -1, 0, 42, i64::MAX]),
        format!(
            "SELECT DISTINCT event_id FROM `engagement`.`events_enriched` WHERE event_id IN \
             ({},-1,0,42,{}) FORMAT TabSeparated",
            i64::MIN,
            i64::MAX
        )
    );
    assert_eq!(
        c.lookup_sql(&[7]),
        "SELECT DISTINCT event_id FROM `engagement`.`events_enriched` WHERE event_id IN (7) \
         FORMAT TabSeparated"
    );
}
