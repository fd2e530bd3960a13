//! The YAML directory source: reads the manifests of a directory as
//! `kubectl apply -f DIR` would, and publishes a snapshot whenever a file
//! changes (polled by name, size and modification time), parsing only the
//! files that changed.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::{Duration, SystemTime},
};

use lb_core::{
    admission::{admit, AdmissionRules},
    intent::ObjectError,
    yaml::{parse_documents, Parsed},
};
use tracing::error;

use super::{Latest, Snapshot};

/// Whether a file name is one `kubectl apply -f DIR` would read.
fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// The manifest files of a directory with their stamps (one `stat` each,
/// following symbolic links, as ConfigMap volumes use them).
fn manifest_files(dir: &Path) -> io::Result<BTreeMap<PathBuf, Stamp>> {
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if !is_manifest(&path) {
            continue;
        }
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        if meta.is_file() {
            let stamp = Stamp {
                modified: meta.modified().ok(),
                len: meta.len(),
            };
            files.insert(path, stamp);
        }
    }
    Ok(files)
}

/// What identifies a file's version without reading it.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

/// One manifest as last read: its stamp and what it held.
struct ManifestFile {
    stamp: Stamp,
    parsed: Parsed,
}

/// The manifests of a directory, read as `kubectl apply -f DIR` would and
/// kept per file: a refresh parses only the files whose size or
/// modification time changed, so the objects of the others keep their
/// `Arc` and the compiler skips them. Objects the API server would reject
/// are dropped whole (see [`admit`]).
pub struct ManifestDir {
    dir: PathBuf,
    rules: AdmissionRules,
    files: BTreeMap<PathBuf, ManifestFile>,
}

impl ManifestDir {
    /// A directory not read yet.
    pub fn new(dir: PathBuf, rules: AdmissionRules) -> Self {
        Self {
            dir,
            rules,
            files: BTreeMap::new(),
        }
    }

    /// Re-reads the files that changed or appeared and forgets those that
    /// went; returns whether any did. A directory that cannot be listed is
    /// an error and changes nothing; a file that cannot be read or parsed is
    /// reported, and keeps the objects it last held when it was good.
    pub fn refresh(&mut self) -> io::Result<bool> {
        let present = manifest_files(&self.dir)?;
        let before = self.files.len();
        self.files.retain(|path, _| present.contains_key(path));
        let mut changed = self.files.len() != before;
        for (path, stamp) in present {
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            changed = true;
            let mut parsed = self.read(&path);
            if parsed.unusable {
                if let Some(last_good) = self.files.get(&path) {
                    // A half-saved edit or a stray tab must not withdraw
                    // every Service of the file: its last good objects stay
                    // programmed and the error is reported until it is fixed.
                    parsed.objects = last_good.parsed.objects.clone();
                    for error in &mut parsed.errors {
                        error
                            .reason
                            .push_str("; keeping the file's last good objects");
                    }
                }
            }
            self.files.insert(path, ManifestFile { stamp, parsed });
        }
        Ok(changed)
    }

    fn read(&self, path: &Path) -> Parsed {
        let origin = path.display().to_string();
        match fs::read_to_string(path) {
            Ok(text) => {
                let mut parsed = parse_documents(&origin, &text);
                admit(&mut parsed, &self.rules);
                parsed
            }
            Err(err) => Parsed {
                errors: vec![ObjectError {
                    origin,
                    object: "document 0".into(),
                    field: ".".into(),
                    reason: format!("unreadable: {err}"),
                }],
                unusable: true,
                ..Parsed::default()
            },
        }
    }

    /// Every object and error of the directory, files in name order.
    pub fn snapshot(&self) -> Snapshot {
        let mut all = Parsed::default();
        for file in self.files.values() {
            all.objects.extend(file.parsed.objects.clone());
            all.errors.extend(file.parsed.errors.iter().cloned());
        }
        Snapshot {
            objects: all.objects,
            errors: all.errors,
        }
    }
}

