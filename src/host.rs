//! Facts of this process and machine that settings and metrics read: the
//! limit on open files, which every connection spends.

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
