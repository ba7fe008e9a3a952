//! `fanout plugin check FILE --config CONFIG [--plugin NAME]`: a plugin as `fanout run` would
//! start it, and the grant problems that can be seen before any batch.
//!
//! The config is read with the host's own loader (environment overrides included), one
//! `[[plugins]]` entry is picked (by name, by its path, or the only one), the component is
//! loaded with that entry's config, grants and sandbox limits on the services `run` connects
//! to, and `init` runs. Every capability call `init` makes is observed (a refused one is an
//! error even when `init` carries on). Then the grants are held against what can be known
//! without a batch:
//!
//! - what the component imports against what it is granted (an import without a grant is a
//!   warning, a grant never imported a note);
//! - Redis: the plugin's ACL user (made from the grant as the host does at the first call, or
//!   the operator's `user` under `redis_users = "provided"`) can run every command the grant
//!   allows on every granted prefix and nothing outside (`ACL DRYRUN`); the admin connection
//!   may `SCRIPT KILL` when scripts are allowed; config values naming Redis keys (`key`,
//!   `*_key`, `key_prefix`, `*_key_prefix`, `keys`, `*_keys`; a top-level `key_prefix` comes
//!   before the others) fall under the granted prefixes; Lua in the component or its config
//!   without `allow_scripts`;
//! - HTTP: every granted URL prefix parses and matches something, `https://` needs a host
//!   built with TLS, and URLs in the config fall under the grant;
//! - ClickHouse: every granted database is usable by plugins, exists (after `init`, which may
//!   create it) and is accessible by the host's ClickHouse user; databases named in the config
//!   (`database`, `db`, `*_database`) are granted.
//!
//! Errors make the command exit non-zero.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::Linker;
use wasmtime::StoreContextMut;

use super::bindings::fanout::sink::errors::CapabilityError;
use super::bindings::fanout::sink::{clickhouse, http, redis as wit_redis};
use super::capabilities::Services;
use super::{cache, clickhouse_sql, grants, Plugin, PluginState};
use crate::config::{
    ClickHouseGrant, Config, HttpGrant, PluginConfig, RedisGrant, RedisUsers, ServicesConfig,
};
use crate::metrics::Metrics;

/// What `fanout plugin check --config` was asked.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The component to check (in place of the entry's own `path`).
    pub file: PathBuf,
    /// The host config, read as `fanout run` reads it.
    pub config: PathBuf,
    /// The `[[plugins]]` entry by name; else the one whose path is `file`, else the only one.
    pub plugin: Option<String>,
}

/// How bad a finding is. Errors make the check fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Note,
    Warning,
    Error,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Ok => "ok",
            Level::Note => "note",
            Level::Warning => "warning",
            Level::Error => "error",
        })
    }
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Finding {
    pub level: Level,
    /// `config`, `component`, `imports`, `init`, `redis`, `http`, `clickhouse`.
    pub area: &'static str,
    pub message: String,
}

/// The whole answer: a header (what was checked) and the findings.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub header: Vec<String>,
    pub findings: Vec<Finding>,
}

impl Report {
    fn push(&mut self, level: Level, area: &'static str, message: impl Into<String>) {
        self.findings.push(Finding {
            level,
            area,
            message: message.into(),
        });
    }

    pub fn count(&self, level: Level) -> usize {
        self.findings.iter().filter(|f| f.level == level).count()
    }

    /// True when the plugin would not run as configured.
    pub fn has_errors(&self) -> bool {
        self.count(Level::Error) > 0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in &self.header {
            writeln!(f, "{line}")?;
        }
        if !self.header.is_empty() {
            writeln!(f)?;
        }
        for finding in &self.findings {
            let tag = format!("{}", finding.level);
            writeln!(f, "{tag:<8} {}: {}", finding.area, finding.message)?;
        }
        let (errors, warnings) = (self.count(Level::Error), self.count(Level::Warning));
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        if errors > 0 {
            write!(
                f,
                "\nresult: FAILED, {}, {}: `fanout run` would not run this plugin as configured",
                plural(errors, "error"),
                plural(warnings, "warning")
            )
        } else {
            write!(f, "\nresult: ok, {}", plural(warnings, "warning"))
        }
    }
}

/// The `package fanout:sink@X;` version of the WIT the host was built with: the version of the
/// capability interfaces in the host's linker.
const WIT: &str = include_str!("../../../wit/sink.wit");

fn wit_version() -> Option<&'static str> {
    WIT.lines().find_map(|l| {
        l.trim()
            .strip_prefix("package fanout:sink@")?
            .strip_suffix(';')
            .map(str::trim)
    })
}

/// Runs the whole check. Never fails: what goes wrong is a finding.
pub async fn run(opts: &CheckOptions) -> Report {
    let mut report = Report::default();
    let config = match Config::load(&opts.config, std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            report.push(
                Level::Error,
                "config",
                format!("{e} (`fanout run` refuses this config too)"),
            );
            return report;
        }
    };
    let (index, entry) = match select(&config.plugins, &opts.file, opts.plugin.as_deref()) {
        Ok(found) => found,
        Err(why) => {
            report.push(
                Level::Error,
                "config",
                format!("{}: {why}", opts.config.display()),
            );
            return report;
        }
    };
    let mut pc = entry.clone();
    report.header.push(format!(
        "plugin `{}`: entry {} of {} in {}",
        pc.name,
        index + 1,
        config.plugins.len(),
        opts.config.display()
    ));
    if !same_file(&pc.path, &opts.file) {
        report.push(
            Level::Note,
            "config",
            format!(
                "the entry's path is {}; checking {} in its place",
                pc.path.display(),
                opts.file.display()
            ),
        );
    }
    pc.path = opts.file.clone();

    // The component alone: can this host run it at all, and what does it import. Compiled
    // through the compile cache by the engine `run` builds for this config (fuel metering
    // when any plugin sets `fuel_per_call`), so the load below finds it there.
    let engine = match super::engine_for(&config.plugins) {
        Ok(e) => e,
        Err(e) => {
            report.push(Level::Error, "component", e.to_string());
            return report;
        }
    };
    let seen: Seen = Arc::default();
    let linker = match observing_linker(&engine, &seen) {
        Ok(l) => l,
        Err(why) => {
            report.push(
                Level::Note,
                "init",
                format!("init's capability calls are not observed ({why})"),
            );
            match super::linker(&engine) {
                Ok(l) => l,
                Err(e) => {
                    report.push(Level::Error, "component", e.to_string());
                    return report;
                }
            }
        }
    };
    let component = {
        let (engine, linker) = (engine.clone(), linker.clone());
        let (file, dir) = (pc.path.clone(), pc.compile_cache.clone());
        tokio::task::spawn_blocking(move || component_summary(&engine, &linker, &file, dir))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
    };
    let imports = match component {
        Ok(summary) => {
            report.header.extend(summary.lines);
            summary.imports
        }
        Err(e) => {
            report.push(Level::Error, "component", e);
            return report;
        }
    };
    let bytes = std::fs::read(&pc.path).unwrap_or_default();
    report.header.push(format!(
        "  limits: memory_mb = {}, fuel_per_call = {}, call_timeout_ms = {} (applied as by `fanout run`)",
        pc.memory_mb,
        pc.fuel_per_call
            .map_or_else(|| "unset (no metering)".to_string(), |f| f.to_string()),
        pc.call_timeout_ms
    ));
    let imported = |iface: &str| {
        let prefix = format!("fanout:sink/{iface}@");
        imports.iter().any(|i| i.starts_with(&prefix))
    };
    let caps = Capabilities {
        redis: imported("redis"),
        http: imported("http"),
        clickhouse: imported("clickhouse"),
    };
    report
        .header
        .push(format!("  {:<12}{:<10}granted", "capability", "imported"));
    for (name, imp, granted) in [
        (
            "redis",
            caps.redis,
            pc.grants.redis.as_ref().map(describe_redis_grant),
        ),
        (
            "http",
            caps.http,
            pc.grants
                .http
                .as_ref()
                .map(|g| format!("url_prefixes {:?}", g.url_prefixes)),
        ),
        (
            "clickhouse",
            caps.clickhouse,
            pc.grants
                .clickhouse
                .as_ref()
                .map(|g| format!("databases {:?}", g.databases)),
        ),
    ] {
        report.header.push(format!(
            "  {name:<12}{:<10}{}",
            if imp { "yes" } else { "no" },
            granted.as_deref().unwrap_or("no")
        ));
    }

    imports_against_grants(&pc, caps, &mut report);
    static_grant_checks(&pc, caps, &bytes, &mut report);

    // The services, connected as `run` connects them.
    let metrics = Metrics::default();
    let services = match Services::connect(&config.services, metrics).await {
        Ok(s) => s,
        Err(e) => {
            report.push(
                Level::Error,
                "config",
                format!("services: {e} (`fanout run` would not start)"),
            );
            return report;
        }
    };

    init(&pc, &engine, linker, &seen, services.clone(), &mut report).await;

    // An unused redis grant (noted above) gets no ACL user: `run` would never make one.
    if let (Some(grant), true) = (&pc.grants.redis, caps.redis) {
        redis_checks(&config.services, &pc, grant, &mut report).await;
    }
    if let Some(grant) = &pc.grants.clickhouse {
        clickhouse_checks(&config.services, &services, grant, &mut report).await;
    }
    report
}

