//! Parses Kubernetes YAML as `kubectl apply -f` accepts it: multi-document files,
//! `kind: List`, and a directory of such files.

use std::{
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::Deserialize;

use crate::model::{ObjectError, Objects, Sourced};

/// Objects parsed from text, with the documents that could not be parsed.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Services and EndpointSlices found.
    pub objects: Objects,
    /// Documents that were skipped, with the reason.
    pub errors: Vec<ObjectError>,
}

impl Parsed {
    fn merge(&mut self, other: Parsed) {
        self.objects.services.extend(other.objects.services);
        self.objects
            .endpoint_slices
            .extend(other.objects.endpoint_slices);
        self.objects.nodes.extend(other.objects.nodes);
        self.objects.pods.extend(other.objects.pods);
        self.errors.extend(other.errors);
    }
}

/// Parses every document of one file's text. `origin` names the file in errors.
pub fn parse_documents(origin: &str, text: &str) -> Parsed {
    let mut parsed = Parsed::default();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(document) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(value) => value,
            Err(err) => {
                parsed
                    .errors
                    .push(document_error(origin, index, "", err.to_string()));
                // A syntax error leaves the stream in an unknown place.
                break;
            }
        };
        parse_value(origin, index, value, &mut parsed);
    }
    parsed
}

fn parse_value(origin: &str, index: usize, value: serde_yaml::Value, parsed: &mut Parsed) {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .map(str::to_owned);
    match kind.as_deref() {
        Some("Service") => add(origin, index, "Service", value, parsed, |o| &mut o.services),
        Some("EndpointSlice") => add(origin, index, "EndpointSlice", value, parsed, |o| {
            &mut o.endpoint_slices
        }),
        Some("Node") => add(origin, index, "Node", value, parsed, |o| &mut o.nodes),
        Some("Pod") => add(origin, index, "Pod", value, parsed, |o| &mut o.pods),
        Some("List") => {
            let items = value.get("items").and_then(|i| i.as_sequence()).cloned();
            for item in items.unwrap_or_default() {
                parse_value(origin, index, item, parsed);
            }
        }
        // Other kinds (Deployments, ConfigMaps...) may live next to Services.
        Some(_) => {}
        None => parsed
            .errors
            .push(document_error(origin, index, "kind", "missing".into())),
    }
}

/// Deserializes a document of a kind the model uses into its list.
fn add<T: serde::de::DeserializeOwned>(
    origin: &str,
    index: usize,
    kind: &str,
    value: serde_yaml::Value,
    parsed: &mut Parsed,
    list: fn(&mut Objects) -> &mut Vec<Sourced<T>>,
) {
    if let Some(object) = typed::<T>(origin, index, kind, value, parsed) {
        list(&mut parsed.objects).push(Sourced {
            origin: origin.into(),
            object: object.into(),
        });
    }
}

fn typed<T: serde::de::DeserializeOwned>(
    origin: &str,
    index: usize,
    kind: &str,
    value: serde_yaml::Value,
    parsed: &mut Parsed,
) -> Option<T> {
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .map(str::to_owned);
    let namespace = value
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(|n| n.as_str())
        .unwrap_or("default")
        .to_owned();
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(object) => Some(object),
        Err(err) => {
            let object = match name {
                Some(name) => format!("{kind} {namespace}/{name}"),
                None => format!("{kind} (document {index})"),
            };
            parsed.errors.push(ObjectError {
                origin: origin.to_string(),
                object,
                field: err.path().to_string(),
                reason: err.into_inner().to_string(),
            });
            None
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

/// Whether a file name is one `kubectl apply -f DIR` would read.
fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Name, modification time and size of every manifest: a cheap change detector.
pub type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

/// The manifest files of a directory, sorted by name.
fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_manifest(p))
        .collect();
    files.sort();
    Ok(files)
}

/// Fingerprint of a directory's manifests.
pub fn fingerprint(dir: &Path) -> std::io::Result<Fingerprint> {
    manifest_files(dir)?
        .into_iter()
        .map(|path| {
            let meta = fs::metadata(&path)?;
            Ok((path, meta.modified().ok(), meta.len()))
        })
        .collect()
}

/// Parses every manifest of a directory.
pub fn read_dir(dir: &Path) -> std::io::Result<Parsed> {
    let mut parsed = Parsed::default();
    for path in manifest_files(dir)? {
        let origin = path.display().to_string();
        match fs::read_to_string(&path) {
            Ok(text) => parsed.merge(parse_documents(&origin, &text)),
            Err(err) => {
                parsed
                    .errors
                    .push(document_error(&origin, 0, "", format!("unreadable: {err}")))
            }
        }
    }
    Ok(parsed)
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
}
