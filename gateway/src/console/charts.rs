//! Charts as inline SVG, drawn on the server: no script, no library, colours from the
//! stylesheet's classes (`s0`, `s1`, ... per series). Every label is escaped here, since
//! the SVG is inserted into pages unescaped.

use std::fmt::Write;

/// Escapes text for SVG/HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A short number for axis labels: 1234 -> "1.2k", 0.25 -> "0.25".
pub fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v == v.trunc() || v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn legend(out: &mut String, series: &[&str], y: f64) {
    let mut x = 40.0;
    for (i, name) in series.iter().enumerate() {
        let _ = write!(
            out,
            r#"<rect class="s{i}" x="{x}" y="{}" width="10" height="10"/><text class="legend" x="{}" y="{}">{}</text>"#,
            y - 9.0,
            x + 14.0,
            y,
            esc(name)
        );
        x += 24.0 + 7.0 * name.chars().count() as f64;
    }
}

/// Stacked columns: one column per bucket (`labels`, left to right), one stack layer per series
/// (`values[bucket][series]`). `title` is the chart's accessible name.
pub fn stacked_columns(title: &str, labels: &[String], series: &[&str], values: &[Vec<f64>]) -> String {
    let (w, h, left, top, bottom) = (720.0, 220.0, 40.0, 10.0, 40.0);
    let max = values.iter().map(|v| v.iter().sum::<f64>()).fold(0.0, f64::max).max(1.0);
    let plot_h = h - top - bottom;
    let n = labels.len().max(1) as f64;
    let slot = (w - left - 10.0) / n;
    let mut out = format!(
        r#"<svg class="chart" viewBox="0 0 {w} {h}" role="img" aria-label="{}"><title>{}</title>"#,
        esc(title),
        esc(title)
    );
    for frac in [0.0, 0.5, 1.0] {
        let y = top + plot_h * (1.0 - frac);
        let _ = write!(
            out,
            r#"<line class="grid" x1="{left}" x2="{}" y1="{y}" y2="{y}"/><text class="axis" x="{}" y="{}" text-anchor="end">{}</text>"#,
            w - 10.0,
            left - 4.0,
            y + 4.0,
            short(max * frac)
        );
    }
    for (b, label) in labels.iter().enumerate() {
        let x = left + slot * b as f64 + slot * 0.15;
        let mut y = top + plot_h;
        for (s, v) in values.get(b).into_iter().flatten().enumerate() {
            if *v <= 0.0 {
                continue;
            }
            let bh = plot_h * v / max;
            y -= bh;
            let _ = write!(
                out,
                r#"<rect class="s{s}" x="{x:.1}" y="{y:.1}" width="{:.1}" height="{bh:.1}"><title>{}: {} {}</title></rect>"#,
                slot * 0.7,
                esc(label),
                short(*v),
                esc(series.get(s).copied().unwrap_or(""))
            );
        }
        if (labels.len() - 1 - b).is_multiple_of(3) || labels.len() <= 12 {
            let _ = write!(
                out,
                r#"<text class="axis" x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                x + slot * 0.35,
                top + plot_h + 14.0,
                esc(label)
            );
        }
    }
    legend(&mut out, series, h - 6.0);
    out.push_str("</svg>");
    out
}

