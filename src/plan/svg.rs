//! A self-contained SVG of a [`MemoryPlan`]: one horizontal bar stacked by class, the budget as a
//! dashed line, a legend with each class's bytes. No scripts, fonts or external references.

use std::fmt::Write;

use super::report::human;
use super::MemoryPlan;

const WIDTH: f64 = 820.0;
const LEFT: f64 = 20.0;
const BAR_W: f64 = 780.0;
const BAR_Y: f64 = 64.0;
const BAR_H: f64 = 56.0;
/// One colour per class, in `MemoryPlan::classes` order.
const COLORS: [&str; 6] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#edc948", "#bab0ac",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The stacked bar of `plan`'s classes, scaled so that the total and the budget both fit.
pub fn stacked_bar(plan: &MemoryPlan) -> String {
    let classes = plan.classes();
    let budget = plan.options.budget;
    let scale_max = plan.total_bytes.max(budget.unwrap_or(0)).max(1) as f64 * 1.04;
    let x_of = |b: u64| LEFT + BAR_W * b as f64 / scale_max;
    let legend_y = BAR_Y + BAR_H + 44.0;
    let height = legend_y + 22.0 * classes.len() as f64 + 16.0;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let verdict = match budget {
        Some(b) if plan.fits() => format!(" of {} budget: fits", human(b)),
        Some(b) => format!(" of {} budget: does NOT fit", human(b)),
        None => String::new(),
    };
    let title = format!(
        "{} weights, {} KV cache, ctx {}: {}{verdict}",
        plan.options.precision,
        plan.options.kv,
        plan.options.ctx,
        human(plan.total_bytes)
    );
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="28" font-size="16" font-weight="bold">{}</text>"#,
        esc(&title)
    );

    let mut start = 0u64;
    for (i, (name, bytes)) in classes.iter().enumerate() {
        let (x0, x1) = (x_of(start), x_of(start.saturating_add(*bytes)));
        let w = (x1 - x0).max(0.0);
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.2}" y="{BAR_Y}" width="{w:.2}" height="{BAR_H}" fill="{}" stroke="#ffffff" stroke-width="0.5"><title>{}: {}</title></rect>"##,
            COLORS[i % COLORS.len()],
            esc(name),
            human(*bytes)
        );
        // A label inside the segment where it has room (about 7 px a character), else the name
        // alone if that fits; the legend always has both.
        let full = format!("{name} {}", human(*bytes));
        let label = [full.as_str(), name]
            .into_iter()
            .find(|l| w > 7.0 * l.len() as f64 + 8.0);
        if let Some(label) = label {
            let _ = writeln!(
                s,
                r##"<text x="{:.2}" y="{:.2}" text-anchor="middle" fill="#ffffff">{}</text>"##,
                x0 + w / 2.0,
                BAR_Y + BAR_H / 2.0 + 5.0,
                esc(label)
            );
        }
        start = start.saturating_add(*bytes);
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{BAR_Y}" width="{:.2}" height="{BAR_H}" fill="none" stroke="#333333"/>"##,
        x_of(plan.total_bytes) - LEFT
    );
    if let Some(b) = budget {
        let x = x_of(b);
        let color = if plan.fits() { "#2a7d2a" } else { "#c0392b" };
        let _ = writeln!(
            s,
            r#"<line x1="{x:.2}" y1="{}" x2="{x:.2}" y2="{}" stroke="{color}" stroke-width="2.5" stroke-dasharray="6,4"/>"#,
            BAR_Y - 14.0,
            BAR_Y + BAR_H + 14.0
        );
        // Anchor the budget label so it stays inside the picture at either end.
        let anchor = if x > WIDTH / 2.0 { "end" } else { "start" };
        let _ = writeln!(
            s,
            r#"<text x="{x:.2}" y="{}" text-anchor="{anchor}" fill="{color}">budget {}</text>"#,
            BAR_Y + BAR_H + 30.0,
            esc(&human(b))
        );
    }
    for (i, (name, bytes)) in classes.iter().enumerate() {
        let y = legend_y + 22.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{LEFT}" y="{:.2}" width="14" height="14" fill="{}"/>"#,
            y - 11.0,
            COLORS[i % COLORS.len()]
        );
        let share = 100.0 * *bytes as f64 / plan.total_bytes.max(1) as f64;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{y:.2}">{}: {} ({share:.1}%)</text>"#,
            LEFT + 22.0,
            esc(name),
            human(*bytes)
        );
    }
    s.push_str("</svg>\n");
    s
}
