//! `enforcer matrix`: who can talk to whom, pod to pod (or workload to workload) on chosen
//! ports, as tables (text, markdown, CSV), JSON or YAML, and pictures (DOT for Graphviz, and a
//! self-contained SVG / HTML laid out here). The verdicts come from the compiled state
//! ([`enforcer_policy::matrix`]), checked against the reference evaluator.

mod picture;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use enforcer_policy::{
    explain::protocol_label,
    matrix::{Flow, Matrix, MatrixOptions, SYNTHETIC_V4, SYNTHETIC_V6, Why, default_ports, matrix},
    state::PodRef,
};
pub use picture::{html, svg, svg_size};
use serde::Serialize;

use super::{
    explain::Protocol,
    input::{Input, InputArgs, Loaded, load},
    output::Exit,
};

#[derive(Args)]
pub struct MatrixArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Ports to judge, e.g. `80,443/tcp,53/udp` (TCP when no protocol is given). Default: the
    /// ports the policies name and the pods' named container ports, at most 12.
    #[arg(long, value_delimiter = ',')]
    pub ports: Vec<String>,
    /// One row per pod, or per workload (a controller's pods, by the labels it sets; else the
    /// `app.kubernetes.io/name` or `app` label; a workload's template is its own).
    #[arg(long, value_enum, default_value_t = Group::Pod)]
    pub group: Group,
    /// Only the pods of this namespace (repeatable); default: every namespace.
    #[arg(long = "namespace", short = 'n')]
    pub namespaces: Vec<String>,
    /// As the agent's --require-identity (offline, no address is verified).
    #[arg(long)]
    pub require_identity: bool,
    #[arg(long, short = 'o', value_enum, default_value_t = Format::Text)]
    pub output: Format,
    /// Write to this file instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Group {
    Pod,
    Workload,
}

/// `-o`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// The table, for a terminal.
    Text,
    /// The table, for a pull request or a wiki.
    Markdown,
    /// One row per source, destination and port.
    Csv,
    Json,
    Yaml,
    /// Graphviz: namespaces as clusters.
    Dot,
    /// The picture, laid out by enforcer (no Graphviz needed).
    Svg,
    /// The picture and the table in one page.
    Html,
}

/// `enforcer matrix`: the rendering (empty when written to `--out`) and the exit code (0; 2 is
/// an error: unreadable input, an unknown namespace, a disagreement with the evaluator).
pub fn run(args: &MatrixArgs) -> Result<(String, Exit)> {
    let input = args.input.input();
    let loaded = load(&input)?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let ports = parse_ports(&args.ports)?;
    let options = MatrixOptions {
        namespaces: args.namespaces.clone(),
        ports,
        require_identity: args.require_identity,
    };
    let view = view_of(&loaded, &options, args.group, &source(&input))?;
    let out = render(&view, args.output)?;
    match &args.out {
        Some(path) => {
            std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))?;
            Ok((String::new(), Exit::Yes))
        }
        None => Ok((out, Exit::Yes)),
    }
}

/// What the title names as the input.
fn source(input: &Input) -> String {
    match input {
        Input::Dir(d) => d.display().to_string(),
        Input::Cluster {
            context: Some(c), ..
        } => format!("cluster (context {c})"),
        Input::Cluster { .. } => "cluster".into(),
    }
}

/// The matrix of the loaded input, grouped. `Err` for a namespace with no pod in the input, and
/// when the compiled state and the evaluator disagree (a bug).
pub fn view_of(
    loaded: &Loaded,
    options: &MatrixOptions,
    group: Group,
    source: &str,
) -> Result<View> {
    let cluster = &loaded.cluster;
    for ns in &options.namespaces {
        if !cluster.pods.iter().any(|p| *p.namespace == **ns) {
            bail!("--namespace {ns}: no pod or workload in that namespace in the input");
        }
    }
    let mut notes = Vec::new();
    if options.ports.is_empty() && default_ports(cluster).1 {
        notes.push(format!(
            "more ports than {} are named: the first are shown (choose with --ports)",
            enforcer_policy::matrix::DEFAULT_PORTS_CAP
        ));
    }
    let mut m = matrix(cluster, options);
    if !m.disagreements.is_empty() {
        bail!(
            "the compiled state and the reference evaluator disagree (a bug, please report it):\n{}",
            m.disagreements.join("\n")
        );
    }
    // A workload's template stands for the workload: it is its own group.
    let mut kinds = BTreeMap::new();
    for p in &mut m.pods {
        if let Some(kind) = loaded.workloads.get(&p.pod) {
            p.workload.clone_from(&p.pod.name);
            kinds.insert(p.pod.clone(), kind.clone());
        }
    }
    let mut view = View::new(&m, group, notes, source);
    for node in &mut view.nodes {
        let template = node
            .pods
            .first()
            .and_then(|p| kinds.get(&PodRef::new(&node.namespace, p)));
        if let Some(kind) = template {
            node.kind.clone_from(kind);
        }
    }
    Ok(view)
}

