//! One-socket lookup through `NETLINK_SOCK_DIAG`: the inode of the TCP socket
//! with an exact (source, destination) pair, asked of the kernel directly.
//!
//! Reading `/proc/net/tcp{,6}` makes the kernel print every socket on the
//! host, TIME_WAIT included — with thousands of short connections that costs
//! milliseconds per lookup. An exact `SOCK_DIAG_BY_FAMILY` request (no dump)
//! costs one round trip regardless of how many sockets exist. Any failure here
//! returns `None` and the caller falls back to the tables.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
/// `inet_diag_msg` starts after the 16-byte `nlmsghdr`; `idiag_inode` sits at
/// offset 68 of it (family/state/timer/retrans 4, sockid 48, expires, rqueue,
/// wqueue, uid 16).
const INODE_OFFSET: usize = 16 + 68;

fn put_addr(out: &mut Vec<u8>, ip: IpAddr) {
    let mut words = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => words[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => words.copy_from_slice(&v6.octets()),
    }
    out.extend_from_slice(&words);
}

/// The request for the socket whose local end is `src` and remote end `dst`.
fn request(family: u8, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut body = vec![family, IPPROTO_TCP, 0, 0];
    body.extend_from_slice(&u32::MAX.to_ne_bytes()); // all TCP states
    body.extend_from_slice(&src.port().to_be_bytes());
    body.extend_from_slice(&dst.port().to_be_bytes());
    put_addr(&mut body, src.ip());
    put_addr(&mut body, dst.ip());
    body.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    body.extend_from_slice(&u32::MAX.to_ne_bytes()); // INET_DIAG_NOCOOKIE
    body.extend_from_slice(&u32::MAX.to_ne_bytes());
    let len = u32::try_from(16 + body.len()).unwrap_or(u32::MAX);
    let mut msg = Vec::with_capacity(16 + body.len());
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
    msg.extend_from_slice(&body);
    msg
}

fn ask(family: u8, src: SocketAddr, dst: SocketAddr) -> Option<u64> {
    use rustix::net::{
        netlink, recv, sendto, socket, AddressFamily, RecvFlags, SendFlags, SocketType,
    };
    let fd = socket(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        Some(netlink::SOCK_DIAG),
    )
    .ok()?;
    rustix::net::sockopt::set_socket_timeout(
        &fd,
        rustix::net::sockopt::Timeout::Recv,
        Some(Duration::from_millis(500)),
    )
    .ok()?;
    sendto(
        &fd,
        &request(family, src, dst),
        SendFlags::empty(),
        &netlink::SocketAddrNetlink::new(0, 0),
    )
    .ok()?;
    let mut buf = [0u8; 1024];
    let (n, _) = recv(&fd, &mut buf[..], RecvFlags::empty()).ok()?;
    let msg = buf.get(..n)?;
    let kind = u16::from_ne_bytes([*msg.get(4)?, *msg.get(5)?]);
    if kind != SOCK_DIAG_BY_FAMILY || kind == NLMSG_ERROR {
        return None;
    }
    let inode = msg.get(INODE_OFFSET..INODE_OFFSET + 4)?;
    let inode = u32::from_ne_bytes([inode[0], inode[1], inode[2], inode[3]]);
    (inode != 0).then_some(u64::from(inode))
}

/// The inode of the TCP socket whose local address is `src` and peer `dst`.
/// IPv4 pairs are tried as AF_INET, then as IPv4-mapped AF_INET6.
pub fn tcp_socket_inode(src: SocketAddr, dst: SocketAddr) -> Option<u64> {
    let v4 = |a: SocketAddr| match a.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(|ip| SocketAddr::new(IpAddr::V4(ip), a.port())),
        IpAddr::V4(_) => Some(a),
    };
    let mapped = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if let (Some(s), Some(d)) = (v4(src), v4(dst)) {
        if let Some(i) = ask(AF_INET, s, d) {
            return Some(i);
        }
    }
    ask(AF_INET6, mapped(src), mapped(dst))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn inode_of(stream: &TcpStream) -> u64 {
        use std::os::fd::AsRawFd;
        let link = std::fs::read_link(format!("/proc/self/fd/{}", stream.as_raw_fd())).unwrap();
        let s = link.to_string_lossy().into_owned();
        s.trim_start_matches("socket:[")
            .trim_end_matches(']')
            .parse()
            .unwrap()
    }

    #[test]
    fn finds_the_exact_socket_v4_and_v6() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let l = TcpListener::bind(bind).unwrap();
            let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (_s, peer) = l.accept().unwrap();
            let got = tcp_socket_inode(peer, l.local_addr().unwrap());
            assert_eq!(got, Some(inode_of(&c)), "{bind}");
            // The listener side of the pair is another socket.
            let (srv_local, srv_peer) = (l.local_addr().unwrap(), peer);
            assert_ne!(tcp_socket_inode(srv_local, srv_peer), Some(inode_of(&c)));
        }
        // No such connection: nothing, quickly.
        let t = std::time::Instant::now();
        assert_eq!(
            tcp_socket_inode(
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap()
            ),
            None
        );
        assert!(t.elapsed() < Duration::from_millis(400));
    }

    #[test]
    fn v4_client_to_a_dual_stack_listener() {
        let l = TcpListener::bind("[::]:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (s, peer) = l.accept().unwrap();
        // The accepted side reports v4-mapped addresses; the client socket is AF_INET.
        let got = tcp_socket_inode(peer, s.local_addr().unwrap());
        assert_eq!(got, Some(inode_of(&c)));
    }
}
