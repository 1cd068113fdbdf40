//! Label selectors (`metav1.LabelSelector`): parsing with the API server's validation, and
//! matching.
//!
//! API text: "A label selector is a label query over a set of resources. The result of
//! matchLabels and matchExpressions are ANDed. An empty label selector matches all objects."
//! Operators: "In, NotIn, Exists and DoesNotExist. If the operator is In or NotIn, the values
//! array must be non-empty. If the operator is Exists or DoesNotExist, the values array must be
//! empty."

use std::{collections::BTreeMap, fmt};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Labels of an object (`metadata.labels`).
pub type Labels = BTreeMap<String, String>;

/// One requirement of a parsed selector.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Requirement {
    /// `key` is present with one of the values (matchLabels gives a one-value `In`).
    In(String, Vec<String>),
    /// `key` is absent, or present with none of the values.
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Self::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Self::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Self::Exists(k) => labels.contains_key(k),
            Self::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

/// A validated selector: the AND of its requirements (none = everything).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

/// A problem with one field of a selector; `field` is relative to the selector
/// (e.g. `matchExpressions[1].values`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectorError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for SelectorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl Selector {
    /// The selector that matches everything.
    pub fn everything() -> Self {
        Self::default()
    }

    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Validates and parses a selector. Every problem is reported, not just the first.
    pub fn parse(selector: &LabelSelector) -> Result<Self, Vec<SelectorError>> {
        let mut errors = Vec::new();
        let mut requirements = Vec::new();
        let mut err =
            |field: String, message: String| errors.push(SelectorError { field, message });
        for (k, v) in selector.match_labels.iter().flatten() {
            if let Err(m) = check_key(k) {
                err(format!("matchLabels.{k}"), m);
            }
            if let Err(m) = check_value(v) {
                err(format!("matchLabels.{k}"), m);
            }
            requirements.push(Requirement::In(k.clone(), vec![v.clone()]));
        }
        for (i, expr) in selector.match_expressions.iter().flatten().enumerate() {
            let path = format!("matchExpressions[{i}]");
            if let Err(m) = check_key(&expr.key) {
                err(format!("{path}.key"), m);
            }
            let values = expr.values.clone().unwrap_or_default();
            for (j, v) in values.iter().enumerate() {
                if let Err(m) = check_value(v) {
                    err(format!("{path}.values[{j}]"), m);
                }
            }
            let key = expr.key.clone();
            match expr.operator.as_str() {
                "In" | "NotIn" => {
                    if values.is_empty() {
                        err(
                            format!("{path}.values"),
                            format!("must be non-empty when operator is {}", expr.operator),
                        );
                    }
                    if expr.operator == "In" {
                        requirements.push(Requirement::In(key, values));
                    } else {
                        requirements.push(Requirement::NotIn(key, values));
                    }
                }
                "Exists" | "DoesNotExist" => {
                    if !values.is_empty() {
                        err(
                            format!("{path}.values"),
                            format!("must be empty when operator is {}", expr.operator),
                        );
                    }
                    if expr.operator == "Exists" {
                        requirements.push(Requirement::Exists(key));
                    } else {
                        requirements.push(Requirement::DoesNotExist(key));
                    }
                }
                other => err(
                    format!("{path}.operator"),
                    format!(
                        "unsupported operator {other:?}: must be In, NotIn, Exists or DoesNotExist"
                    ),
                ),
            }
        }
        if errors.is_empty() {
            requirements.sort();
            requirements.dedup();
            // Parsed selectors are kept for the life of their policy (see `policy::memo`).
            requirements.shrink_to_fit();
            Ok(Self { requirements })
        } else {
            Err(errors)
        }
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

/// Whether `selector` matches `labels`; an invalid selector matches nothing (fail closed for
/// allow rules; callers validate policies before using them).
pub fn matches(selector: &LabelSelector, labels: &Labels) -> bool {
    Selector::parse(selector).is_ok_and(|s| s.matches(labels))
}

fn is_alnum(c: char) -> bool {
    c.is_ascii_alphanumeric()
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, at most 63 characters.
fn check_name(s: &str, what: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err(format!("{what} {s:?} must be no more than 63 characters"));
    }
    let ok = s.starts_with(is_alnum)
        && s.ends_with(is_alnum)
        && s.chars()
            .all(|c| is_alnum(c) || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {s:?} must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
        ))
    }
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name.
fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && l.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && l.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            });
        if !ok {
            return Err(format!(
                "label key prefix {p:?} must be a lowercase DNS subdomain"
            ));
        }
    }
    if name.is_empty() {
        return Err(format!("label key {key:?} must have a non-empty name"));
    }
    check_name(name, "label key name")
}

