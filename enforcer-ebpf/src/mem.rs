//! Word-wise moves of addresses and structs. The BPF backend turns `memset` and `memmove` (what
//! LLVM emits for zeroing, and for copies through raw pointers such as map values) into calls to a
//! byte loop: ~6 instructions per byte plus a BPF-to-BPF call. These helpers move 4 or 8 bytes
//! per instruction instead. Volatile accesses keep LLVM from merging them back into such calls.
//!
//! Every `[u8; 16]` passed here must be 4-byte aligned: true of every address field of the map
//! types (`enforcer-common` lays them out at multiples of 4) and of [`crate::parse::Packet`] and
//! [`crate::parse::Inner`], which are aligned on purpose.

use core::ptr::{read_volatile, write_volatile};

/// Word `i` (0..4) of a 4-byte aligned address, in memory order.
#[inline(always)]
pub fn word(a: &[u8; 16], i: usize) -> u32 {
    unsafe { read_volatile((a.as_ptr() as *const u32).add(i)) }
}

/// `dst = *src` for 4-byte aligned addresses.
#[inline(always)]
pub fn copy16(dst: &mut [u8; 16], src: &[u8; 16]) {
    let d = dst.as_mut_ptr() as *mut u32;
    let mut i = 0;
    while i < 4 {
        unsafe { write_volatile(d.add(i), word(src, i)) };
        i += 1;
    }
}

/// `dst = [0; 16]` for a 4-byte aligned address.
#[inline(always)]
pub fn zero16(dst: &mut [u8; 16]) {
    let d = dst.as_mut_ptr() as *mut u32;
    let mut i = 0;
    while i < 4 {
        unsafe { write_volatile(d.add(i), 0) };
        i += 1;
    }
}

/// Zeroes `*p`, a value whose size is a multiple of 8 and whose alignment is 8.
#[inline(always)]
pub fn zero_words<T>(p: &mut T) {
    const { assert!(core::mem::size_of::<T>() % 8 == 0 && core::mem::align_of::<T>() == 8) };
    let d = p as *mut T as *mut u64;
    let mut i = 0;
    while i < core::mem::size_of::<T>() / 8 {
        unsafe { write_volatile(d.add(i), 0) };
        i += 1;
    }
}