/// Polls a manifest directory and publishes a snapshot whenever a file
/// changes. A directory that cannot be read publishes nothing: the datapath
/// keeps its last state.
pub fn watch(dir: PathBuf, rules: AdmissionRules, period: Duration, out: Arc<Latest>) {
    thread::spawn(move || {
        let mut manifests = ManifestDir::new(dir, rules);
        // The first snapshot is published even for an empty directory: the
        // agent waits for one before it is ready.
        let mut published = false;
        loop {
            match manifests.refresh() {
                Ok(changed) if changed || !published => {
                    out.publish(manifests.snapshot());
                    published = true;
                }
                Ok(_) => {}
                Err(err) => {
                    error!(dir = %manifests.dir.display(), error = %err, "cannot read the manifest directory; keeping the current state");
                }
            }
            thread::sleep(period);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE_A: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n";

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lb-files-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("scratch directory");
        dir
    }

    #[test]
    fn only_manifests_are_read_and_unreadable_ones_are_reported() {
        let dir = scratch("kinds");
        fs::write(dir.join("a.yaml"), SERVICE_A).expect("write");
        fs::write(dir.join("notes.txt"), "kind: Service\n").expect("write");
        fs::create_dir_all(dir.join("b.yaml")).expect("mkdir");
        let mut manifests = ManifestDir::new(dir.clone(), AdmissionRules::default());
        let changed = manifests.refresh().expect("refresh");
        let snapshot = manifests.snapshot();
        fs::remove_dir_all(&dir).expect("cleanup");
        assert!(changed);
        assert_eq!(snapshot.objects.services.len(), 1);
        assert!(snapshot.errors.is_empty(), "{:?}", snapshot.errors);
        assert_eq!(
            manifests.files.len(),
            1,
            "directories and other files are skipped"
        );
    }

    #[test]
    fn a_refresh_parses_only_the_files_that_changed() {
        let dir = scratch("incremental");
        fs::write(dir.join("a.yaml"), SERVICE_A).expect("write");
        fs::write(
            dir.join("b.yaml"),
            SERVICE_A
                .replace("name: a", "name: b")
                .replace("10.0.0.1", "10.0.0.2"),
        )
        .expect("write");
        let mut manifests = ManifestDir::new(dir.clone(), AdmissionRules::default());
        manifests.refresh().expect("refresh");
        let first = manifests.snapshot();
        assert!(!manifests.refresh().expect("refresh"), "nothing changed");

        fs::write(
            dir.join("b.yaml"),
            SERVICE_A
                .replace("name: a", "name: b")
                .replace("10.0.0.1", "10.0.0.22"),
        )
        .expect("write");
        assert!(manifests.refresh().expect("refresh"));
        let second = manifests.snapshot();
        assert!(
            Arc::ptr_eq(
                &first.objects.services[0].object,
                &second.objects.services[0].object
            ),
            "a.yaml was not parsed again"
        );
        assert!(!Arc::ptr_eq(
            &first.objects.services[1].object,
            &second.objects.services[1].object
        ));

        fs::remove_file(dir.join("a.yaml")).expect("remove");
        assert!(manifests.refresh().expect("refresh"));
        let third = manifests.snapshot();
        fs::remove_dir_all(&dir).expect("cleanup");
        assert_eq!(third.objects.services.len(), 1);
        assert_eq!(
            third.objects.services[0].object.metadata.name.as_deref(),
            Some("b")
        );
    }

    #[test]
    fn a_syntax_error_keeps_the_files_last_good_objects() {
        let dir = scratch("syntax");
        let path = dir.join("a.yaml");
        fs::write(&path, SERVICE_A).expect("write");
        let mut manifests = ManifestDir::new(dir.clone(), AdmissionRules::default());
        manifests.refresh().expect("refresh");

        fs::write(
            &path,
            format!("{SERVICE_A}---\nkind: Service\nmetadata: {{name: [\n"),
        )
        .expect("write");
        assert!(manifests.refresh().expect("refresh"));
        let broken = manifests.snapshot();
        assert_eq!(broken.objects.services.len(), 1, "a.yaml's Service stays");
        assert_eq!(broken.errors.len(), 1, "{:?}", broken.errors);
        assert!(broken.errors[0].origin.ends_with("a.yaml"));
        assert!(
            broken.errors[0].reason.contains("last good"),
            "{}",
            broken.errors[0].reason
        );
        assert!(!manifests.refresh().expect("refresh"), "not parsed again");

        fs::write(&path, SERVICE_A.replace("10.0.0.1", "10.0.0.9")).expect("write");
        manifests.refresh().expect("refresh");
        let fixed = manifests.snapshot();
        fs::remove_dir_all(&dir).expect("cleanup");
        assert!(fixed.errors.is_empty(), "{:?}", fixed.errors);
        assert_eq!(
            fixed.objects.services[0]
                .object
                .spec
                .as_ref()
                .and_then(|s| s.cluster_ip.as_deref()),
            Some("10.0.0.9")
        );
    }

    #[test]
    fn objects_the_api_server_rejects_are_dropped_whole() {
        let dir = scratch("admission");
        fs::write(
            dir.join("dup.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: dup}\nspec: {clusterIP: 10.0.0.1, ports: [{name: http, port: 80}, {name: http, port: 81}]}\n",
        )
        .expect("write");
        let mut manifests = ManifestDir::new(dir.clone(), AdmissionRules::default());
        manifests.refresh().expect("refresh");
        let snapshot = manifests.snapshot();
        fs::remove_dir_all(&dir).expect("cleanup");
        assert!(snapshot.objects.services.is_empty());
        assert_eq!(snapshot.errors.len(), 1, "{:?}", snapshot.errors);
        assert!(snapshot.errors[0].origin.ends_with("dup.yaml"));
        assert_eq!(snapshot.errors[0].field, "spec.ports[1].name");
    }
}
