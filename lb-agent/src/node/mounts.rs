//! Finds mounts by file system type in `/proc/self/mountinfo`: the cgroup v2
//! root differs between hosts (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`),
//! and bpffs may be missing.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// `(mount point, file system type)` of every mount in mountinfo text.
fn mounts(mountinfo: &str) -> impl Iterator<Item = (PathBuf, &str)> {
    mountinfo.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let separator = fields.iter().position(|f| *f == "-")?;
        Some((
            PathBuf::from(unescape(fields.get(4)?)),
            *fields.get(separator + 1)?,
        ))
    })
}

/// Mount points of every mount of file system type `fstype`, from mountinfo text.
pub fn mount_points(mountinfo: &str, fstype: &str) -> Vec<PathBuf> {
    mounts(mountinfo)
        .filter(|(_, t)| *t == fstype)
        .map(|(p, _)| p)
        .collect()
}

/// mountinfo escapes spaces and a few other bytes as `\NNN` (octal).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first cgroup v2 mount point of this mount namespace.
pub fn cgroup2_root() -> io::Result<Option<PathBuf>> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mount_points(&text, "cgroup2").into_iter().next())
}

/// Whether `path` lies on a mount of type `fstype` (the longest matching mount
/// point decides, as the kernel resolves it).
pub fn is_on_fs(path: &Path, fstype: &str) -> io::Result<bool> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    let path = path.canonicalize()?;
    let mut best: Option<(usize, bool)> = None;
    for (mount_point, mount_type) in mounts(&text) {
        if path.starts_with(&mount_point) {
            let depth = mount_point.components().count();
            if best.is_none_or(|(d, _)| depth >= d) {
                best = Some((depth, mount_type == fstype));
            }
        }
    }
    Ok(best.is_some_and(|(_, matches)| matches))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw
40 25 0:35 / /sys/fs/bpf rw shared:12 - bpf bpf rw
41 30 0:36 / /mnt/with\\040space rw - bpf bpf rw
";

    #[test]
    fn finds_mounts_by_type_including_escaped_paths() {
        assert_eq!(
            mount_points(MOUNTINFO, "cgroup2"),
            vec![PathBuf::from("/sys/fs/cgroup/unified")]
        );
        assert_eq!(
            mount_points(MOUNTINFO, "bpf"),
            vec![
                PathBuf::from("/sys/fs/bpf"),
                PathBuf::from("/mnt/with space")
            ]
        );
    }
}
