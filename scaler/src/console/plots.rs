//! The console's plots, drawn by plotters' SVG backend: lines over the
//! recent past, and the timetable strip of the next 24 hours. Each line's
//! legend names its latest value and its maximum, so the figures can be
//! read without hovering (and tested in the page's text).

use chrono::{DateTime, Utc};
use plotters::coord::Shift;
use plotters::prelude::*;

const WIDTH: u32 = 600;
const HEIGHT: u32 = 230;
/// Points per line at most: longer ranges keep each bucket's maximum, so
/// a burst shorter than a bucket still shows.
const MAX_POINTS: usize = 300;

/// One line of a chart: `(hours before now as a negative number, value)`.
#[derive(Debug, Clone)]
pub struct Line {
    pub name: &'static str,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
}

impl Line {
    /// A horizontal line across the whole range (a goal).
    pub fn level(name: &'static str, color: RGBColor, value: f64, hours: f64) -> Line {
        Line {
            name,
            color,
            points: vec![(-hours, value), (0.0, value)],
        }
    }

    fn legend(&self) -> String {
        let max = self.points.iter().map(|p| p.1).fold(0.0, f64::max);
        let last = self.points.last().map_or(0.0, |p| p.1);
        format!("{} · now {} · max {}", self.name, figure(last), figure(max))
    }
}

