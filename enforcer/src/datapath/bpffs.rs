//! bpffs helpers: make sure the pin folder is on a bpffs, and ask the kernel which interface a
//! pinned TCX link is attached to (aya does not expose that field).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

/// `BPF_FS_MAGIC` from `include/uapi/linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is conventionally mounted; the only place we mount one ourselves.
pub const SYS_FS_BPF: &str = "/sys/fs/bpf";

fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("path {} has a NUL byte", path.display()))
}

/// Whether `path` (which must exist) is on a bpffs.
pub fn is_bpffs(path: &Path) -> Result<bool> {
    let c = cstring(path)?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a valid out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// The nearest existing ancestor of `path` (or `path` itself).
fn existing_ancestor(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            return PathBuf::from("/");
        }
    }
    p
}

/// Mounts a bpffs at `target`.
pub fn mount_bpffs(target: &Path) -> Result<()> {
    std::fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    let t = cstring(target)?;
    let fstype = c"bpf";
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            t.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("mounting bpffs on {}", target.display()));
    }
    Ok(())
}

/// Makes sure `pin_path` lies on a bpffs: mounts one on /sys/fs/bpf when the path is under it and
/// no bpffs is there yet; otherwise fails with a clear error.
pub fn ensure_bpffs(pin_path: &Path) -> Result<()> {
    let existing = existing_ancestor(pin_path);
    if is_bpffs(&existing)? {
        return Ok(());
    }
    let sys = Path::new(SYS_FS_BPF);
    if pin_path.starts_with(sys) && !(sys.exists() && is_bpffs(sys)?) {
        mount_bpffs(sys)?;
        if is_bpffs(&existing_ancestor(pin_path))? {
            return Ok(());
        }
    }
    bail!(
        "pin path {} is not on a bpffs (nearest existing folder {} is not one); mount one with \
         `mount -t bpf bpf <dir>` or use a path under {SYS_FS_BPF}",
        pin_path.display(),
        existing.display()
    )
}

/// `bpf(2)` command numbers from `include/uapi/linux/bpf.h`.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_DETACH: libc::c_long = 34;

/// Opens a pinned BPF object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // union bpf_attr for BPF_OBJ_GET: { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; .. }
    let mut attr = [0u64; 4];
    attr[0] = c.as_ptr() as u64;
    // SAFETY: attr outlives the call and is as large as the kernel reads for this command.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr) as u32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The ifindex a TCX link is attached to (0 once its device is gone).
pub fn tcx_link_ifindex(path: &Path) -> io::Result<u32> {
    let fd = obj_get(path)?;
    // struct bpf_link_info: type, id, prog_id (u32 each), then a union aligned to 8 whose `tcx`
    // member starts with `__u32 ifindex`, i.e. at byte 16.
    let mut info = [0u64; 16];
    let mut attr = [0u64; 2];
    // union bpf_attr for BPF_OBJ_GET_INFO_BY_FD: { __u32 bpf_fd; __u32 info_len; __aligned_u64 info; }
    attr[0] = (fd.as_raw_fd() as u32 as u64) | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: attr and info outlive the call; info_len bounds what the kernel writes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr) as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info[2] as u32)
}

/// Detaches the pinned link at `path` now (`BPF_LINK_DETACH`), whoever else holds it, then
/// removes the pin. Releasing the last reference alone detaches only later, from a workqueue.
pub fn detach_pinned_link(path: &Path) -> io::Result<()> {
    match obj_get(path) {
        Ok(fd) => {
            // union bpf_attr for BPF_LINK_DETACH: { __u32 link_fd; }
            let mut attr = [0u64; 1];
            attr[0] = fd.as_raw_fd() as u32 as u64;
            // SAFETY: attr outlives the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_LINK_DETACH,
                    attr.as_mut_ptr(),
                    std::mem::size_of_val(&attr) as u32,
                )
            };
            // EINVAL/ENOLINK: a link that is already defunct or not detachable; unpinning is all
            // that is left to do.
            if rc < 0 {
                let e = io::Error::last_os_error();
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL | libc::ENOLINK | libc::EOPNOTSUPP)
                ) {
                    return Err(e);
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(_) => {}
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
