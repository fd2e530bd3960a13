//! What the kernel programs and user space share: every map's pinned name
//! and capacity ([`maps`]), the `#[repr(C)]` keys and values of each
//! concern, and the one list of datapath outcomes ([`outcome`]).
//!
//! Every type here is `#[repr(C)]` with explicit padding, and its size and
//! field offsets are asserted at compile time, so that its layout is the same
//! in the BPF objects and in the agent. Addresses are stored as 16 bytes in
//! network byte order, IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`), so one
//! map serves both families; ports are stored in network byte order, as the
//! kernel hands them to `sock_addr` programs.
//!
//! A change to a map's key or value layout changes the version suffix of its
//! pinned name (see [`maps`]), so a new agent never reads a pinned map of an
//! older layout as if it were its own.
#![no_std]
// The layouts are shared with the kernel: decoding a record the kernel wrote
// and declaring the types plain old data for aya take unsafe code, each
// block with its SAFETY comment.
#![allow(
    unsafe_code,
    reason = "kernel-shared layouts: Pod impls and record decoding"
)]

pub mod affinity;
pub mod config;
pub mod conntrack;
pub mod events;
pub mod fragment;
pub mod maglev;
pub mod maps;
pub mod nat;
pub mod net;
pub mod outcome;
pub mod policy;
pub mod reject;
pub mod service;
pub mod socket;
pub mod source_range;

/// Asserts at compile time that `$ty` is `$size` bytes and that each named
/// field sits at the given offset: a layout shared with the kernel must not
/// move silently.
macro_rules! assert_layout {
    ($ty:ty, $size:expr, { $($field:ident: $offset:expr),* $(,)? }) => {
        const _: () = {
            assert!(core::mem::size_of::<$ty>() == $size);
            $(assert!(core::mem::offset_of!($ty, $field) == $offset);)*
        };
    };
}
pub(crate) use assert_layout;

/// Implements `aya::Pod` for types shared with the kernel (user space only).
#[cfg(feature = "user")]
macro_rules! user_pod {
    ($($ty:ty),* $(,)?) => {
        $(
            // SAFETY: the type is repr(C) and Copy, its padding is explicit
            // (see its layout assertion) and every bit pattern is a valid value.
            unsafe impl aya::Pod for $ty {}
        )*
    };
}
#[cfg(feature = "user")]
pub(crate) use user_pod;
