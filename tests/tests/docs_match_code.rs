//! Docs that match the code (no stack needed):
//!
//! - every metric name `fanout_...` that README.md, docs/*.md, wit/*.wit, plugins/template and
//!   the SDK's sources (what plugin authors read) mention is one the host exports, and every
//!   series the host exports is in docs/operations.md. The host's names are what its metrics
//!   registry renders plus every string literal starting with `fanout_` in host/src (labelled
//!   series only render once set, so the literals are where they are named);
//! - every `path = "..."` in a ```toml block of README.md and docs/*.md resolves, relative to
//!   the config file the block belongs to, to a file of the repository or to
//!   `plugins/dist/<name>.wasm` (where scripts/build-plugins puts plugins). Config files live
//!   in `config/`, so that is where a block is read from unless its first line is a comment
//!   naming its file (`# config/other.toml`). A block with `[[plugins]]` or `[kafka]` also
//!   parses with the host's config loader;
//! - every `config/*.toml` parses with the host's config loader, and its plugin paths resolve.
//!
//! Mentions in files the docs owners cannot edit right now, known to be wrong, are listed in
//! [`PENDING`] with their fix: they are printed, not failed on, and an entry whose line is gone
//! is reported as stale (delete it).

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use fanout_tests::repo_root;

/// `fanout_` identifiers the docs use that are not metric names.
const NOT_METRICS: &[(&str, &str)] = &[
    ("fanout_sdk", "the SDK crate"),
    ("fanout_tests", "the integration tests' crate"),
    (
        "fanout_sandbox",
        "the stack's ClickHouse database for tests",
    ),
    ("fanout_stack", "the stack's PostgreSQL replication slot"),
    ("fanout_stack_pub", "the stack's PostgreSQL publication"),
    (
        "fanout_header_record",
        "the index the stack adds to tansu's store",
    ),
];

/// Known-wrong lines in files this test's owners may not edit: (file, the line trimmed, fix).
const PENDING: &[(&str, &str, &str)] = &[];

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Files (repository-relative) under `dir` ending with one of `exts`, recursively.
fn files(dir: &str, exts: &[&str]) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, exts: &[&str], out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "target") {
                    walk(root, &p, exts, out);
                }
            } else if exts
                .iter()
                .any(|x| p.to_string_lossy().ends_with(&format!(".{x}")))
            {
                if let Ok(rel) = p.strip_prefix(root) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
    }
    let root = repo_root();
    let mut out = Vec::new();
    walk(&root, &root.join(dir), exts, &mut out);
    out.sort();
    out
}

/// The pending entry covering `line` of `file`, if any.
fn pending(file: &str, line: &str) -> Option<&'static (&'static str, &'static str, &'static str)> {
    PENDING
        .iter()
        .find(|(f, l, _)| *f == file && line.trim() == *l)
}

/// `fanout_...` tokens of `text` with their line numbers; `<placeholders>` are kept
/// (`fanout_plugin_<name>`), so that a templated name is checked too.
fn fanout_tokens(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bytes = line.as_bytes();
        let mut i = 0;
        while let Some(at) = line[i..].find("fanout_").map(|a| a + i) {
            let before_ok = at == 0 || {
                let b = bytes[at - 1];
                !(b.is_ascii_alphanumeric() || b == b'_')
            };
            let mut end = at + "fanout_".len();
            while end < bytes.len() {
                let b = bytes[end];
                if b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' {
                    end += 1;
                } else if b == b'<' {
                    match line[end..].find('>') {
                        Some(close) => end += close + 1,
                        None => break,
                    }
                } else {
                    break;
                }
            }
            if before_ok && end > at + "fanout_".len() {
                out.push((n + 1, line[at..end].to_string()));
            }
            i = end.max(at + 1);
        }
    }
    out
}

/// The metric names the host exports.
fn exported_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    // What the registry renders: the lane series, the host-wide ones, `fanout_healthy`.
    let metrics = fanout::metrics::Metrics::default();
    metrics.lane("docs");
    for line in metrics.render().lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.split_whitespace().next() {
                names.insert(name.to_string());
            }
        }
    }
    // Labelled series: named by string literals where they are recorded.
    for file in files("host/src", &["rs"]) {
        for line in read(&file).lines() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            let mut rest = line;
            while let Some(at) = rest.find("\"fanout_") {
                let name: String = rest[at + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                names.insert(name);
                rest = &rest[at + 1..];
            }
        }
    }
    names
}

/// README.md and docs/*.md.
fn markdown_docs() -> Vec<String> {
    let mut docs = vec!["README.md".to_string()];
    docs.extend(
        files("docs", &["md"])
            .into_iter()
            .filter(|f| !f[5..].contains('/')),
    );
    docs
}

