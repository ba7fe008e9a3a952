//! Hot swap: on SIGHUP the host reads its config file again (the start-up loader and
//! validation) and, for every plugin whose `.wasm` file (its sha256) or `[[plugins]]` entry
//! changed, loads the new version beside the running one (compile through the compile cache,
//! instantiate, `init`, under the entry's limits), off the lanes. A version that loads is
//! swapped into its lane's [`PluginSlot`] between two batches: the batch in flight ends on the
//! old version, the next goes to the new one, on the same consumer group, so the new version
//! resumes where the old one was committed. A version that does not load is refused: the old
//! one keeps running, the reason is logged at WARN and shown on /healthz as a `note:` (the host
//! stays healthy). `fanout_plugin_swaps_total{plugin,result}` counts the attempts.
//!
//! Not applied by a reload (logged as needing a restart): plugins added or removed, and every
//! other section ([kafka], [services], [batch], ...), and a plugin's own `batch` or `start`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{info, warn};
use wasmtime::component::Linker;
use wasmtime::Engine;

use crate::config::{Config, PluginConfig};
use crate::lane::delivery::PluginSlot;
use crate::metrics::{label, Metrics};
use crate::plugin::capabilities::Services;
use crate::plugin::{cache, Plugin, PluginState};

/// What a reload needs: where the config is, what loads plugins, and the lanes' slots.
pub struct Reloader {
    pub path: PathBuf,
    /// The config as last applied (start-up, then each reload's plugin entries).
    pub config: Config,
    pub engine: Engine,
    pub linker: Arc<Linker<PluginState>>,
    pub services: Arc<Services>,
    pub metrics: Metrics,
    pub slots: BTreeMap<String, Arc<PluginSlot>>,
}

/// SIGHUP, listened to from the moment this is called (its default action ends the process,
/// so call it before anything slow at start-up).
pub fn hangups() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

/// The outcome of one plugin's reload, for logs and tests.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Unchanged,
    Swapped,
    Refused(String),
}

impl Reloader {
    /// Reloads on every SIGHUP until shutdown.
    pub fn spawn(
        mut self,
        mut hangups: tokio::signal::unix::Signal,
        mut shutdown: watch::Receiver<bool>,
    ) {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    got = hangups.recv() => {
                        if got.is_none() {
                            return;
                        }
                        info!(config = %self.path.display(), "SIGHUP: reloading the config");
                        self.reload().await;
                    }
                    _ = async { drop(shutdown.wait_for(|stop| *stop).await) } => return,
                }
            }
        });
    }

    /// One reload: reads the config, swaps the plugins that changed and loaded.
    pub async fn reload(&mut self) -> BTreeMap<String, Outcome> {
        let mut outcomes = BTreeMap::new();
        let fresh = match Config::load(&self.path, std::env::vars()) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "reload: the config is refused; nothing changed");
                self.metrics
                    .set_note("reload", Some(format!("config refused: {e}")));
                return outcomes;
            }
        };
        self.metrics.set_note("reload", None);
        for section in restart_only_changes(&self.config, &fresh) {
            warn!(
                section,
                "reload: {section} changed; not applied until a restart"
            );
        }
        for pc in &fresh.plugins {
            if !self.slots.contains_key(&pc.name) {
                warn!(plugin = %pc.name, "reload: plugin added to the config; it starts with the next restart");
            }
        }
        for name in self.slots.keys() {
            if !fresh.plugins.iter().any(|p| &p.name == name) {
                warn!(plugin = %name, "reload: plugin removed from the config; it keeps running until the next restart");
            }
        }
        for pc in fresh
            .plugins
            .iter()
            .filter(|p| self.slots.contains_key(&p.name))
        {
            let outcome = self.reload_plugin(pc).await;
            if matches!(outcome, Outcome::Swapped) {
                if let Some(entry) = self.config.plugins.iter_mut().find(|p| p.name == pc.name) {
                    *entry = pc.clone();
                }
            }
            outcomes.insert(pc.name.clone(), outcome);
        }
        outcomes
    }

    async fn reload_plugin(&self, pc: &PluginConfig) -> Outcome {
        let Some(slot) = self.slots.get(&pc.name) else {
            return Outcome::Unchanged;
        };
        let running = slot.current().plugin.clone();
        let sha256 = match std::fs::read(&pc.path) {
            Ok(bytes) => cache::sha256_hex(&bytes),
            Err(e) => {
                return self.refuse(pc, format!("cannot read {}: {e}", pc.path.display()));
            }
        };
        let entry_changed = format!("{pc:?}") != format!("{:?}", running.config);
        if !entry_changed && sha256 == running.sha256 {
            // Back to the running version after a refusal: nothing is refused any more.
            self.metrics.set_note(&format!("plugin {}", pc.name), None);
            return Outcome::Unchanged;
        }
        for (what, changed) in [
            (
                "batch",
                format!("{:?}", pc.batch) != format!("{:?}", running.config.batch),
            ),
            ("start", pc.start != running.config.start),
        ] {
            if changed {
                warn!(plugin = %pc.name, "reload: the plugin's `{what}` changed; the lane keeps the old one until a restart");
            }
        }
        let (cfg, engine, linker, services) = (
            pc.clone(),
            self.engine.clone(),
            self.linker.clone(),
            self.services.clone(),
        );
        let started = std::time::Instant::now();
        let loaded =
            tokio::task::spawn_blocking(move || Plugin::load(cfg, &engine, linker, services)).await;
        let plugin = match loaded {
            Ok(Ok(p)) => Arc::new(p),
            Ok(Err(e)) => return self.refuse(pc, e.to_string()),
            Err(e) => return self.refuse(pc, format!("loading panicked: {e}")),
        };
        let old = slot.swap(plugin);
        self.count(&pc.name, "ok");
        self.metrics.set_note(&format!("plugin {}", pc.name), None);
        info!(plugin = %pc.name, old_sha256 = %old.plugin.sha256, new_sha256 = %sha256,
              generation = old.generation + 1, entry_changed,
              load_ms = started.elapsed().as_secs_f64() * 1000.0,
              "plugin swapped: the batch in flight ends on the old version, the next goes to the new one");
        Outcome::Swapped
    }

    fn refuse(&self, pc: &PluginConfig, reason: String) -> Outcome {
        let reason =
            crate::deadletter::escape_truncate(&reason, crate::deadletter::MAX_REASON_BYTES);
        warn!(plugin = %pc.name, %reason, "plugin swap refused; the running version keeps its lane");
        self.count(&pc.name, "refused");
        self.metrics.set_note(
            &format!("plugin {}", pc.name),
            Some(format!(
                "swap refused, the running version goes on: {reason}"
            )),
        );
        Outcome::Refused(reason)
    }

    fn count(&self, plugin: &str, result: &str) {
        self.metrics.add_labelled(
            "fanout_plugin_swaps_total",
            &format!("{},{}", label("plugin", plugin), label("result", result)),
            1.0,
        );
    }
}