/// Renders `view` in `format`.
pub fn render(view: &View, format: Format) -> Result<String> {
    Ok(match format {
        Format::Text => text(view),
        Format::Markdown => markdown(view),
        Format::Csv => csv(view),
        Format::Json => serde_json::to_string_pretty(&report(view))? + "\n",
        Format::Yaml => serde_yaml::to_string(&report(view))?,
        Format::Dot => dot(view),
        Format::Svg => svg(view),
        Format::Html => html(view),
    })
}

/// The matrix of a folder, every namespace and the default ports: for tests and the picture.
pub fn view_of_dir(dir: &Path, group: Group) -> Result<View> {
    let input = Input::Dir(dir.to_path_buf());
    view_of(
        &load(&input)?,
        &MatrixOptions::default(),
        group,
        &source(&input),
    )
}

/// Parses `80,443/tcp,53/udp`.
pub fn parse_ports(items: &[String]) -> Result<Vec<(u8, u16)>> {
    let mut out = Vec::new();
    for item in items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let (port, proto) = item.split_once('/').unwrap_or((item, "tcp"));
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .with_context(|| format!("--ports: {item:?}: the port must be 1-65535"))?;
        let proto = Protocol::from_str(proto, true)
            .map_err(|_| {
                anyhow::anyhow!("--ports: {item:?}: the protocol must be tcp, udp or sctp")
            })?
            .number();
        if !out.contains(&(proto, port)) {
            out.push((proto, port));
        }
    }
    Ok(out)
}

/// A row and column of the matrix: a pod or a workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub namespace: String,
    pub name: String,
    /// `Pod`, or the kind of the workload whose template it is.
    pub kind: String,
    pub pods: Vec<String>,
    /// False when no pod of it has a known address (judged by labels, namespace and ports).
    pub address_known: bool,
}

impl Node {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The verdict of a cell or of one of its ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Allowed,
    /// Allowed, but audit policies would drop it (for some pod pairs at least) once they
    /// enforce.
    WouldDrop,
    /// Some pod pairs of the two workloads allowed, some denied (or, for a whole cell, some
    /// ports).
    Partial,
    Denied,
}

impl Verdict {
    fn of(allowed: usize, would_drop: usize, pairs: usize) -> Self {
        if allowed == pairs && would_drop > 0 {
            Self::WouldDrop
        } else if allowed == pairs {
            Self::Allowed
        } else if allowed == 0 {
            Self::Denied
        } else {
            Self::Partial
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::WouldDrop => "would-drop",
            Self::Partial => "partial",
            Self::Denied => "denied",
        }
    }

    pub fn mark(self) -> &'static str {
        match self {
            Self::Allowed => "✓",
            Self::WouldDrop => "!",
            Self::Partial => "~",
            Self::Denied => "✗",
        }
    }
}

/// One port of one cell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortCell {
    pub protocol: u8,
    pub port: u16,
    /// Pod pairs allowed, of `pairs`.
    pub allowed: usize,
    /// Pod pairs allowed that audit policies would drop once they enforce.
    pub would_drop: usize,
    pub pairs: usize,
    /// Why egress at the source and ingress at the destination decided, over the pairs.
    pub egress: BTreeSet<String>,
    pub ingress: BTreeSet<String>,
    /// What decided: the allowing rules, or the policies that denied (a direction that is not
    /// isolated decides nothing).
    pub deciding: BTreeSet<String>,
}

