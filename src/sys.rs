//! Socket options no dependency sets: `TCP_DEFER_ACCEPT`, and `SO_ORIGINAL_DST`, the address a
//! connection was sent to before netfilter redirected it.
//!
//! Calls into the C library, each with a value that lives across the call and its exact size.
//! With the listener's registration in [`crate::socket`], this is all the crate's `unsafe`
//! code.

#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::Duration;

/// Asks the kernel to hand a connection on this listening socket to `accept` only once its
/// first bytes have arrived, or once it has sent nothing for about `wait` (Linux retries the
/// SYN-ACK at the end of the wait; the client's answer to it completes the connection).
/// `Duration::ZERO` turns deferral off. Elsewhere than Linux this is unsupported.
pub fn set_defer_accept(socket: &impl AsFd, wait: Duration) -> io::Result<()> {
    imp::set_defer_accept(socket, u32::try_from(wait.as_secs()).unwrap_or(u32::MAX))
}

/// The deferral the kernel applies on this listening socket, as it reports it.
pub fn defer_accept(socket: &impl AsFd) -> io::Result<Duration> {
    imp::defer_accept(socket).map(|secs| Duration::from_secs(secs.into()))
}

/// Where a connection that netfilter redirected (`[capture]`) was headed: its original
/// destination, read from conntrack. `v6` says the connection's family. A connection that was
/// not redirected reports its own local address (or an error, without conntrack).
pub fn original_destination(socket: &impl AsFd, v6: bool) -> io::Result<SocketAddr> {
    imp::original_destination(socket, v6)
}

/// The uid this process acts as.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod imp {
    use std::io;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
    use std::os::fd::{AsFd, AsRawFd};

    /// `getsockopt` into a zeroed `T`; `T` is a C struct the kernel fills in.
    fn get<T: Copy>(
        socket: &impl AsFd,
        level: libc::c_int,
        name: libc::c_int,
        mut value: T,
    ) -> io::Result<T> {
        let mut len = size_of::<T>() as libc::socklen_t;
        // SAFETY: the descriptor is borrowed, so open for the call; `value` is a live `T` and
        // `len` its size: the kernel writes at most `len` bytes into it.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_fd().as_raw_fd(),
                level,
                name,
                (&raw mut value).cast(),
                &raw mut len,
            )
        };
        if rc == 0 {
            Ok(value)
        } else {
            Err(io::Error::last_os_error())
        }
    }

    pub fn original_destination(socket: &impl AsFd, v6: bool) -> io::Result<SocketAddr> {
        if v6 {
            // SAFETY: sockaddr_in6 is plain data, valid when zeroed.
            let zero: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            let a = get(socket, libc::SOL_IPV6, libc::IP6T_SO_ORIGINAL_DST, zero)?;
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                0,
                a.sin6_scope_id,
            )))
        } else {
            // SAFETY: sockaddr_in is plain data, valid when zeroed.
            let zero: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            let a = get(socket, libc::SOL_IP, libc::SO_ORIGINAL_DST, zero)?;
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
    }

    const LEN: libc::socklen_t = size_of::<libc::c_int>() as libc::socklen_t;

    pub fn set_defer_accept(socket: &impl AsFd, secs: u32) -> io::Result<()> {
        let value = libc::c_int::try_from(secs).unwrap_or(libc::c_int::MAX);
        // SAFETY: the descriptor is borrowed, so open for the call; `value` is a live c_int and
        // `LEN` is its size, which is what the kernel reads for this option.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_fd().as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&raw const value).cast(),
                LEN,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    pub fn defer_accept(socket: &impl AsFd) -> io::Result<u32> {
        let mut value: libc::c_int = 0;
        let mut len = LEN;
        // SAFETY: as above; the kernel writes at most `len` bytes into `value` and the new
        // length into `len`, both live for the call.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_fd().as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&raw mut value).cast(),
                &raw mut len,
            )
        };
        if rc == 0 {
            Ok(u32::try_from(value).unwrap_or(0))
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod imp {
    use std::io;
    use std::net::SocketAddr;
    use std::os::fd::AsFd;

    pub fn original_destination(_: &impl AsFd, _: bool) -> io::Result<SocketAddr> {
        Err(io::ErrorKind::Unsupported.into())
    }

    pub fn set_defer_accept(_: &impl AsFd, _: u32) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    pub fn defer_accept(_: &impl AsFd) -> io::Result<u32> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferral_is_set_read_back_and_cleared() {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(defer_accept(&socket).unwrap(), Duration::ZERO);
        set_defer_accept(&socket, Duration::from_secs(1)).unwrap();
        assert_eq!(defer_accept(&socket).unwrap(), Duration::from_secs(1));
        set_defer_accept(&socket, Duration::ZERO).unwrap();
        assert_eq!(defer_accept(&socket).unwrap(), Duration::ZERO);
    }
}