#[test]
fn every_metric_the_docs_name_is_exported_and_every_exported_one_documented() {
    let exported = exported_metrics();
    assert!(
        exported.contains("fanout_plugin_counter_total") && exported.contains("fanout_healthy"),
        "the host's names were not found: {exported:?}"
    );
    let mut scanned = markdown_docs();
    scanned.extend(files("wit", &["wit"]));
    scanned.extend(files("plugins/template", &["rs", "toml", "md"]));
    scanned.extend(files("sdk/src", &["rs"]));
    let mut wrong = Vec::new();
    let mut pending_seen = BTreeSet::new();
    for file in &scanned {
        let text = read(file);
        let lines: Vec<&str> = text.lines().collect();
        for (n, token) in fanout_tokens(&text) {
            if NOT_METRICS.iter().any(|(t, _)| *t == token) || exported.contains(&token) {
                continue;
            }
            if let Some(p) = pending(file, lines[n - 1]) {
                pending_seen.insert((p.0, p.1));
                eprintln!(
                    "PENDING {file}:{n}: `{token}` is not a metric the host exports; fix:\n{}",
                    p.2
                );
                continue;
            }
            wrong.push(format!(
                "{file}:{n}: `{token}` is not a metric the host exports (if it is no metric, \
                 add it to NOT_METRICS in tests/tests/docs_match_code.rs)"
            ));
        }
    }
    report_stale_pending(&pending_seen, |f| !f.starts_with("docs/plugins.md"));
    // The other way round: the operations guide lists every series.
    let operations = read("docs/operations.md");
    let documented: BTreeSet<String> = fanout_tokens(&operations)
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    for name in &exported {
        if !documented.contains(name) {
            wrong.push(format!(
                "docs/operations.md: the host exports `{name}`, the metrics table does not list it"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "\n{}\n\nthe host exports: {}",
        wrong.join("\n"),
        exported.iter().cloned().collect::<Vec<_>>().join(", ")
    );
}

/// Prints PENDING entries (of files `which` selects) whose line is gone: fixed, delete them.
fn report_stale_pending(seen: &BTreeSet<(&str, &str)>, which: impl Fn(&str) -> bool) {
    for (file, line, _) in PENDING {
        if which(file) && !seen.contains(&(*file, *line)) {
            eprintln!("STALE: PENDING entry for {file} `{line}` no longer matches: delete it");
        }
    }
}

/// `path` joined to `base`, `.` and `..` resolved without touching the file system.
fn normalize(base: &Path, path: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for c in base.join(path).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Why a plugin `path` (relative to a config in `config_dir`, repository-relative) does not
/// resolve; None when it does.
fn path_problem(config_dir: &Path, path: &str) -> Option<String> {
    let root = repo_root();
    // An absolute `path` replaces the base when joined.
    let resolved = normalize(&root.join(config_dir), path);
    let rel = resolved.strip_prefix(&root).ok();
    let built_plugin = rel.is_some_and(|r| {
        r.starts_with("plugins/dist")
            && r.components().count() == 3
            && r.extension().is_some_and(|e| e == "wasm")
    });
    if resolved.exists() || built_plugin {
        return None;
    }
    let shown = rel.map_or(resolved.clone(), Path::to_path_buf);
    let hint = Path::new(path)
        .file_name()
        .map(|f| {
            format!(
                "; a built plugin is \"{}\" from {}",
                pathdiff(config_dir, Path::new("plugins/dist"))
                    .join(f)
                    .display(),
                config_dir.display()
            )
        })
        .unwrap_or_default();
    Some(format!(
        "path = {path:?} resolves to {} from {}/ (paths are relative to the config file), \
         which is neither a file of the repository nor plugins/dist/<name>.wasm{hint}",
        shown.display(),
        config_dir.display()
    ))
}

/// The relative path from repository directory `from` to repository path `to`.
fn pathdiff(from: &Path, to: &Path) -> PathBuf {
    let ups = from.components().count();
    let mut out = PathBuf::new();
    for _ in 0..ups {
        out.push("..");
    }
    out.join(to)
}

/// The ```toml blocks of a markdown text: (line of the first content line, text, indent-free).
fn toml_blocks(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, usize, String)> = None;
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        match &mut current {
            None if trimmed.starts_with("```toml") => {
                current = Some((n + 2, line.len() - trimmed.len(), String::new()));
            }
            Some((start, indent, body)) => {
                if trimmed.starts_with("```") {
                    out.push((*start, std::mem::take(body)));
                    current = None;
                } else {
                    let cut = line
                        .char_indices()
                        .take_while(|(i, c)| *i < *indent && c.is_whitespace())
                        .count();
                    body.push_str(&line[cut..]);
                    body.push('\n');
                }
            }
            None => {}
        }
    }
    out
}

/// The config file a block belongs to: named by a first-line comment, else one in config/.
fn block_config_dir(block: &str) -> PathBuf {
    let named = block.lines().next().and_then(|l| {
        let comment = l.trim().strip_prefix('#')?.trim();
        let file = comment.split_whitespace().next()?;
        file.ends_with(".toml").then(|| PathBuf::from(file))
    });
    named
        .and_then(|f| f.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("config"))
}

/// A doc's config fragment completed into a whole config: the sections it lacks, filled in.
fn as_whole_config(block: &str) -> String {
    let has = |section: &str| block.lines().any(|l| l.trim() == section);
    let mut text = String::new();
    if !has("[kafka]") {
        text.push_str("[kafka]\nbrokers = \"127.0.0.1:9092\"\n");
    }
    if !has("[services]") {
        text.push_str(
            "[services]\nredis_url = \"redis://127.0.0.1:6379/\"\nclickhouse_url = \"http://127.0.0.1:8123\"\n",
        );
    }
    text.push_str(block);
    text
}

#[test]
fn config_paths_in_the_docs_resolve_relative_to_their_config_file() {
    let mut wrong = Vec::new();
    let mut pending_seen = BTreeSet::new();
    for doc in markdown_docs() {
        let text = read(&doc);
        let lines: Vec<&str> = text.lines().collect();
        for (start, block) in toml_blocks(&text) {
            let dir = block_config_dir(&block);
            for (i, line) in block.lines().enumerate() {
                let n = start + i;
                let Some(value) = line
                    .trim()
                    .strip_prefix("path")
                    .map(str::trim_start)
                    .and_then(|r| r.strip_prefix('='))
                    .map(str::trim)
                    .and_then(|r| r.strip_prefix('"'))
                    .and_then(|r| r.split('"').next())
                else {
                    continue;
                };
                if let Some(why) = path_problem(&dir, value) {
                    if let Some(p) = pending(&doc, lines[n - 1]) {
                        pending_seen.insert((p.0, p.1));
                        eprintln!("PENDING {doc}:{n}: {why}; fix:\n{}", p.2);
                    } else {
                        wrong.push(format!("{doc}:{n}: {why}"));
                    }
                }
            }
            if block.lines().any(|l| {
                let t = l.trim();
                t == "[[plugins]]" || t == "[kafka]"
            }) {
                let whole = as_whole_config(&block);
                if let Err(e) = fanout::config::Config::from_toml(
                    &whole,
                    &dir.join("doc.toml"),
                    std::iter::empty(),
                ) {
                    wrong.push(format!(
                        "{doc}:{start}: the config block does not parse with the host's loader: {e}"
                    ));
                }
            }
        }
    }
    report_stale_pending(&pending_seen, |f| f.starts_with("docs/"));
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

#[test]
fn every_config_file_parses_and_its_plugin_paths_resolve() {
    let configs = files("config", &["toml"]);
    assert!(!configs.is_empty(), "no config/*.toml");
    let root = repo_root();
    let mut wrong = Vec::new();
    for rel in configs {
        let path = root.join(&rel);
        match fanout::config::Config::load(&path, std::iter::empty()) {
            Ok(config) => {
                for p in &config.plugins {
                    // `load` made it relative to the file already.
                    let shown = p.path.display().to_string();
                    let dir = Path::new(&rel).parent().unwrap_or(Path::new(""));
                    if let Some(why) = path_problem(dir, &shown) {
                        wrong.push(format!("{rel}: plugin `{}`: {why}", p.name));
                    }
                }
            }
            Err(e) => wrong.push(format!("{rel}: {e}")),
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

#[test]
fn the_scanners_find_what_they_look_for() {
    let tokens = fanout_tokens(
        "a `fanout_lag_messages{plugin}` b fanout_plugin_<name>{x} dbz_offsets_fanout_stack fanout_",
    );
    let names: Vec<&str> = tokens.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(names, ["fanout_lag_messages", "fanout_plugin_<name>"]);
    let blocks = toml_blocks(
        "x\n   ```toml\n   [[plugins]]\n   path = \"a\"\n   ```\n```toml\n# config/x/y.toml\n```\n",
    );
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0], (3, "[[plugins]]\npath = \"a\"\n".to_string()));
    assert_eq!(block_config_dir(&blocks[1].1), PathBuf::from("config/x"));
    assert_eq!(block_config_dir(&blocks[0].1), PathBuf::from("config"));
    assert!(path_problem(Path::new("config"), "../plugins/dist/my_sink.wasm").is_none());
    assert!(path_problem(Path::new("config"), "local.toml").is_none());
    let why = path_problem(Path::new("config"), "plugins/dist/my_sink.wasm").expect("wrong");
    assert!(why.contains("\"../plugins/dist/my_sink.wasm\""), "{why}");
}
