//! Pictures of a run for `kubetrain local`'s report: `curves.png` (train loss and test
//! accuracy against step) and a one-line sparkline of the loss for the terminal. Both
//! draw the scalars the chief wrote to its TensorBoard event log, so the picture and
//! TensorBoard show the same numbers.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

/// One curve: (step, value) in step order.
pub type Curve = [(u64, f32)];

const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// `values` squeezed into `width` characters, each the mean of its share of the values,
/// scaled from the lowest (▁) to the highest (█). Non-finite values are left out.
pub fn sparkline(values: &[f32], width: usize) -> String {
    let finite: Vec<f32> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() || width == 0 {
        return String::new();
    }
    let cells = width.min(finite.len());
    let means: Vec<f32> = (0..cells)
        .map(|i| {
            let part = &finite[i * finite.len() / cells..(i + 1) * finite.len() / cells];
            part.iter().sum::<f32>() / part.len() as f32
        })
        .collect();
    let (lo, hi) = means
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    means
        .iter()
        .map(|&v| {
            let at = if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
            BARS[((at * 7.0).round() as usize).min(7)]
        })
        .collect()
}

/// Why `curves.png` was not drawn.
#[derive(Debug, thiserror::Error)]
pub enum CurvesError {
    #[error("drawing {path}: {reason}")]
    Draw { path: String, reason: String },
}

const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is compiled in, so a register failure would be a bug in the crate pair;
        // the picture then only lacks its text.
        let _ = plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            epaint_default_fonts::UBUNTU_LIGHT,
        );
    });
}

/// Draws `title`'s train loss (left) and test accuracy (right) against step as a PNG.
pub fn draw(path: &Path, title: &str, loss: &Curve, accuracy: &Curve) -> Result<(), CurvesError> {
    register_font();
    let failed = |reason: String| CurvesError::Draw {
        path: path.display().to_string(),
        reason,
    };
    let root = BitMapBackend::new(path, (1200, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| failed(e.to_string()))?;
    let root = root
        .titled(title, (FONT, 26))
        .map_err(|e| failed(e.to_string()))?;
    let (left, right) = root.split_horizontally(600);
    panel(&left, "train loss", loss, &BLUE).map_err(failed)?;
    panel(&right, "test accuracy", accuracy, &RED).map_err(failed)?;
    root.present().map_err(|e| failed(e.to_string()))
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    name: &str,
    curve: &Curve,
    color: &RGBColor,
) -> Result<(), String> {
    let points: Vec<(f64, f64)> = curve
        .iter()
        .filter(|(_, v)| v.is_finite())
        .map(|&(s, v)| (s as f64, f64::from(v)))
        .collect();
    let (x_max, (y_lo, y_hi)) = points.iter().fold(
        (1.0f64, (f64::INFINITY, f64::NEG_INFINITY)),
        |(x, (lo, hi)), &(s, v)| (x.max(s), (lo.min(v), hi.max(v))),
    );
    let (y_lo, y_hi) = if y_lo.is_finite() {
        let pad = ((y_hi - y_lo) * 0.05).max(1e-3);
        (y_lo - pad, y_hi + pad)
    } else {
        (0.0, 1.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(name, (FONT, 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..x_max, y_lo..y_hi)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style((FONT, 14))
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(points, color.stroke_width(2)))
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_falling_loss_is_a_falling_sparkline() {
        let loss: Vec<f32> = (0..100).map(|i| 2.0 / (1.0 + i as f32)).collect();
        let line = sparkline(&loss, 8);
        assert_eq!(line.chars().count(), 8);
        assert_eq!(line.chars().next(), Some('█'));
        assert_eq!(line.chars().last(), Some('▁'));
        assert_eq!(sparkline(&[f32::NAN], 8), "");
        assert_eq!(sparkline(&[1.0, 1.0], 8), "▅▅");
    }
}
