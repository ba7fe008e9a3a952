//! Compiled plugins on disk, so that a restart (after a crash, an upgrade, a kill -9) does
//! not compile every component again: a Python component is ~18 MB and takes seconds of CPU.
//!
//! Key: the sha256 of the `.wasm` file and a hash of everything in the engine that compiled
//! code depends on (wasmtime's own `precompile_compatibility_hash`: its version, target and
//! settings such as fuel or epoch interruption). A file of another key is never loaded; a
//! cached file wasmtime refuses (a torn write, another build) is compiled again and replaced.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};
use wasmtime::component::Component;
use wasmtime::Engine;

/// A loaded component and how it came to be.
pub struct Loaded {
    pub component: Component,
    /// sha256 of the `.wasm` file, hex.
    pub sha256: String,
    /// True when it came from the cache.
    pub cached: bool,
}

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The cache file of a component: `<dir>/<sha256>-<engine hash>.cwasm`.
fn entry(dir: &Path, engine: &Engine, sha256: &str) -> PathBuf {
    // SipHash with fixed keys: stable across runs of one build, which is all a cache needs.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    dir.join(format!("{sha256}-{:016x}.cwasm", h.finish()))
}

/// Loads `path` from the cache under `dir` when it has it, else compiles it and stores it
/// there. `dir = None` compiles every time. A cache that cannot be written only costs time.
pub fn load(engine: &Engine, path: &Path, dir: Option<&Path>) -> wasmtime::Result<Loaded> {
    let bytes = std::fs::read(path)?;
    let sha256 = sha256_hex(&bytes);
    let Some(dir) = dir else {
        let component = Component::new(engine, &bytes)?;
        return Ok(Loaded {
            component,
            sha256,
            cached: false,
        });
    };
    let file = entry(dir, engine, &sha256);
    if file.exists() {
        // SAFETY: the file is one this host wrote with `Component::serialize` for this exact
        // engine configuration (the name says so) in a directory the operator gives it; wasmtime
        // checks the header and the engine compatibility again and refuses what does not match.
        match unsafe { Component::deserialize_file(engine, &file) } {
            Ok(component) => {
                debug!(path = %path.display(), cache = %file.display(), "compiled plugin from the cache");
                return Ok(Loaded {
                    component,
                    sha256,
                    cached: true,
                });
            }
            Err(e) => {
                warn!(cache = %file.display(), error = %e, "cached plugin unusable; compiling again")
            }
        }
    }
    let component = Component::new(engine, &bytes)?;
    if let Err(e) = store(&component, dir, &file) {
        warn!(cache = %file.display(), error = %e, "cannot write the compiled plugin to the cache");
    } else {
        info!(path = %path.display(), cache = %file.display(), "compiled plugin cached");
    }
    Ok(Loaded {
        component,
        sha256,
        cached: false,
    })
}

/// Write-then-rename: a reader never sees a half-written file.
fn store(component: &Component, dir: &Path, file: &Path) -> wasmtime::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, component.serialize()?)?;
    std::fs::rename(&tmp, file)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal component: no imports, no exports.
    const EMPTY_COMPONENT: &str = "(component)";

    #[test]
    fn compiles_once_then_loads_from_the_cache_and_survives_a_torn_file() {
        let dir = std::env::temp_dir().join(format!("fanout-cache-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let wasm = dir.join("empty.wasm");
        std::fs::create_dir_all(&dir).unwrap();
        // wasmtime reads the text format too.
        std::fs::write(&wasm, EMPTY_COMPONENT).unwrap();
        let engine = Engine::default();
        let cache = dir.join("cache");

        let first = load(&engine, &wasm, Some(&cache)).unwrap();
        assert!(!first.cached);
        assert_eq!(first.sha256.len(), 64);
        let second = load(&engine, &wasm, Some(&cache)).unwrap();
        assert!(second.cached, "the second load comes from the cache");

        // Another engine configuration never reads this entry.
        let mut cfg = wasmtime::Config::new();
        cfg.consume_fuel(true);
        let other = Engine::new(&cfg).unwrap();
        assert!(!load(&other, &wasm, Some(&cache)).unwrap().cached);

        // A torn cache file is compiled again and replaced.
        let file = entry(&cache, &engine, &first.sha256);
        std::fs::write(&file, b"not a compiled component").unwrap();
        assert!(!load(&engine, &wasm, Some(&cache)).unwrap().cached);
        assert!(load(&engine, &wasm, Some(&cache)).unwrap().cached);

        assert!(!load(&engine, &wasm, None).unwrap().cached);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
