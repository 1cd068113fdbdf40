//! The matrix as a picture, laid out here so that no Graphviz is needed: namespaces as boxes in a
//! grid, their pods (or workloads) inside, one curved arrow per ordered pair (the two directions
//! of a pair bend apart), coloured and dashed by verdict, labelled with the ports and what
//! decided. Denied arrows are drawn thin and unlabelled: under a default deny most pairs are
//! denied, and their labels would hide the flows that are allowed (the table and the DOT name
//! the denying policies). Self-contained SVG (no fonts, scripts or links); the HTML page adds
//! the table.

use std::fmt::Write as _;

use super::{Verdict, View, color};

const NODE_W: f64 = 190.0;
const NODE_H: f64 = 42.0;
/// Room between pods of a namespace, for the arrows and their labels.
const GAP_X: f64 = 260.0;
const GAP_Y: f64 = 150.0;
const PAD: f64 = 30.0;
const HEADER: f64 = 28.0;
/// Room between namespace boxes.
const NS_GAP: f64 = 160.0;
const MARGIN: f64 = 40.0;
const TITLE_H: f64 = 40.0;
const LINE_H: f64 = 14.0;
/// Width of a character of the edge labels (11px) and of the legend (12px), for the layout.
const CHAR_W: f64 = 6.4;
const LEGEND_CHAR_W: f64 = 7.0;

/// XML text and attribute escaping.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[derive(Clone, Copy, Debug)]
struct Rect {
    x: f64,
    y: f64,
    w: f64,
    h: f64,
}

impl Rect {
    fn center(self) -> (f64, f64) {
        (self.x + self.w / 2.0, self.y + self.h / 2.0)
    }

    fn contains(self, (x, y): (f64, f64)) -> bool {
        x >= self.x && x <= self.x + self.w && y >= self.y && y <= self.y + self.h
    }
}

struct Layout {
    width: f64,
    height: f64,
    namespaces: Vec<(String, Rect)>,
    nodes: Vec<Rect>,
}

/// `n` items in a near-square grid: (columns, rows).
fn grid(n: usize) -> (usize, usize) {
    let mut cols = 1;
    while cols * cols < n {
        cols += 1;
    }
    (cols, n.div_ceil(cols).max(1))
}

#[expect(clippy::cast_precision_loss, reason = "counts of boxes")]
fn layout(view: &View) -> Layout {
    let mut spaces: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, n) in view.nodes.iter().enumerate() {
        match spaces.iter_mut().find(|(ns, _)| *ns == n.namespace) {
            Some((_, v)) => v.push(i),
            None => spaces.push((n.namespace.clone(), vec![i])),
        }
    }
    spaces.sort_by(|a, b| a.0.cmp(&b.0));
    // Each namespace's size, its pods in a grid.
    let sizes: Vec<(f64, f64, usize)> = spaces
        .iter()
        .map(|(_, v)| {
            let (cols, rows) = grid(v.len());
            let w = 2.0 * PAD + cols as f64 * NODE_W + (cols - 1) as f64 * GAP_X;
            let h = HEADER + 2.0 * PAD + rows as f64 * NODE_H + (rows - 1) as f64 * GAP_Y;
            (w, h, cols)
        })
        .collect();
    let (gcols, grows) = grid(spaces.len());
    let mut col_w = vec![0.0f64; gcols];
    let mut row_h = vec![0.0f64; grows];
    for (i, (w, h, _)) in sizes.iter().enumerate() {
        col_w[i % gcols] = col_w[i % gcols].max(*w);
        row_h[i / gcols] = row_h[i / gcols].max(*h);
    }
    let mut nodes = vec![
        Rect {
            x: 0.0,
            y: 0.0,
            w: 0.0,
            h: 0.0
        };
        view.nodes.len()
    ];
    let mut namespaces = Vec::new();
    for (i, ((ns, members), (w, h, cols))) in spaces.iter().zip(&sizes).enumerate() {
        let (gc, gr) = (i % gcols, i / gcols);
        let x = MARGIN + col_w[..gc].iter().sum::<f64>() + gc as f64 * NS_GAP;
        let y = MARGIN + TITLE_H + row_h[..gr].iter().sum::<f64>() + gr as f64 * NS_GAP;
        namespaces.push((ns.clone(), Rect { x, y, w: *w, h: *h }));
        for (j, &n) in members.iter().enumerate() {
            let (c, r) = (j % cols, j / cols);
            nodes[n] = Rect {
                x: x + PAD + c as f64 * (NODE_W + GAP_X),
                y: y + HEADER + PAD + r as f64 * (NODE_H + GAP_Y),
                w: NODE_W,
                h: NODE_H,
            };
        }
    }
    let width = 2.0 * MARGIN + col_w.iter().sum::<f64>() + (gcols - 1) as f64 * NS_GAP;
    let height =
        MARGIN + TITLE_H + row_h.iter().sum::<f64>() + (grows - 1) as f64 * NS_GAP + MARGIN;
    Layout {
        width: width.max(700.0),
        height,
        namespaces,
        nodes,
    }
}

