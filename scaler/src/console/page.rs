//! The console's HTML: the whole page, and the panels the page's script
//! fetches again every step. Built with `maud`, so every text that comes
//! from a worker (ids, errors) or a decision is escaped.

use std::time::Duration;

use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use plotters::style::RGBColor;

use super::history::{Cost, Sample};
use super::plots::{self, Line, StripWindow, figure};
use crate::lease::LeaseView;
use crate::scaler::Status;

/// Everything a page shows, read at one moment.
#[derive(Debug, Clone)]
pub struct View {
    pub now: DateTime<Utc>,
    /// The range asked for, in hours.
    pub hours: f64,
    /// How far back the plots go: the range, or less while the history is
    /// younger (at least a few minutes).
    pub span_hours: f64,
    pub step: Duration,
    /// The samples of the last `hours`, oldest first.
    pub samples: Vec<Sample>,
    pub cost: Option<Cost>,
    pub price_per_hour: Option<f64>,
    pub latency_goal: Duration,
    pub status: Status,
    pub entries: Vec<String>,
    pub windows: Vec<StripWindow>,
    pub prewarm_lead: Duration,
}

/// The ranges the page offers, in hours.
pub const RANGES: [(u32, &str); 4] = [(1, "1 h"), (3, "3 h"), (8, "8 h"), (24, "24 h")];

const RED: RGBColor = RGBColor(0xc0, 0x39, 0x2b);
const ORANGE: RGBColor = RGBColor(0xe6, 0x7e, 0x22);
const BLUE: RGBColor = RGBColor(0x1f, 0x5f, 0xbf);
const GREEN: RGBColor = RGBColor(0x27, 0xae, 0x60);
const GREY: RGBColor = RGBColor(0x88, 0x88, 0x88);
const PURPLE: RGBColor = RGBColor(0x8e, 0x44, 0xad);
const BLACK: RGBColor = RGBColor(0x22, 0x22, 0x22);

pub fn page(view: &View) -> String {
    let refresh_ms = view.step.as_millis().clamp(1_000, 10_000);
    let range = view.hours as u32;
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "ebb console" }
                link rel="stylesheet" href="/console/console.css";
                script src="/console/console.js" defer {}
            }
            body {
                header {
                    h1 { "ebb" }
                    span #live { "loaded " (view.now.format("%H:%M:%S UTC")) }
                    nav {
                        @for (hours, name) in RANGES {
                            @if hours == range { b { (name) } } @else {
                                a href={ "/console?hours=" (hours) } { (name) }
                            }
                        }
                    }
                }
                main data-refresh-ms=(refresh_ms) { (panels(view)) }
            }
        }
    }
    .into_string()
}

/// Each of `samples`' values as a line over the last `hours`.
fn line(
    view: &View,
    name: &'static str,
    color: RGBColor,
    value: impl Fn(&Sample) -> Option<f64>,
) -> Line {
    let points = view
        .samples
        .iter()
        .filter_map(|sample| {
            let hours_ago = (sample.at - view.now).num_milliseconds() as f64 / 3_600_000.0;
            Some((hours_ago, value(sample)?))
        })
        .collect();
    Line {
        name,
        color,
        points,
    }
}

fn chart(view: &View, title: &str, unit: &str, lines: &[Line]) -> Markup {
    PreEscaped(plots::over_time(
        title,
        unit,
        lines,
        view.span_hours,
        view.now,
    ))
}

