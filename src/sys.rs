//! `TCP_DEFER_ACCEPT`, the socket option no dependency sets.
//!
//! Two calls into the C library, each with a value that lives across the call and its exact
//! size. With the listener's registration in [`crate::socket`], this is all the crate's
//! `unsafe` code.

#![allow(unsafe_code)]

use std::io;
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

#[cfg(any(target_os = "linux", target_os = "android"))]
mod imp {
    use std::io;
    use std::os::fd::{AsFd, AsRawFd};

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
    use std::os::fd::AsFd;

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