/// The point at `t` of the quadratic Bézier `p0 c p2`.
fn bezier(p0: (f64, f64), c: (f64, f64), p2: (f64, f64), t: f64) -> (f64, f64) {
    let u = 1.0 - t;
    (
        u * u * p0.0 + 2.0 * u * t * c.0 + t * t * p2.0,
        u * u * p0.1 + 2.0 * u * t * c.1 + t * t * p2.1,
    )
}

/// The `t` where the curve leaves `r`, searched in `lo..hi` (inside at `lo`, outside at `hi`).
fn exit(p0: (f64, f64), c: (f64, f64), p2: (f64, f64), r: Rect, lo: f64, hi: f64) -> f64 {
    let (mut inside, mut outside) = (lo, hi);
    for _ in 0..30 {
        let mid = f64::midpoint(inside, outside);
        if r.contains(bezier(p0, c, p2, mid)) {
            inside = mid;
        } else {
            outside = mid;
        }
    }
    outside
}

fn dash(v: Verdict) -> &'static str {
    match v {
        Verdict::Allowed => "",
        Verdict::WouldDrop => " stroke-dasharray=\"12 3 2 3\"",
        Verdict::Partial => " stroke-dasharray=\"2 4\"",
        Verdict::Denied => " stroke-dasharray=\"8 5\"",
    }
}

/// Multi-line text centred at (x, y); returns its extent (left, top, right, bottom).
#[expect(clippy::cast_precision_loss, reason = "a few lines")]
fn label(o: &mut String, x: f64, y: f64, lines: &[(Verdict, String)]) -> (f64, f64, f64, f64) {
    let top = y - (lines.len() as f64 - 1.0) * LINE_H / 2.0;
    let half = lines
        .iter()
        .map(|(_, l)| l.chars().count() as f64 * CHAR_W / 2.0)
        .fold(0.0, f64::max);
    let _ = write!(
        o,
        "<text x=\"{x:.1}\" y=\"{top:.1}\" class=\"edge-label\" text-anchor=\"middle\">"
    );
    for (i, (v, l)) in lines.iter().enumerate() {
        let dy = if i == 0 { 0.0 } else { LINE_H };
        let _ = write!(
            o,
            "<tspan x=\"{x:.1}\" dy=\"{dy}\" fill=\"{}\">{}</tspan>",
            color(*v),
            esc(l)
        );
    }
    o.push_str("</text>\n");
    (
        x - half,
        top - LINE_H,
        x + half,
        top + lines.len() as f64 * LINE_H,
    )
}

/// `text` broken into lines of at most `width` characters, at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            out.push(std::mem::take(&mut line));
            line.push_str("    ");
        } else if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    out.push(line);
    out
}

/// An edge's label in the picture: the ports allowed with the rule that allows them; the
/// denied ports only by number. `None` for an edge denied on every port.
fn picture_label(e: &super::Edge) -> Option<Vec<(Verdict, String)>> {
    if e.verdict() == Verdict::Denied {
        return None;
    }
    let mut lines = e.label_lines();
    for (v, l) in &mut lines {
        if *v == Verdict::Denied
            && let Some((ports, _)) = l.split_once(": ")
        {
            *l = ports.to_string();
        }
    }
    Some(lines)
}

