//! `fanout plugin check FILE --config CONFIG [--plugin NAME]` against the stack: the plugin is
//! loaded as `fanout run` would load it (entry's config, grants, limits, services), `init`
//! runs, and grant mistakes visible before any batch fail the check (exit code 1) with a
//! message naming the problem; a correct config passes (exit code 0).

use std::path::{Path, PathBuf};
use std::process::Command;

use fanout_tests::*;

/// `[kafka]` and `[services]` of the stack, the host connecting to ClickHouse as `ch`.
fn services(stack: &Stack, ch: &ClickHouseUser, extra: &str) -> String {
    format!(
        "[kafka]\nbrokers = \"{}\"\n[services]\nredis_url = \"{}\"\nclickhouse_url = \"{}\"\n{}{extra}\n",
        stack.kafka_brokers,
        stack.redis_url,
        stack.clickhouse_url,
        ch.services_toml()
    )
}

/// Runs the check of `wasm` (a plugins/dist name) with `config` (written to a file of its own);
/// returns the exit code and the report (stdout).
fn check(config: &str, wasm: &str, plugin: Option<&str>) -> (i32, String) {
    let dir = repo_root().join("target/test-logs");
    let _ = std::fs::create_dir_all(&dir);
    let path: PathBuf = dir.join(format!("{}.toml", unique("plugin-check")));
    std::fs::write(&path, config).expect("write config");
    let mut cmd = Command::new(host_binary());
    cmd.arg("plugin")
        .arg("check")
        .arg(plugin_wasm(wasm))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn");
    if let Some(name) = plugin {
        cmd.arg("--plugin").arg(name);
    }
    let out = cmd.output().expect("run fanout plugin check");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "--- fanout plugin check {wasm} ({}):\n{report}\n--- stderr:\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), report)
}

fn assert_fails(code: i32, report: &str, needles: &[&str]) {
    assert_eq!(code, 1, "the check must fail:\n{report}");
    assert!(report.contains("result: FAILED"), "{report}");
    for n in needles {
        assert!(report.contains(n), "the report must say `{n}`:\n{report}");
    }
}

fn assert_passes(code: i32, report: &str) {
    assert_eq!(code, 0, "the check must pass:\n{report}");
    assert!(report.contains("result: ok"), "{report}");
    assert!(!report.contains("\nerror "), "{report}");
}

/// The ACL user the host (and the check) makes for entry `plugin` of `config`, from its grant.
fn host_made_user(config: &str, plugin: &str) -> String {
    let config =
        fanout::config::Config::from_toml(config, Path::new("check.toml"), std::iter::empty())
            .expect("config");
    let entry = config
        .plugins
        .iter()
        .find(|p| p.name == plugin)
        .expect("entry");
    let grant = entry.grants.redis.as_ref().expect("redis grant");
    fanout::plugin::grants::redis_acl_user(plugin, &fanout::plugin::grants::redis_acl_rules(grant))
}

/// Redis ACL users a test made or had the check make: deleted when the test ends, passed or not.
struct AclUsers {
    redis_url: String,
    users: Vec<String>,
}

impl AclUsers {
    fn new(stack: &Stack) -> AclUsers {
        AclUsers {
            redis_url: stack.redis_url.clone(),
            users: vec![],
        }
    }

    fn add(&mut self, user: &str) {
        self.users.push(user.to_string());
    }
}

impl Drop for AclUsers {
    fn drop(&mut self) {
        if self.users.is_empty() {
            return;
        }
        if let Ok(mut conn) = redis::Client::open(self.redis_url.as_str())
            .and_then(|c| c.get_connection_with_timeout(std::time::Duration::from_secs(5)))
        {
            let _ = redis::cmd("ACL")
                .arg("DELUSER")
                .arg(&self.users)
                .query::<i64>(&mut conn);
        }
    }
}