/// Grouped horizontal bars: one group per row (`rows[i] = (label, values per series)`), values
/// in the same unit (`unit` follows each value). `None` values are drawn as "n/a".
pub fn grouped_bars(title: &str, series: &[&str], rows: &[(String, Vec<Option<f64>>)], unit: &str) -> String {
    let bar = 14.0;
    let gap = 10.0;
    let left = 170.0;
    let w = 520.0;
    let group_h = bar * series.len().max(1) as f64 + gap;
    let h = 10.0 + group_h * rows.len().max(1) as f64 + 24.0;
    let max = rows.iter().flat_map(|(_, v)| v.iter().flatten()).fold(0.0f64, |a, &b| a.max(b));
    let max = if max > 0.0 { max } else { 1.0 };
    let plot_w = w - left - 80.0;
    let mut out = format!(
        r#"<svg class="chart bars" viewBox="0 0 {w} {h}" role="img" aria-label="{}"><title>{}</title>"#,
        esc(title),
        esc(title)
    );
    for (g, (label, values)) in rows.iter().enumerate() {
        let y0 = 10.0 + group_h * g as f64;
        let _ = write!(
            out,
            r#"<text class="axis" x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 6.0,
            y0 + group_h / 2.0,
            esc(label)
        );
        for (s, v) in values.iter().enumerate() {
            let y = y0 + bar * s as f64;
            match v {
                Some(v) => {
                    let bw = (plot_w * v / max).max(1.0);
                    let _ = write!(
                        out,
                        r#"<rect class="s{s}" x="{left}" y="{y:.1}" width="{bw:.1}" height="{}"><title>{}: {}</title></rect><text class="value" x="{:.1}" y="{:.1}">{}{}</text>"#,
                        bar - 2.0,
                        esc(series.get(s).copied().unwrap_or("")),
                        short(*v),
                        left + bw + 4.0,
                        y + bar - 4.0,
                        short(*v),
                        esc(unit)
                    );
                }
                None => {
                    let _ = write!(out, r#"<text class="value" x="{left}" y="{:.1}">n/a</text>"#, y + bar - 4.0);
                }
            }
        }
    }
    legend(&mut out, series, h - 6.0);
    out.push_str("</svg>");
    out
}

/// One attempt on the trace page's timeline.
pub struct Span {
    /// e.g. "primary openai gpt-image-1".
    pub label: String,
    /// ms after the request arrived, and how long it took.
    pub start_ms: f64,
    pub duration_ms: f64,
    /// Series class: 0 ok, 1 failed.
    pub class: usize,
    /// Text after the bar (the result).
    pub note: String,
}

/// Attempts on a shared time axis from 0 to `total_ms` (the request's duration).
pub fn timeline(title: &str, spans: &[Span], total_ms: f64) -> String {
    let row = 22.0;
    let left = 230.0;
    let w = 720.0;
    let h = 20.0 + row * spans.len().max(1) as f64 + 20.0;
    let total = spans.iter().map(|s| s.start_ms + s.duration_ms).fold(total_ms, f64::max).max(1.0);
    let plot_w = w - left - 110.0;
    let mut out = format!(
        r#"<svg class="chart" viewBox="0 0 {w} {h}" role="img" aria-label="{}"><title>{}</title>"#,
        esc(title),
        esc(title)
    );
    for frac in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let x = left + plot_w * frac;
        let _ = write!(
            out,
            r#"<line class="grid" x1="{x:.1}" x2="{x:.1}" y1="14" y2="{}"/><text class="axis" x="{x:.1}" y="10" text-anchor="middle">{} ms</text>"#,
            h - 20.0,
            short(total * frac)
        );
    }
    for (i, s) in spans.iter().enumerate() {
        let y = 20.0 + row * i as f64;
        let x = left + plot_w * s.start_ms / total;
        let bw = (plot_w * s.duration_ms / total).max(2.0);
        let _ = write!(
            out,
            r#"<text class="axis" x="{}" y="{:.1}" text-anchor="end">{}</text><rect class="s{}" x="{x:.1}" y="{y:.1}" width="{bw:.1}" height="{}"><title>{}: {:.1} ms from {:.1} ms</title></rect><text class="value" x="{:.1}" y="{:.1}">{}</text>"#,
            left - 6.0,
            y + 13.0,
            esc(&s.label),
            s.class,
            row - 6.0,
            esc(&s.label),
            s.duration_ms,
            s.start_ms,
            x + bw + 4.0,
            y + 13.0,
            esc(&s.note)
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        let svg = stacked_columns("t", &["<b>".into()], &["<script>"], &[vec![1.0]]);
        assert!(!svg.contains("<script>") && !svg.contains("<b>"), "{svg}");
        let svg = grouped_bars("t", &["a"], &[("<x>".into(), vec![Some(1.0), None])], "ms");
        assert!(svg.contains("&lt;x&gt;") && svg.contains("n/a"), "{svg}");
        let svg = timeline(
            "t",
            &[Span { label: "a&b".into(), start_ms: 0.0, duration_ms: 5.0, class: 0, note: "ok".into() }],
            5.0,
        );
        assert!(svg.contains("a&amp;b"), "{svg}");
    }

    #[test]
    fn short_numbers() {
        assert_eq!(short(1234.0), "1.2k");
        assert_eq!(short(0.25), "0.25");
        assert_eq!(short(3.0), "3");
    }
}
