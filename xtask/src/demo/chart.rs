//! The demo's chart, written as SVG by hand: one row per scenario, two panels per row (legit
//! connects that completed within a second, and the CPU the server side used), each with the
//! run without guard and the run with guard over the same seconds, the attack shaded.
#![cfg(feature = "lab")]

use std::fmt::Write as _;

/// One scenario's row.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub title: String,
    /// The attack's start and end, seconds since the legit load started (with guard; the
    /// run without it is scheduled the same way).
    pub attack: (f64, f64),
    /// (seconds, percent) points.
    pub off_success: Vec<(f64, f64)>,
    pub on_success: Vec<(f64, f64)>,
    pub off_cpu: Vec<(f64, f64)>,
    pub on_cpu: Vec<(f64, f64)>,
}

const WIDTH: f64 = 960.0;
const TOP: f64 = 56.0;
const ROW_H: f64 = 200.0;
const PANEL_W: f64 = 400.0;
const PANEL_H: f64 = 120.0;
const LEFT: [f64; 2] = [70.0, 540.0];
const OFF_COLOUR: &str = "#d62728";
const ON_COLOUR: &str = "#2ca02c";

/// Escapes text for an SVG text node or attribute.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Renders the whole chart.
pub fn render(rows: &[Row]) -> String {
    let height = TOP + ROW_H * rows.len() as f64 + 20.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="white"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT0}" y="22" font-size="16" font-weight="bold">guard lab: legit clients and server CPU, without and with guard</text>"#,
        LEFT0 = LEFT[0]
    );
    // Legend.
    let _ = writeln!(
        svg,
        r##"<line x1="{x0}" y1="40" x2="{x1}" y2="40" stroke="{OFF_COLOUR}" stroke-width="2" stroke-dasharray="6 3"/><text x="{t0}" y="44">without guard</text><line x1="{x2}" y1="40" x2="{x3}" y2="40" stroke="{ON_COLOUR}" stroke-width="2"/><text x="{t1}" y="44">with guard</text><rect x="{x4}" y="33" width="24" height="12" fill="#f3e3c3"/><text x="{t2}" y="44">attack running</text>"##,
        x0 = LEFT[0],
        x1 = LEFT[0] + 30.0,
        t0 = LEFT[0] + 36.0,
        x2 = LEFT[0] + 140.0,
        x3 = LEFT[0] + 170.0,
        t1 = LEFT[0] + 176.0,
        x4 = LEFT[0] + 270.0,
        t2 = LEFT[0] + 300.0,
    );
    for (i, row) in rows.iter().enumerate() {
        let y = TOP + ROW_H * i as f64;
        let _ = writeln!(
            svg,
            r#"<text x="{x}" y="{ty}" font-size="13" font-weight="bold">{title}</text>"#,
            x = LEFT[0],
            ty = y + 16.0,
            title = escape(&row.title)
        );
        let t_max = [&row.off_success, &row.on_success, &row.off_cpu, &row.on_cpu]
            .iter()
            .flat_map(|s| s.iter().map(|p| p.0))
            .fold(row.attack.1, f64::max)
            .max(1.0);
        panel(
            &mut svg,
            LEFT[0],
            y + 44.0,
            t_max,
            row.attack,
            "legit connects done within 1 s (%)",
            &row.off_success,
            &row.on_success,
        );
        panel(
            &mut svg,
            LEFT[1],
            y + 44.0,
            t_max,
            row.attack,
            "server CPU: packet thread + app + agent (% of a core)",
            &row.off_cpu,
            &row.on_cpu,
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[allow(clippy::too_many_arguments)]
fn panel(
    svg: &mut String,
    x: f64,
    y: f64,
    t_max: f64,
    attack: (f64, f64),
    label: &str,
    off: &[(f64, f64)],
    on: &[(f64, f64)],
) {
    let px = |t: f64| x + (t / t_max).clamp(0.0, 1.0) * PANEL_W;
    let py = |pct: f64| y + PANEL_H - (pct / 100.0).clamp(0.0, 1.0) * PANEL_H;
    let (a0, a1) = (px(attack.0), px(attack.1));
    let _ = writeln!(
        svg,
        r##"<rect x="{a0:.1}" y="{y}" width="{w:.1}" height="{PANEL_H}" fill="#f3e3c3"/>"##,
        w = (a1 - a0).max(0.0)
    );
    for pct in [0.0, 50.0, 100.0] {
        let gy = py(pct);
        let _ = writeln!(
            svg,
            r##"<line x1="{x}" y1="{gy:.1}" x2="{x2}" y2="{gy:.1}" stroke="#dddddd"/><text x="{tx}" y="{ty:.1}" text-anchor="end">{pct}</text>"##,
            x2 = x + PANEL_W,
            tx = x - 6.0,
            ty = gy + 4.0
        );
    }
    let step = if t_max > 20.0 { 5.0 } else { 2.0 };
    let mut t = 0.0;
    while t <= t_max + 1e-9 {
        let _ = writeln!(
            svg,
            r#"<text x="{tx:.1}" y="{ty}" text-anchor="middle">{t}s</text>"#,
            tx = px(t),
            ty = y + PANEL_H + 15.0
        );
        t += step;
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{x}" y="{y}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#888888"/><text x="{x}" y="{ly}">{label}</text>"##,
        ly = y - 4.0,
        label = escape(label)
    );
    for (series, colour, dash) in [
        (off, OFF_COLOUR, r#" stroke-dasharray="6 3""#),
        (on, ON_COLOUR, ""),
    ] {
        if series.is_empty() {
            continue;
        }
        let points: Vec<String> = series
            .iter()
            .map(|&(t, v)| format!("{:.1},{:.1}", px(t), py(v)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{}"/>"#,
            points.join(" ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(title: &str) -> Row {
        Row {
            title: title.into(),
            attack: (1.5, 9.5),
            off_success: vec![(0.5, 100.0), (1.0, 40.0)],
            on_success: vec![(0.5, 100.0), (1.0, 100.0)],
            off_cpu: vec![(0.5, 10.0), (1.0, 95.0)],
            on_cpu: vec![],
        }
    }

    #[test]
    fn one_polyline_per_non_empty_series_and_escaped_titles() {
        let svg = render(&[row("flood <one> & two"), row("second")]);
        assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
        // Two rows, three non-empty series each.
        assert_eq!(svg.matches("<polyline").count(), 6);
        assert!(svg.contains("flood &lt;one&gt; &amp; two"));
        assert!(!svg.contains("<one>"));
        // Every element that opens is closed or self-closing: a cheap well-formedness check.
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
    }

    #[test]
    fn values_stay_inside_their_panel() {
        let mut r = row("clamped");
        r.on_cpu = vec![(0.0, 250.0), (99.0, -5.0)];
        let svg = render(&[r]);
        let line = svg.lines().rfind(|l| l.starts_with("<polyline")).unwrap();
        let points = line
            .split("points=\"")
            .nth(1)
            .unwrap()
            .trim_end_matches("\"/>");
        for p in points.split(' ') {
            let (x, y): (f64, f64) = {
                let (a, b) = p.split_once(',').unwrap();
                (a.parse().unwrap(), b.parse().unwrap())
            };
            assert!((LEFT[1]..=LEFT[1] + PANEL_W).contains(&x), "{p}");
            assert!((TOP..TOP + ROW_H).contains(&y), "{p}");
        }
    }
}
