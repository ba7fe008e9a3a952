//! Sink plugins: WebAssembly components run with wasmtime, each in its own store on a thread
//! of its own, bounded in CPU (fuel), memory (one budget for the whole store) and wall-clock
//! time (a deadline per call, enforced by epoch interruption and by every capability call).
//!
//! A plugin that traps, exhausts its fuel, its memory or its time only loses its instance: the
//! next call builds a fresh one (and calls `init` again). The host never shares a store between
//! plugins, and a plugin never has more than one worker thread or one instance: a call that
//! missed its deadline is stopped before the next call starts.

pub mod cache;
pub mod capabilities;
pub mod check;
pub mod clickhouse_sql;
pub mod grants;
pub mod packing;
pub mod trial;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{error, info, warn};
use wasmtime::component::{Component, HasSelf, Linker, Resource, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, StoreContextMut, Trap, UpdateDeadline};
use wasmtime_wasi::p2::DynPollable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::config::PluginConfig;
use bindings::fanout::sink::errors::CapabilityError;
use capabilities::{Capabilities, PluginOutput, Services};

/// Rust types generated from wit/sink.wit: the `sink-plugin` world (events as records).
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "sink-plugin",
    });
}

/// The `packed-sink-plugin` world (events in one buffer, since 0.1.2). Its imports are the
/// same interfaces as `sink-plugin`'s, so both worlds share one linker and one host
/// implementation of every capability.
pub mod packed_bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "packed-sink-plugin",
        with: {
            "fanout:sink/types": super::bindings::fanout::sink::types,
            "fanout:sink/errors": super::bindings::fanout::sink::errors,
            "fanout:sink/log": super::bindings::fanout::sink::log,
            "fanout:sink/metrics": super::bindings::fanout::sink::metrics,
            "fanout:sink/redis": super::bindings::fanout::sink::redis,
            "fanout:sink/http": super::bindings::fanout::sink::http,
            "fanout:sink/clickhouse": super::bindings::fanout::sink::clickhouse,
        },
    });
}

pub use bindings::fanout::sink::types::{
    Batch as WitBatch, EnrichedEvent as WitEvent, PackedBatch, Rejection, SourceRange, WriteOutcome,
};
use bindings::SinkPlugin;
use packed_bindings::PackedSinkPlugin;
pub use packing::{EventPosition, PluginBatch};

/// The version of the WIT package this host serves (wit/sink.wit's `package` line).
pub const WIT_VERSION: &str = "0.1.3";

/// Interface name prefix of the packed export; any 0.1.x from 0.1.2 on.
const PACKED_EXPORT_PREFIX: &str = "fanout:sink/packed-sink@";

/// Which of the two sink interfaces a component exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    /// `fanout:sink/sink`: a list of event records (plugins built against 0.1.0 or 0.1.1).
    Records,
    /// `fanout:sink/packed-sink`: one buffer per batch (the SDK's choice since 0.1.2).
    Packed,
}

impl SinkKind {
    pub fn of(component: &Component, engine: &Engine) -> SinkKind {
        let packed = component
            .component_type()
            .exports(engine)
            .any(|(name, _)| name.starts_with(PACKED_EXPORT_PREFIX));
        if packed {
            SinkKind::Packed
        } else {
            SinkKind::Records
        }
    }

    pub fn export_name(self) -> &'static str {
        match self {
            SinkKind::Records => "fanout:sink/sink",
            SinkKind::Packed => "fanout:sink/packed-sink",
        }
    }
}

/// How often the engine's epoch advances: Wasm code notices a passed deadline within a tick.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// How long past a call's deadline its caller waits for the worker to stop. Wasm code stops
/// within a tick and every capability call ends at the deadline, so this is only reached
/// when something the host does not bound blocks the worker; the next call then waits for it.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Linear memories one plugin may define (all its core modules together). A Rust or Python
/// (componentize-py) component has one; two leave room for an adapter with its own.
/// `fanout plugin check` prints what a component defines.
pub const MAX_MEMORIES: usize = 2;
/// Tables one plugin may define: a Rust component has two (the program's and the one of
/// the shim linking its imports); four leave room for other toolchains.
pub const MAX_TABLES: usize = 4;
/// Core instances in one plugin's store (a componentize-py component has about 20).
pub const MAX_INSTANCES: usize = 64;
/// What one table element costs the host, charged to the plugin's memory budget.
const TABLE_ELEMENT_BYTES: usize = 8;

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
    #[error("did not answer within {0:?} and was stopped")]
    Timeout(Duration),
    #[error("worker thread is gone")]
    WorkerGone,
    /// The host's own packed batch did not read back as records: a host bug, not the plugin's.
    #[error("the batch could not be read back as records: {0}")]
    Batch(String),
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
            PluginError::Batch(_) => "batch",
        }
    }
}

