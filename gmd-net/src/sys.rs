//! Batched UDP I/O on Linux: `sendmmsg`/`recvmmsg`, UDP GSO (`UDP_SEGMENT`)
//! and GRO (`UDP_GRO`), through libc. Everything unsafe in the crate is here,
//! each block next to the invariant it relies on.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

/// Largest number of messages handed to one `sendmmsg`/`recvmmsg`.
pub(crate) const BATCH_MAX: usize = 32;
/// Largest number of segments of one GSO send (the kernel's UDP_MAX_SEGMENTS).
pub(crate) const GSO_SEGMENTS_MAX: usize = 64;
/// Largest GSO super-datagram.
pub(crate) const GSO_BYTES_MAX: usize = crate::proto::TRANSMIT_BYTES_MAX;
/// Socket buffer size asked for (the kernel may clamp it).
pub(crate) const SOCKET_BUFFER_BYTES: usize = 16 << 20;

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
const CMSG_SPACE_BYTES: usize = 64;

/// Binds a non-blocking UDP socket with large buffers and, where the kernel
/// allows, GRO. Returns the socket and whether GSO is usable.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<(std::net::UdpSocket, bool, bool)> {
    let sock = std::net::UdpSocket::bind(addr)?;
    sock.set_nonblocking(true)?;
    let fd = sock.as_raw_fd();
    for (force, normal) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt_int(
            fd,
            libc::SOL_SOCKET,
            force,
            SOCKET_BUFFER_BYTES as libc::c_int,
        )
        .is_err()
        {
            let _ = setsockopt_int(
                fd,
                libc::SOL_SOCKET,
                normal,
                SOCKET_BUFFER_BYTES as libc::c_int,
            );
        }
    }
    let gro = setsockopt_int(fd, SOL_UDP, UDP_GRO, 1).is_ok();
    // GSO is per-send; probe that the option is known.
    let gso = getsockopt_int(fd, SOL_UDP, UDP_SEGMENT).is_ok();
    Ok((sock, gso, gro))
}

/// Sends every datagram of `sock` with the don't-fragment bit and never
/// fragments one locally, whatever the kernel learnt of the path
/// (`IP_PMTUDISC_PROBE`): path-MTU discovery's probes must be dropped by a
/// hop that cannot carry them, not split. A datagram larger than the
/// interface's MTU fails to send.
pub(crate) fn set_dont_fragment(sock: &std::net::UdpSocket, ipv6: bool) -> io::Result<()> {
    let (level, name, value) = if ipv6 {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_PROBE,
        )
    } else {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_PROBE,
        )
    };
    setsockopt_int(sock.as_raw_fd(), level, name, value)
}

/// The largest UDP payload that crosses a path of `mtu` bytes unfragmented:
/// the MTU less the IP (20 bytes for IPv4, 40 for IPv6) and UDP (8) headers.
pub(crate) fn datagram_max_for_mtu(mtu: usize, ipv6: bool) -> usize {
    mtu.saturating_sub(if ipv6 { 48 } else { 28 })
}

/// The kernel's MTU of the path from `local`'s address to `peer`: the
/// route's, or what path-MTU discovery has learnt since (`IP_MTU` of a
/// socket connected there; nothing is sent).
pub(crate) fn path_mtu(local: SocketAddr, peer: SocketAddr) -> io::Result<usize> {
    let mut from = local;
    from.set_port(0);
    let sock = std::net::UdpSocket::bind(from)?;
    sock.connect(peer)?;
    let (level, name) = if peer.is_ipv4() {
        (libc::IPPROTO_IP, libc::IP_MTU)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU)
    };
    let mtu = getsockopt_int(sock.as_raw_fd(), level, name)?;
    usize::try_from(mtu).map_err(|_| io::Error::other("negative MTU"))
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `v` lives across the call and its size is passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn getsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn to_sockaddr(addr: &SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin =
                unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let sin6 =
                unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

fn from_sockaddr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let sin = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                u32::from_be(sin.sin_addr.s_addr).into(),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let sin6 =
                unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                sin6.sin6_addr.s6_addr.into(),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// One outgoing datagram or GSO batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutDatagram<'a> {
    pub(crate) dest: SocketAddr,
    pub(crate) data: &'a [u8],
    /// Segment size; equal to `data.len()` for a single datagram.
    pub(crate) segment: usize,
}

