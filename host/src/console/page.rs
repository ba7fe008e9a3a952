//! The console's routes: the page, its vendored chart library, and the JSON it polls.

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};

use super::Console;

const PAGE: &str = include_str!("console.html");
const UPLOT_JS: &str = include_str!("../../assets/uplot/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../assets/uplot/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("../../assets/uplot/LICENSE");

/// `/` (the page), `/api/console` (its data), `/console/*` (uPlot and its license).
pub fn router(console: Console) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/api/console", get(data))
        .route(
            "/console/uPlot.iife.min.js",
            get(|| async { ([(header::CONTENT_TYPE, "text/javascript")], UPLOT_JS) }),
        )
        .route(
            "/console/uPlot.min.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css")], UPLOT_CSS) }),
        )
        .route(
            "/console/LICENSE-uPlot.txt",
            get(|| async { ([(header::CONTENT_TYPE, "text/plain")], UPLOT_LICENSE) }),
        )
        .with_state(console)
}

async fn data(State(console): State<Console>) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(console.snapshot()),
    )
}
