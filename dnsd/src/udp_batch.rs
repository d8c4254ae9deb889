//! Batched UDP I/O for the ingest and DNS sockets: one `recvmmsg` takes up to [`BATCH`]
//! datagrams, one `sendmmsg` sends up to [`BATCH`] replies. Under load this divides the
//! per-syscall and per-wake cost (about a microsecond each on a VM) by the batch size; with
//! one datagram waiting it costs what `recv_from` does.
//!
//! This is the one module of dnsd with `unsafe` code: the two libc calls, whose buffers are
//! built here and live across each call. Other platforms get one datagram per call.

#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;

use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagrams per call.
pub const BATCH: usize = 32;

/// Received datagrams: buffers reused from batch to batch.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    lens: [usize; BATCH],
    from: [Option<SocketAddr>; BATCH],
    /// The datagram was longer than its buffer (and was cut).
    cut: [bool; BATCH],
    n: usize,
}

impl RecvBatch {
    /// Buffers of `cap` bytes each (a larger datagram is cut to `cap`: make `cap` one over the
    /// largest accepted size to see oversized ones as such).
    pub fn new(cap: usize) -> Self {
        RecvBatch { bufs: (0..BATCH).map(|_| vec![0u8; cap]).collect(), lens: [0; BATCH], from: [None; BATCH], cut: [false; BATCH], n: 0 }
    }

    /// Waits for the socket, then takes what is waiting (at least one datagram, at most
    /// [`BATCH`]) without blocking again.
    pub async fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        loop {
            sock.readable().await?;
            match sock.try_io(Interest::READABLE, || self.recv_now(sock, false)) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Blocks until a datagram comes (or the socket's read timeout passes: `WouldBlock` or
    /// `TimedOut`), then takes what is waiting, at most [`BATCH`]: one syscall per batch, no
    /// readiness round trip (for a thread of its own, as the DNS UDP loop runs).
    pub fn recv_blocking(&mut self, sock: &std::net::UdpSocket) -> io::Result<usize> {
        self.recv_now(sock, true)
    }

    /// Datagrams in the latest batch.
    pub fn count(&self) -> usize {
        self.n
    }

    /// Datagram `i` of the latest batch and its sender (`None`: an address family we do not
    /// read, never the case for our IPv4/IPv6 sockets).
    pub fn get(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        (&self.bufs[i][..self.lens[i]], self.from[i])
    }

    /// Whether datagram `i` was longer than the buffer (what [`Self::get`] gives is cut).
    pub fn was_cut(&self, i: usize) -> bool {
        self.cut[i]
    }

    /// `wait_for_one`: block for the first datagram (a blocking socket), not for the others.
    #[cfg(target_os = "linux")]
    fn recv_now(&mut self, sock: &impl std::os::fd::AsRawFd, wait_for_one: bool) -> io::Result<usize> {
        // Left uninitialised: the kernel writes each sender's address (zeroing 4 KiB per call
        // cost more than the rest of a one-datagram batch), and only what it wrote is read.
        let mut addrs = [const { std::mem::MaybeUninit::<libc::sockaddr_storage>::uninit() }; BATCH];
        // SAFETY: all-zero is a valid value of these plain C structs.
        let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (i, buf) in self.bufs.iter_mut().enumerate() {
            iovs[i] = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
            msgs[i].msg_hdr.msg_name = addrs[i].as_mut_ptr().cast();
            msgs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            msgs[i].msg_hdr.msg_iov = &mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every pointer in `msgs` points into `addrs`, `iovs` or `self.bufs`, which
        // outlive the call and are not otherwise touched during it; lengths are theirs. The
        // socket is non-blocking (tokio's), so the call does not wait.
        let flags = if wait_for_one { libc::MSG_WAITFORONE } else { 0 };
        let r = unsafe { libc::recvmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as libc::c_uint, flags, std::ptr::null_mut()) };
        if r < 0 {
            self.n = 0;
            return Err(io::Error::last_os_error());
        }
        let n = r as usize;
        for i in 0..n {
            self.lens[i] = (msgs[i].msg_len as usize).min(self.bufs[i].len());
            self.cut[i] = msgs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            // SAFETY: the kernel wrote `msg_namelen` bytes of address into `addrs[i]`.
            self.from[i] = unsafe { sockaddr_to(addrs[i].as_ptr(), msgs[i].msg_hdr.msg_namelen) };
        }
        self.n = n;
        Ok(n)
    }

    #[cfg(not(target_os = "linux"))]
    fn recv_now(&mut self, sock: &impl RecvFrom, _wait_for_one: bool) -> io::Result<usize> {
        let (len, from) = sock.recv_from_now(&mut self.bufs[0])?;
        self.lens[0] = len;
        self.from[0] = Some(from);
        self.cut[0] = len == self.bufs[0].len();
        self.n = 1;
        Ok(1)
    }
}

/// One datagram per call where there is no recvmmsg.
#[cfg(not(target_os = "linux"))]
trait RecvFrom {
    fn recv_from_now(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)>;
}

#[cfg(not(target_os = "linux"))]
impl RecvFrom for UdpSocket {
    fn recv_from_now(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.try_recv_from(buf)
    }
}

#[cfg(not(target_os = "linux"))]
impl RecvFrom for std::net::UdpSocket {
    fn recv_from_now(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.recv_from(buf)
    }
}

/// The address the kernel wrote at `ss`, `len` bytes of it.
///
/// # Safety
/// `ss` points to a `sockaddr_storage` whose first `len` bytes are initialised.
#[cfg(target_os = "linux")]
unsafe fn sockaddr_to(ss: *const libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    let len = len as usize;
    if len < std::mem::size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: the family field is first and within the `len` initialised bytes.
    let family = unsafe { (*ss).ss_family };
    match i32::from(family) {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, all of it written.
            let a: &libc::sockaddr_in = unsafe { &*ss.cast() };
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)), u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*ss.cast() };
            Some(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(a.sin6_addr.s6_addr), u16::from_be(a.sin6_port), a.sin6_flowinfo, a.sin6_scope_id)))
        }
        _ => None,
    }
}

