//! Plain-text tables and the goal list the bench prints.
#![cfg(feature = "lab")]

use serde::Serialize;

/// A table printed with aligned columns: the first left-aligned, the rest right-aligned.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn print(&self) {
        let cols = self.header.len();
        let mut width = vec![0usize; cols];
        for line in std::iter::once(&self.header).chain(&self.rows) {
            for (i, cell) in line.iter().enumerate().take(cols) {
                width[i] = width[i].max(cell.chars().count());
            }
        }
        let render = |line: &[String]| {
            let cells: Vec<String> = (0..cols)
                .map(|i| {
                    let cell = line.get(i).map(String::as_str).unwrap_or("");
                    if i == 0 {
                        format!("{cell:<w$}", w = width[i])
                    } else {
                        format!("{cell:>w$}", w = width[i])
                    }
                })
                .collect();
            cells.join("  ").trim_end().to_string()
        };
        println!("{}", render(&self.header));
        for row in &self.rows {
            println!("{}", render(row));
        }
    }
}

/// One goal, checked against a number this run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    pub name: String,
    pub target: String,
    pub measured: String,
    /// None: this run could not decide it (its precondition did not hold, or the section
    /// producing the number did not run).
    pub met: Option<bool>,
}

impl Goal {
    pub fn new(name: &str, target: &str, measured: String, met: Option<bool>) -> Self {
        Self {
            name: name.into(),
            target: target.into(),
            measured,
            met,
        }
    }
}

pub fn print_goals(goals: &[Goal]) {
    let mut t = Table::new(&["goal", "target", "measured", "verdict"]);
    for g in goals {
        t.row(vec![
            g.name.clone(),
            g.target.clone(),
            g.measured.clone(),
            match g.met {
                Some(true) => "MET".into(),
                Some(false) => "NOT MET".into(),
                None => "undecided".into(),
            },
        ]);
    }
    t.print();
}

/// `a / b` when both are known and `b` is not zero.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite() && b.is_finite()).then(|| a / b)
}

/// A ratio as `0.62x`, or `-` when it is undefined.
pub fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{r:.2}x"))
}

/// The least, the median and the most of a set of values (ratios over the repeats).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    /// NaN throughout when `values` is empty.
    pub fn of(values: &[f64]) -> Self {
        let min = values.iter().copied().fold(f64::NAN, f64::min);
        let max = values.iter().copied().fold(f64::NAN, f64::max);
        Self {
            min,
            median: median(values),
            max,
        }
    }

    /// `0.91 / 0.95 / 1.02x`.
    pub fn fmt_ratio(&self) -> String {
        format!("{:.2} / {:.2} / {:.2}x", self.min, self.median, self.max)
    }
}

/// A count per second, shortened (`48.7k`, `1.21M`).
pub fn fmt_rate(per_sec: f64) -> String {
    if per_sec >= 1e6 {
        format!("{:.2}M", per_sec / 1e6)
    } else if per_sec >= 1e3 {
        format!("{:.1}k", per_sec / 1e3)
    } else {
        format!("{per_sec:.0}")
    }
}

/// Median of the values (mean of the middle two for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

/// The mean of the middle half (the interquartile mean): as robust to outliers as the median,
/// and finer than the clock's granularity, which single test runs are read at (on some
/// machines 10 ns, so every median of them is a multiple of ten).
pub fn iq_mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let quarter = v.len() / 4;
    mean(&v[quarter..v.len() - quarter])
}

pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.iter().sum::<f64>() / values.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(mean(&[1.0, 2.0]), 1.5);
        assert_eq!(iq_mean(&[100.0, 2.0, 3.0, 0.0]), 2.5);
        assert_eq!(iq_mean(&[7.0]), 7.0);
        assert!(iq_mean(&[]).is_nan());
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(fmt_ratio(ratio(1.0, 4.0)), "0.25x");
        assert_eq!(fmt_ratio(None), "-");
        assert_eq!(fmt_rate(48_700.0), "48.7k");
        assert_eq!(fmt_rate(1_210_000.0), "1.21M");
        assert_eq!(fmt_rate(12.4), "12");
        let s = Spread::of(&[1.5, 0.5, 1.0]);
        assert_eq!((s.min, s.median, s.max), (0.5, 1.0, 1.5));
        assert_eq!(s.fmt_ratio(), "0.50 / 1.00 / 1.50x");
        assert!(Spread::of(&[]).median.is_nan());
    }
}
