//! The operator's HTTP endpoints: /metrics (Prometheus text), /healthz, and the operations
//! console at / (see [`crate::console`]).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tracing::{info, warn};

use crate::console::Console;
use crate::metrics::Metrics;

pub async fn serve(listen: String, metrics: Metrics, console: Console) {
    if listen.is_empty() {
        return;
    }
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .with_state(metrics)
        .merge(crate::console::router(console));
    match tokio::net::TcpListener::bind(&listen).await {
        Ok(listener) => {
            info!(%listen, console = %format!("http://{listen}/"), "metrics, health and the console listening");
            if let Err(e) = axum::serve(listener, app).await {
                warn!(error = %e, "http server stopped");
            }
        }
        Err(e) => warn!(error = %e, %listen, "cannot listen for /metrics (http.listen)"),
    }
}

async fn render_metrics(State(m): State<Metrics>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.render(),
    )
}

async fn healthz(State(m): State<Metrics>) -> impl IntoResponse {
    let problems = m.problems();
    // Notes (a refused plugin swap) follow the verdict, one `note: ` line each; they never
    // turn it to 503.
    let notes: String = m.notes().iter().map(|n| format!("note: {n}\n")).collect();
    if problems.is_empty() {
        (StatusCode::OK, format!("ok\n{notes}"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            problems.join("\n") + "\n" + &notes,
        )
    }
}
