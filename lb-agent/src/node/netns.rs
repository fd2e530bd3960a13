//! Network namespaces as the socket programs identify them: by cookie
//! (`SO_NETNS_COOKIE`, Linux 5.14), the value `bpf_get_netns_cookie`
//! returns for a socket in one; and the node's namespaces, found from its
//! processes and from the bind mounts of `ip netns` and container runtimes.

use std::{
    collections::BTreeMap,
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use nix::{
    getsockopt_impl,
    sched::{setns, CloneFlags},
    sockopt_impl,
    sys::socket::{getsockopt, socket, AddressFamily, SockFlag, SockType},
};

sockopt_impl!(
    /// `SO_NETNS_COOKIE`: the cookie of the socket's network namespace.
    NetnsCookie,
    GetOnly,
    libc::SOL_SOCKET,
    libc::SO_NETNS_COOKIE,
    u64
);

/// The cookie of the calling thread's network namespace.
pub fn own_cookie() -> io::Result<u64> {
    let probe = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    Ok(getsockopt(&probe, NetnsCookie)?)
}

/// Where `ip netns` and container runtimes (CNI) bind-mount namespaces
/// that may have no process in them yet.
const NAMED_NETNS_DIR: &str = "/run/netns";

/// One path per distinct network namespace of the node: those of its
/// processes and those bind-mounted under `/run/netns`.
pub fn all() -> io::Result<Vec<PathBuf>> {
    let mut by_inode = BTreeMap::new();
    let mut add = |path: PathBuf| {
        // Processes and mounts come and go while we look; skip those gone.
        if let Ok(meta) = fs::metadata(&path) {
            by_inode.entry((meta.dev(), meta.ino())).or_insert(path);
        }
    };
    for entry in fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        if entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            add(entry.path().join("ns/net"));
        }
    }
    match fs::read_dir(NAMED_NETNS_DIR) {
        Ok(entries) => entries.flatten().for_each(|entry| add(entry.path())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    Ok(by_inode.into_values().collect())
}

/// The cookie of the network namespace at `path` (a thread enters it: setns
/// changes the calling thread only).
pub fn cookie_of(path: &Path) -> io::Result<u64> {
    let netns = fs::File::open(path)?;
    std::thread::spawn(move || {
        setns(&netns, CloneFlags::CLONE_NEWNET)?;
        own_cookie()
    })
    .join()
    .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_stable_and_not_zero() {
        let cookie = own_cookie().expect("SO_NETNS_COOKIE (Linux 5.14)");
        assert_ne!(cookie, 0);
        assert_eq!(own_cookie().unwrap(), cookie);
    }

    #[test]
    fn the_own_namespace_is_among_all_with_its_cookie() {
        let cookie = own_cookie().unwrap();
        let own = fs::metadata("/proc/self/ns/net").unwrap();
        let found = all().unwrap();
        let path = found
            .iter()
            .find(|p| fs::metadata(p).is_ok_and(|m| m.ino() == own.ino() && m.dev() == own.dev()))
            .expect("the agent's own namespace");
        assert_eq!(cookie_of(path).unwrap(), cookie);
    }
}
