//! Kubernetes YAML as `kubectl apply -f` accepts it: multi-document text and
//! `kind: List`, parsed into typed objects. Text in, objects out: reading
//! files is the shell's business.

use std::sync::Arc;

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service},
    networking::v1::NetworkPolicy,
};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    endpoint_slice::EndpointSlice,
    intent::{ObjectError, Objects, Sourced},
    pod::PodInfo,
};

/// Objects parsed from text, with the documents that could not be parsed.
#[derive(Debug, Default)]
pub struct Parsed {
    /// The objects of the kinds the agent uses.
    pub objects: Objects,
    /// Documents or objects that were skipped, with the reason.
    pub errors: Vec<ObjectError>,
    /// The text as a whole could not be read (a YAML syntax error): no
    /// object of it is known, not even which documents it held.
    pub unusable: bool,
}

impl Parsed {
    /// Appends everything `other` holds.
    pub fn extend(&mut self, other: Parsed) {
        self.objects.extend(other.objects);
        self.errors.extend(other.errors);
        self.unusable |= other.unusable;
    }
}

/// The parser's limits: room for a directory of 10,000 Services with their
/// EndpointSlices in one file (the defaults stop at 1,024 documents), with
/// the default guards against alias bombs kept.
fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: 1_000_000,
            max_nodes: 100_000_000,
            max_events: 400_000_000,
            max_total_scalar_bytes: 1 << 30,
            max_reader_input_bytes: Some(1 << 30),
        },
    }
}

/// Parses every document of one file's text. `origin` names the file in
/// errors. A syntax error anywhere makes the whole text unusable (the
/// document boundaries after it are unknown): it is reported, and no object
/// of the text is returned.
pub fn parse_documents(origin: &str, text: &str) -> Parsed {
    let mut parsed = Parsed::default();
    let documents: Vec<Value> = match serde_saphyr::from_multiple_with_options(text, options()) {
        Ok(documents) => documents,
        Err(err) => {
            parsed
                .errors
                .push(document_error(origin, 0, "", err.to_string()));
            parsed.unusable = true;
            return parsed;
        }
    };
    for (index, value) in documents.into_iter().enumerate() {
        if !value.is_null() {
            parse_value(origin, index, value, &mut parsed);
        }
    }
    parsed
}

fn parse_value(origin: &str, index: usize, value: Value, parsed: &mut Parsed) {
    let kind = value.get("kind").and_then(Value::as_str).map(str::to_owned);
    let objects = &mut parsed.objects;
    let errors = &mut parsed.errors;
    match kind.as_deref() {
        Some("Service") => add::<Service, _>(
            origin,
            index,
            "Service",
            value,
            errors,
            &mut objects.services,
        ),
        Some("EndpointSlice") => add::<EndpointSlice, _>(
            origin,
            index,
            "EndpointSlice",
            value,
            errors,
            &mut objects.endpoint_slices,
        ),
        Some("Node") => add::<Node, _>(origin, index, "Node", value, errors, &mut objects.nodes),
        Some("Pod") => add::<PodInfo, _>(origin, index, "Pod", value, errors, &mut objects.pods),
        Some("Namespace") => add::<Namespace, _>(
            origin,
            index,
            "Namespace",
            value,
            errors,
            &mut objects.namespaces,
        ),
        Some("NetworkPolicy") => add::<NetworkPolicy, _>(
            origin,
            index,
            "NetworkPolicy",
            value,
            errors,
            &mut objects.network_policies,
        ),
        Some("List") => {
            let items = value.get("items").and_then(Value::as_array).cloned();
            for item in items.unwrap_or_default() {
                parse_value(origin, index, item, parsed);
            }
        }
        // Other kinds (Deployments, ConfigMaps...) may live next to Services.
        Some(_) => {}
        None => errors.push(document_error(origin, index, "kind", "missing".into())),
    }
}

/// Deserializes a document of a kind the agent uses (as `D`, kept as `T`)
/// into its list; a schema error is reported with the object and the path
/// of the field.
fn add<D: DeserializeOwned, T: From<D>>(
    origin: &str,
    index: usize,
    kind: &str,
    value: Value,
    errors: &mut Vec<ObjectError>,
    list: &mut Vec<Sourced<T>>,
) {
    let metadata = |field: &str| {
        value
            .get("metadata")
            .and_then(|m| m.get(field))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let name = metadata("name");
    let namespace = metadata("namespace").unwrap_or_else(|| "default".into());
    match serde_path_to_error::deserialize::<_, D>(value) {
        Ok(object) => list.push(Sourced {
            origin: origin.into(),
            object: Arc::new(T::from(object)),
        }),
        Err(err) => {
            let object = match name {
                Some(name) => format!("{kind} {namespace}/{name}"),
                None => format!("{kind} (document {index})"),
            };
            errors.push(ObjectError {
                origin: origin.to_string(),
                object,
                field: err.path().to_string(),
                reason: err.into_inner().to_string(),
            });
        }
    }
}

fn document_error(origin: &str, index: usize, field: &str, reason: String) -> ObjectError {
    ObjectError {
        origin: origin.to_string(),
        object: format!("document {index}"),
        field: if field.is_empty() {
            ".".into()
        } else {
            field.into()
        },
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_files_and_lists_are_read() {
        let parsed = parse_documents(
            "f.yaml",
            r#"
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}
---
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: b}
  spec: {clusterIP: 10.0.0.2, ports: [{port: 80}]}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: ignored}
"#,
        );
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let names: Vec<_> = parsed
            .objects
            .services
            .iter()
            .map(|s| s.object.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn schema_errors_name_the_file_object_and_field() {
        let parsed = parse_documents(
            "bad.yaml",
            r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports:
  - {name: http, port: eighty}
---
apiVersion: v1
kind: Service
metadata: {name: ok}
spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}
"#,
        );
        assert_eq!(parsed.objects.services.len(), 1);
        let err = &parsed.errors[0];
        assert_eq!(err.origin, "bad.yaml");
        assert_eq!(err.object, "Service shop/web");
        assert_eq!(err.field, "spec.ports[0].port");
        assert!(err.reason.contains("expected i32"), "{}", err.reason);
    }

    #[test]
    fn a_document_without_kind_is_reported() {
        let parsed = parse_documents("x.yaml", "metadata: {name: a}\n");
        assert_eq!(parsed.errors.len(), 1);
        assert_eq!(parsed.errors[0].field, "kind");
    }

    #[test]
    fn a_syntax_error_is_reported_with_the_file() {
        let parsed = parse_documents("broken.yaml", "kind: Service\nmetadata: {name: [\n");
        assert!(parsed.objects.services.is_empty());
        assert!(parsed.unusable);
        assert_eq!(parsed.errors.len(), 1);
        assert_eq!(parsed.errors[0].origin, "broken.yaml");
    }

    #[test]
    fn a_file_with_thousands_of_documents_is_read() {
        let text: String = (0..5_000)
            .map(|i| {
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{clusterIP: 10.0.{}.{}, ports: [{{port: 80}}]}}\n---\n",
                    i / 250,
                    i % 250 + 1
                )
            })
            .collect();
        let parsed = parse_documents("big.yaml", &text);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors.first());
        assert_eq!(parsed.objects.services.len(), 5_000);
    }

    #[test]
    fn namespaces_and_network_policies_are_read() {
        let parsed = parse_documents(
            "p.yaml",
            r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: a}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress]}
"#,
        );
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert_eq!(parsed.objects.namespaces.len(), 1);
        assert_eq!(parsed.objects.network_policies.len(), 1);
    }
}
