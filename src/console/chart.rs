//! The deliveries-per-minute chart of a webhook page: attempts of the last
//! hour bucketed by minute and outcome, drawn as an SVG bar chart with a
//! table of the same numbers beside it.

use std::fmt::Write;

use crate::proto::v1::Delivery;

use super::html::{esc, utc};

/// Minutes the chart covers.
pub const MINUTES: usize = 60;

/// Attempts per minute: `(succeeded, failed)`, oldest minute first.
pub struct Buckets {
    /// Unix second where the first minute starts.
    pub start: i64,
    /// One entry per minute.
    pub counts: Vec<(u32, u32)>,
}

/// Buckets the attempts of `deliveries` made in the hour up to `now`.
pub fn bucket(deliveries: &[Delivery], now: i64) -> Buckets {
    let end = now - now.rem_euclid(60) + 60;
    let start = end - 60 * MINUTES as i64;
    let mut counts = vec![(0u32, 0u32); MINUTES];
    for d in deliveries {
        for a in &d.attempts {
            let Some(t) = &a.attempt_time else { continue };
            if t.seconds < start || t.seconds >= end {
                continue;
            }
            let i = ((t.seconds - start) / 60) as usize;
            if (200..300).contains(&a.status_code) {
                counts[i].0 += 1;
            } else {
                counts[i].1 += 1;
            }
        }
    }
    Buckets { start, counts }
}

/// The chart and its table as HTML.
pub fn render(b: &Buckets) -> String {
    let ok: u32 = b.counts.iter().map(|c| c.0).sum();
    let failed: u32 = b.counts.iter().map(|c| c.1).sum();
    let peak = b.counts.iter().map(|c| c.0 + c.1).max().unwrap_or(0);
    let scale = f64::from(peak.max(1));
    let (w, h, bar) = (600.0, 120.0, 10.0);
    let mut out = String::new();
    let summary = format!(
        "{ok} successful and {failed} failed attempts in the last hour; \
         at most {peak} in one minute"
    );
    let _ = write!(
        out,
        "<svg class=\"chart\" role=\"img\" aria-label=\"{}\" viewBox=\"0 0 {w} {}\" \
         preserveAspectRatio=\"none\">",
        esc(&summary),
        h + 14.0
    );
    let _ = write!(
        out,
        "<line x1=\"0\" y1=\"{h}\" x2=\"{w}\" y2=\"{h}\" stroke=\"#666\" stroke-width=\"1\"/>"
    );
    for (i, &(s, f)) in b.counts.iter().enumerate() {
        let x = i as f64 * bar;
        let hs = f64::from(s) / scale * h;
        let hf = f64::from(f) / scale * h;
        let label = format!(
            "{}: {s} ok, {f} failed",
            &utc(b.start + 60 * i as i64)[11..16]
        );
        if s > 0 {
            let _ = write!(
                out,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{hs:.1}\" \
                 fill=\"#2e7d32\"><title>{}</title></rect>",
                x + 1.0,
                h - hs,
                bar - 2.0,
                esc(&label)
            );
        }
        if f > 0 {
            let _ = write!(
                out,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{hf:.1}\" \
                 fill=\"#c62828\"><title>{}</title></rect>",
                x + 1.0,
                h - hs - hf,
                bar - 2.0,
                esc(&label)
            );
        }
    }
    let _ = write!(
        out,
        "<text x=\"0\" y=\"{}\" font-size=\"11\" fill=\"#333\">{}</text>\
         <text x=\"{w}\" y=\"{}\" font-size=\"11\" fill=\"#333\" text-anchor=\"end\">now</text></svg>",
        h + 12.0,
        esc(&utc(b.start)[11..16]),
        h + 12.0
    );
    let _ = write!(
        out,
        "<p class=\"legend\"><span class=\"key ok\"></span> Delivered (2xx) \
         <span class=\"key failed\"></span> Failed (other status or no answer) \
         · {}</p>",
        esc(&summary)
    );
    let rows: Vec<_> = b
        .counts
        .iter()
        .enumerate()
        .filter(|(_, c)| c.0 + c.1 > 0)
        .collect();
    if rows.is_empty() {
        out.push_str("<p>No delivery attempts in the last hour.</p>");
    } else {
        out.push_str(
            "<table class=\"compact\"><caption>Attempts per minute</caption><thead><tr>\
             <th scope=\"col\">Minute (UTC)</th><th scope=\"col\">Delivered</th>\
             <th scope=\"col\">Failed</th></tr></thead><tbody>",
        );
        for (i, (s, f)) in rows {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{s}</td><td>{f}</td></tr>",
                esc(&utc(b.start + 60 * i as i64)[11..16])
            );
        }
        out.push_str("</tbody></table>");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::DeliveryAttempt;

    fn attempt(at: i64, status: u32) -> DeliveryAttempt {
        DeliveryAttempt {
            attempt_time: Some(prost_types::Timestamp {
                seconds: at,
                nanos: 0,
            }),
            status_code: status,
            latency_ms: 1,
            error: String::new(),
        }
    }

    #[test]
    fn attempts_land_in_their_minute() {
        let now = 1_000_000 * 60 + 30;
        let d = Delivery {
            attempts: vec![
                attempt(now - 5, 200),
                attempt(now - 65, 500),
                attempt(now - 66, 0),
                attempt(now - 4000, 200),
            ],
            ..Default::default()
        };
        let b = bucket(&[d], now);
        assert_eq!(b.counts.len(), MINUTES);
        assert_eq!(b.counts[MINUTES - 1], (1, 0));
        assert_eq!(b.counts[MINUTES - 2], (0, 2));
        assert_eq!(b.counts.iter().map(|c| c.0 + c.1).sum::<u32>(), 3);
        let html = render(&b);
        assert!(
            html.contains("1 successful and 2 failed attempts"),
            "{html}"
        );
    }
}