impl PortCell {
    pub fn verdict(&self) -> Verdict {
        Verdict::of(self.allowed, self.would_drop, self.pairs)
    }

    pub fn port_label(&self) -> String {
        format!("{}/{}", self.port, protocol_label(self.protocol))
    }
}

/// A cell: from `nodes[from]` to `nodes[to]`, one entry per port of the view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edge {
    pub from: usize,
    pub to: usize,
    pub ports: Vec<PortCell>,
}

impl Edge {
    pub fn verdict(&self) -> Verdict {
        let v: BTreeSet<Verdict> = self.ports.iter().map(PortCell::verdict).collect();
        match (v.len(), v.first()) {
            (1, Some(only)) => *only,
            // Every port allowed now, some would be dropped.
            _ if v
                .iter()
                .all(|v| matches!(v, Verdict::Allowed | Verdict::WouldDrop)) =>
            {
                Verdict::WouldDrop
            }
            _ => Verdict::Partial,
        }
    }

    /// Ports grouped by verdict and what decided, e.g. `✓ 8080/tcp: shop/web ingress[0]`.
    pub fn label_lines(&self) -> Vec<(Verdict, String)> {
        let mut groups: BTreeMap<(Verdict, String), Vec<String>> = BTreeMap::new();
        for p in &self.ports {
            let why: Vec<&str> = p.deciding.iter().map(String::as_str).collect();
            groups
                .entry((p.verdict(), why.join(", ")))
                .or_default()
                .push(p.port_label());
        }
        groups
            .into_iter()
            .map(|((v, why), ports)| (v, format!("{} {}: {why}", v.mark(), ports.join(","))))
            .collect()
    }
}

/// What the renderers draw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub title: String,
    pub nodes: Vec<Node>,
    pub ports: Vec<(u8, u16)>,
    pub edges: Vec<Edge>,
    pub notes: Vec<String>,
}

fn deciding(side: &enforcer_policy::matrix::Side, flow_allowed: bool) -> Option<String> {
    match (&side.why, flow_allowed) {
        (Why::Rule(r), true) => Some(r.to_string()),
        (Why::Denied { policies, .. }, false) => Some(policies.join(", ")),
        (Why::NoCommonFamily, _) | (Why::WouldDrop(_), true) => Some(side.why.label()),
        _ => None,
    }
}

impl View {
    pub fn new(m: &Matrix, group: Group, notes: Vec<String>, source: &str) -> Self {
        let key = |i: usize| {
            let p = &m.pods[i];
            let name = match group {
                Group::Pod => p.pod.name.clone(),
                Group::Workload => p.workload.clone(),
            };
            (p.pod.namespace.clone(), name)
        };
        let mut index: BTreeMap<(String, String), usize> = BTreeMap::new();
        let mut nodes: Vec<Node> = Vec::new();
        let mut node_of = Vec::with_capacity(m.pods.len());
        for (i, p) in m.pods.iter().enumerate() {
            let k = key(i);
            let n = *index.entry(k.clone()).or_insert_with(|| {
                nodes.push(Node {
                    namespace: k.0.clone(),
                    name: k.1.clone(),
                    kind: "Pod".into(),
                    pods: Vec::new(),
                    address_known: false,
                });
                nodes.len() - 1
            });
            nodes[n].pods.push(p.pod.name.clone());
            nodes[n].address_known |= p.address_known;
            node_of.push(n);
        }
        let port_index: BTreeMap<(u8, u16), usize> =
            m.ports.iter().enumerate().map(|(i, p)| (*p, i)).collect();
        let mut edges: BTreeMap<(usize, usize), Edge> = BTreeMap::new();
        for f in &m.flows {
            let (from, to) = (node_of[f.src], node_of[f.dst]);
            let edge = edges.entry((from, to)).or_insert_with(|| Edge {
                from,
                to,
                ports: m
                    .ports
                    .iter()
                    .map(|&(protocol, port)| PortCell {
                        protocol,
                        port,
                        allowed: 0,
                        would_drop: 0,
                        pairs: 0,
                        egress: BTreeSet::new(),
                        ingress: BTreeSet::new(),
                        deciding: BTreeSet::new(),
                    })
                    .collect(),
            });
            let cell = &mut edge.ports[port_index[&(f.protocol, f.port)]];
            add(cell, f);
        }
        let mut notes = notes;
        if m.pods.iter().any(|p| !p.address_known) {
            notes.push(format!(
                "dashed boxes / (no address): no address is known; judged by labels, namespace and ports, as if at an address in {}/{} or {}/{}, which no ipBlock matches",
                SYNTHETIC_V4.0, SYNTHETIC_V4.1, SYNTHETIC_V6.0, SYNTHETIC_V6.1
            ));
        }
        Self {
            title: format!("Who can talk to whom: {source}"),
            nodes,
            ports: m.ports.clone(),
            edges: edges.into_values().collect(),
            notes,
        }
    }

