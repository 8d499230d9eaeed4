//! Bounds-checked access to the packet, the same for XDP and TC.
//!
//! Headers are read straight from the linear packet data when they are
//! there (no helper call); when they are not (a TC skb whose headers sit in
//! a fragment, an XDP multi-buffer frame) the read falls back to the
//! `*_load_bytes` helper, which reads any part of the packet.

use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::{
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_skb_load_bytes, bpf_xdp_get_buff_len, bpf_xdp_load_bytes},
    },
    programs::{TcContext, XdpContext},
};
use mirror_common::record_flags;

/// A packet seen by one of the programs.
pub trait Packet {
    /// [`record_flags`] bits that say which program saw the packet.
    const FLAGS: u32;

    /// Length of the whole packet, fragments included.
    fn len(&self) -> u32;

    /// Interface the packet arrived on.
    fn ifindex(&self) -> u32;

    /// Start and end of the linear data the program may read directly.
    fn linear(&self) -> (usize, usize);

    /// Address of the kernel's `struct net_device` the packet is on, read
    /// along the offsets the loader found in the kernel's BTF (only called
    /// when it found them).
    fn device(&self) -> Option<usize>;

    /// Copies `len` bytes at `offset` of the packet to `dst`.
    ///
    /// # Safety
    /// `dst` must be valid for `len` bytes of writes.
    unsafe fn load_bytes(&self, offset: u32, dst: *mut c_void, len: u32) -> bool;

    /// Copies the `T` that starts `offset` bytes into the packet to `out`;
    /// false (and `out` unspecified) when the packet is too short. Unlike
    /// [`Self::load`] no `Option<T>` is built: LLVM may move the undefined
    /// payload of a `None` through registers, which the verifier rejects as
    /// a read of an uninitialized register.
    #[inline(always)]
    fn load_into<T: Copy>(&self, offset: usize, out: &mut T) -> bool {
        let (start, end) = self.linear();
        let size = size_of::<T>();
        if start + offset + size <= end {
            // SAFETY: the range was checked against the linear data just
            // above (the verifier checks it again); T is plain old data.
            *out = unsafe { ((start + offset) as *const T).read_unaligned() };
            return true;
        }
        // SAFETY: `out` has room for exactly `size` bytes.
        unsafe { self.load_bytes(offset as u32, core::ptr::from_mut(out).cast(), size as u32) }
    }

    /// Reads the `T` that starts `offset` bytes into the packet.
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        let (start, end) = self.linear();
        let size = size_of::<T>();
        if start + offset + size <= end {
            // SAFETY: the range was checked against the linear data just
            // above (the verifier checks it again); T is plain old data.
            return Some(unsafe { ((start + offset) as *const T).read_unaligned() });
        }
        let mut value = MaybeUninit::<T>::uninit();
        // SAFETY: `value` has room for exactly `size` bytes.
        if unsafe { self.load_bytes(offset as u32, value.as_mut_ptr().cast(), size as u32) } {
            // SAFETY: the helper filled all `size` bytes.
            Some(unsafe { value.assume_init() })
        } else {
            None
        }
    }
}

impl Packet for TcContext {
    const FLAGS: u32 = 0;

    #[inline(always)]
    fn len(&self) -> u32 {
        self.skb.len()
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the context pointer is valid for the whole program run.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn linear(&self) -> (usize, usize) {
        (self.data(), self.data_end())
    }

    #[inline(always)]
    unsafe fn load_bytes(&self, offset: u32, dst: *mut c_void, len: u32) -> bool {
        // SAFETY: forwarded from the caller's contract.
        unsafe { bpf_skb_load_bytes(self.skb.skb.cast(), offset, dst, len) == 0 }
    }

    #[inline(always)]
    fn device(&self) -> Option<usize> {
        // The context is the kernel's `struct sk_buff` (`__sk_buff` is only
        // the view the verifier rewrites field reads of).
        // SAFETY: a plain read of a global the loader may have rewritten.
        let dev = unsafe { core::ptr::read_volatile(&crate::MIRROR_NETNS_SKB_DEV) } as usize;
        read_address(self.skb.skb as usize + dev)
    }
}

impl Packet for XdpContext {
    const FLAGS: u32 = record_flags::XDP;

    #[inline(always)]
    fn len(&self) -> u32 {
        // Counts multi-buffer fragments too (the program declares `frags`).
        // SAFETY: the context pointer is valid for the whole program run.
        unsafe { bpf_xdp_get_buff_len(self.ctx) as u32 }
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn linear(&self) -> (usize, usize) {
        (self.data(), self.data_end())
    }

    #[inline(always)]
    unsafe fn load_bytes(&self, offset: u32, dst: *mut c_void, len: u32) -> bool {
        // SAFETY: forwarded from the caller's contract.
        unsafe { bpf_xdp_load_bytes(self.ctx, offset, dst, len) == 0 }
    }

    #[inline(always)]
    fn device(&self) -> Option<usize> {
        // The context is the kernel's `struct xdp_buff`.
        // SAFETY: plain reads of globals the loader may have rewritten.
        let (rxq, dev) = unsafe {
            (
                core::ptr::read_volatile(&crate::MIRROR_NETNS_XDP_RXQ) as usize,
                core::ptr::read_volatile(&crate::MIRROR_NETNS_RXQ_DEV) as usize,
            )
        };
        read_address(read_address(self.ctx as usize + rxq)? + dev)
    }
}

/// The pointer-sized word at kernel address `at` (`bpf_probe_read_kernel`:
/// a bad address fails instead of faulting).
#[inline(always)]
pub fn read_address(at: usize) -> Option<usize> {
    // SAFETY: the helper checks the address; the result is plain data.
    unsafe { bpf_probe_read_kernel(at as *const usize) }.ok()
}
