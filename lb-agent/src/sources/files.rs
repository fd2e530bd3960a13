//! The YAML directory source: reads the manifests of a directory as
//! `kubectl apply -f DIR` would, and publishes a snapshot whenever a file
//! changes (polled by name, size and modification time).

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::{Duration, SystemTime},
};

use lb_core::{
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

/// Name, modification time and size of every manifest: a cheap change detector.
pub type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

/// The manifest files of a directory, sorted by name.
fn manifest_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_manifest(p))
        .collect();
    files.sort();
    Ok(files)
}

/// Fingerprint of a directory's manifests.
pub fn fingerprint(dir: &Path) -> io::Result<Fingerprint> {
    manifest_files(dir)?
        .into_iter()
        .map(|path| {
            let meta = fs::metadata(&path)?;
            Ok((path, meta.modified().ok(), meta.len()))
        })
        .collect()
}

/// Parses every manifest of a directory; a file that cannot be read is
/// reported and skipped.
pub fn read_dir(dir: &Path) -> io::Result<Parsed> {
    let mut parsed = Parsed::default();
    for path in manifest_files(dir)? {
        let origin = path.display().to_string();
        match fs::read_to_string(&path) {
            Ok(text) => parsed.extend(parse_documents(&origin, &text)),
            Err(err) => parsed.errors.push(ObjectError {
                origin,
                object: "document 0".into(),
                field: ".".into(),
                reason: format!("unreadable: {err}"),
            }),
        }
    }
    Ok(parsed)
}

/// Polls a manifest directory and publishes a snapshot whenever a file
/// changes. A directory that cannot be read publishes nothing: the datapath
/// keeps its last state.
pub fn watch(dir: PathBuf, period: Duration, out: Arc<Latest>) {
    thread::spawn(move || {
        let mut last_seen: Option<Fingerprint> = None;
        loop {
            let read = fingerprint(&dir).and_then(|fingerprint| {
                if last_seen.as_ref() == Some(&fingerprint) {
                    return Ok(());
                }
                let parsed = read_dir(&dir)?;
                out.publish(Snapshot {
                    objects: parsed.objects,
                    errors: parsed.errors,
                });
                last_seen = Some(fingerprint);
                Ok(())
            });
            if let Err(err) = read {
                error!(dir = %dir.display(), error = %err, "cannot read the manifest directory; keeping the current state");
            }
            thread::sleep(period);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_manifests_are_read_and_unreadable_ones_are_reported() {
        let dir = std::env::temp_dir().join(format!("lb-files-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("a.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n",
        )
        .unwrap();
        fs::write(dir.join("notes.txt"), "kind: Service\n").unwrap();
        fs::create_dir_all(dir.join("b.yaml")).unwrap();
        let parsed = read_dir(&dir).unwrap();
        let fingerprint = fingerprint(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(parsed.objects.services.len(), 1);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert_eq!(
            fingerprint.len(),
            1,
            "directories and other files are skipped"
        );
    }
}