    fn edge(&self, from: usize, to: usize) -> Option<&Edge> {
        self.edges.iter().find(|e| e.from == from && e.to == to)
    }

    fn node_label(&self, i: usize) -> String {
        let n = &self.nodes[i];
        let mut s = n.id();
        if n.pods.len() > 1 || n.pods.first() != Some(&n.name) {
            let _ = write!(s, " ({} pods)", n.pods.len());
        }
        if n.kind != "Pod" {
            // A template: it has no address by nature.
            let _ = write!(s, " ({})", n.kind);
        } else if !n.address_known {
            s.push_str(" (no address)");
        }
        s
    }

    fn ports_line(&self) -> String {
        let ports: Vec<String> = self
            .ports
            .iter()
            .map(|(proto, port)| format!("{port}/{}", protocol_label(*proto)))
            .collect();
        format!("ports: {}", ports.join(", "))
    }

    /// A cell of the tables: `✓` every port allowed, `✗` none, `!` every port allowed and
    /// would-drop, else the ports allowed, each with its mark (`~`: some pod pairs only).
    fn cell(&self, from: usize, to: usize) -> String {
        let Some(e) = self.edge(from, to) else {
            return "-".into();
        };
        let v = e.verdict();
        if e.ports.iter().all(|p| p.verdict() == v) {
            return v.mark().into();
        }
        let open: Vec<String> = e
            .ports
            .iter()
            .filter(|p| p.verdict() != Verdict::Denied)
            .map(|p| format!("{}{}", p.verdict().mark(), p.port_label()))
            .collect();
        open.join(" ")
    }

    fn legend(&self) -> Vec<String> {
        let mut v = vec![
            self.ports_line(),
            "rows: from; columns: to. ✓ allowed on every port, ✗ denied on every port, otherwise the ports allowed (~ : for some of the pods only); ! : allowed, but audit policies would drop it once they enforce; - : nothing to judge".into(),
            "verdicts from the compiled state (egress at the source and ingress at the destination), checked against the reference evaluator".into(),
        ];
        v.extend(self.notes.iter().cloned());
        v
    }
}

fn add(cell: &mut PortCell, f: &Flow) {
    let allowed = f.allowed();
    cell.pairs += 1;
    cell.allowed += usize::from(allowed);
    cell.would_drop += usize::from(
        allowed
            && [&f.egress, &f.ingress]
                .iter()
                .any(|s| matches!(s.why, Why::WouldDrop(_))),
    );
    cell.egress.insert(f.egress.why.label());
    cell.ingress.insert(f.ingress.why.label());
    let mut why: Vec<String> = [&f.egress, &f.ingress]
        .into_iter()
        .filter_map(|s| deciding(s, allowed))
        .collect();
    if why.is_empty() {
        why.push(if allowed { "not isolated" } else { "denied" }.into());
    }
    cell.deciding.extend(why);
}

fn width(s: &str) -> usize {
    s.chars().count()
}

fn table_rows(view: &View) -> (Vec<String>, Vec<Vec<String>>) {
    let header: Vec<String> = std::iter::once("from \\ to".to_string())
        .chain((0..view.nodes.len()).map(|i| view.node_label(i)))
        .collect();
    let rows = (0..view.nodes.len())
        .map(|r| {
            std::iter::once(view.node_label(r))
                .chain((0..view.nodes.len()).map(|c| view.cell(r, c)))
                .collect()
        })
        .collect();
    (header, rows)
}

