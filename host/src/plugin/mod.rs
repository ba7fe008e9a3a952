//! Sink plugins: WebAssembly components run with wasmtime, each in its own store on a thread
//! of its own, bounded in CPU (fuel), memory (a store limiter) and wall-clock time.
//!
//! A plugin that traps, exhausts its fuel or its memory only loses its instance: the next call
//! builds a fresh one (and calls `init` again). The host never shares a store between plugins.

pub mod cache;
pub mod capabilities;
pub mod clickhouse_sql;
pub mod grants;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::{info, warn};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::config::PluginConfig;
use capabilities::{Capabilities, Services};

/// Rust types generated from wit/sink.wit.
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "sink-plugin",
    });
}

pub use bindings::fanout::sink::types::{
    Batch as WitBatch, EnrichedEvent as WitEvent, Rejection, SourceRange, WriteOutcome,
};
use bindings::SinkPlugin;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot load {path}: {message}")]
    Load { path: String, message: String },
    #[error("init failed: {0}")]
    Init(String),
    #[error("trapped: {0}")]
    Trap(String),
    #[error("exceeded its CPU budget (fuel) and was stopped")]
    OutOfFuel,
    #[error("exceeded its memory limit of {0} MiB")]
    OutOfMemory(u64),
    #[error("did not answer within {0:?}")]
    Timeout(Duration),
    #[error("worker thread is gone")]
    WorkerGone,
}

impl PluginError {
    /// The plugin could not be loaded or initialised: not the fault of the batch at hand.
    pub fn is_setup(&self) -> bool {
        matches!(self, PluginError::Load { .. } | PluginError::Init(_))
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Load { .. } => "load",
            PluginError::Init(_) => "init",
            PluginError::Trap(_) => "trap",
            PluginError::OutOfFuel => "fuel",
            PluginError::OutOfMemory(_) => "memory",
            PluginError::Timeout(_) => "timeout",
            PluginError::WorkerGone => "worker",
        }
    }
}