/// The store's data: WASI (no files, no sockets, no env), limits, capabilities and the
/// deadline of the call in progress.
pub struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    caps: Arc<Capabilities>,
    deadline: Instant,
    /// `clickhouse.execute` verdicts by statement shape.
    checked_sql: clickhouse_sql::CheckedStatements,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl PluginState {
    /// A store's data: no files, no sockets, no environment; stdout and stderr go to the host
    /// log as the plugin's lines.
    pub(crate) fn new(
        caps: Arc<Capabilities>,
        memory_bytes: usize,
        deadline: Instant,
    ) -> PluginState {
        let wasi = wasmtime_wasi::WasiCtxBuilder::new()
            .stdout(PluginOutput::new(caps.clone(), "stdout"))
            .stderr(PluginOutput::new(caps.clone(), "stderr"))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        PluginState {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(memory_bytes),
            caps,
            deadline,
            checked_sql: clickhouse_sql::CheckedStatements::default(),
        }
    }

    /// When the call in progress must be over.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Time left in the call in progress: every capability call uses it as its own timeout,
    /// and is refused with `failed("deadline exceeded")` once none is left.
    pub fn remaining(&self) -> Result<Duration, CapabilityError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(deadline_exceeded());
        }
        Ok(left)
    }

    /// Runs a capability's future on the host runtime, at most for the time left in the call:
    /// nothing is started after the deadline and what runs at the deadline is dropped
    /// (cancelled), so no request or command leaves for a call the host gave up on.
    pub fn within<T>(&self, fut: impl Future<Output = T>) -> Result<T, CapabilityError> {
        let left = self.remaining()?;
        self.caps
            .services
            .runtime
            .block_on(async { tokio::time::timeout(left, fut).await })
            .map_err(|_| deadline_exceeded())
    }

    /// [`PluginState::within`] for a capability's fallible future.
    pub fn block_on<T>(
        &self,
        fut: impl Future<Output = Result<T, CapabilityError>>,
    ) -> Result<T, CapabilityError> {
        self.within(fut).and_then(|r| r)
    }
}

/// The most a plugin hands the host in one capability call: request bodies and headers, Redis
/// commands, rows to insert. wasmtime copies the arguments out of the guest before the host
/// sees them (that copy is bounded by the plugin's memory budget); this bounds what the host
/// builds and keeps from them (request clones, encodings, buffers) and says so to the plugin.
pub const MAX_CAPABILITY_ARGS_BYTES: usize = 16 << 20;

/// Refuses a capability call whose arguments are larger than [`MAX_CAPABILITY_ARGS_BYTES`].
pub fn check_args_size(what: &str, bytes: usize) -> Result<(), CapabilityError> {
    if bytes > MAX_CAPABILITY_ARGS_BYTES {
        return Err(CapabilityError::Failed(format!(
            "{what}: {bytes} bytes of arguments in one call, more than the \
             {MAX_CAPABILITY_ARGS_BYTES} a capability call takes"
        )));
    }
    Ok(())
}

fn deadline_exceeded() -> CapabilityError {
    CapabilityError::Failed("deadline exceeded".into())
}

/// One memory budget for the whole store: every linear memory and every table of every core
/// instance counts against it (the store lives as long as one instance of the plugin, so
/// nothing is ever given back). Remembers a refusal, so that the trap that follows (Rust
/// aborts when allocation fails) is reported as out-of-memory.
struct MemoryLimiter {
    max_bytes: usize,
    used_bytes: usize,
    denied: bool,
}

impl MemoryLimiter {
    fn new(max_bytes: usize) -> Self {
        MemoryLimiter {
            max_bytes,
            used_bytes: 0,
            denied: false,
        }
    }

