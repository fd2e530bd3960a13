//! Finds a process holding a socket and borrows its file descriptor.
//!
//! A connected UDP socket gets another peer only through a `connect()` on a
//! file descriptor of it. The agent finds a process holding the socket in
//! `/proc/PID/fd` (a link to `socket:[INODE]`) and takes a duplicate of that
//! descriptor with `pidfd_getfd(2)`: the same open socket, not a copy. The
//! kernel allows it with `CAP_SYS_PTRACE` over the process.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsStr,
    fs, io,
    os::fd::OwnedFd,
    path::Path,
};

use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};

/// A file descriptor of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The process.
    pub pid: i32,
    /// The descriptor's number in it.
    pub fd: i32,
}

/// Errors borrowing a descriptor.
#[derive(Debug, thiserror::Error)]
pub enum BorrowError {
    /// `pidfd_open` failed: the process has ended.
    #[error("opening process {pid}: {source}")]
    Process {
        /// The process.
        pid: i32,
        /// The error.
        source: io::Error,
    },
    /// `pidfd_getfd` failed: the descriptor was closed, or the agent lacks
    /// `CAP_SYS_PTRACE` over the process (or a security module refuses).
    #[error("taking descriptor {fd} of process {pid}: {source}{hint}", hint = if source.raw_os_error() == Some(libc::EPERM) { " (the agent needs CAP_SYS_PTRACE to connect another process's socket again)" } else { "" })]
    Descriptor {
        /// The process.
        pid: i32,
        /// The descriptor.
        fd: i32,
        /// The error.
        source: io::Error,
    },
    /// The descriptor now names another file: the socket was closed and
    /// the number reused meanwhile.
    #[error("descriptor {fd} of process {pid} no longer holds the socket")]
    Replaced {
        /// The process.
        pid: i32,
        /// The descriptor.
        fd: i32,
    },
}

/// The inode a `/proc/PID/fd` link names, if it is a socket's.
pub fn socket_inode(target: &OsStr) -> Option<u64> {
    target
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// What a walk of `/proc` found.
#[derive(Debug, Default)]
pub struct Holders {
    /// One holder of each socket found.
    pub found: BTreeMap<u64, Holder>,
    /// Processes whose descriptors the agent may not list (it lacks
    /// `CAP_SYS_PTRACE` over them).
    pub denied: usize,
}

impl Holders {
    /// Why no holder of a socket was found.
    pub fn why_missing(&self) -> String {
        if self.denied == 0 {
            return "no process the agent can see holds it (the agent must run in the host's \
                    PID namespace)"
                .into();
        }
        format!(
            "no process whose descriptors the agent may list holds it ({} may not be listed: \
             the agent needs CAP_SYS_PTRACE)",
            self.denied
        )
    }
}

/// One holder of each socket of `inodes` found among the processes under
/// `proc` (the node's `/proc`). Processes and descriptors that vanish
/// during the walk are skipped; it stops once every socket has a holder.
pub fn find_holders(proc: &Path, inodes: &BTreeSet<u64>) -> Holders {
    let mut holders = Holders::default();
    let Ok(processes) = fs::read_dir(proc) else {
        return holders;
    };
    let found = &mut holders.found;
    let number = |name: &OsStr| name.to_str().and_then(|n| n.parse::<i32>().ok());
    for process in processes.flatten() {
        let Some(pid) = number(&process.file_name()) else {
            continue;
        };
        let Ok(descriptors) = fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        for descriptor in descriptors.flatten() {
            let Some(fd) = number(&descriptor.file_name()) else {
                continue;
            };
            // The kernel lets a process read another's descriptor links
            // only with ptrace access to it.
            let target = match fs::read_link(descriptor.path()) {
                Ok(target) => target,
                Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
                    holders.denied += 1;
                    break;
                }
                Err(_) => continue,
            };
            if let Some(inode) = socket_inode(target.as_os_str()).filter(|i| inodes.contains(i)) {
                found.entry(inode).or_insert(Holder { pid, fd });
            }
        }
        if found.len() == inodes.len() {
            break;
        }
    }
    holders
}

/// A descriptor of the socket with `inode`, duplicated from `holder`.
pub fn borrow(holder: Holder, inode: u64) -> Result<OwnedFd, BorrowError> {
    let Holder { pid, fd } = holder;
    let process = Pid::from_raw(pid)
        .ok_or(rustix::io::Errno::SRCH)
        .and_then(|pid| pidfd_open(pid, PidfdFlags::empty()))
        .map_err(|errno| BorrowError::Process {
            pid,
            source: errno.into(),
        })?;
    let borrowed = pidfd_getfd(&process, fd, PidfdGetfdFlags::empty()).map_err(|errno| {
        BorrowError::Descriptor {
            pid,
            fd,
            source: errno.into(),
        }
    })?;
    match nix::sys::stat::fstat(&borrowed) {
        Ok(stat) if stat.st_ino == inode => Ok(borrowed),
        _ => Err(BorrowError::Replaced { pid, fd }),
    }
}

#[cfg(test)]
mod tests {
    use std::{net::UdpSocket, os::fd::AsRawFd, os::unix::fs::symlink};

    use super::*;

    #[test]
    fn socket_links_name_their_inode() {
        assert_eq!(socket_inode(OsStr::new("socket:[4026532]")), Some(4026532));
        for other in [
            "pipe:[12]",
            "/dev/null",
            "socket:[x]",
            "socket:[12",
            "anon_inode:[eventfd]",
        ] {
            assert_eq!(socket_inode(OsStr::new(other)), None, "{other}");
        }
    }

    #[test]
    fn holders_are_found_under_a_proc_tree() {
        let proc = std::env::temp_dir().join(format!("lb-owners-{}", std::process::id()));
        let _ = fs::remove_dir_all(&proc);
        for (pid, fd, target) in [
            ("17", "3", "socket:[100]"),
            ("17", "4", "pipe:[101]"),
            ("23", "9", "socket:[102]"),
            ("23", "10", "socket:[100]"),
            ("self", "5", "socket:[103]"),
        ] {
            let dir = proc.join(pid).join("fd");
            fs::create_dir_all(&dir).unwrap();
            symlink(target, dir.join(fd)).unwrap();
        }
        fs::create_dir_all(proc.join("31")).unwrap();
        let holders = find_holders(&proc, &[100, 102, 103, 104].into());
        fs::remove_dir_all(&proc).unwrap();
        assert_eq!(holders.denied, 0);
        assert!(holders.why_missing().contains("PID namespace"));
        let found = holders.found;
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(matches!(
            found[&100],
            Holder { pid: 17, fd: 3 } | Holder { pid: 23, fd: 10 }
        ));
        assert_eq!(found[&102], Holder { pid: 23, fd: 9 });
    }

    #[test]
    fn a_borrowed_descriptor_is_the_same_socket() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let inode = nix::sys::stat::fstat(&socket).unwrap().st_ino;
        let me = Holder {
            pid: std::process::id() as i32,
            fd: socket.as_raw_fd(),
        };
        let found = find_holders(Path::new("/proc"), &[inode].into()).found;
        assert_eq!(found.get(&inode).map(|h| h.fd), Some(me.fd));
        let borrowed = UdpSocket::from(borrow(me, inode).unwrap());
        assert_eq!(borrowed.local_addr().unwrap(), socket.local_addr().unwrap());
        assert!(matches!(
            borrow(me, inode + 1),
            Err(BorrowError::Replaced { .. })
        ));
        assert!(matches!(
            borrow(Holder { fd: 99_999, ..me }, inode),
            Err(BorrowError::Descriptor { .. })
        ));
    }
}