/// The store's data: WASI (no files, no sockets, no env), limits and capabilities.
pub struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    caps: Arc<Capabilities>,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Refuses memory growth past the limit and remembers that it did, so a trap that follows
/// (Rust aborts when allocation fails) is reported as out-of-memory.
struct MemoryLimiter {
    max_bytes: usize,
    denied: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.denied = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// Compiled plugin code plus everything needed to instantiate it again.
struct Prepared {
    engine: Engine,
    component: Component,
    linker: Arc<Linker<PluginState>>,
    caps: Arc<Capabilities>,
    config_json: String,
    fuel_per_call: u64,
    memory_bytes: usize,
}

/// One live instance of a plugin.
struct Live {
    store: Store<PluginState>,
    plugin: SinkPlugin,
}

impl Prepared {
    fn instantiate(&self) -> Result<Live, PluginError> {
        let wasi = wasmtime_wasi::WasiCtxBuilder::new()
            .inherit_stderr()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = PluginState {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                max_bytes: self.memory_bytes,
                denied: false,
            },
            caps: self.caps.clone(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        store
            .set_fuel(self.fuel_per_call)
            .map_err(|e| PluginError::Init(e.to_string()))?;
        let plugin = SinkPlugin::instantiate(&mut store, &self.component, &self.linker)
            .map_err(|e| classify(e, &store, self.memory_bytes))?;
        let result = plugin
            .fanout_sink_sink()
            .call_init(&mut store, &self.config_json)
            .map_err(|e| classify(e, &store, self.memory_bytes))?;
        result.map_err(PluginError::Init)?;
        Ok(Live { store, plugin })
    }

    fn write(&self, live: &mut Live, batch: &WitBatch) -> Result<WriteOutcome, PluginError> {
        live.store
            .set_fuel(self.fuel_per_call)
            .map_err(|e| PluginError::Trap(e.to_string()))?;
        live.plugin
            .fanout_sink_sink()
            .call_write(&mut live.store, batch)
            .map_err(|e| classify(e, &live.store, self.memory_bytes))
    }
}

fn classify(e: wasmtime::Error, store: &Store<PluginState>, memory_bytes: usize) -> PluginError {
    if let Some(Trap::OutOfFuel) = e.downcast_ref::<Trap>() {
        return PluginError::OutOfFuel;
    }
    if store.data().limiter.denied {
        return PluginError::OutOfMemory((memory_bytes / (1024 * 1024)) as u64);
    }
    PluginError::Trap(format!("{e:#}"))
}

struct Job {
    batch: Arc<WitBatch>,
    reply: oneshot::Sender<Result<WriteOutcome, PluginError>>,
}

/// A loaded plugin: a worker thread owning the store, fed batches through a channel.
pub struct Plugin {
    pub config: PluginConfig,
    prepared: Arc<Prepared>,
    worker: std::sync::Mutex<std::sync::mpsc::Sender<Job>>,
    /// Set once the first batch was taken, for the operator's start-up log.
    first_batch: std::sync::atomic::AtomicBool,
}

/// The engine shared by all plugins: fuel metering on, component model on.
pub fn engine() -> Result<Engine, PluginError> {
    let mut cfg = wasmtime::Config::new();
    cfg.consume_fuel(true);
    Engine::new(&cfg).map_err(|e| PluginError::Load {
        path: "<engine>".into(),
        message: e.to_string(),
    })
}

/// The linker every plugin is instantiated with: WASI p2 plus all capability interfaces.
pub fn linker(engine: &Engine) -> Result<Arc<Linker<PluginState>>, PluginError> {
    let mut linker = Linker::new(engine);
    let load_err = |e: wasmtime::Error| PluginError::Load {
        path: "<linker>".into(),
        message: e.to_string(),
    };
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(load_err)?;
    SinkPlugin::add_to_linker::<PluginState, HasSelf<PluginState>>(&mut linker, |s| s)
        .map_err(load_err)?;
    Ok(Arc::new(linker))
}

impl Plugin {
    /// Compiles the component, instantiates it once and calls `init` (so a broken plugin or
    /// config fails at start-up, not on the first batch).
    pub fn load(
        config: PluginConfig,
        engine: &Engine,
        linker: Arc<Linker<PluginState>>,
        services: Arc<Services>,
    ) -> Result<Self, PluginError> {
        let path = config.path.display().to_string();
        let compiled =
            cache::load(engine, &config.path, config.compile_cache.as_deref()).map_err(|e| {
                PluginError::Load {
                    path: path.clone(),
                    message: format!("{e:#}"),
                }
            })?;
        let (component, sha256, cached) = (compiled.component, compiled.sha256, compiled.cached);
        let config_json = serde_json::to_string(&config.config).map_err(|e| PluginError::Load {
            path: path.clone(),
            message: format!("config is not representable as JSON: {e}"),
        })?;
        let prepared = Arc::new(Prepared {
            engine: engine.clone(),
            component,
            linker,
            caps: Arc::new(Capabilities {
                plugin: config.name.clone(),
                grants: config.grants.clone(),
                services,
            }),
            config_json,
            fuel_per_call: config.fuel_per_call,
            memory_bytes: usize::try_from(config.memory_mb.saturating_mul(1024 * 1024))
                .unwrap_or(usize::MAX),
        });
        let live = prepared.instantiate()?;
        info!(plugin = %config.name, path = %path, %sha256, cached, "plugin loaded");
        let worker = spawn_worker(config.name.clone(), prepared.clone(), Some(live));
        Ok(Plugin {
            config,
            prepared,
            worker: std::sync::Mutex::new(worker),
            first_batch: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// True from the second call on: the first caller learns it saw the first batch.
    pub fn first_batch_taken(&self) -> bool {
        self.first_batch
            .swap(true, std::sync::atomic::Ordering::Relaxed)
    }

    /// Hands one batch to the plugin and waits for its answer, at most `call_timeout_ms`.
    pub async fn write(&self, batch: Arc<WitBatch>) -> Result<WriteOutcome, PluginError> {
        let (reply, answer) = oneshot::channel();
        let sent = self
            .worker
            .lock()
            .map_err(|_| PluginError::WorkerGone)?
            .send(Job { batch, reply });
        if sent.is_err() {
            self.replace_worker();
            return Err(PluginError::WorkerGone);
        }
        let timeout = Duration::from_millis(self.config.call_timeout_ms);
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => {
                self.replace_worker();
                Err(PluginError::WorkerGone)
            }
            Err(_) => {
                // The stuck worker finishes its call on its own and then exits; a new one
                // with a fresh instance takes the next batch.
                warn!(plugin = %self.config.name, "plugin call timed out; starting a fresh instance");
                self.replace_worker();
                Err(PluginError::Timeout(timeout))
            }
        }
    }

    fn replace_worker(&self) {
        if let Ok(mut w) = self.worker.lock() {
            *w = spawn_worker(self.config.name.clone(), self.prepared.clone(), None);
        }
    }
}

fn spawn_worker(
    name: String,
    prepared: Arc<Prepared>,
    live: Option<Live>,
) -> std::sync::mpsc::Sender<Job> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let thread_name = format!("plugin-{name}");
    let spawned = std::thread::Builder::new().name(thread_name).spawn(move || {
        let mut live = live;
        for job in rx {
            let result = match live.as_mut() {
                Some(l) => prepared.write(l, &job.batch),
                None => match prepared.instantiate() {
                    Ok(mut l) => {
                        let r = prepared.write(&mut l, &job.batch);
                        live = Some(l);
                        r
                    }
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = &result {
                // A trapped instance may hold broken state: never reuse it.
                warn!(plugin = %name, error = %e, "plugin call failed; its instance is discarded");
                live = None;
            }
            let _ = job.reply.send(result);
        }
    });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start a plugin worker thread");
    }
    tx
}

/// Compiles a .wasm file and checks that it is a component of the sink-plugin world whose
/// imports this host provides. Does not run it.
pub fn check(path: &std::path::Path) -> Result<String, PluginError> {
    let load = |e: wasmtime::Error| PluginError::Load {
        path: path.display().to_string(),
        message: format!("{e:#}"),
    };
    let engine = engine()?;
    let linker = linker(&engine)?;
    let component = Component::from_file(&engine, path).map_err(load)?;
    let pre = linker.instantiate_pre(&component).map_err(load)?;
    bindings::SinkPluginPre::new(pre).map_err(load)?;
    let imports: Vec<String> = component
        .component_type()
        .imports(&engine)
        .map(|(name, _)| name.to_string())
        .collect();
    Ok(format!(
        "ok: {} exports fanout:sink/sink, compatible with this host's fanout:sink@0.1.1\nimports: {}",
        path.display(),
        imports.join(", ")
    ))
}
