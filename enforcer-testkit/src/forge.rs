//! Packets a hostile pod (or node) forges, sent through raw sockets in the calling thread's
//! network namespace.

use std::{
    net::{Ipv4Addr, UdpSocket},
    time::Duration,
};

use crate::netns::{TestPod, in_netns};

/// An IPv4 UDP datagram `src:40000 -> dst:dport` carrying `payload`, with a valid header
/// checksum (the UDP checksum is left out, as IPv4 allows).
pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let total = (20 + 8 + payload.len()) as u16;
    let mut p = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p.extend(src.octets());
    p.extend(dst.octets());
    let mut sum: u32 = p
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p.extend(40000u16.to_be_bytes());
    p.extend(dport.to_be_bytes());
    p.extend((8 + payload.len() as u16).to_be_bytes());
    p.extend([0, 0]);
    p.extend(payload);
    p
}

/// Sends the IPv4 `packet` (its header included, whatever source it names) through a raw
/// socket, routed to its destination. Panics when the kernel does not take it whole.
pub fn send_raw_ipv4(packet: &[u8]) {
    assert!(packet.len() >= 20, "not an IPv4 packet");
    let dst = [packet[16], packet[17], packet[18], packet[19]];
    // SAFETY: a raw IPv4 socket (header included) this function owns and closes; the address
    // and the packet outlive the calls.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst),
            },
            sin_zero: [0; 8],
        };
        let n = libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(n, packet.len() as isize, "sendto: {err}");
    }
}

/// Whether `pod` receives a UDP datagram carrying `payload` on `port` while `send` runs (within
/// 1.5 s of the listener being up).
pub fn udp_arrives(pod: &TestPod, port: u16, payload: &'static [u8], send: impl FnOnce()) -> bool {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let netns = pod.netns.clone();
    let listener = std::thread::spawn(move || {
        in_netns(&netns, move || {
            let sock = UdpSocket::bind(("0.0.0.0", port)).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(1500)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 64];
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) if &buf[..n] == payload => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        })
        .unwrap()
    });
    ready_rx.recv().unwrap();
    send();
    listener.join().unwrap()
}