fn text(view: &View) -> String {
    let (header, rows) = table_rows(view);
    let mut widths: Vec<usize> = header.iter().map(|h| width(h)).collect();
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(width(c));
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - width(c))))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut o = format!("{}\n\n", view.title);
    o.push_str(&line(&header));
    for row in &rows {
        o.push_str(&line(row));
    }
    o.push('\n');
    for l in view.legend() {
        let _ = writeln!(o, "{l}");
    }
    o
}

fn markdown(view: &View) -> String {
    let (header, rows) = table_rows(view);
    let esc = |s: &str| s.replace('|', "\\|");
    let line = |cells: &[String]| {
        let c: Vec<String> = cells.iter().map(|c| esc(c)).collect();
        format!("| {} |\n", c.join(" | "))
    };
    let mut o = format!("### {}\n\n", view.title);
    o.push_str(&line(&header));
    let _ = writeln!(o, "|{}", "---|".repeat(header.len()));
    for row in &rows {
        o.push_str(&line(row));
    }
    o.push('\n');
    for l in view.legend() {
        let _ = writeln!(o, "- {}", esc(&l));
    }
    o
}

fn csv(view: &View) -> String {
    let field = |s: &str| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let join = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join("; ");
    let mut o = String::from(
        "from,to,protocol,port,verdict,allowed_pairs,would_drop_pairs,pairs,egress,ingress,deciding\n",
    );
    for e in &view.edges {
        for p in &e.ports {
            let row = [
                view.nodes[e.from].id(),
                view.nodes[e.to].id(),
                protocol_label(p.protocol),
                p.port.to_string(),
                p.verdict().word().to_string(),
                p.allowed.to_string(),
                p.would_drop.to_string(),
                p.pairs.to_string(),
                join(&p.egress),
                join(&p.ingress),
                join(&p.deciding),
            ];
            let row: Vec<String> = row.iter().map(|s| field(s)).collect();
            let _ = writeln!(o, "{}", row.join(","));
        }
    }
    o
}

