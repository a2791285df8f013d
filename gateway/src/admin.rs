//! The admin listener: metrics and probes open, everything else behind `ACC_ADMIN_TOKEN`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{header, HeaderValue, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::server::App;

pub fn router(app: Arc<App>) -> Router {
    let protected = Router::new()
        .route("/admin/policies", get(policies))
        .route("/admin/reload", post(reload))
        .route("/admin/routes", get(routes))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .merge(protected)
        .fallback(|| async { ApiError::not_found("unknown_url", "unknown admin path").into_response() })
        .layer(tower::ServiceBuilder::new().layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::internal("internal error").into_response()
        })))
        .with_state(app)
}

async fn require_token(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let Some(expected) = &app.admin_token_digest else {
        return ApiError::unauthorized("admin endpoints are disabled: set ACC_ADMIN_TOKEN to enable them")
            .into_response();
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| Sha256::digest(t.trim().as_bytes()));
    // Comparing digests keeps the comparison's timing independent of the token's bytes.
    if given.is_some_and(|g| g.as_slice() == expected.as_slice()) {
        next.run(req).await
    } else {
        ApiError::unauthorized("missing or wrong admin token").into_response()
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let mut r = Response::new(axum::body::Body::from(app.metrics.render()));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    r
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    let snap = app.policy.snapshot();
    let draining = app.draining.load(Ordering::Relaxed);
    let status = if draining { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    // Which evaluators can run, and why not: a missing model is a degraded gateway, not a
    // dead one (routes apply their fail-open/fail-closed rule), so readiness stays 200.
    let evaluators: serde_json::Map<String, serde_json::Value> = app
        .evaluator_status
        .iter()
        .map(|(name, state)| {
            let v = match state {
                Ok(()) => json!("ready"),
                Err(why) => json!(format!("unavailable: {why}")),
            };
            (name.to_string(), v)
        })
        .collect();
    let body = json!({
        "status": if draining { "draining" } else { "ready" },
        "policy_version": snap.policy.version,
        "evaluators": evaluators,
    });
    (status, Json(body)).into_response()
}

async fn policies(State(app): State<Arc<App>>) -> Response {
    let snap = app.policy.snapshot();
    let loaded = snap.loaded_at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let status = app.policy.status();
    Json(json!({
        "version": snap.policy.version,
        "files": snap.policy.files,
        "loaded_at_unix": loaded,
        "last_reload_error": status.last_error,
        "last_reload_error_at_unix": status.last_error_at_unix,
        "warnings": snap.policy.warnings,
    }))
    .into_response()
}

async fn reload(State(app): State<Arc<App>>) -> Response {
    match app.policy.reload(true, "admin").await {
        Ok(version) => Json(json!({"result": "ok", "version": version})).into_response(),
        Err(errors) => {
            let mut e = ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                "invalid_policy",
                format!("policy refused, the last good policy keeps serving: {}", errors.join("; ")),
            );
            e.param = None;
            e.into_response()
        }
    }
}

async fn routes(State(app): State<Arc<App>>) -> Response {
    let snap = app.policy.snapshot();
    let p = &snap.policy;
    let routes: Vec<_> = p
        .routes
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "match": {"model": r.matcher.model, "cohort": r.matcher.cohort, "key_tags": r.matcher.key_tags},
                "targets": r.targets.iter().map(|t| json!({"provider": t.provider, "model": t.model, "weight": t.weight})).collect::<Vec<_>>(),
                "fallbacks": r.fallbacks.iter().map(|&i| p.routes[i].name.clone()).collect::<Vec<_>>(),
                "attempt_timeout_ms": r.attempt_timeout.as_millis() as u64,
                "deadline_ms": r.deadline.as_millis() as u64,
            })
        })
        .collect();
    let providers: Vec<_> = p
        .providers
        .values()
        .map(|s| {
            let kind = match &s.kind {
                crate::policy::ProviderKind::Builtin => "builtin",
                crate::policy::ProviderKind::OpenAi { .. } => "openai",
            };
            json!({"name": s.name, "kind": kind})
        })
        .collect();
    Json(json!({"version": p.version, "routes": routes, "providers": providers})).into_response()
}
