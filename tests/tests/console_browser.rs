//! The operations console in a real browser (Debian's headless Chromium, installed by
//! `scripts/stack`): a host on the stack with redis-topn, a plugin that rejects odd events and
//! a plugin whose HTTP target is a closed port; events flow; the page, opened the way a person
//! opens it, shows charts with points, the top content exactly as Redis holds it, the failing
//! plugin as failing with its reason, and the dead letters with their reason. A screenshot is
//! kept under `.stack/artifacts/console.png` (or `$FANOUT_ARTIFACTS`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use fanout_tests::*;

const WAIT: Duration = Duration::from_secs(120);

/// The console's read-only Redis user, made by `scripts/stack up`.
const CONSOLE_USER: &str = "fanout-console";
const CONSOLE_PASSWORD: &str = "console-local";

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser"].iter().find_map(|name| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {name}"))
            .output()
            .ok()?;
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!path.is_empty()).then(|| PathBuf::from(path))
    })
}

/// Chromium, headless, on `url`: `extra` decides what it does (dump the DOM, screenshot).
fn browse(browser: &PathBuf, url: &str, extra: &[String]) -> String {
    let profile = std::env::temp_dir().join(unique("chromium-profile"));
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--no-first-run",
            "--window-size=1500,2400",
            // Virtual time: the page's polls and drawing run, then Chromium reports.
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("run chromium");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of attribute `attr` in the opening tag that contains `marker`.
fn attr_in_tag(dom: &str, marker: &str, attr: &str) -> Option<String> {
    let at = dom.find(marker)?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    let tag = &dom[start..end];
    let key = format!("{attr}=\"");
    let from = tag.find(&key)? + key.len();
    let len = tag[from..].find('"')?;
    Some(tag[from..from + len].to_string())
}

/// Every (content id, score) of the page's top list, in order.
fn top_list(dom: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let Some(start) = dom.find("id=\"top-list\"") else {
        return out;
    };
    let end = dom[start..].find("</ol>").map_or(dom.len(), |e| start + e);
    let mut rest = &dom[start..end];
    while let Some(at) = rest.find("data-content-id=\"") {
        let tail = &rest[at + "data-content-id=\"".len()..];
        let id: String = tail.chars().take_while(|c| *c != '"').collect();
        let score = tail
            .find("data-score=\"")
            .map(|s| &tail[s + "data-score=\"".len()..])
            .and_then(|s| s.split('"').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(f64::NAN);
        out.push((id, score));
        rest = tail;
    }
    out
}

fn unescape(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_in_a_browser_shows_what_a_person_checks() {
    let Some(stack) = Stack::get() else { return };
    let Some(browser) = chromium() else {
        if std::env::var("FANOUT_REQUIRE_STACK").as_deref() == Ok("1") {
            panic!("chromium is missing: scripts/stack up installs it");
        }
        eprintln!("SKIPPED: chromium is not installed (scripts/stack up installs it)");
        return;
    };
    let topic = unique("console-events");
    create_topic(&stack, &topic, 2).await;
    let prefix = format!("{}:", unique("console"));
    let top_key = format!("{prefix}top:content:10m");
    let closed = closed_port_url();
    let console_url = stack.redis_url.replacen(
        "redis://",
        &format!("redis://{CONSOLE_USER}:{CONSOLE_PASSWORD}@"),
        1,
    );
    let mut cfg = ConfigBuilder::new(&stack, &topic, "", "")
        .redis_topn(&prefix)
        .testkit(
            "picky",
            "reject-odd",
            &unique("console-rec"),
            "fail-fast",
            3,
        )
        .plugin_raw(&format!(
            r#"
[[plugins]]
name = "unreachable"
path = "{path}"
failure_policy = "fail-fast"
max_retries = 1
retry_backoff_ms = 100
max_backoff_ms = 500
[plugins.grants]
http = {{ url_prefixes = ["{closed}"] }}
[plugins.config]
mode = "cap-http"
url = "{closed}events"
"#,
            path = plugin_wasm("testkit").display()
        ));
    cfg.extra = format!(
        "[health]\nlag_interval_ms = 1000\n\n[console]\nsample_interval_ms = 1000\nredis_url = \"{console_url}\"\ntop_key = \"{top_key}\"\n"
    );
    let host = HostProc::start("console-browser", &cfg.render(), &cfg.metrics_addr);
    let api = format!("http://{}/api/console", cfg.metrics_addr);

    // Live traffic in rounds, event time now: content c gets 6 - c events per round.
    let mut id = 0i64;
    for _round in 0..6 {
        let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
        for content in 1..=5i64 {
            for _ in 0..(6 - content) {
                id += 1;
                produce(
                    &stack,
                    &topic,
                    Some(format!("{{\"id\":{id}}}").as_bytes()),
                    Some(&event_envelope(id, content, &now)),
                )
                .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let total = id as f64;

    // Until the host itself has it all: redis-topn took every event, the failing plugin is
    // reported, a few samples of history, the dead letters read back.
    let data = eventually(WAIT, "the console's data is complete", || async {
        let d: serde_json::Value = reqwest::get(&api).await.ok()?.json().await.ok()?;
        let plugins = d["plugins"].as_array()?;
        let topn = plugins.iter().find(|p| p["name"] == "redis-topn")?;
        let failing = plugins.iter().find(|p| p["name"] == "unreachable")?;
        let picky = plugins.iter().find(|p| p["name"] == "picky")?;
        // picky takes the even events once their odd neighbours are dead-lettered.
        let ready = topn["delivered"].as_f64()? == total
            && picky["delivered"].as_f64()? == (total / 2.0).floor()
            && failing["healthy"] == false
            && d["history"]["t"].as_array()?.len() >= 5
            && d["top"]["items"].as_array()?.len() == 5
            && !d["dead_letters"]["letters"].as_array()?.is_empty();
        ready.then_some(d)
    })
    .await;
    eprintln!(
        "console data: {} samples, top {}",
        data["history"]["t"].as_array().map_or(0, Vec::len),
        data["top"]["items"]
    );

    // The same facts on /metrics, for Prometheus and the load tests: histograms per plugin
    // (one age observation per event taken), lag of the stuck lane, dead letters by reason.
    let m = host.metrics().await;
    let value = |series: &str| metric_value(&m, series);
    assert_eq!(
        value("fanout_event_age_seconds_count{plugin=\"redis-topn\"}"),
        total,
        "{m}"
    );
    assert!(value("fanout_batch_delivery_seconds_count{plugin=\"redis-topn\"}") >= 1.0);
    assert!(value("fanout_plugin_call_seconds_count{plugin=\"unreachable\"}") >= 2.0);
    assert!(value("fanout_lane_lag_messages{plugin=\"unreachable\"}") > 0.0);
    assert_eq!(
        value("fanout_dead_letters_total{plugin=\"picky\",stage=\"plugin\",reason=\"rejected\"}"),
        (1..=id).filter(|i| i % 2 == 1).count() as f64
    );

    let mut conn = redis(&stack).await;
    let in_redis: Vec<(String, f64)> = redis::cmd("ZREVRANGE")
        .arg(&top_key)
        .arg(0)
        .arg(9)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await
        .expect("top list");
    assert_eq!(
        in_redis
            .iter()
            .map(|(id, _)| id.as_str())
            .collect::<Vec<_>>(),
        ["1", "2", "3", "4", "5"],
        "redis-topn ranked the content by events"
    );

    let url = format!("http://{}/", cfg.metrics_addr);
    let dom = browse(&browser, &url, &["--dump-dom".to_string()]);
    let points = |id: &str| {
        attr_in_tag(&dom, &format!("id=\"{id}\""), "data-points")
            .and_then(|p| p.parse::<usize>().ok())
            .unwrap_or(0)
    };
    for chart in ["chart-rate", "chart-age", "chart-lag"] {
        assert!(points(chart) > 0, "{chart} has points:\n{dom}");
    }
    assert!(
        dom.contains("class=\"uplot"),
        "uPlot drew the charts:\n{dom}"
    );
    assert_eq!(top_list(&dom), in_redis, "the page's top list is Redis's");
    let health = attr_in_tag(&dom, "data-plugin=\"unreachable\"", "data-health");
    assert_eq!(health.as_deref(), Some("failing"), "{dom}");
    let reason = unescape(
        &attr_in_tag(&dom, "data-plugin=\"unreachable\"", "data-reason").unwrap_or_default(),
    );
    eprintln!("failing plugin's reason on the page: {reason}");
    assert!(reason.starts_with("plugin unreachable: "), "{reason}");
    assert!(
        reason.contains("refused") || reason.contains("connect"),
        "the reason names the closed port: {reason}"
    );
    assert_eq!(
        attr_in_tag(&dom, "data-plugin=\"redis-topn\"", "data-health").as_deref(),
        Some("ok")
    );
    assert!(
        dom.contains("data-reason-class=\"rejected\""),
        "recent dead letters with their reason:\n{dom}"
    );
    assert!(dom.contains("odd event ids are rejected"));

    let dir = std::env::var("FANOUT_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join(".stack/artifacts"));
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    let shot = dir.join("console.png");
    let _ = std::fs::remove_file(&shot);
    browse(
        &browser,
        &url,
        &[format!("--screenshot={}", shot.display())],
    );
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "screenshot at {} ({size} bytes)",
        shot.display()
    );
    eprintln!("screenshot: {} ({size} bytes)", shot.display());
    drop(host);
}