/// The sections of `fresh` that differ from `running` and that only a restart applies.
pub fn restart_only_changes(running: &Config, fresh: &Config) -> Vec<&'static str> {
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    [
        ("[kafka]", differs(&running.kafka, &fresh.kafka)),
        ("[postgres]", differs(&running.postgres, &fresh.postgres)),
        ("[enrich]", differs(&running.enrich, &fresh.enrich)),
        ("[batch]", running.batch != fresh.batch),
        ("[services]", differs(&running.services, &fresh.services)),
        ("[http]", differs(&running.http, &fresh.http)),
        ("[health]", differs(&running.health, &fresh.health)),
        ("[cache]", differs(&running.cache, &fresh.cache)),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_toml(text, std::path::Path::new("t.toml"), Vec::new()).expect("config")
    }

    const BASE: &str = r#"
[kafka]
brokers = "localhost:9092"
group_id = "g"
events_topic = "e"
[[plugins]]
name = "p"
path = "p.wasm"
"#;

    #[test]
    fn only_sections_a_restart_applies_are_named() {
        let a = config(BASE);
        assert!(restart_only_changes(&a, &config(BASE)).is_empty());
        let b = config(&BASE.replace("group_id = \"g\"", "group_id = \"h\""));
        assert_eq!(restart_only_changes(&a, &b), vec!["[kafka]"]);
        let c = config(&format!("{BASE}[plugins.config]\nkey = \"x\"\n"));
        assert!(
            restart_only_changes(&a, &c).is_empty(),
            "a plugin entry is the reload's to apply"
        );
        let d = config(&format!("{BASE}\n[services]\nredis_url = \"redis://x\"\n"));
        assert_eq!(restart_only_changes(&a, &d), vec!["[services]"]);
    }

    #[test]
    fn the_clock_measures_the_gap_across_versions_only() {
        let clock = crate::lane::delivery::TakenClock::default();
        assert_eq!(clock.record(0), None, "nothing before the first batch");
        assert_eq!(clock.record(0), None, "same version: no gap");
        std::thread::sleep(std::time::Duration::from_millis(20));
        let gap = clock.record(1).expect("a new version's first batch");
        assert!(gap >= std::time::Duration::from_millis(20), "{gap:?}");
        assert_eq!(clock.record(1), None, "its second batch");
    }
}