/// Sends `msgs` (payload, destination) on a blocking socket (the DNS UDP thread) in as few
/// calls as it takes, waiting while the send buffer is full; a reply the socket refuses (an
/// error for that destination) is logged at debug and skipped, as a `send_to` error was before.
pub fn send_all_blocking(sock: &std::net::UdpSocket, msgs: &[(&[u8], SocketAddr)]) {
    let mut done = 0;
    while done < msgs.len() {
        match send_now(sock, &msgs[done..]) {
            Ok(n) => done += n.max(1),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!(to = %msgs[done].1, "udp send error: {e}");
                done += 1;
            }
        }
    }
}

#[cfg(target_os = "linux")]
fn send_now(sock: &impl std::os::fd::AsRawFd, msgs: &[(&[u8], SocketAddr)]) -> io::Result<usize> {
    let n = msgs.len().min(BATCH);
    let addrs: Vec<socket2::SockAddr> = msgs[..n].iter().map(|(_, a)| socket2::SockAddr::from(*a)).collect();
    // SAFETY: all-zero is a valid value of these plain C structs.
    let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for i in 0..n {
        iovs[i] = libc::iovec { iov_base: msgs[i].0.as_ptr() as *mut libc::c_void, iov_len: msgs[i].0.len() };
        hdrs[i].msg_hdr.msg_name = addrs[i].as_ptr() as *mut libc::c_void;
        hdrs[i].msg_hdr.msg_namelen = addrs[i].len();
        hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: the pointers point into `addrs`, `iovs` and the callers' payloads, all alive for
    // the call; the kernel only reads through them (sendmmsg writes `msg_len` in `hdrs`).
    let r = unsafe { libc::sendmmsg(sock.as_raw_fd(), hdrs.as_mut_ptr(), n as libc::c_uint, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

#[cfg(not(target_os = "linux"))]
fn send_now(sock: &impl SendTo, msgs: &[(&[u8], SocketAddr)]) -> io::Result<usize> {
    sock.send_to_now(msgs[0].0, msgs[0].1).map(|_| 1)
}

#[cfg(not(target_os = "linux"))]
trait SendTo {
    fn send_to_now(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize>;
}

#[cfg(not(target_os = "linux"))]
impl SendTo for UdpSocket {
    fn send_to_now(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.try_send_to(buf, to)
    }
}

#[cfg(not(target_os = "linux"))]
impl SendTo for std::net::UdpSocket {
    fn send_to_now(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.send_to(buf, to)
    }
}
