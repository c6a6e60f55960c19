//! The status and metrics endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::metrics;
use crate::status::TaskStatus;

/// Binds `addr` and serves `/status` and `/metrics` until the process ends.
pub async fn serve(addr: SocketAddr, status: Arc<TaskStatus>) -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("--http {addr}: cannot listen: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let app = Router::new()
        .route("/status", get(status_handler))
        .route("/metrics", get(metrics_handler))
        .with_state(status);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "status endpoint stopped");
        }
    });
    Ok(bound)
}

async fn status_handler(State(status): State<Arc<TaskStatus>>) -> impl IntoResponse {
    Json(status.snapshot())
}

async fn metrics_handler(State(status): State<Arc<TaskStatus>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::render(&status),
    )
}
