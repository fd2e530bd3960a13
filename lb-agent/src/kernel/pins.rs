//! The bpffs directory where the agent pins its maps and links, so that the
//! datapath outlives the agent: preparing it, opening pinned maps, replacing
//! link pins without a gap, and removing pins of older layouts.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Map, MapData},
    programs::links::FdLink,
};
use lb_common::maps;
use tracing::{info, warn};

use super::{KernelError, OnMap};
use crate::node::mounts;

/// Checks `pin_dir` is on bpffs, where pins outlive the agent, and creates
/// it (and its `links/`). The check comes first, on the nearest existing
/// ancestor: without bpffs the directory cannot be created (sysfs refuses),
/// and "No such file or directory" would hide the reason.
pub fn prepare(pin_dir: &Path) -> Result<(), KernelError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KernelError::Io { path, source }
    };
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if !mounts::is_on_fs(existing, "bpf").map_err(io_err(Path::new("/proc/self/mountinfo")))? {
        return Err(KernelError::NotBpffs(pin_dir.to_path_buf()));
    }
    fs::create_dir_all(pin_dir.join("links")).map_err(io_err(pin_dir))?;
    check_owned(pin_dir)?;
    check_owned(&pin_dir.join("links"))
}

/// Checks that the agent owns `dir` and that no one else may write or list
/// it: on a bpffs mounted world-writable, another user could pre-create the
/// pin directory or replace pins in it. A directory of ours that is open
/// to others (an older agent created it 0755) is closed to 0700.
pub fn check_owned(dir: &Path) -> Result<(), KernelError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let io_err = |source| KernelError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let meta = fs::symlink_metadata(dir).map_err(io_err)?;
    let owner = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != owner {
        return Err(KernelError::PinDirNotOwned {
            path: dir.to_path_buf(),
            uid: meta.uid(),
        });
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err)?;
        info!(dir = %dir.display(), "closed the pin directory to other users (mode 0700)");
    }
    Ok(())
}

/// Checks `cgroup` is a directory on a cgroup v2 mount, the only kind the
/// socket programs attach to.
pub fn check_cgroup(cgroup: &Path) -> Result<(), KernelError> {
    let on_cgroup2 = cgroup.is_dir()
        && mounts::is_on_fs(cgroup, "cgroup2").map_err(|source| KernelError::Io {
            path: "/proc/self/mountinfo".into(),
            source,
        })?;
    if on_cgroup2 {
        Ok(())
    } else {
        Err(KernelError::NotCgroup2(cgroup.to_path_buf()))
    }
}

/// Opens the map pinned as `name` in `dir`.
pub fn open_map(dir: &Path, name: &'static str) -> Result<Map, KernelError> {
    let path = dir.join(name);
    if !path.exists() {
        return Err(KernelError::NotPinned(path));
    }
    let data = MapData::from_pin(&path).on(name)?;
    Map::from_map_data(data).on(name)
}

/// Opens the map pinned as `name` in `dir`, if there is one.
pub fn open_map_if_pinned(dir: &Path, name: &'static str) -> Result<Option<Map>, KernelError> {
    match open_map(dir, name) {
        Ok(map) => Ok(Some(map)),
        Err(KernelError::NotPinned(_)) => Ok(None),
        Err(err) => Err(err),
    }
}

/// Path of the pin of a program's link.
pub fn link_path(pin_dir: &Path, name: &str) -> PathBuf {
    // bpffs rejects dots in names, which interface names may contain.
    pin_dir.join("links").join(name.replace('.', "_"))
}

/// Pins `link` as `name` in place of the link a previous agent pinned there:
/// the pin is staged and renamed over the old one, whose link then detaches.
pub fn replace_link(pin_dir: &Path, name: &str, link: FdLink) -> Result<(), KernelError> {
    let final_path = link_path(pin_dir, name);
    let staging = link_path(pin_dir, &format!("{name}_staging"));
    remove(&staging)?;
    let pinned = link.pin(&staging).map_err(|source| KernelError::Pin {
        path: staging.clone(),
        source,
    })?;
    fs::rename(&staging, &final_path).map_err(|source| KernelError::Io {
        path: final_path.clone(),
        source,
    })?;
    // The pin now holds the link; our descriptor may go.
    drop(pinned);
    Ok(())
}

/// Removes the bpffs pin `path`; one already gone is not an error.
pub fn remove(path: &Path) -> Result<(), KernelError> {
    match fs::remove_file(path) {
        Err(source) if source.kind() != io::ErrorKind::NotFound => Err(KernelError::Io {
            path: path.to_path_buf(),
            source,
        }),
        _ => Ok(()),
    }
}

/// Removes map pins of older layouts: `LB_*` names this version does not
/// use. The older conntrack is removed by its carry-over, not here.
pub fn remove_stale_maps(pin_dir: &Path) {
    let Ok(entries) = fs::read_dir(pin_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let current = maps::ALL.contains(&name.as_ref()) && name != maps::CONNTRACK_V2;
        if name.starts_with("LB_") && !current {
            match fs::remove_file(entry.path()) {
                Ok(()) => info!(pin = %name, "removed map pin of an older layout"),
                Err(err) => warn!(pin = %name, error = %err, "cannot remove stale map pin"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    #[test]
    fn a_pin_directory_of_another_user_is_refused_and_an_open_one_closed() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (it gives a directory to another user); run it as root"
        );
        let base = std::env::temp_dir().join(format!("lb-pins-{}", std::process::id()));
        let (theirs, open) = (base.join("theirs"), base.join("open"));
        fs::create_dir_all(&theirs).expect("mkdir");
        fs::create_dir_all(&open).expect("mkdir");
        std::os::unix::fs::chown(&theirs, Some(65_534), Some(65_534)).expect("chown");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).expect("chmod");

        let refused = check_owned(&theirs);
        let closed = check_owned(&open);
        let mode = fs::metadata(&open).expect("stat").mode() & 0o777;
        fs::remove_dir_all(&base).expect("cleanup");
        assert!(
            matches!(
                refused,
                Err(KernelError::PinDirNotOwned { uid: 65_534, .. })
            ),
            "{refused:?}"
        );
        assert!(closed.is_ok(), "{closed:?}");
        assert_eq!(mode, 0o700);
    }
}