    fn charge(&mut self, more: usize) -> bool {
        match self.used_bytes.checked_add(more) {
            Some(total) if total <= self.max_bytes => {
                self.used_bytes = total;
                true
            }
            _ => {
                self.denied = true;
                false
            }
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(self.charge(desired.saturating_sub(current)))
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let elements = desired.saturating_sub(current);
        Ok(self.charge(elements.saturating_mul(TABLE_ELEMENT_BYTES)))
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

/// Epoch ticks until `deadline` (at least one: zero would trap at once).
fn ticks_until(deadline: Instant) -> u64 {
    let left = deadline.saturating_duration_since(Instant::now());
    (left.as_millis() / EPOCH_TICK.as_millis()).saturating_add(1) as u64
}

/// Compiled plugin code plus everything needed to instantiate it again.
struct Prepared {
    engine: Engine,
    component: Component,
    linker: Arc<Linker<PluginState>>,
    kind: SinkKind,
    caps: Arc<Capabilities>,
    config_json: String,
    fuel_per_call: u64,
    memory_bytes: usize,
    timeout: Duration,
}

/// One live instance of a plugin.
struct Live {
    store: Store<PluginState>,
    exports: Exports,
}

enum Exports {
    Records(SinkPlugin),
    Packed(PackedSinkPlugin),
}

impl Prepared {
    /// A fresh instance, `init` called, all before `deadline`.
    fn instantiate(&self, deadline: Instant) -> Result<Live, PluginError> {
        let state = PluginState::new(self.caps.clone(), self.memory_bytes, deadline);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        // Past the deadline the next epoch check in Wasm code traps (Trap::Interrupt).
        store.epoch_deadline_callback(|cx| {
            let deadline = cx.data().deadline;
            if Instant::now() >= deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Continue(ticks_until(deadline)))
            }
        });
        store.set_epoch_deadline(ticks_until(deadline));
        // An engine without fuel metering has no fuel to set (see `engine_with`).
        if store.get_fuel().is_ok() {
            store
                .set_fuel(self.fuel_per_call)
                .map_err(|e| PluginError::Init(e.to_string()))?;
        }
        let (exports, result) = match self.kind {
            SinkKind::Records => {
                let plugin = SinkPlugin::instantiate(&mut store, &self.component, &self.linker)
                    .map_err(|e| self.classify(e, &store))
                    .map_err(as_init)?;
                let result = plugin
                    .fanout_sink_sink()
                    .call_init(&mut store, &self.config_json);
                (Exports::Records(plugin), result)
            }
            SinkKind::Packed => {
                let plugin =
                    PackedSinkPlugin::instantiate(&mut store, &self.component, &self.linker)
                        .map_err(|e| self.classify(e, &store))
                        .map_err(as_init)?;
                let result = plugin
                    .fanout_sink_packed_sink()
                    .call_init(&mut store, &self.config_json);
                (Exports::Packed(plugin), result)
            }
        };
        let result = result
            .map_err(|e| self.classify(e, &store))
            .map_err(as_init)?;
        // The plugin's own words: cut and escaped before they reach logs and /healthz.
        result.map_err(|m| {
            PluginError::Init(crate::deadletter::escape_truncate(
                &m,
                crate::deadletter::MAX_REASON_BYTES,
            ))
        })?;
        // Woken by the deadline (a capped sleep) and returned before an epoch check ran.
        if Instant::now() > deadline {
            return Err(as_init(PluginError::Timeout(self.timeout)));
        }
        Ok(Live { store, exports })
    }

    fn write(
        &self,
        live: &mut Live,
        batch: &PluginBatch,
        deadline: Instant,
    ) -> Result<WriteOutcome, PluginError> {
        live.store.data_mut().deadline = deadline;
        live.store.set_epoch_deadline(ticks_until(deadline));
        if live.store.get_fuel().is_ok() {
            live.store
                .set_fuel(self.fuel_per_call)
                .map_err(|e| PluginError::Trap(e.to_string()))?;
        }
        let outcome = match &live.exports {
            Exports::Records(plugin) => {
                let wit = batch.wit().map_err(|e| PluginError::Batch(e.to_string()))?;
                plugin.fanout_sink_sink().call_write(&mut live.store, &wit)
            }
            Exports::Packed(plugin) => plugin
                .fanout_sink_packed_sink()
                .call_write(&mut live.store, batch.packed()),
        }
        .map_err(|e| self.classify(e, &live.store))?;
        // An answer after the deadline is a timeout too: the caller may have given up on it.
        if Instant::now() > deadline {
            return Err(PluginError::Timeout(self.timeout));
        }
        Ok(outcome)
    }

    fn classify(&self, e: wasmtime::Error, store: &Store<PluginState>) -> PluginError {
        match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => return PluginError::Timeout(self.timeout),
            Some(Trap::OutOfFuel) => return PluginError::OutOfFuel,
            _ => {}
        }
        if store.data().limiter.denied {
            return PluginError::OutOfMemory((self.memory_bytes / (1024 * 1024)) as u64);
        }
        // A trap after the deadline (a plugin panicking on `deadline exceeded`) is a timeout.
        if Instant::now() >= store.data().deadline {
            return PluginError::Timeout(self.timeout);
        }
        PluginError::Trap(format!("{e:#}"))
    }
}