pub fn panels(view: &View) -> Markup {
    let goal = view.latency_goal.as_secs_f64();
    let lag = |i: usize| move |s: &Sample| Some(s.lag[i] as f64);
    let workers = |i: usize| move |s: &Sample| Some(f64::from(s.workers[i]));
    html! {
        (summary(&view.status))
        section #queue {
            (chart(view, "Questions waiting or being answered, by priority", "questions", &[
                line(view, "high", RED, lag(0)),
                line(view, "normal", BLUE, lag(1)),
                line(view, "low", GREY, lag(2)),
            ]))
            (chart(view, "Oldest waiting question against the latency goal", "seconds", &[
                line(view, "oldest age", ORANGE, |s| Some(s.oldest_waiting_s)),
                Line::level("latency goal", RED, goal, view.span_hours),
            ]))
        }
        section #workers {
            (chart(view, "Workers by state, and desired", "workers", &[
                line(view, "desired", BLACK, |s| Some(f64::from(s.desired))),
                line(view, "starting", ORANGE, workers(0)),
                line(view, "idle", GREEN, workers(1)),
                line(view, "busy", BLUE, workers(2)),
                line(view, "draining", PURPLE, workers(3)),
                line(view, "unhealthy", RED, workers(4)),
            ]))
            (chart(view, "Slots of ready workers", "questions at once", &[
                line(view, "slots", GREY, |s| Some(f64::from(s.slots))),
                line(view, "in use", BLUE, |s| Some(f64::from(s.slots_in_use))),
            ]))
        }
        section #traffic {
            (chart(view, "Arrivals, cache hits and answers", "per second", &[
                line(view, "arrivals", BLUE, |s| Some(s.arrivals_per_s)),
                line(view, "cache hits", GREEN, |s| Some(s.cache_hits_per_s)),
                line(view, "answered by workers", ORANGE, |s| Some(s.answers_per_s)),
            ]))
            (chart(view, "First token and response time against the goal", "seconds", &[
                line(view, "first token p50", GREEN, |s| s.first_token.map(|p| p.p50)),
                line(view, "first token p99", BLUE, |s| s.first_token.map(|p| p.p99)),
                line(view, "response p50", ORANGE, |s| s.response.map(|p| p.p50)),
                line(view, "response p99", PURPLE, |s| s.response.map(|p| p.p99)),
                Line::level("latency goal", RED, goal, view.span_hours),
            ]))
        }
        section #cost { h2 { "Cost today" } (cost(view)) }
        section #timetable {
            h2 { "Timetable, the next 24 hours" }
            p.note {
                "Light: workers started ahead (pre-warm lead " (figure(view.prewarm_lead.as_secs_f64())) " s); dark: the window and its floor; orange: the learned profile."
            }
            (PreEscaped(plots::timetable_strip(&view.entries, &view.windows, view.now)))
        }
        section #decisions { h2 { "Last decisions" } (decisions(&view.status)) }
        section #fleet { h2 { "Workers" } (fleet(&view.status)) }
    }
}

fn summary(status: &Status) -> Markup {
    let role = match &status.lease {
        LeaseView::Active { .. } => "active".to_owned(),
        LeaseView::Standby { holder, .. } => match holder {
            Some(holder) => format!("standby (active: {holder})"),
            None => "standby".to_owned(),
        },
        LeaseView::Starting => "starting".to_owned(),
    };
    html! {
        p #summary {
            "Scaler " b { (role) } " · desired " b #desired { (status.desired) }
            " · workers " b { (status.workers.len()) }
            " · in the queue " b #lag { (status.signals.lag) }
            @if let Some(reason) = &status.reason { " · " span #reason { (reason) } }
            @if status.crashes_in_a_row > 0 {
                " · " span.alert { (status.crashes_in_a_row) " workers lost in a row" }
            }
            @if let Some(error) = &status.last_error { " · " span.alert { (error) } }
        }
    }
}

fn cost(view: &View) -> Markup {
    let Some(cost) = &view.cost else {
        return html! { p { "No samples yet today." } };
    };
    let money = |hours: f64| match view.price_per_hour {
        Some(price) => format!("{hours:.3} worker-hours = {:.2}", hours * price),
        None => format!("{hours:.3} worker-hours"),
    };
    let saved = 1.0 - cost.worker_hours / cost.fixed_worker_hours.max(1e-9);
    html! {
        p {
            "Since " (cost.since.format("%H:%M UTC")) ": " b #spent { (money(cost.worker_hours)) }
            "; a fixed fleet of the day's peak (" (cost.fixed_workers) " workers) would have taken "
            b { (money(cost.fixed_worker_hours)) }
            @if cost.fixed_worker_hours > 0.0 { " (" (format!("{:.0}", saved * 100.0)) " % saved)" }
            "."
            @if view.price_per_hour.is_none() { " Set resources.price_per_hour for money." }
        }
    }
}

fn decisions(status: &Status) -> Markup {
    html! {
        table {
            tr { th { "at" } th { "workers" } th { "why" } }
            @for decision in status.decisions.iter().rev().take(15) {
                tr.decision {
                    td { (decision.at.format("%H:%M:%S")) }
                    td { (decision.from) " → " (decision.to) }
                    td { (decision.reason) }
                }
            }
        }
    }
}

fn fleet(status: &Status) -> Markup {
    html! {
        table {
            tr { th { "worker" } th { "state" } th { "phase" } th { "slots in use" } th { "answered" } th { "started" } }
            @for worker in &status.workers {
                tr.worker {
                    td { (worker.id) }
                    td { (format!("{:?}", worker.condition).to_lowercase()) }
                    td {
                        @if let Some(download) = &worker.download_text { (download) }
                        @else if let Some(phase) = worker.phase { (phase.as_str()) }
                        @if let Some(error) = &worker.error { span.alert { (error) } }
                    }
                    td { (worker.active) " of " (worker.slots) }
                    td { (worker.jobs_done) }
                    td { (worker.started_at.format("%H:%M:%S")) }
                }
            }
        }
        @if let Some(lost) = status.losses.back() {
            p.alert { "Last lost: " (lost.id) ", " (lost.error.as_deref().unwrap_or(&lost.why)) }
        }
    }
}
