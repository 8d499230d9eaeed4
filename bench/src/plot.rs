//! The figures of the results, drawn as SVG with plotters: horizontal bars
//! (median, with the min-max range as a whisker) and lines.

use plotters::{coord::ranged1d::SegmentValue, prelude::*};

use crate::stats::Spread;

/// What a bar stands for, which sets its colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Baseline,
    Mirror,
    Peer,
}

impl Kind {
    fn color(self) -> RGBColor {
        match self {
            Self::Baseline => RGBColor(150, 150, 150),
            Self::Mirror => RGBColor(31, 119, 180),
            Self::Peer => RGBColor(255, 127, 14),
        }
    }
}

pub struct Bar {
    pub label: String,
    pub kind: Kind,
    pub spread: Spread,
}

pub struct Panel {
    pub title: String,
    pub bars: Vec<Bar>,
}

const FONT: &str = "sans-serif";
const ROW: u32 = 24;

/// Panels of horizontal bars from 0, one above the other, sharing the x
/// axis; `reference` draws a dashed vertical line (1.0 for ratios).
pub fn bars(title: &str, x_label: &str, panels: &[Panel], reference: Option<f64>) -> String {
    let heights: Vec<u32> = panels
        .iter()
        .map(|p| p.bars.len() as u32 * ROW + 80)
        .collect();
    let height = heights.iter().sum::<u32>() + 40;
    let x_max = panels
        .iter()
        .flat_map(|p| &p.bars)
        .map(|b| b.spread.max)
        .chain(reference)
        .fold(0.0f64, f64::max)
        * 1.08;
    let x_max = if x_max > 0.0 { x_max } else { 1.0 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, height)).into_drawing_area();
        root.fill(&WHITE).expect("fill");
        let root = root.titled(title, (FONT, 22)).expect("title");
        let mut rest = root;
        for (panel, panel_height) in panels.iter().zip(&heights) {
            let (area, below) = rest.split_vertically(*panel_height);
            rest = below;
            draw_panel(&area, panel, x_label, x_max, reference);
        }
        rest.present().expect("draw");
    }
    svg
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    panel: &Panel,
    x_label: &str,
    x_max: f64,
    reference: Option<f64>,
) {
    let n = panel.bars.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT, 17))
        .margin(6)
        .x_label_area_size(36)
        .y_label_area_size(230)
        .build_cartesian_2d(0.0..x_max, (0..n).into_segmented())
        .expect("chart");
    let labels: Vec<String> = panel.bars.iter().map(|b| b.label.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&|value| match value {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .x_desc(x_label)
        .label_style((FONT, 13))
        .draw()
        .expect("mesh");
    // Top to bottom in the order given.
    let row = |i: usize| n - 1 - i;
    chart
        .draw_series(panel.bars.iter().enumerate().map(|(i, bar)| {
            let mut rect = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(row(i))),
                    (bar.spread.median, SegmentValue::Exact(row(i) + 1)),
                ],
                bar.kind.color().filled(),
            );
            rect.set_margin(4, 4, 0, 0);
            rect
        }))
        .expect("bars");
    chart
        .draw_series(panel.bars.iter().enumerate().map(|(i, bar)| {
            PathElement::new(
                vec![
                    (bar.spread.min, SegmentValue::CenterOf(row(i))),
                    (bar.spread.max, SegmentValue::CenterOf(row(i))),
                ],
                BLACK.stroke_width(2),
            )
        }))
        .expect("whiskers");
    if let Some(x) = reference {
        chart
            .draw_series(DashedLineSeries::new(
                [(x, SegmentValue::Exact(0)), (x, SegmentValue::Exact(n))],
                6,
                4,
                BLACK.mix(0.6).stroke_width(1),
            ))
            .expect("reference");
    }
}

/// Lines of `(x, y)` points with markers, on a log2 x axis (consumer
/// counts double).
pub fn lines(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let x_max = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let y_max = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.1))
        .fold(0.0f64, f64::max)
        * 1.1;
    let y_max = if y_max > 0.0 { y_max } else { 1.0 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE).expect("fill");
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((1.0..x_max * 1.2).log_scale(), 0.0..y_max)
            .expect("chart");
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style((FONT, 13))
            .draw()
            .expect("mesh");
        for (i, (name, points)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))
                .expect("line")
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))
                .expect("points");
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font((FONT, 13))
            .draw()
            .expect("legend");
        root.present().expect("draw");
    }
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spread(median: f64) -> Spread {
        Spread {
            median,
            min: median * 0.9,
            max: median * 1.1,
        }
    }

    #[test]
    fn bars_and_lines_are_svg_with_their_labels() {
        let svg = bars(
            "Throughput",
            "ratio to baseline",
            &[Panel {
                title: "bulk".into(),
                bars: vec![
                    Bar {
                        label: "baseline".into(),
                        kind: Kind::Baseline,
                        spread: spread(1.0),
                    },
                    Bar {
                        label: "mirror tc".into(),
                        kind: Kind::Mirror,
                        spread: spread(0.8),
                    },
                ],
            }],
            Some(1.0),
        );
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("mirror tc") && svg.contains("Throughput"));
        let svg = lines(
            "Fan-out",
            "consumers",
            "MB/s",
            &[("1448 B".into(), vec![(1.0, 900.0), (8.0, 500.0)])],
        );
        assert!(svg.starts_with("<svg") && svg.contains("1448 B"));
    }
}