/// What the header says about a component, and its imports.
struct ComponentSummary {
    lines: Vec<String>,
    imports: Vec<String>,
}

/// Compiles (or takes from the compile cache) the component, checks its shape and that the
/// host's linker provides every import: what `fanout plugin check FILE` says, plus its hash.
fn component_summary(
    engine: &wasmtime::Engine,
    linker: &Linker<PluginState>,
    file: &Path,
    cache_dir: Option<PathBuf>,
) -> Result<ComponentSummary, String> {
    let loaded = cache::load(engine, file, cache_dir.as_deref())
        .map_err(|e| format!("cannot load {}: {e:#}", file.display()))?;
    let component = &loaded.component;
    super::check_shape(component)?;
    linker
        .instantiate_pre(component)
        .map_err(|e| format!("{e:#}"))?;
    let ty = component.component_type();
    let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
    let imports: Vec<String> = ty.imports(engine).map(|(n, _)| n.to_string()).collect();
    let mut lines = vec![format!(
        "  component: {} (sha256 {}, {})",
        file.display(),
        loaded.sha256,
        if loaded.cached {
            "from the compile cache"
        } else {
            "compiled"
        }
    )];
    lines.push(format!("  exports: {}", exports.join(", ")));
    if let Some(r) = component.resources_required() {
        lines.push(format!(
            "  defines: {} linear memories (at most {}), {} tables (at most {})",
            r.num_memories,
            super::MAX_MEMORIES,
            r.num_tables,
            super::MAX_TABLES
        ));
    }
    lines.push(format!("  imports: {}", imports.join(", ")));
    Ok(ComponentSummary { lines, imports })
}

/// Which capability interfaces the component imports.
#[derive(Debug, Clone, Copy, Default)]
struct Capabilities {
    redis: bool,
    http: bool,
    clickhouse: bool,
}

fn describe_redis_grant(g: &RedisGrant) -> String {
    let mut s = format!("key_prefixes {:?}", g.prefixes());
    if g.allow_scripts {
        s.push_str(", allow_scripts");
    }
    if let Some(c) = &g.commands {
        s.push_str(&format!(", commands {c:?}"));
    }
    if let Some(u) = &g.user {
        s.push_str(&format!(", user `{u}`"));
    }
    s
}