fn check_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        Ok(())
    } else {
        check_name(value, "label value")
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: Option<&[&str]>) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: values.map(|v| v.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn sel(ml: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>) -> LabelSelector {
        LabelSelector {
            match_labels: (!ml.is_empty()).then(|| labels(ml)),
            match_expressions: (!exprs.is_empty()).then_some(exprs),
        }
    }

    #[test]
    fn empty_matches_everything() {
        let s = Selector::parse(&LabelSelector::default()).unwrap();
        assert!(s.is_everything());
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("a", "b")])));
        let s = Selector::parse(&sel(&[], vec![])).unwrap();
        assert!(s.matches(&labels(&[])));
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let s = Selector::parse(&sel(
            &[("app", "web")],
            vec![expr("tier", "In", Some(&["a", "b"]))],
        ))
        .unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "b")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "c")])));
        assert!(!s.matches(&labels(&[("app", "db"), ("tier", "a")])));
        assert!(!s.matches(&labels(&[("tier", "a")])));
    }

    #[test]
    fn operators() {
        let l = labels(&[("a", "1"), ("b", "2")]);
        let m = |e| Selector::parse(&sel(&[], vec![e])).unwrap().matches(&l);
        assert!(m(expr("a", "In", Some(&["1", "3"]))));
        assert!(!m(expr("a", "In", Some(&["3"]))));
        assert!(!m(expr("c", "In", Some(&["1"]))));
        assert!(m(expr("a", "NotIn", Some(&["3"]))));
        assert!(!m(expr("a", "NotIn", Some(&["1"]))));
        assert!(
            m(expr("c", "NotIn", Some(&["1"]))),
            "NotIn matches an absent key"
        );
        assert!(m(expr("a", "Exists", None)));
        assert!(!m(expr("c", "Exists", None)));
        assert!(m(expr("c", "DoesNotExist", Some(&[]))));
        assert!(!m(expr("a", "DoesNotExist", None)));
    }

    #[test]
    fn validation_errors() {
        let e = Selector::parse(&sel(&[], vec![expr("a", "Equals", Some(&["1"]))])).unwrap_err();
        assert_eq!(e[0].field, "matchExpressions[0].operator");
        let e = Selector::parse(&sel(&[], vec![expr("a", "in", Some(&["1"]))])).unwrap_err();
        assert_eq!(
            e[0].field, "matchExpressions[0].operator",
            "operators are case sensitive"
        );
        let e = Selector::parse(&sel(&[], vec![expr("a", "In", None)])).unwrap_err();
        assert_eq!(e[0].field, "matchExpressions[0].values");
        let e = Selector::parse(&sel(&[], vec![expr("a", "NotIn", Some(&[]))])).unwrap_err();
        assert_eq!(e[0].field, "matchExpressions[0].values");
        let e = Selector::parse(&sel(
            &[],
            vec![
                expr("a", "In", Some(&["1"])),
                expr("a", "Exists", Some(&["x"])),
            ],
        ))
        .unwrap_err();
        assert_eq!(e[0].field, "matchExpressions[1].values");
        let e = Selector::parse(&sel(&[], vec![expr("-bad", "Exists", None)])).unwrap_err();
        assert_eq!(e[0].field, "matchExpressions[0].key");
        let e = Selector::parse(&sel(&[("ok", "bad value")], vec![])).unwrap_err();
        assert_eq!(e[0].field, "matchLabels.ok");
        let e = Selector::parse(&sel(&[], vec![expr("a", "In", Some(&["x/y"]))])).unwrap_err();
        assert_eq!(e[0].field, "matchExpressions[0].values[0]");
        // Keys with a prefix, and empty values, are fine.
        Selector::parse(&sel(
            &[("kubernetes.io/metadata.name", "x"), ("e", "")],
            vec![],
        ))
        .unwrap();
        let e = Selector::parse(&sel(&[("Bad_Prefix/x", "1")], vec![])).unwrap_err();
        assert_eq!(e[0].field, "matchLabels.Bad_Prefix/x");
        assert!(!matches(
            &sel(&[], vec![expr("a", "Nope", None)]),
            &labels(&[])
        ));
    }
}
