//! The operator console at `GET /console`: server-rendered HTML with SVG
//! plots, refreshed in place by a few lines of script that fetch
//! `/console/panels`. Nothing is loaded from elsewhere (a strict
//! Content-Security-Policy says so to the browser), so it works offline.
//!
//! Who may look: callers on loopback, and anyone with the admin token
//! (`Authorization: Bearer`, or the cookie that `POST /console/login` sets
//! from the token form). Without an admin token, loopback only.
//!
//! # Layout
//! - [`history`]: the bounded ring of samples the plots are drawn from.
//! - [`plots`]: plotters' SVG charts and the timetable strip.
//! - [`page`]: the HTML.

pub mod history;
pub mod page;
pub mod plots;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::http::{ApiState, same_token};
use crate::scaler::Shared;
use history::{Cost, Sample};
use page::View;
use plots::StripWindow;

/// Nothing but this origin: scripts, styles and fetches; no frames, no
/// forms elsewhere. The SVG is inline markup, not a loaded image.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";
const COOKIE: &str = "ebb_console";
/// The shortest time the plots span (5 minutes), however young the history.
const MIN_SPAN_HOURS: f64 = 5.0 / 60.0;
const SCRIPT: &str = include_str!("console.js");
const STYLE: &str = include_str!("console.css");

/// The console's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsoleArgs {
    /// How often the console takes a sample (its plots' resolution) and
    /// refreshes an open page; a day of samples is kept.
    #[arg(long, env = "EBB_CONSOLE_STEP", default_value = "10s", value_parser = ebb_runtime::duration::parse)]
    pub console_step: Duration,
}

pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/console", get(console))
        .route("/console/panels", get(panels))
        .route("/console/login", post(login))
        .route(
            "/console/console.js",
            get(|| asset(SCRIPT, "text/javascript")),
        )
        .route("/console/console.css", get(|| asset(STYLE, "text/css")))
}

/// Takes a sample every `step` until `stopping`.
pub async fn keep_history(shared: Arc<Shared>, stopping: CancellationToken) {
    let step = shared.history().step();
    let mut every = tokio::time::interval(step);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        tokio::select! {
            () = stopping.cancelled() => return,
            _ = every.tick() => {}
        }
        let sample = Sample::new(
            Utc::now(),
            &shared.status(),
            shared.traffic.take_step(),
            step,
        );
        shared.history().push(sample);
    }
}

#[derive(Debug, Deserialize)]
struct Range {
    hours: Option<u32>,
}

impl Range {
    fn hours(&self) -> f64 {
        let hours = self.hours.unwrap_or(1);
        let mut offered = page::RANGES.iter().map(|(h, _)| *h);
        f64::from(offered.find(|&h| h >= hours).unwrap_or(24))
    }
}

/// The whole page, or the token form for a caller who may not look.
async fn console(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(range): Query<Range>,
) -> Response {
    match look(&state, peer, &headers, &range) {
        Some(view) => html(page::page(&view)).into_response(),
        None => (StatusCode::UNAUTHORIZED, html(login_page(&state))).into_response(),
    }
}

/// The panels alone, for the page's refresh.
async fn panels(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(range): Query<Range>,
) -> Response {
    match look(&state, peer, &headers, &range) {
        Some(view) => html(page::panels(&view).into_string()).into_response(),
        None => (StatusCode::UNAUTHORIZED, html("signed out".to_owned())).into_response(),
    }
}

/// The view now, if the caller may look.
fn look(state: &ApiState, peer: SocketAddr, headers: &HeaderMap, range: &Range) -> Option<View> {
    may_look(state.admin_token.as_deref(), peer, headers)
        .then(|| view(state, range.hours(), Utc::now()))
}

#[derive(Debug, Deserialize)]
struct Login {
    token: String,
}