/// The picture as a standalone SVG document.
#[expect(clippy::cast_precision_loss, reason = "a few lines")]
pub fn svg(view: &View) -> String {
    let l = layout(view);
    // The drawing first: the labels' extent sets the picture's bounds.
    let (mut min_x, mut max_x) = (0.0f64, l.width);
    let mut body = String::new();
    for (ns, r) in &l.namespaces {
        let _ = writeln!(
            body,
            "<rect class=\"ns\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" rx=\"10\"/><text class=\"ns-name\" x=\"{:.1}\" y=\"{:.1}\">namespace {}</text>",
            r.x,
            r.y,
            r.w,
            r.h,
            r.x + 12.0,
            r.y + 21.0,
            esc(ns)
        );
    }
    for (i, r) in l.nodes.iter().enumerate() {
        let n = &view.nodes[i];
        let class = if n.address_known { "pod" } else { "pod noaddr" };
        let mut name = n.name.clone();
        if n.pods.len() > 1 {
            let _ = write!(name, " ({} pods)", n.pods.len());
        }
        let (cx, cy) = r.center();
        let kind = if n.kind == "Pod" {
            String::new()
        } else {
            format!(
                "<text class=\"pod-kind\" x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                cy + 14.0,
                esc(&n.kind)
            )
        };
        let name_y = if kind.is_empty() { cy + 4.5 } else { cy - 1.0 };
        let _ = writeln!(
            body,
            "<rect class=\"{class}\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" rx=\"8\"/><text class=\"pod-name\" x=\"{cx:.1}\" y=\"{name_y:.1}\" text-anchor=\"middle\">{}</text>{kind}",
            r.x,
            r.y,
            r.w,
            r.h,
            esc(&name)
        );
    }
    // Denied arrows under the others, labels over every arrow.
    let mut labels = String::new();
    let mut edges: Vec<&super::Edge> = view.edges.iter().collect();
    edges.sort_by_key(|e| std::cmp::Reverse(e.verdict() == Verdict::Denied));
    for e in edges {
        let v = e.verdict();
        let lines = picture_label(e);
        let (width, opacity) = if v == Verdict::Denied {
            ("1.5", " stroke-opacity=\"0.6\"")
        } else {
            ("2.5", "")
        };
        let attrs = format!(
            "fill=\"none\" stroke=\"{}\" stroke-width=\"{width}\"{opacity}{} marker-end=\"url(#arrow-{})\"",
            color(v),
            dash(v),
            v.word()
        );
        let (a, b) = (l.nodes[e.from], l.nodes[e.to]);
        let at = if e.from == e.to {
            // Between the pods of one workload: a loop above the box.
            let (x0, y0) = (a.x + a.w * 0.3, a.y);
            let (x1, y1) = (a.x + a.w * 0.7, a.y);
            let _ = writeln!(
                body,
                "<path d=\"M{x0:.1},{y0:.1} C{x0:.1},{:.1} {x1:.1},{:.1} {x1:.1},{y1:.1}\" {attrs}/>",
                y0 - 55.0,
                y1 - 55.0
            );
            (a.x + a.w / 2.0, a.y - 50.0)
        } else {
            let (p0, p2) = (a.center(), b.center());
            let (dx, dy) = (p2.0 - p0.0, p2.1 - p0.1);
            let len = dx.hypot(dy).max(1.0);
            // Bend to the left of the direction of travel: the two directions of a pair part.
            let bend = 0.15 * len + 25.0;
            let c = (
                f64::midpoint(p0.0, p2.0) + dy / len * bend,
                f64::midpoint(p0.1, p2.1) - dx / len * bend,
            );
            let t0 = exit(p0, c, p2, a, 0.0, 0.5);
            let t1 = exit(p2, c, p0, b, 0.0, 0.5);
            let s = bezier(p0, c, p2, t0);
            let t = bezier(p2, c, p0, t1);
            let _ = writeln!(
                body,
                "<path d=\"M{:.1},{:.1} Q{:.1},{:.1} {:.1},{:.1}\" {attrs}/>",
                s.0, s.1, c.0, c.1, t.0, t.1
            );
            bezier(p0, c, p2, 0.5)
        };
        if let Some(lines) = lines {
            let (x0, _, x1, _) = label(&mut labels, at.0, at.1, &lines);
            min_x = min_x.min(x0 - MARGIN / 2.0);
            max_x = max_x.max(x1 + MARGIN / 2.0);
        }
    }
    body.push_str(&labels);
    let w = max_x - min_x;
    // Legend, wrapped to the picture's width.
    let chars = ((w - 2.0 * MARGIN - 32.0) / LEGEND_CHAR_W).max(40.0) as usize;
    let notes: Vec<String> = view
        .legend()
        .iter()
        .flat_map(|line| wrap(line, chars))
        .collect();
    let legend_h = 40.0 + (notes.len() as f64 + 4.0) * 18.0;
    let y = l.height + 10.0;
    let _ = writeln!(
        body,
        "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#ffffff\" stroke=\"#d0d7de\"/>",
        min_x + MARGIN,
        w - 2.0 * MARGIN,
        legend_h - 20.0
    );
    let mut ly = y + 24.0;
    let x = min_x + MARGIN + 16.0;
    for (v, text) in [
        (Verdict::Allowed, "allowed on every port"),
        (
            Verdict::Partial,
            "allowed on some ports (or for some pods): the label says which",
        ),
        (
            Verdict::WouldDrop,
            "allowed, but audit policies would drop it once they enforce",
        ),
        (
            Verdict::Denied,
            "denied on every port (unlabelled: the table names the policies)",
        ),
    ] {
        let _ = writeln!(
            body,
            "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{}\" stroke-width=\"2.5\"{} marker-end=\"url(#arrow-{})\"/><text class=\"legend\" x=\"{:.1}\" y=\"{ly:.1}\">{}</text>",
            ly - 4.0,
            x + 50.0,
            ly - 4.0,
            color(v),
            dash(v),
            v.word(),
            x + 62.0,
            esc(text)
        );
        ly += 18.0;
    }
    for line in &notes {
        let _ = writeln!(
            body,
            "<text class=\"legend\" x=\"{x:.1}\" y=\"{ly:.1}\" xml:space=\"preserve\">{}</text>",
            esc(line)
        );
        ly += 18.0;
    }
    let h = l.height + legend_h;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w:.0}\" height=\"{h:.0}\" viewBox=\"{min_x:.0} 0 {w:.0} {h:.0}\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\">"
    );
    let _ = writeln!(o, "<title>{}</title>", esc(&view.title));
    o.push_str("<style>.ns{fill:#f6f8fa;stroke:#8c959f;stroke-width:1.5}.ns-name{font-size:15px;font-weight:bold;fill:#24292f}.pod{fill:#ffffff;stroke:#24292f;stroke-width:1.5}.pod.noaddr{stroke-dasharray:6 4;fill:#fbfbfb}.pod-name{font-size:13px;fill:#24292f}.pod-kind{font-size:10px;fill:#57606a}.edge-label{font-size:11px;paint-order:stroke;stroke:#ffffff;stroke-width:4px;stroke-linejoin:round}.legend{font-size:12px;fill:#24292f}</style>\n<defs>\n");
    for v in [
        Verdict::Allowed,
        Verdict::WouldDrop,
        Verdict::Partial,
        Verdict::Denied,
    ] {
        let _ = writeln!(
            o,
            "<marker id=\"arrow-{}\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"{}\"/></marker>",
            v.word(),
            color(v)
        );
    }
    let _ = writeln!(
        o,
        "</defs>\n<rect x=\"{min_x:.0}\" width=\"{w:.0}\" height=\"100%\" fill=\"#ffffff\"/>"
    );
    let _ = writeln!(
        o,
        "<text x=\"{:.1}\" y=\"{:.0}\" font-size=\"18\" font-weight=\"bold\" fill=\"#24292f\">{}</text>",
        min_x + MARGIN,
        MARGIN + 8.0,
        esc(&view.title)
    );
    o.push_str(&body);
    o.push_str("</svg>\n");
    o
}

