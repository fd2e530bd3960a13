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
        let current = maps::ALL.contains(&name.as_ref()) && name != maps::CONNTRACK_V1;
        if name.starts_with("LB_") && !current {
            match fs::remove_file(entry.path()) {
                Ok(()) => info!(pin = %name, "removed map pin of an older layout"),
                Err(err) => warn!(pin = %name, error = %err, "cannot remove stale map pin"),
            }
        }
    }
}