/// Failures while starting an instance are `init` failures: not the batch's fault.
fn as_init(e: PluginError) -> PluginError {
    match e {
        PluginError::Init(_) => e,
        other => PluginError::Init(other.to_string()),
    }
}

struct Job {
    batch: Arc<PluginBatch>,
    deadline: Instant,
    reply: oneshot::Sender<Result<WriteOutcome, PluginError>>,
}

/// A loaded plugin: one worker thread owning the store, fed batches through a channel.
pub struct Plugin {
    pub config: PluginConfig,
    /// sha256 of the `.wasm` file this version was compiled from, hex.
    pub sha256: String,
    /// The sink interface the component exports, with its WIT version
    /// (`fanout:sink/packed-sink@0.1.3`).
    pub wit_export: String,
    prepared: Arc<Prepared>,
    worker: std::sync::Mutex<std::sync::mpsc::Sender<Job>>,
    /// Set once the first batch was taken, for the operator's start-up log.
    first_batch: std::sync::atomic::AtomicBool,
}

/// The default engine: epoch interruption, no fuel metering.
pub fn engine() -> Result<Engine, PluginError> {
    engine_with(false)
}

/// The engine shared by the given plugins: epoch interruption (advanced every [`EPOCH_TICK`]
/// by a thread that ends with the engine), component model, and fuel metering when one of
/// them sets `fuel_per_call`.
pub fn engine_for(plugins: &[PluginConfig]) -> Result<Engine, PluginError> {
    engine_with(plugins.iter().any(|p| p.fuel_per_call.is_some()))
}

