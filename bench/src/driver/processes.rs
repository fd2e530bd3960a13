//! Processes and network namespaces: a command fed its input, a namespace's
//! conntrack table flushed, root checked.

use std::{
    fs,
    io::Write,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Command, Stdio},
};

use anyhow::{bail, ensure, Context, Result};

/// Runs `command` with `input` on stdin; fails with its stderr.
pub(super) fn run_with_input(command: &mut Command, what: &str, input: String) -> Result<()> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child.wait_with_output()?;
    let written = writer.join().expect("writer does not panic");
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    written.with_context(|| format!("writing to {what}"))?;
    Ok(())
}

/// Flushes the IPv4 conntrack table of a network namespace (what
/// `conntrack -F` does), over ctnetlink from a thread that joined the
/// namespace.
pub(super) fn flush_conntrack(netns: &str) -> Result<()> {
    let ns = fs::File::open(format!("/var/run/netns/{netns}"))
        .with_context(|| format!("opening netns {netns}"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<()> {
                // SAFETY: setns(2) on a namespace descriptor we own; it only
                // changes this short-lived thread's network namespace.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error()).context("setns");
                }
                // SAFETY: plain socket(2) call; the result is checked below.
                let fd = unsafe {
                    libc::socket(
                        libc::AF_NETLINK,
                        libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                        libc::NETLINK_NETFILTER,
                    )
                };
                if fd < 0 {
                    return Err(std::io::Error::last_os_error()).context("netlink socket");
                }
                // SAFETY: fd is a fresh descriptor that nothing else owns.
                let sock = unsafe { OwnedFd::from_raw_fd(fd) };
                // nlmsghdr (len, type, flags, seq, pid) + nfgenmsg (family,
                // version, res_id): IPCTNL_MSG_CT_DELETE without attributes
                // flushes the table.
                const NFNL_SUBSYS_CTNETLINK: u16 = 1;
                const IPCTNL_MSG_CT_DELETE: u16 = 2;
                let mut msg = Vec::with_capacity(20);
                msg.extend_from_slice(&20u32.to_ne_bytes());
                msg.extend_from_slice(
                    &((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE).to_ne_bytes(),
                );
                msg.extend_from_slice(
                    &((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes(),
                );
                msg.extend_from_slice(&1u32.to_ne_bytes());
                msg.extend_from_slice(&0u32.to_ne_bytes());
                msg.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
                // SAFETY: msg is a live buffer of msg.len() bytes.
                let sent =
                    unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
                if sent < 0 {
                    return Err(std::io::Error::last_os_error()).context("netlink send");
                }
                let mut buf = [0u8; 1024];
                // SAFETY: buf is a live, writable buffer of buf.len() bytes.
                let got =
                    unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if got < 0 {
                    return Err(std::io::Error::last_os_error()).context("netlink recv");
                }
                let got = got as usize;
                ensure!(got >= 20, "short netlink answer ({got} bytes)");
                let kind = u16::from_ne_bytes([buf[4], buf[5]]);
                if kind == libc::NLMSG_ERROR as u16 {
                    let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
                    // ENOENT: the table was already empty.
                    if errno != 0 && errno != -libc::ENOENT {
                        return Err(std::io::Error::from_raw_os_error(-errno))
                            .context("conntrack flush");
                    }
                }
                Ok(())
            })
            .join()
            .expect("flush thread does not panic")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a thread inside network namespace `netns`.
    fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
        let ns = fs::File::open(format!("/var/run/netns/{netns}")).unwrap();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns(2) with a namespace descriptor we own; it
                    // only moves this test thread.
                    let entered = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(entered, 0);
                    f()
                })
                .join()
                .unwrap()
        })
    }

    #[test]
    fn conntrack_flush_empties_the_namespace_table() {
        lb_e2e::scenario::require_root();
        let netns = format!("lbbench-ct-{}", std::process::id());
        lb_e2e::lab::run("ip", &["netns", "add", &netns]).unwrap();
        let result = std::panic::catch_unwind(|| {
            lb_e2e::lab::run("ip", &["-n", &netns, "link", "set", "lo", "up"]).unwrap();
            run_with_input(
                Command::new("ip").args(["netns", "exec", &netns, "nft", "-f", "-"]),
                "nft",
                "add table ip t\nadd chain ip t out { type filter hook output priority 0 ; }\n\
                 add rule ip t out ct state new counter\n"
                    .into(),
            )
            .unwrap();
            let count = || {
                in_netns(&netns, || {
                    fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
                        .unwrap()
                        .trim()
                        .parse::<u64>()
                        .unwrap()
                })
            };
            in_netns(&netns, || {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                for _ in 0..5 {
                    let _c = std::net::TcpStream::connect(addr).unwrap();
                    let _ = listener.accept().unwrap();
                }
            });
            assert!(count() >= 5, "conntrack saw the connections");
            flush_conntrack(&netns).unwrap();
            assert_eq!(count(), 0);
            // Flushing an empty table is fine too.
            flush_conntrack(&netns).unwrap();
        });
        let _ = lb_e2e::lab::run("ip", &["netns", "del", &netns]);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }
}
