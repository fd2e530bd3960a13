//! Label selectors (`matchLabels` and `matchExpressions` with In, NotIn,
//! Exists, DoesNotExist), validated once and then evaluated against label
//! maps.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// One requirement of a selector.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Requirement {
    /// The key has one of the values.
    In(String, BTreeSet<String>),
    /// The key is absent or has none of the values.
    NotIn(String, BTreeSet<String>),
    /// The key is present.
    Exists(String),
    /// The key is absent.
    DoesNotExist(String),
}

impl Requirement {
    /// The label key it is about.
    pub fn key(&self) -> &str {
        match self {
            Requirement::In(key, _)
            | Requirement::NotIn(key, _)
            | Requirement::Exists(key)
            | Requirement::DoesNotExist(key) => key,
        }
    }

    /// Whether `labels` satisfy it.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(key, values) => labels.get(key).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(key) => labels.contains_key(key),
            Requirement::DoesNotExist(key) => !labels.contains_key(key),
        }
    }
}

/// A validated selector: all requirements must hold; none selects
/// everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    /// The requirements, `matchLabels` as `In` with one value, sorted.
    pub requirements: Vec<Requirement>,
}

/// Why a selector is invalid, and where: the path below the selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectorError {
    /// The field, relative to the selector (`matchExpressions[0].values`).
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl Selector {
    /// The selector that selects everything.
    pub fn everything() -> Self {
        Self::default()
    }

    /// Validates a Kubernetes label selector, as the API server does.
    pub fn parse(selector: &LabelSelector) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            check_key(key).map_err(|reason| SelectorError {
                field: format!("matchLabels[{key}]"),
                reason,
            })?;
            requirements.push(Requirement::In(key.clone(), [value.clone()].into()));
        }
        for (i, expression) in selector.match_expressions.iter().flatten().enumerate() {
            let field = |part: &str| format!("matchExpressions[{i}]{part}");
            check_key(&expression.key).map_err(|reason| SelectorError {
                field: field(".key"),
                reason,
            })?;
            let values: BTreeSet<String> = expression.values.iter().flatten().cloned().collect();
            let key = expression.key.clone();
            let requirement = match expression.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(SelectorError {
                        field: field(".values"),
                        reason: format!(
                            "operator {} needs at least one value",
                            expression.operator
                        ),
                    })
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(SelectorError {
                        field: field(".values"),
                        reason: format!("operator {} takes no values", expression.operator),
                    })
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => {
                    return Err(SelectorError {
                        field: field(".operator"),
                        reason: format!(
                            "{other:?} is not an operator (In, NotIn, Exists, DoesNotExist)"
                        ),
                    })
                }
            };
            requirements.push(requirement);
        }
        requirements.sort();
        requirements.dedup();
        Ok(Self { requirements })
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether it selects everything.
    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    /// The label keys it looks at.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.requirements.iter().map(Requirement::key)
    }
}

/// Checks a label key: an optional DNS subdomain prefix and `/`, then a
/// name of at most 63 alphanumerics, `-`, `_` and `.`, starting and ending
/// with an alphanumeric.
fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'))
    });
    if name_ok && prefix_ok {
        Ok(())
    } else {
        Err(format!("{key:?} is not a valid label key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expression(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn every_operator_and_match_labels_hold_together() {
        let selector = Selector::parse(&LabelSelector {
            match_labels: Some([("app".to_string(), "web".to_string())].into()),
            match_expressions: Some(vec![
                expression("tier", "In", &["a", "b"]),
                expression("env", "NotIn", &["prod"]),
                expression("team", "Exists", &[]),
                expression("legacy", "DoesNotExist", &[]),
            ]),
        })
        .unwrap();
        let ok = labels(&[("app", "web"), ("tier", "b"), ("team", "x")]);
        assert!(selector.matches(&ok));
        let mut bad = ok.clone();
        bad.insert("env".into(), "prod".into());
        assert!(!selector.matches(&bad));
        let mut bad = ok.clone();
        bad.insert("legacy".into(), "1".into());
        assert!(!selector.matches(&bad));
        let mut bad = ok.clone();
        bad.remove("team");
        assert!(!selector.matches(&bad));
        // NotIn holds when the key is absent.
        assert!(!ok.contains_key("env"));
        assert!(Selector::parse(&LabelSelector::default())
            .unwrap()
            .is_everything());
    }

    #[test]
    fn invalid_selectors_name_the_field() {
        let error = |e: LabelSelectorRequirement| {
            Selector::parse(&LabelSelector {
                match_expressions: Some(vec![e]),
                ..LabelSelector::default()
            })
            .unwrap_err()
        };
        assert_eq!(
            error(expression("a", "In", &[])).field,
            "matchExpressions[0].values"
        );
        assert_eq!(
            error(expression("a", "Exists", &["x"])).field,
            "matchExpressions[0].values"
        );
        assert_eq!(
            error(expression("a", "Matches", &["x"])).field,
            "matchExpressions[0].operator"
        );
        assert_eq!(
            error(expression("-bad", "Exists", &[])).field,
            "matchExpressions[0].key"
        );
        assert!(check_key("kubernetes.io/metadata.name").is_ok());
        assert!(check_key("app").is_ok());
        assert!(check_key("Bad_Prefix/app").is_err());
    }
}