/// An engine with or without fuel metering (epoch interruption is always on: it is what
/// enforces call deadlines). Without fuel, `fuel_per_call` is not enforced.
pub fn engine_with(fuel: bool) -> Result<Engine, PluginError> {
    let mut cfg = wasmtime::Config::new();
    cfg.consume_fuel(fuel);
    cfg.epoch_interruption(true);
    // scripts/profile: name plugin functions for `perf` (/tmp/perf-<pid>.map).
    if std::env::var_os("FANOUT_WASM_PERFMAP").is_some_and(|v| v == "1") {
        cfg.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    let engine = Engine::new(&cfg).map_err(|e| PluginError::Load {
        path: "<engine>".into(),
        message: e.to_string(),
    })?;
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("wasm-epoch".into())
        .spawn(move || {
            // Ticks follow the clock, not the number of wake-ups: on a loaded machine a late
            // wake-up catches up, so deadlines (counted in ticks) stay in real time.
            let start = Instant::now();
            let mut ticks: u128 = 0;
            loop {
                std::thread::sleep(EPOCH_TICK);
                let Some(engine) = weak.upgrade() else { return };
                let due = start.elapsed().as_millis() / EPOCH_TICK.as_millis();
                while ticks < due {
                    engine.increment_epoch();
                    ticks += 1;
                }
            }
        })
        .map_err(|e| PluginError::Load {
            path: "<engine>".into(),
            message: format!("cannot start the epoch thread: {e}"),
        })?;
    Ok(engine)
}

/// The WASI clock interface whose sleeps are bounded by the call's deadline.
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// The linker every plugin is instantiated with: WASI p2 plus all capability interfaces.
/// WASI sleeps (`subscribe-duration`, `subscribe-instant`, what `std::thread::sleep` and
/// `poll` use) are replaced by ones that wake up at the call's deadline at the latest: a
/// sleeping guest is not running Wasm code, so epochs alone would not stop it.
pub fn linker(engine: &Engine) -> Result<Arc<Linker<PluginState>>, PluginError> {
    use wasmtime_wasi::clocks::WasiClocksView;
    use wasmtime_wasi::p2::bindings::clocks::monotonic_clock::Host as Clock;

    let mut linker = Linker::new(engine);
    let load_err = |e: wasmtime::Error| PluginError::Load {
        path: "<linker>".into(),
        message: e.to_string(),
    };
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(load_err)?;
    SinkPlugin::add_to_linker::<PluginState, HasSelf<PluginState>>(&mut linker, |s| s)
        .map_err(load_err)?;
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK).map_err(load_err)?;
    clock
        .func_wrap(
            "subscribe-duration",
            |mut cx: StoreContextMut<'_, PluginState>,
             (nanos,): (u64,)|
             -> wasmtime::Result<(Resource<DynPollable>,)> {
                let capped = capped_sleep(cx.data(), nanos);
                Ok((cx.data_mut().clocks().subscribe_duration(capped)?,))
            },
        )
        .map_err(load_err)?;
    clock
        .func_wrap(
            "subscribe-instant",
            |mut cx: StoreContextMut<'_, PluginState>,
             (when,): (u64,)|
             -> wasmtime::Result<(Resource<DynPollable>,)> {
                let now = cx.data_mut().clocks().now()?;
                let capped = capped_sleep(cx.data(), when.saturating_sub(now));
                Ok((cx.data_mut().clocks().subscribe_duration(capped)?,))
            },
        )
        .map_err(load_err)?;
    linker.allow_shadowing(false);
    Ok(Arc::new(linker))
}

/// A sleep of `nanos`, cut to end one tick after the call's deadline (the guest then runs
/// Wasm code again and the epoch check stops it).
fn capped_sleep(state: &PluginState, nanos: u64) -> u64 {
    let left = state.deadline.saturating_duration_since(Instant::now()) + EPOCH_TICK;
    nanos.min(u64::try_from(left.as_nanos()).unwrap_or(u64::MAX))
}

/// Refuses components that define more memories or tables than a plugin needs (each would
/// be one more allocation the store could make), before anything is instantiated.
fn check_shape(component: &Component) -> Result<(), String> {
    let Some(needs) = component.resources_required() else {
        return Err(
            "the component imports core modules or instances: its memory cannot be \
                    known before it runs"
                .into(),
        );
    };
    if needs.num_memories as usize > MAX_MEMORIES {
        return Err(format!(
            "the component defines {} linear memories; a plugin may have at most {MAX_MEMORIES}",
            needs.num_memories
        ));
    }
    if needs.num_tables as usize > MAX_TABLES {
        return Err(format!(
            "the component defines {} tables; a plugin may have at most {MAX_TABLES}",
            needs.num_tables
        ));
    }
    Ok(())
}

