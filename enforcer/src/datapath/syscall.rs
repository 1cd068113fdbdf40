//! The raw `bpf(2)` calls aya does not offer: batched lookups and a lookup into a caller's
//! buffer.

use aya::maps::MapError;

/// Entries per `BPF_MAP_LOOKUP_BATCH` call.
pub(super) const BATCH: u32 = 4096;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// One `BPF_MAP_LOOKUP_ELEM` of `key` into `value` (plain-old-data types of the map's sizes).
pub(super) fn lookup_raw<K: aya::Pod, V: aya::Pod>(
    fd: std::os::fd::BorrowedFd<'_>,
    key: &K,
    value: &mut V,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut attr = ElemAttr {
        map_fd: u32::try_from(fd.as_raw_fd()).map_err(std::io::Error::other)?,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_mut(value) as u64,
        flags: 0,
    };
    // SAFETY: key and value point at values of the map's key and value sizes (the caller's
    // types), which outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_ELEM,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;

/// One `BPF_MAP_LOOKUP_BATCH` call: as many entries as `keys` and `values` hold (`key_size` and
/// `value_size` bytes each), from the start of the map or from the position `resume` an earlier
/// call returned. Returns how many came and where to resume (`None`: the map is done). Hash maps
/// use a bucket index as the position, arrays a key: both a u32.
pub(super) fn lookup_batch(
    fd: std::os::fd::BorrowedFd<'_>,
    resume: Option<u32>,
    keys: &mut [u8],
    key_size: usize,
    values: &mut [u8],
    value_size: usize,
) -> std::io::Result<(usize, Option<u32>)> {
    use std::os::fd::AsRawFd as _;
    let count = (keys.len() / key_size).min(values.len() / value_size);
    let in_batch = resume.unwrap_or(0);
    let mut out_batch = 0u32;
    let mut attr = BatchAttr {
        in_batch: if resume.is_some() {
            std::ptr::from_ref(&in_batch) as u64
        } else {
            0
        },
        out_batch: std::ptr::from_mut(&mut out_batch) as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: u32::try_from(count).map_err(std::io::Error::other)?,
        map_fd: u32::try_from(fd.as_raw_fd()).map_err(std::io::Error::other)?,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: the attr points at buffers holding `count` keys and values, which outlive the
    // call; the kernel writes at most `count` of each and a u32 to `out_batch`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if ret < 0 {
        let e = std::io::Error::last_os_error();
        // ENOENT: the last chunk (its `count` entries are valid).
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok((attr.count as usize, None));
        }
        return Err(e);
    }
    Ok((attr.count as usize, Some(out_batch)))
}

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

pub(super) fn not_found(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound | MapError::ElementNotFound)
}

/// Runs `f` on every entry of the hash map `fd` (keys `K`, values `V` of the map's sizes), read
/// in batches; returns how many. A snapshot only in the loose sense of any walk: entries may
/// come and go meanwhile.
pub(super) fn for_each_batched<K: aya::Pod, V: aya::Pod>(
    fd: std::os::fd::BorrowedFd<'_>,
    mut f: impl FnMut(&K, &V),
) -> std::io::Result<usize> {
    let (key_size, value_size) = (size_of::<K>(), size_of::<V>());
    let mut batch = BATCH as usize;
    let mut keys = vec![0u8; batch * key_size];
    let mut values = vec![0u8; batch * value_size];
    let mut resume = None;
    let mut total = 0usize;
    loop {
        match lookup_batch(fd, resume, &mut keys, key_size, &mut values, value_size) {
            Ok((n, next)) => {
                total += n;
                let found = keys
                    .chunks_exact(key_size)
                    .zip(values.chunks_exact(value_size));
                for (k, v) in found.take(n) {
                    // SAFETY: K and V are plain old data of exactly these sizes.
                    let (k, v): (K, V) = unsafe {
                        (
                            std::ptr::read_unaligned(k.as_ptr().cast()),
                            std::ptr::read_unaligned(v.as_ptr().cast()),
                        )
                    };
                    f(&k, &v);
                }
                match next {
                    Some(at) => resume = Some(at),
                    None => return Ok(total),
                }
            }
            // One bucket holds more entries than a batch: retry the same bucket with room for
            // it.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && batch < 1 << 20 => {
                batch *= 2;
                keys.resize(batch * key_size, 0);
                values.resize(batch * value_size, 0);
            }
            Err(e) => return Err(e),
        }
    }
}