async fn redis_admin(stack: &Stack, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let mut conn = redis(stack).await;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_default_plugins_wired_as_in_local_toml_pass() {
    let Some(stack) = Stack::get() else { return };
    let prefix = format!("{}:", unique("check"));
    let ns = unique("check");
    let config = format!(
        "{}{}",
        services(&stack, &stack.clickhouse_host, ""),
        plugin_toml::defaults(&stack, "engagement", &prefix, &ns, "per-event")
    );
    // Each entry found by its path.
    let (code, report) = check(&config, "redis_topn", None);
    assert_passes(code, &report);
    let user = host_made_user(&config, "redis-topn");
    let mut users = AclUsers::new(&stack);
    users.add(&user);
    for said in [
        "plugin `redis-topn`: entry 2 of 3",
        "redis       yes",
        "`init` accepted the config",
        &format!("set up the plugin's ACL user `{user}`"),
        &format!("Redis lets `{user}` run all"),
        &format!("Redis refuses `{user}` keys outside the granted prefixes"),
    ] {
        assert!(report.contains(said), "`{said}`:\n{report}");
    }
    let (code, report) = check(&config, "clickhouse", None);
    assert_passes(code, &report);
    for said in [
        "clickhouse.execute `CREATE DATABASE IF NOT EXISTS `engagement``",
        "granted database `engagement` exists and the host's user `fanout` can use it",
    ] {
        assert!(report.contains(said), "`{said}`:\n{report}");
    }
    let (code, report) = check(&config, "external_api", None);
    assert_passes(code, &report);
    assert!(report.contains("is inside the grant"), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_prefix_that_misses_the_plugins_keys_fails() {
    let Some(stack) = Stack::get() else { return };
    let prefix = format!("{}:", unique("check"));
    // redis-topn's markers live under `seen_key_prefix`; the grant forgot that prefix.
    let config = format!(
        r#"{}
[[plugins]]
name = "topn"
path = "{}"
[plugins.grants]
redis = {{ key_prefixes = ["{prefix}content:", "{prefix}top:content:"], allow_scripts = true }}
[plugins.config]
key_prefix = "{prefix}"
seen_key_prefix = "fanout:seen:"
"#,
        services(&stack, &stack.clickhouse_host, ""),
        plugin_wasm("redis_topn").display()
    );
    let mut users = AclUsers::new(&stack);
    users.add(&host_made_user(&config, "topn"));
    let (code, report) = check(&config, "redis_topn", None);
    assert_fails(
        code,
        &report,
        &[
            "error    redis: config `seen_key_prefix`",
            &format!(
                "keys starting with `{prefix}fanout:seen:` are outside the granted key prefixes"
            ),
        ],
    );
    // A testkit recording into a list its grant does not cover.
    let config = format!(
        r#"{}
[[plugins]]
name = "rec"
path = "{}"
[plugins.grants]
redis = {{ key_prefix = "{prefix}" }}
[plugins.config]
key = "elsewhere:received"
"#,
        services(&stack, &stack.clickhouse_host, ""),
        plugin_wasm("testkit").display()
    );
    let (code, report) = check(&config, "testkit", Some("rec"));
    assert_fails(code, &report, &["config `key` = \"elsewhere:received\""]);
    users.add(&host_made_user(&config, "rec"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_grant_for_a_capability_init_uses_fails() {
    let Some(stack) = Stack::get() else { return };
    // clickhouse.wasm creates its table in `init`: without a clickhouse grant that is refused.
    let config = format!(
        r#"{}
[[plugins]]
name = "ch"
path = "{}"
[plugins.config]
database = "engagement"
"#,
        services(&stack, &stack.clickhouse_host, ""),
        plugin_wasm("clickhouse").display()
    );
    let (code, report) = check(&config, "clickhouse", None);
    assert_fails(
        code,
        &report,
        &[
            "warning  imports: the component imports `clickhouse` but the entry has no `grants.clickhouse`",
            "error    init: clickhouse.execute `CREATE DATABASE IF NOT EXISTS `engagement`` was refused: not-granted",
            "error    init: init failed: clickhouse capability not granted",
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn granted_clickhouse_databases_must_exist_and_be_the_host_users() {
    let Some(stack) = Stack::get() else { return };
    let entry = |dbs: &str| {
        format!(
            r#"
[[plugins]]
name = "ch"
path = "{}"
[plugins.grants]
clickhouse = {{ databases = [{dbs}] }}
[plugins.config]
database = "engagement"
"#,
            plugin_wasm("clickhouse").display()
        )
    };
    // The stack's host user may use `engagement` and `fanout_sandbox`, not `default`.
    let config = format!(
        "{}{}",
        services(&stack, &stack.clickhouse_host, ""),
        entry("\"engagement\", \"default\"")
    );
    let (code, report) = check(&config, "clickhouse", None);
    assert_fails(
        code,
        &report,
        &["granted database `default` is not accessible by the host's ClickHouse user `fanout`"],
    );
    assert!(
        report.contains("ok       clickhouse: granted database `engagement` exists"),
        "{report}"
    );
    // As the admin every database is accessible; one that does not exist is named.
    let missing = unique("nodb");
    let config = format!(
        "{}{}",
        services(&stack, &stack.clickhouse_admin, ""),
        entry(&format!("\"engagement\", \"{missing}\""))
    );
    let (code, report) = check(&config, "clickhouse", None);
    assert_fails(
        code,
        &report,
        &[&format!("granted database `{missing}` does not exist")],
    );
    // A database in the plugin's config that the grant lacks.
    let config = format!(
        "{}{}",
        services(&stack, &stack.clickhouse_host, ""),
        entry("\"fanout_sandbox\"")
    );
    let (code, report) = check(&config, "clickhouse", None);
    assert_fails(
        code,
        &report,
        &["config `database` = \"engagement\" is not a granted database"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_acl_users_that_cannot_do_what_the_grant_allows_fail() {
    let Some(stack) = Stack::get() else { return };
    let prefix = format!("{}:", unique("check"));
    let user = unique("fanout-check-user");
    let admin = unique("fanout-check-admin");
    let mut users = AclUsers::new(&stack);
    users.add(&user);
    users.add(&admin);
    // The operator's user may only GET and RPUSH under the prefix.
    redis_admin(
        &stack,
        &[
            "ACL",
            "SETUSER",
            &user,
            "on",
            ">pw-1",
            "resetkeys",
            "-@all",
            "+get",
            "+rpush",
            &format!("~{prefix}*"),
        ],
    )
    .await
    .expect("ACL SETUSER");
    let entry = |grant: &str| {
        format!(
            r#"
[[plugins]]
name = "rec"
path = "{}"
[plugins.grants]
redis = {{ key_prefix = "{prefix}", user = "{user}", {grant} }}
[plugins.config]
key = "{prefix}received"
"#,
            plugin_wasm("testkit").display()
        )
    };
    let provided = "redis_users = \"provided\"\n";
    // Every data command by default: Redis refuses most of them to this user.
    let config = format!(
        "{}{}",
        services(&stack, &stack.clickhouse_host, provided),
        entry("password = \"pw-1\"")
    );
    let (code, report) = check(&config, "testkit", None);
    assert_fails(
        code,
        &report,
        &[
            &format!("Redis refuses ACL user `{user}`"),
            " DEL ",
            "no permissions to run",
        ],
    );
    // Narrowed to what the user may do: passes.
    let config = format!(
        "{}{}",
        services(&stack, &stack.clickhouse_host, provided),
        entry("password = \"pw-1\", commands = [\"get\", \"rpush\"]")
    );
    let (code, report) = check(&config, "testkit", None);
    assert_passes(code, &report);
    assert!(
        report.contains(&format!("logged in as the grant's ACL user `{user}`")),
        "{report}"
    );
    // A wrong password.
    let config = format!(
        "{}{}",
        services(&stack, &stack.clickhouse_host, provided),
        entry("password = \"wrong\", commands = [\"get\", \"rpush\"]")
    );
    let (code, report) = check(&config, "testkit", None);
    assert_fails(
        code,
        &report,
        &[&format!("cannot log in as the grant's ACL user `{user}`")],
    );

    // Host-made users: an admin connection that may not run ACL SETUSER cannot make them.
    redis_admin(
        &stack,
        &[
            "ACL",
            "SETUSER",
            &admin,
            "on",
            ">pw-2",
            "~*",
            "&*",
            "+@all",
            "-acl",
            "+acl|whoami",
        ],
    )
    .await
    .expect("ACL SETUSER admin");
    let limited_url = stack
        .redis_url
        .replacen("redis://", &format!("redis://{admin}:pw-2@"), 1);
    let config = format!(
        "[kafka]\nbrokers = \"{}\"\n[services]\nredis_url = \"{limited_url}\"\n\n[[plugins]]\nname = \"rec\"\npath = \"{}\"\n[plugins.grants]\nredis = {{ key_prefix = \"{prefix}\" }}\n[plugins.config]\nkey = \"{prefix}received\"\n",
        stack.kafka_brokers,
        plugin_wasm("testkit").display()
    );
    let (code, report) = check(&config, "testkit", None);
    assert_fails(
        code,
        &report,
        &[&format!(
            "the admin user `{admin}` cannot set up the plugin's ACL user"
        )],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http_prefixes_that_do_not_parse_and_configs_init_rejects_fail() {
    let Some(stack) = Stack::get() else { return };
    let url = stack.external_api_url.trim_end_matches('/');
    let host_port = url.trim_start_matches("http://");
    let config = format!(
        r#"{}
[[plugins]]
name = "api"
path = "{}"
[plugins.grants]
http = {{ url_prefixes = ["{host_port}/"] }}
[plugins.config]
url = "{url}/events"
"#,
        services(&stack, &stack.clickhouse_host, ""),
        plugin_wasm("external_api").display()
    );
    let (code, report) = check(&config, "external_api", None);
    assert_fails(
        code,
        &report,
        &[
            &format!("grants.http.url_prefixes[0] \"{host_port}/\": does not parse as a URL"),
            "config `url`",
        ],
    );
    // A config `init` refuses.
    let config = format!(
        "{}\n[[plugins]]\nname = \"t\"\npath = \"{}\"\n[plugins.config]\nlabel = 5\n",
        services(&stack, &stack.clickhouse_host, ""),
        plugin_wasm("template").display()
    );
    let (code, report) = check(&config, "template", None);
    assert_fails(
        code,
        &report,
        // The SDK parses the config before `init`, naming the field.
        &["init failed: config: label: invalid type: integer `5`, expected a string"],
    );
    // An entry that is not there.
    let (code, report) = check(&config, "template", Some("nope"));
    assert_fails(code, &report, &["no plugin named `nope` (known: t)"]);
}
