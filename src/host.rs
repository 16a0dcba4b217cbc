//! Facts of this process and machine that settings and metrics read: the
//! limit on open files, which every connection spends, and the free space
//! of a file system.

/// Raises the soft limit on open files to the hard one, as Go's runtime and
/// nginx do: every client connection and its upstream one takes a
/// descriptor, and the soft limit (often 1024) is a default, not a policy.
/// Call before the settings are read, whose connection cap follows it.
pub fn raise_open_files_limit() {
    if let Some(mut limit) = open_files() {
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            // SAFETY: setrlimit only reads the struct given.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
        }
    }
}

/// The soft limit on open files now; `None` if unlimited or unknown.
pub fn open_files_limit() -> Option<u64> {
    open_files().map(|l| l.rlim_cur).filter(|&n| n != libc::RLIM_INFINITY)
}

fn open_files() -> Option<libc::rlimit> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct given.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit)
}

/// The space of the file system holding `dir`: bytes free to an
/// unprivileged writer, and its size; `None` if it cannot be read.
pub fn disk_space(dir: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value of the plain C struct.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and outlives the call; statvfs only writes `stat`.
    let read = unsafe { libc::statvfs(path.as_ptr(), &mut stat) } == 0;
    // The fields are 64-bit here, 32-bit on some targets.
    #[allow(clippy::unnecessary_cast)]
    let (block, free, total) = (stat.f_frsize as u64, stat.f_bavail as u64, stat.f_blocks as u64);
    read.then(|| (free.saturating_mul(block), total.saturating_mul(block)))
}