/// Checks the token and keeps a digest of it in an HTTP-only cookie, so
/// the page's own fetches are signed in too.
async fn login(State(state): State<Arc<ApiState>>, Form(login): Form<Login>) -> Response {
    let Some(expected) = &state.admin_token else {
        return (StatusCode::FORBIDDEN, html(login_page(&state))).into_response();
    };
    if !same_token(login.token.trim().as_bytes(), expected.as_bytes()) {
        return (StatusCode::UNAUTHORIZED, html(login_page(&state))).into_response();
    }
    let cookie = format!(
        "{COOKIE}={}; Path=/console; HttpOnly; SameSite=Strict",
        cookie_value(expected)
    );
    let mut response = Redirect::to("/console").into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// The cookie holds a digest, not the token itself.
fn cookie_value(token: &str) -> String {
    let digest = Sha256::digest(format!("ebb-console:{token}").as_bytes());
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn may_look(admin_token: Option<&str>, peer: SocketAddr, headers: &HeaderMap) -> bool {
    if peer.ip().is_loopback() {
        return true;
    }
    let Some(expected) = admin_token else {
        return false;
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .is_some_and(|(_, token)| same_token(token.trim().as_bytes(), expected.as_bytes()));
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .any(|value| same_token(value.as_bytes(), cookie_value(expected).as_bytes()));
    bearer || cookie
}

fn login_page(state: &ApiState) -> String {
    let open = state.admin_token.is_some();
    maud::html! {
        (maud::DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { "ebb console" } link rel="stylesheet" href="/console/console.css"; }
            body {
                h1 { "ebb console" }
                @if open {
                    form method="post" action="/console/login" {
                        label { "Admin token " input type="password" name="token" autocomplete="current-password"; }
                        button { "Sign in" }
                    }
                } @else {
                    p { "This scaler has no admin token (EBB_SCALER_ADMIN_TOKEN): its console is open on loopback only." }
                }
            }
        }
    }
    .into_string()
}

fn html(body: String) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

async fn asset(body: &'static str, content_type: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

/// What the page shows now: the loop's status, the history of the last
/// `hours`, today's cost and the timetable of the next day.
fn view(state: &ApiState, hours: f64, now: DateTime<Utc>) -> View {
    let shared = &state.shared;
    let status = shared.status();
    let (step, samples, today) = {
        let history = shared.history();
        let shown = history.since(now - chrono::Duration::minutes((hours * 60.0) as i64));
        let today = history.since(now - chrono::Duration::days(1));
        (history.step(), shown, today)
    };
    let controller = shared.controller.lock().expect("controller lock");
    let ebb = controller.autoscaler();
    let config = &ebb.policy.config;
    let prewarm_lead = ebb.policy.prewarm_lead(&status.signals);
    let (entries, windows) = strip(ebb, prewarm_lead, now);
    let history_hours = samples
        .first()
        .map_or(0.0, |first| (now - first.at).num_seconds() as f64 / 3600.0);
    View {
        now,
        hours,
        span_hours: history_hours.clamp(MIN_SPAN_HOURS, hours),
        step,
        cost: Cost::today(&today, step, now),
        samples,
        price_per_hour: config.resources.price_per_hour,
        latency_goal: config.target.latency_goal,
        entries,
        windows,
        prewarm_lead,
        status,
    }
}

/// The timetable's entries and their windows that touch the next 24 hours.
fn strip(
    ebb: &ebb_control::controller::EbbPolicy,
    lead: Duration,
    now: DateTime<Utc>,
) -> (Vec<String>, Vec<StripWindow>) {
    let hours_from_now = |at: DateTime<Utc>| (at - now).num_milliseconds() as f64 / 3_600_000.0;
    let lead_hours = lead.as_secs_f64() / 3600.0;
    let entries = ebb
        .policy
        .config
        .timetable_entries
        .iter()
        .map(|entry| entry.name.clone())
        .collect();
    let day = chrono::Duration::days(1);
    let windows = ebb
        .timetable()
        .windows_starting_between(now - day, now + day)
        .into_iter()
        .filter(|window| window.end > now)
        .map(|window| StripWindow {
            prewarm_at: hours_from_now(window.start) - lead_hours,
            start: hours_from_now(window.start),
            end: hours_from_now(window.end),
            label: format!("≥ {}", window.min_workers),
            learned: ebb
                .state
                .learned
                .profiles
                .get(&window.name)
                .cloned()
                .unwrap_or_default(),
            entry: window.name,
        })
        .collect();
    (entries, windows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_round_up_to_an_offered_one() {
        let hours = |hours| Range { hours }.hours();
        assert_eq!(hours(None), 1.0);
        assert_eq!(hours(Some(2)), 3.0);
        assert_eq!(hours(Some(24)), 24.0);
        assert_eq!(hours(Some(500)), 24.0);
    }

    #[test]
    fn loopback_may_look_and_others_need_the_token() {
        let loopback: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let remote: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let none = HeaderMap::new();
        assert!(may_look(None, loopback, &none));
        assert!(may_look(Some("secret"), loopback, &none));
        assert!(!may_look(None, remote, &none), "no token: loopback only");
        assert!(!may_look(Some("secret"), remote, &none));
        let with = |name, value: String| {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_str(&value).unwrap());
            headers
        };
        let bearer = with(header::AUTHORIZATION, "Bearer secret".into());
        assert!(may_look(Some("secret"), remote, &bearer));
        assert!(!may_look(None, remote, &bearer));
        let wrong = with(header::AUTHORIZATION, "Bearer guess".into());
        assert!(!may_look(Some("secret"), remote, &wrong));
        let cookie = with(
            header::COOKIE,
            format!("a=b; {COOKIE}={}", cookie_value("secret")),
        );
        assert!(may_look(Some("secret"), remote, &cookie));
        let raw = with(header::COOKIE, format!("{COOKIE}=secret"));
        assert!(
            !may_look(Some("secret"), remote, &raw),
            "the cookie is the digest"
        );
    }

    #[test]
    fn the_cookie_is_a_digest_of_the_token() {
        assert_ne!(cookie_value("secret"), "secret");
        assert_eq!(cookie_value("secret"), cookie_value("secret"));
        assert_ne!(cookie_value("secret"), cookie_value("other"));
    }
}