/// Sends datagrams with one `sendmmsg`. Returns how many entries of `items`
/// were sent completely. With `gso` false, batches are split into single
/// datagrams (no copy: each gets its own iovec into the same buffer).
///
/// # Errors
/// The OS error of the call when nothing was sent (`WouldBlock` included).
pub(crate) fn send_batch(
    sock: &impl AsRawFd,
    items: &[OutDatagram<'_>],
    gso: bool,
) -> io::Result<usize> {
    let fd = sock.as_raw_fd();
    // Expand to per-message entries: (item index, slice, segment or 0).
    let mut entries: [(usize, &[u8], u16); BATCH_MAX] = [(0, &[], 0); BATCH_MAX];
    let mut n = 0;
    'outer: for (i, it) in items.iter().enumerate() {
        if gso && it.segment < it.data.len() {
            if n == BATCH_MAX {
                break;
            }
            entries[n] = (i, it.data, it.segment as u16);
            n += 1;
        } else {
            for seg in it.data.chunks(it.segment.max(1)) {
                if n == BATCH_MAX {
                    break 'outer;
                }
                entries[n] = (i, seg, 0);
                n += 1;
            }
        }
    }
    // SAFETY: plain C structs; all-zero is a valid initial state.
    let mut addrs: [libc::sockaddr_storage; BATCH_MAX] = unsafe { zeroed() };
    let mut iovs: [libc::iovec; BATCH_MAX] = unsafe { zeroed() };
    let mut hdrs: [libc::mmsghdr; BATCH_MAX] = unsafe { zeroed() };
    let mut cmsgs = [[0u64; CMSG_SPACE_BYTES / 8]; BATCH_MAX];
    for k in 0..n {
        let (i, data, seg) = entries[k];
        let alen = to_sockaddr(&items[i].dest, &mut addrs[k]);
        iovs[k] = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let h = &mut hdrs[k].msg_hdr;
        h.msg_name = (&mut addrs[k] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = alen;
        h.msg_iov = &mut iovs[k];
        h.msg_iovlen = 1;
        if seg > 0 {
            h.msg_control = cmsgs[k].as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE of a u16 is far below CMSG_SPACE_BYTES.
            let space = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
            h.msg_controllen = space;
            // SAFETY: msg_control points at `space` writable, aligned bytes.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(h);
                (*c).cmsg_level = SOL_UDP;
                (*c).cmsg_type = UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
            }
        }
    }
    // SAFETY: hdrs[..n] point at live iovecs, addresses and control buffers.
    let r = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let sent = r as usize;
    // Count items whose every entry went out.
    let mut done = 0;
    for i in 0..items.len() {
        let last = entries[..n].iter().rposition(|e| e.0 == i);
        match last {
            Some(k) if k < sent => done = i + 1,
            _ => break,
        }
    }
    if done == 0 && sent > 0 {
        // A partial item (GSO-less split): report it sent to avoid resending
        // its first segments; the protocol recovers any tail as loss.
        done = 1;
    }
    Ok(done)
}

/// One received datagram located in the receive arena.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InDatagram {
    /// Slot index in the arena.
    pub(crate) slot: usize,
    /// Bytes received (possibly several GRO segments).
    pub(crate) len: usize,
    /// GRO segment size, or `len` when not coalesced.
    pub(crate) segment: usize,
    pub(crate) from: Option<SocketAddr>,
}

/// Receives up to `slots` datagrams with one `recvmmsg` into `arena`, which
/// holds `slots` consecutive slots of `slot_bytes` each (initialised memory:
/// the kernel overwrites what it receives, the rest keeps its old bytes).
///
/// # Errors
/// The OS error when nothing was received (`WouldBlock` included).
pub(crate) fn recv_batch(
    sock: &impl AsRawFd,
    arena: &mut [u8],
    slot_bytes: usize,
    out: &mut Vec<InDatagram>,
) -> io::Result<usize> {
    let fd = sock.as_raw_fd();
    let slots = (arena.len() / slot_bytes).min(BATCH_MAX);
    // SAFETY: plain C structs; all-zero is a valid initial state.
    let mut addrs: [libc::sockaddr_storage; BATCH_MAX] = unsafe { zeroed() };
    let mut iovs: [libc::iovec; BATCH_MAX] = unsafe { zeroed() };
    let mut hdrs: [libc::mmsghdr; BATCH_MAX] = unsafe { zeroed() };
    let mut cmsgs = [[0u64; CMSG_SPACE_BYTES / 8]; BATCH_MAX];
    for k in 0..slots {
        iovs[k] = libc::iovec {
            iov_base: arena[k * slot_bytes..].as_mut_ptr().cast(),
            iov_len: slot_bytes,
        };
        let h = &mut hdrs[k].msg_hdr;
        h.msg_name = (&mut addrs[k] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        h.msg_iov = &mut iovs[k];
        h.msg_iovlen = 1;
        h.msg_control = cmsgs[k].as_mut_ptr().cast();
        h.msg_controllen = CMSG_SPACE_BYTES;
    }
    // SAFETY: every header points at live buffers of the sizes given.
    let r = unsafe {
        libc::recvmmsg(
            fd,
            hdrs.as_mut_ptr(),
            slots as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let got = r as usize;
    for k in 0..got {
        let len = hdrs[k].msg_len as usize;
        let mut segment = len;
        let h = &hdrs[k].msg_hdr;
        // SAFETY: the kernel filled msg_control/msg_controllen; the CMSG
        // macros walk within msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(h);
            while !c.is_null() {
                if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                    let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                    if v > 0 {
                        segment = v as usize;
                    }
                }
                c = libc::CMSG_NXTHDR(h, c);
            }
        }
        out.push(InDatagram {
            slot: k,
            len,
            segment,
            from: from_sockaddr(&addrs[k]),
        });
    }
    Ok(got)
}