/// The size of [`svg`]'s picture: (width, height).
pub fn svg_size(svg: &str) -> (u32, u32) {
    let attr = |name: &str| {
        svg.split_once(&format!(" {name}=\""))
            .and_then(|(_, rest)| rest.split_once('"'))
            .and_then(|(v, _)| v.parse().ok())
            .unwrap_or(0)
    };
    (attr("width"), attr("height"))
}

/// The picture and the table in one HTML page, without scripts or external assets.
pub fn html(view: &View) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>body{{font-family:\"DejaVu Sans\",Helvetica,Arial,sans-serif;margin:16px;color:#24292f}}table{{border-collapse:collapse;margin-top:16px}}td,th{{border:1px solid #d0d7de;padding:4px 8px;font-size:13px}}th{{background:#f6f8fa}}td.allowed{{color:{};}}td.denied{{color:{};}}td.partial{{color:{};}}td.would-drop{{color:{};}}</style>\n</head>\n<body>\n",
        esc(&view.title),
        color(Verdict::Allowed),
        color(Verdict::Denied),
        color(Verdict::Partial),
        color(Verdict::WouldDrop)
    );
    o.push_str(&svg(view));
    o.push_str("<table>\n<tr><th>from \\ to</th>");
    for i in 0..view.nodes.len() {
        let _ = write!(o, "<th>{}</th>", esc(&view.node_label(i)));
    }
    o.push_str("</tr>\n");
    for r in 0..view.nodes.len() {
        let _ = write!(o, "<tr><th>{}</th>", esc(&view.node_label(r)));
        for c in 0..view.nodes.len() {
            let class = view.edge(r, c).map_or("", |e| e.verdict().word());
            let title = view.edge(r, c).map_or_else(String::new, |e| {
                let l: Vec<String> = e.label_lines().into_iter().map(|(_, l)| l).collect();
                l.join("\n")
            });
            let _ = write!(
                o,
                "<td class=\"{class}\" title=\"{}\">{}</td>",
                esc(&title),
                esc(&view.cell(r, c))
            );
        }
        o.push_str("</tr>\n");
    }
    o.push_str("</table>\n</body>\n</html>\n");
    o
}