impl Plugin {
    /// Compiles the component, checks its shape, instantiates it once and calls `init` (so a
    /// broken plugin or config fails at start-up, not on the first batch).
    pub fn load(
        config: PluginConfig,
        engine: &Engine,
        linker: Arc<Linker<PluginState>>,
        services: Arc<Services>,
    ) -> Result<Self, PluginError> {
        let path = config.path.display().to_string();
        let load_err = |message: String| PluginError::Load {
            path: path.clone(),
            message,
        };
        let compiled = cache::load(engine, &config.path, config.compile_cache.as_deref())
            .map_err(|e| load_err(format!("{e:#}")))?;
        let (component, sha256, cached) = (compiled.component, compiled.sha256, compiled.cached);
        check_shape(&component).map_err(load_err)?;
        let kind = SinkKind::of(&component, engine);
        let wit_export = component
            .component_type()
            .exports(engine)
            .map(|(name, _)| name.to_string())
            .find(|name| name.starts_with(kind.export_name()))
            .unwrap_or_else(|| kind.export_name().to_string());
        if config.fuel_per_call.is_some() && Store::new(engine, ()).get_fuel().is_err() {
            return Err(load_err(
                "fuel_per_call is set but the engine does not meter fuel (build it with \
                 engine_for over the configured plugins)"
                    .into(),
            ));
        }
        let config_json = serde_json::to_string(&config.config)
            .map_err(|e| load_err(format!("config is not representable as JSON: {e}")))?;
        let timeout = Duration::from_millis(config.call_timeout_ms);
        let prepared = Arc::new(Prepared {
            engine: engine.clone(),
            component,
            linker,
            kind,
            caps: Arc::new(Capabilities::new(
                config.name.clone(),
                config.grants.clone(),
                services,
            )),
            config_json,
            fuel_per_call: config.fuel_per_call.unwrap_or(u64::MAX),
            memory_bytes: usize::try_from(config.memory_mb.saturating_mul(1024 * 1024))
                .unwrap_or(usize::MAX),
            timeout,
        });
        let live = prepared.instantiate(Instant::now() + timeout)?;
        info!(plugin = %config.name, path = %path, %sha256, cached, exports = kind.export_name(), "plugin loaded");
        let worker = spawn_worker(config.name.clone(), prepared.clone(), Some(live));
        Ok(Plugin {
            config,
            sha256,
            wit_export,
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

    /// Hands one batch to the plugin and waits for its answer. The call (and `init`, when it
    /// needs a fresh instance) must end by `call_timeout_ms` from now; the worker stops it
    /// there, so the answer comes at most a tick later.
    pub async fn write(&self, batch: Arc<PluginBatch>) -> Result<WriteOutcome, PluginError> {
        let timeout = self.prepared.timeout;
        let deadline = Instant::now() + timeout;
        let (reply, answer) = oneshot::channel();
        let sent = self
            .worker
            .lock()
            .map_err(|_| PluginError::WorkerGone)?
            .send(Job {
                batch,
                deadline,
                reply,
            });
        if sent.is_err() {
            self.replace_worker();
            return Err(PluginError::WorkerGone);
        }
        match tokio::time::timeout(timeout + STOP_GRACE, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => {
                // The worker thread ended (a panic): nothing of it is left to wait for.
                self.replace_worker();
                Err(PluginError::WorkerGone)
            }
            Err(_) => {
                // Still not stopped: no second worker starts beside it; the next call queues
                // behind this one on the same thread.
                error!(plugin = %self.config.name, "plugin call still running {STOP_GRACE:?} past its deadline");
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
            let result = run_job(&prepared, &mut live, &job);
            if let Err(e) = &result {
                // A trapped or stopped instance may hold broken state: never reuse it. It is
                // dropped here, before this thread takes the next call.
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

fn run_job(
    prepared: &Prepared,
    live: &mut Option<Live>,
    job: &Job,
) -> Result<WriteOutcome, PluginError> {
    // Queued behind a call that overran: its caller has given up already.
    if Instant::now() >= job.deadline {
        return Err(PluginError::Timeout(prepared.timeout));
    }
    let l = match live {
        Some(l) => l,
        None => {
            let fresh = prepared.instantiate(job.deadline)?;
            // The instance before this one was discarded (a failed call): a restart.
            prepared.caps.services.metrics.add_labelled(
                "fanout_plugin_restarts_total",
                &crate::metrics::label("plugin", &prepared.caps.plugin),
                1.0,
            );
            live.insert(fresh)
        }
    };
    prepared.write(l, &job.batch, job.deadline)
}

/// Compiles a .wasm file and checks that it is a component of the sink-plugin world whose
/// imports this host provides. Does not run it.
pub fn check(path: &std::path::Path) -> Result<String, PluginError> {
    let load = |e: wasmtime::Error| PluginError::Load {
        path: path.display().to_string(),
        message: format!("{e:#}"),
    };
    let engine = engine_with(false)?;
    let linker = linker(&engine)?;
    let component = Component::from_file(&engine, path).map_err(load)?;
    check_shape(&component).map_err(|message| PluginError::Load {
        path: path.display().to_string(),
        message,
    })?;
    let pre = linker.instantiate_pre(&component).map_err(load)?;
    let kind = SinkKind::of(&component, &engine);
    match kind {
        SinkKind::Records => drop(bindings::SinkPluginPre::new(pre).map_err(load)?),
        SinkKind::Packed => drop(packed_bindings::PackedSinkPluginPre::new(pre).map_err(load)?),
    }
    let imports: Vec<String> = component
        .component_type()
        .imports(&engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let shape = component
        .resources_required()
        .map(|r| {
            format!(
                "{} linear memories (at most {MAX_MEMORIES}), {} tables (at most {MAX_TABLES})",
                r.num_memories, r.num_tables
            )
        })
        .unwrap_or_default();
    Ok(format!(
        "ok: {} exports {}, compatible with this host's fanout:sink@{WIT_VERSION}\ndefines: {shape}\nimports: {}",
        path.display(),
        kind.export_name(),
        imports.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wit_version_is_the_packages() {
        let wit = include_str!("../../../wit/sink.wit");
        assert!(
            wit.contains(&format!("\npackage fanout:sink@{WIT_VERSION};")),
            "WIT_VERSION {WIT_VERSION} is not wit/sink.wit's package version"
        );
    }

    /// A store of core Wasm under the plugin limiter with `mib` of budget.
    fn limited_store(mib: usize) -> Store<MemoryLimiter> {
        let engine = Engine::default();
        let mut store = Store::new(&engine, MemoryLimiter::new(mib << 20));
        store.limiter(|l| l);
        store
    }

    #[test]
    fn memories_share_one_budget() {
        // Two memories of 24 MiB (384 pages) each: each fits 32 MiB, both do not.
        let mut store = limited_store(32);
        let wat = "(module (memory 384) (memory 384))";
        let module = wasmtime::Module::new(store.engine(), wat).expect("module");
        let err = wasmtime::Instance::new(&mut store, &module, &[]);
        assert!(err.is_err(), "the second memory is over the budget");
        assert!(store.data().denied);
        // A third memory is refused whatever its size (MAX_MEMORIES).
        let mut store = limited_store(32);
        let wat = "(module (memory 1) (memory 1) (memory 1))";
        let module = wasmtime::Module::new(store.engine(), wat).expect("module");
        assert!(wasmtime::Instance::new(&mut store, &module, &[]).is_err());
        // Two of them fit.
        let mut store = limited_store(32);
        let module = wasmtime::Module::new(store.engine(), "(module (memory 256) (memory 256))")
            .expect("module");
        wasmtime::Instance::new(&mut store, &module, &[]).expect("within the budget");
        assert_eq!(store.data().used_bytes, 32 << 20);
    }

    #[test]
    fn tables_count_against_the_memory_budget() {
        let mut store = limited_store(4);
        let wat = r#"(module (table $t 0 funcref)
            (func (export "grow") (param i32) (result i32)
                (table.grow $t (ref.null func) (local.get 0))))"#;
        let module = wasmtime::Module::new(store.engine(), wat).expect("module");
        let instance = wasmtime::Instance::new(&mut store, &module, &[]).expect("instance");
        let grow = instance
            .get_typed_func::<i32, i32>(&mut store, "grow")
            .expect("grow");
        // 1M elements at 8 bytes: 8 MiB, over the 4 MiB budget; 100k elements fit.
        assert_eq!(grow.call(&mut store, 1_000_000).expect("call"), -1);
        assert!(store.data().denied);
        assert_eq!(grow.call(&mut store, 100_000).expect("call"), 0);
    }

    #[test]
    fn too_many_memories_or_tables_are_refused_at_load() {
        let engine = Engine::default();
        let memories: String = (0..12).map(|_| "(memory 1)").collect();
        let wat =
            format!("(component (core module $m {memories}) (core instance (instantiate $m)))");
        let component = Component::new(&engine, &wat).expect("component");
        let why = check_shape(&component).expect_err("12 memories");
        assert!(why.contains("12 linear memories"), "{why}");
        let tables: String = (0..100).map(|_| "(table 1 funcref)").collect();
        let wat = format!("(component (core module $m {tables}) (core instance (instantiate $m)))");
        let component = Component::new(&engine, &wat).expect("component");
        let why = check_shape(&component).expect_err("100 tables");
        assert!(why.contains("100 tables"), "{why}");
        let wat = "(component (core module $m (memory 1) (table 1 funcref)) (core instance (instantiate $m)))";
        let component = Component::new(&engine, wat).expect("component");
        check_shape(&component).expect("one memory, one table");
    }

    #[test]
    fn plugin_check_says_why_a_component_is_refused() {
        let dir = std::env::temp_dir().join(format!("fanout-shape-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("many_memories.wat");
        let memories: String = (0..12).map(|_| "(memory 1)").collect();
        std::fs::write(
            &path,
            format!("(component (core module $m {memories}) (core instance (instantiate $m)))"),
        )
        .expect("write");
        let err = check(&path).expect_err("refused");
        assert!(err.to_string().contains("12 linear memories"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What fuel and epoch checks cost Wasm code: a call-heavy loop (the worst case: a check at
    /// every call and loop iteration) under each (`cargo test -p fanout --lib epoch_cost -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn epoch_cost() {
        let wat = r#"(module
            (func $f (param i32) (result i32) (i32.add (local.get 0) (i32.const 1)))
            (func (export "run") (param i32) (result i32) (local $acc i32)
                (loop $l
                    (local.set $acc (call $f (local.get $acc)))
                    (br_if $l (i32.lt_u (local.get $acc) (local.get 0))))
                (local.get $acc)))"#;
        let variants = [(false, false), (true, false), (false, true), (true, true)];
        let mut best = [Duration::MAX; 4];
        for _ in 0..5 {
            for (i, (fuel, epochs)) in variants.into_iter().enumerate() {
                let mut cfg = wasmtime::Config::new();
                cfg.consume_fuel(fuel);
                cfg.epoch_interruption(epochs);
                let engine = Engine::new(&cfg).expect("engine");
                let module = wasmtime::Module::new(&engine, wat).expect("module");
                let mut store = Store::new(&engine, ());
                if fuel {
                    store.set_fuel(u64::MAX).expect("fuel");
                }
                store.set_epoch_deadline(u64::MAX / 2);
                let instance = wasmtime::Instance::new(&mut store, &module, &[]).expect("instance");
                let run = instance
                    .get_typed_func::<i32, i32>(&mut store, "run")
                    .expect("run");
                let t = Instant::now();
                run.call(&mut store, 100_000_000).expect("call");
                best[i] = best[i].min(t.elapsed());
            }
        }
        eprintln!(
            "100M calls in a loop: neither {:?}, fuel {:?}, epochs {:?}, fuel + epochs {:?}",
            best[0], best[1], best[2], best[3]
        );
    }

    #[test]
    fn capability_arguments_are_capped() {
        assert!(check_args_size("redis", MAX_CAPABILITY_ARGS_BYTES).is_ok());
        let e = check_args_size("redis", MAX_CAPABILITY_ARGS_BYTES + 1).expect_err("too big");
        assert!(
            matches!(&e, CapabilityError::Failed(m) if m.starts_with("redis: 16777217 bytes")),
            "{e:?}"
        );
    }

    #[test]
    fn sleeps_end_one_tick_after_the_deadline() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let services = Arc::new(Services {
            runtime: rt.handle().clone(),
            redis: None,
            http: reqwest::Client::new(),
            clickhouse: None,
            clickhouse_inserts: None,
            metrics: crate::metrics::Metrics::default(),
            fakes: None,
        });
        let caps = Arc::new(Capabilities::new(
            "t".into(),
            crate::config::Grants::default(),
            services,
        ));
        let state = PluginState::new(caps, 1 << 20, Instant::now() + Duration::from_millis(100));
        let capped = capped_sleep(&state, 3_600_000_000_000);
        assert!(capped <= (Duration::from_millis(100) + EPOCH_TICK).as_nanos() as u64);
        assert_eq!(capped_sleep(&state, 5), 5, "short sleeps are left alone");
        assert!(state.remaining().is_ok());
        std::thread::sleep(Duration::from_millis(120));
        assert!(
            matches!(state.remaining(), Err(CapabilityError::Failed(m)) if m == "deadline exceeded")
        );
    }
}
