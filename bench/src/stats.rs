//! Medians and ranges of repeated runs: this machine is noisy, so every
//! figure is the median of runs taken in alternation, with its range.

/// Median, minimum and maximum of some runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// `None` when there are no values.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let mid = values.len() / 2;
        let median = if values.len().is_multiple_of(2) {
            (values[mid - 1] + values[mid]) / 2.0
        } else {
            values[mid]
        };
        Some(Self {
            median,
            min: values[0],
            max: values[values.len() - 1],
        })
    }

    /// Every figure divided by `by` (ratios to a baseline's median).
    pub fn ratio_to(self, by: f64) -> Self {
        Self {
            median: self.median / by,
            min: self.min / by,
            max: self.max / by,
        }
    }
}

/// A cell of a table: the median, or `-` when there is none.
pub fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

/// `median (min-max)`.
pub fn spread_cell(spread: Option<Spread>, decimals: usize) -> String {
    spread.map_or_else(
        || "-".to_owned(),
        |s| {
            format!(
                "{:.decimals$} ({:.decimals$}-{:.decimals$})",
                s.median, s.min, s.max
            )
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ranges() {
        let s = Spread::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of([4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert_eq!(Spread::of([]), None);
        assert_eq!(Spread::of([f64::NAN]), None);
        assert_eq!(
            spread_cell(Spread::of([1.0, 3.0]).map(|s| s.ratio_to(2.0)), 2),
            "1.00 (0.50-1.50)"
        );
        assert_eq!(cell(None, 1), "-");
    }
}
