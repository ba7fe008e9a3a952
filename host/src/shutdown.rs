//! Graceful shutdown: SIGINT or SIGTERM flips a watch channel every loop listens to.

use tokio::sync::watch;
use tracing::info;

/// Returns a receiver that turns true on the first SIGINT/SIGTERM.
pub fn on_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
            _ = term => info!("SIGTERM: shutting down"),
        }
        let _ = tx.send(true);
    });
    rx
}