/// `enforcer matrix -o json|yaml`: the documented shape (docs/matrix.md).
#[derive(Clone, Debug, Serialize)]
pub struct MatrixReport {
    pub title: String,
    /// `port/PROTOCOL`, in order.
    pub ports: Vec<String>,
    pub nodes: Vec<NodeReport>,
    /// One per source, destination and port.
    pub edges: Vec<EdgeReport>,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeReport {
    /// `namespace/name`.
    pub id: String,
    pub namespace: String,
    pub name: String,
    /// `Pod`, or the workload kind whose template it is.
    pub kind: String,
    pub pods: Vec<String>,
    /// False when no pod of it has a known address (judged by labels, namespace and ports).
    pub address_known: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct EdgeReport {
    pub from: String,
    pub to: String,
    pub protocol: String,
    pub port: u16,
    /// `allowed`, `would-drop`, `partial` or `denied`.
    pub verdict: &'static str,
    pub allowed_pairs: usize,
    pub would_drop_pairs: usize,
    pub pairs: usize,
    /// Why egress at the source decided, over the pod pairs.
    pub egress: BTreeSet<String>,
    /// Why ingress at the destination decided, over the pod pairs.
    pub ingress: BTreeSet<String>,
    /// What decided: the allowing rules, or the denying policies.
    pub deciding: BTreeSet<String>,
}

/// The view as [`MatrixReport`].
pub fn report(view: &View) -> MatrixReport {
    let nodes = view
        .nodes
        .iter()
        .map(|n| NodeReport {
            id: n.id(),
            namespace: n.namespace.clone(),
            name: n.name.clone(),
            kind: n.kind.clone(),
            pods: n.pods.clone(),
            address_known: n.address_known,
        })
        .collect();
    let edges = view
        .edges
        .iter()
        .flat_map(|e| {
            e.ports.iter().map(|p| EdgeReport {
                from: view.nodes[e.from].id(),
                to: view.nodes[e.to].id(),
                protocol: protocol_label(p.protocol),
                port: p.port,
                verdict: p.verdict().word(),
                allowed_pairs: p.allowed,
                would_drop_pairs: p.would_drop,
                pairs: p.pairs,
                egress: p.egress.clone(),
                ingress: p.ingress.clone(),
                deciding: p.deciding.clone(),
            })
        })
        .collect();
    MatrixReport {
        title: view.title.clone(),
        ports: view
            .ports
            .iter()
            .map(|(proto, port)| format!("{port}/{}", protocol_label(*proto)))
            .collect(),
        nodes,
        edges,
        notes: view.notes.clone(),
    }
}

/// A DOT string literal.
pub(crate) fn dot_str(s: &str) -> String {
    format!(
        "\"{}\"",
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    )
}

/// Edge colours, shared by DOT and the SVG: allowed green, would-drop purple, partial amber,
/// denied red.
pub fn color(v: Verdict) -> &'static str {
    match v {
        Verdict::Allowed => "#1a7f37",
        Verdict::WouldDrop => "#8250df",
        Verdict::Partial => "#b35900",
        Verdict::Denied => "#cf222e",
    }
}

fn dot(view: &View) -> String {
    let mut o = String::from(
        "digraph matrix {\n  rankdir=LR;\n  node [shape=box, style=rounded, fontname=\"Helvetica\"];\n  edge [fontname=\"Helvetica\", fontsize=10];\n",
    );
    let _ = writeln!(o, "  label={};", dot_str(&view.title));
    let mut by_ns: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, n) in view.nodes.iter().enumerate() {
        by_ns.entry(n.namespace.as_str()).or_default().push(i);
    }
    for (c, (ns, nodes)) in by_ns.iter().enumerate() {
        let _ = writeln!(o, "  subgraph cluster_{c} {{\n    label={};", dot_str(ns));
        for &i in nodes {
            let n = &view.nodes[i];
            let style = if n.address_known {
                "rounded"
            } else {
                "\"rounded,dashed\""
            };
            let _ = writeln!(o, "    n{i} [label={}, style={style}];", dot_str(&n.name));
        }
        o.push_str("  }\n");
    }
    for e in &view.edges {
        let v = e.verdict();
        let label: Vec<String> = e.label_lines().into_iter().map(|(_, l)| l).collect();
        let style = match v {
            Verdict::Allowed => "solid",
            Verdict::WouldDrop => "bold",
            Verdict::Partial => "dotted",
            Verdict::Denied => "dashed",
        };
        let _ = writeln!(
            o,
            "  n{} -> n{} [color={}, fontcolor={}, style={style}, label={}];",
            e.from,
            e.to,
            dot_str(color(v)),
            dot_str(color(v)),
            dot_str(&label.join("\n"))
        );
    }
    o.push_str("}\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    /// x/client and x/other may reach x/web on 80 only, x/client by a rule and x/other not at
    /// all; x/tmpl (a pod kept in git, without address) by its label.
    fn folder() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let pod = |name: &str, ip: Option<&str>, ports: &str| {
            let status = ip.map_or_else(String::new, |ip| {
                format!("status:\n  phase: Running\n  podIP: {ip}\n")
            });
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: x\n  labels:\n    app: {name}\nspec:\n  containers:\n  - name: c\n    ports: [{ports}]\n{status}"
            )
        };
        let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: web-from-client\n  namespace: x\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchExpressions: [{key: app, operator: In, values: [client, tmpl]}]}}]\n    ports: [{port: 80}]\n";
        std::fs::write(
            dir.path().join("all.yaml"),
            [
                pod("client", Some("10.0.0.1"), ""),
                pod("other", Some("10.0.0.3"), ""),
                pod(
                    "web",
                    Some("10.0.0.2"),
                    "{name: http, containerPort: 80}, {name: metrics, containerPort: 9090}",
                ),
                pod("tmpl", None, ""),
                policy.to_string(),
            ]
            .join("---\n"),
        )
        .unwrap();
        dir
    }

    fn view(group: Group) -> View {
        let dir = folder();
        let mut v = view_of_dir(dir.path(), group).unwrap();
        v.title = "Who can talk to whom: test".into();
        v
    }

    #[test]
    fn the_text_table_marks_each_pair_with_its_allowed_ports() {
        let t = render(&view(Group::Pod), Format::Text).unwrap();
        let row = |name: &str| {
            t.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("{name} in\n{t}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert!(t.contains("ports: 80/TCP, 9090/TCP"), "{t}");
        // Columns: client, other, tmpl (no address), web.
        assert_eq!(row("x/client "), "x/client - ✓ ✓ ✓80/TCP", "{t}");
        assert_eq!(row("x/other "), "x/other ✓ - ✓ ✗", "{t}");
        assert_eq!(
            row("x/tmpl (no address)"),
            "x/tmpl (no address) ✓ ✓ - ✓80/TCP",
            "{t}"
        );
        assert!(t.contains("which no ipBlock matches"), "{t}");
    }

    #[test]
    fn csv_and_json_name_the_deciding_rule_and_policy_per_port() {
        let v = view(Group::Pod);
        let csv = render(&v, Format::Csv).unwrap();
        for line in [
            "x/client,x/web,TCP,80,allowed,1,0,1,not isolated,x/web-from-client ingress[0],x/web-from-client ingress[0]",
            "x/client,x/web,TCP,9090,denied,0,0,1,not isolated,denied by x/web-from-client,x/web-from-client",
            "x/web,x/client,TCP,80,allowed,1,0,1,not isolated,not isolated,not isolated",
        ] {
            assert!(csv.lines().any(|l| l == line), "{line} in\n{csv}");
        }
        let json: serde_json::Value =
            serde_json::from_str(&render(&v, Format::Json).unwrap()).unwrap();
        let tmpl = json["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == "x/tmpl")
            .unwrap();
        assert_eq!(tmpl["address_known"], false);
        assert_eq!(tmpl["kind"], "Pod");
        let edge = json["edges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["from"] == "x/other" && e["to"] == "x/web" && e["port"] == 80)
            .unwrap();
        assert_eq!(edge["verdict"], "denied");
        assert_eq!(edge["ingress"][0], "denied by x/web-from-client");
        assert_eq!(edge["egress"][0], "not isolated");
    }

    #[test]
    fn dot_and_svg_draw_namespaces_and_edges_by_verdict() {
        let v = view(Group::Pod);
        let dot = render(&v, Format::Dot).unwrap();
        assert!(
            dot.contains("subgraph cluster_0 {\n    label=\"x\";"),
            "{dot}"
        );
        assert!(
            dot.contains("[label=\"tmpl\", style=\"rounded,dashed\"];"),
            "{dot}"
        );
        assert!(
            dot.contains("color=\"#cf222e\", fontcolor=\"#cf222e\", style=dashed, label=\"✗ 80/TCP,9090/TCP: x/web-from-client\"];"),
            "{dot}"
        );
        assert!(
            dot.contains("style=dotted, label=\"✓ 80/TCP: x/web-from-client ingress[0]\\n✗ 9090/TCP: x/web-from-client\"];"),
            "{dot}"
        );
        let svg = render(&v, Format::Svg).unwrap();
        assert!(
            svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""),
            "{svg}"
        );
        assert!(!svg.contains("href"), "self-contained: {svg}");
        assert!(svg.contains(">namespace x</text>"), "{svg}");
        assert!(svg.contains("class=\"pod noaddr\""), "{svg}");
        // 4 pods: 12 ordered pairs, each an arrow; the three kinds are each drawn.
        let arrows = svg.matches("marker-end=\"url(#arrow-").count();
        assert_eq!(arrows, 12 + 4, "12 edges and 4 in the legend");
        for kind in ["allowed", "denied", "partial"] {
            assert!(
                svg.matches(&format!("url(#arrow-{kind})")).count() > 1,
                "{kind}"
            );
        }
        let html = render(&v, Format::Html).unwrap();
        assert!(html.contains("<svg") && html.contains("<table>") && !html.contains("<script"));
    }

    /// Workloads: the pods of one `app` are one row, a cell counts its pod pairs.
    #[test]
    fn workloads_group_pods_and_count_their_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let pod = |name: &str, app: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: x\n  labels:\n    app: {app}\nspec:\n  containers: []\nstatus:\n  phase: Running\n  podIP: {ip}\n"
            )
        };
        let deny = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny\n  namespace: x\nspec:\n  podSelector: {matchLabels: {app: db}}\n";
        std::fs::write(
            dir.path().join("all.yaml"),
            [
                pod("web-1", "web", "10.0.0.1"),
                pod("web-2", "web", "10.0.0.2"),
                pod("db-1", "db", "10.0.0.3"),
                deny.to_string(),
            ]
            .join("---\n"),
        )
        .unwrap();
        let v = view_of_dir(dir.path(), Group::Workload).unwrap();
        let names: Vec<String> = v.nodes.iter().map(Node::id).collect();
        assert_eq!(names, ["x/db", "x/web"]);
        let web_db = v.edges.iter().find(|e| e.from == 1 && e.to == 0).unwrap();
        assert_eq!((web_db.ports[0].allowed, web_db.ports[0].pairs), (0, 2));
        let web_web = v.edges.iter().find(|e| e.from == 1 && e.to == 1).unwrap();
        assert_eq!((web_web.ports[0].allowed, web_web.ports[0].pairs), (2, 2));
    }

    /// An audit policy's denials pass, and are shown apart: `!` in the table, `would-drop` with
    /// the audit policy in CSV, purple in the picture.
    #[test]
    fn audit_policies_show_as_would_drop_cells() {
        let dir = tempfile::tempdir().unwrap();
        let pod = |name: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: x\n  labels:\n    app: {name}\nspec:\n  containers: []\nstatus:\n  phase: Running\n  podIP: {ip}\n"
            )
        };
        let audit = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: trial\n  namespace: x\n  annotations:\n    enforcer.dev/audit: \"true\"\nspec:\n  podSelector: {matchLabels: {app: b}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: nobody}}}]\n    ports: [{port: 80}]\n";
        std::fs::write(
            dir.path().join("all.yaml"),
            [
                pod("a", "10.0.0.1"),
                pod("b", "10.0.0.2"),
                audit.to_string(),
            ]
            .join("---\n"),
        )
        .unwrap();
        let v = view_of_dir(dir.path(), Group::Pod).unwrap();
        let t = render(&v, Format::Text).unwrap();
        let row = t.lines().find(|l| l.starts_with("x/a ")).unwrap();
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>(),
            ["x/a", "-", "!"],
            "{t}"
        );
        let csv = render(&v, Format::Csv).unwrap();
        let line = "x/a,x/b,TCP,80,would-drop,1,1,1,not isolated,would be dropped by x/trial (audit),would be dropped by x/trial (audit)";
        assert!(csv.lines().any(|l| l == line), "{line} in\n{csv}");
        let svg = render(&v, Format::Svg).unwrap();
        let drawn = format!("stroke=\"{}\"", color(Verdict::WouldDrop));
        assert!(
            svg.lines()
                .any(|l| l.starts_with("<path") && l.contains(&drawn)),
            "{svg}"
        );
    }

    /// A workload's template is a node of its own, named after the workload, with its kind.
    #[test]
    fn workload_templates_are_nodes_with_their_kind() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("all.yaml"),
            "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: db, namespace: x}\nspec:\n  selector: {matchLabels: {app: db}}\n  template:\n    metadata: {labels: {app: db}}\n    spec: {containers: [{name: c, ports: [{name: pg, containerPort: 5432}]}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: x}\nspec: {containers: []}\n",
        )
        .unwrap();
        let v = view_of_dir(dir.path(), Group::Workload).unwrap();
        let nodes: Vec<(String, &str)> =
            v.nodes.iter().map(|n| (n.id(), n.kind.as_str())).collect();
        assert_eq!(
            nodes,
            [
                ("x/client".to_string(), "Pod"),
                ("x/db".to_string(), "StatefulSet")
            ]
        );
        assert_eq!(v.ports, [(enforcer_common::PROTO_TCP, 5432)]);
        let t = render(&v, Format::Text).unwrap();
        assert!(t.contains("x/db (StatefulSet)"), "{t}");
    }

    #[test]
    fn ports_parse_with_tcp_by_default() {
        assert_eq!(
            parse_ports(&["80".into(), "53/udp".into(), "80/TCP".into()]).unwrap(),
            [
                (enforcer_common::PROTO_TCP, 80),
                (enforcer_common::PROTO_UDP, 53)
            ]
        );
        assert!(parse_ports(&["0".into()]).is_err());
        assert!(parse_ports(&["80/icmp".into()]).is_err());
    }
}
