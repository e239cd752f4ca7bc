//! `fmi bench --plot FILE.png`: average latency against message size, log-log, one line per
//! implementation and channel.
//!
//! Text is drawn with a font compiled into the binary (Hack, from the `epaint_default_fonts`
//! crate) through plotters' `ab_glyph` backend, so plots render the same on machines without
//! any system font.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::bench::Series;

const FAMILY: &str = "sans-serif";

fn register_fonts() -> Result<(), String> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_font(
            FAMILY,
            FontStyle::Normal,
            epaint_default_fonts::HACK_REGULAR,
        )
        .map_err(|_| "the embedded font could not be loaded".to_owned());
    });
    result
}

/// Draws `series` into a PNG file at `path`.
pub(crate) fn draw(path: &Path, title: &str, series: &[Series]) -> Result<(), String> {
    register_fonts()?;
    // Log axes cannot show 0: barrier (0 bytes) is drawn at 1 byte.
    let points: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            s.rows
                .iter()
                .map(|r| ((r.size.max(1)) as f64, (r.stats.avg * 1e6).max(1e-3)))
                .collect()
        })
        .collect();
    let all = points.iter().flatten();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Err("no results to plot".into());
    }
    // Some room around the data; a single size still gets a visible range.
    let (x0, x1) = (x0 / 2.0, x1 * 2.0);
    let (y0, y1) = (y0 / 2.0, y1 * 2.0);

    let err = |e: &dyn std::fmt::Display| e.to_string();
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("message size (bytes)")
        .y_desc("latency (us)")
        .x_label_formatter(&|x| decimal(*x))
        .y_label_formatter(&|y| {
            if *y >= 10.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.2}")
            }
        })
        .label_style((FAMILY, 14))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (s, pts)) in series.iter().zip(&points).enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(s.label())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FAMILY, 16))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Axis labels of a log scale fall on powers of ten: 10, 1k, 100k, 1M.
fn decimal(x: f64) -> String {
    match x {
        x if x >= 1e9 => format!("{}G", x / 1e9),
        x if x >= 1e6 => format!("{}M", x / 1e6),
        x if x >= 1e3 => format!("{}k", x / 1e3),
        x => format!("{x}"),
    }
}
