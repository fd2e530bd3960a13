//! Finds the cgroups of pods by UID, the way the kubelet names them:
//! `.../pod<uid>/...` (cgroupfs driver) or `...-pod<uid_with_underscores>.slice`
//! (systemd driver). A cgroup v2 id is its directory's inode number, which is
//! what `bpf_get_current_cgroup_id` returns for a process in it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    os::unix::fs::MetadataExt,
    path::Path,
};

/// How deep below the root a pod cgroup may be (kubepods/burstable/pod...).
const MAX_DEPTH: usize = 8;

/// The one of `uids` whose cgroup a cgroup directory name is.
pub fn pod_of<'a>(dir_name: &str, uids: &'a BTreeSet<String>) -> Option<&'a String> {
    uids.iter().find(|uid| {
        dir_name.contains(&format!("pod{uid}"))
            || dir_name.contains(&format!("pod{}", uid.replace('-', "_")))
    })
}

/// Whether a cgroup directory name is the cgroup of one of `uids`.
pub fn names_pod(dir_name: &str, uids: &BTreeSet<String>) -> bool {
    pod_of(dir_name, uids).is_some()
}

/// The ids of the cgroups of `uids` and of everything below them (containers).
pub fn cgroup_ids(root: &Path, uids: &BTreeSet<String>) -> io::Result<BTreeSet<u64>> {
    Ok(pod_cgroups(root, uids)?.into_keys().collect())
}

/// The ids of the cgroups of `uids` and of everything below them, each with
/// the UID of its pod.
pub fn pod_cgroups(root: &Path, uids: &BTreeSet<String>) -> io::Result<BTreeMap<u64, String>> {
    let mut ids = BTreeMap::new();
    if !uids.is_empty() {
        walk(root, uids, 0, None, &mut ids)?;
    }
    Ok(ids)
}

fn walk(
    dir: &Path,
    uids: &BTreeSet<String>,
    depth: usize,
    inside: Option<&String>,
    ids: &mut BTreeMap<u64, String>,
) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Ok(());
    }
    for entry in fs::read_dir(dir)? {
        let Ok(entry) = entry else { continue };
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = entry.file_name();
        let pod = inside.or_else(|| pod_of(&name.to_string_lossy(), uids));
        if let Some(pod) = pod {
            // Cgroups come and go; one that vanished meanwhile is skipped.
            if let Ok(meta) = entry.metadata() {
                ids.insert(meta.ino(), pod.clone());
            }
        }
        // A cgroup removed while we walk is not an error.
        let _ = walk(&entry.path(), uids, depth + 1, pod, ids);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_both_kubelet_cgroup_drivers() {
        let uids: BTreeSet<String> = ["0b5e-11ef".to_string()].into();
        assert!(names_pod("pod0b5e-11ef", &uids));
        assert!(names_pod("kubepods-burstable-pod0b5e_11ef.slice", &uids));
        assert!(!names_pod("pod1234", &uids));
    }

    #[test]
    fn collects_the_pod_cgroup_and_its_containers() {
        let root = std::env::temp_dir().join(format!("lb-podcg-{}", std::process::id()));
        let pod = root.join("kubepods/besteffort/podabc");
        fs::create_dir_all(pod.join("container1")).unwrap();
        fs::create_dir_all(root.join("kubepods/besteffort/podother/c")).unwrap();
        let ids = cgroup_ids(&root, &["abc".to_string()].into()).unwrap();
        let expected: BTreeSet<u64> = [
            fs::metadata(&pod).unwrap().ino(),
            fs::metadata(pod.join("container1")).unwrap().ino(),
        ]
        .into();
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(ids, expected);
    }
}