/// The `[[plugins]]` entry to check: by `name`; else the one whose path is `file`; else the
/// only one. Returns its index too.
pub fn select<'a>(
    plugins: &'a [PluginConfig],
    file: &Path,
    name: Option<&str>,
) -> Result<(usize, &'a PluginConfig), String> {
    let known = || {
        plugins
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if plugins.is_empty() {
        return Err("the config has no [[plugins]] entry".into());
    }
    if let Some(name) = name {
        return plugins
            .iter()
            .enumerate()
            .find(|(_, p)| p.name == name)
            .ok_or_else(|| format!("no plugin named `{name}` (known: {})", known()));
    }
    let matching: Vec<(usize, &PluginConfig)> = plugins
        .iter()
        .enumerate()
        .filter(|(_, p)| same_file(&p.path, file))
        .collect();
    match matching[..] {
        [one] => Ok(one),
        [] if plugins.len() == 1 => Ok((0, &plugins[0])),
        [] => Err(format!(
            "no entry's path is {}; name one with --plugin (known: {})",
            file.display(),
            known()
        )),
        _ => Err(format!(
            "{} entries use {} ({}); name one with --plugin",
            matching.len(),
            file.display(),
            matching
                .iter()
                .map(|(_, p)| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The same file (both canonicalised when they exist, else compared as absolute paths).
fn same_file(a: &Path, b: &Path) -> bool {
    let norm = |p: &Path| {
        std::fs::canonicalize(p).unwrap_or_else(|_| {
            std::env::current_dir()
                .map(|d| d.join(p))
                .unwrap_or_else(|_| p.to_path_buf())
        })
    };
    norm(a) == norm(b)
}

fn imports_against_grants(pc: &PluginConfig, caps: Capabilities, report: &mut Report) {
    for (name, imported, granted) in [
        ("redis", caps.redis, pc.grants.redis.is_some()),
        ("http", caps.http, pc.grants.http.is_some()),
        (
            "clickhouse",
            caps.clickhouse,
            pc.grants.clickhouse.is_some(),
        ),
    ] {
        match (imported, granted) {
            (true, false) => report.push(
                Level::Warning,
                "imports",
                format!(
                    "the component imports `{name}` but the entry has no `grants.{name}`: \
                     every {name} call will be refused (not-granted)"
                ),
            ),
            (false, true) => report.push(
                Level::Note,
                "imports",
                format!(
                    "`grants.{name}` is set but the component never imports `{name}`: the \
                     grant is unused and can go"
                ),
            ),
            _ => {}
        }
    }
}

/// Every string in the plugin's config, with its dotted path (`a.b[2]`).
fn config_strings(value: &toml::Value) -> Vec<(String, String)> {
    fn walk(path: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
        match v {
            toml::Value::String(s) => out.push((path.to_string(), s.clone())),
            toml::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(&format!("{path}[{i}]"), item, out);
                }
            }
            toml::Value::Table(t) => {
                for (k, item) in t {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(&p, item, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", value, &mut out);
    out
}

/// The key name a config path ends with (`a.top_key` -> `top_key`, `keys[1]` -> `keys`).
fn leaf(path: &str) -> &str {
    let last = path.rsplit('.').next().unwrap_or(path);
    last.split('[').next().unwrap_or(last)
}

/// Config keys whose string values are Redis keys or the start of keys.
fn is_redis_key_setting(name: &str) -> bool {
    name == "key"
        || name == "keys"
        || name == "key_prefix"
        || name.ends_with("_key")
        || name.ends_with("_keys")
        || name.ends_with("_key_prefix")
}

fn is_database_setting(name: &str) -> bool {
    name == "database" || name == "db" || name.ends_with("_database")
}

fn is_url(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// Where keys starting with `start` stand against the granted prefixes.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyCoverage {
    /// Every such key is granted.
    Covered,
    /// Some may be (a granted prefix is longer than `start`): nothing to say.
    Partly,
    /// None is.
    Outside,
}

pub fn key_coverage(start: &str, prefixes: &[&str]) -> KeyCoverage {
    if prefixes.iter().any(|p| start.starts_with(p)) {
        KeyCoverage::Covered
    } else if prefixes.iter().any(|p| p.starts_with(start)) {
        KeyCoverage::Partly
    } else {
        KeyCoverage::Outside
    }
}

/// Lua calling Redis, as scripts carry it.
fn has_lua(text: &[u8]) -> bool {
    [&b"redis.call("[..], b"redis.pcall("]
        .iter()
        .any(|needle| text.windows(needle.len()).any(|w| w == *needle))
}

/// Checks that need no service: the config's keys, URLs and databases against the grants.
fn static_grant_checks(pc: &PluginConfig, caps: Capabilities, bytes: &[u8], report: &mut Report) {
    let strings = config_strings(&pc.config);
    redis_static(pc, caps, &strings, bytes, report);
    http_static(pc, caps, &strings, report);
    clickhouse_static(pc, caps, &strings, report);
}

fn redis_static(
    pc: &PluginConfig,
    caps: Capabilities,
    strings: &[(String, String)],
    bytes: &[u8],
    report: &mut Report,
) {
    let keys: Vec<&(String, String)> = strings
        .iter()
        .filter(|(path, _)| is_redis_key_setting(leaf(path)))
        .collect();
    let Some(grant) = &pc.grants.redis else {
        if caps.redis && !keys.is_empty() {
            let names: Vec<&str> = keys.iter().map(|(p, _)| p.as_str()).collect();
            report.push(
                Level::Error,
                "redis",
                format!(
                    "the config names Redis keys ({}) and the component imports redis, but \
                     the entry has no `grants.redis`",
                    names.join(", ")
                ),
            );
        }
        return;
    };
    let prefixes = grant.prefixes();
    // A top-level `key_prefix` comes before every other key setting (redis-topn's convention).
    let base = match pc.config.get("key_prefix") {
        Some(toml::Value::String(s)) => s.as_str(),
        _ => "",
    };
    let mut covered = Vec::new();
    for (path, value) in &keys {
        let start = if path == "key_prefix" {
            value.clone()
        } else {
            format!("{base}{value}")
        };
        let coverage = key_coverage(&start, &prefixes);
        if coverage == KeyCoverage::Covered {
            covered.push(path.as_str());
        }
        if coverage == KeyCoverage::Outside {
            let composed = if path != "key_prefix" && !base.is_empty() {
                format!(" (after `key_prefix` = {base:?})")
            } else {
                String::new()
            };
            report.push(
                Level::Error,
                "redis",
                format!(
                    "config `{path}` = {value:?}{composed}: keys starting with `{start}` are \
                     outside the granted key prefixes {prefixes:?}; the host and Redis refuse \
                     them. Grant a prefix of `{start}` or change the setting"
                ),
            );
        }
    }
    if !covered.is_empty() {
        report.push(
            Level::Ok,
            "redis",
            format!(
                "config {} fall{} under the granted prefixes {prefixes:?}",
                covered.join(", "),
                if covered.len() == 1 { "s" } else { "" }
            ),
        );
    }
    // Scripts: Lua in the component or in the config needs `allow_scripts`.
    let lua_in_config: Vec<&str> = strings
        .iter()
        .filter(|(_, v)| has_lua(v.as_bytes()))
        .map(|(p, _)| p.as_str())
        .collect();
    let script_settings: Vec<&str> = strings
        .iter()
        .map(|(p, _)| p.as_str())
        .chain(
            pc.config
                .as_table()
                .into_iter()
                .flat_map(|t| t.keys().map(String::as_str)),
        )
        .filter(|p| leaf(p).contains("script"))
        .collect();
    let lua_in_component = has_lua(bytes);
    if !grant.allow_scripts {
        let mut evidence = Vec::new();
        if lua_in_component {
            evidence.push("the component embeds Lua calling Redis (`redis.call(`)".to_string());
        }
        if !lua_in_config.is_empty() {
            evidence.push(format!("config {} holds Lua", lua_in_config.join(", ")));
        }
        if !script_settings.is_empty() {
            let mut s = script_settings.clone();
            s.sort();
            s.dedup();
            evidence.push(format!("the config sets {}", s.join(", ")));
        }
        if !evidence.is_empty() {
            report.push(
                Level::Warning,
                "redis",
                format!(
                    "{}, but the grant has no `allow_scripts = true`: every EVAL/EVALSHA it \
                     sends will be refused",
                    evidence.join("; ")
                ),
            );
        }
    } else if !lua_in_component && lua_in_config.is_empty() && script_settings.is_empty() {
        report.push(
            Level::Note,
            "redis",
            "`allow_scripts = true`, but neither the component nor its config shows a Lua \
             script (`redis.call(`): drop it unless scripts come from elsewhere",
        );
    }
}

fn http_static(
    pc: &PluginConfig,
    caps: Capabilities,
    strings: &[(String, String)],
    report: &mut Report,
) {
    let urls: Vec<&(String, String)> = strings.iter().filter(|(_, v)| is_url(v)).collect();
    let Some(grant) = &pc.grants.http else {
        if caps.http && !urls.is_empty() {
            let names: Vec<&str> = urls.iter().map(|(p, _)| p.as_str()).collect();
            report.push(
                Level::Error,
                "http",
                format!(
                    "the config names URLs ({}) and the component imports http, but the entry \
                     has no `grants.http`",
                    names.join(", ")
                ),
            );
        }
        return;
    };
    if grant.url_prefixes.is_empty() {
        report.push(
            Level::Error,
            "http",
            "`grants.http.url_prefixes` is empty: the grant allows no URL",
        );
    }
    let mut bad = 0;
    for (i, prefix) in grant.url_prefixes.iter().enumerate() {
        let key = format!("grants.http.url_prefixes[{i}] {prefix:?}");
        if let Some(why) = url_prefix_problem(prefix) {
            bad += 1;
            report.push(Level::Error, "http", format!("{key}: {why}"));
        } else if prefix.to_ascii_lowercase().starts_with("https://") && !cfg!(feature = "tls") {
            bad += 1;
            report.push(
                Level::Error,
                "http",
                format!(
                    "{key}: this host is built without TLS, so every https request fails; \
                     build it with `cargo build --release -p fanout --features tls`"
                ),
            );
        }
    }
    if bad == 0 && !grant.url_prefixes.is_empty() {
        report.push(
            Level::Ok,
            "http",
            format!("the granted URL prefixes parse: {:?}", grant.url_prefixes),
        );
    }
    for (path, url) in urls {
        match grants::check_http_url(grant, url) {
            Ok(_) => report.push(
                Level::Ok,
                "http",
                format!("config `{path}` = {url:?} is inside the grant"),
            ),
            Err(why) => report.push(
                Level::Error,
                "http",
                format!("config `{path}`: {why}; requests to it will be refused"),
            ),
        }
    }
}

/// Why a granted URL prefix grants nothing (None when it is fine). A prefix that does not
/// parse is skipped by the host's check without a word, so it would silently allow nothing.
pub fn url_prefix_problem(prefix: &str) -> Option<String> {
    let parsed = match reqwest::Url::parse(prefix) {
        Ok(u) => u,
        Err(e) => {
            return Some(format!(
                "does not parse as a URL ({e}): it grants nothing; write it whole, e.g. \
                 \"http://host:port/path/\""
            ))
        }
    };
    if !matches!(parsed.scheme(), "http" | "https") {
        return Some(format!(
            "scheme `{}`: only http and https are available",
            parsed.scheme()
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Some("carries credentials: no request URL may, so it matches nothing".into());
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Some(
            "has a query or a fragment: prefixes are scheme, host, port and path only".into(),
        );
    }
    // A usable prefix covers itself.
    let alone = HttpGrant {
        url_prefixes: vec![prefix.to_string()],
        max_response_bytes: None,
    };
    grants::check_http_url(&alone, prefix)
        .err()
        .map(|why| format!("matches no URL: {why}"))
}

fn clickhouse_static(
    pc: &PluginConfig,
    caps: Capabilities,
    strings: &[(String, String)],
    report: &mut Report,
) {
    let databases: Vec<&(String, String)> = strings
        .iter()
        .filter(|(path, _)| is_database_setting(leaf(path)))
        .collect();
    let Some(grant) = &pc.grants.clickhouse else {
        if caps.clickhouse && !databases.is_empty() {
            let names: Vec<&str> = databases.iter().map(|(p, _)| p.as_str()).collect();
            report.push(
                Level::Error,
                "clickhouse",
                format!(
                    "the config names databases ({}) and the component imports clickhouse, \
                     but the entry has no `grants.clickhouse`",
                    names.join(", ")
                ),
            );
        }
        return;
    };
    if grant.databases.is_empty() {
        report.push(
            Level::Error,
            "clickhouse",
            "`grants.clickhouse.databases` is empty: the grant allows no database",
        );
    }
    for db in &grant.databases {
        if let Err(why) = clickhouse_sql::check_insert_target(grant, db, "t") {
            report.push(
                Level::Error,
                "clickhouse",
                format!("granted database {db:?}: {why}; the plugin can never use it"),
            );
        }
    }
    for (path, db) in databases {
        if !grant.databases.iter().any(|d| d == db) {
            report.push(
                Level::Error,
                "clickhouse",
                format!(
                    "config `{path}` = {db:?} is not a granted database (granted: {:?}); \
                     statements on it will be refused",
                    grant.databases
                ),
            );
        }
    }
}

/// A capability call `init` made, and how it ended.
#[derive(Debug, Clone)]
struct Observed {
    call: String,
    refused: Option<String>,
    failed: Option<String>,
}

type Seen = Arc<Mutex<Vec<Observed>>>;

fn record<T>(seen: &Seen, call: String, result: &Result<T, CapabilityError>) {
    let (refused, failed) = match result {
        Ok(_) => (None, None),
        Err(CapabilityError::NotGranted(m)) => (Some(m.clone()), None),
        Err(CapabilityError::Failed(m)) => (None, Some(m.clone())),
    };
    if let Ok(mut s) = seen.lock() {
        s.push(Observed {
            call,
            refused,
            failed,
        });
    }
}

fn short(s: &str, max: usize) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        let cut: String = one_line.chars().take(max).collect();
        format!("{cut}...")
    }
}

fn redis_call(commands: &[Vec<Vec<u8>>]) -> String {
    let parts: Vec<String> = commands
        .iter()
        .map(|c| {
            c.iter()
                .take(2)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    format!("redis.pipeline `{}`", short(&parts.join("; "), 120))
}

/// The host's linker with every capability call of the plugin observed: the calls go to the
/// host's own implementation (grants, services), and are recorded in `seen`.
fn observing_linker(
    engine: &wasmtime::Engine,
    seen: &Seen,
) -> Result<Arc<Linker<PluginState>>, String> {
    let version = wit_version().ok_or("no `package fanout:sink@...;` line in wit/sink.wit")?;
    let linker = super::linker(engine).map_err(|e| e.to_string())?;
    let mut linker = Arc::try_unwrap(linker).map_err(|_| "the linker is shared".to_string())?;
    let err = |e: wasmtime::Error| format!("{e:#}");
    linker.allow_shadowing(true);
    {
        let seen = seen.clone();
        linker
            .instance(&format!("fanout:sink/redis@{version}"))
            .map_err(err)?
            .func_wrap(
                "pipeline",
                move |mut cx: StoreContextMut<'_, PluginState>,
                      (commands, atomic): (Vec<wit_redis::Command>, bool)| {
                    let call = redis_call(&commands);
                    let r = wit_redis::Host::pipeline(cx.data_mut(), commands, atomic);
                    record(&seen, call, &r);
                    Ok((r,))
                },
            )
            .map_err(err)?;
    }
    {
        let mut inst = linker
            .instance(&format!("fanout:sink/http@{version}"))
            .map_err(err)?;
        let s = seen.clone();
        inst.func_wrap(
            "send",
            move |mut cx: StoreContextMut<'_, PluginState>, (req,): (http::Request,)| {
                let call = format!("http.send `{} {}`", req.method, short(&req.url, 120));
                let r = http::Host::send(cx.data_mut(), req);
                record(&s, call, &r);
                Ok((r,))
            },
        )
        .map_err(err)?;
        let s = seen.clone();
        inst.func_wrap(
            "send-all",
            move |mut cx: StoreContextMut<'_, PluginState>,
                  (reqs, max): (Vec<http::Request>, u32)| {
                let calls: Vec<String> = reqs
                    .iter()
                    .map(|r| format!("http.send-all `{} {}`", r.method, short(&r.url, 120)))
                    .collect();
                let out = http::Host::send_all(cx.data_mut(), reqs, max);
                for (call, r) in calls.into_iter().zip(&out) {
                    record(&s, call, r);
                }
                Ok((out,))
            },
        )
        .map_err(err)?;
    }
    {
        let mut inst = linker
            .instance(&format!("fanout:sink/clickhouse@{version}"))
            .map_err(err)?;
        let s = seen.clone();
        inst.func_wrap(
            "execute",
            move |mut cx: StoreContextMut<'_, PluginState>, (sql,): (String,)| {
                let call = format!("clickhouse.execute `{}`", short(&sql, 120));
                let r = clickhouse::Host::execute(cx.data_mut(), sql);
                record(&s, call, &r);
                Ok((r,))
            },
        )
        .map_err(err)?;
        let s = seen.clone();
        inst.func_wrap(
            "insert-json-rows",
            move |mut cx: StoreContextMut<'_, PluginState>,
                  (db, table, rows): (String, String, Vec<String>)| {
                let call = format!(
                    "clickhouse.insert-json-rows `{}`.`{}` ({} rows)",
                    short(&db, 60),
                    short(&table, 60),
                    rows.len()
                );
                let r = clickhouse::Host::insert_json_rows(cx.data_mut(), db, table, rows);
                record(&s, call, &r);
                Ok((r,))
            },
        )
        .map_err(err)?;
    }
    linker.allow_shadowing(false);
    Ok(Arc::new(linker))
}

/// Loads the plugin as `run` does (its config, grants and limits) and runs `init`.
async fn init(
    pc: &PluginConfig,
    engine: &wasmtime::Engine,
    linker: Arc<Linker<PluginState>>,
    seen: &Seen,
    services: Arc<Services>,
    report: &mut Report,
) {
    let (pc2, engine2) = (pc.clone(), engine.clone());
    let started = Instant::now();
    let loaded = tokio::task::spawn_blocking(move || {
        // Dropped here: its worker thread and instance end with it.
        Plugin::load(pc2, &engine2, linker, services).map(drop)
    })
    .await;
    let took = started.elapsed();
    let timeout = Duration::from_millis(pc.call_timeout_ms);
    match loaded {
        Ok(Ok(())) => {
            report.push(
                Level::Ok,
                "init",
                format!(
                    "`init` accepted the config in {} ms (call_timeout_ms = {})",
                    took.as_millis(),
                    pc.call_timeout_ms
                ),
            );
            if took > timeout / 2 {
                report.push(
                    Level::Warning,
                    "init",
                    format!(
                        "`init` took {} ms, more than half of call_timeout_ms = {}: a slower \
                         start (a cold service) would time it out",
                        took.as_millis(),
                        pc.call_timeout_ms
                    ),
                );
            }
        }
        Ok(Err(e)) => report.push(
            Level::Error,
            "init",
            format!("{e} (the host would retry starting it and never deliver to it)"),
        ),
        Err(e) => report.push(Level::Error, "init", format!("the load task failed: {e}")),
    }
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    let mut fine = Vec::new();
    for o in seen {
        if let Some(why) = o.refused {
            report.push(
                Level::Error,
                "init",
                format!("{} was refused: not-granted({why})", o.call),
            );
        } else if let Some(why) = o.failed {
            report.push(
                Level::Warning,
                "init",
                format!("{} failed at the service: {why}", o.call),
            );
        } else {
            fine.push(o.call);
        }
    }
    if !fine.is_empty() {
        let n = fine.len();
        fine.truncate(5);
        report.push(
            Level::Ok,
            "init",
            format!(
                "{n} capability call{} answered: {}{}",
                if n == 1 { "" } else { "s" },
                fine.join(", "),
                if n > 5 { ", ..." } else { "" }
            ),
        );
    }
}

/// Stands for the key in [`shape`].
const K: &str = "\0key";

/// The arguments after the name of a command the grant may allow, with the arity `ACL DRYRUN`
/// checks; `K` is the key. None for a command this table does not know yet (add it: a dry run
/// with the wrong arity says nothing about permissions).
fn shape(command: &str) -> Option<&'static [&'static str]> {
    Some(match command {
        "PING" | "TIME" => &[],
        "ECHO" => &["x"],
        "GET" | "GETDEL" | "GETEX" | "INCR" | "DECR" | "STRLEN" | "TTL" | "PTTL" | "PERSIST"
        | "TYPE" | "HGETALL" | "HLEN" | "HKEYS" | "HVALS" | "LPOP" | "RPOP" | "LLEN"
        | "SMEMBERS" | "SCARD" | "ZCARD" | "DEL" | "UNLINK" | "EXISTS" | "MGET" | "TOUCH"
        | "PFCOUNT" | "PFADD" => &[K],
        "SET" | "SETNX" | "GETSET" | "APPEND" | "INCRBY" | "INCRBYFLOAT" | "DECRBY" | "EXPIRE"
        | "PEXPIRE" | "EXPIREAT" | "PEXPIREAT" | "HGET" | "HMGET" | "HDEL" | "HEXISTS"
        | "LPUSH" | "RPUSH" | "SADD" | "SREM" | "SISMEMBER" | "ZSCORE" | "ZREM" | "ZRANK"
        | "ZREVRANK" | "MSET" | "MSETNX" | "GETBIT" => &[K, "1"],
        "SETEX" | "PSETEX" | "HSET" | "HSETNX" | "HMSET" | "HINCRBY" | "LRANGE" | "LTRIM"
        | "ZADD" | "ZINCRBY" | "ZRANGE" | "ZREVRANGE" | "ZRANGEBYSCORE" | "ZREVRANGEBYSCORE"
        | "ZCOUNT" | "ZREMRANGEBYSCORE" | "ZREMRANGEBYRANK" | "SETBIT" => &[K, "1", "1"],
        "ZUNIONSTORE" | "ZINTERSTORE" => &[K, "1", K],
        "EVAL" | "EVAL_RO" => &["return 1", "1", K],
        "EVALSHA" | "EVALSHA_RO" => &["e0e1f9fabfc9d4800c877a703b823ac0578ff8db", "1", K],
        _ => return None,
    })
}

/// `command` with arguments of the right arity for `ACL DRYRUN`, its keys all `key`.
pub fn sample_command(command: &str, key: &str) -> Vec<String> {
    let args = shape(command).unwrap_or(&[K]);
    std::iter::once(command)
        .chain(args.iter().map(|a| if *a == K { key } else { a }))
        .map(str::to_string)
        .collect()
}

/// A key no grant covers: prefixes may hold no control characters.
const OUTSIDE_KEY: &str = "\u{1}fanout-check-outside";

/// What `ACL DRYRUN user ...` said.
enum Dry {
    Allowed,
    Refused(String),
    /// The dry run itself failed (arity, permissions of the caller, an old Redis).
    Unknown(String),
}

async fn dryrun(conn: &mut redis::aio::MultiplexedConnection, user: &str, args: &[String]) -> Dry {
    let mut cmd = redis::cmd("ACL");
    cmd.arg("DRYRUN").arg(user);
    for a in args {
        cmd.arg(a.as_str());
    }
    match tokio::time::timeout(
        Duration::from_secs(5),
        cmd.query_async::<redis::Value>(conn),
    )
    .await
    {
        Ok(Ok(redis::Value::Okay)) => Dry::Allowed,
        Ok(Ok(redis::Value::SimpleString(s))) if s == "OK" => Dry::Allowed,
        Ok(Ok(redis::Value::BulkString(b))) => Dry::Refused(String::from_utf8_lossy(&b).into()),
        Ok(Ok(redis::Value::SimpleString(s))) => Dry::Refused(s),
        Ok(Ok(other)) => Dry::Unknown(format!("{other:?}")),
        Ok(Err(e)) => Dry::Unknown(e.to_string()),
        Err(_) => Dry::Unknown("no answer within 5 s".into()),
    }
}

/// Dry-runs every command the grant allows on every granted prefix as `user`; findings for
/// what Redis refuses. Returns (allowed, refused, unknown) counts.
async fn dryrun_grant(
    conn: &mut redis::aio::MultiplexedConnection,
    user: &str,
    grant: &RedisGrant,
    report: &mut Report,
) -> (usize, usize, usize) {
    let commands = grants::redis_allowed_commands(grant);
    let prefixes = grant.prefixes();
    let (mut allowed, mut refused, mut unknown) = (0, 0, 0);
    // Refused commands (whatever the key), refused keys (prefix -> an example), the rest.
    let mut commands_refused: Vec<String> = Vec::new();
    let mut keys_refused: std::collections::BTreeMap<String, String> = Default::default();
    let mut other: Vec<String> = Vec::new();
    let mut example: Option<String> = None;
    let mut unknowns: Vec<String> = Vec::new();
    for command in &commands {
        let keyless = matches!(command.as_str(), "PING" | "TIME" | "ECHO");
        let keys: Vec<(&str, String)> = if keyless {
            vec![("", String::new())]
        } else {
            prefixes
                .iter()
                .map(|p| (*p, format!("{p}fanout-check")))
                .collect()
        };
        for (prefix, key) in keys {
            let args = sample_command(command, &key);
            match dryrun(conn, user, &args).await {
                Dry::Allowed => allowed += 1,
                Dry::Refused(why) => {
                    refused += 1;
                    if why.contains("to run the") {
                        if !commands_refused.contains(command) {
                            commands_refused.push(command.clone());
                            example.get_or_insert(why);
                        }
                    } else if why.contains("to access the") {
                        keys_refused
                            .entry(prefix.to_string())
                            .or_insert_with(|| format!("{command} on `{key}`: {why}"));
                    } else {
                        other.push(format!("{command} on `{key}`: {why}"));
                    }
                }
                Dry::Unknown(why) => {
                    unknown += 1;
                    let line = format!("{command}: {why}");
                    if !unknowns.contains(&line) {
                        unknowns.push(line);
                    }
                }
            }
        }
    }
    if !commands_refused.is_empty() {
        report.push(
            Level::Error,
            "redis",
            format!(
                "Redis refuses ACL user `{user}` {} of the {} commands the grant allows: {} \
                 ({}): the plugin's calls using them would fail; grant the user these \
                 commands or narrow `grants.redis.commands`",
                commands_refused.len(),
                commands.len(),
                commands_refused.join(" "),
                example.unwrap_or_default()
            ),
        );
    }
    for (prefix, why) in &keys_refused {
        report.push(
            Level::Error,
            "redis",
            format!(
                "Redis refuses ACL user `{user}` keys under the granted prefix `{prefix}` \
                 ({why}): give the user `~{prefix}*`"
            ),
        );
    }
    if !other.is_empty() {
        let n = other.len();
        other.truncate(5);
        report.push(
            Level::Error,
            "redis",
            format!(
                "Redis refuses ACL user `{user}` {n} dry runs: {}",
                other.join("; ")
            ),
        );
    }
    if !unknowns.is_empty() {
        let n = unknowns.len();
        unknowns.truncate(3);
        report.push(
            Level::Warning,
            "redis",
            format!(
                "{n} dry runs as `{user}` could not be made, e.g. {}",
                unknowns.join("; ")
            ),
        );
    }
    (allowed, refused, unknown)
}

/// The first command of the grant that takes a key: to try a key outside the grant.
fn keyed_command(grant: &RedisGrant) -> Option<String> {
    grants::redis_allowed_commands(grant)
        .into_iter()
        .find(|c| !matches!(c.as_str(), "PING" | "TIME" | "ECHO"))
}

async fn redis_checks(
    services: &ServicesConfig,
    pc: &PluginConfig,
    grant: &RedisGrant,
    report: &mut Report,
) {
    let fail = |report: &mut Report, message: String| report.push(Level::Error, "redis", message);
    let client = match redis::Client::open(services.redis_url.as_str()) {
        Ok(c) => c,
        Err(e) => return fail(report, format!("services.redis_url: {e}")),
    };
    let mut admin = match tokio::time::timeout(
        Duration::from_secs(10),
        client.get_multiplexed_async_connection(),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return fail(
                report,
                format!("cannot connect to {}: {e}", services.redis_url),
            )
        }
        Err(_) => {
            return fail(
                report,
                format!("{} did not answer within 10 s", services.redis_url),
            )
        }
    };
    let whoami: String = match redis::cmd("ACL")
        .arg("WHOAMI")
        .query_async(&mut admin)
        .await
    {
        Ok(u) => u,
        Err(e) => {
            return fail(
                report,
                format!(
                    "ACL WHOAMI on the admin connection failed ({e}): the host needs Redis 6 or \
                     later, with ACLs, to hold each plugin to its grant"
                ),
            )
        }
    };
    let user = match services.redis_users {
        RedisUsers::Host => {
            // What the host does at the plugin's first Redis call, its password aside.
            let rules = grants::redis_acl_rules(grant);
            let user = grants::redis_acl_user(&pc.name, &rules);
            let mut setuser = redis::cmd("ACL");
            setuser.arg("SETUSER").arg(&user).arg(&rules);
            if let Err(e) = setuser.query_async::<()>(&mut admin).await {
                let hint = if e.to_string().contains("Unknown command") {
                    ": this Redis does not know a command the grant allows; list the ones the \
                     plugin needs in `grants.redis.commands`"
                } else {
                    ""
                };
                return fail(
                    report,
                    format!(
                        "the admin user `{whoami}` cannot set up the plugin's ACL user `{user}` \
                         (ACL SETUSER {}): {e}{hint}; every Redis call of the plugin would fail",
                        short(&rules.join(" "), 160)
                    ),
                );
            }
            report.push(
                Level::Ok,
                "redis",
                format!(
                    "the admin user `{whoami}` set up the plugin's ACL user `{user}` as `fanout \
                     run` does at the first call (no password added)"
                ),
            );
            if grant.allow_scripts {
                match dryrun(
                    &mut admin,
                    &whoami,
                    &[String::from("SCRIPT"), String::from("KILL")],
                )
                .await
                {
                    Dry::Allowed => {}
                    Dry::Refused(why) => report.push(
                        Level::Error,
                        "redis",
                        format!(
                            "scripts are allowed but the admin user `{whoami}` may not run \
                             SCRIPT KILL ({why}): a script outliving its call could not be \
                             stopped"
                        ),
                    ),
                    Dry::Unknown(why) => report.push(
                        Level::Warning,
                        "redis",
                        format!("cannot tell whether `{whoami}` may run SCRIPT KILL: {why}"),
                    ),
                }
            }
            user
        }
        RedisUsers::Provided => {
            let (Some(user), Some(password)) = (&grant.user, &grant.password) else {
                return fail(
                    report,
                    "redis_users = \"provided\" needs user and password".into(),
                );
            };
            let info = client.get_connection_info().clone();
            let settings = info
                .redis_settings()
                .clone()
                .set_username(user)
                .set_password(password)
                .set_skip_set_lib_name();
            let login = async {
                redis::Client::open(info.set_redis_settings(settings))?
                    .get_multiplexed_async_connection()
                    .await
            };
            match tokio::time::timeout(Duration::from_secs(10), login).await {
                Ok(Ok(_)) => report.push(
                    Level::Ok,
                    "redis",
                    format!("logged in as the grant's ACL user `{user}`"),
                ),
                Ok(Err(e)) => {
                    return fail(
                        report,
                        format!("cannot log in as the grant's ACL user `{user}`: {e}"),
                    )
                }
                Err(_) => return fail(report, format!("logging in as `{user}` took over 10 s")),
            }
            user.clone()
        }
    };
    let (allowed, refused, unknown) = dryrun_grant(&mut admin, &user, grant, report).await;
    if refused == 0 && unknown == 0 {
        report.push(
            Level::Ok,
            "redis",
            format!(
                "Redis lets `{user}` run all {} commands the grant allows on each of its \
                 prefixes {:?} ({allowed} dry runs)",
                grants::redis_allowed_commands(grant).len(),
                grant.prefixes()
            ),
        );
    }
    if let Some(command) = keyed_command(grant) {
        let args = sample_command(&command, OUTSIDE_KEY);
        let level = match services.redis_users {
            RedisUsers::Host => Level::Error,
            RedisUsers::Provided => Level::Warning,
        };
        match dryrun(&mut admin, &user, &args).await {
            Dry::Refused(_) => report.push(
                Level::Ok,
                "redis",
                format!("Redis refuses `{user}` keys outside the granted prefixes"),
            ),
            Dry::Allowed => report.push(
                level,
                "redis",
                format!(
                    "Redis lets `{user}` run {command} on a key outside the granted prefixes: \
                     Redis does not hold the plugin to its grant (scripts could reach any key)"
                ),
            ),
            Dry::Unknown(_) => {}
        }
    }
}

async fn clickhouse_query(client: &::clickhouse::Client, sql: &str) -> Result<String, String> {
    let read = async {
        let mut cursor = client
            .query(sql)
            .fetch_bytes("TabSeparated")
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        while let Some(chunk) = cursor.next().await.map_err(|e| e.to_string())? {
            out.extend_from_slice(&chunk);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(15), read)
        .await
        .map_err(|_| "no answer within 15 s".to_string())?
}

async fn clickhouse_checks(
    cfg: &ServicesConfig,
    services: &Services,
    grant: &ClickHouseGrant,
    report: &mut Report,
) {
    let Some(client) = &services.clickhouse else {
        return;
    };
    let user = if cfg.clickhouse_user.is_empty() {
        "default"
    } else {
        cfg.clickhouse_user.as_str()
    };
    if user == "default" {
        report.push(
            Level::Warning,
            "clickhouse",
            "the host connects as `default`: give it a user of its own, limited to the granted \
             databases (services.clickhouse_user), so that ClickHouse is a second fence",
        );
    }
    if let Err(e) = clickhouse_query(client, "SELECT 1").await {
        report.push(
            Level::Error,
            "clickhouse",
            format!(
                "{} does not answer the host's user `{user}`: {}",
                cfg.clickhouse_url,
                short(&e, 300)
            ),
        );
        return;
    }
    for db in &grant.databases {
        if clickhouse_sql::check_insert_target(grant, db, "t").is_err() {
            continue; // reported with the static checks
        }
        match clickhouse_query(client, &format!("SHOW CREATE DATABASE `{db}`")).await {
            Ok(_) => report.push(
                Level::Ok,
                "clickhouse",
                format!("granted database `{db}` exists and the host's user `{user}` can use it"),
            ),
            Err(e) => {
                let what = if e.contains("Code: 81") || e.contains("UNKNOWN_DATABASE") {
                    "does not exist (and `init` did not create it)".to_string()
                } else if ["Code: 291", "Code: 497", "ACCESS_DENIED", "Access denied"]
                    .iter()
                    .any(|m| e.contains(m))
                {
                    format!("is not accessible by the host's ClickHouse user `{user}`")
                } else {
                    format!("cannot be checked as `{user}`")
                };
                report.push(
                    Level::Error,
                    "clickhouse",
                    format!("granted database `{db}` {what}: {}", short(&e, 300)),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(name: &str, path: &str) -> PluginConfig {
        let text = format!(
            "[kafka]\nbrokers = \"k\"\n[[plugins]]\nname = \"{name}\"\npath = \"{path}\"\n"
        );
        Config::from_toml(&text, Path::new("t.toml"), std::iter::empty())
            .expect("config")
            .plugins
            .remove(0)
    }

    #[test]
    fn the_entry_is_picked_by_name_path_or_as_the_only_one() {
        let dir = std::env::temp_dir().join(format!("fanout-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (a, b) = (dir.join("a.wasm"), dir.join("b.wasm"));
        std::fs::write(&a, b"a").expect("a");
        std::fs::write(&b, b"b").expect("b");
        let one = vec![plugin("x", &a.display().to_string())];
        assert_eq!(select(&one, &b, None).expect("only one").1.name, "x");
        let two = vec![
            plugin("x", &a.display().to_string()),
            plugin("y", &b.display().to_string()),
        ];
        assert_eq!(select(&two, &b, None).expect("by path").1.name, "y");
        assert_eq!(select(&two, &b, Some("x")).expect("by name").0, 0);
        let e = select(&two, &b, Some("z")).expect_err("unknown");
        assert!(
            e.contains("no plugin named `z`") && e.contains("x, y"),
            "{e}"
        );
        let e = select(&two, &dir.join("c.wasm"), None).expect_err("no match");
        assert!(e.contains("--plugin"), "{e}");
        let same = vec![
            plugin("x", &a.display().to_string()),
            plugin("y", &a.display().to_string()),
        ];
        let e = select(&same, &a, None).expect_err("ambiguous");
        assert!(e.contains("2 entries") && e.contains("x, y"), "{e}");
        assert!(select(&[], &a, None).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn keys_are_held_against_prefixes() {
        let p = ["content:", "top:content:", "fanout:seen:"];
        assert_eq!(key_coverage("fanout:seen:", &p), KeyCoverage::Covered);
        assert_eq!(key_coverage("top:content:10m", &p), KeyCoverage::Covered);
        assert_eq!(key_coverage("", &p), KeyCoverage::Partly);
        assert_eq!(key_coverage("top:", &p), KeyCoverage::Partly);
        assert_eq!(key_coverage("seen:", &p), KeyCoverage::Outside);
        assert!(is_redis_key_setting("key"));
        assert!(is_redis_key_setting("seen_key_prefix"));
        assert!(is_redis_key_setting("top_key"));
        assert!(!is_redis_key_setting("monkey"));
        assert!(!is_redis_key_setting("outside"));
        assert_eq!(leaf("a.b.top_key"), "top_key");
        assert_eq!(leaf("keys[2]"), "keys");
    }

    #[test]
    fn redis_key_settings_outside_the_grant_are_errors() {
        let mut pc = plugin("topn", "x.wasm");
        pc.grants.redis = Some(RedisGrant {
            key_prefixes: vec!["content:".into(), "top:content:".into()],
            allow_scripts: true,
            ..RedisGrant::default()
        });
        pc.config = toml::from_str(
            "key_prefix = \"\"\nseen_key_prefix = \"fanout:seen:\"\ntop_key = \"top:content:10m\"",
        )
        .expect("toml");
        let caps = Capabilities {
            redis: true,
            ..Capabilities::default()
        };
        let mut r = Report::default();
        static_grant_checks(&pc, caps, b"redis.call(", &mut r);
        assert_eq!(r.count(Level::Error), 1, "{r}");
        assert!(r.to_string().contains("seen_key_prefix"), "{r}");
        // Behind a top-level key_prefix.
        pc.config =
            toml::from_str("key_prefix = \"app:\"\ntop_key = \"top:content:10m\"").expect("toml");
        let mut r = Report::default();
        static_grant_checks(&pc, caps, b"", &mut r);
        assert_eq!(r.count(Level::Error), 2, "{r}");
        // Scripts without allow_scripts.
        pc.config = toml::from_str("events_per_script = 5").expect("toml");
        if let Some(g) = pc.grants.redis.as_mut() {
            g.allow_scripts = false;
        }
        let mut r = Report::default();
        static_grant_checks(&pc, caps, b"local x = redis.call('GET', KEYS[1])", &mut r);
        assert_eq!(r.count(Level::Warning), 1, "{r}");
        assert!(r.to_string().contains("events_per_script"), "{r}");
        // Keys in the config, redis imported, no grant.
        pc.grants.redis = None;
        pc.config = toml::from_str("key = \"a:b\"").expect("toml");
        let mut r = Report::default();
        static_grant_checks(&pc, caps, b"", &mut r);
        assert_eq!(r.count(Level::Error), 1, "{r}");
    }

    #[test]
    fn url_prefixes_that_grant_nothing_are_named() {
        assert_eq!(url_prefix_problem("http://127.0.0.1:58080/"), None);
        assert_eq!(url_prefix_problem("http://a/api"), None);
        for bad in [
            "127.0.0.1:58080/",
            "api.example/",
            "not a url",
            "ftp://a/",
            "http://u:p@a/",
            "http://a/?x=1",
            "http://a/..%2fb/",
        ] {
            assert!(url_prefix_problem(bad).is_some(), "{bad}");
        }
        let mut pc = plugin("api", "x.wasm");
        pc.grants.http = Some(HttpGrant {
            url_prefixes: vec!["http://127.0.0.1:58080/v1/".into()],
            max_response_bytes: None,
        });
        pc.config = toml::from_str("url = \"http://127.0.0.1:58080/v2/events\"").expect("toml");
        let caps = Capabilities {
            http: true,
            ..Capabilities::default()
        };
        let mut r = Report::default();
        static_grant_checks(&pc, caps, b"", &mut r);
        assert_eq!(r.count(Level::Error), 1, "{r}");
        assert!(r.to_string().contains("config `url`"), "{r}");
    }

    #[test]
    fn databases_in_the_config_and_the_grant() {
        let mut pc = plugin("ch", "x.wasm");
        pc.grants.clickhouse = Some(ClickHouseGrant {
            databases: vec!["engagement".into(), "system".into(), "bad-name".into()],
            max_result_bytes: None,
        });
        pc.config = toml::from_str("database = \"other\"").expect("toml");
        let caps = Capabilities {
            clickhouse: true,
            ..Capabilities::default()
        };
        let mut r = Report::default();
        static_grant_checks(&pc, caps, b"", &mut r);
        assert_eq!(r.count(Level::Error), 3, "{r}");
    }

    #[test]
    fn every_grantable_redis_command_has_a_dry_run_shape() {
        for c in grants::REDIS_DATA_COMMANDS
            .iter()
            .chain(grants::REDIS_SCRIPT_COMMANDS)
        {
            assert!(
                shape(c).is_some(),
                "{c} may be granted: add its arguments to `shape` in host/src/plugin/check.rs \
                 (`fanout plugin check` dry-runs it with ACL DRYRUN, which checks arity)"
            );
        }
        assert_eq!(sample_command("ZADD", "k"), ["ZADD", "k", "1", "1"]);
        assert_eq!(sample_command("EVAL", "k"), ["EVAL", "return 1", "1", "k"]);
        assert_eq!(sample_command("PING", "k"), ["PING"]);
        assert_eq!(sample_command("NEWCMD", "k"), ["NEWCMD", "k"]);
    }

    #[test]
    fn capability_calls_are_observed_in_the_hosts_own_interfaces() {
        // The instances shadowed here must be the ones the host's linker defines: defining
        // one of their functions again without shadowing is refused.
        let version = wit_version().expect("package line");
        let engine = wasmtime::Engine::default();
        let linker = super::super::linker(&engine).expect("linker");
        let mut linker = Arc::try_unwrap(linker).ok().expect("own linker");
        linker.allow_shadowing(false);
        let again = linker
            .instance(&format!("fanout:sink/redis@{version}"))
            .expect("instance")
            .func_wrap(
                "pipeline",
                |_cx: StoreContextMut<'_, PluginState>,
                 (_c, _a): (Vec<wit_redis::Command>, bool)| {
                    Ok((Ok::<Vec<wit_redis::Reply>, CapabilityError>(vec![]),))
                },
            );
        assert!(again.is_err(), "fanout:sink/redis@{version} is the host's");
        let seen: Seen = Arc::default();
        observing_linker(&engine, &seen).expect("observing linker");
    }

    #[test]
    fn lua_is_recognised() {
        assert!(has_lua(b"..return redis.call('SET', KEYS[1])"));
        assert!(has_lua(b"redis.pcall('GET', 'x')"));
        assert!(!has_lua(b"redis call"));
    }
}
