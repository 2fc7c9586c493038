//! The simulator's plots (plotters' SVG backend) and `report.html`: the
//! plots beside the cost and SLO table, one self-contained page.

use std::fmt::Write as _;

use plotters::prelude::*;

use super::engine::{Outcome, Sample, WorkerModel};
use super::report::Report;

const WIDTH: u32 = 960;
const PANEL: u32 = 160;
const CAPTION: u32 = 44;
const ARRIVALS: RGBColor = RGBColor(0xbb, 0xbb, 0xbb);
const IN_SYSTEM: RGBColor = RGBColor(0xe6, 0x7e, 0x22);
const WORKERS: RGBColor = RGBColor(0x1f, 0x5f, 0xbf);

/// One panel per policy: arrivals per second (grey area), questions in the
/// system (orange) and workers running (blue), each bucket's maximum and
/// each scaled to its own maximum over all panels (named in the caption),
/// over hours since the first bucket.
pub fn svg(panels: &[(&str, &Outcome)], worker: &WorkerModel) -> String {
    let mut out = String::new();
    draw(&mut out, panels, worker).expect("drawing into a String cannot fail");
    out
}

fn draw(
    out: &mut String,
    panels: &[(&str, &Outcome)],
    worker: &WorkerModel,
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    let bucket = panels.first().map_or(1.0, |(_, o)| o.bucket_seconds);
    let max_of = |f: &dyn Fn(&Sample) -> f64| {
        panels
            .iter()
            .flat_map(|(_, o)| o.samples.iter().map(f))
            .fold(1e-9, f64::max)
    };
    let arrivals = |s: &Sample| f64::from(s.arrivals) / bucket;
    let in_system = |s: &Sample| s.lag as f64;
    let workers = |s: &Sample| f64::from(s.workers);
    let (max_rate, max_lag, max_workers) =
        (max_of(&arrivals), max_of(&in_system), max_of(&workers));
    let buckets = panels
        .iter()
        .map(|(_, o)| o.samples.len())
        .max()
        .unwrap_or(1);
    let hours = (bucket * buckets as f64 / 3600.0).max(1e-6);

    let height = PANEL * panels.len() as u32 + CAPTION;
    let root = SVGBackend::with_string(out, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let (caption, body) = root.split_vertically(CAPTION);
    let text = ("sans-serif", 12).into_font();
    caption.draw_text(
        &format!(
            "grey: arrivals/s (max {max_rate:.1}) · orange: questions in system (max {max_lag:.0}) · blue: workers (max {max_workers:.0}) · x: hours since the trace's start"
        ),
        &text.color(&BLACK),
        (60, 8),
    )?;
    caption.draw_text(
        &format!("worker: {}", worker.describe()),
        &text.color(&BLACK),
        (60, 24),
    )?;
    for (area, (name, outcome)) in body.split_evenly((panels.len(), 1)).iter().zip(panels) {
        let mut chart = ChartBuilder::on(area)
            .caption(*name, ("sans-serif", 13).into_font().style(FontStyle::Bold))
            .margin_right(20)
            .x_label_area_size(20)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..hours, 0.0..1.05)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .disable_y_axis()
            .x_labels(12)
            .draw()?;
        let points = |value: &dyn Fn(&Sample) -> f64, max: f64| {
            outcome
                .samples
                .iter()
                .enumerate()
                .map(move |(i, s)| (bucket * i as f64 / 3600.0, value(s) / max))
                .collect::<Vec<_>>()
        };
        chart.draw_series(AreaSeries::new(
            points(&arrivals, max_rate),
            0.0,
            ARRIVALS.mix(0.6),
        ))?;
        chart.draw_series(LineSeries::new(points(&in_system, max_lag), IN_SYSTEM))?;
        chart.draw_series(LineSeries::new(
            points(&workers, max_workers),
            WORKERS.stroke_width(2),
        ))?;
    }
    root.present()
}

/// `report.html`: the summary, the cost and SLO table and the plots, with
/// nothing loaded from elsewhere (it opens offline, from a file).
pub fn html(report: &Report, plots: &str) -> String {
    let mut out = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n\
         <title>ebb simulation</title>\n<style>body{font-family:sans-serif;margin:1.5em}\
         table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}\
         td{text-align:right}td:first-child{text-align:left}</style>\n</head>\n<body>\n<h1>ebb simulation</h1>\n",
    );
    for line in report.summary() {
        let _ = writeln!(out, "<p>{}</p>", escape(&line));
    }
    let (header, rows) = report.table();
    out.push_str("<table>\n<tr>");
    for name in header {
        let _ = write!(out, "<th>{}</th>", escape(name));
    }
    out.push_str("</tr>\n");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{}</td>", escape(&cell));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n<ul>\n");
    for policy in &report.policies {
        let _ = writeln!(
            out,
            "<li><code>{}</code>: {}</li>",
            escape(&policy.name),
            escape(&policy.detail)
        );
    }
    out.push_str("</ul>\n");
    out.push_str(plots);
    out.push_str("\n</body>\n</html>\n");
    out
}

/// Text for HTML: the trace's file name is the user's.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