/// A figure as short as it can be read: `12`, `3.4`, `0.25`.
pub fn figure(value: f64) -> String {
    if value == value.round() {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// Keeps at most [`MAX_POINTS`] points, each the maximum of its bucket.
fn thin(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    if points.len() <= MAX_POINTS {
        return points.to_vec();
    }
    let per_bucket = points.len().div_ceil(MAX_POINTS);
    points
        .chunks(per_bucket)
        .map(|chunk| {
            let top = chunk.iter().map(|p| p.1).fold(f64::MIN, f64::max);
            (chunk[chunk.len() - 1].0, top)
        })
        .collect()
}

/// A chart of `lines` over the last `hours`, the x axis in clock time.
pub fn over_time(
    title: &str,
    unit: &str,
    lines: &[Line],
    hours: f64,
    now: DateTime<Utc>,
) -> String {
    let mut out = String::new();
    let drawn = draw_over_time(&mut out, title, unit, lines, hours, now);
    drawn.expect("drawing into a String cannot fail");
    out
}

fn draw_over_time(
    out: &mut String,
    title: &str,
    unit: &str,
    lines: &[Line],
    hours: f64,
    now: DateTime<Utc>,
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    let top = lines
        .iter()
        .flat_map(|line| line.points.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    let root = SVGBackend::with_string(out, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let clock = |x: &f64| {
        let at = now + chrono::Duration::milliseconds((x * 3_600_000.0) as i64);
        at.format("%H:%M").to_string()
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 14).into_font().style(FontStyle::Bold))
        .margin(6)
        .margin_right(16)
        .x_label_area_size(22)
        .y_label_area_size(44)
        .build_cartesian_2d(-hours..0.0, 0.0..top * 1.15)?;
    chart
        .configure_mesh()
        .light_line_style(RGBColor(0xee, 0xee, 0xee))
        .x_labels(7)
        .y_labels(5)
        .x_label_formatter(&clock)
        .x_label_style(("sans-serif", 11))
        .y_label_style(("sans-serif", 11))
        .y_desc(unit)
        .draw()?;
    for line in lines {
        let color = line.color;
        chart
            .draw_series(LineSeries::new(thin(&line.points), color.stroke_width(2)))?
            .label(line.legend())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(0xcc, 0xcc, 0xcc))
        .label_font(("sans-serif", 11))
        .draw()?;
    root.present()
}

/// One timetable window as the strip draws it.
#[derive(Debug, Clone)]
pub struct StripWindow {
    pub entry: String,
    /// Hours from now: when its workers are started, when it opens and
    /// closes (negative while it is open).
    pub prewarm_at: f64,
    pub start: f64,
    pub end: f64,
    pub label: String,
    /// A learned profile's floor, minute by minute from the start.
    pub learned: Vec<u32>,
}

const WINDOW: RGBColor = RGBColor(0x1f, 0x5f, 0xbf);
const LEAD: RGBColor = RGBColor(0x9f, 0xbf, 0xef);
const LEARNED: RGBColor = RGBColor(0xe6, 0x7e, 0x22);

/// The next 24 hours, one row per timetable entry (named at its left):
/// the pre-warm lead (light), the window (dark) with its floor, and a
/// learned profile.
pub fn timetable_strip(entries: &[String], windows: &[StripWindow], now: DateTime<Utc>) -> String {
    let mut out = String::new();
    let rows = entries.len().max(1) as u32;
    let root = SVGBackend::with_string(&mut out, (2 * WIDTH, 44 + 40 * rows)).into_drawing_area();
    draw_strip(&root, entries, windows, now).expect("drawing into a String cannot fail");
    drop(root);
    out
}

fn draw_strip(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    entries: &[String],
    windows: &[StripWindow],
    now: DateTime<Utc>,
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    root.fill(&WHITE)?;
    let rows = entries.len().max(1) as f64;
    let clock = |x: &f64| {
        let at = now + chrono::Duration::milliseconds((x * 3_600_000.0) as i64);
        at.format("%H:%M").to_string()
    };
    let mut chart = ChartBuilder::on(root)
        .margin(6)
        .margin_right(16)
        .x_label_area_size(24)
        .y_label_area_size(8)
        .build_cartesian_2d(0.0..24.0, 0.0..rows)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .light_line_style(RGBColor(0xee, 0xee, 0xee))
        .x_labels(13)
        .x_label_formatter(&clock)
        .x_label_style(("sans-serif", 12))
        .draw()?;
    let row_of = |entry: &str| {
        let row = entries.iter().position(|e| e == entry)? as f64;
        Some((rows - row - 0.8, rows - row - 0.2))
    };
    for window in windows {
        let Some((low, high)) = row_of(&window.entry) else {
            continue;
        };
        let clip = |x: f64| x.clamp(0.0, 24.0);
        chart.draw_series([
            Rectangle::new(
                [(clip(window.prewarm_at), low), (clip(window.start), high)],
                LEAD.filled(),
            ),
            Rectangle::new(
                [(clip(window.start), low), (clip(window.end), high)],
                WINDOW.filled(),
            ),
        ])?;
        chart.draw_series([Text::new(
            window.label.clone(),
            (clip(window.start) + 0.08, high - 0.08),
            ("sans-serif", 12).into_font().color(&WHITE),
        )])?;
        let peak = window.learned.iter().copied().max().unwrap_or(0).max(1);
        let profile = window.learned.iter().enumerate().map(|(minute, &floor)| {
            let x = clip(window.start + minute as f64 / 60.0);
            (
                x,
                low + (high - low) * 0.9 * f64::from(floor) / f64::from(peak),
            )
        });
        chart.draw_series(LineSeries::new(profile, LEARNED.stroke_width(2)))?;
    }
    for entry in entries {
        if let Some((_, high)) = row_of(entry) {
            chart.draw_series([Text::new(
                entry.clone(),
                (0.05, high + 0.18),
                ("sans-serif", 12).into_font().color(&BLACK),
            )])?;
        }
    }
    root.present()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_svg_with_legends_naming_the_latest_and_the_peak() {
        let now = Utc::now();
        let lines = [Line {
            name: "normal",
            color: BLUE,
            points: vec![(-0.5, 0.0), (-0.25, 40.0), (0.0, 3.0)],
        }];
        let svg = over_time("Queue", "questions", &lines, 1.0, now);
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("normal · now 3 · max 40"), "{svg}");
        assert!(
            !svg.contains("style="),
            "the page's CSP allows no inline styles"
        );
    }

    #[test]
    fn long_ranges_keep_each_buckets_peak() {
        let mut points: Vec<(f64, f64)> = (0..8640).map(|i| (i as f64, 1.0)).collect();
        points[4321].1 = 99.0;
        let thinned = thin(&points);
        assert!(thinned.len() <= MAX_POINTS);
        assert!(
            thinned.iter().any(|p| p.1 == 99.0),
            "a one-step burst survives"
        );
    }

    #[test]
    fn the_strip_draws_each_entrys_windows() {
        let now = Utc::now();
        let windows = [StripWindow {
            entry: "morning".into(),
            prewarm_at: 1.0,
            start: 1.5,
            end: 3.0,
            label: "≥ 2".into(),
            learned: vec![1, 3, 2],
        }];
        let svg = timetable_strip(&["morning".into()], &windows, now);
        assert!(svg.contains("morning"), "{svg}");
        assert!(svg.contains("≥ 2"), "{svg}");
        assert!(!svg.contains("style="));
    }
}
